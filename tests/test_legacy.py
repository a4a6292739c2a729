"""Importing the earlier PyTorch port's checkpoints: key mapping, checks, the bnorm choice, the real checkpoint."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mantranet_torch
from converter import ConversionError
from converter.legacy import PORT_RELEASE, EarlierPortWarning, load_earlier_port
from mantranet_cli.main import main
from mantranet_torch import RELEASES, ManTraNet, WeightFileError
from parity_tests.earlier_port import port_parts, write_port_files
from tests.helpers import SAMPLES, SEED_PORT, converted_model, official_file

REAL_DETECTOR_SHAPES = {
    "sigma_F": (1, 64, 1, 1),
    "adaptation.weight": (64, 256, 1, 1),
    "conv_lstm.cell_list.0.conv.weight": (32, 72, 7, 7),
    "conv_lstm.cell_list.0.conv.bias": (32,),
    "end.0.weight": (1, 8, 7, 7),
    "end.0.bias": (1,),
}
needs_seed_port = pytest.mark.skipif(not SEED_PORT.is_file(), reason=f"{SEED_PORT} is absent")
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is absent")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("legacy")


@pytest.fixture(scope="module")
def featex_model(fixture_dir) -> ManTraNet:
    """A Ptrain4-shaped model with seeded official-layout weights, converted from an HDF5 file."""
    official_file(fixture_dir / "seeded.h5", 4, seed=0)
    return converted_model(fixture_dir / "seeded.h5", variant=4)


@pytest.fixture
def state(featex_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in featex_model.state_dict().items()}


def import_quietly(paths, config=None):
    with pytest.warns(EarlierPortWarning):
        return load_earlier_port(paths, config)


def test_every_port_tensor_lands_where_it_belongs(tmp_path, state) -> None:
    paths = write_port_files(tmp_path, state)
    full, info = import_quietly(paths["MantraNetv4.pt"])
    pair, _ = import_quietly([paths["IMTFEv4.pt"], paths["AnomalyDetectorv4.pt"]])
    assert info.config == RELEASES[PORT_RELEASE] and not info.partial
    bnorm = {"detector.bnorm.moving_mean", "detector.bnorm.moving_variance"}
    assert set(full) == set(pair) == set(state)
    for key in set(state) - bnorm:
        assert torch.equal(full[key], state[key]), key
        assert torch.equal(pair[key], state[key]), key
    for key in bnorm:  # the port keeps none; see the bnorm test below for why zero
        assert torch.equal(full[key], torch.zeros(64)), key


def test_the_72_channel_lstm_conv_splits_at_the_input_recurrent_boundary(tmp_path, state) -> None:
    _, detector = port_parts(state)
    weight = torch.zeros(32, 72, 7, 7)
    weight[5, 63, 1, 2] = 1.0  # the last input channel (x_t)
    weight[6, 64, 3, 4] = 2.0  # the first recurrent channel (h)
    weight[31, 71, 6, 0] = 3.0  # the last recurrent channel, last gate (o)
    detector["conv_lstm.cell_list.0.conv.weight"] = weight
    torch.save(detector, tmp_path / "AnomalyDetectorv4.pt")
    sd, _ = import_quietly(tmp_path / "AnomalyDetectorv4.pt")
    kernel, recurrent = sd["detector.clstm.kernel"], sd["detector.clstm.recurrent_kernel"]
    assert kernel.shape == (32, 64, 7, 7) and recurrent.shape == (32, 8, 7, 7)
    assert kernel[5, 63, 1, 2] == 1.0 and recurrent[6, 0, 3, 4] == 2.0 and recurrent[31, 7, 6, 0] == 3.0
    assert kernel.abs().sum() == 1.0 and recurrent.abs().sum() == 5.0


@needs_seed_port
def test_real_checkpoint_holds_what_the_spec_says() -> None:
    sd = torch.load(SEED_PORT, weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == REAL_DETECTOR_SHAPES
    # Keras initialises the forget-gate bias to 1: the second block of eight is the forget gate (order i, f, c, o).
    bias = sd["conv_lstm.cell_list.0.conv.bias"].reshape(4, 8)
    assert (bias[1] > 0.8).all() and (bias[[0, 2, 3]].abs() < 0.5).all()


@needs_seed_port
def test_real_checkpoint_imports_as_a_partial_detector_with_its_warnings() -> None:
    with pytest.warns(EarlierPortWarning) as caught:
        sd, info = load_earlier_port(SEED_PORT)
    messages = [str(w.message) for w in caught]
    assert any("no BatchNorm statistics" in m and "6.6e-05" in m for m in messages), messages
    assert any("partial import: anomaly detector only" in m for m in messages), messages
    assert info.partial and info.parts == ("detector",)
    assert info.sources[0].checkpoint is not None and info.sources[0].checkpoint.file == "AnomalyDetectorv4.pt"
    model = ManTraNet(RELEASES[PORT_RELEASE])
    model.detector.load_state_dict({k.removeprefix("detector."): v for k, v in sd.items()}, strict=True)


# ---- the earlier port's detector, as its own code computes it, in float64 NumPy ----


def _conv_same(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(C, H, W) * (O, C, k, k), zero padding k//2, stride 1 (PyTorch's cross-correlation)."""
    q = w.shape[-1] // 2
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (q, q), (q, q))), w.shape[-2:], axis=(1, 2))
    return np.einsum("chwyx,ocyx->ohw", windows, w, optimize=True)


