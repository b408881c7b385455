"""Batch eviction in the kernel (the meshlb_evict syscall program through
Balancer.evict_many): what each kind of key removes, what it leaves, and the
result reported per key, in batches larger than the program's slot array."""
from __future__ import annotations

import pytest

from meshlb.dataplane import layouts as L

from .harness import setup_vip, snat_port_of
from .pkt import BE_TX4, CLIENT4, SNAT4, VIP4, key_of, tcp4, tcp6

pytestmark = pytest.mark.privileged


def test_a_mixed_batch_larger_than_the_slots(lb):
    """Forward keys and backend-side keys of nat flows plus unknown ones, 320 in one
    call (two runs of the program), each key told what it removed."""
    setup_vip(lb, "v4", "nat", nat_port=8080)
    # room enough that no flow runs out of SNAT probes
    lb.lb.set_snat(L.AF_INET, SNAT4, 20000, 60000)
    flows = [tcp4(flags="S", sport=30000 + i) for i in range(200)]
    held = {}
    for pkt in flows:
        assert lb.run(pkt).retval != 0
        held[bytes(key_of(pkt))] = lb.lb.conntrack_lookup(key_of(pkt))
    assert lb.lb.conntrack_count() == 200 and len(lb.lb.nat_entries()) == 200
    forward = [bytes(key_of(p)) for p in flows[:100]]
    # the other hundred closed on their backend, named as its socket saw them
    backend = [bytes(L.flow_key(SNAT4, snat_port_of(lb, p), BE_TX4, 8080, 6)) for p in flows[100:]]
    unknown = [bytes(L.flow_key(CLIENT4, 50000 + i, "198.51.100.10", 80, 6)) for i in range(20)]
    keys = [k for trio in zip(forward, backend, unknown + [None] * 80) for k in trio if k]
    keys += forward[20:] + backend[20:]  # already gone by then: nothing the second time
    out = lb.lb.evict_many(keys)
    assert len(out) == len(keys) > L.MLB_EVICT_BATCH
    results = dict(zip(keys, out))
    for k in forward[:20]:
        result, raw = results[k]
        assert result == L.MLB_EVICT_FORWARD and L.CtValue.from_bytes(raw) == held[k]
    assert [r for r, _ in out[-160:]] == [L.MLB_EVICT_NONE] * 160
    assert all(results[k][0] == L.MLB_EVICT_BACKEND for k in backend[:20])
    assert all(results[k][0] == L.MLB_EVICT_NONE for k in unknown)
    removed = [r for r, _ in out[:-160]]
    assert removed.count(L.MLB_EVICT_FORWARD) == 100 and removed.count(L.MLB_EVICT_BACKEND) == 100
    # nothing of the 200 flows is left but what late segments need
    assert lb.lb.conntrack_count() == 0 and lb.lb.nat_entries() == []
    for k, ct in held.items():
        assert lb.lb.closed_lookup(L.FlowKey.from_bytes(k)) == ct
    assert [r for r, _ in lb.lb.evict_many(forward + backend)] == [L.MLB_EVICT_NONE] * 200


def test_dr_v6_forward_key(lb):
    setup_vip(lb, "v6", "dr", table_backend=1)
    pkt = tcp6(flags="S")
    lb.run(pkt)
    ct = lb.lb.conntrack_lookup(key_of(pkt))
    (result, raw), = lb.lb.evict_many([bytes(key_of(pkt))])
    assert result == L.MLB_EVICT_FORWARD and L.CtValue.from_bytes(raw) == ct
    assert lb.lb.conntrack_count() == 0 and lb.lb.closed_lookup(key_of(pkt)) == ct
    assert lb.lb.evict_many([]) == []


def test_a_reverse_entry_another_flow_claimed_is_kept(lb):
    setup_vip(lb, "v4", "nat", nat_port=8080)
    pkt = tcp4(flags="S")
    lb.run(pkt)
    (rk, rv), = lb.lb.nat_entries()
    other = L.flow_key(CLIENT4, 41234, VIP4, 80, 6)
    rv.orig = other
    lb.lb.maps["nat_reverse"].update(bytes(rk), bytes(rv))
    assert lb.lb.conntrack_delete(key_of(pkt))
    assert lb.lb.nat_entries() == [(rk, rv)]


