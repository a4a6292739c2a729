"""Layer-by-layer parity of the PyTorch model against the TensorFlow reference, with float64 attribution.

``compare_layers`` taps every named layer (``mantranet_torch.LAYERS``) in both frameworks and compares them in
two modes: cumulative (each framework on its own previous outputs, as in use) and local (each PyTorch
layer fed the reference's input to that layer, so its error is its own). With the float64 ``Oracle`` it
also measures each framework's error against the exact value, in both modes, so that a difference is
attributed to the framework that drifted. Everything returned is a plain dataclass with ``to_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

import mantranet_torch.model as torch_model
from mantranet_torch import LAYERS, ManTraNet

from .compare import Comparison, compare_arrays, from_nhwc, to_nhwc
from .oracle import Oracle
from .tolerances import CUMULATIVE, LOCAL, MODES, POLICY, Tolerance, TolerancePolicy

INPUT = "input"  # the image, as an input name in LAYER_INPUTS

# What each layer computes from, by name: the previous layer, except the detector's branches.
LAYER_INPUTS: dict[str, tuple[str, ...]] = {
    **{
        name: (prev,)
        for prev, name in zip((INPUT, *torch_model.FEATEX_LAYERS[:-1]), torch_model.FEATEX_LAYERS, strict=True)
    },
    "outlierTrans": ("L2",),
    "bnorm": ("outlierTrans",),
    "glbStd": ("bnorm",),
    "nestedAvgFeatex": ("bnorm",),
    "divStd": ("nestedAvgFeatex", "glbStd"),
    "cLSTM": ("divStd",),
    "pred": ("cLSTM",),
}
# The ConvGRU variant's recurrent layer (``layer_names(config)``), for one-layer comparisons (``judge_layer``).
VARIANT_LAYER_INPUTS: dict[str, tuple[str, ...]] = {"cGRU": ("divStd",)}
NEITHER = "neither"  # attribution when both frameworks are within tolerance of the exact value

Progress = Callable[[str, str], None]  # (mode, layer), called as each layer is done


class Reference(Protocol):
    """What the runner needs of the reference (``ReferenceModel``, ``OfficialModel``): its Keras weights, every
    layer's output."""

    arrays: dict[str, np.ndarray]

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


class Side(Protocol):
    """An implementation compared with the reference, in the reference's terms: NHWC float arrays keyed by the
    Keras layer names of ``LAYERS``. Anything that computes ManTraNet can be one: our PyTorch model
    (``ModelSide``), another TensorFlow implementation, a user's PyTorch port (``candidate.CandidateSide``),
    an exported graph (an ONNX session whose intermediate outputs are named by the layer map).

    ``stages(x)``: each layer it has, in network order, computed from the image ``x`` (N x H x W x 3 in
    [-1, 1]) on its own previous outputs (cumulative mode); a layer it lacks is simply not yielded (reported as
    unmapped). ``layer(name, *inputs)``: that layer alone on the given inputs (``LAYER_INPUTS``; local mode), or
    None where it cannot run one layer alone.
    """

    def stages(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]: ...

    def layer(self, name: str, *inputs: np.ndarray) -> np.ndarray | None: ...


