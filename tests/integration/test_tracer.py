"""The socket-release tracer (bpf/tracer.bpf.c + meshlb/dataplane/tracer.py) against
the running kernel: real TCP connections inside namespaces the test creates."""
from __future__ import annotations

import asyncio
import ctypes
import os
import re
import socket
import struct
import subprocess
import time

import pytest

from meshlb.dataplane import layouts as L
from meshlb.dataplane.mounts import cgroup2_root
from meshlb.dataplane.tracer import (
    PROGRAM_BACKUP,
    RESET,
    TCP_STATES,
    TRACER_OBJECT,
    Flow,
    SockEvent,
    Tracer,
    endpoint_key,
    own_netns_cookie,
)
from meshlb.lab.netns import Topology

VIP4, CLIENT4 = "10.66.0.1", "10.66.0.2"
VIP6, CLIENT6 = "fd66::1", "fd66::2"
PORT = 8080


# ---------------------------------------------------------------- pure decoding
def _record(src, sport, dst, dport, family, cookie=7, ts=99, oldstate=9) -> bytes:
    ev = L.SockEvent(netns_cookie=cookie, timestamp_ns=ts, oldstate=oldstate)
    ev.key = L.flow_key(src, sport, dst, dport, L.IPPROTO_TCP)
    assert ev.key.family == family
    return bytes(ev)


@pytest.mark.parametrize("src,dst,family", [
    ("192.0.2.7", "198.51.100.1", socket.AF_INET),
    ("2001:db8::7", "2001:db8:1::1", socket.AF_INET6),
])
def test_decode_gives_the_flow_in_host_terms(src, dst, family):
    ev = SockEvent.decode(_record(src, 40001, dst, 443, family))
    assert ev.flow == Flow(family=family, proto=6, src=src, sport=40001, dst=dst, dport=443)
    assert (ev.netns_cookie, ev.timestamp_ns, ev.oldstate) == (7, 99, 9)
    assert ev.oldstate_name == "LAST_ACK"
    # The raw key is the conntrack key, and Flow.key() rebuilds it exactly.
    assert ev.raw_key == ev.flow.key() == bytes(L.flow_key(src, 40001, dst, 443, 6))


def test_decode_rejects_short_and_garbage_records():
    with pytest.raises(ValueError):
        SockEvent.decode(b"\0" * 10)
    with pytest.raises(ValueError):
        SockEvent.decode(b"\0" * 64)  # family 0


def test_endpoint_key_layout_and_v4_mapped_normalisation():
    k = L.EndpointKey.from_bytes(endpoint_key("10.1.2.3", 80))
    assert (k.family, k.proto, L.port_host(k.port)) == (socket.AF_INET, 6, 80)
    assert str(L.words_addr(k.addr, k.family)) == "10.1.2.3"
    assert endpoint_key("::ffff:10.1.2.3", 80) == endpoint_key("10.1.2.3", 80)
    assert endpoint_key("fd00::1", 80) != endpoint_key("fd00::2", 80)
    with pytest.raises(ValueError):
        endpoint_key("10.1.2.3", 0)


def test_object_btf_matches_the_python_layouts():
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(TRACER_OBJECT)],
                         check=True, capture_output=True, text=True).stdout
    for cls, cname in ((L.SockEvent, "sock_event"), (L.FlowKey, "flow_key"),
                       (L.EndpointKey, "endpoint_key"), (L.TracerConfig, "tracer_config")):
        m = re.search(rf"STRUCT '{cname}' size=(\d+) vlen=\d+\n((?:\t.*\n)*)", out)
        assert m, f"struct {cname} missing from {TRACER_OBJECT} BTF"
        assert int(m.group(1)) == ctypes.sizeof(cls), cname
        offs = {name: int(bits) // 8 for name, bits in
                re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(2))}
        assert offs == {f: getattr(cls, f).offset for f, *_ in cls._fields_}, cname


