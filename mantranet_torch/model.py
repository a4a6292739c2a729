"""ManTraNet (Wu, AbdAlmageed and Natarajan, CVPR 2019) in PyTorch, matching the official Keras 2.2 model.

Module names mirror the Keras layer names, so ``featex.b4c2`` is Keras' ``Featex/b4c2`` and
``detector.outlier_trans`` is Keras' ``outlierTrans``. ``stages`` yields every named layer's output
under its Keras name, which is how parity tools line the two frameworks up. The detector's recurrent
layer is ``detector.clstm`` (Keras ``cLSTM``, every release) or, in the ConvGRU variant
(``ManTraNetConfig(recurrent="gru")``), ``detector.cgru`` (``cGRU``): ``layer_names(config)`` lists a
variant's names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .config import GRU, LSTM, ManTraNetConfig, release_config
from .layers import (
    CombinedConv2d,
    ConvGRU2d,
    ConvLSTM2d,
    GlobalStd,
    ImageStatistics,
    KerasBatchNorm,
    SymmetricConv2d,
    WindowDeviations,
    bayar_constraint,
    l2_normalize_tf,
)
from .memory import GB, automatic_tile, tile_for_memory
from .model_input import ImageLike, to_model_input
from .precision import float32_precision, resolve_precision
from .tiling import Progress, extract_features, last_output, predict_tiled

# (Keras name, in channels, out channels) of the 3x3 convolutions after b1c1, in network order.
FEATEX_CONVS: tuple[tuple[str, int, int], ...] = (
    ("b1c2", -1, 32),  # -1: takes b1c1's output, whose width depends on the release
    ("b2c1", 32, 64),
    ("b2c2", 64, 64),
    ("b3c1", 64, 128),
    ("b3c2", 128, 128),
    ("b3c3", 128, 128),
    ("b4c1", 128, 256),
    ("b4c2", 256, 256),
    ("b4c3", 256, 256),
    ("b5c1", 256, 256),
    ("b5c2", 256, 256),
)
FEATURE_CHANNELS = 256
DETECTOR_CHANNELS = 64
LSTM_HIDDEN = 8  # the ConvGRU variant has the ConvLSTM's hidden width and kernel
LSTM_KERNEL = 7
PRED_KERNEL = 7

FEATEX_LAYERS = ("b1c1", *(name for name, _, _ in FEATEX_CONVS), "transform", "L2")
DETECTOR_LAYERS = ("outlierTrans", "bnorm", "glbStd", "nestedAvgFeatex", "divStd", "cLSTM", "pred")
LAYERS = FEATEX_LAYERS + DETECTOR_LAYERS  # every tapped output, in network order, by Keras name
RECURRENT_LAYERS = {LSTM: "cLSTM", GRU: "cGRU"}  # the recurrent layer's Keras name, by ManTraNetConfig.recurrent


def detector_layers(config: ManTraNetConfig) -> tuple[str, ...]:
    """The detector's tapped outputs for ``config``, by Keras name: ``DETECTOR_LAYERS`` with its recurrent layer."""
    recurrent = RECURRENT_LAYERS[config.recurrent]
    return tuple(recurrent if name == RECURRENT_LAYERS[LSTM] else name for name in DETECTOR_LAYERS)


def layer_names(config: ManTraNetConfig) -> tuple[str, ...]:
    """Every tapped output of ``ManTraNet(config)`` in network order, by Keras name (``LAYERS`` for the LSTM)."""
    return FEATEX_LAYERS + detector_layers(config)


