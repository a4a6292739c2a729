"""The parity comparison catches the known porting traps, each at the layer where it lives, against our
TensorFlow reference and against the original code itself.

Each mutant is the PyTorch model with one piece deliberately broken the way ports get it wrong. The
full comparison (both modes, with the float64 oracle) must fail, name that layer as the first divergent
one in both modes, and attribute the divergence to PyTorch. The unmutated model must pass on the very
same weights and input, so the failure is the mutation's. Inputs and weights are chosen so that each
mutant is detectable; ``Mutant.why`` says how.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mantranet_torch.layers
import mantranet_torch.model
from mantranet_torch import ManTraNet
from mantranet_torch.layers import CombinedConv2d, bayar_constraint, symmetric_pad
from parity_tests.official_files import WeightStore, official_code_missing
from parity_tests.runner import ParityReport, Reference, compare_layers
from parity_tests.strategies import ImageRecipe, Shape

# 16 x 20: sides over b1c1's pad of 2 (reflect padding needs that), every window of 7 or more crosses
# the border, non-square; real-image-like pixel values, so no border is constant.
MUTANT_IMAGE = ImageRecipe("pixels", Shape(1, 16, 20), seed=7)
RELEASE = 4

Patch = Callable[[pytest.MonkeyPatch, ManTraNet], None]


@dataclass(frozen=True)
class Mutant:
    name: str
    layer: str  # where the comparison must first fail
    patch: Patch
    why: str  # why the chosen input and weights expose it
    variant: str = "synthetic"


def _keras3_hard_sigmoid(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    mp.setattr(mantranet_torch.layers, "hard_sigmoid_keras2", lambda x: torch.clamp(x / 6 + 0.5, 0.0, 1.0))


def _reflect_padding(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    mp.setattr(mantranet_torch.layers, "symmetric_pad", lambda x, pad: F.pad(x, (pad,) * 4, mode="reflect"))


def _replicate_for_5x5(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    def pad(x: Tensor, pad: int) -> Tensor:
        return F.pad(x, (pad,) * 4, mode="replicate") if pad == 2 else symmetric_pad(x, pad)

    mp.setattr(mantranet_torch.layers, "symmetric_pad", pad)


def _batchnorm_eps(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    mp.setattr(mantranet_torch.layers, "BN_EPSILON", 1e-5)


def _torch_normalize(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    mp.setattr(mantranet_torch.model, "l2_normalize_tf", lambda x, dim=1: F.normalize(x, dim=dim))


def _gates_reordered(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    # Keras stores the gates i, f, c, o along the output channels; read them as i, c, f, o instead.
    clstm, h = model.detector.clstm, model.detector.clstm.hidden
    order = torch.cat(
        [torch.arange(0, h), torch.arange(2 * h, 3 * h), torch.arange(h, 2 * h), torch.arange(3 * h, 4 * h)]
    )
    for tensor in (clstm.kernel, clstm.recurrent_kernel, clstm.bias):
        tensor.copy_(tensor[order].clone())


def _kernel_swapped_kh_kw(key: str) -> Patch:
    def patch(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
        weight = model.get_parameter(key)
        weight.copy_(weight.transpose(-1, -2).clone())  # HWIO -> OIWH: kh and kw exchanged

    return patch


def _bayar_in_forward(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    def kernel(self: CombinedConv2d) -> Tensor:
        srm = self.srm_kernel.to(self.regular_kernel)
        return torch.cat([self.regular_kernel, srm, bayar_constraint(self.bayar_kernel)])

    mp.setattr(CombinedConv2d, "kernel", property(kernel))


def _window_means_count_padding(mp: pytest.MonkeyPatch, model: ManTraNet) -> None:
    def window_means(x: Tensor, window_sizes: tuple[int, ...]) -> Iterator[Tensor]:
        for k in window_sizes:
            yield F.avg_pool2d(x.double(), k, stride=1, padding=k // 2, count_include_pad=True)

    mp.setattr(mantranet_torch.layers, "window_means", window_means)


MUTANTS = (
    Mutant(
        "keras3_hard_sigmoid",
        "cLSTM",
        _keras3_hard_sigmoid,
        "x/6 + 0.5 differs from 0.2x + 0.5 at every pre-activation but 0 (by 0.083 at +-2.5); the gates of "
        "the synthetic cLSTM on divStd values of order 1 take values across that whole range",
    ),
    Mutant(
        "reflect_padding",
        "b1c1",
        _reflect_padding,
        "reflect mirrors about the edge pixel ([c b | a b c]), symmetric repeats it ([b a | a b c]): every "
        "border output of b1c1 differs on an image whose border is not constant",
    ),
    Mutant(
        "replicate_padding_5x5",
        "b1c1",
        _replicate_for_5x5,
        "for a pad of 1 replicate equals symmetric, so only b1c1 (the one 5x5 layer, pad 2) changes: its "
        "second padded row is [a a | a b] instead of [b a | a b], different where row 0 and row 1 differ",
    ),
    Mutant(
        "batchnorm_eps_1e-5",
        "bnorm",
        _batchnorm_eps,
        "moving variances of the synthetic weights lie in 0.01-0.2, so sqrt(var + 1e-3) against "
        "sqrt(var + 1e-5) rescales bnorm's outputs by up to 4.8%, far over 1e-5 on outputs of order 1",
    ),
    Mutant(
        "torch_normalize_epsilon",
        "L2",
        _torch_normalize,
        "with transform scaled by 1e-9 every feature vector's squared norm is ~1e-16 < 1e-12: TensorFlow "
        "multiplies it by 1e6 (norm ~1e-2), F.normalize divides it by its norm (norm 1)",
        variant="tiny_features",
    ),
    Mutant(
        "convlstm_gates_reordered",
        "cLSTM",
        _gates_reordered,
        "the forget and cell blocks of the synthetic kernel, recurrent kernel and bias differ, so exchanging "
        "them changes every gate pre-activation",
    ),
    Mutant(
        "b2c1_kernel_kh_kw_swapped",
        "b2c1",
        _kernel_swapped_kh_kw("featex.b2c1.weight"),
        "the synthetic 3x3 kernels are random, not symmetric, so the transposed kernel filters differently",
    ),
    Mutant(
        "pred_kernel_kh_kw_swapped",
        "pred",
        _kernel_swapped_kh_kw("detector.pred.weight"),
        "as above, for the 7x7 kernel of the last layer: nothing before pred changes",
    ),
    Mutant(
        "bayar_constraint_in_forward",
        "b1c1",
        _bayar_in_forward,
        "the file's Bayar kernel is deliberately unconstrained (random taps), so constraining it in forward "
        "(centre -1, the rest rescaled to sum 1) changes the three Bayar output channels",
        variant="unconstrained_bayar",
    ),
    Mutant(
        "window_means_count_padding",
        "nestedAvgFeatex",
        _window_means_count_padding,
        "on a 16 x 20 image every window of 7 or more crosses the border, where dividing by k*k instead of "
        "the in-image count shrinks the mean",
    ),
)


class RecordedReference:
    """The reference's trace of one input, computed once and shared by every mutant (it does not change)."""

    def __init__(self, reference: Reference, x: np.ndarray) -> None:
        self.arrays = reference.arrays
        self._trace, self._x = reference.trace(x), x

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        assert np.array_equal(x, self._x), "a recorded trace is for its own input only"
        return self._trace


