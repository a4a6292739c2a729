"""Which weight file is which, by its content (its name is ignored): ``identify(path)`` returns a record."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from torch import Tensor

from mantranet_torch import RELEASES
from mantranet_torch.files import file_problem, os_reason
from mantranet_torch.weights import (
    HDF5,
    MODEL_PARTS,
    PROVENANCE_KEY,
    PYTORCH,
    SAFETENSORS,
    WeightFileError,
    metadata_config,
    model_parts,
    read_weights,
    sniff,
)

from .convert import first_block_filters
from .errors import ConversionError
from .keras_h5 import read_keras_h5
from .legacy import PART_NAMES, port_checkpoint_by_hash, read_checkpoint, split_parts
from .mapping import FEATEX_LAYER, check_declared_sizes, keras_shapes, official_layers, uses_frozen_order
from .releases import file_digests, release_by_hash, resolve_variant

OFFICIAL, EARLIER_PORT, UNKNOWN = "official release", "earlier-port checkpoint", "unknown"


@dataclass
class FileRecord:
    """What a weight file is. ``content``: OFFICIAL (``release`` is its index), EARLIER_PORT (``checkpoint`` names
    it) or UNKNOWN, by content hash. ``format``: HDF5, SAFETENSORS, PYTORCH or None. ``details``: what the format
    tells (layout, shapes, config, provenance, ...). ``lines``: all of it in words, as ``mantranet weights
    identify`` prints it."""

    path: str
    size: int
    git_blob_sha1: str
    sha256: str
    content: str
    release: int | None = None
    checkpoint: str | None = None
    format: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def identify(path: str | Path) -> FileRecord:
    """What the file at ``path`` is, by content: an official release, an earlier-port checkpoint, a file of ours, or
    unknown, with its format, digests and details. What ``mantranet weights identify`` prints.

    Args:
        path: any file.

    Returns:
        Its ``FileRecord``; a file that cannot be read as weights is a record saying why, not an error.

    Raises:
        WeightFileError: there is no such regular, readable file.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise WeightFileError(f"{path}: {problem}")
    try:
        digests = file_digests(path)
    except OSError as e:
        raise WeightFileError(f"{path}: cannot be read ({os_reason(e)})") from None
    record = FileRecord(str(path), digests.size, digests.git_blob_sha1, digests.sha256, UNKNOWN)
    say = record.lines.append
    say(f"{path}: {digests.size} bytes, git blob SHA-1 {digests.git_blob_sha1}")
    release, checkpoint = release_by_hash(digests.git_blob_sha1), port_checkpoint_by_hash(digests.git_blob_sha1)
    if release is not None:
        record.content, record.release = OFFICIAL, release.index
        say(f"  content: official release {release.index} ({release.file}), {release.config.describe()}")
    elif checkpoint is not None:
        record.content, record.checkpoint = EARLIER_PORT, checkpoint.file
        say(f"  content: the earlier PyTorch port's {checkpoint.file} ({checkpoint.holds})")
    else:
        say("  content: unknown (neither an official release nor an earlier-port checkpoint of releases.json)")
    record.format = sniff(path)
    if record.format == HDF5:
        _hdf5(path, record)
    elif record.format == SAFETENSORS:
        _tensors(path, record, *read_weights(path))
    elif record.format == PYTORCH:
        try:
            tensors = read_checkpoint(path)
        except ConversionError as e:
            record.details["error"] = str(e)
            say(f"  format: PyTorch checkpoint, unreadable: {e}")
            return record
        _tensors(path, record, tensors, read_weights(path)[1] if model_parts(tensors) else {})
    else:
        say("  format: none known here (not HDF5, safetensors or a PyTorch checkpoint)")
    return record


