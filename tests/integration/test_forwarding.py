"""End to end over real interfaces: curl in a client namespace reaches an HTTP app
through the VIP, balanced by the XDP program on veth, in both balancing modes and
both XDP attach modes; the socket-release tracer of the serving mix reports the
connection's close, the tracer of the forwarding mix does not.

    client ──┐                    mix1: balancer (forwards), tracer (must stay quiet)
    mix1 ────┤ br0 (own netns)    mix2: balancer, app "mix2", tracer (reports)
    mix2 ────┘
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import Balancer
from meshlb.dataplane.tracer import Flow, Tracer
from meshlb.lab.netns import Topology

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[2]
# (client, mix1, mix2, prefix length, VIP) per address family
ADDRS = {
    socket.AF_INET: ("10.88.0.1", "10.88.0.11", "10.88.0.12", 24, "10.88.100.1"),
    socket.AF_INET6: ("fd88::1", "fd88::11", "fd88::12", 64, "fd88:100::1"),
}
VIP_ID, BACKEND_ID, RING = 3, 2, 13
SNAT_LO, SNAT_HI = 61000, 61999  # disjoint from ip_local_port_range (32768-60999)
CLOSED_PORT = 9  # nothing listens: a connect warms ARP and gets a RST


class Lab:
    def __init__(self, topo: Topology):
        self.topo = topo
        self.links = []
        self.balancers: dict[str, Balancer] = {}
        self.tracers: dict[str, Tracer] = {}

    def close(self):
        for t in self.tracers.values():
            t.close()
        for link in self.links:
            link.close()
        for b in self.balancers.values():
            b.close()


@pytest.fixture
def lab():
    topo = Topology(f"mlbfw{os.getpid()}")
    lab = Lab(topo)
    try:
        br = topo.add_bridge()
        for i, name in enumerate(("client", "mix1", "mix2")):
            ns = topo.add_namespace(name)
            # veth quirks of native XDP (see meshlb.lab.netns): the balancer's
            # XDP_TX needs an XDP program on the bridge side, and packets that
            # cross a native balancer must carry full checksums.
            addrs = [f"{a[i]}/{a[3]}" for a in ADDRS.values()]
            topo.connect(ns, br, addresses=addrs, tx_checksum=False,
                         peer_xdp_pass=name != "client")
            if name != "client":
                # bpf_fib_lookup reports FWD_DISABLED unless the ingress device
                # forwards, even for a frame that leaves where it came in.
                topo.enable_forwarding(ns)
        yield lab
    finally:
        lab.close()
        assert topo.teardown() == []


def _wait_listening(ns, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = ns.socket(socket.AF_INET6)
        s.settimeout(1)
        try:
            s.connect(("::1", port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            s.close()


def _warm_neighbour(ns, addr: str, family: int) -> None:
    """What the agent's health checks do as a side effect: make the kernel resolve
    the peer's MAC, which bpf_fib_lookup needs and cannot trigger itself."""
    s = ns.socket(family)
    s.settimeout(3)
    try:
        s.connect((addr, CLOSED_PORT))
    except ConnectionRefusedError:
        pass
    finally:
        s.close()
    assert any(a == addr and mac for a, mac, _ in ns.neighbours("eth0")), addr


def _drain(t: Tracer, grace: float = 0.3) -> list:
    time.sleep(grace)
    out = []
    while True:
        got = t.poll(50)
        if not got:
            return out
        out += got


def _collect(t: Tracer, want: int, timeout: float = 5.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out += t.poll(50)
    return out


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6],
                         ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("attach_mode", ["native", "generic"])
