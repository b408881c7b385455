#!/usr/bin/env python3
"""Data-plane benchmark: ns/packet of the balancer's paths next to floor programs,
all measured with BPF_PROG_TEST_RUN in the same run on one pinned CPU.

    sudo python3 bench/bpf_bench.py [--repeat N] [--runs 5] [--cpu 1] [--flows 100000,1000000]
                                    [--object OBJ] [--baseline OBJ [--baseline-header H]]
                                    [--baseline-ref REF] [--calls N] [--markdown FILE]

With --baseline (or --baseline-ref, which builds the balancer of a git revision, say
main), a second balancer object is loaded next to the first, each with maps of its
own, and every path is measured on both, their runs interleaved in alternating order
(ABBA...): the table then gives both medians and their ratio, which a shared, noisy
machine cannot skew the way it skews two separate runs. An object's counters are
numbered by its own header (--baseline-header; --baseline-ref takes the revision's).
Paths the baseline does not have (it passed those packets to the stack) are measured
on this tree's object alone.

Every run is checked: its return code and the counter deltas must say that all N
iterations took the claimed path (see the repeat trap in BENCHMARKING.md). Paths that
rewrite the packet's first 64 bytes run behind bench_wrap (bench/progs/floor.bpf.c),
which restores them and tail-calls the balancer; the wrapper's own cost, measured as
wrap->floor_ret minus floor_ret, is subtracted and reported. Paths that change the
packet's size or bytes past the 64 (an ICMP error answered, translated, or handed
over with metadata) run as --calls separate single runs, the median of their
in-kernel durations less the per-run timer cost (single runs of floor_ret less its
repeated cost).

SYN rows run on balancers of their own, sized so that one CPU holds 131072 flows
(Katran's per-CPU LRU of BENCHMARKING.md: 131072 per CPU for the layout that splits
the map over the possible CPUs, 131072 for the one common list); the new-tuple row
starts with that conntrack full, so every one of its inserts evicts.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import ctypes.util
import ipaddress
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from scapy.utils import checksum  # noqa: E402

from meshlb.dataplane import capacity  # noqa: E402
from meshlb.dataplane import layouts as L  # noqa: E402
from meshlb.dataplane.balancer import OBJECT_PATH, Balancer  # noqa: E402
from meshlb.dataplane.libbpf import XDP_DROP, XDP_PASS, XDP_TX, BpfObject  # noqa: E402

PID = os.getpid()
VIP, CLIENT, BACKEND, SNAT = "203.0.113.10", "10.1.0.1", "10.10.0.2", "10.10.0.1"
BACKEND_SMALL, BACKEND_NONEIGH = "10.10.0.3", "10.10.0.4"  # a path of MTU 1280; no neighbour
VIP6, CLIENT6, BACKEND6_SMALL = "2001:db8:f::10", "2001:db8:c::1", "fd00:10::3"
ROUTER = "192.0.2.254"
MAC_A, MAC_BE = "02:00:00:00:0a:01", "02:00:00:00:0a:02"
SMALL_MTU = 1280
SYN_PER_CPU = 131072  # flows one CPU holds in the SYN rows' conntrack
# Katran's balancer in the same kind of run (BENCHMARKING.md), in multiples of the
# parse+lookup floor of its own run
KATRAN = {"hit": "2.1x", "syn_same": "4.7x", "syn_new": "11.2x", "nonvip": "1.2x",
          "hit_1m": "5.3x"}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Netns:
    """Private netns: veth with the backends and a gateway as permanent neighbours,
    so bpf_fib_lookup succeeds inside test runs (issued from a thread in it); one
    backend behind a route of MTU 1280, one without a neighbour entry."""

    def __init__(self) -> None:
        self.name, self.dev = f"mlbbench{PID}", f"mlbbv{PID}"
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __enter__(self) -> Netns:
        n = self.name
        sh("ip", "netns", "add", n)
        try:
            for k in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
                sh("ip", "netns", "exec", n, "sysctl", "-qw", k)
            sh("ip", "-n", n, "link", "add", self.dev, "address", MAC_A, "type", "veth",
               "peer", "name", self.dev + "p")
            sh("ip", "-n", n, "link", "set", self.dev, "up")
            sh("ip", "-n", n, "link", "set", self.dev + "p", "up")
            sh("ip", "-n", n, "addr", "add", "10.10.0.1/24", "dev", self.dev)
            sh("ip", "-n", n, "-6", "addr", "add", "fd00:10::1/64", "dev", self.dev, "nodad")
            for a in (BACKEND, BACKEND_SMALL, "10.10.0.254", BACKEND6_SMALL, "fd00:10::fe"):
                sh("ip", "-n", n, "neigh", "replace", a, "lladdr", MAC_BE, "nud", "permanent",
                   "dev", self.dev)
            sh("ip", "-n", n, "route", "add", "default", "via", "10.10.0.254")
            sh("ip", "-n", n, "-6", "route", "add", "default", "via", "fd00:10::fe")
            for a in (BACKEND_SMALL, BACKEND6_SMALL):
                sh("ip", "-n", n, "route", "add", a, "dev", self.dev, "mtu", "lock",
                   str(SMALL_MTU))
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

            def enter() -> None:
                fd = os.open(f"/run/netns/{n}", os.O_RDONLY)
                try:
                    if libc.setns(fd, 0x40000000) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
            self.pool = concurrent.futures.ThreadPoolExecutor(1, initializer=enter)
            self.ifindex = self.call(lambda: __import__("socket").if_nametoindex(self.dev))
        except BaseException:
            self.__exit__()
            raise
        return self

    def call(self, fn):
        return self.pool.submit(fn).result()

    def __exit__(self, *exc) -> None:
        if self.pool:
            self.pool.shutdown()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def build_floor() -> Path:
    out = ROOT / "build" / "bench" / "floor.bpf.o"
    out.parent.mkdir(parents=True, exist_ok=True)
    vmlinux = ROOT / "build" / "bpf" / "vmlinux.h"
    if not vmlinux.exists():
        sh("make", "-C", str(ROOT))
    sh("clang", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
       f"-I{ROOT / 'build' / 'bpf'}", f"-I{ROOT / 'bpf'}", "-c",
       str(ROOT / "bench" / "progs" / "floor.bpf.c"), "-o", str(out))
    return out


def cycled_key(base: str, i: int) -> L.FlowKey:
    """The flow bench_wrap makes of iteration i: low 16 bits of the source address
    and the source port are written as host-order u16s."""
    k = L.flow_key(base, 0, VIP, 80, 6)
    raw = bytes(ipaddress.IPv4Address(base).packed[:2]) + struct.pack("=H", (i >> 16) & 0xFFFF)
    k.src[0] = int.from_bytes(raw, "little")
    k.sport = i & 0xFFFF
    return k


def tcp(src=CLIENT, dst=VIP, sport=40000, dport=80, flags="A") -> bytes:
    return bytes(Ether(src="02:00:00:00:cc:01", dst=MAC_A) / IP(src=src, dst=dst) /
                 TCP(sport=sport, dport=dport, flags=flags) / (b"x" * 10))


def marked_tcp(**kw) -> bytes:
    """tcp() as a peer forwards it: the IPv4 reserved bit set (the peer mark)."""
    pkt = Ether(tcp(**kw))
    pkt[IP].flags = int(pkt[IP].flags) | 0x4
    del pkt[IP].chksum
    return bytes(pkt)


def big_tcp(dst=VIP, dport=80, payload=1400) -> bytes:
    """A DF data segment bigger than the path of MTU 1280."""
    return bytes(Ether(src="02:00:00:00:cc:01", dst=MAC_A) / IP(src=CLIENT, dst=dst, flags="DF") /
                 TCP(sport=40000, dport=dport, flags="PA") / (b"x" * payload))


def big_tcp6(payload=1400) -> bytes:
    return bytes(Ether(src="02:00:00:00:cc:01", dst=MAC_A) / IPv6(src=CLIENT6, dst=VIP6) /
                 TCP(sport=40000, dport=80, flags="PA") / (b"x" * payload))


def icmp_error(vport: int, cport: int, inner_src=VIP, inner_dst=CLIENT) -> bytes:
    """A router's fragmentation-needed to the VIP about a reply that left from it."""
    inner = bytes(IP(src=inner_src, dst=inner_dst, flags="DF") /
                  TCP(sport=vport, dport=cport, flags="PA") / (b"y" * 1400))[:548]
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, 1200) + inner
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return bytes(Ether(src="02:00:00:00:cc:01", dst=MAC_A) /
                 IP(src=ROUTER, dst=VIP, proto=1) / Raw(icmp))


