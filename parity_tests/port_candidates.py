"""Two PyTorch ports of ManTraNet written for the candidate tests, loaded as a user's would be
(``--candidate parity_tests/port_candidates.py:FACTORY``), each from the official ``.h5`` path.

``faithful_port``: computes what the official model computes, structured unlike ``mantranet_torch``: channels-last
modules (NHWC in and out, kernels kept in Keras' HWIO), the image taken in [0, 1] and NHWC, one fused convolution
for the ConvLSTM's input and recurrent kernels, a window module with the time axis after the channels
("NHWTC"-like: N, H, W, T, C), the global std as N x C, and its own module names.

``earlier_style_port``: written the way the earlier PyTorch port computes (NCHW): BatchNorm on each image's own
statistics instead of the stored moving ones, and the Bayar constraint re-applied to the kernel in every forward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from converter import identify_keras_file
from parity_tests.oracle import srm_kernel

HARD_SIGMOID = (0.2, 0.5)  # Keras 2


def _arrays(path: str) -> tuple[dict[str, np.ndarray], object]:
    keras, _, _, config = identify_keras_file(path)
    return keras.arrays, config


def _param(value: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.asarray(value, dtype=np.float32).copy()), requires_grad=False)


def _mirror(x: Tensor, pad: int) -> Tensor:
    """NCHW padded as numpy's 'symmetric' (edge repeated), by flipping slices (the image is at least pad wide)."""
    if pad == 0:
        return x
    x = torch.cat([x[:, :, :pad].flip(2), x, x[:, :, -pad:].flip(2)], dim=2)
    return torch.cat([x[:, :, :, :pad].flip(3), x, x[:, :, :, -pad:].flip(3)], dim=3)


def _prediction(a: dict[str, np.ndarray]) -> nn.Sequential:
    """The last layer, NCHW: a 7 x 7 convolution and the sigmoid."""
    conv = nn.Conv2d(8, 1, 7, padding=3)
    conv.weight, conv.bias = _param(np.transpose(a["pred/pred/kernel:0"], (3, 2, 0, 1))), _param(a["pred/pred/bias:0"])
    return nn.Sequential(conv, nn.Sigmoid())


def _hard_sigmoid(x: Tensor) -> Tensor:
    return torch.clamp(HARD_SIGMOID[0] * x + HARD_SIGMOID[1], 0.0, 1.0)


def _box_sums(x: Tensor, size: int) -> Tensor:
    """NCHW sums over the size x size window centred on each pixel, in-image pixels only (float64)."""
    q, out = size // 2, x.double()
    for dim in (2, 3):
        n = out.shape[dim]
        sums = F.pad(out.cumsum(dim), (1, 0) if dim == 3 else (0, 0, 1, 0))
        hi = torch.clamp(torch.arange(n) + q + 1, max=n)
        lo = torch.clamp(torch.arange(n) - q, min=0)
        out = sums.index_select(dim, hi) - sums.index_select(dim, lo)
    return out


def _box_means(x: Tensor, size: int) -> Tensor:
    counts = _box_sums(torch.ones(1, 1, *x.shape[2:]), size)
    return (_box_sums(x, size) / counts).to(x.dtype)


# --- the faithful port: channels-last --------------------------------------------------------------------------


