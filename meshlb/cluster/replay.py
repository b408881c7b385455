"""Per-sender replay protection for authenticated gossip datagrams.

Every datagram carries, inside its authenticated body, the sender's boot *epoch*
(boot time in ns, so it only grows for a given member name) and a *seq* that the
sender increments per datagram. For each sender we keep the highest seq seen in
its current epoch and a sliding bitmap of the ``window`` seqs at and below it, the
scheme of IPsec's anti-replay window (RFC 4303 §3.4.3): UDP may reorder, so a seq
a little below the highest is still fine if it has not been seen.

Sans-IO and deliberately two-phase: ``check`` never changes anything, ``commit``
records a datagram. The codec only commits after a datagram has been decrypted
*and* decoded, so nothing a forger or a broken peer sends can move a window.
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["ReplayGuard", "Verdict"]


class Verdict(enum.Enum):
    FRESH = "fresh"
    REPLAYED = "replayed"  # inside the window and already seen
    STALE = "stale"  # older epoch, or too far below the window to tell


@dataclass(slots=True)
class _Window:
    epoch: int
    top: int  # highest seq accepted in this epoch
    bits: int  # bit i set <=> seq (top - i) was accepted; bit 0 is always set


@dataclass(slots=True, frozen=True)
class _Tombstone:
    # What is left of a window when its sender is forgotten: everything at or below
    # (epoch, top) is treated as already seen. Two ints instead of a bitmap.
    epoch: int
    top: int


class ReplayGuard:
    """Replay windows for at most ``max_senders`` senders (plus as many tombstones).

    Memory is bounded with LRU eviction by "last accepted datagram". The trade-off:
    an evicted window is reduced to a tombstone (epoch, top seq), so its sender keeps
    working and old datagrams stay rejected, but seqs inside the old window that had
    not arrived yet are rejected too (at most a few reordered datagrams lost). Only
    once a tombstone is itself evicted, i.e. after 2 x ``max_senders`` distinct
    senders, could a captured datagram of that sender be replayed once. Senders are
    authenticated, so only key holders can add names; the bound is sized far above a
    real cluster and exists to stop a buggy or compromised member from exhausting
    memory with fabricated names, not to be reached in normal operation.
    """

    __slots__ = ("window", "max_senders", "_windows", "_tombstones")

    def __init__(self, window: int = 1024, max_senders: int = 65536) -> None:
        if window < 1:
            raise ValueError("replay window must be at least 1")
        if max_senders < 1:
            raise ValueError("max_senders must be at least 1")
        self.window = window
        self.max_senders = max_senders
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._tombstones: OrderedDict[str, _Tombstone] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def __contains__(self, sender: object) -> bool:
        return sender in self._windows

    def check(self, sender: str, epoch: int, seq: int) -> Verdict:
        """What ``commit`` would make of this datagram; changes nothing."""
        w = self._windows.get(sender)
        if w is None:
            t = self._tombstones.get(sender)
            if t is None or epoch > t.epoch or (epoch == t.epoch and seq > t.top):
                return Verdict.FRESH
            return Verdict.STALE
        if epoch > w.epoch:
            return Verdict.FRESH  # the sender restarted
        if epoch < w.epoch:
            return Verdict.STALE
        if seq > w.top:
            return Verdict.FRESH
        behind = w.top - seq
        if behind >= self.window:
            return Verdict.STALE
        return Verdict.REPLAYED if (w.bits >> behind) & 1 else Verdict.FRESH

    def commit(self, sender: str, epoch: int, seq: int) -> Verdict:
        """Record the datagram if it is fresh; returns the verdict either way."""
        verdict = self.check(sender, epoch, seq)
        if verdict is not Verdict.FRESH:
            return verdict
        w = self._windows.get(sender)
        if w is None or epoch > w.epoch:
            self._tombstones.pop(sender, None)
            self._windows[sender] = _Window(epoch, seq, 1)
        elif seq > w.top:
            shift = seq - w.top
            # Shifting by more than the window would build a huge int for nothing.
            w.bits = 1 if shift >= self.window else ((w.bits << shift) | 1) & ((1 << self.window) - 1)
            w.top = seq
        else:
            w.bits |= 1 << (w.top - seq)
        self._windows.move_to_end(sender)
        while len(self._windows) > self.max_senders:
            old_name, old = self._windows.popitem(last=False)
            self._bury(old_name, old)
        return verdict

    def forget(self, sender: str) -> None:
        """The member was reaped: free its window, keep a tombstone so datagrams it
        sent before cannot be replayed to resurrect it. If it is in fact alive
        (a false death), its next datagrams have higher seqs and are accepted."""
        w = self._windows.pop(sender, None)
        if w is not None:
            self._bury(sender, w)

    def _bury(self, sender: str, w: _Window) -> None:
        self._tombstones[sender] = _Tombstone(w.epoch, w.top)
        self._tombstones.move_to_end(sender)
        while len(self._tombstones) > self.max_senders:
            self._tombstones.popitem(last=False)
