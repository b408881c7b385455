"""Incarnation ordering and the member table; the message schema's strict decoding."""
from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlb.cluster import messages as M
from meshlb.cluster.membership import MemberState, MemberTable, Verdict
from meshlb.cluster.messages import Alive, Dead, Left, MemberMeta, Status, Suspect
from meshlb.cluster.suspicion import Suspicion
from meshlb.dataplane.layouts import flow_key_bytes

ME = "me"
ADDR = ("10.0.0.1", 7946)


def factory(name, inc, origin, now):
    return Suspicion(origin=origin, incarnation=inc, start=now, k=2, min_timeout=5.0, max_timeout=30.0)


def table(inc: int = 0) -> MemberTable:
    return MemberTable(MemberState(ME, ADDR, Status.ALIVE, inc, 0, MemberMeta(), 0.0), factory)


def alive(name="x", inc=0, mv=0, meta=None, addr=("10.0.0.2", 7946)) -> Alive:
    return Alive(name, addr, inc, mv, meta or MemberMeta())


def with_x(status: Status, inc: int) -> MemberTable:
    t = table()
    assert t.apply_alive(alive(inc=0), 1.0)[0] is Verdict.JOINED
    if inc:
        t.apply_alive(alive(inc=inc), 1.0)
    if status is Status.SUSPECT:
        assert t.apply_suspect(Suspect("x", inc, "a"), 2.0) is Verdict.SUSPECTED
    elif status is Status.DEAD:
        assert t.apply_dead(Dead("x", inc, "a"), 2.0) is Verdict.DIED
    elif status is Status.LEFT:
        assert t.apply_left(Left("x", inc), 2.0) is Verdict.LEFT
    assert t.get("x").status is status and t.get("x").incarnation == inc
    return t


# ---- alive ------------------------------------------------------------------------------

def test_new_member_joins_and_duplicate_is_ignored():
    t = table()
    assert t.apply_alive(alive(), 1.0) == (Verdict.JOINED, True)
    assert t.apply_alive(alive(), 2.0) == (Verdict.IGNORED, False)
    assert t.live_count() == 2 and t.name_at(("10.0.0.2", 7946)) == "x"


@pytest.mark.parametrize("status", [Status.ALIVE, Status.SUSPECT])
def test_alive_overrides_only_with_higher_incarnation(status):
    t = with_x(status, 3)
    assert t.apply_alive(alive(inc=3), 5.0)[0] is Verdict.IGNORED
    assert t.apply_alive(alive(inc=2), 5.0)[0] is Verdict.IGNORED
    v, _ = t.apply_alive(alive(inc=4), 5.0)
    assert v is (Verdict.UPDATED if status is Status.ALIVE else Verdict.RECOVERED)
    assert t.get("x").status is Status.ALIVE and t.get("x").incarnation == 4
    assert t.get("x").suspicion is None


@pytest.mark.parametrize("status", [Status.DEAD, Status.LEFT])
def test_rejoin_needs_a_higher_incarnation(status):
    t = with_x(status, 3)
    assert t.apply_alive(alive(inc=3), 5.0)[0] is Verdict.IGNORED
    assert t.live_count() == 1
    assert t.apply_alive(alive(inc=9, addr=("10.0.0.9", 1)), 6.0)[0] is Verdict.REVIVED
    m = t.get("x")
    assert (m.status, m.incarnation, m.address, m.status_since) == (Status.ALIVE, 9, ("10.0.0.9", 1), 6.0)
    assert t.name_at(("10.0.0.9", 1)) == "x" and t.name_at(("10.0.0.2", 7946)) is None
    assert t.live_count() == 2


def test_meta_change_is_reported_with_the_new_incarnation():
    t = with_x(Status.ALIVE, 0)
    v, changed = t.apply_alive(alive(inc=1, mv=1, meta=MemberMeta(weight=5)), 3.0)
    assert v is Verdict.UPDATED and changed and t.get("x").meta.weight == 5
    v, changed = t.apply_alive(alive(inc=2, mv=1, meta=MemberMeta(weight=5)), 3.0)
    assert v is Verdict.UPDATED and not changed


# ---- suspect ------------------------------------------------------------------------------

def test_suspect_overrides_alive_with_same_or_lower_incarnation():
    t = with_x(Status.ALIVE, 3)
    assert t.apply_suspect(Suspect("x", 2, "a"), 5.0) is Verdict.IGNORED
    assert t.apply_suspect(Suspect("x", 3, "a"), 5.0) is Verdict.SUSPECTED
    assert t.get("x").status_since == 5.0
    t = with_x(Status.ALIVE, 3)
    assert t.apply_suspect(Suspect("x", 7, "a"), 5.0) is Verdict.SUSPECTED
    assert t.get("x").incarnation == 7


