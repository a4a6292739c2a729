"""The one mapping between the official Keras weight file and the PyTorch state dict.

Each row: Keras dataset path (layer group / weight name), PyTorch key, and the layout change between
them. Keras kernels are HWIO (kh, kw, in, out); PyTorch's are OIHW. The ConvLSTM keeps Keras' split
into ``kernel`` (input to state) and ``recurrent_kernel`` (state to state), gates i, f, c, o along
the output channels. The nine SRM kernels of b1c1 are constants in both frameworks and stored in
neither file.

The ConvGRU variant (``ManTraNetConfig(recurrent="gru")``) has no official file; ``mapping(config)`` gives its
table, the official one with the cLSTM rows replaced by those of a Keras-layout ``cGRU`` layer (gates z, r, h
as Keras' GRU orders them). The TensorFlow reference and the float64 oracle read that layout; ``torch_to_keras``
and the official files stay the ConvLSTM's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from mantranet_torch import RELEASES, ManTraNetConfig
from mantranet_torch.files import listing
from mantranet_torch.weights import WeightFileError, check_weight_values, state_shapes

from .errors import ConversionError


@dataclass(frozen=True)
class Transform:
    """A layout change and its inverse, both as pure NumPy functions."""

    name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_keras: Callable[[np.ndarray], np.ndarray]


AS_IS = Transform("as is", lambda a: a, lambda a: a)
HWIO_TO_OIHW = Transform("HWIO -> OIHW", lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0))
FLATTEN = Transform("(1, 1, 1, C) -> (C,)", lambda a: a.reshape(-1), lambda a: a.reshape(1, 1, 1, -1))

# fmt: off
MAPPING: tuple[tuple[str, str, Transform], ...] = (
    # Keras dataset path                     PyTorch state-dict key                 layout change
    ("Featex/b1c1/regular_kernel:0",         "featex.b1c1.regular_kernel",          HWIO_TO_OIHW),
    ("Featex/b1c1/bayar_kernel:0",           "featex.b1c1.bayar_kernel",            HWIO_TO_OIHW),
    ("Featex/b1c2/kernel:0",                 "featex.b1c2.weight",                  HWIO_TO_OIHW),
    ("Featex/b1c2/bias:0",                   "featex.b1c2.bias",                    AS_IS),
    ("Featex/b2c1/kernel:0",                 "featex.b2c1.weight",                  HWIO_TO_OIHW),
    ("Featex/b2c1/bias:0",                   "featex.b2c1.bias",                    AS_IS),
    ("Featex/b2c2/kernel:0",                 "featex.b2c2.weight",                  HWIO_TO_OIHW),
    ("Featex/b2c2/bias:0",                   "featex.b2c2.bias",                    AS_IS),
    ("Featex/b3c1/kernel:0",                 "featex.b3c1.weight",                  HWIO_TO_OIHW),
    ("Featex/b3c1/bias:0",                   "featex.b3c1.bias",                    AS_IS),
    ("Featex/b3c2/kernel:0",                 "featex.b3c2.weight",                  HWIO_TO_OIHW),
    ("Featex/b3c2/bias:0",                   "featex.b3c2.bias",                    AS_IS),
    ("Featex/b3c3/kernel:0",                 "featex.b3c3.weight",                  HWIO_TO_OIHW),
    ("Featex/b3c3/bias:0",                   "featex.b3c3.bias",                    AS_IS),
    ("Featex/b4c1/kernel:0",                 "featex.b4c1.weight",                  HWIO_TO_OIHW),
    ("Featex/b4c1/bias:0",                   "featex.b4c1.bias",                    AS_IS),
    ("Featex/b4c2/kernel:0",                 "featex.b4c2.weight",                  HWIO_TO_OIHW),
    ("Featex/b4c2/bias:0",                   "featex.b4c2.bias",                    AS_IS),
    ("Featex/b4c3/kernel:0",                 "featex.b4c3.weight",                  HWIO_TO_OIHW),
    ("Featex/b4c3/bias:0",                   "featex.b4c3.bias",                    AS_IS),
    ("Featex/b5c1/kernel:0",                 "featex.b5c1.weight",                  HWIO_TO_OIHW),
    ("Featex/b5c1/bias:0",                   "featex.b5c1.bias",                    AS_IS),
    ("Featex/b5c2/kernel:0",                 "featex.b5c2.weight",                  HWIO_TO_OIHW),
    ("Featex/b5c2/bias:0",                   "featex.b5c2.bias",                    AS_IS),
    ("Featex/transform/kernel:0",            "featex.transform.weight",             HWIO_TO_OIHW),
    ("Featex/transform/bias:0",              "featex.transform.bias",               AS_IS),
    ("outlierTrans/outlierTrans/kernel:0",   "detector.outlier_trans.weight",       HWIO_TO_OIHW),
    ("bnorm/bnorm/moving_mean:0",            "detector.bnorm.moving_mean",          AS_IS),
    ("bnorm/bnorm/moving_variance:0",        "detector.bnorm.moving_variance",      AS_IS),
    ("glbStd/glbStd/min_std:0",              "detector.glb_std.min_std",            FLATTEN),
    ("cLSTM/cLSTM/kernel:0",                 "detector.clstm.kernel",               HWIO_TO_OIHW),
    ("cLSTM/cLSTM/recurrent_kernel:0",       "detector.clstm.recurrent_kernel",     HWIO_TO_OIHW),
    ("cLSTM/cLSTM/bias:0",                   "detector.clstm.bias",                 AS_IS),
    ("pred/pred/kernel:0",                   "detector.pred.weight",                HWIO_TO_OIHW),
    ("pred/pred/bias:0",                     "detector.pred.bias",                  AS_IS),
)
# fmt: on

# The ConvGRU variant's rows, in place of the cLSTM's (no official file: the layout a Keras cGRU layer would have)
GRU_ROWS: tuple[tuple[str, str, Transform], ...] = (
    ("cGRU/cGRU/kernel:0",                   "detector.cgru.kernel",                HWIO_TO_OIHW),
    ("cGRU/cGRU/recurrent_kernel:0",         "detector.cgru.recurrent_kernel",      HWIO_TO_OIHW),
    ("cGRU/cGRU/bias:0",                     "detector.cgru.bias",                  AS_IS),
)  # fmt: skip
LSTM_ROWS = tuple(row for row in MAPPING if row[0].startswith("cLSTM/"))


def mapping(config: ManTraNetConfig) -> tuple[tuple[str, str, Transform], ...]:
    """The table for ``config``: ``MAPPING`` for the official ConvLSTM, with the ``GRU_ROWS`` for the variant."""
    if config.recurrent == "lstm":
        return MAPPING
    first = MAPPING.index(LSTM_ROWS[0])  # the cGRU rows take the cLSTM's place, between glbStd and pred
    return MAPPING[:first] + GRU_ROWS + MAPPING[first + len(LSTM_ROWS) :]


# The official model's layers in file order; those without weights still have (empty) groups.
KERAS_LAYER_NAMES = (
    "img_in", "Featex", "outlierTrans", "bnorm", "glbStd", "nestedAvgFeatex", "expTime", "divStd", "cLSTM", "pred",
)  # fmt: skip
FEATEX_LAYER = "Featex"
REGULAR_KERNEL = "Featex/b1c1/regular_kernel:0"
# The official loader freezes Featex's first five layers (input, b1c1, b1c2, b2c1, b2c2) for the
# four-window releases, and Keras 2 then lists their weights after the trainable ones.
FROZEN_FEATEX_LAYERS = ("b1c1", "b1c2", "b2c1", "b2c2")


def torch_shapes(config: ManTraNetConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of a model with ``config``, built without allocating weights."""
    return dict(state_shapes(config))


