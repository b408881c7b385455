"""Message schema of the membership protocol, and the value types it carries.

Every message is a msgpack-able list whose first element is a small integer type code.
Lists instead of maps because the field names would otherwise be repeated in every
ping and ack, and idle traffic is a budget (<= 490 B/s per member at N=200).

``decode()`` validates every field (type, range, length) and returns ``None`` for
anything malformed; it never raises. The caller counts ``None`` as the drop reason
"malformed" and changes no state. Strings are bounded so that a valid but hostile
message cannot make us allocate much.

Flow tuples travel with addresses packed to 4 or 16 bytes: an eviction is about 40 B
instead of 60, and many fit in one datagram.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import msgpack

__all__ = [
    "PROTOCOL_VERSION", "Status", "MemberMeta", "FlowTuple", "MemberRecord",
    "Ping", "PingReq", "Ack", "Nack", "Alive", "Suspect", "Dead", "Left",
    "Eviction", "EvictionRun", "PushPull", "EvictionDigest", "DigestEntry", "DrainEntry", "DrainState", "Message",
    "FLOW_RECORD_SIZE", "MAX_RUN", "RUNS_VERSION", "flow_record", "flow_tuple_of", "valid_records",
    "encode", "decode", "decode_received", "peek_alive", "decode_eviction", "decode_eviction_run", "encode_meta",
    "decode_meta", "MAX_NAME", "MAX_U64",
]

PROTOCOL_VERSION = 2
# Members from this version on take evictions in runs (EvictionRun); a member sends runs
# only while every live member says it does (MemberMeta.version), singles otherwise.
RUNS_VERSION = 2

MAX_NAME = 128
MAX_U64 = (1 << 64) - 1
MAX_VIPS = 256
MAX_DIGEST_TEXT = 128
MAX_OBSERVATIONS = 8192
MAX_RECORDS = 4096
MAX_DIGEST_ORIGINS = 8192
MAX_DIGEST_RECENT = 256
MAX_HOST = 64
MAX_DRAIN_ENTRIES = 256


class Status(str, Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_STATUS_CODE = {Status.ALIVE: 0, Status.SUSPECT: 1, Status.DEAD: 2, Status.LEFT: 3}
_CODE_STATUS = {v: k for k, v in _STATUS_CODE.items()}


@dataclass
class MemberMeta:
    """What a member says about itself; gossiped with its alive state.

    Treated as immutable once handed to a Node: a change is a new object passed to
    ``Node.update_meta``.
    """
    vips: tuple[str, ...] = ()
    weight: int = 100
    app_healthy: bool = True
    table_digest: str = ""
    version: int = PROTOCOL_VERSION
    # This member's health checks of other members' apps: name -> ok.
    observations: dict[str, bool] = field(default_factory=dict)
    # Data-plane addresses beyond the gossip address (an IPv6 VIP is forwarded to a
    # member's IPv6 address); optional on the wire, so older members interoperate.
    addresses: tuple[str, ...] = ()


class FlowTuple(NamedTuple):
    # NamedTuples, like Eviction and EvictionReceived: immutable and hashable as the
    # frozen dataclasses around them, and made several times faster, which counts for
    # the types every gossiped eviction creates on every member.
    client: str
    client_port: int
    vip: str
    vip_port: int
    proto: int  # 6 (TCP) or 17 (UDP)


# ---- messages -------------------------------------------------------------------------

@dataclass(frozen=True)
class Ping:
    seq: int
    target: str  # the name the prober expects, so a new process on a reused address does not ack


@dataclass(frozen=True)
class PingReq:
    seq: int
    target: str  # the helper probes the address *it* knows for this name, never one we name
    nack: bool


@dataclass(frozen=True)
class Ack:
    seq: int


@dataclass(frozen=True)
class Nack:
    seq: int


@dataclass(frozen=True)
class Alive:
    name: str
    address: tuple[str, int]
    incarnation: int
    meta_version: int
    meta: MemberMeta


@dataclass(frozen=True)
class Suspect:
    name: str
    incarnation: int
    origin: str  # who suspects; distinct origins are Lifeguard's independent confirmations


@dataclass(frozen=True)
class Dead:
    name: str
    incarnation: int
    origin: str


@dataclass(frozen=True)
class Left:
    # No origin field: only the member itself says it left (a receiver that hears it
    # is said to have left while it has not refutes it, as for dead).
    name: str
    incarnation: int


class Eviction(NamedTuple):
    origin: str
    epoch: int  # the origin's start incarnation: seq restarts at 1 after a restart
    seq: int
    tuple: FlowTuple


class EvictionRun(NamedTuple):
    """Consecutive evictions of one origin, ``first`` .. ``first + n - 1``, as ``n``
    flow records back to back (:data:`FLOW_RECORD_SIZE` bytes each, see
    :func:`flow_record`): one message, one dedupe step and no per-flow objects where
    single evictions cost a message each."""
    origin: str
    epoch: int
    first: int
    records: bytes


# A flow record: client address (16 bytes; IPv4 in the first 4, the rest zero), VIP
# address (the same), client port, VIP port (big-endian), protocol (6 or 17), address
# family (2 or 10), two zero bytes. It is byte for byte the key the data plane files the
# flow under, so a receiving agent hands records to it as they came.
_FLOW_RECORD = struct.Struct("!16s16sHHBB2x")
FLOW_RECORD_SIZE = _FLOW_RECORD.size
MAX_RUN = 32
_VALID_RECORDS = re.compile(
    rb"(?:.{4}\x00{12}.{4}\x00{12}.{4}[\x06\x11]\x02\x00\x00|.{36}[\x06\x11]\x0a\x00\x00)+", re.S)


def valid_records(data: bytes) -> bool:
    """``data`` is one or more well-formed flow records."""
    return len(data) % FLOW_RECORD_SIZE == 0 and _VALID_RECORDS.fullmatch(data) is not None


def flow_record(t: FlowTuple) -> bytes:
    """The flow record of ``t`` (ValueError if it is not a TCP/UDP flow of one family)."""
    c, v = _pack_ip(t.client), _pack_ip(t.vip)
    if len(c) != len(v):
        raise ValueError("client and VIP of a flow must be the same family")
    if t.proto not in (6, 17):
        raise ValueError("proto must be 6 (TCP) or 17 (UDP)")
    fam = socket.AF_INET if len(c) == 4 else socket.AF_INET6
    try:
        return _FLOW_RECORD.pack(c, v, t.client_port, t.vip_port, t.proto, fam)
    except struct.error as exc:
        raise ValueError(f"flow record: {exc}") from None


def flow_tuple_of(record: bytes) -> FlowTuple:
    """The FlowTuple of one flow record (as :func:`valid_records` accepts)."""
    c, v, cport, vport, proto, fam = _FLOW_RECORD.unpack(record)
    n = 4 if fam == socket.AF_INET else 16
    return FlowTuple(_ip_bytes(c[:n]), cport, _ip_bytes(v[:n]), vport, proto)


@dataclass(frozen=True)
class MemberRecord:
    name: str
    address: tuple[str, int]
    status: Status
    incarnation: int
    meta_version: int
    meta: MemberMeta


@dataclass(frozen=True)
class PushPull:
    """One chunk of a full-state exchange. Chunks are independent: each record merges
    on its own, so a lost chunk costs only its records, never the whole exchange."""
    nonce: int
    reply: bool
    join: bool
    # Sent to the multicast group: every member hears it, so each answers only with
    # probability ~c/N instead of all at once.
    group: bool
    index: int
    count: int
    records: tuple[MemberRecord, ...]


@dataclass(frozen=True)
class DigestEntry:
    origin: str
    epoch: int
    contiguous: int  # every seq <= this was seen
    recent: tuple[int, ...]  # some seqs above `contiguous` also seen


@dataclass(frozen=True)
class EvictionDigest:
    reply: bool  # a reply digest is answered with events only, never with another digest
    entries: tuple[DigestEntry, ...]


@dataclass(frozen=True)
class DrainEntry:
    """One key of the cluster's drain map, last writer wins: the larger (stamp, origin)."""
    key: str  # what drains: "member:NAME" or "server:ADDRESS" (meshlb.backends)
    drained: bool  # False: undrained (kept, so that an older "drained" cannot come back)
    stamp: int  # milliseconds, a hybrid logical clock (drain_gossip.py)
    origin: str  # the member that wrote it

    def newer_than(self, other: DrainEntry) -> bool:
        # the value breaks the tie a member could only make by losing its clock
        return (self.stamp, self.origin, self.drained) > (other.stamp, other.origin, other.drained)