def test_same_suspicion_from_another_origin_is_a_confirmation_once():
    t = with_x(Status.SUSPECT, 1)  # origin "a"
    assert t.apply_suspect(Suspect("x", 1, "a"), 3.0) is Verdict.IGNORED
    assert t.apply_suspect(Suspect("x", 1, "b"), 3.0) is Verdict.CONFIRMED
    assert t.apply_suspect(Suspect("x", 1, "b"), 3.0) is Verdict.IGNORED
    assert t.get("x").suspicion.confirmations == 1


def test_newer_suspicion_replaces_the_timer():
    t = with_x(Status.SUSPECT, 1)
    first = t.get("x").suspicion
    assert t.apply_suspect(Suspect("x", 2, "b"), 9.0) is Verdict.SUSPECTED
    assert t.get("x").suspicion is not first and t.get("x").suspicion.start == 9.0


@pytest.mark.parametrize("status", [Status.DEAD, Status.LEFT])
def test_suspect_does_not_touch_dead_or_left(status):
    t = with_x(status, 1)
    assert t.apply_suspect(Suspect("x", 5, "b"), 3.0) is Verdict.IGNORED
    assert t.get("x").status is status


def test_claims_about_unknown_members_are_ignored():
    t = table()
    assert t.apply_suspect(Suspect("ghost", 0, "a"), 1.0) is Verdict.IGNORED
    assert t.apply_dead(Dead("ghost", 0, "a"), 1.0) is Verdict.IGNORED
    assert t.apply_left(Left("ghost", 0), 1.0) is Verdict.IGNORED
    assert len(t) == 1


# ---- dead and left ------------------------------------------------------------------------

@pytest.mark.parametrize("status", [Status.ALIVE, Status.SUSPECT])
def test_dead_overrides_with_same_or_higher_incarnation(status):
    t = with_x(status, 3)
    assert t.apply_dead(Dead("x", 2, "a"), 5.0) is Verdict.IGNORED
    assert t.apply_dead(Dead("x", 3, "a"), 5.0) is Verdict.DIED
    assert t.get("x").suspicion is None and t.live_count() == 1
    assert t.apply_dead(Dead("x", 4, "a"), 5.0) is Verdict.IGNORED  # already dead


def test_left_overrides_dead_but_not_the_reverse():
    t = with_x(Status.DEAD, 3)
    assert t.apply_left(Left("x", 3), 5.0) is Verdict.LEFT
    assert t.apply_dead(Dead("x", 3, "a"), 6.0) is Verdict.IGNORED
    assert t.get("x").status is Status.LEFT


def test_left_with_lower_incarnation_is_stale():
    t = with_x(Status.ALIVE, 3)
    assert t.apply_left(Left("x", 2), 5.0) is Verdict.IGNORED


# ---- claims about ourselves ---------------------------------------------------------------

def test_claims_about_self_are_refuted_never_applied():
    t = table(inc=4)
    assert t.apply_suspect(Suspect(ME, 4, "a"), 1.0) is Verdict.REFUTE
    assert t.apply_suspect(Suspect(ME, 3, "a"), 1.0) is Verdict.IGNORED
    assert t.apply_dead(Dead(ME, 5, "a"), 1.0) is Verdict.REFUTE
    assert t.apply_left(Left(ME, 4), 1.0) is Verdict.REFUTE
    assert t.apply_alive(Alive(ME, ADDR, 9, 0, MemberMeta()), 1.0)[0] is Verdict.REFUTE
    assert t.apply_alive(Alive(ME, ("10.9.9.9", 1), 4, 0, MemberMeta()), 1.0)[0] is Verdict.REFUTE
    assert t.apply_alive(Alive(ME, ADDR, 4, 0, MemberMeta()), 1.0)[0] is Verdict.IGNORED
    assert t.local.status is Status.ALIVE and t.local.incarnation == 4
    assert t.refute(9) == 10 and t.refute(3) == 11


def test_leaving_member_does_not_refute():
    t = table(inc=2)
    t.leaving = True
    assert t.apply_dead(Dead(ME, 2, "a"), 1.0) is Verdict.IGNORED
    assert t.apply_left(Left(ME, 2), 1.0) is Verdict.IGNORED


# ---- table mechanics ------------------------------------------------------------------------

