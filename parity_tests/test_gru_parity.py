"""The ConvGRU variant (``ManTraNetConfig(recurrent="gru")``) layer by layer: the PyTorch cGRU against the
TensorFlow reference's (``reference.layers.ConvGRU2D``) and both against the float64 oracle, as the ConvLSTM is
checked in ``test_layer_parity.py`` and ``test_reference.py``.

No official file holds a ConvGRU: its weights are seeded Keras-layout arrays (``converter.mapping.mapping``), which
the reference and the oracle read as they are and the PyTorch model through ``keras_to_torch``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow", reason="the reference needs TensorFlow (pip install -e '.[reference]')")

import reference  # noqa: E402
from converter import keras_to_torch, synthetic_keras_weights  # noqa: E402
from mantranet_torch import RELEASES, ManTraNet, ManTraNetConfig  # noqa: E402
from mantranet_torch.model import DETECTOR_CHANNELS, layer_names  # noqa: E402
from mantranet_torch.weights import model_from_state_dict  # noqa: E402
from parity_tests.oracle import Oracle, conv2d_same_zeros  # noqa: E402
from parity_tests.profiles import examples  # noqa: E402
from parity_tests.reference_layers import reference_layers  # noqa: E402
from parity_tests.runner import INPUT, LAYER_INPUTS, judge_layer, torch_layers  # noqa: E402
from parity_tests.strategies import ImageRecipe, Shape, log_uniform, shapes, weight_seeds  # noqa: E402
from parity_tests.test_reference import PEAK_RTOL, assert_close_to_peak, random_images  # noqa: E402

GRU_PIXELS = 900  # four 7x7x64 steps in float64 per pixel, as the ConvLSTM's test
CGRU = "cGRU"


def gru_config(release: int) -> ManTraNetConfig:
    return dataclasses.replace(RELEASES[release], recurrent="gru")


@dataclasses.dataclass
class GruWeights:
    """One set of seeded Keras-layout arrays of the variant, and all three evaluations of it."""

    reference: reference.ReferenceModel
    model: ManTraNet
    oracle: Oracle
    reference_layers: dict
    torch_layers: dict


@functools.cache
def gru_weights(release: int, seed: int, kernel_gain: float = 1.0) -> GruWeights:
    config = gru_config(release)
    arrays = synthetic_keras_weights(config, seed)
    arrays[f"{CGRU}/{CGRU}/kernel:0"] = arrays[f"{CGRU}/{CGRU}/kernel:0"] * np.float32(kernel_gain)
    ref = reference.ReferenceModel(arrays, config, source=f"ConvGRU, seed {seed}")
    model = model_from_state_dict(keras_to_torch(arrays, config, "arrays"), config, "arrays")
    return GruWeights(ref, model, Oracle(ref.arrays, config), reference_layers(ref), torch_layers(model))


def _check(w: GruWeights, name: str, *inputs: np.ndarray) -> None:
    comparison, attribution = judge_layer(name, inputs, w.reference_layers[name], w.torch_layers[name], w.oracle)
    assert comparison.passed, comparison.message() + f"; against float64: {attribution}"


def test_both_frameworks_name_the_variants_layers_alike() -> None:
    for release in (0, 4):
        for config in (RELEASES[release], gru_config(release)):
            assert reference.model.layer_names(config) == layer_names(config)
    assert layer_names(gru_config(4))[-2:] == (CGRU, "pred") and layer_names(RELEASES[4]) == reference.LAYERS


def test_reference_layers_wire_as_the_reference_trace() -> None:
    # The per-layer functions the property test uses compute what ReferenceModel.trace computes, bit for bit.
    w = gru_weights(4, 0)
    x = ImageRecipe("uniform", Shape(2, 9, 13), 0).build()
    trace = w.reference.trace(x)
    assert list(trace) == list(layer_names(w.reference.config))
    for name in trace:
        sources = LAYER_INPUTS.get(name, ("divStd",))  # cGRU reads divStd, as cLSTM does
        sources = ("cGRU",) if name == "pred" else sources
        inputs = [x if source == INPUT else trace[source] for source in sources]
        np.testing.assert_array_equal(w.reference_layers[name](*inputs), trace[name], err_msg=name)


@settings(max_examples=examples(12))
@given(release=st.sampled_from([0, 4]), seed=weight_seeds(), shape=shapes(GRU_PIXELS), data_seed=st.integers(0, 2**16))
@example(release=4, seed=0, shape=Shape(1, 1, 1), data_seed=0)  # one pixel: the 7x7 kernels see only padding
def test_conv_gru_hard_sigmoid(release: int, seed: int, shape: Shape, data_seed: int) -> None:
    # divStd outputs (non-negative) of magnitudes 0.3 .. 16 per image: the gate pre-activations then span both
    # kinks of the Keras 2 hard sigmoid at +-2.5 and its linear part between (tolerances.py: cGRU, scaled
    # beyond inputs of 50).
    rng = np.random.default_rng(data_seed)
    w = gru_weights(release, seed)
    steps = RELEASES[release].time_steps
    scale = log_uniform(rng, -0.5, 1.2, (shape.batch, 1, 1, 1, 1))
    seq = np.abs(rng.normal(size=(shape.batch, steps, shape.height, shape.width, DETECTOR_CHANNELS))) * scale
    z = conv2d_same_zeros(seq[:, 0], w.oracle.w["cGRU/cGRU/kernel:0"]) + w.oracle.w["cGRU/cGRU/bias:0"]
    event(f"first-step gates past the kinks: {(np.abs(z) > 2.5).any()}, inside: {(np.abs(z) < 2.5).any()}")
    _check(w, CGRU, seq)


def test_conv_gru_gates_on_both_sides_of_the_kinks() -> None:
    # Input kernel doubled: a large share of the gates saturate, a large share stay linear.
    w = gru_weights(4, 1, kernel_gain=2.0)
    seq = np.random.default_rng(3).uniform(0.0, 3.0, (2, RELEASES[4].time_steps, 9, 11, DETECTOR_CHANNELS))
    z = conv2d_same_zeros(seq[:, 0], w.oracle.w["cGRU/cGRU/kernel:0"]) + w.oracle.w["cGRU/cGRU/bias:0"]
    assert (np.abs(z) > 2.5).mean() > 0.3 and (np.abs(z) < 2.5).mean() > 0.1  # both regimes exercised
    _check(w, CGRU, seq)


@pytest.mark.parametrize("release", [0, 4])
def test_every_layer_of_the_variant_matches_the_float64_oracle(release: int) -> None:
    # The reference end to end against float64, as test_reference.py checks the ConvLSTM model; the cGRU with
    # the cLSTM's bound (measured worst 2.8e-5 of its peak: 2 x 11 x 14 images, both window sets, three seeds).
    w = gru_weights(release, release)
    x = random_images((2, 11, 14, 3), seed=release)
    got, exact = w.reference.trace(x), w.oracle.trace(x)
    assert list(got) == list(exact) == list(layer_names(w.reference.config))
    for name in got:
        assert_close_to_peak(name, got[name], exact[name], PEAK_RTOL["cLSTM" if name == CGRU else name])
    np.testing.assert_allclose(w.reference.predict(x), got["pred"], rtol=0, atol=1e-6)  # the compiled graph
