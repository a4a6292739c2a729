"""``mantranet detect`` on a folder of real and converted images, checked against an independent path."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mantranet_torch
from converter import keras_to_torch, synthetic_keras_weights, write_official_h5
from mantranet_cli.main import main
from mantranet_torch import RELEASES
from mantranet_torch.weights import encode_safetensors
from tests.helpers import SAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")

ORIENTATION_TAG = 0x0112
ROTATE_CLOCKWISE = 6  # EXIF orientation 6: the stored image is shown turned 90 degrees clockwise


def png_16bit_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    height, width, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims a huge size and holds a few bytes: what a decompression bomb looks like before decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)


def real(name: str, size: tuple[int, int]) -> Image.Image:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not available (real sample images are read from ../shared)")
    return Image.open(path).resize(size, Image.BILINEAR)


@dataclass
class Case:
    """One input image and the 8-bit RGB pixels the official demo's reader would give the model."""

    path: Path
    relative: str  # output stem, relative to the output folder
    expected: np.ndarray
    note: str | None  # a phrase the conversion note must contain


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Case]]:
    root = tmp_path_factory.mktemp("detect")
    images, cases = root / "images", []
    (images / "nested").mkdir(parents=True)

    jpg = real("forged/I02_dm545yj_0.jpg", (58, 39))
    jpg.save(images / "plain.jpg", quality=95)
    cases.append(Case(images / "plain.jpg", "plain", np.array(Image.open(images / "plain.jpg")), None))

    rgb = real("original/I35_yi6r4.jpg", (63, 44)).convert("RGB")
    rgb.save(images / "nested" / "plain.png")
    cases.append(Case(images / "nested" / "plain.png", "nested/plain", np.array(rgb), None))

    rgba = real("forged/I45_cpo0jq1_0.png", (57, 46))  # a real RGBA file of the samples
    assert rgba.mode == "RGBA"
    rgba.save(images / "alpha.png")
    cases.append(Case(images / "alpha.png", "alpha", np.array(rgba)[..., :3], "alpha channel dropped"))

    grey = rgb.convert("L")
    grey.save(images / "grey.png")
    cases.append(Case(images / "grey.png", "grey", np.repeat(np.asarray(grey)[..., None], 3, axis=2), "greyscale"))

    grey16 = np.asarray(grey).astype(np.uint16) * 257 + np.arange(44 * 63, dtype=np.uint16).reshape(44, 63) % 200
    Image.fromarray(grey16).save(images / "grey16.png")  # Pillow writes mode I;16 as a 16-bit greyscale PNG
    expected16 = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    cases.append(Case(images / "grey16.png", "grey16", expected16, "16-bit"))

    rgb16 = np.asarray(rgb).astype(np.uint16) * 256 + 255  # low bytes all set: truncation and rounding differ
    png_16bit_rgb(images / "rgb16.png", rgb16)
    cases.append(Case(images / "rgb16.png", "rgb16", (rgb16 >> 8).astype(np.uint8), "16-bit"))

    palette = rgb.quantize(16)
    palette.info["transparency"] = 0
    palette.save(images / "palette.png", transparency=0)
    colours = np.array(palette.getpalette(), dtype=np.uint8).reshape(-1, 3)
    cases.append(Case(images / "palette.png", "palette", colours[np.asarray(palette)], "palette"))

    exif = Image.Exif()
    exif[ORIENTATION_TAG] = ROTATE_CLOCKWISE
    rgb.save(images / "rotated.jpg", quality=95, exif=exif.tobytes())
    stored = np.array(Image.open(images / "rotated.jpg"))  # decoded as stored, before any orientation
    cases.append(Case(images / "rotated.jpg", "rotated", np.rot90(stored, k=-1).copy(), "EXIF orientation 6"))

    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")

    weights = root / "ptrain4.safetensors"
    config = RELEASES[4]
    state = keras_to_torch(synthetic_keras_weights(config, 0), config, "test")
    weights.write_bytes(encode_safetensors(state, config, {"source": "synthetic"}))
    return images, weights, cases


