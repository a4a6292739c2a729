"""The training-mode pieces (mantranet_torch.training, KerasBatchNorm in training mode, logits) against float64 NumPy
evaluations of the Keras formulas and, where TensorFlow is installed, against tf_keras itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mantranet_torch import ManTraNet, ManTraNetConfig
from mantranet_torch.layers import BN_EPSILON, KERAS_EPSILON, KerasBatchNorm
from mantranet_torch.training import (
    FIRST5_LAYERS,
    KerasAdam,
    KerasSGD,
    apply_constraints,
    freeze,
    non_neg,
    unit_norm,
)

# float32 arithmetic on values of order 1-10 over a few hundred terms: a few float32 ulps of the largest value
FLOAT32_ATOL = 2e-6


def _bn_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=(3, 5, 6, 7)).astype(np.float32)
    mean0 = rng.normal(size=5).astype(np.float32)
    var0 = rng.uniform(0.5, 2.0, size=5).astype(np.float32)
    return x, mean0, var0


def _bn(mean0, var0) -> KerasBatchNorm:
    bn = KerasBatchNorm(5)
    bn.moving_mean.copy_(torch.from_numpy(mean0))
    bn.moving_variance.copy_(torch.from_numpy(var0))
    return bn


def test_batchnorm_training_mode_matches_float64_keras_formulas():
    x, mean0, var0 = _bn_inputs()
    bn = _bn(mean0, var0).train()
    y = bn(torch.from_numpy(x)).numpy()
    xd = x.astype(np.float64)
    mean, var = xd.mean(axis=(0, 2, 3)), xd.var(axis=(0, 2, 3))  # over N, H, W; population variance
    expected = (xd - mean[:, None, None]) / np.sqrt(var[:, None, None] + BN_EPSILON)
    np.testing.assert_allclose(y, expected, rtol=0, atol=FLOAT32_ATOL)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.99 * mean0 + 0.01 * mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.99 * var0 + 0.01 * var * n / (n - 1), rtol=0, atol=1e-6)


def test_batchnorm_eval_mode_uses_and_keeps_moving_statistics():
    x, mean0, var0 = _bn_inputs(1)
    bn = _bn(mean0, var0).eval()
    y = bn(torch.from_numpy(x)).numpy()
    expected = (x.astype(np.float64) - mean0[:, None, None]) / np.sqrt(var0[:, None, None].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(y, expected, rtol=0, atol=FLOAT32_ATOL)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean0)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), var0)


def test_batchnorm_training_gradient_matches_finite_differences():
    bn = KerasBatchNorm(3).double().train()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # a loss that is not invariant to the normalisation
    assert torch.autograd.gradcheck(lambda t: (bn(t) * weights).sum(), (x,), eps=1e-6, atol=1e-7)


def test_batchnorm_training_mode_matches_tf_keras():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("tf_keras")
    x, mean0, var0 = _bn_inputs(2)
    layer = keras.layers.BatchNormalization(axis=-1, center=False, scale=False)  # as the original's bnorm
    nhwc = x.transpose(0, 2, 3, 1)
    layer.build(nhwc.shape)
    layer.moving_mean.assign(mean0)
    layer.moving_variance.assign(var0)
    with tf.GradientTape() as tape:
        t = tf.constant(nhwc)
        tape.watch(t)
        y_tf = layer(t, training=True)
        loss_tf = tf.reduce_sum(
            y_tf * tf.constant(np.linspace(-1, 1, y_tf.shape.num_elements()).reshape(nhwc.shape), dtype=tf.float32)
        )
    grad_tf = tape.gradient(loss_tf, t).numpy().transpose(0, 3, 1, 2)

    bn = _bn(mean0, var0).train()
    xt = torch.from_numpy(x).requires_grad_()
    y = bn(xt)
    w = torch.from_numpy(np.linspace(-1, 1, y.numel()).reshape(nhwc.shape).astype(np.float32)).permute(0, 3, 1, 2)
    (y * w).sum().backward()
    # Both float32, summing in different orders: a few ulps of values of order 3 (outputs) and 1 (gradients)
    np.testing.assert_allclose(y.detach().numpy(), y_tf.numpy().transpose(0, 3, 1, 2), rtol=0, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(xt.grad.numpy(), grad_tf, rtol=0, atol=1e-6)
    # The moving averages: tf_keras' fused kernel Bessel-corrects the variance it averages in
    np.testing.assert_allclose(bn.moving_mean.numpy(), layer.moving_mean.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), layer.moving_variance.numpy(), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_model() -> ManTraNet:
    torch.manual_seed(3)
    return ManTraNet(ManTraNetConfig(window_sizes=(3, 5))).eval()


def test_logits_are_the_map_before_its_sigmoid(tiny_model):
    x = torch.rand(2, 3, 12, 10) * 2 - 1
    with torch.no_grad():
        z = tiny_model.logits(x)
        p = tiny_model(x)
        names = [name for name, _ in tiny_model.stages(x, logits=True)]
    assert z.shape == p.shape == (2, 1, 12, 10)
    torch.testing.assert_close(torch.sigmoid(z), p, rtol=0, atol=0)  # the same operations: bit for bit
    assert names[-1] == "pred_logits" and "pred" not in names
    # The logits are not squashed into (0, 1): a loss with its own sigmoid must receive these
    loss_right = F.binary_cross_entropy_with_logits(z, torch.ones_like(z))
    loss_double = F.binary_cross_entropy_with_logits(p, torch.ones_like(p))
    expected = -np.log(1 / (1 + np.exp(-z.double().numpy()))).mean()
    assert abs(loss_right.item() - expected) < 1e-6
    assert abs(loss_double.item() - expected) > 1e-3


def _np_bayar(w: np.ndarray) -> np.ndarray:
    """The Bayar constraint on an OIHW kernel in float64, as the original's BayarConstraint computes it (HWIO)."""
    w = w.astype(np.float64).copy()
    c = w.shape[-1] // 2
    w[..., c, c] = 0
    w /= w.sum(axis=(2, 3), keepdims=True) + KERAS_EPSILON
    w[..., c, c] = -1
    return w


