"""BPF map handle: element CRUD, iteration, batch operations, per-CPU values, pinning."""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator, Sequence
from ctypes import byref, c_uint32

from .libbpf_ffi import (
    ENOTSUPP,
    BpfError,
    Closeable,
    bpf_map_batch_opts,
    bpf_map_create_opts,
    bpf_map_info,
    check,
    info_by_fd,
    lib,
    obj_get,
    obj_pin,
    opts,
)

BPF_ANY, BPF_NOEXIST, BPF_EXIST, BPF_F_LOCK = 0, 1, 2, 4

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_DEVMAP = 14
BPF_MAP_TYPE_CPUMAP = 16
BPF_MAP_TYPE_XSKMAP = 17
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_DEVMAP_HASH = 25
BPF_MAP_TYPE_RINGBUF = 27

BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_MMAPABLE = 1 << 10
BPF_F_INNER_MAP = 1 << 12  # inner maps of differing max_entries may share an outer map

PERCPU_MAP_TYPES = frozenset({
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
})
# Array-like maps never lose keys, so iterating them needs no duplicate tracking.
_ARRAY_LIKE = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY,
                         BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_PROG_ARRAY})
# errnos meaning "this map type has no batch operation"
_NO_BATCH = frozenset({errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP})

_ncpus: int | None = None


def num_possible_cpus() -> int:
    """Possible (not online) CPUs: the number of slots in every per-CPU value."""
    global _ncpus
    if _ncpus is None:
        try:
            n = lib().libbpf_num_possible_cpus()
        except BpfError:
            n = -1
        if n <= 0:
            n = _parse_cpu_list(open("/sys/devices/system/cpu/possible").read())
        _ncpus = n
    return _ncpus


def _parse_cpu_list(text: str) -> int:
    top = 0
    for part in text.strip().split(","):
        top = max(top, int(part.split("-")[-1]))
    return top + 1


def _round8(n: int) -> int:
    return (n + 7) & ~7


