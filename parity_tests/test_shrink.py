"""``--shrink``: a failing image reduced to the smallest crop, then the simplest content, failing at the same layer.

The search itself against predicates whose minimal input is known; then the command on a 100 x 100 crop with
tampered weights: the saved crop is at most 48 x 48, and the saved command line reproduces the failure.
"""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from converter import convert_h5
from mantranet_cli.main import main
from mantranet_torch import RELEASES
from mantranet_torch.weights import encode_safetensors
from parity_tests.official_files import SAMPLES, WeightStore
from parity_tests.shrink import MIN_SIDE, shrink
from parity_tests.strategies import ImageRecipe, Shape

RED = np.array([255, 0, 0], np.uint8)


def _picture(height: int = 40, width: int = 30) -> np.ndarray:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
    pixels[23, 17] = RED
    return pixels


def test_shrinks_to_the_smallest_crop_holding_what_fails() -> None:
    # Fails while the red pixel is in the crop: the minimum is MIN_SIDE x MIN_SIDE around it; the content cannot be
    # simplified to one colour (that loses the red), but two levels per channel keep it.
    pixels = _picture()

    def has_red(p: np.ndarray) -> bool:
        return bool((p == RED).all(axis=2).any())

    found = shrink(pixels, has_red, budget_s=60)
    box = found.box
    assert (box.width, box.height) == (MIN_SIDE, MIN_SIDE) and not found.exhausted
    assert box.left <= 17 < box.left + box.width and box.top <= 23 < box.top + box.height
    assert found.simplified[0] == "two levels per channel" and has_red(found.pixels)
    assert found.pixels.shape == (MIN_SIDE, MIN_SIDE, 3)


def test_keeps_what_a_failure_needs_and_simplifies_content() -> None:
    # Fails on crops of at least 9 x 7, whatever the pixels: size stops there, and one flat colour is the content.
    found = shrink(_picture(), lambda p: p.shape[0] >= 9 and p.shape[1] >= 7, budget_s=60)
    assert (found.box.height, found.box.width) == (9, 7)
    assert found.simplified == ["one flat colour"] and len(np.unique(found.pixels.reshape(-1, 3), axis=0)) == 1


def test_the_budget_bounds_the_search() -> None:
    ticks = itertools.count()
    found = shrink(_picture(), lambda p: True, budget_s=5, clock=lambda: float(next(ticks)))
    assert found.exhausted and found.checks <= 5


def _crop_100(path: Path) -> None:
    sample = SAMPLES / "forged" / "I09_co91yc6_0.jpg"
    if sample.is_file():
        image = np.asarray(Image.open(sample).convert("RGB"))
        top, left = (image.shape[0] - 100) // 2, (image.shape[1] - 100) // 2
        pixels = image[top : top + 100, left : left + 100]
    else:
        pixels = ((ImageRecipe("pixels", Shape(1, 100, 100), seed=3).build()[0] + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


def test_a_failing_100px_crop_shrinks_to_at_most_48px_and_reproduces(weights: WeightStore, tmp_path, capsys):
    h5, layer = weights.get(4).path, "cLSTM"
    state = dict(convert_h5(h5).state_dict)
    state["detector.clstm.kernel"] = state["detector.clstm.kernel"] * 1.01  # 1%: the whole feature extractor agrees
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(encode_safetensors(state, RELEASES[4], {}))
    image = tmp_path / "photo.png"
    _crop_100(image)
    argv = ["parity", str(h5), str(image), "--torch-weights", str(tampered), "--local", "--json", str(tmp_path / "r")]
    assert main([*argv, "--shrink", str(tmp_path / "min"), "--shrink-budget", "120"]) == 1
    out = capsys.readouterr().out
    found = json.loads((tmp_path / "r").read_text())["shrunk"]
    assert len(found) == 1 and found[0]["layer"] == layer, found
    assert found[0]["width"] <= 48 and found[0]["height"] <= 48, found
    assert f"still failing first at {layer}" in out
    saved = Path(found[0]["path"])
    with Image.open(saved) as png:
        assert png.size == (found[0]["width"], found[0]["height"])
    # The command line saved beside it reproduces the failure, at the same layer.
    command = shlex.split(saved.with_suffix(".txt").read_text().splitlines()[-1])
    assert command[:2] == ["mantranet", "parity"] and str(saved) in command
    assert main([*command[1:], "--json", str(tmp_path / "again.json")]) == 1
    assert json.loads((tmp_path / "again.json").read_text())["first_divergent_layer"] == layer
