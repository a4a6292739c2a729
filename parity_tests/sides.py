"""The two sides of a parity run, built from its arguments with WEIGHTS.h5 read once (``build_sides``).

The reference: the project's TensorFlow re-implementation with the float64 NumPy oracle as the exact answer, or
the official code under tf_keras in float32 and float64 (``ReferenceChoice``). The compared side: WEIGHTS.h5
converted in memory, the user's ``torch_weights`` (a file of ours, or the earlier port's checkpoints, completed from
WEIGHTS.h5 when it holds one part only), an ONNX graph, or another implementation (``candidate_side``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from converter import ConversionError, convert_h5
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

from .candidate import CandidateSide, LayerMap, load_candidate
from .compare import to_nhwc
from .environment import import_reference, native_stderr_silenced
from .errors import ParityInputError
from .runner import Reference, Side

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


OURS, OFFICIAL = "ours", "official"


@dataclass(frozen=True)
class ReferenceChoice:
    """``--reference``: ``ours`` (the project's TensorFlow re-implementation), ``official`` (the official
    ``modelCore.py`` that ``mantranet weights fetch --code`` downloaded) or ``official:DIR`` (the user's copy)."""

    kind: str
    code: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ReferenceChoice:
        """``text`` as ``--reference`` takes it.

        Raises:
            ParityInputError: neither ``ours``, ``official`` nor ``official:DIR``.
        """
        if text == OURS:
            return cls(OURS)
        if text == OFFICIAL:
            return cls(OFFICIAL)
        if text.startswith(OFFICIAL + ":") and len(text) > len(OFFICIAL) + 1:
            return cls(OFFICIAL, Path(text[len(OFFICIAL) + 1 :]))
        raise ParityInputError(f"--reference {text}: expected 'ours', 'official' or 'official:DIR'")


def build_reference(choice: ReferenceChoice, conversion: Conversion) -> tuple[Reference, Any, dict]:
    """The reference, the exact (float64) answer the attribution measures both sides against, and their
    description for the report, from the weight file ``conversion`` read. Ours: the TensorFlow re-implementation
    on the file's arrays and the float64 NumPy ``Oracle``. Official: the official code under tf_keras, which loads
    the file itself (that loading is part of what it checks), in float32, and its float64 twin built from it.

    Raises:
        ParityInputError: TensorFlow is missing, or the official code cannot be found or used.
    """
    from .oracle import Oracle

    package = import_reference()
    if choice.kind == OURS:
        ref = package.from_keras_arrays(conversion.keras.arrays, conversion.config, source=str(conversion.source))
        return ref, Oracle(ref.arrays, ref.config), {"kind": OURS, "exact": "float64 NumPy evaluation (oracle.py)"}
    with native_stderr_silenced():
        from reference import official
    try:
        code = official.find_official_code(choice.code)
        ref = official.OfficialModel.from_conversion(code, conversion)
        exact = ref.twin("float64")
    except official.OfficialCodeError as e:
        raise ParityInputError(str(e)) from None
    info = {
        "kind": OFFICIAL,
        "code": str(code.path),
        "code_git_blob_sha1": code.git_blob_sha1,
        "code_verified": code.verified,
        "exact": "the official code in float64 (K.set_floatx('float64'))",
    }
    return ref, exact, info


def read_layer_map(layer_map: str | Path | dict | LayerMap | None) -> LayerMap:
    """A candidate's layer map from a JSON file, its dict, or a ``LayerMap`` as it is.

    Raises:
        ParityInputError: no map given (with the option that proposes one).
    """
    if layer_map is None:
        raise ParityInputError(
            "--candidate needs --layer-map FILE.json (Keras layer name to module path); "
            "propose one with --suggest-map FILE.json"
        )
    if isinstance(layer_map, LayerMap):
        return layer_map
    if isinstance(layer_map, dict):
        return LayerMap.parse(layer_map)
    return LayerMap.read(layer_map)


def candidate_module(candidate: str | nn.Module, weights: Path) -> tuple[nn.Module, str, list[str]]:
    """A candidate in eval mode, its description, and the files it came from (``FILE.py:FACTORY`` or a module)."""
    if isinstance(candidate, nn.Module):
        return candidate.eval(), f"{type(candidate).__name__} (a module given in Python)", []
    model, description = load_candidate(candidate, weights)
    return model, description, [candidate.rpartition(":")[0]]


def candidate_side(
    candidate: str | nn.Module | Side, layer_map: str | Path | dict | LayerMap | None, weights: Path
) -> TorchSide:
    """The compared side for another implementation: a ``runner.Side`` as it is (its own layer naming, e.g. an
    exported graph's session), or a user's PyTorch module, loaded and checked against its layer map.

    Raises:
        ParityInputError: neither a ``FILE.py:FACTORY``, a module nor a ``Side``; no or a bad layer map.
    """
    if not isinstance(candidate, (str, nn.Module)):
        if not (callable(getattr(candidate, "stages", None)) and callable(getattr(candidate, "layer", None))):
            raise ParityInputError(
                f"candidate: a {type(candidate).__name__} is neither FILE.py:FACTORY, an nn.Module nor a Side"
            )
        description = getattr(candidate, "description", type(candidate).__name__)
        return TorchSide(candidate, description, [], getattr(candidate, "notes", []))
    mapping = read_layer_map(layer_map)
    model, description, paths = candidate_module(candidate, weights)
    side = CandidateSide(model, mapping, description)
    return TorchSide(side, f"candidate {description}, layer map {mapping.source}", paths, side.notes)


@dataclass
class Sides:
    """Everything a parity run compares: the reference, its exact answer, the compared side, and the one reading
    of the weight file they were all built from."""

    conversion: Conversion
    reference: Reference
    exact: Any
    compared: TorchSide
    about: dict[str, Any] = field(default_factory=dict)


def build_sides(
    weights: Path,
    choice: ReferenceChoice,
    variant: int | None = None,
    torch_weights: list[Path] | None = None,
    candidate: str | nn.Module | Side | None = None,
    layer_map: str | Path | dict | LayerMap | None = None,
) -> Sides:
    """Both sides of a run, WEIGHTS.h5 read and identified once (``convert_h5``): the PyTorch side, the reference
    and its exact answer all start from that one reading (the official code alone loads the file again, as its
    own ``load_weights`` is part of what it checks).

    Raises:
        ParityInputError: a bad weight file, candidate, layer map or reference choice, with the message naming it.
    """
    try:
        conversion = convert_h5(weights, variant)
        if candidate is not None:
            if torch_weights:
                raise ParityInputError("--candidate and --torch-weights: give one of them")
            compared = candidate_side(candidate, layer_map, weights)
        else:
            compared = torch_side(torch_weights, conversion)
        reference, exact, about = build_reference(choice, conversion)
    except (ConversionError, WeightFileError) as e:
        raise ParityInputError(str(e)) from None
    return Sides(conversion, reference, exact, compared, about)
