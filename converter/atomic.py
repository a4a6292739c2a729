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
    os.chmod(tmp, new_path_mode())  # mkstemp's 0600 would carry over to the published file
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def new_path_mode(folder: bool = False) -> int:
    """The mode ``open()`` gives a new file (0666), or ``mkdir`` a new folder (0777), less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


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


def make_folder(folder: Path) -> None:
    """Create ``folder`` if needed; a file in the way or a permission is a ConversionError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"{folder}: cannot create the folder ({e.strerror or e})") from None


def make_parent(target: Path) -> None:
    make_folder(target.parent)


def write_bytes_atomic(target: Path, data: bytes, force: bool) -> None:
    write_files_atomic({target: data}, force)


def write_files_atomic(files: dict[Path, bytes], force: bool) -> None:
    """Write every file beside its target first, then move them into place in order: a failed write (a full
    disk, say) replaces nothing, so a weight file and its manifest are never left from different runs."""
    for target in files:
        make_parent(target)
    current = next(iter(files))
    try:
        with contextlib.ExitStack() as stack:
            staged = {}
            for current, data in files.items():
                tmp = staged[current] = stack.enter_context(staged_path(current))
                with tmp.open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            for current, tmp in staged.items():
                publish(tmp, current, force)
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(f"{current}: cannot write ({e.strerror or e})") from None


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Fail before writing anything when an output exists and ``force`` is off."""
    if not force:
        for p in paths:
            if p.exists():
                raise ConversionError(f"{p}: already exists; pass --force to replace it")
