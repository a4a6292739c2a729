"""The backward pass of each custom piece of the model, against finite differences in float64 and against
TensorFlow's own gradient of the reference's statement of the same piece (float32, as Keras 2 computes it).

Pieces: training-mode bnorm (batch statistics), Keras 2's hard sigmoid at and around its clip points (+-2.5),
the ConvLSTM through its time steps, the nested window means, glbStd with its clamp, symmetric padding. Each
property draws a small input, an upstream gradient and (where the piece has them) weights, and checks the
vector-Jacobian product: ``torch.autograd.gradcheck`` in float64 (central finite differences, its own
tolerances), and PyTorch float32 against ``tf.GradientTape`` on ``reference.layers`` / tf_keras.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference.layers as tf_layers
from mantranet_torch.layers import (
    BN_EPSILON,
    ConvLSTM2d,
    GlobalStd,
    KerasBatchNorm,
    WindowDeviations,
    hard_sigmoid_keras2,
    symmetric_pad,
)
from parity_tests.profiles import examples

# float32 VJPs of a few hundred terms each, of order 1: the two frameworks sum in different orders.
F32_ATOL = 2e-5
F32_RTOL = 1e-4


def _tf_vjp(fn, inputs: list[np.ndarray], upstream: np.ndarray) -> list[np.ndarray]:
    tensors = [tf.constant(a, tf.float32) for a in inputs]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = fn(*tensors)
    return [np.asarray(g) for g in tape.gradient(out, tensors, output_gradients=tf.constant(upstream, tf.float32))]


def _torch_vjp(fn, inputs: list[np.ndarray], upstream: np.ndarray) -> list[np.ndarray]:
    tensors = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in inputs]
    out = fn(*tensors)
    return [g.numpy() for g in torch.autograd.grad(out, tensors, torch.tensor(upstream, dtype=torch.float32))]


def _nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _gradcheck(fn, *shapes: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


small = st.integers(2, 5)
seeds = st.integers(0, 2**16)


@settings(max_examples=examples(8))
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=small, w=small, seed=seeds)
def test_training_batchnorm_backward(n: int, c: int, h: int, w: int, seed: int) -> None:
    def bn(x: torch.Tensor) -> torch.Tensor:
        return KerasBatchNorm(c).to(x.dtype).train()(x)

    _gradcheck(bn, (n, c, h, w), seed=seed)
    rng = np.random.default_rng(seed)
    x, up = rng.normal(0, 2, (n, h, w, c)).astype(np.float32), rng.normal(0, 1, (n, h, w, c)).astype(np.float32)
    import tf_keras

    layer = tf_keras.layers.BatchNormalization(center=False, scale=False, epsilon=BN_EPSILON)
    (expected,) = _tf_vjp(lambda t: layer(t, training=True), [x], up)
    (actual,) = _torch_vjp(lambda t: bn(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), [x], up)
    # Normalisation divides by sqrt(var + 1e-3): errors scale with 1 / std of the drawn values (~2)
    np.testing.assert_allclose(actual, expected, atol=F32_ATOL, rtol=F32_RTOL)


CLIP_POINTS = (-2.5, 2.5)


@settings(max_examples=examples(10))
@given(
    offsets=st.lists(st.sampled_from([0.0, 1e-6, -1e-6, 1e-3, -1e-3, 0.4, -0.4, 3.0, -3.0]), min_size=4, max_size=12),
    seed=seeds,
)
def test_hard_sigmoid_backward_at_and_around_its_clip_points(offsets: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.array([rng.choice(CLIP_POINTS) + o for o in offsets] + list(rng.uniform(-4, 4, 8)), dtype=np.float32)
    up = rng.normal(0, 1, x.shape).astype(np.float32)
    (expected,) = _tf_vjp(tf_layers.hard_sigmoid_keras2, [x], up)
    (actual,) = _torch_vjp(hard_sigmoid_keras2, [x], up)
    np.testing.assert_array_equal(actual, expected)  # one multiply each: bit for bit
    # The float64 statement: slope 0.2 inside the clip, the clip points included (TensorFlow's and PyTorch's
    # clip both pass the gradient at the bound), 0 outside.
    inside = (0.2 * x.astype(np.float64) + 0.5 >= 0) & (0.2 * x.astype(np.float64) + 0.5 <= 1)
    np.testing.assert_allclose(actual, np.where(inside, 0.2 * up, 0.0), rtol=1e-6)
    away = np.abs(np.abs(x) - 2.5) > 1e-2  # finite differences only where no kink lies within the step
    z = torch.tensor(x[away], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hard_sigmoid_keras2, (z,), eps=1e-6, atol=1e-8)


@settings(max_examples=examples(5))
@given(t=st.integers(1, 4), h=small, w=small, seed=seeds)
def test_convlstm_backward_through_time(t: int, h: int, w: int, seed: int) -> None:
    cin, hidden, k = 2, tf_layers.LSTM_FILTERS, tf_layers.LSTM_KERNEL  # the reference builds the official sizes
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    lstm = ConvLSTM2d(cin, hidden, k)
    with torch.no_grad():
        for p in lstm.parameters():
            p.copy_(torch.from_numpy(rng.normal(0, 0.5, tuple(p.shape)).astype(np.float32)))
    lstm64 = ConvLSTM2d(cin, hidden, k).double()
    lstm64.load_state_dict({key: v.double() for key, v in lstm.state_dict().items()})
    _gradcheck(lstm64, (1, t, cin, h, w), seed=seed)
    x = rng.normal(0, 2, (1, t, h, w, cin)).astype(np.float32)  # gates across the hard sigmoid's clip
    up = rng.normal(0, 1, (1, h, w, hidden)).astype(np.float32)
    layer = tf_layers.conv_lstm(
        lstm.kernel.detach().numpy().transpose(2, 3, 1, 0),
        lstm.recurrent_kernel.detach().numpy().transpose(2, 3, 1, 0),
        lstm.bias.detach().numpy(),
        t,
        h,
        w,
    )
    (expected,) = _tf_vjp(layer, [x], up)
    (actual,) = _torch_vjp(lambda s: lstm(s.permute(0, 1, 4, 2, 3)).permute(0, 2, 3, 1), [x], up)
    np.testing.assert_allclose(actual, expected, atol=F32_ATOL, rtol=F32_RTOL)


@settings(max_examples=examples(8))
@given(h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 2), seed=seeds)
def test_window_means_backward(h: int, w: int, c: int, seed: int) -> None:
    windows = (3, 7)
    nested = WindowDeviations(windows)
    _gradcheck(nested, (1, c, h, w), seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (1, h, w, c)).astype(np.float32)
    up = rng.normal(0, 1, (1, len(windows) + 1, h, w, c)).astype(np.float32)
    (expected,) = _tf_vjp(lambda t: tf_layers.nested_window_deviations(t, windows), [x], up)
    (actual,) = _torch_vjp(lambda s: nested(s.permute(0, 3, 1, 2)).permute(0, 1, 3, 4, 2).float(), [x], up)
    np.testing.assert_allclose(actual, expected, atol=F32_ATOL, rtol=F32_RTOL)


@settings(max_examples=examples(8))
@given(h=small, w=small, seed=seeds, clamped=st.lists(st.booleans(), min_size=3, max_size=3))
def test_glbstd_backward_with_its_clamp(h: int, w: int, seed: int, clamped: list[bool]) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (1, h, w, 3)).astype(np.float32)
    std = x.std(axis=(0, 1, 2))
    # Channels chosen to be clamped get min_std above their std; the others well below (no kink within reach)
    min_std = np.where(clamped, std * 2, std * 0.25).astype(np.float32)
    glb = GlobalStd(3)
    with torch.no_grad():
        glb.min_std.copy_(torch.from_numpy(min_std))
    up = rng.normal(0, 1, (1, 1, 1, 3)).astype(np.float32)
    expected = _tf_vjp(tf_layers.global_std, [x, min_std], up)
    actual = _torch_vjp(
        lambda s, m: torch.func.functional_call(glb, {"min_std": m}, (s.permute(0, 3, 1, 2),)).permute(0, 2, 3, 1),
        [x, min_std],
        up,
    )
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, atol=F32_ATOL, rtol=F32_RTOL)
    # Clamped channels pass no gradient to x and all of theirs to min_std; the others the reverse
    assert np.all((actual[0].reshape(-1, 3) == 0)[:, np.array(clamped)])
    np.testing.assert_allclose(actual[1], np.where(clamped, up.reshape(3), 0.0), rtol=1e-6)
    glb64 = GlobalStd(3).double()
    with torch.no_grad():
        glb64.min_std.copy_(torch.from_numpy(min_std.astype(np.float64)))
    x64 = torch.tensor(_nchw(x), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(glb64, (x64,), eps=1e-6, atol=1e-6)


@settings(max_examples=examples(10))
@given(h=st.integers(1, 6), w=st.integers(1, 6), pad=st.sampled_from([1, 2, 3]), seed=seeds)
def test_symmetric_padding_backward(h: int, w: int, pad: int, seed: int) -> None:
    _gradcheck(lambda t: symmetric_pad(t, pad), (1, 2, h, w), seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (1, h, w, 2)).astype(np.float32)
    up = rng.normal(0, 1, (1, h + 2 * pad, w + 2 * pad, 2)).astype(np.float32)
    (expected,) = _tf_vjp(lambda t: tf_layers.symmetric_pad(t, pad), [x], up)
    (actual,) = _torch_vjp(lambda s: _nhwc_t(symmetric_pad(s.permute(0, 3, 1, 2), pad)), [x], up)
    # The adjoint of a gather sums each pixel's copies: float32 sums of a few terms
    np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=1e-6)
    # float64 statement: each source pixel collects the upstream gradient of every padded position copying it
    rows, cols = tf_layers.symmetric_indices(h, pad), tf_layers.symmetric_indices(w, pad)
    exact = np.zeros((1, h, w, 2))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            exact[0, r, c] += up[0, i, j]
    np.testing.assert_allclose(actual, exact, atol=1e-6, rtol=1e-6)


def _nhwc_t(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


@settings(max_examples=examples(10))
@given(seed=seeds, saturated=st.booleans())
def test_keras_binary_crossentropy_and_its_gradient(seed: int, saturated: bool) -> None:
    from mantranet_torch.training import keras_binary_crossentropy

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 20 if saturated else 2, (1, 4, 5, 1))  # saturated: the 1e-7 clip active
    p = (1 / (1 + np.exp(-logits))).astype(np.float32)
    y = (rng.random(p.shape) < 0.5).astype(np.float32)
    expected = _tf_vjp(lambda a, b: tf_layers.keras_binary_crossentropy(a, b), [p, y], np.float32(1.0))[0]
    actual = _torch_vjp(keras_binary_crossentropy, [p, y], np.float32(1.0))[0]
    # float64 statement: d/dp of mean(-(y log q + (1 - y) log(1 - q))), q = clip(p, 1e-7, 1 - 1e-7), 0 where clipped
    # The clip's bounds as float32 holds them (1 - 1e-7 is 1 - 1.19e-7 there), the rest in float64
    lo, hi = float(np.float32(1e-7)), float(np.float32(1 - 1e-7))
    q = np.clip(p.astype(np.float64), lo, hi)
    exact = np.where((p > lo) & (p < hi), (q - y) / (q * (1 - q)), 0.0) / p.size
    # Where the clip is active both pass no gradient; where |logit| < 8 all three agree to float32 rounding. In
    # between, float32 cancels in sigmoid(logit) - y (1 - p of 1e-6 keeps ~4 significant bits), each framework
    # its own way (measured up to 5% apart): not compared there.
    clipped = (p <= lo) | (p >= hi)
    assert np.all(actual[clipped] == 0) and np.all(expected[clipped] == 0)
    away = np.abs(logits) < 8
    np.testing.assert_allclose(actual[away], expected[away], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(actual[away], exact[away], rtol=1e-4, atol=1e-7)
    value = float(keras_binary_crossentropy(torch.from_numpy(p), torch.from_numpy(y)))
    np.testing.assert_allclose(value, np.mean(-(y * np.log(q) + (1 - y) * np.log(1 - q))), rtol=1e-4)
