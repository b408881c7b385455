"""How many flows the conntrack holds, and how big its maps are made for that.

The conntrack and nat_reverse maps are LRU hashes with the kernel's common LRU list
(bpf/balancer_maps.h): one table that every CPU fills, not a share per CPU. A CPU
takes free elements from the common list ``target_free`` at a time (the kernel's
LOCAL_FREE_TARGET, 128, or less for small maps) and evicts the least recently used
ones only when the common list has fewer left. So up to ``target_free`` free elements
may wait in each CPU's own list while another CPU evicts: a map of ``max_entries``
holds ``max_entries - (cpus + 1) * target_free`` flows before it evicts any, however
the flows spread over the CPUs (kernel/bpf/bpf_lru_list.c, bpf_common_lru_pop_free).
That is the capacity stated here; :func:`plan` adds the margin to the map.

With ``BPF_F_NO_COMMON_LRU`` (older meshlb) the kernel splits ``max_entries`` over the
possible CPUs and each CPU evicts from its share alone: a burst of flows whose packets
one CPU receives is held only ``max_entries / cpus`` deep. :func:`capacity_of` reports
an adopted map of that kind accordingly.
"""
from __future__ import annotations

from dataclasses import dataclass

# the kernel's LOCAL_FREE_TARGET (kernel/bpf/bpf_lru_list.c)
LRU_BATCH = 128
BPF_F_NO_COMMON_LRU = 1 << 1

# Default capacity: this many flows for every CPU the host may run, at least
# MIN_FLOWS, at most what 1/MEMORY_SHARE of its memory holds.
FLOWS_PER_CPU = 32768
MIN_FLOWS = 262144
MEMORY_SHARE = 16
MIN_CAPACITY = 1024

# Kernel memory per element (the map's memlock in /proc/<pid>/fdinfo, 6.x kernels):
# an LRU hash element is its key and value rounded to 8 bytes plus 56 bytes of list
# and hash links. conntrack: 40 + 32 + 56 + 8 (LRU node); nat_reverse: 40 + 56 + 56 + 8.
CONNTRACK_ELEMENT_BYTES = 136
NAT_REVERSE_ELEMENT_BYTES = 160
BYTES_PER_FLOW = CONNTRACK_ELEMENT_BYTES + NAT_REVERSE_ELEMENT_BYTES


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """CPUs the kernel may ever run (the count its per-CPU structures have)."""
    with open(path) as f:
        text = f.read()
    top = 0
    for part in text.strip().split(","):
        top = max(top, int(part.split("-")[-1]))
    return top + 1


def host_memory(path: str = "/proc/meminfo") -> int:
    """MemTotal in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{path}: no MemTotal line")


def lru_batch(max_entries: int, cpus: int) -> int:
    """The kernel's target_free of a common-LRU map: elements a CPU takes at once."""
    return max(1, min(max_entries // max(1, cpus) // 2, LRU_BATCH))


def capacity_of(max_entries: int, cpus: int, map_flags: int = 0) -> int:
    """Flows a map holds before it evicts any, however they spread over the CPUs."""
    if map_flags & BPF_F_NO_COMMON_LRU:
        return max_entries // max(1, cpus)
    return max(0, max_entries - (cpus + 1) * lru_batch(max_entries, cpus))


def max_entries_for(capacity: int, cpus: int) -> int:
    """The smallest map (max_entries) that holds ``capacity`` flows."""
    m = capacity + (cpus + 1) * LRU_BATCH
    # small maps have a smaller batch: give back what they do not need
    lo = capacity
    while lo < m:
        mid = (lo + m) // 2
        if capacity_of(mid, cpus) >= capacity:
            m = mid
        else:
            lo = mid + 1
    return m


def default_capacity(cpus: int, memory: int) -> int:
    """FLOWS_PER_CPU per CPU, at least MIN_FLOWS, within 1/MEMORY_SHARE of memory."""
    want = max(MIN_FLOWS, FLOWS_PER_CPU * cpus)
    fits = memory // MEMORY_SHARE // BYTES_PER_FLOW
    return max(MIN_CAPACITY, min(want, fits))


@dataclass(frozen=True)
class Plan:
    capacity: int      # flows held before any is evicted
    max_entries: int   # of conntrack and of nat_reverse
    cpus: int

    @property
    def memory(self) -> int:
        """Kernel memory of both maps, bytes."""
        return self.max_entries * BYTES_PER_FLOW


def plan(capacity: int | None = None, *, cpus: int | None = None,
         memory: int | None = None) -> Plan:
    """The conntrack of this host: ``capacity`` flows (the configuration's
    ``conntrack.max_entries``), or when None or 0 the host's default."""
    cpus = cpus or possible_cpus()
    if not capacity:
        capacity = default_capacity(cpus, memory if memory is not None else host_memory())
    if capacity < 1:
        raise ValueError(f"conntrack capacity must be positive, not {capacity}")
    return Plan(capacity, max_entries_for(capacity, cpus), cpus)


__all__ = ["Plan", "plan", "capacity_of", "max_entries_for", "default_capacity", "lru_batch",
           "possible_cpus", "host_memory", "BYTES_PER_FLOW", "LRU_BATCH"]
