"""Shared by tests/ and parity_tests/: the hypothesis profile named by $HYPOTHESIS_PROFILE (default ci)."""

from parity_tests.profiles import load_profile

load_profile()
