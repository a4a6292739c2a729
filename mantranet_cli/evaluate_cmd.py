"""``mantranet evaluate``: the standard forgery-localisation metrics on a dataset (logic in ``evaluation``)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mantranet_torch.files import check_writable_folder, file_problem
from mantranet_torch.image_files import DEFAULT_MAX_PIXELS
from mantranet_torch.precision import PRECISIONS
from mantranet_torch.tiling import MIN_TILE

from . import progress
from .errors import CommandError

GB = 2**30


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score the model on a dataset with ground-truth masks",
        description="Pixel-level (per-image and pooled) and image-level metrics on a dataset: a manifest (CSV "
        "image,mask[,label] or JSON lines) or a benchmark folder. Full resolution by default. Each image's result "
        "is stored as it finishes (--store), so a rerun resumes. Exit status 1 when any entry was skipped.",
    )
    p.add_argument("dataset", type=Path, help="manifest (.csv/.jsonl) or dataset folder")
    p.add_argument("-w", "--weights", type=Path, required=True, help=".safetensors/.pt (ours) or an official .h5")
    p.add_argument("--variant", type=int, metavar="N", help="the release 0-4 of an .h5 its hash and name do not tell")
    p.add_argument("--layout", help="the folder's layout (default: recognised by its sub-folders)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write metrics, counts, skipped entries, options")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write one line per image and row")
    p.add_argument("--save-maps", type=Path, metavar="DIR", help="write each image's float32 map as DIR/<name>.npy")
    p.add_argument("--report", type=Path, metavar="DIR", help="write ROC/PR curves and the best and worst images")
    p.add_argument("--store", type=Path, metavar="DIR", help="where per-image results are kept (default: user cache)")
    p.add_argument("--image-score", choices=("max", "mean", "p99"), default="max", help="image-level score of a map")
    p.add_argument(
        "--perturb",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra row: jpeg:Q, resize:F, blur:SIGMA, noise:SIGMA, or a chain a+b (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise perturbation (default 0)")
    p.add_argument("--resize", type=int, metavar="LONG_SIDE", help="resize images so the longer side is LONG_SIDE")
    p.add_argument("--resize-masks", action="store_true", help="resize masks whose size differs (nearest)")
    p.add_argument("--mask-threshold", type=int, help="forged where the mask is above this (default: the layout's)")
    p.add_argument("--invert-masks", action="store_true", help="forged where the mask is dark")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tile", type=int, metavar="SIZE", help=f"compute in exact tiles of SIZE (>= {MIN_TILE})")
    size.add_argument("--max-memory", type=float, metavar="GB", help="memory for all workers together (2^30 bytes)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (local, default 1) or Ray actors")
    p.add_argument("--threads", type=int, metavar="N", help="threads per worker (default: cores / workers; Ray: 1)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--compare-reference", action="store_true", help="also run the TensorFlow reference")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N", help="refuse larger images")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import evaluation
    except ImportError as e:
        raise CommandError(f"evaluate needs scikit-learn: pip install 'mantranet-torch[eval]' ({e})") from None
    from evaluation.store import default_store

    if args.tile is not None and args.tile < MIN_TILE:
        raise CommandError(f"--tile {args.tile}: tiles must be at least {MIN_TILE} pixels")
    for flag in ("max_memory", "workers", "threads", "resize"):
        value = getattr(args, flag)
        if value is not None and not (0 < value < math.inf):  # NaN and inf too
            raise CommandError(f"--{flag.replace('_', '-')} {value}: must be a positive, finite number")
    if args.engine == "local" and args.ray_address:
        raise CommandError("--ray-address needs --engine ray")
    problem = file_problem(args.weights)  # a folder, a FIFO, a link loop: named as such
    if problem is not None:
        raise CommandError(f"{args.weights}: {problem}")
    try:
        perturbations = [evaluation.Perturbation.parse(spec) for spec in args.perturb]
        dataset = evaluation.load_dataset(args.dataset, args.layout)
        rule = dataset.mask_rule
        if args.mask_threshold is not None or args.invert_masks:
            rule = evaluation.MaskRule(
                rule.channel,
                rule.threshold if args.mask_threshold is None else args.mask_threshold,
                args.invert_masks or rule.inverted,
            )
            dataset.mask_rule = rule
    except (evaluation.PerturbationError, evaluation.DatasetError, ValueError) as e:
        raise CommandError(str(e)) from None
    workers = args.workers or 1
    config = evaluation.Config(
        weights=args.weights,
        store=args.store or default_store(),
        variant=args.variant,
        options=evaluation.Options(
            precision=args.precision,
            resize=args.resize,
            resize_masks=args.resize_masks,
            seed=args.seed,
            mask_rule=rule,
            max_pixels=args.max_pixels,
        ),
        execution=evaluation.Execution(
            tile=args.tile,
            max_memory=args.max_memory / workers if args.max_memory else None,
            threads=args.threads,
        ),
        perturbations=perturbations,
        image_score=args.image_score,
        compare_reference=args.compare_reference,
        engine=args.engine,
        workers=args.workers,
        ray_address=args.ray_address,
        save_maps=args.save_maps,
    )
    for output in (args.json, args.csv, args.report):  # an unwritable place fails now, not after the dataset
        if output is not None:
            check_writable_folder(output.parent)
    if args.save_maps is not None:
        check_writable_folder(args.save_maps)
    bar = ProgressLine()
    try:
        result = evaluation.evaluate(dataset, config, progress=bar)
    except (RuntimeError, ValueError) as e:  # an engine that cannot start, TensorFlow missing, bad weights
        raise CommandError(str(e)) from None
    finally:
        bar.close()
    evaluation.write_outputs(result, args.json, args.csv)
    if args.report:
        from evaluation.report import write_report

        write_report(result, args.report)
    print_summary(result, args)
    return 1 if result.skipped else 0


class ProgressLine:
    """Records done, throughput and ETA on stderr (``progress.bar``: drawn on a terminal only)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress.bar(total, "evaluate", unit="img", initial=done)
            return
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _difference(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1e}"


def print_summary(result, args: argparse.Namespace) -> None:
    from evaluation import METRICS

    d, w = result.dataset, result.weights
    print(
        f"{d['source']} ({d['layout']}, masks {d['mask_rule']}): {d['forged']} forged, {d['authentic']} authentic; "
        f"weights {w['release'] or w['path']} (git blob {w['git_blob_sha1'][:12]})"
    )
    data = result.to_json()
    header = ["perturbation", *METRICS]
    lines = [header]
    for row in data["rows"]:
        lines.append([row["perturbation"], *(_cell(row["metrics"][k]) for k in METRICS)])
        if "reference" in row:
            lines.append(["  tensorflow", *(_cell(row["reference"][k]) for k in METRICS)])
            lines.append(["  difference", *(_difference(row["difference"][k]) for k in METRICS)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    base = data["rows"][0]["counts"]
    c = result.counts
    print(
        f"{base['images']} images scored ({base['forged_with_mask']} forged with masks, {base['pixel_auc_excluded']} "
        f"excluded from pixel_auc: one-class mask); {c['computed']} records computed, {c['resumed']} resumed from "
        f"{args.store or 'the cache'}; {c['skipped']} skipped; {result.seconds:.1f} s"
    )
    for name, why in result.skipped:
        print(f"mantranet evaluate: skipped {name}: {why}", file=sys.stderr)
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--save-maps", args.save_maps),
                       ("--report", args.report)):  # fmt: skip
        if path is not None:
            print(f"{flag}: {path}")