def keras_shapes(config: ManTraNetConfig) -> dict[str, tuple[int, ...]]:
    """The shape each Keras array must have for ``config``, derived from the model through the table."""
    shapes = torch_shapes(config)
    return {
        path: transform.to_keras(np.empty(shapes[key], dtype=np.float32)).shape
        for path, key, transform in mapping(config)
    }


def check_keras_shapes(shapes: Mapping[str, tuple[int, ...]], config: ManTraNetConfig, source: str) -> None:
    """Every array of ``config`` present, nothing else, every shape right; else ConversionError.

    Takes shapes only, so that a file's declared shapes are checked before its data is read."""
    expected = keras_shapes(config)
    problems = [f"missing array {p} (expected shape {expected[p]})" for p in expected if p not in shapes]
    problems += [f"unexpected array {p} with shape {tuple(shapes[p])}" for p in shapes if p not in expected]
    for path, shape in expected.items():
        if path in shapes and tuple(shapes[path]) != shape:
            layer, name = path.split("/", 1)
            problems.append(f"layer {layer}, array {name}: expected shape {shape}, found {tuple(shapes[path])}")
    if problems:
        raise ConversionError(f"{source}: does not match ManTraNet {_describe(config)}: {listing(problems)}")


def check_declared_sizes(arrays: Mapping[str, np.ndarray | h5py.Dataset], source: str) -> None:
    """No array larger than ManTraNet's largest (of any release): what a file declares is checked before its
    data is read, so that a huge declared shape is never allocated."""
    limit = max(math.prod(shape) for config in RELEASES.values() for shape in keras_shapes(config).values())
    for key, array in arrays.items():
        if math.prod(array.shape) > limit:
            raise ConversionError(
                f"{source}: array {key} declares shape {tuple(array.shape)}, larger than any array of ManTraNet "
                f"({limit:,} values)"
            )


