"""``mantranet parity``: the first layer where the PyTorch model and the TensorFlow reference part ways, on the
user's own weight file and images.

TensorFlow is imported inside ``run`` only, so every other command works without it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from converter import ConversionError, convert_h5
from converter.atomic import write_bytes_atomic
from converter.convert import tool_version
from mantranet_torch import LAYERS, ManTraNet, WeightFileError, scale_pixels
from mantranet_torch.memory import available_memory
from mantranet_torch.model import DETECTOR_LAYERS
from parity_tests.oracle import Oracle
from parity_tests.report import Attributed, ImageParity, ParityRun, render_table
from parity_tests.report_page import ReportError, check_target, write_report
from parity_tests.runner import Reference, run_parity
from parity_tests.tolerances import DEFAULT_ATOL, DEFAULT_RTOL, LOCAL, MODES, POLICY, TolerancePolicy

from . import progress
from .errors import BAD_INPUT, CommandError
from .parity_inputs import Crop, InputImage, check_memory, read_inputs
from .parity_torch import torch_side

# The float64 feature extractor is the slow part of attribution: one image took 4.0 s with the whole network in
# float64 and 1.5 s with the detector alone at 48 x 48, 49 s and 33 s at 160 x 160 (2 busy cores). Beyond this size
# only the detector is evaluated in float64 (its drift, the official window means', grows with the image).
FULL_ATTRIBUTION_PIXELS = 96 * 96
TRACE_STEPS = 10  # the reference's trace, counted as this many layer steps for the progress estimate


def torch_threads() -> int:
    """PyTorch's threads while TensorFlow shares the machine: half the cores. The two alternate layer by layer
    and TensorFlow's pool keeps spinning between its ops: on 2 cores, 1 PyTorch thread ran the built-in set in
    29 s and a 160 x 160 image in 29 s, 2 threads in 57 s and 38 s."""
    return max(1, (os.cpu_count() or 2) // 2)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="compare the PyTorch port with the TensorFlow reference layer by layer, on your weights and images",
        description="Run the TensorFlow reference on WEIGHTS.h5 and the PyTorch model on the same file converted "
        "in memory (or on --torch-weights), tap every named layer in both, and compare them per image: max, mean and "
        "99th-percentile absolute and relative error, the worst element's position, the fraction over tolerance and "
        "the tolerance that would pass, NaN/Inf differences first. Two modes side by side: cumulative (each "
        "framework on its own outputs, as in use) and local (each PyTorch layer fed the reference's input, so its "
        "error is its own); a float64 evaluation says which framework drifted. Without IMAGE, a built-in set is "
        "used (noise, flat, near-flat, gradient, checkerboard, copy-move forgery). Exit status: 0 every layer "
        "within tolerance, 1 some layer is not, 2 bad input.",
    )
    p.add_argument("weights", type=Path, metavar="WEIGHTS.h5", help="an official-layout ManTraNet Keras file")
    p.add_argument("images", type=Path, nargs="*", metavar="IMAGE", help="images to compare on (default: built-in)")
    p.add_argument(
        "--torch-weights",
        type=Path,
        action="append",
        metavar="FILE",
        help="PyTorch weights instead of WEIGHTS.h5 converted: ours (.safetensors/.pt), or the earlier PyTorch "
        "port's MantraNetv4.pt, IMTFEv4.pt and AnomalyDetectorv4.pt (give this option twice for the pair); a "
        "checkpoint of one part is completed with the other part from WEIGHTS.h5",
    )
    p.add_argument(
        "--variant", type=int, metavar="N", help="the release 0-4 of WEIGHTS.h5, when hash and name do not tell"
    )
    p.add_argument("--report", type=Path, metavar="DIR", help="write an HTML page with plots and heat maps to DIR")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the machine-readable report to FILE")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument(
        "--atol",
        type=float,
        metavar="A",
        help="judge every layer by this absolute tolerance instead of the per-layer policy (an element fails when "
        f"over both atol and rtol x |reference|; defaults {DEFAULT_ATOL:g} and {DEFAULT_RTOL:g}); in cumulative "
        "mode the detector's layers from bnorm on still add a bound on the error they inherit",
    )
    p.add_argument("--rtol", type=float, metavar="R", help="judge every layer by this relative tolerance (see --atol)")
    p.add_argument("--local", action="store_true", help="local mode only (default: cumulative and local side by side)")
    p.add_argument(
        "--crop",
        metavar="WxH[+X+Y]",
        help="compare on a W x H region of each image (centred unless +X+Y gives its top-left corner); the "
        "comparison keeps every layer's output in memory, about 45 KB per pixel",
    )
    p.set_defaults(run=run)


def tolerance_policy(atol: float | None, rtol: float | None) -> tuple[TolerancePolicy, dict]:
    """The project's per-layer policy, or one tolerance for every layer when --atol or --rtol is given."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise CommandError(f"{flag} {value}: must be a finite number >= 0", BAD_INPUT)
    if atol is None and rtol is None:
        return POLICY, {"policy": "project", "table": POLICY.to_dict()}
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = DEFAULT_RTOL if rtol is None else rtol
    policy = TolerancePolicy.uniform(atol, rtol)
    return policy, {"policy": "uniform", "atol": atol, "rtol": rtol, "table": policy.to_dict()}


