"""Announcers driven in network namespaces (tests/announce/driver.py), for the tests."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from meshlb.lab.netns import Namespace

ROOT = Path(__file__).resolve().parents[2]


class Driver:
    """One announcer process inside ``ns`` (what a mix's agent would run)."""

    def __init__(self, ns: Namespace, spec: dict[str, Any], log: Path) -> None:
        self.ns = ns
        self.spec = spec
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = ns.popen([sys.executable, "-m", "tests.announce.driver", json.dumps(spec)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "ab"),
                             cwd=str(ROOT), env=env)

    def call(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"announcer in {self.ns.name}: no answer to {op} within {timeout} s; log: "
                                 f"{self.log.read_text()[-3000:]}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"announcer in {self.ns.name} exited; log: {self.log.read_text()[-3000:]}")
        reply = json.loads(line)
        assert reply["ok"], reply  # the interface never raises into its caller
        return reply

    def status(self) -> dict[str, Any]:
        return self.call("status")["status"]

    def kill(self) -> None:
        """An agent's crash: SIGKILL, nothing cleaned up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self, keep: bool = False) -> None:
        if self.proc.poll() is None:
            try:
                self.call("stop", keep=keep)
            finally:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition") -> float:
    start = time.monotonic()
    while True:
        last = predicate()
        if last:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout:g} s (last: {last!r})")
        time.sleep(interval)


class RouteMonitor:
    """``ip monitor route`` in a namespace: every route change the kernel reports, so a
    withdrawal and re-announcement between two polls is still seen."""

    def __init__(self, ns: Namespace) -> None:
        self.proc = ns.popen(["ip", "monitor", "route"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        self._thread.join(timeout=5)

    def events(self) -> list[tuple[bool, str, list[str]]]:
        """(deleted, destination, next hops) per reported change."""
        out: list[tuple[bool, str, list[str]]] = []
        for line in self.lines:
            if line[:1].isspace():
                if out and "nexthop via" in line:
                    out[-1][2].append(line.split("nexthop via", 1)[1].split()[0])
                continue
            words = line.split()
            deleted = bool(words) and words[0] == "Deleted"
            if deleted:
                words = words[1:]
            if not words:
                continue
            hops = [words[words.index("via") + 1]] if "via" in words else []
            out.append((deleted, words[0], hops))
        return out


def gossip(drivers: dict[str, Driver], forwardable: dict[str, list[str]], rounds: int = 6) -> list[dict]:
    """Hand every announcer the others' ready and claimed VIPs (what their member
    metadata would carry), round after round until nothing changes; returns each
    round's statuses by member. Stands in for the agent's gossip, not for the network."""
    members = list(drivers)
    history = []
    statuses = {m: drivers[m].status() for m in members}
    for _ in range(rounds):
        ready = {m: statuses[m]["ready"] for m in members}
        claims = {m: statuses[m]["owned"] for m in members}
        new = {m: drivers[m].call("update", forwardable=forwardable[m], ready=ready, claims=claims)["status"]
               for m in members}
        history.append(new)
        settled = all(new[m]["owned"] == statuses[m]["owned"] and new[m]["ready"] == statuses[m]["ready"]
                      for m in members)
        statuses = new
        if settled:
            break
    return history
