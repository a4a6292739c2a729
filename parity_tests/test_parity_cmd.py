"""``mantranet parity`` as a user runs it: a correct conversion passes, damaged weights are caught at the damaged
layer in both modes, the earlier port's real detector shows where its BatchNorm differs, bad input exits 2.

Weights travel the real path (synthetic Keras arrays -> official-layout HDF5 -> the command); images are small
PNG files (24 x 24) so that each run takes about a second.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reference
from converter import convert_h5, synthetic_keras_weights, torch_to_keras, write_official_h5
from converter.legacy import EarlierPortWarning, load_earlier_port
from mantranet_cli.main import main
from mantranet_torch import LAYERS, RELEASES, ManTraNet, scale_pixels
from mantranet_torch.layers import STD_FLOOR
from mantranet_torch.model import DETECTOR_LAYERS
from mantranet_torch.weights import encode_safetensors
from parity_tests import api, inputs, sides
from parity_tests.builtin_images import builtin_images
from parity_tests.earlier_port import write_port_files
from parity_tests.official_files import ABSENT, SEED_PORT_DETECTOR

RELEASE = 4
SIZE = 24  # every layer and both modes in about a second per image; the 31-pixel window exceeds the image
TEXTURED = ("noise", "gradient", "checkerboard", "copy-move")

needs_seed_port = pytest.mark.skipif(
    not SEED_PORT_DETECTOR.is_file(), reason=f"earlier port's checkpoint not found at {SEED_PORT_DETECTOR} {ABSENT}"
)


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    code = main(["parity", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout file of synthetic weights, and the built-in images as small PNG files."""
    folder = tmp_path_factory.mktemp("parity-cmd")
    write_official_h5(folder / "ManTraNet_Ptrain4.h5", synthetic_keras_weights(RELEASES[RELEASE], 0), RELEASES[RELEASE])
    for image in builtin_images(SIZE):
        Image.fromarray(image.pixels).save(folder / f"{image.name}.png")
    return folder


def model_input(path: Path) -> np.ndarray:
    rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    return scale_pixels(rgb).numpy()[None]


