#!/usr/bin/env python3
"""Lab benchmark: meshlb through its VIPs next to the ceiling and the alternatives, in
one run on one netns lab, plus the agent's footprint and its join-to-forwarding time.

    sudo python3 bench/lab_bench.py [--rounds 5] [--duration 5] [--conns 64] \
        [--modes keepalive,close] [--demo-rounds 3] [--idle 30] [--skip-idle] \
        [--joins 3] [--json docs/img/lab_bench.json] [--quick] \
        [--nodes 3] [--targets 'meshlb dr,direct,...']

Results: markdown tables on stdout, every raw run in the JSON (bench/plot.py draws it).

One lab (3 mixes unless ``--nodes``, `meshlb.lab.lab.Lab`, prefix ``bn<pid>``) with two
extra namespaces on the lab's bridge:

* ``<prefix>-hap`` 198.18.0.100: HAProxy in TCP mode (``mode tcp``, ``balance roundrobin``)
  over the three mixes' nginx, its default thread count;
* ``<prefix>-nft`` 198.18.0.101: an nftables DNAT balancer (``numgen random mod 3`` over
  the three mixes) with ``masquerade`` on the way out, so the backends' replies return
  through the DNAT box (the mixes are on-link with the client, so a default route on them
  would not catch the replies); ICMP redirects off in that namespace.

The backends are nginx (2 workers per mix, one per CPU, so that one backend alone could use
the whole machine; ``return 200 "mixN\\n"``, access log off) on port
8080 of every mix, because the Python demo app on port 80 is the bottleneck (it is
measured too, in a short extra table, to show it). meshlb gets two extra VIPs for them:
198.19.0.3:8080 (dr) and 198.19.0.4:8080 (nat, backend port 8080).

Targets, interleaved in every round (order rotated each round), each with wrk from the
client namespace, keep-alive and connection-per-request (``Connection: close``):
meshlb dr VIP, meshlb nat VIP, one backend directly (the ceiling the brief names: no
balancer in the path), "direct x3" (three wrk at once, one per backend, -t1 and a third of
the connections each, requests/s summed: the ceiling for three backends, which on this lab
is higher than one backend's), HAProxy, nftables DNAT.

``--nodes N`` changes the share of VIP flows that cross a second mix: the router spreads
flows over the N mixes and Maglev over the N backends, so (N-1)/N of them land on a mix
that is not their backend (none with one mix). With one mix, "meshlb dr" against
"direct" is the balancer's own cost on the path of a flow it serves itself.

Everything (namespaces, pins, processes) is removed in ``finally``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyroute2 import netns as pr_netns  # noqa: E402

from meshlb import control  # noqa: E402
from meshlb.lab.lab import (  # noqa: E402
    APP_PORT,
    CLIENT_NET4,
    ROUTER4,
    VIP_DR,
    VIP_NAT,
    Lab,
    LabOptions,
    _wait_pid_gone,
    mix_addr4,
)

BENCH_PORT = 8080
HAP_ADDR = "198.18.0.100"
# VIPs of their own for the nginx port: the lab routes each VIP entry's address once
# per entry, so a second port on 198.19.0.1/.2 would add a duplicate client route
BENCH_DR = "198.19.0.3"
BENCH_NAT = "198.19.0.4"
NFT_ADDR = "198.18.0.101"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ helpers
def direct_all(nodes: int) -> str:
    """Name of the target that loads every backend directly at once."""
    return f"direct x{nodes}"


def proc_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0])
    return out


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"rps": 0.0, "p50_ms": None, "p99_ms": None, "requests": 0,
                           "errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.M)
        if m:
            out[key] = _ms(m.group(1))
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


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def stop_proc(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, sig)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=5)


# ------------------------------------------------------------------ the bench rig
class Rig:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = f"bn{os.getpid()}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.procs: list[subprocess.Popen] = []
        self.extra_ns: list[str] = []
        self.lab: Lab | None = None

    # ---- build
    def up(self) -> None:
        opts = LabOptions(nodes=self.args.nodes, prefix=self.prefix, sockops_cgroup=self.args.sockops_cgroup)
        opts.vips = opts.vips + [
            {"address": BENCH_DR, "port": BENCH_PORT, "protocol": "tcp", "mode": "dr"},
            {"address": BENCH_NAT, "port": BENCH_PORT, "protocol": "tcp", "mode": "nat",
             "backend_port": BENCH_PORT},
        ]
        self.lab = Lab(opts)
        self.lab.up(wait_s=90)
        topo = self.lab.topology
        # nginx on every mix, port 8080
        for i in self.mix_numbers():
            self.procs.append(self._nginx(f"mix{i}"))
        # HAProxy box
        hap = topo.add_namespace("hap")
        self.extra_ns.append(hap.name)
        topo.connect(hap, "br", addresses=[f"{HAP_ADDR}/24"], tx_checksum=False)
        hap.add_route(CLIENT_NET4, gateway=ROUTER4)  # the client is behind the lab's router
        cfg = self.tmp / "haproxy.cfg"
        servers = "\n".join(f"    server mix{i} {mix_addr4(i)}:{BENCH_PORT}" for i in self.mix_numbers())
        cfg.write_text(f"""global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {HAP_ADDR}:{BENCH_PORT}
    default_backend be
