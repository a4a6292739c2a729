"""The project's file I/O, on the ground floor so every package can use it: what is wrong with an input path, said
before anything opens it (opening a FIFO would block); library error text made into one paragraph that does not
repeat the path; and writing files so that a reader never sees half of one and an existing file is kept unless
forced (a weight file and its manifest are never left from different runs)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable regular file ("a folder, not a file", "a symbolic link loop", ...), or None.

    Nothing is opened: a FIFO is recognised from its metadata, so a reader never blocks on one.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno == errno.ENOENT:
            return "no such file"
        if e.errno == errno.ENOTDIR:
            return "no such file (a part of its path is not a folder)"
        if e.errno == errno.EACCES:
            return "permission denied (on a folder of its path)"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not a file"
    for test, kind in _KINDS:
        if test(info.st_mode):
            return f"{kind}, not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied (cannot read it)"
    return None


def os_reason(e: OSError) -> str:
    """An OSError's reason without the file name Python appends ("[Errno 13] Permission denied: 'x'")."""
    return e.strerror or str(e)


def one_paragraph(text: str, path: str | Path | None = None) -> str:
    """``text`` (a library's error message) on one line, blank-line-separated paragraphs joined with "; ", and
    without ``path``, which the caller's message names already."""
    if path is not None:
        for form in sorted({str(path), os.fspath(Path(path).resolve())}, key=len, reverse=True):
            text = re.sub(r":?[ \t]*['\"]?" + re.escape(form) + r"['\"]?:?", "", text)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "; ".join(p for p in paragraphs if p)


def listing(items: list[str], limit: int = 5, sep: str = "; ") -> str:
    """The first ``limit`` items joined, and how many more: a crafted file's thousand problems in one line."""
    more = f"{sep}and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


class FileError(ValueError):
    """A file that cannot be read, converted or written (an existing output without force, a folder in the way, a
    full disk, a busy folder); the message names the file, and the layer or array at fault.

    ``converter.ConversionError`` is this class: the converter raises it for inputs, the writes here for outputs.
    """


ALREADY_EXISTS = "already exists; pass --force (force=True in Python) to replace it"


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
        raise FileError(f"{target}: {ALREADY_EXISTS}") from None
    except OSError:  # a filesystem without hard links
        if target.exists():
            raise FileError(f"{target}: {ALREADY_EXISTS}") from None
        os.replace(staged, target)
    else:
        staged.unlink()


def make_folder(folder: Path) -> None:
    """Create ``folder`` if needed; a file in the way or a permission is a FileError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileError(f"{folder}: cannot create the folder ({e.strerror or e})") from None


def make_parent(target: Path) -> None:
    make_folder(target.parent)


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` and try a file in it, before any long work: an unwritable output fails at once."""
    make_folder(folder)
    try:
        with staged_path(folder / "write-test"):
            pass
    except OSError as e:
        raise FileError(f"{folder}: cannot write in the output folder ({e.strerror or e})") from None


def write_bytes_atomic(target: Path, data: bytes, force: bool) -> None:
    write_files_atomic({target: data}, force)


def write_files_atomic(files: dict[Path, bytes], force: bool) -> None:
    """Write related files (a weight file, then its manifest) so that they are never seen from different runs.

    Under a lock on their folder (a second writer waits, at most ``LOCK_WAIT_S``), every file is written beside
    its target first: a failed write (a full disk, say) replaces nothing. Then the old ones that the new replace
    are removed from the last to the first, and the new moved into place from the first to the last: a run
    killed in between leaves the first file without the rest (a weight file without its manifest, whose
    content it also carries), never a file beside another run's. Hidden ``.part`` files that killed runs left
    beside the targets are removed.
    """
    for target in files:
        make_parent(target)
    current = next(iter(files))
    try:
        with folder_lock(current.parent), contextlib.ExitStack() as stack:
            refuse_existing(list(files), force)
            for target in files:
                stack.enter_context(remove_stale_parts(target))
            staged = {}
            for current, data in files.items():
                tmp = staged[current] = stack.enter_context(staged_path(current))
                with tmp.open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            if force:
                for current in reversed(list(files)):
                    if os.path.lexists(current) and not current.is_dir():
                        current.unlink()
            for current, tmp in staged.items():
                publish(tmp, current, force)
    except FileError:
        raise
    except OSError as e:
        raise FileError(f"{current}: cannot write ({e.strerror or e})") from None


LOCK_WAIT_S = 120.0  # a conversion takes seconds: a writer holding the folder longer is stuck
LOCK_POLL_S = 0.05


@contextlib.contextmanager
def folder_lock(folder: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` for writers of this project (released when the process dies); a
    filesystem without locks goes on unlocked."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FileError(
                        f"{folder}: another process has been writing in this folder for {wait_s:g} s; "
                        "try again when it is done"
                    ) from None
                time.sleep(LOCK_POLL_S)
            except OSError:
                break  # no locks on this filesystem
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def remove_stale_parts(target: Path) -> Iterator[None]:
    """Remove the hidden ``.NAME.*.part`` files that runs killed while writing ``target`` left (enter it under
    ``folder_lock``: no live writer of this project has one then)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.part"):
        with contextlib.suppress(OSError):
            stale.unlink()
    yield


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Fail before writing anything when an output exists (a dangling symbolic link too) and ``force`` is off;
    a folder in an output's place is an error even with ``force``."""
    for p in paths:
        if p.is_dir():
            raise FileError(f"{p}: a folder is in the way of the output")
        if not force and os.path.lexists(p):
            raise FileError(f"{p}: {ALREADY_EXISTS}")