def test_random_live_is_uniform_distinct_and_respects_filters():
    t = table()
    for i in range(50):
        t.apply_alive(alive(name=f"m{i}", addr=(f"10.1.0.{i + 1}", 1)), 0.0)
    t.apply_suspect(Suspect("m0", 0, "a"), 0.0)
    t.apply_dead(Dead("m1", 0, "a"), 0.0)
    rng = random.Random(1)
    counts = {}
    for _ in range(2000):
        pick = t.random_live(rng, 3, exclude=("m2",))
        assert len(pick) == 3 and len(set(pick)) == 3
        assert "m1" not in pick and "m2" not in pick and ME not in pick
        for p in pick:
            counts[p] = counts.get(p, 0) + 1
    assert len(counts) == 48 and max(counts.values()) < 3 * min(counts.values())
    assert "m0" not in t.random_live(rng, 60, alive_only=True)
    assert len(t.random_live(rng, 60)) == 49  # m0 (suspect) included, m1 (dead) not


def test_remove_forgets_everything_but_never_self():
    t = with_x(Status.DEAD, 0)
    assert t.remove("x") is not None
    assert t.get("x") is None and t.name_at(("10.0.0.2", 7946)) is None and len(t) == 1
    assert t.remove(ME) is None and t.get(ME) is not None


def test_live_index_stays_consistent_through_churn():
    t = table()
    rng = random.Random(5)
    names = [f"m{i}" for i in range(30)]
    inc = {n: 0 for n in names}
    for step in range(3000):
        n = rng.choice(names)
        op = rng.randrange(4)
        if op == 0:
            inc[n] += 1
            t.apply_alive(alive(name=n, inc=inc[n], addr=("10.2.0.1", names.index(n) + 1)), step)
        elif op == 1:
            t.apply_suspect(Suspect(n, inc[n], "a"), step)
        elif op == 2:
            t.apply_dead(Dead(n, inc[n], "a"), step)
        else:
            t.remove(n)
        live = sorted(m.name for m in t if m.name != ME and m.status in (Status.ALIVE, Status.SUSPECT))
        assert sorted(t.live_names()) == live


# ---- message schema -------------------------------------------------------------------------

META = MemberMeta(vips=("10.255.0.1", "2001:db8::1"), weight=7, app_healthy=False, table_digest="d1",
                  observations={"a": True, "b": False})
