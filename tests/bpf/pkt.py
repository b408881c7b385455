"""Packets for the balancer's BPF_PROG_TEST_RUN tests: the addresses of the test
topology (harness.FibNetns builds it), builders of client packets, and what the tests
compare the balancer's output with."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from meshlb.dataplane import layouts as L

# Addresses of the test topology (documentation / ULA ranges, inside the netns only).
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:c::7"
VIP4, VIP6 = "203.0.113.10", "2001:db8:f::10"
SNAT4, SNAT6 = "10.10.0.1", "fd00:a::1"
BE_TX4, BE_TX6 = "10.10.0.2", "fd00:a::2"        # behind the ingress veth: XDP_TX
BE_REDIR4, BE_REDIR6 = "10.20.0.2", "fd00:b::2"  # behind the other veth: XDP_REDIRECT
BE_NONEIGH4, BE_NONEIGH6 = "10.10.0.3", "fd00:a::3"  # routed, no neighbour entry
BE_BLACKHOLE4 = "10.99.0.1"
BE_SMALL4, BE_SMALL6 = "10.10.0.5", "fd00:a::5"  # behind veth A on a route of MTU 1280
CLIENT_SMALL4, CLIENT_SMALL6 = "198.51.100.9", "2001:db8:c::9"  # via the gateway, MTU 1280
SMALL_MTU = 1280
MAC_A, MAC_B = "02:00:00:00:0a:01", "02:00:00:00:0b:01"
MAC_BE_TX, MAC_BE_REDIR, MAC_GW = "02:00:00:00:0a:02", "02:00:00:00:0b:02", "02:00:00:00:0a:fe"
GW4, GW6 = "10.10.0.254", "fd00:a::fe"
CLIENT_MAC = "02:00:00:00:cc:01"


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


def l3(pkt):
    return pkt[IP] if pkt.haslayer(IP) else pkt[IPv6]


def marked(pkt):
    """The packet as the balancer forwards it to a peer: peer mark set."""
    q = pkt.copy()
    if q.haslayer(IP):
        q[IP].flags = int(q[IP].flags) | 0x4  # reserved bit of frag_off
        del q[IP].chksum
    else:
        q[IPv6].fl = L.MLB_V6_MARK
    return q


def rebuilt(pkt) -> bytes:
    return bytes(pkt.__class__(bytes(pkt)))
