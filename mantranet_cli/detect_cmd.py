"""``mantranet detect``: forgery maps for images and folders of images, tiled exactly when memory is short."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from converter import load_weights
from mantranet_torch.detection import Detection, detect_found
from mantranet_torch.files import check_writable_folder, write_bytes_atomic
from mantranet_torch.image_files import DEFAULT_MAX_PIXELS, find_images
from mantranet_torch.maps import encode_mask, encode_npy, encode_overlay
from mantranet_torch.precision import PRECISIONS, SlowPrecisionWarning, bf16_support, resolve_precision
from mantranet_torch.tiling import MIN_TILE
from mantranet_torch.weights import WeightCastWarning

from . import progress
from .errors import CommandError

DEFAULT_OUTPUT = Path("mantranet_out")
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_MEMORY_GB = 2.0**20  # a petabyte: beyond any machine, and far from int64 when counted in bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="forgery likelihood maps for images or folders of images",
        description="Write a forgery likelihood map for each image: OUTDIR/<name>.mask.png (8-bit, round(p*255)), "
        "and on request the raw float32 map (.npy) and a heat-map overlay. Images larger than memory allows are "
        "computed in tiles, with the same result as the whole image at once. Images are read as the official demo "
        "read them (OpenCV's IMREAD_COLOR): EXIF orientation applied, alpha dropped, grey and palette expanded, "
        "wider samples read by what they hold (8-bit values stored wide as they are, 16-bit by /256, floats in "
        "0..1 by *255; see docs/explanation/inputs.md), each conversion in a note. Existing outputs are kept (a "
        "rerun resumes) unless --force.",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="images, or folders to search")
    p.add_argument("-w", "--weights", type=Path, required=True, help=".safetensors/.pt (ours) or an official .h5")
    p.add_argument("--variant", type=int, metavar="N", help="the release 0-4 of an .h5 its hash and name do not tell")
    p.add_argument(
        "-o", "--output", type=Path, default=DEFAULT_OUTPUT, metavar="OUTDIR", help=f"default: {DEFAULT_OUTPUT}"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tile", type=int, metavar="SIZE", help=f"compute in tiles of SIZE x SIZE (>= {MIN_TILE})")
    size.add_argument("--max-memory", type=float, metavar="GB", help="use the largest tiles that fit GB (2^30 bytes)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default): true float32, TF32 off; auto: bf16 where the hardware computes it natively "
        "(AVX-512 BF16/AMX CPUs, CUDA compute capability 8.0+), else fp32; bf16: faster there, less exact, and "
        "slower than fp32 elsewhere; tf32: TF32 convolutions on NVIDIA Ampere and newer GPUs",
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda, else mps, where available, else cpu")
    p.add_argument("--save-npy", action="store_true", help="also write the raw float32 map as <name>.npy")
    p.add_argument("--overlay", action="store_true", help="also write <name>.overlay.png, the map over the image")
    p.add_argument("--force", action="store_true", help="recompute images whose outputs exist")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse larger images (default {DEFAULT_MAX_PIXELS:,})",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object describing every image, nothing else")
    out.add_argument("--quiet", action="store_true", help="print errors only")
    p.set_defaults(run=run)


@dataclass
class Outputs:
    mask: Path
    npy: Path | None
    overlay: Path | None

    @classmethod
    def of(cls, root: Path, relative: Path, args: argparse.Namespace) -> Outputs:
        base = root / relative.parent / relative.stem
        return cls(
            mask=base.with_name(base.name + ".mask.png"),
            npy=base.with_name(base.name + ".npy") if args.save_npy else None,
            overlay=base.with_name(base.name + ".overlay.png") if args.overlay else None,
        )

    def paths(self) -> list[Path]:
        return [p for p in (self.mask, self.npy, self.overlay) if p is not None]

    def encoders(self, rgb: np.ndarray, likelihood: np.ndarray) -> dict[Path, Callable[[], bytes]]:
        encoders = {self.mask: lambda: encode_mask(likelihood)}
        if self.npy:
            encoders[self.npy] = lambda: encode_npy(likelihood)
        if self.overlay:
            encoders[self.overlay] = lambda: encode_overlay(rgb, likelihood)
        return encoders


def resolve_device(choice: str) -> torch.device:
    """``--device``: auto picks CUDA, else Apple's MPS, else the CPU; an unavailable choice is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available to this PyTorch build")
    if choice == "mps" and not mps_available():
        raise CommandError("--device mps: Apple's Metal (MPS) backend is not available to this PyTorch build")
    return torch.device(choice)


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def run(args: argparse.Namespace) -> int:
    if args.tile is not None and args.tile < MIN_TILE:
        raise CommandError(f"--tile {args.tile}: tiles must be at least {MIN_TILE} pixels")
    if args.max_memory is not None and not (math.isfinite(args.max_memory) and 0 < args.max_memory <= MAX_MEMORY_GB):
        raise CommandError(f"--max-memory {args.max_memory}: must be a number of GB, > 0 and <= {MAX_MEMORY_GB:,.0f}")
    if args.max_pixels < 1:
        raise CommandError(f"--max-pixels {args.max_pixels}: must be at least 1")
    images = find_images(args.inputs, skip=args.output)
    if not images:
        raise CommandError(f"no images found in {', '.join(str(p) for p in args.inputs)}")
    device = resolve_device(args.device)
    quiet = args.json or args.quiet
    args.precision = _precision(args.precision, device, quiet=quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightCastWarning)
        model = load_weights(args.weights, args.variant, map_location=device, quiet=quiet)
    for w in caught:  # a cast to float32 is a note; the earlier port's approximations are warnings
        kind = "note" if issubclass(w.category, WeightCastWarning) else "warning"
        print(f"mantranet detect: {kind}: {w.message}", file=sys.stderr)
    check_writable_folder(args.output)  # before any inference
    records, todo, claimed = [], [], {}
    for path, relative in images:
        outputs = Outputs.of(args.output, relative, args)
        if outputs.mask in claimed:
            error = f"{path}: its outputs would overwrite those of {claimed[outputs.mask]}; run it separately"
            records.append(record(path, "failed", error=error))
            continue
        claimed[outputs.mask] = path
        missing = [p for p in outputs.paths() if args.force or not p.exists()]
        if missing:
            todo.append((path, relative, outputs, missing))
        else:
            records.append(record(path, "skipped", outputs=outputs.paths()))
    for r in records:
        if r["error"] and not args.json:
            print(f"mantranet detect: {r['error']}", file=sys.stderr, flush=True)
    bar = progress.bar(len(images), "detect", unit="image", stream=None if not (args.json or args.quiet) else _Null())
    bar.update(len(records))
    pending = {path: (outputs, missing) for path, _, outputs, missing in todo}

    def tiles(path: Path, done: int, total: int) -> None:
        bar.set_postfix_str(f"{path.name}: tiles {done}/{total}")

    options = dict(tile=args.tile, max_memory=args.max_memory, precision=args.precision, max_pixels=args.max_pixels)
    found = ((path, relative) for path, relative, _, _ in todo)
    with bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPrecisionWarning)  # said once, before the first image
        for result in detect_found(model, found, progress=tiles, **options):
            outputs, missing = pending[result.path]
            r = (
                write_outputs(result, outputs, missing)
                if result.ok
                else record(result.path, "failed", error=result.error)
            )
            records.append(r)
            bar.update(1)
            if args.json:
                continue
            if r["error"]:
                progress.message(f"mantranet detect: {r['error']}")
            elif not args.quiet:
                progress.message(describe(r), sys.stdout)
    failed = sum(r["status"] == "failed" for r in records)
    written = sum(r["status"] == "written" for r in records)
    skipped = len(records) - failed - written
    if args.json:
        summary = {"images": len(records), "written": written, "skipped": skipped, "failed": failed}
        print(json.dumps({"output": str(args.output), **summary, "results": records}, indent=2))
    elif not args.quiet:
        print(
            f"{len(images)} image(s): {written} written, {skipped} skipped (outputs exist; --force redoes them), "
            f"{failed} failed; outputs in {args.output}"
        )
    return 1 if failed else 0


