"""Training ManTraNet as the original Keras 2 code trains it: the pieces a training step is made of.

    model.train()                                   # bnorm on batch statistics (``KerasBatchNorm``)
    loss = F.binary_cross_entropy_with_logits(model.logits(x), mask)
    loss.backward(); optimizer.step()               # ``KerasAdam``: Keras' Adam, epsilon 1e-7
    apply_constraints(model)                        # what Keras does after every optimiser step

The original model declares three weight constraints, which Keras' optimisers apply to a weight right after
updating it (never in the forward pass, and never to a frozen weight):

- ``Featex/b1c1/bayar_kernel``: the Bayar constraint (centre tap 0, the rest divided by their sum plus
  ``KERAS_EPSILON``, centre tap -1);
- ``outlierTrans/kernel``: ``unit_norm(axis=-2)``, each output's kernel divided by ``KERAS_EPSILON`` plus its
  L2 norm over the input channels (Keras' HWIO axis -2 is the input channels; PyTorch's OIHW dim 1);
- ``glbStd/min_std``: ``non_neg()``, negative entries set to zero.

The SRM kernels are constants and never train. Everything here is ground floor: it imports only the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import KERAS_EPSILON, bayar_constraint
from .model import ManTraNet

# What ``freeze`` can hold fixed, as the official ``create_model`` allows: nothing; the first four convolutions
# (b1c1 .. b2c2, as releases 0-3 were trained: the first five layers of the Keras Featex model, its input
# included); or the whole feature extractor (training the detector alone).
FREEZE_CHOICES = ("none", "first5", "featex")
FIRST5_LAYERS = ("b1c1", "b1c2", "b2c1", "b2c2")

# Keras 2's Adam defaults (``keras.optimizers.Adam``). PyTorch's ``torch.optim.Adam`` defaults to eps 1e-8 and
# adds it to the bias-corrected sqrt(v); Keras adds 1e-7 to the raw sqrt(v) and folds the bias correction into
# the learning rate, so the two differ most in the first steps and wherever v is small.
KERAS_ADAM_LR = 1e-3
KERAS_ADAM_BETAS = (0.9, 0.999)


def keras_binary_crossentropy(prediction: Tensor, target: Tensor) -> Tensor:
    """Keras 2.2's ``binary_crossentropy`` on probabilities, averaged over every element, as ``fit`` averages it.

    Keras 2.2 (TensorFlow backend) clips the prediction to ``[KERAS_EPSILON, 1 - KERAS_EPSILON]``, turns it back
    into a logit ``log(p / (1 - p))`` and takes ``sigmoid_cross_entropy_with_logits`` of that; the gradient is
    zero where the clip is active. For training from logits, ``binary_cross_entropy_with_logits(model.logits(x))``
    is the same loss without the clip; never give that function ``model(x)`` (a second sigmoid).

    Args:
        prediction: probabilities (``model(x)``), any shape.
        target: the mask, same shape, in [0, 1].

    Returns:
        The mean loss, a 0-d tensor.
    """
    p = prediction.clamp(KERAS_EPSILON, 1 - KERAS_EPSILON)
    logits = torch.log(p / (1 - p))
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def unit_norm(kernel: Tensor, dim: int = 1) -> Tensor:
    """Keras' ``unit_norm`` constraint: ``w / (epsilon + sqrt(sum(w^2, dim)))``. Returns a new tensor.

    Args:
        kernel: an OIHW kernel.
        dim: the axis normalised over; 1, the input channels, is Keras' HWIO axis -2.
    """
    return kernel / (KERAS_EPSILON + kernel.square().sum(dim=dim, keepdim=True).sqrt())


def non_neg(weight: Tensor) -> Tensor:
    """Keras' ``non_neg`` constraint: ``w * (w >= 0)``. Returns a new tensor."""
    return weight * (weight >= 0).to(weight.dtype)


def constraints(model: ManTraNet) -> dict[str, tuple[nn.Parameter, Callable[[Tensor], Tensor]]]:
    """The original's weight constraints, by the parameter's name in ``model.state_dict()``.

    Returns:
        name -> (the parameter, the function that returns its constrained value).
    """
    return {
        "featex.b1c1.bayar_kernel": (model.featex.b1c1.bayar_kernel, bayar_constraint),
        "detector.outlier_trans.weight": (model.detector.outlier_trans.weight, unit_norm),
        "detector.glb_std.min_std": (model.detector.glb_std.min_std, non_neg),
    }


