"""Hostile and broken inputs to convert, weights identify|list, export-keras, detect and parity: each gives one
clear message naming the file and what is wrong, a non-zero exit, no traceback, no hang, nothing written."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import mantranet_torch
from converter import ConversionError, convert_h5, file_record, read_keras_h5, save_conversion, trained
from converter.export import export_keras
from converter.legacy import load_earlier_port, read_checkpoint
from mantranet_cli.main import main
from mantranet_torch import WeightFileError, files
from mantranet_torch.weights import PROVENANCE_KEY, encode_safetensors
from tests.helpers import official_file

REPO = Path(__file__).resolve().parents[1]
KERNEL = "Featex/b1c1/regular_kernel:0"
SUBPROCESS_TIMEOUT_S = 120  # a command that hangs (on a FIFO, say) fails the test instead of blocking the run


@pytest.fixture(scope="module")
def h5(tmp_path_factory) -> Path:
    """A pristine official-layout file of release 4 (named so that its name identifies it)."""
    path = tmp_path_factory.mktemp("official") / "ManTraNet_Ptrain4.h5"
    official_file(path, 4)
    return path


@pytest.fixture(scope="module")
def ours(h5, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ours")
    save_conversion(convert_h5(h5), folder / "ours.safetensors", folder / "ours.safetensors.json")
    return folder / "ours.safetensors"


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "images" / "a.png"
    path.parent.mkdir()
    Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)).save(path)
    return path


def copy(h5: Path, folder: Path) -> Path:
    target = folder / h5.name
    target.write_bytes(h5.read_bytes())
    return target


def replace_dataset(path: Path, key: str, make) -> None:
    """Replace the dataset at ``key`` with what ``make(group, leaf, value)`` puts there."""
    with h5py.File(path, "r+") as f:
        parent, _, leaf = key.rpartition("/")
        group = f[parent]
        value = group[leaf][()]
        del group[leaf]
        make(group, leaf, value)


def one_line_error(capsys, command: str, path: Path | None = None) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(f"mantranet {command}: note:")]
    assert len(lines) == 1 and lines[0].startswith(f"mantranet {command}: "), err
    assert "Traceback" not in err
    if path is not None:
        assert lines[0].count(str(path)) == 1, f"path missing or repeated: {lines[0]}"
    return lines[0]


def run_cli(*commands: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Each command in a process of its own, all at once: a hang fails the test after a timeout instead of
    blocking the run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = [
        (argv, subprocess.Popen([sys.executable, "-m", "mantranet_cli", *argv], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for argv in commands
    ]  # fmt: skip
    done = []
    for argv, process in started:
        try:
            out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for _, p in started:
                p.kill()
            raise AssertionError(f"mantranet {' '.join(argv)}: no answer within {SUBPROCESS_TIMEOUT_S} s") from None
        done.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    return done


# ---- 1. corrupt HDF5 metadata ----


def corrupt(h5: Path, folder: Path, what: str) -> Path:
    """One damaged metadata field: the root attribute's string encoding, or the root group's local heap."""
    path = copy(h5, folder)
    data = bytearray(path.read_bytes())
    if what == "string encoding":
        at = data.index(b"layer_names\x00") + 16  # the attribute's datatype follows its 8-byte-padded name
        data[at + 1] = (data[at + 1] & 0x0F) | 0x20  # character set 2: none HDF5 knows (h5py: TypeError)
    else:
        at = data.index(b"HEAP")
        data[at + 16 : at + 20] = b"\xff\xff\xff\x7f"  # the free-list offset (h5py: RuntimeError)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("string encoding", r"attribute 'layer_names' of the root cannot be read \(Unknown string encoding"),
        ("local heap", r"cannot be read as a Keras weight file \(.*heap free list"),
    ],
)
def test_corrupt_metadata_is_a_clear_error_in_convert_identify_and_parity(h5, tmp_path, capsys, what, message):
    path = corrupt(h5, tmp_path, what)
    with pytest.raises(ConversionError, match=message):
        convert_h5(path)
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 1
    assert message.split(r"\(")[0].replace("\\", "") in one_line_error(capsys, "convert", path)
    assert not (tmp_path / "out").exists()
    assert main(["weights", "identify", str(path)]) == 0
    assert "format: HDF5, but not a Keras weight file" in capsys.readouterr().out
    assert main(["parity", str(path)]) == 2  # bad input, not "layers differ"
    one_line_error(capsys, "parity", path)


# ---- 2. soft-link loops ----


@pytest.mark.parametrize("links", ["self", "pair"])
def test_a_soft_link_loop_is_reported(h5, ours, tmp_path, capsys, image, links) -> None:
    path = copy(h5, tmp_path)

    def loop(group, leaf, _):
        if links == "self":
            group[leaf] = h5py.SoftLink(f"{group.name}/{leaf}")
        else:
            group[leaf] = h5py.SoftLink(f"{group.name}/other")
            group["other"] = h5py.SoftLink(f"{group.name}/{leaf}")

    replace_dataset(path, KERNEL, loop)
    with pytest.raises(ConversionError, match=rf"{path}: array {KERNEL} is a soft link loop"):
        convert_h5(path)
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 1
    assert "soft link loop" in one_line_error(capsys, "convert", path)
    assert main(["weights", "identify", str(path)]) == 0
    assert "soft link loop" in capsys.readouterr().out
    assert main(["detect", str(image), "-w", str(path), "-o", str(tmp_path / "maps")]) == 1
    assert "soft link loop" in one_line_error(capsys, "detect", path)
    assert main(["parity", str(path), "--torch-weights", str(ours)]) == 2
    assert "soft link loop" in one_line_error(capsys, "parity", path)


def test_a_soft_link_to_an_array_of_the_file_is_followed(h5, tmp_path) -> None:
    path = copy(h5, tmp_path)
    replace_dataset(
        path,
        KERNEL,
        lambda g, leaf, value: (g.create_dataset("moved", data=value), g.__setitem__(leaf, h5py.SoftLink("moved"))),
    )
    assert np.array_equal(read_keras_h5(path).arrays[KERNEL], read_keras_h5(h5).arrays[KERNEL])


# ---- 3. shapes and dtypes from metadata, before any data is read ----


@pytest.mark.parametrize(
    ("shape", "chunks"), [((3, 3, 10**6, 10**5), (1, 1, 64, 64)), ((3, 3, 32, 3_000_000), (3, 3, 32, 4096))]
)
def test_a_huge_declared_shape_is_refused_before_any_data_is_read(h5, tmp_path, monkeypatch, shape, chunks) -> None:
    path = copy(h5, tmp_path)
    key = "Featex/b3c1/kernel:0"
    replace_dataset(path, key, lambda g, leaf, _: g.create_dataset(leaf, shape=shape, dtype="f4", chunks=chunks))

    def no_reads(*args, **kwargs):
        raise AssertionError("array data read before the shapes were checked")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reads)
    with pytest.raises(ConversionError, match=rf"{path}: ") as error:
        convert_h5(path)
    assert f"layer Featex, array b3c1/kernel:0: expected shape (3, 3, 64, 128), found {shape}" in str(error.value)
    # weights identify has no release to compare with: it bounds every array by ManTraNet's largest
    with pytest.raises(ConversionError, match=rf"array {key} declares shape .* larger than any array of ManTraNet"):
        file_record.read_keras_h5(path, lambda d: file_record.check_declared_sizes(d, str(path)))


@pytest.mark.parametrize("dtype", ["int32", "complex64", "S4"])
def test_a_non_float_dtype_is_refused_from_metadata(h5, tmp_path, monkeypatch, dtype) -> None:
    path = copy(h5, tmp_path)
    replace_dataset(path, KERNEL, lambda g, leaf, value: g.create_dataset(leaf, shape=value.shape, dtype=dtype))
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda *a: pytest.fail("data read"))
    with pytest.raises(ConversionError, match=rf"{path}: array {KERNEL}: has dtype .*expected floating point"):
        convert_h5(path)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_float16_and_float64_arrays_are_cast_with_a_note(h5, tmp_path, capsys, dtype) -> None:
    path = copy(h5, tmp_path)
    replace_dataset(path, KERNEL, lambda g, leaf, value: g.create_dataset(leaf, data=value.astype(dtype)))
    with h5py.File(path) as f:
        stored = f[KERNEL][()]
    conversion = convert_h5(path)
    assert conversion.keras.notes == [f"1 array(s) stored as {dtype} ({KERNEL}), cast to float32"]
    assert torch.equal(
        conversion.state_dict["featex.b1c1.regular_kernel"],
        torch.from_numpy(stored.astype(np.float32)).permute(3, 2, 0, 1),
    )
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 0
    assert f"note: 1 array(s) stored as {dtype}" in capsys.readouterr().out
    assert main(["weights", "identify", str(path)]) == 0
    assert f"note: 1 array(s) stored as {dtype}" in capsys.readouterr().out


# ---- 4. external links and external storage ----


def test_an_external_link_to_a_fifo_never_blocks(h5, tmp_path, image) -> None:
    path = copy(h5, tmp_path)
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    replace_dataset(path, KERNEL, lambda g, leaf, _: g.__setitem__(leaf, h5py.ExternalLink(str(fifo), "/x")))
    expected = f"{path}: array {KERNEL} is an external link (to /x in {fifo})"
    with pytest.raises(ConversionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        convert_h5(path)
    convert, detect, identify = run_cli(
        ["convert", str(path), "-o", str(tmp_path / "out")],
        ["detect", str(image), "-w", str(path), "-o", str(tmp_path / "maps")],
        ["weights", "identify", str(path)],
        cwd=tmp_path,
    )
    for done in (convert, detect):
        assert done.returncode == 1 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert identify.returncode == 0 and "is an external link" in identify.stdout, identify.stdout + identify.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "maps").exists()


def test_external_raw_storage_is_refused(h5, tmp_path, capsys) -> None:
    path = copy(h5, tmp_path)
    outside = tmp_path / "outside.bin"
    with h5py.File(h5) as f:
        outside.write_bytes(f[KERNEL][()].astype("<f4").tobytes())

    def external(group, leaf, value):
        group.create_dataset(leaf, shape=value.shape, dtype="<f4", external=[(str(outside), 0, value.nbytes)])

    replace_dataset(path, KERNEL, external)
    with pytest.raises(ConversionError, match=rf"{path}: array {KERNEL}: stored outside the file \(in {outside}\)"):
        convert_h5(path)
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 1
    one_line_error(capsys, "convert", path)
    assert not (tmp_path / "out").exists()


# ---- 5. export-keras validates the provenance before writing ----


@pytest.mark.parametrize(("provenance", "message"), [("{not json", "is not JSON"), ("[1, 2, 3]", "is a JSON list")])
def test_export_keras_checks_provenance_before_writing(ours, tmp_path, capsys, provenance, message) -> None:
    bad = with_metadata(ours, tmp_path / "bad.safetensors", PROVENANCE_KEY, provenance)
    with pytest.raises(ConversionError, match=rf"{bad}: its provenance metadata .*{message}"):
        export_keras(bad, tmp_path / "out.h5")
    assert main(["export-keras", str(bad), "-o", str(tmp_path / "out.h5")]) == 1
    one_line_error(capsys, "export-keras", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


# ---- 6. every loader refuses NaN / Inf weights and negative variances ----


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("detector.pred.weight", float("nan"), r"detector.pred.weight holds 1 value\(s\) that are not finite"),
        ("featex.b3c1.bias", float("inf"), r"featex.b3c1.bias holds 1 value\(s\) that are not finite"),
        ("detector.bnorm.moving_variance", -0.5, r"detector.bnorm.moving_variance holds 1 negative variance"),
    ],
)
def test_every_loader_refuses_invalid_weight_values(h5, ours, tmp_path, capsys, image, key, value, message) -> None:
    tensors, config, _ = mantranet_torch.weights.read_model_weights(ours)
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors[key].view(-1)[0] = value
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(encode_safetensors(tensors, config, {}))
    with pytest.raises(WeightFileError, match=rf"{bad}: {message}"):
        mantranet_torch.load(bad)
    assert main(["detect", str(image), "-w", str(bad), "-o", str(tmp_path / "maps")]) == 1
    line = one_line_error(capsys, "detect", bad)
    assert "not finite" in line or "negative variance" in line, line
    assert not list((tmp_path / "maps").glob("*.png"))
    assert main(["parity", str(h5), "--torch-weights", str(bad)]) == 2
    one_line_error(capsys, "parity", bad)
    assert main(["export-keras", str(bad), "-o", str(tmp_path / "back.h5")]) == 1
    one_line_error(capsys, "export-keras", bad)


def test_convert_refuses_a_negative_variance(h5, tmp_path) -> None:
    path = copy(h5, tmp_path)
    replace_dataset(path, "bnorm/bnorm/moving_variance:0", lambda g, leaf, v: g.create_dataset(leaf, data=-np.abs(v)))
    with pytest.raises(ConversionError, match=r"array bnorm/bnorm/moving_variance:0 holds 64 negative variance"):
        convert_h5(path)


# ---- 7. unreadable files in weights identify and list ----


def test_unreadable_files_in_identify_and_list(h5, tmp_path, capsys, monkeypatch) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    path = copy(h5, folder)
    monkeypatch.setenv("MANTRANET_HOME", str(tmp_path))  # its weights folder: tmp_path / "weights"

    def denied(p):
        raise PermissionError(13, "Permission denied", str(p))

    for module in (file_record, trained):  # identify and list read files there; as root, chmod stops no reads
        monkeypatch.setattr(module, "file_digests", denied)
    assert main(["weights", "identify", str(path)]) == 1
    assert "cannot be read (Permission denied)" in one_line_error(capsys, "weights", path)
    assert main(["weights", "list"]) == 0
    assert "present, unreadable (Permission denied)" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission(h5, tmp_path, capsys) -> None:
    path = copy(h5, tmp_path)
    path.chmod(0)
    assert main(["weights", "identify", str(path)]) == 1
    assert "permission denied" in one_line_error(capsys, "weights", path)
    assert main(["convert", str(path)]) == 1
    assert "permission denied" in one_line_error(capsys, "convert", path)


# ---- 11. --max-memory ----


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e300"])
def test_max_memory_must_be_a_finite_positive_number(ours, image, tmp_path, capsys, monkeypatch, value) -> None:
    monkeypatch.setattr(mantranet_torch.weights, "read_weights", lambda p: pytest.fail("weights read"))
    assert main(["detect", str(image), "-w", str(ours), "--max-memory", value, "-o", str(tmp_path / "maps")]) == 1
    assert "--max-memory" in one_line_error(capsys, "detect")
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_evaluate_and_predict_refuse_a_non_finite_max_memory(ours, image, tmp_path, capsys, monkeypatch, value):
    pytest.importorskip("sklearn")
    import evaluation

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"image,mask,label\n{image},,0\n")
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("the evaluation ran"))
    assert main(["evaluate", str(manifest), "-w", str(ours), "--max-memory", value]) == 1
    assert "--max-memory" in one_line_error(capsys, "evaluate")
    model = mantranet_torch.ManTraNet.from_release(4)
    with pytest.raises(ValueError, match="max_memory must be a positive number"):
        model.predict(np.zeros((8, 8, 3), np.uint8), max_memory=float(value))


def test_evaluate_names_a_folder_given_as_weights(image, tmp_path, capsys) -> None:
    pytest.importorskip("sklearn")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"image,mask,label\n{image},,0\n")
    (tmp_path / "w.h5").mkdir()
    assert main(["evaluate", str(manifest), "-w", str(tmp_path / "w.h5")]) == 1
    assert one_line_error(capsys, "evaluate").endswith("w.h5: a folder, not a file")


# ---- smaller ones ----


class Runs:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_runs_code_names_the_refused_global(tmp_path, capsys, image, legacy) -> None:
    path = tmp_path / "evil.pt"
    if legacy:  # torch's pre-1.6 format: a bare pickle
        path.write_bytes(pickle.dumps({"a": Runs()}, protocol=2))
    else:
        torch.save({"a": torch.zeros(1)}, path)
        import zipfile

        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, pickle.dumps({"a": Runs()}, protocol=2) if name.endswith("data.pkl") else data)
    with pytest.raises(
        ConversionError, match=rf"{path}: refused: loading it would run code \(it pickles posix.system\)"
    ):
        read_checkpoint(path)
    with pytest.raises(WeightFileError, match=r"it pickles posix.system"):
        mantranet_torch.load(path)
    assert main(["detect", str(image), "-w", str(path), "-o", str(tmp_path / "maps")]) == 1
    assert "it pickles posix.system" in one_line_error(capsys, "detect", path)
    assert main(["export-keras", str(path), "-o", str(tmp_path / "out.h5")]) == 1
    assert "it pickles posix.system" in one_line_error(capsys, "export-keras", path)
    assert main(["convert", str(path)]) == 1
    assert "it pickles posix.system" in one_line_error(capsys, "convert", path)


def test_library_messages_are_one_paragraph_without_the_path_again(tmp_path, capsys) -> None:
    path = tmp_path / "ManTraNet_Ptrain4.h5"
    path.write_bytes(b"not hdf5 at all" * 10)
    assert main(["convert", str(path)]) == 1
    assert "not an HDF5 file (" in one_line_error(capsys, "convert", path)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x80\x02garbage" * 10)
    assert main(["export-keras", str(noise), "-o", str(tmp_path / "o.h5")]) == 1
    line = one_line_error(capsys, "export-keras", noise)
    assert "Weights only load failed" not in line and "Check the documentation" not in line


def test_non_utf8_attributes_are_named(h5, tmp_path, capsys) -> None:
    path = copy(h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f["Featex"].attrs["weight_names"] = np.array([b"b1c1/regular\xff_kernel:0"])
    assert main(["convert", str(path)]) == 1
    line = one_line_error(capsys, "convert", path)
    assert "attribute 'weight_names' of layer 'Featex' is not UTF-8 text (byte b'\\xff' at 12)" in line


@pytest.mark.parametrize("kind", ["folder", "fifo", "loop", "dangling"])
def test_folders_fifos_and_link_loops_are_named_as_such(tmp_path, capsys, image, kind) -> None:
    path = tmp_path / "w.h5"
    if kind == "folder":
        path.mkdir()
        expected = "a folder, not a file"
    elif kind == "fifo":
        os.mkfifo(path)
        expected = "a FIFO (named pipe), not a regular file"
    elif kind == "loop":
        path.symlink_to(tmp_path / "w2.h5")
        (tmp_path / "w2.h5").symlink_to(path)
        expected = "a symbolic link loop"
    else:
        path.symlink_to(tmp_path / "gone.h5")
        expected = f"a symbolic link to {tmp_path / 'gone.h5'}, which does not exist"
    st = tmp_path / "w.safetensors"
    os.symlink(path, st)
    for argv, command in (
        (["convert", str(path)], "convert"),
        (["weights", "identify", str(path)], "weights"),
        (["detect", str(image), "-w", str(path), "-o", str(tmp_path / "maps")], "detect"),
        (["export-keras", str(st), "-o", str(tmp_path / "o.h5")], "export-keras"),
    ):
        assert main(argv) == 1, argv
        line = one_line_error(capsys, command)
        assert "no such file" not in line or kind == "dangling", line
        assert line.endswith(expected) or kind in ("loop", "dangling"), line


def test_detect_checks_the_output_folder_before_inference(ours, image, tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setattr(mantranet_torch.ManTraNet, "predict", lambda *a, **k: pytest.fail("inference ran"))
    assert main(["detect", str(image), "-w", str(ours), "-o", str(tmp_path / "file" / "maps")]) == 1
    assert "cannot create the folder" in one_line_error(capsys, "detect")


@pytest.mark.parametrize("flag", ["--json", "--report", "--shrink"])
def test_parity_checks_its_output_places_before_comparing(h5, image, tmp_path, capsys, monkeypatch, flag) -> None:
    from mantranet_cli import parity_cmd

    (tmp_path / "file").write_text("in the way")
    monkeypatch.setattr(parity_cmd, "run_parity", lambda *a, **k: pytest.fail("the comparison ran"))
    target = tmp_path / "file" / ("p.json" if flag == "--json" else "out")
    assert main(["parity", str(h5), str(image), flag, str(target)]) == 2
    assert "cannot create the folder" in one_line_error(capsys, "parity")


@pytest.mark.parametrize("flag", ["--json", "--csv", "--report", "--save-maps"])
def test_evaluate_checks_its_output_places_before_scoring(ours, image, tmp_path, capsys, monkeypatch, flag) -> None:
    pytest.importorskip("sklearn")
    import evaluation

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"image,mask,label\n{image},,0\n")
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("the evaluation ran"))
    target = tmp_path / "file" / ("out.json" if flag in ("--json", "--csv") else "out")
    assert main(["evaluate", str(manifest), "-w", str(ours), flag, str(target)]) == 1
    assert "cannot create the folder" in one_line_error(capsys, "evaluate")


# ---- 10. a weight file and its manifest: never from different runs ----


@pytest.fixture(scope="module")
def two_conversions(tmp_path_factory):
    """Conversions of two official-layout files of release 4 with different weights."""
    folder = tmp_path_factory.mktemp("two")
    official_file(folder / "ManTraNet_Ptrain4.h5", 4, seed=0)
    first = convert_h5(folder / "ManTraNet_Ptrain4.h5")
    official_file(folder / "ManTraNet_Ptrain4.h5", 4, seed=1)
    second = convert_h5(folder / "ManTraNet_Ptrain4.h5")
    return first, second


def pair_matches(target: Path) -> bool:
    manifest = json.loads((target.parent / (target.name + ".json")).read_text())
    return manifest["output"]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()


def test_a_run_killed_between_the_moves_leaves_no_mismatched_pair(two_conversions, tmp_path, monkeypatch) -> None:
    first, second = two_conversions
    target, manifest = tmp_path / "w.safetensors", tmp_path / "w.safetensors.json"
    save_conversion(first, target, manifest)
    real_publish, moves = files.publish, []

    def killed_after_the_first_move(staged, to, force):
        if moves:
            raise KeyboardInterrupt  # the process dies here
        moves.append(to)
        real_publish(staged, to, force)

    monkeypatch.setattr(files, "publish", killed_after_the_first_move)
    with pytest.raises(KeyboardInterrupt):
        save_conversion(second, target, manifest, force=True)
    monkeypatch.undo()
    # the new weights alone (their metadata carries the provenance), never beside the old manifest
    assert not manifest.exists()
    loaded = mantranet_torch.load(target).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in second.state_dict.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no .part left either


def test_load_refuses_a_mismatched_pair(two_conversions, tmp_path, capsys, image) -> None:
    first, second = two_conversions
    target, manifest = tmp_path / "w.safetensors", tmp_path / "w.safetensors.json"
    save_conversion(first, target, manifest)
    other = tmp_path / "other" / "w.safetensors"
    save_conversion(second, other, other.parent / "w.safetensors.json")
    target.write_bytes(other.read_bytes())  # what the earlier code left when killed between its two moves
    with pytest.raises(WeightFileError, match=r"w.safetensors: its manifest w.safetensors.json describes another"):
        mantranet_torch.load(target)
    assert main(["detect", str(image), "-w", str(target), "-o", str(tmp_path / "maps")]) == 1
    assert "the two are from different runs" in one_line_error(capsys, "detect", target)


def test_concurrent_writers_of_one_output_take_turns(two_conversions, tmp_path) -> None:
    first, second = two_conversions
    target, manifest = tmp_path / "w.safetensors", tmp_path / "w.safetensors.json"
    finished = threading.Event()
    with files.folder_lock(tmp_path):  # another run is writing
        writer = threading.Thread(target=lambda: (save_conversion(first, target, manifest, force=True), finished.set()))
        writer.start()
        assert not finished.wait(0.5) and not target.exists()  # it waits for the lock
        busy = rf"{tmp_path}: another process has been writing in this folder"
        with pytest.raises(ConversionError, match=busy), files.folder_lock(tmp_path, wait_s=0.1):
            pass
    writer.join(timeout=60)
    assert finished.is_set() and pair_matches(target)
    writers = [
        threading.Thread(target=save_conversion, args=(c, target, manifest), kwargs={"force": True})
        for c in (first, second) * 3
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert pair_matches(target)


def test_a_dangling_link_at_the_manifest_path_stops_the_run_before_writing(two_conversions, tmp_path) -> None:
    first, _ = two_conversions
    target, manifest = tmp_path / "w.safetensors", tmp_path / "w.safetensors.json"
    manifest.symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(ConversionError, match=r"w.safetensors.json: already exists; pass --force"):
        save_conversion(first, target, manifest)
    assert not target.exists()
    save_conversion(first, target, manifest, force=True)
    assert pair_matches(target) and not manifest.is_symlink()


def test_hidden_parts_of_killed_runs_are_removed(two_conversions, tmp_path) -> None:
    first, _ = two_conversions
    for name in (".w.safetensors.x1y2.part", ".w.safetensors.json.abcd.part"):
        (tmp_path / name).write_bytes(b"left by a killed run")
    (tmp_path / ".other.safetensors.x1y2.part").write_bytes(b"another output's: kept")
    save_conversion(first, tmp_path / "w.safetensors", tmp_path / "w.safetensors.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.safetensors.x1y2.part",
        "w.safetensors",
        "w.safetensors.json",
    ]


def test_a_compressed_pt_archive_that_unpacks_beyond_any_weight_file_is_refused_unread(tmp_path, monkeypatch) -> None:
    import zipfile

    path = tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("bomb/data/1", bytes(64 << 20))  # 64 MiB of zeros: 64 KB compressed
    monkeypatch.setattr(mantranet_torch.weights, "MAX_PT_BYTES", 32 << 20)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpacked"))
    with pytest.raises(WeightFileError, match=r"bomb.pt: its archive unpacks to 67,1\d\d,\d\d\d bytes, more than"):
        mantranet_torch.load(path)
    with pytest.raises(ConversionError, match=r"bomb.pt: its archive unpacks to"):
        read_checkpoint(path)


def with_metadata(ours: Path, target: Path, key: str, value: str) -> Path:
    """``ours`` with one metadata entry replaced."""
    data = ours.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"][key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    return target


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"first_block_filters": 10**9}, "first_block_filters must exceed 12 and be at most 4096"),
        ({"first_block_filters": 1e999}, "malformed ManTraNet config .*OverflowError|cannot convert float infinity"),
        ({"window_sizes": [7, 15, 10**9 + 1]}, "window_sizes must be 1 to 16 odd positive integers up to 4095"),
        ({"first_block_filters": 32}, r"does not fit ManTraNet .*featex.b1c1.regular_kernel: expected shape"),
    ],
)
def test_a_config_in_the_metadata_cannot_make_a_huge_model(ours, tmp_path, config, message) -> None:
    _, base, _ = mantranet_torch.weights.read_model_weights(ours)
    text = json.dumps({**base.to_dict(), **config}).replace("Infinity", "1e999")
    bad = with_metadata(ours, tmp_path / "bad.safetensors", mantranet_torch.weights.CONFIG_KEY, text)
    with pytest.raises(WeightFileError, match=rf"{bad}: .*({message})"):
        mantranet_torch.load(bad)


def test_float64_tensors_load_with_a_note(ours, tmp_path, image, capsys) -> None:
    tensors, config, _ = mantranet_torch.weights.read_model_weights(ours)
    wide = tmp_path / "wide.safetensors"
    wide.write_bytes(encode_safetensors({k: v.double() for k, v in tensors.items()}, config, {}))
    with pytest.warns(mantranet_torch.weights.WeightCastWarning, match=r"wide.safetensors: weights stored as float64"):
        model = mantranet_torch.load(wide)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tensors.items())
    assert main(["detect", str(image), "-w", str(wide), "-o", str(tmp_path / "maps")]) == 0
    assert "note: " in capsys.readouterr().err


def test_odd_arguments_are_clear_errors(ours, image, tmp_path, capsys) -> None:
    assert main(["detect", str(image), "-w", str(ours), "--max-pixels", "-1", "-o", str(tmp_path / "m")]) == 1
    assert "--max-pixels -1: must be at least 1" in one_line_error(capsys, "detect")
    assert main(["weights", "fetch", "4", "--url", "http://[::1", "-o", str(tmp_path / "w")]) == 1
    assert "http://[::1: not a valid URL (Invalid IPv6 URL)" in one_line_error(capsys, "weights")
    assert main(["convert", str(ours), "-o", str(tmp_path / "c")]) == 1
    assert "a .safetensors file is already PyTorch weights" in one_line_error(capsys, "convert", ours)
    assert not (tmp_path / "m").exists() and not (tmp_path / "w").exists() and not (tmp_path / "c").exists()


def test_crafted_lists_are_refused_before_any_walk(h5, tmp_path) -> None:
    path = copy(h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["layer_names"] = np.array([b"img_in"] * 5000)  # within the 64 KB of an attribute
    with pytest.raises(ConversionError, match=r"5000 layers listed, more than any Keras model"):
        read_keras_h5(path)
    with h5py.File(path, "r+") as f:
        f.attrs["layer_names"] = np.array([b"img_in", b"Featex", b"img_in"])
    with pytest.raises(ConversionError, match=r"layer 'img_in' is listed twice in layer_names"):
        read_keras_h5(path)


def test_a_state_dict_with_thousands_of_strangers_gets_a_short_message(ours, tmp_path) -> None:
    tensors, config, _ = mantranet_torch.weights.read_model_weights(ours)
    crowded = tmp_path / "crowded.safetensors"
    crowded.write_bytes(
        encode_safetensors({**tensors, **{f"extra.{i}": torch.zeros(1) for i in range(5000)}}, config, {})
    )
    with pytest.raises(WeightFileError) as error:
        mantranet_torch.load(crowded)
    message = str(error.value)
    assert "unexpected key extra.0; " in message and message.endswith("and 4995 more") and len(message) < 1000


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: torch.empty(1, device="meta"), "is a meta \\(data-less\\) tensor"),
        (lambda: torch.zeros(1).to_sparse(), "is a sparse_coo tensor"),
        (lambda: torch.nested.nested_tensor([torch.zeros(1)]), "is a nested tensor"),
        (lambda: torch.zeros(1, dtype=torch.complex64), "has dtype torch.complex64, expected floating point"),
    ],
)
def test_tensors_that_hold_no_plain_values_are_refused(ours, tmp_path, make, kind) -> None:
    tensors, config, _ = mantranet_torch.weights.read_model_weights(ours)
    state = collections.OrderedDict(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on nested tensors being a prototype
        state["detector.pred.bias"] = make()
    state._metadata = {"": {mantranet_torch.weights.CONFIG_KEY: json.dumps(config.to_dict())}}
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(WeightFileError, match=rf"odd.pt: detector.pred.bias {kind}"):
        mantranet_torch.load(tmp_path / "odd.pt")
    # the earlier port's reader runs the same check (its detector's keys: end.0.bias, adaptation.weight, ...)
    torch.save({"end.0.bias": state["detector.pred.bias"], "adaptation.weight": torch.zeros(3)}, tmp_path / "port.pt")
    with pytest.raises(ConversionError, match=rf"port.pt: key end.0.bias {kind}"):
        load_earlier_port(tmp_path / "port.pt")


# ---- 10. no silent wrong result: images read by what they hold, arrays that share storage ----

VALUES = (10 + np.arange(36 * 38) % 233).reshape(36, 38)  # 10..242, the 8-bit range


def read_back(path: Path) -> tuple[np.ndarray, list[str]]:
    loaded = mantranet_torch.image_files.read_image(path)
    return loaded.pixels, loaded.notes


@pytest.mark.parametrize(
    ("dtype", "stored", "expected", "note"),
    [
        # an int32 TIFF of 8-bit values: the values as they are (/256 made them all 0, a black image)
        (np.int32, VALUES, VALUES, "32-bit integer samples in 10..242 fit 8 bits: taken as they are"),
        (np.uint16, VALUES, VALUES, "16-bit integer samples in 10..242 fit 8 bits"),
        # full 16-bit range: the high byte, as OpenCV reads it
        (np.uint16, VALUES * 257 + 100, (VALUES * 257 + 100) // 256, "read as 16-bit, scaled to 8 bits (/256)"),
        # 24 bits needed: whole bytes, v / 2**16
        (np.int32, VALUES * 65536 + 7, VALUES, "read as 24-bit, scaled to 8 bits (/65,536)"),
        # floats in 0..1: v * 255, rounded (v = k/255 + 0.001 rounds back to k)
        (np.float32, VALUES / 255 + 0.001, VALUES, "32-bit float samples in 0.0402157..0.95002 scaled by 255"),
        (np.float32, VALUES + 0.25, VALUES, "taken as 0..255"),
    ],
)
def test_wide_greyscale_tiffs_are_read_by_what_their_samples_hold(tmp_path, dtype, stored, expected, note) -> None:
    path = tmp_path / "wide.tif"
    Image.fromarray(np.asarray(stored, dtype=dtype)).save(path)
    with Image.open(path) as check:  # the file holds the type written, not an 8-bit copy
        assert np.asarray(check).dtype.itemsize == np.dtype(dtype).itemsize and np.asarray(check).max() > 0
    pixels, notes = read_back(path)
    np.testing.assert_array_equal(pixels, np.repeat(np.asarray(expected, np.uint8)[..., None], 3, axis=2))
    assert len(notes) == 1 and note in notes[0], notes


def test_a_48_bit_png_of_8_bit_values_is_not_black(tmp_path) -> None:
    from tests.test_detect import png_16bit_rgb

    rgb = np.stack([VALUES, VALUES[::-1], VALUES // 2], axis=2)
    png_16bit_rgb(tmp_path / "low.png", rgb.astype(np.uint16))  # every sample below 256
    pixels, notes = read_back(tmp_path / "low.png")
    np.testing.assert_array_equal(pixels, rgb.astype(np.uint8))
    assert notes == ["16-bit samples all below 256 (largest 242): taken as they are"]
    png_16bit_rgb(tmp_path / "full.png", (rgb * 256 + 255).astype(np.uint16))  # the high byte, as before
    pixels, notes = read_back(tmp_path / "full.png")
    np.testing.assert_array_equal(pixels, rgb.astype(np.uint8))
    assert notes == ["16-bit samples scaled to 8 bits (/256)"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.full((4, 5), -3, np.int32), "32-bit integer samples go down to -3; negative samples have no 8-bit"),
        (np.where(np.eye(4, 5) > 0, np.nan, 0.5).astype(np.float32), "4 32-bit float sample.s. are NaN or infinite, "
                                                                       r"the first at pixel \(x=0, y=0\)"),
        (np.full((4, 5), 300.5, np.float32), "32-bit float samples go up to 300.5; floats are read in 0..1 or 0..255"),
    ],
)  # fmt: skip
def test_samples_with_no_8_bit_reading_are_named(tmp_path, capsys, ours, values, message) -> None:
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(mantranet_torch.image_files.ImageReadError, match=rf"^{path}: {message}"):
        read_back(path)
    assert main(["detect", str(path), "-w", str(ours), "-o", str(tmp_path / "maps")]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"{path}: {message}", err) and "Traceback" not in err, err
    assert not list(tmp_path.rglob("odd.mask.png"))


def test_detect_of_wide_tiffs_gives_the_map_of_their_8_bit_image(ours, tmp_path, capsys) -> None:
    """The issue's two files: an int32 TIFF of values 10..242 and a float TIFF in 0..1; each map must be the
    map of the 8-bit image with the same values, not that of a black image."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(VALUES.astype(np.uint8)).save(inputs / "eight.png")
    Image.fromarray(VALUES.astype(np.int32)).save(inputs / "int32.tif")
    Image.fromarray((VALUES / 255).astype(np.float32)).save(inputs / "float.tif")
    Image.fromarray(np.zeros_like(VALUES, np.uint8)).save(inputs / "black.png")
    assert main(["detect", str(inputs), "-w", str(ours), "-o", str(tmp_path / "maps"), "--save-npy"]) == 0
    out = capsys.readouterr().out + capsys.readouterr().err
    maps = {name: np.load(tmp_path / "maps" / f"{name}.npy") for name in ("eight", "int32", "float", "black")}
    assert not np.array_equal(maps["eight"], maps["black"])  # the check below can tell the two apart
    np.testing.assert_array_equal(maps["int32"], maps["eight"])  # same pixels in, same map out: exactly
    np.testing.assert_array_equal(maps["float"], maps["eight"])
    assert "fit 8 bits: taken as they are" in out and "scaled by 255" in out, out


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_arrays_that_share_storage_are_refused(h5, tmp_path, capsys, layout) -> None:
    """The issue's file: glbStd/min_std:0's layout address points inside Featex/b4c2/kernel:0's storage, so
    h5py reads part of the kernel as min_std and every check of values and shapes passes."""
    from tests.helpers import point_layout_into

    path = copy(h5, tmp_path)
    victim, host = "glbStd/glbStd/min_std:0", "Featex/b4c2/kernel:0"
    if layout == "chunked":  # two arrays of one chunk shape, the first reading the second's chunk index
        victim, host = "Featex/b3c3/kernel:0", "Featex/b3c2/kernel:0"
        for key in (victim, host):
            replace_dataset(path, key, lambda g, leaf, v: g.create_dataset(leaf, data=v, chunks=(3, 3, 64, 64)))
    point_layout_into(path, f"/{victim}", f"/{host}", shift=1024)
    with h5py.File(path) as f:  # the fault is real: h5py reads the host's bytes under the victim's name
        read = f[victim][()].ravel()
        assert np.array_equal(read, f[host][()].ravel()[256 : 256 + read.size] if layout == "contiguous" else
                              f[host][()].ravel())  # fmt: skip
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys, "convert", path)
    assert f"arrays {host} and {victim} share bytes" in line and "damaged or crafted" in line, line
    assert not (tmp_path / "out").exists()


