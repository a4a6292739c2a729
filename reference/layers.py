"""The official ManTraNet's layers as TensorFlow functions, computing what Keras 2.2 / TensorFlow 1.8 computed.

NHWC tensors, HWIO kernels, float32 throughout. Each Keras 2 behaviour the model relies on is a named
constant or function here, so that no Keras 3 default that happens to differ can slip in.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

BN_EPSILON = 1e-3  # Keras BatchNormalization default epsilon
L2_EPSILON = 1e-12  # tf.nn.l2_normalize clamps the *squared* norm at this value
MIN_STD_VALUE = 1e-5  # GlobalStd2D(min_std_val=1e-5) ...
STD_FLOOR = MIN_STD_VALUE / 10.0  # ... whose clamp is max(std, min_std_val / 10 + min_std)
HARD_SIGMOID_SLOPE = 0.2  # Keras 2: clip(0.2 x + 0.5, 0, 1); Keras 3's 'hard_sigmoid' is x / 6 + 0.5
HARD_SIGMOID_OFFSET = 0.5
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(): the clip of Keras 2's binary cross-entropy
SRM_KERNEL_SIZE = 5
LSTM_FILTERS = 8
LSTM_KERNEL = 7

Activation = Callable[[tf.Tensor], tf.Tensor]


def hard_sigmoid_keras2(x: tf.Tensor) -> tf.Tensor:
    """Keras 2's hard sigmoid, ``clip(0.2 x + 0.5, 0, 1)``: the official cLSTM's recurrent activation."""
    return tf.clip_by_value(HARD_SIGMOID_SLOPE * x + HARD_SIGMOID_OFFSET, 0.0, 1.0)


def keras_binary_crossentropy(prediction: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Keras 2.2's ``binary_crossentropy`` (TensorFlow backend) on probabilities, averaged over every element.

    The prediction is clipped to ``[epsilon, 1 - epsilon]``, turned back into a logit ``log(p / (1 - p))``, and
    given to ``sigmoid_cross_entropy_with_logits``. (tf_keras instead reads the logits off a sigmoid op when it
    can see one, which Keras 2.2 never did.)
    """
    epsilon = tf.constant(KERAS_EPSILON, prediction.dtype)
    p = tf.clip_by_value(prediction, epsilon, 1 - epsilon)
    logits = tf.math.log(p / (1 - p))
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(target, p.dtype), logits=logits))


def symmetric_indices(size: int, pad: int) -> np.ndarray:
    """Source index of each position of a side of ``size`` padded by ``pad``: numpy's periodic 'symmetric' mode."""
    idx = np.arange(-pad, size + pad) % (2 * size)
    return np.where(idx < size, idx, 2 * size - 1 - idx)


def _symmetric_pad_axis(x: tf.Tensor, pad: int, axis: int) -> tf.Tensor:
    size = x.shape[axis]
    if size is None:
        raise ValueError(f"symmetric padding needs a static size along axis {axis}, got shape {x.shape}")
    if pad <= size:  # the only case tf.pad(mode='SYMMETRIC') accepts
        paddings = [[0, 0]] * x.shape.rank
        paddings[axis] = [pad, pad]
        return tf.pad(x, paddings, mode="SYMMETRIC")
    # A side shorter than the pad (a 1-pixel side under the 5x5 b1c1): continue the mirroring periodically.
    return tf.gather(x, symmetric_indices(size, pad), axis=axis)


def symmetric_pad(x: tf.Tensor, pad: int) -> tf.Tensor:
    """Pad H and W of NHWC ``x`` by ``pad`` as ``tf.pad(mode='SYMMETRIC')``: ``[b a | a b c ... y z | z y]``."""
    if pad == 0:
        return x
    return _symmetric_pad_axis(_symmetric_pad_axis(x, pad, 1), pad, 2)


