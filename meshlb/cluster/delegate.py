"""What the SWIM engine (swim.py) and a payload riding on it see of each other.

The engine does membership and failure detection and knows nothing of what else its
members tell each other. A payload (the eviction dissemination of eviction_gossip.py)
plugs in as a :class:`Delegate`, as an application plugs into memberlist: it says which
message types it handles, what it adds to a push-pull or join, what it does on its own
timer and when a member comes back. It acts through the :class:`Host` the engine hands
it: send, queue a broadcast on the engine's transmit-limited queue (one queue for
both, so a datagram's room goes to the least-sent updates whatever their kind), and
read the few facts of the membership view it needs.

Both are structural (``typing.Protocol``): neither side imports the other's module.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

from .messages import MemberMeta, Message
from .protocol_config import ProtocolConfig

__all__ = ["Address", "Delegate", "Delegates", "Destination", "GROUP", "Handler", "Host", "NoDelegate"]

Address = tuple[str, int]


class _Group:
    """Destination meaning "the multicast/broadcast group, if the transport has one"."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "GROUP"

    def __reduce__(self) -> str:
        return "GROUP"


GROUP = _Group()
Destination = Address | _Group

# handler(now, message, sender name, source address)
Handler = Callable[[float, Any, str, Address], None]

EventT = TypeVar("EventT")
EventT_co = TypeVar("EventT_co", covariant=True)
EventT_contra = TypeVar("EventT_contra", contravariant=True)


class Host(Protocol[EventT_contra]):
    """The engine, as a payload sees it."""

    @property
    def name(self) -> str:
        """This member's name."""
        ...

    @property
    def config(self) -> ProtocolConfig: ...

    @property
    def rng(self) -> random.Random:
        """The engine's randomness: one seeded source keeps a simulation reproducible."""
        ...

    @property
    def counters(self) -> Counter[str]:
        """The engine's counters (its ``stats``): a payload adds its own."""
        ...

    @property
    def joined(self) -> bool: ...

    @property
    def left(self) -> bool: ...

    @property
    def has_group(self) -> bool:
        """The transport has a multicast/broadcast group (:data:`GROUP` reaches it)."""
        ...

    @property
    def capacity(self) -> int:
        """Bytes of encoded messages that fit in one datagram."""
        ...

    def encode(self, message: Message) -> bytes: ...

    def broadcast(self, key: Hashable, data: bytes, mult: int) -> None:
        """Queue ``data`` for gossip under ``key`` (a later broadcast with the same key
        replaces it) with retransmit budget ``mult * log(N+1)``. Keys must not collide
        with the engine's own (``("m", name)``)."""
        ...

    def expedite(self, now: float, delay: float) -> None:
        """Have a gossip round go out ``delay`` from ``now`` rather than at the next
        regular one (for fresh news)."""
        ...

    def broadcast_transmits(self, key: Hashable) -> int | None:
        """How often the broadcast under ``key`` went out; None once it left the queue
        (sent as often as it should be, or pushed out of a full queue)."""
        ...

    def send(self, dest: Destination, messages: list[bytes]) -> int:
        """Seal ``messages`` into datagrams to ``dest`` (a known member, a configured
        peer, a join's source, or :data:`GROUP`); the number of datagrams, 0 if refused."""
        ...

    def reply_dest(self, sender: str, source: Address) -> Address | None:
        """Where an answer to a message from ``sender`` at ``source`` may go, if anywhere."""
        ...

    def live_count(self) -> int:
        """Alive or suspect members, this one included."""
        ...

    def live_metas(self) -> Iterator[MemberMeta]:
        """The metadata of the other alive or suspect members."""
        ...

    def random_peer(self) -> Address | None:
        """The address of one alive member other than this one, chosen at random."""
        ...

    def emit(self, event: EventT_contra) -> None:
        """Deliver ``event`` to the owner, in order with the engine's own events."""
        ...


