"""Forgeries made from authentic photographs, with exact masks: the four kinds ManTraNet's detector was trained on.

    forgeries = SyntheticForgeries("photos/", size=256, seed=7)
    f = forgeries.sample(index=12, epoch=0)   # f.image: uint8 256 x 256 x 3, f.mask: bool 256 x 256, f.kind

Kinds (``KINDS``): ``copymove`` (a region of the crop pasted elsewhere in it), ``splice`` (the same region of a
crop of another photograph), ``removal`` (the region filled by OpenCV's inpainting, Telea's or Navier-Stokes'),
``enhance`` (one operation of ``ENHANCEMENTS`` applied inside the region only) and ``authentic`` (the crop as it
is, an empty mask). Masks (``MASK_FAMILIES``): a random star-shaped polygon, a closed outline of cubic Bezier
curves, or a blob of overlapping ellipses, covering ``min_area``..``max_area`` of the crop.

The seed contract: sample ``index`` of ``epoch`` under ``seed`` is a pure function of the three numbers (and of
the photographs): the same bytes in any process, any worker, any order. Its kind is ``kinds[index % len(kinds)]``,
so any run of ``len(kinds)`` consecutive indices holds each kind once. Crops are taken at the photographs' native
resolution (never resized: resizing erases the noise traces the model reads). Only ``removal`` needs OpenCV (the
``train`` extra).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from evaluation.perturb import Step, apply_step
from mantranet_torch.files import (
    file_problem,
    make_folder,
    new_path_mode,
    one_paragraph,
    write_bytes_atomic,
    write_files_atomic,
)
from mantranet_torch.image_files import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageReadError, find_images, read_image

KINDS = ("authentic", "copymove", "splice", "removal", "enhance")
MASK_FAMILIES = ("polygon", "bezier", "blob")
ENHANCEMENTS = ("blur", "sharpen", "noise", "gamma", "contrast", "jpeg", "resample")
INPAINT_METHODS = ("telea", "ns")
MIN_AREA, MAX_AREA = 0.02, 0.30  # fraction of the crop a forged region covers, drawn log-uniformly
COPY_MOVE_MAX_AREA = 0.20  # a copied region and its source must both fit in the crop without overlapping
MIN_SIZE = 32  # smaller crops leave masks of a handful of pixels
SAMPLE_STREAM = 0x5F0E  # separates these random streams from others seeded with the same numbers
SHAPE_RASTER = 256  # pixels of the square on which a shape's area is measured before it is scaled
MASK_TRIES = 64
PLACE_TRIES = 32
PHOTO_TRIES = 8
PHOTO_CACHE = 4  # decoded photographs kept per process (a 6-megapixel photograph is 18 MB)
ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or folder and says why."""


