"""Writing files so that a reader never sees half of one and an existing file is kept unless forced."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConversionError


@contextlib.contextmanager
def staged_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` that is removed unless the caller has moved it away."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def publish(staged: Path, target: Path, force: bool) -> None:
    """Move ``staged`` to ``target`` in one step; without ``force`` an existing ``target`` is an error."""
    if force:
        os.replace(staged, target)
        return
    try:
        os.link(staged, target)  # fails if target exists, with no window between check and write
    except FileExistsError:
        raise ConversionError(f"{target}: already exists; pass --force to replace it") from None
    except OSError:  # a filesystem without hard links
        if target.exists():
            raise ConversionError(f"{target}: already exists; pass --force to replace it") from None
        os.replace(staged, target)
    else:
        staged.unlink()


def write_bytes_atomic(target: Path, data: bytes, force: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged_path(target) as tmp:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, target, force)
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(f"{target}: cannot write ({e.strerror or e})") from None


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Fail before writing anything when an output exists and ``force`` is off."""
    if not force:
        for p in paths:
            if p.exists():
                raise ConversionError(f"{p}: already exists; pass --force to replace it")
