"""``parity_tests.run_parity``, the Python call behind ``mantranet parity``: the same report as the command, images
given as arrays, progress events in order, bad input as ``ParityInputError`` before any comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converter import synthetic_keras_weights, write_official_h5
from mantranet_cli.main import main
from mantranet_torch import LAYERS, RELEASES
from parity_tests import ParityInputError, ParityRun, run_parity
from parity_tests.api import DONE, IMAGE, LAYER, START, TRACED
from parity_tests.builtin_images import builtin_images

SIZE = 20  # every layer in both modes in about a second


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api") / "ManTraNet_Ptrain4.h5"
    write_official_h5(path, synthetic_keras_weights(RELEASES[4], 3), RELEASES[4])
    return path


def _without_timing(report: dict) -> dict:
    for image in report["images"]:
        image.pop("seconds")
    return report


def test_the_function_returns_the_report_the_command_writes(h5, tmp_path, capsys) -> None:
    pixels = builtin_images(SIZE)[4].pixels  # the checkerboard
    png = tmp_path / "checker.png"
    Image.fromarray(pixels).save(png)
    events = []
    run = run_parity(h5, [pixels], progress=events.append)
    assert isinstance(run, ParityRun) and run.passed and run.first_divergent_layer is None
    assert [layer.name for layer in run.images[0].report.layers] == list(LAYERS)

    # Events: the run's start, then the image, its trace, each layer of each mode, its end.
    kinds = [e.kind for e in events]
    assert kinds == [START, IMAGE, TRACED, *[LAYER] * (2 * len(LAYERS)), DONE]
    assert [e.layer for e in events if e.kind == LAYER] == list(LAYERS) * 2
    assert events[0].count == 1 and events[1].index == 1

    assert main(["parity", str(h5), str(png), "--json", str(tmp_path / "cli.json")]) == 0
    capsys.readouterr()
    from_cli = _without_timing(json.loads((tmp_path / "cli.json").read_text()))
    from_api = _without_timing(json.loads(run.to_json()))
    # The same numbers from the array as from its PNG file; only the image's name and source differ.
    for report in (from_cli, from_api):
        for image in report["images"]:
            image.pop("name"), image.pop("source")
        report.pop("failing_images")
        for layer in report["layers"]:
            for mode in ("cumulative", "local"):
                layer[mode].pop("worst_image"), layer[mode]["worst_index"].pop("image")
            layer.pop("worst_image"), layer["worst_index"].pop("image")
    assert from_api == from_cli


def test_bad_input_raises_before_any_comparison(h5, tmp_path) -> None:
    events = []
    cases = [
        ({"images": [np.zeros((4, 4), np.uint8)]}, "image 1: expected an H x W x 3 uint8 RGB array"),
        ({"images": [tmp_path / "absent.png"]}, "absent.png"),
        ({"crop": "wide"}, "--crop wide"),
        ({"atol": float("nan")}, "--atol nan"),
        ({"modes": ["sideways"]}, "modes"),
        ({"torch_weights": [tmp_path / "absent.pt"]}, "absent.pt: no such file"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(ParityInputError, match=None) as caught:
            run_parity(h5, **{"images": [np.zeros((8, 8, 3), np.uint8)], **kwargs, "progress": events.append})
        assert expected in str(caught.value), (kwargs, caught.value)
    with pytest.raises(ParityInputError, match="missing.h5"):
        run_parity(tmp_path / "missing.h5")
    assert events == []


def test_reference_drift_is_explained_not_failed() -> None:
    # A layer whose elements over tolerance against the reference are within it of the float64 value passes, and
    # the table says why, naming the official code when it is the reference.
    from parity_tests.compare import compare_arrays
    from parity_tests.report import Attributed, ImageParity, image_table
    from parity_tests.runner import LayerResult, ParityReport

    expected = np.zeros((1, 2, 2, 1))
    exact = np.full_like(expected, 1e-3)  # the reference drifted 1e-3 from the exact value ...
    actual = exact.copy()  # ... where the compared side sits
    drifted = compare_arrays("nestedAvgFeatex", expected, actual, 1e-5, 0.0, exact)
    assert drifted.passed and drifted.reference_drift == 4
    layers = [LayerResult(name, local=drifted if name == "nestedAvgFeatex" else None) for name in LAYERS]
    report = ParityReport([1, 2, 2, 3], ["local"], True, layers)
    image = ImageParity("x", "array", 2, 2, [], Attributed(list(LAYERS), ["local"], "test"), report, 0.0)
    table = image_table(image, "official")
    assert report.passed
    assert "explained: nestedAvgFeatex: 4 in local mode over tolerance against the official code" in table
    assert "integral images" in table


def test_any_side_is_a_candidate(h5) -> None:
    # Our TensorFlow reference compared with itself through the Side protocol (as an exported graph's runtime
    # would be): every layer identical, so the comparison is exact (max abs 0) and passes.
    import reference
    from parity_tests.sides import ReferenceSide

    side = ReferenceSide(reference.load(h5))
    run = run_parity(h5, [builtin_images(SIZE)[0].pixels], candidate=side, modes=["local"])
    assert run.passed and run.torch["description"] == "ReferenceSide"
    assert all(layer.local.max_abs == 0 for layer in run.images[0].report.layers)
    with pytest.raises(ParityInputError, match="neither FILE.py:FACTORY, an nn.Module nor a Side"):
        run_parity(h5, [builtin_images(SIZE)[0].pixels], candidate=42)


def test_nothing_compared_is_not_a_pass(h5) -> None:
    # A side with no layer in the modes run (a graph with no local mode, run with local mode only) proves nothing.
    class CumulativeOnly:
        def __init__(self, inner) -> None:
            self.inner = inner

        def stages(self, x):
            return self.inner.stages(x)

        def layer(self, name, *inputs):
            return None

    import reference
    from parity_tests.report import verdict
    from parity_tests.sides import ReferenceSide

    side = CumulativeOnly(ReferenceSide(reference.load(h5)))
    run = run_parity(h5, [builtin_images(SIZE)[0].pixels], candidate=side, modes=["local"])
    assert not run.passed and run.first_divergent_layer is None
    assert verdict(run).startswith("FAILED: no layer compared on 1 image")
