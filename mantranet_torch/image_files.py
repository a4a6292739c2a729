"""Reading images as the official demo did: ``cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]``.

OpenCV's IMREAD_COLOR gives 8-bit, 3-channel colour whatever the file holds: it applies the EXIF
orientation, drops an alpha channel without compositing, expands greyscale and palette images to
three channels and scales 16-bit samples down by 256. The same conversions are done here with
Pillow, each reported in a note so that the user knows what the model saw.

Samples wider than 8 bits follow one rule (``SAMPLE_RULE``), by what the samples hold rather than by the
type that stores them: OpenCV reads a 32-bit integer TIFF of 8-bit values, or a float TIFF in 0..1, as
a black image, which is never what a forensics user wants to analyse.
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
SAMPLE_RULE = (
    "integer samples are read at the depth their largest value needs, in whole bytes: up to 255 they are "
    "taken as they are (8-bit data stored wide), up to 65,535 scaled by /256 (the high byte, as OpenCV "
    "reads 16-bit files), above that by /2**(bits - 8); negative samples are refused. Float samples in "
    "0..1 are scaled by 255, float samples in 0..255 (largest above 1) taken as they are, both rounded to "
    "the nearest integer; NaN, infinite, negative or larger float samples are refused"
)
ORIENTATION_TAG = 0x0112


class ImageReadError(Exception):
    """An image that cannot be used; the message names the file and says why."""


class SampleError(ValueError):
    """Samples that no 8-bit reading fits (negative, NaN, beyond the float range); the message says which."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # uint8 H x W x 3, RGB, writable (torch warns on read-only arrays)
    notes: list[str] = field(default_factory=list)


def find_images(inputs: list[Path], skip: Path | None = None) -> list[tuple[Path, Path]]:
    """The images under ``inputs``: files as given, directories walked for image files in name order.

    Args:
        inputs: files and folders.
        skip: a folder not walked into (the output folder, when it lies inside an input folder).

    Returns:
        (image, its path relative to the input it came from) pairs.
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
    """The image at ``path`` as 8-bit RGB, converted as OpenCV's IMREAD_COLOR converts it.

    Args:
        path: an image file.
        max_pixels: the largest width x height read (a decompression-bomb guard, checked before decoding).

    Returns:
        A ``LoadedImage``: uint8 H x W x 3 pixels, and a note for each conversion done (alpha dropped, 16 bits
        scaled, EXIF orientation applied, ...).

    Raises:
        ImageReadError: the file is missing, not a regular file, larger than ``max_pixels`` or not decodable;
            the message names it.
    """
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
            return _to_rgb8(image, sixteen_bit, path)
    except ImageReadError:
        raise
    except SampleError as e:
        raise ImageReadError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"{path}: cannot decode as an image ({one_paragraph(str(e), path)})") from None


def _to_rgb8(image: Image.Image, sixteen_bit: bool, path: Path) -> LoadedImage:
    notes = []
    orientation = image.getexif().get(ORIENTATION_TAG, 1)
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        notes.append(f"rotated/flipped by its EXIF orientation {orientation}")
    mode = image.mode
    if sixteen_bit and mode in ("RGB", "RGBA"):  # Pillow keeps the high byte of each sample, as OpenCV does
        black = np.asarray(image).max(initial=0) == 0
        low = _low_bytes(path) if black else None
        if low is not None and low.max(initial=0) > 0:  # every sample below 256: 8-bit data stored wide
            notes.append(f"16-bit samples all below 256 (largest {low.max()}): taken as they are")
            image = Image.fromarray(low)
        elif black and low is None:  # a byte order Pillow does not name: the low bytes are out of reach
            notes.append("16-bit samples scaled to 8 bits (/256): every sample is below 256, the image is black")
        else:
            notes.append("16-bit samples scaled to 8 bits (/256)")
    if mode == "RGB":
        return LoadedImage(np.array(image), notes)
    if mode.startswith("I") or mode == "F":
        grey, note = samples_to_8bit(np.asarray(image))
        notes.append(f"greyscale {note}, expanded to RGB")
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


def samples_to_8bit(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Samples of any integer or float type as uint8, by ``SAMPLE_RULE``, and a note saying what was done.

    Raises:
        SampleError: negative, NaN or infinite samples, or float samples above 255.
    """
    kind = f"{values.dtype.itemsize * 8}-bit {'float' if values.dtype.kind == 'f' else 'integer'}"
    if values.size == 0:
        return values.astype(np.uint8), f"{kind} samples (none)"
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            y, x = np.argwhere(~finite)[0][:2]
            raise SampleError(
                f"{np.count_nonzero(~finite):,} {kind} sample(s) are NaN or infinite, the first at pixel (x={x}, y={y})"
            )
    low, high = values.min(), values.max()
    if low < 0:
        raise SampleError(f"{kind} samples go down to {low}; negative samples have no 8-bit reading")
    if values.dtype.kind == "f":
        if high > 255:
            raise SampleError(f"{kind} samples go up to {high}; floats are read in 0..1 or 0..255")
        scale = 255.0 if high <= 1 else 1.0
        out = np.rint(values.astype(np.float64) * scale).astype(np.uint8)
        return out, f"{kind} samples in {low:g}..{high:g}" + (" scaled by 255" if scale != 1 else " taken as 0..255")
    bits = max(8, -(-int(high).bit_length() // 8) * 8)  # whole bytes the largest sample needs
    shift = bits - 8
    out = (values.astype(np.uint64) >> shift).astype(np.uint8)
    if shift == 0:
        return out, f"{kind} samples in {low}..{high} fit 8 bits: taken as they are"
    return out, f"{kind} samples in {low}..{high} read as {bits}-bit, scaled to 8 bits (/{1 << shift:,})"


def _low_bytes(path: Path) -> np.ndarray | None:
    """The low byte of each sample of a 16-bit RGB(A) file, or None where Pillow's decoder names no byte order.

    Pillow decodes 16-bit colour to its high bytes; decoding the same data as the opposite byte order keeps
    the other byte.
    """
    swap = {";16B": ";16L", ";16L": ";16B"}
    with _pixel_limit_off(), Image.open(path) as image:
        tiles = []
        for tile in image.tile:  # (codec, extents, offset, args): a named tuple in recent Pillow, a tuple before
            codec, extents, offset, args = tile[:4]
            rawmode = str(args[0] if isinstance(args, tuple) else args)
            if rawmode[-4:] not in swap:
                return None
            rawmode = rawmode[:-4] + swap[rawmode[-4:]]
            args = (rawmode, *args[1:]) if isinstance(args, tuple) else rawmode
            tiles.append(tile._replace(args=args) if hasattr(tile, "_replace") else (codec, extents, offset, args))
        image.tile = tiles
        image.load()
        return np.array(image)
