"""Balancer state handling: next-hop cache, VIP removal and mode changes with
established flows, the VIP address pre-filter, pinning/adoption, XDP attach."""
from __future__ import annotations

import ipaddress
import os
import shutil
import time

import pytest
from scapy.layers.l2 import Ether

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import MAP_NAMES, Balancer, tick_rate
from meshlb.dataplane.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX

from .harness import PID, Harness
from .pkt import BE_REDIR4, BE_TX4, MAC_BE_REDIR, MAC_BE_TX, SNAT4, VIP4, key_of, tcp4

pytestmark = pytest.mark.privileged
RING = 11


def dr_vip(lb, backend=1, mode="dr"):
    lb.lb.add_vip(VIP4, 80, "tcp", mode, vip_id=2, ring_size=RING)
    lb.lb.set_backend(1, BE_TX4, 8080)
    lb.lb.set_backend(2, BE_REDIR4, 8080)
    lb.lb.set_vip_table(2, [backend] * RING)
    lb.lb.set_snat(L.AF_INET, SNAT4, 30000, 30999)


def test_next_hop_cache_used_and_invalidated(lb, netns):
    dr_vip(lb)
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    before = lb.counters()
    assert lb.run(tcp4()).retval == XDP_TX
    assert lb.delta(before) == {"rx": 1, "ct_hit": 1, "tx": 1, "fib_cached": 1}
    # another ingress device: the cached answer (made for veth A) is not used
    before = lb.counters()
    r = lb.run(tcp4(), ifindex=netns.ifindex_b)
    assert r.retval == XDP_REDIRECT and "fib_cached" not in lb.delta(before)
    # moving backend 1 to another address must not reuse its old next hop
    lb.lb.set_backend(1, BE_REDIR4)
    r = lb.run(tcp4())
    assert r.retval == XDP_REDIRECT and Ether(r.data).dst == MAC_BE_REDIR
    lb.lb.flush_fib_cache()
    before = lb.counters()
    assert lb.run(tcp4()).retval == XDP_REDIRECT
    assert "fib_cached" not in lb.delta(before)


def test_cached_next_hop_respects_mtu(lb):
    dr_vip(lb)
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    before = lb.counters()
    r = lb.run(tcp4(payload=b"x" * 1600))  # bigger than the veth's 1500, no DF
    assert r.retval == XDP_DROP
    d = lb.delta(before)
    assert d.get("fib_frag_needed") == 1 and d.get("drop_too_big") == 1, d


def test_removed_vip_stops_established_flows(lb):
    dr_vip(lb)
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    assert lb.lb.remove_vip(VIP4, 80, "tcp")
    raw = bytes(tcp4())
    before = lb.counters()
    r = lb.run(raw)
    assert r.retval == XDP_PASS and r.data == raw
    assert lb.delta(before) == {"rx": 1, "pass_not_vip": 1}
    # re-adding it (a new generation) re-selects instead of trusting the old entry
    dr_vip(lb, backend=2)
    before = lb.counters()
    r = lb.run(raw)
    assert r.retval == XDP_REDIRECT
    assert lb.delta(before)["ct_reselect"] == 1


def test_mode_change_restarts_flows_same_mode_update_keeps_them(lb):
    dr_vip(lb)
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    lb.lb.add_vip(VIP4, 80, "tcp", "dr", vip_id=2, ring_size=RING)  # no change
    before = lb.counters()
    lb.run(tcp4())
    assert lb.delta(before)["ct_hit"] == 1
    lb.lb.add_vip(VIP4, 80, "tcp", "nat", vip_id=2, ring_size=RING)
    lb.lb.set_vip_table(2, [1] * RING)
    # the dr flow cannot turn into a nat flow mid-stream (the backend knows it by the
    # client's address): its next segment goes to the local stack, which resets it
    before = lb.counters()
    r = lb.run(tcp4())
    d = lb.delta(before)
    assert r.retval == XDP_PASS and d["ct_reselect"] == 1 and d["pass_nat_no_flow"] == 1, d
    # the client's next connection on the same tuple starts over as a nat flow
    before = lb.counters()
    r = lb.run(tcp4(flags="S"))
    assert r.retval == XDP_TX and lb.delta(before)["ct_reselect"] == 1
    out = Ether(r.data)
    assert out["IP"].src == SNAT4 and out["TCP"].dport == 8080
    assert lb.lb.conntrack_lookup(key_of(tcp4())).flags & L.MLB_CT_F_NAT


def _colliding_address(vip: str) -> str:
    slot = L.vip_filter_slot(vip)
    base = int(ipaddress.IPv4Address("192.0.2.0"))
    for i in range(1, 1 << 20):
        a = str(ipaddress.IPv4Address(base + i))
        if L.vip_filter_slot(a) == slot:
            return a
    raise AssertionError("no collision found")


