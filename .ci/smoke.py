"""The installed wheel as a new user meets it, from a folder outside the checkout: every command once, the
Python API, ``pretrained()`` from an HTTP server on 127.0.0.1, ``mantranet selftest``. Run by .ci/wheel-smoke
with the wheel's virtual environment, in an empty folder, with MANTRANET_HOME set to a fresh folder."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import converter
import mantranet_torch
from converter import load_weights, read_keras_h5, synthetic_keras_weights, write_official_h5
from converter import releases as release_table
from converter.releases import file_digests
from mantranet_torch import RELEASES

HERE = Path.cwd()
HOME = Path(os.environ["MANTRANET_HOME"])
MANTRANET = str(Path(sys.executable).with_name("mantranet"))
RELEASE = 4


def step(*argv: str, expect: int = 0) -> str:
    started = time.perf_counter()
    result = subprocess.run([MANTRANET, *argv], capture_output=True, text=True, timeout=900)
    print(f"$ mantranet {' '.join(argv)}  -> exit {result.returncode} in {time.perf_counter() - started:.1f} s")
    if result.returncode != expect or "Traceback" in result.stderr:
        sys.exit(f"unexpected:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"smoke check failed: {what}")
    print(f"  ok: {what}")


def main() -> None:
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for package in (mantranet_torch, converter):
        check(Path(package.__file__).resolve().is_relative_to(site), f"{package.__name__} imported from {site}")
    table = Path(str(release_table.RELEASES_JSON)).resolve()
    check(table == site / "converter" / "data" / "releases.json", "the release table is the wheel's package data")
    out = step("--version")
    check(out.strip() == f"mantranet-torch {mantranet_torch.__version__}", "--version")
    out = step("weights", "list")
    check(f"weights folder: {HOME / 'weights'}" in out, "weights list names the user cache")

    fixtures = HERE / "fixtures"
    fixtures.mkdir()
    h5 = fixtures / f"ManTraNet_Ptrain{RELEASE}.h5"  # identified by its name, as a user's copy would be
    arrays = synthetic_keras_weights(RELEASES[RELEASE], seed=1)
    write_official_h5(h5, arrays, RELEASES[RELEASE])
    out = step("convert", str(h5), "-o", "converted/")
    weights = HERE / "converted" / f"ManTraNet_Ptrain{RELEASE}.safetensors"
    check(weights.is_file() and weights.with_name(weights.name + ".json").is_file(), "convert wrote weights + manifest")
    record = json.loads(step("weights", "identify", str(weights), "--json"))
    check(record["details"]["config"] == RELEASES[RELEASE].to_dict(), "weights identify --json reads the config")

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(HERE / "image.png")
    report = json.loads(step("detect", "image.png", "-w", str(weights), "-o", "masks", "--save-npy", "--json"))
    check(report["written"] == 1 and report["failed"] == 0, "detect --json: one image written")
    likelihood = np.load(HERE / "masks" / "image.npy")
    model = load_weights(h5)
    expected = model.predict(np.array(Image.open(HERE / "image.png")))
    check(
        float(np.abs(likelihood - expected).max()) <= 1e-6, "detect's map equals predict() on the .h5 loaded in memory"
    )

    step("export-keras", str(weights), "-o", "back.h5")
    back = read_keras_h5(HERE / "back.h5").arrays
    check(
        all(np.array_equal(back[k], arrays[k].astype(np.float32)) for k in arrays), "export-keras gives the arrays back"
    )

    if synth_from_the_wheel():
        train_from_the_wheel(weights)
    pretrained_from_loopback(h5)
    gradients_against_the_original(h5)

    started = time.perf_counter()
    out = step("selftest")
    print("\n".join("    " + line for line in out.splitlines()))
    check(out.strip().endswith("PASSED"), f"selftest, quick profile ({time.perf_counter() - started:.0f} s)")


def gradients_against_the_original(h5: Path) -> None:
    """``mantranet parity --gradients --train-steps`` against the original code, when a copy of it is at hand."""
    code = Path(os.environ.get("SMOKE_OFFICIAL_CODE", "official"))
    if not (code / "modelCore.py").is_file():
        print(f"  skipped: parity --gradients (no original model code in {code})")
        return
    argv = ["parity", str(h5), "image.png", "--crop", "10x12", "--reference", f"official:{code}", "--gradients"]
    step(*argv, "--train-steps", "1", "--train-mode", "--json", "gradients.json")
    report = json.loads((HERE / "gradients.json").read_text())
    first = report["images"][0]["gradients"]
    check(
        report["passed"] and report["first_divergent_gradient"] is None and len(first["steps"]) == 1,
        "parity --gradients --train-steps 1 against the original code passes, JSON names no divergent gradient",
    )


def synth_from_the_wheel() -> bool:
    """``mantranet synth`` writes a dataset with the train extra installed, else says which extra it needs.
    Returns whether the train extra is installed."""
    photos = HERE / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (72, 90, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    try:
        import cv2  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        step("synth", "photos", "-o", "synth", "--n", "5", "--size", "48", expect=1)
        check(not (HERE / "synth").exists(), "synth without the train extra: one line, nothing written")
        return False
    step("synth", "photos", "-o", "synth", "--n", "5", "--size", "48")
    rows = (HERE / "synth" / "manifest.csv").read_text().splitlines()
    check(len(rows) == 6 and rows[0] == "image,mask,label", "synth wrote a manifest of 5 images")
    return True


def train_from_the_wheel(weights: Path) -> None:
    """``mantranet train``: one step on the synth dataset, validated on it; detect reads the trained weights."""
    step("train", "--data", "synth/manifest.csv", "--val", "synth/manifest.csv", "--init", str(weights), "--freeze",
         "featex", "-o", "run", "--steps", "1", "--batch", "2", "--crop", "32", "--threads", "1")  # fmt: skip
    record = json.loads((HERE / "run" / "model.safetensors.json").read_text())
    check(record["training"]["steps"] == 1 and record["training"]["final_metrics"]["images"] == 5,
          "train wrote model.safetensors with its manifest (1 step, validated on 5 images)")  # fmt: skip
    report = json.loads(step("detect", "image.png", "-w", "run/model.safetensors", "-o", "trained-masks", "--json"))
    check(report["written"] == 1, "detect reads the trained model")


def pretrained_from_loopback(h5: Path) -> None:
    """pretrained() downloads from a server on 127.0.0.1, verifies, converts, caches; then works offline."""
    body = h5.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ManTraNet_Ptrain{RELEASE}.h5"
    # a release table in which the fixture file is release 4's official file, at the server's URL
    table = json.loads(release_table.RELEASES_JSON.read_text())
    for entry in table["official"]:
        if entry["index"] == RELEASE:
            entry.update(git_blob_sha1=file_digests(h5).git_blob_sha1, url=url)
    substitute = HERE / "releases.json"
    substitute.write_text(json.dumps(table))
    release_table.RELEASES_JSON = substitute
    release_table._table.cache_clear()
    try:
        model = converter.pretrained(RELEASE)
    finally:
        server.shutdown()
        server.server_close()
    expected = load_weights(h5).state_dict()
    same = all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    check(same and not model.training, "pretrained() from a loopback server: the fixture's weights, eval mode")
    cached = sorted(p.name for p in (HOME / "weights").iterdir())
    check(cached == [f"ManTraNet_Ptrain{RELEASE}{s}" for s in (".h5", ".safetensors", ".safetensors.json")], "cached")
    again = converter.pretrained(RELEASE)  # the server is gone: from the cache
    check(
        all(torch.equal(v, expected[k]) for k, v in again.state_dict().items()), "pretrained() offline, from the cache"
    )


if __name__ == "__main__":
    main()
    print("smoke: every check passed")