@dataclass(frozen=True)
class Recipe:
    """What the forgeries are made of. ``kinds`` sets the mix: a kind listed twice comes twice as often."""

    kinds: tuple[str, ...] = KINDS
    families: tuple[str, ...] = MASK_FAMILIES
    enhancements: tuple[str, ...] = ENHANCEMENTS
    inpaint_methods: tuple[str, ...] = INPAINT_METHODS
    min_area: float = MIN_AREA
    max_area: float = MAX_AREA

    def __post_init__(self) -> None:
        for name, chosen, known in (
            ("kinds", self.kinds, KINDS),
            ("families", self.families, MASK_FAMILIES),
            ("enhancements", self.enhancements, ENHANCEMENTS),
            ("inpaint_methods", self.inpaint_methods, INPAINT_METHODS),
        ):
            unknown = [c for c in chosen if c not in known]
            if not chosen or unknown:
                raise DataError(f"{name} {','.join(unknown) or '(none)'}: choose from {', '.join(known)}")
        if not 0 < self.min_area <= self.max_area <= 0.5:
            raise DataError(f"mask area {self.min_area:g}..{self.max_area:g}: needs 0 < min <= max <= 0.5")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Forgery:
    """One made image: ``image`` uint8 H x W x 3 RGB, ``mask`` bool H x W (True: changed), ``meta`` says how."""

    image: np.ndarray
    mask: np.ndarray
    kind: str
    meta: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # photographs that failed to decode on the way


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of ``epoch``: the seed contract in one place."""
    return np.random.default_rng([SAMPLE_STREAM, seed, epoch, index])


# ---------------------------------------------------------------- photographs


def image_size(path: Path, exif: bool = True) -> tuple[int, int]:
    """(width, height) from the file's header: as ``read_image`` returns the image (turned by its EXIF
    orientation) or, with ``exif=False``, as stored (masks are read that way)."""
    problem = file_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore")
            width, height = image.size
            try:
                orientation = image.getexif().get(ORIENTATION_TAG, 1)
            except (OSError, SyntaxError, ValueError, EOFError):  # a damaged file past its header: found on decoding
                orientation = 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read as an image ({one_paragraph(str(e), path)})") from None
    return (height, width) if exif and orientation in TRANSPOSING_ORIENTATIONS else (width, height)


class Photos:
    """The authentic photographs of a folder (searched recursively) or a list, at least ``size`` on each side.

    Photographs whose header cannot be read are left out and listed in ``problems`` (name, why), those smaller
    than the crop in ``small``. Decoded photographs are cached (``PHOTO_CACHE`` per process).

    Raises:
        DataError: no images, none readable, or all smaller than ``size`` (naming the largest).
    """

    def __init__(self, source: str | Path | Sequence[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels
        if isinstance(source, (str, Path)):
            folder = Path(source)
            problem = file_problem(folder)
            if problem != "a folder, not a file":
                raise DataError(f"{folder}: {problem or 'a file, not a folder of photographs'}")
            found = [(p, rel.as_posix()) for p, rel in find_images([folder])]
            if not found:
                raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
            where = str(folder)
        else:
            found = [(Path(p), Path(p).name) for p in source]
            if not found:
                raise DataError("no photographs given")
            where = "the photographs"
        self.paths: list[Path] = []
        self.names: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.problems: list[tuple[str, str]] = []
        self.small: list[tuple[str, str]] = []
        readable: list[tuple[tuple[int, int], str]] = []
        for path, name in found:
            try:
                width, height = image_size(path)
            except DataError as e:
                self.problems.append((name, str(e).removeprefix(f"{path}: ")))
                continue
            if width * height > max_pixels:
                self.problems.append((name, f"{width} x {height} exceeds the pixel limit {max_pixels:,}"))
                continue
            readable.append(((width, height), name))
            if min(width, height) < size:
                self.small.append((name, f"{width} x {height} is smaller than the crop {size} x {size}"))
                continue
            self.paths.append(path)
            self.names.append(name)
            self.sizes.append((width, height))
        if not readable:
            raise DataError(f"{where}: no readable photograph ({': '.join(self.problems[0])})")
        if not self.paths:
            (width, height), name = max(readable, key=lambda r: min(r[0]))
            raise DataError(
                f"crop {size} x {size} is larger than every photograph in {where}; the largest is {width} x {height}"
                f" ({name})"
            )
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int) -> np.ndarray:
        """Photograph ``index`` as uint8 H x W x 3 (read-only view of the cached copy). Raises ImageReadError."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        pixels = read_image(self.paths[index], self.max_pixels).pixels
        if (pixels.shape[1], pixels.shape[0]) != self.sizes[index]:
            raise ImageReadError(f"{self.paths[index]}: decoded as {pixels.shape[1]} x {pixels.shape[0]}, "
                                 f"its header said {self.sizes[index][0]} x {self.sizes[index][1]}")  # fmt: skip
        pixels.flags.writeable = False
        self._cache[index] = pixels
        while len(self._cache) > PHOTO_CACHE:
            self._cache.popitem(last=False)
        return pixels

    def __getstate__(self) -> dict:  # DataLoader workers get the list, not the decoded pixels
        return {**self.__dict__, "_cache": OrderedDict()}


# ---------------------------------------------------------------- masks


