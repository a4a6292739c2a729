"""The custom pieces of ManTraNet, each computing what the Keras 2.2 / TensorFlow 1.8 original computes.

Every TensorFlow behaviour the original relies on is spelled out here as a named constant or function
rather than left to a PyTorch default that happens to differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FIXED_FIRST_LAYER_FILTERS

BN_EPSILON = 1e-3  # Keras BatchNormalization default epsilon
BN_MOMENTUM = 0.99  # Keras BatchNormalization default momentum (the moving averages keep 99% per step)
L2_EPSILON = 1e-12  # tf.nn.l2_normalize clamps the *squared* norm at this value
STD_FLOOR = 1e-6  # GlobalStd2D adds min_std_val / 10 = 1e-5 / 10 to the stored min_std
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(): the Bayar and unit_norm constraints, and Keras' Adam
BAYAR_EPSILON = KERAS_EPSILON
HARD_SIGMOID_SLOPE = 0.2  # Keras 2 hard sigmoid: clip(0.2 x + 0.5, 0, 1); Keras 3 and torch use 1/6
HARD_SIGMOID_OFFSET = 0.5


def hard_sigmoid_keras2(x: Tensor) -> Tensor:
    """Keras 2's hard sigmoid, ``clip(0.2 x + 0.5, 0, 1)`` (not ``torch.nn.functional.hardsigmoid``)."""
    return (x * HARD_SIGMOID_SLOPE).add_(HARD_SIGMOID_OFFSET).clamp_(0.0, 1.0)


def l2_normalize_tf(x: Tensor, dim: int = 1) -> Tensor:
    """``tf.nn.l2_normalize``: ``x * rsqrt(max(sum(x^2), 1e-12))``.

    ``torch.nn.functional.normalize`` clamps the norm instead of its square, which differs for
    near-zero vectors.
    """
    square_sum = x.square().sum(dim=dim, keepdim=True)
    return x * torch.rsqrt(torch.clamp(square_sum, min=L2_EPSILON))


