"""meshlb.preflight without a kernel: each failure's one line, and where a verifier log
goes. (The same failures end to end, against the real kernel and libbpf:
tests/reliability/test_start_failures.py.)"""
from __future__ import annotations

import errno

import pytest

from meshlb import preflight
from meshlb.dataplane.libbpf import (
    BpfError,
    KernelBtfError,
    LibbpfNotFound,
    ObjectOpenError,
    VerifierError,
)

ALL = (1 << 12) | (1 << 38) | (1 << 39)


def status(capeff: int) -> str:
    return f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{capeff:016x}\n"


def test_capabilities():
    assert preflight.missing_capabilities(status(ALL)) == []
    assert preflight.missing_capabilities(status(ALL & ~(1 << 38))) == ["CAP_PERFMON"]
    assert preflight.missing_capabilities(status(0)) == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]


def test_sys_admin_stands_for_bpf_and_perfmon():
    """What the kernel's bpf_capable() and perfmon_capable() accept; Docker 20.10, which
    knows neither name, grants CAP_SYS_ADMIN (compose/docker-compose.yml)."""
    assert preflight.missing_capabilities(status((1 << 12) | (1 << 21))) == []
    assert preflight.missing_capabilities(status(1 << 21)) == ["CAP_NET_ADMIN"]


def test_objects(tmp_path):
    with pytest.raises(preflight.StartError, match="no BPF object at .*/absent.bpf.o: .*make"):
        preflight.check_objects([tmp_path / "absent.bpf.o"])
    text = tmp_path / "text.bpf.o"
    text.write_text("placeholder\n")
    with pytest.raises(preflight.StartError, match="not a BPF object"):
        preflight.check_objects([text])


def test_no_btf(tmp_path):
    with pytest.raises(preflight.StartError, match="CONFIG_DEBUG_INFO_BTF"):
        preflight.check_kernel_btf(tmp_path / "vmlinux")


def test_verifier_log_goes_to_a_file_the_line_names(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGS_DIRECTORY", str(tmp_path / "logs"))
    log = "0: R1=ctx() R10=fp0\n0: (79) r0 = *(u64 *)(r10 +0)\ninvalid read from stack R10 off=0 size=8\n" \
          "processed 1 insns (limit 1000000)\n"
    exc = VerifierError(errno.EACCES, "load", log, program="meshlb_balancer", object_path="/x/balancer.bpf.o",
                        libbpf_output="libbpf: prog 'meshlb_balancer': failed to load: -13\n")
    line = preflight.explain(exc)
    path = tmp_path / "logs" / "verifier-balancer-meshlb_balancer.log"
    assert f"full log in {path}" in line
    assert "'meshlb_balancer'" in line and "/x/balancer.bpf.o" in line and "EACCES" in line
    assert "invalid read from stack R10 off=0 size=8" in line  # the verifier's last word, not "processed"
    assert "\n" not in line
    text = path.read_text()
    assert log in text and "failed to load: -13" in text


def test_log_dir_falls_back_when_it_cannot_write(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("LOGS_DIRECTORY", str(blocked / "sub"))  # under a file: cannot be made
    monkeypatch.setattr(preflight, "LOG_DIR", blocked / "also")
    assert preflight.log_dir() == preflight.Path(preflight.tempfile.gettempdir())


@pytest.mark.parametrize("exc, words", [
    (LibbpfNotFound("libbpf.so.1", "cannot open shared object file"), ["libbpf", "apt install libbpf1"]),
    (ObjectOpenError(4001, "/x/tracer.bpf.o", "elf: bad"), ["cannot open the BPF object /x/tracer.bpf.o", "elf: bad"]),
    (ObjectOpenError(errno.ENOENT, "/nonexistent/tracer.bpf.o"), ["no BPF object at /nonexistent/tracer.bpf.o"]),
    (KernelBtfError(errno.ESRCH, "load"), ["no BTF", "CONFIG_DEBUG_INFO_BTF"]),
    (BpfError(errno.EPERM, "bpf_link_create(xdp)"), ["refused", "CAP_BPF"]),
    (BpfError(errno.EBUSY, "bpf_xdp_attach(eth0)"), ["bpf_xdp_attach(eth0)", "EBUSY"]),
])
def test_one_line_per_failure(exc, words):
    line = preflight.explain(exc)
    assert "\n" not in line
    for w in words:
        assert w in line, line
