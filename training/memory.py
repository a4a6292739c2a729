"""``--max-memory``: whether a run's training step fits a budget, by the model in ``mantranet_torch.memory``."""

from __future__ import annotations

import torch

from mantranet_torch import ManTraNet
from mantranet_torch.memory import GB, training_bytes, training_fit

from .config import TrainConfig, TrainError


def fit(config: TrainConfig, model: ManTraNet, device: torch.device, frozen: list[str]) -> bool:
    """Whether to checkpoint activations: as asked, or switched on when only that makes ``max_memory`` fit.

    Raises:
        TrainError: the step does not fit ``max_memory`` even with checkpointing; names the crop and batch that do.
    """
    asked = config.checkpoint_activations
    if config.max_memory is None:
        return asked
    trained = any(p.requires_grad for p in model.featex.parameters())
    budget = int(config.max_memory * GB)
    for checkpointed in (True,) if asked else (False, True):
        need = training_bytes(model, config.crop, config.batch, config.precision, checkpointed, trained)
        if need <= budget:
            return checkpointed
    need = training_bytes(model, config.crop, config.batch, config.precision, trained, trained)
    crop, batch = training_fit(model, config.crop, config.batch, budget, config.precision, trained)
    hint = (f"--crop {crop} --batch {batch}" + (" --checkpoint-activations" if trained else "")) if crop else (
        "nothing fits: even one 8-pixel crop needs more")  # fmt: skip
    raise TrainError(
        f"--max-memory {config.max_memory:g}: a step of {config.batch} crops of {config.crop} px needs about "
        f"{need / GB:.2f} GB even with activation checkpointing; {hint}"
    )


def out_of_memory_hint(config: TrainConfig, model: ManTraNet, budget: int) -> str:
    """What to run instead after the device ran out of memory: the crop and batch that fit ``budget`` bytes."""
    trained = any(p.requires_grad for p in model.featex.parameters())
    crop, batch = training_fit(model, config.crop, config.batch, budget, config.precision, trained)
    if not crop:
        return "not even one 8-pixel crop fits"
    return f"--crop {crop} --batch {batch}" + (" --checkpoint-activations" if trained else "")
