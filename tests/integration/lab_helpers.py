"""Helpers for tests that run a real netns lab (agents, apps, real TCP clients)."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from meshlb import control
from meshlb.lab.lab import VIP_DR, VIP_NAT, Lab, LabOptions

VIPS = {"dr": VIP_DR, "nat": VIP_NAT}


def unique_prefix(tag: str) -> str:
    return f"ml{tag}{os.getpid() % 100000}"


@contextlib.contextmanager
def running_lab(tag: str, **kw: Any) -> Iterator[Lab]:
    """A lab whose conntrack entries only closes remove unless the test says otherwise:
    the handshake timeout is off unless given (the idle sweep is the caller's choice)."""
    kw.setdefault("handshake_timeout_s", 0)
    opts = LabOptions(prefix=unique_prefix(tag), **kw)
    lab = Lab(opts)
    try:
        lab.up(wait_s=60)
        yield lab
    finally:
        problems = Lab.down(opts.prefix)
        assert not problems, problems


def mixes(lab: Lab) -> list[str]:
    return lab.mixes()


def call(lab: Lab, node: str, op: str, **args: Any) -> Any:
    return control.call(lab.state["nodes"][node]["control"], op, args, timeout=5)


def client_run(lab: Lab, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = lab.namespace("client").popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{argv[0]} timed out: {out[-2000:]} {err[-2000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def curl_many(lab: Lab, vip: str, n: int) -> Counter:
    """n separate connections (separate curl processes: separate source ports, so ECMP
    and Maglev both spread them); counts answers by backend name, failures as 'FAIL'."""
    script = f'for i in $(seq 1 {n}); do curl -s -g --max-time 3 http://{vip}/ || echo FAIL; done'
    res = client_run(lab, ["sh", "-c", script], timeout=30 + 4 * n)
    return Counter(line.strip() for line in res.stdout.splitlines() if line.strip())


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> float:
    """Poll until predicate() is truthy; returns the seconds it took."""
    start = time.monotonic()
    last = None
    while True:
        last = predicate()
        if last:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout:g} s (last: {last!r})")
        time.sleep(interval)


def members_view(lab: Lab, node: str) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in call(lab, node, "members")["members"]}


def digests(lab: Lab, nodes: list[str]) -> set[str]:
    return {members_view(lab, n)[n]["table_digest"] for n in nodes}


def ab(lab: Lab, url: str, concurrency: int, requests: int, timeout: float = 240) -> dict[str, int]:
    res = client_run(lab, ["ab", "-q", "-r", "-s", "10", "-c", str(concurrency), "-n", str(requests), url], timeout)
    text = res.stdout + res.stderr
    out = {}
    for key, pat in (("complete", r"Complete requests:\s+(\d+)"), ("failed", r"Failed requests:\s+(\d+)"),
                     ("non2xx", r"Non-2xx responses:\s+(\d+)")):
        m = re.search(pat, text)
        out[key] = int(m.group(1)) if m else (0 if key == "non2xx" else -1)
    if out["complete"] < 0:
        raise AssertionError(f"ab gave no summary: {text[-3000:]}")
    return out


def parse_wrk(text: str) -> dict[str, int]:
    out = {"requests": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0}
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["connect"], out["read"], out["write"], out["timeout"] = map(int, m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    return out
