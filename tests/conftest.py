"""Shared test policy.

Tests marked ``privileged`` need root, BPF, network namespaces or Docker. On a
laptop without them they skip; with ``CI=true`` they run, and a missing
capability is a failure, never a skip.
"""
from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _privilege_problem() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    from meshlb.dataplane import bpffs

    try:
        # what the agent does on a host without bpffs; tests that pin need it too
        bpffs.ensure_mounted()
    except OSError as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config, items):
    problem = _privilege_problem()
    if problem is None:
        return
    for item in items:
        if "privileged" not in item.keywords:
            continue
        if IN_CI:
            # In CI a privileged test that cannot run is a failure: make it fail loudly.
            item.add_marker(pytest.mark.usefixtures("_fail_unprivileged"))
        else:
            item.add_marker(pytest.mark.skip(reason=f"privileged test: {problem}"))


@pytest.fixture
def _fail_unprivileged():
    problem = _privilege_problem()
    if problem:
        pytest.fail(f"privileged test cannot run in CI: {problem}")
