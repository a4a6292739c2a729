"""Ground-truth masks: decoding, the binarisation rule, and the size check against the image."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from mantranet_torch.image_files import SampleError, samples_to_8bit

GREY = "grey"  # ITU-R 601 luma, as Pillow's convert("L") computes it
CHANNELS = {GREY: None, "red": 0, "green": 1, "blue": 2}
DEFAULT_THRESHOLD = 127
MASK_FORMATS = "PNG, TIFF, BMP, GIF, JPEG, WebP, PPM/PGM"


class MaskError(ValueError):
    """A mask that cannot be used; the message names the file and says why."""


@dataclass(frozen=True)
class MaskRule:
    """Which pixels of a mask file are forged: ``channel > threshold``, or ``<= threshold`` when inverted.

    The default (grey > 127) suits masks drawn white on black; benchmarks that draw the forged region
    black (NIST16, DSO-1) invert it, and Columbia marks the spliced region in the green channel. A mask whose
    values are only 0 and 1 (a binary mask saved without scaling) is read as 0 and 255.
    """

    channel: str = GREY
    threshold: int = DEFAULT_THRESHOLD
    inverted: bool = False

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"mask channel {self.channel!r}: choose one of {', '.join(CHANNELS)}")
        if not 0 <= self.threshold <= 255:
            raise ValueError(f"mask threshold {self.threshold}: must lie in 0..255")

    def describe(self) -> str:
        return f"{self.channel} {'<=' if self.inverted else '>'} {self.threshold}"

    def apply(self, values: np.ndarray) -> np.ndarray:
        return values <= self.threshold if self.inverted else values > self.threshold


def decode_mask(data: bytes, name: str, rule: MaskRule) -> np.ndarray:
    """The mask file's bytes as a bool H x W array (True: forged) under ``rule``."""
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as image:
            warnings.simplefilter("ignore")
            image.load()
            channel = CHANNELS[rule.channel]
            values = _grey(image) if channel is None else np.asarray(image.convert("RGB"))[:, :, channel]
    except UnidentifiedImageError:
        raise MaskError(f"{name}: the mask is not an image of a format this tool reads ({MASK_FORMATS})") from None
    except SampleError as e:
        raise MaskError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MaskError(f"{name}: cannot decode the mask as an image ({e})") from None
    if values.max(initial=0) == 1:  # a mask stored as 0 and 1 (not 0 and 255): 1 is the marked class
        values = values * np.uint8(255)
    return rule.apply(values)


def _grey(image: Image.Image) -> np.ndarray:
    if image.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        return np.asarray(image.convert("L"))
    values = np.asarray(image)  # wider greyscale: by the rule images are read by (image_files.SAMPLE_RULE)
    if values.ndim != 2:
        return np.asarray(image.convert("L"))
    return samples_to_8bit(values)[0]


def fit_mask(mask: np.ndarray, height: int, width: int, resize: bool, name: str) -> np.ndarray:
    """The mask at the image's size: as it is, resized by nearest neighbour when ``resize``, else an error."""
    if mask.shape == (height, width):
        return mask
    if not resize:
        raise MaskError(
            f"{name}: the mask is {mask.shape[1]} x {mask.shape[0]} but its image is {width} x {height} "
            "(width x height); pass --resize-masks to resize masks by nearest neighbour"
        )
    return resize_nearest(mask, height, width)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool mask resized by nearest neighbour (Pillow's NEAREST, as for the image geometry)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST)) > 127