def with_ip_options(pkt: bytes, opts: bytes) -> bytes:
    e = Ether(pkt)
    e[IP].options = [Raw(opts)]
    e[IP].ihl = None
    e[IP].len = None
    del e[IP].chksum
    return bytes(e)


def counter_names(header: Path) -> dict[int, str]:
    """Counter index -> name, from enum mlb_counter of the header the object was built
    from (another revision numbers its counters its own way)."""
    body = re.search(r"enum mlb_counter \{(.*?)\};", header.read_text(), re.S)
    if body is None:
        raise SystemExit(f"{header}: no enum mlb_counter")
    names = [n for n in re.findall(r"^\s*(MLB_CNT_\w+)", body.group(1), re.M)
             if n != "MLB_CNT_MAX"]
    out = {i: n[len("MLB_CNT_"):].lower() for i, n in enumerate(names)}
    fib = names.index("MLB_CNT_FIB_RC")
    for rc in range(L.MLB_FIB_RC_SLOTS):
        out[fib + rc] = f"fib_{L.FIB_RC_NAMES.get(rc, f'rc{rc}')}"
    return out


def build_revision(ref: str, out_dir: Path) -> tuple[Path, Path]:
    """The balancer object of git revision ``ref`` and its header, built as make does."""
    src = out_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "bpf"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    obj = out_dir / "balancer.bpf.o"
    sh("clang", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
       f"-I{ROOT / 'build' / 'bpf'}", f"-I{src / 'bpf'}", "-c",
       str(src / "bpf" / "balancer.bpf.c"), "-o", str(obj))
    return obj, src / "bpf" / "meshlb.h"


