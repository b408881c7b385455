"""Typed view of the XDP balancer (bpf/balancer.bpf.c) and its maps.

Every key and value goes through the ctypes structures of :mod:`layouts`, so the
Python side cannot disagree with the C layout (tests/bpf/test_layouts_btf.py).

State outlives the agent: with ``pin_dir`` the maps are pinned there on first load
and adopted (``reuse_pinned_map``) by the next load, so conntrack, VIPs, backends and
Maglev tables survive an agent restart.
"""
from __future__ import annotations

import array
import collections
import ctypes
import errno
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from . import capacity
from . import layouts as L
from .layouts import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    Backend,
    Counter,
    CtValue,
    FlowKey,
    LbStats,
    NatRevValue,
    SnatConfig,
    VipKey,
    VipMeta,
)
from .libbpf import (
    BPF_MAP_TYPE_ARRAY,
    BpfError,
    BpfObject,
    Link,
    Map,
    Program,
)

OBJECT_PATH = Path(__file__).with_name("bpf") / "balancer.bpf.o"
PROGRAM = "meshlb_balancer"
EVICT_PROGRAM = "meshlb_evict"
CLOCK_PROGRAM = "meshlb_clock_sync"
NEIGH_PROGRAM = "meshlb_neigh"
# MLB_PROG_* slot -> the program the XDP program tail-calls there
TAIL_PROGRAMS = {L.MLB_PROG_ICMP: "meshlb_icmp", L.MLB_PROG_TOO_BIG: "meshlb_too_big"}
# tick rates a kernel is built with (CONFIG_HZ), for a measured rate to snap to
_KNOWN_HZ = (100, 250, 300, 1000)
BPF_F_INNER_MAP = 1 << 12

MAP_NAMES = ("vips", "vip_info", "vip_filter", "vip_tables", "backends", "conntrack",
             "nat_reverse", "ct_closed", "snat_cfg", "fib_cache", "counters", "vip_stats",
             "backend_stats", "progs")
# maps of one load, never pinned: each load starts them afresh
LOAD_MAPS = ("neigh_handoff", "neigh_missing")
NEIGH_LINK_PIN = "neigh_link"  # the tc program's link, pinned beside the maps

MODES = {"dr": 0, "nat": L.MLB_VIP_F_NAT}
PROTOS = {"tcp": L.IPPROTO_TCP, "udp": L.IPPROTO_UDP,
          L.IPPROTO_TCP: L.IPPROTO_TCP, L.IPPROTO_UDP: L.IPPROTO_UDP}

_U32 = struct.Struct("=I")
# (last_seen_ns, flags) of one struct ct_value, for scans of the whole map
# last_seen_ns, backend_id, flags of a ct_value, from the raw bytes of a batch
_CT_SEEN_BACKEND_FLAGS = struct.Struct(f"=QI{CtValue.flags.offset - 12}xI"
                                       f"{ctypes.sizeof(CtValue) - CtValue.flags.offset - 4}x")
assert (CtValue.last_seen_ns.offset, CtValue.backend_id.offset) == (0, 8)
assert _CT_SEEN_BACKEND_FLAGS.size == ctypes.sizeof(CtValue)
# backend_id, vip_id of a ct_value
_CT_BACKEND_VIP = struct.Struct(f"={CtValue.backend_id.offset}xI{CtValue.vip_id.offset - CtValue.backend_id.offset - 4}xI"
                                f"{ctypes.sizeof(CtValue) - CtValue.vip_id.offset - 4}x")
# struct evict_batch as the agent writes and reads it through mmap
_KEY_SIZE = ctypes.sizeof(FlowKey)
_SLOT_SIZE = ctypes.sizeof(L.EvictSlot)
_SLOTS_AT = L.EvictBatch.slots.offset
_SLOT_TAIL = _SLOT_SIZE - _KEY_SIZE - 4  # result and ct, written by the program
_SLOT_OUT = struct.Struct(f"={L.EvictSlot.result.offset}xI{ctypes.sizeof(CtValue)}s")
assert L.EvictSlot.op.offset == _KEY_SIZE and L.EvictSlot.ct.offset == L.EvictSlot.result.offset + 4
assert _SLOT_OUT.size == _SLOT_SIZE
# A table slot with no backend (a VIP whose backends are all gone): outside the
# backends array, so the data plane finds nothing there and counts DROP_NO_BACKEND.
NO_BACKEND = 0xFFFFFFFF


# ------------------------------------------------------------------ flow hash
def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def _mix(h: int, w: int) -> int:
    w = (w * 0xCC9E2D51) & 0xFFFFFFFF
    w = _rotl(w, 15)
    w = (w * 0x1B873593) & 0xFFFFFFFF
    h ^= w
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & 0xFFFFFFFF


