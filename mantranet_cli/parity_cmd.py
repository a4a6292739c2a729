"""``mantranet parity``: the first layer where the PyTorch model and the TensorFlow reference part ways, on the
user's own weight file and images. Arguments in, ``parity_tests.run_parity`` does the work, the table out.

TensorFlow is imported inside ``run_parity`` only, so every other command works without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from converter import ConversionError
from mantranet_torch import LAYERS
from mantranet_torch.files import check_writable_folder, write_bytes_atomic
from parity_tests.api import DONE, IMAGE, LAYER, START, TRACED, ParityEvent, run_parity, suggest_map
from parity_tests.errors import ParityInputError
from parity_tests.gradients import OPTIMIZERS
from parity_tests.inputs import Crop
from parity_tests.report import render_table
from parity_tests.report_page import ReportError, check_target, write_report
from parity_tests.tolerances import DEFAULT_ATOL, DEFAULT_RTOL, LOCAL, MODES

from . import progress
from .errors import BAD_INPUT, CommandError

SUSPECT_ERROR = 1e-2  # a suggested module this far from the reference (relative to its scale) is flagged
TRACE_STEPS = 10  # the reference's trace, counted as this many layer steps for the progress estimate


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
        "--reference",
        default="ours",
        metavar="ours|official[:DIR]",
        help="what the PyTorch side is compared with: 'ours' (default), the project's TensorFlow re-implementation "
        "of the official numerics; 'official:DIR', your copy of the official ManTraNet code (DIR holds "
        "modelCore.py), run unmodified under tf_keras, in float64 too as the exact answer of the attribution; "
        "'official', the copy 'mantranet weights fetch --code' downloaded",
    )
    p.add_argument(
        "--torch-weights",
        type=Path,
        action="append",
        metavar="FILE",
        help="PyTorch weights instead of WEIGHTS.h5 converted: ours (.safetensors/.pt), or the earlier PyTorch "
        "port's MantraNetv4.pt, IMTFEv4.pt and AnomalyDetectorv4.pt (give this option twice for the pair); a "
        "checkpoint of one part is completed with the other part from WEIGHTS.h5; or an ONNX file written by "
        "`mantranet export-onnx --layers`, run in ONNX Runtime (cumulative mode)",
    )
    p.add_argument(
        "--candidate",
        metavar="FILE.py:FACTORY",
        help="compare another PyTorch implementation instead of ours: FACTORY in FILE.py returns the nn.Module with "
        "its weights loaded (called with WEIGHTS.h5 when it takes an argument); needs --layer-map",
    )
    p.add_argument(
        "--layer-map",
        type=Path,
        metavar="FILE.json",
        help="for --candidate: Keras layer name to the candidate's module path, with each output's layout (NCHW, "
        "NHWC; T marks the time axis of nestedAvgFeatex and divStd) and which output to take; layers it leaves "
        "out are reported as unmapped. The format is in parity_tests/candidate.py",
    )
    p.add_argument(
        "--suggest-map",
        type=Path,
        metavar="FILE.json",
        help="for --candidate: propose a layer map (modules matched to Keras layers by output shape in execution "
        "order, the closest to the reference where several fit) on the first IMAGE, write it to FILE.json for "
        "you to check and edit, and stop",
    )
    p.add_argument(
        "--candidate-input",
        default="NCHW:-1..1",
        metavar="LAYOUT:RANGE",
        help="with --suggest-map: how the candidate's forward takes the image (NCHW or NHWC; -1..1, 0..1 or 0..255)",
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
    p.add_argument(
        "--shrink",
        type=Path,
        metavar="DIR",
        help="when an image fails: search for the smallest crop of it, then the simplest pixel content, that still "
        "fails at the same first divergent layer; save it in DIR as PNG with the command line that reproduces it",
    )
    p.add_argument(
        "--shrink-budget",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="time the --shrink search may take, for all failing images together (default 60)",
    )
    training = p.add_argument_group("training parity (with --reference official)")
    training.add_argument(
        "--gradients",
        action="store_true",
        help="also compare the backward pass: the gradient of Keras 2.2's binary cross-entropy against a mask with "
        "respect to every weight array, the image and each layer's input, walking back from the loss; the first "
        "layer whose backward pass parts ways is named",
    )
    training.add_argument(
        "--train-steps",
        type=int,
        default=0,
        metavar="K",
        help="also run K optimiser steps on both sides from the "
        "same weights and batch (the original's constraints after each) and compare every array after each step",
    )
    training.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adam", help="Keras 2's Adam or SGD (default adam)"
    )
    training.add_argument("--lr", type=float, metavar="LR", help="learning rate (default Keras': adam 1e-3, sgd 0.01)")
    training.add_argument(
        "--train-mode", action="store_true", help="bnorm on the batch's statistics, as Keras' fit runs it"
    )
    training.add_argument(
        "--mask",
        type=Path,
        metavar="FILE",
        help="the loss's target: an image whose nonzero pixels are forged, of the "
        "compared (cropped) size (default: a random mask, --mask-seed)",
    )
    training.add_argument("--mask-seed", type=int, default=0, metavar="N", help="seed of the default random mask")
    p.set_defaults(run=run)


# --- progress -----------------------------------------------------------------------------------------------


class Progress:
    """``run_parity``'s events as a bar per image (``progress.bar``: drawn on a terminal only) whose steps are the
    reference's trace and each mode's layers; tqdm estimates the time left. The run's header goes to stdout when
    it starts."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream, self.bar = stream, None

    def __call__(self, event: ParityEvent) -> None:
        if event.kind == START:
            print_header(event.run.reference, event.run.torch)
        elif event.kind == IMAGE:
            self.close()
            height, width = event.image.pixels.shape[:2]
            label = f"image {event.index}/{event.count} {event.image.name} ({width} x {height})"
            steps = TRACE_STEPS + len(event.run.modes) * len(LAYERS)
            self.bar = progress.bar(steps, label, unit="step", stream=self.stream)
            self.bar.set_postfix_str("tracing the reference")
        elif event.kind == TRACED and self.bar is not None:
            self.bar.update(TRACE_STEPS)
            self.bar.set_postfix_str("reference traced")
        elif event.kind == LAYER and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{event.mode} {LAYERS.index(event.layer) + 1}/{len(LAYERS)} {event.layer}")
        elif event.kind == DONE:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_header(reference: dict, torch_side: dict) -> None:
    print(f"reference: {reference['description']}")
    print(f"torch: {torch_side['description']}")
    print(f"exact answer of the float64 attribution: {reference['exact']}")
    for note in torch_side["notes"]:
        print(f"  note: {note}")
    sys.stdout.flush()


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