# ------------------------------------------------------------- kernel fixtures
@pytest.fixture
def lab():
    topo = Topology(f"mlbtr{os.getpid()}")
    try:
        for short in ("node", "other"):
            ns = topo.add_namespace(short)
            for a in (VIP4, CLIENT4):
                ns.add_address("lo", f"{a}/32")
            for a in (VIP6, CLIENT6):
                ns.add_address("lo", f"{a}/128")
        yield topo
    finally:
        assert topo.teardown() == []


@pytest.fixture
def tracers():
    made: list[Tracer] = []

    def make(cookie, **kw) -> Tracer:
        t = Tracer(netns_cookie=cookie, **kw)
        made.append(t)
        t.load()
        t.attach()
        return t

    yield make
    for t in made:
        t.close()


class Server:
    def __init__(self, ns, family=socket.AF_INET, addr=VIP4, port=PORT, v6only=True):
        self.sock = ns.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        self.sock.bind((addr, port))
        self.sock.listen(512)
        self.ns = ns

    def close(self):
        self.sock.close()


def connect_and_close(srv: Server, family, client_addr, server_addr, port=PORT, rst=False,
                      server_first=False):
    """One full connection; returns the client's (addr, port). The client closes
    first, then the server, so the accepted socket passes LAST_ACK -> CLOSE; with
    ``rst`` the client aborts and the server socket goes ESTABLISHED -> CLOSE; with
    ``server_first`` the server closes actively and its socket leaves FIN_WAIT2 for
    TIME_WAIT (the full socket is closed then, the timewait one lingers)."""
    c = srv.ns.socket(family)
    c.settimeout(5)
    c.bind((client_addr, 0))
    c.connect((server_addr, port))
    a, _ = srv.sock.accept()
    a.settimeout(5)
    c.sendall(b"x")
    assert a.recv(1) == b"x"
    name = c.getsockname()[:2]
    if server_first:
        a.close()
        assert c.recv(1) == b""
        c.close()
        return name
    if rst:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        with pytest.raises(ConnectionResetError):
            for _ in range(50):
                a.recv(1)
                time.sleep(0.01)
    else:
        c.close()
        assert a.recv(1) == b""
    a.close()
    return name


def remove_pins(pin_dir: str) -> None:
    if os.path.isdir(pin_dir):
        for f in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, f))
        os.rmdir(pin_dir)


def collect(t: Tracer, want: int, timeout=3.0) -> list[SockEvent]:
    out: list[SockEvent] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out += t.poll(50)
    return out


def settle(t: Tracer) -> list[SockEvent]:
    """Whatever arrives within a short grace period (for "nothing came" checks)."""
    time.sleep(0.3)
    return collect(t, 10**9, timeout=0.3)


# ------------------------------------------------------------------ behaviour
privileged = pytest.mark.privileged


@privileged
def test_ipv4_close_reports_peer_and_local_endpoint(lab, tracers):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    assert t.watched() == {(VIP4, PORT, 6)}
    srv = Server(node)
    try:
        caddr, cport = connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)
    finally:
        srv.close()
    (ev,) = collect(t, 1)
    assert ev.flow == Flow(socket.AF_INET, 6, CLIENT4, cport, VIP4, PORT)
    assert caddr == CLIENT4
    assert ev.netns_cookie == node.netns_cookie()
    assert ev.oldstate_name == "LAST_ACK"
    assert abs(ev.timestamp_ns - time.monotonic_ns()) < 10 * 10**9
    assert ev.raw_key == bytes(L.flow_key(CLIENT4, cport, VIP4, PORT, 6))
    # Only the accepted socket matched: the client's and the listener's closes
    # (CLIENT4 side, and the listener with no peer) are not reported.
    assert settle(t) == []
    assert t.stats().emitted == 1 and t.stats().ringbuf_full == 0


@privileged
def test_ipv6_and_v4_mapped_sockets(lab, tracers):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP6, PORT)
    t.watch("::ffff:" + VIP4, PORT)  # stored as the IPv4 endpoint
    assert t.watched() == {(VIP6, PORT, 6), (VIP4, PORT, 6)}
    srv = Server(node, socket.AF_INET6, "::", v6only=False)  # dual-stack listener
    try:
        _, p6 = connect_and_close(srv, socket.AF_INET6, CLIENT6, VIP6)
        _, p4 = connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)
    finally:
        srv.close()
    evs = collect(t, 2)
    assert [e.flow for e in evs] == [
        Flow(socket.AF_INET6, 6, CLIENT6, p6, VIP6, PORT),
        Flow(socket.AF_INET, 6, CLIENT4, p4, VIP4, PORT),  # v4-mapped reported as IPv4
    ]