@dataclass(frozen=True)
class DrainState:
    """Entries of the drain map: news as it happens, the whole map with a push-pull."""
    entries: tuple[DrainEntry, ...]


Message = (Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | Left | Eviction | EvictionRun | PushPull
           | EvictionDigest | DrainState)

T_PING, T_PINGREQ, T_ACK, T_NACK, T_ALIVE, T_SUSPECT, T_DEAD, T_LEFT, T_EVICT, T_PUSHPULL, T_DIGEST = range(1, 12)
T_EVICTS = 12  # RUNS_VERSION on
T_DRAINS = 13  # an older member drops it as malformed (counted) and sees no drains


# ---- encoding -------------------------------------------------------------------------

def encode_meta(m: MemberMeta) -> list[Any]:
    out = [list(m.vips), m.weight, m.app_healthy, m.table_digest, m.version, dict(m.observations)]
    if m.addresses:
        out.append([_pack_ip(a) for a in m.addresses])
    return out


_PACKED: dict[str, bytes] = {}  # the clients and VIPs of evictions sent, over and over
_CANONICAL: dict[str, str] = {}


def _pack_ip(text: str) -> bytes:
    # inet_pton, not ipaddress: one call per address of every eviction sent
    if type(text) is str:
        hit = _PACKED.get(text)
        if hit is not None:
            return hit
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            raw = socket.inet_pton(fam, text)
        except (OSError, TypeError):
            continue
        if len(_PACKED) >= _CACHE_MAX:
            _PACKED.clear()
        _PACKED[text] = raw
        return raw
    return ipaddress.ip_address(text).packed  # raises ValueError naming the input


