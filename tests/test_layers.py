"""Each custom piece of the PyTorch model against an independent float64 NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mantranet_torch import layers
from parity_tests import oracle
from parity_tests.profiles import examples
from tests.helpers import synthetic_model, to_nhwc

FLOAT32_EPS = float(np.finfo(np.float32).eps)


@settings(max_examples=examples(40))
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    pad=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_symmetric_pad_equals_numpy_symmetric(h: int, w: int, pad: int, seed: int) -> None:
    # Padding only copies values, so equality is exact, including pads wider than the image.
    x = np.random.default_rng(seed).normal(size=(2, 3, h, w)).astype(np.float32)
    got = layers.symmetric_pad(torch.from_numpy(x), pad).numpy()
    np.testing.assert_array_equal(got, np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="symmetric"))


def test_symmetric_pad_repeats_the_edge_unlike_reflect() -> None:
    row = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    assert layers.symmetric_pad(row, 2)[0, 0, 2].tolist() == [2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 2.0]
    assert F.pad(row[0], (2, 2), mode="reflect")[0, 0].tolist() == [3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0]


def test_srm_kernels_order_and_values() -> None:
    # Channel 3*i + c holds SRM filter i on input channel c and zeros elsewhere; taps are float32 quotients.
    expected = oracle.srm_kernel().transpose(3, 2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(layers.srm_kernels().numpy(), expected)
    image = torch.zeros(1, 3, 9, 9)
    image[0, 1, 4, 4] = 1.0  # an impulse in the green channel only
    response = F.conv2d(image, layers.srm_kernels(), padding=2)[0].abs().sum(dim=(1, 2))
    assert [i for i in range(9) if response[i] > 0] == [1, 4, 7]


@settings(max_examples=examples(25))
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    windows=st.lists(st.sampled_from([1, 3, 5, 7, 15, 31]), min_size=1, max_size=4, unique=True).map(sorted),
    seed=st.integers(0, 2**16),
)
def test_window_means_count_only_pixels_inside(h: int, w: int, windows: list[int], seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(2, 3, h, w))
    got = list(layers.window_means(torch.from_numpy(x), tuple(windows)))
    for k, mean in zip(windows, got, strict=True):
        q = k // 2
        brute = np.empty_like(x)
        for i in range(h):
            for j in range(w):
                brute[:, :, i, j] = x[:, :, max(i - q, 0) : i + q + 1, max(j - q, 0) : j + q + 1].mean(axis=(2, 3))
        # Both in float64; the integral image subtracts partial sums of magnitude <= h*w*max|x|.
        np.testing.assert_allclose(mean.numpy(), brute, rtol=0, atol=1e-12)


def test_window_means_match_average_pooling_without_padded_pixels() -> None:
    x = torch.randn(1, 4, 20, 17, dtype=torch.float64)
    for k, mean in zip((3, 7, 15), layers.window_means(x, (3, 7, 15)), strict=True):
        pooled = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        torch.testing.assert_close(mean, pooled, rtol=0, atol=1e-12)


def test_window_deviations_against_float64() -> None:
    # Float32 in and out, float64 inside: the only error is the final rounding to float32 (half an ulp
    # of values up to ~4 here, so < 2.4e-7; allow 1 ulp of 4).
    x = torch.randn(2, 8, 23, 31) * 1.5 + 0.3
    got = to_nhwc(layers.WindowDeviations((7, 15, 31, 63))(x))
    cfg = type("C", (), {"window_sizes": (7, 15, 31, 63)})()
    expected = oracle.Oracle({}, cfg).nested_avg(to_nhwc(x).astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=0, atol=4 * FLOAT32_EPS)


def test_l2_normalize_uses_tensorflow_epsilon_on_near_zero_vectors() -> None:
    x = torch.tensor([[1e-7, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [2e-6, -1e-6, 5e-7]])[:, :, None, None]
    got = layers.l2_normalize_tf(x, dim=1)[:, :, 0, 0].numpy()
    expected = oracle.l2_normalize(x[:, :, 0, 0].numpy().astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=2 * FLOAT32_EPS, atol=0)
    assert got[0, 0] == pytest.approx(0.1, rel=1e-6)  # SPEC: TF maps [1e-7, 0, 0] to [0.1, 0, 0]
    assert F.normalize(x, dim=1)[0, 0, 0, 0].item() == pytest.approx(1.0)  # torch's epsilon differs


def test_hard_sigmoid_is_keras2_at_its_kinks() -> None:
    x = torch.tensor([-3.0, -2.5, -2.4999, -1.0, 0.0, 1.0, 2.4999, 2.5, 3.0])
    expected = np.clip(0.2 * x.double().numpy() + 0.5, 0.0, 1.0)
    # float32 0.2*x + 0.5 rounds twice: at most one ulp of 1.
    np.testing.assert_allclose(layers.hard_sigmoid_keras2(x).numpy(), expected, rtol=0, atol=FLOAT32_EPS)
    assert layers.hard_sigmoid_keras2(torch.tensor([-2.5, 0.0, 2.5])).tolist() == [0.0, 0.5, 1.0]
    assert F.hardsigmoid(torch.tensor(2.5)).item() != 1.0  # torch's and Keras 3's hard sigmoid differ


def test_inference_batchnorm_against_float64() -> None:
    bn = layers.InferenceBatchNorm(5)
    bn.moving_mean = torch.tensor([0.0, 0.5, -1.0, 2.0, 1e-3])
    bn.moving_variance = torch.tensor([1.0, 0.01, 4.0, 1e-4, 0.0])
    x = torch.randn(2, 5, 4, 6)
    expected = (x.double() - bn.moving_mean.double()[:, None, None]) / torch.sqrt(
        bn.moving_variance.double()[:, None, None] + 1e-3
    )
    # |output| up to ~100 for variance 0 (1/sqrt(1e-3) ~ 31.6 times |x|): a few float32 ulps of that.
    torch.testing.assert_close(bn(x).double(), expected, rtol=4 * FLOAT32_EPS, atol=1e-6)


def test_glb_std_clamp_active_and_inactive() -> None:
    gs = layers.GlobalStd(4)
    with torch.no_grad():
        gs.min_std.copy_(torch.tensor([0.0, 5.0, 0.0, 0.01]))
    x = torch.randn(3, 4, 9, 11)
    x[:, 2] = 0.7  # a constant channel: std 0, so the floor 1e-6 + 0 applies
    x[:, 3] *= 1e-4  # std ~1e-4 < 1e-6 + 0.01: the clamp applies
    got = gs(x)[:, :, 0, 0].detach().double().numpy()
    expected = np.maximum(x.double().numpy().std(axis=(2, 3)), 1e-6 + gs.min_std.detach().double().numpy())
    np.testing.assert_allclose(got, expected, rtol=2 * FLOAT32_EPS, atol=0)
    assert np.all(got[:, 0] > 0.5)  # inactive: the std itself
    assert np.allclose(got[:, 1], 5.0 + 1e-6) and np.allclose(got[:, 2], 1e-6) and np.allclose(got[:, 3], 0.01 + 1e-6)


def test_bayar_constraint_against_float64_and_idempotent() -> None:
    kernel = torch.rand(3, 3, 5, 5) + 0.1
    got = layers.bayar_constraint(kernel).double().numpy()
    k = kernel.double().numpy().copy()
    k[:, :, 2, 2] = 0.0
    k /= k.sum(axis=(2, 3), keepdims=True) + 1e-7
    k[:, :, 2, 2] = -1.0
    np.testing.assert_allclose(got, k, rtol=4 * FLOAT32_EPS, atol=0)
    again = layers.bayar_constraint(layers.bayar_constraint(kernel))
    torch.testing.assert_close(again, layers.bayar_constraint(kernel), rtol=1e-6, atol=1e-6)


def test_combined_conv_uses_the_bayar_kernel_as_stored() -> None:
    torch.manual_seed(0)
    conv = layers.CombinedConv2d(16)
    torch.nn.init.normal_(conv.regular_kernel)
    torch.nn.init.normal_(conv.bayar_kernel)  # unconstrained on purpose
    before = conv.bayar_kernel.detach().clone()
    x = torch.randn(1, 3, 8, 8)
    out = conv(x)
    torch.testing.assert_close(conv.bayar_kernel.detach(), before, rtol=0, atol=0)
    expected = oracle.relu(
        oracle.conv2d_valid(
            oracle.symmetric_pad(x.permute(0, 2, 3, 1).double().numpy(), 2),
            conv.kernel.detach().double().permute(2, 3, 1, 0).numpy(),
        )
    )
    # 75-term float32 dot products of unit-normal kernels and inputs, outputs up to ~30: measured worst
    # 1.2e-5 over 300 random seeds; 3e-5 leaves headroom while a wrong kernel or padding is off by O(1).
    np.testing.assert_allclose(to_nhwc(out), expected, rtol=0, atol=3e-5)


@settings(max_examples=examples(15))
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12))
def test_conv_lstm_against_float64_equations(seed: int, steps: int, h: int, w: int) -> None:
    rng = np.random.default_rng(seed)
    lstm = layers.ConvLSTM2d(6, 8, 7)
    kernel = rng.normal(0, 0.15, (7, 7, 6, 32))
    recurrent = rng.normal(0, 0.3, (7, 7, 8, 32))
    bias = rng.normal(0, 1.0, 32)
    with torch.no_grad():
        lstm.kernel.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
        lstm.recurrent_kernel.copy_(torch.from_numpy(recurrent.transpose(3, 2, 0, 1)))
        lstm.bias.copy_(torch.from_numpy(bias))
    seq = rng.normal(0, 2.0, (2, steps, h, w, 6))  # pre-activations reach past the kinks at +-2.5
    got = lstm(torch.from_numpy(seq).float().permute(0, 1, 4, 2, 3))
    oracle_model = oracle.Oracle(
        {"cLSTM/cLSTM/kernel:0": kernel, "cLSTM/cLSTM/recurrent_kernel:0": recurrent, "cLSTM/cLSTM/bias:0": bias},
        None,
    )
    expected = oracle_model.clstm(seq)
    # 294 + 392 term float32 sums per gate, values of order 1-5: measured worst ~2e-6; tanh/clip keep it bounded.
    np.testing.assert_allclose(to_nhwc(got), expected, rtol=0, atol=1e-5)


# The inference path's fused oneDNN convolutions against the plain path autograd takes (F.conv2d, then ReLU or
# add). Inputs of at least 16 x 40 x 40 values, where F.conv2d itself runs oneDNN: there the sums are the same, so
# equality is exact.
def test_fused_relu_convolution_equals_conv_then_relu() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 40, 44, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(24, 16, 3, 3, generator=gen) * 0.2, torch.randn(24, generator=gen)
    plain = F.relu(F.conv2d(x, w, b, padding=1))
    with torch.inference_mode():
        assert layers.fused_dtype(x) == torch.float32
        fused = layers.conv2d(x, w, b, 1, relu=True)
        assert torch.equal(fused, plain) and (plain == 0).any() and (plain > 0).any()
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return  # no bfloat16 instructions for oneDNN here: the bf16 path stays F.conv2d's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layers.fused_dtype(x) == torch.bfloat16
            half = layers.conv2d(x, w, b, 1, relu=True)
    expected = F.relu(F.conv2d(x.bfloat16(), w.bfloat16(), b.bfloat16(), padding=1))
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected)


def test_fused_paths_only_at_float_inference() -> None:
    x = torch.zeros(1, 3, 8, 8)
    assert layers.fused_dtype(x) is None  # autograd on: training takes the plain path
    with torch.inference_mode():
        assert layers.fused_dtype(x.double()) is None
        assert layers.fused_dtype(x) == torch.float32


def test_model_stages_equal_between_inference_and_autograd_paths() -> None:
    # Every named layer of the model, fused (inference mode) against plain (autograd on), bit for bit.
    model = synthetic_model(4)
    x = torch.rand(1, 3, 52, 60, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain = {name: out.detach() for name, out in model.stages(x)}
    with torch.inference_mode():
        fused = dict(model.stages(x))
    assert list(fused) == list(plain)
    for name in plain:
        assert torch.equal(fused[name], plain[name]), name
