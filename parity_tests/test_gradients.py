"""Training parity catches the known training defects, each at the layer (or optimiser step) where it lives, and
passes the port against the original code.

Each mutant is the PyTorch model with one piece of its training broken the way ports get it wrong, run through
``PatchedGradients`` (the patch is in force during that side's calls only, so the unbroken model is the
reference on the very same weights and batch). The unmutated model passes the same comparison (first test), so
each failure is the mutation's. ``Mutant.why`` says how the chosen weights and input expose it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mantranet_torch.layers
import mantranet_torch.training
from mantranet_torch import ManTraNet
from mantranet_torch.layers import CombinedConv2d, KerasBatchNorm, bayar_constraint
from parity_tests.gradients import (
    FLOAT64,
    GRAD_SCALE_ATOL,
    LOCAL_F32,
    GradientReport,
    OfficialGradients,
    PatchedGradients,
    TorchGradients,
    compare_gradients,
    random_mask,
)
from parity_tests.official_files import WeightStore, official_code_missing

RELEASE = 4
SHAPE = (
    1,
    8,
    10,
)  # N, H, W: small (the 256-channel float64 convolutions dominate), non-square, every window crosses the border


def _image(seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (*SHAPE, 3)).astype(np.float32)


class KerasThreeHardSigmoid(torch.autograd.Function):
    """Keras 2's hard sigmoid forward with Keras 3's gradient (slope 1/6 inside |x| < 3): forward identical, backward
    wrong in the cLSTM alone (a custom autograd Function with a wrong backward)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * ((x > -3) & (x < 3)).to(grad.dtype) / 6


Patch = Callable[[], contextlib.AbstractContextManager]


def _patched(target: object, name: str, value: object) -> Patch:
    return lambda: mock.patch.object(target, name, value)


def _bayar_in_forward() -> contextlib.AbstractContextManager:
    def kernel(self: CombinedConv2d) -> Tensor:
        srm = self.srm_kernel.to(self.regular_kernel)
        return torch.cat([self.regular_kernel, srm, bayar_constraint(self.bayar_kernel)])

    return mock.patch.object(CombinedConv2d, "kernel", property(kernel))


def _bn_inference_while_training() -> contextlib.AbstractContextManager:
    def forward(self: KerasBatchNorm, x: Tensor) -> Tensor:
        inv_std = torch.rsqrt(self.moving_variance + mantranet_torch.layers.BN_EPSILON)
        return (x - self.moving_mean[:, None, None]) * inv_std[:, None, None]

    return mock.patch.object(KerasBatchNorm, "forward", forward)


UNIT_NORM = mantranet_torch.training.unit_norm  # the project's, kept before any patch


def _bayar_without_epsilon(kernel: Tensor) -> Tensor:
    centre = kernel.shape[-1] // 2
    mask = torch.zeros_like(kernel)
    mask[..., centre, centre] = 1
    rest = kernel * (1 - mask)
    return rest / rest.sum(dim=(-2, -1), keepdim=True) - mask


@dataclass(frozen=True)
class Mutant:
    name: str
    layer: str  # where the first divergent gradient (or step array) must be named
    patch: Patch | None
    why: str
    training: bool = False
    steps: int = 0
    loss: Callable[[Tensor, Tensor], Tensor] | None = None
    eps: float | None = None
    variant: str = "synthetic"
    edit: Callable[[ManTraNet], None] | None = None


def _negative_min_std(model: ManTraNet) -> None:
    with torch.no_grad():
        model.detector.glb_std.min_std[:8] = -1e-3


