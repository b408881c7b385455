"""Forwarding paths of the balancer, exact bytes: dr and nat, IPv4 and IPv6,
conntrack stickiness, SYN re-selection, nat replies, anti ping-pong, fib failures."""
from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import flow_hash
from meshlb.dataplane.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX

from .harness import RING, setup_vip, snat_port_of
from .pkt import (
    BE_BLACKHOLE4,
    BE_TX4,
    MAC_A,
    MAC_B,
    MAC_BE_REDIR,
    MAC_BE_TX,
    MAC_GW,
    SNAT4,
    VIP4,
    checksums_valid,
    key_of,
    l3,
    marked,
    rebuilt,
    tcp4,
    udp4,
    udp6,
)

pytestmark = pytest.mark.privileged


# ----------------------------------------------------------------------- dr
@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("backend,action,mac,src_mac", [
    (1, XDP_TX, MAC_BE_TX, MAC_A), (2, XDP_REDIRECT, MAC_BE_REDIR, MAC_B)])
def test_dr_forward_exact_bytes(lb, fam, backend, action, mac, src_mac):
    f = setup_vip(lb, fam, "dr", table_backend=backend)
    pkt = f["tcp"](flags="S")
    before = lb.counters()
    r = lb.run(pkt)
    assert r.retval == action
    exp = marked(pkt)
    exp[Ether].dst, exp[Ether].src = mac, src_mac
    assert r.data == rebuilt(exp)
    assert checksums_valid(r.data)
    d = lb.delta(before)
    assert d == {"rx": 1, "ct_miss": 1, "ct_insert": 1,
                 ("tx" if action == XDP_TX else "redirect"): 1}
    assert lb.lb.vip_stats(5).packets == 1 and lb.lb.vip_stats(5).bytes == len(bytes(pkt))
    assert lb.lb.backend_stats(backend).packets == 1
    ct = lb.lb.conntrack_lookup(key_of(pkt))
    assert ct is not None and ct.backend_id == backend and ct.vip_id == 5 and ct.flags == 0


def test_dr_udp_and_vlan(lb):
    f = setup_vip(lb, "v4", "dr", proto="udp", port=53)
    pkt = f["udp"]()
    r = lb.run(pkt)
    assert r.retval == XDP_TX
    exp = marked(pkt)
    exp[Ether].dst, exp[Ether].src = MAC_BE_TX, MAC_A
    assert r.data == rebuilt(exp)
    # one 802.1Q tag: balanced the same way, the tag is kept
    v = Ether(src=pkt[Ether].src, dst=MAC_A) / Dot1Q(vlan=42) / pkt[IP].copy()
    v[UDP].sport = 40001
    r = lb.run(v)
    assert r.retval == XDP_TX
    exp = marked(v)
    exp[Ether].dst, exp[Ether].src = MAC_BE_TX, MAC_A
    assert r.data == rebuilt(exp)
    assert checksums_valid(r.data)


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_local_backend_passes_unmodified(lb, fam):
    for mode in ("dr", "nat"):
        f = setup_vip(lb, fam, mode, table_backend=3)
        pkt = f["tcp"](flags="S", sport=41000 + (mode == "nat"))
        before = lb.counters()
        r = lb.run(pkt)
        assert r.retval == XDP_PASS and r.data == bytes(pkt)
        assert lb.delta(before) == {"rx": 1, "ct_miss": 1, "ct_insert": 1, "pass_local": 1}
        lb.lb.remove_vip(f["vip"], 80, "tcp")


def test_blackhole_drops_and_counts(lb):
    setup_vip(lb, "v4", "dr")
    lb.lb.set_backend(1, BE_BLACKHOLE4)
    before = lb.counters()
    r = lb.run(tcp4(flags="S"))
    assert r.retval == XDP_DROP
    d = lb.delta(before)
    assert d["drop_fib"] == 1 and d["fib_blackhole"] == 1


