"""PNG figures of a parity report, drawn with Pillow alone: a log-scale error plot per layer, and heat maps.

Pillow is already a dependency; a plotting library is not, and these two figures need only lines, markers,
text and a colour scale.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A dark-to-bright colour scale (black, purple, magenta, orange, pale yellow): perceived brightness rises
# monotonically, so a greyscale print still reads low to high. (position, RGB) control points.
COLOUR_SCALE = (
    (0.00, (0, 0, 4)),
    (0.25, (80, 18, 123)),
    (0.50, (182, 54, 121)),
    (0.75, (251, 136, 97)),
    (1.00, (252, 253, 191)),
)
NONFINITE_COLOUR = (0, 230, 150)  # NaN/Inf differences: a hue the scale never takes
HEAT_DECADES = 4  # a heat map shows the top four decades of |difference|; smaller values are drawn as its floor
MIN_HEAT_SIDE = 320  # small maps are enlarged (whole pixels, no smoothing) to at least this many pixels
PLOT_FLOOR = 1e-10  # exact zeros are drawn at the plot's floor, with hollow markers
GREY_STRENGTH = 0.3  # a heat map's backdrop keeps 30 % of the input's contrast: visible, never mistaken for error
MIN_HEAT_OPACITY = 0.35  # colours just above a heat map's floor still show over the backdrop
NOT_COMPARED_FILL, NOT_COMPARED = (242, 242, 242), "not compared"

BACKGROUND, INK, GRID, TOLERANCE_INK = (255, 255, 255), (30, 30, 30), (225, 225, 225), (150, 150, 150)
FAIL_INK = (200, 0, 0)
DRIFT_INK = (90, 90, 90)
SERIES_COLOURS = {"cumulative": (31, 119, 180), "local": (230, 120, 20)}


def font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def colourize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN allowed) to uint8 RGB along ``COLOUR_SCALE``; NaN gets ``NONFINITE_COLOUR``."""
    positions = np.array([p for p, _ in COLOUR_SCALE])
    rgb = np.stack(
        [np.interp(np.nan_to_num(values, nan=0.0), positions, [c[i] for _, c in COLOUR_SCALE]) for i in range(3)],
        axis=-1,
    )
    rgb[np.isnan(values)] = NONFINITE_COLOUR
    return np.rint(rgb).astype(np.uint8)