@privileged
def test_only_watched_endpoints_are_reported(lab, tracers):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    other_port = Server(node, port=PORT + 1)
    other_addr = Server(node, addr=CLIENT4, port=PORT)
    srv = Server(node)
    try:
        connect_and_close(other_port, socket.AF_INET, CLIENT4, VIP4, PORT + 1)
        connect_and_close(other_addr, socket.AF_INET, VIP4, CLIENT4, PORT)
        # The ring buffer keeps order: had the two above matched, they would come
        # before this one.
        _, p = connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)
        (ev,) = collect(t, 1)
        assert (ev.flow.sport, ev.flow.dport) == (p, PORT)
        assert settle(t) == []
        assert t.unwatch(VIP4, PORT) is True
        assert t.unwatch(VIP4, PORT) is False
        connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)
        assert settle(t) == []
    finally:
        for s in (other_port, other_addr, srv):
            s.close()


@privileged
def test_remote_port_filter_reports_only_ports_in_range(lab, tracers):
    """A nat backend endpoint is watched for SNAT source ports only: the node's other
    clients of the same port never reach the ring buffer."""
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT, remote_ports=(20000, 20010))
    srv = Server(node)

    def from_port(cport):
        c = node.socket(socket.AF_INET)
        c.settimeout(5)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind((CLIENT4, cport))
        c.connect((VIP4, PORT))
        a, _ = srv.sock.accept()
        c.close()
        a.recv(1)
        a.close()

    try:
        from_port(20011)  # just outside
        from_port(19999)
        from_port(20005)  # inside
        (ev,) = collect(t, 1)
        assert (ev.flow.src, ev.flow.sport) == (CLIENT4, 20005)
        assert settle(t) == []
        assert t.stats().emitted == 1
    finally:
        srv.close()
    with pytest.raises(ValueError):
        t.watch(VIP4, PORT, remote_ports=(10, 5))


@privileged
def test_reset_connection_is_reported(lab, tracers):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    srv = Server(node)
    try:
        _, p = connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4, rst=True)
    finally:
        srv.close()
    (ev,) = collect(t, 1)
    assert ev.flow.sport == p and TCP_STATES[ev.oldstate] == "ESTABLISHED"


@privileged
def test_active_close_by_the_server_is_reported_without_waiting_for_time_wait(lab, tracers):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    srv = Server(node)
    try:
        _, p = connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4, server_first=True)
    finally:
        srv.close()
    (ev,) = collect(t, 1, timeout=2.0)  # TIME_WAIT would last 60 s
    assert ev.flow == Flow(socket.AF_INET, 6, CLIENT4, p, VIP4, PORT)
    assert ev.oldstate_name in ("FIN_WAIT2", "CLOSING")


@privileged
def test_each_tracer_sees_only_its_namespace(lab, tracers):
    node, other = lab["node"], lab["other"]
    assert node.netns_cookie() != other.netns_cookie()
    t_node = tracers(node.netns_cookie())
    t_other = tracers(other.netns_cookie())
    t_all = tracers(0)
    for t in (t_node, t_other, t_all):
        t.watch(VIP4, PORT)
    s_node, s_other = Server(node), Server(other)
    try:
        _, p_node = connect_and_close(s_node, socket.AF_INET, CLIENT4, VIP4)
        (ev,) = collect(t_node, 1)
        assert ev.flow.sport == p_node and ev.netns_cookie == node.netns_cookie()
        assert settle(t_other) == []
        _, p_other = connect_and_close(s_other, socket.AF_INET, CLIENT4, VIP4)
        (ev,) = collect(t_other, 1)
        assert ev.flow.sport == p_other and ev.netns_cookie == other.netns_cookie()
        assert settle(t_node) == []
        # Cookie 0 reports every namespace of the machine, including those of
        # anybody else running tests right now: look for ours among them.
        ours = {(node.netns_cookie(), p_node), (other.netns_cookie(), p_other)}
        seen: set = set()
        deadline = time.monotonic() + 3
        while not ours <= seen and time.monotonic() < deadline:
            seen |= {(e.netns_cookie, e.flow.sport) for e in t_all.poll(50)}
        assert ours <= seen
    finally:
        s_node.close()
        s_other.close()


