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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from converter.mapping import MAPPING
from mantranet_torch import LAYERS, ManTraNet
from mantranet_torch.training import (
    KERAS_ADAM_BETAS,
    KerasAdam,
    KerasSGD,
    apply_constraints,
    freeze,
    keras_binary_crossentropy,
)

from .compare import Comparison, compare_arrays, from_nhwc, to_nhwc
from .runner import INPUT, LAYER_INPUTS, Attribution, torch_layers

LOSS = "loss"  # the first backward row: the loss's gradient with respect to pred's output
ROWS = (LOSS, *reversed(LAYERS))  # backward order
OPTIMIZERS = ("adam", "sgd")
ADAM_BETA_1, ADAM_BETA_2 = KERAS_ADAM_BETAS
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
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the image and each layer's output


@dataclass
class Trajectory:
    """One side's K optimiser steps: the loss before each step and every Keras array after each step."""

    losses: list[float]
    arrays: list[dict[str, np.ndarray]]


class GradientSide(Protocol):
    """Anything whose training can be compared: its backward pass and its optimiser steps, in Keras' terms."""

    def backward(self, x: np.ndarray, mask: np.ndarray, training: bool) -> Backward: ...

    def vjp(self, name: str, inputs: Sequence[np.ndarray], upstream: np.ndarray, training: bool) -> Backward: ...

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
    # A copy: a float64 parameter's numpy() is the live tensor, which the next step moves
    return np.array(transform.to_keras(value.detach().cpu().double().numpy()), order="C", copy=True)


def _nchw(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    return from_nhwc(np.array(a), dtype)  # a copy: TensorFlow hands out read-only arrays


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
        self._vjp_models: dict[bool, ManTraNet] = {}  # one copy per mode serves every layer's backward pass

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
                # A node of its own per edge, so each consumer's share of a gradient is seen apart (a copy: a
                # layer may work in place on its input).
                inputs.append(outputs[source].clone())
                taken[edge(name, source)] = inputs[-1]
            outputs[name] = layers[name](*inputs)
        taken[edge(LOSS, "pred")] = outputs["pred"]
        values = {name: to_nhwc(out) if name != INPUT else np.asarray(x) for name, out in outputs.items()}
        loss = self.loss(outputs["pred"], _nchw(mask, self.dtype))
        wanted = list(taken.values()) + list(arrays.values())
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        found = {}
        for key, tensor, grad in zip(taken, taken.values(), grads[: len(taken)], strict=True):
            found[key] = to_nhwc(torch.zeros_like(tensor) if grad is None else grad).astype(np.float64)
        for (path, tensor), grad in zip(arrays.items(), grads[len(taken) :], strict=True):
            found[path] = _as_keras(path, grad, tensor)
        return Backward(float(loss.detach()), found, values=values)

    def vjp(self, name: str, inputs: Sequence[np.ndarray], upstream: np.ndarray, training: bool) -> Backward:
        """One layer's backward pass (``LOSS``: the loss's, inputs pred and the mask) at the given NHWC inputs
        and output gradient: the gradients of its inputs and weight arrays, as ``backward``'s entries."""
        if training not in self._vjp_models:
            self._vjp_models[training] = self._copy(training)
        model = self._vjp_models[training]
        arrays = {p: t for p, t in _torch_keras_arrays(model).items() if array_layer(p) == name}
        for tensor in arrays.values():
            tensor.requires_grad_(True)
        if name == LOSS:
            pred = _nchw(inputs[0], self.dtype).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(pred, _nchw(inputs[1], self.dtype)), [pred])
            return Backward(0.0, {edge(LOSS, "pred"): to_nhwc(grad).astype(np.float64)})
        tensors = [_nchw(a, self.dtype).requires_grad_(True) for a in inputs]
        out = torch_layers(model)[name](*tensors)
        wanted = tensors + list(arrays.values())
        grads = torch.autograd.grad(out, wanted, grad_outputs=_nchw(upstream, self.dtype), allow_unused=True)
        found = {}
        for source, tensor, grad in zip(LAYER_INPUTS[name], tensors, grads, strict=False):
            found[edge(name, source)] = to_nhwc(torch.zeros_like(tensor) if grad is None else grad).astype(np.float64)
        for (path, tensor), grad in zip(arrays.items(), grads[len(tensors) :], strict=True):
            found[path] = _as_keras(path, grad, tensor)
        return Backward(0.0, found)

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


