"""The images ``mantranet parity`` compares on: the user's (read as ``detect`` reads them, optionally cropped)
or the built-in set, and whether the machine has the memory for a layer-by-layer comparison of each."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mantranet_torch.images import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from parity_tests.builtin_images import DEFAULT_SIZE, builtin_images

from .errors import BAD_INPUT, CommandError

# Peak memory of one image's comparison: the reference's trace of every layer, the PyTorch outputs and the
# float64 comparison buffers. Measured peak resident memory: 1.1 GB for the built-in set, 1.7 GB at 128 x 128,
# 2.0 GB at 160 x 160, 7.5 GB at 600 x 266: 35-44 KB per pixel over the 1 GB of the two frameworks loaded.
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
            raise CommandError(
                f"--crop {text}: expected WIDTHxHEIGHT or WIDTHxHEIGHT+LEFT+TOP, e.g. 256x256", BAD_INPUT
            )
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
            raise CommandError(
                f"{image.source}: --crop {w}x{h}+{left}+{top} reaches beyond the image ({width} x {height})", BAD_INPUT
            )
        pixels = np.ascontiguousarray(image.pixels[top : top + h, left : left + w])
        note = f"cropped to {w} x {h} at left {left}, top {top} (of {width} x {height})"
        return InputImage(image.name, image.source, pixels, [*image.notes, note])


def read_inputs(paths: list[Path], crop: Crop | None) -> list[InputImage]:
    """The user's images decoded (as ``mantranet detect`` reads them), or the built-in set; all before any work."""
    if not paths:
        images = [InputImage(b.name, "built-in: " + b.description, b.pixels, []) for b in builtin_images(DEFAULT_SIZE)]
    else:
        images = []
        for path in paths:
            try:
                loaded = read_image(path, DEFAULT_MAX_PIXELS)
            except ImageReadError as e:
                raise CommandError(str(e), BAD_INPUT) from None
            name = path.name if sum(p.name == path.name for p in paths) == 1 else str(path)
            images.append(InputImage(name, str(path), loaded.pixels, loaded.notes))
    return [crop.apply(image) for image in images] if crop else images


def check_memory(images: list[InputImage], available: int | None) -> None:
    if available is None:
        return
    for image in images:
        height, width = image.pixels.shape[:2]
        need = BASE_BYTES + BYTES_PER_PIXEL * height * width
        if need > available:
            side = int(math.sqrt(max(available - BASE_BYTES, 0) / BYTES_PER_PIXEL)) // 16 * 16
            hint = f"compare on a region with --crop {side}x{side}" if side >= 16 else "free some memory"
            raise CommandError(
                f"{image.source}: {width} x {height} needs about {need / 2**30:.1f} GiB for a layer-by-layer "
                f"comparison, {available / 2**30:.1f} GiB are available; {hint} (every layer shows in any region)",
                BAD_INPUT,
            )