def check_keras_arrays(arrays: dict[str, np.ndarray], config: ManTraNetConfig, source: str) -> None:
    """Every array of ``config`` present, nothing else, every shape right, every value valid; else ConversionError."""
    keras_to_torch(arrays, config, source)


def keras_to_torch(arrays: dict[str, np.ndarray], config: ManTraNetConfig, source: str) -> dict[str, torch.Tensor]:
    """The strict mapping: every array lands, nothing is left over, every shape fits, every value is valid
    (``check_weight_values``: finite in float32, variances >= 0)."""
    check_keras_shapes({k: v.shape for k, v in arrays.items()}, config, source)
    try:
        check_weight_values(arrays, source, {path: f"array {path}" for path in arrays})
    except WeightFileError as e:
        raise ConversionError(str(e)) from None
    return {
        key: torch.from_numpy(np.ascontiguousarray(transform.to_torch(arrays[path]), dtype=np.float32))
        for path, key, transform in mapping(config)
    }


def torch_to_keras(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse mapping, for writing official-layout files. Keys must match the table exactly."""
    keys = {key for _, key, _ in MAPPING}
    if set(state) != keys:
        missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
        raise ConversionError(f"state dict does not match ManTraNet: missing {missing}, unexpected {unexpected}")
    return {
        path: np.ascontiguousarray(transform.to_keras(state[key].detach().cpu().float().numpy()))
        for path, key, transform in MAPPING
    }


def official_layers(
    arrays: dict[str, np.ndarray], frozen_first_layers: bool
) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Group Keras arrays into the official file's layers, in the order the official loader reads them.

    ``frozen_first_layers``: list b1c1 .. b2c2 after the other Featex weights, as Keras 2 saves a
    Featex whose first layers are frozen (the four-window releases).
    """
    layers: dict[str, list[tuple[str, np.ndarray]]] = {name: [] for name in KERAS_LAYER_NAMES}
    for path, _, _ in MAPPING:
        layer, name = path.split("/", 1)
        layers[layer].append((name, arrays[path]))
    if frozen_first_layers:
        featex = layers[FEATEX_LAYER]
        frozen = [w for w in featex if w[0].split("/")[0] in FROZEN_FEATEX_LAYERS]
        layers[FEATEX_LAYER] = [w for w in featex if w[0].split("/")[0] not in FROZEN_FEATEX_LAYERS] + frozen
    return list(layers.items())


def check_official_layout(config: ManTraNetConfig, source: str) -> None:
    """ConversionError unless ``config`` has an official Keras layout: the ConvGRU variant has none."""
    if config.recurrent != "lstm":
        raise ConversionError(
            f"{source}: a ConvGRU model (recurrent={config.recurrent!r}) has no official Keras layout: the original "
            "code builds the ConvLSTM only, and could not load such a file; export-keras takes ConvLSTM models"
        )


def uses_frozen_order(config: ManTraNetConfig) -> bool:
    """Whether the official loader builds this variant with Featex's first layers frozen (four windows)."""
    return len(config.window_sizes) == 4


def _describe(config: ManTraNetConfig) -> str:
    return f"with {config.first_block_filters} first-block filters"