class Subject:
    """One program under test; lb is the balancer whose counters check its runs,
    named by the object's own header."""

    def __init__(self, label: str, lb: Balancer | None = None, path: Path | None = None,
                 names: dict[int, str] | None = None) -> None:
        self.label, self.lb, self.path, self.names = label, lb, path, names

    def counters(self) -> dict[str, int]:
        totals: dict[str, int] = {n: 0 for n in self.names.values()}
        for k, vals in self.lb.maps["counters"].lookup_batch_percpu():
            name = self.names.get(struct.unpack("=I", k)[0])
            if name:
                totals[name] = sum(struct.unpack("=Q", v)[0] for v in vals)
        return totals


def load(label: str, path: Path, header: Path, flows: int) -> Subject:
    """A balancer whose conntrack holds ``flows`` flows from one CPU: the layout of an
    older object (BPF_F_NO_COMMON_LRU) splits the map over the possible CPUs."""
    lb = Balancer.load(conntrack_size=capacity.plan(flows).max_entries, path=path)
    if lb.maps["conntrack"].info()["map_flags"] & capacity.BPF_F_NO_COMMON_LRU:
        lb.close()
        cpus = capacity.possible_cpus()
        lb = Balancer.load(conntrack_size=capacity.plan(flows * cpus).max_entries, path=path)
    return Subject(label, lb, path, counter_names(header))


def setup(s: Subject) -> None:
    """The same VIPs on every balancer: dr :80 and nat :443 to a backend on the veth,
    dr :8081 and nat :8443 to one behind a path of MTU 1280, dr :8082 to one without a
    neighbour entry, and an IPv6 dr VIP to the narrow path."""
    lb = s.lb
    lb.add_vip(VIP, 80, "tcp", "dr", vip_id=1, ring_size=L.MLB_DEFAULT_RING)
    lb.add_vip(VIP, 443, "tcp", "nat", vip_id=2, ring_size=L.MLB_DEFAULT_RING)
    lb.add_vip(VIP, 8081, "tcp", "dr", vip_id=3, ring_size=L.MLB_DEFAULT_RING)
    lb.add_vip(VIP, 8443, "tcp", "nat", vip_id=4, ring_size=L.MLB_DEFAULT_RING)
    lb.add_vip(VIP, 8082, "tcp", "dr", vip_id=5, ring_size=L.MLB_DEFAULT_RING)
    lb.add_vip(VIP6, 80, "tcp", "dr", vip_id=6, ring_size=L.MLB_DEFAULT_RING)
    lb.set_backend(1, BACKEND, 8443)
    lb.set_backend(2, BACKEND_SMALL, 8443)
    lb.set_backend(3, BACKEND_NONEIGH)
    lb.set_backend(4, BACKEND6_SMALL)
    table = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 4}
    lb.set_vip_tables({v: [b] * L.MLB_DEFAULT_RING for v, b in table.items()})
    lb.set_snat(L.AF_INET, SNAT, 1024, 65535)