# --- progress -----------------------------------------------------------------------------------------------


class Progress:
    """Layers done for the current image, as a bar (``progress.bar``: drawn on a terminal only) whose steps are
    the reference's trace and each mode's layers; tqdm estimates the time left."""

    def __init__(self, total_images: int, modes: list[str], stream: TextIO | None = None) -> None:
        self.total_images, self.modes, self.stream = total_images, modes, stream
        self.steps = TRACE_STEPS + len(modes) * len(LAYERS)
        self.bar = None

    def start(self, index: int, image: InputImage) -> None:
        height, width = image.pixels.shape[:2]
        self.finish()
        label = f"image {index}/{self.total_images} {image.name} ({width} x {height})"
        self.bar = progress.bar(self.steps, label, unit="step", stream=self.stream)
        self.bar.set_postfix_str("tracing the reference")

    def traced(self) -> None:
        self.bar.update(TRACE_STEPS)
        self.bar.set_postfix_str("reference traced")

    def layer(self, mode: str, name: str) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"{mode} {LAYERS.index(name) + 1}/{len(LAYERS)} {name}")

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TracingReference:
    """The reference as ``run_parity`` sees it, telling the progress display when its trace is done."""

    def __init__(self, reference: Reference, progress: Progress) -> None:
        self.reference, self.progress = reference, progress
        self.arrays = reference.arrays

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.reference.trace(x)
        self.progress.traced()
        return out


# --- the run ------------------------------------------------------------------------------------------------