def _avg_pool_excluding_padding(x: np.ndarray, k: int) -> np.ndarray:
    q, (_, h, w) = k // 2, x.shape
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = x[:, max(0, i - q) : i + q + 1, max(0, j - q) : j + q + 1].mean(axis=(1, 2))
    return out


def _hard_sigmoid(z: np.ndarray) -> np.ndarray:
    return np.clip(0.2 * z + 0.5, 0.0, 1.0)


def port_detector_float64(port: dict[str, np.ndarray], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The earlier port's AnomalyDetector on one image's (256, H, W) features: (output map, clamp-active channels)."""
    x = np.einsum("oi,ihw->ohw", port["adaptation.weight"][:, :, 0, 0], features)
    mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    x = (x - mean) / np.sqrt(var + 1e-3)  # its batch_norm: the image's own statistics, eps 1e-3
    mu = x.mean(axis=(1, 2), keepdims=True)
    std = np.sqrt(np.square(x - mu).mean(axis=(1, 2), keepdims=True))
    floor = port["sigma_F"][0] + 1e-6
    sigma = np.maximum(std, floor)
    steps = [np.abs((_avg_pool_excluding_padding(x, k) - x) / sigma) for k in (7, 15, 31)]
    steps.append(np.abs((mu - x) / sigma))
    w, b = port["conv_lstm.cell_list.0.conv.weight"], port["conv_lstm.cell_list.0.conv.bias"]
    h = c = np.zeros((8, *x.shape[1:]))
    for step in steps:  # ONE convolution over concat(x_t, h), gates i, f, c, o
        z_i, z_f, z_c, z_o = np.split(_conv_same(np.concatenate([step, h]), w) + b[:, None, None], 4)
        c = _hard_sigmoid(z_f) * c + _hard_sigmoid(z_i) * np.tanh(z_c)
        h = _hard_sigmoid(z_o) * np.tanh(c)
    logit = _conv_same(h, port["end.0.weight"]) + port["end.0.bias"][:, None, None]
    return 1.0 / (1.0 + np.exp(-logit[0])), np.flatnonzero(std[:, 0, 0] < floor[:, 0, 0])


@pytest.fixture(scope="module")
def features(featex_model) -> np.ndarray:
    """(256, 40, 48) float64 features of a real forged image crop, from a Featex with seeded weights."""
    image = Image.open(SAMPLES / "forged" / "I35_c5vuwc7_0.jpg").convert("RGB").crop((300, 200, 348, 240))
    x = mantranet_torch.to_model_input(np.array(image))
    with torch.no_grad():
        return featex_model.featex(x)[0].double().numpy()


@pytest.fixture(scope="module")
def real_import() -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """The real checkpoint imported, and as the earlier port holds it (float64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EarlierPortWarning)
        sd, _ = load_earlier_port(SEED_PORT)
    return sd, {k: v.double().numpy() for k, v in torch.load(SEED_PORT, weights_only=True).items()}


def squeeze_channels(features: np.ndarray, weight: np.ndarray, channels: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """Features whose outlierTrans outputs ``channels`` vary with the given stds (other channels change too)."""
    rows = weight[channels]
    y = np.einsum("oi,ihw->ohw", rows, features)
    centred = y - y.mean(axis=(1, 2), keepdims=True)
    scale = stds / centred.std(axis=(1, 2)) - 1.0
    return features + np.einsum("io,ohw->ihw", np.linalg.pinv(rows), scale[:, None, None] * centred)


def run_detector(sd: dict[str, torch.Tensor], features: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    model = ManTraNet(RELEASES[PORT_RELEASE]).detector
    model.load_state_dict({k.removeprefix("detector."): v for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        return model.to(dtype)(torch.from_numpy(features).to(dtype)[None])[0, 0].double().numpy()


@needs_seed_port
@needs_samples
def test_real_detector_matches_the_earlier_ports_own_equations(real_import, features) -> None:
    sd, port = real_import
    expected, clamped = port_detector_float64(port, features)
    assert len(clamped) == 0  # real features: every channel's std is far above min_std
    got32 = run_detector(sd, features, torch.float32)
    assert np.isfinite(got32).all() and (got32 > 0).all() and (got32 < 1).all()
    assert expected.std() > 1e-3  # the map varies over the crop: the comparison is not against a constant
    # float32 against float64: measured worst case 1.05e-6 (40 x 48 crop, map 0.0004-0.62), from four ConvLSTM
    # steps of 72 x 49-term sums; 3x headroom.
    assert np.abs(got32 - expected).max() <= 3e-6
    # Same precision, only the bnorm choice differs: the algebra says identical while the clamp is inactive
    # (measured 7.9e-15: float64 rounding of two different formulas).
    assert np.abs(run_detector(sd, features, torch.float64) - expected).max() <= 1e-12


@needs_seed_port
@needs_samples
def test_bnorm_choice_reproduces_the_port_where_the_clamp_is_active(real_import, features) -> None:
    sd, port = real_import
    min_std = port["sigma_F"].reshape(-1)
    channels = np.argsort(min_std)[-6:]  # the channels with the largest clamp
    # std half the port's clamp threshold: sqrt(v / (v + 1e-3)) < min_std  <=>  sqrt(v) < ~min_std * sqrt(1e-3)
    stds = 0.5 * min_std[channels] * np.sqrt(1e-3)
    features = squeeze_channels(features, port["adaptation.weight"][:, :, 0, 0], channels, stds)
    expected, clamped = port_detector_float64(port, features)
    assert set(clamped) == set(channels)
    # In float64 the only difference is the bnorm choice: the port divides the clamped deviations by
    # sqrt(v + 1e-3) * t, the import by sqrt(0 + 1e-3) * t, a relative v / 2e-3 = t^2 / 8 <= 1.7e-5 on the
    # ConvLSTM input of those channels here. Measured effect on the map: 4.9e-6; 2x headroom.
    assert np.abs(run_detector(sd, features, torch.float64) - expected).max() <= 1e-5
    # An identity bnorm (variance 1 - 1e-3) moves the clamp threshold by a factor of 31.6: measured 0.26 off.
    identity = dict(sd) | {"detector.bnorm.moving_variance": torch.full((64,), 1 - 1e-3)}
    assert np.abs(run_detector(identity, features, torch.float64) - expected).max() > 0.1


# ---- checks and errors ----


def test_variant_overrides_the_config_and_must_fit_the_shapes(tmp_path, state) -> None:
    paths = write_port_files(tmp_path, state)
    sd, info = import_quietly(paths["MantraNetv4.pt"], 2)
    assert info.config == RELEASES[2] and info.variant == 2 and info.identified_by == "--variant"
    ManTraNet(RELEASES[2]).load_state_dict(sd, strict=True)
    with pytest.raises(
        ConversionError, match=r"init_conv.weight: expected shape \(20, 3, 5, 5\), found \(4, 3, 5, 5\)"
    ):
        load_earlier_port(paths["MantraNetv4.pt"], 0)


def test_srm_constants_are_checked_in_our_channel_order(tmp_path, state) -> None:
    featex, detector = port_parts(state)
    # The SPEC's integer filters divided in float64: the same float32 constants however computed.
    srm = np.zeros((3, 5, 5))
    srm[0, 1:4, 1:4] = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]) / 4
    srm[1] = np.array(
        [[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]]
    )
    srm[1] /= 12
    srm[2, 2, 1:4] = np.array([1, -2, 1]) / 2
    kernel = np.zeros((9, 3, 5, 5))
    for i in range(3):
        for c in range(3):
            kernel[3 * i + c, c] = srm[i]
    featex["SRMConv2D.weight"] = torch.from_numpy(kernel).float()
    torch.save(featex, tmp_path / "IMTFEv4.pt")
    torch.save(detector, tmp_path / "AnomalyDetectorv4.pt")
    import_quietly([tmp_path / "IMTFEv4.pt", tmp_path / "AnomalyDetectorv4.pt"])
    # Grouped by colour instead (R: srm1..3, G: ...) is a different order: refused, naming the channel.
    featex["SRMConv2D.weight"] = torch.from_numpy(
        kernel.reshape(3, 3, 3, 5, 5).transpose(1, 0, 2, 3, 4).reshape(9, 3, 5, 5)
    )
    torch.save(featex, tmp_path / "IMTFEv4.pt")
    with pytest.raises(ConversionError, match=r"IMTFEv4.pt: SRMConv2D.weight output channel 1 differs .*srm1 on G"):
        load_earlier_port([tmp_path / "IMTFEv4.pt", tmp_path / "AnomalyDetectorv4.pt"])


def test_an_unconstrained_bayar_kernel_is_imported_as_the_port_uses_it(tmp_path, state) -> None:
    featex, detector = port_parts(state)
    featex["BayarConv2D.weight"] = featex["BayarConv2D.weight"] * 3.0  # centre -3, the others summing to 3
    torch.save(featex, tmp_path / "IMTFEv4.pt")
    torch.save(detector, tmp_path / "AnomalyDetectorv4.pt")
    with pytest.warns(EarlierPortWarning) as caught:
        sd, _ = load_earlier_port([tmp_path / "IMTFEv4.pt", tmp_path / "AnomalyDetectorv4.pt"])
    assert any("IMTFEv4.pt: BayarConv2D.weight does not satisfy the Bayar constraint" in str(w.message) for w in caught)
    # The constraint rescales the off-centre taps by 1/3 and resets the centre: the original kernel, to rounding.
    assert torch.allclose(sd["featex.b1c1.bayar_kernel"], state["featex.b1c1.bayar_kernel"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("end.0.bias"), r"missing key end.0.bias \(expected shape \(1,\)\)"),
        (lambda d: d.update(extra=torch.zeros(3)), r"unexpected key extra with shape \(3,\)"),
        (
            lambda d: d.update({"sigma_F": torch.zeros(64)}),
            r"key sigma_F: expected shape \(1, 64, 1, 1\), found \(64,\)",
        ),
        (
            lambda d: d["adaptation.weight"].__setitem__((3, 7, 0, 0), float("nan")),
            r"key adaptation.weight holds 1 value\(s\) that are not finite in float32, the first nan at index "
            r"\(3, 7, 0, 0\)",
        ),
        (
            lambda d: d.update({"end.0.bias": torch.tensor([1e39], dtype=torch.float64)}),
            r"key end.0.bias holds 1 value\(s\) that are not finite in float32, the first 1e\+39 at index \(0,\)",
        ),
    ],
)
def test_bad_detector_keys_are_named(tmp_path, state, change, message) -> None:
    _, detector = port_parts(state)
    detector = {k: v.clone() for k, v in detector.items()}
    change(detector)
    torch.save(detector, tmp_path / "AnomalyDetectorv4.pt")
    with pytest.raises(ConversionError, match=r"AnomalyDetectorv4.pt: .*" + message):
        load_earlier_port(tmp_path / "AnomalyDetectorv4.pt")


def test_files_that_are_not_port_checkpoints_are_refused(tmp_path, state) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ConversionError, match=r"module.pt: refused: .*it pickles torch.nn.modules.linear.Linear"):
        load_earlier_port(tmp_path / "module.pt")
    (tmp_path / "noise.pt").write_bytes(b"\x00not a checkpoint" * 8)
    with pytest.raises(
        ConversionError,
        match=r"noise.pt: not a plain PyTorch state dict \(torch.load with weights_only=True: Unsupported operand",
    ):
        load_earlier_port(tmp_path / "noise.pt")
    torch.save({"epoch": 3, "weight": torch.zeros(2)}, tmp_path / "trainer.pt")
    with pytest.raises(ConversionError, match=r"trainer.pt: expected a state dict of tensors, .*'epoch' holds int"):
        load_earlier_port(tmp_path / "trainer.pt")
    torch.save({1: torch.zeros(2)}, tmp_path / "intkeys.pt")
    with pytest.raises(ConversionError, match=r"intkeys.pt: expected a state dict of tensors, .*key 1 that is not"):
        load_earlier_port(tmp_path / "intkeys.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match=r"other.pt: not a checkpoint of the earlier PyTorch port"):
        load_earlier_port(tmp_path / "other.pt")
    torch.save(state, tmp_path / "ours.pt")
    with pytest.raises(ConversionError, match=r"ours.pt: already a mantranet-torch weight file"):
        load_earlier_port(tmp_path / "ours.pt")


def test_a_part_given_twice_is_refused(tmp_path, state) -> None:
    paths = write_port_files(tmp_path, state)
    with pytest.raises(ConversionError, match=r"AnomalyDetectorv4.pt: holds the anomaly detector again"):
        load_earlier_port([paths["MantraNetv4.pt"], paths["AnomalyDetectorv4.pt"]])


# ---- the command ----


def test_convert_command_imports_the_full_port_into_a_loadable_model(tmp_path, state, capsys) -> None:
    paths = write_port_files(tmp_path, state)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(paths["IMTFEv4.pt"]), str(paths["AnomalyDetectorv4.pt"]), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: the earlier port keeps no BatchNorm statistics" in captured.err
    assert "Traceback" not in captured.err
    target = out / "IMTFEv4+AnomalyDetectorv4.safetensors"
    assert f"wrote {target}" in captured.out
    model = mantranet_torch.load(target)
    assert model.config == RELEASES[PORT_RELEASE]
    for key, value in model.state_dict().items():
        expected = torch.zeros(64) if key.startswith("detector.bnorm") else state[key]
        assert torch.equal(value, expected), key
    manifest = json.loads((out / "IMTFEv4+AnomalyDetectorv4.safetensors.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["IMTFEv4.pt", "AnomalyDetectorv4.pt"]
    assert manifest["part"] == "full model" and manifest["variant"] == PORT_RELEASE
    # Again: refused without --force, the first output untouched.
    before = target.read_bytes()
    assert main(["convert", str(paths["MantraNetv4.pt"]), "-o", str(target)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert target.read_bytes() == before


@needs_seed_port
def test_convert_command_on_the_real_partial_checkpoint(tmp_path, capsys) -> None:
    assert main(["convert", str(SEED_PORT), "-o", str(tmp_path), "--format", "pt"]) == 0
    captured = capsys.readouterr()
    assert "the earlier PyTorch port's AnomalyDetectorv4.pt (by content hash), anomaly detector" in captured.out
    assert "warning: partial import: anomaly detector only" in captured.err
    with pytest.raises(WeightFileError, match=r"AnomalyDetectorv4.pt: holds only the model's detector"):
        mantranet_torch.load(tmp_path / "AnomalyDetectorv4.pt")
    sd = torch.load(tmp_path / "AnomalyDetectorv4.pt", weights_only=True)
    assert all(k.startswith("detector.") for k in sd) and len(sd) == 9


def test_convert_command_errors_are_one_line(tmp_path, capsys) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    assert main(["convert", str(tmp_path / "module.pt"), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mantranet convert: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["convert", str(tmp_path / "a.h5"), str(tmp_path / "b.pt")]) == 1
    assert "convert one .h5 file at a time" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "module.pt"]
