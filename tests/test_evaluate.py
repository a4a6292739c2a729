"""``mantranet evaluate`` on forged images made from the real photographs in ../shared/samples (splices,
copy-moves, authentic crops with exact masks), every metric checked against scikit-learn on the saved maps;
a killed run resumes to the same numbers; two local workers and a two-node Ray cluster agree with one worker."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    jaccard_score,
    matthews_corrcoef,
    precision_recall_curve,
    roc_auc_score,
)

from converter import convert_h5
from evaluation import METRICS, Config, Execution, Options, Perturbation, evaluate, load_dataset, map_path
from mantranet_cli.main import main
from mantranet_torch.weights import encode_safetensors
from tests.helpers import SAMPLES, official_file
from training.synthetic import make_forgeries

ROOT = Path(__file__).resolve().parents[1]
SIDE = 48  # pixels: small images keep the suite fast; the metrics do not care about size
METRIC_TOLERANCE = 1e-6  # what the evaluation promises between runs, engines and workers
# ours against scikit-learn on the saved maps: the same float32 values, ties and integer counts on both sides
# (pooled: exact score distributions, not binned), so only float64 rounding of sums and a division differs,
# at most a few 1e-17 measured on these maps; the bound grows with pixels as n * 2**-53, far below 1e-12
INDEPENDENT_TOLERANCE = 1e-12
MAP_TOLERANCE = 1e-5  # maps from another process or node: same code and thread count, float32 output
PERTURBATIONS = ("resize:0.5", "noise:10")


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    photos = sorted(SAMPLES.glob("*/*")) if SAMPLES.is_dir() else []
    if not photos:
        pytest.skip(f"{SAMPLES} not available (the real photographs are read from ../shared)")
    root = tmp_path_factory.mktemp("eval")
    manifest = make_forgeries(photos, root / "dataset", spliced=2, copy_moved=2, authentic=2, side=SIDE)
    h5 = root / "ManTraNet_Ptrain4.h5"
    official_file(h5, 4)
    conversion = convert_h5(h5)
    weights = root / "fixture.safetensors"
    weights.write_bytes(encode_safetensors(conversion.state_dict, conversion.config, {"source": "fixture"}))
    return {"root": root, "manifest": manifest, "weights": weights, "h5": h5}


@pytest.fixture(scope="module")
def baseline(data) -> dict:
    root = data["root"] / "baseline"
    args = [str(data["manifest"]), "-w", str(data["weights"]), "--store", str(root / "store"), "--threads", "1",
            "--json", str(root / "out.json"), "--csv", str(root / "out.csv"), "--save-maps", str(root / "maps"),
            "--report", str(root / "report")]  # fmt: skip
    for p in PERTURBATIONS:
        args += ["--perturb", p]
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    return {"args": args, "stdout": stdout, "json": json.loads((root / "out.json").read_text()), "root": root}


def _mask(data: dict, name: str, shape: tuple[int, int]) -> np.ndarray:
    path = data["manifest"].parent / name.replace("images/", "masks/")
    if not path.exists():
        return np.zeros(shape, bool)
    image = Image.open(path).convert("L")
    if image.size != (shape[1], shape[0]):  # the resize row: the mask follows the image by nearest neighbour
        image = image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def independent_metrics(data: dict, maps: Path, perturbation: str | None) -> dict:
    """Every metric from the saved maps and the mask files, with scikit-learn and float64 NumPy only."""
    per_image = {k: [] for k in ("auc", "f1", "f1_best", "iou", "mcc")}
    pooled_truth, pooled_raw, labels, scores = [], [], [], []
    for entry in load_dataset(data["manifest"]).entries:
        likelihood = np.load(map_path(maps, entry.name, perturbation, "torch")).astype(np.float64)
        labels.append(entry.label)
        scores.append(likelihood.max())
        if not entry.forged:
            continue
        truth = _mask(data, entry.name, likelihood.shape).ravel()
        s = likelihood.ravel()
        predicted = s > 0.5
        per_image["auc"].append(roc_auc_score(truth, s))
        precision, recall, _ = precision_recall_curve(truth, s)
        per_image["f1_best"].append(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-300)))
        per_image["f1"].append(f1_score(truth, predicted, zero_division=0.0))
        per_image["iou"].append(jaccard_score(truth, predicted, zero_division=0.0))
        per_image["mcc"].append(matthews_corrcoef(truth, predicted))
        pooled_raw.append(s)
        pooled_truth.append(truth)
    truth, raw = np.concatenate(pooled_truth), np.concatenate(pooled_raw)
    return {
        "pixel_auc": np.mean(per_image["auc"]),
        "pixel_f1_fixed": np.mean(per_image["f1"]),
        "pixel_f1_best": np.mean(per_image["f1_best"]),
        "pixel_iou_fixed": np.mean(per_image["iou"]),
        "pixel_mcc_fixed": np.mean(per_image["mcc"]),
        "pooled_auc": roc_auc_score(truth, raw),  # every forged pixel's raw float32 value at once
        "pooled_f1_fixed": f1_score(truth, raw > 0.5),
        "image_auc": roc_auc_score(labels, scores),
        "image_balanced_accuracy": balanced_accuracy_score(labels, [int(v > 0.5) for v in scores]),
    }


def assert_metrics(got: dict, expected: dict, tolerance: float = METRIC_TOLERANCE) -> None:
    assert set(got) == set(METRICS)
    for key in METRICS:
        assert got[key] == pytest.approx(expected[key], abs=tolerance), key


def test_metrics_equal_an_independent_computation_from_the_saved_maps(data, baseline) -> None:
    result = baseline["json"]
    assert [r["perturbation"] for r in result["rows"]] == ["none", *PERTURBATIONS]
    for row in result["rows"]:
        perturbation = None if row["perturbation"] == "none" else row["perturbation"]
        expected = independent_metrics(data, baseline["root"] / "maps", perturbation)
        assert_metrics(row["metrics"], expected, tolerance=INDEPENDENT_TOLERANCE)
        assert row["counts"] == {"images": 6, "forged": 4, "authentic": 2, "forged_with_mask": 4,
                                 "pixel_auc_excluded": 0}  # fmt: skip
    assert result["metrics"] == result["rows"][0]["metrics"]
    half = np.load(map_path(baseline["root"] / "maps", "images/spliced_000.png", "resize:0.5", "torch"))
    assert half.shape == (SIDE // 2, SIDE // 2) and half.dtype == np.float32
    assert result["weights"]["git_blob_sha1"] and result["counts"]["computed"] == 18
    assert result["skipped"] == [] and result["versions"]["scikit-learn"]
    lines = (baseline["root"] / "out.csv").read_text().splitlines()
    assert len(lines) == 1 + 18 and lines[0].startswith("image,perturbation,backend,label")
    for name in ("roc.png", "pr.png"):
        with Image.open(baseline["root"] / "report" / name) as figure:
            assert figure.format == "PNG" and min(figure.size) > 200
    assert "pixel_auc" in baseline["stdout"] and "resize:0.5" in baseline["stdout"]


class Page(HTMLParser):
    """The report page's tables (rows of cell texts), pictures and style sheet."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.style, self._in_style, self._cell = "", False, None

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None
        self._in_style = False

    def handle_data(self, data) -> None:
        if self._in_style:
            self.style += data
        if self._cell is not None:
            self._cell += data


