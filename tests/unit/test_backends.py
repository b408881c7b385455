"""A VIP's backends (meshlb/backends.py): one pure function of the cluster file and the
agreed view, the same on every mix."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from meshlb import forwarding, maglev
from meshlb.backends import (
    ACTIVE,
    DOWN,
    DRAINING,
    EXTERNAL,
    MEMBER,
    UnknownBackend,
    backend_sets,
    drain_target,
)
from meshlb.cluster.membership import MemberView
from meshlb.cluster.node import MemberMeta, Status
from meshlb.config import parse
from tests.cluster.memnet import Network, converged, run_until

BASE = '[node]\nname = "mix1"\n[cluster]\nkey_file = "/k"\n'


def vips(text: str):
    return parse(BASE + text).vips


def member(name, addr, *extra, vips_=(), status=Status.ALIVE, healthy=True, obs=None, weight=100):
    meta = MemberMeta(vips=tuple(vips_), app_healthy=healthy, observations=dict(obs or {}), addresses=extra,
                      weight=weight)
    return MemberView(name, (addr, 7946), status, 1, meta, 0.0)


DR4, DR6, NAT = vips('''
[[vips]]
address = "198.19.0.1"
port = 80
servers = ["198.18.0.231", "198.18.0.232"]
weights = { mix2 = 3, "198.18.0.232" = 2 }
[[vips]]
address = "fd00::1"
port = 80
[[vips]]
address = "198.19.0.2"
port = 80
mode = "nat"
backend_port = 8080
members = ["mix1", "mix3"]
servers = ["198.18.0.231:9090", "198.18.0.233"]
''')
ALL = (DR4.key, DR6.key, NAT.key)


def three(**kw):
    return [member("mix1", "10.0.0.1", vips_=ALL, **kw), member("mix2", "10.0.0.2", "fd00::2", vips_=ALL),
            member("mix3", "10.0.0.3", vips_=ALL)]


def test_candidates_kinds_ports_and_weights():
    sets = backend_sets([DR4, DR6, NAT], three())
    dr = {b.name: b for b in sets[DR4.key].backends}
    assert list(dr) == ["198.18.0.231:80", "198.18.0.232:80", "mix1", "mix2", "mix3"]
    assert (dr["mix2"].kind, dr["mix2"].address, dr["mix2"].port, dr["mix2"].weight) == (MEMBER, "10.0.0.2", 0, 3)
    srv = dr["198.18.0.232:80"]
    assert (srv.kind, srv.address, srv.port, srv.weight, srv.state) == (EXTERNAL, "198.18.0.232", 0, 2, ACTIVE)
    assert sets[DR4.key].chosen() == (("198.18.0.231:80", 1), ("198.18.0.232:80", 2), ("mix1", 1), ("mix2", 3),
                                      ("mix3", 1))
    # an IPv6 VIP: only members with an IPv6 address (never link-local) back it
    assert [b.name for b in sets[DR6.key].backends] == ["mix2"]
    # nat: the admitted members on the backend port, each server on its own port
    nat = {b.name: b for b in sets[NAT.key].backends}
    assert list(nat) == ["198.18.0.231:9090", "198.18.0.233:8080", "mix1", "mix3"]
    assert (nat["mix1"].port, nat["198.18.0.231:9090"].port, nat["198.18.0.233:8080"].port) == (8080, 9090, 8080)


def test_a_member_serves_what_its_metadata_lists_and_the_vip_admits():
    ms = three()
    ms[2] = member("mix3", "10.0.0.3", vips_=())  # node.serve = false: a balancer only
    ms[0] = member("mix1", "10.0.0.1", "fe80::1", vips_=(DR4.key, DR6.key))  # not the nat VIP
    sets = backend_sets([DR4, DR6, NAT], ms)
    assert [b.name for b in sets[DR4.key].backends if b.kind == MEMBER] == ["mix1", "mix2"]
    assert [b.name for b in sets[DR6.key].backends] == ["mix2"]
    assert [b.name for b in sets[NAT.key].backends] == ["198.18.0.231:9090", "198.18.0.233:8080"]
    (none,) = vips('[[vips]]\naddress = "198.19.0.9"\nport = 80\nmembers = "none"\nservers = ["198.18.0.240"]\n')
    assert [b.name for b in backend_sets([none], three())[none.key].backends] == ["198.18.0.240:80"]


def test_health_members_by_their_rule_servers_by_a_majority_of_alive_members():
    ms = [member("mix1", "10.0.0.1", vips_=ALL, obs={"198.18.0.231:80": False, "198.18.0.232:80": False}),
          member("mix2", "10.0.0.2", vips_=ALL, obs={"198.18.0.231:80": False}),
          member("mix3", "10.0.0.3", vips_=ALL, healthy=False),
          member("mix4", "10.0.0.4", vips_=ALL, status=Status.SUSPECT)]
    b = {x.name: x for x in backend_sets([DR4], ms)[DR4.key].backends}
    # two of the three alive report .231 down: out; one reports .232: a minority, in
    assert (b["198.18.0.231:80"].healthy, b["198.18.0.231:80"].state) == (False, DOWN)
    assert (b["198.18.0.232:80"].healthy, b["198.18.0.232:80"].state) == (True, ACTIVE)
    assert (b["mix3"].state, b["mix4"].state, b["mix1"].state) == (DOWN, DOWN, ACTIVE)
    assert [n for n, _ in backend_sets([DR4], ms)[DR4.key].chosen()] == ["198.18.0.232:80", "mix1", "mix2"]
    # alone, a mix that sees a server down is the majority
    alone = [member("mix1", "10.0.0.1", vips_=ALL, obs={"198.18.0.232:80": False})]
    b = {x.name: x for x in backend_sets([DR4], alone)[DR4.key].backends}
    assert not b["198.18.0.232:80"].healthy and b["198.18.0.231:80"].healthy
    # of two, one seeing it down is a tie: the other can reach it, it stays
    two = [member("mix1", "10.0.0.1", vips_=ALL, obs={"198.18.0.232:80": False}), member("mix2", "10.0.0.2")]
    assert backend_sets([DR4], two)[DR4.key].get("198.18.0.232:80").healthy
    # a left member's reports and a dead one's count for nothing
    gone = [member("mix1", "10.0.0.1", vips_=ALL),
            member("mix9", "10.0.0.9", vips_=ALL, status=Status.DEAD, obs={"198.18.0.231:80": False})]
    assert backend_sets([DR4], gone)[DR4.key].get("198.18.0.231:80").healthy


def test_drained_backends_keep_their_index_and_get_no_slot():
    sets = backend_sets([DR4, NAT], three(), drained={"member:mix2", "server:198.18.0.231"})
    dr, nat = sets[DR4.key], sets[NAT.key]
    assert dr.get("mix2").state == DRAINING and dr.get("mix2").healthy
    # a server drains by address: every port of it, in every VIP
    assert dr.get("198.18.0.231:80").state == DRAINING and nat.get("198.18.0.231:9090").state == DRAINING
    assert dict(dr.chosen())["mix2"] == 0 and dict(dr.chosen())["198.18.0.231:80"] == 0
    plan = forwarding.plan([DR4], {DR4.key: dr.chosen()})[DR4.key]
    assert "mix2" in plan.backends and "198.18.0.231:80" in plan.backends
    owners = {plan.backends[i] for i in plan.table}
    assert owners == {"198.18.0.232:80", "mix1", "mix3"}
    # the same table as without them: the drained backends' slots went to the others
    without = maglev.build_table([maglev.Backend(n, w) for n, w in dr.chosen() if w], DR4.ring_size)
    names = maglev.canonical_names([maglev.Backend(n, w) for n, w in dr.chosen() if w])
    assert [plan.backends[i] for i in plan.table] == [names[i] for i in without]
    # weight 0 in the file and a member that says it leaves (weight 0) drain the same way
    (zero,) = vips('[[vips]]\naddress = "198.19.0.1"\nport = 80\nweights = { mix1 = 0 }\n')
    assert backend_sets([zero], three())[zero.key].get("mix1").state == DRAINING
    ms = three()
    ms[1] = member("mix2", "10.0.0.2", vips_=ALL, weight=0, healthy=False)
    b = backend_sets([DR4], ms)[DR4.key].get("mix2")
    assert (b.state, b.healthy, b.table_weight) == (DRAINING, False, None)


def test_weights_give_table_shares_in_proportion():
    (v,) = vips('[[vips]]\naddress = "198.19.0.1"\nport = 80\nmembers = "none"\n'
                'servers = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]\n'
                'weights = { "192.0.2.1" = 1, "192.0.2.2" = 2, "192.0.2.3" = 3 }\n')
    s = backend_sets([v], [member("mix1", "10.0.0.1")])[v.key]
    plan = forwarding.plan([v], {v.key: s.chosen()})[v.key]
    share = {n: sum(1 for i in plan.table if plan.backends[i] == n) / len(plan.table) for n in plan.backends}
    for name, w in (("192.0.2.1:80", 1), ("192.0.2.2:80", 2), ("192.0.2.3:80", 3)):
        assert share[name] == pytest.approx(w / 6, abs=0.001)


def test_same_sets_whatever_the_order_of_the_view():
    ms = three(obs={"198.18.0.231:80": False})
    a = backend_sets([DR4, DR6, NAT], ms, {"member:mix3"})
    shuffled = ms[:]
    random.Random(7).shuffle(shuffled)
    b = backend_sets([NAT, DR4, DR6], shuffled, ["member:mix3", "member:mix3"])
    assert a == b


def test_a_leaving_node_plans_no_backend():
    sets = backend_sets([DR4], three(), serving=False)
    assert sets[DR4.key].chosen() == () and {b.state for b in sets[DR4.key].backends} == {DOWN}


def test_drain_target_names_members_and_server_addresses():
    vs = [DR4, NAT, *vips('[[vips]]\naddress = "fd00::1"\nport = 80\nservers = ["fd00::231"]\n')]
    assert drain_target("mix2", vs, ["mix1", "mix2"]) == "member:mix2"
    assert drain_target("mix3", vs, []) == "member:mix3"  # named by a VIP's members
    assert drain_target("198.18.0.231", vs, []) == "server:198.18.0.231"
    assert drain_target("[fd00:0::231]", vs, []) == "server:fd00::231"
    with pytest.raises(UnknownBackend, match=r"^no member or server named 'mix9' in this cluster \(members: mix1, mix3; "
                                             r"servers: 198\.18\.0\.231, 198\.18\.0\.232, 198\.18\.0\.233, fd00::231\)$"):
        drain_target("mix9", vs, ["mix1"])
    with pytest.raises(UnknownBackend, match="by its address alone"):
        drain_target("198.18.0.231:80", vs, [])
    with pytest.raises(UnknownBackend):
        drain_target("10.9.9.9", vs, [])
    # a key the map holds may be undrained after it left the file
    assert drain_target("10.9.9.9", vs, [], known_keys={"server:10.9.9.9"}) == "server:10.9.9.9"
    assert drain_target("old", vs, [], known_keys={"member:old"}) == "member:old"


# ---- the same on every mix, across simulated views ------------------------------------


def _plans(node, vs):
    sets = backend_sets(vs, node.members(), node.drained())
    plans = forwarding.plan(vs, {k: s.chosen() for k, s in sets.items()})
    return sets, forwarding.plans_digest(plans)


def test_every_member_of_a_simulated_cluster_computes_the_same_sets_and_digest():
    """Five real Nodes over the in-memory network with loss: members serving different
    VIPs, one balancer only, two of them failing a server's check, a drain written on
    one member and an undrain on another. Once gossip has spread, every member's sets
    and table digest are the same."""
    vs = [DR4, NAT]
    net = Network(seed=11, loss=0.05)
    metas = {
        "mix1": MemberMeta(vips=ALL, observations={"198.18.0.231:80": False}),
        "mix2": MemberMeta(vips=(DR4.key,), observations={"198.18.0.231:80": False}),
        "mix3": MemberMeta(vips=ALL, observations={"198.18.0.231:80": False}),
        "mix4": MemberMeta(vips=()),  # balancer only
        "mix5": MemberMeta(vips=ALL, app_healthy=False),
    }
    for i, (name, meta) in enumerate(metas.items()):
        net.add(name, i, peers=[net.addr(0)] if i else [], meta=meta)
    run_until(net, lambda: converged(net), limit=10.0)
    net.nodes["mix3"].set_drain("member:mix1", True, 1_000, net.now)
    net.nodes["mix4"].set_drain("server:198.18.0.233", True, 1_000, net.now)
    net.run(0.5)
    net.nodes["mix2"].set_drain("server:198.18.0.233", False, 900, net.now)  # later, though its clock is behind

    def agreed():
        return len({_plans(net.nodes[n], vs)[1] for n in net.up}) == 1
    run_until(net, agreed, limit=10.0)
    sets, _ = _plans(net.nodes["mix1"], vs)
    dr = sets[DR4.key]
    assert dr.get("198.18.0.231:80").state == DOWN  # three of the five alive report it down
    assert dr.get("mix1").state == DRAINING and dr.get("mix5").state == DOWN and dr.get("mix4") is None
    assert sets[NAT.key].get("198.18.0.233:8080").state == ACTIVE  # the undrain came after the drain
    for n in net.up:
        assert _plans(net.nodes[n], vs)[0] == sets


def test_same_sets_in_views_that_differ_only_in_order_and_irrelevant_fields():
    ms = three()
    other = [replace(m, status_since=99.0, incarnation=7, address=(m.address[0], 9999)) for m in reversed(ms)]
    assert backend_sets([DR4, NAT], ms) == backend_sets([DR4, NAT], other)