# ---------------------------------------------------------- anti ping-pong
@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_marked_packet_is_unmarked_and_passed_never_forwarded(lb, fam):
    f = setup_vip(lb, fam, "dr", table_backend=1)
    pkt = f["tcp"](flags="A")
    m = marked(pkt)
    before = lb.counters()
    r = lb.run(m)
    assert r.retval == XDP_PASS
    exp = pkt.copy()
    if fam == "v6":
        exp[IPv6].fl = 0
    assert r.data == rebuilt(exp)
    assert checksums_valid(r.data)
    assert lb.delta(before) == {"rx": 1, "pass_from_peer": 1}
    assert lb.lb.conntrack_count() == 0
    # the same packet forwarded by us leaves marked, so the peer will not bounce it
    r = lb.run(pkt)
    assert r.retval == XDP_TX and r.data[:len(r.data)] != bytes(pkt)
    assert rebuilt(marked(pkt).__class__(r.data)) == r.data


def test_marked_non_vip_untouched(lb):
    setup_vip(lb, "v4", "dr")
    m = marked(tcp4(dst="192.0.2.99"))
    raw = rebuilt(m)
    r = lb.run(raw)
    assert r.retval == XDP_PASS and r.data == raw


# ------------------------------------------------------- conntrack behaviour
@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_established_flow_sticks_when_table_changes(lb, fam):
    f = setup_vip(lb, fam, "dr", table_backend=1)
    syn = f["tcp"](flags="S")
    assert lb.run(syn).retval == XDP_TX
    lb.lb.set_vip_table(5, [2] * RING)
    before = lb.counters()
    r = lb.run(f["tcp"](flags="A"))
    assert r.retval == XDP_TX and Ether(r.data).dst == MAC_BE_TX
    assert lb.delta(before) == {"rx": 1, "ct_hit": 1, "tx": 1, "fib_cached": 1}
    # a new flow follows the new table
    r = lb.run(f["tcp"](flags="A", sport=40999))
    assert r.retval == XDP_REDIRECT and Ether(r.data).dst == MAC_BE_REDIR


def test_syn_reselects_reused_tuple(lb):
    setup_vip(lb, "v4", "dr", table_backend=1)
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    lb.lb.set_vip_table(5, [2] * RING)
    # the same SYN retransmitted (same sequence number) is the same connection
    before = lb.counters()
    r = lb.run(tcp4(flags="S"))
    assert r.retval == XDP_TX and lb.delta(before)["ct_hit"] == 1
    # a new connection on the tuple (another initial sequence number) starts over
    before = lb.counters()
    r = lb.run(tcp4(flags="S", seq=777777))
    assert r.retval == XDP_REDIRECT and Ether(r.data).dst == MAC_BE_REDIR
    assert lb.delta(before) == {"rx": 1, "ct_reselect": 1, "ct_insert": 1, "redirect": 1}
    # (first packet to backend 2: a real fib lookup, not the cache)
    assert lb.lb.conntrack_lookup(key_of(tcp4())).backend_id == 2
    # SYN-ACK is not a new connection: it keeps the entry
    before = lb.counters()
    assert lb.run(tcp4(flags="SA")).retval == XDP_REDIRECT
    assert lb.delta(before)["ct_hit"] == 1


def test_removed_or_down_backend_reselects(lb):
    setup_vip(lb, "v4", "dr", table_backend=1)
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    lb.lb.set_vip_table(5, [2] * RING)
    lb.lb.set_backend_down(1)
    before = lb.counters()
    r = lb.run(tcp4())
    assert r.retval == XDP_REDIRECT
    assert lb.delta(before)["ct_reselect"] == 1
    lb.lb.remove_backend(2)
    before = lb.counters()
    assert lb.run(tcp4()).retval == XDP_DROP
    assert lb.delta(before)["drop_no_backend"] == 1


def test_table_slot_is_flow_hash_mod_ring(lb):
    setup_vip(lb, "v4", "dr")
    table = [1 if i % 2 else 2 for i in range(RING)]
    lb.lb.set_vip_table(5, table)
    for sport in range(41000, 41040):
        pkt = tcp4(sport=sport, flags="S")
        want = table[flow_hash(key_of(pkt)) % RING]
        r = lb.run(pkt)
        assert Ether(r.data).dst == (MAC_BE_TX if want == 1 else MAC_BE_REDIR)