class PatchedGradients(TorchGradients):
    """A ``TorchGradients`` whose every call runs inside ``patch()`` (a context manager that swaps a function or
    method of the model for a port's version), so a patched port and the unpatched model can be compared."""

    def __init__(self, model: ManTraNet, patch: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.patch = patch

    def backward(self, x: np.ndarray, mask: np.ndarray, training: bool) -> Backward:
        with self.patch():
            return super().backward(x, mask, training)

    def vjp(self, name: str, inputs: Sequence[np.ndarray], upstream: np.ndarray, training: bool) -> Backward:
        with self.patch():
            return super().vjp(name, inputs, upstream, training)

    def train(
        self, x: np.ndarray, mask: np.ndarray, steps: int, optimizer: str, lr: float, training: bool
    ) -> Trajectory:
        with self.patch():
            return super().train(x, mask, steps, optimizer, lr, training)


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
        values = {name: np.asarray(out) for name, out in outputs.items()}
        return Backward(float(loss), found, missing, values)

    def vjp(self, name: str, inputs: Sequence[np.ndarray], upstream: np.ndarray, training: bool) -> Backward:
        """One official layer's backward pass at the given inputs and output gradient (see ``TorchGradients``)."""
        import tensorflow as tf

        from reference.layers import keras_binary_crossentropy as keras_bce

        dtype = self.official.dtype
        variables = {p: v for p, v in self.official.variables().items() if array_layer(p) == name}
        tensors = [tf.constant(np.asarray(a, dtype=dtype)) for a in inputs]
        restore = self._restoring()
        try:
            with tf.GradientTape() as tape:
                tape.watch(tensors + list(variables.values()))
                if name == LOSS:
                    out = keras_bce(*tensors)
                else:
                    out = self.official.call_layer(name, *tensors, training=training)
            if name == LOSS:
                (grad,) = tape.gradient(out, tensors[:1])
                return Backward(0.0, {edge(LOSS, "pred"): np.asarray(grad, dtype=np.float64)})
            wanted = tensors + list(variables.values())
            grads = tape.gradient(out, wanted, output_gradients=tf.constant(np.asarray(upstream, dtype=dtype)))
        finally:
            restore()
        found, missing = {}, set()
        for source, tensor, grad in zip(LAYER_INPUTS[name], tensors, grads, strict=False):
            found[edge(name, source)] = np.zeros(tensor.shape) if grad is None else np.asarray(grad, np.float64)
        for (path, v), grad in zip(variables.items(), grads[len(tensors) :], strict=True):
            found[path] = np.zeros(v.shape) if grad is None else np.asarray(grad, dtype=np.float64)
            if grad is None and "moving_" in path and not training:
                missing.add(path)
        return Backward(0.0, found, missing)

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
        image, target = tf.constant(np.asarray(x, dtype=dtype)), tf.constant(np.asarray(mask, dtype=dtype))
        trajectory = Trajectory([], [])
        # keras_floatx: the constraints (non_neg) and the optimiser build their constants in Keras' floatx
        try:
            with keras_floatx(dtype):
                # tf_keras' Adam is Keras 2's (epsilon 1e-7, the bias correction folded into the learning rate);
                # A float64 build's betas as float64 tensors, as Keras 2.2 made them (K.variable in floatx):
                # tf_keras' own betas move its float64 steps by 6.6e-6 relative (its learning rate stays a
                # float32 variable: 5e-8 relative, STEP64_ATOL_PER_LR)
                if optimizer == "adam" and dtype == "float64":
                    betas = [tf.constant(b, dtype) for b in (ADAM_BETA_1, ADAM_BETA_2)]
                    opt = tf_keras.optimizers.Adam(lr, beta_1=betas[0], beta_2=betas[1])
                elif optimizer == "adam":
                    opt = tf_keras.optimizers.Adam(lr)  # Python-float betas: tf_keras' own float32 arithmetic
                else:
                    opt = tf_keras.optimizers.SGD(lr)
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
    # An element over tolerance against the reference but within it of the exact value passes, counted as the
    # reference's drift (compare_arrays), as in the forward comparison.
    comparison = compare_arrays(name, expected, actual, atol, rtol, exact)
    attribution = None
    if exact is not None and comparison.shape_mismatch is None:
        attribution = Attribution.of(expected, actual, exact, atol)
    return Entry(name, comparison, attribution)


FLOAT64, LOCAL_F32, FLOAT32 = "float64", "local", "float32"
GRAD_MODES = (FLOAT64, LOCAL_F32, FLOAT32)
# float64 builds of one computation: rounding of ~1e-16 relative, amplified by the backward pass's depth and
# by the chaotic |dev / sigma| a little; measured <= 1e-12 of scale (synthetic and trained detectors).
FLOAT64_SCALE_ATOL = 1e-9
FLOAT64_RTOL = 1e-9
# float64 steps: tf_keras keeps the learning rate in a float32 variable, so each official float64 update is off by
# up to 6e-8 of itself (lr 1e-3 is 1.00000005e-3 in float32), and its batch norm's momentum is float32 (7e-11 on
# the moving averages). Measured with the trained detector on a 48 x 48 photograph crop, lr 1e-3: 8e-8, 2e-7 and
# 2.4e-6 lr after steps 1-3; each step's changed weights reach the chaotic |dev / sigma| again, so the
# difference grows about tenfold a step: the tolerance does too (1e-6 lr, then x10 per step).
STEP64_ATOL_PER_LR = 1e-6
STEP64_GROWTH = 10.0
# bnorm's moving averages move by 0.01 (batch - moving), not by lr: tf_keras' float32 momentum (1 - 0.99 is
# 0.0099999998) puts 2.2e-8 of that update on the official float64 build: judged against their own scale (the
# variance more loosely: _step64_scale_atol).
STEP64_STATISTICS_SCALE_ATOL = 1e-7


class _Judged:
    """What a gradient row and an optimiser step share: entries per mode, some modes judged."""

    modes: dict[str, list[Entry]]
    judged: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return all(e.comparison.passed for mode in self.judged for e in self.modes.get(mode, []))

    def failing(self) -> tuple[str, str] | None:
        """The first (mode, entry) over tolerance among the judged modes."""
        for mode in self.judged:
            for entry in self.modes.get(mode, []):
                if not entry.comparison.passed:
                    return mode, entry.name
        return None


@dataclass
class GradientRow(_Judged):
    """One layer's backward pass (or the loss's): its input and weight gradients compared, per mode.

    ``float64``: both sides rebuilt in float64, each on its own forward and backward values (cumulative, as in
    use): judged. ``local``: float32, each side's backward pass of this layer alone at the reference's own
    inputs and output gradient, so its error is the layer's own (arbitrated by the reference's float64 build
    at those inputs): judged. ``float32``: float32 cumulative, as a float32 training step sees it: reported with
    each side's distance from float64; judged only when no float64 build is given.
    """

    layer: str
    modes: dict[str, list[Entry]] = field(default_factory=dict)
    judged: tuple[str, ...] = (FLOAT64, LOCAL_F32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "passed": self.passed,
            "judged": list(self.judged),
            **{mode: [e.to_dict() for e in entries] for mode, entries in self.modes.items()},
        }


@dataclass
class StepResult(_Judged):
    """Every Keras array after one optimiser step, per mode (``float64`` judged; ``float32`` reported)."""

    step: int
    reference_loss: float
    torch_loss: float
    modes: dict[str, list[Entry]] = field(default_factory=dict)
    judged: tuple[str, ...] = (FLOAT64,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "passed": self.passed,
            "reference_loss": self.reference_loss,
            "torch_loss": self.torch_loss,
            "judged": list(self.judged),
            **{mode: [e.to_dict() for e in entries] for mode, entries in self.modes.items()},
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

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows) and all(s.passed for s in self.steps)

    @property
    def first_divergent_gradient(self) -> dict[str, str] | None:
        """The first backward row over tolerance, walking back from the loss: its layer, mode and entry.

        Local mode first: it isolates each layer's backward pass (a forward difference, e.g. bnorm on moving
        statistics while training, moves every cumulative gradient from the loss on); then the others.
        """
        for mode in (LOCAL_F32, FLOAT64, FLOAT32):
            for row in self.rows:
                if mode not in row.judged:
                    continue
                failing = [e.name for e in row.modes.get(mode, []) if not e.comparison.passed]
                if failing:
                    return {"layer": row.layer, "mode": mode, "entry": failing[0]}
        return None

    @property
    def first_reference_drift(self) -> dict[str, str] | None:
        """The first backward row (local mode first) where the reference, not the compared side, is off the float64
        value beyond tolerance: where the reference's backward pass parts ways (e.g. a reference side built with a
        wrong gradient)."""
        for mode in (LOCAL_F32, FLOAT64, FLOAT32):
            for row in self.rows:
                for entry in row.modes.get(mode, []) if mode in row.judged else []:
                    a = entry.attribution
                    if entry.comparison.reference_drift and a is not None and a.further_from_exact == "reference":
                        return {"layer": row.layer, "mode": mode, "entry": entry.name}
        return None

    @property
    def first_divergent_step(self) -> dict[str, Any] | None:
        """The first optimiser step with an array over tolerance: its number, mode, array and layer."""
        for step in self.steps:
            found = step.failing()
            if found is not None:
                return {"step": step.step, "mode": found[0], "array": found[1], "layer": array_layer(found[1])}
        return None

    def worst(self, mode: str) -> dict[str, Any] | None:
        """The largest |torch - reference| over its entry's scale in ``mode``, over every row."""
        found = None
        for row in self.rows:
            for entry in row.modes.get(mode, []):
                c = entry.comparison
                if c.scale and c.max_abs is not None and (found is None or c.max_abs / c.scale > found["ratio"]):
                    found = {"ratio": c.max_abs / c.scale, "layer": row.layer, "entry": entry.name}
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "first_divergent_gradient": self.first_divergent_gradient,
            "first_divergent_step": self.first_divergent_step,
            "first_reference_drift": self.first_reference_drift,
            "training_mode": self.training,
            "loss": {"reference": self.reference_loss, "torch": self.torch_loss, "exact": self.exact_loss},
            "tolerance": self.tolerance,
            "not_compared": self.not_compared,
            "worst_relative_to_scale": {mode: self.worst(mode) for mode in GRAD_MODES},
            "optimizer": self.optimizer,
            "rows": [r.to_dict() for r in self.rows],
            "steps": [s.to_dict() for s in self.steps],
        }