class Featex(nn.Module):
    """The manipulation-trace feature extractor: b1c1 .. b5c2, transform, then L2 normalisation."""

    def __init__(self, config: ManTraNetConfig) -> None:
        super().__init__()
        self.b1c1 = CombinedConv2d(config.first_block_filters)
        for name, cin, cout in FEATEX_CONVS:
            self.add_module(name, SymmetricConv2d(config.first_block_filters if cin < 0 else cin, cout))
        self.transform = SymmetricConv2d(FEATURE_CHANNELS, FEATURE_CHANNELS, activation=config.transform_activation)

    def stages(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        for name in FEATEX_LAYERS[:-1]:
            x = getattr(self, name)(x)
            yield name, x
        yield "L2", l2_normalize_tf(x, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return last_output(self.stages(x))


class AnomalyDetector(nn.Module):
    """The local anomaly detector: outlierTrans, bnorm, glbStd, nestedAvgFeatex, divStd, cLSTM (or cGRU), pred."""

    def __init__(self, config: ManTraNetConfig) -> None:
        super().__init__()
        self.outlier_trans = nn.Conv2d(FEATURE_CHANNELS, DETECTOR_CHANNELS, 1, bias=False)
        self.bnorm = KerasBatchNorm(DETECTOR_CHANNELS)
        self.glb_std = GlobalStd(DETECTOR_CHANNELS)
        self.nested_avg = WindowDeviations(config.window_sizes)
        self.recurrent_name = RECURRENT_LAYERS[config.recurrent]  # its Keras name, and the module's in lower case
        if config.recurrent == GRU:
            self.cgru = ConvGRU2d(DETECTOR_CHANNELS, LSTM_HIDDEN, LSTM_KERNEL)
        else:
            self.clstm = ConvLSTM2d(DETECTOR_CHANNELS, LSTM_HIDDEN, LSTM_KERNEL)
        self.pred = nn.Conv2d(LSTM_HIDDEN, 1, PRED_KERNEL, padding=PRED_KERNEL // 2)

    @property
    def recurrent(self) -> ConvLSTM2d | ConvGRU2d:
        """The recurrent layer, whichever the variant: ``clstm`` or ``cgru``."""
        return getattr(self, self.recurrent_name.lower())

    def stages(
        self, features: Tensor, stats: ImageStatistics | None = None, logits: bool = False
    ) -> Iterator[tuple[str, Tensor]]:
        """Each named output from the features on.

        Args:
            features: the feature extractor's output (N, 256, H, W).
            stats: the bnorm output's per-image statistics, when they come from elsewhere (tiling).
            logits: end with ``("pred_logits", z)``, the map before its sigmoid, instead of ``("pred", sigmoid(z))``.
        """
        x = self.outlier_trans(features)
        yield "outlierTrans", x
        x = self.bnorm(x)
        yield "bnorm", x
        yield from self.stages_after_bnorm(x, stats, logits)

    def stages_after_bnorm(
        self, x: Tensor, stats: ImageStatistics | None = None, logits: bool = False
    ) -> Iterator[tuple[str, Tensor]]:
        """glbStd .. pred from the bnorm output ``x``, which may be a crop of the image ``stats`` describe."""
        xd = x.to(torch.float64)  # one float64 copy serves the statistics and the window deviations
        stats = stats or ImageStatistics.of(xd)
        sigma = self.glb_std(x, stats)
        yield "glbStd", sigma
        dev = self.nested_avg(x, stats, xd)
        del xd
        yield "nestedAvgFeatex", dev
        dev = (dev / sigma[:, None]).abs_()
        yield "divStd", dev
        h = self.recurrent(dev)
        yield self.recurrent_name, h
        z = self.pred(h)
        yield ("pred_logits", z) if logits else ("pred", torch.sigmoid(z))

    def forward(self, features: Tensor, stats: ImageStatistics | None = None) -> Tensor:
        return last_output(self.stages(features, stats))

    def logits(self, features: Tensor) -> Tensor:
        """The map before its sigmoid: what a loss should take (``binary_cross_entropy_with_logits``)."""
        return last_output(self.stages(features, logits=True))


class ManTraNet(nn.Module):
    """ManTraNet: ``model(x)`` maps N x 3 x H x W inputs scaled to [-1, 1] to N x 1 x H x W likelihoods.

    Every statistic is per image, so a batch gives the same maps as its images one by one. A new model is in
    eval mode, as a Keras model runs outside ``fit``; ``model.train()`` puts bnorm on batch statistics (which
    mix the images of a batch, as Keras' training does): see ``mantranet_torch.training``.
    """

    def __init__(self, config: ManTraNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or ManTraNetConfig()
        self.featex = Featex(self.config)
        self.detector = AnomalyDetector(self.config)
        self.reset_parameters()
        self.eval()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Keras' initialisers: Glorot-uniform kernels, zero biases (the ConvLSTM's forget gate 1), min_std 1e-5."""
        for p in self.parameters():
            if p.dim() == 4:
                nn.init.xavier_uniform_(p)
            else:
                p.zero_()
        b1c1 = self.featex.b1c1
        b1c1.bayar_kernel.copy_(bayar_constraint(b1c1.bayar_kernel))
        self.detector.glb_std.min_std.fill_(1e-5)
        if self.config.recurrent == LSTM:  # Keras' unit_forget_bias; its GRU has no such rule
            self.detector.clstm.bias[LSTM_HIDDEN : 2 * LSTM_HIDDEN] = 1.0

    @classmethod
    def from_release(cls, index: int) -> ManTraNet:
        """An UNTRAINED model shaped as the official ``ManTraNet_Ptrain{index}.h5``: random weights, no download.

        For the trained release use ``converter.pretrained(index)``; for a weight file,
        ``converter.load_weights(path)``.

        Args:
            index: the official release, 0-4.

        Returns:
            The model, with random weights.

        Raises:
            ValueError: no official release ``index``.
        """
        return cls(release_config(index))

    def stages(self, x: Tensor, logits: bool = False) -> Iterator[tuple[str, Tensor]]:
        """Each named layer's output in network order, keyed by its Keras name (``layer_names(config)``).

        logits: end with ``"pred_logits"`` (the map before its sigmoid) instead of ``"pred"``.
        """
        features = None
        for name, out in self.featex.stages(x):
            features = out
            yield name, out
        yield from self.detector.stages(features, logits=logits)

    def logits(self, x: Tensor) -> Tensor:
        """N x 1 x H x W pre-sigmoid maps (``torch.sigmoid(model.logits(x))`` is ``model(x)``): train on these.

        A loss that applies its own sigmoid (``BCEWithLogitsLoss``) must be given these, never ``model(x)``.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x H x W tensor, got shape {tuple(x.shape)}")
        return self.detector.logits(self.featex(x))

    def trace(self, x: Tensor) -> dict[str, Tensor]:
        """All named outputs at once (memory grows with the image: use on small inputs).

        Args:
            x: a float32 N x 3 x H x W tensor in [-1, 1] (``to_model_input``).

        Returns:
            Keras layer name (``LAYERS``, in network order) to that layer's output.
        """
        return dict(self.stages(x))

    def forward(self, x: Tensor) -> Tensor:
        """The forgery likelihood of a batch, every statistic per image.

        Args:
            x: a float32 N x 3 x H x W tensor in [-1, 1] (``to_model_input`` makes one from an image).

        Returns:
            N x 1 x H x W likelihoods in (0, 1).

        Raises:
            ValueError: ``x`` is not N x 3 x H x W.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x H x W tensor, got shape {tuple(x.shape)}")
        return self.detector(self.featex(x))

    @torch.inference_mode()
    def predict(
        self,
        image: ImageLike,
        tile: int | None = None,
        max_memory: float | None = None,
        precision: str = "fp32",
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Forgery likelihood of one uint8 RGB image: the whole map, exactly, tiled only where memory requires.

        Args:
            image: one uint8 H x W x 3 array, RGB PIL image, or 1 x 3 x H x W tensor (``to_model_input``'s forms).
            tile: compute the map in tiles of at most tile x tile pixels, in bounded memory and exactly (up to
                float32 rounding).
            max_memory: a budget in GB (2**30 bytes): the whole image when its modelled peak fits, else the largest
                tiles that do. Not with ``tile``. Neither: the whole image at once, or the largest tiles that fit when
                the whole image would not fit in the device's available memory.
            precision: "fp32" (true float32, TF32 off), "tf32" (TF32 convolutions on NVIDIA GPUs of compute
                capability 8.0+), "bf16" (a bfloat16 feature extractor: less exact, faster only where bfloat16 is
                native; elsewhere a ``SlowPrecisionWarning``), or "auto" (bf16 where native, else fp32); see
                ``mantranet_torch.precision``. The float32 settings are set for the call and restored after it.
            progress: called with (tiles done, tiles in all) during a tiled run.

        Returns:
            float32 H x W likelihoods in (0, 1).

        Raises:
            ValueError: both ``tile`` and ``max_memory``, a budget that is not a positive number, a batch, or a
                budget that not even the smallest tiles fit in.
        """
        if tile is not None and max_memory is not None:
            raise ValueError("give tile or max_memory, not both")
        if max_memory is not None and not 0 < max_memory < math.inf:  # NaN and inf too
            raise ValueError(f"max_memory must be a positive number of GB, got {max_memory}")
        param = next(self.parameters())
        x = to_model_input(image).to(device=param.device, dtype=param.dtype)
        if x.shape[0] != 1:
            raise ValueError(f"predict takes one image, got a batch of {x.shape[0]}")
        precision = resolve_precision(precision, x.device)
        height, width = x.shape[-2:]
        if max_memory is not None:
            tile = tile_for_memory(self, height, width, int(max_memory * GB), precision)
        elif tile is None:
            tile = automatic_tile(self, height, width, x.device, precision)
        with float32_precision(precision):
            if tile is not None and tile < max(height, width):
                return predict_tiled(self, x, tile, precision, progress)
            return self.detector(extract_features(self, x, precision))[0, 0].float().cpu().numpy()