def test_no_table_and_conntrack_api(lb):
    lb.lb.add_vip(VIP4, 80, "tcp", "dr", vip_id=9, ring_size=RING)
    before = lb.counters()
    assert lb.run(tcp4()).retval == XDP_DROP
    assert lb.delta(before)["drop_no_table"] == 1
    lb.lb.set_backend(1, BE_TX4)
    lb.lb.set_vip_table(9, [1] * RING)
    assert lb.lb.vip_table(9) == [1] * RING
    for sport in range(42000, 42010):
        assert lb.run(tcp4(sport=sport)).retval == XDP_TX
    assert lb.lb.conntrack_count() == 10
    keys = [k for k, _ in lb.lb.conntrack_entries()]
    assert {L.port_host(k.sport) for k in keys} == set(range(42000, 42010))
    assert lb.lb.conntrack_delete(keys[0]) and not lb.lb.conntrack_delete(keys[0])
    assert lb.lb.conntrack_count() == 9
    assert lb.lb.conntrack_flush() == 9 and lb.lb.conntrack_count() == 0
    assert lb.lb.remove_vip(VIP4, 80, "tcp")
    assert lb.run(tcp4()).retval == XDP_PASS


# ---------------------------------------------------------------------- nat
@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_nat_forward_and_reply_exact_bytes(lb, fam, proto):
    port = 80 if proto == "tcp" else 53
    f = setup_vip(lb, fam, "nat", proto=proto, port=port, nat_port=8080)
    pkt = f[proto](flags="S") if proto == "tcp" else f[proto]()
    before = lb.counters()
    r = lb.run(pkt)
    assert r.retval == XDP_TX
    sp = snat_port_of(lb, pkt)
    assert 20000 <= sp <= 20999
    exp = pkt.copy()
    exp[Ether].dst, exp[Ether].src = MAC_BE_TX, MAC_A
    l3(exp).src, l3(exp).dst = f["snat"], f["tx"]
    l4 = exp[TCP] if proto == "tcp" else exp[UDP]
    l4.sport, l4.dport = sp, 8080
    del l4.chksum
    if fam == "v4":
        del exp[IP].chksum
    assert r.data == rebuilt(exp)
    assert checksums_valid(r.data)
    assert lb.delta(before) == {"rx": 1, "ct_miss": 1, "ct_insert": 1, "tx": 1}
    # the reply from the backend goes back to the client from the VIP
    ip_cls = IP if fam == "v4" else IPv6
    l4_rep = (TCP(sport=8080, dport=sp, flags="SA", seq=5, ack=1001) if proto == "tcp"
              else UDP(sport=8080, dport=sp))
    rep = Ether(src=MAC_BE_TX, dst=MAC_A) / ip_cls(src=f["tx"], dst=f["snat"]) / l4_rep / b"answer"
    before = lb.counters()
    r = lb.run(rep)
    assert r.retval == XDP_TX
    exp = rep.copy()
    exp[Ether].dst, exp[Ether].src = MAC_GW, MAC_A
    l3(exp).src, l3(exp).dst = f["vip"], f["client"]
    l4 = exp[TCP] if proto == "tcp" else exp[UDP]
    l4.sport, l4.dport = port, 40000
    del l4.chksum
    if fam == "v4":
        del exp[IP].chksum
    assert r.data == rebuilt(exp)
    assert checksums_valid(r.data)
    assert lb.delta(before) == {"rx": 1, "nat_reply": 1, "tx": 1}
    # second packet of the flow: conntrack hit, same SNAT port
    r = lb.run(f[proto]())
    assert r.retval == XDP_TX and snat_port_of(lb, pkt) == sp
    assert (r.data[-5:] == bytes(pkt)[-5:])


def test_nat_reply_miss_and_non_vip_pass(lb):
    setup_vip(lb, "v4", "nat", nat_port=8080)
    rep = Ether(src=MAC_BE_TX, dst=MAC_A) / IP(src=BE_TX4, dst=SNAT4) / TCP(sport=8080, dport=20001)
    before = lb.counters()
    r = lb.run(rep)
    assert r.retval == XDP_PASS and r.data == bytes(rep)
    assert lb.delta(before) == {"rx": 1, "nat_reply_miss": 1}
    other = tcp4(dst="192.0.2.1")
    before = lb.counters()
    r = lb.run(other)
    assert r.retval == XDP_PASS and r.data == bytes(other)
    assert lb.delta(before) == {"rx": 1, "pass_not_vip": 1}


