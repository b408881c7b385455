"""The balancer under BPF_PROG_TEST_RUN, in a namespace of its own.

bpf_fib_lookup inside a test run uses the routing and neighbour tables of the netns
of the thread that issues BPF_PROG_TEST_RUN (the ingress device is looked up there),
so FibNetns builds a private namespace with two veth pairs, routes and permanent
neighbours, and runs every test_run from a thread that has entered it. The fixtures
of tests/bpf/conftest.py are these; other suites and benches use the context
managers.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import os
import socket
import subprocess
from collections.abc import Iterator

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import Balancer
from meshlb.dataplane.layouts import XdpMd

from .pkt import (
    BE_NONEIGH4,
    BE_NONEIGH6,
    BE_REDIR4,
    BE_REDIR6,
    BE_SMALL4,
    BE_SMALL6,
    BE_TX4,
    BE_TX6,
    CLIENT4,
    CLIENT6,
    CLIENT_SMALL4,
    CLIENT_SMALL6,
    GW4,
    GW6,
    MAC_A,
    MAC_B,
    MAC_BE_REDIR,
    MAC_BE_TX,
    MAC_GW,
    SMALL_MTU,
    SNAT4,
    SNAT6,
    VIP4,
    VIP6,
    key_of,
    tcp4,
    tcp6,
    udp4,
    udp6,
)

PID = os.getpid()
CLONE_NEWNET = 0x40000000


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
        self._cpu_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
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
        # narrower paths: to one backend, and back to one client ("lock": Linux applies
        # an IPv4 route's MTU to forwarded packets only when locked, as bpf_fib_lookup)
        for addr, dev in ((BE_SMALL4, self.a), (BE_SMALL6, self.a)):
            _ip("route", "add", addr, "dev", dev, "mtu", "lock", str(SMALL_MTU), ns=ns)
            _ip("neigh", "replace", addr, "lladdr", MAC_BE_TX, "nud", "permanent", "dev", dev, ns=ns)
        for addr, gw in ((CLIENT_SMALL4, GW4), (CLIENT_SMALL6, GW6)):
            _ip("route", "add", addr, "via", gw, "dev", self.a, "mtu", "lock", str(SMALL_MTU),
                ns=ns)
        # The VIP is local (mix mode: it sits on the node's loopback).
        _ip("addr", "add", f"{VIP4}/32", "dev", "lo", ns=ns)
        _ip("-6", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, initializer=self._enter)
        self.ifindex_a = self.run(lambda: ctypes_if_index(self.a))
        self.ifindex_b = self.run(lambda: ctypes_if_index(self.b))

    def _enter(self, cpu: int | None = None) -> None:
        # One CPU for every test run: per-CPU state (the next-hop cache, LRU lists)
        # must be the same from one packet to the next. Pid 0 = this thread only.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0)) if cpu is None else cpu})
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def run(self, fn, cpu: int | None = None):
        """fn() in the namespace, on the test runs' CPU or on ``cpu``: XDP runs on the
        CPU of the thread that issues BPF_PROG_TEST_RUN, as on the CPU whose queue
        received the packet."""
        assert self._pool is not None
        if cpu is None:
            return self._pool.submit(fn).result()
        pool = self._cpu_pools.get(cpu)
        if pool is None:
            pool = self._cpu_pools[cpu] = concurrent.futures.ThreadPoolExecutor(
                1, initializer=self._enter, initargs=(cpu,))
        return pool.submit(fn).result()

    def teardown(self) -> None:
        for pool in self._cpu_pools.values():
            pool.shutdown(wait=True)
        self._cpu_pools.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def ctypes_if_index(name: str) -> int:
    return socket.if_nametoindex(name)


class Harness:
    """A freshly loaded balancer and a way to run packets through it."""

    def __init__(self, env: FibNetns | None, conntrack_size: int = 8192, **load) -> None:
        self.env = env
        self.lb = Balancer.load(conntrack_size=conntrack_size, **load)
        self.prog = self.lb.program

    def close(self) -> None:
        self.lb.close()

    def run(self, pkt, *, ifindex: int | None = None, repeat: int = 1, cpu: int | None = None):
        data = bytes(pkt)
        if self.env is None:
            return self.prog.test_run(data, repeat=repeat)
        idx = self.env.ifindex_a if ifindex is None else ifindex
        ctx = bytes(XdpMd(data=0, data_end=len(data), ingress_ifindex=idx))
        return self.env.run(lambda: self.prog.test_run(data, repeat=repeat, ctx=ctx), cpu)

    def run_many(self, packets, *, cpu: int | None = None) -> list[int]:
        """Return codes of the packets (bytes) run one by one, in one call to the
        namespace's thread: a flood of thousands costs milliseconds, not seconds."""
        assert self.env is not None
        idx = self.env.ifindex_a

        def go():
            out = []
            for data in packets:
                ctx = bytes(XdpMd(data=0, data_end=len(data), ingress_ifindex=idx))
                out.append(self.prog.test_run(data, ctx=ctx).retval)
            return out
        return self.env.run(go, cpu)

    def counters(self) -> dict[str, int]:
        return self.lb.counters()

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        after = self.counters()
        return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@contextlib.contextmanager
def fib_netns() -> Iterator[FibNetns]:
    env = FibNetns()
    env.setup()
    try:
        yield env
    finally:
        env.teardown()


@contextlib.contextmanager
def loaded(env: FibNetns | None, **load) -> Iterator[Harness]:
    """A freshly loaded balancer whose test runs go through ``env``."""
    h = Harness(env, **load)
    try:
        yield h
    finally:
        h.close()


# A VIP with the four backends of the topology, for the tests of forwarding paths.
RING = 13
FAMILIES = {
    "v4": dict(vip=VIP4, tx=BE_TX4, redir=BE_REDIR4, noneigh=BE_NONEIGH4, small=BE_SMALL4,
               snat=SNAT4, client=CLIENT4, client_small=CLIENT_SMALL4, gw=GW4, tcp=tcp4,
               udp=udp4, af=L.AF_INET),
    "v6": dict(vip=VIP6, tx=BE_TX6, redir=BE_REDIR6, noneigh=BE_NONEIGH6, small=BE_SMALL6,
               snat=SNAT6, client=CLIENT6, client_small=CLIENT_SMALL6, gw=GW6, tcp=tcp6,
               udp=udp6, af=L.AF_INET6),
}


def setup_vip(lb, fam, mode, table_backend=1, proto="tcp", port=80, nat_port=0):
    f = FAMILIES[fam]
    lb.lb.add_vip(f["vip"], port, proto, mode, vip_id=5, ring_size=RING)
    lb.lb.set_backend(1, f["tx"], nat_port)
    lb.lb.set_backend(2, f["redir"], nat_port)
    lb.lb.set_backend(3, f["vip"], local=True)
    lb.lb.set_backend(4, f["noneigh"], nat_port)
    lb.lb.set_backend(6, f["small"], nat_port)
    lb.lb.set_vip_table(5, [table_backend] * RING)
    if mode == "nat":
        lb.lb.set_snat(f["af"], f["snat"], 20000, 20999)
    return f


def snat_port_of(lb, pkt) -> int:
    ct = lb.lb.conntrack_lookup(key_of(pkt))
    assert ct is not None and ct.flags & L.MLB_CT_F_NAT
    return L.port_host(ct.snat_port)
