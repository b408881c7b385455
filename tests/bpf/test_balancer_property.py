"""Property tests: random bytes and mutated VIP packets through the balancer.

An independent classifier (plain byte parsing below, written from the protocol
specs, not from the C) says what each packet is. The balancer may TX/REDIRECT only a
well-formed packet for a VIP (or an ICMP error about one of its flows) whose table
backend is remote, and then to the MAC of exactly that backend; everything else is
PASS or DROP with the classifier's reason.
"""
from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import flow_hash
from meshlb.dataplane.libbpf import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX

from .harness import Harness
from .pkt import (
    BE_REDIR4,
    BE_REDIR6,
    BE_TX4,
    BE_TX6,
    CLIENT_MAC,
    MAC_A,
    MAC_BE_REDIR,
    MAC_BE_TX,
    MAC_GW,
    SNAT4,
    VIP4,
    VIP6,
)

pytestmark = pytest.mark.privileged

RING = 13
# vip -> (vip_id, mode); backends: 1 TX (v4), 2 REDIRECT (v4), 3 local (v4), 4 TX (v6),
# 5 REDIR (v6), 6 local (v6)
VIPS = {
    (VIP4, 80, 6): (1, "dr"), (VIP4, 53, 17): (2, "dr"), (VIP6, 80, 6): (3, "dr"),
    (VIP6, 53, 17): (4, "dr"), (VIP4, 443, 6): (5, "nat"),
}
TABLE4 = [(1, 2, 3)[i % 3] for i in range(RING)]
TABLE6 = [(4, 5, 6)[i % 3] for i in range(RING)]
LOCAL = (3, 6)
BACKEND_MAC = {1: MAC_BE_TX, 2: MAC_BE_REDIR, 4: MAC_BE_TX, 5: MAC_BE_REDIR}
SNAT_LO, SNAT_HI = 1024, 65535


@pytest.fixture(scope="module")
def world(netns):
    h = Harness(netns)
    lb = h.lb
    lb.set_backend(1, BE_TX4, 8443)
    lb.set_backend(2, BE_REDIR4, 8443)
    lb.set_backend(3, VIP4, local=True)
    lb.set_backend(4, BE_TX6)
    lb.set_backend(5, BE_REDIR6)
    lb.set_backend(6, VIP6, local=True)
    for (addr, port, proto), (vid, mode) in VIPS.items():
        lb.add_vip(addr, port, proto, mode, vip_id=vid, ring_size=RING)
        lb.set_vip_table(vid, TABLE4 if ":" not in addr else TABLE6)
    lb.set_snat(L.AF_INET, SNAT4, SNAT_LO, SNAT_HI)
    try:
        yield h
    finally:
        h.close()


# -------------------------------------------------------------- classifier
def classify(raw: bytes, world) -> tuple[str, int | None]:
    """(reason counter name or "forward"/"local", backend id)."""
    if len(raw) < 14:
        return "pass_malformed", None
    et = struct.unpack_from("!H", raw, 12)[0]
    off = 14
    if et in (0x8100, 0x88A8):
        if len(raw) < 18:
            return "pass_malformed", None
        et = struct.unpack_from("!H", raw, 16)[0]
        off = 18
    if et == 0x0800:
        return classify4(raw, off, world)
    if et == 0x86DD:
        return classify6(raw, off, world)
    return "pass_not_ip", None


def l4_ports(raw, l4, l3_end, proto):
    if proto == 6:
        if l4 + 20 > l3_end:
            return None
        doff = (raw[l4 + 12] >> 4) * 4
        if doff < 20 or l4 + doff > l3_end:  # the header past the segment
            return None
    else:
        if l4 + 8 > l3_end:
            return None
        ulen, = struct.unpack_from("!H", raw, l4 + 4)
        if ulen < 8 or l4 + ulen > l3_end:  # a length past the datagram
            return None
    return struct.unpack_from("!HH", raw, l4)


def ipv4_options_ok(opts: bytes) -> bool:
    """RFC 791: one-byte options 0 (end) and 1 (no-op); every other is type, length >= 2
    and data, inside the header."""
    i = 0
    while i < len(opts):
        if opts[i] == 0:
            return True
        if opts[i] == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            return False
        i += opts[i + 1]
    return True


VIP_ADDRS = {a for a, _, _ in VIPS}
VIP_SLOTS = {L.vip_filter_slot(a) for a in VIP_ADDRS}
ICMP_ERRORS = {4: (1, (3, 11, 12)), 6: (58, (1, 2, 3, 4))}


