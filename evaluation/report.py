"""``--report DIR``: the metrics table, the pooled ROC and precision-recall curves with their chance lines, and the
best and worst images, each shown as the image, its map over it, and its ground-truth mask.

The page shares the parity report's style (``parity_tests.html_page``) and its figures are drawn with Pillow, as
the parity report's are (``parity_tests.plots``): a plotting library is not a dependency, and these figures need
only lines, text and a colour scale.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mantranet_torch.files import write_files_atomic
from mantranet_torch.maps import overlay
from parity_tests.html_page import escape, html_page
from parity_tests.plots import BACKGROUND, GRID, INK, font, png_bytes

from .metrics import METRICS
from .run import Evaluation
from .worker import TORCH

PALETTE = ((31, 119, 180), (230, 120, 20), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
CHANCE_INK = (150, 150, 150)
SHOWN = 4  # best and worst images on the page
PLOT_SIDE = 420
PANEL_SIDE = 192  # an image's three panels (the records' previews are at most this size)
DASH = 6  # pixels on, pixels off, of the reference backend's curves and the chance lines

METRIC_NAMES = {
    "pixel_auc": "pixel AUC (mean per image)",
    "pixel_f1_fixed": "pixel F1 at 0.5",
    "pixel_f1_best": "pixel F1, best threshold per image",
    "pixel_iou_fixed": "pixel IoU at 0.5",
    "pixel_mcc_fixed": "pixel MCC at 0.5",
    "pooled_auc": "pooled pixel AUC",
    "pooled_f1_fixed": "pooled pixel F1 at 0.5",
    "image_auc": "image AUC",
    "image_balanced_accuracy": "image balanced accuracy at 0.5",
}


@dataclass
class Curve:
    """One row's pooled curves: ROC (``fpr``, ``tpr``) and precision-recall (``tpr``, ``precision``)."""

    backend: str
    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray


@dataclass
class CurveRow:
    """A perturbation's curves (one per backend) under one legend entry and one colour."""

    label: str
    colour: tuple[int, int, int]
    curves: list[Curve]


@dataclass
class Chance:
    """What a detector that guesses draws: the ROC diagonal, and precision equal to the forged-pixel fraction."""

    roc: tuple[tuple[float, float], tuple[float, float]]
    precision: float | None  # None: no pixel was scored


def write_report(evaluation: Evaluation, folder: Path) -> list[Path]:
    """Write the report into ``folder``: ``index.html``, ``roc.png``, ``pr.png`` and one PNG per shown image.

    Args:
        evaluation: what ``evaluation.evaluate`` returned.
        folder: the report folder (created if needed); its files are replaced.

    Returns:
        The paths written.

    Raises:
        ConversionError: a file cannot be written (the message names it).
    """
    rows, chance = curve_rows(evaluation), chance_lines(evaluation)
    roc = [(row, [(c.backend, c.fpr, c.tpr) for c in row.curves]) for row in rows]
    pr = [(row, [(c.backend, c.tpr, c.precision) for c in row.curves]) for row in rows]
    precision_chance = [] if chance.precision is None else [((0.0, chance.precision), (1.0, chance.precision))]
    files = {
        folder / "roc.png": png_bytes(_plot("Pooled ROC", "false positive rate", "true positive rate", roc,
                                            [chance.roc])),
        folder / "pr.png": png_bytes(_plot("Pooled precision-recall", "recall", "precision", pr, precision_chance)),
    }  # fmt: skip
    shown = shown_images(evaluation)
    for index, (_, record) in enumerate(shown, start=1):
        files[folder / image_file(index)] = png_bytes(_panels(evaluation, record["name"]))
    files[folder / "index.html"] = _page(evaluation, shown, chance).encode()
    write_files_atomic(files, force=True)
    return list(files)


def curve_rows(evaluation: Evaluation) -> list[CurveRow]:
    """Each row's pooled curves (thinned for drawing), one entry per perturbation; rows without both forged and
    authentic pixels have no curve."""
    rows: dict[str | None, CurveRow] = {}
    for (perturbation, backend), pooled in evaluation.curves.items():
        if not (pooled.forged.sum() and pooled.authentic.sum()):
            continue
        if perturbation not in rows:
            colour = PALETTE[len(rows) % len(PALETTE)]
            rows[perturbation] = CurveRow(perturbation or "none", colour, [])
        rows[perturbation].curves.append(Curve(backend, *thinned(*pooled.roc())))
    return list(rows.values())


def chance_lines(evaluation: Evaluation) -> Chance:
    """The chance lines of the unperturbed PyTorch row: a random score's ROC is the diagonal, and its precision is
    the fraction of scored pixels that are forged, at every recall."""
    pooled = evaluation.curves.get((None, TORCH))
    total = 0 if pooled is None else int(pooled.forged.sum() + pooled.authentic.sum())
    precision = None if not total else float(pooled.forged.sum()) / total
    return Chance(((0.0, 0.0), (1.0, 1.0)), precision)