class ChannelsLastConv(nn.Module):
    """NHWC in and out; symmetric padding; HWIO kernel."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray | None, activation: str | None) -> None:
        super().__init__()
        self.kernel = _param(kernel)
        self.bias = None if bias is None else _param(bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        weight = self.kernel.permute(3, 2, 0, 1)
        y = F.conv2d(_mirror(x.permute(0, 3, 1, 2), weight.shape[-1] // 2), weight, self.bias)
        y = torch.relu(y) if self.activation == "relu" else torch.tanh(y) if self.activation == "tanh" else y
        return y.permute(0, 2, 3, 1)


class UnitLength(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-12))


class Backbone(nn.Module):
    def __init__(self, a: dict[str, np.ndarray], config: object) -> None:
        super().__init__()
        stem = np.concatenate(
            [a["Featex/b1c1/regular_kernel:0"], srm_kernel(), a["Featex/b1c1/bayar_kernel:0"]], axis=-1
        )
        self.stem = ChannelsLastConv(stem, None, "relu")
        names = ("b1c2", "b2c1", "b2c2", "b3c1", "b3c2", "b3c3", "b4c1", "b4c2", "b4c3", "b5c1", "b5c2")
        self.stages = nn.ModuleList(
            ChannelsLastConv(a[f"Featex/{n}/kernel:0"], a[f"Featex/{n}/bias:0"], "relu") for n in names
        )
        activation = "tanh" if config.transform_activation == "tanh" else None
        self.project = ChannelsLastConv(a["Featex/transform/kernel:0"], a["Featex/transform/bias:0"], activation)
        self.unit = UnitLength()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.unit(self.project(x))


class Standardize(nn.Module):
    def __init__(self, mean: np.ndarray, variance: np.ndarray) -> None:
        super().__init__()
        self.mean, self.scale = _param(mean), _param(1.0 / np.sqrt(np.asarray(variance, np.float64) + 1e-3))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.scale


class Spread(nn.Module):
    """Per image and channel, N x C: max(std, 1e-6 + min_std)."""

    def __init__(self, min_std: np.ndarray) -> None:
        super().__init__()
        self.floor = _param(np.asarray(min_std).reshape(-1) + 1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return torch.maximum(x.double().std(dim=(1, 2), unbiased=False).float(), self.floor)


class Windows(nn.Module):
    """N, H, W, T, C: each window mean (and the global mean) minus the value."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes = sizes

    def forward(self, x: Tensor) -> Tensor:
        nchw = x.permute(0, 3, 1, 2)
        means = [_box_means(nchw, k).permute(0, 2, 3, 1) for k in self.sizes]
        means.append(x.double().mean(dim=(1, 2), keepdim=True).float().expand_as(x))
        return torch.stack([m - x for m in means], dim=3)


class Ratio(nn.Module):
    def forward(self, deviations: Tensor, spread: Tensor) -> Tensor:
        return torch.abs(deviations / spread[:, None, None, None, :])


class FusedConvLSTM(nn.Module):
    """One 7 x 7 convolution over [input, hidden] for all four gates; NHWC steps along axis 3; returns (h, c)."""

    def __init__(self, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        fused = np.concatenate([kernel, recurrent], axis=2)  # HW(in + hidden)(4 hidden)
        self.weight = _param(np.transpose(fused, (3, 2, 0, 1)))
        self.bias = _param(bias)
        self.hidden = recurrent.shape[-2]

    def forward(self, sequence: Tensor) -> tuple[Tensor, Tensor]:
        n, height, width, steps, _ = sequence.shape
        h = sequence.new_zeros(n, self.hidden, height, width)
        c = torch.zeros_like(h)
        for t in range(steps):
            z = F.conv2d(torch.cat([sequence[:, :, :, t].permute(0, 3, 1, 2), h], 1), self.weight, self.bias, padding=3)
            i, f, g, o = z.split(self.hidden, dim=1)
            c = _hard_sigmoid(f) * c + _hard_sigmoid(i) * torch.tanh(g)
            h = _hard_sigmoid(o) * torch.tanh(c)
        return h.permute(0, 2, 3, 1), c.permute(0, 2, 3, 1)


class Head(nn.Module):
    def __init__(self, a: dict[str, np.ndarray], config: object) -> None:
        super().__init__()
        self.adapt = ChannelsLastConv(a["outlierTrans/outlierTrans/kernel:0"], None, None)
        self.standardize = Standardize(a["bnorm/bnorm/moving_mean:0"], a["bnorm/bnorm/moving_variance:0"])
        self.spread = Spread(a["glbStd/glbStd/min_std:0"])
        self.windows = Windows(tuple(config.window_sizes))
        self.ratio = Ratio()
        self.memory = FusedConvLSTM(
            a["cLSTM/cLSTM/kernel:0"], a["cLSTM/cLSTM/recurrent_kernel:0"], a["cLSTM/cLSTM/bias:0"]
        )
        self.score = _prediction(a)

    def forward(self, features: Tensor) -> Tensor:
        x = self.standardize(self.adapt(features))
        h, _ = self.memory(self.ratio(self.windows(x), self.spread(x)))
        return self.score(h.permute(0, 3, 1, 2))


class FaithfulPort(nn.Module):
    """Takes N x H x W x 3 in [0, 1]."""

    def __init__(self, path: str) -> None:
        super().__init__()
        arrays, config = _arrays(path)
        self.backbone = Backbone(arrays, config)
        self.head = Head(arrays, config)

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.backbone(image * 2.0 - 1.0))


