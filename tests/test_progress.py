"""The commands' progress display: drawn on a terminal, silent elsewhere."""

from __future__ import annotations

import io

from mantranet_cli import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_download_bar_on_a_terminal_and_nothing_in_a_log() -> None:
    term = Terminal()
    with progress.Bytes("w.h5", term) as bar:
        bar.bar.mininterval = 0  # draw every update, so the 50% state is seen
        for done in range(0, 2 * 2**20 + 1, 2**20):
            bar(done, 2 * 2**20)
    text = term.getvalue()
    assert "w.h5:  50%" in text and "1.00M/2.00M" in text and "w.h5: 100%" in text
    log = io.StringIO()
    with progress.Bytes("w.h5", log) as bar:
        bar(10, 20)
        bar(20, 20)
    assert log.getvalue() == ""


def test_a_download_of_unknown_size_counts_bytes() -> None:
    term = Terminal()
    with progress.Bytes("w.h5", term) as bar:
        bar.bar.mininterval = 0
        bar(0, None)
        bar(3 * 2**20, None)
    assert "3.00MB" in term.getvalue()
