"""A run's report: the training loss and validation curves, and example maps, as PNG figures and an HTML page.

Drawn with Pillow in the style of ``evaluate``'s report (``evaluation.report``, ``parity_tests.plots``).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mantranet_torch.files import FileError, write_files_atomic
from parity_tests.plots import BACKGROUND, INK, colourize, font, png_bytes

from .config import TrainError
from .validate import Validation

CURVE_METRICS = ("pixel_auc", "pooled_auc", "pixel_f1_best", "image_auc")
PALETTE = ((31, 119, 180), (230, 120, 20), (44, 160, 44), (214, 39, 40), (148, 103, 189))
WIDTH, HEIGHT, MARGIN = 520, 300, 50
CELL = 140


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Running mean over ``window`` steps (the first ones over what there is)."""
    if values.size == 0 or window <= 1:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    lo = np.maximum(np.arange(values.size) + 1 - window, 0)
    return (sums[1:] - sums[lo]) / (np.arange(values.size) + 1 - lo)


def _axes(title: str, steps: float, low: float, high: float) -> tuple[Image.Image, ImageDraw.ImageDraw, callable]:
    canvas = Image.new("RGB", (WIDTH + 2 * MARGIN + 110, HEIGHT + 2 * MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 12), title, fill=INK, font=font(13))
    span = (high - low) or 1.0

    def xy(x: float, y: float) -> tuple[float, float]:
        return MARGIN + x / max(steps, 1) * WIDTH, MARGIN + (1 - (y - low) / span) * HEIGHT

    draw.rectangle((*xy(0, high), *xy(steps, low)), outline=INK)
    small = font(11)
    for tick in np.linspace(low, high, 5):
        x, y = xy(0, tick)
        draw.text((4, y - 6), f"{tick:.3g}", fill=INK, font=small)
    for tick in np.linspace(0, steps, 5):
        x, y = xy(tick, low)
        draw.text((x - 10, y + 6), f"{int(tick)}", fill=INK, font=small)
    draw.text((MARGIN + WIDTH / 2 - 12, MARGIN + HEIGHT + 26), "step", fill=INK, font=small)
    return canvas, draw, xy


def curves_figure(history: list[dict]) -> Image.Image:
    """Training loss (raw and smoothed) over the steps, and each validation metric, one figure."""
    steps_rows = [r for r in history if "loss" in r and r.get("loss") is not None and math.isfinite(r["loss"])]
    val_rows = [r for r in history if "val" in r]
    last = max([r["step"] for r in history] or [1])
    loss = np.array([r["loss"] for r in steps_rows], dtype=np.float64)
    x_loss = np.array([r["step"] for r in steps_rows], dtype=np.float64)
    high = float(loss.max()) if loss.size else 1.0
    top, draw_top, xy_top = _axes("training loss (grey: each step; blue: running mean)", last, 0.0, high)
    for values, colour, width in ((loss, (190, 190, 190), 1), (smoothed(loss, max(1, loss.size // 20)), PALETTE[0], 2)):
        points = [xy_top(x, y) for x, y in zip(x_loss, values, strict=True)]
        if len(points) > 1:
            draw_top.line(points, fill=colour, width=width)
    bottom, draw, xy = _axes("validation", last, 0.0, 1.0)
    small = font(11)
    for i, name in enumerate(CURVE_METRICS):
        pairs = [(r["step"], r["val"].get(name)) for r in val_rows if r["val"].get(name) is not None]
        colour = PALETTE[(i + 1) % len(PALETTE)]
        points = [xy(s, v) for s, v in pairs]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for p in points:
            draw.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=colour)
        ly = MARGIN + 10 + 18 * i
        draw.line((MARGIN + WIDTH + 10, ly, MARGIN + WIDTH + 26, ly), fill=colour, width=3)
        draw.text((MARGIN + WIDTH + 30, ly - 7), name, fill=INK, font=small)
    if not val_rows:
        draw.text((MARGIN + 10, MARGIN + 10), "no validation set (--val)", fill=INK, font=small)
    figure = Image.new("RGB", (top.width, top.height + bottom.height), BACKGROUND)
    figure.paste(top, (0, 0))
    figure.paste(bottom, (0, top.height))
    return figure


def examples_figure(validation: Validation | None) -> Image.Image:
    """Each example: the image, the map (colour scale) and the ground-truth mask."""
    examples = validation.examples if validation is not None else []
    small = font(11)
    canvas = Image.new("RGB", (3 * (CELL + 10) + 10, 24 + max(1, len(examples)) * (CELL + 30)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 6), "image, map and mask of the last validation", fill=INK, font=small)
    if not examples:
        draw.text((10, 30), "no validation set (--val)", fill=INK, font=small)
    y = 24
    for example in examples:
        draw.text((10, y), example.name, fill=INK, font=small)
        mask = example.mask if example.mask is not None else np.zeros(example.likelihood.shape, dtype=bool)
        pictures = (example.pixels, colourize(example.likelihood.astype(np.float64)),
                    np.repeat((mask * 255).astype(np.uint8)[..., None], 3, 2))  # fmt: skip
        for i, picture in enumerate(pictures):
            image = Image.fromarray(np.ascontiguousarray(picture))
            factor = CELL / max(image.size)
            image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                                 Image.Resampling.NEAREST)  # fmt: skip
            canvas.paste(image, (10 + i * (CELL + 10), y + 16))
        y += CELL + 30
    return canvas


def write_report(output: Path, history: list[dict], validation: Validation | None) -> list[Path]:
    """Write curves.png, examples.png and report.html into ``output``; returns their paths."""
    vals = [r for r in history if "val" in r]
    rows = "".join(
        f"<tr><td>{r['step']}</td>" + "".join(f"<td>{_fmt(r['val'].get(m))}</td>" for m in CURVE_METRICS) + "</tr>"
        for r in vals
    )
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    page = (
        "<!doctype html><meta charset='utf-8'><title>mantranet train</title>"
        f"<h1>Training run {html.escape(output.name)}</h1>"
        f"<p>{len(losses)} steps; last loss {_fmt(losses[-1] if losses else None)}</p>"
        "<img src='curves.png' alt='loss and validation curves'>"
        "<h2>Validation</h2><table border=1 cellpadding=4><tr><th>step</th>"
        + "".join(f"<th>{m}</th>" for m in CURVE_METRICS)
        + f"</tr>{rows}</table>"
        "<h2>Examples</h2><img src='examples.png' alt='example maps'>"
        f"<script type='application/json' id='history'>{html.escape(json.dumps(vals))}</script>"
    )
    files = {
        output / "curves.png": png_bytes(curves_figure(history)),
        output / "examples.png": png_bytes(examples_figure(validation)),
        output / "report.html": page.encode(),
    }
    try:
        write_files_atomic(files, force=True)
    except FileError as e:
        raise TrainError(str(e)) from None
    return list(files)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
