"""Bounded fuzzing of the two weight formats users hand us: an official-layout .h5 and one of our .safetensors.

Every mutated file must give either a one-paragraph error naming the file, or a model holding exactly what
the file holds (read independently: h5py by dataset path, or the safetensors header parsed by hand). Never a
traceback, a hang (each example runs under an alarm) or a silent wrong result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mantranet_torch
from converter import ConversionError, convert_h5, save_conversion
from converter.convert import identify_keras_file
from converter.keras_h5 import FULL_MODEL
from converter.mapping import keras_to_torch
from mantranet_torch import WeightFileError
from mantranet_torch.weights import WeightCastWarning
from parity_tests.profiles import examples
from tests.helpers import official_file

RELEASE = 4
EXAMPLE_TIMEOUT_S = 20  # one example reads 15 MB at most: far below this unless something hangs
# CI: 260 examples in all, ~1 minute on 2 shared cores (an .h5 example reads and hashes 15 MB); explore: 20 x
BYTE_EXAMPLES = 100
STRUCTURE_EXAMPLES = 40
OVERLAP_EXAMPLES = 20
SAFETENSORS_EXAMPLES = 100


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """A hang fails the example instead of the whole run."""

    def fire(*_: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_clear_error(error: Exception, path: Path) -> None:
    message = str(error)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "Traceback" not in message, message
    assert message.count(str(path)) == 1, f"the path is repeated: {message}"


# ---- HDF5 ----


@dataclass
class Fixture:
    """A pristine file, its bytes and, for an .h5, the offsets of its metadata; shown by its path alone."""

    path: Path
    data: bytes = field(repr=False)
    metadata: list[int] = field(default_factory=list, repr=False)

    def __iter__(self):
        return iter((self.path, self.data, self.metadata))


@pytest.fixture(scope="module")
def h5_fixture(tmp_path_factory) -> Fixture:
    """The pristine file, its bytes, and the offsets of its metadata (every byte that is not array data)."""
    folder = tmp_path_factory.mktemp("fuzz-h5")
    pristine = folder / "pristine.h5"
    official_file(pristine, RELEASE)
    data_ranges = []
    with h5py.File(pristine, "r") as f:
        f.visititems(
            lambda _, obj: (
                data_ranges.append((obj.id.get_offset(), obj.id.get_storage_size()))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    data = pristine.read_bytes()
    is_data = np.zeros(len(data), dtype=bool)
    for offset, size in data_ranges:
        is_data[offset : offset + size] = True
    return Fixture(pristine, data, np.flatnonzero(~is_data).tolist())


def convert_in_memory(path: Path):
    """What ``convert_h5`` does short of building the model: read, identify, check shapes, map, check values
    (the model's probe run takes a second, too slow for hundreds of examples; tests/test_converter.py runs it)."""
    keras, _, _, config = identify_keras_file(path)
    return keras, keras_to_torch(keras.arrays, config, str(path))


def check_h5(path: Path) -> None:
    """A clear error, or arrays equal to what h5py reads at each dataset path, cast to float32 exactly."""
    with alarm(EXAMPLE_TIMEOUT_S):
        try:
            keras, state = convert_in_memory(path)
        except ConversionError as e:
            assert_clear_error(e, path)
            return
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if keras.layout == FULL_MODEL else f
            for key, value in keras.arrays.items():
                expected = np.asarray(root[key][()])
                assert value.dtype == expected.dtype and np.array_equal(value, expected, equal_nan=True), key
            shared = shared_bytes({key: root[key] for key in keras.arrays})
            assert not shared, f"accepted, yet {shared[0]} and {shared[1]} read the same bytes of the file"
    assert all(torch.isfinite(t).all() for t in state.values())


def shared_bytes(datasets: dict[str, h5py.Dataset]) -> tuple[str, str] | None:
    """Two arrays (or one, twice) whose stored bytes meet, by comparing every pair of pieces: the same question
    the reader asks, answered here by another route (chunks one by one, pairs without sorting)."""
    pieces = []
    for key, item in datasets.items():
        dsid = item.id
        if item.chunks is not None:
            for index in range(dsid.get_num_chunks()):
                info = dsid.get_chunk_info(index)
                pieces.append((info.byte_offset, info.byte_offset + info.size, key))
        elif dsid.get_offset() is not None:
            pieces.append((dsid.get_offset(), dsid.get_offset() + item.nbytes, key))
    for i, (start, end, key) in enumerate(pieces):
        for other_start, other_end, other in pieces[i + 1 :]:
            if start < other_end and other_start < end and end > start and other_end > other_start:
                return key, other
    return None


def target(folder: Path) -> Path:
    return folder / f"ManTraNet_Ptrain{RELEASE}.h5"  # the name identifies the release when the hash does not


@settings(max_examples=examples(BYTE_EXAMPLES), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_mutations_of_an_official_file(h5_fixture, tmp_path_factory, data) -> None:
    pristine, original, metadata = h5_fixture
    path = target(pristine.parent)  # one copy, edited in place and restored: copying 15 MB per example is slow
    if not path.exists() or path.stat().st_size != len(original):
        shutil.copyfile(pristine, path)
    anywhere = st.integers(0, len(original) - 1)
    offsets = st.one_of(st.sampled_from(metadata), st.sampled_from(metadata), anywhere)
    edits = data.draw(st.lists(st.tuples(offsets, st.integers(0, 255)), min_size=1, max_size=4), label="edits")
    cut = (
        data.draw(st.integers(0, len(original) - 1), label="truncate to") if data.draw(st.integers(0, 9)) == 0 else None
    )
    with path.open("r+b") as f:
        for offset, value in edits:
            f.seek(offset)
            f.write(bytes([value]))
        if cut is not None:
            f.truncate(cut)
    try:
        check_h5(path)
    finally:
        with path.open("r+b") as f:
            for offset, _ in edits:
                f.seek(offset)
                f.write(original[offset : offset + 1])


def _some_dataset(f: h5py.File, index: int) -> tuple[h5py.Group, str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    name = sorted(names)[index % len(names)]
    parent, _, leaf = name.rpartition("/")
    return f[parent] if parent else f, leaf


def _groups(f: h5py.File) -> list[h5py.Group]:
    out = [f]
    f.visititems(lambda _, obj: out.append(obj) if isinstance(obj, h5py.Group) else None)
    return out


def structure_edit(f: h5py.File, kind: str, index: int, outside: Path) -> None:
    group, leaf = _some_dataset(f, index)
    if group[leaf].size > 10**7:  # made huge by an earlier edit: leave it so
        raise ValueError("too large to edit")
    value = group[leaf][()]
    if kind == "delete":
        del group[leaf]
    elif kind == "self link":
        del group[leaf]
        group[leaf] = h5py.SoftLink(f"{group.name}/{leaf}")
    elif kind == "link elsewhere":
        other, other_leaf = _some_dataset(f, index + 7)
        del group[leaf]
        group[leaf] = h5py.SoftLink(f"{other.name}/{other_leaf}")
    elif kind == "relative link":
        del group[leaf]
        group[leaf + "-data"] = value
        group[leaf] = h5py.SoftLink(leaf + "-data")
    elif kind == "external link":
        del group[leaf]
        group[leaf] = h5py.ExternalLink(str(outside), "/x")
    elif kind == "external storage":
        del group[leaf]
        outside.write_bytes(np.ascontiguousarray(value, dtype="<f4").tobytes())
        group.create_dataset(leaf, shape=value.shape, dtype="<f4", external=[(str(outside), 0, value.nbytes)])
    elif kind in ("float16", "float64", "int32", ">f4", "complex64"):
        del group[leaf]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            group[leaf] = value.astype(kind)
    elif kind == "bigger":
        del group[leaf]
        group.create_dataset(leaf, shape=(*value.shape[:-1], value.shape[-1] * 1000 + 1), dtype="f4", chunks=True)
    elif kind == "huge":
        del group[leaf]
        group.create_dataset(leaf, shape=(3, 3, 10**6, 10**5), dtype="f4", chunks=(1, 1, 64, 64))
    elif kind == "string":
        del group[leaf]
        group[leaf] = np.array([b"text"] * 3)
    elif kind in ("non-utf8 names", "int names", "empty names", "drop names", "vlen names"):
        holder = [g for g in _groups(f) if "weight_names" in g.attrs or "layer_names" in g.attrs]
        g = holder[index % len(holder)]
        attr = "layer_names" if "layer_names" in g.attrs else "weight_names"
        if kind == "non-utf8 names":
            g.attrs[attr] = np.array([b"\xff\xfe" + bytes(n) for n in np.atleast_1d(g.attrs[attr])])
        elif kind == "int names":
            g.attrs[attr] = np.arange(3)
        elif kind == "empty names":
            g.attrs[attr] = np.zeros((0,), dtype=np.float64)
        elif kind == "vlen names":
            g.attrs[attr] = np.array(
                [n.decode() if isinstance(n, bytes) else n for n in np.atleast_1d(g.attrs[attr])],
                dtype=h5py.string_dtype(),
            )
        else:
            del g.attrs[attr]
    elif kind == "duplicate layer":
        holder = next(g for g in _groups(f) if "layer_names" in g.attrs)
        names = list(np.atleast_1d(holder.attrs["layer_names"]))
        holder.attrs["layer_names"] = np.array([*names, names[index % len(names)]])
    else:
        raise AssertionError(kind)


STRUCTURE_KINDS = (
    "delete", "self link", "link elsewhere", "relative link", "external link", "external storage", "float16",
    "float64", "int32", ">f4", "complex64", "bigger", "huge", "string", "non-utf8 names", "int names",
    "empty names", "drop names", "vlen names", "duplicate layer",
)  # fmt: skip


@settings(max_examples=examples(STRUCTURE_EXAMPLES), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.sampled_from(STRUCTURE_KINDS), st.integers(0, 1000)), min_size=1, max_size=2),
    fifo=st.booleans(),
)
def test_structure_mutations_of_an_official_file(h5_fixture, tmp_path, edits, fifo) -> None:
    pristine, _, _ = h5_fixture
    path = target(tmp_path)
    shutil.copyfile(pristine, path)
    outside = tmp_path / "outside.bin"
    outside.unlink(missing_ok=True)
    if fifo and any(kind == "external link" for kind, _ in edits):
        os.mkfifo(outside)  # opening it would block: it must never be opened
    with h5py.File(path, "r+") as f:
        for kind, index in edits:
            # an edit that the previous one made impossible (its dataset is a link now, say) is skipped
            with contextlib.suppress(KeyError, ValueError, RuntimeError, TypeError, OSError):
                structure_edit(f, kind, index, outside)
    check_h5(path)


def _dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


@settings(max_examples=examples(OVERLAP_EXAMPLES), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), chunked=st.booleans())
def test_layout_addresses_pointing_into_other_arrays(h5_fixture, tmp_path, data, chunked) -> None:
    """A byte-level edit of one dataset's layout address, into another's storage (or, with a shift, beside it):
    a clear error, or (when no bytes are shared after all) arrays equal to what h5py reads, none sharing bytes."""
    from tests.helpers import point_layout_into

    pristine, _, _ = h5_fixture
    path = target(tmp_path)
    shutil.copyfile(pristine, path)
    with h5py.File(pristine, "r") as f:
        names = _dataset_names(f)
        victim = data.draw(st.sampled_from(names), label="victim")
        rank = f[victim].ndim
        host = data.draw(st.sampled_from([n for n in names if n != victim and f[n].ndim == rank]), label="host")
        chunks = tuple(min(a, b) for a, b in zip(f[victim].shape, f[host].shape, strict=True))
        before = min(f[victim].nbytes, f[host].id.get_offset())  # from wholly before the host to its last byte
        shift = data.draw(st.integers(-before, f[host].nbytes - 1), label="shift")
    if chunked:
        with h5py.File(path, "r+") as f:
            for name in (victim, host):
                parent, _, leaf = name.rpartition("/")
                value = f[name][()]
                del f[parent][leaf]
                f[parent].create_dataset(leaf, data=value, chunks=chunks)
    point_layout_into(path, f"/{victim}", f"/{host}", shift=shift)
    check_h5(path)


