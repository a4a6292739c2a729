"""Which file is which: the release table, content hashes, and variant choice.

The table is ``weights/releases.json`` in the repository; an installed package carries the same file as
``converter/data/releases.json`` (package data, read with ``importlib.resources``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from mantranet_torch import RELEASES, ManTraNetConfig

from .cache import cache_dir
from .errors import ConversionError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def release_table_file() -> Traversable:
    """The packaged table of an installed package, else the repository's ``weights/releases.json``."""
    packaged = resources.files(__package__).joinpath("data", "releases.json")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "weights" / "releases.json"


RELEASES_JSON = release_table_file()
RELEASE_NAME = re.compile(r"^ManTraNet_Ptrain(\d)\.h5$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OfficialRelease:
    index: int
    file: str
    git_blob_sha1: str
    url: str
    config: ManTraNetConfig


@dataclass(frozen=True)
class PortCheckpoint:
    """A checkpoint of the earlier PyTorch port."""

    file: str
    git_blob_sha1: str
    holds: str
    url: str


@dataclass(frozen=True)
class Digests:
    size: int
    sha256: str
    git_blob_sha1: str


def file_digests(path: str | Path) -> Digests:
    """Size, SHA-256 and git blob SHA-1 (``sha1(b'blob <size>\\0' + content)``) in one read."""
    path = Path(path)
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return Digests(size, sha256.hexdigest(), sha1.hexdigest())


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(RELEASES_JSON.read_text())


def official_releases() -> list[OfficialRelease]:
    out = []
    for r in _table()["official"]:  # files here; the architecture is mantranet_torch.RELEASES, the one copy
        out.append(OfficialRelease(r["index"], r["file"], r["git_blob_sha1"], r["url"], RELEASES[r["index"]]))
    return out


def port_checkpoints() -> list[PortCheckpoint]:
    return [
        PortCheckpoint(c["file"], c["git_blob_sha1"], c["holds"], c["url"]) for c in _table()["earlier_pytorch_port"]
    ]


@dataclass(frozen=True)
class OfficialCode:
    """The official model code, ``src/modelCore.py``: its name, git blob SHA-1 and official URL."""

    file: str
    git_blob_sha1: str
    url: str


def official_code() -> OfficialCode:
    entry = _table()["official_code"]
    return OfficialCode(entry["file"], entry["git_blob_sha1"], entry["url"])


def official_code_path() -> Path:
    """Where ``mantranet weights fetch --code`` keeps the official ``modelCore.py``."""
    return cache_dir() / "official" / official_code().file


def official_release(index: int) -> OfficialRelease:
    for r in official_releases():
        if r.index == index:
            return r
    raise ConversionError(f"no official release {index}; releases are 0 to {len(official_releases()) - 1}")


def release_by_hash(git_blob_sha1: str) -> OfficialRelease | None:
    return next((r for r in official_releases() if r.git_blob_sha1 == git_blob_sha1), None)


def release_by_name(name: str) -> int | None:
    m = RELEASE_NAME.match(name)
    return int(m.group(1)) if m and int(m.group(1)) in RELEASES else None


def releases_fitting(first_block_filters: int) -> list[int]:
    return [i for i, c in sorted(RELEASES.items()) if c.first_block_filters == first_block_filters]


@dataclass(frozen=True)
class Identification:
    index: int
    by: str  # "content hash", "file name" or "--variant"
    release: OfficialRelease | None  # set when the content is an official file


def resolve_variant(
    path: Path, digests: Digests, first_block_filters: int | None, variant: int | None
) -> Identification:
    """Decide the release a file is: content hash, then file name, then the user's ``variant``.

    The first source that speaks decides (an official file's hash outranks its name). A ``variant`` that
    contradicts the deciding source is an error, and so is a choice the file's shapes rule out.
    """
    by_hash = release_by_hash(digests.git_blob_sha1)
    by_name = release_by_name(path.name)
    if variant is not None and variant not in RELEASES:
        raise ConversionError(f"--variant {variant}: no such release; releases are {sorted(RELEASES)}")
    if by_hash is not None:
        if variant is not None and variant != by_hash.index:
            raise ConversionError(
                f"{path}: by its content this is {by_hash.file} (release {by_hash.index}); "
                f"--variant {variant} contradicts it"
            )
        ident = Identification(by_hash.index, "content hash", by_hash)
    elif variant is not None:
        if by_name is not None and by_name != variant:
            raise ConversionError(
                f"{path}: its name says release {by_name} but --variant says {variant}; rename the file or drop one"
            )
        ident = Identification(variant, "--variant", None)
    elif by_name is not None:
        ident = Identification(by_name, "file name", None)
    else:
        fits = releases_fitting(first_block_filters) if first_block_filters is not None else sorted(RELEASES)
        raise ConversionError(
            f"{path}: cannot tell which release this is: its content hash is not an official file's and its name "
            f"is not ManTraNet_Ptrain<N>.h5; its shapes fit releases {_join(fits)}, which differ in settings the "
            f"weights do not record (window sizes, transform activation). Choose one with --variant N"
        )
    expected = RELEASES[ident.index].first_block_filters
    if first_block_filters is not None and first_block_filters != expected:
        raise ConversionError(
            f"{path}: release {ident.index} (by {ident.by}) has {expected} first-block filters, but the file's b1c1 "
            f"has {first_block_filters}, which fits releases {_join(releases_fitting(first_block_filters)) or 'none'}"
        )
    return ident


def _join(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)
