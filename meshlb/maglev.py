"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), pure and deterministic.

Every mix builds the lookup table for a VIP from the cluster's agreed backend set and
writes it into a BPF array; the XDP program indexes that array with the flow hash. The
table must therefore be identical, byte for byte, on every mix that sees the same
backend set, whatever order the set arrived in and whichever Python process built it.

Contract
--------
* ``build_table(backends, size)`` sorts the backends by name (duplicates are an error)
  and returns a list of ``size`` integers: each entry is an index into that name-sorted
  order, or ``NO_BACKEND`` (0xFFFFFFFF) when no backend has positive weight. Indices
  rather than names because the data plane stores small integers, and the sorted order
  is recoverable anywhere with ``canonical_names(backends)``.
* Each backend's permutation of the slots comes from two independent keyed BLAKE2b
  hashes of its name (``offset`` and ``skip``, as in section 3.4 of the paper). Python's
  ``hash()`` is salted per process and is never used.
* ``size`` must be prime so that every ``skip`` in ``1..size-1`` is coprime with it and
  each permutation visits every slot exactly once.

Weights
-------
The paper's population loop lets every backend in turn claim its next preferred free
slot. Weighted populations (as in Katran's "Maglev v2" and later follow-ups) give a
backend turns in proportion to its weight. Here the turns are scheduled by stride
scheduling with exact integer arithmetic: backend *i* has stride ``L / w_i`` (``L`` the
least common multiple of the weights), its *k*-th turn happens at virtual time
``k * L / w_i``, and ties go to the lower index. With equal weights this is exactly the
paper's round robin, so each backend gets ``floor(size/n)`` or ``ceil(size/n)`` slots;
with unequal weights each backend's slot count is within about one slot of
``size * w_i / sum(w)``. A weight of 0 keeps the backend in the index space (useful
while it drains) but gives it no slots.
"""
from __future__ import annotations

import hashlib
import heapq
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Backend",
    "DEFAULT_SIZE",
    "NO_BACKEND",
    "build_table",
    "canonical",
    "canonical_names",
    "is_prime",
    "pack_table",
    "table_digest",
]

DEFAULT_SIZE = 65537
# u32 all-ones, so a table packs straight into a BPF array of __u32 with the sentinel intact
NO_BACKEND = 0xFFFFFFFF

# Personalisation strings make the two hashes independent functions of the same name.
_OFFSET_PERSON = b"meshlb.mgl.off"
_SKIP_PERSON = b"meshlb.mgl.skip"
_DIGEST_PERSON = b"meshlb.mgl.tbl"


@dataclass(frozen=True, order=True)
class Backend:
    name: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"backend name must be a non-empty string, got {self.name!r}")
        # bool is an int subclass; a weight of True is almost certainly a mistake
        if isinstance(self.weight, bool) or not isinstance(self.weight, int):
            raise TypeError(f"backend {self.name!r}: weight must be an int, got {self.weight!r}")
        if self.weight < 0:
            raise ValueError(f"backend {self.name!r}: weight must be >= 0, got {self.weight}")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    limit = math.isqrt(n)
    f = 3
    while f <= limit:
        if n % f == 0:
            return False
        f += 2
    return True


def canonical(backends: Iterable[Backend]) -> list[Backend]:
    """The backends in the order table indices refer to (sorted by name)."""
    ordered = sorted(backends, key=lambda b: b.name)
    for a, b in zip(ordered, ordered[1:]):
        if a.name == b.name:
            raise ValueError(f"duplicate backend name {a.name!r}")
    return ordered


def canonical_names(backends: Iterable[Backend]) -> list[str]:
    return [b.name for b in canonical(backends)]


def _hash64(name: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name, digest_size=8, person=person).digest(), "little")


def _validate_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"maglev table size must be an int, got {size!r}")
    if not is_prime(size):
        raise ValueError(f"maglev table size must be a prime number, got {size}")


def build_table(backends: Sequence[Backend], size: int = DEFAULT_SIZE) -> list[int]:
    """Return the Maglev lookup table: ``size`` indices into ``canonical(backends)``."""
    _validate_size(size)
    ordered = canonical(backends)
    table = [NO_BACKEND] * size
    live = [(i, b) for i, b in enumerate(ordered) if b.weight > 0]
    if not live:
        return table

    # per-backend cursor into its permutation: next candidate slot and step
    index = [i for i, _ in live]
    pos = []
    skip = []
    for _, b in live:
        raw = b.name.encode("utf-8")
        pos.append(_hash64(raw, _OFFSET_PERSON) % size)
        skip.append(_hash64(raw, _SKIP_PERSON) % (size - 1) + 1)

    if len({b.weight for _, b in live}) == 1:
        # Equal weights are the common case; the plain round robin skips a heap
        # operation per slot and yields the same table as the weighted scheduler.
        return _populate_round_robin(table, index, pos, skip)
    return _populate_weighted(table, index, pos, skip, [b.weight for _, b in live])


def _populate_round_robin(table: list[int], index: list[int], pos: list[int], skip: list[int]) -> list[int]:
    size = len(table)
    # A bytearray of taken flags is much cheaper to probe than comparing list entries
    taken = bytearray(size)
    filled = 0
    turns = list(zip(range(len(index)), index, skip))
    while True:
        for k, i, s in turns:
            c = pos[k]
            while taken[c]:
                c += s
                if c >= size:
                    c -= size
            taken[c] = 1
            table[c] = i
            c += s
            pos[k] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table


def _populate_weighted(
    table: list[int], index: list[int], pos: list[int], skip: list[int], weights: list[int]
) -> list[int]:
    size = len(table)
    taken = bytearray(size)
    filled = 0
    lcm = math.lcm(*weights)
    # (virtual time of next turn, position in live list, stride); the position breaks
    # ties, and it follows name order, so ties are resolved identically everywhere
    heap = [(lcm // w, k, lcm // w) for k, w in enumerate(weights)]
    heapq.heapify(heap)
    while True:
        when, k, stride = heap[0]
        c = pos[k]
        s = skip[k]
        while taken[c]:
            c += s
            if c >= size:
                c -= size
        taken[c] = 1
        table[c] = index[k]
        c += s
        pos[k] = c - size if c >= size else c
        filled += 1
        if filled == size:
            return table
        heapq.heapreplace(heap, (when + stride, k, stride))


def pack_table(table: Sequence[int]) -> bytes:
    """The table as little-endian u32s: the bytes digested, and the BPF array's layout
    on x86-64 and arm64."""
    return struct.pack(f"<{len(table)}I", *table)


def table_digest(vip_key: str, table: Sequence[int], names: Sequence[str]) -> str:
    """Short hex digest of (VIP, backend names in index order, table).

    Members gossip it so that a mix whose table diverges is visible. Every variable-length
    field is length-prefixed so that no two distinct inputs share a byte encoding.
    """
    h = hashlib.blake2b(digest_size=8, person=_DIGEST_PERSON)

    def field(data: bytes) -> None:
        h.update(struct.pack("<I", len(data)))
        h.update(data)

    field(vip_key.encode("utf-8"))
    h.update(struct.pack("<I", len(names)))
    for n in names:
        field(n.encode("utf-8"))
    field(pack_table(table))
    return h.hexdigest()