def run_suggest(args: argparse.Namespace) -> int:
    if args.candidate is None:
        raise CommandError("--suggest-map needs --candidate FILE.py:FACTORY", BAD_INPUT)
    if args.suggest_map.exists() and not args.force:
        raise CommandError(f"--suggest-map {args.suggest_map}: already exists; pass --force to replace it", BAD_INPUT)
    layout, _, value_range = args.candidate_input.partition(":")
    try:
        mapping, suggestions = suggest_map(
            args.weights,
            args.candidate,
            args.images,
            input_layout=layout,
            input_range=value_range or "-1..1",
            variant=args.variant,
            crop=args.crop,
        )
    except ParityInputError as e:
        raise CommandError(str(e), BAD_INPUT) from None
    width = max([len(s.entry.module) for s in suggestions if s.entry is not None] + [len("module")]) + 2
    print(f"{'layer':<16}{'module':<{width}}{'layout':<8}{'output':<8}{'rel. error':>11}  modules of that shape")
    for s in suggestions:
        if s.entry is None:
            print(f"{s.layer:<16}{'(none: unmapped)':<{width}}{'':<16}{'-':>11}  {'; '.join(s.why)}")
            continue
        output = "-" if s.entry.output is None else json.dumps(s.entry.output)
        check = "  <- check: far from the reference" if s.relative_error > SUSPECT_ERROR else ""
        check += "" if s.entry.local else "  (local mode off: not this layer alone)"
        row = f"{s.layer:<16}{s.entry.module:<{width}}{s.entry.layout:<8}{output:<8}{s.relative_error:>11.1e}"
        print(f"{row}  {s.alternatives}{check}")
    try:
        write_bytes_atomic(args.suggest_map, (json.dumps(mapping.to_dict(), indent=2) + "\n").encode(), force=True)
    except (ConversionError, OSError) as e:
        raise CommandError(f"cannot write {args.suggest_map}: {e}", BAD_INPUT) from None
    print(
        f"wrote {args.suggest_map}: check it (a large relative error means the module computes something else, or "
        "the layer is computed outside any module), then run with --layer-map"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.suggest_map is not None:
        return run_suggest(args)
    modes = [LOCAL] if args.local else list(MODES)
    events = Progress()
    try:
        crop = Crop.parse(args.crop) if args.crop else None
        if args.report is not None:
            check_target(args.report)
        if args.json is not None:
            check_json_target(args.json, args.report, args.force)
        for output in (args.json, args.report):  # an unwritable place fails now, not after the comparison
            if output is not None:
                check_writable_folder(output.parent)
        if args.shrink is not None:
            check_writable_folder(args.shrink)
        parity = run_parity(
            args.weights,
            args.images,
            reference=args.reference,
            torch_weights=args.torch_weights,
            candidate=args.candidate,
            layer_map=args.layer_map,
            variant=args.variant,
            modes=modes,
            atol=args.atol,
            rtol=args.rtol,
            crop=crop,
            progress=events,
            shrink=args.shrink,
            shrink_budget=args.shrink_budget,
            gradients=args.gradients,
            train_steps=args.train_steps,
            optimizer=args.optimizer,
            lr=args.lr,
            train_mode=args.train_mode,
            mask=args.mask,
            mask_seed=args.mask_seed,
        )
    except (ParityInputError, ReportError, ConversionError) as e:
        raise CommandError(str(e), BAD_INPUT) from None
    finally:
        events.close()  # the bar of an image the run did not finish
    print()
    print(render_table(parity))
    for found in parity.shrunk:
        simplified = f", {', '.join(found['simplified'])}" if found["simplified"] else ""
        original = found["original"]
        print(
            f"shrunk {found['image']} ({original['width']} x {original['height']}) to {found['width']} x "
            f"{found['height']}{simplified}, still failing first at {found['layer']} ({found['checks']} checks, "
            f"{found['seconds']:.0f} s{', budget spent' if found['budget_exhausted'] else ''}): wrote {found['path']}"
        )
        if found["command"]:
            print(f"  reproduce: {found['command']}")
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
