"""Fixtures shared by the tests under tests/ (the repository-wide ones are in ../conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One PyTorch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): on two
    shared cores OpenMP threads on small images mostly wait on each other (see parity_tests/conftest.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
