"""The parity engine itself: element comparison, the tolerance policy, and the report's structure.

Each check uses arrays built by hand, so the expected statistics are known exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mantranet_torch import LAYERS
from parity_tests.compare import compare_arrays, from_nhwc, named_index, to_nhwc
from parity_tests.runner import INPUT, LAYER_INPUTS, LayerResult, ParityReport, diff_map
from parity_tests.tolerances import (
    CLSTM_GAIN,
    CUMULATIVE,
    INPUT_SCALED,
    LOCAL,
    POLICY,
    PRED_GAIN,
    Tolerance,
    TolerancePolicy,
)


def test_layouts_torch_to_keras_and_back() -> None:
    nchw = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    nhwc = to_nhwc(nchw)
    assert nhwc.shape == (2, 4, 5, 3) and nhwc[1, 2, 3, 0] == nchw[1, 0, 2, 3]
    ntchw = torch.arange(2 * 4 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 4, 3, 5, 6)
    nthwc = to_nhwc(ntchw)
    assert nthwc.shape == (2, 4, 5, 6, 3) and nthwc[1, 3, 4, 5, 2] == ntchw[1, 3, 2, 4, 5]
    torch.testing.assert_close(from_nhwc(nhwc), nchw, rtol=0, atol=0)
    torch.testing.assert_close(from_nhwc(nthwc), ntchw, rtol=0, atol=0)
    assert named_index((1, 2, 3, 4)) == {"batch": 1, "row": 2, "col": 3, "channel": 4}
    assert named_index((1, 2, 3, 4, 5)) == {"batch": 1, "time": 2, "row": 3, "col": 4, "channel": 5}


def test_statistics_and_worst_element() -> None:
    expected = np.ones((2, 10, 10, 5), dtype=np.float32)
    actual = expected.copy()
    actual[1, 7, 3, 2] += 3e-4  # the worst element
    actual[0, 0, 0, 0] += 2e-5  # over atol 1e-5 and over rtol 1e-5 * 1 as well
    c = compare_arrays("b3c1", expected, actual, atol=1e-5, rtol=1e-5)
    assert not c.passed
    assert c.max_abs == pytest.approx(3e-4, rel=1e-3)  # float32 steps near 1 are 1.2e-7
    assert c.max_rel == pytest.approx(3e-4, rel=1e-3)  # |ref| = 1
    assert c.worst_index == {"batch": 1, "row": 7, "col": 3, "channel": 2}
    assert c.worst_expected == 1.0 and c.worst_actual == pytest.approx(1.0003, rel=1e-6)
    assert c.fraction_over == pytest.approx(2 / expected.size)
    assert c.mean_abs == pytest.approx((3e-4 + 2e-5) / expected.size, rel=1e-3)
    assert c.min_atol == pytest.approx(3e-4, rel=1e-3)  # the atol that would pass every element
    message = c.message()
    for part in ("b3c1", "2x10x10x5", "FAILED", "max abs error 0.0003", "max rel error 0.0003"):
        assert part in message, message
    assert "(batch 1, row 7, col 3, channel 2)" in message


def test_percentile_of_a_known_distribution() -> None:
    expected = np.zeros((1, 1, 1000, 1))
    actual = np.arange(1000, dtype=np.float64).reshape(1, 1, 1000, 1) * 1e-6
    c = compare_arrays("pred", expected, actual, atol=1.0, rtol=0.0)
    assert c.passed and c.max_abs == pytest.approx(999e-6)
    assert c.p99_abs == pytest.approx(989.01e-6)  # linear interpolation between the 990th and 991st values
    assert c.max_rel == 0.0  # every expected value is zero: relative error is not defined there


def test_an_element_fails_only_over_both_atol_and_rtol() -> None:
    # Polygraphy's rule: a difference of 5e-5 passes on a value of 10 (rtol 1e-5 allows 1e-4) and fails on 1.
    expected = np.array([10.0, 1.0]).reshape(1, 1, 2, 1)
    actual = expected + 5e-5
    c = compare_arrays("divStd", expected, actual, atol=1e-5, rtol=1e-5)
    assert not c.passed and c.fraction_over == 0.5
    assert c.min_atol == pytest.approx(5e-5)  # the element within rtol needs no atol
    assert compare_arrays("divStd", expected[:, :, :1], actual[:, :, :1], atol=1e-5, rtol=1e-5).passed
    assert not compare_arrays("divStd", expected[:, :, :1], actual[:, :, :1], atol=1e-5, rtol=0.0).passed


def test_per_element_tolerance() -> None:
    expected = np.zeros((1, 1, 2, 1))
    actual = np.array([2e-5, 2e-5]).reshape(1, 1, 2, 1)
    atol = np.array([1e-5, 1e-4]).reshape(1, 1, 2, 1)
    c = compare_arrays("cLSTM", expected, actual, atol=atol, rtol=0.0)
    assert c.fraction_over == 0.5 and c.atol == 1e-5 and c.atol_max == 1e-4
    assert "up to 0.0001" in c.message()


def test_nonfinite_masks_are_compared_before_numbers() -> None:
    expected = np.zeros((1, 2, 2, 2))
    actual = np.zeros((1, 2, 2, 2))
    expected[0, 0, 0, 0] = actual[0, 0, 0, 0] = np.nan  # NaN on both sides: agreement
    expected[0, 1, 1, 1] = actual[0, 1, 1, 1] = np.inf
    assert compare_arrays("L2", expected, actual, atol=0.0, rtol=0.0).passed
    actual[0, 1, 0, 1] = np.nan  # NaN on one side only
    actual[0, 1, 1, 1] = -np.inf  # infinities of opposite sign
    c = compare_arrays("L2", expected, actual, atol=0.0, rtol=0.0)
    assert not c.passed and c.nonfinite_mismatches == 2
    assert c.nonfinite_positions == [
        {"batch": 0, "row": 1, "col": 0, "channel": 1},
        {"batch": 0, "row": 1, "col": 1, "channel": 1},
    ]
    assert c.max_abs == 0.0  # the finite elements agree
    assert c.message().index("NaN/Inf differ") < c.message().index("max abs error")


def test_shape_mismatch_fails_with_both_shapes() -> None:
    c = compare_arrays("glbStd", np.zeros((1, 1, 1, 64)), np.zeros((1, 64, 1, 1)), atol=1e-5, rtol=0.0)
    assert not c.passed
    assert c.message() == "glbStd: shape mismatch, expected (1, 1, 1, 64), got (1, 64, 1, 1)"


def test_float64_value_arbitrates_a_drifted_reference() -> None:
    exact = np.zeros((1, 1, 4, 1))
    reference = exact + np.array([0.0, 5e-5, 0.0, 5e-5]).reshape(1, 1, 4, 1)  # drifted on two elements
    actual = exact + np.array([0.0, 0.0, 0.0, 4e-5]).reshape(1, 1, 4, 1)
    c = compare_arrays("nestedAvgFeatex", reference, actual, atol=1e-5, rtol=0.0, exact=exact)
    # Element 1: off the reference, exact itself: passes (drift). Element 3: 1e-5 off the reference: passes.
    assert c.passed and c.reference_drift == 1
    assert c.max_abs == pytest.approx(5e-5)  # the statistics stay those against the reference
    actual[0, 0, 1, 0] = 3e-5  # off both the reference and the exact value: fails
    assert not compare_arrays("nestedAvgFeatex", reference, actual, atol=1e-5, rtol=0.0, exact=exact).passed


def test_policy_covers_every_layer_and_mode() -> None:
    for layer in LAYERS:
        local, cumulative = POLICY.get(layer, LOCAL), POLICY.get(layer, CUMULATIVE)
        assert 0 < local.atol <= cumulative.atol <= 1e-3, layer  # inherited error never makes it tighter
    assert POLICY.to_dict()[CUMULATIVE]["divStd"]["propagated"] and not POLICY.to_dict()[LOCAL]["divStd"]["propagated"]
    with pytest.raises(ValueError, match="unknown mode"):
        POLICY.get("b1c1", "sideways")
    assert TolerancePolicy.uniform(1e-3, 0.0).get("pred", LOCAL) == Tolerance(1e-3, 0.0)
    assert set(POLICY.to_dict()[LOCAL]) == set(LAYERS)


def test_inherited_tolerance_follows_the_detector() -> None:
    policy = TolerancePolicy(default=Tolerance(1e-5, 0.0))
    arrays = {"bnorm/bnorm/moving_variance:0": np.array([0.099, 0.0])}  # gains 1/sqrt(0.1) and 1/sqrt(1e-3)
    sigma = np.array([0.1, 1e-6]).reshape(1, 1, 1, 2)  # the second channel is flat: std clamped
    div = np.array([2.0, 0.0]).reshape(1, 1, 1, 1, 2) * np.ones((1, 2, 3, 3, 2))
    trace = {"glbStd": sigma, "divStd": div, "cLSTM": np.zeros((1, 3, 3, 8))}
    bnorm = 1e-5 + 1e-5 / np.sqrt([0.1, 1e-3])  # its own plus outlierTrans's times the gain
    np.testing.assert_allclose(policy.atol("bnorm", CUMULATIVE, trace, arrays), bnorm)
    np.testing.assert_allclose(policy.atol("glbStd", CUMULATIVE, trace, arrays), 1e-5 + bnorm)
    nested = 1e-5 + 2 * bnorm
    divstd = policy.atol("divStd", CUMULATIVE, trace, arrays)
    assert divstd.shape == (1, 2, 3, 3, 2)
    np.testing.assert_allclose(divstd[0, 1, 2, 2], 1e-5 + (nested + np.abs([2.0, 0.0]) * (1e-5 + bnorm)) / [0.1, 1e-6])
    clstm = policy.atol("cLSTM", CUMULATIVE, trace, arrays)
    channel_max = divstd.max(axis=(0, 1, 2, 3))  # this image's largest bound in each channel
    np.testing.assert_allclose(clstm, 1e-5 + CLSTM_GAIN * channel_max.mean())
    np.testing.assert_allclose(policy.atol("pred", CUMULATIVE, trace, arrays), 1e-5 + PRED_GAIN * clstm.max())
    assert policy.atol("divStd", LOCAL, trace, arrays) == 1e-5  # a layer fed the same inputs inherits nothing


def test_conv_lstm_tolerance_grows_with_its_input() -> None:
    policy = TolerancePolicy(local={"cLSTM": Tolerance(4e-5)})
    div = np.ones((2, 4, 3, 3, 64))
    div[0, 1, 2, 2, 5] = 2 * INPUT_SCALED["cLSTM"][1]  # image 0 holds an input twice the covered magnitude
    np.testing.assert_allclose(policy.atol("cLSTM", LOCAL, {"divStd": div}).ravel(), [8e-5, 4e-5])


def test_diff_maps_take_the_largest_over_channels_and_steps() -> None:
    expected = np.zeros((2, 3, 4, 5, 6))  # N, T, H, W, C
    actual = expected.copy()
    actual[1, 2, 3, 4, 5] = -0.5
    actual[1, 0, 3, 4, 0] = 0.25
    actual[0, 1, 0, 0, 2] = np.nan
    heat = diff_map(expected, actual)
    assert heat.shape == (2, 4, 5) and heat.dtype == np.float32
    assert heat[1, 3, 4] == 0.5 and np.isnan(heat[0, 0, 0])
    assert np.nansum(heat) == 0.5
    assert np.isnan(diff_map(np.zeros((1, 4, 5, 2)), np.zeros((1, 2, 4, 5)))).all()


def test_layer_inputs_form_the_network() -> None:
    assert list(LAYER_INPUTS) == list(LAYERS)
    for layer, sources in LAYER_INPUTS.items():
        assert all(s == INPUT or LAYERS.index(s) < LAYERS.index(layer) for s in sources), layer
    assert LAYER_INPUTS["divStd"] == ("nestedAvgFeatex", "glbStd") and LAYER_INPUTS["glbStd"] == ("bnorm",)


def test_report_is_plain_json_with_the_stable_keys() -> None:
    ok = compare_arrays("b1c1", np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)), 1e-5, 0.0)
    bad = compare_arrays("b1c2", np.zeros((1, 2, 2, 1)), np.ones((1, 2, 2, 1)), 1e-5, 0.0)
    layers = [LayerResult("b1c1", ok, ok), LayerResult("b1c2", ok, bad), LayerResult("b2c1", bad, bad)]
    report = ParityReport([1, 2, 2, 3], [CUMULATIVE, LOCAL], False, layers)
    assert not report.passed
    assert report.first_divergent_layer == "b1c2"
    assert report.first_divergent(CUMULATIVE) == "b2c1" and report.first_divergent(LOCAL) == "b1c2"
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["first_divergent_layer"] == "b1c2"
    assert [layer["name"] for layer in data["layers"]] == ["b1c1", "b1c2", "b2c1"]
    for key in ("name", "passed", "max_abs", "max_rel", "worst_index", "cumulative", "local", "attribution"):
        assert key in data["layers"][0], key
    assert data["layers"][2]["max_abs"] == 1.0 and data["layers"][2]["worst_index"]["batch"] == 0
    assert report.failures()[0].startswith("[local] b1c2 1x2x2x1: FAILED")
    # growth: each layer's cumulative max error over the previous layer's (none after an error of 0)
    assert [layer.growth for layer in report.layers] == [None, None, None]
    small = compare_arrays("b2c1", np.zeros((1, 1, 1, 1)), np.full((1, 1, 1, 1), 0.25), 1e-5, 0.0)
    grown = ParityReport([1, 1, 1, 3], [CUMULATIVE], False, [LayerResult("b1c2", small), LayerResult("b2c1", bad)])
    assert [layer.growth for layer in grown.layers] == [None, 4.0]