def _hdf5(path: Path, record: FileRecord) -> None:
    say, details = record.lines.append, record.details
    try:
        keras = read_keras_h5(path, lambda datasets: check_declared_sizes(datasets, str(path)))
    except ConversionError as e:
        reason = str(e).removeprefix(f"{path}: ")
        details.update(kind="not a Keras weight file", error=reason)
        say(f"  format: HDF5, but not a Keras weight file ({reason})")
        return
    details["notes"] = list(keras.notes)
    for note in keras.notes:
        say(f"  note: {note}")
    with h5py.File(path, "r") as f:
        root = f if keras.layout == "weights-only" else f["model_weights"]
        names = np.atleast_1d(np.asarray(root.attrs.get("layer_names", []), dtype=object))
        attrs = "bytes" if names.size and isinstance(names[0], bytes) else "str"
    details.update(
        kind="Keras", layout=keras.layout, arrays=len(keras.arrays), layers=len(keras.layer_names),
        attributes=attrs, keras_version=keras.keras_version,
    )  # fmt: skip
    say(
        f"  format: Keras HDF5, {keras.layout} layout, {len(keras.arrays)} arrays in {len(keras.layer_names)} layers, "
        f"attributes as {attrs}, keras_version {keras.keras_version}"
    )
    shapes = {k: tuple(v.shape) for k, v in keras.arrays.items()}
    fits = [i for i, c in sorted(RELEASES.items()) if keras_shapes(c) == shapes]
    details["shapes_fit"] = fits
    if not fits:
        filters = first_block_filters(keras.arrays)
        details["first_block_filters"] = filters
        say(f"  shapes: fit no release (b1c1 width {filters}); `mantranet convert` names the arrays at fault")
        return
    frozen = featex_order(keras.arrays)
    say(f"  shapes: fit {_releases_text(fits)}")
    if frozen is not None:
        by_order = [i for i in fits if uses_frozen_order(RELEASES[i]) == frozen]
        details["featex_order"] = "frozen" if frozen else "natural"
        details["order_fits"] = by_order
        what = "first layers listed last (as Keras saves a Featex with them frozen)" if frozen else "natural order"
        say(f"  Featex weights: {what}, as the official loader reads {_releases_text(by_order)}")
    try:
        ident = resolve_variant(path, file_digests(path), first_block_filters(keras.arrays), None)
    except ConversionError:
        details["converts_as"] = None
        say("  `mantranet convert` needs --variant N: neither its content nor its name tells the release")
    else:
        details["converts_as"] = {"release": ident.index, "by": ident.by}
        say(f"  `mantranet convert` takes it as release {ident.index} (by {ident.by})")


def _releases_text(indices: list[int]) -> str:
    return ("release " if len(indices) == 1 else "releases ") + ", ".join(map(str, indices))


def featex_order(arrays: dict[str, np.ndarray]) -> bool | None:
    """True when Featex's first layers come last (frozen order), False for natural order, None for neither."""
    order = [k for k in arrays if k.startswith(FEATEX_LAYER + "/")]
    for frozen in (False, True):
        layers = dict(official_layers(arrays, frozen))
        if order == [f"{FEATEX_LAYER}/{name}" for name, _ in layers[FEATEX_LAYER]]:
            return frozen
    return None


def _tensors(path: Path, record: FileRecord, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    say, details, kind = record.lines.append, record.details, record.format
    details["tensors"] = len(tensors)
    present = model_parts(tensors)
    if not present:
        try:
            parts = split_parts(path, tensors)
        except ConversionError:
            details["kind"] = "other"
            say(f"  format: {kind}, {len(tensors)} tensors, neither ManTraNet weights nor the earlier port's")
            return
        details.update(kind="earlier port", parts=list(parts))
        held = " and ".join(PART_NAMES[p] for p in parts)
        say(f"  format: a checkpoint of the earlier PyTorch port by its keys ({held}); `mantranet convert` imports it")
        return
    details.update(kind="ours", parts=list(present))
    part = "full model" if len(present) == len(MODEL_PARTS) else f"{present[0]} only (a partial import)"
    say(f"  format: {kind} of ManTraNet weights of this project, {len(tensors)} tensors, {part}")
    try:
        config = metadata_config(path, metadata)
    except WeightFileError as e:
        details["config_error"] = str(e)
        say(f"  config: unreadable: {e}")
    else:
        details["config"] = None if config is None else config.to_dict()
        if config is not None:
            say(f"  config: {config.describe()}")
    if PROVENANCE_KEY not in metadata:
        details["provenance"] = None
        say("  provenance: none recorded")
        return
    try:
        provenance = json.loads(metadata[PROVENANCE_KEY])
        lines = _provenance_lines(provenance)
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        details["provenance_error"] = f"{type(e).__name__}: {e}"
        say(f"  provenance: malformed ({type(e).__name__}: {e})")
        return
    details["provenance"] = provenance
    record.lines.extend(lines)


def _provenance_lines(provenance: dict) -> list[str]:
    """The manifest `mantranet convert` writes into a file's metadata, as lines; KeyError etc. when malformed."""
    sources = provenance.get("sources") or [provenance.get("source") or {}]
    lines = [f"  converted from: {s.get('name')} (git blob SHA-1 {s.get('git_blob_sha1')})" for s in sources]
    release = provenance.get("release")
    if release:
        lines.append(
            f"  release: {release['index']} ({release['file']}), identified by {provenance.get('identified_by')}"
        )
    else:
        lines.append(f"  release: none matched by content; config from {provenance.get('identified_by')}")
    tool = provenance.get("tool", {})
    lines.append(f"  by: {tool.get('name')} {tool.get('version')}")
    return lines
