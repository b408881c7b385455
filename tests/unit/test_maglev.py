from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlb import maglev
from meshlb.maglev import NO_BACKEND, Backend, build_table, canonical_names, table_digest

SMALL = 4099  # prime; keeps property tests quick


def names_of(table, backends):
    order = canonical_names(backends)
    return [None if i == NO_BACKEND else order[i] for i in table]


def moved_share(before, after):
    assert len(before) == len(after)
    return sum(1 for a, b in zip(before, after) if a != b) / len(before)


def mixes(n, weight=1):
    return [Backend(f"mix{i}", weight) for i in range(n)]


# --- determinism -----------------------------------------------------------------


def test_same_inputs_same_bytes_regardless_of_order():
    backends = mixes(37)
    shuffled = backends[:]
    random.Random(7).shuffle(shuffled)
    a = build_table(backends, SMALL)
    b = build_table(shuffled, SMALL)
    assert maglev.pack_table(a) == maglev.pack_table(b)
    assert table_digest("10.0.0.1:80/tcp", a, canonical_names(backends)) == table_digest(
        "10.0.0.1:80/tcp", b, canonical_names(shuffled)
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=12), st.integers(min_value=0, max_value=5)),
        min_size=0,
        max_size=12,
        unique_by=lambda t: t[0],
    ),
    st.randoms(use_true_random=False),
)
def test_property_order_independent(pairs, rnd):
    backends = [Backend(n, w) for n, w in pairs]
    shuffled = backends[:]
    rnd.shuffle(shuffled)
    a = names_of(build_table(backends, 251), backends)
    b = names_of(build_table(shuffled, 251), shuffled)
    assert a == b
    live = {n for n, w in pairs if w > 0}
    if live:
        # every slot is owned by a backend with positive weight
        assert set(a) <= live
    else:
        assert set(a) == {None}


def test_known_table_is_stable_across_processes():
    # Golden values, so a change to hashing or population (which would make mixes running
    # different versions disagree) is noticed. Recompute deliberately if the algorithm
    # is changed on purpose, and say so in the release notes.
    t = build_table([Backend("a"), Backend("b"), Backend("c")], 13)
    assert t == [2, 2, 1, 1, 2, 0, 1, 0, 0, 2, 1, 0, 0]
    assert table_digest("v", t, ["a", "b", "c"]) == "096b229b2f4fab50"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from meshlb.maglev import *; print(build_table([Backend('a'),Backend('b'),Backend('c')],13))",
        ],
        capture_output=True,
        text=True,
        check=True,
        # a different hash seed from this process: the table must not depend on hash()
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(maglev.__file__).parents[1])},
    )
    assert out.stdout.strip() == str(t)


def test_digest_changes_with_each_input():
    backends = mixes(5)
    t = build_table(backends, SMALL)
    names = canonical_names(backends)
    d = table_digest("vip", t, names)
    assert len(d) == 16 and int(d, 16) >= 0
    t2 = list(t)
    t2[0] = (t2[0] + 1) % 5
    assert table_digest("vip", t2, names) != d
    assert table_digest("vip2", t, names) != d
    assert table_digest("vip", t, names[:-1] + ["other"]) != d
    # length prefixes: moving a character between adjacent fields changes the digest
    assert table_digest("ab", [], ["c"]) != table_digest("a", [], ["bc"])


# --- balance -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_equal_weights_balance(n):
    table = build_table(mixes(n))
    counts = Counter(table)
    assert set(counts) == set(range(n))
    # round robin over a prime-sized table: shares differ by at most one slot
    assert max(counts.values()) - min(counts.values()) <= 1


def test_weights_proportional():
    backends = [Backend(f"m{i}", w) for i, w in enumerate([1, 2, 3, 5, 8, 13, 1, 1, 100])]
    table = build_table(backends)
    counts = Counter(table)
    total = sum(b.weight for b in backends)
    for i, b in enumerate(maglev.canonical(backends)):
        ideal = len(table) * b.weight / total
        assert abs(counts[i] - ideal) <= 2, (b, counts[i], ideal)


def test_zero_weight_gets_no_slots_but_keeps_index():
    backends = [Backend("a", 1), Backend("b", 0), Backend("c", 1)]
    table = build_table(backends, SMALL)
    assert canonical_names(backends) == ["a", "b", "c"]
    assert set(table) == {0, 2}


