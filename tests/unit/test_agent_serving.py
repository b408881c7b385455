"""Which members back which VIPs, from their gossiped state (pure part of the agent)."""
from types import SimpleNamespace

from meshlb.agent.tables import serving_members
from meshlb.cluster.node import MemberMeta

V4 = "198.19.0.1:80/tcp"
V6 = "[fd00::1]:80/tcp"


def member(name, addr, *extra, vips=(V4, V6)):
    return SimpleNamespace(name=name, address=(addr, 7946), meta=MemberMeta(vips=vips, addresses=extra))


def test_ipv4_only_members_back_ipv4_vips_only():
    s = serving_members([member("a", "10.0.0.1"), member("b", "10.0.0.2", "10.0.0.2")])
    assert s == {"a": ((V4,), 100), "b": ((V4,), 100)}


def test_a_member_with_an_ipv6_address_backs_both_families():
    s = serving_members([member("a", "10.0.0.1", "10.0.0.1", "fd00::a"), member("b", "10.0.0.2", "fe80::b")])
    assert s["a"] == ((V4, V6), 100)
    assert s["b"] == ((V4,), 100)  # a link-local address cannot carry a VIP


def test_ipv6_gossip_address_backs_ipv6_vips():
    s = serving_members([member("c", "fd00::c")])
    assert s == {"c": ((V6,), 100)}