def test_a_soft_link_that_makes_two_weights_one_array_is_refused(h5, tmp_path, capsys) -> None:
    path = copy(h5, tmp_path)
    replace_dataset(
        path, "Featex/b3c3/kernel:0", lambda g, leaf, v: g.__setitem__(leaf, h5py.SoftLink("/Featex/b3c2/kernel:0"))
    )
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys, "convert", path)
    assert "arrays Featex/b3c2/kernel:0 and Featex/b3c3/kernel:0 are one array (a soft link names it twice)" in line


# ---- 11. export-keras: one verdict with the loaders, and a warning for what an .h5 cannot record ----


def test_export_keras_and_detect_give_one_verdict_on_int64_biases(ours, image, tmp_path, capsys) -> None:
    tensors, config, _ = mantranet_torch.weights.read_model_weights(ours)
    tensors["detector.pred.bias"] = torch.zeros(1, dtype=torch.int64)
    path = tmp_path / "int.safetensors"
    path.write_bytes(encode_safetensors(tensors, config, {"source": "test"}))
    verdicts = []
    for argv, command in (
        (["detect", str(image), "-w", str(path), "-o", str(tmp_path / "maps")], "detect"),
        (["export-keras", str(path), "-o", str(tmp_path / "o.h5")], "export-keras"),
    ):
        assert main(argv) == 1, argv
        verdicts.append(one_line_error(capsys, command, path).removeprefix(f"mantranet {command}: error: "))
    assert verdicts == [f"{path}: detector.pred.bias has dtype torch.int64, expected floating point"] * 2
    assert not (tmp_path / "o.h5").exists()