@privileged
def test_default_filter_is_the_callers_own_namespace(lab):
    node = lab["node"]
    assert Tracer().netns_cookie == own_netns_cookie()
    assert node.run(lambda: Tracer().netns_cookie) == node.netns_cookie()
    assert own_netns_cookie() != node.netns_cookie()


@privileged
@pytest.mark.parametrize("batch_delay", [0.0, 0.005])
def test_asyncio_reader_delivers_events(lab, tracers, batch_delay):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    srv = Server(node)

    async def main():
        loop = asyncio.get_running_loop()
        t.start(batch_delay=batch_delay)
        it = t.events().__aiter__()
        first = asyncio.ensure_future(it.__anext__())
        ports = []
        for _ in range(3):
            ports.append((await loop.run_in_executor(
                None, connect_and_close, srv, socket.AF_INET, CLIENT4, VIP4))[1])
        got = [await asyncio.wait_for(first, 3)]
        while len(got) < 3:
            got.append(await asyncio.wait_for(it.__anext__(), 3))
        t.stop()
        return ports, got

    try:
        ports, got = asyncio.run(main())
    finally:
        srv.close()
    assert [e.flow.sport for e in got] == ports
    assert all(e.flow.dst == VIP4 for e in got)


def send_raw_tcp(ns, src, sport, dst, dport, flags, count=1):
    """Segments built by scapy, sent from ``ns`` through a raw socket (no socket of
    ours owns the tuple, so the kernel answers what no socket takes with a reset)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    v6 = ":" in dst
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    # IPPROTO_RAW: the whole packet as built, source address included
    raw = ns.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    l3 = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    # built first, sent in a tight loop: a burst, as a flood would come
    segs = [bytes(l3 / TCP(sport=sport + i, dport=dport, flags=flags, seq=1000, ack=2000)) for i in range(count)]
    try:
        for seg in segs:
            raw.sendto(seg, (dst, 0))
    finally:
        raw.close()


@privileged
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_segment_no_socket_takes_is_reported_as_refused(lab, tracers, family):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    vip, client = (VIP4, CLIENT4) if family == "v4" else (VIP6, CLIENT6)
    t.watch(vip, PORT)
    t.watch(vip, PORT + 1)
    srv = Server(node, socket.AF_INET if family == "v4" else socket.AF_INET6, vip, PORT)
    try:
        # an ACK the listener has no connection for (a flow that moved here mid-way)
        send_raw_tcp(node, client, 40001, vip, PORT, "A")
        # a SYN to a watched port nobody listens on
        send_raw_tcp(node, client, 40002, vip, PORT + 1, "S")
        # no reset answers a reset, and an unwatched port is not reported
        send_raw_tcp(node, client, 40003, vip, PORT, "R")
        send_raw_tcp(node, client, 40004, vip, PORT + 2, "S")
        got = collect(t, 2)
        assert settle(t) == []
    finally:
        srv.close()
    assert sorted((e.flow.sport, e.flow.dport) for e in got) == [(40001, PORT), (40002, PORT + 1)]
    assert all(e.refused and e.oldstate == RESET and e.oldstate_name == "RESET" for e in got)
    assert all(e.flow.src == client and e.flow.dst == vip for e in got)
    assert got[0].raw_key == Flow(got[0].flow.family, 6, client, got[0].flow.sport, vip, got[0].flow.dport).key()
    st = t.stats()
    assert st.resets == 2 and st.emitted == 2, st


@privileged
@pytest.mark.parametrize("endpoint", ["nat backend", "nat vip"])
def test_on_nat_endpoints_only_resets_without_a_listener_count(lab, tracers, endpoint):
    """A listener also resets a stray segment whose tuple may belong to a new connection
    by now; on nat endpoints evicting that flow would take its reply translation."""
    node = lab["node"]
    t = tracers(node.netns_cookie())
    kw = dict(remote_ports=(40000, 49999)) if endpoint == "nat backend" else dict(listener_resets=False)
    t.watch(VIP4, PORT, **kw)
    t.watch(VIP4, PORT + 1, **kw)
    srv = Server(node, socket.AF_INET, VIP4, PORT)
    try:
        send_raw_tcp(node, CLIENT4, 40001, VIP4, PORT, "A")      # a listener's reset
        send_raw_tcp(node, CLIENT4, 40002, VIP4, PORT + 1, "A")  # no socket at all
        send_raw_tcp(node, CLIENT4, 50003, VIP4, PORT + 1, "A")  # outside the backend's port filter
        _, p = connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)  # closes still count
        want = 3 if endpoint == "nat vip" else 2
        got = collect(t, want)
        assert settle(t) == []
    finally:
        srv.close()
    refused = sorted(e.flow.sport for e in got if e.refused)
    assert refused == ([40002, 50003] if endpoint == "nat vip" else [40002])
    assert [e.flow.sport for e in got if not e.refused] == ([p] if endpoint == "nat vip" or 40000 <= p <= 49999 else [])


@privileged
def test_refusals_are_reported_to_their_namespace_only_and_within_a_budget(lab, tracers):
    node, other = lab["node"], lab["other"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    send_raw_tcp(other, CLIENT4, 41000, VIP4, PORT, "S")  # the same endpoint, another namespace
    assert settle(t) == []
    # a burst of stray segments: each is answered with a reset, not each is reported
    n = 1200
    send_raw_tcp(node, CLIENT4, 42000, VIP4, PORT, "A", count=n)
    time.sleep(0.3)
    got = collect(t, 10**9, timeout=0.5)
    st = t.stats()
    assert st.resets == len(got) and st.resets + st.resets_limited == n, st
    assert st.resets_limited > 0 and st.resets <= 2 * 256 * os.cpu_count(), st


def _loop_factories():
    out = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
    else:
        out.append(pytest.param(uvloop.new_event_loop, id="uvloop"))  # the agent's loop
    return out


@privileged
@pytest.mark.parametrize("loop_factory", _loop_factories())
def test_held_batch_waits_for_commit_and_an_adopter_reads_it_again(lab, loop_factory):
    """With ``on_batch`` the reader holds each batch until commit(): more closes wait in
    the ring meanwhile (the kernel wakes nobody for them: the reader must look itself
    after the commit), and what a killed reader had read but not committed is read
    again by the process that adopts the pins."""
    node = lab["node"]
    pin_dir = f"/sys/fs/bpf/mlbtr{os.getpid()}-held"
    first = Tracer(node.netns_cookie())
    adopted = None
    srv = Server(node)
    try:
        first.load()
        first.attach()
        first.watch(VIP4, PORT)
        first.pin(pin_dir)

        async def main():
            loop = asyncio.get_running_loop()
            got: list[SockEvent] = []
            batches: list[int] = []
            held = asyncio.Event()

            def on_batch():
                batches.append(len(got))
                held.set()

            first.start(callback=got.append, on_batch=on_batch)
            p1 = (await loop.run_in_executor(None, connect_and_close, srv, socket.AF_INET, CLIENT4, VIP4))[1]
            await asyncio.wait_for(held.wait(), 3)
            assert [e.flow.sport for e in got] == [p1] and first.holding()
            held.clear()
            p2 = (await loop.run_in_executor(None, connect_and_close, srv, socket.AF_INET, CLIENT4, VIP4))[1]
            await asyncio.sleep(0.3)
            assert len(got) == 1  # held: the second close waits in the ring
            first.commit()
            await asyncio.wait_for(held.wait(), 3)
            assert [e.flow.sport for e in got] == [p1, p2] and batches == [1, 2]
            first.stop()  # "killed" holding the batch with p2
            return p2

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            p2 = runner.run(main())
        first.close()
        adopted = Tracer.adopt(pin_dir)
        (ev,) = collect(adopted, 1)
        assert ev.flow.sport == p2
        assert settle(adopted) == []
        adopted.unpin()
    finally:
        srv.close()
        first.close()
        if adopted is not None:
            adopted.close()
        remove_pins(pin_dir)


@privileged
def test_max_batch_splits_a_backlog_into_held_batches(lab, tracers):
    """A backlog is read max_batch records at a time, each batch held until commit()."""
    node = lab["node"]
    tr = tracers(node.netns_cookie())
    tr.watch(VIP4, PORT)
    srv = Server(node)
    try:
        ports = [connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)[1] for _ in range(5)]

        async def main():
            got: list[SockEvent] = []
            sizes: list[int] = []

            def on_batch():
                sizes.append(len(got) - sum(sizes))
                asyncio.get_running_loop().call_soon(tr.commit)

            tr.start(callback=got.append, on_batch=on_batch, max_batch=2)
            for _ in range(100):
                if len(got) >= 5:
                    break
                await asyncio.sleep(0.02)
            tr.stop()
            return got, sizes

        got, sizes = asyncio.run(main())
        assert sorted(e.flow.sport for e in got) == sorted(ports)
        assert sizes == [2, 2, 1], sizes
    finally:
        srv.close()


@privileged
def test_ring_buffer_overflow_is_counted(lab, tracers):
    node = lab["node"]
    t = tracers(node.netns_cookie(), ring_size=4096)  # one page: ~56 records
    t.watch(VIP4, PORT)
    srv = Server(node)
    n = 120
    try:
        for _ in range(n):
            connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)
    finally:
        srv.close()
    time.sleep(0.2)
    st = t.stats()
    assert st.ringbuf_full > 0
    assert st.emitted + st.ringbuf_full == n
    assert len(collect(t, st.emitted)) == st.emitted
    # Drained, the buffer takes records again.
    srv = Server(node)
    try:
        connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)
    finally:
        srv.close()
    assert len(collect(t, 1)) == 1
    assert t.stats().ringbuf_full == st.ringbuf_full


@privileged
def test_each_close_is_reported_once_by_primary_and_backup_together(lab, tracers):
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    srv = Server(node)
    try:
        ports = {connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)[1] for _ in range(40)}
    finally:
        srv.close()
    got = collect(t, 40) + settle(t)
    assert sorted(e.flow.sport for e in got) == sorted(ports)
    st = t.stats()
    assert st.emitted == 40 and st.recovered == 0 and st.missed == 0, st


@privileged
def test_backup_program_reports_what_the_primary_did_not_see(lab, request):
    """The primary not run at all is the deterministic way to make it miss every
    close, as the kernel's recursion guard makes it miss some."""
    node = lab["node"]
    t = Tracer(netns_cookie=node.netns_cookie())
    request.addfinalizer(t.close)
    t.load()
    t.attach(programs=(PROGRAM_BACKUP,))
    t.watch(VIP4, PORT)
    srv = Server(node)
    try:
        ports = {connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)[1] for _ in range(10)}
    finally:
        srv.close()
    got = collect(t, 10) + settle(t)
    assert sorted(e.flow.sport for e in got) == sorted(ports)
    st = t.stats()
    assert st.emitted == 10 and st.recovered == 10, st