def test_a_backend_side_close_leaves_a_newer_connection_on_the_tuple(lb):
    """The client reused its port and the new connection got another SNAT port: the
    old connection's close removes its reverse entry only."""
    setup_vip(lb, "v4", "nat", nat_port=8080)
    pkt = tcp4(flags="S")
    lb.run(pkt)
    sp = snat_port_of(lb, pkt)
    ct = lb.lb.conntrack_lookup(key_of(pkt))
    ct.snat_port = L.port_be(sp + 1 if sp < 20999 else sp - 1)
    lb.lb.maps["conntrack"].update(bytes(key_of(pkt)), bytes(ct))
    seen = L.flow_key(SNAT4, sp, BE_TX4, 8080, 6)
    assert lb.lb.nat_delete_backend_side(seen)
    assert lb.lb.nat_entries() == [] and lb.lb.conntrack_lookup(key_of(pkt)) == ct
    assert lb.lb.closed_lookup(key_of(pkt)) is None


def test_op_forces_how_a_key_is_read(lb):
    setup_vip(lb, "v4", "dr", table_backend=1)
    pkt = tcp4(flags="S")
    lb.run(pkt)
    k = bytes(key_of(pkt))
    assert lb.lb.evict_many([k], L.MLB_EVICT_OP_BACKEND) == [(L.MLB_EVICT_NONE, bytes(32))]
    assert lb.lb.conntrack_count() == 1
    # a forward key whose VIP is gone is still a forward key when told so
    lb.lb.remove_vip(VIP4, 80, "tcp")
    assert lb.lb.evict_many([k])[0][0] == L.MLB_EVICT_NONE
    assert lb.lb.evict_many([k], L.MLB_EVICT_OP_FORWARD)[0][0] == L.MLB_EVICT_FORWARD


def test_expiry_removes_an_entry_as_scanned_only(lb):
    """OP_EXPIRE (conntrack_expire): the entry goes, with its nat reverse entry and
    not into ct_closed, only while it is what the scan read; an entry whose time or
    flags moved on is kept, and a reverse entry another flow claimed stays."""
    setup_vip(lb, "v4", "nat", nat_port=8080)
    pkts = [tcp4(flags="S", sport=32000 + i, seq=100 + i) for i in range(3)]
    for pkt in pkts:
        lb.run(pkt)
    scanned = [(key_of(p), lb.lb.conntrack_lookup(key_of(p))) for p in pkts]
    touched = L.CtValue.from_bytes(bytes(scanned[1][1]))
    touched.last_seen_ns -= 1  # a packet came after the scan
    established = L.CtValue.from_bytes(bytes(scanned[2][1]))
    established.flags |= L.MLB_CT_F_ESTABLISHED  # the scan saw it before the client's ACK
    rev = dict((rv.orig, rk) for rk, rv in lb.lb.nat_entries())
    assert lb.lb.conntrack_expire([scanned[0], (scanned[1][0], touched),
                                   (scanned[2][0], established)]) == 1
    assert lb.lb.conntrack_lookup(scanned[0][0]) is None
    assert lb.lb.closed_lookup(scanned[0][0]) is None
    assert {rv.orig for _, rv in lb.lb.nat_entries()} == {scanned[1][0], scanned[2][0]}
    # the reverse entry of the next one was since claimed by another flow: it stays
    rk = rev[scanned[1][0]]
    other = L.NatRevValue(orig=L.flow_key(CLIENT4, 41234, VIP4, 80, 6), last_seen_ns=1)
    lb.lb.maps["nat_reverse"].update(bytes(rk), bytes(other))
    assert lb.lb.conntrack_expire([scanned[1]]) == 1
    assert lb.lb.conntrack_lookup(scanned[1][0]) is None
    assert (rk, other) in lb.lb.nat_entries()
    with pytest.raises(ValueError, match="conntrack_expire"):
        lb.lb.evict_many([bytes(scanned[2][0])], L.MLB_EVICT_OP_EXPIRE)


def test_keys_of_the_wrong_size_are_refused(lb):
    with pytest.raises(ValueError, match="40 bytes"):
        lb.lb.evict_many([bytes(39)])
    with pytest.raises(ValueError, match="runs once"):
        lb.lb.obj.program("meshlb_evict").test_run(repeat=5)
