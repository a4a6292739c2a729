"""Training parity: the backward pass and optimiser steps of the PyTorch model against the reference's.

A loss (Keras 2.2's binary cross-entropy of the prediction against a mask, ``keras_binary_crossentropy``) is
differentiated on both sides with respect to every Keras weight array (35 for the released architectures: the
moving statistics of bnorm count, for the loss depends on them in inference mode), the image, and every named
layer's input, edge by edge (``LAYER_INPUTS``: bnorm's output reaches the loss through glbStd and through
nestedAvgFeatex, and each path's gradient is compared apart). The comparison walks the network backwards:
``loss`` (the gradient of the loss with respect to pred), then pred, cLSTM, ..., b1c1. Each row holds what that
layer's backward pass computes (the gradients of its weights and of its inputs) from what the rows before it
computed, so the first row over tolerance names the first layer whose backward pass parts ways.

``compare_steps`` runs K optimiser steps (Keras' Adam or SGD) on both sides from the same weights and batch, the
original's constraints applied after each step as Keras applies them, and compares every array after every step.

Both are judged with float64 arbitration, as the forward comparison is: a float64 build of the reference (the
official code in float64; our model in float64 for the project's reference) computes the exact gradients, and an
element over tolerance against the reference but within it of the exact value passes as reference drift (the
official float32 window means' backward pass, a float32 integral image, drifts most).

Sides are plain objects with ``backward(x, mask, training)`` (``Backward``) and ``train(...)`` (``Trajectory``):
``TorchGradients`` for a PyTorch ``ManTraNet`` (ours or a port built on it), ``OfficialGradients`` for the official
code under tf_keras. Arrays are NHWC (N, T, H, W, C for the window deviations) and Keras layouts throughout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from converter.mapping import MAPPING
from mantranet_torch import LAYERS, ManTraNet
from mantranet_torch.training import KerasAdam, KerasSGD, apply_constraints, freeze, keras_binary_crossentropy

from .compare import Comparison, compare_arrays, from_nhwc, to_nhwc
from .runner import INPUT, LAYER_INPUTS, Attribution, torch_layers

LOSS = "loss"  # the first backward row: the loss's gradient with respect to pred's output
ROWS = (LOSS, *reversed(LAYERS))  # backward order
OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.01}  # Keras 2's defaults

# Tolerances, as fractions of each compared array's largest exact magnitude (gradients span many orders of
# magnitude between arrays and with the image, so one absolute number cannot judge them all). Measured on a
# real photograph crop with the trained detector and on synthetic weights (docs/guides/training-parity.md):
# PyTorch float32 against the float64 gradients <= 2e-5 of scale; the official float32 gradients of the
# window means' integral images drift further, which the float64 arbitration absorbs.
GRAD_SCALE_ATOL = 1e-4
GRAD_RTOL = 1e-4
# Weights after K steps: each step moves an element by at most ~lr (Adam normalises the gradient; SGD's lr * g
# is scaled by the gradient's size), and float32 rounding of the two sides' gradients moves that step by a
# fraction of it. Measured <= 3e-4 lr per step for Adam (elements whose |g| is near Adam's epsilon).
STEP_ATOL_PER_LR = 2e-3
STEP_RTOL = 1e-6
# Where the float64 build arbitrates, an element also passes within this many times the reference's own distance
# from the exact value (the float32 reference's error there is what the original code itself gets wrong).
REFERENCE_ERROR_FACTOR = 2.0


def edge(layer: str, source: str) -> str:
    """The entry for the gradient of ``source``'s output (or the image) as ``layer`` takes it in."""
    return f"d {source} -> {layer}"


def array_layer(path: str) -> str:
    """The Keras layer a weight array belongs to: ``Featex/b1c1/bayar_kernel:0`` -> ``b1c1``."""
    return path.split("/")[1]


def row_entries(paths: Sequence[str]) -> dict[str, list[str]]:
    """Each backward row's entries: the gradients of its inputs, then of its weight arrays (``paths``)."""
    rows = {LOSS: [edge(LOSS, "pred")]}
    for name in reversed(LAYERS):
        rows[name] = [edge(name, source) for source in LAYER_INPUTS[name]]
        rows[name] += [path for path in paths if array_layer(path) == name]
    return rows


