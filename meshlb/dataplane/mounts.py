"""What the mount table says about where the data plane can hook in.

The tracer's sock_ops program attaches to a cgroup v2 directory; the agent and the lab
find the hierarchy's root here, from the kernel's own description of this process's
mounts.
"""
from __future__ import annotations

import re


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The mount point of the first cgroup v2 hierarchy mounted whole (its root), or
    None. A sock_ops program attached there sees every socket of this cgroup
    namespace's processes."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # "36 25 0:31 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw,..."
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and tail.split()[:1] == ["cgroup2"] and len(fields) >= 5 and fields[3] == "/":
            # mountinfo escapes blanks in paths as octal
            return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
    return None
