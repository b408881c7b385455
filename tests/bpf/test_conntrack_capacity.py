"""The conntrack's stated capacity (meshlb/dataplane/capacity.py): the map made for C
flows holds C flows, however their packets spread over the CPUs, before it evicts
any; beyond it, the least recently used go first, not the flows that keep sending.

Many CPUs, simulated: with the kernel's common LRU list the number of CPUs enters
only through the free elements each CPU takes from the common list and may hold
back while another CPU evicts, at most one batch (LRU_BATCH) each. The plan reserves
a batch for every possible CPU; the flood here runs from two CPUs in turns, so both
hold batches back, the worst this host can make of it. What the test cannot have,
62 more CPUs each holding a batch, the plan's margin counts for (a 64-CPU plan is
this host's plus 62 batches: test_plan_margin_grows_by_a_batch_per_cpu). The layout
meshlb had before (BPF_F_NO_COMMON_LRU) on a 64-CPU host is simulated too: a map
whose per-CPU share is what 64 CPUs would leave of it, flooded from one CPU."""
from __future__ import annotations

import os
import shutil
import struct

import pytest

from meshlb.dataplane import capacity
from meshlb.dataplane.libbpf import BPF_MAP_TYPE_LRU_HASH, XDP_TX, Map

from .harness import PID, loaded, setup_vip
from .pkt import key_of, tcp4

CAP = 4096
LIVE = 256


def _flow_packets(n: int, first: int, flags: str) -> list[bytes]:
    """n distinct IPv4 TCP flows to the VIP: the template's source address and port
    patched in place (the balancer checks no checksum on the way in)."""
    tpl = bytearray(bytes(tcp4(flags=flags, payload=b"")))
    out = []
    for i in range(first, first + n):
        tpl[28:30] = struct.pack("!H", i >> 12)  # source 198.51.x.y: the low 16 bits
        tpl[34:36] = struct.pack("!H", 1024 + (i & 0xFFF))
        out.append(bytes(tpl))
    return out


def _keys(packets: list[bytes]):
    from scapy.layers.l2 import Ether
    return [key_of(Ether(p)) for p in packets]


def _cpus() -> tuple[int, int]:
    have = sorted(os.sched_getaffinity(0))
    assert len(have) >= 2, "the flood runs on two CPUs; this host offers one"
    return have[0], have[1]


def _flood(h, syns: list[bytes], acks: list[bytes], batch: int = 96) -> None:
    """The SYNs in batches from one CPU while the other CPU, whose list holds free
    elements back since it last set a flow up, carries the live flows' segments, as
    established connections send them (the worst two CPUs make of the common list)."""
    a, b = _cpus()
    for i in range(0, len(syns), batch):
        assert set(h.run_many(syns[i:i + batch], cpu=a)) == {XDP_TX}
        assert set(h.run_many(acks, cpu=b)) == {XDP_TX}


@pytest.mark.privileged
def test_the_stated_capacity_holds_under_a_flood_from_every_cpu(netns):
    plan = capacity.plan(CAP)
    with loaded(netns, conntrack_size=plan.max_entries) as h:
        setup_vip(h, "v4", "dr", table_backend=1)
        assert h.lb.maps["conntrack"].info()["max_entries"] == plan.max_entries
        assert h.lb.conntrack_capacity() == CAP
        live_syn, live_ack = _flow_packets(LIVE, 0, "S"), _flow_packets(LIVE, 0, "A")
        a, b = _cpus()
        # set up on both CPUs: each takes a batch of free elements from the common
        # list, and b, with one flow set up, keeps all of its batch but one
        assert set(h.run_many(live_syn[:1], cpu=b) + h.run_many(live_syn[1:], cpu=a)) == {XDP_TX}
        flood = _flow_packets(CAP - LIVE, LIVE, "S")
        _flood(h, flood, live_ack)
        # exactly the capacity inserted: nothing was evicted, live or new
        assert h.lb.conntrack_count() == CAP
        held = {bytes(k) for k, _ in h.lb.conntrack_entries()}
        assert held == {bytes(k) for k in _keys(live_syn + flood)}
        # past it the map evicts (it is not bigger than it says), the flood's idle
        # half-open entries, not the flows that keep sending
        more = _flow_packets(2 * (plan.max_entries - CAP), CAP, "S")
        _flood(h, more, live_ack)
        assert h.lb.conntrack_count() <= plan.max_entries
        held = {bytes(k) for k, _ in h.lb.conntrack_entries()}
        assert {bytes(k) for k in _keys(live_syn)} <= held


