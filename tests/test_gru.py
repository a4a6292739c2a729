"""The ConvGRU variant (``ManTraNetConfig(recurrent="gru")``): its layer against float64 equations and finite
differences, the whole model against the float64 oracle, config and weight files, initialisation from a release,
exports, tiling, the cost and memory models."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mantranet_torch
from converter import ConversionError, keras_to_torch, load_weights, save_conversion, synthetic_keras_weights
from converter.export import export_keras
from converter.mapping import mapping
from mantranet_cli.main import main
from mantranet_torch import (
    ManTraNet,
    ManTraNetConfig,
    WeightFileError,
    init_from,
    layers,
    memory,
    release_config,
    tiling,
)
from mantranet_torch.cost import multiply_adds_per_pixel
from mantranet_torch.layers import ImageStatistics
from mantranet_torch.model import LAYERS, layer_names
from mantranet_torch.tiling import last_output, predict_tiled
from mantranet_torch.weights import manifest_path
from parity_tests import oracle
from parity_tests.profiles import examples
from tests.helpers import to_nhwc
from tests.test_model import _atol
from tests.test_tiling import TILED_ATOL, farthest_change

GRU4 = dataclasses.replace(release_config(4), recurrent="gru")
GRU0 = dataclasses.replace(release_config(0), recurrent="gru")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny inputs on two shared cores (tests/conftest.py)


@functools.cache
def gru_arrays(config: ManTraNetConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded Keras-layout arrays of the variant (``converter.mapping.mapping(config)``'s left column)."""
    return synthetic_keras_weights(config, seed)


def gru_model(config: ManTraNetConfig = GRU4, seed: int = 0) -> ManTraNet:
    model = ManTraNet(config)
    model.load_state_dict(keras_to_torch(gru_arrays(config, seed), config, "test"))
    return model.eval()


# ---------------------------------------------------------------- the layer


@settings(max_examples=examples(15))
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12))
def test_conv_gru_against_float64_equations(seed: int, steps: int, h: int, w: int) -> None:
    rng = np.random.default_rng(seed)
    gru = layers.ConvGRU2d(6, 8, 7)
    kernel = rng.normal(0, 0.15, (7, 7, 6, 24))  # Keras layout: HWIO, gates z, r, h along the last axis
    recurrent = rng.normal(0, 0.3, (7, 7, 8, 24))
    bias = rng.normal(0, 1.0, 24)
    with torch.no_grad():
        gru.kernel.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
        gru.recurrent_kernel.copy_(torch.from_numpy(recurrent.transpose(3, 2, 0, 1)))
        gru.bias.copy_(torch.from_numpy(bias))
    seq = rng.normal(0, 2.0, (2, steps, h, w, 6))  # pre-activations reach past the kinks at +-2.5
    got = gru(torch.from_numpy(seq).float().permute(0, 1, 4, 2, 3))
    arrays = {"cGRU/cGRU/kernel:0": kernel, "cGRU/cGRU/recurrent_kernel:0": recurrent, "cGRU/cGRU/bias:0": bias}
    expected = oracle.Oracle(arrays, GRU4).cgru(seq)
    # 294 + 392 term float32 sums per gate, pre-activations up to ~20, and the candidate's sum of r h on top: measured
    # worst 1.1e-5 over 200 seeds of these draws; tanh and the clip keep it bounded. A wrong gate order or state
    # update is off by O(0.1).
    np.testing.assert_allclose(to_nhwc(got), expected, rtol=0, atol=3e-5)


def test_the_first_step_is_the_update_gate_times_the_candidate() -> None:
    # From the zero state, h1 = u * tanh(W_c x + b_c): reset gate and recurrent kernel play no part. By hand.
    gru = layers.ConvGRU2d(1, 1, 1)
    with torch.no_grad():
        gru.kernel.copy_(torch.tensor([2.0, 100.0, 0.5]).reshape(3, 1, 1, 1))
        gru.recurrent_kernel.fill_(7.0)
        gru.bias.copy_(torch.tensor([0.5, -3.0, 0.25]))
    got = gru(torch.tensor([0.5, -1.0, 4.0]).reshape(1, 1, 1, 1, 3))  # N, T, C, H, W: three pixels in a row
    xs = np.array([0.5, -1.0, 4.0])
    u = np.clip(0.2 * (2.0 * xs + 0.5) + 0.5, 0, 1)  # Keras 2's hard sigmoid
    expected = u * np.tanh(0.5 * xs + 0.25)
    np.testing.assert_allclose(got.detach().numpy().ravel(), expected, rtol=0, atol=1e-7)


