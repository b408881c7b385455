"""Where the agent's data-plane session puts the tracer's sock_ops hook
(conntrack.sockops_cgroup), with the tracer faked; the hook itself is tested against the
kernel in tests/integration/test_tracer.py and through the agents of
tests/integration/test_lab.py."""
from __future__ import annotations

import errno
import logging

import pytest

from meshlb.agent import session
from meshlb.agent.session import attach_sockops
from meshlb.dataplane.libbpf import BpfError


class FakeTracer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.attached: list[str] = []

    def attach_cgroup(self, path: str) -> None:
        if self.fail:
            raise BpfError(errno.EBADF, f"bpf_link_create(program 'meshlb_sock_ops' on cgroup {path})")
        self.attached.append(path)


def test_auto_attaches_to_the_cgroup2_root(monkeypatch, caplog):
    monkeypatch.setattr(session, "cgroup2_root", lambda: "/sys/fs/cgroup")
    tracer = FakeTracer()
    with caplog.at_level(logging.INFO, logger=session.log.name):
        attach_sockops(tracer, "auto", "cluster.toml")
    assert tracer.attached == ["/sys/fs/cgroup"]
    assert "sock_ops on cgroup /sys/fs/cgroup" in caplog.text


def test_off_attaches_nothing(monkeypatch):
    monkeypatch.setattr(session, "cgroup2_root", lambda: pytest.fail("looked for a cgroup"))
    tracer = FakeTracer()
    attach_sockops(tracer, "off", "cluster.toml")
    assert tracer.attached == []


def test_auto_without_cgroup2_or_failing_goes_on_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(session, "cgroup2_root", lambda: None)
    tracer = FakeTracer()
    with caplog.at_level(logging.WARNING, logger=session.log.name):
        attach_sockops(tracer, "auto", "cluster.toml")
    assert tracer.attached == []
    assert "no cgroup v2 hierarchy mounted" in caplog.text
    caplog.clear()
    monkeypatch.setattr(session, "cgroup2_root", lambda: "/sys/fs/cgroup")
    with caplog.at_level(logging.WARNING, logger=session.log.name):
        attach_sockops(FakeTracer(fail=True), "auto", "cluster.toml")
    assert "cannot attach the sock_ops hook to /sys/fs/cgroup" in caplog.text


def test_a_path_that_cannot_be_attached_is_an_error_naming_the_file_and_field():
    with pytest.raises(RuntimeError, match=r"^/etc/meshlb/cluster\.toml: conntrack\.sockops_cgroup: .*EBADF"):
        attach_sockops(FakeTracer(fail=True), "/sys/fs/cgroup/app.slice", "/etc/meshlb/cluster.toml")