def faithful_port(path: str) -> FaithfulPort:
    return FaithfulPort(path).eval()


FAITHFUL_MAP = {
    "input": {"layout": "NHWC", "range": "0..1"},
    "layers": {
        "b1c1": {"module": "backbone.stem", "layout": "NHWC", "input_layout": "NHWC"},
        **{
            name: {"module": f"backbone.stages.{i}", "layout": "NHWC"}
            for i, name in enumerate(("b1c2", "b2c1", "b2c2", "b3c1", "b3c2", "b3c3", "b4c1", "b4c2", "b4c3", "b5c1"))
        },
        "b5c2": {"module": "backbone.stages.10", "layout": "NHWC"},
        "transform": {"module": "backbone.project", "layout": "NHWC"},
        "L2": {"module": "backbone.unit", "layout": "NHWC"},
        "outlierTrans": {"module": "head.adapt", "layout": "NHWC"},
        "bnorm": {"module": "head.standardize", "layout": "NHWC"},
        "glbStd": {"module": "head.spread", "layout": "NC"},
        "nestedAvgFeatex": {"module": "head.windows", "layout": "NHWTC"},
        "divStd": {"module": "head.ratio", "layout": "NHWTC"},
        "cLSTM": {"module": "head.memory", "layout": "NHWC", "output": 0},
        "pred": {"module": "head.score", "layout": "NCHW", "input_layout": "NCHW"},
    },
}


# --- the earlier port's way: NCHW, batch statistics, Bayar constraint in forward ---------------------------------


def bayar_constrained(kernel: Tensor) -> Tensor:
    """OIHW: centre -1, the other taps rescaled to sum 1 (per output and input channel)."""
    k = kernel.clone()
    centre = k.shape[-1] // 2
    k[:, :, centre, centre] = 0
    k = k / k.sum(dim=(2, 3), keepdim=True)
    k[:, :, centre, centre] = -1
    return k


class ConstrainedStem(nn.Module):
    def __init__(self, a: dict[str, np.ndarray]) -> None:
        super().__init__()
        oihw = (3, 2, 0, 1)
        self.regular = _param(np.transpose(a["Featex/b1c1/regular_kernel:0"], oihw))
        self.register_buffer("srm", torch.from_numpy(np.transpose(srm_kernel(), oihw).astype(np.float32)))
        self.bayar = _param(np.transpose(a["Featex/b1c1/bayar_kernel:0"], oihw))

    def forward(self, x: Tensor) -> Tensor:
        padded = _mirror(x, 2)
        kernels = [self.regular, self.srm, bayar_constrained(self.bayar)]  # the constraint in every call
        return torch.relu(torch.cat([F.conv2d(padded, k) for k in kernels], dim=1))


class PaddedConv(nn.Sequential):
    def __init__(self, kernel: np.ndarray, bias: np.ndarray, activation: nn.Module) -> None:
        conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0])
        conv.weight, conv.bias = _param(np.transpose(kernel, (3, 2, 0, 1))), _param(bias)
        super().__init__(conv, activation)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_mirror(x, 1))


class L2Norm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1)


