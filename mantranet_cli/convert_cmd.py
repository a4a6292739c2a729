"""``mantranet convert``: an official Keras HDF5 file, or the earlier PyTorch port's checkpoints, to PyTorch
weights with a provenance manifest."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from converter import convert_h5, output_paths, save_conversion
from converter.convert import FORMATS
from converter.legacy import PART_NAMES, EarlierPortWarning, load_earlier_port
from mantranet_torch.weights import H5_SUFFIXES, SAFETENSORS_SUFFIX

from .errors import CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official ManTraNet .h5 file (or the earlier PyTorch port's .pt) to safetensors or .pt",
        description="Convert an official-layout ManTraNet Keras HDF5 file into PyTorch weights, with h5py alone. "
        "The release is identified by content hash, else by file name, else by --variant. Also imports the "
        "earlier PyTorch port's checkpoints: MantraNetv4.pt, or IMTFEv4.pt with AnomalyDetectorv4.pt (with Ptrain4's "
        "config unless --variant says otherwise); AnomalyDetectorv4.pt alone gives a partial, detector-only file.",
    )
    p.add_argument(
        "inputs", type=Path, nargs="+", metavar="IN", help="one .h5 file, or one or two checkpoints of the earlier port"
    )
    p.add_argument("-o", "--output", type=Path, help="output file or directory (default: the weights folder)")
    p.add_argument("--variant", type=int, metavar="N", help="the release 0-4, when hash and name do not tell")
    p.add_argument("--format", choices=sorted(FORMATS), default="safetensors")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    ours = next((p for p in args.inputs if p.suffix.lower() == SAFETENSORS_SUFFIX), None)
    if ours is not None:
        raise CommandError(
            f"{ours}: a .safetensors file is already PyTorch weights: convert reads official .h5 files and the "
            "earlier port's .pt checkpoints; load it directly (mantranet detect -w, mantranet_torch.load)"
        )
    if any(p.suffix.lower() in H5_SUFFIXES for p in args.inputs):
        if len(args.inputs) != 1:
            raise CommandError("convert one .h5 file at a time; only the earlier port's .pt files come in pairs")
        return convert_keras(args, args.inputs[0])
    return import_earlier_port(args)


def convert_keras(args: argparse.Namespace, source: Path) -> int:
    conversion = convert_h5(source, args.variant)
    target, manifest_path = output_paths(source, args.output, args.format)
    manifest = save_conversion(conversion, target, manifest_path, force=args.force)
    ident = conversion.identification
    what = f"{ident.release.file}" if ident.release else f"release {ident.index}"
    print(
        f"{source}: {what} (identified by {ident.by}), {conversion.keras.layout} layout, "
        f"{len(conversion.keras.arrays)} arrays"
    )
    print(f"  config: {conversion.config.to_dict()}")
    for note in conversion.keras.notes:
        print(f"  note: {note}")
    print("  verified: strict load, bit-exact round trip, finite probe output")
    print(f"wrote {target} (sha256 {manifest['output']['sha256'][:16]}...)")
    print(f"wrote {manifest_path}")
    return 0


def import_earlier_port(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EarlierPortWarning)
        _, result = load_earlier_port(args.inputs, args.variant)
    target, manifest_path = output_paths(Path(result.output_stem), args.output, args.format)
    if any(target.resolve() == p.resolve() for p in args.inputs):
        raise CommandError(f"{target}: is an input; choose another output with -o")
    manifest = save_conversion(result, target, manifest_path, force=args.force)
    for source in result.sources:
        parts = " and ".join(PART_NAMES[p] for p in source.parts)
        if source.checkpoint:
            print(f"{source.path}: the earlier PyTorch port's {source.checkpoint.file} (by content hash), {parts}")
        else:
            print(f"{source.path}: a checkpoint of the earlier PyTorch port (by its keys), {parts}")
    print(f"  config: {result.config.to_dict()} ({result.identified_by})")
    print("  verified: strict load, finite probe output")
    for w in caught:
        print(f"mantranet convert: warning: {w.message}", file=sys.stderr)
    print(f"wrote {target} (sha256 {manifest['output']['sha256'][:16]}...)")
    print(f"wrote {manifest_path}")
    return 0
