"""The announcement frames, decoded by an independent implementation (scapy)."""
from __future__ import annotations

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from meshlb.announce.garp import (
    announcement,
    arp_announcement,
    mac_bytes,
    unsolicited_na,
)

MAC = "02:00:5e:10:00:01"


def test_arp_announcement():
    frame = arp_announcement(MAC, "198.19.0.1")
    assert len(frame) == 60
    pkt = Ether(frame)
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == MAC
    arp = pkt[ARP]
    assert (arp.op, arp.hwsrc, arp.psrc, arp.hwdst, arp.pdst) == (1, MAC, "198.19.0.1", "00:00:00:00:00:00",
                                                                  "198.19.0.1")


def test_unsolicited_na_has_a_valid_checksum_and_the_override_flag():
    frame = unsolicited_na(MAC, "fd00:6d6c:63::1")
    pkt = Ether(frame)
    assert pkt.dst == "33:33:00:00:00:01" and pkt.src == MAC
    ip = pkt[IPv6]
    assert (ip.src, ip.dst, ip.hlim) == ("fd00:6d6c:63::1", "ff02::1", 255)
    na = pkt[ICMPv6ND_NA]
    assert (na.R, na.S, na.O, na.tgt) == (0, 0, 1, "fd00:6d6c:63::1")
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == MAC
    theirs = na.cksum
    del na.cksum  # scapy recomputes it when the field is unset
    assert Ether(bytes(pkt))[ICMPv6ND_NA].cksum == theirs


def test_announcement_by_family_and_bad_macs():
    assert announcement(MAC, "10.0.0.1") == arp_announcement(MAC, "10.0.0.1")
    assert announcement(mac_bytes(MAC), "fd00::1") == unsolicited_na(MAC, "fd00::1")
    with pytest.raises(ValueError):
        mac_bytes("02:00")
