"""converter.download against a real HTTP server on 127.0.0.1: verify, resume, restart, and every failure."""

from __future__ import annotations

import errno
import hashlib
import io
import socket
import time
from pathlib import Path

import pytest

from converter import download as dl
from converter.download import DownloadError, download
from tests.weights_server import (
    BLOCK,
    BLOCK_RANGE,
    CHUNKED_CUT,
    DROP_ONCE,
    NO_RANGE,
    RANGE,
    SLOW_HEADERS,
    STALL,
    TRICKLE,
    TRUNCATE,
    serve,
)

BODY = bytes(range(256)) * 4096  # 1 MiB, every byte value, so a shifted or restarted copy cannot pass
OTHER = bytes(reversed(BODY))


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


SHA1 = git_blob_sha1(BODY)


@pytest.fixture
def server():
    with serve() as s:
        yield s


def test_git_blob_sha1_is_gits_object_id() -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_a_verified_download_lands_atomically(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY)
    calls = []
    fetched = download(url, tmp_path / "w.h5", SHA1, progress=lambda done, total: calls.append((done, total)))
    assert fetched.verified and fetched.downloaded and fetched.resumed_from == 0
    assert (tmp_path / "w.h5").read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]
    assert calls[0] == (0, len(BODY)) and calls[-1] == (len(BODY), len(BODY))
    # Present and verified: kept, no request made.
    before = len(server.requests)
    assert not download(url, tmp_path / "w.h5", SHA1).downloaded
    assert len(server.requests) == before


def test_a_mismatch_leaves_nothing_behind(server, tmp_path) -> None:
    url = server.add("/w.h5", OTHER)
    folder = tmp_path / "new"
    with pytest.raises(DownloadError, match=rf"not the expected one \(git blob SHA-1 {git_blob_sha1(OTHER)}, expected"):
        download(url, folder / "w.h5", SHA1)
    assert list(tmp_path.iterdir()) == []  # not even the folder it created
    fetched = download(url, folder / "w.h5", SHA1, allow_unknown=True)
    assert not fetched.verified and (folder / "w.h5").read_bytes() == OTHER


def test_an_existing_wrong_file_is_replaced_only_with_force(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY)
    (tmp_path / "w.h5").write_bytes(OTHER)
    with pytest.raises(DownloadError, match=r"w.h5: already exists and is not the expected file.*--force"):
        download(url, tmp_path / "w.h5", SHA1)
    assert (tmp_path / "w.h5").read_bytes() == OTHER
    assert download(url, tmp_path / "w.h5", SHA1, force=True).verified
    assert (tmp_path / "w.h5").read_bytes() == BODY


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, DROP_ONCE)
    half = len(BODY) // 2
    with pytest.raises(DownloadError, match=rf"ended after {half} of {len(BODY)} bytes; run the same command again"):
        download(url, tmp_path / "w.h5", SHA1)
    assert (tmp_path / "w.h5.part").stat().st_size == half and not (tmp_path / "w.h5").exists()
    fetched = download(url, tmp_path / "w.h5", SHA1)
    assert fetched.verified and fetched.resumed_from == half
    assert server.requests[-1] == ("/w.h5", f"bytes={half}-")
    assert (tmp_path / "w.h5").read_bytes() == BODY and not (tmp_path / "w.h5.part").exists()


def test_a_server_ignoring_range_restarts_from_zero(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, NO_RANGE)
    (tmp_path / "w.h5.part").write_bytes(b"stale bytes of another attempt")
    fetched = download(url, tmp_path / "w.h5", SHA1)
    assert server.requests[-1][1] == "bytes=30-"  # it asked, the server sent everything
    assert fetched.verified and fetched.resumed_from == 0 and (tmp_path / "w.h5").read_bytes() == BODY


def test_a_range_that_does_not_continue_the_part_restarts(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, BLOCK_RANGE)
    kept = BLOCK + 10  # the server answers from byte 256, not 266: that cannot be appended
    (tmp_path / "w.h5.part").write_bytes(BODY[:kept])
    fetched = download(url, tmp_path / "w.h5", SHA1)
    assert [r for _, r in server.requests] == [f"bytes={kept}-", None]
    assert fetched.verified and fetched.resumed_from == 0 and (tmp_path / "w.h5").read_bytes() == BODY


def test_an_output_folder_that_is_a_file_is_a_clear_error(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY)
    (tmp_path / "taken").write_bytes(b"a file, not a folder")
    with pytest.raises(DownloadError, match="taken: cannot create the folder"):
        download(url, tmp_path / "taken" / "w.h5", SHA1)


def test_a_part_longer_than_the_file_restarts(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY)
    (tmp_path / "w.h5.part").write_bytes(OTHER + b"extra")
    fetched = download(url, tmp_path / "w.h5", SHA1)  # the server answers 416 to the Range request
    assert fetched.verified and fetched.resumed_from == 0
    assert [r for _, r in server.requests] == [f"bytes={len(OTHER) + 5}-", None]


def test_a_truncated_transfer_is_an_error_that_keeps_the_part(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, TRUNCATE)
    with pytest.raises(DownloadError, match=rf"ended after {len(BODY) // 2} of {len(BODY)} bytes"):
        download(url, tmp_path / "w.h5", SHA1)
    assert not (tmp_path / "w.h5").exists()


@pytest.mark.parametrize(("path", "message"), [("/missing.h5", r"HTTP 404 Not Found")])
def test_http_errors(server, tmp_path, path, message) -> None:
    with pytest.raises(DownloadError, match=rf"{server.base_url}{path}: {message}"):
        download(server.base_url + path, tmp_path / "w.h5", SHA1)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused(tmp_path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"http://127.0.0.1:{port}/w.h5: connection refused"):
        download(f"http://127.0.0.1:{port}/w.h5", tmp_path / "w.h5", SHA1)


