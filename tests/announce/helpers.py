"""Shared by the announcement tests."""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import IN_CI


def need_program(name: str) -> str:
    """The path of ``name``; a missing one skips on a laptop and fails in CI (CI installs
    it through scripts/install-deps.sh)."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (scripts/install-deps.sh installs it)")
        pytest.skip(f"{name} is not installed")
    return path
