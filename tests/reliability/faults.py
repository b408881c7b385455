"""Fault injection and measurement on the netns lab, shared by the reliability tests.

Faults: nftables drops (partitions, random gossip loss with ``numgen``) in a table of
our own per namespace, SIGSTOP/SIGCONT of an agent, link down/up, and the client's
router withdrawing or restoring a next hop. Measurement: a load probe running inside
the client namespace that keeps persistent HTTP connections busy and opens new ones
at a steady rate, recording every request's outcome with the shared monotonic clock,
so a test can tell failures on connections that never touched the failed node from
failures that were unavoidable.

Figures are printed as ``RELIABILITY {json}`` lines and, when MESHLB_RELIABILITY_OUT
names a file, appended to it as JSON lines; bench/reliability_report.py turns those
into docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from meshlb import control
from meshlb.lab import lab as lab_mod
from meshlb.lab.lab import APP_PORT, GOSSIP_PORT, Lab, LabOptions, mix_addr4, mix_addr6
from tests.integration.lab_helpers import unique_prefix

PID = os.getpid()
NFT_TABLE = f"mlbrel{PID}"


# --- lab set-up -----------------------------------------------------------------------


@contextlib.contextmanager
def reliability_lab(tag: str, *, conntrack: dict[str, Any] | None = None, wait_s: float = 90,
                    **kw: Any) -> Iterator[Lab]:
    """A lab like tests.integration.lab_helpers.running_lab, plus [conntrack] keys the
    lab's options do not expose (map size, sweep interval): the generated cluster file
    is edited on its way to disk, since a pinned map's size is fixed at creation. The
    handshake timeout is off unless given, as there."""
    kw.setdefault("handshake_timeout_s", 0)
    opts = LabOptions(prefix=unique_prefix(tag), **kw)
    lab = Lab(opts)
    original = lab_mod.mix_config
    if conntrack:
        extra = "".join(f"{k} = {v}\n" for k, v in conntrack.items())

        def patched(o: LabOptions, i: int, sdir: Any, *rest: Any) -> str:
            text = original(o, i, sdir, *rest)
            assert "\n[conntrack]\n" in text, "the lab's cluster file changed shape"
            return text.replace("\n[conntrack]\n", "\n[conntrack]\n" + extra, 1)

        lab_mod.mix_config = patched
    try:
        lab.up(wait_s=wait_s)
        lab_mod.mix_config = original
        yield lab
    finally:
        lab_mod.mix_config = original
        problems = Lab.down(opts.prefix)
        assert not problems, problems


def mixes(lab: Lab) -> list[str]:
    return lab.mixes()


def mix_index(node: str) -> int:
    return int(node[3:])


def call(lab: Lab, node: str, op: str, timeout: float = 5, **args: Any) -> Any:
    return control.call(lab.state["nodes"][node]["control"], op, args, timeout=timeout)


def netns_name(lab: Lab, node: str) -> str:
    return lab.state["nodes"][node]["netns"]


def ns_run(lab: Lab, node: str, argv: list[str], *, check: bool = True, input: str | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns_name(lab, node), *argv], input=input,
                          capture_output=True, text=True, check=check, timeout=timeout)


# --- nftables -------------------------------------------------------------------------


class Nft:
    """Our own inet table in some lab namespaces; removed on exit even on failure
    (a namespace that is already gone took its table with it)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.nodes: set[str] = set()

    def _ensure(self, node: str) -> None:
        if node in self.nodes:
            return
        script = (f"table inet {NFT_TABLE} {{\n"
                  f"  chain input {{ type filter hook input priority -10; policy accept; }}\n"
                  f"  chain output {{ type filter hook output priority -10; policy accept; }}\n"
                  f"}}\n")
        ns_run(self.lab, node, ["nft", "-f", "-"], input=script)
        self.nodes.add(node)

    def add(self, node: str, chain: str, rule: str) -> None:
        self._ensure(node)
        ns_run(self.lab, node, ["nft", "add", "rule", "inet", NFT_TABLE, chain, *rule.split()])

    def flush(self) -> None:
        for node in sorted(self.nodes):
            if os.path.exists(f"/run/netns/{netns_name(self.lab, node)}"):
                ns_run(self.lab, node, ["nft", "delete", "table", "inet", NFT_TABLE], check=False)
        self.nodes.clear()

    def counter_packets(self, node: str) -> int:
        """Packets counted by every `counter` statement in our table on node."""
        out = ns_run(self.lab, node, ["nft", "list", "table", "inet", NFT_TABLE], check=False).stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def partition(nft: Nft, lab: Lab, group_a: list[str], group_b: list[str]) -> None:
    """Drop every packet between the two groups' own addresses, both directions, in
    both groups (what a failed switch between two racks does)."""
    for here, there in ((group_a, group_b), (group_b, group_a)):
        v4 = ", ".join(mix_addr4(mix_index(n)) for n in there)
        v6 = ", ".join(mix_addr6(mix_index(n)) for n in there)
        for node in here:
            nft.add(node, "input", f"ip saddr {{ {v4} }} counter drop")
            nft.add(node, "output", f"ip daddr {{ {v4} }} counter drop")
            nft.add(node, "input", f"ip6 saddr {{ {v6} }} counter drop")
            nft.add(node, "output", f"ip6 daddr {{ {v6} }} counter drop")