backend be
    balance roundrobin
{servers}
""")
        self.procs.append(hap.popen(["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                    stdout=open(self.tmp / "haproxy.log", "ab"), stderr=subprocess.STDOUT))
        # nftables DNAT box
        nft = topo.add_namespace("nft")
        self.extra_ns.append(nft.name)
        topo.connect(nft, "br", addresses=[f"{NFT_ADDR}/24"], tx_checksum=False)
        nft.add_route(CLIENT_NET4, gateway=ROUTER4)
        topo.enable_forwarding(nft)
        for dev in ("all", "default", "eth0"):
            nft.sysctl(f"net/ipv4/conf/{dev}/send_redirects", 0)
        amap = ", ".join(f"{i - 1} : {mix_addr4(i)}" for i in self.mix_numbers())
        rules = self.tmp / "dnat.nft"
        rules.write_text(f"""table ip meshlb_bench_dnat {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {NFT_ADDR} tcp dport {BENCH_PORT} dnat to numgen random mod {self.args.nodes} map {{ {amap} }}
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ct status dnat masquerade
    }}
}}
""")
        nft.check_output(["nft", "-f", str(rules)])
        self.nft_ruleset = rules.read_text()
        time.sleep(1.0)
        # every target answers before we start
        for name, url in self.targets(include_demo=True).items():
            if isinstance(url, list):
                continue  # its parts are checked as "direct" and through the balancers
            deadline = time.monotonic() + 10
            while True:
                body = self.client(["curl", "-sS", "--max-time", "2", url]).strip()
                if body.startswith("mix"):
                    break
                if time.monotonic() > deadline:
                    logs = {p.name: p.read_text()[-800:] for p in self.tmp.rglob("*.log")}
                    raise RuntimeError(f"{name} ({url}) does not answer: {body!r}; logs: {logs}")
                time.sleep(0.5)

    def _nginx(self, node: str) -> subprocess.Popen:
        d = self.tmp / node
        d.mkdir()
        conf = d / "nginx.conf"
        conf.write_text(f"""worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen {BENCH_PORT} backlog=8192 reuseport;
        location / {{ default_type text/plain; return 200 "{node}\\n"; }}
    }}
}}
""")
        # in the mix's cgroup, as its application: the agent's sock_ops hook is there
        return self.lab.popen(
            node, ["nginx", "-p", str(d), "-c", str(conf), "-g", "daemon off;"], stdin=subprocess.DEVNULL,
            stdout=open(d / "out.log", "ab"), stderr=subprocess.STDOUT)

    def mix_numbers(self) -> range:
        return range(1, self.args.nodes + 1)

    def targets(self, include_demo: bool = False) -> dict[str, str]:
        t = {
            "meshlb dr": f"http://{BENCH_DR}:{BENCH_PORT}/",
            "meshlb nat": f"http://{BENCH_NAT}:{BENCH_PORT}/",
            "direct": f"http://{mix_addr4(1)}:{BENCH_PORT}/",
            direct_all(self.args.nodes): [f"http://{mix_addr4(i)}:{BENCH_PORT}/" for i in self.mix_numbers()],
            "haproxy": f"http://{HAP_ADDR}:{BENCH_PORT}/",
            "nft dnat": f"http://{NFT_ADDR}:{BENCH_PORT}/",
        }
        if self.args.nodes == 1:
            del t[direct_all(1)]  # the same as "direct"
        if self.args.targets:
            t = {k: v for k, v in t.items() if k in self.args.targets}
        if include_demo:
            t.update({
                "demo: meshlb dr": f"http://{VIP_DR}:{APP_PORT}/",
                "demo: meshlb nat": f"http://{VIP_NAT}:{APP_PORT}/",
                "demo: direct": f"http://{mix_addr4(1)}:{APP_PORT}/",
            })
        return t

    def client(self, argv: list[str], timeout: float = 120) -> str:
        p = self.lab.namespace("client").popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, text=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_proc(p, signal.SIGKILL)
            raise
        return out

    def agent_pids(self) -> dict[str, int]:
        return {n: self.lab.state["nodes"][n]["agent_pid"] for n in self.lab.mixes()}

    # ---- measurements
    def wrk(self, url: str | list[str], close: bool) -> dict[str, Any]:
        """One wrk run; with a list of URLs, one wrk per URL at the same time (-t1 and
        an equal share of the connections each): requests/s summed, p50 the median of
        theirs, p99 the worst of theirs."""
        a = self.args
        urls = [url] if isinstance(url, str) else url
        threads = 2 if len(urls) == 1 else 1
        conns = max(1, a.conns // len(urls))
        pids = self.agent_pids()
        before = {n: proc_ticks(p) for n, p in pids.items()}
        t0 = time.monotonic()
        procs = []
        for u in urls:
            argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{a.duration}s", "--latency", "--timeout", "5s"]
            if close:
                argv += ["-H", "Connection: close"]
            argv.append(u)
            procs.append(self.lab.namespace("client").popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True))
        texts = [p.communicate(timeout=a.duration + 60)[0] for p in procs]
        dt = time.monotonic() - t0
        parts = [parse_wrk(t) for t in texts]
        text = "\n".join(texts)
        res = parts[0] if len(parts) == 1 else {
            "rps": sum(x["rps"] for x in parts),
            "p50_ms": med([x["p50_ms"] for x in parts if x["p50_ms"] is not None]),
            "p99_ms": max((x["p99_ms"] for x in parts if x["p99_ms"] is not None), default=None),
            "requests": sum(x["requests"] for x in parts), "errors": sum(x["errors"] for x in parts),
            "non2xx": sum(x["non2xx"] for x in parts)}
        res["agent_cpu_pct"] = {n: round(100.0 * (proc_ticks(p) - before[n]) / CLK_TCK / dt, 2)
                                for n, p in pids.items()}
        if not res["requests"]:
            res["raw"] = text[-1500:]
        return res

    def comparison(self) -> dict[str, Any]:
        a = self.args
        names = list(self.targets())
        runs: dict[str, dict[str, list]] = {m: {n: [] for n in names} for m in a.modes}
        for r in range(a.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for mode in a.modes:
                for name in order:
                    res = self.wrk(self.targets()[name], close=(mode == "close"))
                    runs[mode][name].append(res)
                    print(f"round {r + 1} {mode:9s} {name:11s} {res['rps']:9.0f} req/s "
                          f"p50 {res['p50_ms']} ms p99 {res['p99_ms']} ms err {res['errors']} "
                          f"agent% {res['agent_cpu_pct']}", flush=True)
        demo = {n: [] for n in ("demo: meshlb dr", "demo: meshlb nat", "demo: direct")}
        for r in range(a.demo_rounds):
            for name in demo:
                res = self.wrk(self.targets(include_demo=True)[name], close=False)
                demo[name].append(res)
                print(f"round {r + 1} keepalive {name:17s} {res['rps']:9.0f} req/s "
                      f"p50 {res['p50_ms']} p99 {res['p99_ms']}", flush=True)
        return {"runs": runs, "demo": demo}

    def idle_footprint(self) -> dict[str, Any]:
        pids = self.agent_pids()
        before = {n: proc_ticks(p) for n, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(self.args.idle)
        dt = time.monotonic() - t0
        out = {}
        for n, p in pids.items():
            st = proc_status(p)
            out[n] = {"cpu_pct": 100.0 * (proc_ticks(p) - before[n]) / CLK_TCK / dt,
                      "rss_kib": st.get("VmRSS"), "hwm_kib": st.get("VmHWM"),
                      "anon_kib": st.get("RssAnon"), "file_kib": st.get("RssFile"),
                      "threads": st.get("Threads")}
        return {"seconds": dt, "agents": out}

    def join_trial(self, node: str = "mix3") -> dict[str, Any]:
        """Stop ``node``'s agent with a leave (SIGTERM: drain, detach, unpin), wait until
        the others dropped it, then start `meshlb join` afresh and time the stages."""
        lab = self.lab
        info = lab.state["nodes"][node]
        others = [n for n in self.agent_pids() if n != node]
        established = lab.namespace(node).check_output(["ss", "-Htn", "state", "established"]).splitlines()
        t_leave = time.monotonic()
        os.kill(info["agent_pid"], signal.SIGTERM)
        if not _wait_pid_gone(info["agent_pid"], 90):
            raise RuntimeError(f"agent of {node} did not leave")
        leave_s = time.monotonic() - t_leave
        pin = Path(info["pin_dir"])
        vip_key = f"{BENCH_DR}:{BENCH_PORT}/tcp"

        def backends(n: str) -> list[str]:
            r = control.call(lab.state["nodes"][n]["control"], "vips", timeout=2)
            return next(v["backends"] for v in r["vips"] if v["vip"] == vip_key)

        deadline = time.monotonic() + 60
        while any(node in backends(o) for o in others):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node} still in the others' tables after leaving")
            time.sleep(0.1)
        time.sleep(1.0)
        left_clean = not pin.exists()
        t0 = time.monotonic()
        agent = lab._start_agent(lab.namespace(node), node, info.get("cgroup"))
        info["agent_pid"] = agent.pid
        lab._save()
        marks: dict[str, float] = {}
        client = lab.namespace("client")
        probes = 0
        while len(marks) < 5 and time.monotonic() - t0 < 60:
            now = time.monotonic() - t0
            if "control" not in marks:
                with contextlib.suppress(Exception):
                    control.call(info["control"], "stats", timeout=0.5)
                    marks["control"] = now
            if "control" in marks and "local_table" not in marks:
                with contextlib.suppress(Exception):
                    if node in backends(node):
                        marks["local_table"] = now
            if "peer_tables" not in marks:
                with contextlib.suppress(Exception):
                    if all(node in backends(o) for o in others):
                        marks["peer_tables"] = now
            if "peer_tables" in marks and "converged" not in marks:
                with contextlib.suppress(Exception):
                    ds = set()
                    for n in [*others, node]:
                        r = control.call(lab.state["nodes"][n]["control"], "members", timeout=1)
                        ds |= {m["table_digest"] for m in r["members"] if m["status"] == "alive"}
                    if len(ds) == 1 and "" not in ds:
                        marks["converged"] = time.monotonic() - t0
            if "first_answer" not in marks:
                for _ in range(6):
                    probes += 1
                    if _probe(client, BENCH_DR, BENCH_PORT) == node:
                        marks["first_answer"] = time.monotonic() - t0
                        break
            time.sleep(0.01)
        return {"marks_s": marks, "left_clean": left_clean, "probes": probes, "leave_s": leave_s,
                "established_before_leave": len(established), "established_sample": established[:5]}


def _probe(client, addr: str, port: int) -> str:
    """One new connection (new source port) to addr:port; the name in the answer."""
    try:
        s = client.socket()
    except OSError:
        return ""
    try:
        s.settimeout(0.3)
        s.connect((addr, port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n\r\n", 1)[-1].strip().decode(errors="replace")
    except OSError:
        return ""
    finally:
        s.close()



def teardown(rig: Rig) -> list[str]:
    problems = []
    for p in rig.procs:
        try:
            stop_proc(p)
        except Exception as exc:  # keep going
            problems.append(f"pid {p.pid}: {exc}")
    for name in rig.extra_ns:
        with contextlib.suppress(FileNotFoundError):
            try:
                pr_netns.remove(name)
            except Exception as exc:
                problems.append(f"netns {name}: {exc}")
    problems += Lab.down(rig.prefix)
    shutil.rmtree(rig.tmp, ignore_errors=True)
    return problems


# ------------------------------------------------------------------ report
def summarize(comp: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, by in comp["runs"].items():
        out[mode] = {}
        for name, rs in by.items():
            rps = [r["rps"] for r in rs]
            out[mode][name] = {
                "rps_med": med(rps), "rps_min": min(rps), "rps_max": max(rps),
                "p50_med": med([r["p50_ms"] for r in rs if r["p50_ms"] is not None]),
                "p99_med": med([r["p99_ms"] for r in rs if r["p99_ms"] is not None]),
                "errors": sum(r["errors"] for r in rs), "non2xx": sum(r["non2xx"] for r in rs),
                "agent_cpu_med": {n: med([r["agent_cpu_pct"][n] for r in rs]) for n in rs[0]["agent_cpu_pct"]},
            }
    out["demo"] = {}
    for name, rs in comp["demo"].items():
        if rs:
            rps = [r["rps"] for r in rs]
            out["demo"][name] = {"rps_med": med(rps), "rps_min": min(rps), "rps_max": max(rps),
                                 "p50_med": med([r["p50_ms"] for r in rs]),
                                 "p99_med": med([r["p99_ms"] for r in rs])}
    # per-round ratios (same round = same machine noise), then medians
    out["ratios"] = {}
    for mode, by in comp["runs"].items():
        rat = {}
        for vip in ("meshlb dr", "meshlb nat"):
            if vip not in by:
                continue
            n = len(by[vip])
            for other in by:
                if other.startswith("meshlb"):
                    continue
                xs = [by[vip][i]["rps"] / by[other][i]["rps"] for i in range(n) if by[other][i]["rps"]]
                rat[f"{vip} / {other}"] = {"med": med(xs), "min": min(xs, default=0), "max": max(xs, default=0)}
        out["ratios"][mode] = rat
    return out


def print_markdown(res: dict[str, Any]) -> None:
    s = res["summary"]
    a = res["args"]
    print(f"\n{a['rounds']} rounds x {a['duration']} s per target, wrk -t2 -c{a['conns']}; median (min-max)\n")
    for mode in a["modes"]:
        print(f"### {mode}\n")
        mixes = "/".join(str(i) for i in range(1, a.get("nodes", 3) + 1))
        print(f"| target | req/s | p50 ms | p99 ms | socket errors | agent CPU % (mix{mixes}) |")
        print("|---|---|---|---|---|---|")
        for name, v in s[mode].items():
            ag = "/".join(f"{x:.0f}" for x in v["agent_cpu_med"].values())
            print(f"| {name} | {v['rps_med']:.0f} ({v['rps_min']:.0f}-{v['rps_max']:.0f}) | "
                  f"{v['p50_med']:.2f} | {v['p99_med']:.2f} | {v['errors']} | {ag} |")
        print()
        print("| ratio (per round, then median) | median | min-max |")
        print("|---|---|---|")
        for k, v in s["ratios"][mode].items():
            print(f"| {k} | {v['med']:.2f} | {v['min']:.2f}-{v['max']:.2f} |")
        print()
    if s["demo"]:
        print("### demo app (Python) on port 80, keep-alive\n")
        print("| target | req/s | p50 ms | p99 ms |")
        print("|---|---|---|---|")
        for name, v in s["demo"].items():
            print(f"| {name} | {v['rps_med']:.0f} ({v['rps_min']:.0f}-{v['rps_max']:.0f}) | "
                  f"{v['p50_med']:.2f} | {v['p99_med']:.2f} |")
        print()
    idle = res.get("idle")
    if idle:
        print(f"### agent footprint, idle {idle['seconds']:.0f} s\n")
        print("| mix | RSS MiB | peak RSS MiB | anon MiB | threads | CPU % |")
        print("|---|---|---|---|---|---|")
        for n, v in idle["agents"].items():
            print(f"| {n} | {v['rss_kib'] / 1024:.1f} | {v['hwm_kib'] / 1024:.1f} | {v['anon_kib'] / 1024:.1f} "
                  f"| {v['threads']} | {v['cpu_pct']:.2f} |")
        print()
    idle = res.get("idle_after_load")
    if idle:
        print(f"### agent footprint, idle {idle['seconds']:.0f} s right after the load\n")
        for n, v in idle["agents"].items():
            print(f"- {n}: RSS {v['rss_kib'] / 1024:.1f} MiB, CPU {v['cpu_pct']:.2f} %")
        print()
    joins = res.get("joins")
    if joins:
        print("### join to forwarding (s after starting `meshlb join`), median (min-max)\n")
        print("| stage | seconds |")
        print("|---|---|")
        for k in ("control", "local_table", "first_answer", "peer_tables", "converged"):
            xs = [j["marks_s"][k] for j in joins if k in j["marks_s"]]
            if xs:
                print(f"| {k} | {med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}), n={len(xs)} |")
        print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--demo-rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--joins", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "docs" / "img" / "lab_bench.json"))
    ap.add_argument("--modes", default="keepalive,close", help="keepalive, close or both")
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s, 5 s idle, 1 join")
    ap.add_argument("--nodes", type=int, default=3,
                    help="mixes in the lab (with N, (N-1)/N of VIP flows cross a second mix)")
    ap.add_argument("--targets", default="",
                    help="comma-separated subset of the targets (default: all)")
    ap.add_argument("--sockops-cgroup", default="auto",
                    help='the mixes\' conntrack.sockops_cgroup ("auto", "off" or a path)')
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.nodes < 1:
        ap.error("--nodes must be at least 1")
    if args.quick:
        args.rounds, args.demo_rounds, args.duration, args.idle, args.joins = 1, 1, 2, 5.0, 1
    if os.geteuid() != 0:
        print("needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    rig = Rig(args)
    res: dict[str, Any] = {"args": vars(args), "started": time.time(), "cpus": os.cpu_count(),
                           "kernel": os.uname().release}
    try:
        rig.up()
        res["nft_ruleset"] = rig.nft_ruleset
        if not args.skip_idle:
            res["idle"] = rig.idle_footprint()
        res["comparison"] = rig.comparison()
        res["summary"] = summarize(res["comparison"])
        res["after_load"] = {n: proc_status(p) for n, p in rig.agent_pids().items()}
        res["agent_stats_after_load"] = {
            n: {k: v for k, v in control.call(rig.lab.state["nodes"][n]["control"], "stats", timeout=10).items()
                if k in ("evictions", "gossip", "conntrack_entries", "tracer", "loop_lag", "table_changes")}
            for n in rig.agent_pids()}
        if not args.skip_idle:
            res["idle_after_load"] = rig.idle_footprint()
        res["joins"] = []
        for _ in range(args.joins):
            j = rig.join_trial(f"mix{args.nodes}")
            print("join:", j, flush=True)
            res["joins"].append(j)
        if args.joins:
            last = f"mix{args.nodes}"
            log = Path(rig.lab.state["nodes"][last]["log"]).read_text(errors="replace")
            res[f"{last}_log_tail"] = log.splitlines()[-40:]
    finally:
        problems = teardown(rig)
        if problems:
            print("teardown problems:", problems, file=sys.stderr)
        if "summary" in res or "idle" in res:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print_markdown(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
