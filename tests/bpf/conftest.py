"""Fixtures of the balancer's BPF_PROG_TEST_RUN tests (see harness.py)."""
from __future__ import annotations

import pytest

from .harness import fib_netns, loaded


@pytest.fixture(scope="module")
def netns():
    with fib_netns() as env:
        yield env


@pytest.fixture
def lb(netns):
    with loaded(netns) as h:
        yield h
