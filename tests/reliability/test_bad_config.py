"""Malformed cluster files: `meshlb join` fails with one line naming the file and the
field, before anything touches the kernel; a running agent given a bad file on
SIGHUP keeps its configuration and says why.

The CLI runs inside a scratch network namespace holding one veth pair (vcfg0/vcfg1),
so a configuration that wrongly got through would attach to an interface that
exists; "touched nothing" is checked on that namespace (no XDP program, no VIP on
lo, no control socket) and on the host's BPF filesystem (no pin directory).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshlb.lab.netns import Namespace
from tests.reliability.faults import call, record, reliability_lab, wait_until

pytestmark = pytest.mark.privileged

PID = os.getpid()
NETNS = f"mlcfg{PID}"
PIN_DIR = f"/sys/fs/bpf/meshlb/mlcfg{PID}"
VIP = "198.19.77.1"
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        for cmd in (["link", "add", "vcfg0", "type", "veth", "peer", "name", "vcfg1"],
                    ["link", "set", "vcfg0", "up"], ["link", "set", "vcfg1", "up"], ["link", "set", "lo", "up"],
                    ["addr", "add", "10.250.0.1/24", "dev", "vcfg0"]):
            subprocess.run(["ip", "-n", NETNS, *cmd], check=True, capture_output=True)
        d = tmp_path_factory.mktemp("cfg")
        os.chmod(d, 0o700)
        key = d / "cluster.key"
        key.write_text(os.urandom(32).hex() + "\n")
        os.chmod(key, 0o600)
        yield d
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        shutil.rmtree(PIN_DIR, ignore_errors=True)


def good_config(d: Path, **over: str) -> str:
    parts = {
        "node": (f'name = "cfgtest"\niface = "vcfg0"\nbind = "10.250.0.1:7946"\nxdp_mode = "generic"\n'
                 f'pin_dir = "{PIN_DIR}"\ncontrol = "{d}/agent.sock"\nmetrics = ""\n'),
        "cluster": f'label = "cfgtest"\nkey_file = "{d}/cluster.key"\n',
        "vips": f'address = "{VIP}"\nport = 80\nmode = "dr"\n',
    }
    parts.update(over)
    out = []
    for section in ("node", "cluster"):
        if parts[section] is not None:
            out.append(f"[{section}]\n{parts[section]}")
    if parts["vips"]:
        for block in parts["vips"].split("\n\n"):
            out.append(f"[[vips]]\n{block}\n")
    out += [v for k, v in parts.items() if k not in ("node", "cluster", "vips") and v]
    return "\n".join(out)


def _nothing_touched(d: Path) -> list[str]:
    problems = []
    if os.path.exists(PIN_DIR):
        problems.append(f"pin directory {PIN_DIR} exists")
    link = subprocess.run(["ip", "-n", NETNS, "-d", "link", "show", "vcfg0"], capture_output=True, text=True).stdout
    if "xdp" in link:
        problems.append(f"an XDP program is attached to vcfg0: {link}")
    lo = subprocess.run(["ip", "-n", NETNS, "addr", "show", "lo"], capture_output=True, text=True).stdout
    if VIP in lo:
        problems.append(f"the VIP was added to lo: {lo}")
    if (d / "agent.sock").exists():
        problems.append("a control socket was created")
    return problems


def _join(cfg: Path, *, setns_only: bool = False, timeout: float = 20) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "meshlb", "join", "--config", str(cfg)]
    env = dict(os.environ, PYTHONPATH=REPO)
    if setns_only:
        # the way the lab and a systemd unit with NetworkNamespacePath= start it:
        # network namespace switched, mount namespace (and so /sys) not
        proc = Namespace(None, NETNS, "cfg").popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                   env=env, start_new_session=True)
    else:
        proc = subprocess.Popen(["ip", "netns", "exec", NETNS, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # it got through and is running: that is the failure; stop it before asserting
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, "still running", out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _cleanup_after_escape(d: Path) -> None:
    subprocess.run(["ip", "-n", NETNS, "link", "set", "vcfg0", "xdp", "off"], capture_output=True)
    subprocess.run(["ip", "-n", NETNS, "link", "set", "vcfg0", "xdpgeneric", "off"], capture_output=True)
    subprocess.run(["ip", "-n", NETNS, "addr", "del", f"{VIP}/32", "dev", "lo"], capture_output=True)
    shutil.rmtree(PIN_DIR, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (d / "agent.sock").unlink()


# (case id, how to break the good file, the field the error must name)
def _cases(d: Path) -> dict[str, tuple[str, str]]:
    node = good_config(d).split("[cluster]")[0]
    return {
        "type-xdp_mode": (good_config(d).replace('xdp_mode = "generic"', "xdp_mode = 3"), "node.xdp_mode"),
        "type-health-interval": (good_config(d) + '\n[health]\ninterval = "fast"\n', "health.interval"),
        "type-vip-port": (good_config(d).replace("port = 80", 'port = "80"'), "vips[0].port"),
        "type-peers": (good_config(d).replace('label = "cfgtest"', 'label = "cfgtest"\npeers = "10.0.0.1"'),
                       "cluster.peers"),
        "range-max_entries": (good_config(d) + "\n[conntrack]\nmax_entries = 0\n", "conntrack.max_entries"),
        "negative-idle": (good_config(d) + "\n[conntrack]\nidle_timeout_s = -1\n", "conntrack.idle_timeout_s"),
        "unknown-key": (good_config(d).replace('name = "cfgtest"', 'name = "cfgtest"\ncolour = "red"'), "node.colour"),
        "unknown-table": (good_config(d) + "\n[extras]\na = 1\n", "extras"),
        "vip-two-modes": (good_config(d, vips=f'address = "{VIP}"\nport = 80\nmode = "dr"\n\n'
                                               f'address = "{VIP}"\nport = 81\nmode = "nat"'), "vips[1].mode"),
        "vip-duplicate": (good_config(d, vips=f'address = "{VIP}"\nport = 80\n\naddress = "{VIP}"\nport = 80'),
                          "vips[1]"),
        "no-cluster": (node, "cluster"),
        "missing-interface": (good_config(d).replace('iface = "vcfg0"', 'iface = "nosuch0"'), "node.iface"),
        "key-file-missing": (good_config(d).replace("cluster.key", "missing.key"), "cluster.key_file"),
        "key-file-directory": (good_config(d).replace(f'{d}/cluster.key', str(d)), "cluster.key_file"),
        "key-file-garbage": (good_config(d).replace("cluster.key", "garbage.key"), "cluster.key_file"),
        "key-file-empty": (good_config(d).replace("cluster.key", "empty.key"), "cluster.key_file"),
        "key-file-zero": (good_config(d).replace("cluster.key", "zero.key"), "cluster.key_file"),
    }


CASES = ["type-xdp_mode", "type-health-interval", "type-vip-port", "type-peers", "range-max_entries",
         "negative-idle", "unknown-key", "unknown-table", "vip-two-modes", "vip-duplicate", "no-cluster",
         "missing-interface", "key-file-missing", "key-file-directory", "key-file-garbage", "key-file-empty",
         "key-file-zero"]
SECRET_LINE = "s3cr3t-" + "9f" * 20


def _write_key_variants(d: Path) -> None:
    (d / "garbage.key").write_text(SECRET_LINE + "\n")
    (d / "empty.key").write_text("# nothing here\n")
    (d / "zero.key").write_text("00" * 32 + "\n")
    for n in ("garbage.key", "empty.key", "zero.key"):
        os.chmod(d / n, 0o600)


def _assert_one_line(res: subprocess.CompletedProcess, path: Path, field: str) -> str:
    assert res.returncode not in (0, "still running"), (res.returncode, res.stderr[-2000:])
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"expected one line, got: {err!r}"
    assert str(path) in err, err
    assert field in err, f"{field!r} not named in {err!r}"
    assert res.stdout == "", res.stdout
    return err


@pytest.mark.parametrize("case", CASES)
def test_bad_cluster_file_fails_before_the_kernel(scratch, case):
    _write_key_variants(scratch)
    text, field = _cases(scratch)[case]
    cfg = scratch / f"{case}.toml"
    cfg.write_text(text)
    try:
        res = _join(cfg)
        err = _assert_one_line(res, cfg, field)
        assert SECRET_LINE not in err  # a mistyped key is never echoed
        assert _nothing_touched(scratch) == []
        record("config: " + case, refused=True, message=err)
    finally:
        _cleanup_after_escape(scratch)


def test_syntax_error_and_unreadable_file(scratch):
    cfg = scratch / "syntax.toml"
    cfg.write_text(good_config(scratch).replace('name = "cfgtest"', 'name = "cfgtest'))
    res = _join(cfg)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res
    assert str(cfg) in res.stderr and "line" in res.stderr, res.stderr
    missing = scratch / "absent.toml"
    res = _join(missing)
    assert res.returncode == 1 and str(missing) in res.stderr and len(res.stderr.strip().splitlines()) == 1
    binary = scratch / "binary.toml"
    binary.write_bytes(b"\xff\xfe[node]\n")
    res = _join(binary)
    assert res.returncode == 1 and str(binary) in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert _nothing_touched(scratch) == []


def test_interface_is_checked_in_the_agents_own_namespace(scratch):
    """An agent started by setns(2) alone (as the lab does, or systemd's
    NetworkNamespacePath=) sees the host's /sys, not its namespace's: the interface
    check must still be about the namespace it runs in. "eth0" exists on the host
    but not in the scratch namespace."""
    host_ifaces = sorted(n for n in os.listdir("/sys/class/net") if n not in ("lo", "vcfg0"))
    assert host_ifaces, "the host shows no interface but lo in /sys/class/net"
    cfg = scratch / "hosts-iface.toml"
    cfg.write_text(good_config(scratch).replace('iface = "vcfg0"', f'iface = "{host_ifaces[0]}"'))
    try:
        res = _join(cfg, setns_only=True)
        _assert_one_line(res, cfg, "node.iface")
        assert _nothing_touched(scratch) == []
    finally:
        _cleanup_after_escape(scratch)


@pytest.mark.slow
def test_sighup_with_a_bad_file_keeps_the_running_config():
    with reliability_lab("cfg", nodes=2, idle_timeout_s=0, health_interval_s=0.5) as lab:
        node = "mix1"
        info = lab.state["nodes"][node]
        path = Path(info["config"])
        good = path.read_text()
        def vips_now():
            # what the config decides; the backends follow the cluster's health view,
            # which may change for a moment on a loaded machine whatever the config does
            return [(v["vip"], v["mode"]) for v in call(lab, node, "vips")["vips"]]

        vips_before = vips_now()
        log = Path(info["log"])
        bad_variants = {
            "unknown key": (good.replace("[health]\n", "[health]\nbogus = 1\n"), "health.bogus"),
            "bad type": (good.replace("interval = 0.5", 'interval = "soon"'), "health.interval"),
            "vip in two modes": (good + '\n[[vips]]\naddress = "198.19.0.1"\nport = 81\nmode = "nat"\n', "mode"),
            "missing key file": (good.replace("cluster.key", "gone.key"), "cluster.key_file"),
        }
        try:
            for what, (text, field) in bad_variants.items():
                size = log.stat().st_size
                path.write_text(text)
                os.kill(info["agent_pid"], signal.SIGHUP)

                def said_why():
                    new = log.read_text(errors="replace")[size:]
                    return [ln for ln in new.splitlines() if "reload refused" in ln]

                wait_until(said_why, 10, what=f"agent logs why it refused ({what})")
                line = said_why()[0]
                assert str(path) in line and field in line, line
                # control op "reload" gives the same answer
                res = call(lab, node, "reload")
                assert field in res.get("error", ""), res
                assert vips_now() == vips_before
                record("config: SIGHUP " + what, refused=True, message=line.split("reload refused", 1)[1].strip())
            path.write_text(good.replace("interval = 0.5", "interval = 0.6"))
            res = call(lab, node, "reload")
            assert "health.interval" in res["applied"], res
            assert os.path.exists(f"/proc/{info['agent_pid']}")
            lab.wait_converged(20)
        finally:
            path.write_text(good)
