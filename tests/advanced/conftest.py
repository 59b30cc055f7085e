"""Session fixtures of the advanced-sampler tests."""

import os
import sys

import pytest

from schedulers.gaussian_mixture import GaussianMixture

# The helpers module sits next to this file; tests/ is not a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from advanced_helpers import Problem  # noqa: E402


@pytest.fixture(scope="session")
def ring_problem():
    return Problem(GaussianMixture.ring())


@pytest.fixture(scope="session")
def mixture16_problem():
    return Problem(GaussianMixture.random(dim=16, num_modes=4, seed=1), beta_schedule="squaredcos_cap_v2")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tests run thousands of tiny (64 x 16) evaluations: all of them on one thread (tests/conftest.py)."""
