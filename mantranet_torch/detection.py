"""Forgery maps for many images: a generator of per-image results, one image in memory at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from .image_files import DEFAULT_MAX_PIXELS, ImageReadError, find_images, read_image

TileProgress = Callable[[Path, int, int], None]  # (image, tiles done, tiles in all, both passes counted)


@dataclass
class Detection:
    """One image's result. ``likelihood`` is None when the image failed (``error`` says why)."""

    path: Path
    relative: Path  # the path below the input folder it was found in (the file name for a file given as is)
    likelihood: np.ndarray | None = None  # float32 H x W forgery likelihood
    pixels: np.ndarray | None = None  # the uint8 H x W x 3 RGB the model saw
    notes: list[str] = field(default_factory=list)  # conversions made while reading (EXIF, alpha, 16-bit, ...)
    tiles: int = 0  # tiles per pass of a tiled run; 0 for the whole image at once
    seconds: float = 0.0  # the model's time on this image
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height), when the image was read."""
        return None if self.pixels is None else (self.pixels.shape[1], self.pixels.shape[0])


def detect(
    model: nn.Module,
    inputs: Sequence[str | Path],
    *,
    exclude: str | Path | None = None,
    **options: object,
) -> Iterator[Detection]:
    """Forgery maps for every image under ``inputs``, one at a time, each computed when asked for.

    Args:
        model: a ``ManTraNet`` in eval mode.
        inputs: image files and folders (walked recursively, in name order).
        exclude: a folder whose files are left out (e.g. an output folder inside an input folder).
        **options: ``detect_found``'s: ``tile``, ``max_memory``, ``precision``, ``max_pixels``, ``progress``.

    Yields:
        One ``Detection`` per image; an image that cannot be read or does not fit in memory gives one with
        ``error`` set, and the rest go on.
    """
    found = find_images([Path(p) for p in inputs], skip=None if exclude is None else Path(exclude))
    return detect_found(model, found, **options)


def detect_found(
    model: nn.Module,
    found: Iterable[tuple[Path, Path]],
    *,
    tile: int | None = None,
    max_memory: float | None = None,
    precision: str = "fp32",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: TileProgress | None = None,
) -> Iterator[Detection]:
    """One ``Detection`` per (image, relative path), in order, each computed when asked for.

    ``tile``, ``max_memory`` and ``precision`` are ``ManTraNet.predict``'s. An image that cannot be read, is larger
    than ``max_pixels``, or does not fit in memory gives a ``Detection`` with ``error`` set, and the rest go on.
    """
    for path, relative in found:
        try:
            image = read_image(path, max_pixels)
        except ImageReadError as e:
            yield Detection(path, relative, error=str(e))
            continue
        passes = []

        def tiles(done: int, total: int, path: Path = path, passes: list[int] = passes) -> None:
            passes.append(total)
            if progress is not None:
                progress(path, done, total)

        start = time.perf_counter()
        try:
            likelihood = model.predict(
                image.pixels, tile=tile, max_memory=max_memory, precision=precision, progress=tiles
            )
        except (ValueError, MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "memory" not in str(e).lower():
                raise
            hint = "" if isinstance(e, ValueError) else "; try a smaller tile or max_memory"
            yield Detection(path, relative, pixels=image.pixels, notes=image.notes, error=f"{path}: {e}{hint}")
            continue
        seconds = time.perf_counter() - start
        tiles_per_pass = passes[-1] // 2 if passes else 0
        yield Detection(path, relative, likelihood, image.pixels, image.notes, tiles_per_pass, seconds)
