"""Small helpers shared by the tests: layouts and official-layout fixture files."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from converter import convert_h5, keras_to_torch, synthetic_keras_weights, write_official_h5
from mantranet_torch import RELEASES, ManTraNet
from mantranet_torch.weights import model_from_state_dict
from parity_tests.shared_data import SAMPLES, SHARED  # noqa: F401 (the tests' one place for ../shared)
from parity_tests.shared_data import SEED_PORT_DETECTOR as SEED_PORT  # noqa: F401


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW (or N,T,C,H,W) torch output as a float64 NHWC (N,T,H,W,C) array, the Keras layout."""
    a = t.detach().double().numpy()
    return a.transpose(0, 1, 3, 4, 2) if a.ndim == 5 else a.transpose(0, 2, 3, 1)


def official_file(path: Path, release: int, seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    """Write an official-layout file for ``release`` with seeded weights; returns its Keras arrays."""
    arrays = synthetic_keras_weights(RELEASES[release], seed)
    write_official_h5(path, arrays, RELEASES[release], **kwargs)
    return arrays


def converted_model(path: Path, variant: int | None = None) -> ManTraNet:
    conversion = convert_h5(path, variant)
    return model_from_state_dict(conversion.state_dict, conversion.config, str(path))


@functools.cache
def synthetic_model(release: int, seed: int | None = None) -> ManTraNet:
    """Release ``release``'s model in eval mode with seeded synthetic weights (seed: the release's index unless
    given), built once per session: callers only run it."""
    config = RELEASES[release]
    model = ManTraNet(config)
    model.load_state_dict(
        keras_to_torch(synthetic_keras_weights(config, release if seed is None else seed), config, "synthetic")
    )
    return model.eval()


@functools.cache
def downscaled_photo() -> np.ndarray:
    """A real photograph (the shared original I45_2zzbvc.jpg, a sixth of its size), or 200 x 200 pixels of seeded
    noise when the shared samples are absent. Callers get the same array: they copy before changing it."""
    path = SAMPLES / "original" / "I45_2zzbvc.jpg"
    if not path.exists():
        return np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    photo = Image.open(path).convert("RGB")
    return np.array(photo.resize((photo.width // 6, photo.height // 6), Image.BILINEAR))
