"""ManTraNet in TensorFlow from the official Keras arrays: every named layer's output, and compiled inference.

The ConvGRU variant (``ManTraNetConfig(recurrent="gru")``) runs too, from its Keras-layout arrays
(``converter.mapping.mapping(config)``): its cGRU is ``layers.ConvGRU2D`` where the official model has cLSTM.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from converter import write_official_h5
from converter.keras_h5 import WEIGHTS_ONLY
from converter.mapping import check_keras_arrays, keras_shapes
from mantranet_torch.config import ManTraNetConfig
from mantranet_torch.files import publish, staged_path

from .layers import (
    combined_kernel,
    conv2d_same,
    conv_gru,
    conv_lstm,
    global_std,
    inference_batch_norm,
    l2_normalize,
    nested_window_deviations,
    symmetric_conv2d,
)

FEATEX_CONVS = ("b1c2", "b2c1", "b2c2", "b3c1", "b3c2", "b3c3", "b4c1", "b4c2", "b4c3", "b5c1", "b5c2")
FEATEX_LAYERS = ("b1c1", *FEATEX_CONVS, "transform", "L2")
DETECTOR_LAYERS = ("outlierTrans", "bnorm", "glbStd", "nestedAvgFeatex", "divStd", "cLSTM", "pred")
LAYERS = FEATEX_LAYERS + DETECTOR_LAYERS  # every traced output, in network order, by Keras name
RECURRENT_LAYERS = {"lstm": "cLSTM", "gru": "cGRU"}  # by ManTraNetConfig.recurrent


def layer_names(config: ManTraNetConfig) -> tuple[str, ...]:
    """Every traced output for ``config`` in network order: ``LAYERS``, with cGRU for the ConvGRU variant."""
    recurrent = RECURRENT_LAYERS[config.recurrent]
    return tuple(recurrent if name == "cLSTM" else name for name in LAYERS)


TRANSFORM_ACTIVATIONS = {None: None, "tanh": tf.tanh}


class ReferenceModel:
    """The official ManTraNet, evaluated by TensorFlow with Keras 2.2 numerics, from Keras-layout arrays.

    ``predict`` compiles one graph per input height and width (batch sizes share it); ``trace`` runs
    eagerly and returns every named layer's output.
    """

    def __init__(self, arrays: dict[str, np.ndarray], config: ManTraNetConfig, source: str = "arrays") -> None:
        check_keras_arrays(arrays, config, source)
        self.config = config
        self.source = source
        # float32 copies, as Keras' set_weights stores them, in the official table's order
        self.arrays = {path: np.array(arrays[path], dtype=np.float32) for path in keras_shapes(config)}
        self._w = {path: tf.constant(value) for path, value in self.arrays.items()}
        self._b1c1_kernel = tf.constant(
            combined_kernel(self.arrays["Featex/b1c1/regular_kernel:0"], self.arrays["Featex/b1c1/bayar_kernel:0"])
        )
        self._clstm_layers: dict[tuple[int, int], keras.layers.ConvLSTM2D] = {}
        self._cgru = None
        if config.recurrent == "gru":  # one layer for every size, built here: never inside a traced graph
            a = self.arrays
            kernel = a["cGRU/cGRU/kernel:0"]
            recurrent = a["cGRU/cGRU/recurrent_kernel:0"]
            self._cgru = conv_gru(kernel, recurrent, a["cGRU/cGRU/bias:0"], config.time_steps, kernel.shape[2])
        self._compiled: dict[tuple[int, int], tf.types.experimental.PolymorphicFunction] = {}

    def _clstm(self, height: int, width: int) -> keras.layers.ConvLSTM2D:
        """The cLSTM layer for this spatial size, built (eagerly) on first use with the model's weights."""
        layer = self._clstm_layers.get((height, width))
        if layer is None:
            a = self.arrays
            layer = conv_lstm(
                a["cLSTM/cLSTM/kernel:0"],
                a["cLSTM/cLSTM/recurrent_kernel:0"],
                a["cLSTM/cLSTM/bias:0"],
                self.config.time_steps,
                height,
                width,
            )
            self._clstm_layers[(height, width)] = layer
        return layer

    def stages(self, x: tf.Tensor) -> Iterator[tuple[str, tf.Tensor]]:
        """Each named layer's output in network order, keyed by its Keras name (``layer_names(config)``), NHWC."""
        w = self._w
        x = symmetric_conv2d(x, self._b1c1_kernel, activation=tf.nn.relu)
        yield "b1c1", x
        for name in FEATEX_CONVS:
            x = symmetric_conv2d(x, w[f"Featex/{name}/kernel:0"], w[f"Featex/{name}/bias:0"], tf.nn.relu)
            yield name, x
        activation = TRANSFORM_ACTIVATIONS[self.config.transform_activation]
        x = symmetric_conv2d(x, w["Featex/transform/kernel:0"], w["Featex/transform/bias:0"], activation)
        yield "transform", x
        x = l2_normalize(x)
        yield "L2", x
        x = conv2d_same(x, w["outlierTrans/outlierTrans/kernel:0"])
        yield "outlierTrans", x
        x = inference_batch_norm(x, w["bnorm/bnorm/moving_mean:0"], w["bnorm/bnorm/moving_variance:0"])
        yield "bnorm", x
        sigma = global_std(x, w["glbStd/glbStd/min_std:0"])
        yield "glbStd", sigma
        dev = nested_window_deviations(x, self.config.window_sizes)
        yield "nestedAvgFeatex", dev
        dev = tf.abs(dev / sigma[:, None])  # the official expTime then divStd
        yield "divStd", dev
        if self._cgru is not None:
            h = self._cgru(dev)
            yield "cGRU", h
        else:
            h = self._clstm(x.shape[1], x.shape[2])(dev)
            yield "cLSTM", h
        yield "pred", tf.sigmoid(conv2d_same(h, w["pred/pred/kernel:0"], w["pred/pred/bias:0"]))

    def _forward(self, x: tf.Tensor) -> tf.Tensor:
        out = None
        for _, out in self.stages(x):  # noqa: B007
            pass
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """N x H x W x 3 inputs scaled to [-1, 1] to N x H x W x 1 forgery likelihoods (float32 numpy)."""
        x = _as_input(x)
        height, width = x.shape[1:3]
        fn = self._compiled.get((height, width))
        if fn is None:
            if self._cgru is None:
                self._clstm(height, width)  # Keras creates its variables here, never inside the traced graph
            spec = tf.TensorSpec((None, height, width, 3), tf.float32)
            # A partial per size: TensorFlow then counts each size's function apart and does not warn of
            # "excessive retracing", as each is traced exactly once.
            fn = tf.function(functools.partial(ReferenceModel._forward, self), input_signature=[spec])
            self._compiled[(height, width)] = fn
        return fn(tf.constant(x)).numpy()

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every named layer's output (eagerly; memory grows with the image: meant for small inputs)."""
        return {name: out.numpy() for name, out in self.stages(tf.constant(_as_input(x)))}

    def save_h5(self, path: str | Path, layout: str = WEIGHTS_ONLY, str_attrs: bool = False) -> None:
        """Write the weights as an official-layout HDF5 file, atomically (an existing file is replaced whole)."""
        target = Path(path)
        with staged_path(target) as tmp:
            write_official_h5(tmp, self.arrays, self.config, layout=layout, str_attrs=str_attrs)
            publish(tmp, target, force=True)


def _as_input(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[3] != 3 or min(x.shape[:3]) < 1:
        raise ValueError(f"expected a non-empty N x H x W x 3 array scaled to [-1, 1], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected floating-point input scaled to [-1, 1], got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)
