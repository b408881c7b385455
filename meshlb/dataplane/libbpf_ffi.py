"""ctypes declarations for the system libbpf.so.1 (libbpf 1.x), loaded lazily.

Everything here is private plumbing for :mod:`meshlb.dataplane.libbpf`: the
shared library handle with argtypes/restype set for every symbol we call (a
missing restype silently truncates 64-bit pointers to int), the option structs
whose layout must match the C headers byte for byte, the error type and the
bridge that routes libbpf's print callback into Python logging.

The library is opened on first use, not at import, so that importing the data
plane package works on machines without libbpf or without root.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import logging
import os
import platform
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

log = logging.getLogger("meshlb.libbpf")

# libbpf also returns the kernel-internal ENOTSUPP (524) which Python's errno
# module does not name.
ENOTSUPP = 524

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


class Closeable:
    """Context manager and finalizer for the wrappers of kernel objects: each defines
    close(), which must be safe to call twice; finalizing at interpreter shutdown may
    find libbpf already gone, which is not worth an error."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class BpfError(OSError):
    """A libbpf or bpf(2) failure.

    ``errno`` is the positive error number; the message names the operation and
    the object (map/program/path) involved; ``log`` carries the verifier log
    when a program failed to load (empty string otherwise).
    """

    errno: int  # always set: a failure without a number is EIO
    # of a failed object load: the program the kernel refused (None: the failure was
    # elsewhere, e.g. a map) and everything libbpf printed meanwhile
    program: str | None = None
    libbpf_output: str = ""

    def __init__(self, err: int | None, message: str, log: str = "") -> None:
        err = abs(err) if err else _errno.EIO
        super().__init__(err, message)
        self.log = log

    def __str__(self) -> str:
        if self.errno in _LIBBPF_ERRNOS:
            return f"{self.strerror} [libbpf: {_LIBBPF_ERRNOS[self.errno]}]"
        name = _errno.errorcode.get(self.errno, "ENOTSUPP" if self.errno == ENOTSUPP else "?")
        return f"{self.strerror} [{name}: {os.strerror(self.errno)}]"


# libbpf's own error numbers (enum libbpf_errno in libbpf.h), which strerror does not know
_LIBBPF_ERRNOS = {
    4000: "something wrong in libelf", 4001: "BPF object format invalid",
    4002: "incorrect or no 'version' section", 4003: "endianness mismatch",
    4004: "internal error in libbpf", 4005: "relocation failed", 4006: "load program failed",
    4007: "kernel verifier blocks program loading", 4008: "program too big",
    4009: "incorrect kernel version", 4010: "kernel does not support this program type",
    4011: "wrong pid in netlink message", 4012: "invalid netlink sequence", 4013: "netlink parse error",
}


class LibbpfNotFound(BpfError):
    """The shared library could not be opened (``path`` is what was asked for)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(_errno.ENOENT, f"cannot load libbpf ({path}): {reason}")
        self.path = path
        self.reason = reason


class ObjectOpenError(BpfError):
    """A BPF ELF object could not be opened or parsed (missing, unreadable, not BPF)."""

    def __init__(self, err: int, path: str, detail: str = "") -> None:
        super().__init__(err, f"bpf_object__open_file({path!r})" + (f": {detail}" if detail else ""))
        self.path = path
        self.detail = detail


class VerifierError(BpfError):
    """The kernel refused a program of an object at load time.

    ``log`` is the verifier's whole log, ``program`` the program's name,
    ``object_path`` the ELF file and ``libbpf_output`` everything libbpf printed
    during the load; :meth:`save_log` writes them to a file so that the one line
    reporting the failure can point at them.
    """

    def __init__(self, err: int, message: str, log: str, *, program: str, object_path: str,
                 libbpf_output: str) -> None:
        super().__init__(err, message, log)
        self.program = program
        self.object_path = object_path
        self.libbpf_output = libbpf_output

    def summary(self) -> str:
        """The verifier's last words: the line that says what it refused."""
        lines = [ln for ln in self.log.strip().splitlines()
                 if ln.strip() and not ln.startswith(("processed ", "verification time"))]
        return lines[-1].strip() if lines else ""

    def save_log(self, directory: str | os.PathLike) -> str:
        """Write the log to ``directory``; returns the file's path. One file per object
        and program, overwritten by the next failure of the same program, so a unit
        that restarts on failure does not fill the disk."""
        os.makedirs(directory, mode=0o755, exist_ok=True)
        stem = os.path.basename(self.object_path).split(".")[0] or "object"
        path = os.path.join(directory, f"verifier-{stem}-{self.program}.log")
        name = _errno.errorcode.get(self.errno, str(self.errno))
        with open(path, "w") as f:
            f.write(f"# program {self.program!r} of {self.object_path} refused by the kernel "
                    f"({name}), kernel {platform.release()}\n")
            f.write("# verifier log:\n")
            f.write(self.log if self.log.endswith("\n") else self.log + "\n")
            f.write("# libbpf's messages during the load:\n")
            f.write(self.libbpf_output)
        return path


