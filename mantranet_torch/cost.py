"""The arithmetic ManTraNet does per pixel, counted from the model's own kernels."""

from __future__ import annotations

from torch import nn


def multiply_adds_per_pixel(model: nn.Module) -> dict[str, int]:
    """Multiply-adds per output pixel of every convolution, by Keras layer name.

    Every layer is stride 1 at full resolution, so a k x k convolution from c_in to c_out costs
    k * k * c_in * c_out per pixel. The recurrent layer (ConvLSTM, or ConvGRU: its recurrent kernel is the
    gates' and the candidate's, applied to h and to r h) applies its input kernel at each of its T steps and
    its recurrent kernel at steps 2..T (the state entering step 1 is zero, and so is its convolution).
    Element-wise work (activations, L2, statistics, window means) is not counted.
    """
    counts = {name: _conv(module.weight) for name, module in model.featex.named_children() if name != "b1c1"}
    counts = {"b1c1": _conv(model.featex.b1c1.kernel), **counts}
    detector = model.detector
    steps = model.config.time_steps
    counts["outlierTrans"] = _conv(detector.outlier_trans.weight)
    recurrent = detector.recurrent
    counts[detector.recurrent_name] = steps * _conv(recurrent.kernel) + (steps - 1) * _conv(recurrent.recurrent_kernel)
    counts["pred"] = _conv(detector.pred.weight)
    return counts


def flops_per_pixel(model: nn.Module) -> int:
    """Floating-point operations per pixel: two per multiply-add."""
    return 2 * sum(multiply_adds_per_pixel(model).values())


def _conv(weight: nn.Parameter) -> int:
    c_out, c_in, kh, kw = weight.shape
    return c_out * c_in * kh * kw
