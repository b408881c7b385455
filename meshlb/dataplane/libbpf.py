"""Thin ctypes binding over the system libbpf.so.1 (libbpf 1.x).

This is the only module of the data plane that talks to libbpf; everything
else (typed map views, the loader, the ring-buffer reader) builds on it.
Importing it needs neither libbpf nor root: the library is opened on first use.

Errors are :class:`BpfError` (an ``OSError``) whose message names the
operation and the map/program/path; a failed :meth:`BpfObject.load` also
carries the verifier log in ``.log``. The failures a user acts on have types of
their own, so the command line can say what to do in one line: no library
(:class:`LibbpfNotFound`), an object that cannot be opened
(:class:`ObjectOpenError`), a program the kernel refused
(:class:`VerifierError`), no kernel BTF (:class:`KernelBtfError`).
libbpf's own messages go to the logger ``meshlb.libbpf`` at DEBUG.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import threading
from ctypes import byref, c_size_t

from .libbpf_ffi import (
    Closeable,
    ENOTSUPP,
    LIBBPF_WARN,
    BpfError,
    KernelBtfError,
    LibbpfNotFound,
    ObjectOpenError,
    VerifierError,
    btf_type,
    btf_var_secinfo,
    bpf_object_open_opts,
    capture_libbpf_output,
    check,
    lib,
    obj_get,
    opts,
)
from .libbpf_map import (  # noqa: F401 - re-exported API
    BPF_ANY,
    BPF_EXIST,
    BPF_F_INNER_MAP,
    BPF_F_LOCK,
    BPF_F_MMAPABLE,
    BPF_F_NO_PREALLOC,
    BPF_F_RDONLY_PROG,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_ARRAY_OF_MAPS,
    BPF_MAP_TYPE_CPUMAP,
    BPF_MAP_TYPE_DEVMAP,
    BPF_MAP_TYPE_DEVMAP_HASH,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_HASH_OF_MAPS,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_MAP_TYPE_PERF_EVENT_ARRAY,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    BPF_MAP_TYPE_XSKMAP,
    BPF_NOEXIST,
    PERCPU_MAP_TYPES,
    Map,
    num_possible_cpus,
)
from .libbpf_prog import (  # noqa: F401
    BPF_F_REPLACE,
    BPF_PROG_TYPE_RAW_TRACEPOINT,
    BPF_PROG_TYPE_SCHED_CLS,
    BPF_PROG_TYPE_TRACEPOINT,
    BPF_PROG_TYPE_TRACING,
    BPF_PROG_TYPE_XDP,
    BPF_XDP,
    XDP_ABORTED,
    XDP_DROP,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_HW_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
    Link,
    Program,
    TestRunResult,
    link_info,
    obj_pinned_type,
    prog_info,
    xdp_attach_netlink,
    xdp_detach,
    xdp_query,
)
from .libbpf_ringbuf import RingReader  # noqa: F401


BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15

# libbpf's print callback is process-global; serialising loads keeps each
# load's captured messages (and so its verifier log) its own.
_load_lock = threading.Lock()

_LOG_RE = re.compile(r"prog '([^']*)': -- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --",
                     re.S)
_FAILED_PROG_RE = re.compile(r"prog '([^']*)': (?:BPF program load failed|failed to load)")
# what libbpf prints when it finds no vmlinux BTF (sysfs nor the fallback locations)
_NO_KERNEL_BTF_RE = re.compile(r"failed to find valid kernel BTF|Error loading vmlinux BTF|"
                               r"failed to find kernel BTF")


def _btf_kind(t: btf_type) -> int:
    return (t.info >> 24) & 0x1F


def _btf_vlen(t: btf_type) -> int:
    return t.info & 0xFFFF


class BpfObject(Closeable):
    """A BPF ELF object: open, adjust (globals, sizes, pinned maps), load, use."""

    def __init__(self, ptr: int, path: str) -> None:
        self._obj = ptr
        self.path = path
        self.name = (lib().bpf_object__name(ptr) or b"").decode()
        self._loaded = False
        self._maps: dict[str, Map] = {}
        self._map_ptrs: dict[str, int] = {}
        self._progs: dict[str, Program] = {}
        self._prog_ptrs: dict[str, int] = {}
        m = None
        while True:
            m = lib().bpf_object__next_map(ptr, m)
            if not m:
                break
            self._map_ptrs[lib().bpf_map__name(m).decode()] = m
        p = None
        while True:
            p = lib().bpf_object__next_program(ptr, p)
            if not p:
                break
            self._prog_ptrs[lib().bpf_program__name(p).decode()] = p

    def __repr__(self) -> str:
        return f"BpfObject({self.name!r}, path={self.path!r}, loaded={self._loaded})"

    @classmethod
    def open(cls, path, *, name: str | None = None) -> "BpfObject":
        path = os.fspath(path)
        o = opts(bpf_object_open_opts, object_name=name.encode() if name else None)
        with capture_libbpf_output() as lines:
            ptr = lib().bpf_object__open_file(os.fsencode(path), byref(o))
        if not ptr:
            raise ObjectOpenError(ctypes.get_errno() or errno.EINVAL, path, _warnings(lines))
        return cls(ptr, path)

    # ------------------------------------------------------------- lookups
    def _live(self, op: str) -> int:
        if not self._obj:
            raise BpfError(errno.EBADF, f"{op} on closed BPF object {self.name!r}")
        return self._obj

    def _map_ptr(self, name: str) -> int:
        self._live(f"map({name!r})")
        ptr = self._map_ptrs.get(name)
        if ptr is None:
            # Internal maps (.rodata, .bss, ...) carry an object-name prefix.
            cands = [n for n in self._map_ptrs if name.startswith(".") and n.endswith(name)]
            if len(cands) == 1:
                return self._map_ptrs[cands[0]]
            raise KeyError(f"BPF object {self.name!r} has no map {name!r} "
                           f"(maps: {', '.join(sorted(self._map_ptrs)) or 'none'})")
        return ptr

    def _prog_ptr(self, name: str) -> int:
        self._live(f"program({name!r})")
        ptr = self._prog_ptrs.get(name)
        if ptr is None:
            raise KeyError(f"BPF object {self.name!r} has no program {name!r} "
                           f"(programs: {', '.join(sorted(self._prog_ptrs)) or 'none'})")
        return ptr

    def _map_for(self, name: str, ptr: int) -> Map:
        m = self._maps.get(name)
        if m is None:
            L = lib()
            fd = L.bpf_map__fd(ptr) if self._loaded else -1
            m = Map(fd, name, L.bpf_map__type(ptr), L.bpf_map__key_size(ptr),
                    L.bpf_map__value_size(ptr), L.bpf_map__max_entries(ptr), owned=False)
            m._owner = self
            self._maps[name] = m
        return m

    def map(self, name: str) -> Map:
        ptr = self._map_ptr(name)
        real = lib().bpf_map__name(ptr).decode()
        return self._map_for(real, ptr)

    def maps(self) -> list[Map]:
        self._live("maps()")
        return [self._map_for(n, p) for n, p in self._map_ptrs.items()]

    def _prog_for(self, name: str, ptr: int) -> Program:
        p = self._progs.get(name)
        if p is None:
            L = lib()
            fd = L.bpf_program__fd(ptr) if self._loaded else -1
            p = Program(fd, name, L.bpf_program__type(ptr), ptr=ptr, owned=False)
            p._owner = self
            self._progs[name] = p
        return p

    def program(self, name: str) -> Program:
        return self._prog_for(name, self._prog_ptr(name))

    def programs(self) -> list[Program]:
        self._live("programs()")
        return [self._prog_for(n, p) for n, p in self._prog_ptrs.items()]

    # ---------------------------------------------------- pre-load settings
    def _before_load(self, op: str) -> None:
        self._live(op)
        if self._loaded:
            raise BpfError(errno.EBUSY, f"{op}: BPF object {self.name!r} is already loaded")

    def set_global(self, name: str, value: bytes) -> None:
        """Set the initial value of global variable ``name`` (in .rodata,
        .data, .bss or a custom .data.*/.rodata.* section)."""
        op = f"set_global({name!r}) in {self.name!r}"
        self._before_load(op)
        L = lib()
        btf = L.bpf_object__btf(self._obj)
        if not btf:
            raise BpfError(errno.ENOENT, f"{op}: object has no BTF")
        var_id = L.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_VAR)
        if var_id < 0:
            raise KeyError(f"{op}: no global variable {name!r} in BTF")
        sec_id, sec_name, offset, size = self._find_secinfo(btf, var_id, op)
        if size != len(value):
            raise ValueError(f"{op}: variable is {size} bytes, value is {len(value)}")
        mptr = self._datasec_map(btf, sec_id, sec_name, op)
        sz = c_size_t(0)
        buf = L.bpf_map__initial_value(mptr, byref(sz))
        if not buf:
            raise BpfError(errno.EINVAL, f"{op}: section {sec_name} has no initial value buffer")
        if offset + size > sz.value:
            raise BpfError(errno.EINVAL, f"{op}: offset {offset}+{size} beyond section "
                                         f"{sec_name} ({sz.value} bytes)")
        ctypes.memmove(buf + offset, bytes(value), size)

    def _find_secinfo(self, btf: int, var_id: int, op: str) -> tuple[int, str, int, int]:
        L = lib()
        for tid in range(1, L.btf__type_cnt(btf)):
            t = btf_type.from_address(L.btf__type_by_id(btf, tid))
            if _btf_kind(t) != BTF_KIND_DATASEC:
                continue
            base = ctypes.addressof(t) + ctypes.sizeof(btf_type)
            for i in range(_btf_vlen(t)):
                si = btf_var_secinfo.from_address(base + i * ctypes.sizeof(btf_var_secinfo))
                if si.type == var_id:
                    sec = L.btf__name_by_offset(btf, t.name_off).decode()
                    return tid, sec, si.offset, si.size
        raise KeyError(f"{op}: variable is not in any data section (extern or kconfig?)")

    def _datasec_map(self, btf: int, sec_id: int, sec_name: str, op: str) -> int:
        L = lib()
        internal = [p for p in self._map_ptrs.values() if L.bpf_map__is_internal(p)]
        for p in internal:
            if L.bpf_map__btf_value_type_id(p) == sec_id:
                return p
        # Internal map names are "<obj prefix><section>", possibly truncated.
        for p in internal:
            n = L.bpf_map__name(p).decode()
            if n == sec_name or n.endswith(sec_name) or sec_name.startswith(n):
                return p
        raise BpfError(errno.ENOENT, f"{op}: no map backs section {sec_name}")

    def set_max_entries(self, map_name: str, n: int) -> None:
        op = f"set_max_entries({map_name!r}, {n})"
        self._before_load(op)
        ptr = self._map_ptr(map_name)
        check(lib().bpf_map__set_max_entries(ptr, n), f"bpf_map__{op} in {self.name!r}")
        m = self._maps.get(lib().bpf_map__name(ptr).decode())
        if m is not None:
            m.max_entries = n

    def reuse_pinned_map(self, map_name: str, path: str) -> None:
        """Make the object use the map pinned at ``path`` instead of creating
        ``map_name`` (how a restarted agent adopts its state)."""
        op = f"reuse_pinned_map({map_name!r}, {path!r}) in {self.name!r}"
        self._before_load(op)
        ptr = self._map_ptr(map_name)
        pinned = Map.from_pinned(path)
        try:
            L = lib()
            want = (L.bpf_map__type(ptr), L.bpf_map__key_size(ptr), L.bpf_map__value_size(ptr))
            have = (pinned.type, pinned.key_size, pinned.value_size)
            if want != have:
                raise BpfError(errno.EINVAL, f"{op}: pinned map has (type, key_size, "
                                             f"value_size)={have}, object wants {want}")
            # libbpf dups the fd, so ours is closed in either case.
            check(L.bpf_map__reuse_fd(ptr, pinned.fd), f"bpf_map__reuse_fd: {op}")
        finally:
            pinned.close()
        m = self._maps.get(L.bpf_map__name(ptr).decode())
        if m is not None:
            m.max_entries = L.bpf_map__max_entries(ptr)

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        self._before_load("load")
        with _load_lock, capture_libbpf_output() as lines:
            ret = lib().bpf_object__load(self._obj)
        if ret < 0:
            raise self._load_error(-ret, lines)
        self._loaded = True
        L = lib()
        for name, m in self._maps.items():
            p = self._map_ptrs[name]
            m.fd = L.bpf_map__fd(p)
            m.max_entries = L.bpf_map__max_entries(p)
        for name, prog in self._progs.items():
            prog.fd = L.bpf_program__fd(self._prog_ptrs[name])

    def _load_error(self, err: int, lines: list[tuple[int, str]]) -> BpfError:
        text = "".join(t for _, t in lines)
        logs = _LOG_RE.findall(text)
        failed = _FAILED_PROG_RE.findall(text)
        prog = failed[0] if failed else (logs[0][0] if logs else None)
        verifier_log = next((lg for p, lg in logs if p == prog), logs[0][1] if logs else "")
        if prog is not None:
            tail = [ln for ln in verifier_log.strip().splitlines()
                    if ln and not ln.startswith("processed ")][-3:]
            msg = (f"bpf_object__load({self.name!r}): program {prog!r} failed to load"
                   + (": " + " | ".join(tail) if tail else ""))
            if verifier_log:
                return VerifierError(err, msg, verifier_log, program=prog, object_path=self.path,
                                     libbpf_output=text)
        else:
            detail = _warnings(lines)
            msg = f"bpf_object__load({self.name!r})" + (f": {detail}" if detail else "")
        # libbpf reads the running kernel's types before relocating anything (CO-RE)
        cls = KernelBtfError if _NO_KERNEL_BTF_RE.search(text) else BpfError
        e = cls(err, msg, verifier_log)
        e.program = prog
        e.libbpf_output = text
        return e

    @property
    def loaded(self) -> bool:
        return self._loaded

    # ------------------------------------------------------------- teardown
    def close(self) -> None:
        if self._obj:
            lib().bpf_object__close(self._obj)
            self._obj = None
        for m in self._maps.values():
            m.fd = -1
        for p in self._progs.values():
            p.fd = -1
            p._ptr = None



def _warnings(lines: list[tuple[int, str]], limit: int = 3) -> str:
    warn = [t.strip().removeprefix("libbpf: ") for lvl, t in lines
            if lvl == LIBBPF_WARN and t.strip()]
    return " | ".join(warn[-limit:])


def pinned_map_or_none(path: str) -> Map | None:
    """The map pinned at ``path``, or None if nothing is pinned there."""
    try:
        return Map.from_pinned(path)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def get_pinned_fd(path: str) -> int:
    """Raw bpf_obj_get for callers that manage the fd themselves."""
    return obj_get(path)


__all__ = sorted(
    {n for n in globals() if n.isupper() and not n.startswith("_")} | {
        "BpfError", "KernelBtfError", "LibbpfNotFound", "ObjectOpenError", "VerifierError",
        "BpfObject", "Map", "Program", "Link", "RingReader", "TestRunResult",
        "num_possible_cpus", "xdp_query", "xdp_detach", "xdp_attach_netlink",
        "obj_pinned_type", "prog_info", "link_info", "pinned_map_or_none", "get_pinned_fd",
    } - {"BTF_KIND_VAR", "BTF_KIND_DATASEC"}
)