def random_mask(
    rng: np.random.Generator, size: int, family: str, min_area: float = MIN_AREA, max_area: float = MAX_AREA
) -> np.ndarray:
    """A bool ``size`` x ``size`` mask of one shape of ``family`` covering ``min_area``..``max_area`` of it.

    The target area is drawn log-uniformly; the shape is drawn in unit coordinates, scaled to the target and
    placed at random; a shape that does not fit or misses the range after rasterising is drawn again.
    """
    for _ in range(MASK_TRIES):
        target = math.exp(rng.uniform(math.log(min_area), math.log(max_area)))
        polygons = _SHAPES[family](rng)
        points = np.concatenate(polygons)
        low = points.min(axis=0)
        extent = float((points.max(axis=0) - low).max())
        polygons = [(p - low) / extent for p in polygons]  # inside the unit square, touching two of its sides
        unit_area = _raster([p * SHAPE_RASTER for p in polygons], SHAPE_RASTER, 0.0, 0.0).mean()
        scale = size * math.sqrt(target / unit_area)
        span = np.concatenate(polygons).max(axis=0) * scale
        if (span > size - 1).any():
            continue
        dx, dy = rng.uniform(0, size - 1 - span[0]), rng.uniform(0, size - 1 - span[1])
        mask = _raster([p * scale for p in polygons], size, dx, dy)
        if min_area <= mask.mean() <= max_area:
            return mask
    raise DataError(
        f"no {family} mask of {min_area:g}..{max_area:g} of a {size} x {size} crop after {MASK_TRIES} draws"
    )


def _raster(polygons: list[np.ndarray], size: int, dx: float, dy: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for p in polygons:
        draw.polygon([(float(x) + dx, float(y) + dy) for x, y in p], fill=1)
    return np.asarray(canvas) > 0


def _polygon(rng: np.random.Generator) -> list[np.ndarray]:
    """3-10 vertices at sorted angles around a centre: a simple (star-shaped) polygon with straight edges."""
    n = int(rng.integers(3, 11))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.35, 1.0, n)
    return [np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)]


def _bezier(rng: np.random.Generator) -> list[np.ndarray]:
    """A closed outline of cubic Bezier segments through 4-7 points around a centre (Catmull-Rom tangents)."""
    n = int(rng.integers(4, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.4, 1.0, n)
    anchors = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    tension = rng.uniform(0.1, 0.3)
    t = np.linspace(0, 1, 16, endpoint=False)[:, None]
    outline = []
    for i in range(n):
        p0, p3 = anchors[i], anchors[(i + 1) % n]
        p1 = p0 + tension * (p3 - anchors[i - 1])
        p2 = p3 - tension * (anchors[(i + 2) % n] - p0)
        outline.append((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3)
    return [np.concatenate(outline)]


def _blob(rng: np.random.Generator) -> list[np.ndarray]:
    """2-5 rotated ellipses, each centred on the rim of one before it: one connected organic region."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    centres, reach, ellipses = [], [], []
    for k in range(int(rng.integers(2, 6))):
        a, b, turn = rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.6), rng.uniform(0, np.pi)
        centre = np.zeros(2)
        if k:  # inside an earlier ellipse (half its smaller semi-axis from its centre): the union stays connected
            base = int(rng.integers(len(centres)))
            direction = rng.uniform(0, 2 * np.pi)
            centre = centres[base] + 0.5 * reach[base] * np.array([np.cos(direction), np.sin(direction)])
        centres.append(centre)
        reach.append(min(a, b))
        x, y = a * np.cos(theta), b * np.sin(theta)
        rotated = np.stack([x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)], axis=1)
        ellipses.append(rotated + centre)
    return ellipses


_SHAPES: dict[str, Callable[[np.random.Generator], list[np.ndarray]]] = {
    "polygon": _polygon,
    "bezier": _bezier,
    "blob": _blob,
}


# ---------------------------------------------------------------- the forgeries


def enhance(pixels: np.ndarray, operation: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The whole crop processed by ``operation`` (one of ``ENHANCEMENTS``) with random strength; the caller keeps
    it inside the mask only. Returns the uint8 result and the parameters drawn."""
    image = Image.fromarray(pixels)
    if operation == "blur":
        sigma = rng.uniform(0.8, 2.5)
        return apply_step(Step("blur", sigma), pixels, None, rng)[0], {"sigma": sigma}
    if operation == "noise":
        sigma = rng.uniform(3.0, 10.0)
        return apply_step(Step("noise", sigma), pixels, None, rng)[0], {"sigma": sigma}
    if operation == "jpeg":
        quality = int(rng.integers(50, 91))
        return apply_step(Step("jpeg", quality), pixels, None, rng)[0], {"quality": quality}
    if operation == "sharpen":
        radius, percent = rng.uniform(1.0, 3.0), int(rng.integers(80, 251))
        sharp = image.filter(ImageFilter.UnsharpMask(radius=radius, percent=percent, threshold=0))
        return np.array(sharp), {"radius": radius, "percent": percent}
    if operation == "gamma":  # away from 1 on either side: 0.5..0.8 or 1.25..2
        gamma = math.exp(rng.uniform(math.log(1.25), math.log(2.0))) ** (1 if rng.random() < 0.5 else -1)
        table = np.rint(255 * (np.arange(256) / 255) ** gamma).astype(np.uint8)
        return table[pixels], {"gamma": gamma}
    if operation == "contrast":  # about the crop's mean: 0.6..0.85 or 1.2..1.6
        factor = rng.uniform(0.6, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.6)
        mean = pixels.astype(np.float64).mean()
        return np.clip(np.rint((pixels - mean) * factor + mean), 0, 255).astype(np.uint8), {"factor": factor}
    if operation == "resample":  # scaled by the factor and back, with one of three kernels
        factor = rng.uniform(0.5, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 2.0)
        kernel = ("bilinear", "bicubic", "lanczos")[int(rng.integers(3))]
        method = Image.Resampling[kernel.upper()]
        height, width = pixels.shape[:2]
        scaled = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), method)
        return np.array(scaled.resize((width, height), method)), {"factor": factor, "kernel": kernel}
    raise DataError(f"enhancement {operation}: choose one of {', '.join(ENHANCEMENTS)}")


