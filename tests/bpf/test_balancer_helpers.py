"""Shared fixtures for the balancer's BPF_PROG_TEST_RUN tests (imported by the other
test_balancer_* modules), plus checks of the helpers themselves.

bpf_fib_lookup inside a test run uses the routing and neighbour tables of the netns
of the thread that issues BPF_PROG_TEST_RUN (the ingress device is looked up there),
so FibNetns builds a private namespace with two veth pairs, routes and permanent
neighbours, and runs every test_run from a thread that has entered it.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import os
import socket
import struct
import subprocess

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import Balancer, flow_hash
from meshlb.dataplane.layouts import Counter, XdpMd

PID = os.getpid()
CLONE_NEWNET = 0x40000000

# Addresses of the test topology (documentation / ULA ranges, inside the netns only).
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:c::7"
VIP4, VIP6 = "203.0.113.10", "2001:db8:f::10"
SNAT4, SNAT6 = "10.10.0.1", "fd00:a::1"
BE_TX4, BE_TX6 = "10.10.0.2", "fd00:a::2"        # behind the ingress veth: XDP_TX
BE_REDIR4, BE_REDIR6 = "10.20.0.2", "fd00:b::2"  # behind the other veth: XDP_REDIRECT
BE_NONEIGH4, BE_NONEIGH6 = "10.10.0.3", "fd00:a::3"  # routed, no neighbour entry
BE_BLACKHOLE4 = "10.99.0.1"
MAC_A, MAC_B = "02:00:00:00:0a:01", "02:00:00:00:0b:01"
MAC_BE_TX, MAC_BE_REDIR, MAC_GW = "02:00:00:00:0a:02", "02:00:00:00:0b:02", "02:00:00:00:0a:fe"
GW4, GW6 = "10.10.0.254", "fd00:a::fe"
CLIENT_MAC = "02:00:00:00:cc:01"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, text=True)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class FibNetns:
    """A private netns with veth A (ingress, 10.10.0.1) and veth B (10.20.0.1)."""

    def __init__(self) -> None:
        self.name = f"mlbt{PID}"
        self.a, self.b = f"mlba{PID}", f"mlbb{PID}"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.ifindex_a = self.ifindex_b = 0

    def setup(self) -> None:
        ns = self.name
        _ip("netns", "add", ns)
        try:
            self._setup(ns)
        except BaseException:
            self.teardown()
            raise

    def _setup(self, ns: str) -> None:
        for s in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                  "net.ipv6.conf.default.accept_dad=0"):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", s], check=True)
        for dev, peer, mac in ((self.a, self.a + "p", MAC_A), (self.b, self.b + "p", MAC_B)):
            _ip("link", "add", dev, "address", mac, "type", "veth", "peer", "name", peer, ns=ns)
            _ip("link", "set", dev, "up", ns=ns)
            _ip("link", "set", peer, "up", ns=ns)
        _ip("addr", "add", "10.10.0.1/24", "dev", self.a, ns=ns)
        _ip("addr", "add", "10.20.0.1/24", "dev", self.b, ns=ns)
        _ip("-6", "addr", "add", "fd00:a::1/64", "dev", self.a, "nodad", ns=ns)
        _ip("-6", "addr", "add", "fd00:b::1/64", "dev", self.b, "nodad", ns=ns)
        for addr, mac, dev in ((BE_TX4, MAC_BE_TX, self.a), (BE_REDIR4, MAC_BE_REDIR, self.b),
                               (GW4, MAC_GW, self.a), (BE_TX6, MAC_BE_TX, self.a),
                               (BE_REDIR6, MAC_BE_REDIR, self.b), (GW6, MAC_GW, self.a)):
            _ip("neigh", "replace", addr, "lladdr", mac, "nud", "permanent", "dev", dev, ns=ns)
        _ip("route", "add", "default", "via", GW4, "dev", self.a, ns=ns)
        _ip("-6", "route", "add", "default", "via", GW6, "dev", self.a, ns=ns)
        _ip("route", "add", "blackhole", "10.99.0.0/24", ns=ns)
        # The VIP is local (mix mode: it sits on the node's loopback).
        _ip("addr", "add", f"{VIP4}/32", "dev", "lo", ns=ns)
        _ip("-6", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, initializer=self._enter)
        self.ifindex_a = self.run(lambda: ctypes_if_index(self.a))
        self.ifindex_b = self.run(lambda: ctypes_if_index(self.b))

    def _enter(self) -> None:
        # One CPU for every test run: per-CPU state (the next-hop cache, LRU lists)
        # must be the same from one packet to the next. Pid 0 = this thread only.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def run(self, fn):
        assert self._pool is not None
        return self._pool.submit(fn).result()

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def ctypes_if_index(name: str) -> int:
    return socket.if_nametoindex(name)


@pytest.fixture(scope="module")
def netns():
    env = FibNetns()
    env.setup()
    try:
        yield env
    finally:
        env.teardown()


class Harness:
    """A freshly loaded balancer and a way to run packets through it."""

    def __init__(self, env: FibNetns | None) -> None:
        self.env = env
        self.lb = Balancer.load(conntrack_size=8192)
        self.prog = self.lb.program

    def close(self) -> None:
        self.lb.close()

    def run(self, pkt, *, ifindex: int | None = None, repeat: int = 1):
        data = bytes(pkt)
        if self.env is None:
            return self.prog.test_run(data, repeat=repeat)
        idx = self.env.ifindex_a if ifindex is None else ifindex
        ctx = bytes(XdpMd(data=0, data_end=len(data), ingress_ifindex=idx))
        return self.env.run(lambda: self.prog.test_run(data, repeat=repeat, ctx=ctx))

    def counters(self) -> dict[str, int]:
        return self.lb.counters()

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        after = self.counters()
        return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.fixture
def lb(netns):
    h = Harness(netns)
    try:
        yield h
    finally:
        h.close()


def tcp4(src=CLIENT4, dst=VIP4, sport=40000, dport=80, flags="A", payload=b"hello", seq=1000, **ip):
    return (Ether(src=CLIENT_MAC, dst=MAC_A) / IP(src=src, dst=dst, ttl=61, id=7, **ip)
            / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=2000) / payload)


def udp4(src=CLIENT4, dst=VIP4, sport=40000, dport=53, payload=b"query", **ip):
    return (Ether(src=CLIENT_MAC, dst=MAC_A) / IP(src=src, dst=dst, ttl=61, id=7, **ip)
            / UDP(sport=sport, dport=dport) / payload)


def tcp6(src=CLIENT6, dst=VIP6, sport=40000, dport=80, flags="A", payload=b"hello", seq=1000, **ip):
    return (Ether(src=CLIENT_MAC, dst=MAC_A) / IPv6(src=src, dst=dst, hlim=61, **ip)
            / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=2000) / payload)


def udp6(src=CLIENT6, dst=VIP6, sport=40000, dport=53, payload=b"query", **ip):
    return (Ether(src=CLIENT_MAC, dst=MAC_A) / IPv6(src=src, dst=dst, hlim=61, **ip)
            / UDP(sport=sport, dport=dport) / payload)


def checksums_valid(raw: bytes) -> bool:
    """Recompute every checksum with scapy and compare with the bytes given."""
    p = Ether(raw)
    q = p.copy()
    for layer in (IP, TCP, UDP):
        if q.haslayer(layer) and hasattr(q[layer], "chksum"):
            if layer is UDP and q[UDP].chksum == 0 and q.haslayer(IP):
                continue  # IPv4 UDP without checksum stays without
            del q[layer].chksum
    return bytes(q.__class__(bytes(q))) == raw


def key_of(pkt) -> L.FlowKey:
    ip = pkt[IP] if pkt.haslayer(IP) else pkt[IPv6]
    l4 = pkt[TCP] if pkt.haslayer(TCP) else pkt[UDP]
    return L.flow_key(ip.src, l4.sport, ip.dst, l4.dport, 6 if pkt.haslayer(TCP) else 17)


# ------------------------------------------------------------ helper checks
def test_flow_hash_matches_known_vector():
    # Independent recomputation of the documented algorithm, word by word.
    k = L.flow_key("10.0.0.1", 1234, "10.0.0.2", 80, 6)
    w = struct.unpack("=10I", bytes(k))
    assert w[1] == w[2] == w[3] == 0 and w[9] == 6 | (2 << 8)
    assert flow_hash(k) == flow_hash(L.flow_key("10.0.0.1", 1234, "10.0.0.2", 80, 6))
    assert flow_hash(k) != flow_hash(L.flow_key("10.0.0.1", 1235, "10.0.0.2", 80, 6))


def test_checksum_validator_detects_corruption():
    good = bytes(tcp4())
    assert checksums_valid(good)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    assert not checksums_valid(bytes(bad))


@pytest.mark.privileged
def test_counter_names_cover_enum():
    h = Harness(None)
    try:
        c = h.counters()
    finally:
        h.close()
    for cnt in Counter:
        if cnt is not Counter.FIB_RC:
            assert cnt.name.lower() in c
    assert "fib_no_neigh" in c
