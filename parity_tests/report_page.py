"""The ``--report DIR`` page of ``mantranet parity``: index.html, report.json and PNG figures beside them.

The page is self-contained (inline style, no scripts, no remote resources) and refers to its PNGs by relative
name, so the folder can be moved or attached as a whole. The folder is assembled in a temporary sibling and
renamed into place only when complete: a reader never sees a partial report, and a previous report in the
same place is replaced whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from mantranet_torch import LAYERS
from mantranet_torch.files import new_path_mode

from .compare import Comparison
from .html_page import escape as _e
from .html_page import html_page
from .plots import SERIES_COLOURS, Series, error_plot, heat_map, png_bytes
from .report import ImageParity, ParityRun, further_from_exact, verdict
from .runner import LayerResult, ParityReport
from .tolerances import LOCAL, MODES

INDEX, JSON_NAME = "index.html", "report.json"
FINAL_LAYER = LAYERS[-1]


class ReportError(Exception):
    """The report folder cannot be written where asked; the message names it."""


def check_target(directory: Path) -> None:
    """Refuse, before any work, a folder that exists and is neither empty nor an earlier parity report."""
    if directory.exists() and not _replaceable(directory):
        raise ReportError(
            f"{directory}: exists and is not a parity report (no {INDEX} with {JSON_NAME}); "
            "choose a new or empty folder for --report"
        )


def _replaceable(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    if not any(directory.iterdir()):
        return True
    try:
        schema = json.loads((directory / JSON_NAME).read_text()).get("schema", "")
    except (OSError, ValueError, AttributeError):
        return False
    return (directory / INDEX).is_file() and str(schema).startswith("mantranet-parity/")


def write_report(run: ParityRun, directory: Path) -> None:
    """Write the page, the JSON and the figures into ``directory``, all at once."""
    check_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _staged_directory(directory) as staged:
        files = _figures(run)
        for name, data in files.items():
            (staged / name).write_bytes(data)
        (staged / JSON_NAME).write_text(run.to_json())
        (staged / INDEX).write_text(_page(run, files))
        _publish(staged, directory)


@contextlib.contextmanager
def _staged_directory(target: Path) -> Iterator[Path]:
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
    staged.chmod(new_path_mode(folder=True))  # mkdtemp's 0700 would carry over to the published folder
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _publish(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``; an existing report is moved aside first and removed after."""
    if not target.exists():
        os.rename(staged, target)
        return
    check_target(target)
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.rename(target, old / target.name)
    try:
        os.rename(staged, target)
    except OSError:
        os.rename(old / target.name, target)  # put the earlier report back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# --- figures ------------------------------------------------------------------------------------------------


