"""Access: the control socket is root's alone, gossip answers no one outside the
cluster, and the cluster key shows up nowhere an operator or a scraper can read."""
from __future__ import annotations

import base64
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlb.cluster import messages as M
from meshlb.cluster.keyring import Keyring
from meshlb.cluster.wire import Wire
from meshlb.lab.lab import GOSSIP_PORT, mix_addr4
from tests.reliability.faults import Nft, call, mixes, ns_run, record, reliability_lab

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

REPO = str(Path(__file__).resolve().parents[2])
NOBODY = 65534


@pytest.fixture(scope="module")
def lab():
    with reliability_lab("a", nodes=2, idle_timeout_s=0, health_interval_s=0.5) as lab:
        yield lab


def test_control_socket_is_root_only(lab):
    for node in mixes(lab):
        path = lab.state["nodes"][node]["control"]
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert (st.st_uid, st.st_gid) == (0, 0), (st.st_uid, st.st_gid)
        parent = os.stat(os.path.dirname(path))
        assert not parent.st_mode & stat.S_IWOTH, oct(parent.st_mode)
    path = lab.state["nodes"]["mix1"]["control"]
    # a non-root user is refused by the kernel, and the CLI says so on one line
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); print('CONNECTED')\nexcept PermissionError: print('EACCES')\n")
    res = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          sys.executable, "-c", probe, path], capture_output=True, text=True, timeout=20)
    assert res.stdout.strip() == "EACCES", (res.stdout, res.stderr)
    res = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          sys.executable, "-m", "meshlb", "members", "--control", path],
                         capture_output=True, text=True, timeout=20, env=dict(os.environ, PYTHONPATH=REPO), cwd="/")
    assert res.returncode == 1 and "permission denied" in res.stderr, (res.returncode, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    record("access: control socket", mode="0600", owner="root:root", non_root="refused (EACCES)")


def test_gossip_never_answers_a_non_member(lab):
    """From the client's address (not a member): pings, ping-reqs and push-pull
    requests, both unauthenticated and sealed with the real key under a name no member
    has. Nothing may come back to that address, counted by an nft rule on the client."""
    key = bytes.fromhex((lab.sdir / "cluster.key").read_text().split()[0])
    label = "lab-" + lab.opts.prefix
    with Nft(lab) as nft:
        nft.add("client", "input", f"udp sport {GOSSIP_PORT} counter")
        sock = lab.namespace("client").socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        sock.settimeout(0.2)
        try:
            w = Wire(label=label, keyring=Keyring(key), sender="stranger", epoch=time.time_ns() // 1_000_000)
            bad = Wire(label=label, keyring=Keyring(os.urandom(32)), sender="stranger", epoch=1)
            msgs = [M.Ping(1, "mix1"), M.Ping(2, "mix2"), M.PingReq(3, "mix2", True), M.Ack(1),
                    M.PushPull(4, False, False, False, 0, 1, ())]
            sent = 0
            for node in mixes(lab):
                for m in msgs:
                    for wire in (w, bad):
                        for d in wire.seal([Wire.encode(M.encode(m))]):
                            sock.sendto(d, (mix_addr4(int(node[3:])), GOSSIP_PORT))
                            sent += 1
            replies = 0
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    sock.recvfrom(65535)
                    replies += 1
                except TimeoutError:
                    pass
            counted = nft.counter_packets("client")
        finally:
            sock.close()
    refused = sum(call(lab, n, "stats")["gossip"]["node"].get("reply_refused", 0)
                  + call(lab, n, "stats")["gossip"]["node"].get("pingreq_refused", 0) for n in mixes(lab))
    record("access: gossip to a non-member", sent=sent, replies=replies, gossip_packets_to_client=counted,
           refused_counted=refused)
    assert replies == 0 and counted == 0, (replies, counted)
    assert refused > 0


def _secret_forms(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), base64.b64encode(key).decode().rstrip("="),
            key.hex()[:16], base64.b64encode(key).decode()[:16]]


def test_no_secret_in_logs_members_stats_or_metrics(lab):
    key = bytes.fromhex((lab.sdir / "cluster.key").read_text().split()[0])
    forms = _secret_forms(key)
    # reload once so the log also holds what a reload prints
    call(lab, "mix1", "reload")
    texts: dict[str, str] = {}
    env = dict(os.environ, PYTHONPATH=REPO)
    for node in mixes(lab):
        info = lab.state["nodes"][node]
        texts[f"{node} log"] = Path(info["log"]).read_text(errors="replace")
        for cmd in ("members", "stats", "vips"):
            for fmt in ("json", "table"):
                texts[f"{node} {cmd} {fmt}"] = subprocess.run(
                    [sys.executable, "-m", "meshlb", cmd, "--control", info["control"], "--format", fmt],
                    capture_output=True, text=True, env=env, timeout=20).stdout
        texts[f"{node} metrics"] = ns_run(lab, node, ["curl", "-s", "--max-time", "5",
                                                      "http://127.0.0.1:9477/metrics"]).stdout
        with open(f"/proc/{info['agent_pid']}/cmdline", "rb") as f:
            texts[f"{node} cmdline"] = f.read().decode(errors="replace")
        with open(f"/proc/{info['agent_pid']}/environ", "rb") as f:
            texts[f"{node} environ"] = f.read().decode(errors="replace")
    assert all(texts[f"{n} members json"] and texts[f"{n} metrics"] for n in mixes(lab)), "an output was empty"
    leaks = [(where, form) for where, text in texts.items() for form in forms if form in text]
    record("access: secrets", places_checked=len(texts), leaks=len(leaks))
    assert leaks == [], leaks
