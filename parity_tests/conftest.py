"""Fixtures of the parity suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

# TensorFlow's C++ warnings (float64 graphs it does not optimise, when the official code runs in float64) kept out
# of the test log, as `mantranet parity` keeps them out of the user's; set before any test module imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
import torch

from parity_tests.official_files import WeightStore

# Two frameworks' thread pools share the machine in these tests. On two busy cores PyTorch's OpenMP threads
# then wait on each other: one parity run on a 16 x 20 image took 4.9 s with 2 threads and 0.8 s with 1.
PARITY_TORCH_THREADS = 1


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(PARITY_TORCH_THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> WeightStore:
    return WeightStore(tmp_path_factory.mktemp("official-files"))