def test_nat_udp_zero_checksum_rules(lb):
    f = setup_vip(lb, "v4", "nat", proto="udp", port=53, nat_port=5353)
    pkt = udp4()
    pkt[UDP].chksum = 0
    raw = bytes(pkt)
    r = lb.run(raw)
    assert r.retval == XDP_TX
    assert Ether(r.data)[UDP].chksum == 0  # IPv4 UDP without checksum stays without
    assert Ether(r.data)[IP].dst == BE_TX4 and checksums_valid(r.data)
    lb.lb.remove_vip(f["vip"], 53, "udp")
    setup_vip(lb, "v6", "nat", proto="udp", port=53, nat_port=5353)
    p6 = udp6()
    p6[UDP].chksum = 0
    before = lb.counters()
    assert lb.run(bytes(p6)).retval == XDP_DROP
    assert lb.delta(before)["drop_udp6_zero_csum"] == 1


def test_nat_udp_computed_zero_becomes_ffff(lb):
    """Engineer a payload so that the translated UDP checksum sums to zero."""
    setup_vip(lb, "v4", "nat", proto="udp", port=53, nat_port=5353)
    base = udp4(payload=b"\0\0")
    sp = 20000 + flow_hash(key_of(base)) % 1000  # first probe of snat_claim
    out = (IP(src=SNAT4, dst=BE_TX4, ttl=61, id=7) / UDP(sport=sp, dport=5353) / b"\0\0")
    c0 = IP(bytes(out))[UDP].chksum
    s0 = (~c0) & 0xFFFF  # ones' complement sum without the payload word
    word = (0xFFFF - s0) & 0xFFFF
    pkt = udp4(payload=word.to_bytes(2, "big"))
    r = lb.run(pkt)
    assert r.retval == XDP_TX
    assert snat_port_of(lb, pkt) == sp
    assert Ether(r.data)[UDP].chksum == 0xFFFF
    assert checksums_valid(r.data)


def test_nat_snat_port_exhaustion(lb):
    setup_vip(lb, "v4", "nat", nat_port=8080)
    lb.lb.set_snat(L.AF_INET, SNAT4, 20000, 20000)  # one port
    assert lb.run(tcp4(flags="S", sport=40000)).retval == XDP_TX
    before = lb.counters()
    assert lb.run(tcp4(flags="S", sport=40001)).retval == XDP_DROP
    assert lb.delta(before)["drop_snat_exhausted"] == 1
    # the first flow keeps its port, also across a SYN re-selection to the same backend
    assert lb.run(tcp4(flags="S", sport=40000)).retval == XDP_TX


def test_nat_without_snat_drops(lb):
    setup_vip(lb, "v4", "nat")
    lb.lb.clear_snat(L.AF_INET)
    before = lb.counters()
    assert lb.run(tcp4(flags="S")).retval == XDP_DROP
    assert lb.delta(before)["drop_no_snat"] == 1


def test_nat_conntrack_delete_removes_reverse_entry(lb):
    setup_vip(lb, "v4", "nat", nat_port=8080)
    pkt = tcp4(flags="S")
    assert lb.run(pkt).retval == XDP_TX
    sp = snat_port_of(lb, pkt)
    (rk, rv), = lb.lb.nat_entries()
    assert rv.orig == key_of(pkt) and L.port_host(rk.dport) == sp
    assert rk == L.flow_key(BE_TX4, 8080, SNAT4, sp, 6)  # the reply as the backend sends it
    assert lb.lb.conntrack_delete(key_of(pkt))
    assert lb.lb.nat_entries() == [] and lb.lb.conntrack_count() == 0
    rep = Ether(dst=MAC_A) / IP(src=BE_TX4, dst=SNAT4) / TCP(sport=8080, dport=sp)
    before = lb.counters()
    assert lb.run(rep).retval == XDP_PASS
    assert lb.delta(before) == {"rx": 1, "nat_reply_miss": 1}


