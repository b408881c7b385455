"""The data plane's edges end to end, over veth with native XDP and real TCP (Python
sockets in the client's namespace, the kernels' own TCP on every end):

- a backend path narrower than the client's: the forwarding mix answers the client's
  too-big segments with ICMP fragmentation-needed / packet-too-big (from the VIP), the
  client's kernel lowers its path MTU, and the upload reaches the backend (dr and nat);
- a router narrower towards the client: its ICMP error about the backend's replies
  reaches the VIP, that is the forwarding mix, which sends it on to the backend that
  owns the flow (marked in dr, translated in nat), whose TCP sends smaller segments;
- a backend whose neighbour entry the forwarding mix lacks: the packet goes through
  the tc program to the kernel's neighbour resolution and arrives, nothing reaches the
  forwarding mix's own application.

    client ──┐                      (router tests: client ── router ── br0)
    mix1 ────┤ br0 (own netns)      mix1: balancer (forwards)
    mix2 ────┘                      mix2: balancer, the app ("mix2")
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from meshlb.dataplane.balancer import Balancer
from meshlb.lab.netns import Topology

pytestmark = pytest.mark.privileged

ADDRS = {
    socket.AF_INET: dict(client="10.87.0.1", mix1="10.87.0.11", mix2="10.87.0.12", plen=24,
                         vip="10.87.100.1", router="10.87.0.254", edge="10.86.0.0/24",
                         client_edge="10.86.0.1", router_edge="10.86.0.254", eplen=24),
    socket.AF_INET6: dict(client="fd87::1", mix1="fd87::11", mix2="fd87::12", plen=64,
                          vip="fd87:100::1", router="fd87::fe", edge="fd86::/64",
                          client_edge="fd86::1", router_edge="fd86::fe", eplen=64),
}
VIP_ID, BACKEND_ID, RING = 3, 2, 13
VIP_PORT, NAT_APP_PORT = 8080, 9090
SNAT_LO, SNAT_HI = 61000, 61999
NARROW = 1280
SIZE = 300_000  # bytes each way: hundreds of full-size segments

# Reads "UP n" and n bytes, answers "NAME n"; or "DOWN n", answers "NAME" and n bytes.
SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.listen(64)
print("ready", flush=True)
def serve(c):
    f = c.makefile("rb")
    op, n = f.readline().split()
    n = int(n)
    if op == b"UP":
        got = 0
        while got < n:
            b = f.read(min(65536, n - got))
            if not b:
                break
            got += len(b)
        c.sendall(f"{name} {got}\n".encode())
    else:
        c.sendall(name.encode() + b"\n" + b"z" * n)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class Lab:
    def __init__(self, topo: Topology, family: int, mode: str):
        self.topo, self.family, self.mode = topo, family, mode
        self.a = ADDRS[family]
        self.links: list = []
        self.balancers: dict[str, Balancer] = {}

    def close(self) -> None:
        for link in self.links:
            link.close()
        for b in self.balancers.values():
            b.close()

    @property
    def app_port(self) -> int:
        return VIP_PORT if self.mode == "dr" else NAT_APP_PORT

    def start(self) -> None:
        """Apps on both mixes (a reply from the wrong one shows in its name), the same
        balancer configuration on both."""
        topo, a = self.topo, self.a
        mix1, mix2 = topo["mix1"], topo["mix2"]
        for m in (mix1, mix2):
            p = m.popen([sys.executable, "-c", SERVER, m.short, str(self.app_port)],
                        stdout=subprocess.PIPE)
            assert p.stdout.readline() == b"ready\n"
            if self.mode == "dr":
                topo.add_loopback_vip(m, a["vip"])
        for m, own in ((mix1, a["mix1"]), (mix2, a["mix2"])):
            b = Balancer.load(conntrack_size=4096)
            self.balancers[m.short] = b
            b.add_vip(a["vip"], VIP_PORT, "tcp", self.mode, vip_id=VIP_ID, ring_size=RING)
            b.set_backend(BACKEND_ID, a["mix2"], 0 if self.mode == "dr" else NAT_APP_PORT,
                          local=m is mix2)
            b.set_vip_table(VIP_ID, [BACKEND_ID] * RING)
            if self.mode == "nat":
                b.set_snat(self.family, own, SNAT_LO, SNAT_HI)
            ifindex = m.ifindex("eth0")
            self.links.append(m.run(lambda b=b, i=ifindex: b.attach(i, "native")))

    def counters(self, mix: str) -> dict[str, int]:
        return self.balancers[mix].counters()

    def transfer(self, op: str, timeout: float = 15.0) -> bytes:
        """One connection from the client to the VIP: UP sends SIZE bytes, DOWN
        fetches SIZE bytes. Returns what the server sent."""
        s = self.topo["client"].socket(self.family)
        s.settimeout(timeout)
        try:
            s.connect((self.a["vip"], VIP_PORT))
            s.sendall(f"{op} {SIZE}\n".encode() + (b"u" * SIZE if op == "UP" else b""))
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk
        finally:
            s.close()


def _sh(ns, *args: str) -> str:
    return ns.check_output(list(args))


def _warm(ns, addr: str, family: int) -> None:
    """What the agent's health checks do: have the kernel resolve a neighbour."""
    s = ns.socket(family, socket.SOCK_DGRAM)
    try:
        s.sendto(b"", (addr, 9))
    finally:
        s.close()
    deadline = time.monotonic() + 3
    while not any(a == addr and mac for a, mac, _ in ns.neighbours("eth0")):
        assert time.monotonic() < deadline, addr
        time.sleep(0.05)


