#!/usr/bin/env python3
"""Backends beyond the mixes: weights, drain under load, the dedicated mode.

    sudo python3 bench/backends_bench.py [--only shares,weights,drain,dedicated] \
        [--connections 30000] [--rounds 3] [--json docs/img/backends_bench.json]

Sections (each answers one question; results as markdown on stdout, raw in the JSON):

* ``shares`` (no lab): how far each backend's share of a Maglev table is from its
  weight's share, at 3, 10 and 100 backends with weights 1, 2, 3, 1, 2, 3, ... (and all
  equal), ring 65537: the table the data plane indexes, built by meshlb.backends and
  meshlb.forwarding as the agent builds it.
* ``weights``: a lab of 3 mixes and 3 real servers (``--servers 3``); two extra VIPs,
  198.19.0.5:80 (dr, the three servers only, weights 1:2:3) and 198.19.0.6:80 (nat, the
  three mixes only, weights 1:2:3). ``--connections`` new connections to each from the
  client (``python3 -m meshlb.lab.tally``, one request per connection, 50 at once),
  counted by who answered.
* ``drain``: the same lab. wrk through a VIP for 12 s, keep-alive (``-c32``) and one
  connection per request (``-c16 -H 'Connection: close'``) at once; 4 s in, ``meshlb
  backend drain`` of one backend on mix1: a member (mix3, through the nat VIP) or a
  server (srv1, through the dr VIP). Measured: when each mix swapped in its table with
  the backend draining (the agent's log line, written once the kernel holds the table),
  the new flows that reach the drained backend before the command, while the mixes
  learn it and after the last swap (dumpcap in its namespace: the first SYN of each
  balanced flow, from the client's network or from a mix's SNAT ports; health checks
  come from other ports; a retransmitted SYN is the same flow), wrk's errors, its flows
  at the drain (conntrack entries on the three mixes) and how long after the load they
  are gone (member: its tracer reports the closes; server: the closing timeout, 2 s
  here). ``--rounds`` per backend, undrained in between.
* ``dedicated``: a lab of 2 mixes that balance only (``--serve none``) and 3 real
  servers: ``ab -c 500 -n 8000`` through the nat and the dr VIP, ``--rounds`` each.

Each lab is removed (namespaces, pins, processes) in ``finally``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshlb import backends, control, forwarding  # noqa: E402
from meshlb.config import parse  # noqa: E402
from meshlb.lab.lab import VIP_DR, VIP_NAT, Lab, LabOptions, server_addr4  # noqa: E402

W_SRV = "198.19.0.5"
W_MIX = "198.19.0.6"
DEFAULT_VIPS = [
    {"address": VIP_DR, "port": 80, "protocol": "tcp", "mode": "dr"},
    {"address": VIP_NAT, "port": 80, "protocol": "tcp", "mode": "nat"},
]


def rng(xs: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


# ------------------------------------------------------------------ table shares
def table_shares() -> list[dict[str, Any]]:
    out = []
    for n in (3, 10, 100):
        for pattern in ("1:2:3", "equal"):
            weights = {f"192.0.2.{i + 1}": (i % 3 + 1 if pattern == "1:2:3" else 1) for i in range(n)}
            text = ('[cluster]\nkey_file = "/k"\n[[vips]]\naddress = "198.19.0.1"\nport = 80\nmembers = "none"\n'
                    f'servers = {json.dumps(list(weights))}\nweights = {{ '
                    + ", ".join(f'"{a}" = {w}' for a, w in weights.items()) + " }\n")
            (vip,) = parse(text).vips
            t0 = time.perf_counter()
            s = backends.backend_sets([vip], [])[vip.key]
            plan = forwarding.plan_vip(vip, s.chosen())
            took = time.perf_counter() - t0
            slots: dict[str, int] = {}
            for i in plan.table:
                slots[plan.backends[i]] = slots.get(plan.backends[i], 0) + 1
            total_w = sum(weights.values())
            dev_pp, dev_rel = [], []
            for a, w in weights.items():
                share = slots.get(f"{a}:80", 0) / len(plan.table)
                ideal = w / total_w
                dev_pp.append(abs(share - ideal) * 100)
                dev_rel.append(abs(share / ideal - 1))
            out.append({"n": n, "weights": pattern, "ring": len(plan.table), "max_dev_pp": max(dev_pp),
                        "max_dev_rel": max(dev_rel), "max_dev_slots": max(dev_pp) / 100 * len(plan.table),
                        "build_s": took})
    return out


# ------------------------------------------------------------------ the lab
class Rig:
    def __init__(self, opts: LabOptions) -> None:
        self.lab = Lab(opts)

    def __enter__(self) -> Rig:
        self.lab.up(wait_s=90)
        return self

    def __exit__(self, *exc: object) -> None:
        problems = Lab.down(self.lab.opts.prefix)
        if problems:
            print(f"lab down: {problems}", file=sys.stderr)

    def call(self, node: str, op: str, **args: Any) -> Any:
        return control.call(self.lab.state["nodes"][node]["control"], op, args, timeout=10)

    def client(self, argv: list[str], timeout: float = 300) -> str:
        p = self.lab.namespace("client").popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = p.communicate(timeout=timeout)
        return out

    def row(self, node: str, vip: str, name: str) -> dict[str, Any] | None:
        for v in self.call(node, "vips")["vips"]:
            if v["vip"].startswith(f"{vip}:"):
                return next((b for b in v["backend_set"] if b["name"] == name), None)
        return None

    def all_mixes(self, fn) -> dict[str, Any]:
        """``fn(mix)`` on every mix at once (threads): a state seen at one moment."""
        out: dict[str, Any] = {}

        def run(m: str) -> None:
            out[m] = fn(m)
        ts = [threading.Thread(target=run, args=(m,)) for m in self.lab.mixes()]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return out


def tally(rig: Rig, vip: str, n: int) -> dict[str, Any]:
    out = rig.client([sys.executable, "-m", "meshlb.lab.tally", f"http://{vip}/", "-n", str(n), "-c", "50"],
                     timeout=n / 50 + 300)
    return json.loads(out)


def weights_section(rig: Rig, connections: int) -> list[dict[str, Any]]:
    res = []
    for vip, names in ((W_SRV, ("srv1", "srv2", "srv3")), (W_MIX, ("mix1", "mix2", "mix3"))):
        t = tally(rig, vip, connections)
        total = sum(t["answers"].values())
        rows = [{"backend": name, "weight": w, "answers": t["answers"].get(name, 0),
                 "share": t["answers"].get(name, 0) / total, "ideal": w / 6} for name, w in zip(names, (1, 2, 3))]
        res.append({"vip": vip, "connections": connections, "failed": t["failed"], "seconds": t["seconds"],
                    "rows": rows})
        print(f"weights {vip}: " + ", ".join(f"{r['backend']} {r['share'] * 100:.2f}% (ideal {r['ideal'] * 100:.2f}%)"
                                             for r in rows) + f", failed {t['failed']}", flush=True)
    return res


SYN_FILTER = ("tcp dst port 80 and (tcp[tcpflags] & (tcp-syn|tcp-ack)) == tcp-syn "
              "and (src net 198.18.1.0/24 or src portrange 10000-32767)")


class SynCapture:
    """dumpcap in the backend's namespace: the SYNs of balanced flows that reach it (from
    the client's network: dr, and what a mix passes to itself; from a mix's SNAT ports:
    nat; health checks come from other ports), with their times."""

    def __init__(self, rig: Rig, node: str) -> None:
        self.ns = rig.lab.namespace(node)
        self.path = rig.lab.sdir / f"syns-{node}-{time.monotonic_ns()}.pcap"
        self.proc = self.ns.popen(["dumpcap", "-q", "-i", "eth0", "-f", SYN_FILTER, "-w", str(self.path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)

    def stop(self) -> list[tuple[float, str]]:
        """(time, "source:port") of each SYN, in order."""
        self.proc.send_signal(2)
        self.proc.wait(timeout=10)
        out = subprocess.run(["tshark", "-r", str(self.path), "-T", "fields", "-e", "frame.time_epoch",
                              "-e", "ip.src", "-e", "tcp.srcport"], capture_output=True, text=True, check=True).stdout
        return [(float(t), f"{a}:{p}") for t, a, p in (line.split("\t") for line in out.splitlines() if line)]


def log_times(rig: Rig, pattern: str, since: float) -> dict[str, float]:
    """Per mix, the Unix time of the first line of its agent's log at or after ``since``
    that contains ``pattern``."""
    import datetime

    out = {}
    for m in rig.lab.mixes():
        for line in Path(rig.lab.state["nodes"][m]["log"]).read_text(errors="replace").splitlines():
            if pattern in line:
                t = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if t >= since - 0.001:
                    out[m] = t
                    break
    return out


def parse_wrk(text: str) -> dict[str, int]:
    import re

    out = {"requests": 0, "errors": 0, "non2xx": 0}
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] = sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    return out


def drain_round(rig: Rig, target: str, name: str, vip: str, node: str) -> dict[str, Any]:
    capture = SynCapture(rig, node)
    client = rig.lab.namespace("client")
    base = ["wrk", "-t1", "-d12s", "--timeout", "5s"]
    keep = client.popen([*base, "-c32", f"http://{vip}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    close = client.popen([*base, "-c16", "-H", "Connection: close", f"http://{vip}/"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(4)
        issued = time.time()
        rig.call("mix1", "backend_drain", name=target)
        deadline = time.monotonic() + 10
        while any(s != "draining" for s in rig.all_mixes(lambda m: (rig.row(m, vip, name) or {}).get("state")).values()):
            if time.monotonic() > deadline:
                raise RuntimeError("drain not shown everywhere in 10 s")
            time.sleep(0.02)
        held = rig.all_mixes(lambda m: (rig.row(m, vip, name) or {}).get("flows", 0))
        outs = [p.communicate(timeout=60)[0] for p in (keep, close)]
    finally:
        for p in (keep, close):
            if p.poll() is None:
                p.kill()
                p.wait()
        syns = capture.stop()
    ended = time.monotonic()
    while sum(rig.all_mixes(lambda m: (rig.row(m, vip, name) or {}).get("flows", 0)).values()) and \
            time.monotonic() - ended < 60:
        time.sleep(0.05)
    gone = time.monotonic() - ended
    # the agent logs the drain map's change as it takes it, and the tables once the kernel
    # holds them
    key = f"member:{target}" if not target[0].isdigit() else f"server:{target}"
    heard = log_times(rig, f"drain map: {key} drained", issued)
    swaps = log_times(rig, f"{name}(draining)", issued)
    everywhere = max(swaps.values())
    first: dict[str, float] = {}
    for t, flow in syns:
        first.setdefault(flow, t)  # a retransmitted SYN is the same flow
    rig.call("mix2", "backend_undrain", name=target)
    deadline = time.monotonic() + 10
    while any(s != "active" for s in rig.all_mixes(lambda m: (rig.row(m, vip, name) or {}).get("state")).values()):
        if time.monotonic() > deadline:
            raise RuntimeError("undrain not seen everywhere in 10 s")
        time.sleep(0.05)
    time.sleep(1)
    k, c = parse_wrk(outs[0]), parse_wrk(outs[1])
    return {"target": target, "vip": vip, "new_flows_before": sum(t < issued for t in first.values()),
            "heard_s": {m: t - issued for m, t in heard.items()}, "heard_everywhere_s": max(heard.values()) - issued,
            "swapped_s": {m: t - issued for m, t in swaps.items()}, "everywhere_s": everywhere - issued,
            "new_flows_while_learning": sum(issued <= t <= everywhere for t in first.values()),
            "new_flows_after": sum(t > everywhere for t in first.values()),
            "flows_at_drain": sum(held.values()), "flows_gone_s": gone, "keepalive": k, "close": c}


def drain_section(rig: Rig, rounds: int) -> list[dict[str, Any]]:
    res = []
    for target, name, vip, node in (("mix3", "mix3", VIP_NAT, "mix3"),
                                    (server_addr4(1), f"{server_addr4(1)}:80", VIP_DR, "srv1")):
        for i in range(rounds):
            r = drain_round(rig, target, name, vip, node)
            res.append(r)
            print(f"drain {target} round {i + 1}: drain map on every mix {r['heard_everywhere_s'] * 1000:.0f} ms, "
                  f"tables of every mix swapped {r['everywhere_s'] * 1000:.0f} ms "
                  f"after the command ({r['swapped_s']}); new flows to it: before {r['new_flows_before']}, "
                  f"meanwhile {r['new_flows_while_learning']}, after {r['new_flows_after']}; flows at the drain "
                  f"{r['flows_at_drain']}, gone {r['flows_gone_s']:.2f} s after the load; wrk keep-alive "
                  f"{r['keepalive']}, close {r['close']}", flush=True)
    return res


def dedicated_section(rounds: int) -> list[dict[str, Any]]:
    import re

    res = []
    opts = LabOptions(prefix=f"bb{os.getpid()}d", nodes=2, servers=3, serve="none", idle_timeout_s=0,
                      handshake_timeout_s=0, closing_timeout_s=2.0, health_interval_s=0.5, vips=list(DEFAULT_VIPS))
    with Rig(opts) as rig:
        for i in range(rounds):
            for mode, vip in (("nat", VIP_NAT), ("dr", VIP_DR)):
                out = rig.client(["ab", "-q", "-r", "-s", "10", "-c", "500", "-n", "8000", f"http://{vip}/"])
                got = {k: float(m.group(1)) if (m := re.search(pat, out)) else -1 for k, pat in (
                    ("complete", r"Complete requests:\s+(\d+)"), ("failed", r"Failed requests:\s+(\d+)"),
                    ("rps", r"Requests per second:\s+([\d.]+)"), ("p99_ms", r"\s99%\s+(\d+)"))}
                res.append({"mode": mode, "round": i + 1, **got})
                print(f"dedicated {mode} round {i + 1}: {got}", flush=True)
                time.sleep(3)  # the closing timeout empties conntrack between runs
    return res


def print_markdown(out: dict[str, Any]) -> None:
    if "shares" in out:
        print("\nTable share against weight share, ring 65537 (meshlb.backends + meshlb.forwarding):\n")
        print("| backends | weights | largest deviation, points | largest deviation, relative | slots | build, s |")
        print("|---|---|---|---|---|---|")
        for r in out["shares"]:
            print(f"| {r['n']} | {r['weights']} | {r['max_dev_pp']:.4f} | {r['max_dev_rel'] * 100:.3f} % | "
                  f"{r['max_dev_slots']:.1f} | {r['build_s']:.3f} |")
    if "weights" in out:
        print("\nNew connections by backend, weights 1:2:3:\n")
        print("| VIP | backend | weight | answers | share | weight's share | deviation, points |")
        print("|---|---|---|---|---|---|---|")
        for v in out["weights"]:
            for r in v["rows"]:
                print(f"| {v['vip']} ({v['connections']}, {v['failed']} failed) | {r['backend']} | {r['weight']} | "
                      f"{r['answers']} | {r['share'] * 100:.2f} % | {r['ideal'] * 100:.2f} % | "
                      f"{(r['share'] - r['ideal']) * 100:+.2f} |")
    if "drain" in out:
        print("\nDrain under wrk (keep-alive -c32 and Connection: close -c16, 12 s, drain at 4 s); median (min-max):\n")
        print("| drained | rounds | drain map on every mix, ms | tables swapped on every mix, ms | its new flows: "
              "before / while the mixes learn / after | its flows at the drain | gone after the load, s | "
              "wrk errors + non-2xx | requests (keep-alive / close) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for target in dict.fromkeys(r["target"] for r in out["drain"]):
            rs = [r for r in out["drain"] if r["target"] == target]
            errs = sum(r["keepalive"]["errors"] + r["keepalive"]["non2xx"] + r["close"]["errors"]
                       + r["close"]["non2xx"] for r in rs)
            print(f"| {target} ({rs[0]['vip']}) | {len(rs)} | {rng([r['heard_everywhere_s'] * 1000 for r in rs], '{:.0f}')} | "
                  f"{rng([r['everywhere_s'] * 1000 for r in rs], '{:.0f}')} | "
                  f"{rng([r['new_flows_before'] for r in rs], '{:.0f}')} / "
                  f"{rng([r['new_flows_while_learning'] for r in rs], '{:.0f}')} / "
                  f"{sum(r['new_flows_after'] for r in rs)} | {rng([r['flows_at_drain'] for r in rs], '{:.0f}')} | "
                  f"{rng([r['flows_gone_s'] for r in rs], '{:.2f}')} | {errs} | "
                  f"{rng([r['keepalive']['requests'] for r in rs], '{:.0f}')} / "
                  f"{rng([r['close']['requests'] for r in rs], '{:.0f}')} |")
    if "dedicated" in out:
        print("\nab -c 500 -n 8000 through balancer-only mixes (2) to 3 real servers; median (min-max):\n")
        print("| mode | rounds | complete | failed | requests/s | p99, ms |")
        print("|---|---|---|---|---|---|")
        for mode in ("nat", "dr"):
            rs = [r for r in out["dedicated"] if r["mode"] == mode]
            print(f"| {mode} | {len(rs)} | {rng([r['complete'] for r in rs], '{:.0f}')} | "
                  f"{sum(r['failed'] for r in rs):.0f} | {rng([r['rps'] for r in rs], '{:.0f}')} | "
                  f"{rng([r['p99_ms'] for r in rs], '{:.0f}')} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="shares,weights,drain,dedicated")
    ap.add_argument("--connections", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "docs" / "img" / "backends_bench.json"))
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    out: dict[str, Any] = {"args": vars(args), "cpus": os.cpu_count(), "kernel": os.uname().release}
    if "shares" in only:
        out["shares"] = table_shares()
    if only & {"weights", "drain"}:
        vips = DEFAULT_VIPS + [
            {"address": W_SRV, "port": 80, "mode": "dr", "members": "none",
             "weights": {server_addr4(1): 1, server_addr4(2): 2, server_addr4(3): 3}},
            {"address": W_MIX, "port": 80, "mode": "nat", "servers": [], "weights": {"mix1": 1, "mix2": 2, "mix3": 3}},
        ]
        opts = LabOptions(prefix=f"bb{os.getpid()}", nodes=3, servers=3, vips=vips, idle_timeout_s=0,
                          handshake_timeout_s=0, closing_timeout_s=2.0, health_interval_s=0.5)
        with Rig(opts) as rig:
            if "weights" in only:
                out["weights"] = weights_section(rig, args.connections)
            if "drain" in only:
                out["drain"] = drain_section(rig, args.rounds)
    if "dedicated" in only:
        out["dedicated"] = dedicated_section(args.rounds)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print_markdown(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