def random_mask(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A seeded random 0/1 mask of ``shape`` (N, H, W, 1), float32: about half the pixels set."""
    return (np.random.default_rng(seed).random(tuple(shape)) < 0.5).astype(np.float32)


@dataclass
class Backward:
    """One side's backward pass: the loss and every entry's gradient (``row_entries``' names), float64."""

    loss: float
    grads: dict[str, np.ndarray]
    # Entries the side computes no gradient for (TensorFlow's fused batch norm has none for the moving statistics,
    # which Keras never trains): reported, not compared.
    missing: set[str] = field(default_factory=set)


@dataclass
class Trajectory:
    """One side's K optimiser steps: the loss before each step and every Keras array after each step."""

    losses: list[float]
    arrays: list[dict[str, np.ndarray]]


class GradientSide(Protocol):
    """Anything whose training can be compared: its backward pass and its optimiser steps, in Keras' terms."""

    def backward(self, x: np.ndarray, mask: np.ndarray, training: bool) -> Backward: ...

    def train(
        self, x: np.ndarray, mask: np.ndarray, steps: int, optimizer: str, lr: float, training: bool
    ) -> Trajectory: ...


Loss = Callable[[Tensor, Tensor], Tensor]


def _torch_keras_arrays(model: ManTraNet) -> dict[str, Tensor]:
    """Each Keras path to the model's parameter or buffer that holds it (PyTorch layout)."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    return {path: state[key] for path, key, _ in MAPPING if key in state}


def _as_keras(path: str, value: Tensor | None, like: Tensor) -> np.ndarray:
    transform = next(t for p, _, t in MAPPING if p == path)
    value = torch.zeros_like(like) if value is None else value
    return np.ascontiguousarray(transform.to_keras(value.detach().cpu().double().numpy()))


def _nchw(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    return from_nhwc(np.asarray(a), dtype)


class TorchGradients:
    """A PyTorch ``ManTraNet`` (ours, or a port patched onto it) as a ``GradientSide``, in ``dtype``.

    Each call works on a copy of the model (training mode moves bnorm's moving averages). ``loss``: the loss of
    the prediction against the mask (the Keras 2.2 one; a port's own, to check it); ``eps``: Adam's epsilon.
    """

    def __init__(
        self,
        model: ManTraNet,
        dtype: torch.dtype = torch.float32,
        loss: Loss = keras_binary_crossentropy,
        eps: float | None = None,
        description: str = "PyTorch",
    ) -> None:
        self.model, self.dtype, self.loss, self.eps, self.description = model, dtype, loss, eps, description

    def _copy(self, training: bool) -> ManTraNet:
        model = copy.deepcopy(self.model).to(self.dtype)
        return model.train(training)

    def backward(self, x: np.ndarray, mask: np.ndarray, training: bool) -> Backward:
        model = self._copy(training)
        arrays = _torch_keras_arrays(model)
        for tensor in arrays.values():
            tensor.requires_grad_(True)  # the moving statistics too: inference-mode bnorm depends on them
        layers = torch_layers(model)
        outputs: dict[str, Tensor] = {INPUT: _nchw(x, self.dtype).requires_grad_(True)}
        taken: dict[str, Tensor] = {}
        for name in LAYERS:
            inputs = []
            for source in LAYER_INPUTS[name]:
                # A node of its own per edge, so each consumer's share of a gradient is seen apart.
                inputs.append(outputs[source].view_as(outputs[source]))
                taken[edge(name, source)] = inputs[-1]
            outputs[name] = layers[name](*inputs)
        taken[edge(LOSS, "pred")] = outputs["pred"]
        loss = self.loss(outputs["pred"], _nchw(mask, self.dtype))
        wanted = list(taken.values()) + list(arrays.values())
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        found = {}
        for key, tensor, grad in zip(taken, taken.values(), grads[: len(taken)], strict=True):
            found[key] = to_nhwc(torch.zeros_like(tensor) if grad is None else grad).astype(np.float64)
        for (path, tensor), grad in zip(arrays.items(), grads[len(taken) :], strict=True):
            found[path] = _as_keras(path, grad, tensor)
        return Backward(float(loss.detach()), found)

    def train(
        self, x: np.ndarray, mask: np.ndarray, steps: int, optimizer: str, lr: float, training: bool
    ) -> Trajectory:
        model = self._copy(training)
        # As the official create_model: the first five layers frozen where it builds four windows (releases 0-3).
        freeze(model, "first5" if len(model.config.window_sizes) == 4 else "none")
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "adam":
            opt = KerasAdam(params, lr=lr) if self.eps is None else KerasAdam(params, lr=lr, eps=self.eps)
        else:
            opt = KerasSGD(params, lr=lr)
        image, target = _nchw(x, self.dtype), _nchw(mask, self.dtype)
        arrays = _torch_keras_arrays(model)
        trajectory = Trajectory([], [])
        for _ in range(steps):
            opt.zero_grad()
            loss = self.loss(model(image), target)
            loss.backward()
            opt.step()
            apply_constraints(model)
            trajectory.losses.append(float(loss.detach()))
            trajectory.arrays.append({path: _as_keras(path, t, t) for path, t in arrays.items()})
        return trajectory


class OfficialGradients:
    """The official model (``reference.official.OfficialModel``, float32 or float64) as a ``GradientSide``.

    Gradients come from ``tf.GradientTape`` over the official layers called one by one (the network's own
    wiring: ``LAYER_INPUTS``); steps run the official model itself, its loss's gradients applied by tf_keras'
    Adam or SGD, whose ``apply_gradients`` applies each variable's Keras constraint, as Keras 2's optimisers did.
    Every variable is restored afterwards, so one model serves many calls.
    """

    def __init__(self, official: Any) -> None:
        self.official = official
        self.description = f"official code ({official.dtype})"

    def _restoring(self) -> Callable[[], None]:
        variables = self.official.variables()
        saved = {path: v.numpy() for path, v in variables.items()}

        def restore() -> None:
            for path, v in variables.items():
                v.assign(saved[path])

        return restore

    def backward(self, x: np.ndarray, mask: np.ndarray, training: bool) -> Backward:
        import tensorflow as tf

        from reference.layers import keras_binary_crossentropy as keras_bce

        dtype = self.official.dtype
        variables = self.official.variables()
        restore = self._restoring()
        try:
            with tf.GradientTape() as tape:
                tape.watch(list(variables.values()))  # the moving statistics are not trainable: watched by hand
                image = tf.constant(np.asarray(x, dtype=dtype))
                tape.watch(image)
                outputs = {INPUT: image}
                taken = {}
                for name in LAYERS:
                    inputs = []
                    for source in LAYER_INPUTS[name]:
                        inputs.append(tf.identity(outputs[source]))
                        taken[edge(name, source)] = inputs[-1]
                    outputs[name] = self.official.call_layer(name, *inputs, training=training)
                taken[edge(LOSS, "pred")] = outputs["pred"]
                loss = keras_bce(outputs["pred"], tf.constant(np.asarray(mask, dtype=dtype)))
            wanted = list(taken.values()) + list(variables.values())
            grads = tape.gradient(loss, wanted)
        finally:
            restore()
        found, missing = {}, set()
        for key, tensor, grad in zip(taken, taken.values(), grads[: len(taken)], strict=True):
            found[key] = np.zeros(tensor.shape) if grad is None else np.asarray(grad, dtype=np.float64)
        for (path, v), grad in zip(variables.items(), grads[len(taken) :], strict=True):
            found[path] = np.zeros(v.shape) if grad is None else np.asarray(grad, dtype=np.float64)
            if grad is None and "moving_" in path and not training:
                missing.add(path)  # inference-mode fused batch norm: no gradient for its statistics
        return Backward(float(loss), found, missing)

    def train(
        self, x: np.ndarray, mask: np.ndarray, steps: int, optimizer: str, lr: float, training: bool
    ) -> Trajectory:
        import tensorflow as tf
        import tf_keras

        from reference.layers import keras_binary_crossentropy as keras_bce
        from reference.official import keras_floatx

        dtype = self.official.dtype
        model = self.official.model
        variables = self.official.variables()
        restore = self._restoring()
        # tf_keras' Adam is Keras 2's (epsilon 1e-7, the bias correction folded into the learning rate)
        opt = tf_keras.optimizers.Adam(lr) if optimizer == "adam" else tf_keras.optimizers.SGD(lr)
        image, target = tf.constant(np.asarray(x, dtype=dtype)), tf.constant(np.asarray(mask, dtype=dtype))
        trajectory = Trajectory([], [])
        # keras_floatx: the constraints (non_neg) build their constants in Keras' floatx
        try:
            with keras_floatx(dtype):
                for _ in range(steps):
                    with tf.GradientTape() as tape:
                        loss = keras_bce(model(image, training=training), target)
                    grads = tape.gradient(loss, model.trainable_weights)
                    opt.apply_gradients(zip(grads, model.trainable_weights, strict=True))
                    trajectory.losses.append(float(loss))
                    arrays = {p: np.asarray(v.numpy(), dtype=np.float64) for p, v in variables.items()}
                    trajectory.arrays.append(arrays)
        finally:
            restore()
        return trajectory


@dataclass
class Entry:
    """One compared gradient (or array after a step), with each side's distance from the exact value."""

    name: str
    comparison: Comparison
    attribution: Attribution | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.comparison.to_dict(),
            "attribution": None if self.attribution is None else vars(self.attribution),
        }


def judge(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    exact: np.ndarray | None,
    scale_atol: float,
    rtol: float,
    floor: float = 0.0,
) -> Entry:
    """``actual`` against ``expected``, atol ``scale_atol`` times the largest exact (else expected) magnitude."""
    basis = expected if exact is None else exact
    atol = max(scale_atol * float(np.max(np.abs(basis), initial=0.0)), floor)
    tolerance: float | np.ndarray = atol
    if exact is not None and np.shape(exact) == np.shape(expected):
        # Where the reference's own float32 value is far from exact (a gradient through the chaotic window means
        # or a kink of |dev / sigma|), the compared side may be as far: the reference's error is the yardstick.
        tolerance = np.maximum(atol, REFERENCE_ERROR_FACTOR * np.abs(np.asarray(expected, np.float64) - exact))
    comparison = compare_arrays(name, expected, actual, tolerance, rtol)
    attribution = None
    if exact is not None and comparison.shape_mismatch is None:
        attribution = Attribution.of(expected, actual, exact, atol)
    return Entry(name, comparison, attribution)


@dataclass
class GradientRow:
    """One layer's backward pass (or the loss's): its input and weight gradients compared."""

    layer: str
    entries: list[Entry]

    @property
    def passed(self) -> bool:
        return all(e.comparison.passed for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "passed": self.passed, "entries": [e.to_dict() for e in self.entries]}


@dataclass
class StepResult:
    """Every Keras array after one optimiser step."""

    step: int
    reference_loss: float
    torch_loss: float
    entries: list[Entry]

    @property
    def passed(self) -> bool:
        return all(e.comparison.passed for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "passed": self.passed,
            "reference_loss": self.reference_loss,
            "torch_loss": self.torch_loss,
            "arrays": [e.to_dict() for e in self.entries],
        }


@dataclass
class GradientReport:
    """The backward comparison (``rows``, in backward order) and the optimiser steps (``steps``), one batch."""

    training: bool
    reference_loss: float
    torch_loss: float
    exact_loss: float | None
    rows: list[GradientRow] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    tolerance: dict[str, float] = field(default_factory=dict)
    not_compared: list[str] = field(default_factory=list)  # entries a side has no gradient for
    # The compared side rebuilt in float64 against the exact side: the largest |difference| over an entry's
    # largest exact magnitude, and where. Two float64 builds of one computation agree to ~1e-12 of scale even
    # where float32 rounding makes the gradients chaotic: the proof that both compute the same backward pass.
    float64_agreement: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows) and all(s.passed for s in self.steps)

    @property
    def first_divergent_gradient(self) -> dict[str, str] | None:
        """The first backward row over tolerance, walking back from the loss: its layer and first failing entry."""
        for row in self.rows:
            for entry in row.entries:
                if not entry.comparison.passed:
                    return {"layer": row.layer, "entry": entry.name}
        return None

    @property
    def first_divergent_step(self) -> dict[str, Any] | None:
        """The first optimiser step with an array over tolerance: its number, array and layer."""
        for step in self.steps:
            for entry in step.entries:
                if not entry.comparison.passed:
                    return {"step": step.step, "array": entry.name, "layer": array_layer(entry.name)}
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "first_divergent_gradient": self.first_divergent_gradient,
            "first_divergent_step": self.first_divergent_step,
            "training_mode": self.training,
            "loss": {"reference": self.reference_loss, "torch": self.torch_loss, "exact": self.exact_loss},
            "tolerance": self.tolerance,
            "not_compared": self.not_compared,
            "float64_agreement": self.float64_agreement,
            "optimizer": self.optimizer,
            "rows": [r.to_dict() for r in self.rows],
            "steps": [s.to_dict() for s in self.steps],
        }


def compare_gradients(
    reference: GradientSide,
    candidate: GradientSide,
    x: np.ndarray,
    mask: np.ndarray,
    *,
    exact: GradientSide | None = None,
    candidate_exact: GradientSide | None = None,
    training: bool = False,
    steps: int = 0,
    optimizer: str = "adam",
    lr: float | None = None,
    scale_atol: float = GRAD_SCALE_ATOL,
    rtol: float = GRAD_RTOL,
) -> GradientReport:
    """The backward pass of ``candidate`` against ``reference`` on ``x`` (N x H x W x 3 in [-1, 1]) and ``mask``
    (N x H x W x 1 in [0, 1]), row by row in backward order; then ``steps`` optimiser steps, every array after
    each. ``exact``: the float64 build that arbitrates (None: no arbitration); ``candidate_exact``: the compared
    side in float64, measured against ``exact`` (``GradientReport.float64_agreement``).

    Raises:
        ValueError: an unknown optimizer, a negative step count or learning rate.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    if steps < 0:
        raise ValueError(f"train steps must be >= 0; got {steps}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a finite number > 0; got {lr}")
    ref = reference.backward(x, mask, training)
    ours = candidate.backward(x, mask, training)
    best = None if exact is None else exact.backward(x, mask, training)
    paths = [key for key in ref.grads if "/" in key]
    report = GradientReport(
        training,
        ref.loss,
        ours.loss,
        None if best is None else best.loss,
        tolerance={"scale_atol": scale_atol, "rtol": rtol},
    )
    report.not_compared = sorted(ref.missing | ours.missing)
    for layer, names in row_entries(paths).items():
        entries = [
            judge(n, ref.grads[n], ours.grads[n], None if best is None else best.grads[n], scale_atol, rtol)
            for n in names
            if n in ref.grads and n in ours.grads and n not in report.not_compared
        ]
        report.rows.append(GradientRow(layer, entries))
    if best is not None and candidate_exact is not None:
        report.float64_agreement = float64_agreement(candidate_exact.backward(x, mask, training), best)
    if steps:
        report.optimizer = {"name": optimizer, "lr": lr, "steps": steps}
        report.tolerance |= {"step_atol": STEP_ATOL_PER_LR * lr, "step_rtol": STEP_RTOL}
        ref_run = reference.train(x, mask, steps, optimizer, lr, training)
        our_run = candidate.train(x, mask, steps, optimizer, lr, training)
        exact_run = None if exact is None else exact.train(x, mask, steps, optimizer, lr, training)
        for step in range(steps):
            entries = []
            for path, expected in ref_run.arrays[step].items():
                best_value = None if exact_run is None else exact_run.arrays[step][path]
                atol = STEP_ATOL_PER_LR * lr * (step + 1)
                entries.append(judge(path, expected, our_run.arrays[step][path], best_value, 0.0, STEP_RTOL, atol))
            report.steps.append(StepResult(step + 1, ref_run.losses[step], our_run.losses[step], entries))
    return report


def float64_agreement(candidate: Backward, exact: Backward) -> dict[str, Any]:
    """The worst |candidate - exact| over the entry's largest exact magnitude, over every entry both have."""
    worst, where = 0.0, None
    for name, value in exact.grads.items():
        if name in exact.missing or name not in candidate.grads or name in candidate.missing:
            continue
        scale = float(np.max(np.abs(value), initial=0.0))
        if scale > 0:
            ratio = float(np.max(np.abs(candidate.grads[name] - value))) / scale
            if ratio >= worst:
                worst, where = ratio, name
    return {"max_relative_to_scale": worst, "entry": where}


def gradient_sides(sides: Any) -> tuple[GradientSide, GradientSide, GradientSide, GradientSide]:
    """The reference, its float64 build, the compared model and its float64 build, from a run's ``sides.Sides``.

    Raises:
        ParityInputError: the reference or the compared side cannot be differentiated here.
    """
    from .errors import ParityInputError
    from .sides import OFFICIAL

    if sides.about.get("kind") != OFFICIAL:
        raise ParityInputError(
            "--gradients / --train-steps compare with the original code's training: give --reference official "
            "(or official:DIR)"
        )
    model = sides.compared.model
    if not isinstance(model, ManTraNet):
        raise ParityInputError(
            f"--gradients / --train-steps need a mantranet-torch model (WEIGHTS.h5 converted or --torch-weights); "
            f"{sides.compared.description} is not one"
        )
    return (
        OfficialGradients(sides.reference),
        OfficialGradients(sides.exact),
        TorchGradients(model),
        TorchGradients(model, dtype=torch.float64, description="PyTorch (float64)"),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def render_gradients(report: GradientReport, label: str = "ref") -> str:
    """The backward rows and the optimiser steps as a text table, with the verdict's line."""
    lines = [
        f"gradients ({'training' if report.training else 'inference'}-mode bnorm), loss {label} "
        f"{report.reference_loss:.7g}, torch {report.torch_loss:.7g}"
        + ("" if report.exact_loss is None else f", float64 {report.exact_loss:.10g}"),
        f"{'row':<16}{'gradient':<38}{'scale':>9}{'max':>9}{'max/scale':>10}{'torch-f64':>10}"
        f"{label + '-f64':>10}  status",
    ]
    for row in report.rows:
        for entry in row.entries:
            c, a = entry.comparison, entry.attribution
            scale = c.scale or 0.0
            ratio = None if not scale or c.max_abs is None else c.max_abs / scale
            t64 = None if a is None or not scale else a.torch_max_abs / scale
            r64 = None if a is None or not scale else a.reference_max_abs / scale
            status = "ok" if c.passed else "FAIL"
            lines.append(
                f"{row.layer:<16}{entry.name:<38}{_fmt(scale):>9}{_fmt(c.max_abs):>9}{_fmt(ratio):>10}"
                f"{_fmt(t64):>10}{_fmt(r64):>10}  {status}"
            )
    if report.not_compared:
        lines.append(f"not compared (no gradient on one side): {', '.join(report.not_compared)}")
    if report.float64_agreement is not None:
        agreement = report.float64_agreement
        lines.append(
            f"float64 builds: PyTorch against the {label} within {agreement['max_relative_to_scale']:.1e} of scale "
            f"(worst: {agreement['entry']})"
        )
    for step in report.steps:
        worst = max(step.entries, key=lambda e: e.comparison.max_abs or 0.0)
        failing = [e.name for e in step.entries if not e.comparison.passed]
        lines.append(
            f"step {step.step}: loss {label} {step.reference_loss:.7g}, torch {step.torch_loss:.7g}; worst array "
            f"{worst.name} max {_fmt(worst.comparison.max_abs)}; "
            + (f"FAIL: {', '.join(failing)}" if failing else f"all {len(step.entries)} arrays ok")
        )
    first, step = report.first_divergent_gradient, report.first_divergent_step
    if report.passed:
        lines.append("gradients PASSED" + (f", {len(report.steps)} steps PASSED" if report.steps else ""))
    else:
        where = [] if first is None else [f"first divergent gradient: {first['layer']} ({first['entry']})"]
        where += [] if step is None else [f"first divergent step: {step['step']} ({step['array']})"]
        lines.append("gradients FAILED: " + "; ".join(where))
    return "\n".join(lines)
