"""Training ManTraNet: the data it learns from, and the engine that trains it.

``training.synthetic``: forgeries made on demand from authentic photographs (copy-move, splice, removal,
enhancement; polygon, Bezier and blob masks), seeded per sample, and ``write_synthetic`` (``mantranet synth``).
``training.data``: the PyTorch side: random native-resolution crops of a dataset ``evaluate`` reads, or of
synthetic forgeries, as a map-style ``Dataset``, with an ``EpochSampler`` that shards and resumes.
``training.engine``: ``train(TrainConfig) -> TrainingRun`` (``mantranet train``), with ``training.config``,
``training.checkpoint``, ``training.validate``, ``training.memory``, ``training.distributed`` and
``training.report``.

Names are imported on first use (``from training import CropDataset``): ``import training`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CropDataset": "data",
    "EpochSampler": "data",
    "Skips": "data",
    "SyntheticDataset": "data",
    "collate": "data",
    "open_training_data": "data",
    "DataError": "synthetic",
    "Recipe": "synthetic",
    "SyntheticForgeries": "synthetic",
    "write_synthetic": "synthetic",
    "TrainConfig": "config",
    "TrainError": "config",
    "TrainingRun": "engine",
    "train": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