@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("table_changed", [True, False])
def test_nat_reselection_removes_the_old_reverse_translation(lb, fam, table_changed):
    """A new connection on a nat flow's tuple gets a new SNAT port (on the backend the
    table chooses now): a late reply of the old connection's backend to the old port
    must not reach the client translated."""
    f = setup_vip(lb, fam, "nat", table_backend=1, nat_port=8080)
    syn = f["tcp"](flags="S", seq=5000, payload=b"")
    assert lb.run(syn).retval == XDP_TX
    old = snat_port_of(lb, syn)
    if table_changed:
        lb.lb.set_vip_table(5, [2] * RING)
    again = f["tcp"](flags="S", seq=900001, payload=b"")
    before = lb.counters()
    r = lb.run(again)
    assert r.retval == (XDP_REDIRECT if table_changed else XDP_TX)
    assert lb.delta(before)["ct_reselect"] == 1
    new = snat_port_of(lb, again)
    assert new != old
    be = f["redir"] if table_changed else f["tx"]
    (rk, rv), = lb.lb.nat_entries()
    assert rk == L.flow_key(be, 8080, f["snat"], new, 6) and rv.orig == key_of(syn)
    ip_cls = IP if fam == "v4" else IPv6
    late = (Ether(src=MAC_BE_TX, dst=MAC_A) / ip_cls(src=f["tx"], dst=f["snat"])
            / TCP(sport=8080, dport=old, flags="FA", seq=77, ack=5001))
    raw = rebuilt(late)
    before = lb.counters()
    r = lb.run(raw)
    assert r.retval == XDP_PASS and r.data == raw
    assert lb.delta(before) == {"rx": 1, "nat_reply_miss": 1}


# ------------------------------------------------------- flows after their close
@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_dr_segment_after_eviction_follows_old_backend_without_reinsert(lb, fam):
    f = setup_vip(lb, fam, "dr", table_backend=1)
    assert lb.run(f["tcp"](flags="S")).retval == XDP_TX
    # the table moves on, then the flow's socket closes and the agent evicts it
    lb.lb.set_vip_table(5, [2] * RING)
    assert lb.lb.conntrack_delete(key_of(f["tcp"]()))
    assert lb.lb.closed_lookup(key_of(f["tcp"]())).backend_id == 1
    # the client's last ACK: to the flow's backend, not the table's, and no new entry
    before = lb.counters()
    r = lb.run(f["tcp"](flags="A", payload=b""))
    assert r.retval == XDP_TX and Ether(r.data).dst == MAC_BE_TX
    d = lb.delta(before)
    assert d["ct_closed_hit"] == 1 and "ct_insert" not in d, d
    assert lb.lb.conntrack_count() == 0
    # a copy of the flow's own SYN that the network delayed past the close: a SYN never
    # looks for a closed flow, so the table balances it afresh; the client resets the
    # answer, and that reset (the SYN's sequence number + 1) takes the entry away again
    before = lb.counters()
    r = lb.run(f["tcp"](flags="S"))
    assert r.retval == XDP_REDIRECT and Ether(r.data).dst == MAC_BE_REDIR
    assert lb.delta(before) == {"rx": 1, "ct_miss": 1, "ct_insert": 1, "redirect": 1}
    before = lb.counters()
    assert lb.run(f["tcp"](flags="R", seq=1001, payload=b"")).retval == XDP_REDIRECT
    assert lb.delta(before)["ct_handshake_reset"] == 1
    assert lb.lb.conntrack_count() == 0
    # a SYN reusing the tuple is a new connection: the table decides and it is kept
    r = lb.run(f["tcp"](flags="S", seq=424242))
    assert r.retval == XDP_REDIRECT and lb.lb.conntrack_lookup(key_of(f["tcp"]())).backend_id == 2


def test_closed_flow_of_a_changed_vip_is_not_followed(lb):
    setup_vip(lb, "v4", "dr", table_backend=1)
    assert lb.run(tcp4(flags="S")).retval == XDP_TX
    assert lb.lb.conntrack_delete(key_of(tcp4()))
    # the VIP changes mode (a new generation): the closed entry no longer applies
    setup_vip(lb, "v4", "nat", table_backend=2, nat_port=8080)
    before = lb.counters()
    r = lb.run(tcp4(flags="A"))
    assert r.retval == XDP_PASS
    d = lb.delta(before)
    assert "ct_closed_hit" not in d and d["pass_nat_no_flow"] == 1, d