def test_the_report_page_reads_like_the_parity_report(data, baseline) -> None:
    from evaluation.report import SHOWN, chance_lines, curve_rows
    from parity_tests.html_page import STYLE

    folder = baseline["root"] / "report"
    page = Page()
    page.feed((folder / "index.html").read_text())
    assert page.style.strip() == STYLE.strip()  # the parity report's style sheet, shared
    # Metrics down, rows across: one line per metric, a column per perturbation, whatever their number.
    [table] = page.tables
    assert table[0] == ["metric", "none", *PERTURBATIONS]
    assert [row[0].split()[-1] for row in table[1:]] == list(METRICS)
    none = baseline["json"]["rows"][0]["metrics"]
    assert [row[1] for row in table[1:]] == ["-" if none[m] is None else f"{none[m]:.4f}" for m in METRICS]
    # Four forged images with masks: each shown once, as the image, its map over it and the mask.
    shown = [src for src in page.images if src.startswith("image-")]
    assert len(shown) == min(4, 2 * SHOWN) and {"roc.png", "pr.png"} <= set(page.images)
    for src in shown:
        with Image.open(folder / src) as panels:
            assert panels.height == SIDE and panels.width == 3 * SIDE + 2 * 8  # three panels, two gaps

    # The chance lines, and one legend row per perturbation, from the same run resumed in Python.
    config = Config(
        weights=data["weights"],
        store=baseline["root"] / "store",
        execution=Execution(threads=1),
        perturbations=[Perturbation.parse(p) for p in PERTURBATIONS],
    )
    result = evaluate(load_dataset(data["manifest"]), config)
    assert result.counts["computed"] == 0
    assert [row.label for row in curve_rows(result)] == ["none", *PERTURBATIONS]
    chance = chance_lines(result)
    masks = [_mask(data, e.name, (SIDE, SIDE)) for e in load_dataset(data["manifest"]).entries if e.forged]
    forged_fraction = sum(m.sum() for m in masks) / sum(m.size for m in masks)  # every forged image has a mask
    assert chance.roc == ((0.0, 0.0), (1.0, 1.0))
    assert chance.precision == pytest.approx(forged_fraction, abs=1e-15)  # integer counts, one division each
    assert f"{forged_fraction:.2%} of the scored pixels are forged" in (folder / "index.html").read_text()


