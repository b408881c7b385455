"""BPF programs, links and XDP attachment."""
from __future__ import annotations

import ctypes
import errno
import os
import socket
from ctypes import byref
from dataclasses import dataclass

from .libbpf_ffi import (
    BpfError,
    Closeable,
    bpf_link_create_opts,
    bpf_link_info_head,
    bpf_link_update_opts,
    bpf_prog_info_head,
    bpf_test_run_opts,
    bpf_xdp_attach_opts,
    bpf_xdp_query_opts,
    check,
    info_by_fd,
    lib,
    obj_get,
    obj_pin,
    opts,
)

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

BPF_XDP = 37  # enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_TCX_INGRESS = 46  # Linux 6.6
BPF_F_REPLACE = 1 << 2

BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_SYSCALL = 31

XDP_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "drv": XDP_FLAGS_DRV_MODE,
                  "generic": XDP_FLAGS_SKB_MODE, "skb": XDP_FLAGS_SKB_MODE,
                  "hw": XDP_FLAGS_HW_MODE, "offload": XDP_FLAGS_HW_MODE}
# enum from if_link.h: XDP_ATTACHED_NONE/DRV/SKB/HW/MULTI
_ATTACH_MODE_NAMES = {0: None, 1: "native", 2: "generic", 3: "hw", 4: "multi"}


def _mode_flags(mode: str, what: str) -> int:
    try:
        return XDP_MODE_FLAGS[mode]
    except KeyError:
        raise ValueError(f"{what}: unknown XDP mode {mode!r} "
                         f"(use 'native' or 'generic')") from None


def _ifname(ifindex: int) -> str:
    try:
        return f"{ifindex} ({socket.if_indextoname(ifindex)})"
    except OSError:
        return str(ifindex)


@dataclass(frozen=True)
class TestRunResult:
    __test__ = False  # not a pytest test class despite the name

    retval: int
    data: bytes
    duration_ns: int
    ctx: bytes | None = None


def prog_info(fd: int) -> dict:
    i = info_by_fd(fd, bpf_prog_info_head, f"program fd {fd}")
    return {"id": i.id, "type": i.type, "name": i.name.decode(errors="replace"),
            "tag": bytes(i.tag).hex(), "recursion_misses": i.recursion_misses}


def link_info(fd: int) -> dict:
    i = info_by_fd(fd, bpf_link_info_head, f"link fd {fd}")
    return {"id": i.id, "type": i.type, "prog_id": i.prog_id,
            "xdp_ifindex": i.u0 & 0xFFFFFFFF}


def obj_pinned_type(path: str) -> str:
    """'map', 'prog' or 'link' for a bpffs pin (read from the fd's fdinfo)."""
    fd = obj_get(path)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            text = f.read()
    finally:
        os.close(fd)
    for key, kind in (("link_type:", "link"), ("prog_type:", "prog"), ("map_type:", "map")):
        if key in text:
            return kind
    return "unknown"


class Link(Closeable):
    """An attachment. Wraps either a libbpf ``struct bpf_link`` (from
    :meth:`Program.attach`) or a raw link fd (XDP links, pinned links)."""

    fd: int

    def __init__(self, fd: int, *, ptr: int | None = None, what: str = "link",
                 pin_path: str | None = None) -> None:
        self.fd = fd
        self._ptr = ptr
        self._what = what
        self._pin_path = pin_path

    def __repr__(self) -> str:
        return f"Link({self._what}, fd={self.fd}, pinned={self._pin_path!r})"

    @classmethod
    def from_pinned(cls, path: str) -> Link:
        fd = obj_get(path)
        return cls(fd, what=f"link pinned at {path!r}", pin_path=path)

    def _live_fd(self, op: str) -> int:
        if self.fd < 0:
            raise BpfError(errno.EBADF, f"{op} on closed {self._what}")
        return self.fd

    def info(self) -> dict:
        return link_info(self._live_fd("info"))

    def pin(self, path: str) -> None:
        obj_pin(self._live_fd("pin"), path, self._what)
        self._pin_path = path

    def unpin(self) -> None:
        if self._pin_path is None:
            raise BpfError(errno.ENOENT, f"unpin {self._what}: not pinned by this handle")
        try:
            os.unlink(self._pin_path)
        except OSError as e:
            raise BpfError(e.errno, f"unpin {self._what} at {self._pin_path!r}: "
                                    f"{e.strerror}") from None
        self._pin_path = None

    def detach(self) -> None:
        """Sever the attachment in the kernel, even if the link is pinned or
        other fds refer to it; the fd stays open (call :meth:`close`)."""
        check(lib().bpf_link_detach(self._live_fd("detach")), f"bpf_link_detach({self._what})")

    def update_program(self, prog: Program, *, expected_old: Program | None = None) -> None:
        """Atomically swap the attached program (e.g. an upgraded agent taking
        over a pinned XDP link without a window where no program runs). With
        ``expected_old`` the swap fails (EPERM) unless that program is the
        current one."""
        o = opts(bpf_link_update_opts)
        if expected_old is not None:
            o.flags = BPF_F_REPLACE
            o.old_prog_fd = expected_old._live_fd("update_program")
        check(lib().bpf_link_update(self._live_fd("update_program"),
                                    prog._live_fd("update_program"), byref(o)),
              f"bpf_link_update({self._what} -> program {prog.name!r})")

    update = update_program

    def close(self) -> None:
        """Drop our reference; the attachment ends unless it is pinned."""
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1



