"""What an operator touches, on a lab of real agents: the names the dashboard and the
alerts use are exported, `meshlb top` reports rates that match the agent's counters,
`meshlb stats` prints key/value lines and ends quietly into a closed pipe, and the
agent runs, reloads, restarts and stops with exactly the systemd unit's capabilities.
"""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshlb.lab.lab import GOSSIP_PORT, VIP_DR, VIP_NAT, mix_addr4
from tests.contrib.files import dashboard_exprs, metric_names, rule_exprs
from tests.contrib.test_systemd_unit import unit
from tests.integration.lab_helpers import call, curl_many, running_lab, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

MESHLB = [sys.executable, "-m", "meshlb"]
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_PERFMON": 38, "CAP_BPF": 39}


@pytest.fixture(scope="module")
def lab():
    with running_lab("op", nodes=2, health_interval_s=0.5) as lab:
        yield lab


def run_in(lab, node: str, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, MESHLB_CONTROL=lab.state["nodes"][node]["control"]) if "control" in lab.state["nodes"][
        node] else dict(os.environ)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    proc = lab.popen(node, argv, env=env, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{argv} timed out: {out!r} {err!r}") from None
    out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def background_traffic(lab, seconds: float, vip: str = VIP_DR) -> subprocess.Popen:
    """New connections to ``vip`` from the client for a bounded time."""
    script = (f"end=$(( $(date +%s) + {int(seconds)} )); while [ $(date +%s) -lt $end ]; do "
              f"curl -s --max-time 2 http://{vip}/ >/dev/null; sleep 0.05; done")
    return lab.popen("client", ["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def scrape(lab, node: str) -> str:
    code = ("import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=5).read().decode())")
    res = run_in(lab, node, [sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    return res.stdout


def exported(lab) -> set[str]:
    return {s.name for m in lab.mixes() for f in text_string_to_metric_families(scrape(lab, m)) for s in f.samples}


def test_every_name_of_the_dashboard_and_the_alerts_is_exported(lab):
    used = metric_names(dashboard_exprs() + rule_exprs())
    assert len(used) >= 12, used
    # traffic for the per-VIP, per-backend and eviction series; a datagram that is not
    # gossip for the drop counter (a label appears once its count is above zero)
    curl_many(lab, VIP_DR, 6)
    curl_many(lab, VIP_NAT, 6)
    send_junk = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 f"s.sendto(b'not gossip' * 8, ('{mix_addr4(1)}', {GOSSIP_PORT}))")
    assert run_in(lab, "client", [sys.executable, "-c", send_junk]).returncode == 0
    wait_for(lambda: used <= exported(lab), timeout=30, interval=0.5,
             what=f"every used name exported (missing: {sorted(used - exported(lab))})")


def test_top_rates_per_vip_backend_and_reason_match_the_counters(lab):
    dr_key = f"{VIP_DR}:80/tcp"
    traffic = background_traffic(lab, 8)
    try:
        time.sleep(1)
        before = {v["vip"]: v["packets"] for v in call(lab, "mix1", "vips")["vips"]}
        res = run_in(lab, "mix1", [*MESHLB, "top", "--format", "json", "--interval", "1", "--count", "3"])
        after = {v["vip"]: v["packets"] for v in call(lab, "mix1", "vips")["vips"]}
    finally:
        traffic.wait(timeout=30)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    frames = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(frames) == 3
    for f in frames:
        assert set(f) == {"time", "interval_s", "node", "vips", "backends", "reasons"}
        assert f["node"] == "mix1" and 0.5 < f["interval_s"] < 3
    # the rates integrate to no more than the counters moved around the run, and not to nothing
    seen = sum(f["vips"][dr_key]["packets_per_s"] * f["interval_s"] for f in frames)
    assert 0 < seen <= after[dr_key] - before[dr_key] + 0.01 * len(frames), (seen, before, after)
    assert any(v["packets_per_s"] > 0 for f in frames for v in f["backends"].values()), frames
    assert all(b.startswith(("mix1 ", "mix2 ")) for f in frames for b in f["backends"])
    assert any(f["reasons"]["rx"] > 0 for f in frames)
    assert {"rx", "tx", "pass_local", "drop_no_backend"} <= set(frames[0]["reasons"])


def test_top_redraws_a_terminal_in_place_and_appends_to_a_pipe(lab):
    master, slave = pty.openpty()
    try:
        proc = lab.popen("mix1", [*MESHLB, "top", "--interval", "0.5", "--count", "2"],
                         env=dict(os.environ, MESHLB_CONTROL=lab.state["nodes"]["mix1"]["control"]),
                         stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        slave = -1
        chunks = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the writer is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    screen = b"".join(chunks).decode()
    assert screen.count("\x1b[H\x1b[2J") == 2, screen  # each frame drawn over the last
    assert "VIP" in screen and "REASON" in screen and "BACKEND" in screen

    piped = run_in(lab, "mix1", [*MESHLB, "top", "--interval", "0.5", "--count", "2"])
    assert piped.returncode == 0 and "\x1b" not in piped.stdout
    assert piped.stdout.count("meshlb top: mix1") == 2
    assert "\n\nmeshlb top: mix1" in piped.stdout  # frames one after the other


def test_stats_prints_nested_key_value_lines(lab):
    res = run_in(lab, "mix1", [*MESHLB, "stats"])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    # no Python reprs of dicts or lists (an IPv6 backend's label has brackets of its own)
    for repr_mark in ("{", "}", "'", "['", "[(", ", ]"):
        assert repr_mark not in out, out
    assert any(line.startswith("backends:") for line in out.splitlines())
    lines = out.splitlines()
    i = lines.index("gossip:")
    assert lines[i + 1].startswith("  ") and lines[i + 1].endswith(":")  # gossip.driver: a section
    assert any(line.startswith("    datagrams_sent: ") for line in lines)  # a value two levels down
    assert any(line.startswith("  rx: ") for line in lines)  # dataplane.rx


def test_stats_into_a_closed_pipe_ends_quietly(lab):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write, as `| head -0` leaves it
    try:
        res = run_in(lab, "mix1", [*MESHLB, "stats"], stdout=w)
    finally:
        os.close(w)
    assert res.stderr == "", res.stderr
    assert res.returncode == 128 + signal.SIGPIPE
    # and through a shell pipe, whenever head leaves
    sh = run_in(lab, "mix1", ["sh", "-c", f"{' '.join(MESHLB)} stats | head -n 2"])
    assert sh.stderr == "" and len(sh.stdout.splitlines()) == 2, sh


def _unit_setpriv() -> list[str]:
    caps = unit()["Service"]["CapabilityBoundingSet"].split()
    spec = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])
    return ["setpriv", "--bounding-set", spec, "--inh-caps", "-all"]


def _cap_eff(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)


def _start_with_unit_caps(lab, node: str, log: Path) -> subprocess.Popen:
    info = lab.state["nodes"][node]
    out = open(log, "ab")
    proc = lab.popen(node, [*_unit_setpriv(), *MESHLB, "join", "--config", info["config"]], stdout=out,
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out.close()
    info["agent_pid"] = proc.pid  # the lab's down stops it
    lab._save()
    return proc


def _serves_both_vips(lab) -> None:
    """Every mix answers on every VIP. Tables may still move for a second after the
    members first agree (a restarted agent's health view fills in): poll."""
    for vip in (VIP_DR, VIP_NAT):
        last = []

        def both() -> bool:
            last[:] = [curl_many(lab, vip, 12)]
            return last[0].get("FAIL", 0) == 0 and set(last[0]) == set(lab.mixes())

        wait_for(both, timeout=30, interval=0.5, what=f"{vip} answered by every mix (last: {last})")


def test_the_agent_runs_with_the_units_capabilities(lab, tmp_path):
    """Start (fresh load), reload, crash and restart (adopting the pins) and stop
    (drain and leave) with CapabilityBoundingSet as the unit has it and root, as
    systemd runs it; the last test of the module: mix1 ends without an agent."""
    info = lab.state["nodes"]["mix1"]
    stop_s = float(unit()["Service"]["TimeoutStopSec"])
    # the lab's own agent leaves: the next one loads everything anew
    os.kill(info["agent_pid"], signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{info['agent_pid']}").exists()
             or "State:\tZ" in Path(f"/proc/{info['agent_pid']}/status").read_text(), timeout=stop_s)
    assert not Path(info["pin_dir"]).exists()
    log = tmp_path / "mix1.log"

    agent = _start_with_unit_caps(lab, "mix1", log)
    lab.wait_converged(60)
    want = sum(1 << b for b in CAP_BITS.values())
    assert _cap_eff(agent.pid) == want, hex(_cap_eff(agent.pid))  # those, and no other
    _serves_both_vips(lab)

    os.kill(agent.pid, signal.SIGHUP)  # ExecReload=
    wait_for(lambda: "reload:" in log.read_text(), timeout=10, what="the reload logged")

    agent.send_signal(signal.SIGKILL)  # a crash; Restart=on-failure starts the next one
    assert agent.wait(timeout=10) == -signal.SIGKILL
    agent = _start_with_unit_caps(lab, "mix1", log)
    lab.wait_converged(60)
    assert call(lab, "mix1", "stats")["xdp_mode"] == "adopted"
    _serves_both_vips(lab)

    agent.send_signal(signal.SIGTERM)  # systemctl stop: drain and leave in time
    assert agent.wait(timeout=stop_s) == 0, log.read_text()[-3000:]
    assert not Path(info["pin_dir"]).exists()
    assert "Traceback" not in log.read_text()
