"""The resumable result store: one file per evaluated image, written atomically as the image finishes.

A record's key is the SHA-256 of the image's content, its mask's content, the weights' git blob SHA-1 and
every option that changes the result, so a rerun (on any machine, with any engine) finds exactly the work
that is done, and a changed image, mask, weight file or option is computed afresh. ``STORE_FORMAT`` is in
every key and every file: records of another format (format 1 kept the pooled ROC's scores at 16-bit
resolution) are never found, so they are computed again rather than mixed in.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mantranet_torch.files import write_bytes_atomic

STORE_FORMAT = 2  # 2: exact score distributions (float32 values and counts) for the pooled ROC


def record_key(**parts: object) -> str:
    """A stable key for ``parts`` (JSON-serialisable values)."""
    text = json.dumps({"format": STORE_FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Record:
    """What one image (under one perturbation and backend) contributes: JSON-able fields and a few arrays."""

    fields: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def encode(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, __record__=np.array(json.dumps(self.fields)), __format__=np.array(STORE_FORMAT), **self.arrays
        )
        return buffer.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> Record:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            found = int(npz["__format__"]) if "__format__" in npz.files else 1
            if found != STORE_FORMAT:
                raise ValueError(f"a record of store format {found}; this version reads format {STORE_FORMAT}")
            arrays = {k: npz[k] for k in npz.files if k not in ("__record__", "__format__")}
            return cls(json.loads(str(npz["__record__"])), arrays)


class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> Record | None:
        """The stored record, or None when absent, unreadable, of another format or holding a NaN or infinite
        number (all computed again: a record is only ever written from a finite map)."""
        path = self.path(key)
        try:
            record = Record.decode(path.read_bytes())
            return record if finite(record.fields) and all(finite(a) for a in record.arrays.values()) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
            return None

    def put(self, key: str, record: Record) -> None:
        write_bytes_atomic(self.path(key), record.encode(), force=True)


def finite(value: object) -> bool:
    """Whether every number in ``value`` (JSON-like fields, or an array) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(finite(v) for v in value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "fc":
        return bool(np.isfinite(value).all())
    return True


def default_store() -> Path:
    """``evaluate/`` in the per-user cache folder (records are keyed by content, so one store serves every run)."""
    from converter.cache import cache_dir

    return cache_dir() / "evaluate"