def classify_icmp(raw, off, l4, l3_end, version, src, dst, marked, world):
    """An ICMP error to a VIP address about a flow of a VIP goes to the flow's backend,
    found by the packet it quotes, whose source must be that address."""
    if l4 + 8 > l3_end:
        return "pass_malformed", None
    if raw[l4] not in ICMP_ERRORS[version][1] or L.vip_filter_slot(dst) not in VIP_SLOTS:
        return "pass_unknown_l4", None
    if marked:
        return "pass_from_peer", None
    inner = l4 + 8
    if version == 4:
        if inner + 20 > l3_end or raw[inner] >> 4 != 4 or raw[inner] & 0xF < 5:
            return "pass_malformed", None
        ports = inner + (raw[inner] & 0xF) * 4
        if ports + 4 > l3_end:
            return "pass_malformed", None
        frag, = struct.unpack_from("!H", raw, inner + 6)
        isrc = str(ipaddress.IPv4Address(raw[inner + 12:inner + 16]))
        idst = str(ipaddress.IPv4Address(raw[inner + 16:inner + 20]))
        proto = raw[inner + 9]
        if frag & 0x1FFF or isrc != dst:
            return "pass_icmp_no_flow", None
    else:
        if inner + 40 > l3_end or raw[inner] >> 4 != 6:
            return "pass_malformed", None
        ports = inner + 40
        if ports + 4 > l3_end:
            return "pass_malformed", None
        isrc = str(ipaddress.IPv6Address(raw[inner + 8:inner + 24]))
        idst = str(ipaddress.IPv6Address(raw[inner + 24:inner + 40]))
        proto = raw[inner + 6]
        if isrc != dst:
            return "pass_icmp_no_flow", None
    if proto not in (6, 17):
        return "pass_icmp_no_flow", None
    vport, cport = struct.unpack_from("!HH", raw, ports)
    vip = VIPS.get((isrc, vport, proto))
    if vip is None:
        return "pass_icmp_no_flow", None
    key = L.flow_key(idst, cport, isrc, vport, proto)
    if vip[1] == "nat" and world.lb.conntrack_lookup(key) is None:
        return "pass_icmp_no_flow", None
    b = (TABLE4 if version == 4 else TABLE6)[flow_hash(key) % RING]
    return ("pass_local", b) if b in LOCAL else ("forward", b)


def classify4(raw, off, world):
    if len(raw) < off + 20:
        return "pass_malformed", None
    vihl = raw[off]
    if vihl >> 4 != 4 or vihl & 0xF < 5:
        return "pass_bad_ihl", None
    hlen = (vihl & 0xF) * 4
    tot, = struct.unpack_from("!H", raw, off + 2)
    if tot < hlen or off + tot > len(raw):
        return "pass_malformed", None
    frag, = struct.unpack_from("!H", raw, off + 6)
    if frag & 0x3FFF:
        return "pass_fragment", None
    if not ipv4_options_ok(raw[off + 20:off + hlen]):
        return "pass_malformed", None
    proto = raw[off + 9]
    src = str(ipaddress.IPv4Address(raw[off + 12:off + 16]))
    dst = str(ipaddress.IPv4Address(raw[off + 16:off + 20]))
    if proto == 1:
        return classify_icmp(raw, off, off + hlen, off + tot, 4, src, dst, frag & 0x8000, world)
    if proto not in (6, 17):
        return "pass_unknown_l4", None
    ports = l4_ports(raw, off + hlen, off + tot, proto)
    if ports is None:
        return "pass_malformed", None
    vip = VIPS.get((dst, ports[1], proto))
    if vip is None:
        if dst == SNAT4 and SNAT_LO <= ports[1] <= SNAT_HI:
            k = L.flow_key(src, ports[0], dst, ports[1], proto)
            if world.lb.maps["nat_reverse"].lookup(bytes(k)) is not None:
                return "nat_reply", None
            return "nat_reply_miss", None
        return "pass_not_vip", None
    if frag & 0x8000:
        return "pass_from_peer", None
    return table_choice(L.flow_key(src, ports[0], dst, ports[1], proto), TABLE4, vip[1],
                        raw[off + hlen + 13] if proto == 6 else None, world)


def classify6(raw, off, world=None):
    if len(raw) < off + 40:
        return "pass_malformed", None
    if raw[off] >> 4 != 6:
        return "pass_bad_ihl", None
    plen, nh = struct.unpack_from("!HB", raw, off + 4)
    l3_end = off + 40 + plen
    if plen == 0 or l3_end > len(raw):
        return "pass_malformed", None
    cur = off + 40
    for _ in range(3):
        if nh not in (0, 60):
            break
        if cur + 2 > len(raw):
            return "pass_malformed", None
        nh, hl = raw[cur], raw[cur + 1]
        cur += (hl + 1) * 8
    if nh == 44:
        return "pass_fragment", None
    if nh in (0, 60, 43):
        return "pass_v6_ext", None
    if cur > l3_end:
        return "pass_malformed", None
    src = str(ipaddress.IPv6Address(raw[off + 8:off + 24]))
    dst = str(ipaddress.IPv6Address(raw[off + 24:off + 40]))
    if nh == 58:
        marked = struct.unpack_from("!I", raw, off)[0] & 0xFFFFF == L.MLB_V6_MARK
        return classify_icmp(raw, off, cur, l3_end, 6, src, dst, marked, world)
    if nh not in (6, 17):
        return "pass_unknown_l4", None
    ports = l4_ports(raw, cur, l3_end, nh)
    if ports is None:
        return "pass_malformed", None
    vip = VIPS.get((dst, ports[1], nh))
    if vip is None:
        return "pass_not_vip", None
    if struct.unpack_from("!I", raw, off)[0] & 0xFFFFF == L.MLB_V6_MARK:
        return "pass_from_peer", None
    return table_choice(L.flow_key(src, ports[0], dst, ports[1], nh), TABLE6, vip[1],
                        raw[cur + 13] if nh == 6 else None, world)


