"""Coverage-guided fuzzing, bounded for CI (bench/fuzz_long.py runs the same engines
for longer).

Two targets:

* the gossip receive path: a plaintext body is mutated (bytes and msgpack structure),
  sealed with the cluster key so it gets past authentication, and fed to a real
  ``Node.handle_datagram``. Coverage is the set of (file, line) pairs executed in
  meshlb/cluster/, collected with sys.settrace; an input that reaches a new line
  joins the corpus. Invariants: nothing raises, the Wire never counts an
  internal error, and ``messages.decode`` of any body item is None or re-encodes to
  the same message.
* the XDP program through BPF_PROG_TEST_RUN: frames are mutated from well-formed VIP
  packets; coverage is the set of (verdict, counters moved), which is how the
  program says which path a packet took. Invariants: exactly one packet seen and one
  reason counted per run, and a frame is only forwarded (TX/REDIRECT) when its
  destination is a configured VIP and port.

atheris is not installed on this machine (and has no wheel for every Python), so the
engine is the small loop below: pick a corpus entry, apply 1-4 mutations, keep it if
it covered something new.
"""
from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from meshlb.cluster import messages as M
from meshlb.cluster.keyring import Keyring
from meshlb.cluster.node import Node
from meshlb.cluster.protocol_config import ProtocolConfig
from meshlb.cluster.wire import Drop, Wire, seal_envelope

KEY = bytes(range(1, 33))
LABEL = "fuzz"
CLUSTER_DIR = os.path.join(os.path.dirname(M.__file__), "")


# --- engine -------------------------------------------------------------------------


