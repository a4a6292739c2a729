"""The TensorFlow reference against independent computations: NumPy (float64 and the original's float32
algorithm), the float64 oracle, and files written by the converter's HDF5 writer."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the reference needs TensorFlow (pip install -e '.[reference]')")

import reference  # noqa: E402
from converter import ConversionError, read_keras_h5, synthetic_keras_weights, write_official_h5  # noqa: E402
from converter.keras_h5 import FULL_MODEL, WEIGHTS_ONLY, write_keras_h5  # noqa: E402
from converter.mapping import official_layers  # noqa: E402
from mantranet_torch import LAYERS, RELEASES  # noqa: E402
from parity_tests.oracle import Oracle, box_mean, hard_sigmoid  # noqa: E402
from reference.layers import (  # noqa: E402
    conv_lstm,
    global_std,
    hard_sigmoid_keras2,
    inference_batch_norm,
    l2_normalize,
    symmetric_pad,
    window_means,
)

WINDOWS = (7, 15, 31, 63)
# float32 rounding of one layer evaluated in float32 against its float64 value: a few ulps of values of order 1
LAYER_ATOL = 1e-6


def as_tf(x: np.ndarray) -> tf.Tensor:
    return tf.constant(np.asarray(x, dtype=np.float32))


@pytest.fixture(scope="module")
def model() -> reference.ReferenceModel:
    return reference.build(4, seed=0)


def random_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def test_layer_names_are_the_torch_models():
    assert reference.LAYERS == LAYERS


@pytest.mark.parametrize("height, width", [(1, 1), (1, 6), (5, 1), (2, 3), (4, 7)])
@pytest.mark.parametrize("pad", [1, 2, 3])
def test_symmetric_pad_is_numpys_symmetric_mode(height, width, pad):
    x = np.arange(2 * height * width * 3, dtype=np.float32).reshape(2, height, width, 3)
    expected = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    np.testing.assert_array_equal(symmetric_pad(as_tf(x), pad).numpy(), expected)


def test_hard_sigmoid_is_keras2s_at_and_around_its_kinks():
    x32 = np.array([-3.0, -2.5001, -2.5, -2.4999, -1.0, 0.0, 1.0, 2.4999, 2.5, 2.5001, 3.0], dtype=np.float32)
    got = hard_sigmoid_keras2(as_tf(x32)).numpy()
    assert got[x32 <= -2.5].tolist() == [0.0] * 3 and got[x32 >= 2.5].tolist() == [1.0] * 3
    # two float32 roundings (0.2 x, then + 0.5) of values below 1: at most 2 ulps of 0.5 = 1.2e-7
    np.testing.assert_allclose(got, hard_sigmoid(x32.astype(np.float64)), rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 9), (8, 1), (5, 40), (37, 29), (70, 64)])
def test_window_means_are_in_image_means(height, width):
    """Windows up to 63 wide, on images from 1 pixel up: larger than the image in most cases."""
    x = np.random.default_rng(height * 100 + width).standard_normal((2, height, width, 8))
    got = window_means(as_tf(x), WINDOWS)
    for k, mean in zip(WINDOWS, got, strict=True):
        # the original's float32 integral image: error grows with the image (measured 1.8e-6 on 64 x 64
        # unit-variance inputs, the worst here 1.5e-6 at 70 x 64)
        np.testing.assert_allclose(mean.numpy(), box_mean(x.astype(np.float32).astype(np.float64), k), atol=3e-6)


def official_window_means_float32(x: np.ndarray, windows: tuple[int, ...]) -> list[np.ndarray]:
    """The original's integral-image algorithm in NumPy float32, indices as the original writes them."""
    big = max(windows)
    pad = big // 2 + 1
    height, width = x.shape[1:3]

    def integral(a: np.ndarray) -> np.ndarray:
        a = np.pad(a, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return np.cumsum(np.cumsum(a, axis=1, dtype=np.float32), axis=2, dtype=np.float32)

    def box(ii: np.ndarray, k: int) -> np.ndarray:
        top = big // 2 - k // 2  # and left, as windows are square
        bot = top + k  # and right
        a = ii[:, top : top + height, top : top + width]
        b = ii[:, top : top + height, bot : bot + width]
        c = ii[:, bot : bot + height, bot : bot + width]
        d = ii[:, bot : bot + height, top : top + width]
        return a + c - b - d

    ii, counts = integral(x), integral(np.ones((1, height, width, 1), dtype=np.float32))
    return [box(ii, k) / box(counts, k) for k in windows]


@pytest.mark.parametrize("height, width", [(1, 1), (3, 50), (61, 47)])
def test_window_means_round_as_the_originals_float32_algorithm(height, width):
    """Bit for bit: the reference reproduces the original's rounding, not a more accurate mean."""
    x = (0.5 + np.random.default_rng(width).standard_normal((1, height, width, 16))).astype(np.float32)
    got = window_means(as_tf(x), WINDOWS)
    for mean, expected in zip(got, official_window_means_float32(x, WINDOWS), strict=True):
        np.testing.assert_array_equal(mean.numpy(), expected)


def test_l2_normalize_clamps_the_squared_norm():
    x = np.array([[[[1e-7, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]]], dtype=np.float32)
    # TensorFlow maps [1e-7, 0, 0] to [0.1, 0, 0] (rsqrt of the clamped 1e-12); torch's normalize gives 1
    expected = np.array([[[[0.1, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 0.0]]]])
    np.testing.assert_allclose(l2_normalize(as_tf(x)).numpy(), expected, rtol=1e-6, atol=0)


def test_batch_norm_and_global_std_with_its_clamp():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 5, 4))
    x[1, :, :, 2] = 0.25  # a constant channel: std 0, so the clamp 1e-6 + min_std decides
    mean, var = rng.normal(0, 0.1, 4), rng.uniform(0.01, 0.2, 4)
    min_std = np.array([0.0, 0.01, 0.003, 0.0]).reshape(1, 1, 1, 4)
    bn = inference_batch_norm(as_tf(x), as_tf(mean), as_tf(var)).numpy()
    np.testing.assert_allclose(bn, (x - mean) / np.sqrt(var + 1e-3), rtol=0, atol=LAYER_ATOL)
    std = global_std(as_tf(x), as_tf(min_std)).numpy()
    expected = np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-6 + min_std)
    assert std.shape == (2, 1, 1, 4)
    np.testing.assert_allclose(std, expected, rtol=0, atol=LAYER_ATOL)
    assert std[1, 0, 0, 2] == np.float32(1e-6) + np.float32(0.003)