def canonical_ip(text: str) -> str:
    """The one text form of an address (what a receiver decodes from the wire)."""
    if type(text) is str:
        hit = _CANONICAL.get(text)
        if hit is not None:
            return hit
    raw = _pack_ip(text)
    out = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    if len(_CANONICAL) >= _CACHE_MAX:
        _CANONICAL.clear()
    _CANONICAL[text] = out
    return out


def _flow(t: FlowTuple) -> list[Any]:
    return [_pack_ip(t.client), t.client_port, _pack_ip(t.vip), t.vip_port, t.proto]


def _record(r: MemberRecord) -> list[Any]:
    return [r.name, r.address[0], r.address[1], _STATUS_CODE[r.status], r.incarnation,
            r.meta_version, encode_meta(r.meta)]


def encode(msg: Message) -> list[Any]:
    """Plain msgpack-able form of a message (Wire.encode packs it)."""
    if type(msg) is EvictionRun:  # the bulk under load
        return [T_EVICTS, msg.origin, msg.epoch, msg.first, msg.records]
    if type(msg) is Eviction:
        return [T_EVICT, msg.origin, msg.epoch, msg.seq, *_flow(msg.tuple)]
    if isinstance(msg, Ping):
        return [T_PING, msg.seq, msg.target]
    if isinstance(msg, Ack):
        return [T_ACK, msg.seq]
    if isinstance(msg, PingReq):
        return [T_PINGREQ, msg.seq, msg.target, msg.nack]
    if isinstance(msg, Nack):
        return [T_NACK, msg.seq]
    if isinstance(msg, Alive):
        return [T_ALIVE, msg.name, msg.address[0], msg.address[1], msg.incarnation,
                msg.meta_version, encode_meta(msg.meta)]
    if isinstance(msg, Suspect):
        return [T_SUSPECT, msg.name, msg.incarnation, msg.origin]
    if isinstance(msg, Dead):
        return [T_DEAD, msg.name, msg.incarnation, msg.origin]
    if isinstance(msg, Left):
        return [T_LEFT, msg.name, msg.incarnation]
    if isinstance(msg, PushPull):
        return [T_PUSHPULL, msg.nonce, msg.reply, msg.join, msg.group, msg.index, msg.count,
                [_record(r) for r in msg.records]]
    if isinstance(msg, EvictionDigest):
        return [T_DIGEST, msg.reply,
                [[e.origin, e.epoch, e.contiguous, list(e.recent)] for e in msg.entries]]
    if isinstance(msg, DrainState):
        return [T_DRAINS, [[e.key, e.drained, e.stamp, e.origin] for e in msg.entries]]
    raise TypeError(f"not a protocol message: {type(msg).__name__}")


