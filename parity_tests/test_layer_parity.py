"""Every layer of the PyTorch port against the TensorFlow reference, fed the same drawn input (local mode).

Hypothesis draws each layer's input in the region where that layer's numerics are special (the
hard sigmoid's kinks, near-zero feature vectors, near-constant maps under the std clamp, windows wider
than the image) and the weights (release and seed of an official-layout file both frameworks load).
Each comparison uses the project's tolerance (``tolerances.py``) and the float64 oracle's exact value.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from mantranet_torch import LAYERS, RELEASES
from mantranet_torch.model import DETECTOR_CHANNELS, FEATEX_CONVS, FEATURE_CHANNELS, LSTM_HIDDEN
from parity_tests.official_files import Weights, WeightStore
from parity_tests.oracle import conv2d_same_zeros
from parity_tests.profiles import examples
from parity_tests.runner import INPUT, LAYER_INPUTS, judge_layer
from parity_tests.strategies import ImageRecipe, Shape, images, log_uniform, shapes, weight_seeds

RELEASE_INDICES = sorted(RELEASES)
CONV_PIXELS = 1600  # 256-channel layers: ~0.9 G multiply-adds per example in the float64 oracle
LSTM_PIXELS = 900  # four 7x7x64 steps in float64 per pixel


def _check(weights: Weights, name: str, *inputs: np.ndarray) -> None:
    comparison, attribution = judge_layer(
        name, inputs, weights.reference_layers[name], weights.torch_layers[name], weights.oracle
    )
    assert comparison.passed, comparison.message() + f"; against float64: {attribution}"


@pytest.mark.parametrize("release", [0, 4])
def test_reference_layers_wire_as_the_reference_trace(weights: WeightStore, release: int) -> None:
    # The per-layer functions these tests use must compute what ReferenceModel.trace computes, bit for bit.
    w = weights.get(release, 0)
    x = ImageRecipe("uniform", Shape(2, 9, 13), 0).build()
    trace = w.reference.trace(x)
    for name in LAYERS:
        inputs = [x if source == INPUT else trace[source] for source in LAYER_INPUTS[name]]
        np.testing.assert_array_equal(w.reference_layers[name](*inputs), trace[name], err_msg=name)


@settings(max_examples=examples(20))
@given(release=st.sampled_from(RELEASE_INDICES), seed=weight_seeds(), image=images())
@example(release=0, seed=0, image=ImageRecipe("uniform", Shape(3, 1, 1), 0))  # 1x1: pad 2 > side 1
@example(release=4, seed=1, image=ImageRecipe("pixels", Shape(1, 2, 70), 1))
def test_b1c1_symmetric_padding_srm_and_bayar(
    weights: WeightStore, release: int, seed: int, image: ImageRecipe
) -> None:
    # b1c1: symmetric padding by 2 (wider than 1- and 2-pixel sides: the mirroring continues), regular,
    # nine SRM and three Bayar 5x5 kernels side by side, relu.
    _check(weights.get(release, seed), "b1c1", image.build())


def _features(shape: Shape, channels: int, scale: float, seed: int, nonnegative: bool) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.0, scale, (shape.batch, shape.height, shape.width, channels))
    return np.maximum(x, 0.0) if nonnegative else x


SCALES = st.sampled_from([0.05, 0.5, 1.0, 3.0])


@settings(max_examples=examples(20))
@given(
    release=st.sampled_from(RELEASE_INDICES),
    seed=weight_seeds(),
    layer=st.sampled_from([name for name, _, _ in FEATEX_CONVS] + ["transform"]),
    shape=shapes(CONV_PIXELS),
    scale=SCALES,
    data_seed=st.integers(0, 2**16),
)
@example(release=0, seed=0, layer="transform", shape=Shape(2, 9, 7), scale=3.0, data_seed=0)  # tanh: Ptrain0 only
def test_featex_convolutions(
    weights: WeightStore, release: int, seed: int, layer: str, shape: Shape, scale: float, data_seed: int
) -> None:
    # 3x3 convolutions after symmetric padding by 1, on relu outputs (what they see in the network).
    w = weights.get(release, seed)
    channels = w.model.get_submodule(f"featex.{layer}").in_channels
    _check(w, layer, _features(shape, channels, scale, data_seed, nonnegative=True))


@settings(max_examples=examples(10))
@given(seed=weight_seeds(), shape=shapes(CONV_PIXELS), data_seed=st.integers(0, 2**16))
def test_l2_normalize_near_zero_vectors(weights: WeightStore, seed: int, shape: Shape, data_seed: int) -> None:
    # Per-pixel feature norms spread over 10^-10 .. 10: many squared norms fall below TensorFlow's
    # epsilon 1e-12, where it multiplies by 1e6 instead of dividing by the norm; some vectors are zero.
    rng = np.random.default_rng(data_seed)
    n, h, w = shape.batch, shape.height, shape.width
    x = rng.normal(size=(n, h, w, FEATURE_CHANNELS)) * log_uniform(rng, -11, 0, (n, h, w, 1))
    x[rng.uniform(size=(n, h, w)) < 0.1] = 0.0
    event(f"squared norms below 1e-12: {'some' if ((x**2).sum(-1) < 1e-12).any() else 'none'}")
    _check(weights.get(4, seed), "L2", x)


@settings(max_examples=examples(8))
@given(
    seed=weight_seeds(),
    layer=st.sampled_from(["outlierTrans", "bnorm"]),
    shape=shapes(CONV_PIXELS),
    scale=SCALES,
    data_seed=st.integers(0, 2**16),
)
def test_outlier_trans_and_batchnorm(
    weights: WeightStore, seed: int, layer: str, shape: Shape, scale: float, data_seed: int
) -> None:
    # outlierTrans: a 1x1 convolution of unit feature vectors. bnorm: (x - mean) / sqrt(variance + 1e-3).
    if layer == "outlierTrans":
        x = _features(shape, FEATURE_CHANNELS, 1.0, data_seed, nonnegative=False)
        x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    else:
        x = _features(shape, DETECTOR_CHANNELS, scale, data_seed, nonnegative=False)
    _check(weights.get(4, seed), layer, x)


def _channel_maps(rng: np.random.Generator, shape: Shape, channels: int, offset: float) -> np.ndarray:
    """Per channel: a constant offset plus noise whose std is 0 or anywhere in 10^-9 .. 1."""
    spread = log_uniform(rng, -9, 0, (shape.batch, 1, 1, channels))
    spread[rng.uniform(size=spread.shape) < 0.2] = 0.0
    offsets = rng.uniform(-offset, offset, (shape.batch, 1, 1, channels))
    return offsets + spread * rng.normal(size=(shape.batch, shape.height, shape.width, channels))


@settings(max_examples=examples(12))
@given(
    seed=weight_seeds(),
    variant=st.sampled_from(["synthetic", "strong_min_std"]),
    shape=shapes(),
    data_seed=st.integers(0, 2**16),
)
def test_glb_std_clamp(weights: WeightStore, seed: int, variant: str, shape: Shape, data_seed: int) -> None:
    # Per-image std, clamped below at 1e-6 + min_std: channels with std 0 (1-pixel images, constant
    # maps) or under min_std take the clamp, the others their std.
    w = weights.get(4, seed, variant)
    x = _channel_maps(np.random.default_rng(data_seed), shape, DETECTOR_CHANNELS, offset=3.0)
    floor = 1e-6 + w.reference.arrays["glbStd/glbStd/min_std:0"].reshape(1, 1, 1, -1)
    event(f"clamp active: {'some channels' if (x.std(axis=(1, 2), keepdims=True) < floor).any() else 'none'}")
    _check(w, "glbStd", x)


@settings(max_examples=examples(20))
@given(
    release=st.sampled_from([0, 4]),
    shape=shapes(),
    offset=st.sampled_from([0.0, 0.5, 3.0]),
    data_seed=st.integers(0, 2**16),
)
def test_window_deviations(weights: WeightStore, release: int, shape: Shape, offset: float, data_seed: int) -> None:
    # Window means counting only in-image pixels, for windows up to 63 on images down to 1 pixel
    # (windows wider than the image), minus x; then the global mean minus x.
    rng = np.random.default_rng(data_seed)
    x = _channel_maps(rng, shape, DETECTOR_CHANNELS, offset)
    largest = max(RELEASES[release].window_sizes)
    event(f"largest window wider than the image: {largest > min(shape.height, shape.width)}")
    _check(weights.get(release, 0), "nestedAvgFeatex", x)


@settings(max_examples=examples(6))
@given(shape=shapes(), data_seed=st.integers(0, 2**16))
def test_div_std(weights: WeightStore, shape: Shape, data_seed: int) -> None:
    # |deviation / sigma| with sigmas down to the clamp floor 1e-6: outputs up to ~1e6, judged relatively.
    rng = np.random.default_rng(data_seed)
    w = weights.get(4, 0)
    steps = RELEASES[4].time_steps
    dev = rng.normal(size=(shape.batch, steps, shape.height, shape.width, DETECTOR_CHANNELS))
    sigma = log_uniform(rng, -6, 0.5, (shape.batch, 1, 1, DETECTOR_CHANNELS))
    _check(w, "divStd", dev, sigma)


@settings(max_examples=examples(12))
@given(release=st.sampled_from([0, 4]), seed=weight_seeds(), shape=shapes(LSTM_PIXELS), data_seed=st.integers(0, 2**16))
def test_conv_lstm_hard_sigmoid(weights: WeightStore, release: int, seed: int, shape: Shape, data_seed: int) -> None:
    # divStd outputs (non-negative) of magnitudes 0.3 .. 16 per image: the gate pre-activations then span
    # both kinks of the Keras 2 hard sigmoid at +-2.5 and its linear part between (values beyond 50 take a
    # proportionally wider tolerance: tolerances.INPUT_SCALED).
    rng = np.random.default_rng(data_seed)
    w = weights.get(release, seed)
    steps = RELEASES[release].time_steps
    scale = log_uniform(rng, -0.5, 1.2, (shape.batch, 1, 1, 1, 1))
    seq = np.abs(rng.normal(size=(shape.batch, steps, shape.height, shape.width, DETECTOR_CHANNELS))) * scale
    z = conv2d_same_zeros(seq[:, 0], w.oracle.w["cLSTM/cLSTM/kernel:0"]) + w.oracle.w["cLSTM/cLSTM/bias:0"]
    event(f"first-step gates past the kinks: {(np.abs(z) > 2.5).any()}, inside: {(np.abs(z) < 2.5).any()}")
    _check(w, "cLSTM", seq)


@settings(max_examples=examples(6))
@given(seed=weight_seeds(), shape=shapes(), data_seed=st.integers(0, 2**16))
def test_pred(weights: WeightStore, seed: int, shape: Shape, data_seed: int) -> None:
    # The 7x7 'same' convolution with zero padding and the sigmoid, on hidden states in (-1, 1).
    h = np.random.default_rng(data_seed).uniform(-1, 1, (shape.batch, shape.height, shape.width, LSTM_HIDDEN))
    _check(weights.get(4, seed), "pred", h)