def _upstream(name: str, grads: dict[str, np.ndarray]) -> np.ndarray:
    """The gradient of the loss with respect to ``name``'s output: the sum over the layers that take it in."""
    if name == "pred":
        return grads[edge(LOSS, "pred")]
    consumers = [layer for layer, sources in LAYER_INPUTS.items() if name in sources]
    return sum(grads[edge(layer, name)] for layer in consumers)


def _entries(
    names: Sequence[str],
    expected: Backward,
    actual: Backward,
    exact: Backward | None,
    skip: Sequence[str],
    scale_atol: float,
    rtol: float,
) -> list[Entry]:
    return [
        judge(n, expected.grads[n], actual.grads[n], None if exact is None else exact.grads[n], scale_atol, rtol)
        for n in names
        if n in expected.grads and n in actual.grads and n not in skip
    ]


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
    rows: bool = True,
) -> GradientReport:
    """The backward pass of ``candidate`` against ``reference`` on ``x`` (N x H x W x 3 in [-1, 1]) and ``mask``
    (N x H x W x 1 in [0, 1]), row by row in backward order (``GradientRow``'s modes); then ``steps`` optimiser
    steps, every array after each. ``exact`` and ``candidate_exact``: the float64 builds of the two sides; with
    both, the float64 and local modes are judged and the float32 cumulative one is reported; without, the float32
    cumulative mode is judged (as the reference's own float32 errors allow: ``judge``).

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
    both64 = exact is not None and candidate_exact is not None
    judged = (FLOAT64, LOCAL_F32) if both64 else (FLOAT32,)
    if not rows:  # the optimiser steps alone
        report = GradientReport(training, math.nan, math.nan, None)
        _compare_steps(report, reference, candidate, exact, candidate_exact, x, mask, training, steps, optimizer, lr)
        return report
    ref = reference.backward(x, mask, training)
    ours = candidate.backward(x, mask, training)
    best = None if exact is None else exact.backward(x, mask, training)
    ours64 = candidate_exact.backward(x, mask, training) if both64 else None
    paths = [key for key in ref.grads if "/" in key]
    report = GradientReport(
        training,
        ref.loss,
        ours.loss,
        None if best is None else best.loss,
        tolerance={"scale_atol": scale_atol, "rtol": rtol, "float64_scale_atol": FLOAT64_SCALE_ATOL},
        not_compared=sorted(ref.missing | ours.missing | (set() if best is None else best.missing)),
    )
    skip = report.not_compared
    for layer, names in row_entries(paths).items():
        row = GradientRow(layer, judged=judged)
        row.modes[FLOAT32] = _entries(names, ref, ours, best, skip, scale_atol, rtol)
        if both64:
            row.modes[FLOAT64] = _entries(names, best, ours64, None, skip, FLOAT64_SCALE_ATOL, FLOAT64_RTOL)
            if layer == LOSS:
                inputs, upstream = [ref.values["pred"], mask], None
            else:
                inputs = [ref.values[source] for source in LAYER_INPUTS[layer]]
                upstream = _upstream(layer, ref.grads)
            local_ref = reference.vjp(layer, inputs, upstream, training)
            local_exact = exact.vjp(layer, inputs, upstream, training)
            local_ours = candidate.vjp(layer, inputs, upstream, training)
            row.modes[LOCAL_F32] = _entries(names, local_ref, local_ours, local_exact, skip, scale_atol, rtol)
        report.rows.append(row)
    _compare_steps(report, reference, candidate, exact, candidate_exact, x, mask, training, steps, optimizer, lr)
    return report


def _step64_scale_atol(path: str, x: np.ndarray, step: int) -> float:
    """The float64 steps' tolerance for bnorm's statistics, as a fraction of their scale (0 for the others)."""
    if "/moving_mean" in path:
        return STEP64_STATISTICS_SCALE_ATOL
    if "/moving_variance" in path:
        # tf_keras' float64 batch norm (not its fused float32 kernel) moves the variance with the batch's
        # population variance, without n / (n - 1): 1 / n of the new value at most, per step
        return STEP64_STATISTICS_SCALE_ATOL + 2.0 * step / int(np.prod(np.shape(x)[:3]))
    return 0.0


def _compare_steps(
    report: GradientReport,
    reference: GradientSide,
    candidate: GradientSide,
    exact: GradientSide | None,
    candidate_exact: GradientSide | None,
    x: np.ndarray,
    mask: np.ndarray,
    training: bool,
    steps: int,
    optimizer: str,
    lr: float,
) -> None:
    """``steps`` optimiser steps on every side, every array after each compared (``report.steps``)."""
    if not steps:
        return
    both64 = exact is not None and candidate_exact is not None
    report.optimizer = {"name": optimizer, "lr": lr, "steps": steps}
    report.tolerance |= {"step_atol": STEP_ATOL_PER_LR * lr, "step_rtol": STEP_RTOL}
    runs = {FLOAT32: (reference, candidate, exact)}
    if both64:
        runs[FLOAT64] = (exact, candidate_exact, None)
    trained: dict[int, Trajectory] = {}

    def run(side: GradientSide | None) -> Trajectory | None:
        if side is not None and id(side) not in trained:  # the float64 reference serves both modes: run once
            trained[id(side)] = side.train(x, mask, steps, optimizer, lr, training)
        return None if side is None else trained[id(side)]

    trajectories = {mode: [run(side) for side in sides] for mode, sides in runs.items()}
    step_judged = (FLOAT64,) if both64 else (FLOAT32,)
    for step in range(steps):
        ref_run, our_run, _ = trajectories[FLOAT32]
        result = StepResult(step + 1, ref_run.losses[step], our_run.losses[step], judged=step_judged)
        for mode, (expected_run, actual_run, exact_run) in trajectories.items():
            if mode == FLOAT32:
                atol = STEP_ATOL_PER_LR * lr * (step + 1)
            else:
                atol = STEP64_ATOL_PER_LR * lr * STEP64_GROWTH**step
            step_rtol = STEP_RTOL if mode == FLOAT32 else FLOAT64_RTOL
            result.modes[mode] = [
                judge(
                    path,
                    expected,
                    actual_run.arrays[step][path],
                    None if exact_run is None else exact_run.arrays[step][path],
                    _step64_scale_atol(path, x, step + 1) if mode == FLOAT64 else 0.0,
                    step_rtol,
                    atol,
                )
                for path, expected in expected_run.arrays[step].items()
            ]
        report.steps.append(result)


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
    """The backward rows (max |torch - reference| over the entry's scale, per mode) and the optimiser steps as a
    text table, with the verdict's line."""
    lines = [
        f"gradients ({'training' if report.training else 'inference'}-mode bnorm), loss {label} "
        f"{report.reference_loss:.7g}, torch {report.torch_loss:.7g}"
        + ("" if report.exact_loss is None else f", float64 {report.exact_loss:.10g}"),
        f"{'row':<16}{'gradient':<38}{'scale':>9}{'f64':>9}{'local':>9}{'f32':>9}{'torch-f64':>10}"
        f"{label + '-f64':>14}  status",
    ]
    for row in report.rows:
        by_name: dict[str, dict[str, Entry]] = {}
        for mode, entries in row.modes.items():
            for entry in entries:
                by_name.setdefault(entry.name, {})[mode] = entry
        for name, modes in by_name.items():
            cells, failed = [], []
            head = modes.get(FLOAT32) or next(iter(modes.values()))
            scale = head.comparison.scale or 0.0
            for mode in GRAD_MODES:
                entry = modes.get(mode)
                c = None if entry is None else entry.comparison
                ratio = None if c is None or c.max_abs is None or not c.scale else c.max_abs / c.scale
                cells.append(f"{_fmt(ratio):>9}")
                if c is not None and not c.passed and mode in row.judged:
                    failed.append(mode)
            a = head.attribution
            t64 = None if a is None or not scale else a.torch_max_abs / scale
            r64 = None if a is None or not scale else a.reference_max_abs / scale
            status = "FAIL " + ",".join(failed) if failed else "ok"
            lines.append(
                f"{row.layer:<16}{name:<38}{_fmt(scale):>9}{''.join(cells)}{_fmt(t64):>10}{_fmt(r64):>14}  {status}"
            )
    if report.not_compared:
        lines.append(f"not compared (no gradient on one side): {', '.join(report.not_compared)}")
    for step in report.steps:
        parts = []
        for mode, entries in step.modes.items():
            worst = max(entries, key=lambda e: e.comparison.max_abs or 0.0)
            failing = [e.name for e in entries if not e.comparison.passed]
            verdict = ("FAIL: " + ", ".join(failing)) if failing and mode in step.judged else "ok"
            verdict = verdict if mode in step.judged else "reported"
            parts.append(f"{mode} worst {worst.name} {_fmt(worst.comparison.max_abs)} ({verdict})")
        lines.append(
            f"step {step.step}: loss {label} {step.reference_loss:.7g}, torch {step.torch_loss:.7g}; "
            + "; ".join(parts)
        )
    drift = report.first_reference_drift
    if drift is not None:
        lines.append(
            f"the {label} side is off float64 first at {drift['layer']} ({drift['mode']}: {drift['entry']}); "
            "PyTorch is within tolerance of float64 there"
        )
    first, step = report.first_divergent_gradient, report.first_divergent_step
    if report.passed:
        lines.append("gradients PASSED" + (f", {len(report.steps)} steps PASSED" if report.steps else ""))
    else:
        where = (
            [] if first is None else [f"first divergent gradient: {first['layer']} ({first['mode']}: {first['entry']})"]
        )
        where += [] if step is None else [f"first divergent step: {step['step']} ({step['mode']}: {step['array']})"]
        lines.append("gradients FAILED: " + "; ".join(where))
    return "\n".join(lines)
