"""Gossip wire format: authenticated, encrypted, replay-protected UDP datagrams.

Sans-IO: ``Wire.seal`` turns messages into datagrams, ``Wire.open`` turns a datagram
(plus the time and source address the transport saw) into messages or a drop
reason. No sockets, no clock.

Datagram layout (all integers big-endian)::

    offset size
         0    2  magic b"ML"
         2    1  version (PROTOCOL_VERSION)
         3    4  label fingerprint  SHA-256("meshlb label\\0" + label)[:4]
         7    4  key id             Keyring.key_id(sealing key)
        11   12  nonce
        23    n  ChaCha20-Poly1305 ciphertext of the body, then its 16-byte tag

    associated data = the 23 header bytes + the full UTF-8 cluster label

The header is in the clear so a receiver can sort out, before any cryptography,
traffic that is not ours (magic), from an incompatible build (version), from
another cluster sharing the segment (label fingerprint), or sealed with a key we
do not hold (key id). Each of these is counted separately, which is what an
operator needs to debug "the nodes do not see each other". The fingerprint is
only a hint; the full label is authenticated as associated data, so two clusters
whose labels collide on 32 bits still cannot talk to each other.

The body is a msgpack array ``[sender, epoch, seq, [message, ...]]`` in which each
message is embedded as its own msgpack object (no extra bin wrapping). Sender,
epoch and seq are inside the ciphertext, so they are authenticated and not
visible to an observer. The sealer writes epoch and seq as fixed-width uint64 and
the message array with a fixed 16-bit count: msgpack allows these non-minimal
forms, and they make the overhead independent of the values, so ``capacity`` is
exact rather than a worst-case estimate.

Nonces: 64 random bits chosen per ``Wire`` (per agent boot) followed by a 32-bit
counter; the random part is re-drawn if the counter ever wraps. All members share
one key, and a repeated (key, nonce) pair in ChaCha20-Poly1305 leaks the XOR of two
plaintexts and the one-time Poly1305 key, which permits forgeries, so uniqueness
matters across the whole cluster. With purely random 96-bit nonces the chance of a repeat after n
datagrams under one key is about n^2 / 2^97: 2^-33 at 2^32 datagrams (the NIST
SP 800-38D budget), which 1000 members sending 100 datagrams/s reach in half a
day, and about 2^-14 after a year. With a random prefix plus counter, a repeat
needs two of the *prefixes* to be equal: about b^2 / 2^65 for b boots (or counter
wraps) per key, 2^-25 even for a million of them, however many datagrams are sent.
"""
from __future__ import annotations

import collections
import enum
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .keyring import KEY_ID_SIZE, Keyring
from .ratelimit import RateLimiter
from .replay import ReplayGuard, Verdict

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_DATAGRAM",
    "MAGIC",
    "HEADER_SIZE",
    "TAG_SIZE",
    "OVERHEAD",
    "OVERSIZE_SLACK",
    "MAX_SENDER_BYTES",
    "Drop",
    "Opened",
    "Wire",
    "label_fingerprint",
    "associated_data",
    "seal_envelope",
    "encode_body",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_DATAGRAM = 1400  # fits a 1500-byte Ethernet MTU with IPv6 + UDP headers and room to spare

MAGIC = b"ML"
LABEL_FP_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + 1 + LABEL_FP_SIZE + KEY_ID_SIZE + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE
# Datagrams a little over our own limit are still read: a peer may run with a slightly
# different max_datagram during a config roll-out. Far over it is hostile or broken.
OVERSIZE_SLACK = 128
MAX_UDP_PAYLOAD = 65507
MAX_SENDER_BYTES = 255
_MAX_MESSAGES = 0xFFFF
_U64 = 1 << 64
_COUNTER_SPACE = 1 << 32