def _cgroup() -> str:
    root = cgroup2_root()
    if root is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no cgroup v2 hierarchy mounted (/proc/self/mountinfo)")
        pytest.skip("no cgroup v2 hierarchy mounted")
    return root


@privileged
def test_sock_ops_alone_reports_every_kind_of_close_once(lab, request):
    """The tracepoint's programs not attached: the kernel skipping them for some
    hits (bpf/tracer.bpf.c) made deterministic. Every close of a watched endpoint
    still comes, once, from the cgroup's sock_ops hook."""
    node = lab["node"]
    t = Tracer(netns_cookie=node.netns_cookie())
    request.addfinalizer(t.close)
    t.load()
    t.attach_cgroup(_cgroup())
    assert t.sockops_attached
    t.watch(VIP4, PORT)
    t.watch(VIP6, PORT)
    # a nat endpoint: only remote ports in the SNAT range are flows of the balancer
    t.watch(VIP4, PORT + 1, remote_ports=(1, 1))
    srv = Server(node)
    nat = Server(node, port=PORT + 1)
    srv6 = None
    try:
        want = [
            (socket.AF_INET, CLIENT4, connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)[1], VIP4, "LAST_ACK"),
            (socket.AF_INET, CLIENT4, connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4, server_first=True)[1],
             VIP4, "FIN_WAIT2"),
            (socket.AF_INET, CLIENT4, connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4, rst=True)[1],
             VIP4, "ESTABLISHED"),
        ]
        connect_and_close(nat, socket.AF_INET, CLIENT4, VIP4, PORT + 1)  # port outside the filter
        srv.close()
        srv6 = Server(node, socket.AF_INET6, "::", v6only=False)
        want.append((socket.AF_INET6, CLIENT6, connect_and_close(srv6, socket.AF_INET6, CLIENT6, VIP6)[1],
                     VIP6, "LAST_ACK"))
        # IPv4 through the dual-stack listener: reported as IPv4, as the balancer keys it
        want.append((socket.AF_INET, CLIENT4, connect_and_close(srv6, socket.AF_INET, CLIENT4, VIP4)[1],
                     VIP4, "LAST_ACK"))
    finally:
        for s in (srv, srv6, nat):
            if s is not None:
                s.close()
    got = collect(t, len(want)) + settle(t)
    assert [(e.flow.family, e.flow.src, e.flow.sport, e.flow.dst, e.flow.dport, e.oldstate_name) for e in got] == [
        (fam, c, p, v, PORT, state) for fam, c, p, v, state in want]
    st = t.stats()
    assert st.emitted == st.sockops == len(want) and st.missed == 0, st