class Fuzzer:
    """Mutate inputs from a corpus; keep those whose coverage is new."""

    def __init__(self, seeds: list[Any], run: Callable[[Any], frozenset], mutate: Callable[[random.Random, Any, list], Any],
                 seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.run = run
        self.mutate = mutate
        self.corpus: list[Any] = []
        self.coverage: set = set()
        self.execs = 0
        for s in seeds:
            self._try(s)
        self.seed_coverage = len(self.coverage)

    def _try(self, data: Any) -> None:
        cov = self.run(data)
        self.execs += 1
        if not cov <= self.coverage:
            self.coverage |= cov
            self.corpus.append(data)

    def loop(self, *, execs: int | None = None, seconds: float | None = None) -> None:
        end = time.monotonic() + seconds if seconds else None
        n = 0
        while (execs is None or n < execs) and (end is None or time.monotonic() < end):
            data = self.rng.choice(self.corpus)
            for _ in range(self.rng.randint(1, 4)):
                data = self.mutate(self.rng, data, self.corpus)
            self._try(data)
            n += 1


def mutate_bytes(rng: random.Random, data: bytes, corpus: list) -> bytes:
    b = bytearray(data)
    op = rng.randrange(7)
    if op == 0 and b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1 and b:
        b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif op == 2:
        b[rng.randrange(len(b) + 1):rng.randrange(len(b) + 1)] = b""  # a cut (possibly empty)
    elif op == 3:
        pos = rng.randrange(len(b) + 1)
        b[pos:pos] = rng.randbytes(rng.randint(1, 8))
    elif op == 4 and len(b) > 1:
        del b[rng.randrange(len(b)):]
    elif op == 5:
        other = rng.choice(corpus)
        if isinstance(other, (bytes, bytearray)) and other:
            cut = rng.randrange(len(other))
            b = b[: rng.randrange(len(b) + 1)] + bytearray(other[cut:])
    elif op == 6 and len(b) >= 2:
        pos = rng.randrange(len(b) - 1)
        v = rng.choice([0, 1, 0xFFFF, 0x7FFF, 0x8000, rng.randrange(65536)])
        b[pos:pos + 2] = v.to_bytes(2, "big")
    return bytes(b)


# --- gossip target --------------------------------------------------------------------

_INTERESTING = [0, 1, -1, 255, 256, 65535, 65536, (1 << 63), (1 << 64) - 1, "", "x" * 200, "mix1", "\x00",
                b"", b"\x01\x02\x03\x04", b"\x00" * 16, None, True, False, 1.5, [], {}]


def _mutate_obj(rng: random.Random, v: Any, depth: int = 0) -> Any:
    if isinstance(v, list) and v and depth < 6 and rng.random() < 0.7:
        v = list(v)
        i = rng.randrange(len(v))
        op = rng.randrange(4)
        if op == 0:
            v[i] = _mutate_obj(rng, v[i], depth + 1)
        elif op == 1:
            del v[i]
        elif op == 2:
            v.insert(i, rng.choice(_INTERESTING))
        else:
            v[i] = rng.choice(_INTERESTING)
        return v
    if isinstance(v, dict) and v and rng.random() < 0.5:
        v = dict(v)
        k = rng.choice(list(v))
        v[k] = rng.choice(_INTERESTING)
        return v
    return rng.choice(_INTERESTING)


def mutate_body(rng: random.Random, data: bytes, corpus: list) -> bytes:
    """Half the time at the msgpack level (reaches the message decoders), else raw."""
    if rng.random() < 0.5:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 -- a raw-mutated body need not parse
            obj = None
        if isinstance(obj, list) and len(obj) == 4 and isinstance(obj[3], list):
            obj = list(obj)
            if obj[3] and rng.random() < 0.8:
                obj[3] = _mutate_obj(rng, obj[3])
            else:
                obj[rng.randrange(3)] = rng.choice(_INTERESTING)
            try:
                return msgpack.packb(obj, use_bin_type=True)
            except Exception:  # noqa: BLE001
                return data
    return mutate_bytes(rng, data, corpus)


def _meta() -> M.MemberMeta:
    return M.MemberMeta(vips=("198.19.0.1:80/tcp",), table_digest="abc", observations={"mix2": True})


def gossip_seeds() -> list[bytes]:
    flow = M.FlowTuple("198.18.0.2", 40000, "198.19.0.1", 80, 6)
    rec = M.MemberRecord("mix2", ("198.18.0.12", 7946), M.Status.ALIVE, 5, 1, _meta())
    msgs = [
        M.Ping(1, "target"), M.Ack(1), M.Nack(1), M.PingReq(2, "mix2", True),
        M.Alive("mix2", ("198.18.0.12", 7946), 5, 1, _meta()), M.Suspect("mix2", 5, "mix3"),
        M.Dead("mix2", 5, "mix3"), M.Left("mix2", 6), M.Eviction("mix2", 5, 1, flow),
        M.PushPull(9, False, True, False, 0, 1, (rec,)),
        M.EvictionDigest(False, (M.DigestEntry("mix2", 5, 3, (5, 7)),)),
    ]
    seeds = [msgpack.packb(["mix2", 5, i + 1, [M.encode(m)]], use_bin_type=True) for i, m in enumerate(msgs)]
    seeds.append(msgpack.packb(["mix3", 7, 1, [M.encode(m) for m in msgs[:6]]], use_bin_type=True))
    return seeds


class GossipTarget:
    """A fresh node per input would hide state bugs; one node per target keeps state
    (members learnt, suspicions) across inputs, as a long-running agent would."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wire = Wire(label=LABEL, keyring=Keyring(KEY), sender="target", epoch=1)
        self.node = Node(name="target", address=("198.18.0.11", 7946), wire=self.wire,
                         config=ProtocolConfig.lan(), rng=random.Random(1), now=self.now,
                         peers=[("198.18.0.12", 7946)])
        self.node.join(self.now)
        self.failures: list[str] = []

    def __call__(self, body: bytes) -> frozenset:
        self.now += 0.01
        datagram = seal_envelope(KEY, LABEL, body)
        lines: set = set()

        def tracer(frame, event, arg):
            f = frame.f_code.co_filename
            if f.startswith(CLUSTER_DIR):
                if event == "line":
                    lines.add((f[len(CLUSTER_DIR):], frame.f_lineno))
                return tracer
            return None

        sys.settrace(tracer)
        try:
            self.node.handle_datagram(self.now, datagram, ("198.18.0.12", 7946))
            self.node.tick(self.now)
        except Exception as exc:  # noqa: BLE001 -- the finding
            self.failures.append(f"{type(exc).__name__}: {exc} for body {body.hex()}")
        finally:
            sys.settrace(None)
        self.node.take_outgoing()
        self.node.take_events()
        if self.wire.drops.get(Drop.INTERNAL_ERROR):
            self.failures.append(f"internal_error for body {body.hex()}")
            self.wire.drops[Drop.INTERNAL_ERROR] = 0
        self._check_decode(body)
        return frozenset(lines)

    def _check_decode(self, body: bytes) -> None:
        try:
            obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001
            return
        if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[3], list)):
            return
        for item in obj[3]:
            try:
                msg = M.decode(item)
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"decode raised {type(exc).__name__}: {exc}")
                continue
            if msg is None:
                continue
            again = M.decode(msgpack.unpackb(msgpack.packb(M.encode(msg), use_bin_type=True), raw=False,
                                             strict_map_key=False))
            if again != msg:
                self.failures.append(f"round trip changed {msg!r} into {again!r}")


def run_gossip(execs: int | None = None, seconds: float | None = None, seed: int = 0) -> tuple[Fuzzer, GossipTarget]:
    target = GossipTarget()
    fz = Fuzzer(gossip_seeds(), target, mutate_body, seed=seed)
    fz.loop(execs=execs, seconds=seconds)
    return fz, target


def test_gossip_receive_path_fuzz():
    fz, target = run_gossip(execs=int(os.environ.get("MESHLB_FUZZ_EXECS", "20000")))
    print(f"FUZZ gossip: {fz.execs} execs, {len(fz.coverage)} lines covered "
          f"({fz.seed_coverage} by the seeds), corpus {len(fz.corpus)}")
    assert target.failures == [], target.failures[:5]
    assert len(fz.coverage) > fz.seed_coverage, "the mutations reached nothing the seeds had not"
    from tests.reliability.faults import record

    record("fuzz: gossip receive path", execs=fz.execs, lines_covered=len(fz.coverage),
           seed_lines=fz.seed_coverage, corpus=len(fz.corpus), failures=len(target.failures))


# --- XDP target -----------------------------------------------------------------------


class XdpTarget:
    def __init__(self, harness: Any) -> None:
        from tests.bpf.pkt import VIP4, VIP6

        self.h = harness
        self.vips = {(VIP4, 80), (VIP4, 53), (VIP6, 80), (VIP6, 53), (VIP4, 443)}
        self.failures: list[str] = []

    def __call__(self, frame: bytes) -> frozenset:
        from meshlb.dataplane.libbpf import XDP_REDIRECT, XDP_TX, BpfError

        if len(frame) < 14:
            frame = frame + bytes(14 - len(frame))
        before = self.h.counters()
        try:
            r = self.h.run(frame)
        except BpfError:
            return frozenset({("rejected by the kernel",)})
        d = self.h.delta(before)
        terminal = {k: v for k, v in d.items() if k.startswith(("pass_", "drop_")) or k in ("tx", "redirect")}
        if d.get("rx") != 1 or sum(terminal.values()) != 1:
            self.failures.append(f"counters {d} for {frame.hex()}")
        if r.retval in (XDP_TX, XDP_REDIRECT) and _dst(frame) not in self.vips:
            self.failures.append(f"forwarded a frame not for a VIP ({_dst(frame)}): {frame.hex()}")
        return frozenset({(r.retval, tuple(sorted(d)))})


def _dst(frame: bytes) -> tuple[str, int] | None:
    """Destination (address, port) of an IPv4/IPv6 TCP/UDP frame behind at most one
    VLAN tag, read independently of the BPF parser; None if it is not one."""
    import ipaddress

    off = 12
    et = frame[off:off + 2]
    if et in (b"\x81\x00", b"\x88\xa8"):
        off += 4
        et = frame[off:off + 2]
    ip = frame[off + 2:]
    try:
        if et == b"\x08\x00":
            ihl = (ip[0] & 15) * 4
            proto = ip[9]
            l4 = ip[ihl:]
            addr = str(ipaddress.IPv4Address(ip[16:20]))
        elif et == b"\x86\xdd":
            proto = ip[6]
            l4 = ip[40:]
            addr = str(ipaddress.IPv6Address(ip[24:40]))
            # a walked extension header chain (hop-by-hop, destination options)
            while proto in (0, 60):
                proto, l4 = l4[0], l4[(l4[1] + 1) * 8:]
        else:
            return None
        if proto not in (6, 17) or len(l4) < 4:
            return None
        return addr, int.from_bytes(l4[2:4], "big")
    except (IndexError, ValueError):
        return None


def xdp_seeds() -> list[bytes]:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Dot1Q, Ether

    from tests.bpf.pkt import CLIENT_MAC, MAC_A, tcp4, tcp6, udp4, udp6

    seeds = [tcp4(), tcp4(flags="S"), udp4(), tcp6(), udp6(), tcp4(dport=443, flags="S"),
             Ether(src=CLIENT_MAC, dst=MAC_A) / Dot1Q(vlan=7) / tcp4()[IP],
             Ether(src=CLIENT_MAC, dst=MAC_A) / IPv6(src="2001:db8:c::7", dst="2001:db8:f::10") / IPv6ExtHdrHopByHop()
             / tcp6()[IPv6].payload,
             Ether(src=CLIENT_MAC, dst=MAC_A) / IPv6(src="2001:db8:c::7", dst="2001:db8:f::10") / IPv6ExtHdrDestOpt()
             / tcp6()[IPv6].payload,
             Ether(src=CLIENT_MAC, dst=MAC_A) / IPv6(src="2001:db8:c::7", dst="2001:db8:f::10")
             / IPv6ExtHdrFragment() / tcp6()[IPv6].payload]
    return [bytes(s) for s in seeds]


def setup_xdp(harness: Any) -> None:
    from tests.bpf.pkt import BE_REDIR4, BE_TX4, BE_TX6, SNAT4, VIP4, VIP6

    lb = harness.lb
    ring = 13
    lb.add_vip(VIP4, 80, "tcp", "dr", vip_id=1, ring_size=ring)
    lb.add_vip(VIP4, 53, "udp", "dr", vip_id=2, ring_size=ring)
    lb.add_vip(VIP6, 80, "tcp", "dr", vip_id=3, ring_size=ring)
    lb.add_vip(VIP6, 53, "udp", "dr", vip_id=4, ring_size=ring)
    lb.add_vip(VIP4, 443, "tcp", "nat", vip_id=5, ring_size=ring)
    lb.set_backend(1, BE_TX4)
    lb.set_backend(2, BE_REDIR4)
    lb.set_backend(3, BE_TX6)
    lb.set_backend(4, "0.0.0.0", local=True)
    import socket

    lb.set_snat(socket.AF_INET, SNAT4, 1024, 65535)
    for vid, table in ((1, [1, 2, 4]), (2, [1, 2]), (3, [3, 4]), (4, [3]), (5, [1, 2])):
        lb.set_vip_table(vid, [table[i % len(table)] for i in range(ring)])


def run_xdp(harness: Any, execs: int | None = None, seconds: float | None = None, seed: int = 0) -> tuple[Fuzzer, XdpTarget]:
    setup_xdp(harness)
    target = XdpTarget(harness)
    fz = Fuzzer(xdp_seeds(), target, mutate_bytes, seed=seed)
    fz.loop(execs=execs, seconds=seconds)
    return fz, target


@pytest.mark.privileged
def test_xdp_packet_path_fuzz():
    from tests.bpf.harness import fib_netns, loaded

    with fib_netns() as env, loaded(env) as harness:
        fz, target = run_xdp(harness, execs=int(os.environ.get("MESHLB_FUZZ_EXECS", "20000")))
    print(f"FUZZ xdp: {fz.execs} execs, {len(fz.coverage)} paths covered "
          f"({fz.seed_coverage} by the seeds), corpus {len(fz.corpus)}")
    assert target.failures == [], target.failures[:5]
    assert len(fz.coverage) > fz.seed_coverage
    from tests.reliability.faults import record

    record("fuzz: XDP packet path", execs=fz.execs, paths_covered=len(fz.coverage), seed_paths=fz.seed_coverage,
           corpus=len(fz.corpus), failures=len(target.failures))