def test_vip_filter(lb):
    dr_vip(lb)
    slot = L.vip_filter_slot(VIP4)
    f = lb.lb.maps["vip_filter"]
    assert int.from_bytes(f.lookup(slot.to_bytes(4, "little")), "little") == 1
    # a non-VIP address sharing the VIP's slot takes the full lookup, still passes
    other = _colliding_address(VIP4)
    raw = bytes(tcp4(dst=other))
    before = lb.counters()
    r = lb.run(raw)
    assert r.retval == XDP_PASS and r.data == raw
    assert lb.delta(before) == {"rx": 1, "pass_not_vip": 1}
    # two VIPs on one address count twice, removing one keeps the other reachable
    lb.lb.add_vip(VIP4, 81, "tcp", "dr", vip_id=3, ring_size=RING)
    assert int.from_bytes(f.lookup(slot.to_bytes(4, "little")), "little") == 2
    lb.lb.remove_vip(VIP4, 81, "tcp")
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    lb.lb.remove_vip(VIP4, 80, "tcp")
    assert int.from_bytes(f.lookup(slot.to_bytes(4, "little")), "little") == 0


def test_pinned_state_is_adopted_by_the_next_load(netns):
    pin = f"/sys/fs/bpf/mlbtest{PID}"
    try:
        h = Harness(netns)
        h.lb.close()
        h.lb = Balancer.load(pin, conntrack_size=4096)
        h.prog = h.lb.program
        dr_vip(h)
        assert h.run(tcp4(flags="S")).retval == XDP_TX
        assert sorted(os.listdir(pin)) == sorted(MAP_NAMES)
        h.lb.set_vip_table(2, [2] * RING)  # established flow must survive the restart
        h.lb.close()
        h.lb = Balancer.load(pin, conntrack_size=4096)
        h.prog = h.lb.program
        assert h.lb.conntrack_count() == 1
        assert h.lb.vip_table(2) == [2] * RING
        before = h.counters()
        r = h.run(tcp4())
        assert r.retval == XDP_TX and Ether(r.data).dst == MAC_BE_TX
        assert h.delta(before)["ct_hit"] == 1
        r = h.run(tcp4(sport=50000, flags="S"))
        assert r.retval == XDP_REDIRECT
        h.lb.unpin()
        h.lb.close()
    finally:
        shutil.rmtree(pin, ignore_errors=True)


@pytest.mark.parametrize("mode", ["generic", "native"])
def test_attach_and_detach(lb, netns, mode):
    link = netns.run(lambda: lb.lb.attach(netns.ifindex_a, mode))
    try:
        assert link.info()["prog_id"] == lb.prog.id
    finally:
        netns.run(link.detach)
        link.close()


def test_next_hop_cache_follows_neighbour_change_after_forget(lb, netns):
    import subprocess
    dr_vip(lb)
    assert Ether(lb.run(tcp4(flags="S")).data).dst == MAC_BE_TX
    new_mac = "02:00:00:00:0a:77"
    subprocess.run(["ip", "-n", netns.name, "neigh", "replace", BE_TX4, "lladdr", new_mac,
                    "nud", "permanent", "dev", netns.a], check=True)
    try:
        # within MLB_FIB_CACHE_NS the cached answer may still be used...
        assert Ether(lb.run(tcp4()).data).dst in (MAC_BE_TX, new_mac)
        # ...until the agent, which saw the change, forgets it
        lb.lb.forget_next_hop(BE_TX4)
        assert Ether(lb.run(tcp4()).data).dst == new_mac
    finally:
        subprocess.run(["ip", "-n", netns.name, "neigh", "replace", BE_TX4, "lladdr", MAC_BE_TX,
                        "nud", "permanent", "dev", netns.a], check=True)


def test_nat_reply_uses_next_hop_cache(lb):
    from scapy.layers.inet import IP, TCP
    dr_vip(lb, mode="nat")
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    sp = L.port_host(lb.lb.conntrack_lookup(key_of(tcp4())).snat_port)
    rep = Ether(dst="02:00:00:00:0a:01") / IP(src=BE_TX4, dst=SNAT4) / TCP(sport=8080, dport=sp)
    assert lb.run(rep).retval == XDP_TX
    before = lb.counters()
    assert lb.run(rep).retval == XDP_TX
    assert lb.delta(before) == {"rx": 1, "nat_reply": 1, "tx": 1, "fib_cached": 1}


def test_conntrack_times_are_monotonic_ns_at_tick_resolution(lb):
    """The data plane counts jiffies (a load, where a clock helper cost 14 ns a packet)
    scaled to CLOCK_MONOTONIC: Python's expiry compares them with time.monotonic_ns()."""
    dr_vip(lb)
    hz = lb.lb.sync_clock()
    tick = 10**9 // hz
    for sport in (41000, 41001, 41002):
        t0 = time.monotonic_ns()
        assert lb.run(tcp4(flags="S", sport=sport)).retval == XDP_TX
        t1 = time.monotonic_ns()
        seen = lb.lb.conntrack_lookup(key_of(tcp4(sport=sport))).last_seen_ns
        assert t0 - 2 * tick <= seen <= t1 + 2 * tick, (t0, seen, t1, hz)
        time.sleep(0.03)


def test_tick_rate_from_two_readings():
    a = L.ClockSync(jiffies=1000, mono_ns=0)
    assert tick_rate(a, L.ClockSync(jiffies=1000 + 26, mono_ns=100_000_000)) == 250
    assert tick_rate(a, L.ClockSync(jiffies=1000 + 29, mono_ns=100_000_000)) == 300
    assert tick_rate(a, L.ClockSync(jiffies=1000 + 99, mono_ns=100_000_000)) == 1000
    assert tick_rate(a, L.ClockSync(jiffies=1000 + 5, mono_ns=100_000_000)) == 50
