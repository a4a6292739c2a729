"""``mantranet synth``: a dataset of forgeries made from authentic photographs (logic in ``training.synthetic``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import progress
from .errors import CommandError


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a dataset of forgeries made from a folder of authentic photographs",
        description="Copy-move, splicing, removal (OpenCV inpainting) and enhancement forgeries with polygon, Bezier "
        "and blob masks, and authentic crops, cut at the photographs' native resolution: images/, masks/, "
        "manifest.csv (read by evaluate and train), forgeries.jsonl and recipe.json. The same seed writes the "
        "same bytes. Exit status 1 when a photograph could not be read.",
    )
    p.add_argument("photos", type=Path, metavar="PHOTOS_DIR", help="folder of authentic photographs (recursive)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="new folder for the dataset")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole dataset (default 0)")
    p.add_argument("--size", "--crop", type=int, default=256, dest="size", help="side of each image (default 256)")
    p.add_argument("--kinds", type=_kinds, metavar="K,K,...", help="mix of kinds, repeat one for more of it "
                   "(default: authentic,copymove,splice,removal,enhance)")  # fmt: skip
    p.add_argument("--area", type=float, nargs=2, metavar=("MIN", "MAX"), help="forged fraction of an image "
                   "(default 0.02 0.30)")  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from training.synthetic import KINDS, MAX_AREA, MIN_AREA, DataError, Recipe, write_synthetic
    except ImportError as e:
        raise CommandError(f"synth needs the train extra: pip install 'mantranet-torch[train]' ({e})") from None

    try:
        low, high = args.area or (MIN_AREA, MAX_AREA)
        recipe = Recipe(kinds=args.kinds or KINDS, min_area=low, max_area=high)
        with progress.bar(args.n, "synth", unit="img") as bar:
            result = write_synthetic(
                args.photos, args.output, args.n, args.size, args.seed, recipe, lambda done, _: bar.update(done - bar.n)
            )
    except DataError as e:
        raise CommandError(str(e)) from None
    counts = ", ".join(f"{count} {kind}" for kind, count in result.counts.items())
    print(f"{args.output}: {args.n} images of {args.size} x {args.size} ({counts}), seed {args.seed}")
    print(f"manifest: {result.manifest}")
    for name, why in result.small:
        print(f"mantranet synth: left out {name}: {why}", file=sys.stderr)
    for name, why in result.skipped:
        print(f"mantranet synth: skipped {name}: {why}", file=sys.stderr)
    return 1 if result.skipped else 0
