"""The PyTorch side of a parity run: WEIGHTS.h5 converted in memory, or the user's ``torch_weights`` (a file of
ours, or the earlier port's checkpoints), completed from WEIGHTS.h5 when it holds one part only."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converter.convert import Conversion
from converter.legacy import DETECTOR, PART_NAMES, EarlierPortWarning, load_earlier_port
from mantranet_torch import ManTraNet, WeightFileError
from mantranet_torch.config import ManTraNetConfig
from mantranet_torch.weights import (
    MODEL_PARTS,
    SAFETENSORS_SUFFIX,
    metadata_config,
    model_from_state_dict,
    model_parts,
    read_weights,
)

from .compare import to_nhwc
from .errors import ParityInputError
from .runner import Side

ONNX_SUFFIX = ".onnx"
LOCAL_MODE_NOTE = "an ONNX graph runs from the image only: its layers are compared in cumulative mode"


@dataclass
class TorchSide:
    """What is compared with the reference: our model (or any ``runner.Side``), described for the report."""

    model: ManTraNet | Side
    description: str
    paths: list[str]
    notes: list[str]


class ReferenceSide:
    """The project's TensorFlow reference as a compared ``Side`` (to check it against the official code)."""

    def __init__(self, model: Any) -> None:
        from .reference_layers import reference_layers

        self.model = model
        self.layers = reference_layers(model)

    def stages(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        yield from self.model.trace(x).items()

    def layer(self, name: str, *inputs: np.ndarray) -> np.ndarray:
        return self.layers[name](*inputs)


class OnnxSide:
    """An ONNX file exported with its named layers (``mantranet export-onnx --layers``), run in ONNX Runtime, as a
    compared ``Side``: every layer in cumulative mode. A graph runs from the image only, so local mode (one layer
    fed the reference's input) has nothing from it."""

    def __init__(self, path: Path, conversion: Conversion) -> None:
        from converter.onnx_export import OnnxModel

        self.session = OnnxModel(path)
        if not self.session.has_layers:
            raise ParityInputError(
                f"{path}: holds the map only; export it with `mantranet export-onnx --layers` to compare its layers"
            )
        if self.session.config is not None:
            _same_architecture(self.session.config, conversion, str(path))

    def stages(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        for name, value in self.session.trace(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).items():
            yield name, to_nhwc(torch.from_numpy(value))

    def layer(self, name: str, *inputs: np.ndarray) -> None:
        return None


def _is_ours(path: Path) -> bool:
    """A mantranet-torch weight file (keys featex.* / detector.*), as opposed to the earlier port's checkpoint."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return True
    try:
        tensors, _ = read_weights(path)
    except WeightFileError:
        return False  # the earlier port's reader gives the precise message
    return bool(model_parts(tensors))


def _complete(state: dict, parts: tuple[str, ...], conversion: Conversion, source: str, notes: list[str]) -> dict:
    """A one-part state dict completed with the other part of WEIGHTS.h5 (and a note saying so)."""
    missing = [part for part in MODEL_PARTS if part not in parts]
    if not missing:
        return state
    if not parts:
        raise ParityInputError(f"{source}: holds neither part of ManTraNet")
    taken = {k: v for k, v in conversion.state_dict.items() if k.split(".", 1)[0] in missing}
    have, other = PART_NAMES[parts[0]], " and ".join(PART_NAMES[m] for m in missing)
    notes.append(
        f"{source} holds the {have} only: combined with the {other} of {conversion.source.name}, so layers "
        f"{'from outlierTrans on' if parts[0] == DETECTOR else 'up to L2'} compare its weights"
    )
    return {**state, **taken}


def _ours(path: Path, conversion: Conversion) -> tuple[dict, list[str]]:
    tensors, metadata = read_weights(path)
    notes: list[str] = []
    config = metadata_config(path, metadata)
    if config is not None:
        _same_architecture(config, conversion, str(path))
    parts = model_parts(tensors)
    return _complete(tensors, parts, conversion, path.name, notes), notes


def _earlier_port(paths: list[Path], conversion: Conversion) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EarlierPortWarning)
        state, result = load_earlier_port(paths, conversion.identification.index)
    _same_architecture(result.config, conversion, " and ".join(str(p) for p in paths))
    names = " and ".join(p.name for p in paths)
    notes = [f"{names}: the earlier PyTorch port's checkpoint, mapped by its keys"]
    notes += [str(w.message) for w in caught if not str(w.message).startswith("partial import")]
    return _complete(state, result.parts, conversion, names, notes), notes


def _same_architecture(config: ManTraNetConfig, conversion: Conversion, source: str) -> None:
    if config != conversion.config:
        raise ParityInputError(
            f"{source}: its architecture {config.to_dict()} is not that of {conversion.source} "
            f"(release {conversion.identification.index}: {conversion.config.to_dict()}); "
            "compare weights of one release"
        )


def torch_side(paths: list[Path] | None, conversion: Conversion) -> TorchSide:
    """The model compared with the reference: ``paths`` loaded (completed from ``conversion`` where they hold one
    part), or ``conversion`` itself when none are given."""
    if not paths:
        model = model_from_state_dict(conversion.state_dict, conversion.config, str(conversion.source))
        return TorchSide(model, f"{conversion.source} converted in memory", [str(conversion.source)], [])
    if len(paths) > 2:
        raise ParityInputError("--torch-weights: give one file, or the earlier port's two parts")
    for path in paths:
        if not path.is_file():
            raise ParityInputError(f"{path}: no such file")
    if len(paths) == 1 and paths[0].suffix.lower() == ONNX_SUFFIX:
        side = OnnxSide(paths[0], conversion)
        return TorchSide(side, f"{paths[0]} (ONNX Runtime, CPU)", [str(paths[0])], [LOCAL_MODE_NOTE])
    if len(paths) == 1 and _is_ours(paths[0]):
        state, notes = _ours(paths[0], conversion)
        kind = "mantranet-torch weights"
    else:
        state, notes = _earlier_port(paths, conversion)
        kind = "the earlier PyTorch port's checkpoint"
    names = " + ".join(str(p) for p in paths)
    model = model_from_state_dict(state, conversion.config, names)
    return TorchSide(model, f"{names} ({kind})", [str(p) for p in paths], notes)
