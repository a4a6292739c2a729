"""A parity run over several images: its verdict, the JSON report and the terminal table.

Each image has its own ``ParityReport`` (``runner.run_parity``). Across images, a layer's numbers are the
worst over the images (largest errors, largest fraction over tolerance), with the image where the worst
occurred; the run passes when every layer passes in every image and mode, and its first divergent layer is
the earliest layer in network order that diverges in any image.

JSON (``ParityRun.to_json``; keys are only ever added within one ``schema`` version): ``schema``, ``passed``,
``first_divergent_layer`` (null when all pass), ``first_divergent`` {mode: layer or null}, ``failing_images``,
``modes``, ``layers`` (network order; ``name``, ``passed``, ``max_abs``, ``max_rel``, ``worst_index`` with its
``image``, ``worst_image``, ``failing_images``, ``growth`` and per mode the worst-over-images statistics),
``images`` (per image: name, source, size, notes, attribution, seconds and the engine's ``ParityReport.to_dict``),
``reference``, ``torch``, ``tolerance``, ``versions``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mantranet_torch import LAYERS

from .compare import Comparison
from .runner import LayerResult, ParityReport
from .tolerances import CUMULATIVE, LOCAL, MODES

SCHEMA = "mantranet-parity/1"
# Per-mode statistics carried into the run's layer list, each the worst over the images.
WORST_OF = ("max_abs", "p99_abs", "mean_abs", "max_rel", "p99_rel", "mean_rel", "fraction_over", "min_atol")
LISTED_FAILURES = 6  # failure messages printed per image; the JSON holds them all


@dataclass
class Attributed:
    """What the float64 oracle evaluated for one image."""

    layers: list[str]
    modes: list[str]
    reason: str

    def describe(self) -> str:
        which = "every layer" if list(self.layers) == list(LAYERS) else f"{self.layers[0]} .. {self.layers[-1]}"
        return f"{which}, {' and '.join(self.modes)} mode{'s' if len(self.modes) > 1 else ''} ({self.reason})"


@dataclass
class ImageParity:
    """One image's comparison: where it came from, what was done to it, and the engine's report."""

    name: str
    source: str  # the file as given, or "built-in: " and what the image is
    height: int
    width: int
    notes: list[str]
    attributed: Attributed
    report: ParityReport
    seconds: float
    pixels: np.ndarray | None = field(
        default=None, repr=False
    )  # the input (uint8 H x W x 3) for heat maps; not in JSON
    gradients: Any = None  # gradients.GradientReport, with --gradients / --train-steps

    @property
    def passed(self) -> bool:
        return self.report.passed and (self.gradients is None or self.gradients.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "height": self.height,
            "width": self.width,
            "notes": self.notes,
            "attribution": vars(self.attributed),
            "seconds": round(self.seconds, 3),
            **self.report.to_dict(),  # passed, first_divergent_layer, first_divergent, layers, ...
            "passed": self.passed,
            "gradients": None if self.gradients is None else self.gradients.to_dict(),
        }


@dataclass
class ParityRun:
    """Every image of one ``mantranet parity`` call, with what was compared under which tolerances."""

    reference: dict[str, Any]  # the HDF5 file, its release and config
    torch: dict[str, Any]  # the PyTorch weights: their source and notes
    tolerance: dict[str, Any]
    modes: list[str]
    images: list[ImageParity] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    shrunk: list[dict[str, Any]] = field(default_factory=list)  # minimal failing inputs found (--shrink)

    @property
    def passed(self) -> bool:
        return all(image.passed for image in self.images)

    def first_divergent(self, mode: str | None = None) -> str | None:
        found = {image.report.first_divergent(mode) for image in self.images} - {None}
        return next((name for name in LAYERS if name in found), None)

    @property
    def first_divergent_layer(self) -> str | None:
        return self.first_divergent()

    @property
    def first_divergent_gradient(self) -> dict[str, Any] | None:
        """The first image's first backward row over tolerance (``gradients.GradientReport``), with the image."""
        for image in self.images:
            if image.gradients is not None and image.gradients.first_divergent_gradient is not None:
                return {"image": image.name, **image.gradients.first_divergent_gradient}
        return None

    @property
    def first_divergent_step(self) -> dict[str, Any] | None:
        for image in self.images:
            if image.gradients is not None and image.gradients.first_divergent_step is not None:
                return {"image": image.name, **image.gradients.first_divergent_step}
        return None

    def failing_images(self) -> list[str]:
        return [image.name for image in self.images if not image.passed]

    def layer_summaries(self) -> list[dict[str, Any]]:
        """Each layer in network order, its numbers the worst over the images."""
        summaries, previous = [], None
        for name in LAYERS:
            results = [(image.name, image.report.layer(name)) for image in self.images]
            summary = _summarize(name, results, self.modes)
            cumulative = summary.get(CUMULATIVE)
            current = None if cumulative is None else cumulative["max_abs"]
            summary["growth"] = current / previous if current is not None and previous else None
            previous = current
            summaries.append(summary)
        return summaries

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "first_divergent_layer": self.first_divergent_layer,
            "first_divergent": {mode: self.first_divergent(mode) for mode in self.modes},
            "first_divergent_gradient": self.first_divergent_gradient,
            "first_divergent_step": self.first_divergent_step,
            "failing_images": self.failing_images(),
            "modes": self.modes,
            "layers": self.layer_summaries(),
            "images": [image.to_dict() for image in self.images],
            "reference": self.reference,
            "torch": self.torch,
            "tolerance": self.tolerance,
            "versions": self.versions,
            "shrunk": self.shrunk,
        }

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False) + "\n"