def slug(index: int, name: str) -> str:
    """A file-name stem for an image: its position and its name without path or odd characters."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem).strip("_") or "image"
    return f"{index:02d}-{stem[:40]}"


def heat_map_layers(image: ImageParity) -> list[str]:
    """The layers an image gets heat maps for: its first divergent layer (if any), then the final output."""
    first = image.report.first_divergent_layer
    return [first, FINAL_LAYER] if first not in (None, FINAL_LAYER) else [FINAL_LAYER]


def heat_map_name(index: int, image: ImageParity, layer: str, mode: str) -> str:
    return f"{slug(index, image.name)}-{layer}-{mode}.png"


def _plot_series(results: list[LayerResult], modes: list[str]) -> list[Series]:
    # A layer not compared in a mode (unmapped, or its local mode off) has no value there: a gap, never a zero.
    def get(r: LayerResult, mode: str) -> Comparison | None:
        return r.comparisons.get(mode)

    return [
        Series(
            mode,
            [None if get(r, mode) is None else get(r, mode).max_abs for r in results],
            [get(r, mode) is not None and not get(r, mode).passed for r in results],
            SERIES_COLOURS[mode],
            [get(r, mode) is not None and get(r, mode).reference_drift > 0 for r in results],
        )
        for mode in MODES
        if mode in modes
    ]


def _tolerance_line(results: list[LayerResult]) -> list[float | None]:
    """Per layer, the largest tolerance applied in the headline mode (cumulative where it ran); None where the
    layer was not compared."""
    return [None if r.headline is None else r.headline.atol_max or r.headline.atol for r in results]


def not_compared(unmapped: bool) -> str:
    """A table cell's words for a mode without a comparison: the layer is unmapped, or it is mapped and this
    mode (local: the module fed the reference's input) is off because the port computes the layer elsewhere."""
    return "unmapped" if unmapped else "off (computed outside the module)"


def layer_error_figure(image: ImageParity, modes: list[str]) -> Image.Image:
    """The per-layer error plot of one image of a run: max |torch - reference| per layer on a log axis, one line
    per mode, the tolerance as a step line (``plots.error_plot``).

    Args:
        image: one of ``ParityRun.images``.
        modes: the run's modes (``ParityRun.modes``).

    Returns:
        The figure, a Pillow image (``plots.png_bytes`` encodes it).
    """
    results = image.report.layers
    title = f"{image.name}: max |torch - reference| per layer"
    return error_plot(LAYERS, _plot_series(results, modes), _tolerance_line(results), title)


def _figures(run: ParityRun) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i, image in enumerate(run.images, start=1):
        files[f"{slug(i, image.name)}-errors.png"] = png_bytes(layer_error_figure(image, run.modes))
        for layer in heat_map_layers(image):
            result = image.report.layer(layer)
            for mode, comparison in result.comparisons.items():
                diff = result.diff_maps[mode][0]
                caption = f"{image.name}: |difference| at {layer} ({mode} mode), largest over channels"
                picture = heat_map(diff, caption, comparison.atol, backdrop=image.pixels)
                files[heat_map_name(i, image, layer, mode)] = png_bytes(picture)
    return files


# --- the page -----------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.2e}")


def _summary_table(run: ParityRun) -> str:
    rows = []
    modes = [m for m in MODES if m in run.modes]
    head = "".join(f"<th>{m} max abs</th><th>{m} max rel</th><th>{m} over</th>" for m in modes)
    for layer in run.layer_summaries():
        cells = ""
        for mode in modes:
            s = layer[mode]
            if s is None:
                cells += f"<td>{not_compared(layer['unmapped'])}</td><td>-</td><td>-</td>"
                continue
            cells += f"<td>{_fmt(s['max_abs'])}</td><td>{_fmt(s['max_rel'])}</td><td>{s['fraction_over']:.3%}</td>"
        failing = ", ".join(layer["failing_images"]) or "-"
        index = layer["worst_index"]
        where = "-" if index is None else ", ".join(f"{k} {v}" for k, v in index.items())
        rows.append(
            f"<tr class='{'ok' if layer['passed'] else 'fail'}'><td>{_e(layer['name'])}</td>{cells}"
            f"<td>{_e(failing)}</td><td class='mono'>{_e(where)}</td></tr>"
        )
    return (
        f"<table><tr><th>layer</th>{head}<th>failing images</th><th>worst element</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _image_table(image: ImageParity) -> str:
    rows = []
    for r in image.report.layers:
        cells = ""
        for mode in image.report.modes:
            c = r.comparisons.get(mode)
            if c is None:
                cells += f"<td>{not_compared(r.unmapped)}</td>" + "<td>-</td>" * 4
                continue
            cells += f"<td>{_fmt(c.max_abs)}</td><td>{_fmt(c.p99_abs)}</td><td>{_fmt(c.max_rel)}</td>"
            cells += f"<td>{c.fraction_over:.3%}</td><td>{_fmt(c.min_atol)}</td>"
        further = further_from_exact(r) or "-"
        growth = "-" if r.growth is None else f"&times;{r.growth:.3g}"
        index = None if r.headline is None else r.headline.worst_index
        where = "-" if index is None else ", ".join(f"{k} {v}" for k, v in index.items())
        rows.append(
            f"<tr class='{'ok' if r.passed else 'fail'}'><td>{_e(r.name)}</td>{cells}<td>{growth}</td>"
            f"<td>{_e(further)}</td><td class='mono'>{_e(where)}</td></tr>"
        )
    head = "".join(
        f"<th>{m} max abs</th><th>p99 abs</th><th>max rel</th><th>over</th><th>min atol</th>"
        for m in image.report.modes
    )
    return (
        f"<table><tr><th>layer</th>{head}<th>growth</th><th>further from float64</th><th>worst element</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _failure_block(report: ParityReport, first: str) -> str:
    """The first divergent layer with its failures, the layers wrong by themselves (local mode), and one line for
    the layers that only inherit the error downstream; every message in a collapsed block (and in the JSON)."""
    per_mode = ", ".join(f"{m}: {report.first_divergent(m) or 'none'}" for m in report.modes)
    own = [(first, mode, c) for mode, c in report.layer(first).comparisons.items() if not c.passed]
    own += [(r.name, LOCAL, r.local) for r in report.layers if r.name != first and r.local and not r.local.passed]
    inherited = [
        r.name
        for r in report.layers
        if r.name != first and r.cumulative and not r.cumulative.passed and (r.local is None or r.local.passed)
    ]
    lines = [f"<p>First divergent layer: <b>{_e(first)}</b> ({_e(per_mode)}).</p>"]
    lines.append("<ul>" + "".join(f"<li><code>[{m}] {_e(c.message())}</code></li>" for _, m, c in own) + "</ul>")
    if inherited:
        count = f"{len(inherited)} layer{'s' * (len(inherited) > 1)}"
        lines.append(
            f"<p>and {count} downstream, inherited (over tolerance in cumulative mode only, within it fed the "
            f"reference's input): {_e(', '.join(inherited))}.</p>"
        )
    every = report.failures()
    lines.append(
        f"<details><summary>All {len(every)} failure messages</summary><ul>"
        + "".join(f"<li><code>{_e(f)}</code></li>" for f in every)
        + "</ul></details>"
    )
    return "\n".join(lines)


def _image_section(index: int, image: ImageParity, files: dict[str, bytes]) -> str:
    status = "passed" if image.passed else "FAILED"
    parts = [
        f"<h2>{_e(image.name)} <span class='{status.lower()}'>{status}</span></h2>",
        f"<p>{image.width} &times; {image.height} pixels, {_e(image.source)}; {image.seconds:.1f} s. "
        f"Float64 attribution: {_e(image.attributed.describe())}.</p>",
    ]
    parts += [f"<p>Note: {_e(note)}</p>" for note in image.notes]
    first = image.report.first_divergent_layer
    if first is not None:
        parts.append(_failure_block(image.report, first))
    plot = f"{slug(index, image.name)}-errors.png"
    parts.append(
        f"<figure><img src='{plot}' alt='error per layer'><figcaption>Max |difference| per layer, log scale. Grey: "
        "the tolerance (for the cumulative detector layers, whose tolerance adds a bound on inherited error per "
        "element, the largest applied); red rings: over tolerance; grey rings: over tolerance against the reference "
        "but within it of the float64 value (the reference drifted); hollow markers: exactly zero; a gap in a line: "
        "a layer not compared in that mode (shaded and marked where no mode compared it)."
        "</figcaption></figure>"
    )
    for layer in heat_map_layers(image):
        for mode in image.report.modes:
            name = heat_map_name(index, image, layer, mode)
            if name in files:
                what = "first divergent layer" if layer == first else "final output"
                parts.append(
                    f"<figure><img src='{name}' alt='{_e(layer)} {mode}'><figcaption>{_e(layer)}, {what}, {mode} mode: "
                    "|torch - reference| at each pixel (largest over channels and time steps), log colour scale over "
                    "four decades, drawn over a faint grey copy of the input (colours fade out towards the scale's "
                    "floor); the red mark on the bar is the tolerance.</figcaption></figure>"
                )
    parts.append(f"<div class='scroll'>{_image_table(image)}</div>")
    if image.gradients is not None:
        from .gradients import render_gradients

        parts.append(
            "<h3>Gradients and optimiser steps</h3><p>Each row: a layer's backward pass, walking back from the loss; "
            "columns f64, local, f32: max |torch - reference| over the gradient's scale in the float64 builds, the "
            "layer alone at the reference's inputs (float32), and float32 as in use (reported); see the training "
            "parity guide.</p>"
        )
        parts.append(f"<div class='scroll'><pre>{_e(render_gradients(image.gradients, 'official'))}</pre></div>")
    return "\n".join(parts)


def _page(run: ParityRun, files: dict[str, bytes]) -> str:
    status = "passed" if run.passed else "failed"
    reference, torch_side = run.reference, run.torch
    notes = "".join(f"<li>{_e(n)}</li>" for n in torch_side.get("notes", []))
    tolerance = run.tolerance
    tolerance_text = (
        "the project's per-layer policy (parity_tests/tolerances.py)"
        if tolerance["policy"] == "project"
        else f"uniform atol {tolerance['atol']:g}, rtol {tolerance['rtol']:g}"
    )
    sections = "\n".join(_image_section(i, image, files) for i, image in enumerate(run.images, start=1))
    versions = ", ".join(f"{k} {v}" for k, v in run.versions.items())
    modes = " and ".join(run.modes)
    title = f"ManTraNet parity: {Path(str(reference['path'])).name}"
    return html_page(
        title,
        "mantranet parity",
        f"""<h1>ManTraNet parity report</h1>
<p class="{status}"><b>{_e(verdict(run))}</b></p>
<p>Reference (TensorFlow): <code>{_e(reference["path"])}</code>, {_e(reference["release"])}
 (identified by {_e(reference["identified_by"])}).<br>
PyTorch: {_e(torch_side["description"])}.<br>
Modes: {_e(modes)}. Tolerance: {_e(tolerance_text)}. {_e(versions)}.<br>
Machine-readable: <a href="{JSON_NAME}">{JSON_NAME}</a>.</p>
{f"<ul>{notes}</ul>" if notes else ""}
<h2>All images: the worst over the images, per layer</h2>
<div class="scroll">{_summary_table(run)}</div>
{sections}""",
    )
