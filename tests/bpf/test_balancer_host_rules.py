"""Behaviour an application host needs from the balancer: a refused fib lookup is
visible, closing packets stay out of conntrack, and a VIP whose table has no backend
drops and counts."""
from __future__ import annotations

import pytest

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import NO_BACKEND
from meshlb.dataplane.libbpf import XDP_DROP, XDP_PASS, XDP_TX

from .pkt import BE_TX4, SNAT4, VIP4, key_of, tcp4

pytestmark = pytest.mark.privileged
RING = 11


def dr_vip(lb, table):
    lb.lb.add_vip(VIP4, 80, "tcp", "dr", vip_id=3, ring_size=RING)
    lb.lb.set_backend(1, BE_TX4)
    lb.lb.set_vip_table(3, table)


@pytest.fixture
def forwarding_off(netns):
    keys = ("net/ipv4/conf/all/forwarding", f"net/ipv4/conf/{netns.a}/forwarding")

    def set_all(value):
        def op():
            # read everything first: writing "all" also rewrites every device
            old = []
            for k in keys:
                with open(f"/proc/sys/{k}") as f:
                    old.append(f.read().strip())
            for k in keys:
                with open(f"/proc/sys/{k}", "w") as f:
                    f.write(value)
            return old
        return netns.run(op)

    old = set_all("0")
    try:
        yield
    finally:
        def restore():
            for k, v in zip(keys, old):
                with open(f"/proc/sys/{k}", "w") as f:
                    f.write(v)
        netns.run(restore)


def test_forwarding_off_on_the_ingress_device_is_counted_and_dropped(lb, forwarding_off):
    """bpf_fib_lookup refuses to route for a device without forwarding (the agent turns
    it on for its interface): counted by its code, and dropped, never passed to the
    local stack, where the VIP is local and the stack would answer for another backend."""
    dr_vip(lb, [1] * RING)
    lb.lb.flush_fib_cache()
    before = lb.counters()
    r = lb.run(tcp4(flags="S"))
    assert r.retval == XDP_DROP
    d = lb.delta(before)
    assert d.get("fib_fwd_disabled") == 1 and d.get("drop_fib_other") == 1, d


@pytest.mark.parametrize("flags", ["FA", "R", "RA"])
def test_closing_packet_of_an_unknown_flow_is_forwarded_not_remembered(lb, flags):
    dr_vip(lb, [1] * RING)
    pkt = tcp4(flags=flags, sport=41000)
    before = lb.counters()
    assert lb.run(pkt).retval == XDP_TX
    d = lb.delta(before)
    assert d.get("ct_skip_closing") == 1 and "ct_insert" not in d, d
    assert lb.lb.conntrack_lookup(key_of(pkt)) is None


def test_known_flow_still_follows_its_entry_on_fin(lb):
    dr_vip(lb, [1] * RING)
    assert lb.run(tcp4(flags="S", sport=41001)).retval == XDP_TX
    before = lb.counters()
    assert lb.run(tcp4(flags="FA", sport=41001)).retval == XDP_TX
    assert lb.delta(before).get("ct_hit") == 1


def test_table_without_backends_drops_and_counts(lb):
    dr_vip(lb, [NO_BACKEND] * RING)
    before = lb.counters()
    assert lb.run(tcp4(flags="S", sport=41002)).retval == XDP_DROP
    assert lb.delta(before).get("drop_no_backend") == 1
    assert set(lb.lb.vip_table(3)) == {NO_BACKEND}
    assert L.Counter.DROP_NO_BACKEND.name.lower() in lb.lb.counters()


@pytest.mark.parametrize("flags", ["A", "FA", "R", "PA"])
def test_nat_segment_without_its_flow_goes_to_the_stack(lb, flags):
    """Full NAT cannot translate a mid-flow TCP segment it has no entry for (a fresh
    SNAT port would mean nothing to the backend): the local stack answers it."""
    lb.lb.add_vip(VIP4, 80, "tcp", "nat", vip_id=4, ring_size=RING)
    lb.lb.set_backend(1, BE_TX4, 8080)
    lb.lb.set_vip_table(4, [1] * RING)
    lb.lb.set_snat(L.AF_INET, SNAT4, 30000, 30999)
    pkt = tcp4(flags=flags, sport=42000)
    before = lb.counters()
    r = lb.run(pkt)
    d = lb.delta(before)
    assert r.retval == XDP_PASS and d.get("pass_nat_no_flow") == 1 and "ct_insert" not in d, d
    assert r.data == bytes(pkt)
    assert lb.lb.conntrack_lookup(key_of(pkt)) is None and lb.lb.nat_entries() == []
    assert lb.run(tcp4(flags="S", sport=42000)).retval == XDP_TX
