"""Eviction ids, dedupe, bounded memory, digest and repair."""
from __future__ import annotations

import random

from meshlb.cluster.evictions import EvictionTracker, Receipt
from meshlb.cluster.messages import DigestEntry, Eviction, FlowTuple, flow_record, flow_tuple_of


def tracker(**kw) -> EvictionTracker:
    args = dict(buffer_max=1000, buffer_ttl=60.0, gap_timeout=30.0, digest_recent=8, repair_max=100,
                origins_max=100)
    args.update(kw)
    return EvictionTracker(**args)


def ev(origin="o", seq=1, epoch=0, i=None) -> Eviction:
    i = seq if i is None else i
    return Eviction(origin, epoch, seq, FlowTuple(f"198.18.0.{i % 250 + 1}", 1000 + i, "10.0.0.1", 80, 6))


def test_each_id_is_new_exactly_once_in_any_order():
    t = tracker()
    order = list(range(1, 201)) * 3
    random.Random(1).shuffle(order)
    new = [s for s in order if t.receive(ev(seq=s), 0.0) == Receipt.NEW]
    assert sorted(new) == list(range(1, 201))
    assert t.mark("o") == 200  # contiguous: nothing held above the mark


def test_origin_restart_starts_a_new_epoch_and_old_epoch_is_stale():
    t = tracker()
    for s in (1, 2, 3):
        t.receive(ev(seq=s, epoch=5), 0.0)
    assert t.receive(ev(seq=1, epoch=9), 1.0) == Receipt.NEW
    assert t.receive(ev(seq=4, epoch=5), 1.0) == Receipt.STALE
    assert t.receive(ev(seq=1, epoch=9), 1.0) == Receipt.DUPLICATE


def test_holes_are_given_up_after_gap_timeout():
    t = tracker(gap_timeout=10.0)
    t.receive(ev(seq=1), 0.0)
    t.receive(ev(seq=5), 1.0)
    t.expire(5.0)
    assert t.mark("o") == 1
    t.expire(11.5)
    assert t.mark("o") == 5 and t.abandoned == 3
    assert t.receive(ev(seq=3), 12.0) == Receipt.DUPLICATE  # too late: treated as seen


def test_seqs_above_the_mark_are_bounded():
    t = tracker()
    t.MAX_ABOVE = 16
    t.receive(ev(seq=1), 0.0)
    for s in range(3, 40):
        t.receive(ev(seq=s), 0.0)
    o = t._origins["o"]
    assert len(o.above) <= 16 and t.mark("o") > 1


def test_buffer_is_bounded_by_size_and_age():
    t = tracker(buffer_max=10, buffer_ttl=5.0)
    for s in range(1, 31):
        t.receive(ev(seq=s), float(s) * 0.01)
    assert t.buffered == 10
    t.expire(100.0)
    assert t.buffered == 0


def test_origins_are_bounded():
    t = tracker(origins_max=5)
    for i in range(20):
        t.receive(ev(origin=f"o{i}"), 0.0)
    assert t.origins == 5


def test_digest_lists_marks_and_recent_ids():
    t = tracker(digest_recent=2)
    for s in (1, 2, 4, 6, 9):
        t.receive(ev(seq=s), 0.0)
    t.receive(ev(origin="p", seq=1, epoch=3), 0.0)
    d = {e.origin: e for e in t.digest(1.0)}
    assert d["o"] == DigestEntry("o", 0, 2, (4, 6))
    assert d["p"] == DigestEntry("p", 3, 1, ())
    assert t.digest(1000.0) == []  # nothing active within the buffer's lifetime


def test_repair_sends_exactly_what_the_peer_lacks():
    have = tracker()
    for s in range(1, 11):
        have.receive(ev(seq=s), 0.0)
    have.receive(ev(origin="q", seq=1), 0.0)
    lack = tracker()
    for s in (1, 2, 3, 5, 8):
        lack.receive(ev(seq=s), 0.0)
    missing = have.missing(lack.digest(0.0))
    assert sorted((e.origin, e.seq) for e in missing) == [("o", 4), ("o", 6), ("o", 7), ("o", 9), ("o", 10),
                                                          ("q", 1)]
    for e in missing:
        assert lack.receive(e, 1.0) == Receipt.NEW
    assert have.missing(lack.digest(1.0)) == []


