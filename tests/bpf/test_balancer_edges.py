"""The balancer at the edges, exact bytes: packets too big for the path to their
backend (answered with ICMP fragmentation-needed / packet-too-big), ICMP errors about
a VIP flow (sent on to the flow's backend), next hops without a neighbour entry
(handed to the tc program, or dropped, never passed to the stack), inconsistent
headers (malformed, never forwarded), backends of another address family (refused).
Nothing meant for a remote backend may reach this host's stack: the VIP is local
there (dr), a translated packet a martian (nat)."""
from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import checksum

from meshlb.dataplane import layouts as L
from meshlb.dataplane.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX

from .harness import RING, setup_vip, snat_port_of
from .pkt import (
    CLIENT_MAC,
    MAC_A,
    MAC_BE_TX,
    MAC_GW,
    SMALL_MTU,
    VIP4,
    key_of,
    l3,
    marked,
    rebuilt,
    tcp4,
    udp4,
)

pytestmark = pytest.mark.privileged

ROUTER4, ROUTER6 = "192.0.2.254", "2001:db8:e::fe"  # a router on the way to the client
BIG = b"x" * 1400  # with its headers, more than SMALL_MTU


def too_big_answer(sent: bytes, mtu: int) -> bytes:
    """What a router sends back for a packet too big for its next hop: from the
    address the packet was for, to its sender, quoting as much of it as RFC 1812 (576
    bytes in all) or RFC 4443 (1280) allows, rounded down to 4 bytes."""
    eth = Ether(sent)
    ip = sent[14:]
    if eth.type == 0x0800:
        q = min(len(ip), 548) & ~3
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + ip[:q]
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        out = (Ether(dst=eth.src, src=eth.dst) /
               IP(src=eth[IP].dst, dst=eth[IP].src, tos=0xC0, id=0, flags=0, ttl=64, proto=1) /
               Raw(icmp))
    else:
        q = min(len(ip), 1232) & ~3
        out = (Ether(dst=eth.src, src=eth.dst) /
               IPv6(src=eth[IPv6].dst, dst=eth[IPv6].src, hlim=64) /
               ICMPv6PacketTooBig(mtu=mtu) / Raw(ip[:q]))
    return rebuilt(out)


def router_error(fam: str, f: dict, inner: bytes, mtu: int = 1200) -> bytes:
    """A router's fragmentation-needed / packet-too-big about a packet (inner, from
    its IP header on) that left from the VIP, sent to the VIP."""
    if fam == "v4":
        q = inner[:548]
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + q
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        pkt = (Ether(src=MAC_GW, dst=MAC_A) / IP(src=ROUTER4, dst=f["vip"], ttl=62, id=5, proto=1) /
               Raw(icmp))
    else:
        pkt = (Ether(src=MAC_GW, dst=MAC_A) / IPv6(src=ROUTER6, dst=f["vip"], hlim=62) /
               ICMPv6PacketTooBig(mtu=mtu) / Raw(inner[:1232]))
    return rebuilt(pkt)


def reply_from(fam: str, src: str, sport: int, dst: str, dport: int) -> bytes:
    """A data segment as a server sends it (IP header on), full size."""
    ip = IP(src=src, dst=dst, ttl=60, id=9) if fam == "v4" else IPv6(src=src, dst=dst, hlim=60)
    return bytes(ip / TCP(sport=sport, dport=dport, flags="PA", seq=2000, ack=1001) / BIG)


def expect(lb, pkt, action, counters=None, data=None):
    raw = bytes(pkt)
    before = lb.counters()
    r = lb.run(raw)
    d = lb.delta(before)
    assert r.retval == action, (r.retval, d)
    if counters is not None:
        assert d == {"rx": 1, **counters}, d
    if data is not None:
        assert r.data == data, (Ether(r.data).show(dump=True), Ether(data).show(dump=True))
    return r


def handoff_on(lb, netns):
    lb.lb.maps["neigh_handoff"].update(struct.pack("=I", netns.ifindex_a), struct.pack("=I", 1))


def neigh_meta(ifindex: int, family: int, nh: str) -> bytes:
    m = L.NeighMeta(magic=L.MLB_NEIGH_META_MAGIC, ifindex=ifindex, family=family)
    m.nh[:] = L.addr_words(nh)[1]
    return bytes(m)


