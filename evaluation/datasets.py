"""Datasets: a CSV or JSON-lines manifest, or a benchmark's folder in its published layout.

A manifest lists ``image,mask[,label]`` with paths relative to the manifest; an empty ``mask`` means an
authentic image (label 0) unless ``label`` says otherwise. A folder layout is read by its adapter, which
also knows how that benchmark draws its masks (``MaskRule``).
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .masks import MaskRule

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm"})
MANIFEST_KEYS = ("image", "mask", "label")


class DatasetError(ValueError):
    """A dataset that cannot be read at all; the message names the file or folder."""


@dataclass(frozen=True)
class Entry:
    """One image of a dataset. ``name``: its path relative to the dataset root, unique within the dataset."""

    name: str
    image: Path
    mask: Path | None
    label: int

    @property
    def forged(self) -> bool:
        return self.label == 1


@dataclass
class Dataset:
    source: Path
    layout: str
    mask_rule: MaskRule
    entries: list[Entry]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (entry, why) rows that could not be read

    def describe(self) -> dict:
        return {
            "source": str(self.source),
            "layout": self.layout,
            "mask_rule": self.mask_rule.describe(),
            "entries": len(self.entries) + len(self.problems),
            "forged": sum(e.forged for e in self.entries),
            "authentic": sum(not e.forged for e in self.entries),
        }


def load_dataset(path: str | Path, layout: str | None = None, mask_rule: MaskRule | None = None) -> Dataset:
    """A dataset of images, masks and labels from a manifest or a benchmark folder.

    Args:
        path: a manifest (``.csv``, ``.jsonl``) or a folder in one of ``LAYOUTS``.
        layout: the folder's layout (default: recognised by its sub-folders).
        mask_rule: which mask pixels are forged, overriding the layout's own rule (manifests default to
            grey > 127).

    Returns:
        The ``Dataset``: its entries, and the entries it could not use with the reason (``problems``).

    Raises:
        DatasetError: no such manifest or folder, an unknown layout, no images, or two images of one name.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_file():
        if layout not in (None, "manifest"):
            raise DatasetError(f"{path}: --layout {layout} names a folder layout, but this is a file")
        reader = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
        if path.suffix.lower() not in (".csv", ".jsonl", ".json", ".ndjson"):
            raise DatasetError(f"{path}: a manifest must be .csv or .jsonl (JSON lines)")
        rows = reader(path)
        entries, problems = _manifest_entries(path, rows)
        dataset = Dataset(path, "manifest", mask_rule or MaskRule(), entries, problems)
    else:
        chosen = LAYOUTS.get(layout) if layout else _recognise(path)
        if chosen is None:
            known = ", ".join(LAYOUTS)
            if layout:
                raise DatasetError(f"--layout {layout}: unknown layout; choose one of {known}")
            raise DatasetError(f"{path}: not a layout this tool knows ({known}); write a manifest, or pass --layout")
        entries = chosen.find(path)
        dataset = Dataset(path, chosen.name, mask_rule or chosen.mask_rule, entries)
    if not dataset.entries and not dataset.problems:
        raise DatasetError(f"{path}: the dataset lists no images")
    _check_unique(dataset)
    return dataset


def _check_unique(dataset: Dataset) -> None:
    seen: dict[str, Path] = {}
    for e in dataset.entries:
        if e.name in seen and seen[e.name] != e.image:
            raise DatasetError(f"{dataset.source}: two images share the name {e.name}")
        seen[e.name] = e.image


