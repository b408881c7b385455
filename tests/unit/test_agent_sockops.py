"""Where the agent puts the tracer's sock_ops hook (conntrack.sockops_cgroup), with the
tracer faked; the hook itself is tested against the kernel in
tests/integration/test_tracer.py and through the agents of tests/integration/test_lab.py."""
from __future__ import annotations

import errno
import logging

import pytest

from meshlb.agent import root as agent_mod
from meshlb.agent import Agent
from meshlb.config import default_config
from meshlb.dataplane.libbpf import BpfError


class FakeTracer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.attached: list[str] = []

    def attach_cgroup(self, path: str) -> None:
        if self.fail:
            raise BpfError(errno.EBADF, f"bpf_link_create(program 'meshlb_sock_ops' on cgroup {path})")
        self.attached.append(path)


def make_agent(tracer: FakeTracer) -> Agent:
    a = Agent.__new__(Agent)
    a.cfg = default_config()
    a.tracer = tracer
    return a


def test_auto_attaches_to_the_cgroup2_root(monkeypatch, caplog):
    monkeypatch.setattr(agent_mod, "cgroup2_root", lambda: "/sys/fs/cgroup")
    a = make_agent(FakeTracer())
    with caplog.at_level(logging.INFO, logger=agent_mod.log.name):
        a._attach_sockops("auto")
    assert a.tracer.attached == ["/sys/fs/cgroup"]
    assert "sock_ops on cgroup /sys/fs/cgroup" in caplog.text


def test_off_attaches_nothing(monkeypatch):
    monkeypatch.setattr(agent_mod, "cgroup2_root", lambda: pytest.fail("looked for a cgroup"))
    a = make_agent(FakeTracer())
    a._attach_sockops("off")
    assert a.tracer.attached == []


def test_auto_without_cgroup2_or_failing_goes_on_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(agent_mod, "cgroup2_root", lambda: None)
    a = make_agent(FakeTracer())
    with caplog.at_level(logging.WARNING, logger=agent_mod.log.name):
        a._attach_sockops("auto")
    assert a.tracer.attached == []
    assert "no cgroup v2 hierarchy mounted" in caplog.text
    caplog.clear()
    monkeypatch.setattr(agent_mod, "cgroup2_root", lambda: "/sys/fs/cgroup")
    a = make_agent(FakeTracer(fail=True))
    with caplog.at_level(logging.WARNING, logger=agent_mod.log.name):
        a._attach_sockops("auto")
    assert "cannot attach the sock_ops hook to /sys/fs/cgroup" in caplog.text


def test_a_path_that_cannot_be_attached_is_an_error_naming_the_field():
    a = make_agent(FakeTracer(fail=True))
    with pytest.raises(RuntimeError, match=r"conntrack\.sockops_cgroup: .*EBADF"):
        a._attach_sockops("/sys/fs/cgroup/app.slice")
