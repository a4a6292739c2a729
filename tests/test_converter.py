"""The converter: the mapping, both file layouts, variant identification, every error, determinism, atomicity."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mantranet_torch
from converter import (
    FULL_MODEL,
    MAPPING,
    WEIGHTS_ONLY,
    ConversionError,
    convert_h5,
    keras_to_torch,
    output_paths,
    read_keras_h5,
    releases,
    save_conversion,
    synthetic_keras_weights,
)
from converter.keras_h5 import write_keras_h5
from converter.mapping import HWIO_TO_OIHW, KERAS_LAYER_NAMES, keras_shapes, official_layers
from mantranet_cli.main import main
from mantranet_torch import RELEASES, files
from parity_tests.profiles import examples
from tests.helpers import official_file


@settings(max_examples=examples(30))
@given(row=st.sampled_from(MAPPING), data=st.data())
def test_a_value_at_a_known_keras_index_lands_at_the_torch_index(row, data) -> None:
    path, key, transform = row
    config = RELEASES[data.draw(st.sampled_from(sorted(RELEASES)))]
    shape = keras_shapes(config)[path]
    index = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    arrays = {p: np.zeros(s, dtype=np.float32) for p, s in keras_shapes(config).items()}
    arrays[path][index] = 7.0
    state = keras_to_torch(arrays, config, "probe")
    if transform is HWIO_TO_OIHW:  # Keras (kh, kw, in, out) is PyTorch (out, in, kh, kw)
        kh, kw, cin, cout = index
        torch_index = (cout, cin, kh, kw)
    elif len(shape) == 4:  # min_std (1, 1, 1, C) becomes (C,)
        torch_index = (index[3],)
    else:
        torch_index = index
    assert state[key][torch_index] == 7.0 and state[key].sum() == 7.0


def test_mapping_covers_every_parameter_once() -> None:
    from converter.mapping import torch_shapes

    for config in RELEASES.values():
        assert sorted(k for _, k, _ in MAPPING) == sorted(torch_shapes(config))
    assert len(MAPPING) == 35 and sum(p.startswith("Featex/") for p, _, _ in MAPPING) == 26


@pytest.mark.parametrize("layout", [WEIGHTS_ONLY, FULL_MODEL])
@pytest.mark.parametrize("str_attrs", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_both_layouts_attribute_types_and_orders_give_one_state_dict(tmp_path, layout, str_attrs, frozen) -> None:
    reference_file = tmp_path / "ref" / "ManTraNet_Ptrain2.h5"
    reference_file.parent.mkdir()
    official_file(reference_file, 2, seed=9)
    expected = convert_h5(reference_file).state_dict
    path = tmp_path / "ManTraNet_Ptrain2.h5"
    official_file(path, 2, seed=9, layout=layout, str_attrs=str_attrs, frozen_first_layers=frozen)
    with h5py.File(path) as f:
        root = f["model_weights"] if layout == FULL_MODEL else f
        stored = root.attrs["layer_names"]
        assert isinstance(stored[0], str) == str_attrs  # the file really holds str or bytes
    conversion = convert_h5(path)
    assert conversion.keras.layout == layout
    for key, value in expected.items():
        torch.testing.assert_close(conversion.state_dict[key], value, rtol=0, atol=0)


def test_file_layout_is_the_official_one(tmp_path) -> None:
    path = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(path, 4)
    with h5py.File(path) as f:
        assert [n.decode() for n in f.attrs["layer_names"]] == list(KERAS_LAYER_NAMES)
        assert f["cLSTM/cLSTM/recurrent_kernel:0"].shape == (7, 7, 8, 32)
        assert [n.decode() for n in f["Featex"].attrs["weight_names"]][:3] == [
            "b1c1/regular_kernel:0",
            "b1c1/bayar_kernel:0",
            "b1c2/kernel:0",
        ]
        assert len(f["img_in"].attrs["weight_names"]) == 0
    keras = read_keras_h5(path)
    assert len(keras.arrays) == 35 and keras.keras_version == "2.2.4"


def _write_with(path, release: int, edit) -> None:
    """An official-layout file for ``release`` after ``edit`` changed its (layer, [(name, array)]) list."""
    arrays = synthetic_keras_weights(RELEASES[release], 0)
    layers = [(name, list(weights)) for name, weights in official_layers(arrays, frozen_first_layers=False)]
    edit(dict(layers))
    write_keras_h5(path, layers)


def _drop(name):
    return lambda layers: layers["Featex"].remove(next(w for w in layers["Featex"] if w[0] == name))


def _reshape(layers) -> None:
    featex = layers["Featex"]
    i = next(i for i, w in enumerate(featex) if w[0] == "b4c2/kernel:0")
    featex[i] = ("b4c2/kernel:0", np.zeros((3, 3, 256, 128), dtype=np.float32))


def _extra(layers) -> None:
    layers["pred"].append(("pred/gamma:0", np.zeros(3, dtype=np.float32)))


def _nan(layers) -> None:
    name, value = layers["cLSTM"][1]
    value = value.copy()
    value[1, 2, 3, 4] = np.nan
    layers["cLSTM"][1] = (name, value)


def _beyond_float32(layers) -> None:
    name, value = layers["glbStd"][0]
    value = value.astype(np.float64)  # a float64 file may hold what float32 cannot
    value[0, 0, 0, 5] = 1e39
    layers["glbStd"][0] = (name, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("b3c2/bias:0"), r"missing array Featex/b3c2/bias:0 \(expected shape \(128,\)\)"),
        (_reshape, r"layer Featex, array b4c2/kernel:0: expected shape \(3, 3, 256, 256\), found \(3, 3, 256, 128\)"),
        (_extra, r"unexpected array pred/pred/gamma:0 with shape \(3,\)"),
        (
            _nan,
            r"array cLSTM/cLSTM/recurrent_kernel:0 holds 1 value\(s\) that are not finite in float32, "
            r"the first nan at index \(1, 2, 3, 4\)",
        ),
        (
            _beyond_float32,
            r"array glbStd/glbStd/min_std:0 holds 1 value\(s\) that are not finite in float32, "
            r"the first 1e\+39 at index \(0, 0, 0, 5\)",
        ),
    ],
)
def test_bad_arrays_are_named_and_nothing_is_written(tmp_path, capsys, edit, message) -> None:
    path = tmp_path / "ManTraNet_Ptrain4.h5"
    _write_with(path, 4, edit)
    with pytest.raises(ConversionError, match=message):
        convert_h5(path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_files_that_are_not_keras_weight_files(tmp_path) -> None:
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ConversionError, match="text.h5: not an HDF5 file"):
        convert_h5(tmp_path / "text.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(ConversionError, match="not a Keras weight file"):
        convert_h5(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "nogroup.h5", "w") as f:
        f.attrs["layer_names"] = [b"img_in", b"Featex"]
        f.create_group("img_in").attrs["weight_names"] = np.zeros(0)
    with pytest.raises(ConversionError, match="layer 'Featex' is listed in layer_names but has no group"):
        convert_h5(tmp_path / "nogroup.h5")
    with h5py.File(tmp_path / "nodata.h5", "w") as f:
        f.attrs["layer_names"] = [b"pred"]
        f.create_group("pred").attrs["weight_names"] = [b"pred/kernel:0"]
    with pytest.raises(ConversionError, match="layer 'pred' lists weight 'pred/kernel:0' but holds no such dataset"):
        convert_h5(tmp_path / "nodata.h5")
    with h5py.File(tmp_path / "dataset.h5", "w") as f:
        f.attrs["layer_names"] = [b"pred"]
        f.create_dataset("pred", data=np.zeros(3)).attrs["weight_names"] = [b"pred/kernel:0"]
    with pytest.raises(ConversionError, match="layer 'pred' is listed in layer_names but is not a group"):
        convert_h5(tmp_path / "dataset.h5")
    with h5py.File(tmp_path / "damaged.h5", "w") as f:
        f.attrs["layer_names"] = [b"pred"]
        group = f.create_group("pred")
        group.attrs["weight_names"] = [b"pred/kernel:0"]
        group.create_dataset("pred/kernel:0", data=np.arange(4096, dtype=np.float32), chunks=(4096,), compression=9)
        offset = group["pred/kernel:0"].id.get_chunk_info(0).byte_offset
    data = bytearray((tmp_path / "damaged.h5").read_bytes())
    data[offset : offset + 64] = bytes(64)  # the compressed chunk no longer inflates
    (tmp_path / "damaged.h5").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"damaged.h5: array pred/pred/kernel:0 cannot be read \(.*filter"):
        read_keras_h5(tmp_path / "damaged.h5")


def test_layer_names_split_into_chunks_are_read(tmp_path) -> None:
    """Keras 2 splits an attribute over 64 KB into layer_names0, layer_names1, ...; the root one too."""
    path = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(path, 4)
    expected = convert_h5(path).state_dict
    with h5py.File(path, "a") as f:
        names = list(f.attrs["layer_names"])
        del f.attrs["layer_names"]
        f.attrs["layer_names0"], f.attrs["layer_names1"] = names[:4], names[4:]
    for key, value in convert_h5(path).state_dict.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


# Each release's architecture as SPEC.md's table of the five releases gives it (from the official modelCore.py):
# first-block filters, transform activation, and how many of the windows 7, 15, 31, 63.
SPEC_RELEASES = {0: (32, "tanh", 4), 1: (32, None, 4), 2: (16, None, 4), 3: (16, None, 4), 4: (16, None, 3)}


def test_the_release_table_and_the_architectures_name_the_same_releases_once() -> None:
    """``mantranet_torch.RELEASES`` is the one copy of each release's architecture; ``weights/releases.json`` names
    the same releases' files and carries no architecture that could disagree with it."""
    table = json.loads(releases.RELEASES_JSON.read_text())
    assert [r["index"] for r in table["official"]] == sorted(RELEASES) == sorted(SPEC_RELEASES)
    for entry in table["official"]:
        assert entry["file"] == f"ManTraNet_Ptrain{entry['index']}.h5"
        assert set(entry) == {"file", "index", "git_blob_sha1", "url"}
    for index, (filters, activation, windows) in SPEC_RELEASES.items():
        config = RELEASES[index]
        assert (config.first_block_filters, config.transform_activation) == (filters, activation)
        assert config.window_sizes == (7, 15, 31, 63)[:windows]
    assert [r.config for r in releases.official_releases()] == [RELEASES[i] for i in sorted(RELEASES)]


