"""Small helpers shared by the tests: layouts and official-layout fixture files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converter import convert_h5, synthetic_keras_weights, write_official_h5
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
