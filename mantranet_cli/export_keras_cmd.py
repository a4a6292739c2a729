"""``mantranet export-keras``: our weights back to an official-layout Keras HDF5 file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from converter.export import export_keras
from converter.keras_h5 import LAYOUTS, WEIGHTS_ONLY


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-keras",
        help="write PyTorch weights as an official-layout Keras .h5 file",
        description="Write a .safetensors or .pt file of this project as an official-layout Keras 2 HDF5 file "
        "(35 arrays, attributes as Keras 2.2 writes them), which the original Keras code loads as it loads the "
        "official releases.",
    )
    p.add_argument("weights", type=Path, metavar="WEIGHTS", help="a .safetensors or .pt file of this project")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.h5")
    p.add_argument("--layout", choices=LAYOUTS, default=WEIGHTS_ONLY, help="default: %(default)s")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--variant", type=int, metavar="N", help="the release 0-4 whose architecture a file without a "
                   "config in its metadata has")  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    export = export_keras(args.weights, args.output, layout=args.layout, force=args.force, variant=args.variant)
    source = (export.provenance or {}).get("source")
    origin = f" (converted from {source['name']})" if isinstance(source, dict) and "name" in source else ""
    order = "first Featex layers last, as the official loader expects" if export.frozen_order else "natural order"
    print(f"{args.weights}: config {export.config.to_dict()}{origin}")
    print(f"wrote {export.target}: {export.layout} layout, {export.arrays} arrays, Featex weights in {order}")
    for warning in export.warnings:
        print(f"mantranet export-keras: warning: {export.target}: {warning}", file=sys.stderr)
    return 0