def test_nat_segment_after_close_keeps_its_snat_port(lb):
    setup_vip(lb, "v4", "nat", nat_port=8080)
    pkt = tcp4(flags="S")
    assert lb.run(pkt).retval == XDP_TX
    sp = snat_port_of(lb, pkt)
    # the backend's socket closed: its tracer names the flow as the backend saw it
    seen = L.flow_key(SNAT4, sp, BE_TX4, 8080, 6)
    assert lb.lb.nat_delete_backend_side(seen)
    assert lb.lb.conntrack_count() == 0 and lb.lb.nat_entries() == []
    before = lb.counters()
    r = lb.run(tcp4(flags="A", payload=b""))
    assert r.retval == XDP_TX, lb.delta(before)
    out = Ether(r.data)
    assert out[IP].dst == BE_TX4 and out[IP].src == SNAT4 and out[TCP].sport == sp
    assert checksums_valid(r.data)
    d = lb.delta(before)
    assert d["ct_closed_hit"] == 1 and "ct_insert" not in d and "pass_nat_no_flow" not in d, d
    assert lb.lb.conntrack_count() == 0 and lb.lb.nat_entries() == []
    assert lb.lb.conntrack_flush() == 0 and lb.lb.closed_lookup(key_of(pkt)) is None


# ------------------------------------------------------- handshakes the client reset
@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_client_reset_of_a_handshake_is_forwarded_and_forgets_the_flow(lb, fam, mode):
    f = setup_vip(lb, fam, mode, table_backend=1, **({"nat_port": 8080} if mode == "nat" else {}))
    syn = f["tcp"](flags="S", seq=5000, payload=b"")
    assert lb.run(syn).retval == XDP_TX
    k = key_of(syn)
    sp = snat_port_of(lb, syn) if mode == "nat" else None
    # resets that do not carry the SYN's sequence number + 1 (blind, or of a flow
    # that sent data): forwarded, the entry stays
    for seq in (5000, 5002, 77):
        before = lb.counters()
        assert lb.run(f["tcp"](flags="R", seq=seq, payload=b"")).retval == XDP_TX
        assert "ct_handshake_reset" not in lb.delta(before)
        assert lb.lb.conntrack_lookup(k) is not None
    # the client gave the handshake up: its reset still reaches the backend (with the
    # flow's SNAT port in nat), then neither entry is left
    before = lb.counters()
    r = lb.run(f["tcp"](flags="R", seq=5001, payload=b""))
    assert r.retval == XDP_TX and Ether(r.data).dst == MAC_BE_TX
    if mode == "nat":
        assert Ether(r.data)[TCP].sport == sp and checksums_valid(r.data)
    d = lb.delta(before)
    assert d["ct_handshake_reset"] == 1 and d["ct_hit"] == 1, d
    assert lb.lb.conntrack_lookup(k) is None and lb.lb.nat_entries() == []


# -------------------------------------------------- handshakes nobody acknowledged
def _established(lb, k) -> bool:
    return bool(lb.lb.conntrack_lookup(k).flags & L.MLB_CT_F_ESTABLISHED)