# ---------------------------------------------------------------- manifests


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            if header[:2] != ["image", "mask"] or not set(header) <= set(MANIFEST_KEYS):
                raise DatasetError(f"{path}: the header must be image,mask[,label]; found {','.join(header)}")
            reader.fieldnames = header
            return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise DatasetError(_not_utf8(path)) from None
    except (OSError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read the manifest ({e})") from None


def _not_utf8(path: Path) -> str:
    """Where a manifest stops being UTF-8 (its line and byte), and what to do."""
    try:
        data = path.read_bytes()
        data.decode("utf-8-sig")
        at = -1
    except OSError:
        data, at = b"", -1
    except UnicodeDecodeError as e:
        at = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
    line = data[:at].count(b"\n") + 1
    where = f", line {line} (byte 0x{data[at : at + 1].hex()})" if at >= 0 else ""
    return (
        f"{path}{where}: not UTF-8 text; a manifest is UTF-8: save it as UTF-8, or rename the files whose "
        "names are in another encoding"
    )


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(_not_utf8(path)) from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the manifest ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "image" not in row or not set(row) <= set(MANIFEST_KEYS):
            raise DatasetError(f"{path}, line {number}: expected an object with keys image, mask[, label]")
        rows.append((number, row))
    return rows


def _manifest_entries(path: Path, rows: list[tuple[int, dict]]) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Entries of a manifest's rows; an image listed twice (by any path that leads to the same file) is an error:
    scored twice, it would weigh twice in every mean."""
    root = path.parent
    entries, problems = [], []
    lines: dict[Path, int] = {}
    for number, row in rows:
        image = str(row.get("image") or "").strip()
        mask = str(row.get("mask") or "").strip()
        where = f"{path}, line {number}"
        if not image:
            problems.append((where, "no image path"))
            continue
        label_text = str(row.get("label") if row.get("label") is not None else "").strip()
        if label_text in ("", "None"):
            label = 1 if mask else 0
        elif label_text in ("0", "1"):
            label = int(label_text)
        else:
            problems.append((f"{where} ({image})", f"label {label_text!r} is not 0 or 1"))
            continue
        where_on_disk = (root / image).resolve()
        if where_on_disk in lines:
            raise DatasetError(
                f"{path}: lines {lines[where_on_disk]} and {number} list the same image ({image}); "
                "list each image once, or it is scored twice"
            )
        lines[where_on_disk] = number
        entries.append(Entry(image, root / image, root / mask if mask else None, label))
    return entries, problems


# ---------------------------------------------------------------- folder layouts


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    signature: tuple[str, ...]  # sub-folders that identify the layout
    mask_rule: MaskRule
    find: Callable[[Path], list[Entry]]


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _entry(root: Path, image: Path, mask: Path | None, label: int) -> Entry:
    return Entry(image.relative_to(root).as_posix(), image, mask, label)


def _by_stem(folder: Path, recursive: bool = False) -> dict[str, Path]:
    return {p.stem: p for p in _images(folder, recursive)}


def _find_casia(root: Path) -> list[Entry]:
    """Tp/ (tampered; sub-folders such as CASIA v1's CM/ and Sp/ too), Au/ (authentic), masks anywhere under
    Gt/ as <stem>_gt.png (the masks published for CASIA v1 and v2)."""
    masks = _by_stem(root / "Gt", recursive=True)
    tampered = _images(root / "Tp", recursive=True)
    entries = [_entry(root, p, masks.get(f"{p.stem}_gt") or masks.get(p.stem), 1) for p in tampered]
    return entries + [_entry(root, p, None, 0) for p in _images(root / "Au", recursive=True)]


def _find_columbia(root: Path) -> list[Entry]:
    """4cam_splc/ (spliced) with 4cam_splc/edgemask/<stem>_edgemask.jpg, 4cam_auth/ (authentic)."""
    masks = _by_stem(root / "4cam_splc" / "edgemask")
    entries = [_entry(root, p, masks.get(f"{p.stem}_edgemask"), 1) for p in _images(root / "4cam_splc")]
    return entries + [_entry(root, p, None, 0) for p in _images(root / "4cam_auth")]


COVERAGE_FORGED = re.compile(r"^(\d+)t$")
COVERAGE_ORIGINAL = re.compile(r"^\d+$")


def _find_coverage(root: Path) -> list[Entry]:
    """image/<n>t.tif (forged) and image/<n>.tif (original); mask/<n>forged.tif."""
    masks = _by_stem(root / "mask")
    entries = []
    for p in _images(root / "image"):
        if m := COVERAGE_FORGED.match(p.stem):
            entries.append(_entry(root, p, masks.get(f"{m.group(1)}forged"), 1))
        elif COVERAGE_ORIGINAL.match(p.stem):
            entries.append(_entry(root, p, None, 0))
    return entries


NIST16_REFERENCE = Path("reference/manipulation/NC2016-manipulation-ref.csv")


def _find_nist16(root: Path) -> list[Entry]:
    """reference/manipulation/NC2016-manipulation-ref.csv (pipe-separated): ProbeFileName, ProbeMaskFileName,
    IsTarget (Y/N); paths relative to the root."""
    reference = root / NIST16_REFERENCE
    try:
        with reference.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="|"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{reference}: cannot read the NIST16 reference table ({e})") from None
    entries = []
    for row in rows:
        probe, mask = (row.get("ProbeFileName") or "").strip(), (row.get("ProbeMaskFileName") or "").strip()
        if not probe:
            raise DatasetError(f"{reference}: a row without ProbeFileName (columns: {', '.join(rows[0])})")
        label = 1 if (row.get("IsTarget") or "").strip().upper() == "Y" else 0
        entries.append(Entry(probe, root / probe, root / mask if mask else None, label))
    return entries


def _find_dso1(root: Path) -> list[Entry]:
    """DSO-1/splicing-NN.png (forged) and normal-NN.png; masks DSO-1-Fake-Images-Masks/splicing-NN.png."""
    masks = _by_stem(root / "DSO-1-Fake-Images-Masks")
    entries = []
    for p in _images(root / "DSO-1"):
        forged = p.stem.startswith("splicing")
        entries.append(_entry(root, p, masks.get(p.stem) if forged else None, int(forged)))
    return entries


def _find_cocoglide(root: Path) -> list[Entry]:
    """fake/ (forged), mask/ (same stem), real/ (authentic)."""
    masks = _by_stem(root / "mask")
    entries = [_entry(root, p, masks.get(p.stem), 1) for p in _images(root / "fake")]
    return entries + [_entry(root, p, None, 0) for p in _images(root / "real")]


IMD2020_FORGED = re.compile(r"^(.+)_(\d+)$")


def _find_imd2020(root: Path) -> list[Entry]:
    """One folder per source photo: <id>_orig.<ext> (authentic), <id>_<k>.<ext> (forged), <id>_<k>_mask.png."""
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = _by_stem(folder)
        for stem, p in sorted(files.items()):
            if stem.endswith("_orig"):
                entries.append(_entry(root, p, None, 0))
            elif IMD2020_FORGED.match(stem):
                entries.append(_entry(root, p, files.get(f"{stem}_mask"), 1))
    return entries


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "casia",
            "CASIA v1.0/v2.0 with published masks: Tp/, Au/, Gt/<stem>_gt.png",
            ("Tp", "Au"),
            MaskRule(),
            _find_casia,
        ),
        Layout(
            "columbia",
            "Columbia uncompressed splicing: 4cam_splc/ (+edgemask/), 4cam_auth/",
            ("4cam_splc", "4cam_auth"),
            MaskRule(channel="green"),
            _find_columbia,
        ),
        Layout(
            "coverage",
            "COVERAGE: image/<n>t.tif, image/<n>.tif, mask/<n>forged.tif",
            ("image", "mask"),
            MaskRule(),
            _find_coverage,
        ),
        Layout(
            "nist16",
            "NIST Nimble 2016: reference/manipulation/NC2016-manipulation-ref.csv, probe/, mask/",
            ("reference", "probe"),
            MaskRule(inverted=True),
            _find_nist16,
        ),
        Layout(
            "dso1",
            "DSO-1: DSO-1/{splicing,normal}-NN.png, DSO-1-Fake-Images-Masks/",
            ("DSO-1", "DSO-1-Fake-Images-Masks"),
            MaskRule(inverted=True),
            _find_dso1,
        ),
        Layout("cocoglide", "CocoGlide: fake/, mask/, real/", ("fake", "mask", "real"), MaskRule(), _find_cocoglide),
        Layout(
            "imd2020", "IMD2020: <folder>/<id>_orig.*, <id>_<k>.*, <id>_<k>_mask.png", (), MaskRule(), _find_imd2020
        ),
    )
}


def _recognise(root: Path) -> Layout | None:
    for layout in LAYOUTS.values():
        if layout.signature and all((root / s).is_dir() for s in layout.signature):
            return layout
    return None
