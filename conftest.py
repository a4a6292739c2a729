"""Shared by tests/ and parity_tests/: the hypothesis profile named by $HYPOTHESIS_PROFILE (default ci)."""

import pytest
import torch

from parity_tests.profiles import load_profile

load_profile()


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same torch random state, whatever ran before it."""
    torch.manual_seed(0)
