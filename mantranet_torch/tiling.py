"""Exact tiled inference: the full-image map, computed tile by tile in bounded memory.

Everything in ManTraNet is local except glbStd and the global mean, which need whole-image statistics
of the bnorm output. So two passes over a grid of tiles:

1. each tile plus a halo of the feature extractor's radius runs through Featex, outlierTrans and bnorm;
   the tile's interior (exact: symmetric padding at the crop's inner edges never reaches it) is
   spooled to a temporary file and folded into per-channel float64 statistics (Chan's merge);
2. each tile plus the detector's halo (largest window, ConvLSTM steps, pred) is read back and run
   through the rest of the detector with the whole image's statistics.

At the image border a crop's border is the image's, so the symmetric and zero padding there are the
full image's too; within the tile the result equals the full-image map up to float32 rounding.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice, pairwise

import numpy as np
import torch
from torch import Tensor, nn

from .layers import CombinedConv2d, ImageStatistics, SymmetricConv2d
from .precision import FLOAT32_SETTINGS

MIN_TILE = 32  # smaller tiles are exact too, but spend most of their time on halos
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Box:
    """Rows ``top:bottom`` and columns ``left:right`` of an image."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def within(self, outer: Box) -> tuple[slice, slice]:
        """This box's rows and columns in the coordinates of ``outer``, which contains it."""
        rows = slice(self.top - outer.top, self.bottom - outer.top)
        return rows, slice(self.left - outer.left, self.right - outer.left)