def gossip_loss(nft: Nft, lab: Lab, percent: int, nodes: Iterable[str] | None = None) -> None:
    """Each node drops ``percent``% of the gossip datagrams it receives, at random."""
    for node in nodes or mixes(lab):
        nft.add(node, "input", f"udp dport {GOSSIP_PORT} numgen random mod 100 < {percent} counter drop")


# --- process and link faults --------------------------------------------------------


def freeze(lab: Lab, node: str) -> None:
    os.kill(lab.state["nodes"][node]["agent_pid"], signal.SIGSTOP)


def thaw(lab: Lab, node: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(lab.state["nodes"][node]["agent_pid"], signal.SIGCONT)


def link(lab: Lab, node: str, up: bool) -> None:
    ns_run(lab, node, ["ip", "link", "set", "eth0", "up" if up else "down"])


def keep_v6_addresses_on_down(lab: Lab, node: str) -> None:
    # Linux flushes static IPv6 addresses on link down by default; a real server's
    # addresses come back with the link, so keep them like its network manager would.
    ns_run(lab, node, ["sysctl", "-qw", "net.ipv6.conf.eth0.keep_addr_on_down=1"])


def client_next_hops(lab: Lab, nodes: list[str]) -> None:
    """The client's router withdraws or restores next hops: the test plays the router's
    own health check (BFD, a BGP hold timer)."""
    lab.route_vips_through(nodes)


def agent_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return -1


def agents_rss_kb(lab: Lab, nodes: list[str]) -> dict[str, int]:
    return {n: agent_rss_kb(lab.state["nodes"][n]["agent_pid"]) for n in nodes}


# --- convergence measures -------------------------------------------------------------


def view(lab: Lab, node: str) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in call(lab, node, "members")["members"]}


def agreed(lab: Lab, nodes: list[str], alive: list[str]) -> bool:
    """Every node in ``nodes`` sees exactly ``alive`` alive and one table digest
    among them (the digest each node advertises for itself)."""
    digests = set()
    try:
        for n in nodes:
            v = view(lab, n)
            if sorted(m for m, r in v.items() if r["status"] == "alive") != sorted(alive):
                return False
            digests.add(v[n]["table_digest"])
    except (control.ControlError, KeyError):
        return False
    return len(digests) == 1 and "" not in digests


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> float:
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


def conntrack_total(lab: Lab, nodes: list[str]) -> int:
    return sum(call(lab, n, "conntrack_count")["entries"] for n in nodes)


