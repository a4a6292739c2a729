"""``mantranet detect``: forgery maps for images and folders of images, tiled exactly when memory is short."""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

import mantranet_torch
from converter import convert_h5
from converter.atomic import make_folder, staged_path, write_bytes_atomic
from mantranet_torch import ManTraNet
from mantranet_torch.files import os_reason
from mantranet_torch.memory import full_image_bytes, tile_for_budget
from mantranet_torch.precision import PRECISIONS, SlowPrecisionWarning, bf16_support, resolve_precision
from mantranet_torch.tiling import MIN_TILE
from mantranet_torch.weights import WeightCastWarning, model_from_state_dict

from .errors import CommandError
from .images import DEFAULT_MAX_PIXELS, ImageReadError, find_images, read_image
from .maps import encode_mask, encode_npy, encode_overlay

DEFAULT_OUTPUT = Path("mantranet_out")
GB = 2**30
MAX_MEMORY_GB = 2.0**20  # a petabyte: beyond any machine, and far from int64 when counted in bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="forgery likelihood maps for images or folders of images",
        description="Write a forgery likelihood map for each image: OUTDIR/<name>.mask.png (8-bit, round(p*255)), "
        "and on request the raw float32 map (.npy) and a heat-map overlay. Images larger than memory allows are "
        "computed in tiles, with the same result as the whole image at once. Images are read as the official demo "
        "read them (OpenCV's IMREAD_COLOR): EXIF orientation applied, alpha dropped, grey and palette expanded, "
        "16-bit scaled to 8-bit. Existing outputs are kept (a rerun resumes) unless --force.",
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
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


class ProgressBar:
    """Images done (and tiles done in tiled runs) on one self-rewriting stderr line.

    When stderr is not a terminal (a log file), long tiled runs print a plain line now and then instead.
    """

    WIDTH = 24
    LOG_INTERVAL = 30.0  # seconds between progress lines in a log

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.stream, self.live = total, stream, stream.isatty()
        self.done = 0
        self.logged = time.monotonic()

    def show(self, name: str, tiles: tuple[int, int] | None = None) -> None:
        if not self.live:
            if tiles and time.monotonic() - self.logged >= self.LOG_INTERVAL:
                self.logged = time.monotonic()
                print(f"{name}: tiles {tiles[0]}/{tiles[1]}", file=self.stream, flush=True)
            return
        filled = self.WIDTH * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} images"
        if tiles:
            line += f", tiles {tiles[0]}/{tiles[1]}"
        self.stream.write(f"\r\033[K{line}  {name}")
        self.stream.flush()

    def clear(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available to this PyTorch build")
    return torch.device(choice)


def load_model(path: Path, variant: int | None, device: torch.device) -> ManTraNet:
    """Our weight files as they are; an official .h5 converted in memory (nothing is written)."""
    if path.suffix.lower() in (".h5", ".hdf5"):
        conversion = convert_h5(path, variant)
        for note in conversion.keras.notes:
            print(f"mantranet detect: note: {path}: {note}", file=sys.stderr)
        return model_from_state_dict(conversion.state_dict, conversion.config, str(path)).to(device)
    return mantranet_torch.load(path, map_location=device)


def choose_tile(model: ManTraNet, height: int, width: int, args: argparse.Namespace) -> int | None:
    """The tile size for this image: --tile, the largest that fits --max-memory, or None (automatic)."""
    if args.tile is not None:
        return args.tile
    if args.max_memory is None:
        return None
    budget = int(args.max_memory * GB)
    precision = resolve_precision(args.precision, next(model.parameters()).device, warn=False)
    if full_image_bytes(model, height, width, precision) <= budget:
        return max(height, width)
    return tile_for_budget(model, height, width, budget, precision)


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
    args.precision = _precision(args.precision, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightCastWarning)
        model = load_model(args.weights, args.variant, device)
    for w in caught:
        print(f"mantranet detect: note: {w.message}", file=sys.stderr)
    check_output_folder(args.output)  # before any inference
    bar = ProgressBar(len(images))
    failed, skipped, claimed = [], 0, {}
    for path, relative in images:
        outputs = Outputs.of(args.output, relative, args)
        if outputs.mask in claimed:
            failed.append(path)
            _error(bar, f"{path}: its outputs would overwrite those of {claimed[outputs.mask]}; run it separately")
            bar.done += 1
            continue
        claimed[outputs.mask] = path
        missing = [p for p in outputs.paths() if args.force or not p.exists()]
        if not missing:
            skipped += 1
            bar.done += 1
            continue
        bar.show(path.name)
        try:
            summary = detect_one(model, path, outputs, missing, args, bar)
        except ImageReadError as e:
            failed.append(path)
            _error(bar, str(e))
        except (ValueError, MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "memory" not in str(e).lower():
                raise
            failed.append(path)
            hint = "; try --max-memory or --tile" if not isinstance(e, ValueError) else ""
            _error(bar, f"{path}: {e or type(e).__name__}{hint}")
        else:
            bar.clear()
            print(summary, flush=True)
        bar.done += 1
    bar.clear()
    done = len(images) - len(failed) - skipped
    print(
        f"{len(images)} image(s): {done} written, {skipped} skipped (outputs exist; --force redoes them), "
        f"{len(failed)} failed; outputs in {args.output}"
    )
    return 1 if failed else 0


def check_output_folder(folder: Path) -> None:
    """Create the output folder and try a file in it, before any inference: an unwritable folder fails now."""
    make_folder(folder)
    try:
        with staged_path(folder / "write-test"):
            pass
    except OSError as e:
        raise CommandError(f"{folder}: cannot write in the output folder ({os_reason(e)})") from None


def detect_one(
    model: ManTraNet, path: Path, outputs: Outputs, missing: list[Path], args: argparse.Namespace, bar: ProgressBar
) -> str:
    """Read, predict and write one image; returns the lines to print."""
    image = read_image(path, args.max_pixels)
    height, width = image.pixels.shape[:2]
    tile = choose_tile(model, height, width, args)
    tiles_seen = []

    def progress(done: int, total: int) -> None:
        tiles_seen.append(total)
        bar.show(path.name, (done, total))

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPrecisionWarning)  # said once, before the first image
        likelihood = model.predict(image.pixels, tile=tile, precision=args.precision, progress=progress)
    seconds = time.perf_counter() - start
    encoders = outputs.encoders(image.pixels, likelihood)
    for target in missing:
        write_bytes_atomic(target, encoders[target](), force=True)
    how = f"{tiles_seen[-1] // 2} tiles in 2 passes" if tiles_seen else "whole image"
    lines = [f"{path}: {width} x {height}, {how}, {seconds:.1f} s -> {', '.join(str(p) for p in missing)}"]
    lines += [f"  note: {note}" for note in image.notes]
    return "\n".join(lines)


def _precision(precision: str, device: torch.device) -> str:
    """The precision the run computes in, said when ``auto`` chose it; a slow bf16 is warned of here, once."""
    resolved = resolve_precision(precision, device)
    if precision == "auto":
        print(f"precision auto: {resolved}, as {bf16_support(device).reason}", flush=True)
    return resolved


def _error(bar: ProgressBar, message: str) -> None:
    bar.clear()
    print(f"mantranet detect: {message}", file=sys.stderr, flush=True)
