"""What is wrong with an input path, said before anything opens it (opening a FIFO would block), and library
error text made into one paragraph that does not repeat the path."""

from __future__ import annotations

import errno
import os
import re
import stat
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
