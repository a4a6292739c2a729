"""Seeded, plausibly scaled ManTraNet weights in the Keras layout, for fixtures and demos.

Kernels are He-scaled so activations neither vanish nor explode through the 13 convolutions, the
Bayar kernel satisfies its constraint as trained files do, and the detector's statistics are of
the order of real ones (min_std mostly zero, as in the earlier port's trained checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mantranet_torch import RELEASES, ManTraNetConfig
from mantranet_torch.files import publish, staged_path

from .convert import write_official_h5
from .mapping import keras_shapes


def synthetic_keras_weights(config: ManTraNetConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for path, shape in keras_shapes(config).items():
        name = path.rsplit("/", 1)[-1]
        if name in ("kernel:0", "regular_kernel:0", "recurrent_kernel:0"):
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name == "bayar_kernel:0":
            value = _bayar(rng.uniform(0.0, 1.0, shape))
        elif name in ("bias:0", "moving_mean:0"):
            value = rng.normal(0.0, 0.05, shape)
        elif name == "moving_variance:0":
            value = rng.uniform(0.01, 0.2, shape)
        elif name == "min_std:0":
            value = np.where(rng.uniform(size=shape) < 0.8, 0.0, rng.uniform(0.0, 0.02, shape))
        else:
            raise AssertionError(f"no synthetic rule for {path}")
        out[path] = value.astype(np.float32)
    return out


def _bayar(kernel: np.ndarray) -> np.ndarray:
    """The Bayar constraint on an HWIO kernel: centre -1, the other taps of each (in, out) pair sum to 1."""
    kh, kw = kernel.shape[:2]
    kernel = kernel.copy()
    kernel[kh // 2, kw // 2] = 0.0
    kernel /= kernel.sum(axis=(0, 1), keepdims=True)
    kernel[kh // 2, kw // 2] = -1.0
    return kernel


def write_standin(path: str | Path, release: int = 4, seed: int = 0) -> Path:
    """A stand-in for an official file where it cannot be downloaded: release ``release``'s architecture with
    seeded weights (``synthetic_keras_weights``), in the official layout, written atomically (replacing ``path``).
    Conversion, parity and detection run on it for real; its forgery map means nothing.

    Args:
        path: the ``.h5`` file to write (its folder must exist).
        release: the official release whose architecture it has (0-4).
        seed: the weights' seed.

    Returns:
        ``path``. Identify it with ``variant=release``: its content is no official file's.
    """
    path, config = Path(path), RELEASES[release]
    with staged_path(path) as tmp:
        write_official_h5(tmp, synthetic_keras_weights(config, seed), config)
        publish(tmp, path, force=True)
    return path
