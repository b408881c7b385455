"""The plan every mix computes from the cluster view must be the same everywhere."""
from ipaddress import ip_address

from meshlb import maglev
from meshlb.config import VipConfig
from meshlb.forwarding import plan, plans_digest

V1 = VipConfig(address=ip_address("198.19.0.1"), port=80, protocol="tcp", mode="dr", ring_size=251)
V2 = VipConfig(address=ip_address("198.19.0.2"), port=80, protocol="tcp", mode="nat", ring_size=251, backend_port=8080)


def serving(*names, vips=(V1, V2), weight=100):
    return {n: (tuple(v.key for v in vips), weight) for n in names}


def test_same_view_same_plan_whatever_the_order():
    a = plan([V1, V2], ["m1", "m2", "m3"], serving("m1", "m2", "m3"))
    b = plan([V2, V1], ["m3", "m1", "m2"], dict(reversed(list(serving("m1", "m2", "m3").items()))))
    assert {k: p.digest for k, p in a.items()} == {k: p.digest for k, p in b.items()}
    assert a[V1.key].table == b[V1.key].table
    assert plans_digest(a) == plans_digest(b)


def test_only_usable_members_that_serve_the_vip_back_it():
    s = serving("m1", "m2", "m3")
    s["m4"] = ((V2.key,), 100)  # serves only the nat VIP
    p = plan([V1, V2], ["m1", "m3", "m4"], s)  # m2 not usable
    assert p[V1.key].backends == ("m1", "m3")
    assert p[V2.key].backends == ("m1", "m3", "m4")
    used = {p[V1.key].backends[i] for i in p[V1.key].table}
    assert used == {"m1", "m3"}


def test_digest_changes_with_the_backend_set_and_names_the_vip():
    p3 = plan([V1, V2], ["m1", "m2", "m3"], serving("m1", "m2", "m3"))
    p2 = plan([V1, V2], ["m1", "m2"], serving("m1", "m2", "m3"))
    assert p3[V1.key].digest != p2[V1.key].digest
    assert p3[V1.key].table != p2[V1.key].table
    # two VIPs with the same backends share a table but not a digest
    assert p3[V1.key].table == p3[V2.key].table
    assert p3[V1.key].digest != p3[V2.key].digest
    assert plans_digest(p3) != plans_digest(p2)


def test_no_usable_backend_gives_an_empty_table():
    p = plan([V1], [], serving("m1"))
    assert p[V1.key].backends == ()
    assert set(p[V1.key].table) == {maglev.NO_BACKEND}


def test_weights_shift_share():
    s = {"m1": ((V1.key,), 100), "m2": ((V1.key,), 300)}
    p = plan([V1], ["m1", "m2"], s)[V1.key]
    share = sum(1 for i in p.table if p.backends[i] == "m2") / len(p.table)
    assert 0.70 < share < 0.80


def test_matches_maglev_directly():
    p = plan([V1], ["b", "a"], serving("a", "b"))[V1.key]
    assert list(p.table) == maglev.build_table([maglev.Backend("a", 100), maglev.Backend("b", 100)], 251)