class Bench:
    def __init__(self, ns: Netns, repeat: int, runs: int, calls: int,
                 floor_flows: int = 1024) -> None:
        self.ns, self.repeat, self.runs, self.calls = ns, repeat, runs, calls
        self.floor = BpfObject.open(build_floor())
        self.floor.set_max_entries("floor_flows", floor_flows)
        self.floor.load()
        self.rows: list[dict] = []
        self.wrap_overhead = 0.0
        self.call_overhead = 0.0
        self._wrap_cfg = b""

    def run(self, prog, data: bytes, repeat: int):
        ctx = bytes(L.XdpMd(data=0, data_end=len(data), ingress_ifindex=self.ns.ifindex))
        return self.ns.call(lambda: prog.test_run(data, repeat=repeat, ctx=ctx))

    def run_calls(self, prog, data: bytes, n: int) -> tuple[list[int], set[int]]:
        """n single runs: their in-kernel durations and return codes."""
        ctx = bytes(L.XdpMd(data=0, data_end=len(data), ingress_ifindex=self.ns.ifindex))

        def go():
            times, rcs = [], set()
            for _ in range(n):
                r = prog.test_run(data, ctx=ctx)
                times.append(r.duration_ns)
                rcs.add(r.retval)
            return times, rcs
        return self.ns.call(go)

    def wrap(self, target, pristine: bytes, nflows: int = 0, vary_seq: bool = False,
             restart: bool = False) -> None:
        """Point the wrapper at ``target``. Its iteration count (the flow, the sequence
        number) starts over when the packet or the variation changes, or on
        ``restart``; switching the target alone carries on, so that subjects taking
        turns on one primed flow set or sequence continue where the other stopped."""
        cfg = pristine[:64].ljust(64, b"\0") + struct.pack("=II", nflows, int(vary_seq))
        if restart or cfg != self._wrap_cfg:
            self.floor.map("wrap_cfg").update(struct.pack("=I", 0), cfg)
            self.floor.map("wrap_iter").update(struct.pack("=I", 0), struct.pack("=I", 0))
            self._wrap_cfg = cfg
        self.floor.map("wrap_target").update(struct.pack("=I", 0),
                                             struct.pack("=I", target.fd))

    def _check(self, name: str, s: Subject, c0, want, n: int) -> None:
        c1 = s.counters()
        d = {k: c1[k] - c0[k] for k in c1 if c1[k] != c0[k]}
        exp = {k: v * n for k, v in want.items()}
        got = {k: d.get(k, 0) for k in exp}
        if got != exp or d.get("rx") != n:
            raise SystemExit(f"{name} [{s.label}]: counters {d}, expected {exp} (runs {n})")

    def measure(self, name: str, subjects: list[Subject], case, want_rc: int, *,
                want: dict[str, int] | None = None, wrapped: bool = False, anchor=None,
                repeat: int | None = None, calls: bool = False) -> dict:
        """``case(subject, run)`` prepares a run (the wrapper's target, fresh flows)
        and returns (program, packet). Subjects take turns run by run, in alternating
        order, so drift of the machine during the measurement hits each alike. calls:
        single runs instead of repeats (the median of each run's singles)."""
        repeat = repeat or self.repeat
        times: dict[str, list[float]] = {s.label: [] for s in subjects}
        for i in range(self.runs):
            for s in (subjects if i % 2 == 0 else subjects[::-1]):
                prog, data = case(s, i)
                c0 = s.counters() if s.lb and want is not None else None
                if calls:
                    ts, rcs = self.run_calls(prog, data, self.calls)
                    if rcs != {want_rc}:
                        raise SystemExit(f"{name} [{s.label}]: return codes {rcs}, "
                                         f"expected {want_rc}")
                    t, n = statistics.median(ts), self.calls
                else:
                    r = self.run(prog, data, repeat)
                    if r.retval != want_rc:
                        raise SystemExit(f"{name} [{s.label}]: return code {r.retval}, "
                                         f"expected {want_rc}")
                    t, n = r.duration_ns, repeat
                if c0 is not None:
                    self._check(name, s, c0, want, n)
                times[s.label].append(t)
        row = {"name": name, "wrapped": wrapped, "calls": calls, "anchor": anchor, "by": {}}
        for label, ts in times.items():
            med = statistics.median(ts)
            net = med - self.wrap_overhead if wrapped else med
            if calls:
                net = med - self.call_overhead
            row["by"][label] = {"median": med, "min": min(ts), "max": max(ts), "net": net}
        self.rows.append(row)
        print(f"  {name:62s}" + "".join(
            f"  {lb}: {v['net']:6.0f} ns [{v['min']:.0f}..{v['max']:.0f}]"
            for lb, v in row["by"].items())
            + (f"  ratio {ratio(row):.3f}" if len(row["by"]) == 2 else ""), flush=True)
        return row


