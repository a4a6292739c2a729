"""THE tolerance policy of every parity comparison: one float32 tolerance per layer and mode.

Two modes. ``local``: each PyTorch layer is fed the reference's own input to that layer, so the error is
the layer's own. ``cumulative``: each framework runs on its own previous outputs, so a layer also carries
every earlier layer's error, amplified or damped by what it computes.

An element fails only if its difference is over both ``atol`` and ``rtol * |expected|`` (Polygraphy's
rule). Where the float64 oracle was evaluated, an element over tolerance against the reference still
passes if it is within the same tolerance of the exact value: the reference drifted there, not the port
(the official float32 integral images drift as images grow: ``test_float64_attribution.py``).

Measured worst cases (``python -m parity_tests.measure_tolerances``: all five releases, synthetic weights
through official-layout files, six image kinds including flat, near-flat and full-amplitude
checkerboards, 1x1 to 70x64, batches of 1-3) are quoted as "torch-ref" (PyTorch against the reference)
and "f64" (the larger of either framework against float64). Tolerances leave about 2x over the larger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mantranet_torch import LAYERS

LOCAL, CUMULATIVE = "local", "cumulative"
MODES = (CUMULATIVE, LOCAL)

DEFAULT_ATOL = 1e-5  # a single float32 layer whose outputs are of order 1
DEFAULT_RTOL = 1e-5  # judges the few large outputs (divStd up to ~1e6 on flat channels) relatively


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = DEFAULT_RTOL


# fmt: off
LOCAL_ATOL: dict[str, float] = {
    # b1c1 .. b3c1 (up to 576-term float32 sums): torch-ref <= 5.3e-6, f64 <= 6.7e-6: the default.
    # Deeper Featex layers sum 1152 or 2304 products of activations up to ~10 (checkerboards give the
    # largest): each framework is off float64 by a few ulps of the partial sums. The two agree better than
    # that (bit for bit on some machines, where both run the same oneDNN kernel), but need not elsewhere.
    **dict.fromkeys(("b3c2", "b3c3", "b4c1"), 3e-5),                       # f64 1.5e-5, torch-ref 8.6e-6
    **dict.fromkeys(("b4c2", "b4c3", "b5c1", "b5c2", "transform"), 6e-5),  # f64 3.1e-5
    # L2, outlierTrans, bnorm, divStd, pred: f64 <= 1.8e-6, the default.
    # glbStd, nestedAvgFeatex: PyTorch is within 1.5e-8 and 5.7e-8 of float64 (it sums in float64); the
    # reference's float32 std and integral images are off by up to 1.2e-5 and 1.1e-4 (flat 70 x 64 input),
    # arbitrated by the float64 value: the default.
    # cLSTM: four steps of 7x7x64 and 7x7x8 convolutions on divStd values up to ~50, summed in different
    # orders by the two frameworks: torch-ref 7.1e-6, f64 7.4e-6 (synthetic weights); with the trained
    # detector (AnomalyDetectorv4.pt) on a real 96 x 96 crop, torch-ref 1.6e-5, f64 1.2e-5. The rounding
    # grows with the summed terms: scaled up for inputs beyond INPUT_SCALED's magnitude (below).
    "cLSTM": 4e-5,
    # cGRU (the ConvGRU variant, no official file): the same 7x7x64 input and 7x7x8 state convolutions, four
    # or five steps; on synthetic weights and divStd-like inputs up to ~135, scaled to inputs of 50 as below:
    # torch-ref 3.8e-5, f64 3.3e-5 (the cLSTM measured the same way: 6.1e-5 and 6.1e-5).
    "cGRU": 8e-5,
}
CUMULATIVE_ATOL: dict[str, float] = {
    # Featex: each layer adds its own rounding to what it inherits: b1c1 .. b2c1 f64 <= 3.6e-6 (default).
    **dict.fromkeys(("b2c2", "b3c1"), 2e-5),                               # f64 7.6e-6
    **dict.fromkeys(("b3c2", "b3c3", "b4c1"), 4e-5),                       # f64 1.8e-5
    **dict.fromkeys(("b4c2", "b4c3", "b5c1", "b5c2", "transform"), 8e-5),  # f64 4.1e-5, torch-ref 3.6e-5
    # L2 divides by norms of ~10-50: its inherited error falls back to 9e-7; outlierTrans 8.9e-7 (default).
    # The detector's layers from bnorm on are PROPAGATED (below): their local tolerance plus what they inherit.
}
# fmt: on


# Layers whose float32 rounding grows with their input: (input layer, largest input magnitude the atol is
# for). Beyond it the atol grows in proportion, per image: drawn cLSTM inputs up to ~120 gave torch-ref
# 4.3e-5, f64 3.5e-5 (a flat channel's divStd can reach 1e6).
INPUT_SCALED: dict[str, tuple[str, float]] = {"cLSTM": ("divStd", 50.0), "cGRU": ("divStd", 50.0)}

BN_EPSILON = 1e-3  # the official BatchNormalization's epsilon, for bnorm's gain below

# Cumulative mode in the detector: the error a layer inherits is amplified by factors that depend on the
# weights and the image, without bound. bnorm multiplies its input by 1/sqrt(moving_variance + 1e-3) (up to
# 31.6 for a variance of 0); divStd divides deviations by each channel's std, clamped at 1e-6 + min_std, so a
# flat image turns float32 rounding of 1e-7 into divStd errors of 0.1 in either framework, and the float64
# value cannot arbitrate (it has no rounding to amplify). So from bnorm on, a layer's cumulative tolerance is
# its local one plus a first-order bound on the error it inherits, per element:
#   bnorm            gain_c * outlierTrans's            gain_c = 1 / sqrt(moving_variance_c + 1e-3)
#   glbStd           bnorm's                            a population std moves at most as much as its values
#   nestedAvgFeatex  2 * bnorm's                        a mean minus a value
#   divStd           (nestedAvgFeatex's + |divStd| * glbStd's) / std_c
#   cLSTM, pred      GAIN * the previous layer's, per image: its largest in each channel, averaged over channels
# The gains of the last two are the measured ratios of their error to the previous layer's, on flat, near-flat
# and random images (cLSTM up to 0.22 of divStd's, pred up to 0.37 of cLSTM's), with headroom. The channel
# average, not the maximum: a gate sums all 64 channels, and one flat channel's error enters it once, not 64
# times. These bounds are deliberately not tight (they are what the layer would show if its input were off
# by its whole tolerance); the local comparison is the tight check of each layer.
CLSTM_GAIN = 0.5
PRED_GAIN = 1.0
PROPAGATED = ("bnorm", "glbStd", "nestedAvgFeatex", "divStd", "cLSTM", "pred")


@dataclass(frozen=True)
class TolerancePolicy:
    """A tolerance for each (layer, mode); layers not listed take ``default``."""

    local: Mapping[str, Tolerance] = field(default_factory=dict)
    cumulative: Mapping[str, Tolerance] = field(default_factory=dict)
    default: Tolerance = Tolerance(DEFAULT_ATOL)

    def get(self, layer: str, mode: str) -> Tolerance:
        """The table's tolerance; for the PROPAGATED layers in cumulative mode, the local one (``atol`` adds
        the inherited bound)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")
        if mode == LOCAL or layer in PROPAGATED:
            return self.local.get(layer, self.default)
        return self.cumulative.get(layer, self.default)

    def atol(
        self,
        layer: str,
        mode: str,
        trace: Mapping[str, np.ndarray],
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> float | np.ndarray:
        """``layer``'s absolute tolerance: NHWC-broadcastable per image (INPUT_SCALED) or per element (the
        PROPAGATED layers in cumulative mode). ``trace``: the reference's outputs (in local mode, at least
        the layer's inputs); ``arrays``: its Keras weights (cumulative mode only)."""
        own = self._own(layer, mode, trace)
        if mode == LOCAL or layer not in PROPAGATED:
            return own
        return own + self._inherited(layer, trace, arrays)

    def _own(self, layer: str, mode: str, trace: Mapping[str, np.ndarray]) -> float | np.ndarray:
        atol = self.get(layer, mode).atol
        if layer not in INPUT_SCALED:
            return atol
        source, magnitude = INPUT_SCALED[layer]
        value = np.abs(np.asarray(trace[source], dtype=np.float64))
        per_image = value.reshape(value.shape[0], -1).max(axis=1, initial=0.0)
        return atol * np.maximum(1.0, per_image / magnitude)[:, None, None, None]

    def _inherited(
        self, layer: str, trace: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray] | None
    ) -> np.ndarray:
        def cumulative(source: str) -> float | np.ndarray:
            return self.atol(source, CUMULATIVE, trace, arrays)

        if layer == "bnorm":
            if arrays is None:
                raise ValueError("bnorm's cumulative tolerance needs the reference's weights (its moving variance)")
            gain = 1.0 / np.sqrt(np.asarray(arrays["bnorm/bnorm/moving_variance:0"], np.float64) + BN_EPSILON)
            return gain * cumulative("outlierTrans")  # (C,)
        if layer == "glbStd":
            return np.asarray(cumulative("bnorm"))
        if layer == "nestedAvgFeatex":
            return 2.0 * np.asarray(cumulative("bnorm"))
        if layer == "divStd":
            sigma = np.asarray(trace["glbStd"], np.float64)[:, None]  # (N, 1, 1, 1, C) against (N, T, H, W, C)
            return (cumulative("nestedAvgFeatex") + np.abs(trace["divStd"]) * cumulative("glbStd")) / sigma
        gain, source = (CLSTM_GAIN, "divStd") if layer == "cLSTM" else (PRED_GAIN, "cLSTM")
        bound = np.broadcast_to(cumulative(source), trace[source].shape)
        per_channel = bound.reshape(bound.shape[0], -1, bound.shape[-1]).max(axis=1)  # (N, C)
        return gain * per_channel.mean(axis=1)[:, None, None, None]  # one bound per image

    @classmethod
    def uniform(cls, atol: float, rtol: float) -> TolerancePolicy:
        """One tolerance for every layer and mode (a user's ``--atol``/``--rtol``)."""
        return cls(default=Tolerance(atol, rtol))

    def to_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The table as JSON: per mode and layer, atol, rtol and whether inherited error is added to atol."""
        return {
            mode: {
                layer: {**vars(self.get(layer, mode)), "propagated": mode == CUMULATIVE and layer in PROPAGATED}
                for layer in LAYERS
            }
            for mode in MODES
        }


POLICY = TolerancePolicy(
    local={name: Tolerance(atol) for name, atol in LOCAL_ATOL.items()},
    cumulative={name: Tolerance(atol) for name, atol in CUMULATIVE_ATOL.items()},
)