def _splits(size: int, tile: int) -> list[int]:
    """Edges of ceil(size / tile) near-equal parts of ``size``, none larger than ``tile``."""
    parts = -(-size // tile)
    return [round(i * size / parts) for i in range(parts + 1)]


def tile_grid(height: int, width: int, tile: int) -> list[Box]:
    """Tiles of at most ``tile`` x ``tile`` covering the image, row by row."""
    rows, cols = list(pairwise(_splits(height, tile))), list(pairwise(_splits(width, tile)))
    return [Box(top, left, bottom, right) for top, bottom in rows for left, right in cols]


def crop_shape(tiles: list[Box], halo: int, height: int, width: int) -> tuple[int, int]:
    """The one crop size of a pass: the largest tile plus ``halo`` on each side, at most the image."""
    return (
        min(max(b.height for b in tiles) + 2 * halo, height),
        min(max(b.width for b in tiles) + 2 * halo, width),
    )


def crop_around(box: Box, halo: int, shape: tuple[int, int], height: int, width: int) -> Box:
    """A window of ``shape`` holding ``box`` and ``halo`` pixels around it, or the image edge nearer than that.

    Windows of one size, shifted inwards at the image edges rather than cut short, so that every crop of
    a pass has the same shape and each convolution is set up once per pass.
    """
    crop_height, crop_width = shape
    top = min(max(box.top - halo, 0), height - crop_height)
    left = min(max(box.left - halo, 0), width - crop_width)
    return Box(top, left, top + crop_height, left + crop_width)


def featex_radius(model: nn.Module) -> int:
    """How far a feature-extractor output pixel sees: the sum of k//2 over its convolutions."""
    radius = 0
    for module in model.featex.modules():
        if isinstance(module, CombinedConv2d):
            radius += module.kernel_size // 2
        elif isinstance(module, SymmetricConv2d):
            radius += module.kernel_size[0] // 2
    return radius


def detector_radius(model: nn.Module) -> int:
    """How far a map pixel sees into the bnorm output.

    Step t of the recurrent layer reads a window of radius k_t//2 (0 for the global mean); the recurrent layer
    reaches ``recurrent.reach(t, T)`` further into that step's input, then pred adds its own radius.
    """
    detector = model.detector
    windows = [k // 2 for k in detector.nested_avg.window_sizes] + [0]
    steps = len(windows)
    reach = detector.recurrent.reach
    return max(q + reach(t, steps) for t, q in enumerate(windows)) + detector.pred.kernel_size[0] // 2


class StatisticsAccumulator:
    """Per-channel count, mean and sum of squared deviations in float64, merged tile by tile (Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Fold in the pixels of one (1, C, h, w) tensor."""
        xd = x[0].to(torch.float64).flatten(1)
        n = xd.shape[1]
        mean = xd.mean(dim=1)
        m2 = (xd - mean[:, None]).square_().sum(dim=1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def statistics(self) -> ImageStatistics:
        return ImageStatistics(self.mean[None], (self.m2 / self.count).sqrt()[None])


class FeatureSpool:
    """An H x W x C map in a temporary file: tiles go in, crops come back out.

    The file lives in the page cache or on disk, never in the process's own memory.
    """

    def __init__(self, height: int, width: int, channels: int, dtype: torch.dtype) -> None:
        self.height, self.width, self.channels = height, width, channels
        self.dtype = torch.empty(0, dtype=dtype).numpy().dtype
        # in the temporary folder ($TMPDIR), open for the spool's life (see close)
        self.file = tempfile.TemporaryFile()  # noqa: SIM115
        self.pixel_bytes = channels * self.dtype.itemsize

    def _offset(self, row: int, col: int) -> int:
        return (row * self.width + col) * self.pixel_bytes

    def write(self, box: Box, x: Tensor) -> None:
        """Store the (1, C, h, w) tensor ``x`` at ``box``."""
        rows = np.ascontiguousarray(x[0].permute(1, 2, 0).cpu().numpy(), dtype=self.dtype)
        fd = self.file.fileno()
        for i in range(box.height):
            os.pwrite(fd, rows[i], self._offset(box.top + i, box.left))

    def read(self, box: Box) -> Tensor:
        """The (1, C, h, w) channels-last tensor stored at ``box``."""
        rows = np.empty((box.height, box.width, self.channels), dtype=self.dtype)
        fd = self.file.fileno()
        for i in range(box.height):
            buffer = memoryview(rows[i]).cast("B")
            if os.preadv(fd, [buffer], self._offset(box.top + i, box.left)) != len(buffer):
                raise OSError(f"short read from the feature spool at row {box.top + i}")
        return torch.from_numpy(rows).permute(2, 0, 1)[None]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> FeatureSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def autocast(device_type: str, precision: str) -> torch.autocast:
    """Mixed precision for the feature extractor: bfloat16 convolutions for "bf16", off for "fp32" and "tf32".

    The detector always runs in x's own dtype: its statistics, window means and ConvLSTM state are
    where rounding would show. ("auto" is resolved before: see precision.resolve_precision.)
    """
    if precision not in FLOAT32_SETTINGS:
        raise ValueError(f"precision must be one of {tuple(FLOAT32_SETTINGS)}, got {precision!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def extract_features(model: nn.Module, x: Tensor, precision: str = "fp32") -> Tensor:
    """Featex's output for a float N x 3 x H x W input, in x's dtype; the extractor runs in ``precision``."""
    with autocast(x.device.type, precision):
        features = model.featex(x)
    return features.to(x.dtype)


def normalized_features(model: nn.Module, x: Tensor, precision: str = "fp32") -> Tensor:
    """The bnorm output of a float N x 3 x H x W input (pass 1 of tiling)."""
    stages = dict(islice(model.detector.stages(extract_features(model, x, precision)), 2))  # outlierTrans, bnorm
    return stages["bnorm"]


def predict_tiled(
    model: nn.Module,
    image: Tensor,
    tile: int,
    precision: str = "fp32",
    progress: Progress | None = None,
) -> np.ndarray:
    """The map of one image (1 x 3 x H x W, scaled float, on the model's device), tile by tile.

    Returns float32 H x W; equals the full-image map up to float32 rounding for every ``tile`` >= MIN_TILE.
    """
    if tile < MIN_TILE:
        raise ValueError(f"tile must be at least {MIN_TILE} pixels, got {tile}")
    height, width = image.shape[-2:]
    tiles = tile_grid(height, width, tile)
    done, total = 0, 2 * len(tiles)
    halo1, halo2 = featex_radius(model), detector_radius(model)
    shape1, shape2 = crop_shape(tiles, halo1, height, width), crop_shape(tiles, halo2, height, width)
    channels = model.detector.bnorm.moving_mean.numel()
    with FeatureSpool(height, width, channels, image.dtype) as spool:
        accumulator = StatisticsAccumulator()
        for box in tiles:
            crop = crop_around(box, halo1, shape1, height, width)
            x = image[..., crop.top : crop.bottom, crop.left : crop.right]
            inner = normalized_features(model, x, precision)[(..., *box.within(crop))]
            accumulator.add(inner)
            spool.write(box, inner)
            done += 1
            if progress:
                progress(done, total)
        stats = accumulator.statistics()
        device = image.device
        out = np.empty((height, width), dtype=np.float32)
        for box in tiles:
            crop = crop_around(box, halo2, shape2, height, width)
            x = spool.read(crop).to(device)
            pred = last_output(model.detector.stages_after_bnorm(x, stats))
            out[box.top : box.bottom, box.left : box.right] = pred[(0, 0, *box.within(crop))].float().cpu().numpy()
            done += 1
            if progress:
                progress(done, total)
        return out


def last_output(stages: Iterator[tuple[str, Tensor]]) -> Tensor:
    """The output of the last of a module's named ``stages``."""
    out = None
    for _, stage_out in stages:
        out = stage_out
    return out
