"""The exact answer: ManTraNet evaluated in float64 NumPy straight from the Keras arrays.

Written independently of both the PyTorch model and the TensorFlow reference (different algorithms
where it matters: the window means here are separable 1-D box sums, counts from an explicit ones
image), so that a divergence can be attributed to the framework that drifted. Layouts are Keras':
NHWC images, HWIO kernels. Meant for small images: every convolution is one dense einsum.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mantranet_torch.config import ManTraNetConfig

SRM_FILTERS = (
    (np.pad([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], 1) / 4),
    (
        np.array([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]])
        / 12
    ),
    (np.pad([[1, -2, 1]], ((2, 2), (1, 1))) / 2),
)
IM2COL_BYTES = 64 * 2**20  # the largest unfolded copy conv2d_valid makes at once
CONV_LAYERS = ("b1c2", "b2c1", "b2c2", "b3c1", "b3c2", "b3c3", "b4c1", "b4c2", "b4c3", "b5c1", "b5c2")


def symmetric_pad(x: np.ndarray, pad: int) -> np.ndarray:
    """NHWC, H and W padded with the edge repeated (numpy's 'symmetric' mode)."""
    return np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")


def conv2d_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Stride-1 'valid' convolution (cross-correlation, as every framework here) of NHWC by HWIO.

    As matrix products of the unfolded windows (im2col), 2-4x faster than an einsum over them, a band of
    output rows at a time so that the unfolded copy stays under IM2COL_BYTES whatever the image size.
    """
    kh, kw, cin, cout = kernel.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N, H', W', C, kh, kw
    n, ho, wo = windows.shape[:3]
    taps = cin * kh * kw
    matrix = kernel.transpose(2, 0, 1, 3).reshape(taps, cout)
    out = np.empty((n, ho, wo, cout), dtype=np.result_type(x, kernel))
    rows = max(1, IM2COL_BYTES // (n * wo * taps * x.itemsize))
    for top in range(0, ho, rows):
        band = windows[:, top : top + rows]
        out[:, top : top + rows] = (band.reshape(-1, taps) @ matrix).reshape(*band.shape[:3], cout)
    return out


def conv2d_same_zeros(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    kh, kw = kernel.shape[:2]
    return conv2d_valid(np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))), kernel)


def srm_kernel() -> np.ndarray:
    """The nine SRM filters as HWIO (5, 5, 3, 9): output 3*i + c filters input channel c with SRM i."""
    kernel = np.zeros((5, 5, 3, 9))
    for i, srm in enumerate(SRM_FILTERS):
        for c in range(3):
            kernel[:, :, c, 3 * i + c] = srm
    return kernel


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def hard_sigmoid(x: np.ndarray) -> np.ndarray:
    """Keras 2: clip(0.2 x + 0.5, 0, 1)."""
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """TensorFlow's: the squared norm is clamped at 1e-12."""
    return x / np.sqrt(np.maximum((x * x).sum(axis=-1, keepdims=True), 1e-12))


def box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over the k x k window centred on each pixel of NHWC x, only in-image pixels counted."""

    def box_sum_1d(a: np.ndarray, axis: int) -> np.ndarray:
        q, n = k // 2, a.shape[axis]
        c = np.cumsum(a, axis=axis)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)  # c[i] = sum a[:i]
        hi = np.minimum(np.arange(n) + q + 1, n)
        lo = np.maximum(np.arange(n) - q, 0)
        return np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)

    sums = box_sum_1d(box_sum_1d(x, 1), 2)
    counts = box_sum_1d(box_sum_1d(np.ones((1, *x.shape[1:3], 1)), 1), 2)
    return sums / counts


class Oracle:
    """Float64 ManTraNet from Keras-layout arrays (``converter.mapping.MAPPING``'s left column)."""

    def __init__(self, arrays: dict[str, np.ndarray], config: ManTraNetConfig) -> None:
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
        self.config = config

    def _kernel(self, layer: str) -> np.ndarray:
        return self.w[f"Featex/{layer}/kernel:0"]

    def b1c1(self, x: np.ndarray) -> np.ndarray:
        kernel = np.concatenate(
            [self.w["Featex/b1c1/regular_kernel:0"], srm_kernel(), self.w["Featex/b1c1/bayar_kernel:0"]], axis=-1
        )
        return relu(conv2d_valid(symmetric_pad(x, 2), kernel))

    def conv(self, layer: str, x: np.ndarray) -> np.ndarray:
        out = conv2d_valid(symmetric_pad(x, 1), self._kernel(layer)) + self.w[f"Featex/{layer}/bias:0"]
        if layer == "transform":
            return np.tanh(out) if self.config.transform_activation == "tanh" else out
        return relu(out)

    def outlier_trans(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w["outlierTrans/outlierTrans/kernel:0"][0, 0]

    def bnorm(self, x: np.ndarray) -> np.ndarray:
        mean, var = self.w["bnorm/bnorm/moving_mean:0"], self.w["bnorm/bnorm/moving_variance:0"]
        return (x - mean) / np.sqrt(var + 1e-3)

    def glb_std(self, x: np.ndarray) -> np.ndarray:
        std = x.std(axis=(1, 2), keepdims=True)  # population std, per image and channel
        return np.maximum(std, 1e-6 + self.w["glbStd/glbStd/min_std:0"])

    def nested_avg(self, x: np.ndarray) -> np.ndarray:
        steps = [box_mean(x, k) - x for k in self.config.window_sizes]
        steps.append(x.mean(axis=(1, 2), keepdims=True) - x)
        return np.stack(steps, axis=1)

    def div_std(self, dev: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        return np.abs(dev / sigma[:, None])

    def clstm(self, seq: np.ndarray) -> np.ndarray:
        kernel, recurrent = self.w["cLSTM/cLSTM/kernel:0"], self.w["cLSTM/cLSTM/recurrent_kernel:0"]
        bias, units = self.w["cLSTM/cLSTM/bias:0"], kernel.shape[-1] // 4
        n, _, hgt, wid, _ = seq.shape
        h = np.zeros((n, hgt, wid, units))
        c = np.zeros_like(h)
        for t in range(seq.shape[1]):
            z = conv2d_same_zeros(seq[:, t], kernel) + bias + conv2d_same_zeros(h, recurrent)
            zi, zf, zc, zo = np.split(z, 4, axis=-1)
            c = hard_sigmoid(zf) * c + hard_sigmoid(zi) * np.tanh(zc)
            h = hard_sigmoid(zo) * np.tanh(c)
        return h

    def cgru(self, seq: np.ndarray) -> np.ndarray:
        """The ConvGRU variant, as its layout defines it (``mantranet_torch.layers.ConvGRU2d``): gates z (update),
        r (reset), h (candidate) along the kernels' last axis; h' = (1 - u) h + u c from a zero state."""
        kernel, recurrent = self.w["cGRU/cGRU/kernel:0"], self.w["cGRU/cGRU/recurrent_kernel:0"]
        bias, units = self.w["cGRU/cGRU/bias:0"], kernel.shape[-1] // 3
        n, _, hgt, wid, _ = seq.shape
        h = np.zeros((n, hgt, wid, units))
        for t in range(seq.shape[1]):
            xu, xr, xc = np.split(conv2d_same_zeros(seq[:, t], kernel) + bias, 3, axis=-1)
            u = hard_sigmoid(xu + conv2d_same_zeros(h, recurrent[..., :units]))
            r = hard_sigmoid(xr + conv2d_same_zeros(h, recurrent[..., units : 2 * units]))
            c = np.tanh(xc + conv2d_same_zeros(r * h, recurrent[..., 2 * units :]))
            h = (1.0 - u) * h + u * c
        return h

    def pred(self, h: np.ndarray) -> np.ndarray:
        z = conv2d_same_zeros(h, self.w["pred/pred/kernel:0"]) + self.w["pred/pred/bias:0"]
        return 1.0 / (1.0 + np.exp(-z))

    def stages(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """Every named layer's output in network order (the names of ``mantranet_torch.model.layer_names``), NHWC."""
        x = np.asarray(x, dtype=np.float64)
        x = self.b1c1(x)
        yield "b1c1", x
        for layer in (*CONV_LAYERS, "transform"):
            x = self.conv(layer, x)
            yield layer, x
        x = l2_normalize(x)
        yield "L2", x
        x = self.outlier_trans(x)
        yield "outlierTrans", x
        x = self.bnorm(x)
        yield "bnorm", x
        sigma = self.glb_std(x)
        yield "glbStd", sigma
        dev = self.nested_avg(x)
        yield "nestedAvgFeatex", dev
        dev = self.div_std(dev, sigma)
        yield "divStd", dev
        if self.config.recurrent == "gru":
            h = self.cgru(dev)
            yield "cGRU", h
        else:
            h = self.clstm(dev)
            yield "cLSTM", h
        yield "pred", self.pred(h)

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(self.stages(x))

    def layer(self, name: str, *inputs: np.ndarray) -> np.ndarray:
        """One named layer on its own inputs (NHWC): what it computes from what the other framework fed it.

        The inputs are those of ``stages``: the previous layer's output, except glbStd and nestedAvgFeatex
        (bnorm's) and divStd (nestedAvgFeatex's and glbStd's).
        """
        args = [np.asarray(a, dtype=np.float64) for a in inputs]
        if name == "b1c1":
            return self.b1c1(*args)
        if name in (*CONV_LAYERS, "transform"):
            return self.conv(name, *args)
        simple = {
            "L2": l2_normalize,
            "outlierTrans": self.outlier_trans,
            "bnorm": self.bnorm,
            "glbStd": self.glb_std,
            "nestedAvgFeatex": self.nested_avg,
            "divStd": self.div_std,
            "cLSTM": self.clstm,
            "cGRU": self.cgru,
            "pred": self.pred,
        }
        if name not in simple:
            raise KeyError(f"no layer named {name!r}")
        return simple[name](*args)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """N x H x W x 3 in [-1, 1] to N x H x W x 1, float64."""
        out = None
        for _, out in self.stages(x):  # noqa: B007
            pass
        return out
