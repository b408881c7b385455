"""Tests for meshlb.dataplane.libbpf against the real kernel and system libbpf.

The BPF programs in tests/bpf/progs/ are compiled at test time into a
temporary directory. Network tests run inside namespaces created here; pins
live under /sys/fs/bpf/meshlb-test-<pid>-*/. Everything is removed in teardown.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from meshlb.dataplane import libbpf as lb
from meshlb.dataplane.libbpf import (
    BPF_ANY,
    BPF_EXIST,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_DEVMAP_HASH,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_HASH_OF_MAPS,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_NOEXIST,
    XDP_ABORTED,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    BpfError,
    BpfObject,
    Link,
    Map,
    Program,
    RingReader,
)

REPO = Path(__file__).resolve().parents[2]
PROGS = Path(__file__).resolve().parent / "progs"
PID = os.getpid()

u32 = struct.Struct("=I").pack
u64 = struct.Struct("=Q").pack


def unpack_u32(b: bytes) -> int:
    return struct.unpack("=I", b[:4])[0]


def unpack_u64(b: bytes) -> int:
    return struct.unpack("=Q", b[:8])[0]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def bpf_objs(tmp_path_factory) -> dict[str, Path]:
    """Compile every tests/bpf/progs/*.bpf.c; returns stem -> object path."""
    out = tmp_path_factory.mktemp("bpf-progs")
    vmlinux = REPO / "build" / "bpf" / "vmlinux.h"
    inc = vmlinux.parent
    if not vmlinux.exists():
        # Generate privately rather than racing other engineers on build/.
        with open(out / "vmlinux.h", "w") as f:
            subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux",
                            "format", "c"], stdout=f, check=True)
        inc = out
    objs = {}
    for src in sorted(PROGS.glob("*.bpf.c")):
        obj = out / (src.name[:-2] + ".o")
        subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86",
                        "-Wall", "-Werror", "-Wno-unused-parameter", f"-I{inc}",
                        "-I/usr/include", "-c", str(src), "-o", str(obj)],
                       check=True, capture_output=True)
        objs[src.name.split(".")[0]] = obj
    return objs


@pytest.fixture
def probe(bpf_objs):
    """xdp_probe opened (not loaded)."""
    obj = BpfObject.open(bpf_objs["xdp_probe"])
    yield obj
    obj.close()


@pytest.fixture
def loaded(probe):
    probe.load()
    return probe


@pytest.fixture
def pin_dir():
    d = Path(f"/sys/fs/bpf/meshlb-test-{PID}-{uuid.uuid4().hex[:8]}")
    d.mkdir()
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name: str):
    """Switch this thread into netns ``name`` and back (attach and queries use
    the caller's namespace to resolve ifindexes)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
        yield
    finally:
        if _libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns(back)")
        os.close(target)
        os.close(home)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class VethPair:
    """veth pair between two fresh namespaces with static neighbours, so the
    only packets on the wire are the ones a test sends."""

    def __init__(self) -> None:
        tag = f"{PID}{uuid.uuid4().hex[:4]}"
        self.ns_a, self.ns_b = f"mlbt-{tag}-a", f"mlbt-{tag}-b"
        self.dev_a, self.dev_b = f"mlb{tag}a"[:15], f"mlb{tag}b"[:15]
        self.mac_a, self.mac_b = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
        self.addr_a, self.addr_b = "10.201.0.1", "10.201.0.2"
        self.ifindex_a = 0

    def up(self) -> VethPair:
        ip("netns", "add", self.ns_a)
        ip("netns", "add", self.ns_b)
        ip("link", "add", self.dev_a, "netns", self.ns_a, "address", self.mac_a,
           "type", "veth", "peer", "name", self.dev_b, "netns", self.ns_b,
           "address", self.mac_b)
        for ns, dev, addr, peer, peer_mac in (
                (self.ns_a, self.dev_a, self.addr_a, self.addr_b, self.mac_b),
                (self.ns_b, self.dev_b, self.addr_b, self.addr_a, self.mac_a)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "neigh", "replace", peer, "lladdr", peer_mac, "dev", dev,
               "nud", "permanent")
        with in_netns(self.ns_a):
            self.ifindex_a = socket.if_nametoindex(self.dev_a)
        return self

    def down(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def udp_delivered(self, payload: bytes = b"hello", timeout: float = 0.5) -> bool:
        """Send one datagram B -> A; True if A's socket received it."""
        with in_netns(self.ns_a):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with in_netns(self.ns_b):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with rx, tx:
            rx.bind((self.addr_a, 0))
            rx.settimeout(timeout)
            tx.sendto(payload, (self.addr_a, rx.getsockname()[1]))
            try:
                return rx.recv(100) == payload
            except TimeoutError:
                return False


@pytest.fixture
def veth():
    pair = VethPair()
    try:
        yield pair.up()
    finally:
        pair.down()


def bss_runs(obj: BpfObject) -> int:
    return unpack_u64(obj.map(".bss").lookup(u32(0)))


# --------------------------------------------------------------- no-root tests
def test_import_and_errors_without_libbpf(tmp_path):
    """Importing never touches libbpf; using it without the library is a clear BpfError."""
    code = (
        "import errno\n"
        "from meshlb.dataplane import libbpf as lb\n"
        "assert lb.num_possible_cpus() >= 1\n"
        "try:\n"
        "    lb.BpfObject.open('/nonexistent.o')\n"
        "except lb.BpfError as e:\n"
        "    assert e.errno == errno.ENOENT and 'libbpf' in str(e), e\n"
        "    print('ok')\n"
    )
    env = dict(os.environ, MESHLB_LIBBPF=str(tmp_path / "no-such-libbpf.so"),
               PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_num_possible_cpus_matches_sysfs():
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    last = max(int(part.split("-")[-1]) for part in text.split(","))
    assert lb.num_possible_cpus() == last + 1


# ------------------------------------------------------------- object & load
pytestmark_priv = pytest.mark.privileged


@pytestmark_priv
def test_open_lists_maps_and_programs(probe):
    names = {m.name for m in probe.maps()}
    assert {"verdicts", "counters", "pcpu_small", "lru", "outer", "events"} <= names
    assert [p.name for p in probe.programs()] == ["xdp_probe"]
    v = probe.map("verdicts")
    assert (v.type, v.key_size, v.value_size, v.max_entries) == (BPF_MAP_TYPE_HASH, 4, 4, 64)
    assert v.fd < 0  # not loaded yet
    assert probe.map(".rodata").name.endswith(".rodata")
    with pytest.raises(KeyError, match="no map 'nope'.*verdicts"):
        probe.map("nope")
    with pytest.raises(KeyError, match="no program 'nope'"):
        probe.program("nope")


@pytestmark_priv
def test_open_with_name_and_missing_file(bpf_objs, tmp_path):
    with BpfObject.open(bpf_objs["xdp_probe"], name="renamed") as obj:
        assert obj.name == "renamed"
        assert any(m.name.startswith("renamed.") for m in obj.maps())
    missing = tmp_path / "missing.bpf.o"
    with pytest.raises(BpfError) as ei:
        BpfObject.open(missing)
    assert ei.value.errno == errno.ENOENT
    assert str(missing) in str(ei.value)


@pytestmark_priv
def test_load_sets_fds_and_test_run(loaded):
    prog = loaded.program("xdp_probe")
    assert prog.fd >= 0 and prog.type == lb.BPF_PROG_TYPE_XDP
    assert loaded.map("verdicts").fd >= 0
    pkt = bytes(range(32))
    r = prog.test_run(pkt)
    assert r.retval == XDP_PASS
    assert r.data == pkt  # stamp is 0: packet untouched
    assert prog.info()["name"] == "xdp_probe"


@pytestmark_priv
def test_load_failure_carries_verifier_log_and_program_name(bpf_objs):
    with BpfObject.open(bpf_objs["xdp_reject"]) as obj:
        with pytest.raises(BpfError) as ei:
            obj.load()
    e = ei.value
    assert e.errno == errno.EACCES
    assert "xdp_unchecked_read" in str(e)
    assert e.program == "xdp_unchecked_read"
    assert "invalid access to packet" in e.log
    assert "processed" in e.log  # the full log, not only the summary line
    assert "invalid access to packet" in str(e)


@pytestmark_priv
def test_load_failure_outside_programs_names_the_map(probe):
    probe.set_max_entries("lru", 0)  # the kernel refuses empty hash maps
    with pytest.raises(BpfError) as ei:
        probe.load()
    assert ei.value.errno == errno.EINVAL
    assert "lru" in str(ei.value) and "xdp_probe" in str(ei.value)
    assert ei.value.program is None and ei.value.log == ""


@pytestmark_priv
def test_maps_and_programs_keep_their_object_alive(bpf_objs):
    def load_and_forget():
        obj = BpfObject.open(bpf_objs["xdp_probe"])
        obj.load()
        return obj.map("verdicts"), obj.program("xdp_probe")

    m, prog = load_and_forget()
    gc.collect()
    m.update(u32(20), u32(XDP_TX))
    assert prog.test_run(b"\x01" + b"\x00" * 19).retval == XDP_TX


@pytestmark_priv
def test_set_global_rodata_data_and_errors(probe):
    probe.set_global("default_verdict", u32(XDP_DROP))
    probe.set_global("stamp", u64(0x1122334455667788))
    probe.set_global("data_var", u32(1234))
    with pytest.raises(ValueError, match="4 bytes"):
        probe.set_global("default_verdict", u64(1))
    with pytest.raises(KeyError, match="no_such_var"):
        probe.set_global("no_such_var", u32(1))
    probe.load()
    r = probe.program("xdp_probe").test_run(b"\x00" * 20)
    assert r.retval == XDP_DROP
    assert r.data[8:16] == u64(0x1122334455667788)
    assert unpack_u32(probe.map(".data").lookup(u32(0))) == 1234
    with pytest.raises(BpfError) as ei:
        probe.set_global("default_verdict", u32(XDP_PASS))
    assert ei.value.errno == errno.EBUSY


@pytestmark_priv
def test_set_max_entries(probe):
    probe.set_max_entries("lru", 2048)
    probe.load()
    m = probe.map("lru")
    assert m.max_entries == 2048
    assert m.info()["max_entries"] == 2048
    with pytest.raises(BpfError):
        probe.set_max_entries("lru", 10)


@pytestmark_priv
def test_test_run_repeat_and_duration(loaded):
    prog = loaded.program("xdp_probe")
    before = bss_runs(loaded)
    r = prog.test_run(b"\x00" * 64, repeat=1000)
    assert r.retval == XDP_PASS
    assert bss_runs(loaded) - before == 1000
    assert 0 < r.duration_ns < 1_000_000
    per_cpu = loaded.map("counters").lookup_percpu(u32(0))
    assert sum(unpack_u64(v) for v in per_cpu) == 1000


@pytestmark_priv
def test_test_run_ctx_and_output_size(loaded):
    prog = loaded.program("xdp_probe")
    # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    ctx = struct.pack("=6I", 0, 0, 0, 0, 0, 0)
    r = prog.test_run(b"\x00" * 20, ctx=ctx)
    assert r.retval == XDP_PASS and len(r.ctx) == len(ctx)
    with pytest.raises(BpfError) as ei:
        prog.test_run(b"\x00" * 64, data_out_size=8)
    assert ei.value.errno == errno.ENOSPC
    assert "xdp_probe" in str(ei.value)


# --------------------------------------------------------------------- maps
@pytestmark_priv
def test_hash_crud(loaded):
    m = loaded.map("verdicts")
    prog = loaded.program("xdp_probe")
    assert m.lookup(u32(20)) is None
    m.update(u32(20), u32(XDP_TX))
    assert m.lookup(u32(20)) == u32(XDP_TX)
    assert prog.test_run(b"\x01" + b"\x00" * 19).retval == XDP_TX  # the program sees it
    with pytest.raises(BpfError) as ei:
        m.update(u32(20), u32(1), BPF_NOEXIST)
    assert ei.value.errno == errno.EEXIST and "verdicts" in str(ei.value)
    with pytest.raises(BpfError) as ei:
        m.update(u32(21), u32(1), BPF_EXIST)
    assert ei.value.errno == errno.ENOENT
    m.update(u32(20), u32(XDP_DROP), BPF_EXIST)
    m.update(u32(30), u32(XDP_PASS), BPF_ANY)
    assert dict(m.items()) == {u32(20): u32(XDP_DROP), u32(30): u32(XDP_PASS)}
    assert sorted(m.keys()) == [u32(20), u32(30)]
    assert m.delete(u32(20)) is True
    assert m.delete(u32(20)) is False
    assert list(m.keys()) == [u32(30)]
    with pytest.raises(ValueError, match="key is 8 bytes"):
        m.lookup(u64(1))
    with pytest.raises(ValueError, match="value is 8 bytes"):
        m.update(u32(1), u64(1))


@pytestmark_priv
def test_keys_survive_deletion_during_iteration(loaded):
    m = loaded.map("lru")
    want = {u64(i) for i in range(300)}
    m.update_batch([(k, k) for k in want])
    seen = []
    for i, k in enumerate(m.keys()):
        seen.append(k)
        if i % 2:
            # get_next_key from a deleted key restarts at the first bucket,
            # which revisits the keys kept so far
            m.delete(k)
    assert len(seen) == len(set(seen)) == 300
    assert set(seen) == want
    assert set(m.keys()) == set(seen[0::2])


@pytestmark_priv
def test_batch_operations(loaded):
    m = loaded.map("lru")
    items = [(u64(i), u64(i * 7)) for i in range(600)]
    m.update_batch(items)
    got = m.lookup_batch(batch_size=64)
    assert sorted(got) == sorted(items)
    # absent keys interleaved: the kernel stops at each one, the wrapper goes on
    gone = [u64(10_000)] + [k for i in range(0, 600, 2) for k in (u64(i), u64(20_000 + i))]
    assert m.delete_batch(gone) == 300
    assert sorted(m.lookup_batch()) == sorted(items[1::2])
    assert m.lookup_batch(batch_size=1) and len(m.lookup_batch(batch_size=1)) == 300
    assert m.delete_batch([]) == 0


@pytestmark_priv
def test_batch_fallback_for_map_without_batch_support():
    # DEVMAP_HASH has no batch operations (the kernel answers ENOTSUPP); its
    # values are ifindexes, and loopback (1) always exists.
    with Map.create(BPF_MAP_TYPE_DEVMAP_HASH, 4, 4, 16, name=f"t{PID}dev"[:15]) as m:
        items = [(u32(k), u32(1)) for k in (3, 5, 9)]
        m.update_batch(items)
        assert sorted(m.lookup_batch()) == sorted(items)
        assert m.delete_batch([u32(3), u32(4)]) == 1
        assert sorted(m.lookup_batch()) == sorted(items[1:])
        with pytest.raises(BpfError) as ei:  # a real error still surfaces
            m.update_batch([(u32(7), u32(0x7FFFFFF0))])
        assert "update" in str(ei.value) and m.name in str(ei.value)


@pytestmark_priv
def test_batch_on_lpm_trie():
    with Map.create(BPF_MAP_TYPE_LPM_TRIE, 8, 4, 16, name=f"t{PID}lpm"[:15],
                    flags=BPF_F_NO_PREALLOC) as m:
        def key(plen, addr):
            return struct.pack("=I4s", plen, socket.inet_aton(addr))
        items = [(key(24, "10.0.0.0"), u32(1)), (key(16, "10.1.0.0"), u32(2)),
                 (key(32, "10.2.3.4"), u32(3))]
        m.update_batch(items)
        assert sorted(m.lookup_batch()) == sorted(items)
        assert m.delete_batch([items[0][0], key(8, "11.0.0.0")]) == 1
        assert sorted(m.lookup_batch()) == sorted(items[1:])


@pytestmark_priv
def test_percpu_values(loaded):
    ncpu = lb.num_possible_cpus()
    c = loaded.map("counters")
    assert c.percpu
    c.update(u32(2), u64(5))  # one value: replicated to every CPU
    assert c.lookup_percpu(u32(2)) == [u64(5)] * ncpu
    vals = [u64(100 + i) for i in range(ncpu)]
    c.update(u32(3), vals)
    assert c.lookup_percpu(u32(3)) == vals
    with pytest.raises(ValueError, match="per-CPU values"):
        c.update(u32(3), vals + [u64(0)])
    # 4-byte values live in 8-byte per-CPU slots; callers see 4 bytes per CPU.
    s = loaded.map("pcpu_small")
    small = [u32(7 + i) for i in range(ncpu)]
    s.update(u32(1), small)
    assert s.lookup_percpu(u32(1)) == small
    assert len(s.lookup(u32(1))) == 8 * ncpu
    assert s.lookup_batch_percpu() == [(u32(1), small)]
    assert list(s.items_percpu()) == [(u32(1), small)]
    assert s.lookup_percpu(u32(9)) is None
    with pytest.raises(TypeError):
        loaded.map("verdicts").lookup_percpu(u32(1))


@pytestmark_priv
def test_map_in_map_inner_creation_and_swap(loaded):
    outer = loaded.map("outer")
    prog = loaded.program("xdp_probe")
    pkt = b"\xaa" + b"\x00" * 19
    assert prog.test_run(pkt).retval == XDP_ABORTED  # no inner map yet
    inner_a = Map.create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, name="inner_a")
    inner_b = Map.create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, name="inner_b")
    try:
        inner_a.update(u32(0), u32(XDP_DROP))
        inner_b.update(u32(0), u32(XDP_TX))
        outer.set_inner(u32(0), inner_a)
        assert prog.test_run(pkt).retval == XDP_DROP
        assert outer.inner_id(u32(0)) == inner_a.id
        outer.update(u32(0), u32(inner_b.fd))  # the raw form: value is the inner fd
        assert prog.test_run(pkt).retval == XDP_TX
        assert outer.inner_id(u32(0)) == inner_b.id
        # an inner map whose shape differs from the template is refused
        with Map.create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="inner_bad") as bad:
            with pytest.raises(BpfError) as ei:
                outer.set_inner(u32(0), bad)
            assert ei.value.errno == errno.EINVAL and "outer" in str(ei.value)
        # a HASH_OF_MAPS created at run time from an inner template fd
        with Map.create(BPF_MAP_TYPE_HASH_OF_MAPS, 4, 4, 8, name="hom",
                        inner_map_fd=inner_a.fd) as hom:
            hom.set_inner(u32(42), inner_b)
            assert hom.inner_id(u32(42)) == inner_b.id
            assert Map.from_id(inner_b.id).lookup(u32(0)) == u32(XDP_TX)
    finally:
        inner_a.close()
        inner_b.close()


@pytestmark_priv
def test_map_create_error_names_map():
    with pytest.raises(BpfError) as ei:
        Map.create(BPF_MAP_TYPE_HASH, 0, 4, 16, name="bad_hash")
    assert ei.value.errno == errno.EINVAL and "bad_hash" in str(ei.value)


# ------------------------------------------------------------------ pinning
@pytestmark_priv
def test_pin_from_pinned_unpin(loaded, pin_dir):
    m = loaded.map("verdicts")
    m.update(u32(5), u32(XDP_TX))
    path = str(pin_dir / "verdicts")
    m.pin(path)
    assert lb.obj_pinned_type(path) == "map"
    with Map.from_pinned(path) as again:
        assert again.lookup(u32(5)) == u32(XDP_TX)
        assert again.id == m.id
        assert (again.key_size, again.value_size, again.name) == (4, 4, "verdicts")
    m.unpin(path)
    with pytest.raises(BpfError) as ei:
        Map.from_pinned(path)
    assert ei.value.errno == errno.ENOENT and path in str(ei.value)

    prog = loaded.program("xdp_probe")
    ppath = str(pin_dir / "prog")
    prog.pin(ppath)
    assert lb.obj_pinned_type(ppath) == "prog"
    p2 = Program.from_pinned(ppath)
    assert (p2.name, p2.type, p2.id) == ("xdp_probe", prog.type, prog.id)
    assert p2.test_run(b"\x00" * 20).retval == XDP_PASS
    p2.close()
    prog.unpin(ppath)


@pytestmark_priv
def test_reuse_pinned_map_adopts_state(bpf_objs, pin_dir):
    path = str(pin_dir / "lru")
    with BpfObject.open(bpf_objs["xdp_probe"]) as first:
        first.load()
        first.map("lru").update(u64(1), u64(99))
        first.map("lru").pin(path)
        first_id = first.map("lru").id
    # the first agent is gone; its conntrack survives in the pin
    with BpfObject.open(bpf_objs["xdp_probe"]) as second:
        second.reuse_pinned_map("lru", path)
        second.load()
        assert second.map("lru").id == first_id
        assert second.map("lru").lookup(u64(1)) == u64(99)
    with BpfObject.open(bpf_objs["xdp_probe"]) as third:
        with pytest.raises(BpfError) as ei:
            third.reuse_pinned_map("verdicts", path)  # wrong key/value size
        assert ei.value.errno == errno.EINVAL and "verdicts" in str(ei.value)
        with pytest.raises(BpfError) as ei:
            third.reuse_pinned_map("lru", str(pin_dir / "absent"))
        assert ei.value.errno == errno.ENOENT


@pytestmark_priv
def test_closed_object_refuses_use(bpf_objs):
    obj = BpfObject.open(bpf_objs["xdp_probe"])
    obj.load()
    m = obj.map("verdicts")
    m.close()  # the object owns the fd: closing the view must not break it
    m.update(u32(1), u32(2))
    assert obj.map("verdicts").lookup(u32(1)) == u32(2)
    obj.close()
    with pytest.raises(BpfError) as ei:
        m.lookup(u32(1))
    assert ei.value.errno == errno.EBADF
    with pytest.raises(BpfError):
        obj.map("verdicts")


# ---------------------------------------------------------------------- XDP
@pytestmark_priv
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_attach_xdp_on_veth(bpf_objs, veth, mode):
    with BpfObject.open(bpf_objs["xdp_probe"]) as obj:
        obj.set_global("default_verdict", u32(XDP_DROP))
        obj.load()
        prog = obj.program("xdp_probe")
        assert veth.udp_delivered()
        with in_netns(veth.ns_a):
            link = prog.attach_xdp(veth.ifindex_a, mode)
            q = lb.xdp_query(veth.ifindex_a)
        assert q["prog_id"] == prog.id and q["mode"] == mode
        assert link.info()["prog_id"] == prog.id
        before = bss_runs(obj)
        assert not veth.udp_delivered()
        assert bss_runs(obj) > before
        link.close()  # unpinned: closing our fd detaches
        with in_netns(veth.ns_a):
            assert lb.xdp_query(veth.ifindex_a)["prog_id"] is None
        assert veth.udp_delivered()


@pytestmark_priv
def test_attach_xdp_error_names_interface_and_mode(loaded):
    with pytest.raises(BpfError) as ei:
        loaded.program("xdp_probe").attach_xdp(987654, "generic")
    assert "987654" in str(ei.value) and "generic" in str(ei.value)
    with pytest.raises(ValueError, match="unknown XDP mode"):
        loaded.program("xdp_probe").attach_xdp(1, "turbo")


@pytestmark_priv
def test_pinned_link_outlives_objects_until_detach(bpf_objs, veth, pin_dir):
    lpath = str(pin_dir / "xdp_link")
    obj = BpfObject.open(bpf_objs["xdp_probe"])
    obj.set_global("default_verdict", u32(XDP_DROP))
    obj.load()
    prog_id = obj.program("xdp_probe").id
    with in_netns(veth.ns_a):
        link = obj.program("xdp_probe").attach_xdp(veth.ifindex_a, "generic")
    link.pin(lpath)
    link.close()
    obj.close()  # program and link now live only through the pin
    with in_netns(veth.ns_a):
        assert lb.xdp_query(veth.ifindex_a)["prog_id"] == prog_id
    assert not veth.udp_delivered()
    assert lb.obj_pinned_type(lpath) == "link"

    adopted = Link.from_pinned(lpath)
    assert adopted.info()["prog_id"] == prog_id
    assert adopted.info()["xdp_ifindex"] == veth.ifindex_a
    adopted.detach()  # detaches although the pin still holds the link
    with in_netns(veth.ns_a):
        assert lb.xdp_query(veth.ifindex_a)["prog_id"] is None
    assert veth.udp_delivered()
    adopted.unpin()
    assert not os.path.exists(lpath)
    adopted.close()


@pytestmark_priv
def test_link_update_program_swaps_atomically(bpf_objs, veth):
    with BpfObject.open(bpf_objs["xdp_probe"]) as dropper, \
            BpfObject.open(bpf_objs["xdp_probe"]) as passer:
        dropper.set_global("default_verdict", u32(XDP_DROP))
        dropper.load()
        passer.load()
        old, new = dropper.program("xdp_probe"), passer.program("xdp_probe")
        with in_netns(veth.ns_a):
            link = old.attach_xdp(veth.ifindex_a, "generic")
        with link:
            assert not veth.udp_delivered()
            link.update_program(new, expected_old=old)
            assert link.info()["prog_id"] == new.id
            assert veth.udp_delivered()
            with pytest.raises(BpfError) as ei:
                link.update_program(old, expected_old=old)  # old is no longer current
            assert ei.value.errno == errno.EPERM
            assert link.info()["prog_id"] == new.id
            link.update(old)  # unconditional swap, the short name
            assert link.info()["prog_id"] == old.id
            assert not veth.udp_delivered()


@pytestmark_priv
def test_netlink_attach_and_xdp_detach(loaded, veth):
    prog = loaded.program("xdp_probe")
    with in_netns(veth.ns_a):
        lb.xdp_attach_netlink(prog, veth.ifindex_a, "generic")
        try:
            assert lb.xdp_query(veth.ifindex_a) == {
                "prog_id": prog.id, "mode": "generic", "drv_prog_id": None,
                "skb_prog_id": prog.id, "hw_prog_id": None}
        finally:
            lb.xdp_detach(veth.ifindex_a, "generic")
        assert lb.xdp_query(veth.ifindex_a)["prog_id"] is None


# ------------------------------------------------------------- auto-attach
@pytestmark_priv
def test_auto_attach_tp_btf(bpf_objs):
    with BpfObject.open(bpf_objs["trace_getppid"]) as obj:
        obj.set_global("target_tgid", u32(os.getpid()))
        obj.load()
        hits = obj.map(".bss")
        link = obj.program("count_getppid").attach()
        assert link.fd >= 0
        for _ in range(5):
            os.getppid()
        assert unpack_u64(hits.lookup(u32(0))) == 5
        link.close()
        for _ in range(5):
            os.getppid()
        assert unpack_u64(hits.lookup(u32(0))) == 5


# -------------------------------------------------------------- ring buffer
EVENT = struct.Struct("=II8s")


def emit_events(obj: BpfObject, payloads: list[bytes]) -> None:
    prog = obj.program("xdp_probe")
    for p in payloads:
        pkt = b"\xee" + p.ljust(7, b"\0")[:7] + b"\0" * 12
        assert prog.test_run(pkt).retval == XDP_PASS


def _payloads(got: list[bytes]) -> list[bytes]:
    return [EVENT.unpack(r)[2].rstrip(b"\0") for r in got]


@pytestmark_priv
def test_ring_reader_commits_only_when_told(loaded):
    events = loaded.map("events")
    with RingReader(events) as first:
        emit_events(loaded, [b"a", b"b", b"c"])
        got: list[bytes] = []
        assert first.read(got.append) == 3
        assert _payloads(got) == [b"a", b"b", b"c"]
        assert first.uncommitted()
        assert first.read(got.append) == 0  # the read position moved on
        # a reader that takes over (a restarted agent) gets what was read but not committed
        with RingReader(events) as second:
            again: list[bytes] = []
            assert second.read(again.append) == 3
            assert again == got
        first.commit()
        assert not first.uncommitted()
        with RingReader(events) as third:
            assert third.read(got.append) == 0


@pytestmark_priv
def test_ring_reader_partial_commit_limit_rewind_and_discard(loaded):
    with RingReader(loaded.map("events")) as r:
        emit_events(loaded, [b"one", b"\xddgone", b"two", b"three"])
        got: list[bytes] = []
        assert r.read(got.append, limit=1) == 1
        mid = r.position
        assert r.read(got.append) == 2  # the discarded record is skipped, not delivered
        assert _payloads(got) == [b"one", b"two", b"three"]
        r.commit(mid)
        r.rewind()
        again: list[bytes] = []
        assert r.read(again.append) == 2
        assert _payloads(again) == [b"two", b"three"]
        with pytest.raises(ValueError):
            r.commit(mid - 8)  # behind what is committed
        r.commit()


@pytestmark_priv
def test_ring_reader_reads_records_that_wrap_the_ring(loaded):
    events = loaded.map("events")  # 4096 bytes: 170 records of 24
    seen: list[int] = []
    with RingReader(events) as r:
        for rnd in range(5):
            emit_events(loaded, [f"r{rnd}n{i}".encode() for i in range(100)])
            got: list[bytes] = []
            assert r.read(got.append) == 100
            assert _payloads(got) == [f"r{rnd}n{i}".encode() for i in range(100)]
            seen += [EVENT.unpack(g)[1] for g in got]
            r.commit()
        assert r.committed > events.max_entries  # it went round the ring
    assert seen == list(range(seen[0], seen[0] + 500))


@pytestmark_priv
def test_ring_reader_fd_is_readable_while_uncommitted(loaded):
    import select

    with RingReader(loaded.map("events")) as r:
        p = select.poll()
        p.register(r.fd, select.POLLIN)
        assert p.poll(0) == []
        emit_events(loaded, [b"x"])
        assert p.poll(100)
        r.read(lambda _: None)
        assert p.poll(0)  # read but not committed: still there for a successor
        r.commit()
        assert p.poll(0) == []
    with pytest.raises(BpfError):
        RingReader(loaded.map("verdicts"))


# ------------------------------------------------------------------ logging
@pytestmark_priv
def test_libbpf_messages_go_to_logging(bpf_objs, caplog):
    with caplog.at_level(logging.DEBUG, logger="meshlb.libbpf"):
        with BpfObject.open(bpf_objs["xdp_probe"]) as obj:
            obj.load()
    libbpf_records = [r for r in caplog.records if r.name == "meshlb.libbpf"]
    assert libbpf_records
    assert all(r.levelno == logging.DEBUG for r in libbpf_records)
    assert any("xdp_probe" in r.getMessage() for r in libbpf_records)