def _flat_lab(family: int, mode: str) -> tuple[Topology, Lab]:
    topo = Topology(f"mlbed{os.getpid()}")
    lab = Lab(topo, family, mode)
    a = ADDRS[family]
    br = topo.add_bridge()
    for name in ("client", "mix1", "mix2"):
        ns = topo.add_namespace(name)
        addrs = [f"{x[name]}/{x['plen']}" for x in ADDRS.values()]
        topo.connect(ns, br, addresses=addrs, tx_checksum=False, peer_xdp_pass=name != "client")
        if name != "client":
            topo.enable_forwarding(ns)
    lab.start()
    topo["client"].add_route(a["vip"], gateway=a["mix1"])
    _warm(topo["mix1"], a["client"], family)
    return topo, lab


@pytest.fixture
def flat(request):
    family, mode = request.param
    topo, lab = None, None
    try:
        topo, lab = _flat_lab(family, mode)
        yield lab
    finally:
        if lab is not None:
            lab.close()
        if topo is not None:
            assert topo.teardown() == []


BOTH = [(f, m) for f in (socket.AF_INET, socket.AF_INET6) for m in ("dr", "nat")]
IDS = [f"{'ipv4' if f == socket.AF_INET else 'ipv6'}-{m}" for f, m in BOTH]


@pytest.mark.parametrize("flat", BOTH, ids=IDS, indirect=True)
def test_a_narrower_backend_path_is_told_to_the_client(flat):
    lab = flat
    a, mix1 = lab.a, lab.topo["mix1"]
    _warm(mix1, a["mix2"], lab.family)
    # the path from mix1 to mix2 is narrower than the client's (a tunnel, say);
    # "lock": Linux applies an IPv4 route's MTU to forwarded packets only then
    plen = "32" if lab.family == socket.AF_INET else "128"
    _sh(mix1, "ip", "route", "replace", f"{a['mix2']}/{plen}", "dev", "eth0", "mtu", "lock",
        str(NARROW))
    before = lab.counters("mix1")
    reply = lab.transfer("UP")
    after = lab.counters("mix1")
    d = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert reply == f"mix2 {SIZE}\n".encode(), (reply, d)
    assert d.get("icmp_too_big", 0) >= 1 and d.get("fib_frag_needed", 0) >= 1, d
    # every packet of the flow left for mix2 or was answered: none went to mix1's stack
    flow = d.get("ct_hit", 0) + d.get("ct_miss", 0)
    sent = d.get("tx", 0) + d.get("redirect", 0) - d.get("nat_reply", 0)
    assert flow == sent + d["icmp_too_big"], d
    # the client's kernel keeps the path MTU it was told for the VIP
    route = _sh(lab.topo["client"], "ip", "route", "get", a["vip"])
    assert f"mtu {NARROW}" in route, route


