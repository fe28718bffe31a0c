"""Fixtures of the kernel microbenchmarks (benchmarks/test_micro_*.py)."""

import pytest

from .micro import DEVICE
from .step_throughput import Bandwidth


@pytest.fixture(scope="session")
def bandwidth():
    """The memory bandwidth of this run (an in-place fp32 add, best sample): sampled at the start of the
    session and again by each test that reads it."""
    bw = Bandwidth(DEVICE)
    for _ in range(3):
        bw.sample()
    return bw
