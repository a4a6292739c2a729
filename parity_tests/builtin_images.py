"""The built-in test images of ``mantranet parity``: small, deterministic, made in code, each aimed at a regime.

Images are 8-bit RGB (H x W x 3 uint8), as a user's files are after decoding, so they take the same path into
the model (``mantranet_torch.scale_pixels``). Every one is generated from fixed seeds: the same bytes on every
machine and in every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_SIZE = 48  # every window of Ptrain4 (7, 15, 31) fits; six images run in well under a minute
MIN_SIZE = 8
GREY = (118, 128, 138)  # the flat colour: mid-range, channels apart so that none is degenerate
NEAR_FLAT_DENSITY = 1 / 288  # pixels one level off the flat colour: 8 of 48 x 48
CHECKER_SQUARE = 4  # pixels per square: every window (7 pixels or more) holds both colours
COPY_MOVE_FRACTION = 4  # the copied block is a quarter of the image's side


@dataclass(frozen=True)
class BuiltinImage:
    name: str
    pixels: np.ndarray  # uint8 H x W x 3
    description: str


def noise(size: int) -> np.ndarray:
    """Uniform 8-bit noise: every feature channel busy, the detector's statistics far from any clamp."""
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def flat(size: int) -> np.ndarray:
    """One colour: every feature is constant, so the detector sees only each framework's rounding."""
    return np.broadcast_to(np.array(GREY, dtype=np.uint8), (size, size, 3)).copy()


def near_flat(size: int) -> np.ndarray:
    """The flat colour with a few pixels one level brighter: per-image feature stds so small that the glbStd
    clamp (``max(std, 1e-6 + min_std)``) is active on some channels, where BatchNorm choices show."""
    image = flat(size)
    rng = np.random.default_rng(1)
    count = max(1, round(size * size * NEAR_FLAT_DENSITY))
    rows, cols = rng.integers(0, size, count), rng.integers(0, size, count)
    image[rows, cols] += 1
    return image


def gradient(size: int) -> np.ndarray:
    """Smooth ramps, one direction per channel: red left to right, green top to bottom, blue along the diagonal."""
    ramp = np.linspace(0.0, 255.0, size)
    red = np.broadcast_to(ramp[None, :], (size, size))
    green = np.broadcast_to(ramp[:, None], (size, size))
    blue = (red + green) / 2
    return np.rint(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def checkerboard(size: int) -> np.ndarray:
    """Black and white squares at full amplitude: the largest activations the feature extractor produces."""
    index = np.arange(size) // CHECKER_SQUARE
    board = (index[:, None] + index[None, :]) % 2
    return np.repeat((board * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def copy_move(size: int) -> np.ndarray:
    """A textured scene with one block copied elsewhere in it (a copy-move forgery, the bottom-right block)."""
    rng = np.random.default_rng(2)
    rows, cols = np.mgrid[0:size, 0:size] / size
    scene = np.zeros((size, size, 3))
    for channel in range(3):
        for _ in range(3):  # a few low-frequency waves per channel, then fine grain
            fy, fx, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
            scene[:, :, channel] += np.sin(2 * np.pi * (fy * rows + fx * cols) + phase)
    scene = 128 + 30 * scene + rng.normal(0.0, 6.0, scene.shape)
    image = np.clip(np.rint(scene), 0, 255).astype(np.uint8)
    block = max(2, size // COPY_MOVE_FRACTION)
    source, target = size // 8, size - size // 8 - block
    image[target : target + block, target : target + block] = image[source : source + block, source : source + block]
    return image


KINDS: dict[str, tuple[Callable[[int], np.ndarray], str]] = {
    "noise": (noise, "uniform 8-bit noise"),
    "flat": (flat, f"one colour {GREY}"),
    "near-flat": (near_flat, "the flat colour with a few pixels one level brighter: stds where the glbStd clamp acts"),
    "gradient": (gradient, "smooth colour ramps"),
    "checkerboard": (checkerboard, f"black and white {CHECKER_SQUARE}-pixel squares"),
    "copy-move": (copy_move, "a textured scene with its top-left block copied to the bottom right"),
}


def builtin_images(size: int = DEFAULT_SIZE) -> list[BuiltinImage]:
    """The whole set, each ``size`` x ``size``, in a fixed order."""
    if size < MIN_SIZE:
        raise ValueError(f"built-in images need a size of at least {MIN_SIZE}, got {size}")
    return [BuiltinImage(name, make(size), description) for name, (make, description) in KINDS.items()]
