"""Exact tiling: tiled maps equal whole-image maps; radii, statistics, memory and cost models checked independently."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mantranet_torch.model
from mantranet_torch import ManTraNet, memory, tiling, to_model_input
from mantranet_torch.cost import flops_per_pixel, multiply_adds_per_pixel
from mantranet_torch.layers import ImageStatistics
from mantranet_torch.tiling import (
    MIN_TILE,
    StatisticsAccumulator,
    crop_around,
    crop_shape,
    last_output,
    predict_tiled,
    tile_grid,
)
from parity_tests.profiles import examples
from tests.helpers import downscaled_photo, synthetic_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiled against whole-image maps: the target of the tiling design. What remains is float32 rounding, as
# oneDNN sums a convolution in an order that depends on the input's shape (measured worst 5.0e-6 over
# 24 random Ptrain4/Ptrain1 cases of up to 100 x 100 px; a halo one pixel short gives 1e-3 and more).
TILED_ATOL = 1e-5


def model(release: int) -> ManTraNet:
    return synthetic_model(release)


def real_image() -> np.ndarray:
    """A real photograph (downscaled), or seeded noise when the shared samples are absent."""
    return downscaled_photo()


def crop(height: int, width: int, top: int, left: int) -> np.ndarray:
    image = real_image()
    top, left = top % (image.shape[0] - height + 1), left % (image.shape[1] - width + 1)
    return image[top : top + height, left : left + width].copy()


def whole_and_tiled(release: int, image: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    m = model(release)
    whole = m.predict(image, tile=max(image.shape))
    with torch.inference_mode():
        tiled = predict_tiled(m, to_model_input(image), tile)
    return whole, tiled


# ---------------------------------------------------------------- exactness


@settings(max_examples=examples(10))
@given(
    tile=st.integers(MIN_TILE, 48),
    tiles=st.integers(2, 4),
    shortfall=st.integers(0, 47),
    short_side=st.integers(1, 40),
    tall=st.booleans(),
    top=st.integers(0, 10_000),
    left=st.integers(0, 10_000),
)
def test_tiled_equals_whole_image(
    tile: int, tiles: int, shortfall: int, short_side: int, tall: bool, top: int, left: int
) -> None:
    # Two to four tiles along the long side, so that middle tiles see exactly their halo on both sides (the
    # crops have one size, and the edge tiles' crops reach further inwards); a real photograph's content.
    long_side = tiles * tile - shortfall % tile  # ceil(long_side / tile) == tiles
    height, width = (long_side, short_side) if tall else (short_side, long_side)
    whole, tiled = whole_and_tiled(4, crop(height, width, top, left), tile)
    assert tiled.shape == whole.shape == (height, width) and tiled.dtype == np.float32
    assert np.abs(tiled - whole).max() <= TILED_ATOL


def test_tiled_equals_whole_image_with_four_windows() -> None:
    # Ptrain1: four windows up to 63 and five ConvLSTM steps, a detector halo of 40 px.
    whole, tiled = whole_and_tiled(1, crop(70, 90, 3, 5), 36)
    assert np.abs(tiled - whole).max() <= TILED_ATOL


@pytest.mark.parametrize("radius", ["featex_radius", "detector_radius"])
def test_a_halo_one_pixel_short_is_not_exact(monkeypatch, radius: str) -> None:
    # The radii are tight: one pixel less and the tiles' edges are wrong, so the test above can fail.
    # Three tiles down: the middle one's crop holds exactly the halo above and below it.
    image = crop(96, 40, 11, 7)
    whole = model(4).predict(image)
    exact = getattr(tiling, radius)
    monkeypatch.setattr(tiling, radius, lambda m: exact(m) - 1)
    with torch.inference_mode():
        short = predict_tiled(model(4), to_model_input(image), 32)
    # Measured: 2.9e-5 with the extractor's halo short (one ring of pixels, 14 layers deep), 2.6e-2 with the
    # detector's: both beyond TILED_ATOL.
    assert np.abs(short - whole).max() > TILED_ATOL


def test_automatic_tiling_when_the_image_would_not_fit(monkeypatch) -> None:
    m, cpu = model(4), torch.device("cpu")
    full = memory.full_image_bytes(m, 3000, 4000)
    monkeypatch.setattr(memory, "available_memory", lambda device: full)  # its 80% is not enough
    tile = memory.automatic_tile(m, 3000, 4000, cpu)
    budget = int(memory.AVAILABLE_FRACTION * full)
    assert tile is not None and memory.tiled_bytes(m, 3000, 4000, tile) <= budget < full
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * full)
    assert memory.automatic_tile(m, 3000, 4000, cpu) is None
    # predict follows the decision (the tiled computation itself is checked above)
    calls = []
    monkeypatch.setattr(mantranet_torch.model, "predict_tiled", lambda *args: calls.append(args[2]) or args[1])
    monkeypatch.setattr(memory, "available_memory", lambda device: memory.tiled_bytes(m, 128, 128, 40) / 0.8 + 1)
    m.predict(np.zeros((128, 128, 3), dtype=np.uint8))
    assert calls == [memory.automatic_tile(m, 128, 128, cpu)] and calls[0] < 128


# ---------------------------------------------------------------- radii, by perturbing one pixel


def farthest_change(before: torch.Tensor, after: torch.Tensor, centre: int) -> int:
    """The largest Chebyshev distance from (centre, centre) of a pixel whose value changed."""
    changed = (before != after).flatten(0, -3).any(dim=0).nonzero()
    return int((changed - centre).abs().max())


@pytest.mark.parametrize("release", [4, 0])
def test_featex_radius_is_the_reach_of_one_pixel(release: int) -> None:
    m, centre = model(release), 20
    x = torch.rand(1, 3, 2 * centre + 1, 2 * centre + 1, generator=torch.Generator().manual_seed(0)) * 2 - 1
    poked = x.clone()
    poked[..., centre, centre] = -poked[..., centre, centre]
    with torch.inference_mode():
        reach = farthest_change(m.featex(x), m.featex(poked), centre)
    assert reach == tiling.featex_radius(m) == 14  # b1c1's 5x5 plus twelve 3x3 layers: 2 + 12


@pytest.mark.parametrize(("release", "expected"), [(4, 24), (0, 40)])
def test_detector_radius_is_the_reach_of_one_pixel(release: int, expected: int) -> None:
    # Windows 7/15/31 (63), four (five) 7x7 ConvLSTM steps, pred: max over steps of k//2 + 3 * later steps, + 3.
    m, centre = model(release), 45
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, 2 * centre + 1, 2 * centre + 1, generator=gen)
    poked = x.clone()
    poked[..., centre, centre] += 5.0
    stats = ImageStatistics.of(x)  # whole-image statistics held fixed, as in tiling's second pass
    with torch.inference_mode():
        before = last_output(m.detector.stages_after_bnorm(x, stats))
        after = last_output(m.detector.stages_after_bnorm(poked, stats))
    assert farthest_change(before, after, centre) == tiling.detector_radius(m) == expected


# ---------------------------------------------------------------- grid, crops, statistics


@settings(max_examples=examples(50))
@given(height=st.integers(1, 300), width=st.integers(1, 300), tile=st.integers(MIN_TILE, 200), halo=st.integers(0, 50))
def test_tiles_cover_the_image_once_and_crops_hold_their_halo(height: int, width: int, tile: int, halo: int) -> None:
    tiles = tile_grid(height, width, tile)
    cover = np.zeros((height, width), dtype=int)
    shape = crop_shape(tiles, halo, height, width)
    for box in tiles:
        cover[box.top : box.bottom, box.left : box.right] += 1
        assert 0 < box.height <= tile and 0 < box.width <= tile
        c = crop_around(box, halo, shape, height, width)
        assert (c.height, c.width) == shape and c.top >= 0 and c.left >= 0
        assert c.bottom <= height and c.right <= width
        assert c.top <= max(box.top - halo, 0) and c.bottom >= min(box.bottom + halo, height)
        assert c.left <= max(box.left - halo, 0) and c.right >= min(box.right + halo, width)
    assert (cover == 1).all()
    assert max(b.height for b in tiles) - min(b.height for b in tiles) <= 1  # near-equal splits


def test_statistics_merged_tile_by_tile_equal_float64_numpy() -> None:
    x = (torch.randn(1, 5, 53, 71, dtype=torch.float64) * 3 + 7).float()
    accumulator = StatisticsAccumulator()
    for box in tile_grid(53, 71, 20):
        accumulator.add(x[..., box.top : box.bottom, box.left : box.right])
    stats = accumulator.statistics()
    values = x[0].double().numpy().reshape(5, -1)
    # float64 throughout: Chan's merge and numpy's two-pass formulas agree to a few float64 ulps.
    np.testing.assert_allclose(stats.mean[0].numpy(), values.mean(axis=1), rtol=1e-13, atol=0)
    np.testing.assert_allclose(stats.std[0].numpy(), values.std(axis=1), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- memory and cost models


def test_memory_model_picks_the_largest_tile_that_fits() -> None:
    m = model(4)
    sizes = [memory.tiled_bytes(m, 3000, 4000, t) for t in (64, 256, 1024)]
    assert sizes == sorted(sizes) and memory.full_image_bytes(m, 3000, 4000) > sizes[-1]
    budget = 3 * 2**30
    tile = memory.tile_for_budget(m, 3000, 4000, budget)
    assert memory.tiled_bytes(m, 3000, 4000, tile) <= budget < memory.tiled_bytes(m, 3000, 4000, tile + 1)
    with pytest.raises(ValueError, match="smallest tiles"):
        memory.tile_for_budget(m, 3000, 4000, memory.PROCESS_OVERHEAD)


MEASURE_PEAK = """
import json, numpy as np, torch
from tests.test_tiling import model
from mantranet_torch import to_model_input
from mantranet_torch.tiling import predict_tiled


