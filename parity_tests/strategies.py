"""Hypothesis strategies for the parity suite: shapes, images and layer inputs in their interesting regions.

Arrays are drawn as a recipe (kind, scale, seed) and built with NumPy: hypothesis then shrinks the recipe,
and a failing example prints as a few numbers rather than thousands of floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from parity_tests.official_files import SEEDS

# Sides the numerics treat specially: 1 (a 1-pixel side, narrower than every pad and window), 2 and 3
# (narrower than b1c1's pad of 2 plus one), around the windows 7, 15, 31, 63, and the largest drawn.
SPECIAL_SIDES = (1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 31, 32, 63, 64, 70)
MAX_SIDE = 70


def sides(max_side: int = MAX_SIDE) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([s for s in SPECIAL_SIDES if s <= max_side]), st.integers(1, max_side))


@dataclass(frozen=True)
class Shape:
    batch: int
    height: int
    width: int


@st.composite
def shapes(draw: st.DrawFn, max_pixels: int = 3 * MAX_SIDE * MAX_SIDE, max_side: int = MAX_SIDE) -> Shape:
    """Batch 1 to 3, odd, even, 1-pixel and non-square sides; at most ``max_pixels`` in all (time budget)."""
    height, width = draw(sides(max_side)), draw(sides(max_side))
    batch = draw(st.integers(1, max(1, min(3, max_pixels // (height * width)))))
    if batch * height * width > max_pixels:  # one image larger than the budget: keep its aspect, shrink it
        scale = (max_pixels / (height * width)) ** 0.5
        height, width = max(1, int(height * scale)), max(1, int(width * scale))
    return Shape(batch, height, width)


IMAGE_KINDS = ("pixels", "uniform", "flat", "near_flat", "smooth", "checkerboard")


def make_image(kind: str, shape: Shape, seed: int) -> np.ndarray:
    """An N x H x W x 3 float32 input in [-1, 1] of one kind.

    pixels: uint8 values scaled as the official demo does; flat: one colour (every statistic of the
    detector is then clamped); near_flat: one colour plus noise of a few grey levels' thousandths.
    """
    rng = np.random.default_rng(seed)
    n, h, w = shape.batch, shape.height, shape.width
    if kind == "pixels":
        x = rng.integers(0, 256, (n, h, w, 3)) / 255 * 2 - 1
    elif kind == "uniform":
        x = rng.uniform(-1, 1, (n, h, w, 3))
    elif kind == "flat":
        x = np.broadcast_to(rng.uniform(-1, 1, (n, 1, 1, 3)), (n, h, w, 3))
    elif kind == "near_flat":
        x = rng.uniform(-0.9, 0.9, (n, 1, 1, 3)) + rng.normal(0, 1e-3, (n, h, w, 3))
    elif kind == "smooth":
        yy, xx = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
        x = np.sin(yy[None, :, :, None] / rng.uniform(2, 9) + xx[None, :, :, None] / rng.uniform(2, 9) + phase)
    elif kind == "checkerboard":
        yy, xx = np.mgrid[0:h, 0:w]
        x = np.broadcast_to((((yy + xx) % 2) * 2 - 1)[None, :, :, None], (n, h, w, 3)) * rng.uniform(0.1, 1)
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class ImageRecipe:
    kind: str
    shape: Shape
    seed: int

    def build(self) -> np.ndarray:
        return make_image(self.kind, self.shape, self.seed)


def images(max_pixels: int = 3 * MAX_SIDE * MAX_SIDE, kinds: tuple[str, ...] = IMAGE_KINDS) -> st.SearchStrategy:
    return st.builds(ImageRecipe, st.sampled_from(kinds), shapes(max_pixels), st.integers(0, 2**16))


def weight_seeds() -> st.SearchStrategy[int]:
    return st.sampled_from(SEEDS)


def log_uniform(rng: np.random.Generator, low_exp: float, high_exp: float, size: tuple[int, ...]) -> np.ndarray:
    """Magnitudes spread evenly over decades 10^low_exp .. 10^high_exp."""
    return 10.0 ** rng.uniform(low_exp, high_exp, size)
