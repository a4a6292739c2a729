"""``--report DIR``: pooled ROC and precision-recall curves per row, and the best and worst images.

Drawn with Pillow, as the parity report's figures are (``parity_tests.plots``): a plotting library is not a
dependency, and these figures need only lines, text and a colour scale.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mantranet_torch.files import write_files_atomic
from parity_tests.plots import BACKGROUND, GRID, INK, colourize, font, png_bytes

from .run import Evaluation

PALETTE = ((31, 119, 180), (230, 120, 20), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
SHOWN = 4  # best and worst images in the gallery
PLOT_SIDE = 420


def write_report(evaluation: Evaluation, folder: Path) -> list[Path]:
    """Write roc.png, pr.png, best_worst.png and index.html into ``folder``; returns their paths."""
    curves = []
    for (perturbation, backend), pooled in evaluation.curves.items():
        if pooled.forged.sum() and pooled.authentic.sum():
            fpr, tpr, precision = thinned(*pooled.roc())
            label = (perturbation or "none") + (" (tensorflow)" if backend != "torch" else "")
            curves.append((label, fpr, tpr, precision))
    files = {
        folder / "roc.png": png_bytes(_plot("Pooled ROC", "false positive rate", "true positive rate",
                                            [(c[0], c[1], c[2]) for c in curves])),
        folder / "pr.png": png_bytes(_plot("Pooled precision-recall", "recall", "precision",
                                           [(c[0], c[2], c[3]) for c in curves])),
        folder / "best_worst.png": png_bytes(_gallery(evaluation)),
    }  # fmt: skip
    files[folder / "index.html"] = _index(evaluation).encode()
    write_files_atomic(files, force=True)
    return list(files)


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


def _plot(title: str, x_label: str, y_label: str, series: list[tuple[str, np.ndarray, np.ndarray]]) -> Image.Image:
    small, regular = font(11), font(13)
    left, top, right, bottom = 56, 34, 170, 44
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
    for i, (label, xs, ys) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        points = [xy(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        ly = top + 10 + 18 * i
        draw.line((left + PLOT_SIDE + 12, ly, left + PLOT_SIDE + 28, ly), fill=colour, width=3)
        draw.text((left + PLOT_SIDE + 32, ly - 7), label, fill=INK, font=small)
    return canvas


def ranked(evaluation: Evaluation) -> list[dict]:
    """The unperturbed PyTorch row's forged images with pixel scores, best first (pixel AUC, then best F1)."""
    records = [r for r in evaluation.records if r["perturbation"] is None and r["backend"] == "torch" and r["pixel"]]
    return sorted(records, key=lambda r: (-(r["pixel"]["auc"] if r["pixel"]["auc"] is not None else -1),
                                          -r["pixel"]["f1_best"], r["name"]))  # fmt: skip


def _gallery(evaluation: Evaluation) -> Image.Image:
    """Best and worst images: the map (colour scale) beside its mask, with the image's scores."""
    order = ranked(evaluation)
    chosen = [("best", r) for r in order[:SHOWN]]
    chosen += [("worst", r) for r in order[max(SHOWN, len(order) - SHOWN) :][::-1]]
    small = font(11)
    cell, caption = 160, 30
    width = 2 * cell + 30
    canvas = Image.new("RGB", (max(width, 360), 24 + max(1, len(chosen)) * (cell + caption + 10)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 6), "map (left) and ground-truth mask (right)", fill=INK, font=small)
    if not chosen:
        draw.text((10, 30), "no forged image with a mask", fill=INK, font=small)
    y = 24
    for kind, record in chosen:
        preview = evaluation.previews.get((record["name"], None, "torch"))
        auc, f1_best = record["pixel"]["auc"], record["pixel"]["f1_best"]
        text = f"{kind}: {record['name']}  AUC {'-' if auc is None else f'{auc:.3f}'}  best F1 {f1_best:.3f}"
        draw.text((10, y), text, fill=INK, font=small)
        if preview is not None:
            for i, picture in enumerate(preview):
                if picture is None:
                    continue
                rgb = colourize(picture.astype(np.float64) / 255.0) if i == 0 else np.repeat(picture[..., None], 3, 2)
                image = Image.fromarray(rgb)
                factor = cell / max(image.size)  # enlarged or shrunk to the cell, whole pixels kept hard
                size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
                image = image.resize(size, Image.Resampling.NEAREST)
                canvas.paste(image, (10 + i * (cell + 10), y + caption - 10))
        y += cell + caption + 10
    return canvas


def _index(evaluation: Evaluation) -> str:
    data = evaluation.to_json()
    rows = "".join(
        "<tr><td>" + html.escape(row["perturbation"]) + "</td>"
        + "".join(f"<td>{'-' if v is None else f'{v:.4f}'}</td>" for v in row["metrics"].values()) + "</tr>"
        for row in data["rows"]
    )  # fmt: skip
    header = "".join(f"<th>{html.escape(k)}</th>" for k in data["metrics"])
    return (
        "<!doctype html><meta charset='utf-8'><title>mantranet evaluate</title>"
        f"<h1>{html.escape(data['dataset']['source'])}</h1>"
        f"<p>weights {html.escape(data['weights']['path'])} (git blob {data['weights']['git_blob_sha1']})</p>"
        f"<table border=1 cellpadding=4><tr><th>perturbation</th>{header}</tr>{rows}</table>"
        "<p><img src='roc.png'> <img src='pr.png'></p><p><img src='best_worst.png'></p>\n"
    )