class KernelBtfError(BpfError):
    """A load failed because libbpf found no BTF describing the running kernel."""


def check(ret: int, what: str) -> int:
    """Turn a libbpf negative-errno return into :class:`BpfError` naming ``what``."""
    if ret < 0:
        raise BpfError(-ret, what)
    return ret


# ---------------------------------------------------------------- structs
class bpf_object_open_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_void_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class bpf_map_create_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
        ("map_extra", c_uint64),
        ("numa_node", c_uint32),
        ("map_ifindex", c_uint32),
    ]


class bpf_map_batch_opts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class _kprobe_multi(Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("cnt", c_uint32),
        ("syms", c_void_p),
        ("addrs", c_void_p),
        ("cookies", c_void_p),
    ]


class _link_create_union(Union):
    _fields_ = [("bpf_cookie", c_uint64), ("kprobe_multi", _kprobe_multi)]


class bpf_link_create_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("flags", c_uint32),
        ("iter_info", c_void_p),
        ("iter_info_len", c_uint32),
        ("target_btf_id", c_uint32),
        ("u", _link_create_union),
    ]


class bpf_link_update_opts(Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("old_prog_fd", c_uint32)]


class bpf_test_run_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class bpf_xdp_query_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_id", c_uint32),
        ("drv_prog_id", c_uint32),
        ("hw_prog_id", c_uint32),
        ("skb_prog_id", c_uint32),
        ("attach_mode", c_uint8),
    ]


class bpf_xdp_attach_opts(Structure):
    _fields_ = [("sz", c_size_t), ("old_prog_fd", c_int)]


class bpf_map_info(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * 16),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),
        ("map_extra", c_uint64),
    ]


class bpf_prog_info_head(Structure):
    """Leading part of struct bpf_prog_info: the kernel fills only info_len bytes."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * 16),
        ("_middle", c_uint8 * 112),  # ifindex .. prog_tags: not read here
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),  # offset 208 (uapi/linux/bpf.h, since 5.12)
    ]


class bpf_link_info_head(Structure):
    """struct bpf_link_info up to the xdp/netdev member of its union."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("prog_id", c_uint32),
        ("_pad", c_uint32),
        ("u0", c_uint64),  # xdp.ifindex lives in the low 32 bits
        ("u1", c_uint64),
        ("u2", c_uint64),
    ]


