"""Eviction marks that outlive the agent, pinned beside the conntrack they describe.

A restarted agent adopts the pinned conntrack map, and with it every flow that was
open when the old agent died. Evictions published while no agent ran must still be
applied to those flows. The cluster protocol numbers evictions per origin; this map
keeps, per origin, the number up to which every eviction was applied here, so the
new agent can ask its peers for exactly the ones above it.

The map is written by the agent only (no BPF program reads it) and lives and dies
with the other pins: a mark without the conntrack it describes means nothing.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

from .libbpf import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_HASH, BpfError, Map

__all__ = ["MarkStore", "NAME_MAX"]

NAME_MAX = 64  # bytes of a member name in the key (config names are shorter)


class _Mark(ctypes.Structure):
    _fields_ = [("epoch", ctypes.c_uint64), ("mark", ctypes.c_uint64)]


def _key(origin: str) -> bytes:
    raw = origin.encode()
    if len(raw) > NAME_MAX:
        raise ValueError(f"member name longer than {NAME_MAX} bytes: {origin!r}")
    return raw.ljust(NAME_MAX, b"\0")


class MarkStore:
    """(origin -> (epoch, mark)) in a pinned BPF hash map."""

    def __init__(self, m: Map, path: Path) -> None:
        self._map = m
        self.path = path
        self._written: dict[str, tuple[int, int]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, max_entries: int) -> MarkStore:
        """Adopt the map pinned at ``path``, or create and pin an empty one."""
        path = Path(path)
        if path.exists():
            m = Map.from_pinned(str(path))
            if m.key_size != NAME_MAX or m.value_size != ctypes.sizeof(_Mark):
                m.close()
                raise BpfError(0, f"{path}: not a mark store (key {m.key_size}, value {m.value_size})")
            store = cls(m, path)
            store._written = store.load()
            return store
        m = Map.create(BPF_MAP_TYPE_HASH, NAME_MAX, ctypes.sizeof(_Mark), max_entries, name="mlb_ev_marks",
                       flags=BPF_F_NO_PREALLOC)  # origins are few; allocate as used
        try:
            m.pin(str(path))
        except BaseException:
            m.close()
            raise
        return cls(m, path)

    def load(self) -> dict[str, tuple[int, int]]:
        out = {}
        for k, v in self._map.lookup_batch():
            name = k.rstrip(b"\0").decode(errors="replace")
            mk = _Mark.from_buffer_copy(v)
            out[name] = (mk.epoch, mk.mark)
        return out

    def save(self, marks: Iterable[tuple[str, int, int]]) -> int:
        """Write the marks that changed since the last save; returns how many."""
        changed = []
        for origin, epoch, mark in marks:
            if self._written.get(origin) != (epoch, mark):
                changed.append((origin, epoch, mark))
        if changed:
            self._map.update_batch([(_key(o), bytes(_Mark(e, m))) for o, e, m in changed])
            for o, e, m in changed:
                self._written[o] = (e, m)
        return len(changed)

    def unpin(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._map.close()
