"""The docker-compose lab (compose/), built and run with a real Docker engine.

The test makes what it needs itself: the engine (scripts/docker-engine.sh, which
installs Debian's docker.io and starts dockerd when none runs), the base image and the
wheelhouse (scripts/docker-base.sh: debootstrap, since no image registry is reachable
here) and meshlb's wheel (pip wheel, which compiles the data plane). It then builds the
image on the local base, brings
the lab up under a project name of its own, and checks it from the inside: all three
mixes alive in `meshlb members`, requests through each VIP (client -> router -> ECMP)
answered by every mix and by both real servers (rs1, rs2: the demo app and no meshlb).

Everything the project made (containers, network, volume) is removed however the test
ends, and a dockerd this test started is stopped by its PID. The images stay: they are
a cache, named meshlb-*.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose" / "docker-compose.yml"
BASE_IMAGE = "meshlb-base:bookworm"
MIXES = ("mix1", "mix2", "mix3")
SERVERS = ("rs1", "rs2")  # real servers: the demo app, no meshlb
BACKENDS = MIXES + SERVERS
VIPS = {"198.19.0.1": "dr", "198.19.0.2": "nat"}
CONVERGE_S = 120
REQUESTS_PER_VIP = 80  # ECMP and Maglev both hash: 80 flows miss one of 5 backends with p < 1e-7

# A cold machine installs docker.io (~1 min) and runs debootstrap (~3 min) first.
pytestmark = [pytest.mark.privileged, pytest.mark.slow, pytest.mark.timeout(900)]


def _run(argv: list[str], *, timeout: float, check: bool = True, env: dict | None = None,
         cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


class Engine:
    """dockerd, started by scripts/docker-engine.sh unless one was already running."""

    def __init__(self) -> None:
        self.started_pid: int | None = None

    def ensure(self) -> None:
        out = _run(["bash", str(REPO / "scripts" / "docker-engine.sh")], timeout=600).stdout.split()
        assert len(out) == 2 and out[0] in ("started", "running"), f"docker-engine.sh said {out!r}"
        if out[0] == "started":
            self.started_pid = int(out[1])

    def stop(self) -> None:
        pid = self.started_pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.started_pid = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class Project:
    """One compose project: `docker-compose -p NAME -f compose/docker-compose.yml ...`."""

    def __init__(self, name: str) -> None:
        self.name = name
        exe = shutil.which("docker-compose")
        assert exe, "docker-compose is not on PATH after scripts/docker-engine.sh"
        self.argv = [exe, "--ansi", "never", "-p", name, "-f", str(COMPOSE_FILE)]
        self.env = dict(os.environ, MESHLB_BASE_IMAGE=BASE_IMAGE, COMPOSE_HTTP_TIMEOUT="180")

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return _run([*self.argv, *args], timeout=timeout, check=check, env=self.env, cwd=COMPOSE_FILE.parent)

    def exec(self, service: str, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return self("exec", "-T", service, *argv, timeout=timeout, check=check)

    def logs(self) -> str:
        try:
            proc = self("logs", "--no-color", "--tail=150", timeout=60, check=False)
            ps = self("ps", timeout=60, check=False)
            return f"{ps.stdout}\n{proc.stdout}{proc.stderr}"
        except Exception as exc:  # the logs are a diagnosis; their absence must not hide the failure
            return f"(no logs: {exc})"

    def down(self) -> None:
        self("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of this project that still exist."""
        found = []
        label = f"label=com.docker.compose.project={self.name}"
        for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
            proc = _run(["docker", *kind, "-q", "--filter", label], timeout=60, check=False)
            found += [f"{kind[0]} {x}" for x in proc.stdout.split()]
        return found


def _members(project: Project, service: str) -> dict[str, str]:
    proc = project.exec(service, "meshlb", "members", "--format", "json", timeout=30, check=False)
    if proc.returncode != 0:
        return {}
    return {m["name"]: m["status"] for m in json.loads(proc.stdout)["members"]}


def _wait_converged(project: Project) -> None:
    deadline = time.monotonic() + CONVERGE_S
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = _members(project, "mix1")
        if all(seen.get(m) == "alive" for m in MIXES):
            return
        time.sleep(1)
    raise AssertionError(f"mix1 does not see {MIXES} alive within {CONVERGE_S} s: {seen}")