class btf_type(Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class btf_var_secinfo(Structure):
    _fields_ = [("type", c_uint32), ("offset", c_uint32), ("size", c_uint32)]


PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

# (name, restype, argtypes). Pointers to opaque libbpf objects are c_void_p.
_P = c_void_p
_PROTOS: list[tuple[str, object, list]] = [
    ("libbpf_set_print", _P, [PRINT_FN]),
    ("libbpf_num_possible_cpus", c_int, []),
    ("bpf_object__open_file", _P, [c_char_p, POINTER(bpf_object_open_opts)]),
    ("bpf_object__load", c_int, [_P]),
    ("bpf_object__close", None, [_P]),
    ("bpf_object__name", c_char_p, [_P]),
    ("bpf_object__btf", _P, [_P]),
    ("bpf_object__next_map", _P, [_P, _P]),
    ("bpf_object__next_program", _P, [_P, _P]),
    ("bpf_map__name", c_char_p, [_P]),
    ("bpf_map__fd", c_int, [_P]),
    ("bpf_map__type", c_int, [_P]),
    ("bpf_map__key_size", c_uint32, [_P]),
    ("bpf_map__value_size", c_uint32, [_P]),
    ("bpf_map__max_entries", c_uint32, [_P]),
    ("bpf_map__set_max_entries", c_int, [_P, c_uint32]),
    ("bpf_map__reuse_fd", c_int, [_P, c_int]),
    ("bpf_map__initial_value", _P, [_P, POINTER(c_size_t)]),
    ("bpf_map__is_internal", c_bool, [_P]),
    ("bpf_map__btf_value_type_id", c_uint32, [_P]),
    ("bpf_program__name", c_char_p, [_P]),
    ("bpf_program__fd", c_int, [_P]),
    ("bpf_program__type", c_int, [_P]),
    ("bpf_program__section_name", c_char_p, [_P]),
    ("bpf_program__attach", _P, [_P]),
    ("bpf_program__set_log_buf", c_int, [_P, c_void_p, c_size_t]),
    ("bpf_program__set_log_level", c_int, [_P, c_uint32]),
    ("bpf_program__log_level", c_uint32, [_P]),
    ("bpf_link__fd", c_int, [_P]),
    ("bpf_link__destroy", c_int, [_P]),
    ("btf__find_by_name_kind", c_int, [_P, c_char_p, c_uint32]),
    ("btf__type_by_id", _P, [_P, c_uint32]),
    ("btf__type_cnt", c_uint32, [_P]),
    ("btf__name_by_offset", c_char_p, [_P, c_uint32]),
    ("bpf_map_create", c_int, [c_int, c_char_p, c_uint32, c_uint32, c_uint32,
                               POINTER(bpf_map_create_opts)]),
    ("bpf_map_lookup_elem", c_int, [c_int, c_void_p, c_void_p]),
    ("bpf_map_update_elem", c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    ("bpf_map_delete_elem", c_int, [c_int, c_void_p]),
    ("bpf_map_get_next_key", c_int, [c_int, c_void_p, c_void_p]),
    ("bpf_map_lookup_batch", c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                     POINTER(c_uint32), POINTER(bpf_map_batch_opts)]),
    ("bpf_map_update_batch", c_int, [c_int, c_void_p, c_void_p, POINTER(c_uint32),
                                     POINTER(bpf_map_batch_opts)]),
    ("bpf_map_delete_batch", c_int, [c_int, c_void_p, POINTER(c_uint32),
                                     POINTER(bpf_map_batch_opts)]),
    ("bpf_map_get_fd_by_id", c_int, [c_uint32]),
    ("bpf_prog_get_fd_by_id", c_int, [c_uint32]),
    ("bpf_obj_pin", c_int, [c_int, c_char_p]),
    ("bpf_obj_get", c_int, [c_char_p]),
    ("bpf_obj_get_info_by_fd", c_int, [c_int, c_void_p, POINTER(c_uint32)]),
    ("bpf_link_create", c_int, [c_int, c_int, c_int, POINTER(bpf_link_create_opts)]),
    ("bpf_link_detach", c_int, [c_int]),
    ("bpf_link_update", c_int, [c_int, c_int, POINTER(bpf_link_update_opts)]),
    ("bpf_prog_test_run_opts", c_int, [c_int, POINTER(bpf_test_run_opts)]),
    ("bpf_xdp_query", c_int, [c_int, c_int, POINTER(bpf_xdp_query_opts)]),
    ("bpf_xdp_attach", c_int, [c_int, c_int, c_uint32, POINTER(bpf_xdp_attach_opts)]),
    ("bpf_xdp_detach", c_int, [c_int, c_uint32, POINTER(bpf_xdp_attach_opts)]),
]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_print_cb = None  # the CFUNCTYPE object must outlive every libbpf call


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.vsnprintf.argtypes = [c_void_p, c_size_t, c_char_p, c_void_p]
    libc.vsnprintf.restype = c_int
    return libc


def lib() -> ctypes.CDLL:
    """The configured libbpf handle; opened (and the print hook installed) once."""
    global _lib, _libc, _print_cb
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = os.environ.get("MESHLB_LIBBPF", "libbpf.so.1")
        try:
            handle = ctypes.CDLL(path, use_errno=True)
        except OSError as e:
            raise LibbpfNotFound(path, str(e)) from None
        for name, restype, argtypes in _PROTOS:
            try:
                fn = getattr(handle, name)
            except AttributeError:
                raise LibbpfNotFound(path, f"it has no {name}(): libbpf 1.0 or later is needed") from None
            fn.restype = restype
            fn.argtypes = argtypes
        _libc = _load_libc()
        _print_cb = PRINT_FN(_on_libbpf_print)
        handle.libbpf_set_print(_print_cb)
        _lib = handle
        return handle


# ------------------------------------------------------ libbpf print bridge
_capture_local = threading.local()
# A va_list can be consumed once. On x86_64 (24-byte struct) and aarch64
# (32-byte struct, passed by reference) the callback receives a pointer to it
# and va_copy is a plain byte copy, so we can measure first, then format.
_VA_LIST_SIZE = {"x86_64": 24, "AMD64": 24, "aarch64": 32, "arm64": 32}.get(platform.machine())


def _format(fmt: bytes, va: int) -> str:
    assert _libc is not None
    if _VA_LIST_SIZE:
        copy = ctypes.create_string_buffer(ctypes.string_at(va, _VA_LIST_SIZE), _VA_LIST_SIZE)
        n = _libc.vsnprintf(None, 0, fmt, ctypes.addressof(copy))
        if n < 0:
            return fmt.decode(errors="replace")
        buf = ctypes.create_string_buffer(n + 1)
    else:
        buf = ctypes.create_string_buffer(1 << 16)
    _libc.vsnprintf(buf, len(buf), fmt, va)
    return buf.value.decode(errors="replace")


def _on_libbpf_print(level: int, fmt: bytes, va: int) -> int:
    # An exception escaping a ctypes callback is only printed, never propagated;
    # swallow everything so libbpf always gets a well-formed return.
    try:
        text = _format(fmt, va)
        sink = getattr(_capture_local, "sink", None)
        if sink is not None:
            sink.append((level, text))
        log.debug("%s", text.rstrip("\n"))
        return len(text)
    except BaseException:  # noqa: BLE001
        return 0


class capture_libbpf_output:
    """Collect libbpf's messages emitted on this thread while the block runs."""

    def __enter__(self) -> list[tuple[int, str]]:
        self._prev = getattr(_capture_local, "sink", None)
        self.lines: list[tuple[int, str]] = []
        _capture_local.sink = self.lines
        return self.lines

    def __exit__(self, *exc) -> None:
        _capture_local.sink = self._prev


def opts(struct_type, **fields):
    """Instantiate a libbpf opts struct with ``sz`` set, as LIBBPF_OPTS does."""
    o = struct_type(**fields)
    o.sz = ctypes.sizeof(struct_type)
    return o


def info_by_fd(fd: int, struct_type, what: str):
    info = struct_type()
    n = c_uint32(ctypes.sizeof(info))
    check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)),
          f"bpf_obj_get_info_by_fd({what})")
    return info


def obj_get(path: str) -> int:
    return check(lib().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get({path!r})")


def obj_pin(fd: int, path: str, what: str) -> None:
    check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin({what} -> {path!r})")