MUTANTS = (
    Mutant(
        "double_sigmoid_in_the_loss",
        "loss",
        None,
        "BCE-with-logits given the probabilities: d loss / d p is sigmoid(p) - y instead of (p - y) / (p (1 - p))",
        loss=lambda p, y: F.binary_cross_entropy_with_logits(p, y),
    ),
    Mutant(
        "hard_sigmoid_gradient_of_keras3",
        "cLSTM",
        _patched(mantranet_torch.layers, "hard_sigmoid_keras2", KerasThreeHardSigmoid.apply),
        "the gates' gradient 1/6 instead of 0.2 (and non-zero out to |x| < 3): the synthetic cLSTM's gates take "
        "pre-activations across that range; the forward pass is Keras 2's exactly",
    ),
    Mutant(
        "bayar_applied_in_forward",
        "b1c1",
        _bayar_in_forward,
        "a stored Bayar kernel that breaks its constraint (as any kernel between two steps does) is changed by it",
        variant="unconstrained_bayar",
    ),
    Mutant(
        "batchnorm_in_inference_mode_while_training",
        "bnorm",
        _bn_inference_while_training,
        "the moving statistics differ from the batch's, so bnorm's output and gradient differ",
        training=True,
    ),
    Mutant(
        "bayar_constraint_without_epsilon",
        "b1c1",
        _patched(mantranet_torch.training, "bayar_constraint", _bayar_without_epsilon),
        "dividing by sum + 1e-7 moves the kernel by 1e-7 of itself: invisible in float32, 100x the float64 steps' "
        "tolerance",
        steps=1,
    ),
    Mutant(
        "unit_norm_over_the_output_channels",
        "outlierTrans",
        _patched(mantranet_torch.training, "unit_norm", lambda kernel, dim=1: UNIT_NORM(kernel, 0)),
        "Keras' axis -2 of an HWIO kernel is PyTorch's dim 1; over dim 0 each input channel is normalised instead",
        steps=1,
    ),
    Mutant(
        "non_negativity_missing",
        "glbStd",
        _patched(mantranet_torch.training, "non_neg", lambda w: w.clone()),
        "min_std of -1e-3 on eight channels, where its clamp is inactive (no gradient): Keras sets it to 0",
        steps=1,
        edit=_negative_min_std,
    ),
    Mutant(
        "adam_epsilon_of_pytorch",
        "*",
        None,
        "eps 1e-8 instead of 1e-7 changes lr g / (|g| + 3e-6) wherever |g| is of the order of 1e-6",
        steps=1,
        eps=1e-8,
    ),
)


def _compare(w_model: ManTraNet, mutant: Mutant, x: np.ndarray, mask: np.ndarray) -> GradientReport:
    model = copy.deepcopy(w_model)
    if mutant.edit is not None:
        mutant.edit(model)
    options = {} if mutant.loss is None else {"loss": mutant.loss}
    if mutant.eps is not None:
        options["eps"] = mutant.eps
    patch = mutant.patch or contextlib.nullcontext
    return compare_gradients(
        TorchGradients(model),
        PatchedGradients(model, patch, **options),
        x,
        mask,
        exact=TorchGradients(model, dtype=torch.float64),
        candidate_exact=PatchedGradients(model, patch, dtype=torch.float64, **options),
        training=mutant.training,
        steps=mutant.steps,
        rows=not mutant.steps,  # a defect of the step: the steps alone
    )


def test_the_unmutated_model_passes_against_itself_in_every_setting(weights: WeightStore) -> None:
    x, mask = _image(), random_mask((*SHAPE, 1))
    for variant in ("unconstrained_bayar",):
        model = weights.get(RELEASE, variant=variant).model
        for training in (False, True):
            report = compare_gradients(
                TorchGradients(model),
                PatchedGradients(model, contextlib.nullcontext),
                x,
                mask,
                exact=TorchGradients(model, dtype=torch.float64),
                candidate_exact=PatchedGradients(model, contextlib.nullcontext, dtype=torch.float64),
                training=training,
                steps=int(training),
            )
            assert report.passed, (variant, training, report.first_divergent_gradient, report.first_divergent_step)
            arrays = {e.name for row in report.rows for e in row.modes[FLOAT64] if "/" in e.name}
            assert len(arrays) == 35 and len(report.rows) == 22  # every array; the loss and the 21 layers
            assert all(len(step.modes[FLOAT64]) == 35 for step in report.steps)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_training_defect_is_named_at_its_layer(weights: WeightStore, mutant: Mutant) -> None:
    model = weights.get(RELEASE, variant=mutant.variant).model
    report = _compare(model, mutant, _image(), random_mask((*SHAPE, 1)))
    assert not report.passed, mutant.why
    if mutant.steps:
        first = report.first_divergent_step
        assert first is not None and first["step"] == 1 and first["mode"] == FLOAT64, first
        if mutant.layer != "*":
            assert first["layer"] == mutant.layer, (first, mutant.why)
            failing = {e.name.split("/")[1] for e in report.steps[0].modes[FLOAT64] if not e.comparison.passed}
            assert failing == {mutant.layer}, failing
    else:
        first = report.first_divergent_gradient
        assert first is not None and first["layer"] == mutant.layer and first["mode"] == LOCAL_F32, (first, mutant.why)