def status(key):  # VmHWM, not ru_maxrss: that one keeps the pytest parent's peak across fork and exec
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


torch.set_num_threads(1)
m = model(4)
x = to_model_input(np.random.default_rng(0).integers(0, 256, (96, 104, 3), dtype=np.uint8))
before = status("VmRSS")
with torch.inference_mode():
    predict_tiled(m, x, 52)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def test_memory_model_bounds_the_measured_peak() -> None:
    # A fresh process (its peak RSS is this run's alone). Modelled total must cover the measured peak,
    # and the modelled tile memory must not be wildly above what the tiles really took.
    out = subprocess.run([sys.executable, "-c", MEASURE_PEAK], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout)
    modelled = memory.tiled_bytes(model(4), 96, 104, 52)
    assert measured["peak"] <= modelled, measured
    assert measured["peak"] - measured["before"] >= 0.3 * (modelled - memory.PROCESS_OVERHEAD)


def test_arithmetic_counted_from_the_kernels_matches_the_spec_table() -> None:
    # SPEC.md's layer table, by hand: k*k*c_in*c_out per pixel; the ConvLSTM's input kernel at T steps,
    # its recurrent kernel at T - 1 (the first state is zero).
    convs = [(5, 3, 16), (3, 16, 32), (3, 32, 64), (3, 64, 64), (3, 64, 128), (3, 128, 128), (3, 128, 128)]
    convs += [(3, 128, 256)] + [(3, 256, 256)] * 5
    featex = sum(k * k * cin * cout for k, cin, cout in convs)
    steps = 4
    clstm = steps * 7 * 7 * 64 * 32 + (steps - 1) * 7 * 7 * 8 * 32
    counts = multiply_adds_per_pixel(model(4))
    assert sum(v for k, v in counts.items() if k not in ("outlierTrans", "cLSTM", "pred")) == featex == 3_673_776
    assert counts["cLSTM"] == clstm and counts["outlierTrans"] == 256 * 64 and counts["pred"] == 7 * 7 * 8
    assert flops_per_pixel(model(4)) == 2 * (featex + 256 * 64 + clstm + 7 * 7 * 8)  # 8.26 TFLOP per megapixel


def test_bf16_is_close_to_fp32_and_precision_is_checked() -> None:
    m, image = model(4), crop(48, 56, 2, 9)
    fp32 = m.predict(image)
    bf16 = m.predict(image, precision="bf16")
    # bfloat16 keeps 8 significant bits; through 13 layers the maps move by up to ~0.05 with these weights
    # (measured 0.052 max, 0.007 mean on a real crop): bounded, but far from float32's 1e-5.
    assert 0 < np.abs(bf16 - fp32).max() < 0.15 and np.abs(bf16 - fp32).mean() < 0.03
    with pytest.raises(ValueError, match="precision must be one of"):
        m.predict(image, precision="fp16")