class GlobalStd(nn.Module):
    def __init__(self, min_std: np.ndarray) -> None:
        super().__init__()
        self.min_std = _param(np.asarray(min_std).reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.maximum(x.std(dim=(2, 3), unbiased=False, keepdim=True), 1e-6 + self.min_std)


class NestedWindows(nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes = sizes

    def forward(self, x: Tensor) -> Tensor:
        steps = [F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False) - x for k in self.sizes]
        steps.append(x.mean(dim=(2, 3), keepdim=True) - x)
        return torch.stack(steps, dim=1)  # N, T, C, H, W


class ConvLSTMCell(nn.Module):
    def __init__(self, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.conv = nn.Conv2d(kernel.shape[2] + recurrent.shape[2], kernel.shape[3], 7, padding=3)
        self.conv.weight = _param(np.transpose(np.concatenate([kernel, recurrent], axis=2), (3, 2, 0, 1)))
        self.conv.bias = _param(bias)
        self.hidden = recurrent.shape[2]

    def forward(self, sequence: Tensor) -> Tensor:
        h = sequence.new_zeros(sequence.shape[0], self.hidden, *sequence.shape[3:])
        c = torch.zeros_like(h)
        for t in range(sequence.shape[1]):
            i, f, g, o = self.conv(torch.cat([sequence[:, t], h], dim=1)).split(self.hidden, dim=1)
            c = _hard_sigmoid(f) * c + _hard_sigmoid(i) * torch.tanh(g)
            h = _hard_sigmoid(o) * torch.tanh(c)
        return h


class EarlierStylePort(nn.Module):
    """N x 3 x H x W in [-1, 1], as the official code takes it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        a, config = _arrays(path)
        names = ("b1c2", "b2c1", "b2c2", "b3c1", "b3c2", "b3c3", "b4c1", "b4c2", "b4c3", "b5c1", "b5c2")
        last = nn.Tanh() if config.transform_activation == "tanh" else nn.Identity()
        self.features = nn.Sequential(
            ConstrainedStem(a),
            *(PaddedConv(a[f"Featex/{n}/kernel:0"], a[f"Featex/{n}/bias:0"], nn.ReLU()) for n in names),
            PaddedConv(a["Featex/transform/kernel:0"], a["Featex/transform/bias:0"], last),
            L2Norm(),
        )
        self.adaptation = nn.Conv2d(256, 64, 1, bias=False)
        self.adaptation.weight = _param(np.transpose(a["outlierTrans/outlierTrans/kernel:0"], (3, 2, 0, 1)))
        self.batch_norm = nn.BatchNorm2d(64, eps=1e-3, affine=False, track_running_stats=False)  # each image's own
        self.global_std = GlobalStd(a["glbStd/glbStd/min_std:0"])
        self.windows = NestedWindows(tuple(config.window_sizes))
        self.lstm = ConvLSTMCell(
            a["cLSTM/cLSTM/kernel:0"], a["cLSTM/cLSTM/recurrent_kernel:0"], a["cLSTM/cLSTM/bias:0"]
        )
        self.end = _prediction(a)

    def forward(self, x: Tensor) -> Tensor:
        x = self.batch_norm(self.adaptation(self.features(x)))
        deviations = self.windows(x)
        h = self.lstm(torch.abs(deviations / self.global_std(x)[:, None]))
        return self.end(h)


def earlier_style_port(path: str) -> EarlierStylePort:
    return EarlierStylePort(path).eval()


EARLIER_STYLE_MAP = {
    "layers": {
        **{
            name: f"features.{i}"
            for i, name in enumerate(
                (
                    "b1c1",
                    "b1c2",
                    "b2c1",
                    "b2c2",
                    "b3c1",
                    "b3c2",
                    "b3c3",
                    "b4c1",
                    "b4c2",
                    "b4c3",
                    "b5c1",
                    "b5c2",
                    "transform",
                    "L2",
                )
            )
        },
        "outlierTrans": "adaptation",
        "bnorm": "batch_norm",
        "glbStd": "global_std",
        "nestedAvgFeatex": {"module": "windows", "layout": "NTCHW"},
        "cLSTM": "lstm",
        "pred": "end",
    }
}