def thinned(*curve: np.ndarray, points: int = 4 * PLOT_SIDE) -> list[np.ndarray]:
    """A curve's vertices at most ``points`` apart along its length (the first and last kept): a pooled curve has
    a vertex per distinct likelihood, millions on a large dataset, and a figure shows a few hundred pixels."""
    size = curve[0].size
    if size <= points:
        return list(curve)
    steps = np.sqrt(sum(np.diff(c) ** 2 for c in curve))  # in every coordinate drawn (ROC and PR)
    length = np.concatenate([[0.0], np.cumsum(steps)])
    keep = np.union1d(np.searchsorted(length, np.linspace(0.0, length[-1], points)), [0, size - 1])
    return [c[keep] for c in curve]


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill: tuple, width: int) -> None:
    """A polyline drawn in dashes of ``DASH`` pixels along its length."""
    drawn, on = 0.0, True
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        length = float(np.hypot(x1 - x0, y1 - y0))
        position = 0.0
        while position < length:
            step = min(DASH - drawn, length - position)
            if on:
                t0, t1 = position / length, (position + step) / length
                draw.line((x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0, x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1),
                          fill=fill, width=width)  # fmt: skip
            position += step
            drawn += step
            if drawn >= DASH:
                drawn, on = 0.0, not on


