"""The command line's output without an agent: nested values as key/value lines, rates
between two samples, the top screen, --version, and a closed pipe. (The same against
real agents: tests/contrib/test_operable_lab.py.)"""
from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

from meshlb import __version__, metrics
from meshlb.agent_cli import tree_lines
from meshlb.top_cli import Sample, cmd_top, parse_backend_metrics, rates, render

REPO = Path(__file__).resolve().parents[2]


def test_nested_values_are_key_value_lines():
    result = {"node": "mix1", "uptime_s": 12.5, "dataplane": {"tx": 3, "rx": 10},
              "gossip": {"transport": {"dropped": {}, "sent": 4}, "driver": {"events": 366}},
              "peers": [{"name": "a", "ok": True}, "b"], "note": None}
    assert tree_lines(result) == [
        "dataplane:",
        "  rx: 10",
        "  tx: 3",
        "gossip:",
        "  driver:",
        "    events: 366",
        "  transport:",
        "    dropped: (none)",
        "    sent: 4",
        "node: mix1",
        "note: -",
        "peers:",
        "  - name: a",
        "    ok: yes",
        "  - b",
        "uptime_s: 12.5",
    ]


def _sample(at, vips=None, backends=None, reasons=None):
    return Sample(at=at, node="mix1", vips=vips or {}, backends=backends, reasons=reasons or {})


def test_rates_per_second_over_the_interval():
    a = _sample(10.0, {"v": (100, 10_000)}, {"b": (50, 5_000)}, {"rx": 1000, "drop_fib": 7})
    b = _sample(12.0, {"v": (300, 30_000), "w": (5, 500)}, {"b": (90, 9_000)}, {"rx": 1400, "drop_fib": 7})
    r = rates(a, b, wall=1.0)
    assert r == {
        "time": 1.0, "interval_s": 2.0, "node": "mix1",
        "vips": {"v": {"packets_per_s": 100.0, "bytes_per_s": 10_000.0},
                 "w": {"packets_per_s": 0.0, "bytes_per_s": 0.0}},  # new: no rate before a second sample
        "backends": {"b": {"packets_per_s": 20.0, "bytes_per_s": 2_000.0}},
        "reasons": {"drop_fib": 0.0, "rx": 200.0},
    }
    json.dumps(r)  # one JSON object per interval


def test_a_counter_that_went_down_counts_from_zero():
    r = rates(_sample(0.0, reasons={"rx": 5000}), _sample(1.0, reasons={"rx": 40}))
    assert r["reasons"]["rx"] == 40.0


def test_backends_unknown_is_said_not_hidden():
    r = rates(_sample(0.0), _sample(1.0))
    assert r["backends"] is None
    assert "per-backend counters not available: why" in render(r, "why")


def test_render_shows_reasons_that_moved():
    r = rates(_sample(0.0, {"v": (0, 0)}, {}, {"rx": 0, "tx": 0}), _sample(1.0, {"v": (5, 500)}, {}, {"rx": 9, "tx": 0}))
    text = render(r)
    assert "REASON" in text and "rx" in text and "tx " not in text
    assert "VIP" in text and "5.0" in text


def test_backend_counters_from_the_metrics_exposition():
    snap = metrics.Snapshot(backend_traffic={"mix1 198.18.0.11": (7, 700), "mix2 [fd00::c]:80": (1, 60)})
    assert parse_backend_metrics(metrics.render(lambda: snap).decode()) == {
        "mix1 198.18.0.11": (7, 700), "mix2 [fd00::c]:80": (1, 60)}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_top_loop_draws_count_frames(monkeypatch):
    from meshlb import top_cli

    counters = iter(range(0, 10_000, 100))
    clock = itertools.count(0.0, 0.5)  # a sample, then the loop's look at the clock

    def fake_call(args, op):
        n = next(counters)
        if op == "vips":
            return {"vips": [{"vip": "v", "packets": n, "bytes": n * 10}]}
        return {"node": "x", "dataplane": {"rx": n}, "backends": {"b": {"packets": n, "bytes": n}}}

    monkeypatch.setattr(top_cli, "_call", fake_call)
    monkeypatch.setattr(top_cli.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(top_cli.time, "sleep", lambda s: None)
    args = types.SimpleNamespace(interval=1.0, count=3, format="table", metrics="")
    out = _Tty()
    assert cmd_top(args, out) == 0
    assert out.getvalue().count("\x1b[H\x1b[2J") == 3
    args.format, args.count = "json", 2
    out = io.StringIO()
    cmd_top(args, out)
    frames = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [f["vips"]["v"]["packets_per_s"] for f in frames] == [200.0, 200.0]
    assert frames[0]["backends"]["b"]["packets_per_s"] == 200.0


def test_version():
    res = subprocess.run([sys.executable, "-m", "meshlb", "--version"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout == f"meshlb {__version__}\n"


def test_output_into_a_closed_pipe_ends_quietly():
    """`meshlb sim` needs no agent: it prints, and the reader is gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([sys.executable, "-m", "meshlb", "sim", "--nodes", "3", "--duration", "5", "--seed", "1"],
                             stdout=w, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    finally:
        os.close(w)
    assert res.stderr == ""
    assert res.returncode == 128 + signal.SIGPIPE
