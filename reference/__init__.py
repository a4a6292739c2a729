"""ManTraNet in TensorFlow 2 / Keras 3 with the numerics of the official Keras 2.2 / TensorFlow 1.8 code.

The yardstick the PyTorch port is measured against. It reads and writes the official HDF5 layout with
the converter's h5py code (never Keras' ``load_weights``, which fails on these files). Its model code uses no
torch; the converter it reads files with imports torch (for the weight formats it writes), and so does this
package through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converter import identify_keras_file, synthetic_keras_weights
from mantranet_torch.config import ManTraNetConfig, release_config

from .model import LAYERS, ReferenceModel

__all__ = ["LAYERS", "ReferenceModel", "build", "from_keras_arrays", "load"]


def load(path: str | Path, variant: int | None = None) -> ReferenceModel:
    """The reference on an official-layout file (either layout, bytes or str attributes), its release decided as the
    converter decides it: content hash, then file name, then ``variant``.

    Args:
        path: the ``.h5`` file.
        variant: the release 0-4 when the file does not tell.

    Returns:
        The ``ReferenceModel``.

    Raises:
        ConversionError: the file is not an official-layout ManTraNet file; the message says why.
    """
    keras, _, _, config = identify_keras_file(path, variant)
    return ReferenceModel(keras.arrays, config, source=str(path))


def build(variant: int, seed: int = 0) -> ReferenceModel:
    """Release ``variant``'s architecture with seeded, realistically scaled weights.

    Args:
        variant: the release, 0-4.
        seed: the weights' seed.

    Returns:
        The ``ReferenceModel``.
    """
    config = release_config(variant)
    return ReferenceModel(synthetic_keras_weights(config, seed), config, source=f"synthetic weights (seed {seed})")


def from_keras_arrays(arrays: dict[str, np.ndarray], config: ManTraNetConfig, source: str = "arrays") -> ReferenceModel:
    """The reference on arrays already read (a ``converter.Conversion``'s ``keras.arrays``: a parity run reads its
    file once).

    Args:
        arrays: Keras dataset paths (``converter.mapping.MAPPING``'s left column) to arrays.
        config: the release's architecture.
        source: where the arrays came from, for messages.

    Returns:
        The reference model.
    """
    return ReferenceModel(arrays, config, source=source)
