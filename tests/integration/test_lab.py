"""End to end on the netns lab: real agents, real XDP on veth, real TCP clients.

Three mixes, both forwarding modes, the periodic conntrack sweep switched off so that
only socket-release events and gossip can empty the conntrack maps.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from meshlb.lab.lab import APP_PORT, VIP_DR
from tests.integration.lab_helpers import (
    VIPS,
    ab,
    call,
    client_run,
    curl_many,
    digests,
    members_view,
    mixes,
    parse_wrk,
    running_lab,
    wait_for,
)

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab():
    with running_lab("e", nodes=3, idle_timeout_s=0, health_interval_s=0.5) as lab:
        yield lab


def _counters(lab, node):
    return call(lab, node, "stats")["dataplane"]


@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_requests_reach_every_backend(lab, mode):
    before = {m: _counters(lab, m) for m in mixes(lab)}
    answers = curl_many(lab, VIPS[mode], 30)
    assert answers.get("FAIL", 0) == 0, answers
    assert set(answers) == set(mixes(lab)), answers
    after = {m: _counters(lab, m) for m in mixes(lab)}
    # some flows were forwarded to another mix by XDP, not all served where they landed
    forwarded = sum(after[m]["tx"] + after[m]["redirect"] - before[m]["tx"] - before[m]["redirect"] for m in mixes(lab))
    assert forwarded > 0


def test_ipv6_dr_vip(lab):
    vip6 = next(v["address"] for v in lab.state["vips"] if ":" in v["address"])
    answers = curl_many(lab, f"[{vip6}]", 24)
    assert answers.get("FAIL", 0) == 0, answers
    assert set(answers) == set(mixes(lab)), answers


def test_socket_events_reach_only_the_agent_of_their_namespace(lab):
    """Every mix is an agent on this host in its own namespace: a connection that one
    mix's application closes is reported to that agent alone (or, for a flow no other
    mix can hold, evicted by that agent's tracer program without a report)."""
    def closed():
        out = {}
        for m in mixes(lab):
            st = call(lab, m, "stats")
            out[m] = st["evictions"].get("socket_closed", 0) + st["tracer"]["local_evicted"]
        return out

    # closes of the tests before may still be on their way (a batch of closes is held
    # until its evictions have gone out, up to a gossip round): start from still counts
    before = closed()
    for _ in range(20):
        time.sleep(0.5)
        before, prev = closed(), before
        if before == prev:
            break
    answers = curl_many(lab, VIP_DR, 1)
    (backend,) = answers
    assert backend in mixes(lab)

    def deltas():
        now = closed()
        return {m: now[m] - before[m] for m in mixes(lab)}

    wait_for(lambda: deltas()[backend] >= 1, 5, what="close reported to the backend's agent")
    time.sleep(0.3)
    d = deltas()
    assert d[backend] == 1, d
    assert all(v == 0 for m, v in d.items() if m != backend), d


@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_ab_load_then_conntrack_empties_within_a_second(lab, mode):
    result = ab(lab, f"http://{VIPS[mode]}/", concurrency=500, requests=8000)
    ended = time.monotonic()
    assert result["complete"] == 8000, result
    assert result["failed"] == 0, result
    assert result["non2xx"] == 0, result
    vip = f"{VIPS[mode]}:80"

    def left_of_this_load() -> dict[str, list]:
        # this VIP's entries only: what an earlier test left is its own failure
        return {m: [e for e in call(lab, m, "conntrack_list", limit=100000)["entries"] if e["vip"] == vip]
                for m in mixes(lab)}

    try:
        wait_for(lambda: not any(left_of_this_load().values()), 5, what=f"every mix's conntrack empty of {vip}")
    except AssertionError:
        entries = left_of_this_load()
        left = {m: len(es) for m, es in entries.items()}
        first = [e for es in entries.values() for e in es][:10]
        tracer = [call(lab, m, "stats")["tracer"] for m in mixes(lab)]
        # None is left since the causes of leftover entries were fixed (docs/architecture.md:
        # the last, closes the kernel ran no tracing program for). More than
        # 0.1% of the flows fails; fewer is reported as an expected failure with the
        # entries, for the cause to be found.
        assert sum(left.values()) <= 0.001 * 8000, (
            f"{mode}: conntrack entries left 5 s after the load: {left}; tracer: {tracer}; "
            f"first entries: {first}")
        states = Counter(e["state"] for es in entries.values() for e in es)
        # SYN_RECV: handshakes nobody finished, which the handshake timeout (off here)
        # ends in production; an ESTABLISHED one is a close nobody reported
        pytest.xfail(f"open gap (issue 4): {mode}: {sum(left.values())} of 8000 conntrack entries stay "
                     f"after the load ({left}; {dict(states)}): {first}")
    took = time.monotonic() - ended
    print(f"{mode}: every conntrack empty {took:.3f} s after ab ended")
    # goal 1 s; the half second on top is what asking three agents costs on a loaded CI box
    assert took <= 1.5, f"{mode}: conntrack took {took:.2f} s to empty (goal 1 s)"
    for m in mixes(lab):
        stats = call(lab, m, "stats")
        assert stats["evictions"].get("received", 0) > 0, stats["evictions"]
        assert stats["tracer"]["ringbuf_full"] == 0 and stats["tracer"]["queue_dropped"] == 0, stats["tracer"]
        # the closes came from the sock_ops hook on the mix's cgroup (where the host has
        # cgroup v2, which tests/integration/test_tracer.py requires in CI)
        if lab.state.get("cgroup"):
            assert stats["tracer"]["sockops"] > 0, stats["tracer"]


