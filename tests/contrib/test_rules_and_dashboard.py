"""The Prometheus rules and the Grafana dashboard, checked by Prometheus's own promtool:
the rules load, the alerts fire on series shaped as the agents export them (and stay
quiet where they should), and every dashboard query is valid PromQL. That the names
they use are what a running agent exports is checked on a lab (test_operable_lab.py).
"""
from __future__ import annotations

import subprocess

import pytest

from tests.contrib.files import (
    DASHBOARD,
    RULES,
    RULES_TEST,
    as_promql,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    metric_names,
    rule_exprs,
    tool,
)


def promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool", "prometheus"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_promtool_accepts_the_rules():
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_alerts_fire_when_they_should_and_only_then():
    res = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_refuses_a_broken_rule(tmp_path):
    """The harness can fail: the same check on a rule with a typo in its PromQL."""
    bad = tmp_path / "bad.yml"
    bad.write_text(RULES.read_text().replace("max by (job, instance) (", "max by (job, instance (", 1))
    res = promtool("check", "rules", str(bad))
    assert res.returncode != 0


def test_every_dashboard_query_is_valid_promql(tmp_path):
    exprs = dashboard_exprs()
    assert exprs
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, e in enumerate(exprs):
        lines += [f"      - record: dashboard:query_{i}", f"        expr: '{as_promql(e)}'"]
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text("\n".join(lines) + "\n")
    res = promtool("check", "rules", str(rules))
    assert res.returncode == 0, res.stdout + res.stderr + rules.read_text()


def test_dashboard_shape():
    d = dashboard()
    assert d["uid"] == "meshlb" and d["title"] == "meshlb"
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "job", "instance"]
    ids = set()
    for p in dashboard_panels():
        assert p["id"] not in ids
        ids.add(p["id"])
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            # every query is scoped to the chosen cluster
            assert '$job' in t["expr"], (p["title"], t["expr"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24


@pytest.mark.parametrize("what, pattern", [
    ("members by status", "meshlb_members"),
    ("whether tables agree", "meshlb_table_info"),
    ("per-VIP packets", "meshlb_vip_packets_total"),
    ("per-VIP bytes", "meshlb_vip_bytes_total"),
    ("new flows", 'reason="ct_insert"'),
    ("drops by reason", 'reason=~"drop_.*"'),
    ("passes by reason", 'reason=~"pass_.*"'),
    ("conntrack fill", "meshlb_conntrack_entries{"),
    ("conntrack fill", "meshlb_conntrack_capacity"),
    ("evictions sent/received/applied", 'kind=~"sent|received|applied"'),
    ("gossip drops by reason", "meshlb_gossip_dropped_total"),
    ("event-loop lag", "meshlb_event_loop_lag_seconds_bucket"),
    ("draining backends' flows", "meshlb_backend_flows"),
    ("backends by state", "meshlb_backend_state"),
])
def test_dashboard_shows(what, pattern):
    assert any(pattern in e for e in dashboard_exprs()), f"no panel for {what} ({pattern})"


def test_alerts_cover():
    import yaml

    alerts = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {"MeshlbMemberSuspect", "MeshlbMemberDead", "MeshlbTablesDisagree", "MeshlbConntrackNearlyFull",
            "MeshlbDataplaneDrops", "MeshlbGossipRejected"} <= set(alerts)
    assert alerts["MeshlbTablesDisagree"]["for"] == "1m"
    assert "0.9" in alerts["MeshlbConntrackNearlyFull"]["expr"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_names_come_from_the_metrics_module():
    """Without a lab: every name is one meshlb/metrics.py renders (the lab test checks
    that a running agent exports them)."""
    from prometheus_client.parser import text_string_to_metric_families

    from meshlb import metrics
    from meshlb.looplag import LoopLag

    snap = metrics.Snapshot(node="n", members_by_status={"alive": 1}, table_digest="d", vip_traffic={"v": (1, 2)},
                            backend_traffic={"b": (1, 2)}, dataplane_reasons={"rx": 1}, evictions={"sent": 1},
                            tracer_events={"emitted": 1}, gossip_datagrams={"sent": 1}, gossip_drops={"x": 1},
                            health={"t": True}, health_checks={("t", "ok"): 1}, loop_lag=LoopLag(),
                            backends=[metrics.BackendRow("v", "b", "member", "draining", True, 1, 3)])
    text = metrics.render(lambda: snap).decode()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    used = metric_names(dashboard_exprs() + rule_exprs())
    assert used - exported == set()
    assert DASHBOARD.exists() and RULES.exists()
