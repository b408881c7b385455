"""contrib/systemd/meshlb.service: systemd's own checker accepts it (no error, no
warning), and it says what docs/operations.md says it does. That the agent runs with
exactly its capabilities is checked on a lab (test_operable_lab.py)."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshlb import preflight
from tests.contrib.files import UNIT, tool

# where systemd looks up a command that is not an absolute path (systemd.service(5))
SYSTEMD_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"]


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # keys are case-sensitive
    cp.read_string(UNIT.read_text())
    return cp


def installed_meshlb() -> str:
    """The meshlb command of this installation."""
    for candidate in (shutil.which("meshlb"), str(Path(sys.executable).parent / "meshlb")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no installed meshlb command (pip install -e . or scripts/install-deps.sh)")


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("systemd-analyze", "systemd"), "verify", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=path.parent)


def unit_for_this_host(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as shipped, its command resolved where this installation has it when it
    is not on systemd's search path (verify checks the command exists)."""
    text = UNIT.read_text() if text is None else text
    if not any(os.access(os.path.join(d, "meshlb"), os.X_OK) for d in SYSTEMD_PATH):
        text = text.replace("ExecStart=meshlb ", f"ExecStart={installed_meshlb()} ")
    path = tmp_path / "meshlb.service"
    path.write_text(text)
    return path


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    res = verify(unit_for_this_host(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "" and res.stdout.strip() == "", res.stdout + res.stderr


def test_verify_would_notice_a_mistake(tmp_path):
    """The check above can fail: a misspelt setting is reported."""
    res = verify(unit_for_this_host(tmp_path, UNIT.read_text().replace("RestartSec=", "RestartSecs=")))
    assert "RestartSecs" in res.stderr


def test_unit_says_what_the_docs_say():
    svc = unit()["Service"]
    assert svc["ExecStart"] == "meshlb join --config /etc/meshlb/cluster.toml"
    assert svc["Restart"] == "on-failure"
    assert svc["ExecReload"] == "kill -HUP $MAINPID"
    from meshlb import config

    drain = config.default_config().drain.timeout_s
    stop = float(svc["TimeoutStopSec"])
    assert stop > drain + 10, (stop, drain)  # the drain, then the leave and the teardown
    caps = svc["CapabilityBoundingSet"].split()
    assert sorted(caps) == sorted(preflight.NEEDED_CAPS), caps
    rw = svc["ReadWritePaths"].split()
    assert "/sys/fs/bpf" in rw and "/proc/sys/net" in rw
    assert svc["RuntimeDirectory"] == "meshlb"  # the control socket's /run/meshlb
    assert svc["LogsDirectory"] == "meshlb"  # where preflight.log_dir() puts a verifier log
    # node.state_dir's default (/var/lib/meshlb/<name>), writable under ProtectSystem=strict
    assert svc["StateDirectory"] == "meshlb"
    assert config.parse('[node]\nname = "m"\n[cluster]\nkey_file = "/k"\n').node.state_dir.startswith("/var/lib/meshlb/")
    assert unit()["Install"]["WantedBy"] == "multi-user.target"
