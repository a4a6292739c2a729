"""The files ``mantranet detect`` writes for a forgery map: an 8-bit mask, the raw array, a heat-map overlay."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OVERLAY_OPACITY = 0.5  # of the heat map over the image


def mask_levels(likelihood: np.ndarray) -> np.ndarray:
    """The map as 8-bit levels: ``round(p * 255)``, computed in float64."""
    return np.rint(likelihood.astype(np.float64) * 255.0).clip(0, 255).astype(np.uint8)


def encode_mask(likelihood: np.ndarray) -> bytes:
    return _png(Image.fromarray(mask_levels(likelihood)))


def encode_npy(likelihood: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, likelihood.astype(np.float32, copy=False))
    return buffer.getvalue()


def heat_colours(likelihood: np.ndarray) -> np.ndarray:
    """A blue (0) - cyan - yellow - red (1) colour scale, uint8 H x W x 3 (the classic 'jet' ramps)."""
    p = likelihood.astype(np.float32)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # where red, green and blue peak on a 0..4 scale
    return (np.clip(1.5 - np.abs(4.0 * p - centres), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def overlay(rgb: np.ndarray, likelihood: np.ndarray) -> np.ndarray:
    """The map's heat colours over the image, at ``OVERLAY_OPACITY``.

    Args:
        rgb: the image the model saw, uint8 H x W x 3.
        likelihood: its forgery map, H x W in [0, 1].

    Returns:
        The blend, uint8 H x W x 3.
    """
    blend = (1.0 - OVERLAY_OPACITY) * rgb.astype(np.float32) + OVERLAY_OPACITY * heat_colours(likelihood)
    return (blend + 0.5).astype(np.uint8)


def encode_overlay(rgb: np.ndarray, likelihood: np.ndarray) -> bytes:
    return _png(Image.fromarray(overlay(rgb, likelihood)))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