class ModelSide:
    """Our ``ManTraNet`` as a ``Side``: ``stages`` and the named layers of ``torch_layers``, float32."""

    def __init__(self, model: ManTraNet) -> None:
        self.model = model
        self.layers = torch_layers(model)

    def stages(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        with torch.inference_mode():
            for name, out in self.model.stages(from_nhwc(x)):
                yield name, to_nhwc(out)

    def layer(self, name: str, *inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return to_nhwc(self.layers[name](*(from_nhwc(a) for a in inputs)))


def as_side(candidate: ManTraNet | Side) -> Side:
    return ModelSide(candidate) if isinstance(candidate, ManTraNet) else candidate


def torch_layers(model: ManTraNet) -> dict[str, Callable[..., Tensor]]:
    """Each named layer of ``model`` as a callable on its inputs (``LAYER_INPUTS``), NCHW tensors."""
    featex, detector = model.featex, model.detector
    layers: dict[str, Callable[..., Tensor]] = {name: getattr(featex, name) for name in torch_model.FEATEX_LAYERS[:-1]}
    # Looked up on the module at call time, as Featex.stages does, so a patched function is the one used.
    layers["L2"] = lambda x: torch_model.l2_normalize_tf(x, dim=1)
    layers["outlierTrans"] = detector.outlier_trans
    layers["bnorm"] = detector.bnorm
    layers["glbStd"] = detector.glb_std
    layers["nestedAvgFeatex"] = detector.nested_avg
    # The two one-line steps of AnomalyDetector.stages, restated; a change there shows in cumulative mode.
    layers["divStd"] = lambda dev, sigma: torch.abs(dev / sigma[:, None])
    layers[detector.recurrent_name] = detector.recurrent  # cLSTM, or the ConvGRU variant's cGRU
    layers["pred"] = lambda h: torch.sigmoid(detector.pred(h))
    return layers


@dataclass
class Attribution:
    """Each framework's error against the float64 value on one layer: which one drifted."""

    reference_max_abs: float
    torch_max_abs: float
    reference_mean_abs: float
    torch_mean_abs: float
    further_from_exact: str  # "reference", "torch", or "neither" (both within tolerance of exact)

    @classmethod
    def of(cls, reference: np.ndarray, actual: np.ndarray, exact: np.ndarray, atol: float) -> Attribution:
        ref_err = _abs_error(reference, exact)
        torch_err = _abs_error(actual, exact)
        r_max, t_max = float(ref_err.max(initial=0.0)), float(torch_err.max(initial=0.0))
        further = NEITHER if max(r_max, t_max) <= atol else "reference" if r_max > t_max else "torch"
        return cls(r_max, t_max, _mean(ref_err), _mean(torch_err), further)


def _abs_error(value: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|value - exact| where both are finite (non-finite values are the comparison's business)."""
    diff = np.abs(np.asarray(value, dtype=np.float64) - exact)
    return diff[np.isfinite(diff)]


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else 0.0


@dataclass
class LayerResult:
    """One layer in both modes. ``growth``: its cumulative max error over the previous layer's."""

    name: str
    cumulative: Comparison | None = None
    local: Comparison | None = None
    cumulative_attribution: Attribution | None = None
    local_attribution: Attribution | None = None
    growth: float | None = None
    # Per mode, |torch - reference| at each pixel, the largest over channels (and time steps): N x H x W
    # float32, for heat maps. Not part of the JSON.
    diff_maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def comparisons(self) -> dict[str, Comparison]:
        return {mode: c for mode, c in ((CUMULATIVE, self.cumulative), (LOCAL, self.local)) if c is not None}

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons.values())

    @property
    def unmapped(self) -> bool:
        """The compared implementation has no such layer (or none the layer map names): reported, not failed."""
        return self.cumulative is None and self.local is None

    @property
    def headline(self) -> Comparison | None:
        """The comparison whose numbers head the layer's entry: cumulative (as in use), else local."""
        return self.cumulative or self.local

    def to_dict(self) -> dict[str, Any]:
        head = self.headline
        return {
            "name": self.name,
            "passed": self.passed,
            "unmapped": self.unmapped,
            "shape": None if head is None else head.shape,
            "max_abs": None if head is None else head.max_abs,
            "max_rel": None if head is None else head.max_rel,
            "worst_index": None if head is None else head.worst_index,
            "growth": self.growth,
            "cumulative": None if self.cumulative is None else self.cumulative.to_dict(),
            "local": None if self.local is None else self.local.to_dict(),
            "attribution": {
                CUMULATIVE: None if self.cumulative_attribution is None else vars(self.cumulative_attribution),
                LOCAL: None if self.local_attribution is None else vars(self.local_attribution),
            },
        }


@dataclass
class ParityReport:
    """Every layer in network order, for one input batch."""

    input_shape: list[int]
    modes: list[str]
    attributed: bool  # whether the float64 oracle was evaluated
    layers: list[LayerResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        previous = None
        for layer in self.layers:
            current = None if layer.cumulative is None else layer.cumulative.max_abs
            layer.growth = current / previous if current is not None and previous else None
            previous = current

    @property
    def passed(self) -> bool:
        """Every compared layer within tolerance, and at least one compared (nothing compared proves nothing)."""
        return any(not layer.unmapped for layer in self.layers) and all(layer.passed for layer in self.layers)

    def first_divergent(self, mode: str | None = None) -> str | None:
        """The first layer in network order over tolerance (in ``mode``, or in any mode)."""
        for layer in self.layers:
            comparisons = layer.comparisons
            checked = comparisons.values() if mode is None else [comparisons[mode]] if mode in comparisons else []
            if any(not c.passed for c in checked):
                return layer.name
        return None

    @property
    def first_divergent_layer(self) -> str | None:
        return self.first_divergent()

    def layer(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in this report")

    def unmapped(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.unmapped]

    def failures(self) -> list[str]:
        """One message per failing (layer, mode), in network order."""
        return [
            f"[{mode}] {c.message()}" for layer in self.layers for mode, c in layer.comparisons.items() if not c.passed
        ]

    def summary(self) -> str:
        """A short verdict for assertion messages: the first divergent layer and every failure."""
        if self.passed:
            compared = len(self.layers) - len(self.unmapped())
            return f"all {compared} compared layers within tolerance ({', '.join(self.modes)})"
        if self.first_divergent_layer is None:
            return f"no layer compared: every layer is unmapped in the modes run ({', '.join(self.modes)})"
        return f"first divergent layer: {self.first_divergent_layer}\n" + "\n".join(self.failures())

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "first_divergent_layer": self.first_divergent_layer,
            "first_divergent": {mode: self.first_divergent(mode) for mode in self.modes},
            "input_shape": self.input_shape,
            "modes": self.modes,
            "attributed": self.attributed,
            "unmapped": self.unmapped(),
            "layers": [layer.to_dict() for layer in self.layers],
        }


def compare_layers(
    reference: Reference,
    model: ManTraNet | Side,
    x: np.ndarray,
    *,
    oracle: Oracle | None = None,
    oracle_layers: Collection[str] | None = None,
    modes: Sequence[str] = MODES,
    policy: TolerancePolicy = POLICY,
    progress: Progress | None = None,
    cumulative_from_reference: bool = False,
) -> ParityReport:
    """Compare ``model`` with ``reference`` on one input batch, layer by layer: the engine of ``run_parity``.

    ``model`` is run as it is (float32, eval mode); layers a side lacks are reported as unmapped. With ``oracle``
    every layer is also evaluated in float64 (from the reference's inputs in local mode) and each side's error
    against it is reported. ``oracle_layers`` limits that to some layers in local mode (the float64 feature
    extractor is slow on large images: the detector alone is cheap); cumulative attribution needs the whole
    float64 chain, so it runs only when no limit is given, unless ``cumulative_from_reference``: then the float64
    chain starts from the reference's own inputs to the first of ``oracle_layers`` and runs on to the end. That
    arbitrates the detector's drift in cumulative mode on large images (the official float32 window means drift
    as images grow) against the exact value of the reference's features; the compared side's inherited feature
    error is what its cumulative tolerance covers.

    Args:
        reference: anything with ``trace(x)`` giving the 21 named layers (NHWC) and ``arrays``.
        model: our ``ManTraNet`` or any ``Side`` (``stages`` and ``layer`` in Keras names and layouts).
        x: N x H x W x 3, float32 in [-1, 1].
        oracle: the float64 ``Oracle``, or the official code in float64: anything with ``stages`` and ``layer``.
        oracle_layers: the layers evaluated in float64 (None: all).
        modes: ``cumulative`` and/or ``local``.
        policy: the tolerance per layer.
        progress: called with (mode, layer) as each layer is compared.
        cumulative_from_reference: start the float64 chain from the reference's features (see above).

    Returns:
        The ``ParityReport``: per layer and mode, the errors, the tolerance verdict and the float64 attribution.

    Raises:
        ValueError: unknown modes, or a reference trace that lacks layers.
    """
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"modes must be some of {', '.join(MODES)}, got {list(modes)}")
    side = as_side(model)
    x = np.ascontiguousarray(x, dtype=np.float32)
    ref = reference.trace(x)
    missing = [name for name in LAYERS if name not in ref]
    if missing:
        raise ValueError(f"the reference's trace lacks layers {missing}")
    results = {name: LayerResult(name) for name in LAYERS}
    if CUMULATIVE in modes:
        exact_stages = None
        if oracle is not None and oracle_layers is None:
            exact_stages = oracle.stages(x)
        elif oracle is not None and cumulative_from_reference:
            exact_stages = _exact_from_reference(oracle, oracle_layers, x, ref)
        _cumulative(results, ref, reference.arrays, side, x, exact_stages, policy, progress)
    if LOCAL in modes:
        chosen = LAYERS if oracle_layers is None else oracle_layers
        _local(results, ref, side, x, oracle, chosen, policy, progress)
    return ParityReport(list(x.shape), [m for m in MODES if m in modes], oracle is not None, list(results.values()))


def _cumulative(
    results: dict[str, LayerResult],
    ref: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray],
    side: Side,
    x: np.ndarray,
    exact_stages: Iterator[tuple[str, np.ndarray | None]] | None,
    policy: TolerancePolicy,
    progress: Progress | None,
) -> None:
    remaining = iter(LAYERS)
    for name, actual in side.stages(x):
        exact = None
        # The layers before this one that the side did not yield are unmapped; the oracle keeps pace.
        for skipped in remaining:
            if exact_stages is not None:
                exact_name, exact = next(exact_stages)
                assert exact_name == skipped, f"oracle yields {exact_name} where {skipped} is due"
            if skipped == name:
                break
            if progress is not None:
                progress(CUMULATIVE, skipped)
        else:
            raise ValueError(f"the compared side yields {name!r} out of network order or twice")
        atol = policy.atol(name, CUMULATIVE, ref, arrays)
        result = results[name]
        result.cumulative, result.cumulative_attribution = _judge(
            name, ref[name], actual, exact, policy.get(name, CUMULATIVE), atol
        )
        result.diff_maps[CUMULATIVE] = diff_map(ref[name], actual)
        if progress is not None:
            progress(CUMULATIVE, name)
    for skipped in remaining:
        if progress is not None:
            progress(CUMULATIVE, skipped)


def _exact_from_reference(
    oracle: Oracle, oracle_layers: Collection[str], x: np.ndarray, ref: dict[str, np.ndarray]
) -> Iterator[tuple[str, np.ndarray | None]]:
    """Each layer's float64 value in cumulative mode from the first of ``oracle_layers`` on, chained from the
    reference's own inputs to that layer; None before it."""
    first = min(LAYERS.index(name) for name in oracle_layers)
    exact: dict[str, np.ndarray] = {}
    for name in LAYERS:
        if LAYERS.index(name) >= first:
            inputs = [x if s == INPUT else exact[s] if s in exact else ref[s] for s in LAYER_INPUTS[name]]
            exact[name] = oracle.layer(name, *inputs)
        yield name, exact.get(name)


def _local(
    results: dict[str, LayerResult],
    ref: dict[str, np.ndarray],
    side: Side,
    x: np.ndarray,
    oracle: Oracle | None,
    oracle_layers: Collection[str],
    policy: TolerancePolicy,
    progress: Progress | None,
) -> None:
    for name in LAYERS:
        inputs = [x if source == INPUT else ref[source] for source in LAYER_INPUTS[name]]
        out = side.layer(name, *inputs)
        if out is not None:
            exact = None if oracle is None or name not in oracle_layers else oracle.layer(name, *inputs)
            atol = policy.atol(name, LOCAL, ref)
            result = results[name]
            tol = policy.get(name, LOCAL)
            result.local, result.local_attribution = _judge(name, ref[name], out, exact, tol, atol)
            result.diff_maps[LOCAL] = diff_map(ref[name], out)
        if progress is not None:
            progress(LOCAL, name)


def judge_layer(
    name: str,
    inputs: Sequence[np.ndarray],
    reference_fn: Callable[..., np.ndarray],
    torch_fn: Callable[..., Tensor],
    oracle: Oracle | None = None,
    policy: TolerancePolicy = POLICY,
) -> tuple[Comparison, Attribution | None]:
    """One layer fed the same NHWC ``inputs`` in both frameworks (local mode on inputs of the caller's choosing)."""
    expected = reference_fn(*inputs)
    with torch.inference_mode():
        actual = to_nhwc(torch_fn(*(from_nhwc(np.asarray(a, dtype=np.float32)) for a in inputs)))
    exact = None if oracle is None else oracle.layer(name, *inputs)
    sources = LAYER_INPUTS.get(name) or VARIANT_LAYER_INPUTS[name]
    atol = policy.atol(name, LOCAL, dict(zip(sources, inputs, strict=True)))
    return _judge(name, expected, actual, exact, policy.get(name, LOCAL), atol)


def diff_map(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|actual - expected| at each pixel, the largest over channels and time steps: N x H x W float32.

    NaN where either side is not finite (or their shapes differ: then the whole map), so a heat map shows it.
    """
    if expected.shape != actual.shape:
        return np.full((expected.shape[0], *expected.shape[-3:-1]), np.nan, dtype=np.float32)
    diff = np.abs(actual.astype(np.float64) - expected)
    if diff.ndim == 5:  # N, T, H, W, C
        diff = diff.max(axis=1)
    return diff.max(axis=-1).astype(np.float32)


def _judge(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    exact: np.ndarray | None,
    tol: Tolerance,
    atol: float | np.ndarray,
) -> tuple[Comparison, Attribution | None]:
    """``atol``: the tolerance applied, per element where it varies; ``tol.atol`` judges attribution."""
    comparison = compare_arrays(name, expected, actual, atol, tol.rtol, exact)
    attribution = None
    if exact is not None and comparison.shape_mismatch is None:
        attribution = Attribution.of(expected, actual, exact, tol.atol)
    return comparison, attribution