def _router_lab(family: int, mode: str) -> tuple[Topology, Lab]:
    """client ── edge bridge ── router ── br0 ── mix1, mix2; the router routes the VIP to
    mix1 and has a narrower route back to the client."""
    topo = Topology(f"mlbrt{os.getpid()}")
    lab = Lab(topo, family, mode)
    a = ADDRS[family]
    br = topo.add_bridge()
    edge = topo.add_bridge("edge", "br1")
    client = topo.add_namespace("client")
    router = topo.add_namespace("router")
    topo.connect(client, edge, addresses=[f"{x['client_edge']}/{x['eplen']}" for x in ADDRS.values()],
                 tx_checksum=False)
    topo.connect(router, edge, ifname="eth1",
                 addresses=[f"{x['router_edge']}/{x['eplen']}" for x in ADDRS.values()],
                 tx_checksum=False)
    topo.connect(router, br, addresses=[f"{x['router']}/{x['plen']}" for x in ADDRS.values()],
                 tx_checksum=False)
    topo.enable_forwarding(router)
    for name in ("mix1", "mix2"):
        ns = topo.add_namespace(name)
        topo.connect(ns, br, addresses=[f"{x[name]}/{x['plen']}" for x in ADDRS.values()],
                     tx_checksum=False, peer_xdp_pass=True)
        topo.enable_forwarding(ns)
        for x in ADDRS.values():
            ns.add_route(x["edge"], gateway=x["router"])
    for x in ADDRS.values():
        client.add_route(x["vip"], gateway=x["router_edge"])
        router.add_route(x["vip"], gateway=x["mix1"])
    lab.start()
    plen = "32" if family == socket.AF_INET else "128"
    _sh(router, "ip", "route", "replace", f"{a['client_edge']}/{plen}", "dev", "eth1", "mtu",
        "lock", str(NARROW))
    for m in ("mix1", "mix2"):
        _warm(topo[m], a["router"], family)
    _warm(topo["mix1"], a["mix2"], family)
    return topo, lab


@pytest.fixture
def routed(request):
    family, mode = request.param
    topo, lab = None, None
    try:
        topo, lab = _router_lab(family, mode)
        yield lab
    finally:
        if lab is not None:
            lab.close()
        if topo is not None:
            assert topo.teardown() == []


ROUTED = [(socket.AF_INET, "dr"), (socket.AF_INET, "nat"), (socket.AF_INET6, "dr")]


@pytest.mark.parametrize("routed", ROUTED, ids=["ipv4-dr", "ipv4-nat", "ipv6-dr"], indirect=True)
def test_a_routers_icmp_error_reaches_the_backend_that_owns_the_flow(routed):
    lab = routed
    before1, before2 = lab.counters("mix1"), lab.counters("mix2")
    reply = lab.transfer("DOWN")
    after1, after2 = lab.counters("mix1"), lab.counters("mix2")
    d1 = {k: after1[k] - before1[k] for k in after1 if after1[k] != before1[k]}
    d2 = {k: after2[k] - before2[k] for k in after2 if after2[k] != before2[k]}
    assert reply[:5] == b"mix2\n" and len(reply) == 5 + SIZE, (len(reply), d1, d2)
    # mix1 received the router's error for the VIP and sent it on to mix2
    assert d1.get("icmp_to_backend", 0) >= 1, d1
    if lab.mode == "dr":
        assert d2.get("pass_from_peer", 0) >= 1, d2
    else:
        assert d1.get("nat_reply", 0) >= 1, d1


@pytest.fixture
def no_neigh(request):
    family, mode = request.param
    topo, lab = None, None
    try:
        topo, lab = _flat_lab(family, mode)
        yield lab
    finally:
        if lab is not None:
            lab.close()
        if topo is not None:
            assert topo.teardown() == []


@pytest.mark.parametrize("no_neigh", BOTH, ids=IDS, indirect=True)
def test_an_unknown_neighbour_is_resolved_and_the_packet_arrives(no_neigh):
    lab = no_neigh
    a, mix1 = lab.a, lab.topo["mix1"]
    b1 = lab.balancers["mix1"]
    assert not any(x == a["mix2"] and mac for x, mac, _ in mix1.neighbours("eth0"))
    # without the tc program the packet is dropped: never given to mix1's own app
    s = lab.topo["client"].socket(lab.family)
    s.settimeout(1.5)
    with pytest.raises(socket.timeout):
        s.connect((a["vip"], VIP_PORT))
    s.close()
    assert b1.counters()["drop_no_neigh"] >= 1
    assert [n["addr"] for n in b1.unresolved_neighbours(clear=True)] == [a["mix2"]]
    assert not any(x == a["mix2"] and mac for x, mac, _ in mix1.neighbours("eth0"))
    # with it, the kernel resolves the neighbour and sends the packet on
    ifindex = mix1.ifindex("eth0")
    lab.links.append(mix1.run(lambda: b1.neighbour_handoff(ifindex)))
    before = b1.counters()
    reply = lab.transfer("UP")
    after = b1.counters()
    d = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert reply == f"mix2 {SIZE}\n".encode(), (reply, d)
    assert d.get("pass_neigh_resolve", 0) >= 1 and d.get("neigh_sent", 0) >= 1, d
    assert any(x == a["mix2"] and mac for x, mac, _ in mix1.neighbours("eth0"))