def inpaint(pixels: np.ndarray, mask: np.ndarray, method: str, radius: int) -> np.ndarray:
    """The masked pixels filled by OpenCV's inpainting (``telea``: fast marching; ``ns``: Navier-Stokes)."""
    try:
        import cv2
    except ImportError as e:
        raise DataError(f"removal forgeries need OpenCV: pip install 'mantranet-torch[train]' ({e})") from None
    flag = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}[method]
    return cv2.inpaint(np.ascontiguousarray(pixels), mask.astype(np.uint8) * 255, radius, flag)


class SyntheticForgeries:
    """Forgeries made on demand from ``photos`` as ``size`` x ``size`` crops; see the module docstring.

    Args:
        photos: a folder of authentic photographs (searched recursively) or a list of image files.
        size: the side of every crop, in pixels (>= ``MIN_SIZE``).
        seed: the seed of the whole sequence.
        recipe: the kinds, mask families and operations to draw from.

    Raises:
        DataError: no usable photograph (see ``Photos``), a crop under ``MIN_SIZE``, removal without OpenCV.
    """

    def __init__(
        self,
        photos: str | Path | Sequence[Path],
        size: int = 256,
        seed: int = 0,
        recipe: Recipe | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if size < MIN_SIZE:
            raise DataError(f"crop {size}: must be at least {MIN_SIZE} pixels")
        self.recipe = recipe or Recipe()
        if "removal" in self.recipe.kinds:
            try:
                import cv2  # noqa: F401
            except ImportError as e:
                raise DataError(f"removal forgeries need OpenCV: pip install 'mantranet-torch[train]' ({e})") from None
        self.photos = photos if isinstance(photos, Photos) else Photos(photos, size, max_pixels)
        self.size = size
        self.seed = seed

    def kind_of(self, index: int) -> str:
        return self.recipe.kinds[index % len(self.recipe.kinds)]

    def sample(self, index: int, epoch: int = 0) -> Forgery:
        """Sample ``index`` of ``epoch``: a pure function of (seed, epoch, index) and the photographs."""
        forgery = self.forge(self.kind_of(index), sample_rng(self.seed, epoch, index))
        forgery.meta |= {"seed": self.seed, "epoch": epoch, "index": index}
        return forgery

    def forge(self, kind: str, rng: np.random.Generator) -> Forgery:
        """One forgery of ``kind``, every choice drawn from ``rng``."""
        skipped: list[tuple[str, str]] = []
        host, host_meta = self._crop(rng, skipped)
        size, recipe = self.size, self.recipe
        empty = np.zeros((size, size), bool)
        if kind == "authentic":
            return Forgery(host.copy(), empty, kind, {"host": host_meta}, skipped)
        family = recipe.families[int(rng.integers(len(recipe.families)))]
        meta: dict = {"host": host_meta, "family": family}
        if kind == "copymove":
            mask, shift = self._copy_move_mask(rng, family)
            dy, dx = shift
            image = host.copy()
            ys, xs = np.nonzero(mask)
            image[ys, xs] = host[ys - dy, xs - dx]  # the source region lies (dy, dx) before the pasted one
            meta["shift"] = [dy, dx]
        else:
            mask = random_mask(rng, size, family, recipe.min_area, recipe.max_area)
            if kind == "splice":
                others = [i for i in range(len(self.photos)) if i != host_meta["photo_index"]]
                donor, donor_meta = self._crop(rng, skipped, others or None)
                image = np.where(mask[:, :, None], donor, host)
                meta["donor"] = donor_meta
            elif kind == "removal":
                method = recipe.inpaint_methods[int(rng.integers(len(recipe.inpaint_methods)))]
                radius = int(rng.integers(3, 8))
                image = inpaint(host, mask, method, radius)
                meta |= {"method": method, "radius": radius}
            elif kind == "enhance":
                operation = recipe.enhancements[int(rng.integers(len(recipe.enhancements)))]
                processed, parameters = enhance(host, operation, rng)
                image = np.where(mask[:, :, None], processed, host)
                meta |= {"operation": operation, **parameters}
            else:
                raise DataError(f"kind {kind}: choose one of {', '.join(KINDS)}")
        meta["area"] = float(mask.mean())
        return Forgery(np.ascontiguousarray(image, dtype=np.uint8), mask, kind, meta, skipped)

    def _crop(
        self, rng: np.random.Generator, skipped: list, choices: list[int] | None = None
    ) -> tuple[np.ndarray, dict]:
        """A native-resolution crop of a random photograph; one that fails to decode is named and replaced."""
        for _ in range(PHOTO_TRIES):
            index = int(choices[rng.integers(len(choices))] if choices else rng.integers(len(self.photos)))
            width, height = self.photos.sizes[index]
            top, left = int(rng.integers(0, height - self.size + 1)), int(rng.integers(0, width - self.size + 1))
            try:
                pixels = self.photos.pixels(index)
            except ImageReadError as e:
                skipped.append((self.photos.names[index], str(e).removeprefix(f"{self.photos.paths[index]}: ")))
                continue
            crop = pixels[top : top + self.size, left : left + self.size]
            return crop, {"photo": self.photos.names[index], "photo_index": index, "top": top, "left": left}
        raise DataError(f"{PHOTO_TRIES} photographs in a row could not be decoded (last: {skipped[-1][1]})")

    def _copy_move_mask(self, rng: np.random.Generator, family: str) -> tuple[np.ndarray, tuple[int, int]]:
        """A mask and a shift (dy, dx) such that the mask moved back by the shift stays inside and apart."""
        size, recipe = self.size, self.recipe
        high = max(recipe.min_area, min(recipe.max_area, COPY_MOVE_MAX_AREA))
        for _ in range(MASK_TRIES):
            mask = random_mask(rng, size, family, recipe.min_area, high)
            ys, xs = np.nonzero(mask)
            for _ in range(PLACE_TRIES):
                # the source's top-left corner anywhere the region fits: shift = target - source
                dy = int(ys.min() - rng.integers(0, size - (ys.max() - ys.min())))
                dx = int(xs.min() - rng.integers(0, size - (xs.max() - xs.min())))
                if (dy or dx) and not mask[ys - dy, xs - dx].any():
                    return mask, (dy, dx)
        raise DataError(f"no copy-move placement in a {size} x {size} crop after {MASK_TRIES} masks")


# ---------------------------------------------------------------- datasets on disk


@dataclass
class SynthResult:
    """What ``write_synthetic`` wrote: the manifest, the count of each kind, the photographs it skipped (unreadable
    or failing to decode) and those it left out as smaller than the crop, as (name, why)."""

    manifest: Path
    counts: dict[str, int]
    skipped: list[tuple[str, str]]
    small: list[tuple[str, str]]


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def manifest_text(rows: list[tuple[str, str, int]]) -> bytes:
    """A manifest as ``evaluation.load_dataset`` reads it: image,mask,label (empty mask: authentic)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("image", "mask", "label"))
    writer.writerows(rows)
    return buffer.getvalue().encode()


WRITE_CHUNK = 64  # files written together (each atomically) between progress reports


def write_synthetic(
    photos: str | Path,
    out: str | Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    recipe: Recipe | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    """Write ``n`` forgeries (samples 0..n-1 of epoch 0) as a dataset folder ``out``.

    ``out`` holds ``images/NNNNNN_KIND.png``, ``masks/NNNNNN_KIND.png`` (white: changed; none for authentic
    images), ``manifest.csv`` (image,mask,label), ``forgeries.jsonl`` (how each image was made) and
    ``recipe.json`` (seed, size, recipe, photographs). It is built in a hidden folder beside ``out`` and moved
    into place when complete: ``out`` never holds half a dataset.

    Raises:
        DataError: n < 1, ``out`` exists or cannot be written, no usable photograph (see ``SyntheticForgeries``).
        FileError: a file that cannot be written (a full disk), from ``mantranet_torch.files``.
    """
    out = Path(out)
    if n < 1:
        raise DataError(f"--n {n}: must be at least 1")
    if os.path.lexists(out):
        raise DataError(f"{out}: already exists; choose a new folder")
    forgeries = SyntheticForgeries(photos, size, seed, recipe)
    make_folder(out.parent)
    try:
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    except OSError as e:
        raise DataError(f"{out.parent}: cannot write in the folder ({e.strerror or e})") from None
    try:
        os.chmod(staging, new_path_mode(folder=True))  # mkdtemp's 0700 would carry over to the dataset
        rows, lines, skipped, files = [], [], {}, {}
        counts = dict.fromkeys(forgeries.recipe.kinds, 0)
        for index in range(n):
            forgery = forgeries.sample(index)
            name = f"{index:06d}_{forgery.kind}.png"
            files[staging / "images" / name] = encode_png(forgery.image)
            if forgery.kind == "authentic":
                rows.append((f"images/{name}", "", 0))
            else:
                files[staging / "masks" / name] = encode_png(forgery.mask.astype(np.uint8) * 255)
                rows.append((f"images/{name}", f"masks/{name}", 1))
            lines.append(json.dumps({"image": f"images/{name}", "kind": forgery.kind, **forgery.meta}))
            counts[forgery.kind] += 1
            skipped.update(forgery.skipped)
            if len(files) >= WRITE_CHUNK or index == n - 1:
                write_files_atomic(files, force=False)
                files = {}
            if progress:
                progress(index + 1, n)
        recipe_record = {
            "seed": seed,
            "size": size,
            "n": n,
            "recipe": forgeries.recipe.to_dict(),
            "photos": forgeries.photos.names,
            "skipped_photos": dict(forgeries.photos.problems),
            "small_photos": dict(forgeries.photos.small),
        }
        write_bytes_atomic(staging / "recipe.json", (json.dumps(recipe_record, indent=1) + "\n").encode(), False)
        write_bytes_atomic(staging / "forgeries.jsonl", ("\n".join(lines) + "\n").encode(), False)
        write_bytes_atomic(staging / "manifest.csv", manifest_text(rows), False)
        if os.path.lexists(out):
            raise DataError(f"{out}: appeared while the dataset was being written; it is left as it was")
        os.rename(staging, out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the dataset ({e.strerror or e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    skipped_all = list(forgeries.photos.problems) + sorted(skipped.items())
    return SynthResult(out / "manifest.csv", counts, skipped_all, list(forgeries.photos.small))


def make_forgeries(
    photos: list[Path], out: Path, spliced: int, copy_moved: int, authentic: int, side: int = 64, seed: int = 0
) -> Path:
    """A small fixed mix for tests and benchmarks: ``spliced`` splices, ``copy_moved`` copy-moves and
    ``authentic`` crops of ``side`` pixels, written under ``out`` as images/KIND_NNN.png, masks/KIND_NNN.png and
    ``out/manifest.csv`` (replacing what is there); returns the manifest."""
    forgeries = SyntheticForgeries(photos, side, seed, Recipe(kinds=("splice", "copymove", "authentic")))
    rows, files = [], {}
    for number, (prefix, kind, count) in enumerate(
        (("spliced", "splice", spliced), ("copymove", "copymove", copy_moved), ("authentic", "authentic", authentic))
    ):
        for i in range(count):
            forgery = forgeries.forge(kind, sample_rng(seed, number, i))
            name = f"{prefix}_{i:03d}.png"
            files[out / "images" / name] = encode_png(forgery.image)
            if kind == "authentic":
                rows.append((f"images/{name}", "", 0))
            else:
                files[out / "masks" / name] = encode_png(forgery.mask.astype(np.uint8) * 255)
                rows.append((f"images/{name}", f"masks/{name}", 1))
    manifest = out / "manifest.csv"
    write_files_atomic({**files, manifest: manifest_text(rows)}, force=True)
    return manifest