# ---- safetensors ----


@pytest.fixture(scope="module")
def safetensors_fixture(tmp_path_factory) -> Fixture:
    folder = tmp_path_factory.mktemp("fuzz-st")
    official_file(folder / "ManTraNet_Ptrain4.h5", RELEASE)
    target = folder / "ours.safetensors"
    save_conversion(convert_h5(folder / "ManTraNet_Ptrain4.h5"), target, folder / "ours.safetensors.json")
    return Fixture(target, target.read_bytes())


SAFETENSORS_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def read_by_hand(data: bytes) -> dict[str, np.ndarray]:
    """The tensors a safetensors file holds as float32, parsed from its documented layout without the library."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        dtype = SAFETENSORS_FLOATS[entry["dtype"]]  # any other type must have been refused
        out[key] = np.frombuffer(body[start:end], dtype=dtype).reshape(entry["shape"]).astype(np.float32)
    return out


@settings(max_examples=examples(SAFETENSORS_EXAMPLES), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutations_of_a_safetensors_file(safetensors_fixture, tmp_path, data) -> None:
    original = safetensors_fixture.data
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    offsets = st.one_of(
        st.integers(0, header_end - 1), st.integers(0, header_end - 1), st.integers(0, len(original) - 1)
    )
    edits = data.draw(st.lists(st.tuples(offsets, st.integers(0, 255)), min_size=1, max_size=4), label="edits")
    mutated = bytearray(original)
    for offset, value in edits:
        mutated[offset] = value
    if data.draw(st.integers(0, 9), label="truncate?") == 0:
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1), label="truncate to")]
    path = tmp_path / "ours.safetensors"
    path.write_bytes(bytes(mutated))
    with alarm(EXAMPLE_TIMEOUT_S), warnings.catch_warnings():
        warnings.simplefilter("ignore", WeightCastWarning)  # a dtype changed in the header: cast, with a note
        try:
            model = mantranet_torch.load(path)
        except WeightFileError as e:
            assert_clear_error(e, path)
            return
    expected = read_by_hand(bytes(mutated))
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], torch.from_numpy(value.copy())), key
