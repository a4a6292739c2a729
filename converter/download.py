"""Downloading weight files with urllib alone: resume through a ``.part`` file, git blob SHA-1 check.

An interrupted download leaves ``NAME.part`` beside the target; the next attempt asks the server for
the rest with an HTTP Range request, and starts over when the server ignores it. A finished file
whose git blob SHA-1 is not the expected one is deleted, unless the caller allows unknown content.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .atomic import make_parent, publish
from .errors import ConversionError
from .releases import Digests, file_digests

PART_SUFFIX = ".part"
CHUNK = 1 << 16
TIMEOUT_S = 60.0  # per socket operation: a stalled server fails instead of hanging
USER_AGENT = "mantranet-torch"
HTTP_PARTIAL, HTTP_RANGE_NOT_SATISFIABLE = 206, 416


class DownloadError(Exception):
    """A download that failed; the message says why and what is left on disk."""


@dataclass
class Fetched:
    path: Path
    digests: Digests
    verified: bool  # the content is the expected one
    downloaded: bool  # False when a verified file was already there
    resumed_from: int  # bytes reused from an earlier, interrupted attempt


Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def part_path(target: Path) -> Path:
    return target.with_name(target.name + PART_SUFFIX)


def download(
    url: str,
    target: str | Path,
    expected_git_blob_sha1: str | None,
    allow_unknown: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    timeout_s: float = TIMEOUT_S,
) -> Fetched:
    """Fetch ``url`` into ``target`` (atomically, resuming an earlier ``.part``) and check its content.

    A ``target`` that is already there and verified is kept as it is. Raises ``DownloadError``.
    """
    target = Path(target)
    if target.exists():
        digests = file_digests(target)
        if digests.git_blob_sha1 == expected_git_blob_sha1:
            return Fetched(target, digests, verified=True, downloaded=False, resumed_from=0)
        if not force:
            raise DownloadError(
                f"{target}: already exists and is not the expected file (git blob SHA-1 {digests.git_blob_sha1}); "
                "pass --force to replace it"
            )
    created_dir = not target.parent.exists()
    try:
        make_parent(target)
    except ConversionError as e:
        raise DownloadError(str(e)) from None
    part = part_path(target)
    resumed_from = transfer(url, part, progress, timeout_s)
    digests = file_digests(part)
    verified = digests.git_blob_sha1 == expected_git_blob_sha1
    if expected_git_blob_sha1 is not None and not verified and not allow_unknown:
        part.unlink()
        if created_dir and not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise DownloadError(
            f"{url}: the downloaded file is not the expected one (git blob SHA-1 {digests.git_blob_sha1}, expected "
            f"{expected_git_blob_sha1}); deleted it. Pass --allow-unknown to keep a file of unknown content"
        )
    try:
        publish(part, target, force=True)  # an existing target here is a wrong file the caller forced out
    except (OSError, ConversionError) as e:
        raise DownloadError(f"{target}: cannot move the download into place ({e}); it is kept as {part}") from None
    return Fetched(target, digests, verified, downloaded=True, resumed_from=resumed_from)


def transfer(url: str, part: Path, progress: Progress | None, timeout_s: float) -> int:
    """Download ``url`` into ``part``, continuing what is already there; returns the bytes reused."""
    offset = part.stat().st_size if part.exists() else 0
    response = open_url(url, offset, timeout_s)
    if offset and response.status == HTTP_RANGE_NOT_SATISFIABLE:
        response.close()
        part.unlink()  # the partial file is not a prefix of what the server has: start over
        offset, response = 0, open_url(url, 0, timeout_s)
    elif offset and response.status != HTTP_PARTIAL:
        offset = 0  # the server ignored the Range request and sends the whole file
    elif offset and range_start(response) != offset:
        response.close()  # a range that does not continue the part: ask for the whole file instead
        offset, response = 0, open_url(url, 0, timeout_s)
    with response:
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else None
        try:
            with part.open("ab" if offset else "wb") as out:
                received = copy_stream(url, response, out, offset, total, progress)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{part}: no space left on the device after {have} bytes; free some space and run the same "
                    "command again to resume"
                ) from None
            raise DownloadError(f"{part}: cannot write ({e.strerror or e})") from None
    if total is not None and received < total:
        raise DownloadError(
            f"{url}: the transfer ended after {received} of {total} bytes; run the same command again to resume "
            f"(kept in {part})"
        )
    return offset


def open_url(url: str, offset: int, timeout_s: float) -> http.client.HTTPResponse:
    """The response to a GET (with a Range request after ``offset``); HTTP and network errors as DownloadError."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if offset and e.code == HTTP_RANGE_NOT_SATISFIABLE:
            return e  # an HTTPError is also a response; the caller starts over
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: {network_reason(e.reason)}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(f"{url}: {network_reason(e)}") from None


def network_reason(reason: object) -> str:
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out waiting for the server"
    if isinstance(reason, OSError):
        return f"network error ({reason.strerror or reason})"
    return f"cannot download ({reason})"


def range_start(response: http.client.HTTPResponse) -> int | None:
    """The first byte a 206 response carries, from ``Content-Range: bytes START-END/TOTAL``."""
    value = response.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    start = rest.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def copy_stream(
    url: str, response: BinaryIO, out: BinaryIO, offset: int, total: int | None, progress: Progress | None
) -> int:
    """Copy the body to ``out``; returns the byte count of the whole file so far (``offset`` included)."""
    done = offset
    if progress:
        progress(done, total)
    while True:
        try:
            chunk = response.read(CHUNK)
        except http.client.IncompleteRead as e:
            out.write(e.partial)
            return done + len(e.partial)
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(
                f"{url}: the connection broke after {done} bytes ({network_reason(e)}); run the same command "
                "again to resume"
            ) from None
        if not chunk:
            return done
        out.write(chunk)
        done += len(chunk)
        if progress:
            progress(done, total)