def ratio(row: dict) -> float:
    """Second subject over first (this tree's object over the baseline)."""
    (_, a), (_, b) = row["by"].items()
    return b["net"] / a["net"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000,
                    help="single runs per run of the paths that resize the packet")
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--flows", default="100000,1000000",
                    help="comma-separated flow counts for the many-flow conntrack hit")
    ap.add_argument("--object", type=Path, default=OBJECT_PATH,
                    help="the balancer object to measure (default: this tree's)")
    ap.add_argument("--baseline", type=Path,
                    help="a second balancer object, measured side by side with --object")
    ap.add_argument("--baseline-header", type=Path, default=ROOT / "bpf" / "meshlb.h",
                    help="the meshlb.h the baseline was built from (its counters)")
    ap.add_argument("--baseline-ref",
                    help="git revision whose balancer to build and use as the baseline")
    ap.add_argument("--markdown", type=Path, help="write the results table here")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})  # threads created later inherit it
    flows = [int(x) for x in args.flows.split(",") if x]
    # room for the largest flow set twice over
    ct_flows = max([1 << 16] + [2 * f for f in flows])
    tmp = None
    if args.baseline_ref:
        tmp = Path(tempfile.mkdtemp(prefix="mlbbench"))
        args.baseline, args.baseline_header = build_revision(args.baseline_ref, tmp)
    objects = ([("base", args.baseline, args.baseline_header)] if args.baseline else []) + [
        ("this", args.object, ROOT / "bpf" / "meshlb.h")]
    try:
        with Netns() as ns:
            b = Bench(ns, args.repeat, args.runs, args.calls, floor_flows=max(flows + [1024]))
            subjects: list[Subject] = []
            syn: list[Subject] = []
            try:
                for label, path, header in objects:
                    subjects.append(load(label, path, header, ct_flows))
                    syn.append(load(label, path, header, SYN_PER_CPU))
                for s in subjects + syn:
                    setup(s)
                return run_all(b, subjects, syn, flows, args)
            finally:
                for s in subjects + syn:
                    s.lb.close()
                b.floor.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run_all(b: Bench, subjects: list[Subject], syn: list[Subject], flows: list[int],
            args) -> int:
    F = b.floor
    W = F.program("bench_wrap")
    ack = tcp()
    floor = [Subject("floor")]
    this = [s for s in subjects if s.label == "this"]
    print(f"repeat={args.repeat} runs={args.runs} calls={args.calls} cpu={args.cpu} "
          + " ".join(f"{s.label}={s.path}" for s in subjects))
    # warm-up: the first runs of a process are slower (frequency, caches, JIT pages)
    for _ in range(3):
        b.run(F.program("floor_ret"), ack, b.repeat)
    print("floors:")
    f_ret = b.measure("floor: return XDP_TX", floor, lambda s, i: (F.program("floor_ret"), ack),
                      XDP_TX)
    b.measure("floor: parse eth/ipv4/tcp, swap MACs, XDP_TX", floor,
              lambda s, i: (F.program("floor_parse"), ack), XDP_TX)
    F.map("floor_flows").update(bytes(L.flow_key(CLIENT, 40000, VIP, 80, 6)),
                                struct.pack("=Q", 1))
    f_lookup = b.measure("floor: parse + one hash lookup (flow_key), hit", floor,
                         lambda s, i: (F.program("floor_lookup"), ack), XDP_TX)
    b.wrap(F.program("floor_ret"), ack)
    w = b.measure("wrapper: restore 64 B + tail call -> floor_ret", floor,
                  lambda s, i: (W, ack), XDP_TX)
    b.wrap_overhead = w["by"]["floor"]["median"] - f_ret["by"]["floor"]["median"]
    print(f"  wrapper overhead subtracted from wrapped rows: {b.wrap_overhead:.0f} ns")
    c = b.measure("single runs: return XDP_TX", floor,
                  lambda s, i: (F.program("floor_ret"), ack), XDP_TX, calls=True)
    b.call_overhead = c["by"]["floor"]["median"] - f_ret["by"]["floor"]["median"]
    print(f"  per-run timer cost subtracted from single-run rows: {b.call_overhead:.0f} ns")

    def plain(data: bytes):
        return lambda s, i: (s.lb.program, data)

    def wrapped(data: bytes, nflows: int = 0, vary_seq: bool = False):
        def case(s: Subject, i: int):
            b.wrap(s.lb.program, data, nflows=nflows, vary_seq=vary_seq)
            return W, data
        return case

    print("balancer:")
    b.measure("non-VIP TCP -> PASS", subjects, plain(tcp(dst="192.0.2.1")), XDP_PASS,
              want={"pass_not_vip": 1}, anchor=KATRAN["nonvip"])
    # prime the flow, then measure its conntrack hit
    for s in subjects:
        P = s.lb.program
        assert b.run(P, tcp(flags="S"), 1).retval == XDP_TX
        c0 = s.counters()
        b.run(P, ack, 1000)
        c1 = s.counters()
        print(f"  (repeat trap, {s.label}: dr hit without wrapper: tx={c1['tx'] - c0['tx']}, "
              f"pass_from_peer={c1['pass_from_peer'] - c0['pass_from_peer']} of 1000)")
    b.measure("dr: TCP ACK, conntrack hit, cached next hop, mark, TX", subjects, wrapped(ack),
              XDP_TX, want={"ct_hit": 1, "tx": 1}, wrapped=True, anchor=KATRAN["hit"])
    opts = with_ip_options(ack, b"\x94\x04\x00\x00" + b"\x01\x01\x01\x00")
    b.measure("dr: the same with 8 bytes of IPv4 options (walked)", subjects, wrapped(opts),
              XDP_TX, want={"ct_hit": 1, "tx": 1}, wrapped=True)
    # the backend side of the same: a peer's marked packet, un-marked and passed; the
    # lookup of this mix's own entry (to note that a peer holds the flow too) is the
    # part that misses here and hits when the router moved a flow this mix balanced
    b.measure("backend side: peer-marked TCP, no own entry, unmark, PASS", subjects,
              wrapped(marked_tcp(sport=40001)), XDP_PASS, want={"pass_from_peer": 1},
              wrapped=True)
    b.measure("backend side: peer-marked TCP, own entry (flow moved), unmark, PASS", subjects,
              wrapped(marked_tcp()), XDP_PASS, want={"pass_from_peer": 1}, wrapped=True)
    # many flows, before the SYN runs churn the LRU's free lists
    for n in flows:
        base = "10.200.0.0"
        # the floor with the same number of flows: the cache-miss cost of the map alone
        fl = F.map("floor_flows")
        fl.delete_batch(list(fl.keys()))
        fl.update_batch([(bytes(cycled_key(base, i)), struct.pack("=Q", 1)) for i in range(n)])

        def floor_cycle(s: Subject, i: int, n=n, base=base):
            b.wrap(F.program("floor_lookup"), tcp(src=base), nflows=n)
            return W, tcp(src=base)
        b.measure(f"floor: parse + lookup cycling {n} flows", floor, floor_cycle, XDP_TX,
                  wrapped=True)
        for s in subjects:
            b.wrap(s.lb.program, tcp(src=base, flags="S"), nflows=n)
            assert b.run(W, tcp(src=base, flags="S"), n).retval == XDP_TX
        b.measure(f"dr: conntrack hit cycling {n} flows", subjects, wrapped(tcp(src=base), n),
                  XDP_TX, want={"ct_hit": 1, "tx": 1}, wrapped=True,
                  anchor=KATRAN["hit_1m"] if n == 1_000_000 else None)

    # new connections, on the balancers whose conntrack one CPU fills at 131072 flows
    for s in syn:
        assert b.run(s.lb.program, tcp(flags="S"), 1).retval == XDP_TX
    # a new connection on the same tuple: another sequence number every iteration (the
    # same SYN again would be its retransmission, which keeps the entry)
    syn_pkt = tcp(flags="S")
    for s in syn:
        b.wrap(s.lb.program, syn_pkt, vary_seq=True)
        assert b.run(W, syn_pkt, 1).retval == XDP_TX  # (re)create the entry it overwrites
    b.measure("dr: TCP SYN, same tuple: table path + conntrack re-selection, TX", syn,
              wrapped(syn_pkt, vary_seq=True), XDP_TX,
              want={"ct_reselect": 1, "ct_insert": 1, "tx": 1}, wrapped=True,
              anchor=KATRAN["syn_same"])
    # fill each conntrack past what one CPU holds, so that every insert below evicts
    for s in syn:
        fill = tcp(src="10.99.0.0", flags="S")
        b.wrap(s.lb.program, fill, nflows=2 * SYN_PER_CPU, restart=True)
        assert b.run(W, fill, 2 * SYN_PER_CPU).retval == XDP_TX
    print(f"  (SYN rows: conntrack full, {SYN_PER_CPU} flows held by this CPU: "
          + ", ".join(f"{s.label} {s.lb.maps['conntrack'].info()['max_entries']} entries"
                      for s in syn) + ")")

    # every iteration a distinct tuple (wrapper varies src/sport), a fresh client /16
    # per run so no run finds the previous run's entries
    def fresh(s: Subject, i: int):
        p = tcp(src=f"10.{100 + i}.0.0", flags="S")
        b.wrap(s.lb.program, p, nflows=b.repeat, restart=True)
        return W, p
    b.measure("dr: TCP SYN, new tuple each: table path + insert, conntrack full (evicting)",
              syn, fresh, XDP_TX, want={"ct_miss": 1, "ct_insert": 1, "tx": 1}, wrapped=True,
              anchor=KATRAN["syn_new"])
    # the same many-flow hits once millions of inserts/evictions have scattered the
    # LRU's elements over its whole preallocated area (what a long-lived node sees)
    for n in flows:
        base = "10.201.0.0"
        for s in subjects:
            b.wrap(s.lb.program, tcp(src=base, flags="S"), nflows=n)
            assert b.run(W, tcp(src=base, flags="S"), n).retval == XDP_TX
        b.measure(f"dr: conntrack hit cycling {n} flows, after SYN churn", subjects,
                  wrapped(tcp(src=base), n), XDP_TX, want={"ct_hit": 1, "tx": 1},
                  wrapped=True)
    # nat: forward hit and the reply path
    nat_syn = tcp(dport=443, flags="S")
    sports = set()
    for s in subjects:
        assert b.run(s.lb.program, nat_syn, 1).retval == XDP_TX
        ct = s.lb.conntrack_lookup(L.flow_key(CLIENT, 40000, VIP, 443, 6))
        sports.add(L.port_host(ct.snat_port))
    assert len(sports) == 1, f"the objects chose different SNAT ports: {sports}"
    b.measure("nat: TCP ACK, conntrack hit, rewrite, cached next hop, TX", subjects,
              wrapped(tcp(dport=443)), XDP_TX, want={"ct_hit": 1, "tx": 1}, wrapped=True,
              anchor=KATRAN["hit"])
    sp = sports.pop()
    reply = tcp(src=BACKEND, dst=SNAT, sport=8443, dport=sp)
    b.measure("nat: reply backend -> client, rewrite, cached next hop, TX", subjects,
              wrapped(reply), XDP_TX, want={"nat_reply": 1, "tx": 1}, wrapped=True)

    # the edges: paths the baseline did not have (it passed these packets to the stack)
    print("edges (this tree's object):")
    for s in this:
        assert b.run(s.lb.program, tcp(dport=8081, flags="S"), 1).retval == XDP_TX
        assert b.run(s.lb.program, tcp(dport=8443, flags="S"), 1).retval == XDP_TX
        assert b.run(s.lb.program, big_tcp6(), 1).retval == XDP_TX  # sets the flow up
    b.measure("dr: DF segment too big for the path: ICMP frag-needed back", this,
              plain(big_tcp(dport=8081)), XDP_TX,
              want={"ct_hit": 1, "fib_frag_needed": 1, "icmp_too_big": 1}, calls=True)
    b.measure("nat: DF segment too big for the path: ICMP frag-needed back", this,
              plain(big_tcp(dport=8443)), XDP_TX,
              want={"ct_hit": 1, "fib_frag_needed": 1, "icmp_too_big": 1}, calls=True)
    b.measure("dr IPv6: segment too big for the path: ICMPv6 packet-too-big back", this,
              plain(big_tcp6()), XDP_TX,
              want={"ct_hit": 1, "fib_frag_needed": 1, "icmp_too_big": 1}, calls=True)
    b.measure("dr: ICMP error about a flow -> its backend, marked, TX", this,
              wrapped(icmp_error(80, 40000)), XDP_TX,
              want={"icmp_to_backend": 1, "tx": 1}, wrapped=True)
    b.measure("nat: ICMP error about a flow, translated -> its backend, TX", this,
              plain(icmp_error(443, 40000)), XDP_TX, want={"icmp_to_backend": 1, "tx": 1},
              calls=True)
    for s in this:
        s.lb.maps["neigh_handoff"].update(struct.pack("=I", b.ns.ifindex), struct.pack("=I", 1))
    b.measure("dr: no neighbour entry: handed to tc with the next hop", this,
              plain(tcp(dport=8082)), XDP_PASS,
              want={"fib_no_neigh": 1, "pass_neigh_resolve": 1}, calls=True)
    for s in this:
        s.lb.maps["neigh_handoff"].delete(struct.pack("=I", b.ns.ifindex))
    b.measure("dr: no neighbour entry, no tc program: DROP", this, plain(tcp(dport=8082)),
              XDP_DROP, want={"fib_no_neigh": 1, "drop_no_neigh": 1}, calls=True)

    print_table(b, f_lookup, subjects, args)
    return 0


