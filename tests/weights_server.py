"""A real HTTP server on 127.0.0.1 (port 0, in a thread) and a release table pointing at it, for download tests.

Routes serve fixture bytes in one of several behaviours: a normal server honouring Range requests, one
that ignores them, one that answers a Range request from the 256-byte block the range starts in, one that
cuts every transfer short, one that drops the first transfer half-way and then honours Range (to resume),
one that cuts a chunked transfer (no Content-Length) half-way, one that trickles a byte every ``delay``
seconds, one that sends its headers and then nothing, and anything else is a 404.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from converter import releases

RANGE, NO_RANGE, BLOCK_RANGE, TRUNCATE, DROP_ONCE = "range", "no-range", "block-range", "truncate", "drop-once"
CHUNKED_CUT, TRICKLE, STALL, SLOW_HEADERS = "chunked-cut", "trickle", "stall", "slow-headers"
BLOCK = 256
SLOW_SERVER_LIMIT_S = 10.0  # a trickling or stalled handler gives up by then, so that the server can stop


@dataclass
class Route:
    body: bytes
    mode: str = RANGE
    served: int = 0  # completed or attempted GETs
    delay: float = 0.5  # seconds between bytes (TRICKLE)


@dataclass
class WeightsServer:
    base_url: str
    routes: dict[str, Route]
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)

    def add(self, path: str, body: bytes, mode: str = RANGE, delay: float = 0.5) -> str:
        self.routes[path] = Route(body, mode, delay=delay)
        return self.base_url + path


def _handler(server_state: WeightsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            server_state.requests.append((self.path, range_header))
            route = server_state.routes.get(self.path)
            if route is None:
                self.send_error(404, "Not Found")
                return
            route.served += 1
            if route.mode == SLOW_HEADERS:
                self.slow_headers(route)
                return
            if route.mode in (CHUNKED_CUT, TRICKLE, STALL):
                self.slow(route)
                return
            body, start = route.body, 0
            if range_header and route.mode in (RANGE, BLOCK_RANGE, DROP_ONCE):
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if route.mode == BLOCK_RANGE:
                    start -= start % BLOCK
                if start >= len(body):
                    self.send_response(416, "Range Not Satisfiable")
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = route.mode == TRUNCATE or (route.mode == DROP_ONCE and route.served == 1)
            self.wfile.write(body[start : len(body) // 2] if cut else body[start:])
            if cut:
                self.close_connection = True

        def slow_headers(self, route: Route) -> None:
            """Headers a byte every ``delay`` seconds, endlessly: a client bounded per read only never gets out."""
            self.close_connection = True
            started = time.monotonic()
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while time.monotonic() - started < SLOW_SERVER_LIMIT_S:
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(route.delay)
            except OSError:
                return

        def slow(self, route: Route) -> None:
            self.send_response(200)
            self.close_connection = True
            if route.mode == CHUNKED_CUT:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                half = route.body[: len(route.body) // 2]
                for i in range(0, len(half), 4096):
                    piece = half[i : i + 4096]
                    self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                return  # no terminating zero-length chunk: the transfer is cut
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.flush()
            started = time.monotonic()
            try:
                for i in range(len(route.body)):
                    if time.monotonic() - started > SLOW_SERVER_LIMIT_S:
                        return
                    if route.mode == STALL:
                        time.sleep(0.05)
                        continue
                    self.wfile.write(route.body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(route.delay)
            except OSError:  # the client gave up
                return

    return Handler


@contextlib.contextmanager
def serve() -> Iterator[WeightsServer]:
    state = WeightsServer("", {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@contextlib.contextmanager
def edited_release_table(tmp_dir: Path, edit: Callable[[dict], None]) -> Iterator[Path]:
    """Point the release table at a copy of it that ``edit`` changed in place; the original is restored after."""
    table = json.loads(releases.RELEASES_JSON.read_text())
    edit(table)
    path = tmp_dir / "releases.json"
    path.write_text(json.dumps(table))
    original = releases.RELEASES_JSON
    releases.RELEASES_JSON = path
    releases._table.cache_clear()
    try:
        yield path
    finally:
        releases.RELEASES_JSON = original
        releases._table.cache_clear()


def release_table(tmp_dir: Path, index: int, git_blob_sha1: str, url: str) -> contextlib.AbstractContextManager[Path]:
    """Point the release table at a copy in which release ``index`` has this content hash and URL."""

    def edit(table: dict) -> None:
        for entry in table["official"]:
            if entry["index"] == index:
                entry.update(git_blob_sha1=git_blob_sha1, url=url)

    return edited_release_table(tmp_dir, edit)
