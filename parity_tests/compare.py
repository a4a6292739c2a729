"""One layer's output from two implementations, compared element by element.

Layouts are aligned first: PyTorch's NCHW (or N,T,C,H,W) becomes Keras' NHWC (N,T,H,W,C). Then, in this
order: shapes, the NaN/Inf masks (positions where the two disagree on being finite are reported before
any number, as their difference is not a number), then absolute and relative error statistics over the
elements finite on both sides. An element fails only if its difference is over BOTH ``atol`` and
``rtol * |reference|`` (Polygraphy's rule), so ``rtol = 0`` means a pure absolute tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

MAX_LISTED_POSITIONS = 10  # NaN/Inf positions listed in a report; the count covers all of them
PERCENTILE = 99.0

# Axis names of the NHWC layouts; the 5-D one is the nested window deviations (N, T, H, W, C).
AXES = {4: ("batch", "row", "col", "channel"), 5: ("batch", "time", "row", "col", "channel")}


def to_nhwc(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A PyTorch layer output (NCHW, or N,T,C,H,W) as a NumPy array in the Keras layout, dtype kept."""
    if isinstance(value, np.ndarray):
        raise TypeError("to_nhwc takes PyTorch outputs; NumPy arrays here are already NHWC")
    a = value.detach().cpu().numpy()
    if a.ndim == 5:
        return a.transpose(0, 1, 3, 4, 2)
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1)
    raise ValueError(f"expected a 4-D or 5-D layer output, got shape {tuple(a.shape)}")