def run(*args: str) -> tuple[int, str, str]:
    """``mantranet detect ARGS``: exit code, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["detect", *args])
    return code, stdout.getvalue(), stderr.getvalue()


def notes_for(stdout: str, path: Path) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{path}: "))
    notes = []
    for line in lines[start + 1 :]:
        if not line.startswith("  note: "):
            break
        notes.append(line)
    return notes


@pytest.fixture(scope="module")
def first_run(folder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    images, weights, _ = folder
    out = tmp_path_factory.mktemp("out")
    return out, *run(str(images), "-w", str(weights), "-o", str(out), "--save-npy", "--overlay")


def test_every_image_gets_its_outputs_and_the_corrupt_one_is_named(folder, first_run) -> None:
    _, weights, cases = folder
    out, code, stdout, stderr = first_run
    assert code == 1
    assert "corrupt.jpg" in stderr and "cannot decode" in stderr and "Traceback" not in stderr
    model = mantranet_torch.load(weights)
    for case in cases:
        base = out / case.relative
        expected_map = model.predict(case.expected)  # the independent path: our own pixels, then the model
        mask = np.asarray(Image.open(f"{base}.mask.png"))
        assert mask.dtype == np.uint8 and mask.shape == case.expected.shape[:2], case.path
        np.testing.assert_array_equal(mask, np.rint(expected_map.astype(np.float64) * 255), err_msg=str(case.path))
        np.testing.assert_array_equal(np.load(f"{base}.npy"), expected_map, err_msg=str(case.path))
        overlay = Image.open(f"{base}.overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (case.expected.shape[1], case.expected.shape[0])
        notes = " ".join(notes_for(stdout, case.path))
        assert (case.note in notes) if case.note else not notes, (case.path, notes)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert f"{len(cases) + 1} image(s): {len(cases)} written, 0 skipped" in stdout


def test_a_rerun_skips_what_exists_and_force_redoes_it(folder, tmp_path) -> None:
    _, weights, cases = folder
    one = cases[0].path
    code, _, _ = run(str(one), "-w", str(weights), "-o", str(tmp_path))
    mask = tmp_path / "plain.mask.png"
    first = mask.stat().st_mtime_ns
    assert code == 0
    code, stdout, _ = run(str(one), "-w", str(weights), "-o", str(tmp_path))
    assert code == 0 and "0 written, 1 skipped" in stdout and mask.stat().st_mtime_ns == first
    code, stdout, _ = run(str(one), "-w", str(weights), "-o", str(tmp_path), "--save-npy")
    assert "1 written" in stdout and (tmp_path / "plain.npy").exists() and mask.stat().st_mtime_ns == first
    code, stdout, _ = run(str(one), "-w", str(weights), "-o", str(tmp_path), "--force")
    assert code == 0 and "1 written, 0 skipped" in stdout and mask.stat().st_mtime_ns != first


def test_an_output_folder_inside_the_input_folder_is_not_read_back(folder, tmp_path) -> None:
    _, weights, cases = folder
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "plain.png").write_bytes(cases[0].path.read_bytes())
    for _ in range(2):
        code, stdout, _ = run(str(inputs), "-w", str(weights), "-o", str(inputs / "masks"))
        assert code == 0
    assert "1 image(s): 0 written, 1 skipped" in stdout  # the second run saw one image, not its own mask
    assert sorted(p.name for p in (inputs / "masks").iterdir()) == ["plain.mask.png"]


def test_outputs_are_readable_by_others_as_any_new_file(folder, tmp_path) -> None:
    _, weights, cases = folder
    umask = os.umask(0o022)
    try:
        assert run(str(cases[0].path), "-w", str(weights), "-o", str(tmp_path), "--save-npy")[0] == 0
    finally:
        os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}


def test_tiled_detect_equals_whole_image(folder, tmp_path) -> None:
    _, weights, cases = folder
    case = next(c for c in cases if c.relative == "nested/plain")
    run(str(case.path), "-w", str(weights), "-o", str(tmp_path / "whole"), "--save-npy")
    code, stdout, _ = run(
        str(case.path), "-w", str(weights), "-o", str(tmp_path / "tiled"), "--save-npy", "--tile", "32"
    )
    assert code == 0 and "4 tiles in 2 passes" in stdout
    whole, tiled = np.load(tmp_path / "whole" / "plain.npy"), np.load(tmp_path / "tiled" / "plain.npy")
    assert np.abs(tiled - whole).max() <= 1e-5  # float32 rounding only (see tests/test_tiling.py)


def test_official_h5_weights_are_converted_in_memory(folder, tmp_path) -> None:
    _, _, cases = folder
    h5 = tmp_path / "ManTraNet_Ptrain4.h5"
    write_official_h5(h5, synthetic_keras_weights(RELEASES[4], 0), RELEASES[4])
    code, _, _ = run(str(cases[0].path), "-w", str(h5), "-o", str(tmp_path / "out"), "--save-npy")
    model = mantranet_torch.load(folder[1])
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["ManTraNet_Ptrain4.h5", "out"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "plain.npy"), model.predict(cases[0].expected))


def test_a_decompression_bomb_is_refused_unless_the_limit_is_raised(folder, tmp_path) -> None:
    _, weights, cases = folder
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 40_000, 30_000)
    code, _, stderr = run(str(bomb), "-w", str(weights), "-o", str(tmp_path / "out"))
    assert code == 1 and "1,200,000,000 pixels exceeds the limit" in stderr and "--max-pixels" in stderr
    assert "Traceback" not in stderr
    code, _, stderr = run(str(cases[0].path), "-w", str(weights), "-o", str(tmp_path / "out"), "--max-pixels", "100")
    assert code == 1 and "exceeds the limit of 100" in stderr
    code, _, stderr = run(str(cases[0].path), "-w", str(weights), "-o", str(tmp_path / "out"), "--max-pixels", "5000")
    assert code == 0


def test_bad_arguments_are_one_line_errors(folder, tmp_path) -> None:
    _, weights, cases = folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(str(empty), "-w", str(weights))[2].strip() == f"mantranet detect: error: no images found in {empty}"
    assert "tiles must be at least 32" in run(str(cases[0].path), "-w", str(weights), "--tile", "8")[2]
    assert "no such file" in run(str(tmp_path / "missing.jpg"), "-w", str(weights), "-o", str(tmp_path))[2]
    assert (
        "missing.safetensors: no such file" in run(str(cases[0].path), "-w", str(tmp_path / "missing.safetensors"))[2]
    )
    if not torch.cuda.is_available():
        code, _, stderr = run(str(cases[0].path), "-w", str(weights), "--device", "cuda")
        assert code == 1 and "no CUDA device" in stderr
    twin = tmp_path / "twin"
    twin.mkdir()
    Image.fromarray(cases[1].expected).save(twin / "plain.png")
    code, _, stderr = run(str(cases[0].path), str(twin / "plain.png"), "-w", str(weights), "-o", str(tmp_path / "o"))
    assert code == 1 and "its outputs would overwrite those of" in stderr


def test_json_and_quiet(folder, tmp_path) -> None:
    _, weights, cases = folder
    good, bad = cases[0].path, tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code, stdout, stderr = run(str(good), str(bad), "-w", str(weights), "-o", str(tmp_path / "o"), "--json")
    report = json.loads(stdout)  # stdout is the JSON object and nothing else
    assert code == 1 and stderr == ""
    assert (report["images"], report["written"], report["failed"], report["skipped"]) == (2, 1, 1, 0)
    written = next(r for r in report["results"] if r["status"] == "written")
    height, width = cases[0].expected.shape[:2]
    assert written["input"] == str(good) and (written["width"], written["height"]) == (width, height)
    assert written["outputs"] == [str(tmp_path / "o" / "plain.mask.png")] and written["tiles"] == 0
    failed = next(r for r in report["results"] if r["status"] == "failed")
    assert failed["input"] == str(bad) and "cannot decode" in failed["error"]
    code, stdout, stderr = run(str(good), str(bad), "-w", str(weights), "-o", str(tmp_path / "o"), "--quiet")
    assert code == 1 and stdout == "" and stderr.count("\n") == 1 and "broken.png: cannot decode" in stderr
