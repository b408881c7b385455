"""Timings and limits of the membership protocol, one named knob per idea.

Three presets mirror memberlist's: ``lan()`` (the default, a data-centre LAN),
``wan()`` (higher latency, lossier paths) and ``local()`` (loopback / one host).

How the LAN defaults were chosen (the simulator's goals at N=100..200, 1-5% loss):

* crash -> first suspicion: a crashed member is probed by *someone* within about one
  probe interval (each of N-1 members probes it once per round of N-1 intervals), and
  the prober suspects at the end of its interval; fresh news is forwarded after
  ``update_batch_delay`` rather than at the next gossip round. With a 1 s interval the
  p50 came out at 1.5-2.3 s depending on the seed, too close to the 2 s goal, hence 0.8 s.
* crash -> dead: suspicion lasts ``alpha * log10(N) * probe_interval`` once ``alpha - 2``
  independent confirmations arrive; alpha=3 gives 4.8 s at N=100. Without
  confirmations (a lone false suspicion) it lasts ``beta`` times that (~29 s), which is
  what keeps false deaths at zero under 5% loss: the refutation has time to spread.
* eviction latency: gossip every 200 ms to 4 members, and a fresh eviction is forwarded
  after only ``eviction_batch_delay`` instead of waiting for the next gossip round, so an
  epidemic of fanout 4 covers 100 members in a handful of LAN round trips. What gossip
  still misses is repaired by the eviction digest every ``eviction_sync_interval``.
* idle traffic: one ping + one ack per probe interval (~80 B each sealed), no gossip
  when the queue is empty, and push-pull every 30 s scaled by ``log2(N/32)`` beyond 32
  members: 320-340 B/s per member at N=200, against a budget of 490.

Measured with ``meshlb sim`` (N=100, 1% loss, 10 crashes, seeds 1-3): suspect p50
1.23/1.37/1.88 s, dead p50 5.9/6.1/6.7 s, eviction p99 0.15 s, no false death; N=100 at
5% loss: no false death; N=200 idle: 322-342 B/s per member.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["ProtocolConfig", "preset", "push_pull_scale", "retransmit_limit", "suspicion_bounds", "tunable"]

_T = TypeVar("_T", int, float)


def tunable(default: _T) -> _T:
    """A knob operators may override on top of a preset (the cluster file's
    [cluster.timings]); the fields declared without it are internal bounds."""
    return dataclasses.field(default=default, metadata={"tunable": True})


@dataclass(frozen=True)
class ProtocolConfig:
    # Failure detection.
    probe_interval: float = tunable(0.8)
    probe_timeout: float = tunable(0.4)
    indirect_checks: int = tunable(3)
    # Lifeguard suspicion: min = alpha*log10(N)*probe_interval, max = beta*min.
    suspicion_mult: float = tunable(3.0)  # alpha
    suspicion_max_timeout_mult: float = tunable(6.0)  # beta
    awareness_max_multiplier: int = tunable(8)

    # Dissemination.
    retransmit_mult: int = tunable(4)
    gossip_interval: float = tunable(0.2)
    gossip_nodes: int = tunable(4)
    gossip_max_datagrams: int = tunable(16)  # per target and round, while the queue has news
    # Delay before fresh membership news is forwarded (see eviction_batch_delay).
    update_batch_delay: float = 0.02
    broadcast_queue_max: int = 4096

    # Anti-entropy.
    push_pull_interval: float = tunable(30.0)
    join_retry_interval: float = 1.0
    # When joining through GROUP every member hears the announcement; each answers with
    # probability min(1, group_join_replies / N) so a big cluster is not stampeded.
    group_join_replies: int = 3

    # An authenticated datagram from a member we do not know means our view has a hole
    # (an alive that gossip did not bring us: rare, but likely somewhere in a big join
    # burst). If it is still unknown after this long, pull full state from a member;
    # at most one such pull per this interval.
    unknown_sender_grace: float = 5.0

    # After a partition both sides hold the other dead and nobody probes the dead. This
    # often we push-pull with a random dead member (or, with none left to try, with a
    # configured peer that is not a live member), which is how the halves find each
    # other again. Nothing is sent while every member and peer is alive.
    reconnect_interval: float = 10.0

    # Dead and left members are remembered (and still gossiped about) this long.
    dead_reap_interval: float = tunable(30.0)

    # Evictions.
    eviction_retransmit_mult: int = tunable(4)
    eviction_batch_delay: float = 0.01
    eviction_buffer_max: int = 8192  # recent events kept to answer repairs
    eviction_buffer_ttl: float = 120.0
    eviction_repair_max: int = 512  # events sent back for one digest
    eviction_gap_timeout: float = 60.0  # a hole this old will not be repaired anymore
    eviction_digest_recent: int = 32  # ids above the contiguous mark listed per origin
    eviction_origins_max: int = 4096
    # While evictions are flowing, send our eviction digest to one random member this
    # often, so an eviction that gossip missed (rare, but not impossible under loss)
    # is repaired in seconds rather than at the next push-pull. Idle: nothing sent.
    eviction_sync_interval: float = 5.0
    # In a gossip round that reaches every member (a cluster no larger than
    # gossip_nodes + 1), send each eviction in that round only, not in as many rounds
    # as the retransmit budget allows: one copy per member instead of several. A
    # lost copy waits for the digest repair (seconds) instead of the next round.
    eviction_once_to_all: bool = True

    # Bounds on per-probe state.
    pending_probes_max: int = 1024

    max_datagram: int = tunable(1400)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(v, bool):
                    raise ValueError(f"ProtocolConfig.{f.name} must be true or false, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ProtocolConfig.{f.name} must be a finite non-negative number, got {v!r}")
        if self.probe_interval <= 0 or self.gossip_interval <= 0 or self.push_pull_interval <= 0:
            raise ValueError("probe_interval, gossip_interval and push_pull_interval must be > 0")
        if self.probe_timeout <= 0 or self.probe_timeout > self.probe_interval:
            raise ValueError("probe_timeout must be in (0, probe_interval]")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion_mult and suspicion_max_timeout_mult must be >= 1")
        if self.awareness_max_multiplier < 1:
            raise ValueError("awareness_max_multiplier must be >= 1")
        if self.gossip_max_datagrams < 1:
            raise ValueError("gossip_max_datagrams must be >= 1")
        if self.retransmit_mult < 1 or self.eviction_retransmit_mult < 1:
            raise ValueError("retransmit multipliers must be >= 1")
        if self.max_datagram < 512:
            raise ValueError("max_datagram must be at least 512")

    @classmethod
    def lan(cls, **overrides: object) -> ProtocolConfig:
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def wan(cls, **overrides: object) -> ProtocolConfig:
        base: dict[str, object] = dict(
            probe_interval=5.0,
            probe_timeout=3.0,
            suspicion_mult=6.0,
            retransmit_mult=4,
            gossip_interval=0.5,
            gossip_nodes=4,
            push_pull_interval=60.0,
            eviction_batch_delay=0.05,
            dead_reap_interval=60.0,
        )
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def local(cls, **overrides: object) -> ProtocolConfig:
        base: dict[str, object] = dict(
            probe_interval=1.0,
            probe_timeout=0.2,
            suspicion_mult=3.0,
            retransmit_mult=2,
            gossip_interval=0.1,
            gossip_nodes=3,
            push_pull_interval=15.0,
            eviction_batch_delay=0.005,
            dead_reap_interval=15.0,
        )
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def preset(cls, name: str, **overrides: object) -> ProtocolConfig:
        try:
            factory = {"lan": cls.lan, "wan": cls.wan, "local": cls.local}[name]
        except KeyError:
            raise ValueError(f"unknown protocol preset {name!r} (lan, wan, local)") from None
        return factory(**overrides)


def retransmit_limit(mult: int, n: int) -> int:
    """How many times one update is sent by one member: mult * ceil(log10(N+1)).

    The log grows just fast enough for an epidemic to reach everyone with high
    probability while keeping per-update cost O(log N).
    """
    return mult * max(1, math.ceil(math.log10(n + 1)))


def suspicion_bounds(alpha: float, beta: float, n: int, probe_interval: float) -> tuple[float, float]:
    """(min, max) suspicion timeout for a cluster of n members (Lifeguard)."""
    node_scale = max(1.0, math.log10(max(1, n)))
    lo = alpha * node_scale * probe_interval
    return lo, beta * lo


def push_pull_scale(interval: float, n: int) -> float:
    """Push-pull interval grown logarithmically past 32 members (memberlist's rule),
    so full-state exchange costs O(log N) per member instead of O(N)."""
    threshold = 32
    if n <= threshold:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(threshold)) + 1.0
    return interval * multiplier


def preset(name: str, **overrides: object) -> ProtocolConfig:
    """ProtocolConfig for a preset name: "lan", "wan" or "local"."""
    return ProtocolConfig.preset(name, **overrides)
