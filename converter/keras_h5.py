"""Reading and writing Keras 2 HDF5 weight files with h5py alone.

Two layouts exist (see the project's SPEC): a weights-only file, whose root carries ``layer_names``,
and a full-model file, whose ``model_weights`` group does. Each layer group's ``weight_names``
attribute lists its arrays in load order; each name is also the dataset's path inside the group.
Attributes may hold bytes (Keras 2.2 under Python 3) or str.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import ConversionError

WEIGHTS_ONLY = "weights-only"
FULL_MODEL = "full-model"
LAYOUTS = (WEIGHTS_ONLY, FULL_MODEL)
KERAS_VERSION = "2.2.4"  # what the written files claim, as the original Keras 2 code expects
BACKEND = "tensorflow"
MODEL_NAME = "sigNet"  # the official model's name, in a full-model file's model_config


@dataclass
class KerasWeights:
    """Every array of a Keras weight file, keyed ``"<layer>/<weight name>"`` (the dataset path), in file order."""

    path: Path
    layout: str
    layer_names: list[str]
    arrays: dict[str, np.ndarray]
    keras_version: str | None
    backend: str | None


def _strings(value: object) -> list[str]:
    """An HDF5 string-list attribute as str, whether stored as bytes, str, or an empty (float) array."""
    out = []
    for item in np.atleast_1d(np.asarray(value, dtype=object)).tolist():
        out.append(item.decode("utf8") if isinstance(item, bytes) else str(item))
    return out


def _string_attr(attrs: h5py.AttributeManager, name: str) -> list[str] | None:
    """Keras splits attributes over 64 KiB into ``name0``, ``name1``, ...; join them back."""
    if name in attrs:
        return [] if np.asarray(attrs[name]).size == 0 else _strings(attrs[name])
    if f"{name}0" not in attrs:
        return None
    chunks, i = [], 0
    while f"{name}{i}" in attrs:
        chunks += _strings(attrs[f"{name}{i}"])
        i += 1
    return chunks


def _scalar_string(attrs: h5py.AttributeManager, name: str) -> str | None:
    if name not in attrs:
        return None
    value = attrs[name]
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str | Path) -> KerasWeights:
    """Read every array a Keras 2 weight file lists, in its ``layer_names`` / ``weight_names`` order."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConversionError(f"{path}: not an HDF5 file ({e})") from None
    with f:
        try:
            return _read_open_file(path, f)
        except (OSError, KeyError, ValueError) as e:  # a damaged chunk, a broken link, an unreadable attribute
            raise ConversionError(f"{path}: cannot be read as a Keras weight file ({e})") from None


def _read_open_file(path: Path, f: h5py.File) -> KerasWeights:
    """``read_keras_h5`` on an open file."""
    if _string_attr(f.attrs, "layer_names") is not None:
        root, layout = f, WEIGHTS_ONLY
    elif "model_weights" in f and _string_attr(f["model_weights"].attrs, "layer_names") is not None:
        root, layout = f["model_weights"], FULL_MODEL
    else:
        raise ConversionError(
            f"{path}: not a Keras weight file: neither a root attribute 'layer_names' (weights-only layout) "
            "nor a group 'model_weights' with one (full-model layout)"
        )
    layer_names = _string_attr(root.attrs, "layer_names") or []
    arrays: dict[str, np.ndarray] = {}
    for layer in layer_names:
        if layer not in root:
            raise ConversionError(f"{path}: layer '{layer}' is listed in layer_names but has no group")
        group = root[layer]
        if not isinstance(group, h5py.Group):
            raise ConversionError(f"{path}: layer '{layer}' is listed in layer_names but is not a group")
        weight_names = _string_attr(group.attrs, "weight_names")
        if weight_names is None:
            raise ConversionError(f"{path}: layer '{layer}' has no 'weight_names' attribute")
        for name in weight_names:
            item = group.get(name)
            if not isinstance(item, h5py.Dataset):
                raise ConversionError(f"{path}: layer '{layer}' lists weight '{name}' but holds no such dataset")
            key = f"{layer}/{name}"
            if key in arrays:
                raise ConversionError(f"{path}: layer '{layer}' lists weight '{name}' twice")
            value = np.asarray(item[()])
            if not np.issubdtype(value.dtype, np.floating):
                raise ConversionError(f"{path}: array {key} has dtype {value.dtype}, expected floating point")
            arrays[key] = value
    return KerasWeights(
        path=path,
        layout=layout,
        layer_names=layer_names,
        arrays=arrays,
        keras_version=_scalar_string(root.attrs, "keras_version"),
        backend=_scalar_string(root.attrs, "backend"),
    )


def write_keras_h5(
    path: str | Path,
    layers: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
    layout: str = WEIGHTS_ONLY,
    str_attrs: bool = False,
) -> None:
    """Write ``layers`` — (layer name, [(weight name, array), ...]) in order — as Keras 2 does.

    ``str_attrs`` stores attributes as str instead of Keras 2.2's bytes. Writes ``path`` directly:
    callers that must not leave a partial file write to a temporary path first.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    def text(items: list[str]) -> np.ndarray:
        # Keras 2.2 stored np.asarray(list of bytes): fixed-length byte strings. str becomes variable-length.
        if str_attrs:
            return np.array(items, dtype=h5py.string_dtype())
        return np.asarray([s.encode("utf8") for s in items])

    def scalar(s: str) -> object:
        return s if str_attrs else np.bytes_(s.encode("utf8"))  # fixed-length, as h5py 2 stored bytes

    with h5py.File(path, "w") as f:
        root = f
        if layout == FULL_MODEL:
            config = {"class_name": "Model", "config": {"name": MODEL_NAME, "layers": [n for n, _ in layers]}}
            f.attrs["model_config"] = scalar(json.dumps(config))
            f.attrs["keras_version"] = scalar(KERAS_VERSION)
            f.attrs["backend"] = scalar(BACKEND)
            root = f.create_group("model_weights")
        root.attrs["layer_names"] = text([n for n, _ in layers])
        root.attrs["backend"] = scalar(BACKEND)
        root.attrs["keras_version"] = scalar(KERAS_VERSION)
        for layer, weights in layers:
            group = root.create_group(layer)
            names = [n for n, _ in weights]
            # Keras writes an empty list for weightless layers, which h5py stores as an empty float array.
            group.attrs["weight_names"] = text(names) if names else np.zeros((0,), dtype=np.float64)
            for name, value in weights:
                group.create_dataset(name, data=np.asarray(value))