def test_conv_lstm_is_keras_convlstm2d_with_the_keras2_hard_sigmoid():
    config = RELEASES[4]
    arrays = synthetic_keras_weights(config, seed=3)
    arrays["cLSTM/cLSTM/kernel:0"] *= 2  # gate pre-activations on both sides of the kinks at +-2.5
    seq = np.random.default_rng(3).uniform(0.0, 3.0, (2, config.time_steps, 9, 11, 64))
    kernel, recurrent, bias = (arrays[f"cLSTM/cLSTM/{n}:0"] for n in ("kernel", "recurrent_kernel", "bias"))
    z = tf.nn.conv2d(seq[:, 0], kernel.astype(np.float64), 1, "SAME").numpy() + bias
    assert (np.abs(z) > 2.5).mean() > 0.3 and (np.abs(z) < 2.5).mean() > 0.1  # both regimes exercised
    layer = conv_lstm(kernel, recurrent, bias, config.time_steps, 9, 11)
    got = layer(as_tf(seq)).numpy()
    # float32 sums of 3136 products giving |z| up to 17, through 4 steps: measured worst 6.0e-6 over ten
    # seeds (2.9e-6 for this one); Keras 3's hard sigmoid x/6 + 0.5 would be off by about 0.1
    np.testing.assert_allclose(got, Oracle(arrays, config).clstm(seq.astype(np.float32)), rtol=0, atol=1e-5)