def flow_hash(key: FlowKey) -> int:
    """The balancer's flow hash (flow_hash() in balancer.bpf.c), bit for bit."""
    w = struct.unpack("=10I", bytes(key))
    idx = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9) if key.family == AF_INET6 else (0, 4, 8, 9)
    h = L.MLB_HASH_SEED
    for i in idx:
        h = _mix(h, w[i])
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def table_slot(key: FlowKey, ring_size: int) -> int:
    """Index of the Maglev table entry a new flow uses."""
    return flow_hash(key) % ring_size


def _has_map(obj: BpfObject, name: str) -> bool:
    try:
        obj.map(name)
    except KeyError:
        return False
    return True


def _has_program(obj: BpfObject, name: str) -> bool:
    try:
        obj.program(name)
    except KeyError:
        return False
    return True


def tick_rate(first: L.ClockSync, second: L.ClockSync) -> int:
    """The kernel's HZ from two readings of (jiffies, CLOCK_MONOTONIC), snapped to a
    rate kernels are built with when it is within 10% of one."""
    rate = (second.jiffies - first.jiffies) * 1e9 / max(1, second.mono_ns - first.mono_ns)
    near = min(_KNOWN_HZ, key=lambda h: abs(h - rate))
    return near if abs(near - rate) < near / 10 else max(1, round(rate))


def _proto(proto) -> int:
    try:
        return PROTOS[proto.lower() if isinstance(proto, str) else proto]
    except KeyError:
        raise ValueError(f"protocol must be tcp or udp, not {proto!r}") from None


def vip_key(addr, port: int, proto) -> VipKey:
    fam, words = L.addr_words(addr)
    k = VipKey()
    k.addr[:] = words
    k.port = L.port_be(port)
    k.proto = _proto(proto)
    k.family = fam
    return k