@pytest.fixture
def release_table(tmp_path, monkeypatch):
    """Point the release table at a copy whose hashes the test can set: {index: git blob sha1}."""

    def install(hashes: dict[int, str]):
        table = json.loads(releases.RELEASES_JSON.read_text())
        for entry in table["official"]:
            entry["git_blob_sha1"] = hashes.get(entry["index"], entry["git_blob_sha1"])
        copy = tmp_path / "releases.json"
        copy.write_text(json.dumps(table))
        monkeypatch.setattr(releases, "RELEASES_JSON", copy)
        releases._table.cache_clear()

    yield install
    releases._table.cache_clear()


def test_variant_by_content_hash_beats_the_name(tmp_path, release_table) -> None:
    path = tmp_path / "renamed.h5"
    official_file(path, 0, seed=2)
    release_table({0: releases.file_digests(path).git_blob_sha1})
    ident = convert_h5(path).identification
    assert (ident.index, ident.by, ident.release.file) == (0, "content hash", "ManTraNet_Ptrain0.h5")
    with pytest.raises(
        ConversionError, match=r"by its content this is ManTraNet_Ptrain0.h5 .* --variant 1 contradicts"
    ):
        convert_h5(path, variant=1)


def test_variant_by_name_then_by_choice(tmp_path) -> None:
    named = tmp_path / "ManTraNet_Ptrain3.h5"
    official_file(named, 3)
    assert convert_h5(named).identification.by == "file name"
    assert convert_h5(named, variant=3).identification.index == 3
    with pytest.raises(ConversionError, match="its name says release 3 but --variant says 2"):
        convert_h5(named, variant=2)
    anonymous = tmp_path / "finetuned.h5"
    shutil.copy(named, anonymous)
    with pytest.raises(ConversionError, match=r"its shapes fit releases 2, 3, 4, .* --variant N"):
        convert_h5(anonymous)
    conversion = convert_h5(anonymous, variant=4)
    assert conversion.config == RELEASES[4] and conversion.identification.by == "--variant"
    with pytest.raises(
        ConversionError,
        match=r"release 0 \(by --variant\) has 32 first-block filters, .* has 16, "
        r"which fits releases 2, 3, 4",
    ):
        convert_h5(anonymous, variant=0)
    with pytest.raises(ConversionError, match="--variant 7: no such release"):
        convert_h5(anonymous, variant=7)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_converting_twice_gives_identical_bytes_and_a_true_manifest(tmp_path, fmt: str) -> None:
    source = tmp_path / "ManTraNet_Ptrain1.h5"
    official_file(source, 1, seed=4, layout=FULL_MODEL)
    outputs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        target, manifest_path = output_paths(source, tmp_path / run, fmt)
        save_conversion(convert_h5(source), target, manifest_path)
        outputs.append((target.read_bytes(), manifest_path.read_bytes()))
    assert outputs[0] == outputs[1]
    manifest = json.loads(outputs[0][1])
    data = source.read_bytes()
    git = subprocess.run(["git", "hash-object", str(source)], capture_output=True, text=True, check=True)
    assert manifest["source"] == {
        "name": "ManTraNet_Ptrain1.h5",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "git_blob_sha1": git.stdout.strip(),
        "layout": FULL_MODEL,
    }
    assert manifest["output"]["sha256"] == hashlib.sha256(outputs[0][0]).hexdigest()
    assert manifest["release"] is None and manifest["variant"] == 1 and manifest["identified_by"] == "file name"
    assert manifest["config"] == RELEASES[1].to_dict()


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("model.safetensors", "model.safetensors"),  # a file
        ("new-folder/", "new-folder/ManTraNet_Ptrain4.safetensors"),  # a trailing slash: a folder
        ("new-folder", "new-folder/ManTraNet_Ptrain4.safetensors"),  # no suffix: a folder
        (".", "ManTraNet_Ptrain4.safetensors"),  # an existing folder
    ],
)
def test_output_may_be_a_file_or_a_folder(tmp_path, monkeypatch, out: str, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    target, manifest = output_paths(Path("ManTraNet_Ptrain4.h5"), out, "safetensors")
    assert (target, manifest) == (Path(expected), Path(expected + ".json"))
    with pytest.raises(ConversionError, match=r"model.pt: a safetensors output must end in \.safetensors"):
        output_paths(Path("ManTraNet_Ptrain4.h5"), "model.pt", "safetensors")


def test_existing_outputs_are_kept_unless_forced(tmp_path, capsys) -> None:
    source = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(source, 4)
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"precious")
    assert main(["convert", str(source), "-o", str(target)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert target.read_bytes() == b"precious" and not (tmp_path / "model.safetensors.json").exists()
    assert main(["convert", str(source), "-o", str(target), "--force"]) == 0
    assert mantranet_torch.load(target).config == RELEASES[4]


def test_outputs_get_the_mode_of_any_new_file(tmp_path) -> None:
    """Atomic writes stage in a 0600 temporary file; the published file must not keep that."""
    source = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(source, 4)
    umask = os.umask(0o022)
    try:
        target, manifest = output_paths(source, tmp_path / "out", "safetensors")
        save_conversion(convert_h5(source), target, manifest)
    finally:
        os.umask(umask)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (target, manifest)] == [0o644, 0o644]


def test_a_failed_write_leaves_the_old_file_whole_and_no_debris(tmp_path, monkeypatch) -> None:
    source = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(source, 4)
    target = tmp_path / "out" / "ManTraNet_Ptrain4.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old weights")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(ConversionError, match="cannot write .*No space left on device"):
        save_conversion(convert_h5(source), target, target.with_name(target.name + ".json"), force=True)
    assert target.read_bytes() == b"old weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["ManTraNet_Ptrain4.safetensors"]