class Delegate(Protocol[EventT_co]):
    """A payload, as the engine sees it. Every method is called by the engine only."""

    def attach(self, host: Host[EventT_co], now: float) -> None:
        """Once, while the engine is being built: the payload keeps ``host`` and may
        draw the phases of its timers from ``host.rng``."""
        ...

    def handlers(self) -> Mapping[type, Handler]:
        """The message types this payload handles, and how."""
        ...

    def local_state(self, now: float, *, join: bool, reply: bool) -> list[bytes]:
        """Encoded messages to send along with a push-pull (``join``: a join or a
        reconnection; ``reply``: the answer to one)."""
        ...

    def joining(self, now: float) -> None:
        """This member starts joining a cluster."""
        ...

    def member_back(self, address: Address, now: float) -> None:
        """The member at ``address`` and this one could not hear each other for a
        while: it came back from suspicion or death, or it doubted this member."""
        ...

    def final_after_full_round(self, key: Hashable) -> bool:
        """The broadcast under ``key`` needs no more transmits once a gossip round has
        taken it to every member."""
        ...

    def tick(self, now: float) -> None:
        """Run what is due (the engine calls this at every tick)."""
        ...

    def next_deadline(self) -> float: ...

    def maintain(self, now: float) -> None:
        """Housekeeping, about once per probe interval."""
        ...

    def flush(self) -> None:
        """Send what was held back to be batched: the owner is taking the datagrams."""
        ...

    def stats(self, out: Counter[str]) -> None:
        """Add gauges to the engine's ``stats``."""
        ...


class NoDelegate:
    """No payload: membership alone."""

    def attach(self, host: Host[Any], now: float) -> None:
        pass

    def handlers(self) -> Mapping[type, Handler]:
        return {}

    def local_state(self, now: float, *, join: bool, reply: bool) -> list[bytes]:
        return []

    def joining(self, now: float) -> None:
        pass

    def member_back(self, address: Address, now: float) -> None:
        pass

    def final_after_full_round(self, key: Hashable) -> bool:
        return False

    def tick(self, now: float) -> None:
        pass

    def next_deadline(self) -> float:
        return float("inf")

    def maintain(self, now: float) -> None:
        pass

    def flush(self) -> None:
        pass

    def stats(self, out: Counter[str]) -> None:
        pass


class Delegates:
    """Several payloads riding on one engine, as one delegate: each handles its own
    message types (they must not overlap), adds its own state to push-pulls, runs its
    own timer and hears every notice."""

    def __init__(self, *parts: Delegate[Any]) -> None:
        self.parts = parts

    def attach(self, host: Host[Any], now: float) -> None:
        for p in self.parts:
            p.attach(host, now)

    def handlers(self) -> Mapping[type, Handler]:
        out: dict[type, Handler] = {}
        for p in self.parts:
            for kind, handler in p.handlers().items():
                if kind in out:
                    raise ValueError(f"two payloads handle {kind.__name__}")
                out[kind] = handler
        return out

    def local_state(self, now: float, *, join: bool, reply: bool) -> list[bytes]:
        return [m for p in self.parts for m in p.local_state(now, join=join, reply=reply)]

    def joining(self, now: float) -> None:
        for p in self.parts:
            p.joining(now)

    def member_back(self, address: Address, now: float) -> None:
        for p in self.parts:
            p.member_back(address, now)

    def final_after_full_round(self, key: Hashable) -> bool:
        return any(p.final_after_full_round(key) for p in self.parts)

    def tick(self, now: float) -> None:
        for p in self.parts:
            p.tick(now)

    def next_deadline(self) -> float:
        return min((p.next_deadline() for p in self.parts), default=float("inf"))

    def maintain(self, now: float) -> None:
        for p in self.parts:
            p.maintain(now)

    def flush(self) -> None:
        for p in self.parts:
            p.flush()

    def stats(self, out: Counter[str]) -> None:
        for p in self.parts:
            p.stats(out)
