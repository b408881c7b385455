"""Malformed, unusual and not-for-us packets: PASS (or DROP), never TX/REDIRECT,
each with its own reason counter."""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPOption
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether

from meshlb.dataplane.libbpf import XDP_PASS, XDP_TX, BpfError

from .pkt import (
    BE_TX4,
    BE_TX6,
    CLIENT_MAC,
    MAC_A,
    MAC_BE_TX,
    VIP4,
    VIP6,
    checksums_valid,
    tcp4,
    tcp6,
    udp4,
    udp6,
)

pytestmark = pytest.mark.privileged

RING = 7


@pytest.fixture
def dr(lb):
    lb.lb.add_vip(VIP4, 80, "tcp", "dr", vip_id=1, ring_size=RING)
    lb.lb.add_vip(VIP4, 53, "udp", "dr", vip_id=2, ring_size=RING)
    lb.lb.add_vip(VIP6, 80, "tcp", "dr", vip_id=3, ring_size=RING)
    lb.lb.add_vip(VIP6, 53, "udp", "dr", vip_id=4, ring_size=RING)
    lb.lb.set_backend(1, BE_TX4)
    lb.lb.set_backend(2, BE_TX6)
    for vid, be in ((1, 1), (2, 1), (3, 2), (4, 2)):
        lb.lb.set_vip_table(vid, [be] * RING)
    return lb


def expect_pass(lb, raw, reason):
    raw = bytes(raw)
    before = lb.counters()
    r = lb.run(raw)
    d = lb.delta(before)
    assert r.retval == XDP_PASS, (reason, r.retval)
    assert r.data == raw
    assert d == {"rx": 1, reason: 1}, d