def test_unknown_host(tmp_path, monkeypatch) -> None:
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(DownloadError, match=r"mirror.invalid/w.h5: cannot resolve the host name \(Name or service"):
        download("http://mirror.invalid/w.h5", tmp_path / "w.h5", SHA1)


def test_a_full_disk(server, tmp_path, monkeypatch) -> None:
    url = server.add("/w.h5", BODY)
    real_open = Path.open

    class FullDisk(io.RawIOBase):
        """A file that takes 100 000 bytes, then fails as a full disk does."""

        def __init__(self, f) -> None:
            self.f, self.room = f, 100_000

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def close(self) -> None:
            self.f.close()

    def open_with_little_room(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return FullDisk(f) if self.name.endswith(dl.PART_SUFFIX) and ("w" in mode or "a" in mode) else f

    monkeypatch.setattr(Path, "open", open_with_little_room)
    with pytest.raises(DownloadError, match=r"w.h5.part: no space left on the device after \d+ bytes; free some"):
        download(url, tmp_path / "w.h5", SHA1)
    assert not (tmp_path / "w.h5").exists()


# ---- cut, slow and stalled servers: every wait bounded, the part kept for a resume ----


@pytest.mark.parametrize("allow_unknown", [False, True])
def test_a_cut_chunked_transfer_is_an_error_that_keeps_the_part(server, tmp_path, allow_unknown) -> None:
    url = server.add("/w.h5", BODY, CHUNKED_CUT)
    half = len(BODY) // 2
    with pytest.raises(DownloadError, match=rf"ended after {half} bytes; run the same command again to resume"):
        download(url, tmp_path / "w.h5", SHA1, allow_unknown=allow_unknown)
    assert not (tmp_path / "w.h5").exists() and (tmp_path / "w.h5.part").read_bytes() == BODY[:half]
    server.routes["/w.h5"].mode = RANGE  # the server is back: the next attempt asks for the rest
    fetched = download(url, tmp_path / "w.h5", SHA1)
    assert fetched.verified and fetched.resumed_from == half and (tmp_path / "w.h5").read_bytes() == BODY


def test_a_trickling_server_meets_the_deadline(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, TRICKLE, delay=0.1)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"not done within the 1 s allowed \(--timeout\), after \d+ bytes; run the"):
        download(url, tmp_path / "w.h5", SHA1, deadline_s=1.0, min_rate=None)
    assert time.monotonic() - started < 5  # the deadline, plus at most one socket read
    assert 0 < (tmp_path / "w.h5.part").stat().st_size < len(BODY)


def test_a_trickling_server_fails_the_minimum_rate(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, TRICKLE, delay=0.05)
    with pytest.raises(
        DownloadError, match=r"too slow: \d+ bytes/s over the last 1 s, below the 1000 bytes/s required"
    ):
        download(url, tmp_path / "w.h5", SHA1, deadline_s=None, min_rate=(1000, 1.0))
    assert (tmp_path / "w.h5.part").exists()


def test_a_stalled_server_meets_the_deadline_within_one_read(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, STALL)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"not done within the 1 s allowed"):
        download(url, tmp_path / "w.h5", SHA1, timeout_s=60.0, deadline_s=1.0)
    assert time.monotonic() - started < 5  # the socket read was bounded by what was left of the deadline


def test_headers_trickled_forever_meet_the_deadline(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY, SLOW_HEADERS, delay=0.1)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"not done within the 1 s allowed \(--timeout\), after 0 bytes"):
        download(url, tmp_path / "w.h5", SHA1, timeout_s=60.0, deadline_s=1.0)
    assert time.monotonic() - started < 3


def test_a_server_sending_more_than_any_weight_file_is_cut_off(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY)
    with pytest.raises(DownloadError, match=rf"announces {len(BODY)} bytes, more than the 1000 any weight file takes"):
        download(url, tmp_path / "w.h5", SHA1, max_bytes=1000)
    url = server.add("/c.h5", BODY, CHUNKED_CUT)  # no Content-Length: counted as it comes
    with pytest.raises(DownloadError, match=r"more than 1000 bytes"):
        download(url, tmp_path / "c.h5", SHA1, max_bytes=1000)


@pytest.mark.parametrize(
    ("url", "message"),
    [("file:///etc/hostname", "only http:// and https:// URLs"), ("/etc/hostname", "only http:// and https://")],
)
def test_only_http_urls(tmp_path, url, message) -> None:
    with pytest.raises(DownloadError, match=message):
        download(url, tmp_path / "w.h5", SHA1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("deadline", [0.0, -1.0, float("inf"), float("nan")])
def test_a_deadline_must_be_a_positive_number(tmp_path, deadline) -> None:
    with pytest.raises(DownloadError, match=r"timeout .*: must be a number of seconds > 0"):
        download("http://127.0.0.1:9/w.h5", tmp_path / "w.h5", SHA1, deadline_s=deadline)


def test_a_folder_in_place_of_the_target_is_named(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY)
    (tmp_path / "w.h5").mkdir()
    with pytest.raises(DownloadError, match=r"w.h5: a folder, not a file; it is in the way of the download"):
        download(url, tmp_path / "w.h5", SHA1, force=True)


def test_a_part_that_is_a_symbolic_link_is_never_written_through(server, tmp_path) -> None:
    url = server.add("/w.h5", BODY)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "w.h5.part").symlink_to(victim)
    with pytest.raises(DownloadError, match=r"w.h5.part: a symbolic link, not a partial download"):
        download(url, tmp_path / "w.h5", SHA1)
    assert victim.read_text() == "keep me"