def test_export_keras_warns_of_a_config_the_original_code_cannot_build(ours, tmp_path, capsys) -> None:
    tensors, _, _ = mantranet_torch.weights.read_model_weights(ours)
    custom = mantranet_torch.ManTraNetConfig(16, None, (7, 15, 101))
    path = tmp_path / "w101.safetensors"
    path.write_bytes(encode_safetensors(tensors, custom, {"source": "test"}))
    capsys.readouterr()
    assert main(["export-keras", str(path), "-o", str(tmp_path / "o.h5")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mantranet export-keras: warning: {tmp_path / 'o.h5'}: ")
    assert "cannot express this config (16 first-block filters, transform linear, windows 7, 15, 101)" in err
    assert "it builds Ptrain4's (16 first-block filters, transform linear, windows 7, 15, 31)" in err
    written = read_keras_h5(tmp_path / "o.h5").arrays  # the arrays themselves are exact
    np.testing.assert_array_equal(written["pred/pred/bias:0"], tensors["detector.pred.bias"].numpy())
    assert export_keras(ours, tmp_path / "release.h5").warnings == []  # a release's config: nothing to say


# ---- 12. messages that say what to do ----


def test_a_file_without_a_config_says_which_option_to_pass_and_the_option_works(ours, image, tmp_path, capsys):
    from safetensors.torch import save_file

    tensors, _, _ = mantranet_torch.weights.read_model_weights(ours)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)  # no metadata: written by another tool
    maps = tmp_path / "maps"
    assert main(["detect", str(image), "-w", str(bare), "-o", str(maps)]) == 1
    line = one_line_error(capsys, "detect", bare)
    assert "carries no ManTraNet config in its metadata" in line and "--variant N on the command line" in line
    assert main(["detect", str(image), "-w", str(bare), "-o", str(maps), "--variant", "4", "--save-npy"]) == 0
    assert main(["detect", str(image), "-w", str(ours), "-o", str(tmp_path / "ref"), "--save-npy"]) == 0
    np.testing.assert_array_equal(np.load(maps / "a.npy"), np.load(tmp_path / "ref" / "a.npy"))  # same weights
    assert main(["export-keras", str(bare), "-o", str(tmp_path / "o.h5"), "--variant", "4"]) == 0
    assert main(["export-keras", str(ours), "-o", str(tmp_path / "ref.h5")]) == 0
    exported, reference = read_keras_h5(tmp_path / "o.h5").arrays, read_keras_h5(tmp_path / "ref.h5").arrays
    assert exported.keys() == reference.keys() and all(np.array_equal(exported[k], reference[k]) for k in exported)


def test_a_truncated_hdf5_file_says_how_much_is_there(h5, tmp_path, capsys) -> None:
    path = tmp_path / h5.name
    path.write_bytes(h5.read_bytes()[:4096])
    assert main(["convert", str(path)]) == 1
    assert one_line_error(capsys, "convert", path) == (
        f"mantranet convert: error: {path}: truncated: 4,096 of {h5.stat().st_size:,} bytes (a download or copy "
        "cut short); fetch or copy it again"
    )
