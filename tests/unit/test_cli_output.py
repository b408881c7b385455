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


def test_a_vips_backends_in_one_cell():
    from meshlb.agent_cli import backend_cell

    def b(name, weight=1, state="active", health="ok", flows=0):
        return {"name": name, "weight": weight, "state": state, "health": health, "flows": flows}

    v = {"backends": ["198.18.0.231:80", "mix1", "mix2", "mix3"],
         "backend_set": [b("198.18.0.231:80", weight=3), b("mix1"), b("mix2", state="draining", flows=12),
                         b("mix3", state="down", health="down")]}
    assert backend_cell(v) == "198.18.0.231:80 [w3], mix1, mix2 [draining, 12 flows], mix3 [down]"
    assert backend_cell({"backends": ["mix1", "mix2"]}) == "mix1,mix2"  # an agent without backend_set
    assert backend_cell({"backends": [], "backend_set": []}) == "-"


def test_members_show_flows_drains_balancers_and_servers():
    from meshlb.agent_cli import members_rows, server_rows

    m = {"name": "mix1", "address": "10.0.0.1:7946", "status": "alive", "incarnation": 1, "vips": ["v"],
         "health": "ok", "table_digest": "d", "status_since": 0.0, "self": True, "serves": True, "drained": True,
         "flows": 4}
    balancer = dict(m, name="mix2", vips=[], serves=False, drained=False, flows=0, self=False)
    rows, _ = members_rows({"now": 10.0, "members": [m, balancer]})
    assert rows[0][4:7] == ["v", "draining", "4"] and rows[1][4:7] == ["(balancer only)", "ok", "0"]
    servers = [{"name": "198.18.0.231:80", "vips": ["v", "w"], "health": "ok", "drained": False, "flows": 3}]
    assert server_rows({"servers": servers}) == [["198.18.0.231:80", "v,w", "ok", "3"]]


def test_backend_metrics_render():
    from prometheus_client.parser import text_string_to_metric_families

    rows = [metrics.BackendRow("v", "mix2", "member", "draining", True, 2, 7),
            metrics.BackendRow("v", "198.18.0.231:80", "external", "down", False, 1, None)]
    text = metrics.render(lambda: metrics.Snapshot(node="n", backends=rows)).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("meshlb_backend_")
           and not s.name.endswith(("_total", "_created"))}
    assert got[("meshlb_backend_state", (("backend", "mix2"), ("kind", "member"), ("state", "draining"),
                                         ("vip", "v")))] == 1
    assert got[("meshlb_backend_state", (("backend", "mix2"), ("kind", "member"), ("state", "active"),
                                         ("vip", "v")))] == 0
    assert got[("meshlb_backend_flows", (("backend", "mix2"), ("vip", "v")))] == 7
    assert ("meshlb_backend_flows", (("backend", "198.18.0.231:80"), ("vip", "v"))) not in got  # not counted
    assert got[("meshlb_backend_up", (("backend", "198.18.0.231:80"), ("vip", "v")))] == 0
    assert got[("meshlb_backend_weight", (("backend", "mix2"), ("vip", "v")))] == 2