def test_apply_constraints_matches_keras_formulas_and_skips_frozen_weights():
    torch.manual_seed(4)
    model = ManTraNet()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # far from every constraint
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = apply_constraints(model)
    assert done == ["featex.b1c1.bayar_kernel", "detector.outlier_trans.weight", "detector.glb_std.min_std"]
    state = model.state_dict()
    np.testing.assert_allclose(
        state["featex.b1c1.bayar_kernel"].numpy(),
        _np_bayar(before["featex.b1c1.bayar_kernel"].numpy()),
        rtol=1e-5,
        atol=1e-6,
    )
    w = before["detector.outlier_trans.weight"].double().numpy()  # (64, 256, 1, 1): normalised over the 256 inputs
    expected = w / (KERAS_EPSILON + np.sqrt((w**2).sum(axis=1, keepdims=True)))
    np.testing.assert_allclose(state["detector.outlier_trans.weight"].numpy(), expected, rtol=1e-6, atol=1e-8)
    m = before["detector.glb_std.min_std"].numpy()
    np.testing.assert_array_equal(state["detector.glb_std.min_std"].numpy(), np.where(m >= 0, m, 0))
    untouched = set(state) - set(done)
    for name in untouched:
        torch.testing.assert_close(state[name], before[name], rtol=0, atol=0)

    freeze(model, "featex")
    bayar = model.featex.b1c1.bayar_kernel.detach().clone()
    assert "featex.b1c1.bayar_kernel" not in apply_constraints(model)
    torch.testing.assert_close(model.featex.b1c1.bayar_kernel.detach(), bayar, rtol=0, atol=0)


def test_unit_norm_normalises_over_input_channels_not_outputs():
    w = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    norms = unit_norm(w).square().sum(dim=1).sqrt()
    np.testing.assert_allclose(norms.numpy(), 1.0, rtol=0, atol=1e-6)  # 1/(1 + eps / |w|): within 1e-6
    assert not np.allclose(unit_norm(w).square().sum(dim=0).sqrt().numpy(), 1.0, atol=1e-3)
    np.testing.assert_array_equal(non_neg(torch.tensor([-2.0, 0.0, 3.0])).numpy(), [0.0, 0.0, 3.0])


def test_freeze_matches_the_official_choices():
    model = ManTraNet()
    assert freeze(model, "none") == []
    first5 = freeze(model, "first5")
    assert {name.split(".")[1] for name in first5} == set(FIRST5_LAYERS)
    featex = freeze(model, "featex")
    assert featex == [n for n, _ in model.featex.named_parameters(prefix="featex")]
    assert all(p.requires_grad for p in model.detector.parameters())
    with pytest.raises(ValueError, match="first5"):
        freeze(model, "everything")


def _np_keras_adam(p, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        p -= lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return p


def test_keras_adam_matches_float64_keras_formula():
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=(50,)).astype(np.float32)
    # gradients spanning 1e-9 .. 1: where eps 1e-7 against 1e-8 and its placement matter
    grads = [(rng.normal(size=50) * 10.0 ** rng.uniform(-9, 0, size=50)).astype(np.float32) for _ in range(3)]
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = KerasAdam([param], lr=1e-2)
    for g in grads:
        param.grad = torch.from_numpy(g)
        opt.step()
    expected = _np_keras_adam(p0, [g.astype(np.float64) for g in grads], lr=1e-2)
    # float32 updates of size <= ~3e-2 on values of order 1: each step rounds to ~1e-7
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=0, atol=5e-7)
    torch_adam = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt2 = torch.optim.Adam([torch_adam], lr=1e-2)
    for g in grads:
        torch_adam.grad = torch.from_numpy(g)
        opt2.step()
    assert np.abs(torch_adam.detach().numpy() - expected).max() > 1e-4  # PyTorch's defaults are another optimiser


def test_keras_adam_matches_tf_keras():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("tf_keras")
    rng = np.random.default_rng(6)
    p0 = rng.normal(size=(40,)).astype(np.float32)
    grads = [(rng.normal(size=40) * 10.0 ** rng.uniform(-8, 0, size=40)).astype(np.float32) for _ in range(3)]
    var = tf.Variable(p0.copy())
    opt_tf = keras.optimizers.Adam(learning_rate=1e-2)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = KerasAdam([param], lr=1e-2)
    for g in grads:
        opt_tf.apply_gradients([(tf.constant(g), var)])
        param.grad = torch.from_numpy(g)
        opt.step()
    # the same float32 operations in the same order: within a float32 ulp of values of order 1
    np.testing.assert_allclose(param.detach().numpy(), var.numpy(), rtol=0, atol=2.4e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_keras_sgd_matches_float64_keras_formula(nesterov):
    rng = np.random.default_rng(7)
    p0 = rng.normal(size=20).astype(np.float32)
    grads = [rng.normal(size=20).astype(np.float32) for _ in range(3)]
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = KerasSGD([param], lr=0.1, momentum=0.9, nesterov=nesterov)
    p, velocity = p0.astype(np.float64), np.zeros(20)
    for g in grads:
        param.grad = torch.from_numpy(g)
        opt.step()
        velocity = 0.9 * velocity - 0.1 * g
        p = p + (0.9 * velocity - 0.1 * g if nesterov else velocity)
    np.testing.assert_allclose(param.detach().numpy(), p, rtol=0, atol=1e-6)
