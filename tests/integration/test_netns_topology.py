"""The netns topology library against the real kernel: namespaces, a bridge in a
namespace of its own, veth, IPv4/IPv6 addressing, ECMP with L4 hashing, loopback
VIPs hidden from ARP, processes in namespaces, and teardown after failures."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest
from pyroute2 import IPRoute

from meshlb.lab.netns import Topology, TopologyError, netns_path

pytestmark = pytest.mark.privileged

VIP4 = "10.77.100.1"
VIP6 = "fd77:100::1"

# Accepts forever and answers every connection with the node's name.
NAME_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 8080))
s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[1].encode())
    c.close()
"""


def _prefix(tag: str) -> str:
    return f"mlbt{os.getpid()}{tag}"


@pytest.fixture
def topo():
    t = Topology(_prefix("t"))
    try:
        yield t
    finally:
        leftovers = t.teardown()
        assert leftovers == []


def _three_nodes(topo: Topology):
    br = topo.add_bridge()
    client = topo.add_namespace("client")
    mixes = [topo.add_namespace(f"mix{i}") for i in (1, 2)]
    topo.connect(client, br, addresses=["10.77.0.1/24", "fd77::1/64"])
    for i, m in enumerate(mixes, start=1):
        topo.connect(m, br, addresses=[f"10.77.0.1{i}/24", f"fd77::1{i}/64"])
    return br, client, mixes


def _start_name_servers(mixes):
    procs = []
    for m in mixes:
        p = m.popen([sys.executable, "-c", NAME_SERVER, m.short], stdout=subprocess.PIPE)
        assert p.stdout.readline() == b"ready\n"
        procs.append(p)
    return procs


def _ask(ns, addr, family, port=8080) -> bytes:
    s = ns.socket(family)
    s.settimeout(5)
    try:
        s.connect((addr, port))
        return s.recv(64)
    finally:
        s.close()