@torch.no_grad()
def apply_constraints(model: ManTraNet) -> list[str]:
    """Apply every constraint of the original to the trainable weights, in place, as Keras does after a step.

    A frozen weight (``requires_grad`` False) is left as it is, as Keras leaves a non-trainable one: re-applying
    the Bayar constraint to a constrained kernel is not a no-op in float32 (the division by 1 + 1e-7 moves it).

    Args:
        model: the model, after ``optimizer.step()``.

    Returns:
        The names of the parameters constrained.
    """
    done = []
    for name, (param, constrain) in constraints(model).items():
        if param.requires_grad:
            param.copy_(constrain(param))
            done.append(name)
    return done


def freeze(model: ManTraNet, which: str = "none") -> list[str]:
    """Hold part of the model fixed (``requires_grad`` False) as the official ``create_model`` can.

    Args:
        model: the model; every parameter not frozen here is made trainable.
        which: "none", "first5" (b1c1 .. b2c2) or "featex" (the whole feature extractor).

    Returns:
        The names of the frozen parameters.

    Raises:
        ValueError: ``which`` is not one of ``FREEZE_CHOICES``.
    """
    if which not in FREEZE_CHOICES:
        raise ValueError(f"freeze must be one of {', '.join(FREEZE_CHOICES)}; got {which!r}")
    frozen = []
    for name, param in model.named_parameters():
        part, layer = name.split(".")[:2]
        hold = (which == "featex" and part == "featex") or (
            which == "first5" and part == "featex" and layer in FIRST5_LAYERS
        )
        param.requires_grad_(not hold)
        if hold:
            frozen.append(name)
    return frozen


class _KerasOptimizer(torch.optim.Optimizer):
    """The loop every Keras optimiser here shares: each parameter with a gradient, updated by ``_update``."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, self.state[p])
        return loss

    def _update(self, p: Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError


class KerasAdam(_KerasOptimizer):
    """Adam as Keras 2 computes it (``keras.optimizers.Adam``; tf_keras' Adam computes the same).

    Per step t: ``m += (g - m) (1 - beta_1)``, ``v += (g^2 - v) (1 - beta_2)``, then
    ``p -= lr_t m / (sqrt(v) + epsilon)`` with ``lr_t = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)``, all in the
    parameter's dtype, in tf_keras' order of operations.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (Keras' default 1e-3).
        betas: (beta_1, beta_2) (Keras' defaults 0.9, 0.999).
        eps: added to sqrt(v); Keras' default ``KERAS_EPSILON`` = 1e-7, not PyTorch's 1e-8.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = KERAS_ADAM_LR,
        betas: tuple[float, float] = KERAS_ADAM_BETAS,
        eps: float = KERAS_EPSILON,
    ) -> None:
        if not (0 <= lr < math.inf and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and 0 <= eps < math.inf):
            raise ValueError(f"Adam needs lr >= 0, 0 <= betas < 1 and eps >= 0; got lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    def _update(self, p: Tensor, group: dict, state: dict) -> None:
        beta_1, beta_2 = group["betas"]
        if not state:
            state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["step"] += 1
        g, m, v = p.grad, state["m"], state["v"]
        # The powers and lr_t in the parameter's dtype, as Keras computes them (float32 tensors)
        t = torch.tensor(float(state["step"]), dtype=p.dtype)
        b1 = torch.tensor(beta_1, dtype=p.dtype)
        b2 = torch.tensor(beta_2, dtype=p.dtype)
        lr_t = torch.tensor(group["lr"], dtype=p.dtype) * torch.sqrt(1 - b2**t) / (1 - b1**t)
        m.add_((g - m) * (1 - beta_1))  # 1 - beta in Python floats, then cast, as tf_keras does
        v.add_((g.square() - v) * (1 - beta_2))
        p.sub_(m * lr_t.to(p.device) / (v.sqrt() + group["eps"]))


class KerasSGD(_KerasOptimizer):
    """SGD as Keras 2 computes it: ``velocity = momentum velocity - lr g``, then ``p += velocity``
    (Nesterov: ``p += momentum velocity - lr g``).

    Equal to ``torch.optim.SGD`` in exact arithmetic (PyTorch keeps ``velocity / -lr`` instead), not in float32
    rounding, and not at all once the learning rate changes between steps.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (Keras' default 0.01).
        momentum: 0 for plain SGD.
        nesterov: Nesterov momentum.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False
    ) -> None:
        if not (0 <= lr < math.inf and 0 <= momentum < 1):
            raise ValueError(f"SGD needs lr >= 0 and 0 <= momentum < 1; got lr={lr}, momentum={momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov})

    def _update(self, p: Tensor, group: dict, state: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        if momentum == 0:
            p.sub_(p.grad * lr)
            return
        velocity = state.setdefault("velocity", torch.zeros_like(p))
        velocity.mul_(momentum).sub_(p.grad * lr)
        p.add_(velocity * momentum - p.grad * lr if group["nesterov"] else velocity)