def attribution_for(pixels: int, modes: list[str]) -> tuple[list[str] | None, Attributed]:
    """``oracle_layers`` for ``run_parity`` and what it covers: every layer on small images, else the detector's,
    in both modes from the reference's features (``cumulative_from_reference``)."""
    if pixels <= FULL_ATTRIBUTION_PIXELS:
        return None, Attributed(list(LAYERS), modes, f"{pixels} pixels: the whole network in float64")
    reason = (
        f"{pixels} pixels > {FULL_ATTRIBUTION_PIXELS}: the float64 feature extractor is slow at this size, so the "
        "float64 detector starts from the reference's features"
    )
    return list(DETECTOR_LAYERS), Attributed(list(DETECTOR_LAYERS), modes, reason)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null: TensorFlow's C++ start-up notices bypass Python and its log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import_reference():
    try:
        with _native_stderr_silenced():
            import reference
    except ImportError as e:
        raise CommandError(
            f"the TensorFlow reference needs TensorFlow ({e}); "
            "install it with: pip install 'mantranet-torch[reference]'",
            BAD_INPUT,
        ) from None
    return reference


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "mantranet-torch": tool_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compare_images(
    parity: ParityRun,
    images: list[InputImage],
    ref: Reference,
    model: ManTraNet,
    oracle: Oracle,
    policy: TolerancePolicy,
    progress: Progress,
) -> None:
    """Run the engine on each image in turn, adding its report to ``parity``."""
    modes = parity.modes
    for index, image in enumerate(images, start=1):
        height, width = image.pixels.shape[:2]
        oracle_layers, attributed = attribution_for(height * width, modes)
        x = scale_pixels(torch.from_numpy(image.pixels)).numpy()[None]
        progress.start(index, image)
        started = time.perf_counter()
        report = run_parity(
            TracingReference(ref, progress),
            model,
            x,
            oracle=oracle,
            oracle_layers=oracle_layers,
            modes=modes,
            policy=policy,
            progress=progress.layer,
            cumulative_from_reference=True,
        )
        progress.finish()
        seconds = time.perf_counter() - started
        parity.images.append(
            ImageParity(image.name, image.source, height, width, image.notes, attributed, report, seconds)
        )


def check_json_target(path: Path, report: Path | None, force: bool) -> None:
    """Refuse, before any work, a --json path that cannot be written or would replace a file unasked."""
    if path.is_dir():
        raise CommandError(f"--json {path}: is a folder; give a file name", BAD_INPUT)
    if report is not None and path.resolve().is_relative_to(report.resolve()):
        raise CommandError(
            f"--json {path}: inside the --report folder, which is replaced whole (it holds its own report.json)",
            BAD_INPUT,
        )
    if path.exists() and not force:
        raise CommandError(f"--json {path}: already exists; pass --force to replace it", BAD_INPUT)


def run(args: argparse.Namespace) -> int:
    policy, tolerance = tolerance_policy(args.atol, args.rtol)
    modes = [LOCAL] if args.local else list(MODES)
    crop = Crop.parse(args.crop) if args.crop else None
    try:
        if args.report is not None:
            check_target(args.report)
        if args.json is not None:
            check_json_target(args.json, args.report, args.force)
        images = read_inputs(args.images, crop)
        check_memory(images, available_memory())
        conversion = convert_h5(args.weights, args.variant)
        side = torch_side(args.torch_weights, conversion)
        reference = _import_reference()
        ref = reference.load(args.weights, args.variant)
    except (ConversionError, WeightFileError, ReportError) as e:
        raise CommandError(str(e), BAD_INPUT) from None
    ident = conversion.identification
    release = ident.release.file if ident.release else f"release {ident.index}"
    print(f"reference: {args.weights}: {release} (identified by {ident.by}), TensorFlow")
    print(f"torch: {side.description}")
    for note in side.notes:
        print(f"  note: {note}")
    sys.stdout.flush()

    parity = ParityRun(
        reference={
            "path": str(args.weights),
            "release": release,
            "variant": ident.index,
            "identified_by": ident.by,
            "config": conversion.config.to_dict(),
        },
        torch={"description": side.description, "paths": side.paths, "notes": side.notes},
        tolerance=tolerance,
        modes=modes,
        versions=_versions(),
    )
    oracle = Oracle(ref.arrays, ref.config)
    progress = Progress(len(images), modes)
    with _torch_threads(torch_threads()):
        compare_images(parity, images, ref, side.model, oracle, policy, progress)

    print()
    print(render_table(parity))
    try:
        if args.json is not None:
            write_bytes_atomic(args.json, parity.to_json().encode(), force=args.force)
            print(f"wrote {args.json}")
        if args.report is not None:
            write_report(parity, args.report)
            print(f"wrote {args.report / 'index.html'}")
    except (ConversionError, ReportError, OSError) as e:
        raise CommandError(f"cannot write the report: {e}", BAD_INPUT) from None
    return 0 if parity.passed else 1
