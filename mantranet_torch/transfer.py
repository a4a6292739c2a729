"""Initialising one ManTraNet from another's weights: a ConvGRU variant from a release's ConvLSTM model.

The variants share every array but the recurrent layer's (``detector.clstm`` against ``detector.cgru``), so a
ConvGRU model starts from a trained release with the feature extractor and the rest of the detector copied and
its recurrent layer at its initialisation; what was and was not copied is returned, for the caller to print.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import ManTraNet


@dataclass(frozen=True)
class Initialisation:
    """What ``init_from`` did, by state-dict key, in the target's order.

    copied: arrays taken from the source. left: the target's arrays it kept at their initialisation (the
    recurrent layer's, when the variants differ). unused: the source's arrays the target has no place for.
    """

    copied: tuple[str, ...]
    left: tuple[str, ...]
    unused: tuple[str, ...]

    def describe(self) -> str:
        """One line for a log: how many arrays were copied, and which were left at their initialisation."""
        text = f"copied {len(self.copied)} arrays"
        if self.left:
            text += f"; left at their initialisation: {', '.join(self.left)}"
        if self.unused:
            text += f"; not used from the source: {', '.join(self.unused)}"
        return text


def init_from(model: ManTraNet, source: ManTraNet | Mapping[str, Tensor]) -> Initialisation:
    """Copy into ``model`` every array of ``source`` (a model or its state dict) but the recurrent layer's.

    The recurrent layer's arrays are copied too when ``source`` has them under the same keys and shapes (a
    model of the same variant); otherwise they keep the values ``model`` has. Every other array of ``model``
    must be in ``source`` with its shape. Nothing is copied unless everything fits.

    Args:
        model: the model to initialise, e.g. ``ManTraNet(dataclasses.replace(release_config(4), recurrent="gru"))``.
        source: e.g. ``converter.pretrained(4)`` or its ``state_dict()``.

    Returns:
        The ``Initialisation``: the keys copied, left at their initialisation, and not used.

    Raises:
        ValueError: an array outside the recurrent layer missing from ``source`` or of another shape
        (a release of another first-block width, say), naming the keys.
    """
    state = source.state_dict() if isinstance(source, ManTraNet) else dict(source)
    target = model.state_dict()
    recurrent = f"detector.{model.detector.recurrent_name.lower()}."
    problems, copied, left = [], [], []
    for key, value in target.items():
        found = state.get(key)
        fits = isinstance(found, Tensor) and found.shape == value.shape
        if fits:
            copied.append(key)
        elif key.startswith(recurrent):
            left.append(key)
        elif found is None:
            problems.append(f"{key} missing")
        else:
            theirs = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
            problems.append(f"{key}: the model's is {tuple(value.shape)}, the source's {theirs}")
    if problems:
        raise ValueError(f"cannot initialise from this source: {'; '.join(problems)}")
    with torch.no_grad():
        for key in copied:
            target[key].copy_(state[key])  # state_dict() tensors share the parameters' storage
    unused = tuple(key for key in state if key not in target)
    return Initialisation(tuple(copied), tuple(left), unused)