def symmetric_conv2d(
    x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None, activation: Activation | None = None
) -> tf.Tensor:
    """Keras ``Conv2DSymPadding``: symmetric padding of k//2, a 'valid' stride-1 convolution, bias, activation."""
    y = tf.nn.conv2d(symmetric_pad(x, kernel.shape[0] // 2), kernel, strides=1, padding="VALID")
    if bias is not None:
        y = tf.nn.bias_add(y, bias)
    return y if activation is None else activation(y)


def srm_kernel() -> np.ndarray:
    """The nine fixed SRM filters, HWIO (5, 5, 3, 9): output 3*i + c applies SRM filter i to input channel c only.

    Built in float32 and divided there, as the original builds them, so every tap is its float32 quotient.
    """
    srm1 = np.zeros((SRM_KERNEL_SIZE, SRM_KERNEL_SIZE), dtype=np.float32)
    srm1[1:-1, 1:-1] = [[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]
    srm1 /= np.float32(4)
    srm2 = np.array(
        [[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]],
        dtype=np.float32,
    )
    srm2 /= np.float32(12)
    srm3 = np.zeros((SRM_KERNEL_SIZE, SRM_KERNEL_SIZE), dtype=np.float32)
    srm3[2, 1:-1] = [1, -2, 1]
    srm3 /= np.float32(2)
    kernel = np.zeros((SRM_KERNEL_SIZE, SRM_KERNEL_SIZE, 3, 9), dtype=np.float32)
    for i, srm in enumerate((srm1, srm2, srm3)):
        for c in range(3):
            kernel[:, :, c, 3 * i + c] = srm
    return kernel


def combined_kernel(regular_kernel: np.ndarray, bayar_kernel: np.ndarray) -> np.ndarray:
    """b1c1's kernel (Keras ``CombinedConv2D``): regular, SRM and Bayar kernels along the output channels.

    The Bayar kernel is used as stored: its constraint is a training-time step, not part of inference.
    """
    return np.concatenate([regular_kernel, srm_kernel(), bayar_kernel], axis=-1)


def l2_normalize(x: tf.Tensor) -> tf.Tensor:
    """The official ``L2`` layer: ``tf.nn.l2_normalize`` over channels, ``x * rsqrt(max(sum(x^2), 1e-12))``."""
    return tf.math.l2_normalize(x, axis=-1, epsilon=L2_EPSILON)


def inference_batch_norm(x: tf.Tensor, moving_mean: tf.Tensor, moving_variance: tf.Tensor) -> tf.Tensor:
    """Keras 2.2.0 ``BatchNormalization(center=False, scale=False)`` at inference, channel axis -1.

    Keras 2.2.0's backend sends axis -1 to ``tf.nn.batch_normalization`` (``x * inv + (-mean * inv)`` with
    ``inv = rsqrt(var + eps)``); only later versions route it to the fused kernel.
    """
    return tf.nn.batch_normalization(x, moving_mean, moving_variance, None, None, BN_EPSILON)


def global_std(x: tf.Tensor, min_std: tf.Tensor) -> tf.Tensor:
    """Keras ``GlobalStd2D`` (glbStd): Keras 2's ``K.std`` over H and W, clamped below; (N, 1, 1, C)."""
    mean = tf.reduce_mean(x, axis=(1, 2), keepdims=True)
    std = tf.sqrt(tf.reduce_mean(tf.square(x - mean), axis=(1, 2), keepdims=True))
    return tf.maximum(std, STD_FLOOR + min_std)


def integral_image(x: tf.Tensor, pad: int) -> tf.Tensor:
    """Zero-pad H and W by ``pad``, then cumulative sums down and across, in x's dtype (float32 as the original)."""
    padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    return tf.cumsum(tf.cumsum(padded, axis=1), axis=2)


def window_sums(ii: tf.Tensor, k: int, pad: int) -> tf.Tensor:
    """The sum over the k x k window centred on each pixel, from ``integral_image(x, pad)``.

    ``ii[r]`` holds the padded rows 0..r, i.e. the image rows up to ``r - pad``; the window of row y spans
    image rows y - k//2 .. y + k//2, so it is ``ii[y + lo + k] - ii[y + lo]`` with ``lo = pad - 1 - k//2``.
    The slices end at negative offsets, so they take H rows (W columns) whatever the image size.
    """
    lo = pad - 1 - k // 2
    hi = lo + k
    lo_end, hi_end = lo - 2 * pad, hi - 2 * pad  # negative: lo + H and hi + H counted from the padded end
    top_left = ii[:, lo:lo_end, lo:lo_end]
    top_right = ii[:, lo:lo_end, hi:hi_end]
    bottom_right = ii[:, hi:hi_end, hi:hi_end]
    bottom_left = ii[:, hi:hi_end, lo:lo_end]
    return top_left + bottom_right - top_right - bottom_left  # the original's order of float32 operations


def window_means(x: tf.Tensor, window_sizes: tuple[int, ...]) -> list[tf.Tensor]:
    """Mean of x over each k x k window centred on each pixel, counting only in-image pixels.

    The official algorithm: one float32 integral image padded for the largest window serves all windows,
    and the counts come from the integral image of a ones image. Its rounding error grows with the image.
    """
    pad = max(window_sizes) // 2 + 1
    ii = integral_image(x, pad)
    count_ii = integral_image(tf.ones_like(x[:1, :, :, :1]), pad)
    return [window_sums(ii, k, pad) / window_sums(count_ii, k, pad) for k in window_sizes]


def nested_window_deviations(x: tf.Tensor, window_sizes: tuple[int, ...]) -> tf.Tensor:
    """Keras ``NestedWindowAverageFeatExtrator`` (nestedAvgFeatex, minus_original=True): (N, T, H, W, C).

    For each window k the local mean minus x, then the per-image global mean minus x, along a time axis.
    """
    steps = [mean - x for mean in window_means(x, window_sizes)]
    steps.append(tf.reduce_mean(x, axis=(1, 2), keepdims=True) - x)
    return tf.stack(steps, axis=1)


def conv_lstm(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray, time_steps: int, height: int, width: int
) -> keras.layers.ConvLSTM2D:
    """Keras's own ``ConvLSTM2D`` as the official cLSTM, with its weights, built for one H x W.

    Keras 3 builds this layer for one static spatial size only, hence one per input size. The recurrent
    activation is passed explicitly: Keras 3's built-in 'hard_sigmoid' is a different function.
    """
    layer = keras.layers.ConvLSTM2D(
        LSTM_FILTERS,
        (LSTM_KERNEL, LSTM_KERNEL),
        padding="same",
        data_format="channels_last",
        activation="tanh",
        recurrent_activation=hard_sigmoid_keras2,
        return_sequences=False,
        dtype="float32",
    )
    layer.build((None, time_steps, height, width, kernel.shape[2]))
    layer.set_weights([kernel, recurrent_kernel, bias])
    return layer


class ConvGRU2D(keras.layers.Layer):
    """The ConvGRU variant's cGRU as a Keras layer (Keras has no ConvGRU2D): the last hidden state, any H x W.

    Weights as a Keras GRU lays them out (``reset_after=False``): ``kernel`` (k, k, C, 3 units) with ``bias``,
    ``recurrent_kernel`` (k, k, units, 3 units), gates z (update), r (reset), h (candidate) along the last axis.
    Each step: u = hard_sigmoid(x * W_u + b_u + h * U_u), r likewise, c = tanh(x * W_c + b_c + (r h) * U_c),
    h' = (1 - u) h + u c, from a zero state; 'same' zero padding, Keras 2's hard sigmoid. Input (N, T, H, W, C).
    """

    def __init__(self, units: int = LSTM_FILTERS, kernel_size: int = LSTM_KERNEL, **kwargs: object) -> None:
        super().__init__(dtype="float32", **kwargs)
        self.units, self.kernel_size = units, kernel_size

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        k, channels = self.kernel_size, input_shape[-1]
        self.kernel = self.add_weight(shape=(k, k, channels, 3 * self.units), name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(k, k, self.units, 3 * self.units), name="recurrent_kernel")
        self.bias = self.add_weight(shape=(3 * self.units,), initializer="zeros", name="bias")

    def call(self, seq: tf.Tensor) -> tf.Tensor:
        units = self.units
        w_u, w_r, w_c = tf.split(self.kernel, 3, axis=-1)
        b_u, b_r, b_c = tf.split(self.bias, 3)
        u_u, u_r, u_c = tf.split(self.recurrent_kernel, 3, axis=-1)
        h = tf.zeros(tf.concat([tf.shape(seq)[:1], tf.shape(seq)[2:4], [units]], axis=0), dtype=seq.dtype)
        for t in range(seq.shape[1]):  # T is static: one step per window, plus the global mean
            x = seq[:, t]
            u = hard_sigmoid_keras2(conv2d_same(x, w_u, b_u) + conv2d_same(h, u_u))
            r = hard_sigmoid_keras2(conv2d_same(x, w_r, b_r) + conv2d_same(h, u_r))
            c = tf.tanh(conv2d_same(x, w_c, b_c) + conv2d_same(r * h, u_c))
            h = (1.0 - u) * h + u * c
        return h


def conv_gru(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray, time_steps: int, channels: int
) -> ConvGRU2D:
    """The cGRU layer with its weights, built for any spatial size."""
    layer = ConvGRU2D(kernel.shape[-1] // 3, kernel.shape[0], name="cGRU")
    layer.build((None, time_steps, None, None, channels))
    layer.set_weights([kernel, recurrent_kernel, bias])
    return layer


def conv2d_same(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None = None) -> tf.Tensor:
    """Keras ``Conv2D(padding='same')``, stride 1: zero padding, then the bias if any."""
    y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    return y if bias is None else tf.nn.bias_add(y, bias)
