"""Hypothesis profiles: ``ci`` (derandomized, the default) and ``explore`` (many more examples).

Choose with ``HYPOTHESIS_PROFILE=explore make test``. Tests size their example counts with
``examples(n)``: n under ``ci``, ``EXPLORE_FACTOR`` times n under ``explore``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "HYPOTHESIS_PROFILE"
EXPLORE_FACTOR = 20

settings.register_profile(
    "ci",
    derandomize=True,  # the same examples on every run, so CI results are reproducible
    deadline=None,  # model runs vary in time; speed is checked by benchmarks, never by tests
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    deadline=None,
    max_examples=20 * EXPLORE_FACTOR,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def active_profile() -> str:
    return os.environ.get(PROFILE_ENV, "ci")


def load_profile() -> None:
    settings.load_profile(active_profile())


def examples(ci: int) -> int:
    """The example count for a test that runs ``ci`` examples under the CI profile."""
    return ci * EXPLORE_FACTOR if active_profile() == "explore" else ci