# ---- decoding -------------------------------------------------------------------------

class _Malformed(Exception):
    pass


def _uint(v: Any, hi: int = MAX_U64) -> int:
    if type(v) is not int or v < 0 or v > hi:
        raise _Malformed
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Malformed
    return v


def _text(v: Any, max_len: int = MAX_NAME, allow_empty: bool = False) -> str:
    if type(v) is not str or len(v) > max_len or (not allow_empty and not v):
        raise _Malformed
    if not v.isprintable():
        raise _Malformed
    return v


def _array(v: Any, max_len: int) -> list[Any] | tuple[Any, ...]:
    if type(v) not in (list, tuple) or len(v) > max_len:
        raise _Malformed
    fields: list[Any] | tuple[Any, ...] = v
    return fields


# Gossip repeats the same few hosts and metas over and over (every member hears each
# update ~log N times), and parsing them dominated the simulator's profile. These
# caches hold only values that passed validation; a hit needs exact type checks first,
# so a malformed field can never be answered from the cache. They are bounded, and
# what they return is immutable by convention, so sharing it is harmless.
_CACHE_MAX = 8192
_HOST_CACHE: dict[str, str] = {}
_META_CACHE: dict[tuple[Any, ...], MemberMeta] = {}


def _host(v: Any) -> str:
    if type(v) is str:
        hit = _HOST_CACHE.get(v)
        if hit is not None:
            return hit
    s = _text(v, MAX_HOST)
    try:
        canonical = str(ipaddress.ip_address(s))
    except ValueError:
        raise _Malformed from None
    if len(_HOST_CACHE) >= _CACHE_MAX:
        _HOST_CACHE.clear()
    _HOST_CACHE[s] = canonical
    return canonical


_ORIGINS: set[str] = set()  # names that passed _text: every eviction carries its origin's


def _origin(v: Any) -> str:
    if type(v) is str and v in _ORIGINS:
        return v
    s = _text(v)
    if len(_ORIGINS) >= _CACHE_MAX:
        _ORIGINS.clear()
    _ORIGINS.add(s)
    return s


def _port(v: Any) -> int:
    p = _uint(v, 65535)
    if p == 0:
        raise _Malformed
    return p


_IP_TEXT: dict[bytes, str] = {}  # clients and VIPs repeat in eviction after eviction


def _ip_bytes(v: Any) -> str:
    if type(v) is not bytes:
        raise _Malformed
    text = _IP_TEXT.get(v)
    if text is None:
        if len(v) not in (4, 16):
            raise _Malformed
        text = socket.inet_ntop(socket.AF_INET if len(v) == 4 else socket.AF_INET6, v)
        if len(_IP_TEXT) >= _CACHE_MAX:
            _IP_TEXT.clear()
        _IP_TEXT[v] = text
    return text


MAX_ADDRESSES = 8


def _meta_key(v: Any) -> tuple[Any, ...] | None:
    # Exact types are checked so that equal-but-differently-typed input (1 vs True)
    # cannot hit an entry validated for the other type.
    if type(v) is not list or len(v) not in (6, 7):
        return None
    vips, weight, healthy, digest, version, obs = v[:6]
    addrs = v[6] if len(v) == 7 else []
    if type(addrs) is not list or any(type(a) is not bytes for a in addrs):
        return None
    if (type(vips) is not list or type(weight) is not int or type(healthy) is not bool
            or type(digest) is not str or type(version) is not int or type(obs) is not dict):
        return None
    for x in vips:
        if type(x) is not str:
            return None
    for k, ok in obs.items():
        if type(k) is not str or type(ok) is not bool:
            return None
    return (tuple(vips), weight, healthy, digest, version, tuple(obs.items()), tuple(addrs))