# ------------------------------------------------------------- too big for the path
@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_too_big_for_the_backend_path_is_answered_with_icmp(lb, fam, mode):
    """A DF packet bigger than the path to its backend: an ICMP error from the VIP back
    to the client, quoting the packet as the client sent it (in nat, untranslated)."""
    f = setup_vip(lb, fam, mode, table_backend=6, **({"nat_port": 8080} if mode == "nat" else {}))
    assert lb.run(f["tcp"](flags="S", payload=b"")).retval == XDP_TX  # fits: forwarded
    big = f["tcp"](flags="PA", payload=BIG)
    if fam == "v4":
        big[IP].flags = "DF"
    sent = rebuilt(big)
    expect(lb, sent, XDP_TX, {"ct_hit": 1, "fib_frag_needed": 1, "icmp_too_big": 1},
           data=too_big_answer(sent, SMALL_MTU))
    if mode == "nat":
        assert len(lb.lb.nat_entries()) == 1  # the flow goes on as it was


@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_too_big_without_df_is_dropped_never_passed(lb, mode):
    """IPv4 without DF would be fragmented by a router; XDP cannot, and the stack would
    take the packet as its own (dr) or drop it as a martian (nat)."""
    setup_vip(lb, "v4", mode, table_backend=6, **({"nat_port": 8080} if mode == "nat" else {}))
    assert lb.run(tcp4(flags="S", payload=b"")).retval == XDP_TX
    big = tcp4(flags="PA", payload=BIG)
    big[IP].flags = 0
    expect(lb, rebuilt(big), XDP_DROP, {"ct_hit": 1, "fib_frag_needed": 1, "drop_too_big": 1})


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_nat_reply_too_big_for_the_client_path_is_answered_to_the_backend(lb, fam):
    """The reply of a nat backend, too big for the path back to its client: the error
    goes to the backend, from the SNAT address it sent to, quoting what it sent."""
    f = setup_vip(lb, fam, "nat", table_backend=1, nat_port=8080)
    syn = f["tcp"](src=f["client_small"], flags="S", payload=b"")
    assert lb.run(syn).retval == XDP_TX
    sp = snat_port_of(lb, syn)
    rep = (Ether(src=MAC_BE_TX, dst=MAC_A, type=0x0800 if fam == "v4" else 0x86DD) /
           Raw(reply_from(fam, f["tx"], 8080, f["snat"], sp)))
    sent = bytes(rep)
    if fam == "v4":
        e = Ether(sent)
        e[IP].flags = "DF"
        sent = rebuilt(e)
    expect(lb, sent, XDP_TX, {"nat_reply": 1, "fib_frag_needed": 1, "icmp_too_big": 1},
           data=too_big_answer(sent, SMALL_MTU))
    assert lb.lb.backend_stats(1).packets >= 1


