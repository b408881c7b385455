"""Table sync (meshlb/agent/tables.py) with the balancer and the cluster faked: VIP and
backend ids, what a restart takes back from the pinned maps, and the tables written."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import ip_address

import pytest

from meshlb.agent.tables import IdAllocator, TableSync
from meshlb.cluster.membership import MemberView
from meshlb.cluster.node import MemberMeta, Status
from meshlb.config import HostPort, VipConfig
from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import NO_BACKEND, vip_key

DR = VipConfig(address=ip_address("198.19.0.1"), port=80, ring_size=13)
NAT = VipConfig(address=ip_address("198.19.0.2"), port=80, mode="nat", ring_size=13, backend_port=8080)


def backend(addr: str, port: int) -> L.Backend:
    b = L.Backend()
    fam, words = L.addr_words(addr)
    b.addr[:] = words
    b.port = L.port_be(port)
    b.family = fam
    b.flags = L.MLB_BE_F_VALID
    return b


class FakeBalancer:
    def __init__(self, pinned_vips=(), pinned_backends=()) -> None:
        # what a previous agent left: ((addr, port, proto), id) and ((addr, port), id)
        self._vips = {bytes(vip_key(*k)): i for k, i in pinned_vips}
        self._backends = {i: backend(*k) for k, i in pinned_backends}
        self.added: dict[str, int] = {}
        self.removed: list[str] = []
        self.backends: dict[int, tuple[str, int, bool]] = {}
        self.tables: dict[int, list[int]] = {}

    def vips(self):
        return [(L.VipKey.from_bytes(k), L.VipMeta(vip_id=i)) for k, i in self._vips.items()]

    def backends_in_use(self):
        return list(self._backends.items())

    def add_vip(self, addr, port, proto, mode, *, vip_id, ring_size):
        self.added[f"{addr}:{port}/{proto}"] = vip_id

    def remove_vip(self, addr, port, proto):
        self.removed.append(f"{addr}:{port}/{proto}")

    def set_backend(self, bid, addr, port, *, local, external=False):
        self.backends[bid] = (addr, port, local) + (("external",) if external else ())

    def remove_backend(self, bid):
        del self.backends[bid]

    def set_vip_tables(self, tables):
        self.tables.update(tables)


class FakeCluster:
    def __init__(self) -> None:
        self.members_: dict[str, MemberView] = {}
        self.drains: set[str] = set()

    def join(self, name: str, addr: str, status: Status = Status.ALIVE, **meta) -> None:
        meta.setdefault("vips", (DR.key, NAT.key))
        self.members_[name] = MemberView(name, (addr, 7946), status, 1, MemberMeta(**meta), 0.0)

    def members(self):
        return list(self.members_.values())

    def drained(self):
        return set(self.drains)


def test_ids_are_the_lowest_free_and_never_handed_out_twice():
    ids = IdAllocator(4, "backend")
    ids.claim(1)
    assert [ids.allocate(), ids.allocate(), ids.allocate()] == [0, 2, 3]
    with pytest.raises(RuntimeError, match="no free backend id"):
        ids.allocate()
    ids.release(2)
    assert 2 not in ids and ids.allocate() == 2
    with pytest.raises(ValueError):
        ids.claim(4)


def test_a_restarted_agent_takes_back_the_pinned_ids_and_new_ones_avoid_them():
    lb = FakeBalancer(pinned_vips=[(("198.19.0.2", 80, "tcp"), 0), (("198.19.0.9", 80, "tcp"), 1)],
                      pinned_backends=[(("10.0.0.2", 8080), 0), (("10.0.0.9", 0), 1)])
    cluster = FakeCluster()
    t = TableSync(lb, "mix1", cluster)
    t.set_vips([DR, NAT])
    # NAT holds id 0 in the pinned map; 1 belongs to a VIP of the previous config
    assert t.vip_ids == {NAT.key: 0, DR.key: 2}
    # mix2 takes back the id conntrack entries point at; mix1 avoids 0 and 1
    assert t.backend_id("mix2", "10.0.0.2", 8080) == 0
    assert t.backend_id("mix1", "10.0.0.1", 8080) == 2
    assert t.backend_id("mix2", "10.0.0.2", 0) == 3  # the same member's dr backend is another
    assert t.local_ids == {2}


def test_rebuild_writes_backend_id_tables_and_keeps_ids_until_a_member_is_reaped():
    async def main():
        lb = FakeBalancer()
        cluster = FakeCluster()
        digests = []
        t = TableSync(lb, "mix1", cluster, on_digest=lambda: digests.append(t.digest))
        t.set_vips([DR, NAT])
        for i in (1, 2, 3):
            cluster.join(f"mix{i}", f"10.0.0.{i}")
        await t.rebuild()
        dr, nat = t.vip_ids[DR.key], t.vip_ids[NAT.key]
        assert set(lb.tables[dr]) == {t.backend_ids[(f"mix{i}", f"10.0.0.{i}", 0)] for i in (1, 2, 3)}
        assert set(lb.tables[nat]) == {t.backend_ids[(f"mix{i}", f"10.0.0.{i}", 8080)] for i in (1, 2, 3)}
        assert lb.backends[t.backend_ids[("mix1", "10.0.0.1", 0)]] == ("10.0.0.1", 0, True)
        assert lb.backends[t.backend_ids[("mix2", "10.0.0.2", 8080)]] == ("10.0.0.2", 8080, False)
        assert digests == [t.digest] and t.table_changes == 1
        # mix3 suspect: no longer in the tables, but its ids stay bound to it
        cluster.join("mix3", "10.0.0.3", Status.SUSPECT)
        before = dict(t.backend_ids)
        await t.rebuild()
        assert t.backend_ids == before and len(digests) == 2
        assert t.backend_ids[("mix3", "10.0.0.3", 0)] not in lb.tables[dr]
        # reaped: its ids are released, and the next member gets one of them
        gone = {before[("mix3", "10.0.0.3", 0)], before[("mix3", "10.0.0.3", 8080)]}
        del cluster.members_["mix3"]
        await t.rebuild()
        assert not gone & set(lb.backends) and not gone & set(t.backend_ids.values())
        cluster.join("mix4", "10.0.0.4")
        await t.rebuild()
        assert {t.backend_ids[("mix4", "10.0.0.4", 0)], t.backend_ids[("mix4", "10.0.0.4", 8080)]} == gone
        # an unchanged view writes nothing
        lb.tables.clear()
        await t.rebuild()
        assert lb.tables == {} and t.table_changes == 3  # mix3 left the tables when it turned suspect
        # draining: every VIP loses its backends
        t.serving = False
        await t.rebuild()
        assert lb.tables[dr] == [NO_BACKEND] * DR.ring_size

    asyncio.run(main())


def test_a_reload_replaces_only_vips_the_balancer_holds_differently():
    lb = FakeBalancer()
    t = TableSync(lb, "mix1", FakeCluster())
    t.set_vips([DR, NAT])
    nat_id = t.vip_ids[NAT.key]
    # new SNAT ports only (applied at start): nothing to redo
    moved = VipConfig(address=NAT.address, port=80, mode="nat", ring_size=13, backend_port=8080,
                      snat_ports=(20000, 20999))
    assert t.set_vips([DR, moved]) == ([], [])
    # another backend port: removed and added again; a VIP gone: removed, its id free
    other = VipConfig(address=NAT.address, port=80, mode="nat", ring_size=13, backend_port=9090)
    removed, added = t.set_vips([other])
    assert removed == [DR, moved] and added == [other]
    assert lb.removed == ["198.19.0.1:80/tcp", "198.19.0.2:80/tcp"]
    assert t.vip_ids == {other.key: min(nat_id, t.vip_ids[other.key])}
    assert t.vips == (other,)


def test_servers_get_ids_of_their_own_kept_while_the_file_lists_them():
    async def main():
        lb = FakeBalancer()
        cluster = FakeCluster()
        dr = VipConfig(address=ip_address("198.19.0.1"), port=80, ring_size=13,
                       servers=(HostPort("198.18.0.231", 80),))
        nat = VipConfig(address=ip_address("198.19.0.2"), port=80, mode="nat", ring_size=13, backend_port=8080,
                        servers=(HostPort("198.18.0.231", 9090),), members=())
        t = TableSync(lb, "mix1", cluster)
        t.set_vips([dr, nat])
        cluster.join("mix1", "10.0.0.1", vips=(dr.key, nat.key))
        await t.rebuild()
        srv_dr = t.backend_ids[("198.18.0.231:80", "198.18.0.231", 0)]
        srv_nat = t.backend_ids[("198.18.0.231:9090", "198.18.0.231", 9090)]
        assert lb.backends[srv_dr] == ("198.18.0.231", 0, False, "external")
        assert lb.backends[srv_nat] == ("198.18.0.231", 9090, False, "external")
        assert t.external_ids == {srv_dr, srv_nat} and t.local_ids == {t.backend_ids[("mix1", "10.0.0.1", 0)]}
        assert set(lb.tables[t.vip_ids[nat.key]]) == {srv_nat}  # members = "none"
        # drained: still in the plan (weight 0), its id kept, no slot
        cluster.drains.add("server:198.18.0.231")
        await t.rebuild()
        assert set(lb.tables[t.vip_ids[nat.key]]) == {NO_BACKEND}
        assert set(lb.tables[t.vip_ids[dr.key]]) == {t.backend_ids[("mix1", "10.0.0.1", 0)]}
        assert t.plans[nat.key].backends == ("198.18.0.231:9090",) and srv_nat in lb.backends
        # gone from the file: its ids are released
        t.set_vips([replace(dr, servers=()), replace(nat, servers=(HostPort("198.18.0.232", 9090),))])
        await t.rebuild()
        assert srv_dr not in lb.backends and srv_dr not in t.external_ids
        assert ("198.18.0.231:9090", "198.18.0.231", 9090) not in t.backend_ids

    asyncio.run(main())
