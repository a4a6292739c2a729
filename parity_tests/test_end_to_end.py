"""The whole network, every layer, in both modes with float64 attribution: all five releases, drawn and real
images, and the only trained weights at hand (the earlier port's anomaly detector) moved into both frameworks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from PIL import Image

import reference
from converter import torch_to_keras, write_official_h5
from converter.legacy import EarlierPortWarning, load_earlier_port
from mantranet_torch import RELEASES, ManTraNet, scale_pixels
from parity_tests.official_files import ABSENT, SAMPLES, SEED_PORT_DETECTOR, WeightStore
from parity_tests.oracle import Oracle
from parity_tests.profiles import examples
from parity_tests.runner import ParityReport, compare_layers
from parity_tests.strategies import ImageRecipe, images, weight_seeds

DRAWN_PIXELS = 1600  # per drawn example: under 2 s for both frameworks, both modes and the oracle

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real images not found at {SAMPLES} {ABSENT}")
needs_seed_port = pytest.mark.skipif(
    not SEED_PORT_DETECTOR.is_file(), reason=f"earlier port's checkpoint not found at {SEED_PORT_DETECTOR} {ABSENT}"
)


def real_crop(name: str, height: int, width: int) -> np.ndarray:
    """A centred crop of a sample image, scaled as the model's input: 1 x H x W x 3 float32."""
    image = Image.open(SAMPLES / name).convert("RGB")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    rgb = torch.from_numpy(np.asarray(image.crop((left, top, left + width, top + height))).copy())
    return scale_pixels(rgb).numpy()[None]


def _assert_passes(report: ParityReport) -> None:
    assert report.passed, report.summary()
    assert [layer.name for layer in report.layers] == list(reference.LAYERS)
    n, h, w = report.input_shape[:3]
    for layer in report.layers:  # a heat map per layer and mode, over the image (glbStd: one value per image)
        shape = (n, 1, 1) if layer.name == "glbStd" else (n, h, w)
        assert {mode: m.shape for mode, m in layer.diff_maps.items()} == dict.fromkeys(report.modes, shape)


@pytest.mark.parametrize("release", sorted(RELEASES))
@settings(max_examples=examples(3))
@given(seed=weight_seeds(), image=images(DRAWN_PIXELS))
def test_release_on_drawn_images(weights: WeightStore, release: int, seed: int, image: ImageRecipe) -> None:
    w = weights.get(release, seed)
    _assert_passes(compare_layers(w.reference, w.model, image.build(), oracle=w.oracle))


@needs_samples
@pytest.mark.parametrize(
    ("release", "name", "height", "width"),
    [(4, "forged/I35_c5vuwc7_0.jpg", 96, 96), (0, "forged/I61_d6t11na_0.png", 64, 80)],
)
def test_release_on_real_crops(weights: WeightStore, release: int, name: str, height: int, width: int) -> None:
    w = weights.get(release, 1)
    _assert_passes(compare_layers(w.reference, w.model, real_crop(name, height, width), oracle=w.oracle))


@needs_samples
@needs_seed_port
def test_trained_anomaly_detector_in_both_frameworks(weights: WeightStore, tmp_path) -> None:
    # The earlier port's trained detector (Ptrain4's, converted by that port's author), imported through
    # converter.legacy into PyTorch, and through torch_to_keras and an official-layout file into the
    # reference; the feature extractor is synthetic (no trained one is at hand).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EarlierPortWarning)  # the import notes its BatchNorm approximation
        detector, port = load_earlier_port(SEED_PORT_DETECTOR)
    assert port.parts == ("detector",)
    synthetic = weights.get(4, 0).model
    state = {**{k: v for k, v in synthetic.state_dict().items() if k.startswith("featex.")}, **detector}
    model = ManTraNet(RELEASES[4])
    model.load_state_dict(state, strict=True)
    path = tmp_path / "ManTraNet_Ptrain4.h5"
    write_official_h5(path, torch_to_keras(state), RELEASES[4])
    ref = reference.load(path)
    x = real_crop("forged/I02_dm545yj_0.jpg", 64, 64)
    report = compare_layers(ref, model.eval(), x, oracle=Oracle(ref.arrays, ref.config))
    _assert_passes(report)
    # The import's bnorm (moving mean 0, variance 0) scales features by 1/sqrt(1e-3) without centring them:
    # the reference's float32 integral images then drift, and the float64 value says so.
    nested = report.layer("nestedAvgFeatex").local_attribution
    assert nested.further_from_exact == "reference", nested