def from_nhwc(value: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of ``to_nhwc``: a Keras-layout array as a contiguous PyTorch tensor."""
    if value.ndim == 5:
        value = value.transpose(0, 1, 4, 2, 3)
    elif value.ndim == 4:
        value = value.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"expected a 4-D or 5-D layer input, got shape {tuple(value.shape)}")
    return torch.from_numpy(np.ascontiguousarray(value)).to(dtype)


def named_index(index: tuple[int, ...]) -> dict[str, int]:
    """An NHWC index as {batch, [time,] row, col, channel}."""
    names = AXES.get(len(index), tuple(f"axis{i}" for i in range(len(index))))
    return {name: int(i) for name, i in zip(names, index, strict=True)}


def _format_index(index: dict[str, int] | None) -> str:
    if index is None:
        return "-"
    return "(" + ", ".join(f"{k} {v}" for k, v in index.items()) + ")"


@dataclass
class Comparison:
    """How far ``actual`` is from ``expected`` on one layer. Every field is plain JSON.

    Relative errors are ``|actual - expected| / |expected|`` over the elements where ``expected`` is
    non-zero (an error at an exact zero shows in the absolute numbers). ``min_atol``: the smallest
    ``atol`` that would pass against ``expected`` with this ``rtol``. ``worst_index``: where the absolute
    error is largest. ``reference_drift``: elements over tolerance against ``expected`` that pass because
    they are within tolerance of the float64 value (``expected`` drifted there, not ``actual``).
    ``atol_max``: the largest tolerance applied where it varies by element (``atol`` is the smallest).
    """

    layer: str
    shape: list[int]
    atol: float
    rtol: float
    passed: bool
    shape_mismatch: str | None = None
    nonfinite_mismatches: int = 0
    nonfinite_positions: list[dict[str, int]] = field(default_factory=list)
    max_abs: float = 0.0
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    max_rel: float = 0.0
    mean_rel: float = 0.0
    p99_rel: float = 0.0
    worst_index: dict[str, int] | None = None
    worst_expected: float | None = None
    worst_actual: float | None = None
    scale: float = 0.0  # max |expected|, to read errors against the layer's magnitude
    fraction_over: float = 0.0
    min_atol: float = 0.0
    reference_drift: int = 0
    atol_max: float | None = None

    def message(self, expected_name: str = "reference", actual_name: str = "torch") -> str:
        """The one-line verdict; for a failure it names the layer, shape, errors and worst element."""
        shape = "x".join(str(s) for s in self.shape)
        if self.shape_mismatch is not None:
            return f"{self.layer}: shape mismatch, {self.shape_mismatch}"
        head = f"{self.layer} {shape}: {'ok' if self.passed else 'FAILED'}"
        if self.nonfinite_mismatches:
            where = ", ".join(_format_index(p) for p in self.nonfinite_positions)
            head += f", NaN/Inf differ at {self.nonfinite_mismatches} positions, first {where}"
        return (
            f"{head}, max abs error {self.max_abs:.3g} (atol {self.atol:.3g}{_upto(self.atol_max)}), "
            f"max rel error {self.max_rel:.3g} "
            f"(rtol {self.rtol:.3g}), worst at {_format_index(self.worst_index)} "
            f"({expected_name} {_fmt(self.worst_expected)}, {actual_name} {_fmt(self.worst_actual)}), "
            f"{self.fraction_over:.3%} of elements over tolerance, min passing atol {self.min_atol:.3g}"
            + (f", {self.reference_drift} more within tolerance of float64" if self.reference_drift else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _upto(atol_max: float | None) -> str:
    return "" if atol_max is None else f" up to {atol_max:.3g} where inherited error is amplified"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.7g}"


def _over(diff: np.ndarray, ref: np.ndarray, atol: float | np.ndarray, rtol: float) -> np.ndarray:
    return (diff > atol) & (diff > rtol * ref)


def compare_arrays(
    layer: str,
    expected: np.ndarray,
    actual: np.ndarray,
    atol: float | np.ndarray,
    rtol: float,
    exact: np.ndarray | None = None,
) -> Comparison:
    """Compare ``actual`` with ``expected`` (both NHWC), statistics in float64.

    ``atol``: one number, or an array broadcastable to the layer's shape (a tolerance per element).
    ``exact``: the float64 value, where known. An element over tolerance against ``expected`` but within
    it of ``exact`` passes and is counted in ``reference_drift``; the statistics stay those against
    ``expected``.
    """
    expected, actual = np.asarray(expected), np.asarray(actual)
    atol_min, atol_max = float(np.min(atol)), float(np.max(atol))
    if expected.shape != actual.shape:
        return Comparison(
            layer,
            list(expected.shape),
            atol_min,
            rtol,
            passed=False,
            shape_mismatch=f"expected {tuple(expected.shape)}, got {tuple(actual.shape)}",
        )
    result = Comparison(layer, list(expected.shape), atol_min, rtol, passed=True)
    if atol_max > atol_min:
        result.atol_max = atol_max
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), expected.shape)
    finite_e, finite_a = np.isfinite(expected), np.isfinite(actual)
    # Non-finite on either side: the two must hold the very same value (NaN with NaN, +Inf with +Inf).
    same_nonfinite = ~finite_e & ~finite_a & ((expected == actual) | (np.isnan(expected) & np.isnan(actual)))
    mismatch = (finite_e != finite_a) | (~finite_e & ~finite_a & ~same_nonfinite)
    result.nonfinite_mismatches = int(mismatch.sum())
    result.nonfinite_positions = [named_index(tuple(i)) for i in np.argwhere(mismatch)[:MAX_LISTED_POSITIONS]]
    both = finite_e & finite_a
    all_finite = bool(both.all())

    def finite64(a: np.ndarray) -> np.ndarray:
        """``a`` in float64, zero wherever either side is not finite (copied only when some element is not)."""
        a = np.asarray(a, dtype=np.float64)
        return a if all_finite else np.where(both, a, 0.0)

    over_count = 0
    if both.any():
        # Whole arrays rather than boolean selections: a layer can hold tens of millions of elements.
        e, a = finite64(expected), finite64(actual)
        diff = np.abs(a - e)
        ref = np.abs(e)
        over = _over(diff, ref, atol, rtol)
        if exact is not None:
            exact = finite64(exact)
            drifted = over & ~_over(np.abs(a - exact), np.abs(exact), atol, rtol)
            result.reference_drift = int(drifted.sum())
            over &= ~drifted
        worst_index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
        counted = diff if all_finite else diff[both]
        nonzero = ref > 0
        rel = diff[nonzero] / ref[nonzero]
        result.max_abs = float(counted.max())
        result.mean_abs = float(counted.mean())
        result.p99_abs = float(np.percentile(counted, PERCENTILE))
        if rel.size:
            result.max_rel = float(rel.max())
            result.mean_rel = float(rel.mean())
            result.p99_rel = float(np.percentile(rel, PERCENTILE))
        result.worst_index = named_index(worst_index)
        result.worst_expected = float(expected[worst_index])
        result.worst_actual = float(actual[worst_index])
        result.scale = float(ref.max())
        over_count = int(over.sum())
        # Elements within rtol pass at any atol; the others need atol >= their difference.
        beyond_rtol = diff > rtol * ref
        result.min_atol = float(diff[beyond_rtol].max()) if beyond_rtol.any() else 0.0
    failing = over_count + result.nonfinite_mismatches
    result.fraction_over = failing / expected.size if expected.size else 0.0
    result.passed = failing == 0
    return result