def test_weighted_scheduler_matches_paper_round_robin_for_equal_weights():
    # The weighted path must reduce to the paper's population when weights are equal,
    # so the fast path is an optimisation and not a different table.
    backends = maglev.canonical(mixes(23))
    size = SMALL

    def cursors():
        pos, skip = [], []
        for b in backends:
            raw = b.name.encode()
            pos.append(maglev._hash64(raw, maglev._OFFSET_PERSON) % size)
            skip.append(maglev._hash64(raw, maglev._SKIP_PERSON) % (size - 1) + 1)
        return pos, skip

    idx = list(range(len(backends)))
    p, s = cursors()
    rr = maglev._populate_round_robin([NO_BACKEND] * size, idx, p, s)
    p, s = cursors()
    wt = maglev._populate_weighted([NO_BACKEND] * size, idx, p, s, [3] * len(backends))
    assert rr == wt == build_table(backends, size)


def test_each_backend_follows_its_own_permutation():
    # Direct check of the paper's invariant on a tiny table: the first slot a lone
    # backend claims is its offset, the next is offset + skip, etc.
    b = Backend("solo")
    size = 7
    off = maglev._hash64(b"solo", maglev._OFFSET_PERSON) % size
    skip = maglev._hash64(b"solo", maglev._SKIP_PERSON) % (size - 1) + 1
    table = build_table([b, Backend("other", 0)], size)
    # canonical order is ["other", "solo"]: solo is index 1 and owns everything
    assert table == [1] * size
    assert sorted((off + j * skip) % size for j in range(size)) == list(range(size))


# --- disruption --------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 50, 100])
def test_removing_one_moves_about_one_nth(n):
    backends = mixes(n)
    before = names_of(build_table(backends), backends)
    gone = backends[n // 3]
    rest = [b for b in backends if b != gone]
    after = names_of(build_table(rest), rest)
    share = moved_share(before, after)
    # the departed backend's own slots must move; Maglev moves a little more than that
    own = before.count(gone.name) / len(before)
    assert share >= own
    assert share <= 2.0 / n, share
    assert gone.name not in after


@pytest.mark.parametrize("n", [10, 50, 100])
def test_adding_one_moves_about_one_nth(n):
    backends = mixes(n)
    before = names_of(build_table(backends), backends)
    grown = backends + [Backend("newcomer")]
    after = names_of(build_table(grown), grown)
    share = moved_share(before, after)
    assert share >= after.count("newcomer") / len(after)
    assert share <= 2.0 / (n + 1), share


# --- edges and validation ---------------------------------------------------------


def test_empty_backend_set_is_all_sentinel():
    assert build_table([], 13) == [NO_BACKEND] * 13
    assert build_table([Backend("a", 0)], 13) == [NO_BACKEND] * 13
    assert maglev.pack_table([NO_BACKEND]) == b"\xff\xff\xff\xff"


@pytest.mark.parametrize("size", [0, 1, 4, 65536, 100])
def test_size_must_be_prime(size):
    with pytest.raises(ValueError, match="prime"):
        build_table(mixes(2), size)


@pytest.mark.parametrize("size", [13.0, True, "13"])
def test_size_must_be_int(size):
    with pytest.raises(TypeError):
        build_table(mixes(2), size)


def test_backend_validation():
    with pytest.raises(ValueError, match="duplicate"):
        build_table([Backend("a"), Backend("a", 2)], 13)
    with pytest.raises(ValueError):
        Backend("")
    with pytest.raises(ValueError):
        Backend("a", -1)
    with pytest.raises(TypeError):
        Backend("a", 1.5)
    with pytest.raises(TypeError):
        Backend("a", True)


def test_is_prime():
    primes = [p for p in range(200) if maglev.is_prime(p)]
    assert primes[:10] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert len(primes) == 46
    assert maglev.is_prime(65537) and not maglev.is_prime(65535)


def test_build_is_fast_enough():
    backends = mixes(100)
    start = time.perf_counter()
    build_table(backends)
    elapsed = time.perf_counter() - start
    # the requirement is "well under a second" on a 2-core VM; the measured figure is ~0.05 s
    assert elapsed < 0.5, elapsed