def test_a_failed_manifest_write_keeps_the_old_pair(tmp_path, monkeypatch) -> None:
    """Both files are staged before either replaces its old self: never new weights beside an old manifest."""
    source = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(source, 4)
    target, manifest = tmp_path / "w.safetensors", tmp_path / "w.safetensors.json"
    target.write_bytes(b"old weights")
    manifest.write_bytes(b"old manifest")
    calls = []

    def disk_full_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full_on_the_second_file)
    with pytest.raises(ConversionError, match=r"w.safetensors.json: cannot write .*No space left on device"):
        save_conversion(convert_h5(source), target, manifest, force=True)
    assert (target.read_bytes(), manifest.read_bytes()) == (b"old weights", b"old manifest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ManTraNet_Ptrain4.h5", "w.safetensors", "w.safetensors.json"]


def test_an_output_folder_in_the_way_is_a_clear_error(tmp_path, capsys) -> None:
    source = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(source, 4)
    (tmp_path / "taken").write_text("a file")
    assert main(["convert", str(source), "-o", str(tmp_path / "taken") + "/"]) == 1
    err = capsys.readouterr().err
    assert "taken: cannot create the folder" in err and "Traceback" not in err


def test_cli_reports_what_it_matched_and_where_it_wrote(tmp_path, capsys) -> None:
    source = tmp_path / "ManTraNet_Ptrain0.h5"
    official_file(source, 0, str_attrs=True)
    assert main(["convert", str(source), "-o", str(tmp_path), "--format", "pt"]) == 0
    out = capsys.readouterr().out
    assert "release 0 (identified by file name)" in out and f"wrote {tmp_path / 'ManTraNet_Ptrain0.pt'}" in out
    state = torch.load(tmp_path / "ManTraNet_Ptrain0.pt", weights_only=True)
    assert len(state) == 35


def test_version_is_the_packages_and_the_installed_distributions(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mantranet-torch {mantranet_torch.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", mantranet_torch.__version__)
    try:  # pyproject.toml takes the distribution's version from mantranet_torch.__version__
        installed = importlib.metadata.version("mantranet-torch")
    except importlib.metadata.PackageNotFoundError:
        return  # run from a checkout that is not installed
    assert installed == mantranet_torch.__version__
