"""Each named layer of a ``ReferenceModel`` as a function of its inputs, for per-layer tests.

``ReferenceModel.trace`` gives every layer's output for an image; per-layer property tests need more: a
layer fed an input drawn for it (near-zero feature vectors, near-constant maps, gate pre-activations at
the hard sigmoid's kinks), which no image reaches on purpose. These functions are the reference's own
layer functions (``reference.layers``) with its own weights (``ReferenceModel.arrays``), wired as
``ReferenceModel.stages`` wires them. NHWC NumPy in and out, float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from reference import ReferenceModel
from reference import layers as tf_layers
from reference.model import FEATEX_CONVS, TRANSFORM_ACTIVATIONS

LayerFn = Callable[..., np.ndarray]


def reference_layers(model: ReferenceModel) -> dict[str, LayerFn]:
    """Every name of ``mantranet_torch.LAYERS`` (and cGRU, the ConvGRU variant's) to a function of that layer's
    inputs (``runner.LAYER_INPUTS``); the recurrent layer the model's arrays do not hold fails when called."""
    a, config = model.arrays, model.config
    w = {path: tf.constant(value) for path, value in a.items()}
    b1c1_kernel = tf.constant(
        tf_layers.combined_kernel(a["Featex/b1c1/regular_kernel:0"], a["Featex/b1c1/bayar_kernel:0"])
    )
    bn_mean, bn_variance = w["bnorm/bnorm/moving_mean:0"], w["bnorm/bnorm/moving_variance:0"]

    def featex_conv(name: str, activation: Callable | None) -> LayerFn:
        kernel, bias = w[f"Featex/{name}/kernel:0"], w[f"Featex/{name}/bias:0"]
        return _numpy(lambda x: tf_layers.symmetric_conv2d(x, kernel, bias, activation))

    def clstm(seq: tf.Tensor) -> tf.Tensor:
        layer = tf_layers.conv_lstm(
            a["cLSTM/cLSTM/kernel:0"],
            a["cLSTM/cLSTM/recurrent_kernel:0"],
            a["cLSTM/cLSTM/bias:0"],
            seq.shape[1],
            seq.shape[2],
            seq.shape[3],
        )
        return layer(seq)

    def cgru(seq: tf.Tensor) -> tf.Tensor:
        kernel = a["cGRU/cGRU/kernel:0"]
        recurrent = a["cGRU/cGRU/recurrent_kernel:0"]
        layer = tf_layers.conv_gru(kernel, recurrent, a["cGRU/cGRU/bias:0"], seq.shape[1], kernel.shape[2])
        return layer(seq)

    layers: dict[str, LayerFn] = {
        "b1c1": _numpy(lambda x: tf_layers.symmetric_conv2d(x, b1c1_kernel, activation=tf.nn.relu)),
        **{name: featex_conv(name, tf.nn.relu) for name in FEATEX_CONVS},
        "transform": featex_conv("transform", TRANSFORM_ACTIVATIONS[config.transform_activation]),
        "L2": _numpy(tf_layers.l2_normalize),
        "outlierTrans": _numpy(lambda x: tf_layers.conv2d_same(x, w["outlierTrans/outlierTrans/kernel:0"])),
        "bnorm": _numpy(lambda x: tf_layers.inference_batch_norm(x, bn_mean, bn_variance)),
        "glbStd": _numpy(lambda x: tf_layers.global_std(x, w["glbStd/glbStd/min_std:0"])),
        "nestedAvgFeatex": _numpy(lambda x: tf_layers.nested_window_deviations(x, config.window_sizes)),
        "divStd": _numpy(lambda dev, sigma: tf.abs(dev / sigma[:, None])),
        "cLSTM": _numpy(clstm),
        "cGRU": _numpy(cgru),
        "pred": _numpy(lambda h: tf.sigmoid(tf_layers.conv2d_same(h, w["pred/pred/kernel:0"], w["pred/pred/bias:0"]))),
    }
    return layers


def _numpy(fn: Callable[..., tf.Tensor]) -> LayerFn:
    def call(*inputs: np.ndarray) -> np.ndarray:
        return fn(*(tf.constant(np.asarray(a, dtype=np.float32)) for a in inputs)).numpy()

    return call
