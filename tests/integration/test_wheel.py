"""The package as a user installs it: a fresh clone (no compiled objects in it), built
with `python -m build` (an sdist, then a wheel from the sdist), the wheel installed into
a fresh venv, and a lab run from that venv with no checkout on the path: the current
directory elsewhere, PYTHONPATH unset, the agents started by the venv's Python.
Dependencies come from this machine's pip configuration (its index or mirror).

And a build on a machine without clang fails with one line and no wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.contrib.files import UNIT
from tests.contrib.test_systemd_unit import verify
from tests.integration.lab_helpers import unique_prefix

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OBJECTS = {"meshlb/dataplane/bpf/balancer.bpf.o", "meshlb/dataplane/bpf/tracer.bpf.o"}


def run(argv: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    return res


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points Python at a checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MESHLB_LIBBPF")}
    return env | extra


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="mlwheel"))
    try:
        res = run(["git", "clone", "-q", str(REPO), str(d / "src")])
        assert res.returncode == 0, res.stderr
        assert not list((d / "src/meshlb/dataplane/bpf").glob("*.bpf.o"))  # a clone has none
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def venv(path: Path) -> Path:
    res = run([sys.executable, "-m", "venv", str(path)], env=clean_env())
    assert res.returncode == 0, res.stderr
    return path / "bin" / "python"


def test_build_without_clang_fails_with_one_line(work, tmp_path):
    tools = tmp_path / "bin"  # every build tool but the compiler
    tools.mkdir()
    for name in ("make", "bpftool", "llvm-strip"):
        if shutil.which(name):
            (tools / name).symlink_to(shutil.which(name))
    out = tmp_path / "out"
    res = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(work / "src")],
              env=clean_env(PATH=str(tools)), cwd=tmp_path)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text
    assert not list(out.glob("*.whl")) if out.exists() else True
    assert "Traceback" not in text, text
    ours = [line.strip() for line in text.splitlines() if "meshlb build:" in line]
    assert len(ours) == 1, text
    assert ours[0] == ("error: meshlb build: clang not found on PATH: it compiles the data plane (bpf/*.bpf.c); "
                       "install clang, llvm, bpftool and make (Debian/Ubuntu: apt install clang llvm bpftool make)")


@pytest.mark.privileged
def test_wheel_from_a_fresh_clone_runs_a_lab_from_a_venv(work):
    # build: python -m build in a venv of its own
    builder = venv(work / "build-venv")
    res = run([str(builder), "-m", "pip", "install", "-q", "build"], env=clean_env())
    assert res.returncode == 0, res.stderr
    dist = work / "dist"
    res = run([str(builder), "-m", "build", "--outdir", str(dist), str(work / "src")], env=clean_env(), cwd=work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (sdist,) = dist.glob("meshlb-*.tar.gz")
    (wheel,) = dist.glob("meshlb-*.whl")

    root = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.removeprefix(root + "/") for n in t.getnames()}
    assert {"Makefile", "setup.py", "pyproject.toml", "bpf/balancer.bpf.c", "bpf/tracer.bpf.c", "bpf/meshlb.h",
            "contrib/systemd/meshlb.service"} <= names
    assert {f"bpf/{p.name}" for p in (REPO / "bpf").glob("*.h")} <= names
    assert not [n for n in names if n.endswith(".bpf.o")]  # sources only: the wheel compiles them

    machine = os.uname().machine
    assert wheel.name.endswith(f"-py3-none-linux_{machine}.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        members = set(z.namelist())
        assert OBJECTS <= members
        for o in OBJECTS:
            assert z.read(o)[:4] == b"\x7fELF"
        assert "Root-Is-Purelib: false" in z.read(next(n for n in members if n.endswith(".dist-info/WHEEL"))).decode()

    # install: a fresh venv, nothing of the checkout
    python = venv(work / "venv")
    res = run([str(python), "-m", "pip", "install", "-q", str(wheel)], env=clean_env())
    assert res.returncode == 0, res.stderr
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    env = clean_env()
    res = run([str(python), "-c", "import meshlb, meshlb.dataplane.balancer as b; print(meshlb.__file__); "
               "print(b.OBJECT_PATH.is_file())"], env=env, cwd=elsewhere)
    installed, has_object = res.stdout.split()
    assert installed.startswith(str(work / "venv")), installed
    assert has_object == "True"
    meshlb = work / "venv/bin/meshlb"
    assert run([str(meshlb), "--version"], env=env, cwd=elsewhere).stdout.startswith("meshlb ")
    # the operator files, where the wheel puts them
    unit = work / "venv/share/meshlb/systemd/meshlb.service"
    assert unit.read_text() == UNIT.read_text()
    for f in ("grafana/meshlb.json", "prometheus/meshlb-rules.yml", "cluster.toml.example"):
        assert (work / "venv/share/meshlb" / f).is_file(), f
    if shutil.which("systemd-analyze"):
        # the unit with its command at the venv's meshlb, as a drop-in would set it
        checked = work / "meshlb.service"
        checked.write_text(unit.read_text().replace("ExecStart=meshlb ", f"ExecStart={meshlb} "))
        res = verify(checked)
        assert res.returncode == 0 and res.stderr.strip() == "", res.stderr

    # a small lab from the venv: agents run by the venv's Python, answering requests
    prefix = unique_prefix("w")
    try:
        res = run([str(meshlb), "lab", "up", "--prefix", prefix, "--nodes", "2"], env=env, cwd=elsewhere, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        res = run([str(meshlb), "lab", "status", "--prefix", prefix, "--format", "json"], env=env, cwd=elsewhere)
        import json

        state = json.loads(res.stdout)
        for name in ("mix1", "mix2"):
            cmdline = Path(f"/proc/{state['nodes'][name]['agent_pid']}/cmdline").read_bytes().split(b"\0")
            assert cmdline[0].decode() == str(python), cmdline
            assert state["nodes"][name]["agent_running"]
        script = "for i in $(seq 1 10); do curl -s --max-time 3 http://198.19.0.1/ || echo FAIL; done"
        res = run([str(meshlb), "lab", "exec", "--prefix", prefix, "client", "--", "sh", "-c", script], env=env,
                  cwd=elsewhere, timeout=120)
        answers = [line.strip() for line in res.stdout.splitlines() if line.strip()]
        assert len(answers) == 10 and "FAIL" not in answers, res.stdout + res.stderr
        assert set(answers) <= {"mix1", "mix2"}
        res = run([str(meshlb), "lab", "exec", "--prefix", prefix, "mix1", "--", "meshlb", "members"], env=env,
                  cwd=elsewhere)
        assert "tables: all 2 alive members agree" in res.stdout, res.stdout + res.stderr
    finally:
        down = run([str(meshlb), "lab", "down", "--prefix", prefix], env=env, cwd=elsewhere, timeout=120)
        if down.returncode != 0:
            from meshlb.lab.lab import Lab

            problems = Lab.down(prefix)
            assert not problems, (down.stderr, problems)
