"""Training ManTraNet: the data it learns from.

``training.synthetic``: forgeries made on demand from authentic photographs (copy-move, splice, removal,
enhancement; polygon, Bezier and blob masks), seeded per sample, and ``write_synthetic`` (``mantranet synth``).
``training.data``: the PyTorch side: random native-resolution crops of a dataset ``evaluate`` reads, or of
synthetic forgeries, as a map-style ``Dataset``, with an ``EpochSampler`` that shards and resumes.
``training.engine``: ``train(TrainConfig) -> TrainingRun`` (``mantranet train``), with ``training.config``,
``training.checkpoint``, ``training.validate``, ``training.memory`` and ``training.report``. Imported on first use,
so that the data side loads without the engine's dependencies.
"""

from __future__ import annotations

_LAZY = {"TrainConfig": "config", "TrainError": "config", "TrainingRun": "engine", "train": "engine"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
