"""The package build compiles the data plane.

Metadata lives in pyproject.toml; this file only adds the build step that runs `make`
(clang and bpftool, at build time only) so that every wheel carries
meshlb/dataplane/bpf/*.bpf.o, and the wheel's tags (docs/operations.md, "Installing"):
py3-none-linux_<arch>, because a BPF object is compiled for one architecture.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py
from setuptools.errors import ExecError

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
OBJECTS_DIR = "meshlb/dataplane/bpf"
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"


def _sources() -> list[Path]:
    return sorted((HERE / "bpf").glob("*.bpf.c"))


def _need(tool: str, why: str) -> str:
    found = shutil.which(tool)
    if found is None:
        # setuptools prints an ExecError as one "error: ..." line, without a traceback
        raise ExecError(f"meshlb build: {tool} not found on PATH: {why}")
    return found


class build_py_with_bpf(build_py):
    """build_py, then `make` with the objects going where this build collects files:
    the build directory for a wheel, the source tree for an editable install."""

    def run(self) -> None:
        tools = self.find_tools()  # before copying anything: a missing tool is the one line
        super().run()
        self.build_bpf(*tools)

    def _objects_dir(self) -> Path:
        if getattr(self, "editable_mode", False):
            return HERE / OBJECTS_DIR
        return Path(self.build_lib).resolve() / OBJECTS_DIR

    def find_tools(self) -> tuple[str, str, str]:
        if not _sources():
            raise ExecError(f"meshlb build: no bpf/*.bpf.c next to {HERE / 'setup.py'}: the source "
                            "distribution is incomplete")
        install = "install clang, llvm, bpftool and make (Debian/Ubuntu: apt install clang llvm bpftool make)"
        clang = _need(os.environ.get("CLANG", "clang"), f"it compiles the data plane (bpf/*.bpf.c); {install}")
        bpftool = _need(os.environ.get("BPFTOOL", "bpftool"),
                        f"it reads the kernel's types for the data plane; {install}")
        make = _need("make", f"it drives the data plane's build; {install}")
        if not os.path.exists(VMLINUX_BTF):
            raise ExecError(f"meshlb build: {VMLINUX_BTF} missing: the data plane is compiled against the "
                            "build machine's kernel types (BTF); build on a kernel with CONFIG_DEBUG_INFO_BTF=y")
        return clang, bpftool, make

    def build_bpf(self, clang: str, bpftool: str, make: str) -> None:
        sources = _sources()
        out = self._objects_dir()
        tmp = Path(self.build_temp).resolve() / "bpf"
        argv = [make, "-C", str(HERE), "-s", "all", f"OUT={out}", f"BUILD={tmp}",
                f"CLANG={clang}", f"BPFTOOL={bpftool}"]
        self.announce(f"compiling the data plane into {out}", level=2)
        done = subprocess.run(argv)
        if done.returncode != 0:
            raise ExecError(f"meshlb build: compiling the data plane failed (make exit {done.returncode}; "
                            "the compiler's messages are above)")
        missing = [s.name for s in sources if not (out / s.name.replace(".bpf.c", ".bpf.o")).is_file()]
        if missing:
            raise ExecError(f"meshlb build: make left no object for {', '.join(missing)}")

    def finalize_options(self) -> None:
        super().finalize_options()
        build = self.get_finalized_command("build")
        self.build_temp = build.build_temp

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        objects = [str(self._objects_dir() / s.name.replace(".bpf.c", ".bpf.o")) for s in _sources()]
        return [*super().get_outputs(include_bytecode), *objects]


class ArchDistribution(Distribution):
    """Compiled files for one architecture: installed into platlib (lib64 where a
    system tells the two apart), as an extension module would be."""

    def has_ext_modules(self) -> bool:
        return True


class bdist_wheel_arch(bdist_wheel):
    """Python code for any Python 3 (no extension module, so no ABI), BPF objects for
    one architecture and Linux."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", f"linux_{platform.machine()}"


setup(
    distclass=ArchDistribution,
    cmdclass={"build_py": build_py_with_bpf, "bdist_wheel": bdist_wheel_arch},
    # what an operator copies into place: the unit, the dashboard, the alerts, a cluster file
    data_files=[
        ("share/meshlb", ["cluster.toml.example"]),
        ("share/meshlb/systemd", ["contrib/systemd/meshlb.service"]),
        ("share/meshlb/grafana", ["contrib/grafana/meshlb.json"]),
        ("share/meshlb/prometheus", ["contrib/prometheus/meshlb-rules.yml"]),
    ],
)