def print_table(b: Bench, f_lookup: dict, subjects: list[Subject], args) -> None:
    floor = f_lookup["by"]["floor"]["median"]
    labels = [s.label for s in subjects]
    two = len(labels) == 2
    head = "| path | " + " | ".join(f"{lb}: ns/packet (median)" for lb in labels)
    head += " | range | " + " | ".join(f"{lb} vs floor+lookup" for lb in labels) + " |"
    head += (f" {labels[1]}/{labels[0]} |" if two else "") + " Katran vs its floor |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in b.rows:
        by = r["by"]
        if "floor" in by:
            vals = [by["floor"]] * len(labels)
        else:
            vals = [by.get(lb) for lb in labels]
        cells = [f"{v['net']:.0f}" if v else "" for v in vals]
        rng = ", ".join(f"{v['min']:.0f}..{v['max']:.0f}" for v in by.values())
        rng += " (raw, before subtracting)" if r["wrapped"] or r["calls"] else ""
        mult = [f"{v['net'] / floor:.2f}x" if v else "" for v in vals]
        line = f"| {r['name']} | " + " | ".join(cells) + f" | {rng} | " + " | ".join(mult) + " |"
        if two:
            line += f" {ratio(r):.3f} |" if len(by) == 2 else " |"
        lines.append(line + f" {r['anchor'] or ''} |")
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
