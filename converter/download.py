"""Downloading weight files with urllib alone: resume through a ``.part`` file, git blob SHA-1 check.

An interrupted download leaves ``NAME.part`` beside the target; the next attempt asks the server for
the rest with an HTTP Range request, and starts over when the server ignores it. A finished file
whose git blob SHA-1 is not the expected one is deleted, unless the caller allows unknown content.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mantranet_torch.files import file_problem, make_parent, os_reason, publish

from .errors import ConversionError
from .releases import Digests, file_digests

PART_SUFFIX = ".part"
CHUNK = 1 << 16
TIMEOUT_S = 60.0  # per socket operation: a stalled server fails instead of hanging
# The whole transfer's deadline: an official file (15 MB) at 25 KB/s. A mirror trickling bytes fails here.
DEADLINE_S = 600.0
# The slowest transfer accepted: 1 KB/s averaged over each 60 s, so a server sending a byte now and then (and
# so never tripping the per-read timeout) fails within a minute instead of at the deadline.
MIN_RATE = (1024, 60.0)  # (bytes per second, window in seconds)
MAX_BYTES = 1 << 30  # the official files are 15 MB: a server sending more (endlessly, say) is cut off here
SCHEMES = ("http", "https")
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
    deadline_s: float | None = DEADLINE_S,
    min_rate: tuple[float, float] | None = MIN_RATE,
    max_bytes: int = MAX_BYTES,
) -> Fetched:
    """Fetch ``url`` into ``target`` (atomically, resuming an earlier ``.part``) and check its content.

    A ``target`` that is already there and verified is kept as it is. Every wait is bounded: ``timeout_s``
    per socket operation, ``deadline_s`` for the whole transfer, and ``min_rate`` (bytes per second averaged
    over a window of seconds); a transfer stopped by them keeps its ``.part`` for the next attempt to resume.
    Raises ``DownloadError``.
    """
    target = Path(target)
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as e:
        raise DownloadError(f"{url}: not a valid URL ({e})") from None
    if scheme not in SCHEMES:
        raise DownloadError(f"{url}: only http:// and https:// URLs are downloaded (not {scheme or 'a bare path'})")
    if deadline_s is not None and not (math.isfinite(deadline_s) and deadline_s > 0):
        raise DownloadError(f"timeout {deadline_s}: must be a number of seconds > 0")
    if os.path.lexists(target):
        problem = file_problem(target)
        if problem:
            raise DownloadError(f"{target}: {problem}; it is in the way of the download")
        try:
            digests = file_digests(target)
        except OSError as e:
            raise DownloadError(f"{target}: cannot be read ({os_reason(e)})") from None
        if digests.git_blob_sha1 == expected_git_blob_sha1:
            return Fetched(target, digests, verified=True, downloaded=False, resumed_from=0)
        if not force:
            raise DownloadError(
                f"{target}: already exists and is not the expected file (git blob SHA-1 {digests.git_blob_sha1}); "
                "pass --force (force=True in Python) to replace it"
            )
    created_dir = not target.parent.exists()
    try:
        make_parent(target)
    except ConversionError as e:
        raise DownloadError(str(e)) from None
    part = part_path(target)
    limits = Limits(timeout_s, deadline_s, min_rate, max_bytes)
    resumed_from = transfer(url, part, progress, limits)
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


@dataclass
class Limits:
    """The bounds on one transfer's waits (see ``download``); the clock starts when it is made.

    The deadline is enforced by a watchdog that shuts the transfer's sockets down when it passes, so that it
    holds in every phase, headers included (a server may trickle those too)."""

    timeout_s: float
    deadline_s: float | None
    min_rate: tuple[float, float] | None
    max_bytes: int
    start: float = field(default_factory=time.monotonic)
    expired: bool = False
    sockets: list[socket.socket] = field(default_factory=list)

    @contextlib.contextmanager
    def watchdog(self) -> Iterator[None]:
        if self.deadline_s is None:
            yield
            return
        timer = threading.Timer(max(self.deadline_s - (time.monotonic() - self.start), 0.0), self.expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once


def _opener(limits: Limits) -> urllib.request.OpenerDirector:
    """urllib's opener, its connections' sockets registered with ``limits`` for the watchdog."""

    def watched(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Watched(base):  # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                limits.sockets.append(self.sock)

        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(HTTP(), HTTPS())


def transfer(url: str, part: Path, progress: Progress | None, limits: Limits | float) -> int:
    """Download ``url`` into ``part``, continuing what is already there; returns the bytes reused."""
    if not isinstance(limits, Limits):  # a per-operation timeout alone
        limits = Limits(float(limits), DEADLINE_S, MIN_RATE, MAX_BYTES)
    if part.is_symlink():  # appending through it would write wherever it points
        raise DownloadError(f"{part}: a symbolic link, not a partial download; remove it")
    if os.path.lexists(part) and file_problem(part):
        raise DownloadError(f"{part}: {file_problem(part)}; it is in the way of the download")
    try:
        with limits.watchdog():
            offset = _transfer(url, part, progress, limits)
    except DownloadError:
        if not limits.expired:
            raise
    if limits.expired:  # whatever broke, or ended the body early, the watchdog did it
        have = part.stat().st_size if part.exists() else 0
        resume = f"run the same command again to resume (kept in {part})"
        raise DownloadError(_deadline_message(url, limits, have, resume)) from None
    return offset


def _transfer(url: str, part: Path, progress: Progress | None, limits: Limits) -> int:
    offset = part.stat().st_size if part.exists() else 0
    response = open_url(url, offset, limits.timeout_s, limits)
    if offset and response.status == HTTP_RANGE_NOT_SATISFIABLE:
        response.close()
        part.unlink()  # the partial file is not a prefix of what the server has: start over
        offset, response = 0, open_url(url, 0, limits.timeout_s, limits)
    elif offset and response.status != HTTP_PARTIAL:
        offset = 0  # the server ignored the Range request and sends the whole file
    elif offset and range_start(response) != offset:
        response.close()  # a range that does not continue the part: ask for the whole file instead
        offset, response = 0, open_url(url, 0, limits.timeout_s, limits)
    with response:
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else None
        if total is not None and total > limits.max_bytes:
            raise DownloadError(
                f"{url}: the server announces {total} bytes, more than the {limits.max_bytes} any weight file takes"
            )
        try:
            with part.open("ab" if offset else "wb") as out:
                received = copy_stream(url, response, out, offset, total, progress, limits, part)
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


def open_url(url: str, offset: int, timeout_s: float, limits: Limits | None = None) -> http.client.HTTPResponse:
    """The response to a GET (with a Range request after ``offset``); HTTP and network errors as DownloadError.
    With ``limits``, its watchdog can cut the request short."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        if limits is None:
            return urllib.request.urlopen(request, timeout=timeout_s)
        return _opener(limits).open(request, timeout=timeout_s)
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
    url: str,
    response: http.client.HTTPResponse,
    out: BinaryIO,
    offset: int,
    total: int | None,
    progress: Progress | None,
    limits: Limits,
    part: Path,
) -> int:
    """Copy the body to ``out``; returns the byte count of the whole file so far (``offset`` included).

    ``read1`` returns what one socket read brings, so that a trickling server cannot keep one call waiting
    for a whole chunk; the limits are checked after every read."""
    done = offset
    window_start, window_done = time.monotonic(), done
    resume = f"run the same command again to resume (kept in {part})"
    if progress:
        progress(done, total)
    while True:
        try:
            chunk = response.read1(CHUNK)
        except http.client.IncompleteRead as e:  # a cut transfer, chunked or of announced length
            out.write(e.partial)
            done += len(e.partial)
            expected = f" of {total}" if total is not None else ""
            raise DownloadError(f"{url}: the transfer ended after {done}{expected} bytes; {resume}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            if limits.expired:
                raise DownloadError(_deadline_message(url, limits, done, resume)) from None
            raise DownloadError(
                f"{url}: the connection broke after {done} bytes ({network_reason(e)}); {resume}"
            ) from None
        if not chunk:
            return done
        out.write(chunk)
        done += len(chunk)
        if progress:
            progress(done, total)
        now = time.monotonic()
        if done > limits.max_bytes:
            raise DownloadError(f"{url}: more than {limits.max_bytes} bytes, more than any weight file takes")
        if limits.deadline_s is not None and now - limits.start >= limits.deadline_s:
            raise DownloadError(_deadline_message(url, limits, done, resume))
        if limits.min_rate is not None and now - window_start >= limits.min_rate[1]:
            rate = (done - window_done) / (now - window_start)
            if rate < limits.min_rate[0]:
                raise DownloadError(
                    f"{url}: too slow: {rate:.0f} bytes/s over the last {now - window_start:.0f} s, below the "
                    f"{limits.min_rate[0]:.0f} bytes/s required; {resume}"
                )
            window_start, window_done = now, done


def _deadline_message(url: str, limits: Limits, done: int, resume: str) -> str:
    return f"{url}: not done within the {limits.deadline_s:g} s allowed (--timeout), after {done} bytes; {resume}"