class Map(Closeable):
    """One BPF map reached through a file descriptor.

    Maps handed out by :class:`~meshlb.dataplane.libbpf.BpfObject` share the
    object's descriptor (closed with the object); maps from :meth:`create`,
    :meth:`from_pinned` or :meth:`from_id` own theirs.
    """

    fd: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    percpu: bool

    def __init__(self, fd: int, name: str, map_type: int, key_size: int, value_size: int,
                 max_entries: int, *, owned: bool, map_flags: int = 0) -> None:
        self.fd = fd
        self.name = name
        self.type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.map_flags = map_flags
        self.percpu = map_type in PERCPU_MAP_TYPES
        self._owned = owned
        # Maps of a BpfObject keep it alive: its close would invalidate our fd.
        self._owner: object | None = None

    def __repr__(self) -> str:
        return (f"Map({self.name!r}, fd={self.fd}, type={self.type}, key_size={self.key_size}, "
                f"value_size={self.value_size}, max_entries={self.max_entries})")

    # ------------------------------------------------------------ construction
    @classmethod
    def _from_fd(cls, fd: int, what: str, *, owned: bool = True) -> Map:
        try:
            info = info_by_fd(fd, bpf_map_info, what)
        except BaseException:
            if owned:
                os.close(fd)
            raise
        return cls(fd, info.name.decode(errors="replace"), info.type, info.key_size,
                   info.value_size, info.max_entries, owned=owned, map_flags=info.map_flags)

    @classmethod
    def from_pinned(cls, path: str) -> Map:
        fd = obj_get(path)
        m = cls._from_fd(fd, f"map pinned at {path!r}")
        return m

    @classmethod
    def from_id(cls, map_id: int) -> Map:
        fd = check(lib().bpf_map_get_fd_by_id(map_id), f"bpf_map_get_fd_by_id({map_id})")
        return cls._from_fd(fd, f"map id {map_id}")

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, *,
               name: str = "", flags: int = 0, inner_map_fd: int | None = None) -> Map:
        o = opts(bpf_map_create_opts, map_flags=flags)
        if inner_map_fd is not None:
            o.inner_map_fd = inner_map_fd
        fd = check(lib().bpf_map_create(map_type, name.encode() or None, key_size, value_size,
                                         max_entries, byref(o)),
                   f"bpf_map_create(name={name!r}, type={map_type}, key_size={key_size}, "
                   f"value_size={value_size}, max_entries={max_entries})")
        return cls(fd, name, map_type, key_size, value_size, max_entries, owned=True,
                   map_flags=flags)

    def info(self) -> dict:
        i = info_by_fd(self._live_fd("info"), bpf_map_info, f"map {self.name!r}")
        return {"id": i.id, "type": i.type, "name": i.name.decode(errors="replace"),
                "key_size": i.key_size, "value_size": i.value_size,
                "max_entries": i.max_entries, "map_flags": i.map_flags}

    @property
    def id(self) -> int:
        return self.info()["id"]

    # ----------------------------------------------------------------- helpers
    def _live_fd(self, op: str) -> int:
        if self.fd < 0:
            raise BpfError(errno.EBADF, f"{op} on map {self.name!r}, which is not loaded "
                                        f"yet or was closed")
        return self.fd

    def _err(self, op: str) -> str:
        return f"{op} on map {self.name!r}"

    @property
    def _slot(self) -> int:
        """Bytes per CPU in a per-CPU value buffer (the kernel rounds to 8)."""
        return _round8(self.value_size)

    @property
    def _value_buf_size(self) -> int:
        return self._slot * num_possible_cpus() if self.percpu else self.value_size

    def _key(self, key: bytes, op: str) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"{self._err(op)}: key is {len(key)} bytes, map wants {self.key_size}")
        return bytes(key)

    def _encode_value(self, value, op: str) -> bytes:
        """Per-CPU maps take one value (replicated) or one per possible CPU."""
        if not self.percpu:
            if len(value) != self.value_size:
                raise ValueError(f"{self._err(op)}: value is {len(value)} bytes, "
                                 f"map wants {self.value_size}")
            return bytes(value)
        n = num_possible_cpus()
        if isinstance(value, (bytes, bytearray, memoryview)):
            values = [bytes(value)] * n
        else:
            values = [bytes(v) for v in value]
            if len(values) != n:
                raise ValueError(f"{self._err(op)}: {len(values)} per-CPU values given, "
                                 f"{n} possible CPUs")
        pad = self._slot - self.value_size
        out = bytearray()
        for v in values:
            if len(v) != self.value_size:
                raise ValueError(f"{self._err(op)}: per-CPU value is {len(v)} bytes, "
                                 f"map wants {self.value_size}")
            out += v + b"\0" * pad
        return bytes(out)

    def split_percpu(self, raw: bytes) -> list[bytes]:
        """Cut a raw per-CPU buffer into one value per CPU (dropping slot padding)."""
        s = self._slot
        return [raw[i:i + self.value_size] for i in range(0, len(raw), s)]

    # --------------------------------------------------------------- elements
    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None if absent. For per-CPU maps: the raw buffer of
        ``num_possible_cpus()`` slots of ``round_up(value_size, 8)`` bytes;
        prefer :meth:`lookup_percpu`."""
        k = self._key(key, "lookup")
        buf = ctypes.create_string_buffer(self._value_buf_size)
        ret = lib().bpf_map_lookup_elem(self._live_fd("lookup"), k, buf)
        if ret == -errno.ENOENT:
            return None
        check(ret, self._err("bpf_map_lookup_elem"))
        return buf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        if not self.percpu:
            raise TypeError(f"map {self.name!r} (type {self.type}) is not per-CPU")
        raw = self.lookup(key)
        return None if raw is None else self.split_percpu(raw)

    def update(self, key: bytes, value: bytes | Sequence[bytes], flags: int = BPF_ANY) -> None:
        """Per-CPU maps take one value (written to every CPU) or a list with
        one value per possible CPU."""
        k = self._key(key, "update")
        v = self._encode_value(value, "update")
        check(lib().bpf_map_update_elem(self._live_fd("update"), k, v, flags),
              self._err("bpf_map_update_elem"))

    def delete(self, key: bytes) -> bool:
        k = self._key(key, "delete")
        ret = lib().bpf_map_delete_elem(self._live_fd("delete"), k)
        if ret == -errno.ENOENT:
            return False
        check(ret, self._err("bpf_map_delete_elem"))
        return True

    def __contains__(self, key: bytes) -> bool:
        return self.lookup(key) is not None

    def _next_key(self, prev: bytes | None) -> bytes | None:
        nxt = ctypes.create_string_buffer(self.key_size)
        ret = lib().bpf_map_get_next_key(self._live_fd("keys"), prev, nxt)
        if ret == -errno.ENOENT:
            return None
        check(ret, self._err("bpf_map_get_next_key"))
        return nxt.raw

    def keys(self) -> Iterator[bytes]:
        """Every key once. A hash map restarts from its first key when the
        previous one was deleted meanwhile, so already-seen keys are skipped."""
        seen: set[bytes] | None = None if self.type in _ARRAY_LIKE else set()
        prev = None
        while True:
            k = self._next_key(prev)
            if k is None:
                return
            prev = k
            if seen is not None:
                if k in seen:
                    continue
                seen.add(k)
            yield k

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs; entries deleted during iteration are skipped.
        Per-CPU values are raw buffers as with :meth:`lookup`."""
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def items_percpu(self) -> Iterator[tuple[bytes, list[bytes]]]:
        for k, v in self.items():
            yield k, self.split_percpu(v)

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    # ------------------------------------------------------------------ batch
    def lookup_batch(self, batch_size: int = 4096) -> list[tuple[bytes, bytes]]:
        """All entries with BPF_MAP_LOOKUP_BATCH, falling back to iteration for
        map types without it. Per-CPU values are raw buffers."""
        out: list[tuple[bytes, bytes]] = []
        ks, vsz = self.key_size, self._value_buf_size
        for kr, vr, n in self.lookup_batch_raw(batch_size):
            for i in range(n):
                out.append((kr[i * ks:(i + 1) * ks], vr[i * vsz:(i + 1) * vsz]))
        return out

    def lookup_batch_raw(self, batch_size: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
        """The entries as the kernel hands them over: (keys, values, n) per batch,
        ``n`` keys of key_size bytes back to back and their values likewise. For a
        scan of a big map that looks at a field or two of each value (struct
        iter_unpack over the values) instead of cutting every entry out."""
        fd = self._live_fd("lookup_batch")
        vsz = self._value_buf_size
        # The batch cursor is opaque: a bucket index for hashes, a key for arrays.
        token_size = max(self.key_size, 8)
        in_tok = ctypes.create_string_buffer(token_size)
        out_tok = ctypes.create_string_buffer(token_size)
        first = True
        bs = max(1, batch_size)
        o = opts(bpf_map_batch_opts)
        while True:
            keys = ctypes.create_string_buffer(self.key_size * bs)
            vals = ctypes.create_string_buffer(vsz * bs)
            count = c_uint32(bs)
            ret = lib().bpf_map_lookup_batch(fd, None if first else in_tok, out_tok, keys,
                                             vals, byref(count), byref(o))
            if ret < 0 and ret != -errno.ENOENT:
                if -ret == errno.ENOSPC and count.value == 0:
                    bs *= 2  # one hash bucket holds more entries than the batch
                    continue
                if first and -ret in _NO_BATCH:
                    items = list(self.items())
                    yield b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items)
                    return
                check(ret, self._err("bpf_map_lookup_batch"))
            n = count.value
            if n:
                yield keys.raw[:n * self.key_size], vals.raw[:n * vsz], n
            if ret == -errno.ENOENT:
                return
            ctypes.memmove(in_tok, out_tok, token_size)
            first = False

    def lookup_batch_percpu(self, batch_size: int = 4096) -> list[tuple[bytes, list[bytes]]]:
        return [(k, self.split_percpu(v)) for k, v in self.lookup_batch(batch_size)]

    def update_batch(self, items: Sequence[tuple[bytes, bytes]], flags: int = BPF_ANY) -> None:
        """Write all ``items`` in one syscall (per-element fallback for map
        types without batch support). Values follow :meth:`update`'s rules."""
        items = list(items)
        if not items:
            return
        fd = self._live_fd("update_batch")
        keys = b"".join(self._key(k, "update_batch") for k, _ in items)
        vals = b"".join(self._encode_value(v, "update_batch") for _, v in items)
        count = c_uint32(len(items))
        o = opts(bpf_map_batch_opts, elem_flags=flags)
        ret = lib().bpf_map_update_batch(fd, keys, vals, byref(count), byref(o))
        if ret < 0 and -ret in _NO_BATCH and self._batch_unsupported(ret):
            for k, v in items:
                self.update(k, v, flags)
            return
        check(ret, self._err(f"bpf_map_update_batch ({count.value}/{len(items)} done)"))

    def update_batch_packed(self, keys: bytes, values: bytes, flags: int = BPF_ANY) -> None:
        """update_batch for callers that already hold the keys and values as two
        contiguous buffers (a 65537-slot Maglev table: one join instead of 65537
        encodes). Plain value maps only."""
        n, rem = divmod(len(keys), self.key_size)
        if rem or len(values) != n * self.value_size or self.percpu:
            raise ValueError(f"map {self.name}: packed batch of {len(keys)} key bytes and "
                             f"{len(values)} value bytes does not fit {self.key_size}/{self.value_size}")
        if n == 0:
            return
        fd = self._live_fd("update_batch")
        count = c_uint32(n)
        o = opts(bpf_map_batch_opts, elem_flags=flags)
        ret = lib().bpf_map_update_batch(fd, keys, values, byref(count), byref(o))
        if ret < 0 and -ret in _NO_BATCH and self._batch_unsupported(ret):
            ks, vs = self.key_size, self.value_size
            for i in range(n):
                self.update(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs], flags)
            return
        check(ret, self._err(f"bpf_map_update_batch ({count.value}/{n} done)"))

    def delete_batch(self, keys: Sequence[bytes]) -> int:
        """Delete ``keys``; returns how many existed. Absent keys are skipped."""
        ks = [self._key(k, "delete_batch") for k in keys]
        fd = self._live_fd("delete_batch")
        deleted = 0
        pos = 0
        o = opts(bpf_map_batch_opts)
        buf = ctypes.create_string_buffer(b"".join(ks), max(1, len(ks) * self.key_size))
        base = ctypes.addressof(buf)
        while pos < len(ks):
            count = c_uint32(len(ks) - pos)
            ret = lib().bpf_map_delete_batch(fd, base + pos * self.key_size, byref(count),
                                             byref(o))
            if ret >= 0:
                return deleted + count.value
            if ret == -errno.ENOENT:
                # The kernel stops at the first missing key: count it done and go on.
                deleted += count.value
                pos += count.value + 1
                continue
            if -ret in _NO_BATCH and pos == 0 and self._batch_unsupported(ret):
                return sum(1 for k in ks if self.delete(k))
            check(ret, self._err(f"bpf_map_delete_batch ({deleted + count.value}/{len(ks)} done)"))
        return deleted

    def _batch_unsupported(self, ret: int) -> bool:
        """Missing batch ops give ENOTSUPP before anything is processed. EINVAL
        also means bad arguments; treat it as "no batch support" only if this
        map type rejects a plain lookup batch the same way."""
        if -ret != errno.EINVAL:
            return True
        count = c_uint32(1)
        keys = ctypes.create_string_buffer(self.key_size)
        vals = ctypes.create_string_buffer(self._value_buf_size)
        tok = ctypes.create_string_buffer(max(self.key_size, 8))
        probe = lib().bpf_map_lookup_batch(self.fd, None, tok, keys, vals, byref(count),
                                           byref(opts(bpf_map_batch_opts)))
        return -probe in _NO_BATCH

    # ------------------------------------------------------------ map-in-map
    def set_inner(self, key: bytes, inner: Map, flags: int = BPF_ANY) -> None:
        """Point an ARRAY_OF_MAPS/HASH_OF_MAPS slot at ``inner`` (atomic swap)."""
        k = self._key(key, "set_inner")
        check(lib().bpf_map_update_elem(self._live_fd("set_inner"), k,
                                        struct.pack("=I", inner.fd), flags),
              self._err(f"set_inner({inner.name!r})"))

    def inner_id(self, key: bytes) -> int | None:
        """Map id stored in a map-in-map slot (lookups return ids, not fds)."""
        raw = self.lookup(key)
        return None if raw is None else struct.unpack("=I", raw[:4])[0]

    # ---------------------------------------------------------------- pinning
    def pin(self, path: str) -> None:
        obj_pin(self._live_fd("pin"), path, f"map {self.name!r}")

    def unpin(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError as e:
            raise BpfError(e.errno, f"unpin map {self.name!r} at {path!r}: {e.strerror}") from None

    def close(self) -> None:
        """Close an fd we own; maps of a BpfObject close with the object."""
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