@dataclass(frozen=True)
class LogScale:
    """log10 values between ``low`` and ``high`` mapped to [0, 1]."""

    low: float
    high: float

    @classmethod
    def covering(cls, values: Sequence[float], floor: float) -> LogScale:
        positive = [v for v in values if v > 0 and math.isfinite(v)]
        high = max([*positive, floor * 10])
        low = min(max(min([*positive, high]), floor), high / 10)
        return cls(10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high)))

    def __call__(self, value: np.ndarray | float) -> np.ndarray | float:
        lo, hi = math.log10(self.low), math.log10(self.high)
        clipped = np.clip(np.asarray(value, dtype=np.float64), self.low, self.high)
        return (np.log10(clipped) - lo) / max(hi - lo, 1e-12)

    def decades(self) -> list[float]:
        return [10.0**e for e in range(round(math.log10(self.low)), round(math.log10(self.high)) + 1)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def faint_grey(pixels: np.ndarray) -> np.ndarray:
    """An RGB uint8 image as a faint grey copy (ITU-R 601 luma squeezed into the top ``1 - GREY_STRENGTH`` of the
    range), a backdrop that shows where things are without competing with the colours drawn over it."""
    luma = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return 255.0 - (255.0 - luma) * GREY_STRENGTH


def heat_map(
    diff: np.ndarray, title: str, tolerance: float | None = None, backdrop: np.ndarray | None = None
) -> Image.Image:
    """|difference| over the image (H x W; NaN where either side was not finite) on a log colour scale, with a
    colour bar marked in decades and at ``tolerance``. ``backdrop``: the input image (H x W x 3 uint8), drawn as a
    faint grey copy under the colours, which are opaque at the top of the scale and fade out towards its floor, so
    that the reader sees where in the image the error sits."""
    finite = diff[np.isfinite(diff)]
    high = float(finite.max()) if finite.size and finite.max() > 0 else 1e-12
    scale = LogScale(high / 10**HEAT_DECADES, high) if high > 1e-12 else LogScale(1e-13, 1e-12)
    levels = np.where(np.isfinite(diff), scale(np.where(np.isfinite(diff), diff, scale.low)), np.nan)
    rgb = colourize(levels)
    if backdrop is not None and backdrop.shape[:2] == diff.shape:
        # opacity: none at or below the scale's floor (the input alone), rising to full at its top; NaN: full
        alpha = np.where(np.isnan(levels), 1.0, MIN_HEAT_OPACITY + (1 - MIN_HEAT_OPACITY) * np.nan_to_num(levels))
        alpha = np.where(np.isfinite(diff) & (diff <= scale.low), 0.0, alpha)[..., None]
        grey = faint_grey(backdrop)[..., None]
        rgb = np.rint(alpha * rgb + (1 - alpha) * grey).astype(np.uint8)
    height, width = diff.shape
    zoom = max(1, math.ceil(MIN_HEAT_SIDE / max(height, width)))
    picture = Image.fromarray(rgb).resize((width * zoom, height * zoom), Image.Resampling.NEAREST)

    small, regular = font(11), font(13)
    bar_width, margin, header = 18, 12, 26
    label_width = 80
    canvas = Image.new("RGB", (picture.width + bar_width + label_width + 3 * margin, picture.height + header + margin))
    canvas.paste(BACKGROUND, (0, 0, canvas.width, canvas.height))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 6), title, fill=INK, font=regular)
    top = header
    canvas.paste(picture, (margin, top))
    bar_left = margin * 2 + picture.width
    ramp = colourize(np.linspace(1.0, 0.0, picture.height)[:, None].repeat(bar_width, axis=1))
    canvas.paste(Image.fromarray(ramp), (bar_left, top))

    def bar_y(value: float) -> int:
        return top + round((1.0 - float(scale(value))) * (picture.height - 1))

    for decade in (scale.low, scale.high):
        y = bar_y(decade)
        draw.line((bar_left + bar_width, y, bar_left + bar_width + 4, y), fill=INK)
        draw.text((bar_left + bar_width + 7, y - 6), f"{decade:.0e}", fill=INK, font=small)
    if tolerance is not None and scale.low < tolerance < scale.high:
        y = bar_y(tolerance)
        draw.line((bar_left - 3, y, bar_left + bar_width + 4, y), fill=FAIL_INK, width=2)
        draw.text((bar_left + bar_width + 7, y - 6), f"tol {tolerance:.0e}", fill=FAIL_INK, font=small)
    if not np.isfinite(diff).all():
        draw.text((bar_left, top + picture.height - 12), "NaN/Inf", fill=NONFINITE_COLOUR, font=small)
    return canvas


@dataclass(frozen=True)
class Series:
    """One line of the error plot: a value per layer (None where the mode did not run) and which failed."""

    label: str
    values: Sequence[float | None]
    failed: Sequence[bool]
    colour: tuple[int, int, int]
    drifted: Sequence[bool] = ()  # passing only against the float64 value: the reference drifted there


