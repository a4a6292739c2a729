"""Weights that travel the real path, written once per (release, seed, variant) for the parity suite.

Keras arrays -> official-layout HDF5 file -> ``converter.convert_h5`` -> PyTorch, and the reference loads
the same file with ``reference.load``; the float64 oracle takes the arrays the reference read back.
Writing and reading a file per hypothesis example would dominate the suite's time, so each file is
written once per session and examples draw their seeds from a small set (``SEEDS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import reference
from converter import FULL_MODEL, WEIGHTS_ONLY, convert_h5, synthetic_keras_weights, write_official_h5
from mantranet_torch import RELEASES, ManTraNet
from mantranet_torch.weights import model_from_state_dict
from parity_tests.oracle import Oracle
from parity_tests.reference_layers import reference_layers
from parity_tests.runner import torch_layers
from parity_tests.shared_data import ABSENT, OFFICIAL_CODE, SAMPLES, SEED_PORT_DETECTOR, SHARED  # noqa: F401

if TYPE_CHECKING:
    from reference.official import OfficialModel

SEEDS = (0, 1, 2)


def official_code_missing() -> str | None:
    """Why the tests that run the original code cannot run here, or None when they can."""
    if not OFFICIAL_CODE.is_file():
        return f"the official modelCore.py not found at {OFFICIAL_CODE} {ABSENT}"
    try:
        import tf_keras  # noqa: F401
    except ImportError:
        return "tf_keras (the reference extra) is not installed"
    return None


ArrayEdit = Callable[[dict[str, np.ndarray], np.random.Generator], None]


def _unconstrained_bayar(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """A Bayar kernel that breaks its constraint: re-applying the constraint in forward then changes it."""
    arrays["Featex/b1c1/bayar_kernel:0"] = rng.normal(0.0, 0.3, arrays["Featex/b1c1/bayar_kernel:0"].shape)


def _tiny_features(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """transform scaled by 1e-9: feature vectors of squared norm far below L2's epsilon 1e-12."""
    for name in ("kernel:0", "bias:0"):
        arrays[f"Featex/transform/{name}"] = arrays[f"Featex/transform/{name}"] * np.float32(1e-9)


def _strong_min_std(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """min_std of the order of the bnorm outputs' stds, so the glbStd clamp is active on some channels."""
    arrays["glbStd/glbStd/min_std:0"] = rng.uniform(0.0, 0.3, arrays["glbStd/glbStd/min_std:0"].shape)


VARIANTS: dict[str, ArrayEdit | None] = {
    "synthetic": None,
    "unconstrained_bayar": _unconstrained_bayar,
    "tiny_features": _tiny_features,
    "strong_min_std": _strong_min_std,
}


@dataclass
class Weights:
    """One official-layout file and both frameworks (and the oracle) loaded from it."""

    release: int
    seed: int
    path: Path
    reference: reference.ReferenceModel
    model: ManTraNet

    @cached_property
    def oracle(self) -> Oracle:
        return Oracle(self.reference.arrays, self.reference.config)

    @cached_property
    def official(self) -> OfficialModel:
        """The official code (``OFFICIAL_CODE``) under tf_keras, loading the same file, float32."""
        from reference.official import OfficialModel, find_official_code

        return OfficialModel(find_official_code(OFFICIAL_CODE), self.path)

    @cached_property
    def official64(self) -> OfficialModel:
        """The same in float64: the exact answer when the official code is the reference."""
        from reference.official import OfficialModel, find_official_code

        return OfficialModel(find_official_code(OFFICIAL_CODE), self.path, dtype="float64")

    @cached_property
    def reference_layers(self) -> dict:
        return reference_layers(self.reference)

    @cached_property
    def torch_layers(self) -> dict:
        return torch_layers(self.model)


def load_both(path: Path) -> tuple[reference.ReferenceModel, ManTraNet]:
    """The reference and the PyTorch model from one official-layout file, each by its own loader."""
    conversion = convert_h5(path)
    return reference.load(path), model_from_state_dict(conversion.state_dict, conversion.config, str(path))


class WeightStore:
    """Writes each (release, seed, variant) file once; layouts and attribute types vary with the seed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple[int, int, str], Weights] = {}

    def get(self, release: int, seed: int = 0, variant: str = "synthetic") -> Weights:
        key = (release, seed, variant)
        if key not in self._cache:
            config = RELEASES[release]
            rng = np.random.default_rng(seed + 1000)
            arrays = synthetic_keras_weights(config, seed)
            edit = VARIANTS[variant]
            if edit is not None:
                edit(arrays, rng)
            folder = self.root / f"seed{seed}-{variant}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"ManTraNet_Ptrain{release}.h5"  # identified by its name, as a user's copy would be
            layout = FULL_MODEL if seed % 2 else WEIGHTS_ONLY
            write_official_h5(path, {k: v.astype(np.float32) for k, v in arrays.items()}, config, layout, seed == 2)
            ref, model = load_both(path)
            self._cache[key] = Weights(release, seed, path, ref, model)
        return self._cache[key]
