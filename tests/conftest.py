"""Shared test setup: a deterministic hypothesis profile and a seeded RNG fixture.

Hypothesis runs derandomized by default so CI and every developer see the same examples; set
HYPOTHESIS_PROFILE=dev for fresh random examples, or =thorough for a long local run.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=100)
settings.register_profile("thorough", deadline=None, print_blob=True, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random.Random seeded from the test's id: reproducible, and different per test."""
    return random.Random(request.node.nodeid)