class Drop(str, enum.Enum):
    """Why ``Wire.open`` dropped a datagram; the value is the metric label."""

    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    BAD_MAGIC = "bad_magic"  # not a meshlb datagram at all
    BAD_VERSION = "bad_version"
    WRONG_LABEL = "wrong_label"
    UNKNOWN_KEY = "unknown_key"
    UNAUTHENTICATED = "unauthenticated"
    MALFORMED = "malformed"
    REPLAYED = "replayed"
    STALE = "stale"
    RATE_LIMITED = "rate_limited"
    SELF = "self"  # our own datagram looped back (multicast)
    # Our name with another epoch: a second agent runs under our name, or a datagram
    # from our previous boot was still in flight. Worth an operator's look if it grows.
    NAME_CONFLICT = "name_conflict"
    # A bug in this module, never a property of the input; tests assert it stays at zero.
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class Opened:
    sender: str  # the sender's member name (authenticated)
    epoch: int  # sender's boot epoch
    seq: int
    messages: list[Any]  # decoded msgpack objects, in order; their shape is the protocol's business


def label_fingerprint(label: str) -> bytes:
    return hashlib.sha256(b"meshlb label\x00" + label.encode("utf-8")).digest()[:LABEL_FP_SIZE]


def _header(label_fp: bytes, key_id: bytes, nonce: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return MAGIC + bytes((version,)) + label_fp + key_id + nonce


def associated_data(header: bytes, label: str) -> bytes:
    # The header has a fixed size, so plain concatenation is unambiguous.
    return header + label.encode("utf-8")


def seal_envelope(key: bytes, label: str, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    """Low-level: one datagram carrying ``plaintext`` (any bytes) sealed with ``key``.

    ``Wire.seal`` is the normal way to produce datagrams; this exists so tests and
    tools can build authenticated datagrams with arbitrary bodies."""
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    header = _header(label_fingerprint(label), Keyring.key_id(key), nonce)
    return header + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data(header, label))


def _body_prefix(sender: str, epoch: int) -> bytes:
    packed: bytes = msgpack.packb(sender, use_bin_type=True)
    return b"\x94" + packed + b"\xcf" + epoch.to_bytes(8, "big")


def _body_tail_header(seq: int, count: int) -> bytes:
    return b"\xcf" + seq.to_bytes(8, "big") + b"\xdc" + count.to_bytes(2, "big")


_BODY_TAIL_HEADER_SIZE = 1 + 8 + 1 + 2


def encode_body(sender: str, epoch: int, seq: int, encoded: Sequence[bytes]) -> bytes:
    """Low-level: the plaintext body ``Wire.seal`` encrypts."""
    return _body_prefix(sender, epoch) + _body_tail_header(seq, len(encoded)) + b"".join(encoded)


# One packer for every message: msgpack.packb builds a Packer per call, which is most
# of the cost of packing an eviction. Safe to share: pack() runs in C under the GIL,
# resets its buffer on return and on error, and calls no Python code for these types.
_pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


def _reject_ext(code: int, data: bytes) -> Any:
    # Gossip messages are plain msgpack; an extension type can only be a bug or an attack.
    raise ValueError("msgpack extension types are not used in gossip")


class _Nonces:
    __slots__ = ("_prefix", "_counter")

    def __init__(self) -> None:
        self._prefix = os.urandom(8)
        self._counter = 0

    def next(self) -> bytes:
        if self._counter == _COUNTER_SPACE:
            self._prefix = os.urandom(8)
            self._counter = 0
        n = self._prefix + self._counter.to_bytes(4, "big")
        self._counter += 1
        return n


class Wire:
    """Seal and open gossip datagrams for one member (``sender``) of one cluster (``label``).

    ``keyring`` is shared, not copied: installing or switching keys on it takes
    effect on the next datagram.
    """

    def __init__(
        self,
        *,
        label: str,
        keyring: Keyring,
        sender: str,
        epoch: int,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        replay_window: int = 1024,
        rate_limiter: RateLimiter | None = None,
        max_tracked_senders: int = 65536,
    ) -> None:
        if not isinstance(label, str):
            raise TypeError("label must be a str")
        if not isinstance(sender, str) or not sender:
            raise ValueError("sender must be a non-empty str")
        if len(sender.encode("utf-8")) > MAX_SENDER_BYTES:
            raise ValueError(f"sender name longer than {MAX_SENDER_BYTES} bytes")
        if type(epoch) is not int or not 0 <= epoch < _U64:
            raise ValueError("epoch must be an int in [0, 2**64)")
        if not isinstance(max_datagram, int) or max_datagram > MAX_UDP_PAYLOAD:
            raise ValueError(f"max_datagram must be an int <= {MAX_UDP_PAYLOAD}")
        self.label = label
        self.keyring = keyring
        self.sender = sender
        self.epoch = epoch
        self.max_datagram = max_datagram
        self.rate_limiter = rate_limiter
        self.replay = ReplayGuard(replay_window, max_tracked_senders)
        self.drops: collections.Counter[Drop] = collections.Counter()
        self.accepted = 0
        self._label_fp = label_fingerprint(label)
        self._label_bytes = label.encode("utf-8")
        self._prefix = _body_prefix(sender, epoch)
        self._capacity = max_datagram - OVERHEAD - len(self._prefix) - _BODY_TAIL_HEADER_SIZE
        if self._capacity < 1:
            raise ValueError(f"max_datagram {max_datagram} leaves no room for any message")
        self._nonces = _Nonces()
        self._seq = 0

    # -- sending ------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Largest total size of encoded messages that fits in one datagram."""
        return self._capacity

    @property
    def seq(self) -> int:
        """Seq of the last datagram sealed (0 before the first)."""
        return self._seq

    @staticmethod
    def encode(message: Any) -> bytes:
        return _pack(message)

    def seal(self, encoded: Sequence[bytes]) -> list[bytes]:
        """Pack messages, in order, greedily into as few datagrams as fit.

        Every message must be one msgpack object as ``encode`` produces; one larger
        than ``capacity`` raises ValueError before anything is sealed, so no seq is
        spent on a half-sent batch."""
        cap = self._capacity
        # Copied up front: validation and packing are two passes, and a memoryview's
        # len() counts elements, not bytes.
        messages: list[bytes] = []
        for i, m in enumerate(encoded):
            if not isinstance(m, (bytes, bytearray, memoryview)):
                raise TypeError(f"message {i} is {type(m).__name__}, not encoded bytes")
            m = bytes(m)
            messages.append(m)
            if len(m) == 0:
                raise ValueError(f"message {i} is empty")
            if len(m) > cap:
                raise ValueError(
                    f"message {i} is {len(m)} bytes, more than the {cap} that fit in one datagram"
                )
        out: list[bytes] = []
        batch: list[bytes] = []
        used = 0
        for m in messages:
            if batch and (used + len(m) > cap or len(batch) == _MAX_MESSAGES):
                out.append(self._seal_batch(batch))
                batch, used = [], 0
            batch.append(m)
            used += len(m)
        if batch:
            out.append(self._seal_batch(batch))
        return out

    def _seal_batch(self, batch: list[bytes]) -> bytes:
        if self._seq + 1 >= _U64:
            raise OverflowError("seq space exhausted; restart with a new epoch")
        self._seq += 1
        body = self._prefix + _body_tail_header(self._seq, len(batch)) + b"".join(batch)
        key_id, aead = self.keyring.primary_cipher()
        nonce = self._nonces.next()
        header = _header(self._label_fp, key_id, nonce)
        datagram = header + aead.encrypt(nonce, body, header + self._label_bytes)
        assert len(datagram) <= self.max_datagram, "capacity arithmetic is wrong"
        return datagram

    # -- receiving ----------------------------------------------------------------

    def open(self, now: float, datagram: bytes, source: tuple[str, int]) -> Opened | Drop:
        """Authenticate and decode one datagram. Never raises.

        Cheap checks run first and the per-source rate limit comes before the
        decryption, so a flood costs little. The replay window changes only for a
        datagram that decrypted and decoded correctly; the rate limiter is the one
        piece of state that unauthenticated input moves, by design."""
        try:
            result = self._open(now, datagram, source)
        except Exception:  # noqa: BLE001 -- a receive path must not die on input
            result = Drop.INTERNAL_ERROR
        if isinstance(result, Drop):
            self.drops[result] += 1
        else:
            self.accepted += 1
        return result

    def _open(self, now: float, datagram: Any, source: tuple[str, int]) -> Opened | Drop:
        if not isinstance(datagram, (bytes, bytearray, memoryview)):
            return Drop.MALFORMED
        data = bytes(datagram)
        n = len(data)
        if n > self.max_datagram + OVERSIZE_SLACK:
            return Drop.OVERSIZED
        if n < OVERHEAD + 1:  # the smallest msgpack body is one byte
            return Drop.TRUNCATED
        if data[:2] != MAGIC:
            return Drop.BAD_MAGIC
        if data[2] != PROTOCOL_VERSION:
            return Drop.BAD_VERSION
        if data[3:7] != self._label_fp:
            return Drop.WRONG_LABEL
        ciphers = self.keyring.ciphers_for(data[7:11])
        if not ciphers:
            return Drop.UNKNOWN_KEY
        if self.rate_limiter is not None and not self.rate_limiter.allow(now, source):
            return Drop.RATE_LIMITED
        header = data[:HEADER_SIZE]
        nonce = data[11:HEADER_SIZE]
        ad = header + self._label_bytes
        ciphertext = data[HEADER_SIZE:]
        plain: bytes | None = None
        for aead in ciphers:
            try:
                plain = aead.decrypt(nonce, ciphertext, ad)
                break
            except InvalidTag:
                continue
        if plain is None:
            return Drop.UNAUTHENTICATED

        body = self._decode(plain)
        if body is None:
            return Drop.MALFORMED
        sender, epoch, seq, messages = body
        if sender == self.sender:
            return Drop.SELF if epoch == self.epoch else Drop.NAME_CONFLICT
        verdict = self.replay.commit(sender, epoch, seq)
        if verdict is Verdict.REPLAYED:
            return Drop.REPLAYED
        if verdict is Verdict.STALE:
            return Drop.STALE
        return Opened(sender, epoch, seq, messages)

    @staticmethod
    def _decode(plain: bytes) -> tuple[str, int, int, list[Any]] | None:
        # Every length limit is the plaintext size: nothing real can claim more
        # elements or bytes than there are bytes, and a lying length header is then
        # refused before msgpack allocates for it.
        limit = len(plain)
        try:
            body = msgpack.unpackb(
                plain,
                raw=False,
                use_list=True,
                strict_map_key=False,  # the protocol may key maps by small ints
                ext_hook=_reject_ext,
                max_str_len=limit,
                max_bin_len=limit,
                max_array_len=limit,
                max_map_len=limit,
                max_ext_len=limit,
            )
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
            # ValueError covers msgpack's ExtraData/FormatError/StackError and bad
            # UTF-8; TypeError an unhashable (array) map key.
            return None
        if type(body) is not list or len(body) != 4:
            return None
        sender, epoch, seq, messages = body
        if type(sender) is not str or not sender or len(sender.encode("utf-8")) > MAX_SENDER_BYTES:
            return None
        if type(epoch) is not int or not 0 <= epoch < _U64:
            return None
        if type(seq) is not int or not 0 <= seq < _U64:
            return None
        if type(messages) is not list:
            return None
        return sender, epoch, seq, messages

    # -- membership hooks -----------------------------------------------------------

    def forget_sender(self, name: str) -> None:
        """The member was reaped: release its replay window (see ReplayGuard.forget)."""
        self.replay.forget(name)
