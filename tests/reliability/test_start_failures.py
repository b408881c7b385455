"""`meshlb join` on a host that cannot run it: one line on stderr naming what is wrong and
what to do, a non-zero exit, no traceback, and nothing left in the kernel.

Each case breaks one thing the way it breaks on a real host, with the real kernel and
libbpf: an installation without the compiled objects or with a damaged one (a copy of
the package), no kernel BTF (the sysfs file hidden by a tmpfs in a mount namespace of
the command's own, as in a container that does not show it), no libbpf (the library
path the binding opens, $MESHLB_LIBBPF, pointed at nothing), a program the kernel's
verifier refuses (the balancer object with its first instruction made to read outside
the stack), not root (uid nobody), root without a needed capability (a bounding set
without CAP_PERFMON, as a container or a unit can leave it).

The command runs in a scratch network namespace holding a veth pair, so that whatever
got through would have an interface to attach to; "nothing touched" is checked there.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from meshlb.lab.netns import Namespace
from tests.bpf_elf import patch_first_insn

pytestmark = pytest.mark.privileged

PID = os.getpid()
NETNS = f"mlsf{PID}"
PIN_DIR = f"/sys/fs/bpf/meshlb/mlsf{PID}"
VIP = "198.19.78.1"
REPO = Path(__file__).resolve().parents[2]
# ldx r0 = *(u64 *)(r10 + 0): a read above the stack frame, which the verifier refuses
READ_ABOVE_STACK = bytes.fromhex("79a0000000000000")


@pytest.fixture(scope="module")
def scratch():
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    d = Path(tempfile.mkdtemp(prefix="mlsf"))
    try:
        for cmd in (["link", "add", "vsf0", "type", "veth", "peer", "name", "vsf1"],
                    ["link", "set", "vsf0", "up"], ["link", "set", "vsf1", "up"], ["link", "set", "lo", "up"],
                    ["addr", "add", "10.250.1.1/24", "dev", "vsf0"]):
            subprocess.run(["ip", "-n", NETNS, *cmd], check=True, capture_output=True)
        # readable by everyone: the not-root case reads the package copies from here
        os.chmod(d, 0o755)
        key = d / "cluster.key"
        key.write_text(os.urandom(32).hex() + "\n")
        os.chmod(key, 0o600)
        (d / "cluster.toml").write_text(
            f'[node]\nname = "sftest"\niface = "vsf0"\nbind = "10.250.1.1:7946"\nxdp_mode = "generic"\n'
            f'pin_dir = "{PIN_DIR}"\ncontrol = "{d}/agent.sock"\nmetrics = ""\n\n'
            f'[cluster]\nlabel = "sftest"\nkey_file = "{key}"\n\n'
            f'[[vips]]\naddress = "{VIP}"\nport = 80\nmode = "dr"\n')
        yield d
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        shutil.rmtree(PIN_DIR, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


def package_copy(d: Path, name: str) -> Path:
    """A copy of the meshlb package under d/name (what an installation holds)."""
    root = d / name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(REPO / "meshlb", root / "meshlb", ignore=shutil.ignore_patterns("__pycache__"))
    for p in [root, *root.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return root


def join(scratch: Path, root: Path, *, prefix: list[str] = (), python: str = sys.executable,
         env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    argv = [*prefix, python, "-m", "meshlb", "join", "--config", str(scratch / "cluster.toml")]
    full_env = {k: v for k, v in os.environ.items() if k not in ("MESHLB_LIBBPF", "LOGS_DIRECTORY")}
    full_env |= {"PYTHONPATH": str(root), **(env or {})}
    proc = Namespace(None, NETNS, "sf").popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=full_env, cwd=root, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # it got through and runs: that is the failure; stop it before asserting
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, "still running", out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def assert_one_line(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode not in (0, "still running"), (res.returncode, res.stderr[-3000:])
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"expected one line, got: {err!r}"
    assert err.startswith("meshlb join: "), err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert res.stdout == ""
    return err


def nothing_touched(scratch: Path) -> list[str]:
    problems = []
    if os.path.exists(PIN_DIR):
        problems.append(f"pin directory {PIN_DIR} exists")
    link = subprocess.run(["ip", "-n", NETNS, "-d", "link", "show", "vsf0"], capture_output=True, text=True).stdout
    if "xdp" in link:
        problems.append(f"an XDP program is attached to vsf0: {link}")
    lo = subprocess.run(["ip", "-n", NETNS, "addr", "show", "lo"], capture_output=True, text=True).stdout
    if VIP in lo:
        problems.append("the VIP was added to lo")
    if (scratch / "agent.sock").exists():
        problems.append("a control socket was created")
    return problems


@pytest.fixture
def clean(scratch):
    yield
    subprocess.run(["ip", "-n", NETNS, "link", "set", "vsf0", "xdpgeneric", "off"], capture_output=True)
    subprocess.run(["ip", "-n", NETNS, "addr", "del", f"{VIP}/32", "dev", "lo"], capture_output=True)
    shutil.rmtree(PIN_DIR, ignore_errors=True)
    (scratch / "agent.sock").unlink(missing_ok=True)


def test_missing_objects(scratch, clean):
    root = package_copy(scratch, "no-objects")
    for obj in (root / "meshlb/dataplane/bpf").glob("*.bpf.o"):
        obj.unlink()
    err = assert_one_line(join(scratch, root), "no BPF object at", str(root / "meshlb/dataplane/bpf"),
                          "make", "wheel")
    assert nothing_touched(scratch) == [], err


def test_damaged_object_is_found_before_the_kernel_is_touched(scratch, clean):
    """A tracer object cut short: the balancer (loaded first) must not get attached."""
    root = package_copy(scratch, "damaged")
    tracer = root / "meshlb/dataplane/bpf/tracer.bpf.o"
    tracer.write_bytes(tracer.read_bytes()[:1000])
    assert_one_line(join(scratch, root), "cannot open the BPF object", str(tracer), "reinstall")
    assert nothing_touched(scratch) == []


def test_unreadable_object(scratch, clean):
    """Not an ELF file at all (what a failed download or a text placeholder leaves)."""
    root = package_copy(scratch, "not-elf")
    (root / "meshlb/dataplane/bpf/balancer.bpf.o").write_text("version https://git-lfs.github.com/spec/v1\n")
    assert_one_line(join(scratch, root), "is not a BPF object", "balancer.bpf.o")
    assert nothing_touched(scratch) == []


def test_no_kernel_btf(scratch, clean):
    root = package_copy(scratch, "btf")
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none /sys/kernel/btf && exec "$@"', "sh"]
    assert_one_line(join(scratch, root, prefix=hide), "no BTF", "/sys/kernel/btf/vmlinux",
                    "CONFIG_DEBUG_INFO_BTF")
    assert nothing_touched(scratch) == []
    assert os.path.exists("/sys/kernel/btf/vmlinux")  # hidden from the command only


def test_no_libbpf(scratch, clean):
    root = package_copy(scratch, "libbpf")
    missing = "/nonexistent/libbpf.so.1"
    assert_one_line(join(scratch, root, env={"MESHLB_LIBBPF": missing}), "libbpf", missing, "apt install libbpf1")
    assert nothing_touched(scratch) == []


def test_verifier_rejection_names_a_file_with_the_whole_log(scratch, clean):
    root = package_copy(scratch, "verifier")
    obj = root / "meshlb/dataplane/bpf/balancer.bpf.o"
    patch_first_insn(obj, "xdp", READ_ABOVE_STACK)
    logs = scratch / "logs"
    err = assert_one_line(join(scratch, root, env={"LOGS_DIRECTORY": str(logs)}),
                          "verifier refused program", str(obj), "invalid read from stack", "full log in")
    (logfile,) = logs.iterdir()
    assert str(logfile) in err
    text = logfile.read_text()
    assert "invalid read from stack" in text
    assert "processed" in text or "0: (79)" in text  # the verifier's own log, not the one line
    assert nothing_touched(scratch) == []


def _python_for_nobody() -> str:
    """An interpreter uid nobody may run (sys.executable may live in root's home)."""
    for py in (sys.executable, "/usr/bin/python3"):
        ok = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c",
                             "import sys; sys.exit(sys.version_info < (3, 11))"], capture_output=True)
        if ok.returncode == 0:
            return py
    pytest.fail("no Python >= 3.11 that uid nobody can run")


def test_not_root(scratch, clean):
    root = package_copy(scratch, "notroot")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    err = assert_one_line(join(scratch, root, prefix=nobody, python=_python_for_nobody()),
                          "must run as root", "sudo")
    assert "meshlb.service" in err
    assert nothing_touched(scratch) == []


def test_root_without_a_needed_capability(scratch, clean):
    root = package_copy(scratch, "caps")
    bounded = ["setpriv", "--bounding-set", "-all,+bpf,+net_admin", "--inh-caps", "-all"]
    assert_one_line(join(scratch, root, prefix=bounded), "without CAP_PERFMON")
    assert nothing_touched(scratch) == []