def test_a_wrong_backward_is_named_in_both_directions(weights: WeightStore) -> None:
    """Forward identical, the cLSTM's backward wrong: named there whichever side is wrong, and the float64 build
    says which."""
    model = weights.get(RELEASE).model
    x, mask = _image(), random_mask((*SHAPE, 1))
    wrong = _patched(mantranet_torch.layers, "hard_sigmoid_keras2", KerasThreeHardSigmoid.apply)
    right, right64 = TorchGradients(model), TorchGradients(model, dtype=torch.float64)
    candidate_wrong = compare_gradients(
        right,
        PatchedGradients(model, wrong),
        x,
        mask,
        exact=right64,
        candidate_exact=PatchedGradients(model, wrong, dtype=torch.float64),
    )
    reference_wrong = compare_gradients(
        PatchedGradients(model, wrong), right, x, mask, exact=right64, candidate_exact=right64
    )
    first = candidate_wrong.first_divergent_gradient
    assert first is not None and first["layer"] == "cLSTM" and first["mode"] == LOCAL_F32, first
    assert candidate_wrong.first_reference_drift is None
    # The wrong reference: PyTorch is within tolerance of float64 where the reference is not, so the run passes
    # and names the reference's first drifting row.
    assert reference_wrong.passed
    assert reference_wrong.first_reference_drift == {"layer": "cLSTM", "mode": LOCAL_F32, "entry": "d divStd -> cLSTM"}
    for report, further in ((candidate_wrong, "torch"), (reference_wrong, "reference")):
        rows = {row.layer: row for row in report.rows}
        assert all(e.comparison.passed for e in rows["loss"].modes[LOCAL_F32] + rows["pred"].modes[LOCAL_F32])
        off = [e for e in rows["cLSTM"].modes[LOCAL_F32] if e.attribution.further_from_exact != "neither"]
        assert off and all(e.attribution.further_from_exact == further for e in off)


# --- against the original code ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(weights: WeightStore):
    missing = official_code_missing()
    if missing:
        pytest.skip(missing)
    w = weights.get(RELEASE)
    return w, OfficialGradients(w.official), OfficialGradients(w.official64)


def _against_the_original(official, **options):
    """Our float32 and float64 models against the original code's, on the test image and a seeded mask."""
    w, ref, ref64 = official
    return compare_gradients(
        ref,
        TorchGradients(w.model),
        _image(),
        random_mask((*SHAPE, 1)),
        exact=ref64,
        candidate_exact=TorchGradients(w.model, dtype=torch.float64),
        **options,
    )


def test_gradients_and_adam_steps_pass_against_the_original_code(official) -> None:
    report = _against_the_original(official, training=True, steps=2)
    assert report.passed, (report.first_divergent_gradient, report.first_divergent_step)
    # float64 builds agree far below their tolerance (measured 3e-14 of scale), float32 local within 1e-5
    assert report.worst(FLOAT64)["ratio"] < 1e-11
    assert report.worst(LOCAL_F32)["ratio"] < 1e-5
    arrays = {e.name for row in report.rows for e in row.modes[FLOAT64] if "/" in e.name}
    assert len(arrays) == 35 and not report.not_compared  # training mode: the statistics have no gradient anywhere
    assert [len(s.modes[FLOAT64]) for s in report.steps] == [35, 35]


