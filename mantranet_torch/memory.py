"""How much memory inference takes, how much the machine has, and the largest tile that fits a budget.

Peak memory is modelled per pixel from the channel counts: which full-size tensors are alive at
once at the peak of each phase (read off the code in layers.py and model.py), times their width.
The constants below come from peak resident memory measured on real runs (the README's "Memory model" lists
them); the slack covers what the allocator keeps between tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from .tiling import MIN_TILE, crop_shape, detector_radius, featex_radius, tile_grid

FLOAT32_BYTES = 4
BFLOAT16_BYTES = 2
GB = 2**30  # the unit of ``max_memory``
PROCESS_OVERHEAD = 450 * 2**20  # interpreter, torch, a model and oneDNN's kernels for a pass's shapes
ALLOCATOR_SLACK = 1.3  # peak resident memory over modelled tensor bytes, with headroom (see the README)
AVAILABLE_FRACTION = 0.8  # leave room for everything else on the machine
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_V1_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class PixelCosts:
    """Bytes per pixel alive at the peak of each phase, for one image."""

    featex: int  # Featex to bnorm on a crop (pass 1): at L2, its input, its square and its output
    # glbStd to pred on a crop (pass 2): at nestedAvgFeatex. The recurrent layer after it holds less, in either
    # variant: divStd's T steps of C channels, its input convolution's T x 32 (ConvLSTM) or T x 24 (ConvGRU)
    # channels and a few 8-channel states and gates
    detector: int
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


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes this process may still allocate on ``device`` (default: the host).

    CUDA: the device's free memory. Otherwise the host's available memory (psutil, which every platform
    answers), capped by the container's limit where a Linux cgroup (v2 or v1) sets one: a process in a
    container is killed at its cgroup limit, whatever the host has free.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    host = psutil.virtual_memory().available
    limited = cgroup_available()
    return host if limited is None else min(host, limited)


def cgroup_available(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes left under this process's cgroup memory limit; None without a cgroup or without a limit."""
    for limit_file, usage_file in _cgroup_files(root):
        try:
            limit_text, usage = limit_file.read_text().strip(), int(usage_file.read_text())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= CGROUP_V1_NO_LIMIT:
            continue
        # page cache counts as usage but is given back under pressure: not counted as used
        reclaimable = _memory_stat(limit_file.parent / "memory.stat", ("inactive_file", "total_inactive_file"))
        return max(int(limit_text) - max(usage - reclaimable, 0), 0)
    return None


def _cgroup_files(root: Path) -> list[tuple[Path, Path]]:
    """(limit, usage) file pairs to try: this process's own cgroup v2 folder, the namespace root, cgroup v1."""
    folders = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):  # cgroup v2: "0::/path/of/the/group"
                folders.append(root / line[3:].lstrip("/"))
    except OSError:
        pass
    folders.append(root)
    pairs = [(folder / "memory.max", folder / "memory.current") for folder in folders]
    return [*pairs, (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")]


def _memory_stat(path: Path, keys: tuple[str, ...]) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in keys and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def tile_for_memory(model: nn.Module, height: int, width: int, budget: int, precision: str = "fp32") -> int | None:
    """None when the whole image fits ``budget`` bytes, else the largest tile that does (ValueError if none)."""
    if full_image_bytes(model, height, width, precision) <= budget:
        return None
    return tile_for_budget(model, height, width, budget, precision)


def automatic_tile(
    model: nn.Module, height: int, width: int, device: torch.device, precision: str = "fp32"
) -> int | None:
    """None when the whole image fits in the available memory, else the largest tile that does."""
    return tile_for_memory(model, height, width, int(AVAILABLE_FRACTION * available_memory(device)), precision)


# Training: what the backward pass needs kept. Per layer of the feature extractor, autograd keeps the padded input
# of each convolution (for its weight gradient) and the ReLU's output; the detector keeps its float64 window sums.
# Calibrated against peak resident memory of real training steps (tests/test_train_memory.py, within 35%).
TRAINING_SLACK = 1.25  # measured peak over modelled tensor bytes, with headroom
TRAINING_OVERHEAD = 500 * 2**20  # interpreter, torch, the data pipeline and oneDNN's kernels for the step's shapes


@dataclass(frozen=True)
class TrainingCosts:
    """Bytes per pixel of one image that a training step keeps at its peak, by part."""

    featex: int  # activations kept for the backward pass (all of them, or the block inputs when checkpointed)
    detector: int
    params: int  # the weights, their gradients and the optimiser's two moments, bytes in all


def training_costs(
    model: nn.Module, precision: str = "fp32", checkpointed: bool = False, featex_trained: bool = True
) -> TrainingCosts:
    """Modelled per-pixel costs of a training step of ``model`` (see ``training_bytes``)."""
    width = BFLOAT16_BYTES if precision == "bf16" else FLOAT32_BYTES
    layers = []
    for module in model.featex.children():
        weight = getattr(module, "weight", None)
        cin = weight.shape[1] if weight is not None else 3  # b1c1 (combined kernels) reads the image
        cout = weight.shape[0] if weight is not None else module.kernel.shape[0]
        layers.append((cin, cout))
    if not featex_trained:  # nothing kept: the largest layer's input and output alive at once
        featex = max(cin + cout for cin, cout in layers) * width
    elif checkpointed:  # each layer's input kept, one layer's activations recomputed at a time
        featex = sum(cout for _, cout in layers) * width + max(2 * (cin + cout) for cin, cout in layers) * width
    else:
        featex = sum(cin + cout for cin, cout in layers) * width
    features = model.detector.outlier_trans.in_channels
    channels = model.detector.bnorm.moving_mean.numel()
    steps = model.config.time_steps
    gates = 4 * max((getattr(m, "hidden", 0) for m in model.detector.children()), default=8)
    # the float32 features, outlierTrans and bnorm outputs, x and its float64 copy, the float64 integral image
    # and one window's sums, the T steps, their gradient, the recurrent layer's gates and states per step
    detector = (features + 2 * channels) * FLOAT32_BYTES + 3 * channels * 8 + 2 * steps * channels * FLOAT32_BYTES
    detector += steps * 3 * gates * FLOAT32_BYTES
    params = sum(p.numel() for p in model.parameters()) * FLOAT32_BYTES * 4
    return TrainingCosts(featex=featex, detector=detector, params=params)


def training_bytes(
    model: nn.Module,
    crop: int,
    batch: int,
    precision: str = "fp32",
    checkpointed: bool = False,
    featex_trained: bool = True,
    overhead: int = TRAINING_OVERHEAD,
) -> int:
    """Modelled peak memory of one training step on ``batch`` crops of ``crop`` x ``crop`` pixels."""
    costs = training_costs(model, precision, checkpointed, featex_trained)
    pixels = batch * crop * crop
    return overhead + costs.params + int(TRAINING_SLACK * (costs.featex + costs.detector) * pixels)


def training_fit(
    model: nn.Module, crop: int, batch: int, budget: int, precision: str = "fp32", featex_trained: bool = True
) -> tuple[int, int]:
    """The largest (crop, batch) under ``budget`` bytes, with activation checkpointing when it needs it: first
    the batch at ``crop`` (down to 1), then the crop at batch 1 (in steps of 8 pixels). (0, 0) when none fits."""
    checkpointed = featex_trained
    for b in range(batch, 0, -1):
        if training_bytes(model, crop, b, precision, checkpointed, featex_trained) <= budget:
            return crop, b
    for c in range(crop - crop % 8, 7, -8):
        if training_bytes(model, c, 1, precision, checkpointed, featex_trained) <= budget:
            return c, 1
    return 0, 0