def write_outputs(result: Detection, outputs: Outputs, missing: list[Path]) -> dict:
    """Write the requested files of one image atomically; its record for printing."""
    encoders = outputs.encoders(result.pixels, result.likelihood)
    for target in missing:
        write_bytes_atomic(target, encoders[target](), force=True)
    width, height = result.size
    return record(
        result.path, "written", outputs=missing, width=width, height=height, tiles=result.tiles,
        seconds=round(result.seconds, 3), notes=result.notes,
    )  # fmt: skip


def record(path: Path, status: str, error: str | None = None, outputs: list[Path] = (), **fields: object) -> dict:
    """One image's line of ``--json``: status written, skipped (outputs exist) or failed."""
    return {"input": str(path), "status": status, "error": error, "outputs": [str(p) for p in outputs], **fields}


def describe(r: dict) -> str:
    how = f"{r['tiles']} tiles in 2 passes" if r["tiles"] else "whole image"
    lines = [f"{r['input']}: {r['width']} x {r['height']}, {how}, {r['seconds']:.1f} s -> {', '.join(r['outputs'])}"]
    return "\n".join(lines + [f"  note: {note}" for note in r["notes"]])


class _Null:
    """A stream that is never a terminal: no bar with --json or --quiet."""

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _precision(precision: str, device: torch.device, quiet: bool) -> str:
    """The precision the run computes in, said when ``auto`` chose it; a slow bf16 is warned of here, once."""
    resolved = resolve_precision(precision, device)
    if precision == "auto" and not quiet:
        print(f"precision auto: {resolved}, as {bf16_support(device).reason}", flush=True)
    return resolved
