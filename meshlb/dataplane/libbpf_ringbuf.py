"""BPF ring buffer reader: the mapped pages of a RINGBUF map, committed when told to
(libbpf's ring_buffer__* commits each record as its callback returns)."""
from __future__ import annotations

import errno
import mmap
from collections.abc import Callable

from .libbpf_ffi import BpfError
from .libbpf_map import BPF_MAP_TYPE_RINGBUF, Map

# struct bpf_ringbuf_hdr: u32 len (two flag bits on top), u32 pg_off
_RB_BUSY = 1 << 31
_RB_DISCARD = 1 << 30
_RB_HDR = 8


class RingReader:
    """Reads a RINGBUF map through its mmap pages and moves the consumer position
    only when told to (:meth:`commit`).

    libbpf's consumer commits each record as its callback returns. A reader that must
    not lose a record it has read but not yet acted on (an agent killed between
    reading a socket close and telling its peers about it) commits later: whatever
    it read but did not commit is read again by the next reader of the pinned map.

    Reading is single-threaded; the kernel side is any number of producers. Loads of
    the positions and record headers are aligned native loads (memoryview casts), the
    ordering x86's memory model gives (the kernel publishes a header with a release
    store after its data).
    """

    def __init__(self, map: Map) -> None:
        if map.type != BPF_MAP_TYPE_RINGBUF:
            raise BpfError(errno.EINVAL, f"ring reader: map {map.name!r} is type {map.type}, not RINGBUF")
        self._map = map
        size = map.max_entries
        if size <= 0 or size & (size - 1):
            raise BpfError(errno.EINVAL, f"ring reader: map {map.name!r} size {size} is not a power of two")
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._cons_mm = mmap.mmap(map.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # producer page, then the data pages mapped twice (a record that wraps reads
        # contiguously)
        self._prod_mm = mmap.mmap(map.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons_view = memoryview(self._cons_mm)
        self._cons = self._cons_view[:8].cast("Q")
        self._prod_view = pm = memoryview(self._prod_mm)
        self._prod = pm[:8].cast("Q")
        self._data = pm[page:]
        self._hdr = self._data.cast("I")
        self._read = self._cons[0]  # next record to read; >= the committed position

    @property
    def fd(self) -> int:
        """Pollable: readable while the committed position is behind the producer."""
        return self._map.fd

    @property
    def committed(self) -> int:
        return self._cons[0]

    @property
    def position(self) -> int:
        return self._read

    def uncommitted(self) -> bool:
        return self._read != self._cons[0]

    def available(self) -> bool:
        """Records were written past the read position."""
        return self._prod[0] > self._read

    def read(self, callback: Callable[[bytes], None], limit: int = 0) -> int:
        """Hand each record from the read position on to ``callback`` (at most
        ``limit`` when > 0); returns how many. Nothing is committed. An exception
        from the callback propagates; the record it was given counts as read."""
        if self._data is None:
            raise BpfError(errno.EBADF, f"read on closed ring reader of map {self._map.name!r}")
        n = 0
        pos = self._read
        prod = self._prod[0]
        mask, hdr, data = self._mask, self._hdr, self._data
        while pos < prod:
            off = pos & mask
            word = hdr[off >> 2]
            if word & _RB_BUSY:
                break  # reserved, not yet submitted: later records wait behind it
            length = word & ~(_RB_BUSY | _RB_DISCARD)
            start = off + _RB_HDR
            self._read = pos = pos + ((length + _RB_HDR + 7) & ~7)
            if not word & _RB_DISCARD:
                n += 1
                callback(bytes(data[start:start + length]))
                if limit and n >= limit:
                    break
            if pos >= prod:
                prod = self._prod[0]
        return n

    def commit(self, position: int | None = None) -> None:
        """Release the ring space up to ``position`` (default: everything read)."""
        pos = self._read if position is None else position
        if not self._cons[0] <= pos <= self._read:
            raise ValueError(f"commit position {pos} outside [{self._cons[0]}, {self._read}]")
        self._cons[0] = pos

    def rewind(self) -> None:
        """Read again from the committed position."""
        self._read = self._cons[0]

    def close(self) -> None:
        if self._data is None:
            return
        for v in (self._hdr, self._data, self._prod, self._prod_view, self._cons, self._cons_view):
            v.release()
        self._hdr = self._data = None  # type: ignore[assignment]
        self._prod_mm.close()
        self._cons_mm.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
