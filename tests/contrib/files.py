"""The operator files in contrib/ and what they refer to."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib/systemd/meshlb.service"
DASHBOARD = REPO / "contrib/grafana/meshlb.json"
RULES = REPO / "contrib/prometheus/meshlb-rules.yml"
RULES_TEST = Path(__file__).resolve().parent / "meshlb-rules.test.yml"

_METRIC = re.compile(r"\bmeshlb_[a-z0-9_]+\b")


def tool(name: str, package: str) -> str:
    """Path of a checking tool; CI installs it (scripts/install-deps.sh), elsewhere
    its absence skips the test."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} missing in CI (scripts/install-deps.sh installs {package})")
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return [p for p in out if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def rule_exprs() -> list[str]:
    import yaml  # noqa: PLC0415

    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    # a PromQL expression of meshlb's names only: every meshlb_* word is a series name
    return {m for e in exprs for m in _METRIC.findall(e)}


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by what they stand for."""
    return (expr.replace("$__rate_interval", "5m").replace('"$job"', '".*"').replace('"$instance"', '".*"'))