def test_backend_app_down_is_removed_and_returns(lab):
    victim = "mix3"
    others = [m for m in mixes(lab) if m != victim]
    info = lab.state["nodes"][victim]
    os.kill(info["app_pid"], signal.SIGTERM)

    def excluded_everywhere():
        return all(victim not in v["backends"] for m in mixes(lab) for v in call(lab, m, "vips")["vips"])

    try:
        took = wait_for(excluded_everywhere, 20, 0.1, what=f"{victim} removed from every table")
        print(f"{victim} removed from every table {took:.2f} s after its app stopped")
        assert len(digests(lab, mixes(lab))) == 1
        answers = curl_many(lab, VIP_DR, 20)
        assert answers.get("FAIL", 0) == 0, answers
        assert victim not in answers and set(answers) <= set(others), answers
    finally:
        app = lab.popen(victim, [sys.executable, "-m", "meshlb.lab.app", victim, str(APP_PORT)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        info["app_pid"] = app.pid
        lab._save()

    def back_everywhere():
        return all(victim in v["backends"] for m in mixes(lab) for v in call(lab, m, "vips")["vips"])

    took = wait_for(back_everywhere, 20, 0.1, what=f"{victim} back in every table")
    print(f"{victim} back in every table {took:.2f} s after its app restarted")
    wait_for(lambda: len(digests(lab, mixes(lab))) == 1, 5, what="one digest on all nodes")
    answers = curl_many(lab, VIP_DR, 30)
    assert answers.get("FAIL", 0) == 0 and victim in answers, answers


@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_agent_kill_and_restart_under_wrk_has_no_socket_errors(lab, mode):
    wrk = lab.namespace("client").popen(
        ["wrk", "-t2", "-c50", "-d8s", "--timeout", "5s", f"http://{VIPS[mode]}/"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        time.sleep(2)
        old = lab.state["nodes"]["mix2"]["agent_pid"]
        new = lab.restart_agent("mix2", signal.SIGKILL)
        assert new != old
        out, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    r = parse_wrk(out)
    assert r["requests"] > 1000, out
    assert (r["connect"], r["read"], r["write"], r["timeout"]) == (0, 0, 0, 0), out
    assert r["non2xx"] == 0, out
    lab.wait_converged(30)
    stats = call(lab, "mix2", "stats")
    assert stats["xdp_mode"] == "adopted", stats["xdp_mode"]


# n handshakes from ports base.. (up to SPARE_PORTS more: a handshake whose SYN-ACK does
# not come within a second, which a loaded machine sees now and then, is given up and
# the next port tried; its entry is half-open too). Prints the ports given up.
SPARE_PORTS = 4
_HALF_OPEN_CLIENT = """
import socket, sys
vip, base, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
done, failed = 0, []
for port in range(base, base + n + %d):
    if done == n:
        break
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, bytes(8))  # close = reset, no orphan
    s.bind(("", port))
    s.settimeout(1)
    try:
        s.connect((vip, %d))  # completes here; the ACK that would tell the mix is dropped
        done += 1
    except OSError:
        failed.append(port)
    s.close()
print(failed)
sys.exit(0 if done == n else 1)
""" % (SPARE_PORTS, APP_PORT)


def _reload_all(lab, text_of):
    for m in mixes(lab):
        path = lab.state["nodes"][m]["config"]
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text_of(text))
        res = call(lab, m, "reload")
        assert not res.get("error") and not res["needs_restart"], res


@pytest.mark.parametrize("mode", ["dr", "nat"])
def test_unacknowledged_handshakes_expire_and_established_flows_stay(lab, mode):
    """A SYN whose handshake the client never acknowledges leaves no socket to close:
    its entry expires after conntrack.handshake_timeout_s (switched on here by a
    reload, the lab starts with it off), while idle established flows stay and work."""
    from tests.reliability.faults import Nft  # noqa: PLC0415

    timeout = 2.0
    on = lambda t: t.replace("handshake_timeout_s = 0\n", f"handshake_timeout_s = {timeout}\n")  # noqa: E731
    off = lambda t: t.replace(f"handshake_timeout_s = {timeout}\n", "handshake_timeout_s = 0\n")  # noqa: E731
    # above the ephemeral range: ab's TIME_WAIT sockets hold ports inside it
    vip, base, n = VIPS[mode], 61000 if mode == "dr" else 61100, 8
    client = lab.namespace("client")
    held = client.popen([sys.executable, "-c", _persistent_client_script(vip, 6)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held.stdin.write("round\n")
        held.stdin.flush()
        first = json.loads(held.stdout.readline())
        assert not any(v.startswith("ERROR") for v in first.values()), first
        _reload_all(lab, on)
        with Nft(lab) as nft:
            nft.add("client", "output", f"ip daddr {vip} tcp sport {base}-{base + n + SPARE_PORTS - 1} "
                    "tcp flags & syn == 0 counter drop")
            res = client_run(lab, [sys.executable, "-c", _HALF_OPEN_CLIENT, vip, str(base), str(n)])
            assert res.returncode == 0, (res.stdout, res.stderr[-2000:])
            tried = n + len(json.loads(res.stdout))

            def half_open():
                return {(m, e["client"]): e["state"] for m in mixes(lab)
                        for e in call(lab, m, "conntrack_list", limit=100000)["entries"]
                        if base <= int(e["client"].rsplit(":", 1)[1]) < base + tried}

            seen = half_open()
            assert len(seen) >= n and set(seen.values()) == {"SYN_RECV"}, (seen, res.stdout)
            expired = wait_for(lambda: not half_open(), timeout + 5, what="half-open entries expired")
            assert expired >= timeout * 0.5, expired  # not removed by something else at once
            assert nft.counter_packets("client") >= n  # the ACKs were really withheld
        counts = {m: call(lab, m, "stats")["evictions"].get("handshake_timeout", 0) for m in mixes(lab)}
        assert sum(counts.values()) >= n, counts
        time.sleep(timeout + 0.5)
        established = [e for m in mixes(lab) for e in call(lab, m, "conntrack_list", limit=100000)["entries"]
                       if e["vip"] == f"{vip}:{APP_PORT}" and e["state"] == "ESTABLISHED"]
        assert len(established) >= 6, established  # idle longer than the timeout, kept
        held.stdin.write("round\n")
        held.stdin.flush()
        second = json.loads(held.stdout.readline())
        assert second == first, (first, second)  # same backends, no connection reset
    finally:
        _reload_all(lab, off)
        held.stdin.close()
        held.wait(timeout=10)


def _persistent_client_script(vip: str, n: int) -> str:
    """A client holding n keep-alive connections; on each line of stdin ("round", or a
    JSON list of connection indexes) it sends one request per open connection (or per
    listed one) and prints {index: backend or error}."""
    return f"""
import http.client, json, sys
conns = [http.client.HTTPConnection("{vip}", {APP_PORT}, timeout=2) for _ in range({n})]
def round_(only):
    out = {{}}
    for i, c in enumerate(conns):
        if only is not None and i not in only:
            continue
        try:
            c.request("GET", "/")
            out[i] = c.getresponse().read().decode().strip()
        except Exception as exc:
            out[i] = "ERROR " + type(exc).__name__
            c.close()
    print(json.dumps(out), flush=True)
for line in sys.stdin:
    round_(set(json.loads(line)) if line.startswith("[") else None)
"""


def test_crashed_mix_is_detected_and_flows_to_survivors_carry_on():
    with running_lab("c", nodes=3, idle_timeout_s=0, health_interval_s=0.5) as lab:
        victim = "mix3"
        survivors = ["mix1", "mix2"]
        client = lab.namespace("client")
        proc = client.popen([sys.executable, "-c", _persistent_client_script(VIP_DR, 40)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def round_(only=None):
                proc.stdin.write((json.dumps(only) if only is not None else "go") + "\n")
                proc.stdin.flush()
                return {int(k): v for k, v in json.loads(proc.stdout.readline()).items()}

            first = round_()
            assert not [v for v in first.values() if v.startswith("ERROR")], first
            assert set(first.values()) == set(mixes(lab)), first

            # the crash: agent killed, namespace gone; the client's router withdraws
            # the dead next hop, as a router's own health check would
            crashed_at = time.monotonic()
            info = lab.state["nodes"][victim]
            for pid in (info["agent_pid"], info["app_pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            from pyroute2 import netns as pr_netns

            pr_netns.remove(info["netns"])
            lab.route_vips_through(survivors)

            # the survivors' connections only, at once: a round that also waited for
            # each dead connection's timeout would reach some survivors only after the
            # tables dropped the victim, and Maglev moves a few of the survivors' slots
            # then too: a flow that came through the victim has no conntrack entry on
            # the mix the router now picks, and follows the new table
            second = round_([i for i, b in first.items() if b != victim])
            for i, backend in first.items():
                if backend != victim:
                    assert second[i] == backend, (i, backend, second[i])

            def status_of_victim():
                return {m: members_view(lab, m).get(victim, {}).get("status") for m in survivors}

            t_suspect = wait_for(lambda: all(s in ("suspect", "dead") for s in status_of_victim().values()), 30,
                                 0.05, what="victim suspect on survivors")
            t_dead = wait_for(lambda: all(s == "dead" for s in status_of_victim().values()), 60,
                              0.1, what="victim dead on survivors")
            print(f"crash -> suspect on all survivors {t_suspect:.2f} s, -> dead {time.monotonic() - crashed_at:.2f} s")
            assert t_dead >= 0

            third = round_()
            for i, backend in first.items():
                if backend != victim:
                    assert third[i] == backend, (i, backend, third[i])
            answers = curl_many(lab, VIP_DR, 30)
            assert answers.get("FAIL", 0) == 0, answers
            assert set(answers) == set(survivors), answers
            assert len(digests(lab, survivors)) == 1
        finally:
            proc.kill()
            proc.communicate()


def test_metrics_endpoint_exposes_the_agents_state(lab):
    """A scrape of a mix's metrics port parses as Prometheus text and says what the
    control socket says: members, tables, evictions, and the event loop's lag."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    assert curl_many(lab, VIP_DR, 6).get("FAIL", 0) == 0  # some closes to count
    before = call(lab, "mix1", "stats")["evictions"]
    res = subprocess.run(["ip", "netns", "exec", lab.state["nodes"]["mix1"]["netns"], "curl", "-s",
                          "--max-time", "5", "http://127.0.0.1:9477/metrics"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    fams = {f.name: f for f in text_string_to_metric_families(res.stdout)}
    stats = call(lab, "mix1", "stats")
    members = {s.labels["status"]: s.value for s in fams["meshlb_members"].samples}
    assert members["alive"] == 3, members
    info = fams["meshlb_table_info"].samples[0].labels
    assert info["digest"] == stats["table_digest"] and info["node"] == "mix1"
    evictions = {s.labels["kind"]: s.value for s in fams["meshlb_evictions"].samples}
    later = call(lab, "mix1", "stats")["evictions"]  # counters only grow
    assert evictions.get("sent", 0) + evictions.get("received", 0) > 0
    assert all(before.get(k, 0) <= v <= later[k] for k, v in evictions.items()), (before, evictions, later)
    lag = {s.name: s for s in fams["meshlb_event_loop_lag_seconds"].samples if not s.labels.get("le")}
    count = lag["meshlb_event_loop_lag_seconds_count"].value
    assert count > 0 and abs(count - stats["loop_lag"]["samples"]) <= 20
    buckets = [s.value for s in fams["meshlb_event_loop_lag_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative, +Inf = count
