"""``mantranet convert``: an official Keras HDF5 file to PyTorch weights with a provenance manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from converter import convert_h5, output_paths, save_conversion
from converter.convert import FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official ManTraNet .h5 file to safetensors or .pt",
        description="Convert an official-layout ManTraNet Keras HDF5 file into PyTorch weights, with h5py alone. "
        "The release is identified by content hash, else by file name, else by --variant.",
    )
    p.add_argument("input", type=Path, metavar="IN.h5")
    p.add_argument("-o", "--output", type=Path, help="output file or directory (default: the weights folder)")
    p.add_argument("--variant", type=int, metavar="N", help="the release 0-4, when hash and name do not tell")
    p.add_argument("--format", choices=sorted(FORMATS), default="safetensors")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    conversion = convert_h5(args.input, args.variant)
    target, manifest_path = output_paths(args.input, args.output, args.format)
    manifest = save_conversion(conversion, target, manifest_path, force=args.force)
    ident = conversion.identification
    what = f"{ident.release.file}" if ident.release else f"release {ident.index}"
    print(
        f"{args.input}: {what} (identified by {ident.by}), {conversion.keras.layout} layout, "
        f"{len(conversion.keras.arrays)} arrays"
    )
    print(f"  config: {conversion.config.to_dict()}")
    print("  verified: strict load, bit-exact round trip, finite probe output")
    print(f"wrote {target} (sha256 {manifest['output']['sha256'][:16]}...)")
    print(f"wrote {manifest_path}")
    return 0