SAMPLES = [
    M.Ping(1, "x"), M.Ack(2), M.Nack(3), M.PingReq(4, "y", True),
    M.Alive("x", ("2001:db8::5", 7946), 3, 2, META), M.Suspect("x", 1, "y"), M.Dead("x", 1, "y"),
    M.Left("x", 9), M.Eviction("o", 5, 7, M.FlowTuple("192.0.2.1", 5, "2001:db8::1", 443, 17)),
    M.PushPull(77, True, False, False, 0, 2, (M.MemberRecord("x", ("10.0.0.1", 1), Status.SUSPECT, 1, 0, META),)),
    M.EvictionDigest(False, (M.DigestEntry("o", 1, 5, (7, 9)),)),
    M.DrainState((M.DrainEntry("member:mix2", True, 1795533400123, "mix1"),
                  M.DrainEntry("server:2001:db8::5", False, 7, "mix3"))),
    M.DrainState(()),
    M.EvictionRun("o", 5, 8, M.flow_record(M.FlowTuple("192.0.2.1", 5, "198.19.0.3", 443, 6))
                  + M.flow_record(M.FlowTuple("2001:db8::9", 6, "2001:db8::1", 443, 17))),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_msgpack(msg):
    raw = msgpack.unpackb(msgpack.packb(M.encode(msg), use_bin_type=True), raw=False, strict_map_key=False)
    assert M.decode(raw) == msg


_REC = M.flow_record(M.FlowTuple("192.0.2.1", 5, "198.19.0.3", 443, 6))


def test_a_flow_record_is_the_data_plane_key_of_the_flow():
    for t in (M.FlowTuple("192.0.2.1", 40000, "198.19.0.3", 8080, 6),
              M.FlowTuple("2001:db8::5", 1, "2001:db8::3", 65535, 17)):
        r = M.flow_record(t)
        assert r == flow_key_bytes(*t) and M.valid_records(r) and M.flow_tuple_of(r) == t
    with pytest.raises(ValueError):
        M.flow_record(M.FlowTuple("192.0.2.1", 1, "2001:db8::3", 1, 6))
    with pytest.raises(ValueError):
        M.flow_record(M.FlowTuple("192.0.2.1", 1, "192.0.2.3", 1, 1))


@pytest.mark.parametrize("bad", [
    None, 5, "x", [], [M.T_PING], [M.T_PING, 1, "x", 3], [M.T_PING, True, "x"], [M.T_PING, -1, "x"],
    [M.T_PING, 1 << 64, "x"], [M.T_PING, 1, ""], [M.T_PING, 1, "x" * 200], [M.T_PING, 1, "a\nb"],
    [M.T_PING, 1.0, "x"], [M.T_PINGREQ, 1, "x", 1], [M.T_ACK, "1"],
    [M.T_ALIVE, "x", "10.0.0.1", 0, 0, 0, M.encode_meta(MemberMeta())],
    [M.T_ALIVE, "x", "10.0.0.1", 70000, 0, 0, M.encode_meta(MemberMeta())],
    [M.T_ALIVE, "x", "host.example", 1, 0, 0, M.encode_meta(MemberMeta())],
    [M.T_ALIVE, "x", "10.0.0.1", 1, 0, 0, [[], 1, True, "", 1]],
    [M.T_ALIVE, "x", "10.0.0.1", 1, 0, 0, [[], 1, True, "", 1, {1: True}]],
    [M.T_ALIVE, "x", "10.0.0.1", 1, 0, 0, [[], 1, True, "", 1, {"a": 1}]],
    [M.T_ALIVE, "x", "10.0.0.1", 1, 0, 0, [[5], 1, True, "", 1, {}]],
    [M.T_EVICT, "o", 0, 0, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 1, 6],  # seq 0
    [M.T_EVICT, "o", 0, 1, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 1, 1],  # proto
    [M.T_EVICT, "o", 0, 1, "1.2.3.4", 1, b"\x01\x02\x03\x04", 1, 6],
    [M.T_EVICT, "o", 0, 1, b"\x01\x02\x03\x04", True, b"\x01\x02\x03\x04", 1, 6],  # bool port
    [M.T_EVICT, "o", 0, 1, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 65536, 6],
    [M.T_EVICT, "o", -1, 1, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 1, 6],  # epoch
    [M.T_EVICT, "o", 0, 1 << 64, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 1, 6],
    [M.T_EVICT, "o", 0, 1, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 1, 6.0],  # float proto
    [M.T_EVICT, "", 0, 1, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 1, 6],  # no origin
    [float(M.T_EVICT), "o", 0, 1, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x04", 1, 6],  # type code
    [M.T_EVICTS, "o", 0, 1, b""],  # no records
    [M.T_EVICTS, "o", 0, 0, _REC],  # first 0
    [M.T_EVICTS, "o", 0, 1, _REC[:-1]],  # not whole records
    [M.T_EVICTS, "o", 0, 1, _REC * (M.MAX_RUN + 1)],
    [M.T_EVICTS, "o", 0, M.MAX_U64, _REC * 2],  # past the last seq
    [M.T_EVICTS, "o", 0, 1, _REC[:36] + b"\x2f" + _REC[37:]],  # proto 47
    [M.T_EVICTS, "o", 0, 1, _REC[:37] + b"\x07" + _REC[38:]],  # family
    [M.T_EVICTS, "o", 0, 1, _REC[:38] + b"\x00\x01"],  # padding
    [M.T_EVICTS, "o", 0, 1, _REC[:5] + b"\x01" + _REC[6:]],  # IPv4 with bytes past the 4th
    [M.T_EVICTS, "o", 0, 1, "x" * 40],
    [M.T_EVICTS, "o", True, 1, _REC],
    [M.T_PUSHPULL, 1, False, False, False, 2, 2, []],  # index >= count
    [M.T_PUSHPULL, 1, False, False, False, 0, 1, [["x", "10.0.0.1", 1, 7, 0, 0, M.encode_meta(MemberMeta())]]],
    [M.T_DIGEST, False, [["o", 1, 2]]],
    [M.T_DIGEST, False, [["o", 1, 2, [-1]]]],
    [M.T_DRAINS, [["member:a", True, 1]]],  # no origin
    [M.T_DRAINS, [["member:a", 1, 1, "o"]]],  # drained not a bool
    [M.T_DRAINS, [["member:a", True, -1, "o"]]],
    [M.T_DRAINS, [["member:a", True, 1 << 64, "o"]]],
    [M.T_DRAINS, [["", True, 1, "o"]]],
    [M.T_DRAINS, [["member:a\n", True, 1, "o"]]],
    [M.T_DRAINS, [["k" * 129, True, 1, "o"]]],
    [M.T_DRAINS, [["member:a", True, 1, "o"]] * (M.MAX_DRAIN_ENTRIES + 1)],
    [M.T_DRAINS, "member:a"],
    [M.T_DRAINS, [], []],
])
def test_malformed_messages_decode_to_none(bad):
    assert M.decode(bad) is None


@settings(max_examples=80, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=9) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                    max_leaves=12))
def test_decode_never_raises(obj):
    M.decode(obj)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutating_one_field_never_raises_and_stays_valid_or_none(msg, data):
    raw = M.encode(msg)
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.none() | st.integers(-5, 1 << 65) | st.text(max_size=3) | st.booleans())
    out = M.decode(raw)
    assert out is None or type(out) is type(msg) or i == 0