# --------------------------------------------------------- ICMP errors about a flow
@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_icmp_error_about_a_dr_flow_goes_to_its_backend(lb, fam):
    """A router on the way to the client tells the VIP the backend's replies are too big
    (dr: the backend sends them from the VIP): the error is for the backend's socket.
    It goes where the flow's packets go, marked like them, even after the table moved
    on; a flow without an entry goes where the table sends it."""
    f = setup_vip(lb, fam, "dr", table_backend=1)
    assert lb.run(f["tcp"](flags="S", payload=b"")).retval == XDP_TX
    lb.lb.set_vip_table(5, [2] * RING)
    err = router_error(fam, f, reply_from(fam, f["vip"], 80, f["client"], 40000))
    out = marked(Ether(err))
    out[Ether].dst, out[Ether].src = MAC_BE_TX, MAC_A
    expect(lb, err, XDP_TX, {"icmp_to_backend": 1, "tx": 1, "fib_cached": 1}, data=rebuilt(out))
    # nothing of the flow changed: an error is not a packet of the flow
    assert lb.lb.conntrack_lookup(key_of(f["tcp"]())).backend_id == 1
    err = router_error(fam, f, reply_from(fam, f["vip"], 80, f["client"], 40777))
    r = expect(lb, err, XDP_REDIRECT, {"icmp_to_backend": 1, "redirect": 1})
    assert Ether(r.data).dst == "02:00:00:00:0b:02"
    assert lb.lb.conntrack_count() == 1


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_icmp_error_about_a_nat_flow_is_translated_for_its_backend(lb, fam):
    """In nat the backend knows the flow as (itself -> SNAT address:port): the error
    reaches it from the SNAT address, quoting the packet as it sent it, every checksum
    as if the router had sent it there."""
    f = setup_vip(lb, fam, "nat", table_backend=1, nat_port=8080)
    syn = f["tcp"](flags="S", payload=b"")
    assert lb.run(syn).retval == XDP_TX
    sp = snat_port_of(lb, syn)
    err = router_error(fam, f, reply_from(fam, f["vip"], 80, f["client"], 40000), mtu=1200)
    as_sent = reply_from(fam, f["tx"], 8080, f["snat"], sp)
    if fam == "v4":
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, 1200) + as_sent[:548]
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        want = (Ether(dst=MAC_BE_TX, src=MAC_A) / IP(src=f["snat"], dst=f["tx"], ttl=62, id=5, proto=1)
                / Raw(icmp))
    else:
        want = (Ether(dst=MAC_BE_TX, src=MAC_A) / IPv6(src=f["snat"], dst=f["tx"], hlim=62) /
                ICMPv6PacketTooBig(mtu=1200) / Raw(as_sent[:1232]))
    expect(lb, err, XDP_TX, {"icmp_to_backend": 1, "tx": 1, "fib_cached": 1}, data=rebuilt(want))


def test_icmp_errors_that_concern_no_flow_here(lb):
    f = setup_vip(lb, "v4", "nat", table_backend=1, nat_port=8080)
    # a nat flow this mix does not hold: no SNAT port to translate to, the stack has it
    err = router_error("v4", f, reply_from("v4", VIP4, 80, f["client"], 40000))
    expect(lb, err, XDP_PASS, {"pass_icmp_no_flow": 1}, data=err)
    # a port no VIP has
    err = router_error("v4", f, reply_from("v4", VIP4, 81, f["client"], 40000))
    expect(lb, err, XDP_PASS, {"pass_icmp_no_flow": 1}, data=err)
    # quoting a packet that did not leave from the address the error is sent to
    err = router_error("v4", f, reply_from("v4", "203.0.113.99", 80, f["client"], 40000))
    expect(lb, err, XDP_PASS, {"pass_icmp_no_flow": 1}, data=err)
    # truncated before the ports
    short = Ether(err)
    short = rebuilt(Ether(src=MAC_GW, dst=MAC_A) / IP(src=ROUTER4, dst=VIP4, proto=1) /
                    Raw(struct.pack("!BBHHH", 3, 4, 0, 0, 1200) + bytes(short[Raw])[8:8 + 22]))
    expect(lb, short, XDP_PASS, {"pass_malformed": 1}, data=short)


def test_icmp_error_a_peer_sent_on_is_unmarked_and_passed(lb):
    f = setup_vip(lb, "v4", "dr", table_backend=3)
    err = router_error("v4", f, reply_from("v4", VIP4, 80, f["client"], 40000))
    expect(lb, rebuilt(marked(Ether(err))), XDP_PASS, {"pass_from_peer": 1}, data=err)
    # this mix's own backend: its stack takes the error, as it takes the flow
    expect(lb, err, XDP_PASS, {"icmp_to_backend": 1, "pass_local": 1}, data=err)


# --------------------------------------------------------------- unknown neighbour
@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_unknown_neighbour_is_handed_to_tc_or_dropped_never_passed(lb, netns, fam, mode):
    """Without a neighbour entry for the backend: with the tc program on the device, the
    packet goes up ready to leave (marked, or translated) with its next hop in its
    metadata; without, it is dropped. Either way the next hop is noted for the agent,
    and the local stack never sees the packet as its own."""
    f = setup_vip(lb, fam, mode, table_backend=4, **({"nat_port": 8080} if mode == "nat" else {}))
    syn = f["tcp"](flags="S", payload=b"")
    expect(lb, syn, XDP_DROP)
    seen, = lb.lb.unresolved_neighbours()
    assert seen["addr"] == f["noneigh"] and seen["ifindex"] == netns.ifindex_a
    assert seen["packets"] == 1
    handoff_on(lb, netns)
    before = lb.counters()
    r = lb.run(syn)
    assert r.retval == XDP_PASS
    d = lb.delta(before)
    assert d["pass_neigh_resolve"] == 1 and d["fib_no_neigh"] == 1 and "tx" not in d, d
    if mode == "dr":
        out = marked(syn)
    else:
        out = syn.copy()
        l3(out).src, l3(out).dst = f["snat"], f["noneigh"]
        out[TCP].sport, out[TCP].dport = snat_port_of(lb, syn), 8080
        del out[TCP].chksum
        if fam == "v4":
            del out[IP].chksum
    meta = neigh_meta(netns.ifindex_a, f["af"], f["noneigh"])
    assert r.data == meta + rebuilt(out)
    assert lb.lb.unresolved_neighbours(clear=True)[0]["packets"] == 2
    assert lb.lb.unresolved_neighbours() == []