def _summarize(name: str, results: Sequence[tuple[str, LayerResult]], modes: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "name": name,
        "passed": all(result.passed for _, result in results),
        "failing_images": [image for image, result in results if not result.passed],
    }
    summary["unmapped"] = all(result.unmapped for _, result in results)
    for mode in MODES:
        per_image = [(image, result.comparisons[mode]) for image, result in results if mode in result.comparisons]
        if mode not in modes or not per_image:
            summary[mode] = None
            continue
        worst_image, worst = max(per_image, key=lambda item: item[1].max_abs)
        summary[mode] = {
            "passed": all(c.passed for _, c in per_image),
            "failing_images": [image for image, c in per_image if not c.passed],
            **{key: max(getattr(c, key) for _, c in per_image) for key in WORST_OF},
            "nonfinite_mismatches": sum(c.nonfinite_mismatches for _, c in per_image),
            "worst_image": worst_image,
            "worst_index": _with_image(worst.worst_index, worst_image),
            "shape_mismatch": next((c.shape_mismatch for _, c in per_image if c.shape_mismatch), None),
        }
    head = summary[CUMULATIVE] or summary[LOCAL] or {}
    summary.update({key: head.get(key) for key in ("max_abs", "max_rel", "worst_index", "worst_image")})
    return summary


def _with_image(index: dict[str, int] | None, image: str) -> dict[str, Any] | None:
    return None if index is None else {"image": image, **index}


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: non-finite floats (a growth from an infinite error) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --- the terminal table -------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def _over(c: Comparison) -> str:
    if c.fraction_over == 0:
        return "-"
    return f"{c.fraction_over:.1%}" if c.fraction_over >= 0.001 else f"{c.fraction_over:.0e}"


def _where(index: dict[str, int] | None) -> str:
    if index is None:
        return "-"
    parts = [f"r{index['row']}", f"c{index['col']}", f"ch{index['channel']}"]
    if "time" in index:
        parts.append(f"t{index['time']}")
    return " ".join(parts)


def further_from_exact(result: LayerResult) -> str | None:
    """The framework further from the float64 value on this layer: from local mode where it ran (each layer's own
    error, both fed the same input), else cumulative mode; None where nothing was attributed."""
    attribution = result.local_attribution or result.cumulative_attribution
    return None if attribution is None else attribution.further_from_exact


def _further(result: LayerResult, reference_label: str = "ref") -> str:
    further = further_from_exact(result)
    return {None: "-", "reference": reference_label, "torch": "torch", "neither": "-"}[further]


