"""Progress display of every command: tqdm bars on stderr, as wide as the terminal, drawn only when stderr is a
terminal. A log file or a pipe gets the commands' own result lines and nothing else (no half-drawn bars).

Library functions report progress through plain callbacks; the commands turn them into these bars.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


def live(stream: TextIO | None = None) -> bool:
    """Whether progress is drawn on ``stream`` (default stderr): only on a terminal."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None, **options: object) -> tqdm:
    """A tqdm bar on ``stream`` (default stderr), width-aware, disabled when the stream is not a terminal."""
    stream = stream or sys.stderr
    return tqdm(
        total=total, desc=desc, unit=unit, file=stream, disable=not live(stream), dynamic_ncols=True, leave=False,
        **options,
    )  # fmt: skip


def message(text: str, stream: TextIO | None = None) -> None:
    """Print a line without tearing a bar that is being drawn on the same stream."""
    tqdm.write(text, file=stream or sys.stderr)


class Bytes:
    """A download's ``progress(done, total)`` callback drawn as a bar of bytes (a counter when the size is
    unknown). Use as a context manager, so the bar is cleared whatever happens."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.bar = bar(None, label, unit="B", stream=stream, unit_scale=True, unit_divisor=1024)

    def __call__(self, done: int, total: int | None) -> None:
        if total != self.bar.total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Bytes:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