@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_entry_is_established_by_the_clients_ack_only(lb, fam, mode):
    f = setup_vip(lb, fam, mode, table_backend=1, **({"nat_port": 8080} if mode == "nat" else {}))
    k = key_of(f["tcp"](flags="S", seq=5000, payload=b""))
    assert lb.run(f["tcp"](flags="S", seq=5000, payload=b"")).retval == XDP_TX
    assert not _established(lb, k)
    # the SYN again, a reset that is not the handshake's, a SYN+ACK (not the client's):
    # none of them says the client finished its handshake
    for flags, seq in (("S", 5000), ("R", 77), ("RA", 5001 + 9), ("SA", 5000)):
        lb.run(f["tcp"](flags=flags, seq=seq, payload=b""))
        assert lb.lb.conntrack_lookup(k) is not None and not _established(lb, k), flags
    assert lb.run(f["tcp"](flags="A", seq=5001, payload=b"")).retval == XDP_TX
    assert _established(lb, k)
    lb.run(f["tcp"](flags="PA", seq=5001, payload=b"GET /"))
    ct = lb.lb.conntrack_lookup(k)
    assert ct.flags & L.MLB_CT_F_ESTABLISHED and bool(ct.flags & L.MLB_CT_F_NAT) == (mode == "nat")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_entries_not_set_up_by_a_syn_are_established(lb, proto):
    """UDP has no handshake; a dr TCP flow picked up mid-flow (after a restart of the
    map, or moved here by the router) already had one."""
    f = setup_vip(lb, "v4", "dr", proto=proto, port=80)
    pkt = f["udp"](dport=80) if proto == "udp" else f["tcp"](flags="A")
    assert lb.run(pkt).retval == XDP_TX
    assert _established(lb, key_of(pkt))


def test_stale_scan_and_expiry(lb):
    """conntrack_stale picks idle entries and unacknowledged TCP handshakes by age;
    conntrack_expire removes them with their nat reverse entries, but not an entry a
    packet touched after the scan."""
    f = setup_vip(lb, "v4", "nat", nat_port=8080)
    syns = [f["tcp"](flags="S", sport=41000 + i, seq=9000 + i, payload=b"") for i in range(3)]
    done = f["tcp"](flags="S", sport=41010, seq=7000, payload=b"")
    for p in (*syns, done):
        assert lb.run(p).retval == XDP_TX
    assert lb.run(f["tcp"](flags="A", sport=41010, seq=7001, payload=b"")).retval == XDP_TX
    now = time.monotonic_ns()
    assert lb.lb.conntrack_stale(now, 0, 0) == ([], [], [])
    idle, half, _ = lb.lb.conntrack_stale(now + 5 * 10**9, 0, 10**9)
    assert idle == [] and {L.port_host(k.sport) for k, _ in half} == {p[TCP].sport for p in syns}
    idle, half, _ = lb.lb.conntrack_stale(now + 5 * 10**9, 2 * 10**9, 10**9)
    assert len(idle) == 4 and half == []  # an idle entry is swept, whatever its state
    _, half, _ = lb.lb.conntrack_stale(now + 5 * 10**9, 0, 10**9)
    time.sleep(0.02)  # a tick of the coarse clock
    lb.run(syns[0])  # retransmitted after the scan: kept
    assert lb.lb.conntrack_expire(half) == 2
    left = {L.port_host(k.sport) for k, _ in lb.lb.conntrack_entries()}
    assert left == {syns[0][TCP].sport, 41010}
    assert len(lb.lb.nat_entries()) == 2  # the expired flows' reverse entries went too
    # nothing of an expired flow ended: no closed-flow entry for its late SYN to follow
    assert all(lb.lb.closed_lookup(k) is None for k, _ in half)
    assert lb.lb.conntrack_expire(half) == 0  # gone, or kept: nothing the second time