def conntrack_by_backend(lab: Lab, nodes: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        for e in call(lab, n, "conntrack_list", limit=100000)["entries"]:
            out[e["backend"]] = out.get(e["backend"], 0) + 1
    return out


def conntrack_where(lab: Lab, nodes: list[str]) -> dict[str, dict[str, int]]:
    """node -> backend -> entries, to say where leftovers sit."""
    out: dict[str, dict[str, int]] = {}
    for n in nodes:
        for e in call(lab, n, "conntrack_list", limit=100000)["entries"]:
            out.setdefault(n, {})
            out[n][e["backend"]] = out[n].get(e["backend"], 0) + 1
    return out


def conntrack_entries_of(lab: Lab, nodes: list[str], backends: set[str], limit: int = 10) -> list[dict]:
    """The entries (with the node holding them) whose backend is in ``backends``: what a
    missed eviction left, for the report."""
    out = []
    for n in nodes:
        for e in call(lab, n, "conntrack_list", limit=100000)["entries"]:
            if e["backend"] in backends and len(out) < limit:
                out.append({"on": n, **e})
    return out


def landing_mixes(lab: Lab, vip: str) -> dict[int, str]:
    """Client port -> the mix holding the flow in conntrack (where ECMP sent it)."""
    out = {}
    for n in mixes(lab):
        for e in call(lab, n, "conntrack_list", limit=100000)["entries"]:
            if e["vip"].startswith(vip + ":"):
                out[int(e["client"].rsplit(":", 1)[1])] = n
    return out


def backends_everywhere(lab: Lab, nodes: list[str]) -> list[set[str]]:
    return [set(v["backends"]) for n in nodes for v in call(lab, n, "vips")["vips"]]


# --- load ---------------------------------------------------------------------------

# Runs inside the client namespace. Threads, not asyncio: each persistent connection
# is a plain blocking http.client connection, as an ordinary client would hold. Times
# are time.monotonic(), which is CLOCK_MONOTONIC and so comparable with the test's.
_PROBE = r"""
import http.client, json, sys, threading, time
cfg = json.loads(sys.argv[1])
vip, port, n, every, fresh_every, timeout = (cfg["vip"], cfg["port"], cfg["persistent"],
    cfg["interval"], cfg["new_interval"], cfg["timeout"])
stop = threading.Event()
conns, fresh = [], []
lock = threading.Lock()

def one(c):
    c.request("GET", "/")
    return c.getresponse().read().decode().strip()

def persistent(i):
    gen = 0
    while not stop.is_set():
        rec = {"id": f"{i}.{gen}", "events": []}
        with lock:
            conns.append(rec)
        c = http.client.HTTPConnection(vip, port, timeout=timeout)
        while not stop.is_set():
            t = time.monotonic()
            try:
                rec["events"].append([t, one(c)])
                if "port" not in rec and c.sock is not None:
                    rec["port"] = c.sock.getsockname()[1]
            except Exception as exc:
                rec["events"].append([t, "ERR " + type(exc).__name__])
                c.close()
                break
            stop.wait(every)
        c.close()
        gen += 1

def newflows():
    while not stop.is_set():
        t = time.monotonic()
        c = http.client.HTTPConnection(vip, port, timeout=timeout)
        try:
            r = one(c)
        except Exception as exc:
            r = "ERR " + type(exc).__name__
        c.close()
        with lock:
            fresh.append([t, r])
        stop.wait(max(0.0, fresh_every - (time.monotonic() - t)))

ths = [threading.Thread(target=persistent, args=(i,), daemon=True) for i in range(n)]
ths.append(threading.Thread(target=newflows, daemon=True))
for t in ths:
    t.start()
print("ready", flush=True)
sys.stdin.readline()
stop.set()
for t in ths:
    t.join(timeout + 2)
with lock:
    print(json.dumps({"conns": conns, "new": fresh}), flush=True)
"""


@dataclass
class LoadResult:
    conns: list[dict[str, Any]]
    new: list[list[Any]]
    wrk: dict[str, int] = field(default_factory=dict)

    def requests(self) -> int:
        return sum(len(c["events"]) for c in self.conns) + len(self.new)

    def failures_off(self, victims: set[str], landing: dict[int, str] | None = None,
                     since: float = 0.0) -> list[tuple[str, float, str]]:
        """Failed requests on persistent connections that did not involve a victim:
        their backend (the first answer they got) is not one, nor, when ``landing``
        (client port -> the mix whose conntrack held the flow) is given, the mix the
        client's router sent them to. Only connections opened before ``since`` count
        when it is given (those open at the moment of the fault)."""
        out = []
        for c in self.conns:
            answers = [r for _, r in c["events"] if not r.startswith("ERR")]
            if not answers or answers[0] in victims:
                continue
            if since and (not c["events"] or c["events"][0][0] > since):
                continue
            if landing is not None and landing.get(c.get("port", -1)) in victims:
                continue
            out += [(c["id"], t, r) for t, r in c["events"] if r.startswith("ERR")]
        return out

    def failures_on(self, victims: set[str]) -> int:
        return sum(1 for c in self.conns for _, r in c["events"] if r.startswith("ERR")
                   and any(not a.startswith("ERR") and a in victims for _, a in c["events"]))

    def unattributed_failures(self) -> int:
        """Errors on connections that never got an answer at all."""
        return sum(len(c["events"]) for c in self.conns
                   if c["events"] and all(r.startswith("ERR") for _, r in c["events"]))

    def new_flows_avoid_after(self, since: float, victims: set[str], until: float | None = None) -> float:
        """Seconds after ``since`` until the last new flow that failed or landed on a
        victim (0.0 when none did), looking only at flows opened before ``until`` (when
        the failed node came back and may rightly get new flows again)."""
        bad = [t for t, r in self.new if t >= since and (until is None or t < until)
               and (r.startswith("ERR") or r in victims)]
        return max(bad) - since if bad else 0.0

    def new_flow_failures(self, since: float = 0.0) -> int:
        return sum(1 for t, r in self.new if t >= since and r.startswith("ERR"))

    def backends_seen(self) -> set[str]:
        return {r for c in self.conns for _, r in c["events"] if not r.startswith("ERR")}


class Load:
    """The probe plus wrk as background load, both from the client namespace."""

    def __init__(self, lab: Lab, vip: str, *, persistent: int = 24, interval: float = 0.1,
                 new_interval: float = 0.1, timeout: float = 2.0, wrk_connections: int = 16,
                 wrk_duration_s: int = 0) -> None:
        self.lab = lab
        self.vip = vip
        self.cfg = {"vip": vip, "port": APP_PORT, "persistent": persistent, "interval": interval,
                    "new_interval": new_interval, "timeout": timeout}
        self.wrk_connections = wrk_connections
        self.wrk_duration_s = wrk_duration_s
        self.probe: subprocess.Popen | None = None
        self.wrk: subprocess.Popen | None = None
        self.wrk_hung = False

    def start(self) -> Load:
        client = self.lab.namespace("client")
        self.probe = client.popen([sys.executable, "-c", _PROBE, json.dumps(self.cfg)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.probe.stdout.readline()
        if line.strip() != "ready":
            raise AssertionError(f"load probe did not start: {line} {self.probe.stderr.read()[-2000:]}")
        if self.wrk_duration_s > 0:
            self.wrk = client.popen(
                ["wrk", "-t1", f"-c{self.wrk_connections}", f"-d{self.wrk_duration_s}s", "--timeout", "3s",
                 f"http://{self.vip}/"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def stop(self) -> LoadResult:
        assert self.probe is not None
        wrk_out = ""
        try:
            self.probe.stdin.write("stop\n")
            self.probe.stdin.flush()
            out, err = self.probe.communicate(timeout=self.cfg["timeout"] + 20)
            if self.wrk is not None:
                try:
                    wrk_out, _ = self.wrk.communicate(timeout=self.wrk_duration_s + 30)
                except subprocess.TimeoutExpired:
                    # wrk is background load; the probe's per-request outcomes are what
                    # the scenarios judge. A wrk that outlives its -d (seen once after a
                    # crash, cause not found) is stopped and said so in the figures.
                    self.wrk.kill()
                    wrk_out, _ = self.wrk.communicate(timeout=10)
                    wrk_out = (wrk_out or "") + "\nwrk did not exit after its duration: killed"
                    self.wrk_hung = True
        finally:
            self.kill()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"load probe gave no result: {err[-2000:]}")
        data = json.loads(lines[-1])
        from tests.integration.lab_helpers import parse_wrk

        wrk = parse_wrk(wrk_out) if wrk_out else {}
        if self.wrk_hung:
            wrk["hung_killed"] = 1
        return LoadResult(data["conns"], data["new"], wrk)

    def kill(self) -> None:
        for p in (self.probe, self.wrk):
            if p is not None and p.poll() is None:
                p.kill()
                with contextlib.suppress(Exception):
                    p.communicate(timeout=5)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- figures --------------------------------------------------------------------------


def record(scenario: str, **figures: Any) -> dict[str, Any]:
    row = {"scenario": scenario, **figures}
    line = json.dumps(row, sort_keys=True, default=str)
    print(f"RELIABILITY {line}")
    out = os.environ.get("MESHLB_RELIABILITY_OUT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    return row