def test_correct_conversion_passes_on_the_builtin_set(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(inputs, "DEFAULT_SIZE", SIZE)  # the built-in set, smaller than by default
    code, out, _ = run(capsys, files / "ManTraNet_Ptrain4.h5", "--json", tmp_path / "parity.json")
    assert code == 0, out
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] is True and report["first_divergent_layer"] is None
    assert [layer["name"] for layer in report["layers"]] == list(LAYERS)
    for layer in report["layers"]:
        assert layer["passed"] and {"max_abs", "max_rel", "worst_index"} <= set(layer), layer
    assert [image["name"] for image in report["images"]] == [image.name for image in builtin_images(SIZE)]
    assert "PASSED: all 21 layers within tolerance on 6 images" in out

    # The reported numbers are the real differences: the final output's, recomputed here from both frameworks.
    ref = reference.load(files / "ManTraNet_Ptrain4.h5")
    conversion = convert_h5(files / "ManTraNet_Ptrain4.h5")
    model = ManTraNet(conversion.config)
    model.load_state_dict(conversion.state_dict)
    noise = builtin_images(SIZE)[0]
    x = scale_pixels(torch.from_numpy(noise.pixels)).numpy()[None]
    with torch.inference_mode():
        ours = model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    expected = float(np.abs(ours.astype(np.float64) - ref.trace(x)["pred"]).max())
    pred = report["images"][0]["layers"][-1]
    assert pred["name"] == "pred" and pred["cumulative"]["max_abs"] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_local_mode_only(files, tmp_path, capsys) -> None:
    code, out, _ = run(
        capsys, files / "ManTraNet_Ptrain4.h5", files / "noise.png", "--local", "--json", tmp_path / "r.json"
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, out
    assert report["modes"] == ["local"] and all(layer["cumulative"] is None for layer in report["layers"])
    assert "cum: max" not in out and "loc: max" in out


def _damage_scale(state: dict[str, torch.Tensor]) -> str:
    state["detector.outlier_trans.weight"] = state["detector.outlier_trans.weight"] * 1.02
    return "outlierTrans"


def _damage_transpose(state: dict[str, torch.Tensor]) -> str:
    # A square kernel read with its in- and out-channels exchanged: the shape survives, so no loader notices.
    state["featex.b4c2.weight"] = state["featex.b4c2.weight"].transpose(0, 1).contiguous()
    return "b4c2"


def _damage_swap(state: dict[str, torch.Tensor]) -> str:
    state["featex.b5c1.weight"], state["featex.b5c2.weight"] = state["featex.b5c2.weight"], state["featex.b5c1.weight"]
    return "b5c1"  # the earlier of the two in network order


def damaged_weights(files: Path, folder: Path, damage: Callable[[dict[str, torch.Tensor]], str]) -> tuple[Path, str]:
    """The HDF5 file converted, damaged by ``damage``, saved as our safetensors; and the damaged layer's name."""
    conversion = convert_h5(files / "ManTraNet_Ptrain4.h5")
    state = dict(conversion.state_dict)
    layer = damage(state)
    weights = folder / "damaged.safetensors"
    weights.write_bytes(encode_safetensors(state, conversion.config, {}))
    return weights, layer


@pytest.mark.parametrize(
    "damage", [_damage_scale, _damage_transpose, _damage_swap], ids=["scaled", "transposed", "swapped"]
)
def test_damaged_weights_fail_at_the_damaged_layer(files, tmp_path, capsys, damage) -> None:
    weights, damaged = damaged_weights(files, tmp_path, damage)
    page = tmp_path / "report"
    argv = [files / "ManTraNet_Ptrain4.h5", files / "copy-move.png", "--torch-weights", weights]
    code, out, _ = run(capsys, *argv, "--json", tmp_path / "r.json", "--report", page)
    assert code == 1, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False
    assert report["first_divergent_layer"] == damaged
    assert report["first_divergent"] == {"cumulative": damaged, "local": damaged}
    before = LAYERS[: LAYERS.index(damaged)]
    assert all(layer["passed"] for layer in report["layers"] if layer["name"] in before)
    assert f"FAILED: first divergent layer {damaged} (cumulative: {damaged}, local: {damaged})" in out

    # The page: its figures exist beside it, it refers to each of them, and they are real PNG images.
    html = (page / "index.html").read_text()
    pngs = sorted(p.name for p in page.glob("*.png"))
    assert sorted(set(re.findall(r"src='([^']+)'", html))) == pngs
    expected = {f"01-copy-move-{layer}-{mode}.png" for layer in (damaged, "pred") for mode in ("cumulative", "local")}
    assert expected | {"01-copy-move-errors.png"} == set(pngs)
    for name in pngs:
        with Image.open(page / name) as image:
            assert image.format == "PNG" and min(image.size) >= 2 * SIZE
    assert json.loads((page / "report.json").read_text()) == report
    assert f"First divergent layer: <b>{damaged}</b>" in html
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(page.stat().st_mode) == 0o777 & ~umask  # as a new folder, not the staging folder's 0700


def test_nan_weights_are_refused_before_any_comparison(files, tmp_path, capsys) -> None:
    """Every loader refuses non-finite weights (NaN differences themselves: test_engine.py)."""

    def nan_bias(state: dict[str, torch.Tensor]) -> str:
        state["featex.b3c1.bias"] = state["featex.b3c1.bias"].clone()
        state["featex.b3c1.bias"][5] = float("nan")
        return "b3c1"

    weights, _ = damaged_weights(files, tmp_path, nan_bias)
    argv = [files / "ManTraNet_Ptrain4.h5", files / "noise.png", "--torch-weights", weights, "--json", tmp_path / "r"]
    code, out, err = run(capsys, *argv)
    assert code == 2, out
    assert f"{weights}: featex.b3c1.bias holds 1 value(s) that are not finite in float32, the first nan" in err
    assert not (tmp_path / "r").exists()


def _earlier_port_files(files: Path, folder: Path, bnorm_from: str | None) -> tuple[Path, dict]:
    """An official-layout file with the earlier port's trained detector and the synthetic feature extractor.

    ``bnorm_from``: None keeps the BatchNorm statistics the import sets (mean 0, variance 0); an image name sets
    them to that image's per-channel mean and variance of outlierTrans, the statistics a BatchNorm trained on
    such images holds (the official release's own are not in the earlier port's checkpoint).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EarlierPortWarning)
        detector, _ = load_earlier_port(SEED_PORT_DETECTOR)
    featex = convert_h5(files / "ManTraNet_Ptrain4.h5").state_dict
    state = {**{k: v for k, v in featex.items() if k.startswith("featex.")}, **detector}
    if bnorm_from is not None:
        model = ManTraNet(RELEASES[RELEASE])
        model.load_state_dict(state)
        with torch.inference_mode():
            x = torch.from_numpy(model_input(files / f"{bnorm_from}.png")).permute(0, 3, 1, 2)
            outlier = model.eval().trace(x)["outlierTrans"][0]
        state["detector.bnorm.moving_mean"] = outlier.mean(dim=(1, 2))
        state["detector.bnorm.moving_variance"] = outlier.var(dim=(1, 2), unbiased=False)
    folder.mkdir()
    path = folder / "ManTraNet_Ptrain4.h5"
    write_official_h5(path, torch_to_keras(state), RELEASES[RELEASE])
    return path, state


def clamped_channels(ref: reference.ReferenceModel, x: np.ndarray) -> int:
    """Channels whose glbStd is the clamp 1e-6 + min_std rather than the image's own std (the reference's view)."""
    sigma = ref.trace(x)["glbStd"].reshape(-1)
    floor = STD_FLOOR + ref.arrays["glbStd/glbStd/min_std:0"].reshape(-1)
    return int((sigma == floor).sum())


@needs_seed_port
def test_an_earlier_port_checkpoint_takes_the_release_of_weights_h5(tmp_path) -> None:
    """The port's detector fits releases 2 and 3 as well as 4 (same shapes): WEIGHTS.h5 says which one."""
    h5 = tmp_path / "ManTraNet_Ptrain2.h5"
    write_official_h5(h5, synthetic_keras_weights(RELEASES[2], 0), RELEASES[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EarlierPortWarning)
        side = sides.torch_side([SEED_PORT_DETECTOR], convert_h5(h5))
    assert side.model.config == RELEASES[2]


@needs_seed_port
def test_earlier_port_with_the_statistics_the_import_sets_passes(files, tmp_path, capsys) -> None:
    # The import gives bnorm mean 0 and variance 0 (converter/legacy.py). An HDF5 holding exactly that computes what
    # our model with the imported checkpoint computes: every layer agrees, the near-flat image included, although
    # the glbStd clamp is active there. (The earlier port's own per-image normalisation is within a relative
    # t^2/2 = 6.6e-5 of this import, below any tolerance: see the next test for where it differs from the release.)
    h5, _ = _earlier_port_files(files, tmp_path / "same", bnorm_from=None)
    images = [files / f"{name}.png" for name in ("near-flat", "noise", "copy-move")]
    code, out, _ = run(capsys, h5, *images, "--torch-weights", SEED_PORT_DETECTOR, "--json", tmp_path / "r.json")
    assert code == 0, out
    assert "AnomalyDetectorv4.pt holds the anomaly detector only: combined with the feature extractor of" in out
    assert "the earlier port keeps no BatchNorm statistics" in out
    assert clamped_channels(reference.load(h5), model_input(images[0])) > 0  # the clamp regime is exercised


@needs_seed_port
def test_earlier_port_differs_from_trained_statistics_on_near_flat_images_only(files, tmp_path, capsys) -> None:
    # The HDF5 holds the same detector weights with BatchNorm statistics of a trained layer; the earlier port has
    # none. bnorm then differs on every image by a per-channel affine map, which cancels in divStd = |(window mean
    # - x) / std| wherever the glbStd clamp is inactive: from divStd on, the port agrees on every image but those
    # where the clamp is active (near-flat).
    h5, _ = _earlier_port_files(files, tmp_path / "trained", bnorm_from="copy-move")
    names = [image.name for image in builtin_images(SIZE)]
    images = [files / f"{name}.png" for name in names]
    code, out, _ = run(capsys, h5, *images, "--torch-weights", SEED_PORT_DETECTOR, "--json", tmp_path / "r.json")
    assert code == 1, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["first_divergent"] == {"cumulative": "bnorm", "local": "bnorm"}
    downstream = LAYERS[LAYERS.index("divStd") :]
    for image in report["images"]:
        layers = {layer["name"]: layer for layer in image["layers"]}
        # Local mode: bnorm is the only layer that is wrong by itself, on every image.
        assert [n for n, layer in layers.items() if not layer["local"]["passed"]] == ["bnorm"], image["name"]
        failing_downstream = [n for n in downstream if not layers[n]["cumulative"]["passed"]]
        if image["name"] == "near-flat.png":
            assert "divStd" in failing_downstream, image["name"]
        else:
            assert failing_downstream == [], (image["name"], failing_downstream)

    # Why there: the reference clamps glbStd on the near-flat image and on none of the textured ones. (The flat
    # image's deviations are float32 rounding alone, so its detector output is rounding noise in any framework.)
    ref = reference.load(h5)
    assert clamped_channels(ref, model_input(files / "near-flat.png")) > 0
    for name in TEXTURED:
        assert clamped_channels(ref, model_input(files / f"{name}.png")) == 0, name
    assert np.abs(ref.trace(model_input(files / "flat.png"))["nestedAvgFeatex"]).max() < 1e-4


def test_bad_input_exits_2_naming_the_file(files, tmp_path, capsys) -> None:
    h5 = files / "ManTraNet_Ptrain4.h5"
    json_out = tmp_path / "never.json"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    not_h5 = tmp_path / "ManTraNet_Ptrain4.h5"
    not_h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    other_release = tmp_path / "ptrain2.safetensors"
    conversion = convert_h5(h5)
    other_release.write_bytes(encode_safetensors(conversion.state_dict, RELEASES[2], {}))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.txt").write_text("keep me")
    cases = [
        ([tmp_path / "missing.h5"], "missing.h5"),
        ([not_h5], str(not_h5)),
        ([h5, not_an_image], "notes.png: cannot decode as an image"),
        ([h5, tmp_path / "absent.png"], "absent.png: no such file"),
        ([h5, "--torch-weights", tmp_path / "absent.pt"], "absent.pt: no such file"),
        ([h5, "--torch-weights", other_release], "ptrain2.safetensors: its architecture"),
        ([h5, "--torch-weights", not_an_image], "notes.png"),
        ([h5, "--report", occupied], "occupied: exists and is not a parity report"),
        ([h5, "--atol", "-1"], "--atol -1.0: must be a finite number >= 0"),
        ([h5, "--crop", "big"], "--crop big: expected WIDTHxHEIGHT"),
    ]
    for argv, expected in cases:
        code, out, err = run(capsys, *argv, "--json", json_out)
        assert code == 2, (argv, out, err)
        assert expected in err, (argv, err)
        assert not json_out.exists()
    assert (occupied / "thesis.txt").read_text() == "keep me"
    existing = tmp_path / "results.json"
    existing.write_text("earlier results")
    for argv, expected in [
        (["--json", existing], "results.json: already exists; pass --force to replace it"),
        (["--json", occupied], "occupied: is a folder"),
        (["--json", tmp_path / "page" / "r.json", "--report", tmp_path / "page"], "inside the --report folder"),
    ]:
        code, out, err = run(capsys, h5, *argv)
        assert code == 2 and expected in err, (argv, err)
        assert "image 1/" not in err + out  # refused before any work
    assert existing.read_text() == "earlier results" and not (tmp_path / "page").exists()


def test_large_images_attribute_the_detector_from_the_reference_features(files, tmp_path, capsys, monkeypatch) -> None:
    # Beyond FULL_ATTRIBUTION_PIXELS the float64 feature extractor is skipped: the float64 detector starts from the
    # reference's features in both modes, so in cumulative mode too the reference's drift (its float32 window
    # means, which grow with the image) is arbitrated. Made to apply here to a small image.
    monkeypatch.setattr(api, "FULL_ATTRIBUTION_PIXELS", 0)
    code, out, _ = run(capsys, files / "ManTraNet_Ptrain4.h5", files / "noise.png", "--json", tmp_path / "r.json")
    assert code == 0, out
    image = json.loads((tmp_path / "r.json").read_text())["images"][0]
    assert image["attribution"]["layers"] == list(DETECTOR_LAYERS)
    attributed = {
        mode: [layer["name"] for layer in image["layers"] if layer["attribution"][mode] is not None]
        for mode in ("cumulative", "local")
    }
    assert attributed == {"cumulative": list(DETECTOR_LAYERS), "local": list(DETECTOR_LAYERS)}
    # The first detector layer's float64 value is the same in both modes (from the reference's own L2 output), so
    # is the reference's distance from it.
    outlier = next(layer for layer in image["layers"] if layer["name"] == "outlierTrans")["attribution"]
    assert outlier["cumulative"]["reference_max_abs"] == outlier["local"]["reference_max_abs"] > 0


def test_the_cli_loads_without_tensorflow() -> None:
    # TensorFlow is imported inside `mantranet parity` only: the other commands must start without it.
    code = "import sys, mantranet_cli.main; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_user_tolerance_replaces_the_policy(files, tmp_path, capsys) -> None:
    # --atol 1e-12 --rtol 0: float32 rounding alone is over it, so the first layer that differs at all diverges.
    argv = [files / "ManTraNet_Ptrain4.h5", files / "noise.png", "--atol", "1e-12", "--rtol", "0"]
    code, out, _ = run(capsys, *argv, "--json", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 1, out
    assert report["tolerance"]["policy"] == "uniform" and report["tolerance"]["atol"] == 1e-12
    differing = [
        layer["name"]
        for layer in report["layers"]
        if max(layer[mode]["max_abs"] for mode in ("cumulative", "local")) > 1e-12
    ]
    assert report["first_divergent_layer"] == differing[0]


def test_earlier_port_checkpoint_in_each_of_its_forms(files, tmp_path, capsys) -> None:
    # The port's three forms hold the HDF5 file's own weights (laid out as the port lays them); its BatchNorm
    # statistics are those the import sets, so every form must pass against it.
    state = dict(convert_h5(files / "ManTraNet_Ptrain4.h5").state_dict)
    state["detector.bnorm.moving_mean"] = torch.zeros(64)
    state["detector.bnorm.moving_variance"] = torch.zeros(64)
    (tmp_path / "h5").mkdir()
    h5 = tmp_path / "h5" / "ManTraNet_Ptrain4.h5"
    write_official_h5(h5, torch_to_keras(state), RELEASES[RELEASE])
    port = write_port_files(tmp_path, state)
    forms = {
        "both parts": [port["MantraNetv4.pt"]],
        "two files": [port["IMTFEv4.pt"], port["AnomalyDetectorv4.pt"]],
        "feature extractor alone": [port["IMTFEv4.pt"]],
    }
    for form, paths in forms.items():
        argv = [h5, files / "gradient.png", *(arg for p in paths for arg in ("--torch-weights", p))]
        code, out, _ = run(capsys, *argv)
        assert code == 0, (form, out)
        assert "the earlier PyTorch port's checkpoint" in out, form
    assert "IMTFEv4.pt holds the feature extractor only: combined with the anomaly detector of" in out


def test_an_onnx_export_compared_layer_by_layer(files, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime", reason="the optional extra 'onnx' is not installed")
    pytest.importorskip("onnxscript", reason="the optional extra 'onnx' is not installed")
    from converter.onnx_export import export_onnx

    h5 = files / "ManTraNet_Ptrain4.h5"
    good = export_onnx(h5, tmp_path / "good.onnx", layers=True).target
    code, out, _ = run(capsys, h5, files / "copy-move.png", "--torch-weights", good, "--json", tmp_path / "g.json")
    assert code == 0, out
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["passed"] is True and [layer["name"] for layer in report["layers"]] == list(LAYERS)
    assert all(layer["cumulative"] is not None and layer["local"] is None for layer in report["layers"])
    assert "ONNX Runtime" in out

    weights, layer = damaged_weights(files, tmp_path, _damage_transpose)
    bad = export_onnx(weights, tmp_path / "bad.onnx", layers=True).target
    code, out, _ = run(capsys, h5, files / "copy-move.png", "--torch-weights", bad, "--json", tmp_path / "b.json")
    assert code == 1
    assert json.loads((tmp_path / "b.json").read_text())["first_divergent_layer"] == layer