def decode_meta(v: Any) -> MemberMeta:
    key = _meta_key(v)
    if key is not None:
        hit = _META_CACHE.get(key)
        if hit is not None:
            return hit
    meta = _decode_meta(v)
    if key is not None:
        if len(_META_CACHE) >= _CACHE_MAX:
            _META_CACHE.clear()
        _META_CACHE[key] = meta
    return meta


def _decode_meta(v: Any) -> MemberMeta:
    f = _array(v, 16)
    if len(f) not in (6, 7):
        raise _Malformed
    addresses = tuple(_ip_bytes(x) for x in _array(f[6], MAX_ADDRESSES)) if len(f) == 7 else ()
    vips = _array(f[0], MAX_VIPS)
    vips_t = tuple(_text(x, MAX_HOST) for x in vips)
    obs = f[5]
    if type(obs) is not dict or len(obs) > MAX_OBSERVATIONS:
        raise _Malformed
    observations = {_text(k): _bool(ok) for k, ok in obs.items()}
    return MemberMeta(
        vips=vips_t,
        weight=_uint(f[1], 1 << 16),
        app_healthy=_bool(f[2]),
        table_digest=_text(f[3], MAX_DIGEST_TEXT, allow_empty=True),
        version=_uint(f[4], 1 << 16),
        observations=observations,
        addresses=addresses,
    )


def _decode_record(v: Any) -> MemberRecord:
    f = _array(v, 16)
    if len(f) != 7:
        raise _Malformed
    code = _uint(f[3], 3)
    return MemberRecord(
        name=_text(f[0]), address=(_host(f[1]), _port(f[2])), status=_CODE_STATUS[code],
        incarnation=_uint(f[4]), meta_version=_uint(f[5]), meta=decode_meta(f[6]),
    )


_tuple_new = tuple.__new__  # NamedTuple's generated __new__ costs as much again


def _eviction(f: list[Any] | tuple[Any, ...]) -> Eviction:
    # the checks of _uint inlined: this runs for every eviction on every member
    _, origin, epoch, seq, client, cport, vip, vport, proto = f
    if (type(epoch) is not int or type(seq) is not int or type(cport) is not int
            or type(vport) is not int or type(proto) is not int or proto not in (6, 17)
            or not (0 <= epoch <= MAX_U64 and 0 < seq <= MAX_U64
                    and 0 <= cport <= 65535 and 0 <= vport <= 65535)):
        raise _Malformed
    return _tuple_new(Eviction, (_origin(origin), epoch, seq, _tuple_new(
        FlowTuple, (_ip_bytes(client), cport, _ip_bytes(vip), vport, proto))))


def _eviction_run(f: list[Any] | tuple[Any, ...]) -> EvictionRun:
    _, origin, epoch, first, records = f
    if (type(epoch) is not int or type(first) is not int or type(records) is not bytes
            or not (0 <= epoch <= MAX_U64 and first > 0)
            or not 0 < len(records) <= MAX_RUN * FLOW_RECORD_SIZE
            or first - 1 + len(records) // FLOW_RECORD_SIZE > MAX_U64
            or not valid_records(records)):
        raise _Malformed
    return _tuple_new(EvictionRun, (_origin(origin), epoch, first, records))


def decode_eviction_run(v: list[Any]) -> EvictionRun | None:
    """:func:`decode` for a list already known to be 5 long and typed as a run."""
    try:
        return _eviction_run(v)
    except (_Malformed, ValueError, TypeError):
        return None


def decode_eviction(v: list[Any]) -> Eviction | None:
    """:func:`decode` for a list already known to be 9 long and typed as an eviction."""
    try:
        return _eviction(v)
    except (_Malformed, ValueError, TypeError):
        return None