class Program(Closeable):
    fd: int
    name: str
    type: int

    def __init__(self, fd: int, name: str, prog_type: int, *, ptr: int | None = None,
                 owned: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.type = prog_type
        self._ptr = ptr  # libbpf struct bpf_program*, needed for auto-attach
        self._owned = owned
        self._owner: object | None = None  # the BpfObject, kept alive while we are

    def __repr__(self) -> str:
        return f"Program({self.name!r}, fd={self.fd}, type={self.type})"

    @classmethod
    def from_pinned(cls, path: str) -> Program:
        fd = obj_get(path)
        info = prog_info(fd)
        return cls(fd, info["name"], info["type"], owned=True)

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        fd = check(lib().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")
        info = prog_info(fd)
        return cls(fd, info["name"], info["type"], owned=True)

    def _live_fd(self, op: str) -> int:
        if self.fd < 0:
            raise BpfError(errno.EBADF, f"{op} on program {self.name!r} that is not loaded "
                                        f"or was closed")
        return self.fd

    def info(self) -> dict:
        return prog_info(self._live_fd("info"))

    @property
    def id(self) -> int:
        return self.info()["id"]

    def attach_xdp(self, ifindex: int, mode: str = "native") -> Link:
        """Attach as a BPF link so that pinning it keeps it attached past our exit."""
        what = f"XDP program {self.name!r} on ifindex {_ifname(ifindex)} mode {mode}"
        flags = _mode_flags(mode, f"attach_xdp({what})")
        o = opts(bpf_link_create_opts, flags=flags)
        fd = check(lib().bpf_link_create(self._live_fd("attach_xdp"), ifindex, BPF_XDP, byref(o)),
                   f"bpf_link_create({what})")
        return Link(fd, what=f"link of {what}")

    def attach_tcx(self, ifindex: int) -> Link:
        """Attach a tc (SCHED_CLS) program to the ingress of a device as a tcx link
        (Linux 6.6 and later): beside other tc programs, detached when the link goes."""
        what = f"tc program {self.name!r} on ingress of ifindex {_ifname(ifindex)}"
        o = opts(bpf_link_create_opts)
        fd = check(lib().bpf_link_create(self._live_fd("attach_tcx"), ifindex, BPF_TCX_INGRESS,
                                         byref(o)),
                   f"bpf_link_create({what})")
        return Link(fd, what=f"link of {what}")

    def attach_cgroup(self, path: str | os.PathLike, attach_type: int = BPF_CGROUP_SOCK_OPS) -> Link:
        """Attach to the cgroup at ``path`` (a cgroup v2 directory) as a BPF link:
        programs of every process in it and below run, beside other attachments."""
        what = f"program {self.name!r} on cgroup {os.fspath(path)}"
        try:
            cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise BpfError(exc.errno or errno.EINVAL, f"open cgroup {os.fspath(path)}: {exc.strerror}") from None
        try:
            o = opts(bpf_link_create_opts)
            fd = check(lib().bpf_link_create(self._live_fd("attach_cgroup"), cg, attach_type, byref(o)),
                       f"bpf_link_create({what})")
        finally:
            os.close(cg)
        return Link(fd, what=f"link of {what}")

    def attach(self) -> Link:
        if not self._ptr:
            raise BpfError(errno.EINVAL, f"attach({self.name!r}): only programs from a "
                                         f"BpfObject can auto-attach")
        self._live_fd("attach")
        ptr = lib().bpf_program__attach(self._ptr)
        if not ptr:
            raise BpfError(ctypes.get_errno() or errno.EINVAL,
                           f"bpf_program__attach({self.name!r})")
        return Link(lib().bpf_link__fd(ptr), ptr=ptr, what=f"link of program {self.name!r}")

    def test_run(self, data: bytes = b"", *, repeat: int = 1, ctx: bytes | None = None,
                 data_out_size: int | None = None,
                 ctx_out_size: int | None = None) -> TestRunResult:
        """BPF_PROG_TEST_RUN. ``data_out`` defaults to room for the packet plus
        growth by bpf_xdp_adjust_head/tail; programs without packet input
        (tracing, syscall) get no data buffers at all."""
        fd = self._live_fd("test_run")
        if self.type == BPF_PROG_TYPE_SYSCALL:
            # the kernel runs a syscall program once and refuses a repeat count
            if repeat != 1:
                raise ValueError(f"program {self.name!r} is a syscall program: it runs once")
            repeat = 0
        o = opts(bpf_test_run_opts, repeat=repeat)
        keep = []
        if data:
            din = ctypes.create_string_buffer(bytes(data), len(data))
            size_out = len(data) + 4096 if data_out_size is None else data_out_size
            dout = ctypes.create_string_buffer(max(size_out, 1))
            keep += [din, dout]
            o.data_in, o.data_size_in = ctypes.addressof(din), len(data)
            o.data_out, o.data_size_out = ctypes.addressof(dout), size_out
        else:
            dout = None
        cout = None
        if ctx is not None:
            cin = ctypes.create_string_buffer(bytes(ctx), len(ctx))
            keep.append(cin)
            o.ctx_in, o.ctx_size_in = ctypes.addressof(cin), len(ctx)
            csz = len(ctx) if ctx_out_size is None else ctx_out_size
            if csz and self.type in (BPF_PROG_TYPE_XDP, BPF_PROG_TYPE_SCHED_CLS,
                                     BPF_PROG_TYPE_SOCKET_FILTER):
                cout = ctypes.create_string_buffer(csz)
                o.ctx_out, o.ctx_size_out = ctypes.addressof(cout), csz
        check(lib().bpf_prog_test_run_opts(fd, byref(o)),
              f"bpf_prog_test_run_opts(program {self.name!r}, {len(data)} bytes, "
              f"repeat={repeat})")
        out = dout.raw[:o.data_size_out] if dout is not None else b""
        ctx_out = cout.raw[:o.ctx_size_out] if cout is not None else None
        if ctx is not None and self.type == BPF_PROG_TYPE_SYSCALL:
            ctx_out = cin.raw  # the kernel writes a syscall program's context back in place
        return TestRunResult(o.retval, out, o.duration, ctx_out)

    def pin(self, path: str) -> None:
        obj_pin(self._live_fd("pin"), path, f"program {self.name!r}")

    def unpin(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError as e:
            raise BpfError(e.errno, f"unpin program {self.name!r} at {path!r}: "
                                    f"{e.strerror}") from None

    def close(self) -> None:
        """Close an fd we own; programs of a BpfObject close with the object."""
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def xdp_query(ifindex: int) -> dict:
    """What XDP program is on ``ifindex`` (netlink- or link-attached)."""
    o = opts(bpf_xdp_query_opts)
    check(lib().bpf_xdp_query(ifindex, 0, byref(o)), f"bpf_xdp_query(ifindex {_ifname(ifindex)})")
    mode = _ATTACH_MODE_NAMES.get(o.attach_mode, f"unknown({o.attach_mode})")
    prog_id = o.prog_id or o.drv_prog_id or o.skb_prog_id or o.hw_prog_id
    return {"prog_id": prog_id or None, "mode": mode, "drv_prog_id": o.drv_prog_id or None,
            "skb_prog_id": o.skb_prog_id or None, "hw_prog_id": o.hw_prog_id or None}


def xdp_detach(ifindex: int, mode: str) -> None:
    """Remove a netlink-attached program (a link-attached one answers EBUSY:
    use :meth:`Link.detach` for those)."""
    what = f"bpf_xdp_detach(ifindex {_ifname(ifindex)}, mode {mode})"
    flags = _mode_flags(mode, what)
    o = opts(bpf_xdp_attach_opts)
    check(lib().bpf_xdp_detach(ifindex, flags, byref(o)), what)


def xdp_attach_netlink(prog: Program, ifindex: int, mode: str = "native",
                       replace: bool = True) -> None:
    """Legacy netlink attach (no link object; survives process exit, removed
    with :func:`xdp_detach`). Mostly for tests and for tools that expect it."""
    what = f"bpf_xdp_attach(program {prog.name!r}, ifindex {_ifname(ifindex)}, mode {mode})"
    flags = _mode_flags(mode, what)
    if not replace:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    check(lib().bpf_xdp_attach(ifindex, prog._live_fd("xdp_attach"), flags, byref(opts(bpf_xdp_attach_opts))), what)