@contextlib.contextmanager
def _official_keras3_backward(official_model) -> Iterator[None]:
    """The official float32 cLSTM's recurrent activation given Keras 3's gradient (forward unchanged)."""
    import tensorflow as tf

    cell = official_model._layers["cLSTM"].cell
    original = cell.recurrent_activation

    @tf.custom_gradient
    def hard_sigmoid(x):
        def grad(upstream):
            return upstream * tf.cast(tf.abs(x) < 3, x.dtype) / 6

        return original(x), grad

    cell.recurrent_activation = hard_sigmoid
    try:
        yield
    finally:
        cell.recurrent_activation = original


def test_the_original_code_with_a_wrong_backward_is_named_at_cLSTM(official) -> None:
    with _official_keras3_backward(official[0].official):
        report = _against_the_original(official)
    assert report.passed  # PyTorch is within tolerance of the float64 value wherever the reference is not
    drift = report.first_reference_drift
    assert drift is not None and drift["layer"] == "cLSTM" and drift["mode"] == LOCAL_F32, drift
    assert report.worst(FLOAT64)["ratio"] < 1e-11  # the float64 builds are untouched and agree


def test_run_parity_with_gradients_and_steps_reports_them_in_the_json(official) -> None:
    import json

    from parity_tests.api import run_parity
    from parity_tests.official_files import OFFICIAL_CODE

    w = official[0]
    pixels = np.random.default_rng(3).integers(0, 256, (*SHAPE[1:], 3), dtype=np.uint8)
    run = run_parity(
        w.path, [pixels], reference=f"official:{OFFICIAL_CODE}", modes=["local"], gradients=True, train_steps=1
    )
    report = json.loads(run.to_json())
    assert run.passed and report["passed"] and report["first_divergent_gradient"] is None
    gradients = report["images"][0]["gradients"]
    assert [row["layer"] for row in gradients["rows"]][:3] == ["loss", "pred", "cLSTM"]
    assert len(gradients["steps"]) == 1 and gradients["optimizer"] == {"name": "adam", "lr": 1e-3, "steps": 1}


def test_gradients_need_the_original_code(weights: WeightStore) -> None:
    from parity_tests.api import run_parity
    from parity_tests.errors import ParityInputError

    with pytest.raises(ParityInputError, match="give --reference official"):
        run_parity(weights.get(RELEASE).path, [np.zeros((8, 8, 3), np.uint8)], gradients=True)
    with pytest.raises(ParityInputError, match="--train-steps -1"):
        run_parity(weights.get(RELEASE).path, [np.zeros((8, 8, 3), np.uint8)], train_steps=-1)


def test_the_html_report_shows_the_gradient_rows(official, tmp_path) -> None:
    from parity_tests.api import run_parity
    from parity_tests.official_files import OFFICIAL_CODE
    from parity_tests.report_page import write_report

    pixels = np.random.default_rng(4).integers(0, 256, (*SHAPE[1:], 3), dtype=np.uint8)
    run = run_parity(official[0].path, [pixels], reference=f"official:{OFFICIAL_CODE}", modes=["local"], gradients=True)
    write_report(run, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Gradients and optimiser steps" in page and "d divStd -&gt; cLSTM" in page and "gradients PASSED" in page


def test_the_model_backpropagates_where_inference_takes_its_edge_strips(weights: WeightStore) -> None:
    """Images over 4 x the padding take the strip path (edges written into the convolution's output before its
    ReLU): a backward pass goes through it, with inference's forward values and float64's gradient."""
    model = weights.get(RELEASE).model
    x = torch.from_numpy(np.random.default_rng(5).uniform(-1, 1, (1, 3, 14, 16)).astype(np.float32))
    with torch.inference_mode():
        strips = model(x)
    x32 = x.clone().requires_grad_(True)
    out = model(x32)
    (grad32,) = torch.autograd.grad(out.sum(), [x32])
    x64 = x.double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(copy.deepcopy(model).double()(x64).sum(), [x64])
    # the two float32 paths sum the same products in other orders (oneDNN's kernel or PyTorch's), which the
    # detector amplifies: within pred's default parity tolerance (measured 1.8e-6)
    np.testing.assert_allclose(out.detach().numpy(), strips.numpy(), atol=1e-5)
    scale = float(grad64.abs().max())
    assert float((grad32.double() - grad64).abs().max()) <= GRAD_SCALE_ATOL * scale
