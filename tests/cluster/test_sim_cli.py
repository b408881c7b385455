"""``meshlb sim``: the user-facing command over the cluster simulator."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REQUIRED_KEYS = {
    # inputs
    "nodes", "loss", "crash", "seed", "duration", "preset",
    # measurements
    "suspect_p50_s", "suspect_p99_s", "dead_p50_s", "dead_p99_s", "false_deaths", "false_suspicions",
    "eviction_p50_s", "eviction_p99_s", "eviction_missed", "idle_bytes_per_s_per_member",
    "cpu_s_per_member_per_s", "converged", "drops",
}


def sim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshlb.cli", "sim", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_json_output_has_every_documented_key():
    p = sim("--nodes", "12", "--loss", "0.05", "--crash", "1", "--seed", "1", "--duration", "30",
            "--evictions", "4", "--format", "json")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    r = json.loads(lines[0])
    assert REQUIRED_KEYS <= set(r)
    assert r["nodes"] == 12 and r["loss"] == 0.05 and r["crash"] == 1 and r["seed"] == 1
    assert r["duration"] == 30.0 and r["preset"] == "lan"
    assert set(r["drops"]) == {"net", "wire"}
    # a 12-member cluster with one crash: the crash is seen, the rest agree
    assert r["dead_missed"] == 0 and r["converged"] is True
    assert r["evictions_published"] == 4 and r["eviction_missed"] == 0
    assert r["idle_bytes_per_s_per_member"] > 0 and r["cpu_s_per_member_per_s"] > 0


def test_help_documents_the_keys():
    p = sim("--help")
    assert p.returncode == 0
    for key in ("suspect_p50_s", "dead_p99_s", "eviction_missed", "idle_bytes_per_s_per_member",
                "cpu_s_per_member_per_s", "converged", "drops.wire"):
        assert key in p.stdout


def test_percent_loss_is_the_same_as_a_fraction():
    a = sim("--nodes", "8", "--loss", "5%", "--duration", "15", "--no-timing")
    b = sim("--nodes", "8", "--loss", "0.05", "--duration", "15", "--no-timing")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["loss"] == 0.05
    assert a.stdout == b.stdout


def test_table_format():
    p = sim("--nodes", "6", "--duration", "10", "--format", "table")
    assert p.returncode == 0, p.stderr
    rows = dict(line.split(None, 1) for line in p.stdout.strip().splitlines())
    assert rows["nodes"] == "6"
    assert rows["converged"] == "true"
    assert "drops.net" in rows


@pytest.mark.parametrize(
    "args",
    [
        ["--loss", "2"],
        ["--loss", "abc"],
        ["--loss", "-5%"],
        ["--nodes", "1"],
        ["--nodes", "ten"],
        ["--crash", "-1"],
        ["--nodes", "5", "--crash", "4"],
        ["--duration", "0"],
        ["--preset", "moon"],
        ["--format", "xml"],
        ["--partition", "0-4|5-9"],
        ["--nodes", "10", "--partition", "0-4|5-19@1-2"],
        ["--starved", "150%"],
        ["--bogus"],
        ["--idle-window", "50-40"],
    ],
)
def test_bad_arguments_fail_with_one_line(args):
    p = sim(*args, timeout=60)
    assert p.returncode != 0
    assert p.stdout == ""
    err = p.stderr.strip().splitlines()
    assert len(err) == 1, p.stderr
    assert err[0].startswith("meshlb sim: ")
    assert "Traceback" not in p.stderr