def test_a_rerun_resumes_without_recomputing(baseline) -> None:
    code, _, stderr = run_cli(*baseline["args"])
    assert code == 0, stderr
    again = json.loads((baseline["root"] / "out.json").read_text())
    assert again["counts"]["computed"] == 0 and again["counts"]["resumed"] == 18
    assert again["rows"] == baseline["json"]["rows"]


def test_a_killed_run_resumes_to_the_same_results(data, baseline, tmp_path) -> None:
    store, out = tmp_path / "store", tmp_path / "out.json"
    args = [sys.executable, "-m", "mantranet_cli", "evaluate", str(data["manifest"]), "-w", str(data["weights"]),
            "--store", str(store), "--threads", "1", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(store.glob("*/*.npz")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)  # no chance to tidy up: the store must be consistent anyway
    finally:
        process.wait(timeout=30)
        process.stderr.close()
    assert not out.exists()
    assert not list(store.rglob("*.part"))
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(out.read_text())
    assert 1 <= result["counts"]["resumed"] < 6 and result["counts"]["computed"] == 6 - result["counts"]["resumed"]
    assert_metrics(result["metrics"], baseline["json"]["metrics"], tolerance=0.0)  # same code, same threads


def _saved_maps(folder: Path, data: dict, perturbation: str | None) -> dict[str, np.ndarray]:
    return {
        e.name: np.load(map_path(folder, e.name, perturbation, "torch")) for e in load_dataset(data["manifest"]).entries
    }


def assert_same_as_baseline(result, maps: Path, data: dict, baseline: dict, rows: tuple[str | None, ...]) -> None:
    for perturbation in rows:
        expected = next(r for r in baseline["json"]["rows"] if r["perturbation"] == (perturbation or "none"))
        assert_metrics(result.row(perturbation).metrics, expected["metrics"])
        ours = _saved_maps(maps, data, perturbation)
        theirs = _saved_maps(baseline["root"] / "maps", data, perturbation)
        for name, m in ours.items():
            np.testing.assert_allclose(m, theirs[name], rtol=0, atol=MAP_TOLERANCE, err_msg=name)


def _config(data: dict, tmp_path: Path, **kwargs) -> Config:
    return Config(
        weights=data["weights"],
        store=tmp_path / "store",
        save_maps=tmp_path / "maps",
        execution=Execution(threads=1),
        perturbations=[Perturbation.parse("noise:10")],
        options=Options(),
        **kwargs,
    )


def test_two_local_workers_give_the_same_results(data, baseline, tmp_path) -> None:
    result = evaluate(load_dataset(data["manifest"]), _config(data, tmp_path, workers=2))
    assert result.engine == {"engine": "local", "workers": 2, "threads_per_worker": 1}
    assert_same_as_baseline(result, tmp_path / "maps", data, baseline, (None, "noise:10"))


def test_ray_on_a_two_node_local_cluster_gives_the_same_results(data, baseline, tmp_path) -> None:
    cluster_utils = pytest.importorskip("ray.cluster_utils", reason="the ray extra is not installed")
    import ray

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        config = _config(data, tmp_path, engine="ray", ray_address=cluster.address, workers=2)
        result = evaluate(load_dataset(data["manifest"]), config)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.engine["ray_nodes"] == 2 and result.engine["workers"] == 2
    assert_same_as_baseline(result, tmp_path / "maps", data, baseline, (None, "noise:10"))


def test_compare_reference_reports_both_and_their_difference(data, tmp_path) -> None:
    pytest.importorskip("tensorflow", reason="the reference needs TensorFlow")
    rows = "image,mask,label\nimages/spliced_000.png,masks/spliced_000.png,1\nimages/authentic_000.png,,0\n"
    manifest = data["manifest"].parent / "pair.csv"
    manifest.write_text(rows)
    code, _, stderr = run_cli(str(manifest), "-w", str(data["h5"]), "--store", str(tmp_path / "s"), "--threads", "1",
                              "--json", str(tmp_path / "o.json"), "--save-maps", str(tmp_path / "maps"),
                              "--compare-reference")  # fmt: skip
    assert code == 0, stderr
    row = json.loads((tmp_path / "o.json").read_text())["rows"][0]
    for key in METRICS:
        assert row["difference"][key] == pytest.approx(row["metrics"][key] - row["reference"][key], abs=1e-15)
    for name in ("images/spliced_000.png", "images/authentic_000.png"):
        ours = np.load(map_path(tmp_path / "maps", name, None, "torch"))
        reference = np.load(map_path(tmp_path / "maps", name, None, "tensorflow"))
        # The TensorFlow reference's float32 window means are chaotic (README, "Evidence of fidelity"): on these
        # native-resolution 48x48 crops of real photographs the two maps differ by 1.004e-4 at the worst of 2,304
        # pixels (measured), as the official float32 code differs from its own float64 evaluation by up to 6.6e-5
        # on a 160x160 crop. 2e-4 leaves 2x headroom over the measured worst pixel.
        np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-4)