def table_choice(key, table, mode="dr", tcp_flags=None, world=None):
    b = table[flow_hash(key) % RING]
    if b in LOCAL:
        return "pass_local", b
    # full NAT only starts TCP flows on a SYN; other segments need their entry
    if mode == "nat" and tcp_flags is not None and tcp_flags & 0x12 != 0x02:
        if world is None or world.lb.conntrack_lookup(key) is None:
            return "pass_nat_no_flow", None
    return "forward", b


# -------------------------------------------------------------- strategies
def _valid_packets():
    ports = st.integers(1, 65535)
    vlan = st.booleans()

    @st.composite
    def build(draw):
        fam = draw(st.sampled_from(["v4", "v6"]))
        (addr, port, proto), _ = draw(st.sampled_from(
            [v for v in VIPS.items() if (":" in v[0][0]) == (fam == "v6")]))
        sport = draw(ports)
        flags = draw(st.sampled_from(["S", "A", "PA", "SA", "R", "F"]))
        payload = draw(st.binary(max_size=40))
        l4 = TCP(sport=sport, dport=port, flags=flags) if proto == 6 else UDP(sport=sport,
                                                                            dport=port)
        if fam == "v4":
            src = str(ipaddress.IPv4Address(draw(st.integers(0x0A000000, 0x0AFFFFFF))))
            l3 = IP(src=src, dst=addr)
        else:
            src = str(ipaddress.IPv6Address(draw(st.integers(1, 2**64)) | (0x2001 << 112)))
            l3 = IPv6(src=src, dst=addr)
            if draw(st.booleans()):
                l3 = l3 / draw(st.sampled_from([IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()]))
        eth = Ether(src=CLIENT_MAC, dst=MAC_A)
        if draw(vlan):
            eth = eth / Dot1Q(vlan=draw(st.integers(0, 4095)))
        return bytes(eth / l3 / l4 / payload)

    return build()


@st.composite
def mutated(draw):
    raw = bytearray(draw(_valid_packets()))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend"]))
        if op == "truncate":
            raw = raw[:max(14, draw(st.integers(0, len(raw))))]
        elif op == "extend":
            raw += draw(st.binary(min_size=1, max_size=16))
        else:
            # bias towards the headers, where the interesting bytes are
            i = draw(st.integers(0, min(len(raw) - 1, 80)))
            raw[i] = draw(st.integers(0, 255)) if op == "set" else raw[i] ^ (1 << draw(
                st.integers(0, 7)))
    return bytes(raw)


def check(world, raw: bytes, *, in_hypothesis: bool = True) -> None:
    want, backend = classify(raw, world)
    if in_hypothesis:
        event(want)
    before = world.counters()
    r = world.run(raw)
    d = world.delta(before)
    if want == "forward":
        assert r.retval in (XDP_TX, XDP_REDIRECT), (want, backend, r.retval, d)
        assert r.data[:6] == bytes.fromhex(BACKEND_MAC[backend].replace(":", "")), d
        return
    if want == "nat_reply":
        assert r.retval == XDP_TX and r.data[:6] == bytes.fromhex(MAC_GW.replace(":", ""))
        return
    assert r.retval in (XDP_PASS, XDP_DROP), (want, r.retval, d)
    assert d.get(want) == 1, (want, d)
    if want.startswith("pass_") and want != "pass_from_peer":
        assert r.data == raw  # passed untouched


PROFILE = settings(max_examples=2500, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow, HealthCheck.data_too_large])


# Random bytes behind a plausible start, or none: pure noise almost never has an IP
# ethertype, so most of the budget goes to noise in the IP and L4 headers.
PREFIXES = [b"", bytes.fromhex("020000000a01" "0200000000cc" "0800"),
            bytes.fromhex("020000000a01" "0200000000cc" "0800") + b"\x45",
            bytes.fromhex("020000000a01" "0200000000cc" "86dd") + b"\x60",
            bytes.fromhex("020000000a01" "0200000000cc" "8100" "0007" "0800")]


@PROFILE
@given(raw=st.builds(lambda p, r: (p + r).ljust(14, b"\0"), st.sampled_from(PREFIXES),
                     st.binary(max_size=200)))
def test_random_bytes_never_forwarded_wrongly(world, raw):
    check(world, raw)


@PROFILE
@given(raw=mutated())
def test_mutated_vip_packets(world, raw):
    check(world, raw)


def test_classifier_sees_forwards(world):
    """The property tests are only meaningful if valid packets do get forwarded."""
    seen = set()
    for sport in range(1000, 1100):
        raw = bytes(Ether(dst=MAC_A) / IP(src="10.1.1.1", dst=VIP4) / TCP(sport=sport, dport=80))
        want, b = classify(raw, world)
        seen.add(want)
        check(world, raw, in_hypothesis=False)
    assert {"forward", "pass_local"} <= seen
