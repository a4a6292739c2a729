"""The images a parity run compares on: the user's (read as ``mantranet detect`` reads them, optionally cropped),
arrays, or the built-in set; and whether the machine has the memory for a layer-by-layer comparison of each."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mantranet_torch.image_files import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from mantranet_torch.memory import available_memory

from .builtin_images import DEFAULT_SIZE, builtin_images
from .errors import ParityInputError

# Peak memory of one image's comparison: the reference's trace of every layer, the PyTorch outputs and the
# float64 comparison buffers, over the two frameworks loaded (measured figures: README, "parity").
BYTES_PER_PIXEL = 45_000
BASE_BYTES = 2**30
CROP_PATTERN = re.compile(r"^(\d+)x(\d+)(?:\+(\d+)\+(\d+))?$")


@dataclass
class InputImage:
    name: str
    source: str
    pixels: np.ndarray  # uint8 H x W x 3
    notes: list[str]


@dataclass(frozen=True)
class Crop:
    width: int
    height: int
    left: int | None = None
    top: int | None = None

    @classmethod
    def parse(cls, text: str) -> Crop:
        found = CROP_PATTERN.match(text)
        if not found or int(found.group(1)) < 1 or int(found.group(2)) < 1:
            raise ParityInputError(f"--crop {text}: expected WIDTHxHEIGHT or WIDTHxHEIGHT+LEFT+TOP, e.g. 256x256")
        width, height, left, top = found.groups()
        return cls(int(width), int(height), None if left is None else int(left), None if top is None else int(top))

    def apply(self, image: InputImage) -> InputImage:
        height, width = image.pixels.shape[:2]
        if self.width >= width and self.height >= height and self.left is None:
            return image
        w, h = min(self.width, width), min(self.height, height)
        left = (width - w) // 2 if self.left is None else self.left
        top = (height - h) // 2 if self.top is None else self.top
        if left + w > width or top + h > height:
            raise ParityInputError(
                f"{image.source}: --crop {w}x{h}+{left}+{top} reaches beyond the image ({width} x {height})"
            )
        pixels = np.ascontiguousarray(image.pixels[top : top + h, left : left + w])
        note = f"cropped to {w} x {h} at left {left}, top {top} (of {width} x {height})"
        return InputImage(image.name, image.source, pixels, [*image.notes, note])


ImageInput = str | Path | np.ndarray | InputImage


def read_inputs(images: Sequence[ImageInput], crop: Crop | None = None) -> list[InputImage]:
    """Each image decoded (a file as ``mantranet detect`` reads it; an H x W x 3 uint8 array as it is), or the
    built-in set when ``images`` is empty; then cropped. All before any work, so that a bad one stops the run."""
    if not images:
        loaded = [InputImage(b.name, "built-in: " + b.description, b.pixels, []) for b in builtin_images(DEFAULT_SIZE)]
    else:
        paths = [Path(i) for i in images if isinstance(i, (str, Path))]
        loaded = [_one(image, index, paths) for index, image in enumerate(images, start=1)]
    return [crop.apply(image) for image in loaded] if crop else loaded


def _one(image: ImageInput, index: int, paths: list[Path]) -> InputImage:
    if isinstance(image, InputImage):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise ParityInputError(
                f"image {index}: expected an H x W x 3 uint8 RGB array, got {image.dtype} of shape {image.shape}"
            )
        return InputImage(f"array-{index}", f"array {index}", np.ascontiguousarray(image), [])
    path = Path(image)
    try:
        loaded = read_image(path, DEFAULT_MAX_PIXELS)
    except ImageReadError as e:
        raise ParityInputError(str(e)) from None
    name = path.name if sum(p.name == path.name for p in paths) == 1 else str(path)
    return InputImage(name, str(path), loaded.pixels, loaded.notes)


def host_memory() -> int | None:
    """The host's available memory in bytes (``mantranet_torch.memory``), None where the system does not say."""
    try:
        return available_memory(torch.device("cpu"))
    except (OSError, ValueError):
        return None


def check_memory(images: list[InputImage], available: int | None) -> None:
    """Refuse an image whose layer-by-layer comparison would not fit in ``available`` bytes (None: unknown)."""
    if available is None:
        return
    for image in images:
        height, width = image.pixels.shape[:2]
        need = BASE_BYTES + BYTES_PER_PIXEL * height * width
        if need > available:
            side = int(math.sqrt(max(available - BASE_BYTES, 0) / BYTES_PER_PIXEL)) // 16 * 16
            hint = f"compare on a region with --crop {side}x{side}" if side >= 16 else "free some memory"
            raise ParityInputError(
                f"{image.source}: {width} x {height} needs about {need / 2**30:.1f} GiB for a layer-by-layer "
                f"comparison, {available / 2**30:.1f} GiB are available; {hint} (every layer shows in any region)"
            )
