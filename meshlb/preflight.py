"""Why the agent cannot start, in one line each.

Two halves. ``check_*`` run before the agent touches the kernel and raise
:class:`StartError` for what a host lacks: privileges, the kernel's BTF, libbpf, the
compiled BPF objects. :func:`explain` turns a failure the data plane raises while the
agent starts (a program the verifier refused, an object libbpf cannot parse, ...) into
the same kind of line; a verifier log is too long for one line, so it goes to a file
the line names.

Every line says what is wrong and what to do about it; the command line prints it and
exits non-zero, without a traceback.
"""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from meshlb.dataplane.libbpf import (
    BpfError,
    BpfObject,
    KernelBtfError,
    LibbpfNotFound,
    ObjectOpenError,
    VerifierError,
)
from meshlb.dataplane.libbpf_ffi import lib

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
LOG_DIR = Path("/var/log/meshlb")

# capability numbers (linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
# what the agent needs, and why (docs/operations.md, contrib/systemd/meshlb.service):
NEEDED_CAPS = {
    "CAP_BPF": CAP_BPF,  # bpf(2): load programs, create and pin maps
    "CAP_NET_ADMIN": CAP_NET_ADMIN,  # XDP and sock_ops programs, addresses on lo, sysctls, ethtool
    "CAP_PERFMON": CAP_PERFMON,  # the tracer's tp_btf programs
}

_BUILD_HINT = "install a wheel (`pip install` builds one, compiling the data plane), or run `make` in the checkout"


class StartError(Exception):
    """The agent cannot start here; the message is one line saying why and what to do."""


# --- checks before the agent starts -------------------------------------------------


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise StartError(
            "must run as root: it loads BPF programs, attaches XDP and writes under /sys/fs/bpf and "
            "/proc/sys/net (run it with sudo, or as the systemd unit contrib/systemd/meshlb.service)")
    missing = missing_capabilities()
    if missing:
        raise StartError(
            f"running as root without {', '.join(missing)} (a container or a unit that drops them?): "
            f"the agent needs {', '.join(NEEDED_CAPS)} (CAP_SYS_ADMIN stands for the first and the last)")


def missing_capabilities(status: str | None = None) -> list[str]:
    """Names of the needed capabilities absent from this process's effective set.
    CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON, as the kernel counts it (and as
    kernels before 5.8, which have neither, need it; a container engine that does not
    know the two new names grants it instead)."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return []  # no /proc: the kernel will say what it refuses
    eff = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:")), None)
    if eff is None:
        return []
    sys_admin = bool(eff >> CAP_SYS_ADMIN & 1)
    return [name for name, bit in NEEDED_CAPS.items()
            if not eff >> bit & 1 and not (sys_admin and bit in (CAP_BPF, CAP_PERFMON))]


def check_kernel_btf(path: Path = VMLINUX_BTF) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise StartError(
            f"this kernel exposes no BTF ({path} is missing): the data plane's programs find kernel "
            "types through it (CO-RE); boot a kernel built with CONFIG_DEBUG_INFO_BTF=y, as most "
            "distributions' kernels are") from None
    except OSError as exc:
        raise StartError(f"cannot read the kernel's BTF ({path}): {exc.strerror}") from None


def check_libbpf() -> None:
    try:
        lib()
    except LibbpfNotFound as exc:
        raise StartError(explain(exc)) from None


def check_objects(paths: Iterable[str | os.PathLike]) -> None:
    for path in paths:
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError:
            raise StartError(f"no BPF object at {path}: this installation lacks the compiled data plane; "
                             f"{_BUILD_HINT}") from None
        except OSError as exc:
            raise StartError(f"cannot read the BPF object {path}: {exc.strerror}; reinstall meshlb") from None
        if magic != b"\x7fELF":
            raise StartError(f"{path} is not a BPF object (no ELF header): reinstall meshlb, or run `make` "
                             "in the checkout")
        # libbpf parses the whole ELF on open, touching nothing in the kernel: a damaged
        # object is found here, not halfway through the start
        try:
            BpfObject.open(path).close()
        except BpfError as exc:
            raise StartError(explain(exc)) from None


def agent_objects() -> list[Path]:
    """The BPF objects the agent loads, where this installation keeps them."""
    from meshlb.dataplane.balancer import OBJECT_PATH  # noqa: PLC0415
    from meshlb.dataplane.tracer import TRACER_OBJECT  # noqa: PLC0415

    return [OBJECT_PATH, TRACER_OBJECT]


def check_host() -> None:
    """Everything that can be known about this host before the agent starts, cheapest first."""
    check_kernel_btf()
    check_libbpf()
    check_objects(agent_objects())


# --- failures while the agent starts --------------------------------------------------


def log_dir() -> Path:
    """Where a verifier log goes: the unit's LogsDirectory= (systemd passes it as
    $LOGS_DIRECTORY), else /var/log/meshlb, else the temporary directory."""
    env = os.environ.get("LOGS_DIRECTORY", "").split(":")[0]
    for candidate in (env, str(LOG_DIR)):
        if not candidate:
            continue
        try:
            os.makedirs(candidate, mode=0o755, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK | os.X_OK):
            return Path(candidate)
    return Path(tempfile.gettempdir())


def explain(exc: BaseException) -> str:
    """One line for a failure of the data plane at start."""
    if isinstance(exc, VerifierError):
        try:
            where = f"full log in {exc.save_log(log_dir())}"
        except OSError as err:
            where = f"the log could not be saved ({err.strerror}); run with log_level = \"debug\" to see it"
        last = exc.summary()
        return (f"the kernel's verifier refused program {exc.program!r} of {exc.object_path}"
                f" [{errno.errorcode.get(exc.errno, exc.errno)}]" + (f": {last}" if last else "")
                + f"; {where}. The kernel may be older than meshlb needs (docs/operations.md) or the "
                "object damaged: reinstall, or report it with the log")
    if isinstance(exc, LibbpfNotFound):
        return (f"cannot load the system's libbpf ({exc.path}: {exc.reason}): install libbpf 1.x "
                "(Debian/Ubuntu: apt install libbpf1; Fedora/RHEL: dnf install libbpf)")
    if isinstance(exc, ObjectOpenError):
        if exc.errno == errno.ENOENT and not os.path.exists(exc.path):
            return f"no BPF object at {exc.path}: this installation lacks the compiled data plane; {_BUILD_HINT}"
        detail = exc.detail or os.strerror(exc.errno)
        return f"cannot open the BPF object {exc.path} ({detail}): reinstall meshlb, or run `make` in the checkout"
    if isinstance(exc, KernelBtfError):
        return ("libbpf found no BTF for the running kernel: the data plane's programs find kernel types "
                "through it (CO-RE); boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if isinstance(exc, BpfError) and exc.errno == errno.EPERM:
        return f"the kernel refused a BPF operation ({exc}): the agent needs {', '.join(NEEDED_CAPS)}"
    return str(exc)
