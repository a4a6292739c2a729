"""The original code itself as the reference: the official ``modelCore.py`` (test data in ``../shared/official``,
never part of the project) run unmodified under tf_keras by ``reference.official``.

For all five releases, on one real 32 x 32 crop: the official code in float64 agrees with the project's
independent float64 NumPy evaluation (so the compatibility layer runs what the official code computes), and our
PyTorch model and our TensorFlow reference each pass layer by layer against the official code in float32, both
modes, with the official code in float64 as the exact answer. Then ``mantranet parity --reference official:DIR``
as a user runs it: a faithful conversion passes, a tampered one exits 1 naming the tampered layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from converter import convert_h5
from mantranet_cli.main import main
from mantranet_torch import LAYERS, RELEASES
from mantranet_torch.weights import encode_safetensors
from parity_tests.official_files import OFFICIAL_CODE, SAMPLES, WeightStore, official_code_missing
from parity_tests.oracle import SRM_FILTERS
from parity_tests.runner import INPUT, LAYER_INPUTS, compare_layers
from parity_tests.sides import ReferenceSide
from parity_tests.strategies import ImageRecipe, Shape

pytestmark = pytest.mark.skipif(official_code_missing() is not None, reason=str(official_code_missing()))

SIZE = 32  # every layer of the five releases in a few seconds; windows of 31 and 63 cross the borders
SAMPLE = "forged/I09_co91yc6_0.jpg"
# Each layer of the official code in float64 against the project's independent float64 NumPy evaluation, both
# fed the same inputs: float64 rounding of different summation orders (measured <= 1.6e-14, nestedAvgFeatex's
# integral images), so 1e-12. b1c1 alone differs more: see srm_rounding_bound.
FLOAT64_AGREEMENT = 1e-12


def srm_rounding_bound() -> float:
    """How far b1c1 may move because the official code builds its SRM filters from float32 arrays (multiples of
    1/12 and 1/4 rounded to float32) where the NumPy evaluation uses exact ones: the largest summed |difference|
    of a filter's taps, times the largest input magnitude (1)."""
    return max(float(np.abs(f.astype(np.float32).astype(np.float64) - f).sum()) for f in SRM_FILTERS)


def crop(size: int = SIZE) -> np.ndarray:
    """A real image's centre (the official sample) when it is here, else drawn pixels: 1 x H x W x 3 in [-1, 1]."""
    path = SAMPLES / SAMPLE
    if not path.is_file():
        return ImageRecipe("pixels", Shape(1, size, size), seed=11).build()
    image = np.asarray(Image.open(path).convert("RGB"))
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    pixels = image[top : top + size, left : left + size].astype(np.float32)
    return (pixels / 255.0 * 2.0 - 1.0)[None]


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_release_against_the_official_code(weights: WeightStore, release: int) -> None:
    w = weights.get(release)
    x = crop()
    # The float64 official run is the exact answer: check it, layer by layer on the same inputs, against the
    # independent float64 evaluation first.
    trace = w.oracle.trace(x)
    for name in LAYERS:
        inputs = [x if source == INPUT else trace[source] for source in LAYER_INPUTS[name]]
        difference = np.abs(w.official64.layer(name, *inputs) - w.oracle.layer(name, *inputs)).max()
        assert difference <= (srm_rounding_bound() if name == "b1c1" else FLOAT64_AGREEMENT), (name, difference)

    ours = compare_layers(w.official, w.model, x, oracle=w.official64)
    assert ours.passed, "PyTorch vs official code:\n" + ours.summary()
    tf_reference = compare_layers(w.official, ReferenceSide(w.reference), x, oracle=w.official64)
    assert tf_reference.passed, "TensorFlow reference vs official code:\n" + tf_reference.summary()

    # End to end: the official predict (its own compiled graph) against our model's output. Graphs round the
    # chaotic float32 window means differently; measured at most 2.1e-5 on 64 x 64 real crops (README), so 1e-4.
    with torch.inference_mode():
        torch_pred = w.model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert np.abs(w.official.predict(x) - torch_pred).max() <= 1e-4


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory, weights: WeightStore) -> dict[str, Path]:
    """What a user has: a weight file, a photograph crop, a folder with their copy of the official code."""
    folder = tmp_path_factory.mktemp("official-user")
    (folder / "ManTraNet").mkdir()
    shutil.copy(OFFICIAL_CODE, folder / "ManTraNet" / "modelCore.py")
    image = folder / "crop.png"
    Image.fromarray(((crop(24)[0] + 1) / 2 * 255).round().astype(np.uint8)).save(image)
    return {"h5": weights.get(4).path, "image": image, "code": folder / "ManTraNet", "folder": folder}


def test_the_command_passes_a_faithful_conversion_and_names_a_tampered_layer(user_files, tmp_path, capsys) -> None:
    h5, image, code = user_files["h5"], user_files["image"], user_files["code"]
    argv = ["parity", str(h5), str(image), "--reference", f"official:{code}", "--json", str(tmp_path / "ok.json")]
    assert main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert f"the official code {code / 'modelCore.py'}, under tf_keras" in out
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["reference"]["kind"] == "official" and report["reference"]["code_verified"] is True
    assert report["versions"]["tf_keras"]

    state = dict(convert_h5(h5).state_dict)
    state["featex.b3c2.weight"] = state["featex.b3c2.weight"] * 1.001  # 0.1%: over every tolerance, hard to see
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(encode_safetensors(state, RELEASES[4], {}))
    argv = [*argv[:-1], str(tmp_path / "bad.json"), "--torch-weights", str(tampered)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED: first divergent layer b3c2 (cumulative: b3c2, local: b3c2)" in out
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "bad.json").read_text())["layers"]}
    assert all(layers[name]["passed"] for name in LAYERS[: LAYERS.index("b3c2")])
    # Attributed: the official code in float64 says PyTorch is the one off.
    image_layers = json.loads((tmp_path / "bad.json").read_text())["images"][0]["layers"]
    b3c2 = next(layer for layer in image_layers if layer["name"] == "b3c2")
    assert b3c2["attribution"]["local"]["further_from_exact"] == "torch"


def test_bad_official_code_exits_2(user_files, tmp_path, capsys, monkeypatch) -> None:
    h5, image = user_files["h5"], user_files["image"]
    monkeypatch.setenv("MANTRANET_HOME", str(tmp_path / "empty-cache"))
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "modelCore.py").write_text(OFFICIAL_CODE.read_text() + "\nfrom keras.utils import multi_gpu_model\n")
    cases = [
        (["--reference", "official"], "download it with 'mantranet weights fetch --code'"),
        (["--reference", f"official:{tmp_path}"], f"{tmp_path}: no modelCore.py there"),
        (["--reference", f"official:{edited}"], "imports keras.utils, which the Keras 2 compatibility layer"),
        (["--reference", "theirs"], "--reference theirs: expected 'ours', 'official' or 'official:DIR'"),
    ]
    for extra, expected in cases:
        assert main(["parity", str(h5), str(image), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (extra, err)