@pytest.mark.privileged
def test_the_per_cpu_layout_on_a_simulated_64_cpu_host_evicts_below_its_size(netns):
    """What BPF_F_NO_COMMON_LRU did: 262144 entries on 64 CPUs left each CPU 4096,
    and flows that one CPU receives were evicted there. Simulated on this host's CPUs
    by a map whose share per CPU is those 4096; the flood of the test above, from one
    CPU, loses flows long before the map's size."""
    cpus = capacity.possible_cpus()
    pin = f"/sys/fs/bpf/mlbcap{PID}"
    os.makedirs(pin)
    try:
        old = Map.create(BPF_MAP_TYPE_LRU_HASH, 40, 32, 4096 * cpus, name="conntrack",
                         flags=capacity.BPF_F_NO_COMMON_LRU)
        old.pin(f"{pin}/conntrack")
        old.close()
        with loaded(netns, pin_dir=pin) as h:
            h.lb.unpin()  # pinned by the load; the directory goes in the finally
            setup_vip(h, "v4", "dr", table_backend=1)
            assert h.lb.conntrack_capacity() == 4096
            syns = _flow_packets(4096 + 1024, 0, "S")
            a, _ = _cpus()
            assert set(h.run_many(syns, cpu=a)) == {XDP_TX}
            assert h.lb.conntrack_count() < 4096 + 1024 < 4096 * cpus
    finally:
        shutil.rmtree(pin, ignore_errors=True)


# ------------------------------------------------------------ the plan, unprivileged
def test_plan_reserves_what_the_cpus_may_hold_back():
    for cap in (1000, 4096, 262144, 3_000_000):
        for cpus in (1, 2, 8, 64, 512):
            p = capacity.plan(cap, cpus=cpus)
            assert capacity.capacity_of(p.max_entries, cpus) >= cap
            assert capacity.capacity_of(p.max_entries - 1, cpus) < cap  # the smallest
            assert p.memory == p.max_entries * capacity.BYTES_PER_FLOW


def test_plan_margin_grows_by_a_batch_per_cpu():
    base = capacity.plan(262144, cpus=2).max_entries
    assert capacity.plan(262144, cpus=64).max_entries == base + 62 * capacity.LRU_BATCH


def test_default_capacity_follows_cpus_within_memory():
    gib = 1 << 30
    assert capacity.plan(None, cpus=2, memory=8 * gib).capacity == capacity.MIN_FLOWS
    assert capacity.plan(None, cpus=64, memory=256 * gib).capacity == 64 * capacity.FLOWS_PER_CPU
    small = capacity.plan(0, cpus=64, memory=2 * gib).capacity
    assert small == 2 * gib // capacity.MEMORY_SHARE // capacity.BYTES_PER_FLOW
    assert capacity.plan(5000, cpus=64, memory=1).capacity == 5000  # the user's choice stands
    with pytest.raises(ValueError, match="positive"):
        capacity.plan(-3, cpus=2)


def test_an_adopted_per_cpu_map_states_its_share():
    assert capacity.capacity_of(262144, 64, capacity.BPF_F_NO_COMMON_LRU) == 4096


def test_host_readers(tmp_path):
    (tmp_path / "possible").write_text("0-3,8-11\n")
    assert capacity.possible_cpus(str(tmp_path / "possible")) == 12
    (tmp_path / "meminfo").write_text("MemFree: 1 kB\nMemTotal:  2048 kB\n")
    assert capacity.host_memory(str(tmp_path / "meminfo")) == 2 << 20
    (tmp_path / "bad").write_text("MemFree: 1 kB\n")
    with pytest.raises(ValueError, match="MemTotal"):
        capacity.host_memory(str(tmp_path / "bad"))
