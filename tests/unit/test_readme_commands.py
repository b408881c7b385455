"""The README's first commands work for root as they are and for a user with sudo: they
do not start with sudo, and the scripts they run hand themselves to sudo when not root
(here a sudo on PATH that records how it was called, run as uid nobody)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def first_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_first_lines():
    demo, tests, host = first_commands()
    assert demo == "bash scripts/demo.sh"
    assert tests == "bash .ci/run"
    assert "pip install ." in host and "contrib/systemd/meshlb.service" in host and "systemctl enable" in host
    assert not demo.startswith("sudo") and not tests.startswith("sudo")


@pytest.mark.privileged
@pytest.mark.parametrize("script", ["scripts/demo.sh", ".ci/run", "scripts/install-deps.sh"])
def test_a_user_gets_the_script_through_sudo(script):
    d = Path(tempfile.mkdtemp(prefix="mlsudo"))
    try:
        os.chmod(d, 0o777)
        record = d / "argv"
        fake = d / "sudo"
        fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit 42\n')
        fake.chmod(0o755)
        tree = d / "tree"  # a copy nobody can read (the checkout may sit in root's home)
        (tree / Path(script).parent).mkdir(parents=True)
        shutil.copy(REPO / script, tree / script)
        for p in [tree, *tree.rglob("*")]:
            p.chmod(0o755)
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", script],
                             cwd=tree, env={"PATH": f"{d}:/usr/bin:/bin"}, capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 42, res.stderr  # what sudo returned: nothing ran before it
        assert record.read_text().splitlines() == ["--", "bash", script]
    finally:
        shutil.rmtree(d, ignore_errors=True)
