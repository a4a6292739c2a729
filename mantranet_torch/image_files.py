"""Reading images as the official demo did: ``cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]``.

OpenCV's IMREAD_COLOR gives 8-bit, 3-channel colour whatever the file holds: it applies the EXIF
orientation, drops an alpha channel without compositing, expands greyscale and palette images to
three channels and scales 16-bit samples down by 256. The same conversions are done here with
Pillow, each reported in a note so that the user knows what the model saw.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mantranet_torch.files import file_problem, one_paragraph

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm"})
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2 x MAX_IMAGE_PIXELS)
SIXTEEN_BIT_SHIFT = 8  # OpenCV's IMREAD_COLOR keeps the high byte: v / 256
ORIENTATION_TAG = 0x0112


class ImageReadError(Exception):
    """An image that cannot be used; the message names the file and says why."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # uint8 H x W x 3, RGB, writable (torch warns on read-only arrays)
    notes: list[str] = field(default_factory=list)


def find_images(inputs: list[Path], skip: Path | None = None) -> list[tuple[Path, Path]]:
    """(image, its path relative to the input it came from): files as given, directories walked for images.

    Files under ``skip`` (the output folder, when it lies inside an input folder) are not walked into.
    """
    found = []
    skip = skip.resolve() if skip is not None else None
    for item in inputs:
        if item.is_dir():
            for path in sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                if skip is None or not path.resolve().is_relative_to(skip):
                    found.append((path, path.relative_to(item)))
        else:
            found.append((item, Path(item.name)))
    return found


@contextlib.contextmanager
def _pixel_limit_off() -> Iterator[None]:
    """Pillow's own bomb check off: ``read_image`` applies the user's limit before decoding."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """The image at ``path`` as 8-bit RGB, converted as OpenCV's IMREAD_COLOR converts it."""
    problem = file_problem(path)
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    try:
        with _pixel_limit_off(), warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore")  # Pillow's notes on conversions: ours say what was done
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"{path}: {width} x {height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
                    "(a decompression bomb?); raise the limit (max_pixels, --max-pixels) to process it"
                )
            sixteen_bit = any(";16" in str(tile.args) for tile in image.tile)  # what the file holds, before decoding
            image.load()
            return _to_rgb8(image, sixteen_bit)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"{path}: cannot decode as an image ({one_paragraph(str(e), path)})") from None


def _to_rgb8(image: Image.Image, sixteen_bit: bool) -> LoadedImage:
    notes = []
    orientation = image.getexif().get(ORIENTATION_TAG, 1)
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        notes.append(f"rotated/flipped by its EXIF orientation {orientation}")
    mode = image.mode
    if sixteen_bit and mode in ("RGB", "RGBA"):  # Pillow keeps the high byte of each sample, as OpenCV does
        notes.append("16-bit samples scaled to 8 bits (/256)")
    if mode == "RGB":
        return LoadedImage(np.array(image), notes)
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image)
        if grey.dtype != np.uint16 and grey.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"{mode} samples beyond 16 bits")
        grey = (grey.astype(np.uint32) >> SIXTEEN_BIT_SHIFT).astype(np.uint8)
        notes.append("16-bit greyscale scaled to 8 bits (/256) and expanded to RGB")
        return LoadedImage(np.repeat(grey[:, :, None], 3, axis=2), notes)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        notes.append(f"{mode}: alpha channel dropped (not composited)")
    elif mode in ("L", "1"):
        notes.append(f"greyscale ({mode}) expanded to RGB")
    elif mode == "P":
        notes.append(
            "palette image expanded to RGB" + (" (transparency ignored)" if "transparency" in image.info else "")
        )
    else:
        notes.append(f"{mode} converted to RGB")
    if mode == "PA":
        image = image.convert("RGBA")
    return LoadedImage(np.array(image.convert("RGB")), notes)