@privileged
def test_with_sock_ops_each_close_is_reported_once_and_to_its_namespace(lab, tracers):
    """Both hooks see every close here: the sock_ops program reports it, the
    tracepoint's programs then skip that socket. The other namespace's tracer, its
    own sock_ops program on the same cgroup, hears nothing of it."""
    node, other = lab["node"], lab["other"]
    t = tracers(node.netns_cookie())
    t_other = tracers(other.netns_cookie())
    for tr in (t, t_other):
        tr.attach_cgroup(_cgroup())
        tr.watch(VIP4, PORT)
    srv = Server(node)
    try:
        ports = {connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)[1] for _ in range(40)}
        ports.add(connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4, server_first=True)[1])
    finally:
        srv.close()
    got = collect(t, 41) + settle(t)
    assert sorted(e.flow.sport for e in got) == sorted(ports)
    st = t.stats()
    assert st.emitted == st.sockops == 41 and st.recovered == 0, st
    assert settle(t_other) == [] and t_other.stats().emitted == 0


@privileged
def test_tracepoint_reports_sockets_accepted_before_sock_ops_attached(lab, tracers):
    """A socket accepted before the cgroup hook was attached never asked for state
    callbacks: its close comes from the tracepoint, once."""
    node = lab["node"]
    t = tracers(node.netns_cookie())
    t.watch(VIP4, PORT)
    srv = Server(node)
    try:
        c = node.socket(socket.AF_INET)
        c.settimeout(5)
        c.bind((CLIENT4, 0))
        c.connect((VIP4, PORT))
        a, _ = srv.sock.accept()
        cport = c.getsockname()[1]
        t.attach_cgroup(_cgroup())
        c.close()
        assert a.recv(1) == b""
        a.close()
    finally:
        srv.close()
    (ev,) = collect(t, 1) + settle(t)
    assert (ev.flow.sport, ev.flow.dport) == (cport, PORT)
    st = t.stats()
    assert st.emitted == 1 and st.sockops == 0, st


