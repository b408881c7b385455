"""Conntrack eviction records: numbering, dedupe, a recent-event buffer, and repair.

An eviction is identified by (origin, epoch, seq): seq counts 1, 2, 3... per origin and
restarts after the origin restarts, which is why the origin's start incarnation (its
epoch) is part of the id. Receipt is idempotent: each id is delivered once.

Dedupe memory is bounded per origin: a contiguous mark (every seq <= mark was seen)
plus the few seqs seen above it. A hole below a seen seq is a missed event; push-pull
carries a digest of (origin, epoch, mark, some seqs above) and the peer answers with the
events it still holds in its recent buffer. A hole nobody can fill (older than
``gap_timeout``) is given up, so the mark keeps moving and memory stays bounded.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .messages import DigestEntry, Eviction, flow_tuple_of

__all__ = ["EvictionTracker", "Receipt"]


class Receipt:
    NEW = "new"
    DUPLICATE = "duplicate"
    STALE = "stale"  # from an older epoch of its origin


@dataclass(slots=True)
class _Origin:
    epoch: int
    mark: int
    above: dict[int, float] = field(default_factory=dict)  # seq -> when seen
    gap_since: float = 0.0
    last_seen: float = 0.0


def _size(item: Eviction | bytes | tuple[bytes, ...]) -> int:
    """Evictions in one buffered item."""
    return len(item) if type(item) is tuple else 1


class EvictionTracker:
    # Seqs remembered above the mark per origin before the lowest hole is given up.
    MAX_ABOVE = 4096

    def __init__(self, *, buffer_max: int, buffer_ttl: float, gap_timeout: float, digest_recent: int,
                 repair_max: int, origins_max: int) -> None:
        self.buffer_max = buffer_max
        self.buffer_ttl = buffer_ttl
        self.gap_timeout = gap_timeout
        self.digest_recent = digest_recent
        self.repair_max = repair_max
        self.origins_max = origins_max
        self._origins: OrderedDict[str, _Origin] = OrderedDict()
        self._gappy: set[str] = set()
        # origin -> {(epoch, seq): event}; _order is the global age order for expiry.
        self._buffer: dict[str, dict[tuple[int, int], Eviction | bytes | tuple[bytes, ...]]] = {}
        self._order: deque[tuple[float, str, tuple[int, int]]] = deque()
        self._buffered = 0
        self.abandoned = 0  # seqs given up as unrepairable

    # ---- receipt ---------------------------------------------------------------------

    def receive(self, ev: Eviction, now: float) -> str:
        return self._receive(ev.origin, ev.epoch, ev.seq, ev, now)

    def receive_run(self, origin: str, epoch: int, first: int, records: list[bytes],
                    now: float) -> list[int] | None:
        """Receipt of evictions ``first`` .. ``first + len(records) - 1`` of ``origin``:
        the indices of the new ones, or None if the run is from an older epoch."""
        o = self._origins.get(origin)
        if o is not None and epoch < o.epoch:
            return None
        last = first + len(records) - 1
        if o is not None and epoch == o.epoch and first > o.mark and o.above.keys().isdisjoint(range(first, last + 1)):
            # all new: the next ones of the origin, past a hole or filling one (runs
            # sent in one round arrive newest first): one step for the run
            o.last_seen = now
            self._origins.move_to_end(origin)
            above = o.above
            if first == o.mark + 1:
                o.mark = last
                self._compact(o)
            else:
                if not above:
                    o.gap_since = now
                above.update(dict.fromkeys(range(first, last + 1), now))
                while len(above) > self.MAX_ABOVE:
                    self._give_up_lowest_hole(o, now)
            if above:
                self._gappy.add(origin)
            else:
                self._gappy.discard(origin)
            self._remember(origin, epoch, first, tuple(records), now)
            return list(range(len(records)))
        return [i for i, r in enumerate(records)
                if self._receive(origin, epoch, first + i, r, now) is Receipt.NEW]

    def _receive(self, origin: str, epoch: int, seq: int, payload: Eviction | bytes, now: float) -> str:
        o = self._origins.get(origin)
        if o is not None and seq == o.mark + 1 and epoch == o.epoch and not o.above:
            # the common case by far: the next one of its origin, no holes
            o.mark = seq
            o.last_seen = now
            self._origins.move_to_end(origin)
            self._remember(origin, epoch, seq, payload, now)
            return Receipt.NEW
        if o is None or epoch > o.epoch:
            o = _Origin(epoch, 0, last_seen=now)
            self._origins[origin] = o
            self._gappy.discard(origin)
            self._drop_origin_buffer_older(origin, epoch)
            while len(self._origins) > self.origins_max:
                old, _ = self._origins.popitem(last=False)
                self._gappy.discard(old)
        elif epoch < o.epoch:
            return Receipt.STALE
        else:
            self._origins.move_to_end(origin)
        if seq <= o.mark or seq in o.above:
            return Receipt.DUPLICATE
        o.last_seen = now
        if seq == o.mark + 1:
            o.mark = seq
            self._compact(o)
        else:
            if not o.above:
                o.gap_since = now
            o.above[seq] = now
            if len(o.above) > self.MAX_ABOVE:
                self._give_up_lowest_hole(o, now)
        if o.above:
            self._gappy.add(origin)
        else:
            self._gappy.discard(origin)
        self._remember(origin, epoch, seq, payload, now)
        return Receipt.NEW

    def _compact(self, o: _Origin) -> None:
        above = o.above
        while above and (o.mark + 1) in above:
            del above[o.mark + 1]
            o.mark += 1

    def _give_up_lowest_hole(self, o: _Origin, now: float) -> None:
        lowest = min(o.above)
        self.abandoned += lowest - o.mark - 1
        o.mark = lowest - 1
        self._compact(o)
        o.gap_since = now

    def expire(self, now: float) -> None:
        """Give up old holes and age out the recent buffer. Cost: origins with holes
        plus expired events, never all origins."""
        for name in list(self._gappy):
            o = self._origins.get(name)
            if o is None or not o.above:
                self._gappy.discard(name)
                continue
            if now - o.gap_since >= self.gap_timeout:
                self._give_up_lowest_hole(o, now)
                if not o.above:
                    self._gappy.discard(name)
        self._trim(now)

    def _trim(self, now: float) -> None:
        # the buffer's part of expire(): on every receipt of a full buffer, without
        # also walking the origins with holes
        order = self._order
        while order and (self._buffered > self.buffer_max or now - order[0][0] > self.buffer_ttl):
            _, origin, key = order.popleft()
            per = self._buffer.get(origin)
            if per is not None:
                item = per.pop(key, None)
                if item is not None:
                    self._buffered -= _size(item)
                    if not per:
                        del self._buffer[origin]

    def forget_origin(self, origin: str) -> None:
        self._origins.pop(origin, None)
        self._gappy.discard(origin)
        per = self._buffer.pop(origin, None)
        if per:
            self._buffered -= sum(_size(v) for v in per.values())

    def _drop_origin_buffer_older(self, origin: str, epoch: int) -> None:
        per = self._buffer.get(origin)
        if not per:
            return
        for key in [k for k in per if k[0] < epoch]:
            self._buffered -= _size(per.pop(key))

    def _remember(self, origin: str, epoch: int, seq: int, payload: Eviction | bytes | tuple[bytes, ...],
                  now: float) -> None:
        # payload: the Eviction, the flow record of one that came in a run, or a whole
        # run's records from seq on (records become Evictions only if a peer asks)
        per = self._buffer.get(origin)
        if per is None:
            per = self._buffer[origin] = {}
        key = (epoch, seq)
        if key not in per:
            per[key] = payload
            self._buffered += _size(payload)
            self._order.append((now, origin, key))
            if self._buffered > self.buffer_max:
                self._trim(now)

    # ---- repair ----------------------------------------------------------------------

    def digest(self, now: float) -> list[DigestEntry]:
        """What we have, for origins active within the buffer's lifetime: a peer can hold
        nothing older for us anyway, and an origin we leave out gets everything the
        peer buffered for it."""
        out = []
        horizon = now - self.buffer_ttl
        k = self.digest_recent
        for name, o in self._origins.items():
            if o.last_seen < horizon:
                continue
            recent = tuple(sorted(o.above)[:k]) if o.above else ()
            out.append(DigestEntry(name, o.epoch, o.mark, recent))
        return out

    def missing(self, entries: list[DigestEntry] | tuple[DigestEntry, ...]) -> list[Eviction]:
        """Buffered events the digest's owner lacks, oldest first, at most repair_max."""
        have = {e.origin: e for e in entries}
        out: list[Eviction] = []
        for origin, per in self._buffer.items():
            e = have.get(origin)
            for (epoch, first), item in per.items():
                # an Eviction, one flow record, or a run's records from `first` on
                items: tuple[Eviction | bytes, ...] = (item,) if isinstance(item, (Eviction, bytes)) else item
                for i, ev in enumerate(items):
                    seq = first + i
                    if e is not None:
                        if epoch < e.epoch:
                            break
                        if epoch == e.epoch and (seq <= e.contiguous or seq in e.recent):
                            continue
                    out.append(ev if isinstance(ev, Eviction) else Eviction(origin, epoch, seq, flow_tuple_of(ev)))
                    if len(out) >= self.repair_max:
                        return out
        return out

    def adopt_baseline(self, entries: list[DigestEntry] | tuple[DigestEntry, ...], now: float) -> None:
        """A member that just joined takes a peer's marks for origins it has never seen:
        evictions from before it joined concern flows it never carried."""
        for e in entries:
            if e.origin not in self._origins:
                self._origins[e.origin] = _Origin(e.epoch, e.contiguous, last_seen=now)

    def marks(self) -> list[DigestEntry]:
        """(origin, epoch, contiguous mark) of every origin: what an agent restarted on
        the same conntrack state resumes from. Seqs above a hole are left out; a peer
        offers them again, and applying an eviction twice is harmless."""
        return [DigestEntry(name, o.epoch, o.mark, ()) for name, o in self._origins.items()]

    def restore(self, entries: list[DigestEntry] | tuple[DigestEntry, ...], now: float) -> int:
        """Resume from marks saved by a previous run: the evictions above them are the
        ones published while it was down, and the next digest asks for them."""
        n = 0
        for e in entries:
            o = self._origins.get(e.origin)
            if o is None or e.epoch > o.epoch or (e.epoch == o.epoch and e.contiguous > o.mark):
                self._origins[e.origin] = _Origin(e.epoch, e.contiguous, last_seen=now)
                self._gappy.discard(e.origin)
                n += 1
        while len(self._origins) > self.origins_max:
            old, _ = self._origins.popitem(last=False)
            self._gappy.discard(old)
        return n

    # ---- introspection ---------------------------------------------------------------

    def seen(self, origin: str, epoch: int, seq: int) -> bool:
        o = self._origins.get(origin)
        if o is None or epoch < o.epoch:
            return epoch < o.epoch if o is not None else False
        if epoch > o.epoch:
            return False
        return seq <= o.mark or seq in o.above

    def mark(self, origin: str) -> int | None:
        o = self._origins.get(origin)
        return None if o is None else o.mark

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def origins(self) -> int:
        return len(self._origins)
