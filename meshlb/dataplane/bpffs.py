"""The BPF filesystem that pins live on.

Pins (maps and links that outlive the agent) need bpffs at /sys/fs/bpf. systemd
mounts it on most hosts; containers, minimal VMs and CI machines often start without
it, so the agent mounts it when it is missing, as Cilium's agent does.
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

ROOT = Path("/sys/fs/bpf")
log = logging.getLogger("meshlb.bpffs")


def is_mounted(root: Path = ROOT) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [str(root), "bpf"] for line in f)


def ensure_mounted(root: Path = ROOT) -> bool:
    """Mount bpffs at ``root`` unless it is there; True when this call mounted it."""
    if is_mounted(root):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    root.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"no BPF filesystem at {root} and mounting one failed: {os.strerror(err)}")
    log.info("mounted a BPF filesystem at %s", root)
    return True


def ensure_for(pin_dir: Path) -> None:
    """bpffs for a pin directory under /sys/fs/bpf (others are the caller's business)."""
    if str(pin_dir).startswith(str(ROOT) + "/"):
        ensure_mounted()