def test_conv_gru_gradients_match_finite_differences() -> None:
    # Trainable: autograd against central differences in float64, for the input and every array. Small weights
    # keep the gates' pre-activations inside the hard sigmoid's linear part, where it has a slope to check.
    torch.manual_seed(0)
    gru = layers.ConvGRU2d(2, 3, 3).double()
    with torch.no_grad():
        for p in gru.parameters():
            p.uniform_(-0.4, 0.4)
    x = torch.rand(1, 3, 2, 4, 5, dtype=torch.float64).requires_grad_()
    pre = torch.nn.functional.conv2d(x.flatten(0, 1), gru.kernel, gru.bias, padding=1)
    assert pre.abs().max() < 2.5  # no kink within reach of the differences
    # gradcheck's own float64 tolerances (atol 1e-5, rtol 1e-3) fit eps-1e-6 central differences
    assert torch.autograd.gradcheck(
        lambda x, k, r, b: torch.func.functional_call(gru, {"kernel": k, "recurrent_kernel": r, "bias": b}, (x,)),
        (x, *(p.detach().clone().requires_grad_() for p in (gru.kernel, gru.recurrent_kernel, gru.bias))),
        eps=1e-6,
    )


def test_the_whole_variant_is_differentiable() -> None:
    # Every array gets a finite gradient through the whole model, and the gradient of each recurrent array agrees
    # with a central difference along a random direction, in float64 (the layer's full gradcheck is above).
    model = gru_model(seed=5).double()
    x = torch.rand(1, 3, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.zero_grad()
    model(x).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    eps = 1e-6
    for param in (model.detector.cgru.kernel, model.detector.cgru.recurrent_kernel, model.detector.cgru.bias):
        direction = torch.randn(param.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            param += eps * direction
            up = model(x).mean()
            param -= 2 * eps * direction
            down = model(x).mean()
            param += eps * direction
        slope = float((param.grad * direction).sum())
        assert slope != 0  # the state path is trained too
        # float64 central differences of step 1e-6: measured 2e-10 .. 3.4e-10 of the slope here. 1e-6 leaves room
        # for a gate pre-activation the step carries across a kink of the hard sigmoid; a wrong gradient is O(1) off
        assert abs(float(up - down) / (2 * eps) - slope) <= 1e-6 * abs(slope) + 1e-9


# ---------------------------------------------------------------- the model and its config


def test_every_layer_against_float64() -> None:
    model, x = gru_model(GRU0, seed=3), np.random.default_rng(3).uniform(-1, 1, (2, 21, 34, 3)).astype(np.float32)
    exact = oracle.Oracle(gru_arrays(GRU0, 3), GRU0).trace(x)
    with torch.no_grad():
        got = model.trace(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert list(got) == list(layer_names(GRU0)) == list(exact) == [*LAYERS[:-2], "cGRU", "pred"]
    for layer, value in got.items():
        # cGRU: the ConvLSTM's bound; measured 2.2e-5 .. 2.8e-5 against float64 on such inputs (divStd up to ~5;
        # two window sets, four seeds), with what it inherits from the float32 layers before it
        atol = _atol("cLSTM" if layer == "cGRU" else layer)
        err = np.abs(to_nhwc(value) - exact[layer]).max()
        assert err <= atol, f"{layer}: max abs error {err:.3g} against float64 > {atol}"


def test_the_variant_mirrors_keras_names_and_layouts() -> None:
    model = ManTraNet(GRU4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".cgru." in k or ".clstm." in k}
    assert shapes == {
        "detector.cgru.kernel": (24, 64, 7, 7),
        "detector.cgru.recurrent_kernel": (24, 8, 7, 7),
        "detector.cgru.bias": (24,),
    }
    assert model.detector.recurrent is model.detector.cgru and model.detector.recurrent_name == "cGRU"
    assert model.detector.cgru.bias.abs().sum() == 0  # Keras' GRU initialises every bias at zero
    lstm = ManTraNet(release_config(4))
    assert layer_names(lstm.config) == LAYERS and lstm.detector.clstm.bias[8:16].eq(1).all()  # forget gate
    assert [p for p, _, _ in mapping(GRU4)][-5:] == [
        "cGRU/cGRU/kernel:0",
        "cGRU/cGRU/recurrent_kernel:0",
        "cGRU/cGRU/bias:0",
        "pred/pred/kernel:0",
        "pred/pred/bias:0",
    ]


def test_config_round_trip_and_files_of_earlier_versions() -> None:
    assert ManTraNetConfig.from_dict(GRU0.to_dict()) == GRU0
    assert GRU0.to_dict()["recurrent"] == "gru"
    # An LSTM config writes what it wrote before the variant existed, and such a dict reads as the LSTM.
    assert release_config(4).to_dict() == {
        "first_block_filters": 16,
        "transform_activation": None,
        "window_sizes": [7, 15, 31],
    }
    assert ManTraNetConfig.from_dict(release_config(4).to_dict()).recurrent == "lstm"
    assert GRU4.describe() == "16 first-block filters, transform linear, windows 7, 15, 31, ConvGRU detector"
    assert release_config(4).describe() == "16 first-block filters, transform linear, windows 7, 15, 31"
    with pytest.raises(ValueError, match="recurrent must be one of 'lstm', 'gru', got 'rnn'"):
        ManTraNetConfig(recurrent="rnn")


# ---------------------------------------------------------------- initialisation from a release


def lstm_release(seed: int = 1) -> ManTraNet:
    config = release_config(4)
    model = ManTraNet(config)
    model.load_state_dict(keras_to_torch(synthetic_keras_weights(config, seed), config, "release"))
    return model.eval()


@pytest.mark.parametrize("as_state_dict", [False, True])
def test_init_from_copies_everything_but_the_recurrent_layer(as_state_dict: bool) -> None:
    release, model = lstm_release(), ManTraNet(GRU4)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    done = init_from(model, release.state_dict() if as_state_dict else release)
    source, target = release.state_dict(), model.state_dict()
    assert done.left == ("detector.cgru.kernel", "detector.cgru.recurrent_kernel", "detector.cgru.bias")
    assert done.unused == ("detector.clstm.kernel", "detector.clstm.recurrent_kernel", "detector.clstm.bias")
    assert set(done.copied) == set(target) - set(done.left) and len(done.copied) == len(source) - 3
    for key in done.copied:
        assert torch.equal(target[key], source[key]), key
    for key in done.left:
        assert torch.equal(target[key], initial[key]), key
    assert "left at their initialisation: detector.cgru.kernel" in done.describe()
    x = torch.rand(1, 3, 12, 13) * 2 - 1
    with torch.no_grad():  # the feature extractor and the detector's statistics are the release's, bit for bit
        torch.testing.assert_close(model.featex(x), release.featex(x), rtol=0, atol=0)


def test_init_from_a_model_of_the_same_variant_copies_everything() -> None:
    source, model = gru_model(seed=2), ManTraNet(GRU4)
    done = init_from(model, source)
    assert done.left == done.unused == () and len(done.copied) == len(source.state_dict())
    x = torch.rand(1, 3, 9, 10) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_init_from_a_release_of_another_width_names_the_arrays_and_copies_nothing() -> None:
    model = ManTraNet(GRU4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"featex.b1c1.regular_kernel: the model's is \(4, 3, 5, 5\), the source's \(20"
    ):
        init_from(model, ManTraNet(release_config(0)))
    partial = {k: v for k, v in lstm_release().state_dict().items() if not k.startswith("featex.b5c2")}
    with pytest.raises(ValueError, match="featex.b5c2.weight missing; featex.b5c2.bias missing"):
        init_from(model, partial)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------- weight files and exports


@dataclasses.dataclass
class Trained:
    """A model to save, as the training run hands one to ``save_conversion``."""

    config: ManTraNetConfig
    state_dict: dict[str, torch.Tensor]

    def provenance(self) -> dict:
        return {"config": self.config.to_dict(), "source": {"name": "test"}}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_gru_model_saves_and_loads_with_its_config(tmp_path, suffix: str) -> None:
    model = gru_model(GRU0, seed=4)
    target = tmp_path / f"gru{suffix}"
    manifest = save_conversion(Trained(GRU0, model.state_dict()), target, manifest_path(target))
    assert manifest["config"]["recurrent"] == "gru" and manifest_path(target).is_file()
    loaded = load_weights(target)
    assert loaded.config == GRU0
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    np.testing.assert_array_equal(mantranet_torch.load(target).predict(image), model.predict(image))


def save_gru(tmp_path: Path) -> Path:
    target = tmp_path / "gru.safetensors"
    save_conversion(Trained(GRU4, gru_model().state_dict()), target, manifest_path(target))
    return target


def test_export_keras_refuses_a_gru_model_in_one_line(tmp_path, capsys) -> None:
    weights = save_gru(tmp_path)
    with pytest.raises(ConversionError, match="a ConvGRU model .* has no official Keras layout"):
        export_keras(weights, tmp_path / "out.h5")
    assert main(["export-keras", str(weights), "-o", str(tmp_path / "out.h5")]) != 0
    err = capsys.readouterr().err.strip()
    assert "ConvGRU" in err and "export-keras takes ConvLSTM models" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out.h5").exists()


def test_detect_and_tiled_predict_run_the_variant(tmp_path) -> None:
    from PIL import Image

    weights = save_gru(tmp_path)
    image = np.random.default_rng(1).integers(0, 256, (70, 58, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = main(
            ["detect", str(tmp_path / "photo.png"), "-w", str(weights), "-o", str(tmp_path / "out"), "--save-npy"]
        )
    assert code == 0, stdout.getvalue()
    model = gru_model()
    whole = model.predict(image)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "photo.npy"), whole)
    # exact tiling (tests/test_tiling.py): the variant's halo is the ConvLSTM's, one 7x7 convolution per step
    with torch.inference_mode():
        tiled = predict_tiled(model, mantranet_torch.to_model_input(image), 32)
    assert np.abs(tiled - whole).max() <= TILED_ATOL


# Windows 7/15/31 (63), four (five) 7x7 steps, pred. A step's input reaches 3 (the input convolution) + 3 (r's input
# goes through the candidate's convolution of r h, from the second step on), each later step 6 more (r's
# convolution of h, then the candidate's of r h); pred 3. Ptrain4: the 31 window at step 3, 15 + 6 + 6 + 3 = 30;
# Ptrain0: the 63 window at step 4, 31 + 6 + 6 + 3 = 46. The ConvLSTM's: 24 and 40. (What the far pixels add is
# small: a random 96 x 40 image tiled at 32 with the ConvLSTM's halo was off by 1.6e-5, with the exact one 4.1e-6;
# this exact reach test is what pins the radius.)
@pytest.mark.parametrize(("config", "expected"), [(GRU4, 30), (GRU0, 46)])
def test_detector_radius_is_the_reach_of_one_pixel(config: ManTraNetConfig, expected: int) -> None:
    m, centre = gru_model(config, seed=6), 50  # the image reaches beyond the radius
    x = torch.randn(1, 64, 2 * centre + 1, 2 * centre + 1, generator=torch.Generator().manual_seed(1))
    poked = x.clone()
    poked[..., centre, centre] += 5.0
    stats = ImageStatistics.of(x)
    with torch.inference_mode():
        before = last_output(m.detector.stages_after_bnorm(x, stats))
        after = last_output(m.detector.stages_after_bnorm(poked, stats))
    assert farthest_change(before, after, centre) == tiling.detector_radius(m) == expected


def test_arithmetic_of_the_gru_counted_by_hand() -> None:
    # three gates of 8 channels: the input kernel (7x7x64 -> 24) at every step, the recurrent kernel (7x7x8 -> 24,
    # the two gates on h and the candidate on r h) at steps 2..T
    counts, lstm = multiply_adds_per_pixel(ManTraNet(GRU4)), multiply_adds_per_pixel(ManTraNet(release_config(4)))
    assert counts["cGRU"] == 4 * 7 * 7 * 64 * 24 + 3 * 7 * 7 * 8 * 24 == 329_280
    assert "cLSTM" not in counts and {k: v for k, v in counts.items() if k != "cGRU"} == {
        k: v for k, v in lstm.items() if k != "cLSTM"
    }


MEASURE_PEAK = """
import json, numpy as np, torch
from tests.test_gru import gru_model
from mantranet_torch import to_model_input
from mantranet_torch.tiling import predict_tiled


def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


torch.set_num_threads(1)
m = gru_model()
x = to_model_input(np.random.default_rng(0).integers(0, 256, (96, 104, 3), dtype=np.uint8))
before = status("VmRSS")
with torch.inference_mode():
    predict_tiled(m, x, 52)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from /proc (Linux)")
def test_memory_model_bounds_the_measured_peak_of_the_variant() -> None:
    # The memory model's detector peak is at nestedAvgFeatex; the recurrent layer of either variant holds less
    # (divStd's T steps, T x 24 (GRU) or T x 32 (LSTM) input-convolution channels, a few 8-channel states), so the
    # same model covers the ConvGRU: its measured peak in a fresh process is within the modelled one.
    out = subprocess.run([sys.executable, "-c", MEASURE_PEAK], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout)
    modelled = memory.tiled_bytes(gru_model(), 96, 104, 52)
    # per pixel as the ConvLSTM's; the wider halo (30 px, not 24) makes the detector's crops, and so the model, larger
    lstm = ManTraNet(release_config(4))
    assert memory.PixelCosts.of(gru_model()) == memory.PixelCosts.of(lstm)
    assert modelled > memory.tiled_bytes(lstm, 96, 104, 52)
    assert measured["peak"] <= modelled, measured
    assert measured["peak"] - measured["before"] >= 0.3 * (modelled - memory.PROCESS_OVERHEAD)


def test_export_onnx_of_the_variant_names_its_layers_and_matches_float64(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the optional extra 'onnx' is not installed")
    pytest.importorskip("onnxscript", reason="the optional extra 'onnx' is not installed")
    from converter.onnx_export import OnnxModel, export_onnx

    export = export_onnx(save_gru(tmp_path), tmp_path / "gru.onnx", layers=True)  # its own probes against torch
    session = OnnxModel(export.target)
    assert session.config == GRU4 and "layer.cGRU" in export.outputs and "layer.cLSTM" not in export.outputs
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 17, 22)).astype(np.float32)
    got = session.trace(x)
    exact = oracle.Oracle(gru_arrays(GRU4, 0), GRU4).trace(x.transpose(0, 2, 3, 1))
    assert list(got) == list(layer_names(GRU4))
    for layer in ("cGRU", "pred"):  # float32 as the eager model (test_every_layer_against_float64)
        err = np.abs(to_nhwc(torch.from_numpy(got[layer])) - exact[layer]).max()
        assert err <= _atol("cLSTM" if layer == "cGRU" else layer), f"{layer}: {err:.3g}"


def test_parity_refuses_a_gru_model_against_an_official_file(tmp_path) -> None:
    # `mantranet parity` compares with an official-layout file, which holds a ConvLSTM: a ConvGRU model is another
    # architecture, refused before any comparison (its layers are compared in parity_tests/test_gru_parity.py).
    from parity_tests.api import run_parity
    from parity_tests.errors import ParityInputError
    from tests.helpers import official_file

    h5 = tmp_path / "ManTraNet_Ptrain4.h5"
    official_file(h5, 4)
    with pytest.raises(ParityInputError, match=r"'recurrent': 'gru'\} is not that of .*compare weights of one release"):
        run_parity(h5, torch_weights=[save_gru(tmp_path)], check_available_memory=False)


def test_a_variant_loaded_as_the_other_says_so_first(tmp_path) -> None:
    weights = save_gru(tmp_path)
    with pytest.raises(WeightFileError) as caught:
        load_weights(weights, variant=4)  # release 4's config: the ConvLSTM
    assert str(caught.value).startswith(
        f"{weights}: does not fit ManTraNet {release_config(4).to_dict()}: its recurrent layer is detector.cgru "
        "(recurrent='gru'), the config's detector.clstm (recurrent='lstm'); missing key detector.clstm.kernel"
    )
    lstm_state = lstm_release().state_dict()
    with pytest.raises(WeightFileError, match=r"its recurrent layer is detector.clstm \(recurrent='lstm'\)"):
        mantranet_torch.weights.model_from_state_dict(lstm_state, GRU4, "release")
    del lstm_state["featex.b1c1.regular_kernel"]  # a state dict of the right variant: no such note
    with pytest.raises(WeightFileError) as caught:
        mantranet_torch.weights.model_from_state_dict(lstm_state, release_config(4), "release")
    assert "recurrent layer" not in str(caught.value) and "missing key featex.b1c1.regular_kernel" in str(caught.value)