def _status(result: LayerResult) -> str:
    if result.unmapped:
        return "unmapped"
    failed = [mode for mode, c in result.comparisons.items() if not c.passed]
    if not failed:
        return "ok*" if any(c.reference_drift for c in result.comparisons.values()) else "ok"
    if any(result.comparisons[m].nonfinite_mismatches for m in failed):
        return "NaN/Inf"
    return "FAIL " + "+".join(m[0] for m in failed)  # c, l or c+l


def image_table(image: ImageParity, reference_label: str = "ref") -> str:
    """One image: its heading, NaN/Inf differences first, then a row per layer, then the failures in words."""
    report = image.report
    head = (
        f"{image.name}  {image.width} x {image.height}  ({image.source})  "
        f"{'passed' if image.passed else 'FAILED'}  {image.seconds:.1f} s"
    )
    lines = [head]
    lines += [f"  note: {note}" for note in image.notes]
    lines.append(f"  float64 attribution: {image.attributed.describe()}")
    for layer in report.layers:  # differences in finiteness are not numbers: they come before any
        for mode, c in layer.comparisons.items():
            if c.nonfinite_mismatches:
                where = ", ".join(_where(p) for p in c.nonfinite_positions[:3])
                lines.append(f"  NaN/Inf differ: {layer.name} ({mode}) at {c.nonfinite_mismatches} positions: {where}")
    cum, loc = CUMULATIVE in report.modes, LOCAL in report.modes
    columns = f"  {'layer':<16}{'status':<8}"
    if cum:
        columns += f"{'cum: max':>9}{'p99':>8}{'max rel':>8}{'over':>7}{'min tol':>8}{'growth':>9}"
    if loc:
        columns += f"{'loc: max':>9}{'max rel':>8}{'over':>7}{'min tol':>8}"
    width = max(8, len(reference_label) + 1)
    columns += f"  {'f64 off':<{width}}worst at"
    lines += [columns, "  " + "-" * (len(columns) - 2)]
    for layer in report.layers:
        row = f"  {layer.name:<16}{_status(layer):<8}"
        if layer.unmapped:
            lines.append(row.rstrip())
            continue
        if cum:
            c = layer.cumulative
            growth = "-" if layer.growth is None else f"x{layer.growth:.2g}"
            if c is None:
                row += f"{'-':>9}{'-':>8}{'-':>8}{'-':>7}{'-':>8}{'-':>9}"
            else:
                row += f"{_num(c.max_abs):>9}{_num(c.p99_abs):>8}{_num(c.max_rel):>8}{_over(c):>7}"
                row += f"{_num(c.min_atol):>8}{growth:>9}"
        if loc:
            c = layer.local
            if c is None:
                row += f"{'-':>9}{'-':>8}{'-':>7}{'-':>8}"
            else:
                row += f"{_num(c.max_abs):>9}{_num(c.max_rel):>8}{_over(c):>7}{_num(c.min_atol):>8}"
        head = layer.headline
        further = _further(layer, reference_label)
        row += f"  {further:<{width}}{_where(head.worst_index) if head.max_abs > 0 else '-'}"
        lines.append(row)
    return "\n".join(lines + _drift_lines(report, reference_label) + _failure_lines(report))


# Why the reference's float32 result drifts from the exact value on these layers, for the explanation lines.
DRIFT_CAUSES = {
    "nestedAvgFeatex": "its float32 window means come from integral images, cumulative sums over the whole image "
    "whose rounding grows with the image and jumps with any ulp of difference in bnorm",
    "glbStd": "its float32 standard deviation",
}


def _drift_lines(report: ParityReport, reference_label: str) -> list[str]:
    """Elements over tolerance against the reference that the float64 value clears: explained, not failed."""
    reference = "the official code" if reference_label == "official" else "the reference"
    lines = []
    for layer in report.layers:
        drifted = {mode: c.reference_drift for mode, c in layer.comparisons.items() if c.reference_drift}
        if not drifted:
            continue
        counts = ", ".join(f"{n} in {mode} mode" for mode, n in drifted.items())
        cause = DRIFT_CAUSES.get(layer.name)
        lines.append(
            f"  explained: {layer.name}: {counts} over tolerance against {reference} but within it of the float64 "
            f"value: {reference} drifted there, not the compared side" + (f" ({cause})" if cause else "")
        )
    return lines


