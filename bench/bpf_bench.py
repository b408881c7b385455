#!/usr/bin/env python3
"""Data-plane benchmark: ns/packet of the balancer's paths next to floor programs,
all measured with BPF_PROG_TEST_RUN in the same run on one pinned CPU.

    sudo python3 bench/bpf_bench.py [--repeat N] [--runs 5] [--cpu 1] [--flows 100000,1000000]
                                    [--object OBJ] [--baseline OBJ]

With --baseline, a second balancer object (say one built from another commit) is
loaded next to the first, each with maps of its own, and every path is measured on
both, their runs interleaved in alternating order (ABBA...): the table then gives
both medians and their ratio, which a shared, noisy machine cannot skew the way it
skews two separate runs.

Every run is checked: its return code and the counter deltas must say that all N
iterations took the claimed path (see the repeat trap in BENCHMARKING.md). Paths that
rewrite the packet run behind bench_wrap (bench/progs/floor.bpf.c), which restores
the first 64 bytes and tail-calls the balancer; the wrapper's own cost, measured as
wrap->floor_ret minus floor_ret, is subtracted and reported.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import ctypes.util
import ipaddress
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from meshlb.dataplane import layouts as L  # noqa: E402
from meshlb.dataplane.balancer import OBJECT_PATH, Balancer  # noqa: E402
from meshlb.dataplane.libbpf import XDP_PASS, XDP_TX, BpfObject  # noqa: E402

PID = os.getpid()
VIP, CLIENT, BACKEND, SNAT = "203.0.113.10", "10.1.0.1", "10.10.0.2", "10.10.0.1"
MAC_A, MAC_BE = "02:00:00:00:0a:01", "02:00:00:00:0a:02"
ANCHORS = {"hit": 73, "syn": 166, "nonvip": 27}  # Katran, BENCHMARKING.md


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Netns:
    """Private netns: veth with the backend and a gateway as permanent neighbours,
    so bpf_fib_lookup succeeds inside test runs (issued from a thread in it)."""

    def __init__(self) -> None:
        self.name, self.dev = f"mlbbench{PID}", f"mlbbv{PID}"
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __enter__(self) -> Netns:
        n = self.name
        sh("ip", "netns", "add", n)
        try:
            sh("ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "-n", n, "link", "add", self.dev, "address", MAC_A, "type", "veth",
               "peer", "name", self.dev + "p")
            sh("ip", "-n", n, "link", "set", self.dev, "up")
            sh("ip", "-n", n, "link", "set", self.dev + "p", "up")
            sh("ip", "-n", n, "addr", "add", "10.10.0.1/24", "dev", self.dev)
            for a in (BACKEND, "10.10.0.254"):
                sh("ip", "-n", n, "neigh", "replace", a, "lladdr", MAC_BE, "nud", "permanent",
                   "dev", self.dev)
            sh("ip", "-n", n, "route", "add", "default", "via", "10.10.0.254")
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


class Subject:
    """One program under test; lb is the balancer whose counters check its runs."""

    def __init__(self, label: str, lb: Balancer | None = None, path: Path | None = None) -> None:
        self.label, self.lb, self.path = label, lb, path


class Bench:
    def __init__(self, ns: Netns, repeat: int, runs: int, floor_flows: int = 1024) -> None:
        self.ns, self.repeat, self.runs = ns, repeat, runs
        self.floor = BpfObject.open(build_floor())
        self.floor.set_max_entries("floor_flows", floor_flows)
        self.floor.load()
        self.rows: list[dict] = []
        self.wrap_overhead = 0.0
        self._wrap_cfg = b""

    def run(self, prog, data: bytes, repeat: int):
        ctx = bytes(L.XdpMd(data=0, data_end=len(data), ingress_ifindex=self.ns.ifindex))
        return self.ns.call(lambda: prog.test_run(data, repeat=repeat, ctx=ctx))

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

    def measure(self, name: str, subjects: list[Subject], case, want_rc: int, *,
                want: dict[str, int] | None = None, wrapped: bool = False, anchor=None,
                repeat: int | None = None) -> dict:
        """``case(subject, run)`` prepares a run (the wrapper's target, fresh flows)
        and returns (program, packet). Subjects take turns run by run, in alternating
        order, so drift of the machine during the measurement hits each alike."""
        repeat = repeat or self.repeat
        times: dict[str, list[int]] = {s.label: [] for s in subjects}
        for i in range(self.runs):
            for s in (subjects if i % 2 == 0 else subjects[::-1]):
                prog, data = case(s, i)
                c0 = s.lb.counters() if s.lb and want is not None else None
                r = self.run(prog, data, repeat)
                if r.retval != want_rc:
                    raise SystemExit(f"{name} [{s.label}]: return code {r.retval}, "
                                     f"expected {want_rc}")
                if c0 is not None:
                    c1 = s.lb.counters()
                    d = {k: c1[k] - c0[k] for k in c1 if c1[k] != c0[k]}
                    exp = {k: v * repeat for k, v in want.items()}
                    got = {k: d.get(k, 0) for k in exp}
                    if got != exp or d.get("rx") != repeat:
                        raise SystemExit(f"{name} [{s.label}]: counters {d}, expected {exp} "
                                         f"(repeat {repeat})")
                times[s.label].append(r.duration_ns)
        row = {"name": name, "wrapped": wrapped, "anchor": anchor, "by": {}}
        for label, ts in times.items():
            med = statistics.median(ts)
            row["by"][label] = {"median": med, "min": min(ts), "max": max(ts),
                                "net": med - self.wrap_overhead if wrapped else med}
        self.rows.append(row)
        print(f"  {name:55s}" + "".join(
            f"  {lb}: {v['net']:6.0f} ns [{v['min']}..{v['max']}]" for lb, v in row["by"].items())
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
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--flows", default="100000,1000000",
                    help="comma-separated flow counts for the many-flow conntrack hit")
    ap.add_argument("--object", type=Path, default=OBJECT_PATH,
                    help="the balancer object to measure (default: this tree's)")
    ap.add_argument("--baseline", type=Path,
                    help="a second balancer object, measured side by side with --object")
    ap.add_argument("--markdown", type=Path, help="write the results table here")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})  # threads created later inherit it
    flows = [int(x) for x in args.flows.split(",") if x]
    # room for the largest flow set twice over; per-CPU LRU lists: each CPU owns
    # max_entries / possible CPUs, and all inserts here come from one CPU
    ct_size = max([1 << 16] + [2 * f for f in flows])
    ct_size = (1 << (ct_size - 1).bit_length()) * max(1, os.cpu_count() or 1)

    with Netns() as ns:
        b = Bench(ns, args.repeat, args.runs, floor_flows=max(flows + [1024]))
        objects = ([("base", args.baseline)] if args.baseline else []) + [("this", args.object)]
        subjects: list[Subject] = []
        try:
            for label, path in objects:
                subjects.append(Subject(label, Balancer.load(conntrack_size=ct_size, path=path),
                                        path))
            return run_all(b, subjects, flows, args)
        finally:
            for s in subjects:
                s.lb.close()
            b.floor.close()


def run_all(b: Bench, subjects: list[Subject], flows: list[int], args) -> int:
    F = b.floor
    W = F.program("bench_wrap")
    ack = tcp()
    floor = [Subject("floor")]
    print(f"repeat={args.repeat} runs={args.runs} cpu={args.cpu} "
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

    # dr VIP with a remote backend (fib -> TX), a nat VIP on another port
    for s in subjects:
        lb = s.lb
        lb.add_vip(VIP, 80, "tcp", "dr", vip_id=1, ring_size=L.MLB_DEFAULT_RING)
        lb.add_vip(VIP, 443, "tcp", "nat", vip_id=2, ring_size=L.MLB_DEFAULT_RING)
        lb.set_backend(1, BACKEND, 8443)
        lb.set_vip_table(1, [1] * L.MLB_DEFAULT_RING)
        lb.set_vip_table(2, [1] * L.MLB_DEFAULT_RING)
        lb.set_snat(L.AF_INET, SNAT, 1024, 65535)

    def plain(data: bytes):
        return lambda s, i: (s.lb.program, data)

    def wrapped(data: bytes, nflows: int = 0, vary_seq: bool = False):
        def case(s: Subject, i: int):
            b.wrap(s.lb.program, data, nflows=nflows, vary_seq=vary_seq)
            return W, data
        return case

    print("balancer:")
    b.measure("non-VIP TCP -> PASS", subjects, plain(tcp(dst="192.0.2.1")), XDP_PASS,
              want={"pass_not_vip": 1}, anchor=ANCHORS["nonvip"])
    # prime the flow, then measure its conntrack hit
    for s in subjects:
        lb, P = s.lb, s.lb.program
        assert b.run(P, tcp(flags="S"), 1).retval == XDP_TX
        c0 = lb.counters()
        b.run(P, ack, 1000)
        c1 = lb.counters()
        print(f"  (repeat trap, {s.label}: dr hit without wrapper: tx={c1['tx'] - c0['tx']}, "
              f"pass_from_peer={c1['pass_from_peer'] - c0['pass_from_peer']} of 1000)")
    b.measure("dr: TCP ACK, conntrack hit, cached next hop, mark, TX", subjects, wrapped(ack),
              XDP_TX, want={"ct_hit": 1, "tx": 1}, wrapped=True, anchor=ANCHORS["hit"])
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
                  XDP_TX, want={"ct_hit": 1, "tx": 1}, wrapped=True, anchor=ANCHORS["hit"])

    # new SYNs: every iteration a distinct tuple (wrapper varies src/sport), a fresh
    # client /16 per run so no run finds the previous run's entries
    def fresh(s: Subject, i: int):
        syn = tcp(src=f"10.{100 + i}.0.0", flags="S")
        b.wrap(s.lb.program, syn, nflows=b.repeat, restart=True)
        return W, syn
    b.measure("dr: TCP SYN, new tuple each: table path + conntrack insert, TX", subjects,
              fresh, XDP_TX, want={"ct_miss": 1, "ct_insert": 1, "tx": 1}, wrapped=True,
              anchor=ANCHORS["syn"])
    # a new connection on the same tuple: another sequence number every iteration (the
    # same SYN again would be its retransmission, which keeps the entry)
    syn = tcp(flags="S")
    for s in subjects:
        b.wrap(s.lb.program, syn, vary_seq=True)
        assert b.run(W, syn, 1).retval == XDP_TX  # (re)create the entry it overwrites
    b.measure("dr: TCP SYN, same tuple: table path + conntrack overwrite, TX", subjects,
              wrapped(syn, vary_seq=True), XDP_TX,
              want={"ct_reselect": 1, "ct_insert": 1, "tx": 1}, wrapped=True,
              anchor=ANCHORS["syn"])
    # the same many-flow hits once millions of inserts/evictions have scattered the
    # LRU's elements over its whole preallocated area (what a long-lived node sees)
    for n in flows:
        base = "10.201.0.0"
        for s in subjects:
            b.wrap(s.lb.program, tcp(src=base, flags="S"), nflows=n)
            assert b.run(W, tcp(src=base, flags="S"), n).retval == XDP_TX
        b.measure(f"dr: conntrack hit cycling {n} flows, after SYN churn", subjects,
                  wrapped(tcp(src=base), n), XDP_TX, want={"ct_hit": 1, "tx": 1},
                  wrapped=True, anchor=ANCHORS["hit"])
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
              anchor=ANCHORS["hit"])
    reply = tcp(src=BACKEND, dst=SNAT, sport=8443, dport=sports.pop())
    b.measure("nat: reply backend -> client, rewrite, cached next hop, TX", subjects,
              wrapped(reply), XDP_TX, want={"nat_reply": 1, "tx": 1}, wrapped=True)

    print_table(b, f_lookup, subjects, args)
    return 0


def print_table(b: Bench, f_lookup: dict, subjects: list[Subject], args) -> None:
    floor = f_lookup["by"]["floor"]["median"]
    labels = [s.label for s in subjects]
    two = len(labels) == 2
    head = "| path | " + " | ".join(f"{lb}: ns/packet (median)" for lb in labels)
    head += " | range | vs floor+lookup |" + (f" {labels[1]}/{labels[0]} |" if two else "")
    head += " Katran anchor |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in b.rows:
        vals = list(r["by"].values())
        # a floor is measured once and is the floor of every subject
        cells = [f"{v['net']:.0f}" for v in vals] * (len(labels) if len(vals) == 1 else 1)
        rng = ", ".join(f"{v['min']}..{v['max']}" for v in vals)
        rng += " (raw, before subtracting)" if r["wrapped"] else ""
        anchor = f"{r['anchor']} ns" if r["anchor"] else ""
        line = f"| {r['name']} | " + " | ".join(cells) + f" | {rng} | {vals[-1]['net'] / floor:.2f}x |"
        if two:
            line += f" {ratio(r):.3f} |" if len(vals) == 2 else " |"
        lines.append(line + f" {anchor} |")
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
