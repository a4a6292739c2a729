"""``mantranet export-keras``: our weights back to the official layout, bit for bit both ways."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from converter import ConversionError, read_keras_h5
from converter.export import export_keras
from converter.keras_h5 import FULL_MODEL, LAYOUTS, WEIGHTS_ONLY
from converter.mapping import keras_to_torch, torch_shapes
from mantranet_cli.main import main
from mantranet_torch import RELEASES
from mantranet_torch.files import ALREADY_EXISTS
from mantranet_torch.weights import encode_pt, encode_safetensors
from parity_tests.profiles import examples
from tests.helpers import official_file

seeds = st.integers(0, 2**31 - 1)
layouts = st.sampled_from(LAYOUTS)


def save_ours(path, state: dict[str, torch.Tensor], release: int) -> None:
    encode = encode_pt if path.suffix == ".pt" else encode_safetensors
    path.write_bytes(encode(state, RELEASES[release], {"source": {"name": "test"}}))


def file_structure(path) -> tuple[list[str], list[tuple[str, list[str]]], dict[str, np.ndarray]]:
    """Layer names, each layer's weight names (in file order) and every dataset, read with h5py alone."""
    with h5py.File(path, "r") as f:
        root = f.get("model_weights", f)
        layers = [n.decode() for n in root.attrs["layer_names"]]
        weights = []
        for layer in layers:
            names = root[layer].attrs["weight_names"]
            weights.append((layer, [n.decode() for n in names] if names.size else []))
        arrays = {f"{layer}/{n}": root[layer][n][()] for layer, names in weights for n in names}
    return layers, weights, arrays


@pytest.mark.parametrize("release", sorted(RELEASES))
@settings(max_examples=examples(2))
@given(seed=seeds, layout=layouts)
def test_official_file_to_pytorch_and_back_is_bit_exact(tmp_path_factory, release, seed, layout) -> None:
    tmp = tmp_path_factory.mktemp("h5")
    official_file(tmp / "in.h5", release, seed=seed, layout=layout)
    state = keras_to_torch(read_keras_h5(tmp / "in.h5").arrays, RELEASES[release], "in.h5")
    save_ours(tmp / "ours.safetensors", state, release)
    export_keras(tmp / "ours.safetensors", tmp / "out.h5", layout=layout)
    layers_in, weights_in, arrays_in = file_structure(tmp / "in.h5")
    layers_out, weights_out, arrays_out = file_structure(tmp / "out.h5")
    assert layers_out == layers_in and weights_out == weights_in  # the same names in the same order
    assert len(arrays_out) == 35
    for key, value in arrays_in.items():
        assert arrays_out[key].dtype == value.dtype and arrays_out[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("release", sorted(RELEASES))
@settings(max_examples=examples(2))
@given(seed=seeds, suffix=st.sampled_from([".safetensors", ".pt"]))
def test_pytorch_to_official_file_and_back_is_bit_exact(tmp_path_factory, release, seed, suffix) -> None:
    tmp = tmp_path_factory.mktemp("pt")
    gen = torch.Generator().manual_seed(seed)
    # Any float32 values, not only what a Keras file would give: every bit pattern must survive (variances >= 0,
    # as every loader requires).
    state = {k: torch.randn(shape, generator=gen) for k, shape in torch_shapes(RELEASES[release]).items()}
    state["detector.bnorm.moving_variance"].abs_()
    save_ours(tmp / f"ours{suffix}", state, release)
    export_keras(tmp / f"ours{suffix}", tmp / "out.h5")
    back = keras_to_torch(read_keras_h5(tmp / "out.h5").arrays, RELEASES[release], "out.h5")
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == torch.float32 and torch.equal(back[key], value), key


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_written_attributes_are_keras_2_2_bytes(tmp_path) -> None:
    official_file(tmp_path / "in.h5", 4, seed=0)
    state = keras_to_torch(read_keras_h5(tmp_path / "in.h5").arrays, RELEASES[4], "in.h5")
    save_ours(tmp_path / "ours.safetensors", state, 4)
    export_keras(tmp_path / "ours.safetensors", tmp_path / "out.h5")
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert "model_weights" not in f  # the weights-only layout by default
        assert f.attrs["layer_names"].dtype.kind == "S" and f["Featex"].attrs["weight_names"].dtype.kind == "S"
        assert {k: _text(f.attrs[k]) for k in ("backend", "keras_version")} == {
            "backend": "tensorflow",
            "keras_version": "2.2.4",
        }
        assert f["Featex"].attrs["weight_names"][0] == b"b1c1/regular_kernel:0"  # Ptrain4: natural order


def test_command_writes_atomically_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    official_file(tmp_path / "in.h5", 2, seed=5)
    state = keras_to_torch(read_keras_h5(tmp_path / "in.h5").arrays, RELEASES[2], "in.h5")
    save_ours(tmp_path / "ours.pt", state, 2)
    out = tmp_path / "out.h5"
    assert main(["export-keras", str(tmp_path / "ours.pt"), "-o", str(out), "--layout", FULL_MODEL]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}: full-model layout, 35 arrays, Featex weights in first Featex layers last" in stdout
    before = out.read_bytes()
    assert main(["export-keras", str(tmp_path / "ours.pt"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"mantranet export-keras: error: {out}: {ALREADY_EXISTS}\n"
    assert out.read_bytes() == before
    assert main(["export-keras", str(tmp_path / "ours.pt"), "-o", str(out), "--force"]) == 0
    assert read_keras_h5(out).layout == WEIGHTS_ONLY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "ours.pt", "out.h5"]  # no temporary left


def test_bad_inputs_get_one_line_errors(tmp_path, capsys) -> None:
    state = {k: torch.zeros(s) for k, s in torch_shapes(RELEASES[4]).items()}
    detector = {k: v for k, v in state.items() if k.startswith("detector.")}
    save_ours(tmp_path / "part.safetensors", detector, 4)
    state["detector.pred.bias"] = torch.tensor([float("inf")])
    save_ours(tmp_path / "inf.safetensors", state, 4)
    cases = [
        ("part.safetensors", "out.h5", "holds only the model's detector (a partial import)"),
        # the loaders' words (detect refuses the file so): one verdict for one file
        ("inf.safetensors", "out.h5", "inf.safetensors: detector.pred.bias holds 1 value(s) that are not finite"),
        ("absent.pt", "out.h5", "absent.pt: no such file"),
        ("part.safetensors", "out.keras", "out.keras: a Keras weight file must end in .h5 or .hdf5"),
    ]
    for weights, out, message in cases:
        assert main(["export-keras", str(tmp_path / weights), "-o", str(tmp_path / out)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.safetensors", "part.safetensors"]
    with pytest.raises(ConversionError, match="unknown layout"):
        export_keras(tmp_path / "part.safetensors", tmp_path / "x.h5", layout="keras3")