VALID = {
    "tcp4": lambda: tcp4(), "udp4": lambda: udp4(), "tcp6": lambda: tcp6(),
    "udp6": lambda: udp6(),
    "vlan4": lambda: Ether(src=CLIENT_MAC, dst=MAC_A) / Dot1Q(vlan=7) / tcp4()[IP],
    "vlan6": lambda: Ether(src=CLIENT_MAC, dst=MAC_A) / Dot1Q(vlan=7) / udp6()[IPv6],
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_truncated_at_every_byte(dr, kind):
    full = bytes(VALID[kind]())
    r = dr.run(full)
    assert r.retval == XDP_TX  # the whole packet is balanced...
    for n in range(14, len(full)):  # ...no prefix of it is
        expect_pass(dr, full[:n], "pass_malformed")


def test_shorter_than_ethernet_is_rejected_by_the_kernel(dr):
    with pytest.raises(BpfError):
        dr.run(bytes(tcp4())[:13])


@pytest.mark.parametrize("ihl", [0, 1, 2, 3, 4])
def test_bad_ihl(dr, ihl):
    expect_pass(dr, tcp4(ihl=ihl), "pass_bad_ihl")


def test_wrong_ip_version(dr):
    raw = bytearray(bytes(tcp4()))
    raw[14] = (6 << 4) | 5
    expect_pass(dr, raw, "pass_bad_ihl")
    raw = bytearray(bytes(tcp6()))
    raw[14] = (4 << 4) | (raw[14] & 0xF)
    expect_pass(dr, raw, "pass_bad_ihl")


@pytest.mark.parametrize("nopts", [1, 4, 10])
def test_ipv4_options_are_skipped_by_ihl(dr, nopts):
    pkt = tcp4(options=[IPOption(b"\x01" * 4)] * nopts)
    assert pkt[IP].ihl is None and len(bytes(pkt[IP])) > 20
    r = dr.run(pkt)
    assert r.retval == XDP_TX
    out = Ether(r.data)
    assert out.dst == MAC_BE_TX and out[IP].ihl == 5 + nopts
    assert out[TCP].sport == 40000 and out[TCP].dport == 80 and checksums_valid(r.data)


def test_ihl_beyond_packet_and_tot_len_inconsistent(dr):
    raw = bytearray(bytes(tcp4(payload=b"")))
    raw[14] = 0x4F  # IHL 15 = 60 bytes, packet has 40
    raw[24:26] = b"\0\0"
    expect_pass(dr, raw, "pass_malformed")
    expect_pass(dr, tcp4(len=19), "pass_malformed")    # tot_len < header
    expect_pass(dr, tcp4(len=2000), "pass_malformed")  # tot_len > frame
    expect_pass(dr, tcp4(len=30), "pass_malformed")    # TCP header beyond tot_len


def test_ethernet_padding_is_fine(dr):
    raw = bytes(tcp4(payload=b"")) + b"\0" * 6
    r = dr.run(raw)
    assert r.retval == XDP_TX


@pytest.mark.parametrize("flags,offset", [(1, 0), (0, 3), (1, 1), (3, 0)])
def test_ipv4_fragments_pass(dr, flags, offset):
    p = tcp4(frag=offset)
    p[IP].flags = flags  # 1 = MF, 2 = DF
    expect_pass(dr, p, "pass_fragment")


def test_ipv4_df_is_not_a_fragment(dr):
    p = tcp4()
    p[IP].flags = 2
    assert dr.run(p).retval == XDP_TX


def test_ipv6_fragment_header_passes(dr):
    p = Ether(dst=MAC_A) / IPv6(src="2001:db8:c::7", dst=VIP6) / IPv6ExtHdrFragment(m=1) / \
        TCP(sport=1, dport=80)
    expect_pass(dr, p, "pass_fragment")
    p = Ether(dst=MAC_A) / IPv6(src="2001:db8:c::7", dst=VIP6) / IPv6ExtHdrHopByHop() / \
        IPv6ExtHdrFragment(offset=10) / TCP(sport=1, dport=80)
    expect_pass(dr, p, "pass_fragment")


def test_ipv6_extension_headers(dr):
    base = dict(src="2001:db8:c::7", dst=VIP6)
    # hop-by-hop and destination options are walked: balanced on the right ports
    p = Ether(dst=MAC_A) / IPv6(**base) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / \
        TCP(sport=3333, dport=80)
    r = dr.run(p)
    assert r.retval == XDP_TX and Ether(r.data)[TCP].sport == 3333
    # routing header: the destination is not final
    expect_pass(dr, Ether(dst=MAC_A) / IPv6(**base) / IPv6ExtHdrRouting() / TCP(dport=80),
                "pass_v6_ext")
    # more extension headers than the walk's bound
    many = IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
    expect_pass(dr, Ether(dst=MAC_A) / IPv6(**base) / many / TCP(dport=80), "pass_v6_ext")
    # extension header longer than the payload
    raw = bytearray(bytes(Ether(dst=MAC_A) / IPv6(**base) / IPv6ExtHdrDestOpt() /
                          TCP(dport=80)))
    raw[14 + 40 + 1] = 200
    expect_pass(dr, raw, "pass_malformed")
    # payload_len 0 (jumbogram) is not ours
    expect_pass(dr, tcp6(plen=0), "pass_malformed")


def test_unknown_protocols(dr):
    expect_pass(dr, Ether(dst=MAC_A) / IP(src="198.51.100.7", dst=VIP4) / ICMP(),
                "pass_unknown_l4")
    expect_pass(dr, Ether(dst=MAC_A) / IP(src="198.51.100.7", dst=VIP4, proto=47) / (b"x" * 20),
                "pass_unknown_l4")
    expect_pass(dr, Ether(dst=MAC_A) / IPv6(src="2001:db8:c::7", dst=VIP6, nh=58) / (b"x" * 8),
                "pass_unknown_l4")
    expect_pass(dr, Ether(dst=MAC_A) / ARP(), "pass_not_ip")
    expect_pass(dr, Ether(dst=MAC_A, type=0x88CC) / (b"x" * 40), "pass_not_ip")


def test_vlan_cases(dr):
    qinq = Ether(dst=MAC_A) / Dot1Q(vlan=1) / Dot1Q(vlan=2) / tcp4()[IP]
    expect_pass(dr, qinq, "pass_not_ip")
    expect_pass(dr, bytes(Ether(dst=MAC_A) / Dot1Q(vlan=7) / tcp4()[IP])[:17], "pass_malformed")


def test_tcp_bad_data_offset(dr):
    expect_pass(dr, Ether(dst=MAC_A) / IP(src="198.51.100.7", dst=VIP4) /
                TCP(sport=1, dport=80, dataofs=4), "pass_malformed")


def test_non_vip_port_and_proto_pass(dr):
    expect_pass(dr, tcp4(dport=81), "pass_not_vip")
    expect_pass(dr, udp4(dport=80), "pass_not_vip")
    expect_pass(dr, tcp6(dport=53), "pass_not_vip")
    expect_pass(dr, tcp4(dst="203.0.113.11"), "pass_not_vip")