@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_a_closing_flow_to_a_real_server_expires_once_quiet(lb, mode):
    """No tracer reports the closes of a real server: the client's FIN or RST (in nat
    also the server's, on its way back) marks the entry closing, and the scan picks
    closing entries of the backends it is given once quiet for the closing timeout."""
    f = setup_vip(lb, "v4", mode, nat_port=8080 if mode == "nat" else 0)
    flows = {sport: f["tcp"](flags="S", sport=sport, seq=100, payload=b"") for sport in (42000, 42001, 42002, 42003)}
    for p in flows.values():
        assert lb.run(p).retval == XDP_TX
        assert lb.run(f["tcp"](flags="A", sport=p[TCP].sport, seq=101, payload=b"")).retval == XDP_TX
    closing = lambda sport: bool(lb.lb.conntrack_lookup(key_of(flows[sport])).flags & L.MLB_CT_F_CLOSING)  # noqa: E731
    assert lb.run(f["tcp"](flags="FA", sport=42000, seq=101, payload=b"")).retval == XDP_TX
    # a reset mid-flow (not the handshake's, which ends the entry at once)
    assert lb.run(f["tcp"](flags="R", sport=42001, seq=150, payload=b"")).retval == XDP_TX
    assert lb.run(f["tcp"](flags="PA", sport=42002, seq=101, payload=b"x")).retval == XDP_TX
    if mode == "nat":  # the server closes 42003: its FIN comes back through here
        sp = snat_port_of(lb, flows[42003])
        fin = Ether(src=MAC_BE_TX, dst=MAC_A) / IP(src=f["tx"], dst=f["snat"]) / TCP(sport=8080, dport=sp, flags="FA")
        assert lb.run(fin).retval == XDP_TX
    assert [closing(p) for p in sorted(flows)] == [True, True, False, mode == "nat"]
    now = time.monotonic_ns()
    _, _, none = lb.lb.conntrack_stale(now + 5 * 10**9, 0, 0, 10**9, closing_backends=[2])
    assert none == []  # not a backend without a tracer
    _, _, soon = lb.lb.conntrack_stale(now, 0, 0, 10**9, closing_backends=[1])
    assert soon == []  # not quiet long enough
    _, _, stale = lb.lb.conntrack_stale(now + 5 * 10**9, 0, 0, 10**9, closing_backends=[1])
    assert sorted(L.port_host(k.sport) for k, _ in stale) == [p for p in sorted(flows) if closing(p)]
    assert lb.lb.conntrack_expire(stale) == len(stale)
    assert {L.port_host(k.sport) for k, _ in lb.lb.conntrack_entries()} == {p for p in flows if p not in
                                                                          {L.port_host(k.sport) for k, _ in stale}}
    if mode == "nat":
        assert len(lb.lb.nat_entries()) == 4 - len(stale)


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_what_goes_to_a_real_server_carries_no_peer_mark(lb, fam):
    """A mix marks what it forwards to another mix so that it is not balanced again
    there; a real server is no mix, and gets the client's packet as it was."""
    f = setup_vip(lb, fam, "dr", table_backend=1)
    lb.lb.set_backend(1, f["tx"], external=True)
    pkt = f["tcp"](flags="S")
    r = lb.run(pkt)
    assert r.retval == XDP_TX
    exp = pkt.copy()
    exp[Ether].dst, exp[Ether].src = MAC_BE_TX, MAC_A
    assert r.data == rebuilt(exp)
    assert lb.lb.backend(1).flags & L.MLB_BE_F_EXTERNAL


# ------------------------------------------- flows another mix may hold as well
@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_peer_seen_marks_flows_another_mix_may_hold(lb, fam):
    """The agent gossips a local close only for flows another mix may hold: entries
    picked up mid-flow, or that packets from a peer reached as well."""
    f = setup_vip(lb, fam, "dr", table_backend=3)  # this node's own backend
    peer_seen = lambda k: bool(lb.lb.conntrack_lookup(k).flags & L.MLB_CT_F_PEER_SEEN)  # noqa: E731
    syn = f["tcp"](flags="S", seq=100, payload=b"")
    k = key_of(syn)
    assert lb.run(syn).retval == XDP_PASS  # local backend
    assert lb.run(f["tcp"](flags="A", seq=101, payload=b"")).retval == XDP_PASS
    assert not peer_seen(k)
    # the router moved the flow: a peer balances it now and sends it here marked
    assert lb.run(marked(f["tcp"](flags="PA", seq=101, payload=b"x"))).retval == XDP_PASS
    assert peer_seen(k)
    assert lb.run(f["tcp"](flags="A", seq=102, payload=b"")).retval == XDP_PASS
    assert peer_seen(k)  # stays
    # a flow whose first packet here is not its SYN began elsewhere
    mid = f["tcp"](flags="A", sport=40500, payload=b"")
    assert lb.run(mid).retval == XDP_PASS
    assert peer_seen(key_of(mid))
    # a marked packet of a flow this mix does not hold creates nothing
    other = marked(f["tcp"](flags="A", sport=40600, payload=b""))
    assert lb.run(other).retval == XDP_PASS
    assert lb.lb.conntrack_lookup(key_of(f["tcp"](flags="A", sport=40600, payload=b""))) is None
