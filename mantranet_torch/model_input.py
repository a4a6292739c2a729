"""Turning images into model inputs: the one place where pixels are scaled."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageLike = np.ndarray | Image.Image | Tensor


def scale_pixels(rgb: Tensor) -> Tensor:
    """uint8 RGB to the model's float32 range [-1, 1], as the official demo does: ``x / 255 * 2 - 1``.

    Kept in this operation order, in float32, so inputs match the original bit for bit.

    Args:
        rgb: uint8 pixel values, any shape.

    Returns:
        The same shape in float32, in [-1, 1].
    """
    return rgb.to(torch.float32) / 255.0 * 2.0 - 1.0


def to_model_input(image: ImageLike) -> Tensor:
    """A float32 N x 3 x H x W tensor in [-1, 1] from any accepted image form.

    Args:
        image: a uint8 H x W x 3 array, an RGB PIL image, a uint8 N x 3 x H x W tensor (all scaled here), or a
            floating N x 3 x H x W tensor taken as already scaled.

    Returns:
        The model's input.

    Raises:
        ValueError: another shape, dtype or PIL mode, or an empty image.
        TypeError: neither an array, a PIL image nor a tensor.
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got PIL mode {image.mode!r}; convert it with .convert('RGB')")
        image = np.array(image)  # a writable copy: PIL hands out read-only buffers
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 H x W x 3 array, got {image.dtype} array of shape {image.shape}")
        if not image.flags.writeable:  # e.g. np.asarray(pil_image); torch wants a buffer it may write
            image = image.copy()
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a numpy array, PIL image or tensor, got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an N x 3 x H x W tensor, got shape {tuple(image.shape)}")
    if min(image.shape[2:]) < 1:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return scale_pixels(image)
    if image.is_floating_point():
        return image
    raise ValueError(f"expected a uint8 or floating tensor, got {image.dtype}")
