"""The plan every mix computes from the VIPs' backend sets must be the same everywhere."""
from ipaddress import ip_address

from meshlb import maglev
from meshlb.config import VipConfig
from meshlb.forwarding import plan, plan_vip, plans_digest

V1 = VipConfig(address=ip_address("198.19.0.1"), port=80, protocol="tcp", mode="dr", ring_size=251)
V2 = VipConfig(address=ip_address("198.19.0.2"), port=80, protocol="tcp", mode="nat", ring_size=251, backend_port=8080)


def chosen(*names, vips=(V1, V2), weight=1):
    return {v.key: [(n, weight) for n in names] for v in vips}


def test_same_sets_same_plan_whatever_the_order():
    a = plan([V1, V2], chosen("m1", "m2", "m3"))
    b = plan([V2, V1], {k: list(reversed(v)) for k, v in reversed(list(chosen("m3", "m1", "m2").items()))})
    assert {k: p.digest for k, p in a.items()} == {k: p.digest for k, p in b.items()}
    assert a[V1.key].table == b[V1.key].table
    assert plans_digest(a) == plans_digest(b)


def test_each_vip_gets_its_own_backends():
    p = plan([V1, V2], {V1.key: [("m1", 1), ("m3", 1)], V2.key: [("m1", 1), ("m3", 1), ("m4", 1)]})
    assert p[V1.key].backends == ("m1", "m3")
    assert p[V2.key].backends == ("m1", "m3", "m4")
    used = {p[V1.key].backends[i] for i in p[V1.key].table}
    assert used == {"m1", "m3"}


def test_digest_changes_with_the_backend_set_and_names_the_vip():
    p3 = plan([V1, V2], chosen("m1", "m2", "m3"))
    p2 = plan([V1, V2], chosen("m1", "m2"))
    assert p3[V1.key].digest != p2[V1.key].digest
    assert p3[V1.key].table != p2[V1.key].table
    # two VIPs with the same backends share a table but not a digest
    assert p3[V1.key].table == p3[V2.key].table
    assert p3[V1.key].digest != p3[V2.key].digest
    assert plans_digest(p3) != plans_digest(p2)


def test_a_draining_backend_stays_named_and_changes_the_digest():
    """Weight 0: in the index space (its flows keep their backend id) with no slot; the
    digest sees it, so members that disagree on a drain show it."""
    drained = plan_vip(V1, [("m1", 1), ("m2", 0), ("m3", 1)])
    gone = plan_vip(V1, [("m1", 1), ("m3", 1)])
    assert drained.backends == ("m1", "m2", "m3")
    assert [drained.backends[i] for i in drained.table] == [gone.backends[i] for i in gone.table]
    assert drained.digest != gone.digest


def test_no_backend_gives_an_empty_table():
    for sets in ({}, {V1.key: []}):
        p = plan([V1], sets)
        assert p[V1.key].backends == ()
        assert set(p[V1.key].table) == {maglev.NO_BACKEND}


def test_weights_shift_share():
    p = plan_vip(V1, [("m1", 1), ("m2", 3)])
    share = sum(1 for i in p.table if p.backends[i] == "m2") / len(p.table)
    assert 0.70 < share < 0.80


def test_matches_maglev_directly():
    p = plan_vip(V1, [("b", 1), ("a", 1)])
    assert list(p.table) == maglev.build_table([maglev.Backend("a", 100), maglev.Backend("b", 100)], 251)