class Balancer:
    """The loaded balancer object and typed access to its maps."""

    def __init__(self, obj: BpfObject, pin_dir: str | os.PathLike | None = None) -> None:
        self.obj = obj
        self.pin_dir = Path(pin_dir) if pin_dir is not None else None
        # an object of an older meshlb (a benchmark's baseline) may lack some
        self.maps: dict[str, Map] = {n: obj.map(n) for n in MAP_NAMES + LOAD_MAPS
                                     if _has_map(obj, n)}
        self._evict_buf: mmap.mmap | None = None
        self._evict_lock = threading.Lock()
        self._hz = 0

    # -------------------------------------------------------------- lifecycle
    @classmethod
    def load(cls, pin_dir: str | os.PathLike | None = None, *,
             conntrack_size: int | None = None, path: str | os.PathLike | None = None,
             ) -> Balancer:
        """Load the balancer. With ``pin_dir``, maps pinned there are adopted and
        the rest are pinned after load. ``conntrack_size`` is the size (max_entries)
        of both conntrack maps, the configuration's ``conntrack.max_entries``; None or
        0: the host's default, made for its CPUs and memory (:func:`capacity.plan`).
        What a map holds before it evicts a flow is :meth:`conntrack_capacity`, a few
        hundred entries less (capacity.py says why). Adopted maps keep their size."""
        obj = BpfObject.open(path or OBJECT_PATH)
        try:
            size = conntrack_size or capacity.plan().max_entries
            obj.set_max_entries("conntrack", size)
            obj.set_max_entries("nat_reverse", size)
            if pin_dir is not None:
                for name in MAP_NAMES + (NEIGH_LINK_PIN,):
                    p = Path(pin_dir) / name
                    if p.exists() and _has_map(obj, name):
                        obj.reuse_pinned_map(name, str(p))
            obj.load()
        except BaseException:
            obj.close()
            raise
        b = cls(obj, pin_dir)
        try:
            b._fill_progs()
            if _has_program(obj, CLOCK_PROGRAM):
                b.sync_clock()
        except BaseException:
            b.close()
            raise
        if pin_dir is not None:
            b.pin(pin_dir)
        return b

    def _fill_progs(self) -> None:
        """Point the tail-call slots at this load's programs (an adopted slot array held
        the previous load's)."""
        m = self.maps.get("progs")
        if m is None:
            return
        for slot, name in TAIL_PROGRAMS.items():
            m.update(_U32.pack(slot), _U32.pack(self.obj.program(name).fd))

    def sync_clock(self) -> int:
        """Set the data plane's clock (mlb_now in balancer.bpf.c: jiffies scaled to
        CLOCK_MONOTONIC ns) from one reading of both; returns the tick rate. Without
        CONFIG_HZ from the kernel's config, the rate is measured once, over 100 ms."""
        prog = self.obj.program(CLOCK_PROGRAM)

        def run(hz: int) -> L.ClockSync:
            out = prog.test_run(ctx=bytes(L.ClockSync(hz=hz))).ctx
            if out is None:
                raise BpfError(0, f"{CLOCK_PROGRAM}: the kernel gave no context back")
            return L.ClockSync.from_bytes(out)

        c = run(self._hz)
        if not c.hz:
            time.sleep(0.1)
            c = run(tick_rate(c, run(0)))
        self._hz = c.hz
        return c.hz

    def conntrack_capacity(self) -> int:
        """Flows the conntrack holds before it evicts one, however their packets
        spread over the CPUs (capacity.py says how that follows from the map)."""
        i = self.maps["conntrack"].info()
        return capacity.capacity_of(i["max_entries"], capacity.possible_cpus(), i["map_flags"])

    @property
    def program(self) -> Program:
        return self.obj.program(PROGRAM)

    def attach(self, ifindex: int, mode: str = "native") -> Link:
        return self.program.attach_xdp(ifindex, mode)

    def pin(self, pin_dir: str | os.PathLike) -> None:
        """Pin every map not yet pinned under ``pin_dir``."""
        d = Path(pin_dir)
        d.mkdir(parents=True, exist_ok=True)
        for name, m in self.maps.items():
            p = d / name
            if name not in LOAD_MAPS and not p.exists():
                m.pin(str(p))
        self.pin_dir = d

    def unpin(self) -> None:
        if self.pin_dir is None:
            return
        for name in MAP_NAMES + (NEIGH_LINK_PIN,):
            try:
                os.unlink(self.pin_dir / name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self._evict_buf is not None:
            self._evict_buf.close()
            self._evict_buf = None
        self.obj.close()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ VIPs
    def add_vip(self, addr, port: int, proto="tcp", mode: str = "dr", *, vip_id: int,
                ring_size: int = L.MLB_DEFAULT_RING, flags: int = 0) -> VipKey:
        """Add or update a VIP. Install its table (set_vip_table) before traffic
        arrives: a VIP without a table drops (counter DROP_NO_TABLE). Changing the
        mode of an existing VIP makes its established flows start over."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
        if not 0 <= vip_id < L.MLB_MAX_VIPS:
            raise ValueError(f"vip_id {vip_id} outside 0..{L.MLB_MAX_VIPS - 1}")
        if not 1 <= ring_size <= 1 << 24:
            raise ValueError(f"ring_size {ring_size} outside 1..{1 << 24}")
        k = vip_key(addr, port, proto)
        for other_k, other in self.vips():
            if other.vip_id == vip_id and bytes(other_k) != bytes(k):
                raise ValueError(f"vip_id {vip_id} already used by another VIP")
        new_flags = MODES[mode] | flags | L.MLB_VIP_F_ACTIVE
        old = self._vip_info(vip_id)
        same = old.flags & L.MLB_VIP_F_ACTIVE and old.flags == new_flags
        gen = old.gen if same else (old.gen + 1) & 0xFFFFFFFF
        m = VipMeta(vip_id=vip_id, flags=new_flags, ring_size=ring_size, gen=gen)
        # by id first (the conntrack hit path), then the filter, then by address:
        # a packet that finds the VIP by address finds everything else too
        self.maps["vip_info"].update(_U32.pack(vip_id), bytes(m))
        self._sync_filter(extra=[k])
        self.maps["vips"].update(bytes(k), bytes(m))
        return k

    def _vip_info(self, vip_id: int) -> VipMeta:
        raw = self.maps["vip_info"].lookup(_U32.pack(vip_id))
        if raw is None:  # an array: every index below max_entries exists
            raise KeyError(f"vip_info[{vip_id}]: beyond the array")
        return VipMeta.from_bytes(raw)

    def _sync_filter(self, extra: Sequence[VipKey] = ()) -> None:
        """Make vip_filter count exactly the VIPs (plus ``extra``) per slot."""
        want = [0] * L.MLB_VIP_FILTER_SLOTS
        keys = {bytes(k): k for k, _ in self.vips()}
        for k in extra:
            keys[bytes(k)] = k
        for k in keys.values():
            want[L.vip_filter_slot(L.words_addr(k.addr, k.family))] += 1
        m = self.maps["vip_filter"]
        have = {_U32.unpack(k)[0]: _U32.unpack(v)[0] for k, v in m.lookup_batch()}
        changed = [(_U32.pack(i), _U32.pack(n)) for i, n in enumerate(want)
                   if have.get(i, 0) != n]
        if changed:
            m.update_batch(changed)

    def remove_vip(self, addr, port: int, proto="tcp") -> bool:
        """Remove a VIP and its table. Its packets, established flows included,
        become "not a VIP" (PASS)."""
        k = vip_key(addr, port, proto)
        raw = self.maps["vips"].lookup(bytes(k))
        if raw is None:
            return False
        meta = VipMeta.from_bytes(raw)
        self.maps["vips"].delete(bytes(k))
        old = self._vip_info(meta.vip_id)
        gone = VipMeta(vip_id=meta.vip_id, flags=0, ring_size=0, gen=(old.gen + 1) & 0xFFFFFFFF)
        self.maps["vip_info"].update(_U32.pack(meta.vip_id), bytes(gone))
        self._sync_filter()
        # after the VIP entry, so no packet finds the VIP without its table
        self.maps["vip_tables"].delete(_U32.pack(meta.vip_id))
        return True

    def vips(self) -> list[tuple[VipKey, VipMeta]]:
        return [(VipKey.from_bytes(k), VipMeta.from_bytes(v))
                for k, v in self.maps["vips"].items()]

    def _active_vip(self, vip_id: int) -> VipMeta | None:
        """The VIP's meta by id, one array read (vip_info mirrors the vips hash)."""
        if not 0 <= vip_id < L.MLB_MAX_VIPS:
            return None
        m = self._vip_info(vip_id)
        return m if m.flags & L.MLB_VIP_F_ACTIVE else None

    def vip_meta(self, vip_id: int) -> VipMeta | None:
        for _, m in self.vips():
            if m.vip_id == vip_id:
                return m
        return None

    # -------------------------------------------------------------- backends
    def set_backend(self, backend_id: int, addr, port: int = 0, *, local: bool = False,
                    down: bool = False, external: bool = False) -> None:
        """``port`` is the nat target port (0: keep the VIP's port); dr ignores it.
        ``external``: a real server, not a mix (no peer mark on what goes to it)."""
        if not 0 <= backend_id < L.MLB_MAX_BACKENDS:
            raise ValueError(f"backend_id {backend_id} outside 0..{L.MLB_MAX_BACKENDS - 1}")
        fam, words = L.addr_words(addr)
        old = self.backend(backend_id)
        b = Backend(family=fam, port=L.port_be(port),
                    flags=L.MLB_BE_F_VALID | (L.MLB_BE_F_LOCAL if local else 0)
                    | (L.MLB_BE_F_DOWN if down else 0) | (L.MLB_BE_F_EXTERNAL if external else 0))
        b.addr[:] = words
        self.maps["backends"].update(_U32.pack(backend_id), bytes(b))
        # a re-used address may now have another next hop (the agent also calls
        # flush_fib_cache on neighbour changes); entries expire on their own anyway
        self.forget_next_hop(addr)
        if old is not None:
            self.forget_next_hop(L.words_addr(old.addr, old.family))

    # ------------------------------------------------------------- neighbours
    def neighbour_handoff(self, ifindex: int, link: Link | None = None) -> Link:
        """Have packets whose next hop has no neighbour entry sent, on ``ifindex`` (the
        device XDP runs on), by the kernel's own neighbour resolution: attaches the tc
        ingress program meshlb_neigh there as a tcx link (Linux 6.6 and later), or
        moves ``link`` (that program's link adopted from a pin) to this load's program,
        then tells the XDP program to hand such packets over. Without it they are
        dropped (counter drop_no_neigh). Returns the link: the caller pins it beside
        the XDP link and keeps it."""
        prog = self.obj.program(NEIGH_PROGRAM)
        if link is None:
            link = prog.attach_tcx(ifindex)
        else:
            link.update(prog)
        self.maps["neigh_handoff"].update(_U32.pack(ifindex), _U32.pack(1))
        return link

    def ensure_neighbour_handoff(self, ifindex: int) -> Link | None:
        """What the agent calls once XDP is attached (and again after a restart): the tc
        program's link pinned under the pin directory is moved to this load's program,
        or attached and pinned; then the XDP program hands packets without a neighbour
        entry over on ``ifindex``. None where the kernel has no tcx links (Linux < 6.6):
        such packets are then dropped, and :meth:`solicit_unresolved` has the kernel
        resolve their next hops for the packets after them."""
        pin = self.pin_dir / NEIGH_LINK_PIN if self.pin_dir is not None else None
        old = None
        if pin is not None and pin.exists():
            try:
                old = Link.from_pinned(str(pin))
            except BpfError:
                os.unlink(pin)
        try:
            link = self.neighbour_handoff(ifindex, old)
        except BpfError as exc:
            if old is not None:
                old.close()
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                return None
            raise
        if pin is not None and old is None:
            link.pin(str(pin))
        return link

    def solicit_unresolved(self) -> list[str]:
        """Have the kernel resolve every next hop the data plane found without a
        neighbour entry (an empty datagram to the discard port makes it do so), and
        forget them; returns their addresses. For a host without the tc program; call
        it whenever drop_no_neigh moves (the agent's neighbour loop)."""
        addrs = []
        for n in self.unresolved_neighbours(clear=True):
            fam = socket.AF_INET6 if ":" in n["addr"] else socket.AF_INET
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                try:
                    s.sendto(b"", (n["addr"], 9))
                except OSError:
                    continue
            addrs.append(n["addr"])
        return addrs

    def neighbour_handoff_off(self, ifindex: int) -> None:
        """Stop handing packets over on ``ifindex`` (before its tc link goes)."""
        self.maps["neigh_handoff"].delete(_U32.pack(ifindex))

    def unresolved_neighbours(self, clear: bool = False) -> list[dict]:
        """Next hops the data plane found without a neighbour entry (each with its
        device, packets and first/last time, CLOCK_MONOTONIC ns); ``clear`` forgets
        them once read."""
        m = self.maps["neigh_missing"]
        rows = m.lookup_batch()
        out = []
        for k, v in rows:
            key, seen = L.NeighKey.from_bytes(k), L.NeighSeen.from_bytes(v)
            out.append({"addr": str(L.words_addr(key.addr, key.family)), "ifindex": key.ifindex,
                        "packets": seen.packets, "first_ns": seen.first_ns,
                        "last_ns": seen.last_ns})
        if clear and rows:
            m.delete_batch([k for k, _ in rows])
        return out

    def forget_next_hop(self, addr) -> None:
        """Drop the cached bpf_fib_lookup result for ``addr`` on every CPU."""
        self.maps["fib_cache"].update(_U32.pack(L.fib_cache_slot(addr)), bytes(L.FibCache()))

    def set_backend_down(self, backend_id: int, down: bool = True) -> None:
        b = self.backend(backend_id)
        if b is None:
            raise KeyError(f"backend {backend_id} not set")
        b.flags = (b.flags | L.MLB_BE_F_DOWN) if down else (b.flags & ~L.MLB_BE_F_DOWN)
        self.maps["backends"].update(_U32.pack(backend_id), bytes(b))

    def remove_backend(self, backend_id: int) -> None:
        """Clear the slot: flows on it re-select from their VIP's table."""
        old = self.backend(backend_id)
        self.maps["backends"].update(_U32.pack(backend_id), bytes(Backend()))
        if old is not None:
            self.forget_next_hop(L.words_addr(old.addr, old.family))

    def backends_in_use(self) -> list[tuple[int, Backend]]:
        """(id, backend) of every valid slot, in one batch read."""
        out = []
        for k, v in self.maps["backends"].lookup_batch():
            b = Backend.from_bytes(v)
            if b.flags & L.MLB_BE_F_VALID:
                out.append((_U32.unpack(k)[0], b))
        return out

    def backend(self, backend_id: int) -> Backend | None:
        raw = self.maps["backends"].lookup(_U32.pack(backend_id))
        b = Backend.from_bytes(raw) if raw is not None else None
        return b if b is not None and b.flags & L.MLB_BE_F_VALID else None

    def flush_fib_cache(self) -> None:
        """Forget every cached next hop (e.g. after the agent saw a neighbour or
        route change); entries also expire by themselves (MLB_FIB_CACHE_NS)."""
        m = self.maps["fib_cache"]
        zero = bytes(L.FibCache())
        m.update_batch([(_U32.pack(i), zero) for i in range(m.max_entries)])

    # ---------------------------------------------------------------- tables
    def set_vip_table(self, vip_id: int, backend_ids: Sequence[int]) -> None:
        """Install one VIP's Maglev table atomically (see set_vip_tables)."""
        self.set_vip_tables({vip_id: backend_ids})

    def set_vip_tables(self, tables: Mapping[int, Sequence[int]]) -> None:
        """Install VIPs' Maglev tables atomically: each distinct table is written
        completely into a fresh inner array, then every VIP's slot of vip_tables is
        pointed at its array in one batch update, so a packet sees a VIP's old table or
        its new one, never a mix. VIPs with identical tables share one array: filling
        65537 slots costs the kernel ~20 ms, and a single map-in-map update waits for
        an RCU grace period (~10 ms) that a batch pays once."""
        arrays: dict[bytes, list[int]] = {}
        packed: dict[int, bytes] = {}  # id(sequence) -> bytes: callers share one table object
        for vip_id, backend_ids in tables.items():
            meta = self._active_vip(vip_id)
            if meta is None:
                raise KeyError(f"no VIP with id {vip_id}")
            raw = packed.get(id(backend_ids))
            if raw is None:
                ids = array.array("I", backend_ids)
                bad = [b for b in set(ids) if b >= L.MLB_MAX_BACKENDS and b != NO_BACKEND]
                if bad:
                    raise ValueError(f"backend id {bad[0]} outside 0..{L.MLB_MAX_BACKENDS - 1}")
                raw = packed[id(backend_ids)] = ids.tobytes()
            if len(raw) // 4 != meta.ring_size:
                raise ValueError(f"table has {len(raw) // 4} entries, VIP {vip_id} ring_size is "
                                 f"{meta.ring_size}")
            arrays.setdefault(raw, []).append(vip_id)
        inners: list[Map] = []
        try:
            slots = array.array("I")
            fds = array.array("I")
            for values, vip_ids in arrays.items():
                n = len(values) // 4
                inner = Map.create(BPF_MAP_TYPE_ARRAY, 4, 4, n, name=f"mlb_tbl_{vip_ids[0]}",
                                   flags=BPF_F_INNER_MAP)
                inners.append(inner)
                # native-endian u32 keys 0..n-1 and values: two buffers, no per-slot encode
                inner.update_batch_packed(array.array("I", range(n)).tobytes(), values)
                slots.extend(vip_ids)
                fds.extend([inner.fd] * len(vip_ids))
            if slots:
                self.maps["vip_tables"].update_batch_packed(slots.tobytes(), fds.tobytes())
        finally:
            for inner in inners:
                inner.close()  # the outer map holds its own references

    def vip_table(self, vip_id: int) -> list[int] | None:
        mid = self.maps["vip_tables"].inner_id(_U32.pack(vip_id))
        if not mid:
            return None
        with Map.from_id(mid) as inner:
            raw = inner.lookup_batch()
            out = [0] * inner.max_entries
            for k, v in raw:
                out[_U32.unpack(k)[0]] = _U32.unpack(v)[0]
            return out

    # ------------------------------------------------------------------ SNAT
    def set_snat(self, family: int, addr, port_lo: int, port_hi: int) -> None:
        """Source address and port range of nat-mode flows for one family. Choose a
        range disjoint from net.ipv4.ip_local_port_range: replies to it are taken
        by the balancer when they match a nat flow."""
        fam, words = L.addr_words(addr)
        if fam != family:
            raise ValueError(f"address {addr} is not of family {family}")
        if not 1 <= port_lo <= port_hi <= 65535:
            raise ValueError(f"bad port range {port_lo}..{port_hi}")
        c = SnatConfig(port_lo=port_lo, port_hi=port_hi, flags=L.MLB_SNAT_F_VALID)
        c.addr[:] = words
        self.maps["snat_cfg"].update(_U32.pack(0 if family == AF_INET else 1), bytes(c))

    def clear_snat(self, family: int) -> None:
        self.maps["snat_cfg"].update(_U32.pack(0 if family == AF_INET else 1),
                                     bytes(SnatConfig()))

    # -------------------------------------------------------------- counters
    def counters(self) -> dict[str, int]:
        """Sum over CPUs of every reason counter, by lowercase name; the
        bpf_fib_lookup failure slots are named fib_<code name>."""
        m = self.maps["counters"]
        out: dict[str, int] = {}
        totals = [0] * L.MLB_CNT_MAX
        for k, vals in m.lookup_batch_percpu():
            idx = _U32.unpack(k)[0]
            if idx < len(totals):
                totals[idx] = sum(struct.unpack("=Q", v)[0] for v in vals)
        for c in Counter:
            if c is not Counter.FIB_RC:
                out[c.name.lower()] = totals[c]
        for rc in range(L.MLB_FIB_RC_SLOTS):
            name = L.FIB_RC_NAMES.get(rc, f"rc{rc}")
            out[f"fib_{name}"] = totals[Counter.FIB_RC + rc]
        return out

    def _stats(self, map_name: str, idx: int) -> LbStats:
        vals = self.maps[map_name].lookup_percpu(_U32.pack(idx)) or []
        s = LbStats()
        for v in vals:
            x = LbStats.from_bytes(v)
            s.packets += x.packets
            s.bytes += x.bytes
        return s

    def vip_stats(self, vip_id: int) -> LbStats:
        return self._stats("vip_stats", vip_id)

    def backend_stats(self, backend_id: int) -> LbStats:
        return self._stats("backend_stats", backend_id)

    def reset_counters(self) -> None:
        for name in ("counters", "vip_stats", "backend_stats"):
            m = self.maps[name]
            zero = b"\0" * m.value_size
            m.update_batch([(_U32.pack(i), zero) for i in range(m.max_entries)])

    # ------------------------------------------------------------- conntrack
    def conntrack_entries(self) -> list[tuple[FlowKey, CtValue]]:
        return [(FlowKey.from_bytes(k), CtValue.from_bytes(v))
                for k, v in self.maps["conntrack"].lookup_batch()]

    def conntrack_count(self) -> int:
        # batched: one syscall per few thousand entries instead of one per entry
        return len(self.maps["conntrack"].lookup_batch())

    def conntrack_lookup(self, key: FlowKey) -> CtValue | None:
        raw = self.maps["conntrack"].lookup(bytes(key))
        return CtValue.from_bytes(raw) if raw is not None else None

    def conntrack_delete(self, key: FlowKey | bytes) -> bool:
        """Forget a flow (and its nat reverse entry): its next SYN re-selects, and a
        late segment of it still reaches its old backend through ``ct_closed``."""
        return self.conntrack_evict(key) is not None

    def conntrack_evict(self, key: FlowKey | bytes) -> CtValue | None:
        """:meth:`conntrack_delete` that returns the entry it removed (None: none)."""
        (result, ct), = self.evict_many([bytes(key)], L.MLB_EVICT_OP_FORWARD)
        return CtValue.from_bytes(ct) if result == L.MLB_EVICT_FORWARD else None

    def evict_many(self, keys: Sequence[bytes], op: int = L.MLB_EVICT_OP_AUTO
                   ) -> list[tuple[int, bytes]]:
        """Evict flows in the kernel, :data:`L.MLB_EVICT_BATCH` per syscall (the
        ``meshlb_evict`` program): a key whose destination is a VIP is a conntrack
        key (client -> VIP), moved to ``ct_closed`` with its nat reverse entry; any
        other is a nat backend's view of its flow (SNAT addr:port -> backend), see
        :meth:`nat_delete_backend_side`. ``op`` forces one reading for every key.
        Returns, per key, (``MLB_EVICT_*`` result, the bytes of the ct_value removed
        when the result is ``MLB_EVICT_FORWARD``). Most evictions a member receives
        are of flows it does not hold: the cost is in the batch, not per key."""
        if any(len(k) != _KEY_SIZE for k in keys):
            raise ValueError(f"flow keys are {_KEY_SIZE} bytes")
        if op == L.MLB_EVICT_OP_EXPIRE:
            raise ValueError("expiry needs the entries as scanned: conntrack_expire")
        tail = _U32.pack(op) + bytes(_SLOT_TAIL)
        return self._run_evict(len(keys), lambda i, j: tail.join(keys[i:j]) + tail)

    def _run_evict(self, n: int, slots: Callable[[int, int], bytes]) -> list[tuple[int, bytes]]:
        """Run ``meshlb_evict`` over ``n`` slots, a batch at a time; ``slots(i, j)``
        gives the bytes of slots i..j-1. Per batch only, the lock: the expiry's
        thousands of slots must not hold the loop's evictions up."""
        out: list[tuple[int, bytes]] = []
        prog = self.obj.program(EVICT_PROGRAM)
        for i in range(0, n, L.MLB_EVICT_BATCH):
            j = min(n, i + L.MLB_EVICT_BATCH)
            raw = slots(i, j)
            end = _SLOTS_AT + len(raw)
            with self._evict_lock:
                buf = self._evict_buffer()
                buf[_SLOTS_AT:end] = raw
                buf[0:4] = _U32.pack(j - i)
                prog.test_run()
                out += _SLOT_OUT.iter_unpack(buf[_SLOTS_AT:end])
        return out

    def _evict_buffer(self) -> mmap.mmap:
        if self._evict_buf is None:
            size = -(-ctypes.sizeof(L.EvictBatch) // mmap.PAGESIZE) * mmap.PAGESIZE
            self._evict_buf = mmap.mmap(self.obj.map("evict_batch").fd, size, mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE)
        return self._evict_buf

    def closed_lookup(self, key: FlowKey) -> CtValue | None:
        raw = self.maps["ct_closed"].lookup(bytes(key))
        return CtValue.from_bytes(raw) if raw is not None else None

    def nat_delete_backend_side(self, key: FlowKey | bytes) -> bool:
        """Forget a nat flow named as its backend saw it: ``key`` is (SNAT addr:port ->
        backend addr:port), what the backend's socket-release tracer reports. The
        reverse map is keyed by the reply, which is that tuple with its ends swapped;
        the forward entry goes too if it still holds that SNAT port (the client may
        have reused its port for a new connection that got another)."""
        (result, _), = self.evict_many([bytes(key)], L.MLB_EVICT_OP_BACKEND)
        return result == L.MLB_EVICT_BACKEND

    def conntrack_stale(self, now_ns: int, idle_ns: int = 0, handshake_ns: int = 0, closing_ns: int = 0,
                        closing_backends: Collection[int] = ()) -> tuple[list[tuple[FlowKey, CtValue]], ...]:
        """Entries to expire at ``now_ns`` (CLOCK_MONOTONIC): (idle longer than
        ``idle_ns``, TCP handshakes the client has not acknowledged for
        ``handshake_ns``, closing flows (``MLB_CT_F_CLOSING``) of the backends
        ``closing_backends`` quiet for ``closing_ns``); 0 disables each. Filtered on
        the raw bytes: a full map is a quarter million entries, and most of them are
        none of these."""
        idle: list[tuple[FlowKey, CtValue]] = []
        half_open: list[tuple[FlowKey, CtValue]] = []
        closing: list[tuple[FlowKey, CtValue]] = []
        if not idle_ns and not handshake_ns and not (closing_ns and closing_backends):
            return idle, half_open, closing
        self.sync_clock()  # keeps the tick's rounding from adding up over days
        ks, vs = ctypes.sizeof(FlowKey), ctypes.sizeof(CtValue)
        proto_at = FlowKey.proto.offset
        est = L.MLB_CT_F_ESTABLISHED
        closing_flag = L.MLB_CT_F_CLOSING if closing_ns else 0
        closing_ids = frozenset(closing_backends)
        for keys, vals, _ in self.maps["conntrack"].lookup_batch_raw():
            for i, (seen, backend_id, flags) in enumerate(_CT_SEEN_BACKEND_FLAGS.iter_unpack(vals)):
                age = now_ns - seen
                if idle_ns and age > idle_ns:
                    out = idle
                elif (handshake_ns and age > handshake_ns and not flags & est
                      and keys[i * ks + proto_at] == IPPROTO_TCP):
                    out = half_open
                elif flags & closing_flag and age > closing_ns and backend_id in closing_ids:
                    out = closing
                else:
                    continue
                out.append((FlowKey.from_bytes(keys[i * ks:(i + 1) * ks]),
                            CtValue.from_bytes(vals[i * vs:(i + 1) * vs])))
        return idle, half_open, closing

    def conntrack_flows(self) -> collections.Counter[tuple[int, int]]:
        """Conntrack entries per (backend id, VIP id): the flows each backend of each
        VIP still has here, in one batched read."""
        out: collections.Counter[tuple[int, int]] = collections.Counter()
        for _, vals, _ in self.maps["conntrack"].lookup_batch_raw():
            out.update(_CT_BACKEND_VIP.iter_unpack(vals))
        return out

    def conntrack_expire(self, entries: Sequence[tuple[FlowKey, CtValue]]) -> int:
        """Delete entries found by :meth:`conntrack_stale`, with their nat reverse
        entries, unless a packet touched them since (the client's ACK may land between
        the scan and the delete; removing a nat flow then would reset it): the
        ``meshlb_evict`` program compares each entry with the value scanned and removes
        it as an eviction would, except that expired flows do not go to ``ct_closed``:
        nothing of them ended, and a retransmitted SYN should be balanced afresh.
        Returns how many were deleted."""
        head = _U32.pack(L.MLB_EVICT_OP_EXPIRE) + bytes(4)
        out = self._run_evict(len(entries), lambda i, j: b"".join(
            bytes(k) + head + bytes(v) for k, v in entries[i:j]))
        return sum(1 for result, _ in out if result == L.MLB_EVICT_EXPIRED)

    def conntrack_flush(self) -> int:
        """Delete every conntrack and nat reverse entry; returns conntrack count."""
        n = 0
        for name in ("conntrack", "nat_reverse", "ct_closed"):
            keys = [k for k, _ in self.maps[name].lookup_batch()]
            d = self.maps[name].delete_batch(keys) if keys else 0
            if name == "conntrack":
                n = d
        return n

    def nat_entries(self) -> list[tuple[FlowKey, NatRevValue]]:
        return [(FlowKey.from_bytes(k), NatRevValue.from_bytes(v))
                for k, v in self.maps["nat_reverse"].lookup_batch()]


__all__ = ["Balancer", "BpfError", "NO_BACKEND", "OBJECT_PATH", "flow_hash", "table_slot", "tick_rate",
           "vip_key"]