def test_bad_entries_are_named_skipped_and_counted(data, tmp_path) -> None:
    folder = data["manifest"].parent
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("L", (SIDE + 2, SIDE), 255).save(folder / "wide_mask.png")
    rows = ("image,mask,label\nimages/spliced_000.png,masks/spliced_000.png,1\nmissing.png,,0\nbroken.png,,0\n"
            "images/copymove_000.png,wide_mask.png,1\nimages,,0\nimages/spliced_001.png,masks,1\n")  # fmt: skip
    manifest = folder / "bad.csv"
    manifest.write_text(rows)
    common = ["-w", str(data["weights"]), "--store", str(tmp_path / "s"), "--threads", "1"]
    code, _, stderr = run_cli(str(manifest), *common, "--json", str(tmp_path / "o.json"))
    assert code == 1
    assert "missing.png: no such file" in stderr and "broken.png" in stderr and "cannot decode" in stderr
    assert f"wide_mask.png: the mask is {SIDE + 2} x {SIDE} but its image is {SIDE} x {SIDE}" in stderr
    assert f"skipped images: {folder / 'images'}: a folder, not a file" in stderr  # not "[Errno 21] ..."
    assert f"skipped images/spliced_001.png: {folder / 'masks'}: a folder, not a file" in stderr
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["counts"]["skipped"] == 5 and result["rows"][0]["counts"]["images"] == 1
    code, _, stderr = run_cli(str(manifest), *common, "--resize-masks")
    assert code == 1 and "wide_mask" not in stderr
    code, _, stderr = run_cli(str(manifest), "-w", str(data["manifest"]), "--store", str(tmp_path / "s"))
    assert code == 1 and "Traceback" not in stderr and "manifest.csv" in stderr


