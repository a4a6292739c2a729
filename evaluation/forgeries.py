"""Forged images with known masks, made from real photographs: splices, copy-moves and authentic crops.

Used by the tests and the benchmark to build a dataset whose ground truth is exact by construction.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mantranet_torch.files import write_bytes_atomic


def _photo(path: Path, side: int, rng: np.random.Generator) -> np.ndarray:
    """A random side x side crop of the photograph, after shrinking it so the crop shows a fair part of it."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = 3 * side / min(image.size)
        if scale < 1:
            image = image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)  # fmt: skip
        pixels = np.array(image)
    top = int(rng.integers(0, pixels.shape[0] - side + 1))
    left = int(rng.integers(0, pixels.shape[1] - side + 1))
    return pixels[top : top + side, left : left + side].copy()


def _region(side: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An ellipse covering 10-30% of a side x side image: its bool mask and bounding box."""
    h, w = (int(rng.integers(side // 3, side // 2 + 1)) for _ in range(2))
    top, left = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).ellipse((left, top, left + w - 1, top + h - 1), fill=255)
    return np.asarray(canvas) > 127, (top, left, h, w)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_forgeries(
    photos: list[Path], out: Path, spliced: int, copy_moved: int, authentic: int, side: int = 64, seed: int = 0
) -> Path:
    """Write PNG images and masks under ``out`` and a manifest ``out/manifest.csv``; returns the manifest.

    Splice: an elliptical region of one photograph pasted into another. Copy-move: a region of a photograph
    pasted elsewhere in the same one. The mask marks the pasted pixels (white).
    """
    rng = np.random.default_rng(seed)
    rows = []
    files: dict[Path, bytes] = {}
    for kind, count in (("spliced", spliced), ("copymove", copy_moved), ("authentic", authentic)):
        for i in range(count):
            name = f"{kind}_{i:03d}"
            host = _photo(photos[int(rng.integers(len(photos)))], side, rng)
            if kind == "authentic":
                files[out / "images" / f"{name}.png"] = _png(host)
                rows.append((f"images/{name}.png", "", 0))
                continue
            mask, (top, left, h, w) = _region(side, rng)
            if kind == "spliced":
                donor = _photo(photos[int(rng.integers(len(photos)))], side, rng)
                source = donor[top : top + h, left : left + w]
            else:
                src_top, src_left = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
                source = host[src_top : src_top + h, src_left : src_left + w].copy()
            inside = mask[top : top + h, left : left + w]
            host[top : top + h, left : left + w][inside] = source[inside]
            files[out / "images" / f"{name}.png"] = _png(host)
            files[out / "masks" / f"{name}.png"] = _png(mask.astype(np.uint8) * 255)
            rows.append((f"images/{name}.png", f"masks/{name}.png", 1))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("image", "mask", "label"))
    writer.writerows(rows)
    manifest = out / "manifest.csv"
    for path, data in files.items():
        write_bytes_atomic(path, data, force=True)
    write_bytes_atomic(manifest, buffer.getvalue().encode(), force=True)
    return manifest