def test_names_are_unique_and_the_bridge_lives_in_its_own_namespace(topo):
    br, client, mixes = _three_nodes(topo)
    assert str(os.getpid()) in client.name
    for ns in (br, client, *mixes):
        assert os.path.exists(netns_path(ns.name))
    with br.ipr() as ipr:
        kinds = {l.get_attr("IFLA_IFNAME"): l.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
                 for l in ipr.get_links()}
        bridge_idx = ipr.link_lookup(ifname="br0")[0]
        enslaved = {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()
                    if l.get_attr("IFLA_MASTER") == bridge_idx}
    assert kinds["br0"] == "bridge"
    assert enslaved == {"p-client", "p-mix1", "p-mix2"}
    with client.ipr() as ipr:
        assert {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()} == {"lo", "eth0"}
    # Nothing of the lab appears in the namespace the tests run in.
    with IPRoute() as ipr:
        host_links = {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
    assert not {"br0", "p-client", "p-mix1", "p-mix2"} & host_links


def test_ipv4_and_ipv6_connectivity_over_the_bridge(topo):
    _, client, mixes = _three_nodes(topo)
    _start_name_servers(mixes)
    assert _ask(client, "10.77.0.11", socket.AF_INET) == b"mix1"
    assert _ask(client, "fd77::12", socket.AF_INET6) == b"mix2"
    assert "10.77.0.1" in client.addresses("eth0")
    assert "fd77::1" in client.addresses("eth0")
    learned = {addr for addr, lladdr, _ in client.neighbours("eth0") if lladdr}
    assert {"10.77.0.11", "fd77::12"} <= learned


def test_ecmp_with_l4_hash_spreads_connections_over_both_mixes(topo):
    _, client, mixes = _three_nodes(topo)
    for m in mixes:
        topo.add_loopback_vip(m, VIP4)
        topo.add_loopback_vip(m, VIP6)
    topo.enable_l4_multipath_hash(client)
    for fam in ("ipv4", "ipv6"):
        assert client.sysctl(f"net.{fam}.fib_multipath_hash_policy") == "3"
        assert int(client.sysctl(f"net.{fam}.fib_multipath_hash_fields"), 0) == 0x37
    client.add_route(f"{VIP4}/32", multipath=["10.77.0.11", "10.77.0.12"])
    client.add_route(f"{VIP6}/128", multipath=["fd77::11", "fd77::12"])
    (r4,) = client.routes(f"{VIP4}/32")
    assert [h.get_attr("RTA_GATEWAY") for h in r4.get_attr("RTA_MULTIPATH")] == [
        "10.77.0.11", "10.77.0.12"]
    _start_name_servers(mixes)
    for vip, fam in ((VIP4, socket.AF_INET), (VIP6, socket.AF_INET6)):
        answers = {_ask(client, vip, fam) for _ in range(40)}
        # 40 flows that differ only in the source port: an L3 hash would send all of
        # them to one mix; an L4 hash all to one mix has probability 2**-39.
        assert answers == {b"mix1", b"mix2"}, (vip, answers)


def test_ecmp_with_l3_hash_pins_an_address_pair_to_one_mix(topo):
    # The control for the test above: same topology, default (L3) policy.
    _, client, mixes = _three_nodes(topo)
    for m in mixes:
        topo.add_loopback_vip(m, VIP4)
    client.sysctl("net.ipv4.fib_multipath_hash_policy", 0)
    client.add_route(f"{VIP4}/32", multipath=["10.77.0.11", "10.77.0.12"])
    _start_name_servers(mixes)
    answers = {_ask(client, VIP4, socket.AF_INET) for _ in range(20)}
    assert len(answers) == 1


def test_loopback_vip_is_hidden_from_arp_and_ndp(topo):
    _, client, mixes = _three_nodes(topo)
    for m in mixes:
        topo.add_loopback_vip(m, VIP4)
        assert m.sysctl("net.ipv4.conf.all.arp_ignore") == "1"
        assert m.sysctl("net.ipv4.conf.eth0.arp_announce") == "2"
        assert VIP4 in m.addresses("lo")
    _start_name_servers(mixes)
    # Routed through a mix the VIP works ...
    client.add_route(f"{VIP4}/32", gateway="10.77.0.12")
    assert _ask(client, VIP4, socket.AF_INET) == b"mix2"
    # ... but asked for on the link, no mix claims it (without arp_ignore every mix
    # would answer the ARP request and race for the flow).
    client.add_route("10.77.200.0/24", ifname="eth0")
    topo.add_loopback_vip(mixes[1], "10.77.200.2")
    # The control: mix1 with the kernel's default ARP behaviour does answer for an
    # address on its loopback, so the failure below is arp_ignore's doing.
    mixes[0].add_address("lo", "10.77.200.1/32")
    mixes[0].sysctl("net.ipv4.conf.all.arp_ignore", 0)
    mixes[0].sysctl("net.ipv4.conf.eth0.arp_ignore", 0)
    assert _ask(client, "10.77.200.1", socket.AF_INET) == b"mix1"
    with pytest.raises(OSError) as info:
        _ask(client, "10.77.200.2", socket.AF_INET)
    assert isinstance(info.value, TimeoutError) or info.value.errno in (
        errno.EHOSTUNREACH, errno.ETIMEDOUT)
    # IPv6: neighbour discovery answers only for addresses of the asked interface.
    client.add_route("fd77:200::/64", ifname="eth0")
    topo.add_loopback_vip(mixes[1], "fd77:200::2")
    mixes[0].add_address("eth0", "fd77:200::1/128")  # control: on the link itself
    assert _ask(client, "fd77:200::1", socket.AF_INET6) == b"mix1"
    with pytest.raises(OSError) as info:
        _ask(client, "fd77:200::2", socket.AF_INET6)
    assert isinstance(info.value, TimeoutError) or info.value.errno in (
        errno.EHOSTUNREACH, errno.ETIMEDOUT)


def test_processes_run_inside_their_namespace_and_die_with_the_topology(topo):
    ns = topo.add_namespace("solo")
    out = ns.check_output([sys.executable, "-c",
                           "import os; print(os.stat('/proc/self/ns/net').st_ino)"])
    assert int(out) == os.stat(ns.path).st_ino
    assert int(out) != os.stat("/proc/self/ns/net").st_ino
    sleeper = ns.popen(["sleep", "600"])
    leftovers = topo.teardown()
    assert leftovers == []
    assert sleeper.poll() is not None
    assert not os.path.exists(ns.path)


def test_sysctls_forwarding_and_cookies_are_per_namespace(topo):
    a = topo.add_namespace("a")
    b = topo.add_namespace("b")
    # New namespaces copy some settings from the host's (devconf_inherit_init_net),
    # so set both rather than assume a default.
    b.sysctl("net.ipv4.ip_forward", 0)
    a.sysctl("net.ipv4.ip_forward", 1)
    assert a.sysctl("net.ipv4.ip_forward") == "1"
    assert b.sysctl("net.ipv4.ip_forward") == "0"
    # Forwarding is what bpf_fib_lookup checks, per ingress interface.
    b.sysctl("net.ipv4.conf.default.forwarding", 0)
    b.sysctl("net.ipv6.conf.default.forwarding", 0)
    br = topo.add_bridge()
    topo.connect(b, br)
    assert b.sysctl("net.ipv4.conf.eth0.forwarding") == "0"
    topo.enable_forwarding(b)
    for key in ("net.ipv4.conf.eth0.forwarding", "net.ipv6.conf.eth0.forwarding",
                "net.ipv4.ip_forward"):
        assert b.sysctl(key) == "1", key
    ca, cb = a.netns_cookie(), b.netns_cookie()
    assert ca and cb and ca != cb
    assert a.netns_cookie() == ca


def test_xdp_pass_on_the_bridge_side_and_full_checksums_on_the_node(topo):
    br = topo.add_bridge()
    n = topo.add_namespace("n")
    plain = topo.add_namespace("plain")
    port = topo.connect(n, br, addresses=["10.77.1.1/24"], peer_xdp_pass=True,
                        tx_checksum=False)
    other = topo.connect(plain, br, addresses=["10.77.1.2/24"])
    assert br.xdp_prog_id(port.peer) is not None
    assert br.xdp_prog_id(other.peer) is None
    assert n.xdp_prog_id("eth0") is None
    assert n.tx_checksum("eth0") is False
    assert plain.tx_checksum("eth0") is True
    # The pass program really passes: traffic still flows through that port.
    srv = n.popen([sys.executable, "-c", NAME_SERVER, "n"], stdout=subprocess.PIPE)
    assert srv.stdout.readline() == b"ready\n"
    assert _ask(plain, "10.77.1.1", socket.AF_INET) == b"n"


def test_teardown_after_a_partial_build_removes_everything():
    t = Topology(_prefix("p"))
    br = t.add_bridge()
    n = t.add_namespace("n")
    proc = n.popen(["sleep", "600"])
    t.connect(n, br, addresses=["10.77.2.1/24"])
    with pytest.raises(TopologyError):
        t.connect(n, n)  # not a bridge: the build fails half way
    names = [br.name, n.name]
    # Someone removed one namespace behind our back: teardown must still finish.
    from pyroute2 import netns
    netns.remove(br.name)
    leftovers = t.teardown()
    assert leftovers == []
    assert proc.poll() is not None
    for name in names:
        assert not os.path.exists(netns_path(name))
    assert t.teardown() == []  # idempotent


def test_refuses_to_adopt_a_foreign_namespace_of_the_same_name():
    t = Topology(_prefix("d"))
    other = Topology(_prefix("d"))
    try:
        t.add_namespace("x")
        with pytest.raises(TopologyError):
            other.add_namespace("x")
        assert other.teardown() == []
        assert os.path.exists(netns_path(f"{_prefix('d')}-x"))  # still t's
    finally:
        assert t.teardown() == []