# End to end against float64, as a fraction of each layer's largest magnitude: float32 rounding accumulated
# through up to 13 convolutions, measured worst 6.6e-6 (nestedAvgFeatex) over the five releases below; the
# cLSTM sums 7x7x64 inputs per gate over 4-5 steps and amplifies what it inherits: measured worst 3.8e-5.
PEAK_RTOL = {name: 2e-5 for name in LAYERS} | {"cLSTM": 1e-4}


def assert_close_to_peak(name: str, got: np.ndarray, exact: np.ndarray, rtol: float) -> None:
    assert got.shape == exact.shape, f"{name}: shape {got.shape}, expected {exact.shape}"
    diff = np.abs(got - exact)
    peak = np.abs(exact).max()
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() <= rtol * peak, (
        f"{name} {got.shape}: max abs error {diff.max():.3g} at {worst} exceeds {rtol:g} x peak {peak:.3g}"
    )


@pytest.mark.parametrize("variant", sorted(RELEASES))
def test_every_layer_matches_the_float64_oracle(variant):
    model = reference.build(variant, seed=variant)
    x = random_images((2, 11, 14, 3), seed=variant)
    got, exact = model.trace(x), Oracle(model.arrays, model.config).trace(x)
    assert list(got) == list(LAYERS)
    for name in LAYERS:
        assert_close_to_peak(name, got[name], exact[name], PEAK_RTOL[name])
    # predict is the compiled graph of the same computation
    np.testing.assert_allclose(model.predict(x), got["pred"], rtol=0, atol=1e-6)


def test_trace_shapes_are_nhwc_per_release():
    for variant, filters, steps in ((0, 32, 5), (4, 16, 4)):
        shapes = {
            name: out.shape for name, out in reference.build(variant).trace(random_images((2, 5, 3, 3), 0)).items()
        }
        assert shapes["b1c1"] == (2, 5, 3, filters)
        assert shapes["L2"] == (2, 5, 3, 256)
        assert shapes["glbStd"] == (2, 1, 1, 64)
        assert shapes["nestedAvgFeatex"] == shapes["divStd"] == (2, steps, 5, 3, 64)
        assert shapes["cLSTM"] == (2, 5, 3, 8)
        assert shapes["pred"] == (2, 5, 3, 1)


def test_predict_takes_any_size_with_one_model(model):
    oracle = Oracle(model.arrays, model.config)
    first = None
    for seed, (height, width) in enumerate([(1, 1), (1, 9), (8, 1), (2, 2), (9, 13), (16, 11)]):
        x = random_images((1, height, width, 3), seed)
        out = model.predict(x)
        assert out.shape == (1, height, width, 1) and out.dtype == np.float32
        # the end-to-end tolerance of the pred layer above (peak is at most 1)
        np.testing.assert_allclose(out, oracle.predict(x), rtol=0, atol=PEAK_RTOL["pred"])
        first = (x, out) if first is None else first
    np.testing.assert_array_equal(model.predict(first[0]), first[1])  # the size's cached graph, same weights


def test_a_batch_gives_its_images_one_by_one(model):
    x = random_images((3, 10, 12, 3), seed=5)
    singles = np.concatenate([model.predict(x[i : i + 1]) for i in range(3)])
    # every statistic is per image; measured 0.0 here, 1e-6 allows another convolution blocking per batch size
    np.testing.assert_allclose(model.predict(x), singles, rtol=0, atol=1e-6)


def test_predict_rejects_bad_input(model):
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 0, 4, 3))):
        with pytest.raises(ValueError, match="N x H x W x 3"):
            model.predict(bad)
    with pytest.raises(ValueError, match="floating-point"):
        model.predict(np.zeros((1, 4, 4, 3), np.uint8))


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, object]:
    """Ptrain4-shaped files in both layouts, with bytes and str attributes, Featex in both orders."""
    config, arrays = RELEASES[4], synthetic_keras_weights(RELEASES[4], seed=11)
    folder = tmp_path_factory.mktemp("h5")
    files = {}
    for layout in (WEIGHTS_ONLY, FULL_MODEL):
        for str_attrs in (False, True):
            for frozen in (False, True):
                path = folder / f"{layout}-{'str' if str_attrs else 'bytes'}-{'frozen' if frozen else 'natural'}.h5"
                write_official_h5(path, arrays, config, layout, str_attrs, frozen_first_layers=frozen)
                files[path.stem] = path
    return {"arrays": arrays, "config": config, "files": files}