@privileged
def test_pinned_tracer_survives_its_loader_and_is_adopted(lab):
    node = lab["node"]
    pin_dir = f"/sys/fs/bpf/mlbtr{os.getpid()}-tracer"
    first = Tracer(node.netns_cookie())
    adopted = None
    try:
        first.load()
        link_id = first.attach().info()["id"]
        sockops_link_id = first.attach_cgroup(_cgroup()).info()["id"]
        first.watch(VIP4, PORT)
        first.pin(pin_dir)
        first.close()  # the "old agent" exits; link and maps stay pinned
        srv = Server(node)
        try:
            _, p = connect_and_close(srv, socket.AF_INET, CLIENT4, VIP4)
        finally:
            srv.close()
        adopted = Tracer.adopt(pin_dir)
        assert adopted.netns_cookie == node.netns_cookie()
        assert adopted.watched() == {(VIP4, PORT, 6)}
        (ev,) = collect(adopted, 1)  # written while nobody was reading
        assert ev.flow.sport == p
        assert adopted.sockops_attached
        assert adopted.stats().emitted == adopted.stats().sockops == 1
        adopted.unpin()
        assert not os.path.exists(pin_dir)
        adopted.close()
        adopted = None
        for lid in (link_id, sockops_link_id):
            shown = subprocess.run(["bpftool", "link", "show", "id", str(lid)],
                                   capture_output=True, text=True)
            assert shown.returncode != 0  # detached once unpinned and closed
    finally:
        if adopted is not None:
            adopted.close()
        remove_pins(pin_dir)