@pytest.mark.parametrize("lb_mode", ["dr", "nat"])
def test_curl_through_the_vip(lab, lb_mode, attach_mode, family):
    CLIENT, MIX1, MIX2, _, VIP = ADDRS[family]
    topo = lab.topo
    client, mix1, mix2 = topo["client"], topo["mix1"], topo["mix2"]
    vip_port = 8080
    # dr keeps the port (the packet is only re-addressed at L2); nat rewrites it.
    app_port = 8080 if lb_mode == "dr" else 9090
    backend_port = 0 if lb_mode == "dr" else app_port

    # Every mix runs the app; a reply from the wrong one shows in the body.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for m in (mix1, mix2):
        m.popen([sys.executable, "-m", "meshlb.lab.app", m.short, str(app_port)],
                env=env, stdout=subprocess.DEVNULL)
        if lb_mode == "dr":
            topo.add_loopback_vip(m, VIP)
    for m in (mix1, mix2):
        _wait_listening(m, app_port)

    # The same configuration on every mix, as the agents would agree on it.
    for m, own in ((mix1, MIX1), (mix2, MIX2)):
        b = Balancer.load()
        lab.balancers[m.short] = b
        b.add_vip(VIP, vip_port, "tcp", lb_mode, vip_id=VIP_ID, ring_size=RING)
        b.set_backend(BACKEND_ID, MIX2, backend_port, local=m is mix2)
        b.set_vip_table(VIP_ID, [BACKEND_ID] * RING)
        if lb_mode == "nat":
            b.set_snat(family, own, SNAT_LO, SNAT_HI)
        ifindex = m.ifindex("eth0")
        # The ifindex means something only in the mix's namespace: attach from there.
        lab.links.append(m.run(lambda b=b, i=ifindex: b.attach(i, attach_mode)))

    # Each tracer is created inside its mix's namespace, so it filters on it.
    watched = (VIP, vip_port) if lb_mode == "dr" else (MIX2, app_port)
    for m in (mix1, mix2):
        t = m.run(Tracer)
        lab.tracers[m.short] = t
        t.load()
        t.attach()
        t.watch(*watched)
        if lb_mode == "nat":
            t.watch(VIP, vip_port)
    assert lab.tracers["mix2"].netns_cookie == mix2.netns_cookie()
    assert lab.tracers["mix1"].netns_cookie == mix1.netns_cookie()

    _warm_neighbour(mix1, MIX2, family)
    _warm_neighbour(mix1, CLIENT, family)
    client.add_route(VIP, gateway=MIX1)
    for t in lab.tracers.values():
        _drain(t)
    b1, b2 = lab.balancers["mix1"], lab.balancers["mix2"]
    before1, before2 = b1.counters(), b2.counters()

    curl = client.popen(
        ["curl", "-sS", "--max-time", "5", "-w", r"\n%{local_ip} %{local_port}",
         f"http://{VIP if family == socket.AF_INET else f'[{VIP}]'}:{vip_port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = curl.communicate(timeout=15)
    after1, after2 = b1.counters(), b2.counters()
    moved1 = {k: after1[k] - before1[k] for k in after1 if after1[k] != before1[k]}
    moved2 = {k: after2[k] - before2[k] for k in after2 if after2[k] != before2[k]}
    body, _, local = out.rpartition("\n")
    assert curl.returncode == 0 and body.strip() == "mix2", (out, err, moved1, moved2)
    cip, cport = local.split()
    cport = int(cport)
    assert cip == CLIENT
    # mix1 balanced the flow: new conntrack entry, transmitted back out.
    assert moved1.get("ct_insert", 0) >= 1, moved1
    assert moved1.get("tx", 0) + moved1.get("redirect", 0) >= 3, moved1  # SYN, ACK, GET...
    assert not any(k.startswith("drop") for k in moved1), moved1
    assert b1.vip_stats(VIP_ID).packets >= 3
    assert b1.backend_stats(BACKEND_ID).packets >= 3
    ct = b1.conntrack_lookup(L.flow_key(CLIENT, cport, VIP, vip_port, L.IPPROTO_TCP))
    assert ct is not None and ct.backend_id == BACKEND_ID

    if lb_mode == "dr":
        # mix2 got the marked packets, un-marked them and passed them to its app.
        assert moved2.get("pass_from_peer", 0) >= 3, moved2
        expected = Flow(family, 6, CLIENT, cport, VIP, vip_port)
    else:
        # Replies came back to mix1's SNAT port and were translated back.
        assert moved1.get("nat_reply", 0) >= 2, moved1
        assert ct.flags & L.MLB_CT_F_NAT
        snat_port = L.port_host(ct.snat_port)
        assert SNAT_LO <= snat_port <= SNAT_HI
        expected = Flow(family, 6, MIX1, snat_port, MIX2, app_port)

    events = _collect(lab.tracers["mix2"], 1)
    events += _drain(lab.tracers["mix2"])
    assert [e.flow for e in events] == [expected], events
    assert events[0].netns_cookie == mix2.netns_cookie()
    # mix1 watches the same endpoints, but the socket was not in its namespace.
    assert _drain(lab.tracers["mix1"], grace=0.5) == []
