"""How much memory inference takes, and the largest tile that fits a budget.

Peak memory is modelled per pixel from the channel counts: which full-size tensors are alive at
once at the peak of each phase (read off the code in layers.py and model.py), times their width.
Checked against peak RSS (VmHWM) on this project's 2-core CI machine: a process with torch and a
loaded model holds 350-365 MB; on small runs (whole images of 0.15-0.26 MP, tiles of 128-400 px, Ptrain4
and Ptrain0, fp32 and bf16) the rest measured 0.80-1.13 times the modelled tensor bytes. A 12 MP image
in 750 x 800 tiles peaked at 2.87 GiB where the tensors alone model 2.13 GiB (the allocator keeps freed
memory between tiles), hence the slack below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .tiling import MIN_TILE, crop_shape, detector_radius, featex_radius, tile_grid

FLOAT32_BYTES = 4
BFLOAT16_BYTES = 2
PROCESS_OVERHEAD = 450 * 2**20  # interpreter, torch, a model and oneDNN's kernels for a pass's shapes
ALLOCATOR_SLACK = 1.3  # peak RSS over modelled tensor bytes: 1.13 on small runs, 1.15 at 12 MP, plus headroom
AVAILABLE_FRACTION = 0.8  # leave room for everything else on the machine


@dataclass(frozen=True)
class PixelCosts:
    """Bytes per pixel alive at the peak of each phase, for one image."""

    featex: int  # Featex to bnorm on a crop (pass 1): at L2, its input, its square and its output
    detector: int  # glbStd to pred on a crop (pass 2): at nestedAvgFeatex
    image: int  # whole-image: the 8-bit pixels, the scaled float input and the output map

    @classmethod
    def of(cls, model: nn.Module, precision: str = "fp32") -> PixelCosts:
        features = model.detector.outlier_trans.in_channels
        channels = model.detector.bnorm.moving_mean.numel()
        steps = model.config.time_steps
        width = BFLOAT16_BYTES if precision == "bf16" else FLOAT32_BYTES
        # bf16: three bfloat16 tensors at L2, then its float32 copy beside the bfloat16 original
        featex = max(3 * features * width, features * (width + FLOAT32_BYTES))
        # x, its float64 copy, the float64 integral image and one window's float64 sums, and the T steps
        detector = channels * FLOAT32_BYTES * (1 + 2 + 2 + 2 + steps)
        return cls(featex=featex, detector=detector, image=3 + 3 * FLOAT32_BYTES + FLOAT32_BYTES)


def full_image_bytes(model: nn.Module, height: int, width: int, precision: str = "fp32") -> int:
    """Modelled peak of a whole-image run: the features stay alive through the detector."""
    costs = PixelCosts.of(model, precision)
    features = model.detector.outlier_trans.in_channels * FLOAT32_BYTES
    per_pixel = costs.image + max(costs.featex, features + costs.detector)
    return PROCESS_OVERHEAD + int(ALLOCATOR_SLACK * per_pixel * height * width)


def tiled_bytes(model: nn.Module, height: int, width: int, tile: int, precision: str = "fp32") -> int:
    """Modelled peak of a tiled run with tiles of at most ``tile`` x ``tile``."""
    costs = PixelCosts.of(model, precision)
    tiles = tile_grid(height, width, tile)
    crop1 = crop_shape(tiles, featex_radius(model), height, width)
    crop2 = crop_shape(tiles, detector_radius(model), height, width)
    window = max(model.detector.nested_avg.window_sizes)
    crop_peak = max(costs.featex * _area(crop1), costs.detector * _area(crop2, pad=window))
    return PROCESS_OVERHEAD + int(ALLOCATOR_SLACK * (costs.image * height * width + crop_peak))


def _area(shape: tuple[int, int], pad: int = 0) -> int:
    """Pixels of a crop, each side grown by ``pad`` (the integral image's border)."""
    return (shape[0] + pad) * (shape[1] + pad)


def tile_for_budget(model: nn.Module, height: int, width: int, budget: int, precision: str = "fp32") -> int:
    """The largest tile whose modelled peak fits ``budget`` bytes; ValueError if not even MIN_TILE fits."""
    if tiled_bytes(model, height, width, MIN_TILE, precision) > budget:
        need = tiled_bytes(model, height, width, MIN_TILE, precision)
        raise ValueError(
            f"a {width} x {height} image needs at least {need / 2**30:.2f} GB even in the smallest tiles "
            f"({MIN_TILE} px); the budget is {budget / 2**30:.2f} GB"
        )
    lo, hi = MIN_TILE, max(height, width, MIN_TILE)
    while lo < hi:  # the modelled peak grows with the tile size
        mid = (lo + hi + 1) // 2
        if tiled_bytes(model, height, width, mid, precision) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def available_memory(device: torch.device) -> int:
    """Bytes free for this process: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def automatic_tile(
    model: nn.Module, height: int, width: int, device: torch.device, precision: str = "fp32"
) -> int | None:
    """None when the whole image fits in the available memory, else the largest tile that does."""
    budget = int(AVAILABLE_FRACTION * available_memory(device))
    if full_image_bytes(model, height, width, precision) <= budget:
        return None
    return tile_for_budget(model, height, width, budget, precision)