def _plot(
    title: str,
    x_label: str,
    y_label: str,
    rows: list[tuple[CurveRow, list[tuple[str, np.ndarray, np.ndarray]]]],
    chance: list[tuple[tuple[float, float], tuple[float, float]]],
) -> Image.Image:
    """Curves in the unit square: one colour and one legend line per perturbation (the TensorFlow reference's
    curve dashed in the same colour), the chance line dashed grey."""
    small, regular = font(11), font(13)
    left, top, right, bottom = 56, 34, 190, 44
    canvas = Image.new("RGB", (left + PLOT_SIDE + right, top + PLOT_SIDE + bottom), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((left + 120, 8), title, fill=INK, font=regular)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * PLOT_SIDE, top + (1.0 - y) * PLOT_SIDE

    for tick in np.linspace(0, 1, 6):
        draw.line((*xy(tick, 0), *xy(tick, 1)), fill=GRID)
        draw.line((*xy(0, tick), *xy(1, tick)), fill=GRID)
        x, y = xy(tick, 0)
        draw.text((x - 8, y + 4), f"{tick:.1f}", fill=INK, font=small)
        x, y = xy(0, tick)
        draw.text((x - 26, y - 6), f"{tick:.1f}", fill=INK, font=small)
    draw.rectangle((*xy(0, 1), *xy(1, 0)), outline=INK)
    draw.text((left + PLOT_SIDE / 2 - 40, top + PLOT_SIDE + 24), x_label, fill=INK, font=small)
    draw.text((4, top - 20), y_label, fill=INK, font=small)
    for start, end in chance:
        _dashed(draw, [xy(*start), xy(*end)], CHANCE_INK, 1)
    legend_x = left + PLOT_SIDE + 12
    entries = [(row.label, row.colour, False) for row, _ in rows]
    if any(backend != TORCH for _, series in rows for backend, _, _ in series):
        entries.append(("dashed: TensorFlow", INK, True))
    if chance:
        entries.append(("chance", CHANCE_INK, True))
    for row, series in rows:
        for backend, xs, ys in series:
            points = [xy(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
            if len(points) < 2:
                continue
            if backend == TORCH:
                draw.line(points, fill=row.colour, width=2)
            else:
                _dashed(draw, points, row.colour, 2)
    for i, (label, colour, dashed) in enumerate(entries):
        ly = top + 10 + 18 * i
        if dashed:
            _dashed(draw, [(legend_x, ly), (legend_x + 16, ly)], colour, 2)
        else:
            draw.line((legend_x, ly, legend_x + 16, ly), fill=colour, width=3)
        draw.text((legend_x + 22, ly - 7), label, fill=INK, font=small)
    return canvas


def ranked(evaluation: Evaluation) -> list[dict]:
    """The unperturbed PyTorch row's forged images with pixel scores, best first (pixel AUC, then best F1)."""
    records = [r for r in evaluation.records if r["perturbation"] is None and r["backend"] == TORCH and r["pixel"]]
    return sorted(records, key=lambda r: (-(r["pixel"]["auc"] if r["pixel"]["auc"] is not None else -1),
                                          -r["pixel"]["f1_best"], r["name"]))  # fmt: skip


def shown_images(evaluation: Evaluation) -> list[tuple[str, dict]]:
    """("best" or "worst", record) for the ``SHOWN`` best and the ``SHOWN`` worst images, none shown twice."""
    order = ranked(evaluation)
    chosen = [("best", r) for r in order[:SHOWN]]
    return chosen + [("worst", r) for r in order[max(SHOWN, len(order) - SHOWN) :][::-1]]


def image_file(index: int) -> str:
    return f"image-{index:02d}.png"


def _panels(evaluation: Evaluation, name: str) -> Image.Image:
    """The image, its map over it, and its ground-truth mask, side by side at the records' preview size."""
    map_levels, mask_levels = evaluation.previews.get((name, None, TORCH), (None, None))
    panels = []
    if map_levels is not None:
        likelihood = map_levels.astype(np.float32) / 255.0
        height, width = likelihood.shape
        rgb = _image_pixels(evaluation.images.get(name), (width, height))
        if rgb is not None:
            panels += [rgb, overlay(rgb, likelihood)]
        else:
            panels.append(overlay(np.zeros((height, width, 3), np.uint8), likelihood))
    if mask_levels is not None:
        panels.append(np.repeat(mask_levels[..., None], 3, axis=2))
    gap = 8
    canvas = Image.new("RGB", (max(1, sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)),
                               max([1] + [p.shape[0] for p in panels])), BACKGROUND)  # fmt: skip
    x = 0
    for panel in panels:
        canvas.paste(Image.fromarray(panel), (x, 0))
        x += panel.shape[1] + gap
    return canvas


def _image_pixels(path: str | None, size: tuple[int, int]) -> np.ndarray | None:
    """The image file as the model read it, at ``size``; None when it is gone or unreadable since the run."""
    from mantranet_torch.image_files import ImageReadError, read_image

    if path is None:
        return None
    try:
        pixels = read_image(Path(path)).pixels
    except (ImageReadError, OSError):
        return None
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_difference(value: float | None) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:+.1e}")


def _metrics_table(data: dict) -> str:
    """Metrics down, perturbations across: nine rows whatever the number of perturbations, so it fits the page."""
    rows = data["rows"]
    reference = any("reference" in row for row in rows)
    head = "".join(f"<th>{escape(row['perturbation'])}</th>" for row in rows)
    if reference:
        head = "".join(f"<th>{escape(row['perturbation'])}</th><th>TensorFlow</th><th>difference</th>" for row in rows)
    body = []
    for metric in METRICS:
        cells = ""
        for row in rows:
            cells += f"<td>{_fmt(row['metrics'][metric])}</td>"
            if reference:
                ref, diff = row.get("reference", {}), row.get("difference", {})
                cells += f"<td>{_fmt(ref.get(metric))}</td><td>{_fmt_difference(diff.get(metric))}</td>"
        name = METRIC_NAMES.get(metric, metric)
        body.append(f"<tr><td>{escape(name)} <span class='note mono'>{escape(metric)}</span></td>{cells}</tr>")
    return f"<div class='scroll'><table><tr><th>metric</th>{head}</tr>{''.join(body)}</table></div>"


def _page(evaluation: Evaluation, shown: list[tuple[str, dict]], chance: Chance) -> str:
    data = evaluation.to_json()
    dataset, weights, counts = data["dataset"], data["weights"], data["counts"]
    release = f", {escape(weights['release'])}" if weights.get("release") else ""
    shown_options = {k: v for k, v in data["options"].items() if k != "store" and v not in (None, [], False)}
    options = ", ".join(f"{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in shown_options.items())
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items())
    skipped = "".join(f"<li><code>{escape(s['entry'])}</code>: {escape(s['reason'])}</li>" for s in data["skipped"])
    sha1 = f"<span class='mono'>{weights['git_blob_sha1']}</span>"
    prevalence = "" if chance.precision is None else f" ({chance.precision:.2%} of the scored pixels are forged)"
    figures = []
    for index, (kind, record) in enumerate(shown, start=1):
        auc, f1_best = record["pixel"]["auc"], record["pixel"]["f1_best"]
        figures.append(
            f"<figure><img src='{image_file(index)}' alt='{escape(record['name'])}'><figcaption>{kind}: "
            f"<code>{escape(record['name'])}</code>, pixel AUC {_fmt(auc)}, best F1 {_fmt(f1_best)}</figcaption>"
            "</figure>"
        )
    gallery = "".join(figures) or "<p>No forged image with a mask.</p>"
    body = f"""<h1>ManTraNet evaluation report</h1>
<p>Dataset: <code>{escape(dataset["source"])}</code> ({escape(dataset["layout"])}), {dataset["entries"]} entries:
{dataset["forged"]} forged, {dataset["authentic"]} authentic. Masks: {escape(dataset["mask_rule"])}.<br>
Weights: <code>{escape(weights["path"])}</code>{release} (git blob SHA-1 {sha1}).<br>
Records: {counts["records"]} ({counts["computed"]} computed, {counts["resumed"]} resumed, {counts["skipped"]} skipped),
{data["seconds"]:.1f} s. Options: {escape(options)}. {escape(versions)}.</p>
{f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Metrics</h2>
{_metrics_table(data)}
<h2>Pooled curves</h2>
<p>Every scored pixel of every forged image with a mask, pooled: one line per row (perturbation); the dashed grey
line is chance{prevalence}.</p>
<figure><img src="roc.png" alt="pooled ROC"></figure><figure><img src="pr.png" alt="pooled precision-recall"></figure>
<h2>Best and worst images</h2>
<p>The unperturbed forged images by pixel AUC: the image, its map over it (blue 0 to red 1), and its ground-truth
mask.</p>
{gallery}"""
    return html_page(f"ManTraNet evaluation: {dataset['source']}", "mantranet evaluate", body)
