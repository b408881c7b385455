"""Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6) that tell a
segment a VIP's new owner: the frames (pure) and a raw packet socket to send them.

ARP: an announcement in request form (RFC 5227 section 2.3: sender and target protocol
address both the VIP, target hardware address zero), broadcast; Linux hosts update an
existing entry on it whatever its lock time, and so do switches' and routers' caches
that hold one. IPv6: a neighbour advertisement to all nodes with the override flag and
the target link-layer address (RFC 4861 section 7.2.6), hop limit 255, from the VIP.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

ETH_ZLEN = 60  # shortest Ethernet frame without its checksum
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ALL_NODES_MAC = bytes.fromhex("333300000001")
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ND_NEIGHBOR_ADVERT = 136
NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LLADDR = 2


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"MAC address of {len(mac)} bytes")
        return mac
    out = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(out) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return out


def arp_announcement(mac: str | bytes, vip: str) -> bytes:
    hw = mac_bytes(mac)
    ip = ipaddress.IPv4Address(vip).packed
    eth = BROADCAST + hw + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\x00" * 6 + ip
    return (eth + arp).ljust(ETH_ZLEN, b"\x00")  # a NIC pads short frames, a veth does not


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na(mac: str | bytes, vip: str) -> bytes:
    hw = mac_bytes(mac)
    src = ipaddress.IPv6Address(vip)
    icmp = struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE) + src.packed
    icmp += struct.pack("!BB", ND_OPT_TARGET_LLADDR, 1) + hw
    pseudo = src.packed + ALL_NODES.packed + struct.pack("!I3xB", len(icmp), socket.IPPROTO_ICMPV6)
    csum = _checksum(pseudo + icmp)
    icmp = icmp[:2] + struct.pack("!H", csum) + icmp[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(icmp), socket.IPPROTO_ICMPV6, 255) + src.packed + ALL_NODES.packed
    return ALL_NODES_MAC + hw + struct.pack("!H", ETH_P_IPV6) + ip6 + icmp


def announcement(mac: str | bytes, vip: str) -> bytes:
    """The frame that announces ``vip`` at ``mac``, by the address's family."""
    return arp_announcement(mac, vip) if ipaddress.ip_address(vip).version == 4 else unsolicited_na(mac, vip)


class FrameSender:
    """A raw packet socket on one interface (needs CAP_NET_RAW), opened on first use."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self._sock: socket.socket | None = None

    def send(self, frame: bytes) -> None:
        if self._sock is None:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: send only
            try:
                s.bind((self.iface, 0))
            except OSError:
                s.close()
                raise
            self._sock = s
        try:
            self._sock.send(frame)
        except OSError:
            self.close()  # the interface may have been re-created: bind again next time
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
