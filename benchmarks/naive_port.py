"""A baseline written the way the earlier PyTorch port computes ManTraNet, for speed comparisons only.

What makes it naive, each as the earlier port does it: symmetric padding by gathering indices, the
Bayar constraint re-applied to a copy of the kernel in every forward call, the SRM, Bayar and regular
kernels run as three convolutions, out-of-place activations, batch-statistics BatchNorm, every window
mean as an average pooling with ``count_include_pad=False`` (k x k work per pixel), and one ConvLSTM
convolution over the concatenated input and state at every step, the first included. NCHW throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mantranet_torch import ManTraNet
from mantranet_torch.layers import BN_EPSILON, STD_FLOOR, bayar_constraint, hard_sigmoid_keras2


def gather_symmetric_pad(x: Tensor, pad: int) -> Tensor:
    """``tf.pad(mode='SYMMETRIC')`` by index gathering along H, then W."""
    for dim in (-2, -1):
        size = x.shape[dim]
        idx = torch.arange(-pad, size + pad, device=x.device) % (2 * size)
        idx = torch.where(idx < size, idx, 2 * size - 1 - idx)
        x = x.index_select(dim, idx)
    return x


class NaivePort(nn.Module):
    """The earlier port's computation with our model's weights (its BatchNorm uses batch statistics)."""

    def __init__(self, model: ManTraNet) -> None:
        super().__init__()
        featex, detector = model.featex, model.detector
        self.regular = nn.Parameter(featex.b1c1.regular_kernel.detach().clone())
        self.register_buffer("srm", featex.b1c1.srm_kernel.clone())
        self.bayar = nn.Parameter(featex.b1c1.bayar_kernel.detach().clone())
        self.convs = nn.ModuleList()
        for name, module in featex.named_children():
            if name != "b1c1":
                conv = nn.Conv2d(module.in_channels, module.out_channels, 3)
                conv.load_state_dict({"weight": module.weight, "bias": module.bias})
                self.convs.append(conv)
        self.transform_tanh = model.config.transform_activation == "tanh"
        self.adaptation = nn.Conv2d(256, 64, 1, bias=False)
        self.adaptation.weight = nn.Parameter(detector.outlier_trans.weight.detach().clone())
        self.min_std = nn.Parameter(detector.glb_std.min_std.detach().clone())
        self.window_sizes = detector.nested_avg.window_sizes
        lstm = detector.clstm
        self.lstm = nn.Conv2d(72, 32, 7, padding=3)
        self.lstm.weight = nn.Parameter(torch.cat([lstm.kernel, lstm.recurrent_kernel], dim=1).detach().clone())
        self.lstm.bias = nn.Parameter(lstm.bias.detach().clone())
        self.end = nn.Conv2d(8, 1, 7, padding=3)
        self.end.load_state_dict(detector.pred.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        padded = gather_symmetric_pad(x, 2)
        bayar = bayar_constraint(self.bayar)
        x = torch.cat([F.conv2d(padded, self.regular), F.conv2d(padded, self.srm), F.conv2d(padded, bayar)], dim=1)
        x = F.relu(x)
        for i, conv in enumerate(self.convs):
            x = conv(gather_symmetric_pad(x, 1))
            last = i == len(self.convs) - 1
            x = (torch.tanh(x) if self.transform_tanh else x) if last else F.relu(x)
        x = F.normalize(x, dim=1)
        x = self.adaptation(x)
        x = F.batch_norm(x, None, None, training=True, eps=BN_EPSILON)
        sigma = torch.maximum(x.std(dim=(2, 3), unbiased=False, keepdim=True), STD_FLOOR + self.min_std[:, None, None])
        steps = [F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False) - x for k in self.window_sizes]
        steps.append(x.mean(dim=(2, 3), keepdim=True) - x)
        h = x.new_zeros(x.shape[0], 8, *x.shape[2:])
        c = torch.zeros_like(h)
        for step in steps:
            z = self.lstm(torch.cat([torch.abs(step / sigma), h], dim=1))
            z_i, z_f, z_c, z_o = z.split(8, dim=1)
            c = hard_sigmoid_keras2(z_f) * c + hard_sigmoid_keras2(z_i) * torch.tanh(z_c)
            h = hard_sigmoid_keras2(z_o) * torch.tanh(c)
        return torch.sigmoid(self.end(h))