def test_repair_respects_epochs_and_the_cap():
    have = tracker(repair_max=3)
    for s in range(1, 11):
        have.receive(ev(seq=s, epoch=2), 0.0)
    newer = [DigestEntry("o", 3, 0, ())]
    assert have.missing(newer) == []  # the peer already moved to a newer epoch
    assert len(have.missing([DigestEntry("o", 1, 50, ())])) == 3  # older epoch: all, capped


def test_joiner_adopts_marks_so_it_is_not_flooded_with_history():
    t = tracker()
    t.adopt_baseline([DigestEntry("o", 0, 500, ())], 0.0)
    assert t.receive(ev(seq=400), 1.0) == Receipt.DUPLICATE
    assert t.receive(ev(seq=501), 1.0) == Receipt.NEW
    assert t.mark("o") == 501


def _rec(i: int) -> bytes:
    return flow_record(FlowTuple(f"198.18.0.{i % 250 + 1}", 1000 + i, "10.0.0.1", 80, 6))


def test_a_run_counts_seq_by_seq_with_singles_and_is_repaired_as_singles():
    t = tracker()
    assert t.receive(ev(seq=3), 0.0) == Receipt.NEW  # a hole below: 1, 2
    new = t.receive_run("o", 0, 1, [_rec(i) for i in range(1, 6)], 0.0)
    assert new == [0, 1, 3, 4]  # seq 3 was seen
    assert t.mark("o") == 5
    assert t.receive_run("o", 0, 4, [_rec(4), _rec(5), _rec(6)], 0.0) == [2]
    assert t.receive_run("o", 0, 7, [_rec(7)], 0.0) == [0]  # the next one: in one step
    assert t.receive(ev(seq=7), 0.0) == Receipt.DUPLICATE
    # a peer that has none of them gets every one, records turned into Evictions
    out = sorted(t.missing([DigestEntry("o", 0, 0, ())]), key=lambda e: e.seq)
    assert [e.seq for e in out] == list(range(1, 8))
    assert out[0] == Eviction("o", 0, 1, flow_tuple_of(_rec(1)))
    assert t.receive_run("n", 5, 1, [_rec(1)], 0.0) == [0]
    assert t.receive_run("n", 4, 2, [_rec(2)], 0.0) is None  # an older epoch: stale


def test_runs_out_of_order_fill_their_holes_and_are_offered_seq_by_seq():
    t = tracker(buffer_max=12)
    assert t.receive_run("o", 0, 5, [_rec(i) for i in range(5, 9)], 0.0) == [0, 1, 2, 3]
    assert t.mark("o") == 0 and t.digest(0.0)[0].recent[:4] == (5, 6, 7, 8)
    assert t.receive_run("o", 0, 1, [_rec(i) for i in range(1, 5)], 0.0) == [0, 1, 2, 3]
    assert t.mark("o") == 8 and t.digest(0.0)[0].recent == ()
    assert t.receive_run("o", 0, 3, [_rec(3), _rec(4)], 0.0) == []  # duplicates
    out = t.missing([DigestEntry("o", 0, 2, (5, 7))])
    assert sorted(e.seq for e in out) == [3, 4, 6, 8]
    assert all(e == Eviction("o", 0, e.seq, flow_tuple_of(_rec(e.seq))) for e in out)
    # the buffer counts evictions, not runs: 8 held, room for 4 more
    assert t.buffered == 8
    t.receive_run("o", 0, 9, [_rec(i) for i in range(9, 15)], 0.0)
    assert t.buffered <= 12 and t.mark("o") == 14
    # the oldest held went: 5 and 6 (a new origin's first run is taken seq by seq)
    assert sorted(e.seq for e in t.missing([])) == [1, 2, 3, 4, 7, 8, *range(9, 15)]