def test_neighbour_handoff_attaches_the_tc_program(lb, netns):
    link = netns.run(lambda: lb.lb.neighbour_handoff(netns.ifindex_a))
    try:
        assert link.info()["prog_id"] == lb.lb.obj.program("meshlb_neigh").id
        assert lb.lb.maps["neigh_handoff"].lookup(struct.pack("=I", netns.ifindex_a))
        lb.lb.neighbour_handoff_off(netns.ifindex_a)
        assert lb.lb.maps["neigh_handoff"].lookup(struct.pack("=I", netns.ifindex_a)) is None
    finally:
        netns.run(link.detach)
        link.close()


def test_a_vlan_tagged_packet_is_not_handed_over(lb, netns):
    """bpf_redirect_neigh writes a plain Ethernet header: the tag would be lost."""
    from scapy.layers.l2 import Dot1Q
    setup_vip(lb, "v4", "dr", table_backend=4)
    handoff_on(lb, netns)
    pkt = Ether(src=CLIENT_MAC, dst=MAC_A) / Dot1Q(vlan=7) / tcp4(flags="S")[IP]
    expect(lb, pkt, XDP_DROP, {"ct_miss": 1, "ct_insert": 1, "fib_no_neigh": 1, "drop_no_neigh": 1})


# ----------------------------------------------------------- inconsistent headers
def with_ip_options(pkt, opts: bytes) -> bytes:
    raw = bytearray(rebuilt(pkt))
    ip = raw[14:34]
    ip[0] = 0x40 | (5 + len(opts) // 4)
    body = raw[34:]
    hdr = bytearray(bytes(ip) + opts)
    struct.pack_into("!H", hdr, 2, len(hdr) + len(body))
    struct.pack_into("!H", hdr, 10, 0)
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return bytes(raw[:14] + hdr + body)


@pytest.mark.parametrize("opts", [
    b"\x07\x20\x04\x00",           # record route claiming 32 bytes in a 4-byte option area
    b"\x07\x01\x00\x00",           # a length below 2
    b"\x01\x01\x01\x44",           # a timestamp option whose length byte is past the header
    b"\x01\x94\x08\x00\x00\x00\x00\x00",  # router alert claiming 8 bytes where 7 are left
])
def test_ipv4_option_running_past_the_header_is_malformed(lb, opts):
    setup_vip(lb, "v4", "dr", table_backend=1)
    raw = with_ip_options(tcp4(), opts)
    expect(lb, raw, XDP_PASS, {"pass_malformed": 1}, data=raw)


@pytest.mark.parametrize("opts", [b"\x01\x01\x01\x00", b"\x94\x04\x00\x00", b"\x00\x00\x00\x00",
                                  b"\x07\x07\x04" + bytes(4) + b"\x00",
                                  b"\x01\x94\x06\x00\x00\x00\x00\x00"])
def test_ipv4_options_that_fit_are_forwarded(lb, opts):
    setup_vip(lb, "v4", "dr", table_backend=1)
    raw = with_ip_options(tcp4(), opts)
    r = expect(lb, raw, XDP_TX)
    assert r.data[14:] != raw[14:] and Ether(r.data)[TCP].sport == 40000


def test_tcp_data_offset_past_the_packet_is_malformed(lb):
    setup_vip(lb, "v4", "dr", table_backend=1)
    for doff in (6, 15):
        raw = rebuilt(tcp4(payload=b"abc"))
        b = bytearray(raw)
        b[14 + 20 + 12] = doff << 4  # 24 or 60 bytes of header in a 23-byte segment
        expect(lb, bytes(b), XDP_PASS, {"pass_malformed": 1}, data=bytes(b))
    fits = rebuilt(tcp4(payload=b"abcd"))
    b = bytearray(fits)
    b[14 + 20 + 12] = 6 << 4  # 24 bytes: the header ends where the segment does
    expect(lb, bytes(b), XDP_TX)


def test_udp_length_larger_than_the_datagram_is_malformed(lb):
    setup_vip(lb, "v4", "dr", proto="udp", port=53, table_backend=1)
    for ulen in (100, 14, 7, 0):
        pkt = udp4(payload=b"query")
        pkt[UDP].len = ulen
        raw = rebuilt(pkt)
        expect(lb, raw, XDP_PASS, {"pass_malformed": 1}, data=raw)
    pkt = udp4(payload=b"query")
    pkt[UDP].len = 8 + 3  # shorter than the datagram: the rest is padding, as Linux takes it
    expect(lb, rebuilt(pkt), XDP_TX)


# ------------------------------------------------------- a backend of another family
def test_a_backend_of_another_family_is_refused_whatever_wrote_the_table(lb):
    f = setup_vip(lb, "v4", "dr", table_backend=1)
    assert lb.run(f["tcp"](flags="S")).retval == XDP_TX
    # backend 1's slot rewritten behind the API's back: an IPv6 address, its first word
    # a perfectly routable IPv4 address if read as one
    b = L.Backend(family=L.AF_INET6, flags=L.MLB_BE_F_VALID)
    b.addr[:] = L.addr_words("a0a:2::1")[1]
    lb.lb.maps["backends"].update(struct.pack("=I", 1), bytes(b))
    expect(lb, f["tcp"](), XDP_DROP, {"ct_reselect": 1, "drop_backend_family": 1})
    expect(lb, f["tcp"](sport=40999, flags="S"), XDP_DROP, {"ct_miss": 1, "drop_backend_family": 1})
    # an ICMP error about the flow is not sent there either
    err = router_error("v4", f, reply_from("v4", VIP4, 80, f["client"], 40000))
    expect(lb, err, XDP_PASS, {"pass_icmp_no_flow": 1}, data=err)


def test_the_agents_handoff_survives_a_restart(netns):
    """ensure_neighbour_handoff pins the tc link beside the maps; the next load moves
    that link to its own program (no moment without one) and hands packets over again."""
    import os
    import shutil

    from .harness import PID, Harness
    pin = f"/sys/fs/bpf/mlbneigh{PID}"
    try:
        h = Harness(netns, pin_dir=pin)
        link = netns.run(lambda: h.lb.ensure_neighbour_handoff(netns.ifindex_a))
        first = link.info()["id"]
        assert os.path.exists(f"{pin}/neigh_link")
        link.close()
        h.close()
        h = Harness(netns, pin_dir=pin)
        link = netns.run(lambda: h.lb.ensure_neighbour_handoff(netns.ifindex_a))
        assert link.info()["id"] == first
        assert link.info()["prog_id"] == h.lb.obj.program("meshlb_neigh").id
        setup_vip(h, "v4", "dr", table_backend=4)
        assert h.run(tcp4(flags="S")).retval == XDP_PASS  # handed over, not dropped
        h.lb.unpin()
        link.close()  # unpinned and closed: detached
        h.close()
        assert not os.path.exists(f"{pin}/neigh_link")
    finally:
        shutil.rmtree(pin, ignore_errors=True)


def test_soliciting_unresolved_next_hops(lb, netns):
    """Without the tc program: the agent has the kernel resolve what was dropped."""
    import subprocess
    f = setup_vip(lb, "v4", "dr", table_backend=4)
    expect(lb, f["tcp"](flags="S"), XDP_DROP)
    assert netns.run(lb.lb.solicit_unresolved) == [f["noneigh"]]
    out = subprocess.run(["ip", "-n", netns.name, "neigh", "show", f["noneigh"]],
                         capture_output=True, text=True).stdout
    assert f["noneigh"] in out  # resolution under way (nobody answers in this netns)
    assert lb.lb.unresolved_neighbours() == []