@pytest.mark.parametrize("how", ["mean", "p99"])
def test_image_score_choices_from_the_stored_records(data, baseline, tmp_path, how) -> None:
    args = [a for a in baseline["args"] if a not in PERTURBATIONS and a != "--perturb"]
    json_at = args.index("--json") + 1
    args[json_at] = str(tmp_path / "o.json")
    code, _, stderr = run_cli(*args, "--image-score", how)
    assert code == 0, stderr
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["counts"]["computed"] == 0  # the image score is computed from what the store keeps
    entries = load_dataset(data["manifest"]).entries
    maps = [np.load(map_path(baseline["root"] / "maps", e.name, None, "torch")).astype(np.float64) for e in entries]
    scores = [m.mean() if how == "mean" else np.percentile(m, 99) for m in maps]
    labels = [e.label for e in entries]
    assert result["metrics"]["image_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=METRIC_TOLERANCE)
    predicted = [int(s > 0.5) for s in scores]
    assert result["metrics"]["image_balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, predicted), abs=METRIC_TOLERANCE
    )


def test_one_image_listed_twice_is_refused_and_paths_outside_the_manifest_folder(data, baseline, tmp_path) -> None:
    folder = data["manifest"].parent
    (folder / "sub").mkdir(exist_ok=True)
    twice = folder / "sub" / "twice.csv"  # one file by two paths: scored twice, it would weigh twice in each mean
    twice.write_text("image,mask\n../images/spliced_000.png,../masks/spliced_000.png\n"
                     f"{folder / 'images' / 'spliced_000.png'},../masks/spliced_000.png\n")  # fmt: skip
    maps = tmp_path / "maps"
    store = str(baseline["root"] / "store")
    code, _, stderr = run_cli(str(twice), "-w", str(data["weights"]), "--store", store)
    assert code == 1, stderr
    assert f"{twice}: lines 2 and 3 list the same image ({folder / 'images' / 'spliced_000.png'})" in stderr, stderr
    manifest = folder / "sub" / "outside.csv"
    manifest.write_text("image,mask\n../images/spliced_000.png,../masks/spliced_000.png\n"
                        f"{folder / 'images' / 'spliced_001.png'},../masks/spliced_001.png\n")  # fmt: skip
    code, _, stderr = run_cli(str(manifest), "-w", str(data["weights"]), "--threads", "1", "--save-maps", str(maps),
                              "--store", store, "--json", str(tmp_path / "o.json"))  # fmt: skip
    assert code == 0, stderr
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["counts"]["records"] == 2 and result["counts"]["computed"] == 2  # maps wanted in a new folder
    saved = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.npy"))
    absolute = folder.joinpath("images", "spliced_001.npy").relative_to(folder.anchor).as_posix()
    assert saved == sorted(["images/spliced_000.npy", absolute])  # inside --save-maps, never beside the data
    for name, original in (("images/spliced_000.npy", "spliced_000"), (absolute, "spliced_001")):
        expected = np.load(map_path(baseline["root"] / "maps", f"images/{original}.png", None, "torch"))
        np.testing.assert_array_equal(np.load(maps / name), expected)


def strict_json(path: Path) -> dict:
    """The file as strict JSON: NaN and Infinity, which Python writes unless told not to, are refused."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_stored_record_holding_a_nan_is_computed_again(data, baseline, tmp_path) -> None:
    """A record whose numbers are not finite (a damaged or foreign store) is never scored: it is computed again,
    and the result equals the baseline's."""
    from evaluation.store import Record

    manifest = data["manifest"].parent / "nan.csv"
    manifest.write_text("image,mask\nimages/spliced_000.png,masks/spliced_000.png\n")
    store = tmp_path / "store"
    common = [str(manifest), "-w", str(data["weights"]), "--threads", "1", "--store", str(store)]
    assert run_cli(*common)[0] == 0
    (record_path,) = store.rglob("*.npz")
    record = Record.decode(record_path.read_bytes())
    record.fields["pixel"]["auc"] = float("nan")
    record.fields["scores"]["max"] = float("inf")
    record_path.write_bytes(record.encode())
    code, _, stderr = run_cli(*common, "--json", str(tmp_path / "o.json"))
    assert code == 0, stderr
    result = strict_json(tmp_path / "o.json")
    assert result["counts"]["computed"] == 1 and result["counts"]["resumed"] == 0
    (expected,) = [r for r in (load_dataset(data["manifest"]).entries) if r.name == "images/spliced_000.png"]
    likelihood = np.load(map_path(baseline["root"] / "maps", expected.name, None, "torch")).astype(np.float64)
    truth = _mask(data, expected.name, likelihood.shape).ravel()
    assert result["metrics"]["pixel_auc"] == pytest.approx(roc_auc_score(truth, likelihood.ravel()),
                                                           abs=INDEPENDENT_TOLERANCE)  # fmt: skip
    assert np.isfinite(Record.decode(record_path.read_bytes()).fields["pixel"]["auc"])  # the store is mended


def test_a_non_finite_map_is_named_and_the_json_stays_valid(data, tmp_path, monkeypatch) -> None:
    import mantranet_torch

    manifest = data["manifest"].parent / "nanmap.csv"
    manifest.write_text("image,mask\nimages/spliced_000.png,masks/spliced_000.png\nimages/authentic_000.png,\n")
    real = mantranet_torch.ManTraNet.predict

    def broken(self, pixels, *args, **kwargs):
        out = real(self, pixels, *args, **kwargs)
        if pixels[0, 0, 0] == np.asarray(Image.open(data["manifest"].parent / "images/spliced_000.png"))[0, 0, 0]:
            out[3, 5] = np.nan  # as a diverging low-precision run would give
        return out

    monkeypatch.setattr(mantranet_torch.ManTraNet, "predict", broken)
    args = [str(manifest), "-w", str(data["weights"]), "--threads", "1", "--store", str(tmp_path / "s")]
    code, _, stderr = run_cli(*args, "--json", str(tmp_path / "o.json"))
    assert code == 1
    spliced = data["manifest"].parent / "images" / "spliced_000.png"
    assert f"skipped images/spliced_000.png: {spliced}: the map holds 1 NaN or infinite value(s), the first at " \
           "pixel (x=5, y=3)" in stderr, stderr  # fmt: skip
    result = strict_json(tmp_path / "o.json")
    assert result["counts"]["skipped"] == 1 and result["rows"][0]["counts"]["images"] == 1
    assert result["metrics"]["pixel_auc"] is None  # no forged image left: no pixel AUC, and no NaN
    assert not list((tmp_path / "s").rglob("*.npz"))[1:]  # only the authentic image's record was stored


def test_tiles_give_the_whole_image_result_and_share_its_records(data, baseline, tmp_path) -> None:
    manifest = data["manifest"].parent / "one.csv"
    manifest.write_text("image,mask\nimages/spliced_000.png,masks/spliced_000.png\n")
    common = [str(manifest), "-w", str(data["weights"]), "--threads", "1", "--tile", "32"]
    code, _, stderr = run_cli(*common, "--store", str(tmp_path / "s"), "--save-maps", str(tmp_path / "maps"))
    assert code == 0, stderr
    tiled = np.load(map_path(tmp_path / "maps", "images/spliced_000.png", None, "torch"))
    whole = np.load(map_path(baseline["root"] / "maps", "images/spliced_000.png", None, "torch"))
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=MAP_TOLERANCE)  # exact tiling, up to float32 rounding
    code, _, stderr = run_cli(*common, "--store", str(baseline["root"] / "store"), "--json", str(tmp_path / "o.json"))
    assert code == 0 and json.loads((tmp_path / "o.json").read_text())["counts"]["computed"] == 0  # not in the key