_recorded: dict[tuple[str, str], RecordedReference] = {}

# Each mutant is judged against our TensorFlow reference (exact answer: the float64 NumPy oracle) and against the
# original code itself (exact answer: the official code in float64), when ../shared/official holds it.
REFERENCES = (
    "ours",
    pytest.param(
        "official", marks=pytest.mark.skipif(official_code_missing() is not None, reason=str(official_code_missing()))
    ),
)


def _parity(weights: WeightStore, variant: str, reference: str, model: ManTraNet | None = None) -> ParityReport:
    w = weights.get(RELEASE, 0, variant)
    x = MUTANT_IMAGE.build()
    ref, oracle = (w.reference, w.oracle) if reference == "ours" else (w.official, w.official64)
    if (variant, reference) not in _recorded:
        _recorded[variant, reference] = RecordedReference(ref, x)
    return compare_layers(_recorded[variant, reference], w.model if model is None else model, x, oracle=oracle)


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("variant", sorted({m.variant for m in MUTANTS}))
def test_unmutated_model_passes_on_the_mutants_inputs(weights: WeightStore, variant: str, reference: str) -> None:
    report = _parity(weights, variant, reference)
    assert report.passed, report.summary()


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_fails_at_its_layer(
    weights: WeightStore, monkeypatch: pytest.MonkeyPatch, mutant: Mutant, reference: str
) -> None:
    model = copy.deepcopy(weights.get(RELEASE, 0, mutant.variant).model)
    with torch.no_grad():
        mutant.patch(monkeypatch, model)
    report = _parity(weights, mutant.variant, reference, model)
    assert not report.passed, f"{mutant.name} went unnoticed: {mutant.why}"
    assert report.first_divergent("cumulative") == mutant.layer, report.summary()
    assert report.first_divergent("local") == mutant.layer, report.summary()
    layer = report.layer(mutant.layer)
    assert layer.local_attribution.further_from_exact == "torch", layer.local_attribution
    assert layer.cumulative_attribution.further_from_exact == "torch", layer.cumulative_attribution
    message = report.failures()[0]
    assert message.startswith(f"[cumulative] {mutant.layer} "), message
    assert "max abs error" in message and "worst at (batch" in message, message