def _failure_lines(report: ParityReport) -> list[str]:
    """The failures in words: every mode at the first divergent layer, then the layers that are wrong by
    themselves (local mode); layers that only inherit an error (cumulative mode alone) are counted, not listed."""
    first = report.first_divergent_layer
    if first is None:
        return []
    listed = [(first, mode, c) for mode, c in report.layer(first).comparisons.items() if not c.passed]
    listed += [
        (layer.name, LOCAL, layer.local)
        for layer in report.layers
        if layer.name != first and layer.local is not None and not layer.local.passed
    ]
    lines = [f"  [{mode}] {c.message()}" for _, mode, c in listed[:LISTED_FAILURES]]
    if len(listed) > LISTED_FAILURES:
        lines.append(f"  ... and {len(listed) - LISTED_FAILURES} more layers wrong by themselves (in the JSON report)")
    inherited = [
        layer.name
        for layer in report.layers
        if layer.name != first
        and layer.cumulative is not None
        and not layer.cumulative.passed
        and (layer.local is None or layer.local.passed)
    ]
    if inherited:
        lines.append(f"  over tolerance in cumulative mode only (inherited): {', '.join(inherited)}")
    return lines


def verdict(run: ParityRun) -> str:
    """The last line: the run's verdict and, on failure, its first divergent layer in each mode."""
    modes = " and ".join(run.modes)
    count = f"{len(run.images)} image{'s' if len(run.images) != 1 else ''}"
    unmapped = [s["name"] for s in run.layer_summaries() if s["unmapped"]]
    if run.passed:
        compared = f"all {len(LAYERS)} layers" if not unmapped else f"all {len(LAYERS) - len(unmapped)} compared layers"
        line = f"PASSED: {compared} within tolerance on {count} ({modes} mode{'s' * (len(run.modes) > 1)})"
        backward = [image.gradients for image in run.images if image.gradients is not None]
        if backward:
            steps = len(backward[0].steps)
            line += "; gradients" + (f" and {steps} optimiser step{'s' * (steps > 1)}" if steps else "") + " too"
        return line + (f"; unmapped, not compared: {', '.join(unmapped)}" if unmapped else "")
    backward = run.first_divergent_gradient or run.first_divergent_step
    if run.first_divergent_layer is None and backward is not None:
        where = [f"{k} {v}" for k, v in backward.items()]
        kind = "gradient" if run.first_divergent_gradient else "optimiser step"
        return f"FAILED: forward pass within tolerance; first divergent {kind}: {', '.join(where)}"
    if run.first_divergent_layer is None:
        return f"FAILED: no layer compared on {count}: every layer is unmapped in the modes run ({modes})"
    per_mode = ", ".join(f"{mode}: {run.first_divergent(mode) or 'none'}" for mode in run.modes)
    failing = run.failing_images()
    return (
        f"FAILED: first divergent layer {run.first_divergent_layer} ({per_mode}); "
        f"failing: {len(failing)} of {count} ({', '.join(failing)})"
        + (f"; unmapped, not compared: {', '.join(unmapped)}" if unmapped else "")
    )


def render_table(run: ParityRun) -> str:
    legend = (
        "cum: cumulative mode (each framework on its own outputs, as in use); loc: local mode (each PyTorch layer fed "
        "the reference's input: its own error; unmapped: a layer the compared implementation does not expose). "
        "max, p99: max and 99th-percentile |torch - reference|; max rel: "
        "relative to |reference|; over: fraction of elements over tolerance; min tol: the smallest atol that would "
        "pass; growth: max error over the previous layer's; f64 off: the framework whose own output of the layer "
        "(local mode) is further from the float64 value ('-': both within tolerance of it); worst at: row, column, "
        "channel (and time step) of the largest difference. ok*: some elements are over tolerance against the "
        "reference but within it of the float64 value: the reference drifted there, not PyTorch"
    )
    from .gradients import render_gradients

    label = "official" if run.reference.get("kind") == "official" else "ref"
    blocks = [image_table(image, label) for image in run.images]
    blocks += [f"{image.name}: {render_gradients(image.gradients, label)}" for image in run.images if image.gradients]
    return "\n\n".join([*blocks, legend, verdict(run)])