def _answers(project: Project, vip: str) -> list[str]:
    """Up to REQUESTS_PER_VIP requests from the client, each a new connection (so a new
    source port, hashed anew by ECMP and Maglev); stops once every backend has answered."""
    script = (
        'seen=""; i=0; '
        f'while [ "$i" -lt {REQUESTS_PER_VIP} ]; do i=$((i + 1)); '
        f'  r=$(curl -s -m 3 http://{vip}/) || r="FAIL"; echo "$r"; '
        '  case " $seen " in *" $r "*) ;; *) seen="$seen $r";; esac; '
        f'  n=0; for m in {" ".join(BACKENDS)}; do case " $seen " in *" $m "*) n=$((n + 1));; esac; done; '
        f'  [ "$n" -eq {len(BACKENDS)} ] && break; '
        "done"
    )
    return project.exec("client", "sh", "-c", script, timeout=REQUESTS_PER_VIP * 4 + 30).stdout.split()


def test_compose_lab_balances_over_every_mix(capsys):
    timings: dict[str, float] = {}
    engine = Engine()
    project: Project | None = None

    def phase(name: str, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[name] = round(time.monotonic() - t0, 1)

    try:
        phase("engine", engine.ensure)
        phase("base image + wheels", _run, ["bash", str(REPO / "scripts" / "docker-base.sh")], timeout=600)
        dist = REPO / "build" / "compose-dist"
        shutil.rmtree(dist, ignore_errors=True)  # the image installs the one wheel of this tree
        phase("wheel", _run, [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
              timeout=600)
        project = Project(f"meshlb-test-{os.getpid()}")
        try:
            phase("build", project, "build", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", timeout=600)
            phase("up", project, "up", "-d", "--no-build")
            phase("converge", _wait_converged, project)

            answered: dict[str, list[str]] = {}
            for vip in VIPS:
                answered[vip] = phase(f"requests {vip}", _answers, project, vip)
            for vip, mode in VIPS.items():
                missing = set(BACKENDS) - set(answered[vip])
                assert not missing and "FAIL" not in answered[vip], (
                    f"{mode} VIP {vip}: {missing} never answered in {len(answered[vip])} requests: {answered[vip]}"
                )
            # the real servers, as every mix sees them: healthy backends of both VIPs
            for m in MIXES:
                servers = json.loads(project.exec(m, "meshlb", "members", "--format", "json").stdout)["servers"]
                assert {(s["name"], s["health"]) for s in servers} == {("198.18.0.21:80", "ok"),
                                                                        ("198.18.0.22:80", "ok")}, servers

            # every mix read closes of its VIP flows from the cgroup's sock_ops hook too
            # (the entrypoint mounts cgroup v2 where Docker did not)
            for m in MIXES:
                tracer = json.loads(project.exec(m, "meshlb", "stats", "--format", "json").stdout)["tracer"]
                assert tracer["sockops"] > 0, f"{m}: {tracer}"

            # the path: client -> router (one next hop) -> ECMP over the three mixes
            route = project.exec("client", "ip", "route", "get", "198.19.0.1").stdout
            assert "via 198.18.0.3" in route, route
            ecmp = project.exec("router", "ip", "route", "show", "198.19.0.1").stdout
            assert all(f"via {a}" in ecmp for a in ("198.18.0.11", "198.18.0.12", "198.18.0.13")), ecmp

            # the human view: the table, from another mix than the one polled above
            table = project.exec("mix2", "meshlb", "members").stdout
            status = {}
            for line in table.splitlines():
                m = re.match(r"^(mix\d+)\s+(?:\*\s+)?\S+\s+(\S+)", line)
                if m:
                    status[m.group(1)] = m.group(2)
            assert status == {m: "alive" for m in MIXES}, f"`meshlb members` in mix2:\n{table}"
        except BaseException as exc:
            logs = project.logs()
            if isinstance(exc, (AssertionError, subprocess.TimeoutExpired)):
                raise AssertionError(f"{exc}\n\n--- compose logs ({project.name})\n{logs}") from exc
            raise
        finally:
            phase("down", project.down)
        leftovers = project.leftovers()
        assert not leftovers, f"`down -v` left {leftovers}"
    finally:
        phase("stop engine", engine.stop)
        with capsys.disabled():
            print(f"\ncompose lab timings (s): {timings}")
