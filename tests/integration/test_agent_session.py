"""The agent's data-plane session (meshlb/agent/session.py) against the kernel, in a
namespace of its own: the two ways it ends. Keeping the pins leaves XDP attached and
the maps, links and marks for the next agent, which adopts them; unpinning detaches
and removes everything and undoes what the session changed on the host."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from meshlb import vipnet
from meshlb.agent.session import MARKS_PIN, TRACER_SUBDIR, XDP_LINK_PIN, Session
from meshlb.config import parse
from meshlb.dataplane.balancer import NEIGH_LINK_PIN
from meshlb.dataplane.libbpf import Link
from meshlb.lab.netns import Topology

pytestmark = pytest.mark.privileged

MIX, VIP = "10.89.0.11", "10.89.100.1"


def config(pin: Path, sockops: str = "off", source: str = "cluster.toml"):
    return parse(f'[node]\nname = "mix1"\niface = "eth0"\npin_dir = "{pin}"\nxdp_mode = "generic"\n'
                 f'[cluster]\nkey_file = "/nonexistent"\n[conntrack]\nsockops_cgroup = "{sockops}"\n'
                 f'[[vips]]\naddress = "{VIP}"\nport = 80\n', source=source)


def xdp_attached(ns) -> bool:
    out = subprocess.run(["ip", "-n", ns.name, "link", "show", "eth0"], capture_output=True, text=True, check=True)
    return "xdp" in out.stdout


def link_exists(link_id: int) -> bool:
    return subprocess.run(["bpftool", "link", "show", "id", str(link_id)], capture_output=True).returncode == 0


def pinned_link_id(path: Path) -> int:
    link = Link.from_pinned(str(path))
    try:
        return int(link.info()["id"])
    finally:
        link.close()


@pytest.fixture
def mix():
    topo = Topology(f"mlbse{os.getpid()}")
    pin = Path(f"/sys/fs/bpf/meshlb-session-test-{os.getpid()}")
    try:
        br = topo.add_bridge()
        ns = topo.add_namespace("mix1")
        topo.connect(ns, br, addresses=[f"{MIX}/24"], peer_xdp_pass=True)
        yield ns, pin
    finally:
        shutil.rmtree(pin, ignore_errors=True)  # pins are files: removing them frees the objects
        assert topo.teardown() == []


def test_a_session_keeps_its_pins_for_the_next_or_removes_everything(mix):
    ns, pin = mix
    cfg = config(pin)

    def first() -> list[str]:
        s = Session(cfg)
        s.open()
        assert (s.adopted, s.xdp_mode, s.address) == (False, "generic", MIX)
        s.serve(cfg.vips)
        assert s.loopback == [VIP] and VIP in vipnet.loopback_addresses()
        s.close(unpin=False)  # a crash or a restart
        return sorted(os.listdir(pin))

    left = ns.run(first)
    assert {"conntrack", XDP_LINK_PIN, NEIGH_LINK_PIN, TRACER_SUBDIR, MARKS_PIN} <= set(left), left
    assert os.listdir(pin / TRACER_SUBDIR)
    assert xdp_attached(ns)  # forwarding carries on with no agent
    neigh_link = pinned_link_id(pin / NEIGH_LINK_PIN)  # and so does the neighbour hand-off
    assert ns.sysctl("net/ipv4/conf/eth0/forwarding") == "1"
    assert VIP in ns.run(vipnet.loopback_addresses)

    def second() -> None:
        s = Session(cfg)
        s.open()
        assert (s.adopted, s.xdp_mode) == (True, "adopted")
        s.close(unpin=True)  # a leave

    ns.run(second)
    assert not pin.exists()
    assert not xdp_attached(ns)
    assert not link_exists(neigh_link)

    def third() -> tuple[set[str], str]:
        # a fresh start on a clean host: what it changed, a leave undoes
        s = Session(cfg)
        s.open()
        assert not s.adopted
        s.serve(cfg.vips)
        on = (vipnet.loopback_addresses(), ns.sysctl("net/ipv4/conf/eth0/forwarding"))
        s.close(unpin=True)
        return on

    # the first session's changes are the host's now: put the host back as it was
    ns.run(lambda: vipnet.remove_loopback_vips([VIP]))
    ns.sysctl("net/ipv4/conf/eth0/forwarding", 0)
    addrs, forwarding = ns.run(third)
    assert VIP in addrs and forwarding == "1"
    assert VIP not in ns.run(vipnet.loopback_addresses)
    assert ns.sysctl("net/ipv4/conf/eth0/forwarding") == "0"
    assert not pin.exists() and not xdp_attached(ns)


def test_a_session_that_cannot_open_closes_what_it_opened_and_says_why(mix):
    ns, pin = mix
    s = Session(config(pin, sockops="/nonexistent/cgroup", source="/etc/meshlb/c.toml"))
    with pytest.raises(RuntimeError, match=r"^/etc/meshlb/c\.toml: conntrack\.sockops_cgroup: "):
        ns.run(s.open)
    # what it had pinned stays (the balancer's maps, the XDP link) as after a crash
    assert (pin / "conntrack").exists() and xdp_attached(ns)