def test_every_official_layout_loads_to_the_same_model(official_files):
    arrays, config = official_files["arrays"], official_files["config"]
    x = random_images((1, 9, 10, 3), seed=2)
    expected = reference.from_keras_arrays(arrays, config).predict(x)
    orders = set()
    for stem, path in official_files["files"].items():
        keras = read_keras_h5(path)
        orders.add(tuple(k for k in keras.arrays if k.startswith("Featex/")))
        model = reference.load(path, variant=4)
        assert model.config == config, stem
        for key, value in arrays.items():
            np.testing.assert_array_equal(model.arrays[key], value, err_msg=f"{stem}: {key}")
        np.testing.assert_array_equal(model.predict(x), expected, err_msg=stem)
    assert len(orders) == 2 and all(len(order) == 26 for order in orders)  # natural and frozen Featex orders


def test_release_is_decided_as_the_converter_decides(official_files, tmp_path):
    source = official_files["files"][f"{WEIGHTS_ONLY}-bytes-frozen"]
    named = tmp_path / "ManTraNet_Ptrain4.h5"
    named.write_bytes(source.read_bytes())
    assert reference.load(named).config == RELEASES[4]  # by its name
    with pytest.raises(ConversionError, match="cannot tell which release"):
        reference.load(source)
    with pytest.raises(ConversionError, match="first-block filters"):
        reference.load(source, variant=0)  # Ptrain0's b1c1 has 32 filters, the file's 16


def test_save_h5_then_load_is_bit_exact(model, tmp_path):
    x = random_images((1, 7, 12, 3), seed=4)
    expected = model.predict(x)
    for layout in (WEIGHTS_ONLY, FULL_MODEL):
        path = tmp_path / "ManTraNet_Ptrain4.h5"
        path.write_bytes(b"an older file, replaced whole")
        model.save_h5(path, layout=layout, str_attrs=layout == FULL_MODEL)
        keras = read_keras_h5(path)
        assert keras.layout == layout and len(keras.arrays) == 35
        loaded = reference.load(path)
        assert loaded.config == model.config and list(loaded.arrays) == list(model.arrays)
        for key, value in model.arrays.items():
            np.testing.assert_array_equal(loaded.arrays[key], value, err_msg=key)
        np.testing.assert_array_equal(loaded.predict(x), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ManTraNet_Ptrain4.h5"]  # no temporary file left


def test_bad_arrays_are_named(tmp_path):
    config = RELEASES[4]
    arrays = synthetic_keras_weights(config, seed=0)
    missing = {k: v for k, v in arrays.items() if k != "cLSTM/cLSTM/bias:0"}
    with pytest.raises(ConversionError, match=r"missing array cLSTM/cLSTM/bias:0 \(expected shape \(32,\)\)"):
        reference.from_keras_arrays(missing, config)
    with pytest.raises(ConversionError, match="unexpected array Featex/b1c1/srm:0"):
        reference.from_keras_arrays(arrays | {"Featex/b1c1/srm:0": np.zeros((5, 5, 3, 9))}, config)
    nan = arrays | {"pred/pred/kernel:0": np.full((7, 7, 8, 1), np.nan, np.float32)}
    with pytest.raises(ConversionError, match=r"pred/pred/kernel:0 holds 392 value\(s\) that are not finite"):
        reference.from_keras_arrays(nan, config)
    # through a file: a Ptrain1-shaped file with one kernel of the wrong shape
    path = tmp_path / "wrong.h5"
    wide = synthetic_keras_weights(RELEASES[0], seed=0)
    write_keras_h5(path, official_layers(wide | {"Featex/b4c2/kernel:0": np.zeros((3, 3, 256, 255))}, False))
    with pytest.raises(ConversionError, match=r"layer Featex, array b4c2/kernel:0: expected shape \(3, 3, 256, 256\)"):
        reference.load(path, variant=1)