@privileged
def test_closes_no_other_mix_can_hold_are_evicted_by_the_program(lab):
    """Loaded with the balancer's maps, the tracer evicts the entry of a flow set up
    here by its SYN, for this node's own backend, never seen from a peer, moves it to
    ct_closed and reports nothing; any other close is reported and its entry left to
    the agent."""
    from meshlb.dataplane.balancer import Balancer

    node = lab["node"]
    pin_dir = f"/sys/fs/bpf/mlbtr{os.getpid()}-local"
    lb = Balancer.load(pin_dir=pin_dir, conntrack_size=1024)
    t = None
    try:
        lb.set_backend(1, VIP4, local=True)   # this node
        lb.set_backend(2, "10.66.0.9")        # another node
        t = Tracer(netns_cookie=node.netns_cookie(), balancer_pins=pin_dir)
        t.load()
        t.attach()
        t.watch(VIP4, PORT)
        srv = Server(node)
        est = L.MLB_CT_F_ESTABLISHED
        cases = {  # client port: (entry, evicted by the program)
            41001: (L.CtValue(backend_id=1, flags=est, syn_seq=77), True),
            41002: (L.CtValue(backend_id=1, flags=est | L.MLB_CT_F_PEER_SEEN, syn_seq=77), False),
            41003: (L.CtValue(backend_id=1, flags=est, syn_seq=0), False),   # picked up mid-flow
            41004: (L.CtValue(backend_id=2, flags=est, syn_seq=77), False),  # another backend
            41005: (None, False),                                              # not held here
        }
        try:
            for cport, (ct, _) in cases.items():
                c = node.socket(socket.AF_INET)
                c.settimeout(5)
                c.bind((CLIENT4, cport))
                c.connect((VIP4, PORT))
                a, _ = srv.sock.accept()
                key = bytes(L.flow_key(CLIENT4, cport, VIP4, PORT, 6))
                if ct is not None:
                    lb.maps["conntrack"].update(key, bytes(ct))
                c.close()
                assert a.recv(1) == b""
                a.close()
        finally:
            srv.close()
        reported = {ev.flow.sport for ev in collect(t, 4)} | {ev.flow.sport for ev in settle(t)}
        assert reported == {p for p, (_, evicted) in cases.items() if not evicted}
        for cport, (ct, evicted) in cases.items():
            k = L.flow_key(CLIENT4, cport, VIP4, PORT, 6)
            if evicted:
                assert lb.conntrack_lookup(k) is None and lb.closed_lookup(k) == ct
            elif ct is not None:
                assert lb.conntrack_lookup(k) == ct and lb.closed_lookup(k) is None
        st = t.stats()
        assert (st.local_evicted, st.emitted) == (1, 4)
    finally:
        if t is not None:
            t.close()
        lb.unpin()
        lb.close()
        os.rmdir(pin_dir)
