"""The whole PyTorch model: float64 agreement per release, per-image statistics, input forms, weight files."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mantranet_torch
from converter import convert_h5, output_paths, save_conversion, synthetic_keras_weights
from mantranet_torch import RELEASES, ManTraNet, WeightFileError, scale_pixels, to_model_input
from parity_tests.oracle import Oracle
from tests.helpers import SAMPLES, converted_model, official_file, synthetic_model, to_nhwc

# Worst error of the float32 model against float64, per layer, measured on 2 x 33 x 47 inputs with
# synthetic weights: Featex layers <= 7.3e-6 (values up to ~4, 2304-term sums), divStd 2.4e-5
# (deviations divided by stds of ~0.2), cLSTM 4.1e-5 (seven 7x7x64 convolutions of divStd, up to ~5),
# pred 3.3e-6 (the sigmoid's slope is at most 1/4). Tolerances leave 2-3x headroom over those.
FLOAT64_ATOL = {"featex": 2e-5, "divStd": 6e-5, "cLSTM": 1e-4, "other": 2e-5}


def _atol(layer: str) -> float:
    if layer in FLOAT64_ATOL:
        return FLOAT64_ATOL[layer]
    return FLOAT64_ATOL["featex"] if layer in mantranet_torch.model.FEATEX_LAYERS else FLOAT64_ATOL["other"]


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_every_layer_against_float64(tmp_path, release: int) -> None:
    arrays = official_file(tmp_path / f"ManTraNet_Ptrain{release}.h5", release, seed=release)
    model = converted_model(tmp_path / f"ManTraNet_Ptrain{release}.h5")
    x = np.random.default_rng(release).uniform(-1, 1, (2, 21, 34, 3)).astype(np.float32)
    exact = Oracle(arrays, RELEASES[release]).trace(x)
    with torch.no_grad():
        got = model.trace(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert list(got) == list(mantranet_torch.LAYERS) == list(exact)
    for layer, value in got.items():
        err = np.abs(to_nhwc(value) - exact[layer]).max()
        assert err <= _atol(layer), f"{layer}: max abs error {err:.3g} against float64 > {_atol(layer)}"


def test_batch_gives_the_same_maps_as_single_images() -> None:
    model = _model(4, seed=3)
    x = torch.rand(3, 3, 19, 26) * 2 - 1
    x[1] = x[1] * 0.01  # a near-flat image: its statistics must not leak into the others'
    with torch.no_grad():
        batch = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(3)])
    # A leak of statistics between images would move the maps by O(0.1). What remains is float32
    # reordering inside oneDNN's batched convolutions (measured 2.8e-6 on the ordinary images), which
    # the near-flat image amplifies by dividing deviations by its ~100x smaller std (measured 6.8e-6).
    torch.testing.assert_close(batch[[0, 2]], singles[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1], singles[1], rtol=0, atol=3e-5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (2, 3), (5, 64)])
def test_tiny_and_thin_images(shape: tuple[int, int]) -> None:
    model = _model(0, seed=1)
    arrays = synthetic_keras_weights(RELEASES[0], 1)
    x = np.random.default_rng(0).uniform(-1, 1, (1, *shape, 3)).astype(np.float32)
    with torch.no_grad():
        got = to_nhwc(model(torch.from_numpy(x).permute(0, 3, 1, 2)))
    np.testing.assert_allclose(got, Oracle(arrays, RELEASES[0]).predict(x), rtol=0, atol=2e-5)


def test_predict_takes_arrays_and_pil_images_and_scales_once() -> None:
    model = _model(4, seed=2)
    rgb = np.random.default_rng(1).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    from_array = model.predict(rgb)
    from_pil = model.predict(Image.fromarray(rgb))
    with torch.no_grad():
        direct = model(torch.from_numpy(rgb.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None])[0, 0]
    assert from_array.dtype == np.float32 and from_array.shape == (13, 17)
    np.testing.assert_array_equal(from_array, from_pil)
    np.testing.assert_array_equal(from_array, direct.numpy())
    read_only = np.asarray(Image.fromarray(rgb))  # PIL's buffer: not writable
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a non-writable array unless it is copied first
        np.testing.assert_array_equal(model.predict(read_only), from_array)


def test_scaling_matches_the_official_float32_expression() -> None:
    pixels = np.arange(256, dtype=np.uint8)
    official = pixels.astype("float32") / 255.0 * 2 - 1  # the official demo's expression, in float32
    np.testing.assert_array_equal(scale_pixels(torch.from_numpy(pixels)).numpy(), official)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "uint8 H x W x 3"),
        (np.zeros((4, 4), dtype=np.uint8), "uint8 H x W x 3"),
        (Image.new("L", (4, 4)), "RGB image"),
        (torch.zeros(1, 4, 5, 5), "N x 3 x H x W"),
        (torch.zeros(1, 3, 0, 5), "empty"),
        ([1, 2, 3], "numpy array, PIL image or tensor"),
    ],
)
def test_bad_inputs_are_named(bad: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        to_model_input(bad)


def test_real_sample_image_runs(tmp_path) -> None:
    path = SAMPLES / "forged" / "I35_c5vuwc7_0.jpg"
    if not path.exists():
        pytest.skip(f"{path} not available")
    image = np.asarray(Image.open(path).convert("RGB"))[:64, :80]
    out = _model(4, seed=0).predict(image)
    assert out.shape == (64, 80) and np.isfinite(out).all() and (out > 0).all() and (out < 1).all()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_reads_the_architecture_from_the_file(tmp_path, fmt: str) -> None:
    source = tmp_path / "ManTraNet_Ptrain0.h5"
    official_file(source, 0, seed=5)
    conversion = convert_h5(source)
    target, manifest = output_paths(source, tmp_path, fmt)
    save_conversion(conversion, target, manifest)
    model = mantranet_torch.load(target)
    assert model.config == RELEASES[0] and not model.training
    for key, value in conversion.state_dict.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    reloaded = torch.load(target, weights_only=True) if fmt == "pt" else None
    assert reloaded is None or set(reloaded) == set(conversion.state_dict)


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(WeightFileError, match="no such file"):
        mantranet_torch.load(tmp_path / "missing.safetensors")
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(WeightFileError, match="a Keras HDF5 file; load it with converter.load_weights"):
        mantranet_torch.load(tmp_path / "x.h5")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(WeightFileError, match="unknown weight format"):
        mantranet_torch.load(tmp_path / "x.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightFileError, match="bad.safetensors"):
        mantranet_torch.load(tmp_path / "bad.safetensors")
    plain = tmp_path / "plain.pt"
    torch.save(ManTraNet().state_dict(), plain)
    with pytest.raises(WeightFileError, match="no ManTraNet config"):
        mantranet_torch.load(plain)
    assert mantranet_torch.load(plain, config=RELEASES[4]).config == RELEASES[4]
    with pytest.raises(WeightFileError, match="does not fit"):
        mantranet_torch.load(plain, config=RELEASES[0])


def test_forward_never_changes_the_weights() -> None:
    model = _model(2, seed=4)
    with torch.no_grad():
        model.featex.b1c1.bayar_kernel.normal_()  # unconstrained: a mutating forward would show
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.rand(1, 3, 9, 9))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_gradients_match_finite_differences() -> None:
    """Fine-tuning needs a differentiable forward: autograd against central differences, in float64."""
    model = _model(4, seed=5).double()
    x = torch.rand(1, 3, 5, 6, dtype=torch.float64) * 2 - 1
    # gradcheck's own tolerances for float64 (atol 1e-5, rtol 1e-3) fit eps-1e-6 central differences
    assert torch.autograd.gradcheck(model, (x.requires_grad_(),), eps=1e-6)
    model.zero_grad()
    model(x.detach()).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_a_float64_trace_keeps_every_layer_intact() -> None:
    """No layer may overwrite an earlier layer's output in place (float64 inputs are not copied on the way)."""
    model = _model(4, seed=6).double()
    with torch.no_grad():
        trace = model.trace(torch.rand(1, 3, 11, 12, dtype=torch.float64) * 2 - 1)
        bnorm = model.detector.bnorm(model.detector.outlier_trans(trace["L2"]))
    torch.testing.assert_close(trace["bnorm"], bnorm, rtol=0, atol=0)


def _model(release: int, seed: int) -> ManTraNet:
    return copy.deepcopy(synthetic_model(release, seed))  # a copy: some tests here cast it to float64