def _decode(v: Any) -> Message:
    f = _array(v, 16)
    if not f:
        raise _Malformed
    t = f[0]
    if type(t) is not int:
        raise _Malformed
    n = len(f)
    if t == T_EVICTS and n == 5:
        return _eviction_run(f)
    if t == T_EVICT and n == 9:
        return _eviction(f)
    if t == T_PING and n == 3:
        return Ping(_uint(f[1]), _text(f[2]))
    if t == T_ACK and n == 2:
        return Ack(_uint(f[1]))
    if t == T_PINGREQ and n == 4:
        return PingReq(_uint(f[1]), _text(f[2]), _bool(f[3]))
    if t == T_NACK and n == 2:
        return Nack(_uint(f[1]))
    if t == T_ALIVE and n == 7:
        return Alive(_text(f[1]), (_host(f[2]), _port(f[3])), _uint(f[4]), _uint(f[5]), decode_meta(f[6]))
    if t == T_SUSPECT and n == 4:
        return Suspect(_text(f[1]), _uint(f[2]), _text(f[3]))
    if t == T_DEAD and n == 4:
        return Dead(_text(f[1]), _uint(f[2]), _text(f[3]))
    if t == T_LEFT and n == 3:
        return Left(_text(f[1]), _uint(f[2]))
    if t == T_PUSHPULL and n == 8:
        count = _uint(f[6], 1 << 16)
        index = _uint(f[5], 1 << 16)
        if count == 0 or index >= count:
            raise _Malformed
        recs = tuple(_decode_record(r) for r in _array(f[7], MAX_RECORDS))
        return PushPull(_uint(f[1]), _bool(f[2]), _bool(f[3]), _bool(f[4]), index, count, recs)
    if t == T_DIGEST and n == 3:
        entries = []
        for e in _array(f[2], MAX_DIGEST_ORIGINS):
            ef = _array(e, 4)
            if len(ef) != 4:
                raise _Malformed
            recent = tuple(_uint(x) for x in _array(ef[3], MAX_DIGEST_RECENT))
            entries.append(DigestEntry(_text(ef[0]), _uint(ef[1]), _uint(ef[2]), recent))
        return EvictionDigest(_bool(f[1]), tuple(entries))
    if t == T_DRAINS and n == 2:
        drains = []
        for e in _array(f[1], MAX_DRAIN_ENTRIES):
            ef = _array(e, 4)
            if len(ef) != 4:
                raise _Malformed
            drains.append(DrainEntry(_text(ef[0]), _bool(ef[1]), _uint(ef[2]), _text(ef[3])))
        return DrainState(tuple(drains))
    raise _Malformed


def decode(v: Any) -> Message | None:
    """The message, or None if anything about it is malformed. Never raises."""
    try:
        return _decode(v)
    except (_Malformed, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


# The bulk under load, (type code, length) -> its decoder without decode's generic steps.
_HOT: dict[tuple[int, int], Callable[[list[Any]], Message | None]] = {
    (T_EVICTS, 5): decode_eviction_run,
    (T_EVICT, 9): decode_eviction,
}


def decode_received(raw: Any) -> Message | None:
    """:func:`decode` for a message as a datagram carries it: a msgpack object, or one
    packed again as msgpack bytes. Never raises."""
    if type(raw) is list and raw and type(raw[0]) is int:
        hot = _HOT.get((raw[0], len(raw)))
        if hot is not None:
            return hot(raw)
    elif isinstance(raw, (bytes, bytearray)):
        try:
            raw = msgpack.unpackb(raw, raw=False)
        except Exception:  # noqa: BLE001 -- hostile input must not raise
            return None
    return decode(raw)


def peek_alive(raw: Any) -> tuple[str, int] | None:
    """(name, incarnation) of an undecoded Alive, None for anything else: a receiver
    skips an alive it already has (every member hears each update ~log N times), which
    it would ignore whatever its other fields hold, before paying for validation."""
    if type(raw) is list and len(raw) == 7 and type(raw[0]) is int and raw[0] == T_ALIVE:
        name, incarnation = raw[1], raw[4]
        if type(name) is str and type(incarnation) is int:
            return name, incarnation
    return None