def error_plot(
    layers: Sequence[str], series: Sequence[Series], tolerance: Sequence[float | None], title: str
) -> Image.Image:
    """Max |difference| per layer on a log axis, one line per mode, the tolerance as a grey step line.

    A failing layer's marker is ringed in red, one that passes only against the float64 value (the reference
    drifted) in grey; an exact zero sits on the floor as a hollow marker. A value of None (a layer not compared
    in that mode) leaves a gap in its line; a layer compared in no mode gets a shaded column marked "not compared".
    """
    small, regular = font(11), font(13)
    width, height = max(720, 44 * len(layers) + 120), 420
    left, right, top, bottom = 72, 20, 36, 110
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 10), title, fill=INK, font=regular)
    values = [v for s in series for v in s.values if v is not None] + [t for t in tolerance if t]
    scale = LogScale.covering(values, PLOT_FLOOR)
    plot_w, plot_h = width - left - right, height - top - bottom
    step = plot_w / max(len(layers), 1)

    def x_of(i: int) -> float:
        return left + step * (i + 0.5)

    def y_of(value: float) -> float:
        return top + (1.0 - float(scale(max(value, scale.low)))) * plot_h

    for i in range(len(layers)):  # nothing to draw here: say so, rather than let a gap pass for zero
        if all(s.values[i] is None for s in series):
            draw.rectangle((left + step * i + 1, top + 1, left + step * (i + 1) - 1, top + plot_h - 1),
                           fill=NOT_COMPARED_FILL)  # fmt: skip
            box = draw.textbbox((0, 0), NOT_COMPARED, font=small)
            label = Image.new("RGB", (box[2] + 2, box[3] + 2), NOT_COMPARED_FILL)
            ImageDraw.Draw(label).text((0, 0), NOT_COMPARED, fill=TOLERANCE_INK, font=small)
            label = label.rotate(90, expand=True)
            canvas.paste(label, (round(x_of(i) - label.width / 2), round(top + plot_h - label.height - 6)))
    for decade in scale.decades():
        y = y_of(decade)
        draw.line((left, y, left + plot_w, y), fill=GRID)
        label = f"{decade:.0e}"
        draw.text((left - 8 - draw.textlength(label, font=small), y - 7), label, fill=INK, font=small)
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=INK)

    for i, name in enumerate(layers):  # layer names, turned a quarter so that they never overlap
        box = draw.textbbox((0, 0), name, font=small)
        label = Image.new("RGB", (box[2] + 2, box[3] + 2), BACKGROUND)
        ImageDraw.Draw(label).text((0, 0), name, fill=INK, font=small)
        label = label.rotate(90, expand=True)
        canvas.paste(label, (round(x_of(i) - label.width / 2), top + plot_h + 6))

    previous = None
    for i, tol in enumerate(tolerance):  # a step line: each layer's tolerance across its own column
        if tol is None:
            previous = None
            continue
        y = y_of(tol)
        x0, x1 = left + step * i, left + step * (i + 1)
        if previous is not None:
            draw.line((x0, previous, x0, y), fill=TOLERANCE_INK, width=1)
        draw.line((x0, y, x1, y), fill=TOLERANCE_INK, width=2)
        previous = y

    for s in series:
        drifted = s.drifted or [False] * len(s.values)
        flags = zip(s.values, s.failed, drifted, strict=True)
        points = [(x_of(i), None if v is None else y_of(v), v, f, d) for i, (v, f, d) in enumerate(flags)]
        run: list[tuple[float, float]] = []
        for x, y, v, _, _ in [*points, (0.0, None, None, False, False)]:  # one line per run of compared layers
            if v is not None:
                run.append((x, y))
                continue
            if len(run) > 1:
                draw.line(run, fill=s.colour, width=2)
            run = []
        for x, y, v, failed, drift in points:
            if v is None:
                continue
            r = 4
            if v > 0:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=s.colour)
            else:
                draw.ellipse((x - r, y - r, x + r, y + r), outline=s.colour, width=2)
            if failed or drift:
                ring = FAIL_INK if failed else DRIFT_INK
                draw.ellipse((x - r - 3, y - r - 3, x + r + 3, y + r + 3), outline=ring, width=2)

    legend_x = left + plot_w - 10
    entries = [(s.label, s.colour) for s in series] + [("tolerance", TOLERANCE_INK), ("over tolerance", FAIL_INK)]
    if any(any(s.drifted) for s in series):
        entries.append(("within tolerance of float64 only", DRIFT_INK))
    for label, colour in reversed(entries):
        legend_x -= draw.textlength(label, font=small) + 28
        y = 16
        draw.line((legend_x, y, legend_x + 14, y), fill=colour, width=3)
        draw.text((legend_x + 18, y - 7), label, fill=INK, font=small)
    draw.text((8, top + plot_h / 2 - 20), "max", fill=INK, font=small)
    draw.text((8, top + plot_h / 2 - 6), "|diff|", fill=INK, font=small)
    return canvas
