"""Reading and writing Keras 2 HDF5 weight files with h5py alone.

Two layouts exist (see the project's SPEC): a weights-only file, whose root carries ``layer_names``,
and a full-model file, whose ``model_weights`` group does. Each layer group's ``weight_names``
attribute lists its arrays in load order; each name is also the dataset's path inside the group.
Attributes may hold bytes (Keras 2.2 under Python 3) or str.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mantranet_torch.files import file_problem

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
    notes: list[str] = field(default_factory=list)  # what reading changed (a cast to float32)


# Array checks on the file's metadata, before any data is read: {"<layer>/<weight name>": dataset}.
LayoutCheck = Callable[[Mapping[str, h5py.Dataset]], None]
MAX_LAYERS, MAX_ARRAYS = 1000, 10_000  # ManTraNet has 10 and 35: a crafted list of millions is refused unread
TRUNCATED = re.compile(r"truncated file: eof = (?P<have>\d+),.*stored_eof = (?P<want>\d+)")  # HDF5's words
MAX_LINK_HOPS = 16  # soft links followed for one name before it counts as a loop (HDF5's own limit)
FLOAT_ITEMSIZES = (2, 4, 8)  # float16, float32, float64: what NumPy reads exactly and casts to float32
STORED_TYPE = "float32"
# What h5py raises on damaged files: OSError for damaged data, KeyError and ValueError for broken links and
# objects, RuntimeError ("local heap", link traversal), TypeError (unknown string encodings), and the rest
# from damaged metadata decoded into odd values.
H5PY_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError, OverflowError)


def _strings(value: object, attr: str, where: str) -> list[str]:
    """An HDF5 string-list attribute as str, whether stored as bytes, str, or an empty (float) array."""
    out = []
    for item in np.atleast_1d(np.asarray(value, dtype=object)).tolist():
        out.append(_text(item, attr, where))
    return out


def _text(item: object, attr: str, where: str) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf8")
        except UnicodeDecodeError as e:
            raise ConversionError(
                f"attribute '{attr}' of {where} is not UTF-8 text (byte {item[e.start : e.start + 1]!r} at {e.start})"
            ) from None
    if isinstance(item, str):
        return item
    raise ConversionError(f"attribute '{attr}' of {where} holds {type(item).__name__}, expected text")


def _attr(attrs: h5py.AttributeManager, name: str, where: str) -> object:
    try:
        return attrs[name]
    except H5PY_ERRORS as e:
        raise ConversionError(f"attribute '{name}' of {where} cannot be read ({_h5_reason(e)})") from None


def _string_attr(attrs: h5py.AttributeManager, name: str, where: str = "the root") -> list[str] | None:
    """Keras splits attributes over 64 KiB into ``name0``, ``name1``, ...; join them back."""
    if name in attrs:
        value = _attr(attrs, name, where)
        return [] if np.asarray(value).size == 0 else _strings(value, name, where)
    if f"{name}0" not in attrs:
        return None
    chunks, i = [], 0
    while f"{name}{i}" in attrs:
        chunks += _strings(_attr(attrs, f"{name}{i}", where), f"{name}{i}", where)
        i += 1
    return chunks


def _scalar_string(attrs: h5py.AttributeManager, name: str, where: str) -> str | None:
    if name not in attrs:
        return None
    value = _attr(attrs, name, where)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    return _text(value, name, where)


def _h5_reason(e: BaseException) -> str:
    """h5py's message on one line, without the file name (the caller's message starts with it)."""
    text = " ".join(str(e).split())
    text = re.sub(r"\s*\(?\s*(file)?name = '[^']*',?\s*", " ", text).strip()
    return text or type(e).__name__


def read_keras_h5(path: str | Path, check: LayoutCheck | None = None) -> KerasWeights:
    """Read every array a Keras 2 weight file lists, in its ``layer_names`` / ``weight_names`` order.

    ``check`` sees every dataset (shape and dtype from the file's metadata) before any data is read, and
    raises ConversionError for arrays that do not belong: a huge declared shape is never allocated.
    Links are resolved inside the file only: external links, external raw storage and virtual datasets
    (data from other files) are refused, soft-link loops reported. Arrays that share storage are refused
    before any data is read: two names for one array (a soft link), or layout addresses that point into
    another array's bytes.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise ConversionError(f"{path}: {problem}")
    try:
        f = h5py.File(path, "r", locking=False)  # reading needs no lock; some filesystems have none
    except H5PY_ERRORS as e:
        cut = TRUNCATED.search(str(e))
        if cut:  # HDF5 records the file's length in its superblock: the rest was never written or copied
            have, want = int(cut["have"]), int(cut["want"])
            raise ConversionError(
                f"{path}: truncated: {have:,} of {want:,} bytes (a download or copy cut short); fetch or copy it again"
            ) from None
        raise ConversionError(f"{path}: not an HDF5 file ({_h5_reason(e)})") from None
    try:
        with f:
            return _read_open_file(path, f, check)
    except ConversionError as e:
        message = str(e)
        raise ConversionError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None
    except H5PY_ERRORS as e:  # a damaged chunk, heap or header the walk above did not foresee
        raise ConversionError(f"{path}: cannot be read as a Keras weight file ({_h5_reason(e)})") from None


def _resolve(f: h5py.File, start: h5py.Group, name: str, what: str) -> h5py.HLObject | None:
    """The object ``name`` (relative to ``start``, or absolute) names, following soft links inside the file
    only and never through an external link; None when nothing is there."""
    parts, obj, hops = name.split("/"), start, 0
    if name.startswith("/"):
        obj = f
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if not isinstance(obj, h5py.Group):
            return None
        link = obj.get(part, getlink=True)
        if link is None:
            return None
        if isinstance(link, h5py.SoftLink):
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise ConversionError(f"{what} is a soft link loop (more than {MAX_LINK_HOPS} links in a row)")
            target = link.path
            parts = target.split("/") + parts
            obj = f if target.startswith("/") else obj
            continue
        if isinstance(link, h5py.ExternalLink):
            raise ConversionError(
                f"{what} is an external link (to {link.path} in {link.filename}); weight files must hold their "
                "arrays themselves"
            )
        if not isinstance(link, h5py.HardLink):
            raise ConversionError(f"{what} is a link of a kind HDF5 weight files do not use")
        obj = obj[part]
    return obj


def _dataset_problem(item: h5py.Dataset) -> str | None:
    if item.is_virtual:
        return "a virtual dataset (its data lies in other files); weight files must hold their arrays themselves"
    if item.external:
        files = ", ".join(str(e[0]) for e in item.external)
        return f"stored outside the file (in {files}); weight files must hold their arrays themselves"
    dtype = item.dtype
    if dtype.kind != "f" or dtype.itemsize not in FLOAT_ITEMSIZES:
        return f"has dtype {dtype}, expected floating point (float16, float32 or float64)"
    return None


def _storage_extents(item: h5py.Dataset) -> list[tuple[int, int]]:
    """(first byte, byte after the last) of each piece of ``item``'s data in the file, from its layout metadata.

    Compact data lives in the object header and reads nothing from elsewhere: no extents.
    """
    dsid = item.id
    layout = dsid.get_create_plist().get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dsid.get_offset()  # None: never written, so nothing is read from the file
        return [] if offset is None else [(offset, offset + max(dsid.get_storage_size(), item.nbytes))]
    if layout != h5py.h5d.CHUNKED:
        return []
    extents: list[tuple[int, int]] = []
    if hasattr(dsid, "chunk_iter"):  # one walk of the chunk index (HDF5 1.12.3 and later)
        dsid.chunk_iter(lambda info: extents.append((info.byte_offset, info.byte_offset + info.size)))
    else:
        for index in range(dsid.get_num_chunks()):
            info = dsid.get_chunk_info(index)
            extents.append((info.byte_offset, info.byte_offset + info.size))
    return extents


def _check_storage(datasets: Mapping[str, h5py.Dataset]) -> None:
    """Refuse arrays whose data share bytes of the file (a crafted layout address makes one array read
    another's values): each array must read bytes of its own. Runs on metadata alone, before any data is read.
    """
    pieces = sorted(
        (start, end, key) for key, item in datasets.items() for start, end in _storage_extents(item) if end > start
    )
    reach, owner = -1, ""
    for start, end, key in pieces:
        if start < reach:
            where = f"bytes {start:,}..{min(end, reach) - 1:,} of the file"
            if owner == key:
                raise ConversionError(f"array {key}: two of its chunks share {where}; the file is damaged or crafted")
            raise ConversionError(
                f"arrays {owner} and {key} share {where}: one would read the other's values; the file is "
                "damaged or crafted"
            )
        if end > reach:
            reach, owner = end, key


def _read_open_file(path: Path, f: h5py.File, check: LayoutCheck | None) -> KerasWeights:
    """``read_keras_h5`` on an open file; ConversionErrors without the path (the caller adds it)."""
    if _string_attr(f.attrs, "layer_names") is not None:
        root, layout, where = f, WEIGHTS_ONLY, "the root"
    else:
        group = _resolve(f, f, "model_weights", "group model_weights")
        if not isinstance(group, h5py.Group) or _string_attr(group.attrs, "layer_names", "model_weights") is None:
            raise ConversionError(
                "not a Keras weight file: neither a root attribute 'layer_names' (weights-only layout) "
                "nor a group 'model_weights' with one (full-model layout)"
            )
        root, layout, where = group, FULL_MODEL, "model_weights"
    layer_names = _string_attr(root.attrs, "layer_names", where) or []
    if len(layer_names) > MAX_LAYERS:
        raise ConversionError(f"{len(layer_names)} layers listed, more than any Keras model of this kind has")
    if len(set(layer_names)) < len(layer_names):
        repeated = next(name for i, name in enumerate(layer_names) if name in layer_names[:i])
        raise ConversionError(f"layer '{repeated}' is listed twice in layer_names")
    datasets: dict[str, h5py.Dataset] = {}
    names: dict[h5py.h5d.DatasetID, str] = {}
    for layer in layer_names:
        group = _resolve(f, root, layer, f"layer '{layer}'")
        if group is None:
            raise ConversionError(f"layer '{layer}' is listed in layer_names but has no group")
        if not isinstance(group, h5py.Group):
            raise ConversionError(f"layer '{layer}' is listed in layer_names but is not a group")
        weight_names = _string_attr(group.attrs, "weight_names", f"layer '{layer}'")
        if weight_names is None:
            raise ConversionError(f"layer '{layer}' has no 'weight_names' attribute")
        if len(datasets) + len(weight_names) > MAX_ARRAYS:
            raise ConversionError(f"more than {MAX_ARRAYS} arrays listed, more than any model of this kind has")
        for name in weight_names:
            key = f"{layer}/{name}"
            item = _resolve(f, group, name, f"array {key}")
            if not isinstance(item, h5py.Dataset):
                raise ConversionError(f"layer '{layer}' lists weight '{name}' but holds no such dataset")
            if key in datasets:
                raise ConversionError(f"layer '{layer}' lists weight '{name}' twice")
            problem = _dataset_problem(item)
            if problem:
                raise ConversionError(f"array {key}: {problem}")
            same = names.setdefault(item.id, key)  # ObjectIDs compare by the object in the file
            if same != key:
                raise ConversionError(
                    f"arrays {same} and {key} are one array (a soft link names it twice); a weight file "
                    "holds each weight in an array of its own"
                )
            datasets[key] = item
    if check is not None:
        check(datasets)
    _check_storage(datasets)
    arrays: dict[str, np.ndarray] = {}
    cast: dict[str, list[str]] = {}
    for key, item in datasets.items():
        try:
            arrays[key] = np.asarray(item[()])
        except H5PY_ERRORS as e:
            raise ConversionError(f"array {key} cannot be read ({_h5_reason(e)})") from None
        if item.dtype.itemsize != np.dtype(STORED_TYPE).itemsize:
            cast.setdefault(str(item.dtype.newbyteorder("=")), []).append(key)
    notes = [
        f"{len(keys)} array(s) stored as {dtype} ({keys[0]}{', ...' if len(keys) > 1 else ''}), cast to float32"
        for dtype, keys in cast.items()
    ]
    return KerasWeights(
        path=path,
        layout=layout,
        layer_names=layer_names,
        arrays=arrays,
        keras_version=_scalar_string(root.attrs, "keras_version", where),
        backend=_scalar_string(root.attrs, "backend", where),
        notes=notes,
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