def recording() -> bool:
    """True while ``torch.compile``, ``torch.export`` (and so the ONNX exporter) or TorchScript records the model.

    The layers then take their shape-generic form: one graph for every image size (no branch on a size, no
    image-by-image loop over the batch) and no writes into strided views. Same arithmetic as in eager mode, where
    the layers keep their faster, leaner form.
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def _symmetric_index(size: int, pad: int, device: torch.device) -> Tensor:
    """Indices of the periodic symmetric extension (as numpy's ``mode='symmetric'``)."""
    period = _scalar(2 * size, torch.int64, device)  # a tensor: exporters take no symbolic scalar divisor
    idx = torch.remainder(torch.arange(-pad, size + pad, device=device), period)
    return torch.where(idx < size, idx, 2 * size - 1 - idx)


def _symmetric_pad_dim(x: Tensor, pad: int, dim: int) -> Tensor:
    size = x.shape[dim]
    if pad <= size:  # the only case tf.pad accepts: two mirrored slices, no gather
        head = x.narrow(dim, 0, pad).flip(dim)
        tail = x.narrow(dim, size - pad, pad).flip(dim)
        return torch.cat([head, x, tail], dim=dim)
    # Wider than the image (a 1-pixel side under the 5x5 layer): continue the mirroring periodically.
    return x.index_select(dim, _symmetric_index(size, pad, x.device))


def symmetric_pad(x: Tensor, pad: int) -> Tensor:
    """Pad H and W (the last two dims) by ``pad`` on each side as ``tf.pad(mode='SYMMETRIC')`` does.

    The edge pixel is repeated: ``[b a | a b c ... y z | z y]``. For pad 1 this equals replicate
    padding; it never equals PyTorch's ``reflect``.
    """
    if pad == 0:
        return x
    if recording():  # one gather per side, valid for any size (a 1-pixel side under the 5x5 layer too)
        x = x.index_select(-1, _symmetric_index(x.shape[-1], pad, x.device))
        return x.index_select(-2, _symmetric_index(x.shape[-2], pad, x.device))
    return _symmetric_pad_dim(_symmetric_pad_dim(x, pad, -1), pad, -2)


def symmetric_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """A stride-1 'valid' convolution of ``symmetric_pad(x, k // 2)``, computed without the padded copy.

    The convolution runs channels-last (oneDNN's fast layout) with zero padding inside the kernel; then
    the outermost k//2 rows and columns, the only outputs that see the padding, are recomputed from
    symmetrically padded strips. Same sums, without a full-size padded copy of every activation.
    relu: apply ReLU to the output (fused into the convolution at inference, see ``conv2d``).
    """
    if recording():
        return _plain_conv2d(symmetric_pad(x, weight.shape[-1] // 2), weight, bias, relu)
    if x.shape[0] > 1:  # image by image: oneDNN's batched kernels sum in another order than its single-image ones
        return torch.cat([_symmetric_conv2d_image(x[i : i + 1], weight, bias, relu) for i in range(x.shape[0])])
    return _symmetric_conv2d_image(x, weight, bias, relu)


def _symmetric_conv2d_image(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    pad = weight.shape[-1] // 2
    x = x.contiguous(memory_format=torch.channels_last)
    h, w = x.shape[-2:]
    if pad == 0 or min(h, w) <= 4 * pad:  # small inputs: the strips would cover most of the image
        return _plain_conv2d(symmetric_pad(x, pad), weight, bias, relu)
    # Fused: ReLU inside each convolution. Otherwise once at the end: autograd keeps ReLU's output, unwritten after.
    fuse = relu and _fused_relu_dtype(x, weight) is not None
    out = conv2d(x, weight, bias, pad, fuse)
    strip = 2 * pad  # the rows an edge output row reads, once the padding is mirrored in
    out[..., :pad, :] = _plain_conv2d(symmetric_pad(x[..., :strip, :], pad), weight, bias, fuse)[..., :pad, :]
    out[..., -pad:, :] = _plain_conv2d(symmetric_pad(x[..., -strip:, :], pad), weight, bias, fuse)[..., -pad:, :]
    out[..., :, :pad] = _plain_conv2d(symmetric_pad(x[..., :, :strip], pad), weight, bias, fuse)[..., :, :pad]
    out[..., :, -pad:] = _plain_conv2d(symmetric_pad(x[..., :, -strip:], pad), weight, bias, fuse)[..., :, -pad:]
    return F.relu_(out) if relu and not fuse else out


def _plain_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    """A small convolution as ``F.conv2d`` runs it (PyTorch's own kernels below oneDNN's size threshold)."""
    out = F.conv2d(x, weight, bias)
    return F.relu_(out) if relu else out


def fused_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype in which oneDNN's fused convolutions (``conv2d``) may compute on ``x``, or None where they may not.

    Inference only: autograd off, not recording, on a CPU with oneDNN enabled, in float32 or in bfloat16 (x's own, or
    autocast's for a float32 x) where oneDNN has bfloat16 instructions to use (so never under an ISA cap without them).
    """
    if torch.is_grad_enabled() or recording() or x.device.type != "cpu" or not torch.backends.mkldnn.enabled:
        return None
    dtype = x.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    if dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return dtype
    return None


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int = 0, relu: bool = False) -> Tensor:
    """``F.conv2d`` (stride 1, zero ``padding``), then ReLU when ``relu``.

    At inference on CPU, one oneDNN convolution with ReLU as its post-op (``mkldnn._convolution_pointwise``, the
    kernel Inductor's CPU path calls), without a second pass over the output: the same sums as ``F.conv2d``, bit for
    bit, wherever ``F.conv2d`` itself runs oneDNN (all but the smallest inputs, which it gives PyTorch's own kernels;
    there the two differ by float32 rounding). Under bfloat16 autocast, x, weight and bias are cast as autocast
    casts them.
    """
    dtype = _fused_relu_dtype(x, weight) if relu else None
    if dtype is None:
        out = F.conv2d(x, weight, bias, padding=padding)
        return F.relu_(out) if relu else out
    x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [padding, padding], _ONES, _ONES, 1, "relu", [], "")


def _fused_relu_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """``fused_dtype(x)``, but None for mixed dtypes outside autocast: F.conv2d's own error, not a silent cast."""
    dtype = fused_dtype(x)
    if dtype is not None and not torch.is_autocast_enabled("cpu") and weight.dtype != x.dtype:
        return None
    return dtype


_ONES = [1, 1]  # stride and dilation of every convolution here


# relu is applied inside the convolution (see conv2d); the others run on its fresh output.
_ACTIVATIONS = {None: nn.Identity, "relu": nn.Identity, "tanh": nn.Tanh}


class SymmetricConv2d(nn.Conv2d):
    """Keras ``Conv2DSymPadding``: symmetric padding of k//2, a 'valid' stride-1 convolution, activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        activation: str | None = "relu",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)
        self.relu = activation == "relu"
        self.act = _ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(symmetric_conv2d(x, self.weight, self.bias, relu=self.relu))


def srm_kernels() -> Tensor:
    """The nine fixed SRM filters, OIHW (9, 3, 5, 5): channel 3*i + c applies SRM filter i to input channel c."""
    # float32 throughout, so each tap is the float32 quotient the original computes
    srm1 = np.zeros((5, 5), dtype=np.float32)
    srm1[1:-1, 1:-1] = [[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]
    srm1 /= np.float32(4)
    srm2 = np.array(
        [[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]],
        dtype=np.float32,
    )
    srm2 /= np.float32(12)
    srm3 = np.zeros((5, 5), dtype=np.float32)
    srm3[2, 1:-1] = [1, -2, 1]
    srm3 /= np.float32(2)
    kernel = np.zeros((9, 3, 5, 5), dtype=np.float32)
    for i, srm in enumerate((srm1, srm2, srm3)):
        for c in range(3):
            kernel[3 * i + c, c] = srm
    return torch.from_numpy(kernel)


def bayar_constraint(kernel: Tensor) -> Tensor:
    """The Bayar constraint on an OIHW kernel: centre tap -1, the other taps summing to 1.

    The original applies it in the optimiser after each training step, never at inference; trained
    files hold kernels that already satisfy it. Returns a new tensor.
    """
    kh, kw = kernel.shape[-2:]
    mask = torch.zeros_like(kernel)
    mask[..., kh // 2, kw // 2] = 1.0
    w = kernel * (1.0 - mask)
    w = w / (w.sum(dim=(2, 3), keepdim=True) + BAYAR_EPSILON)
    return w - mask


class CombinedConv2d(nn.Module):
    """Keras ``CombinedConv2D`` (b1c1): regular, SRM and Bayar 5x5 kernels side by side, no bias, relu.

    The SRM kernels are a constant buffer, rebuilt from their definition and never saved; the Bayar
    kernel is used as stored.
    """

    kernel_size = 5

    def __init__(self, out_channels: int, in_channels: int = 3) -> None:
        super().__init__()
        k = self.kernel_size
        self.regular_kernel = nn.Parameter(torch.empty(out_channels - FIXED_FIRST_LAYER_FILTERS, in_channels, k, k))
        self.register_buffer("srm_kernel", srm_kernels(), persistent=False)
        self.bayar_kernel = nn.Parameter(torch.empty(3, in_channels, k, k))

    @property
    def kernel(self) -> Tensor:
        return torch.cat([self.regular_kernel, self.srm_kernel.to(self.regular_kernel), self.bayar_kernel])

    def forward(self, x: Tensor) -> Tensor:
        return symmetric_conv2d(x, self.kernel, relu=True)


class KerasBatchNorm(nn.Module):
    """Keras ``BatchNormalization(center=False, scale=False)`` (bnorm), in both of its modes.

    Inference (``model.eval()``, or this module's ``eval()`` to train with frozen statistics):
    ``(x - moving_mean) / sqrt(moving_variance + 1e-3)``. Training (``model.train()``): the batch's
    statistics over N, H and W (the population variance normalises, as TensorFlow's fused kernel does), and the
    moving averages move as tf_keras moves them: ``moving = moving * 0.99 + batch * 0.01``, the variance
    Bessel-corrected (``n / (n - 1)``, n = N * H * W). Standalone Keras 2.2 on TensorFlow 1.8 moved them
    differently (zero-debiased averages, which forget the stored statistics at the first step); see the
    training guide.
    """

    def __init__(self, channels: int, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("moving_mean", torch.zeros(channels))
        self.register_buffer("moving_variance", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            inv_std = torch.rsqrt(self.moving_variance + BN_EPSILON)
            return (x - self.moving_mean[:, None, None]) * inv_std[:, None, None]
        var, mean, count = self.batch_moments(x)
        with torch.no_grad():
            unbiased = var * (count / max(count - 1, 1))
            self.moving_mean.mul_(self.momentum).add_(mean.to(self.moving_mean), alpha=1 - self.momentum)
            self.moving_variance.mul_(self.momentum).add_(unbiased.to(self.moving_variance), alpha=1 - self.momentum)
        inv_std = torch.rsqrt(var + BN_EPSILON).to(x.dtype)
        return (x - mean.to(x.dtype)[:, None, None]) * inv_std[:, None, None]

    def batch_moments(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """The training batch's per-channel population variance and mean over N, H, W, and how many values each
        covers (a distributed subclass gathers them over its process group)."""
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return var, mean, x.numel() // x.shape[1]

    def extra_repr(self) -> str:
        return f"{self.moving_mean.numel()}, momentum={self.momentum}, epsilon={BN_EPSILON}"


class InferenceBatchNorm(KerasBatchNorm):
    """Deprecated (removed in 0.3.0): ``KerasBatchNorm`` built in eval mode, the only mode bnorm had before."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.eval()


@dataclass
class ImageStatistics:
    """Per-image, per-channel mean and population std over H and W, float64, each (N, C)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def of(cls, x: Tensor) -> ImageStatistics:
        x = x.to(torch.float64)
        if recording():  # two passes over sums divided by an explicit float64 count (exporters type H*W as float32)
            count = _scalar(x.shape[-2] * x.shape[-1], x.dtype, x.device)
            mean = x.sum(dim=(2, 3)) / count
            var = (x - mean[:, :, None, None]).square().sum(dim=(2, 3)) / count
        else:
            var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        return cls(mean, var.sqrt())


def _scalar(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A size (a symbolic one while recording) as a 0-d tensor: counted in int64, then cast to ``dtype``."""
    return torch.scalar_tensor(size, dtype=torch.int64, device=device).to(dtype)


class GlobalStd(nn.Module):
    """Keras ``GlobalStd2D`` (glbStd): per-image std, clamped below at ``1e-6 + min_std``. Returns (N, C, 1, 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.min_std = nn.Parameter(torch.empty(channels))

    def forward(self, x: Tensor, stats: ImageStatistics | None = None) -> Tensor:
        std = (stats or ImageStatistics.of(x)).std.to(x.dtype)
        return torch.maximum(std, STD_FLOOR + self.min_std)[:, :, None, None]


def window_means(x: Tensor, window_sizes: tuple[int, ...]) -> Iterator[Tensor]:
    """Mean of x over each k x k window centred on each pixel, counting only pixels inside the image.

    Equals average pooling with padding k//2 and ``count_include_pad=False``, in O(1) per pixel: one
    float64 integral image serves every window, so the rounding error does not grow with image size
    as the original's float32 integral image does. Yields one float64 tensor per window.
    """
    if recording():
        yield from _window_means_recorded(x, window_sizes)
        return
    h, w = x.shape[-2:]
    r = max(window_sizes) // 2
    # One extra zero row/column in front makes ii[i] the sum of everything before padded index i.
    # Built in one float64 buffer in x's memory layout and summed in place (no float64 copies of x).
    ii = _zeros_in_layout_of(x, (*x.shape[:-2], h + 2 * r + 1, w + 2 * r + 1), torch.float64)
    ii[..., r + 1 : r + 1 + h, r + 1 : r + 1 + w] = x
    ii = ii.cumsum_(dim=-2).cumsum_(dim=-1)
    for k in window_sizes:
        q = k // 2
        lo, hi = r - q, r + q + 1  # window rows y-q .. y+q are padded rows y+r+1-q .. y+r+1+q
        box = ii[..., hi : hi + h, hi : hi + w] - ii[..., lo : lo + h, hi : hi + w]
        box -= ii[..., hi : hi + h, lo : lo + w]
        box += ii[..., lo : lo + h, lo : lo + w]
        yield box.div_(_window_counts(h, q, x.device)[:, None] * _window_counts(w, q, x.device))


def _window_means_recorded(x: Tensor, window_sizes: tuple[int, ...]) -> Iterator[Tensor]:
    """``window_means`` without in-place writes, for any size: the same sums in the same order."""
    h, w = x.shape[-2:]
    r = max(window_sizes) // 2
    ii = F.pad(x.to(torch.float64), (r + 1, r, r + 1, r)).cumsum(dim=-2).cumsum(dim=-1)
    for k in window_sizes:
        q = k // 2
        lo, hi = r - q, r + q + 1
        box = ii[..., hi : hi + h, hi : hi + w] - ii[..., lo : lo + h, hi : hi + w]
        box = box - ii[..., hi : hi + h, lo : lo + w] + ii[..., lo : lo + h, lo : lo + w]
        yield box / (_window_counts(h, q, x.device)[:, None] * _window_counts(w, q, x.device))


def _zeros_in_layout_of(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros of ``shape``, channels-last when x is (elementwise work on mixed layouts is several times slower)."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=layout).zero_()


def _window_counts(size: int, q: int, device: torch.device) -> Tensor:
    """How many of the positions y-q .. y+q lie inside [0, size), for each y, as float64.

    Counted in int64 and then cast: a float64 range of a symbolic size would be recorded as float32.
    """
    y = torch.arange(size, device=device)
    return (torch.clamp(y + q, max=size - 1) - torch.clamp(y - q, min=0) + 1).to(torch.float64)


class WindowDeviations(nn.Module):
    """Keras ``NestedWindowAverageFeatExtrator`` (nestedAvgFeatex, minus_original=True).

    For each window k: local mean minus x; then the per-image global mean minus x. Stacked along a new
    time axis: (N, T, C, H, W) with T = len(window_sizes) + 1.
    """

    def __init__(self, window_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.window_sizes = tuple(window_sizes)

    def forward(self, x: Tensor, stats: ImageStatistics | None = None, xd: Tensor | None = None) -> Tensor:
        """xd: ``x.to(torch.float64)`` when the caller has made it already (then used as scratch space)."""
        mean = (stats or ImageStatistics.of(x if xd is None else xd)).mean
        if xd is None:
            xd = x.to(torch.float64)
        if recording():
            steps = [*window_means(x, self.window_sizes), mean[:, :, None, None]]
            return torch.stack([(m - xd).to(x.dtype) for m in steps], dim=1)
        out = _steps_in_layout_of(x, len(self.window_sizes) + 1)  # differences in float64, rounded once to x's dtype
        for step, m in enumerate(window_means(x, self.window_sizes)):
            out[:, step] = m.sub_(xd)
        # xd is a scratch copy to reuse, unless x was float64 already or autograd needs it kept
        scratch = xd is not x and not torch.is_grad_enabled()
        out[:, -1] = torch.sub(mean[:, :, None, None], xd, out=xd) if scratch else mean[:, :, None, None] - xd
        return out

    def extra_repr(self) -> str:
        return f"window_sizes={self.window_sizes}"


def _steps_in_layout_of(x: Tensor, steps: int) -> Tensor:
    """An empty (N, T, C, H, W) tensor whose every step is laid out as x is (channels-last or not)."""
    n, c, h, w = x.shape
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.new_empty((n, steps, h, w, c)).permute(0, 1, 4, 2, 3)
    return x.new_empty((n, steps, c, h, w))


class ConvLSTM2d(nn.Module):
    """Keras ``ConvLSTM2D`` returning the last hidden state, with zero 'same' padding.

    Gates in Keras order i, f, c, o along the output channels of ``kernel`` (input-to-state, with bias)
    and ``recurrent_kernel`` (state-to-state); the recurrent activation is Keras 2's hard sigmoid.
    Input (N, T, C, H, W), output (N, hidden, H, W).
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.padding = kernel_size // 2
        self.kernel = nn.Parameter(torch.empty(4 * hidden, in_channels, kernel_size, kernel_size))
        self.recurrent_kernel = nn.Parameter(torch.empty(4 * hidden, hidden, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden))

    def forward(self, x: Tensor) -> Tensor:
        n, t = x.shape[:2]
        # The input-to-state convolution does not depend on the state: run all steps as one batch.
        z_input = F.conv2d(x.flatten(0, 1), self.kernel, self.bias, padding=self.padding).unflatten(0, (n, t))
        h = c = None
        for step in range(t):
            z = z_input[:, step]
            if h is not None:  # the state starts at zero, and so does its convolution
                z = self._recurrent(h, z)
            z_i, z_f, z_c, z_o = z.split(self.hidden, dim=1)
            i = hard_sigmoid_keras2(z_i)
            c = i * torch.tanh(z_c) if c is None else hard_sigmoid_keras2(z_f) * c + i * torch.tanh(z_c)
            h = hard_sigmoid_keras2(z_o) * torch.tanh(c)
        return h

    def _recurrent(self, h: Tensor, z: Tensor) -> Tensor:
        """``z`` plus the state-to-state convolution of ``h``.

        At float32 inference on CPU, one oneDNN convolution that adds its output into ``z`` in place (a binary
        post-op; the same sum, bit for bit); ``z`` is a step of this call's own input convolution.
        """
        channels_last = torch.channels_last
        if fused_dtype(h) == torch.float32 == z.dtype and z.is_contiguous(memory_format=channels_last):
            pads = [self.padding, self.padding]
            h = h.contiguous(memory_format=channels_last)
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                z, h, self.recurrent_kernel, None, pads, _ONES, _ONES, 1, "add", None, None, [], None
            )
        return F.conv2d(h, self.recurrent_kernel, padding=self.padding).add_(z)

    def reach(self, step: int, steps: int) -> int:
        """How far the output sees into the input of ``step`` (0-based) of ``steps``: its input convolution,
        then one state-to-state convolution per later step."""
        return self.padding * (steps - step)


class ConvGRU2d(nn.Module):
    """A convolutional GRU returning the last hidden state, with zero 'same' padding: the ConvGRU variant of
    the detector (no official file holds one; the ConvLSTM of the releases is ``ConvLSTM2d``).

    Laid out as Keras lays out its GRU (``reset_after=False``): gates in Keras' order z (update), r (reset),
    h (candidate) along the output channels of ``kernel`` (input-to-state, (3 * hidden, C, k, k), with
    ``bias``) and ``recurrent_kernel`` (state-to-state, (3 * hidden, hidden, k, k)). With u the update gate:

        u = hard_sigmoid(W_u * x + b_u + U_u * h)        r = hard_sigmoid(W_r * x + b_r + U_r * h)
        c = tanh(W_c * x + b_c + U_c * (r h))            h' = (1 - u) h + u c

    the hard sigmoid being Keras 2's and the state starting at zero. u weighs the candidate (Chung et al.,
    2014); Keras' own GRU writes h' = z h + (1 - z) c, its z weighing the old state. Input (N, T, C, H, W),
    output (N, hidden, H, W).
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.padding = kernel_size // 2
        self.kernel = nn.Parameter(torch.empty(3 * hidden, in_channels, kernel_size, kernel_size))
        self.recurrent_kernel = nn.Parameter(torch.empty(3 * hidden, hidden, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(3 * hidden))

    def forward(self, x: Tensor) -> Tensor:
        n, t = x.shape[:2]
        # The input-to-state convolution does not depend on the state: run all steps as one batch.
        z_input = F.conv2d(x.flatten(0, 1), self.kernel, self.bias, padding=self.padding).unflatten(0, (n, t))
        gates_kernel, candidate_kernel = self.recurrent_kernel.split((2 * self.hidden, self.hidden))
        h = None
        for step in range(t):
            x_u, x_r, x_c = z_input[:, step].split(self.hidden, dim=1)
            if h is None:  # the state starts at zero: its convolutions vanish and (1 - u) h is zero
                h = hard_sigmoid_keras2(x_u) * torch.tanh(x_c)
                continue
            h_u, h_r = F.conv2d(h, gates_kernel, padding=self.padding).split(self.hidden, dim=1)
            u = hard_sigmoid_keras2(x_u + h_u)
            r = hard_sigmoid_keras2(x_r + h_r)
            c = torch.tanh(x_c + F.conv2d(r * h, candidate_kernel, padding=self.padding))
            h = (1 - u) * h + u * c
        return h

    def reach(self, step: int, steps: int) -> int:
        """How far the output sees into the input of ``step`` (0-based) of ``steps``: its input convolution, and
        past the first step the candidate's convolution of the reset-gated state (r reads that step's input);
        then two chained state-to-state convolutions per later step (r's, then the candidate's of r h)."""
        return self.padding * (1 + (step > 0) + 2 * (steps - 1 - step))
