"""A run's checkpoint: everything needed to continue it bit for bit, written atomically.

``RUN_DIR/checkpoint.pt`` holds the model, the optimiser, the schedule, the random states of torch, NumPy and
Python, the data position (epoch and samples consumed), the step, and the run's config. It is replaced in one
step (``mantranet_torch.files``): a run killed while writing, or a full disk, leaves the previous one whole.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from mantranet_torch.files import FileError, write_bytes_atomic

from .config import TrainError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


def rng_states() -> dict:
    """The random states a run draws from (torch's CPU and CUDA generators, NumPy's global one, Python's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {  # as tensors, numbers and lists only, so that torch.load(weights_only=True) reads them back
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically, replacing the previous.

    Raises:
        TrainError: the write failed (a full disk, say); the previous checkpoint is untouched.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    try:
        write_bytes_atomic(path, buffer.getvalue(), force=True)
    except FileError as e:
        raise TrainError(str(e)) from None


def load_checkpoint(path: Path) -> dict:
    """The state ``save_checkpoint`` wrote. Raises TrainError naming the file when it cannot be read."""
    if not path.is_file():
        raise TrainError(f"{path}: no checkpoint to resume from (run without --resume to start)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file: torch raises many types
        raise TrainError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{path}: not a checkpoint of this project's format {FORMAT}")
    return state
