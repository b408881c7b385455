"""ctypes mirror of bpf/meshlb.h: every key/value the data plane shares with Python.

Field names, order and sizes follow the C header exactly; tests/bpf/test_layouts_btf.py
compares each structure's size and field offsets with the compiled objects' BTF, and
each constant with the value the C compiler sees. Addresses and ports are stored in
network byte order (as raw bytes in the packet), everything else in host order.
"""
from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64

AF_INET = socket.AF_INET    # 2
AF_INET6 = socket.AF_INET6  # 10
IPPROTO_TCP = 6
IPPROTO_UDP = 17

# ---------------------------------------------------------------- constants
MLB_MAX_VIPS = 1024
MLB_MAX_BACKENDS = 4096
MLB_DEFAULT_RING = 65537
MLB_CT_DEFAULT_SIZE = 262144
MLB_CT_CLOSED_SIZE = 65536
MLB_FIB_RC_SLOTS = 16
MLB_SNAT_PROBES = 4
MLB_SOCK_EVENT_RESET = 0  # sock_event.oldstate: a segment no socket took (not a TCP state)
MLB_HASH_SEED = 0x6D6C6221
MLB_V4_MARK = 0x8000
MLB_V6_MARK = 0x6D1B5

MLB_VIP_F_NAT = 1 << 0
MLB_VIP_F_ACTIVE = 1 << 1
MLB_VIP_FILTER_SLOTS = 4096
MLB_VIP_FILTER_MULT = 0x9E3779B1
MLB_VIP_FILTER_SHIFT = 20
MLB_FIB_CACHE_NS = 200_000_000
MLB_FIB_CACHE_SLOTS = 4096

MLB_BE_F_VALID = 1 << 0
MLB_BE_F_LOCAL = 1 << 1
MLB_BE_F_DOWN = 1 << 2
MLB_BE_F_EXTERNAL = 1 << 3

MLB_CT_F_NAT = 1 << 0
MLB_CT_F_ESTABLISHED = 1 << 1
MLB_CT_F_PEER_SEEN = 1 << 2
MLB_CT_F_CLOSING = 1 << 3

MLB_SNAT_F_VALID = 1 << 0

MLB_CLOCK_SHIFT = 4
MLB_PROG_ICMP = 0
MLB_PROG_TOO_BIG = 1
MLB_PROG_MAX = 2
MLB_NEIGH_META_MAGIC = 0x6D6C6E68
MLB_NEIGH_MISSING_SIZE = 1024

MLB_EVICT_BATCH = 256
MLB_EVICT_OP_AUTO = 0
MLB_EVICT_OP_FORWARD = 1
MLB_EVICT_OP_BACKEND = 2
MLB_EVICT_OP_EXPIRE = 3
MLB_EVICT_NONE = 0
MLB_EVICT_FORWARD = 1
MLB_EVICT_BACKEND = 2
MLB_EVICT_EXPIRED = 3


class Counter(enum.IntEnum):
    """enum mlb_counter: index into the per-CPU "counters" array."""

    RX = 0
    PASS_NOT_IP = 1
    PASS_MALFORMED = 2
    PASS_BAD_IHL = 3
    PASS_FRAGMENT = 4
    PASS_V6_EXT = 5
    PASS_UNKNOWN_L4 = 6
    PASS_NOT_VIP = 7
    PASS_LOCAL = 8
    PASS_FROM_PEER = 9
    PASS_NEIGH_RESOLVE = 10
    PASS_ICMP_NO_FLOW = 11
    DROP_FIB = 12
    DROP_NO_TABLE = 13
    DROP_NO_BACKEND = 14
    DROP_NO_SNAT = 15
    DROP_SNAT_EXHAUSTED = 16
    DROP_UDP6_ZERO_CSUM = 17
    DROP_FIB_OTHER = 18
    DROP_NO_NEIGH = 19
    DROP_TOO_BIG = 20
    DROP_BACKEND_FAMILY = 21
    CT_HIT = 22
    CT_MISS = 23
    CT_RESELECT = 24
    CT_INSERT = 25
    CT_INSERT_FAIL = 26
    NAT_REPLY = 27
    NAT_REPLY_MISS = 28
    TX = 29
    REDIRECT = 30
    FIB_CACHED = 31
    CT_SKIP_CLOSING = 32
    PASS_NAT_NO_FLOW = 33
    CT_CLOSED_HIT = 34
    CT_HANDSHAKE_RESET = 35
    ICMP_TOO_BIG = 36
    ICMP_TO_BACKEND = 37
    NEIGH_SENT = 38
    FIB_RC = 39  # first of MLB_FIB_RC_SLOTS slots, one per bpf_fib_lookup return code


MLB_CNT_MAX = Counter.FIB_RC + MLB_FIB_RC_SLOTS
# the reasons the balancer drops a packet for (every other one passes it)
MLB_CNT_DROP_FIRST = Counter.DROP_FIB
MLB_CNT_DROP_LAST = Counter.DROP_BACKEND_FAMILY


class TracerStat(enum.IntEnum):
    """enum mlb_tracer_stat: index into the tracer's per-CPU "tracer_stats" array."""

    EMITTED = 0
    RINGBUF_FULL = 1
    RECOVERED = 2
    RESET = 3
    RESET_LIMITED = 4
    LOCAL_EVICTED = 5
    SOCKOPS = 6


MLB_TRACER_STAT_MAX = len(TracerStat)

# C enum -> (its Python mirror, the prefix of its constants), for the header check.
C_ENUMS: dict[str, tuple[type[enum.IntEnum], str]] = {
    "mlb_counter": (Counter, "MLB_CNT_"),
    "mlb_tracer_stat": (TracerStat, "MLB_TRACER_STAT_"),
}

# bpf_fib_lookup return codes (include/uapi/linux/bpf.h), to name the FIB_RC slots.
FIB_RC_NAMES = {
    1: "blackhole", 2: "unreachable", 3: "prohibit", 4: "not_fwded", 5: "fwd_disabled",
    6: "unsupp_lwt", 7: "no_neigh", 8: "frag_needed", 9: "no_src_addr",
}


class _Struct(ctypes.Structure):
    """Native-aligned like the BPF target (x86-64 and arm64 BPF are little endian,
    natural alignment), which is what the BTF test checks."""

    def __bytes__(self) -> bytes:  # pragma: no cover - trivial
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def from_bytes(cls, raw: bytes):
        if len(raw) < ctypes.sizeof(cls):
            raise ValueError(f"{cls.__name__}: {len(raw)} bytes, need {ctypes.sizeof(cls)}")
        return cls.from_buffer_copy(bytes(raw[:ctypes.sizeof(cls)]))

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and bytes(self) == bytes(other)

    def __hash__(self) -> int:
        return hash(bytes(self))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={_show(getattr(self, n))}" for n, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


def _show(v):
    if isinstance(v, ctypes.Array):
        return list(v)
    return v


# ------------------------------------------------------ lead-owned (tracer uses)
class FlowKey(_Struct):
    _fields_ = [
        ("src", u32 * 4),
        ("dst", u32 * 4),
        ("sport", u16),
        ("dport", u16),
        ("proto", u8),
        ("family", u8),
        ("pad", u8 * 2),
    ]


class EndpointKey(_Struct):
    _fields_ = [
        ("addr", u32 * 4),
        ("port", u16),
        ("proto", u8),
        ("family", u8),
    ]


class EndpointFilter(_Struct):
    _fields_ = [
        ("rport_lo", u16),
        ("rport_hi", u16),
    ]


class SockEvent(_Struct):
    _fields_ = [
        ("key", FlowKey),
        ("netns_cookie", u64),
        ("timestamp_ns", u64),
        ("oldstate", u32),
        ("pad", u32),
    ]


class TracerConfig(_Struct):
    _fields_ = [("netns_cookie", u64)]


# ------------------------------------------------------------------ balancer
class VipKey(_Struct):
    _fields_ = [
        ("addr", u32 * 4),
        ("port", u16),
        ("proto", u8),
        ("family", u8),
    ]


class VipMeta(_Struct):
    _fields_ = [
        ("vip_id", u32),
        ("flags", u32),
        ("ring_size", u32),
        ("gen", u32),
    ]


class Backend(_Struct):
    _fields_ = [
        ("addr", u32 * 4),
        ("port", u16),
        ("family", u8),
        ("pad", u8),
        ("flags", u32),
    ]


class CtValue(_Struct):
    _fields_ = [
        ("last_seen_ns", u64),
        ("backend_id", u32),
        ("flags", u32),
        ("vip_id", u32),
        ("vip_gen", u32),
        ("snat_port", u16),
        ("pad", u16),
        ("syn_seq", u32),
    ]


class FibCache(_Struct):
    _fields_ = [
        ("addr", u32 * 4),
        ("dmac", u8 * 6),
        ("smac", u8 * 6),
        ("ifindex", u32),
        ("ingress_ifindex", u32),
        ("mtu", u32),
        ("family", u8),
        ("pad", u8 * 3),
        ("expires_ns", u64),
    ]


class NatRevValue(_Struct):
    _fields_ = [
        ("orig", FlowKey),
        ("last_seen_ns", u64),
        ("backend_id", u32),
        ("pad", u32),
    ]


class SnatConfig(_Struct):
    _fields_ = [
        ("addr", u32 * 4),
        ("port_lo", u16),
        ("port_hi", u16),
        ("flags", u32),
    ]


class ClockSync(_Struct):
    _fields_ = [
        ("hz", u32),
        ("pad", u32),
        ("jiffies", u64),
        ("mono_ns", u64),
    ]


class NeighMeta(_Struct):
    _fields_ = [
        ("magic", u32),
        ("ifindex", u32),
        ("family", u32),
        ("nh", u32 * 4),
    ]


class NeighKey(_Struct):
    _fields_ = [
        ("addr", u32 * 4),
        ("ifindex", u32),
        ("family", u8),
        ("pad", u8 * 3),
    ]


class NeighSeen(_Struct):
    _fields_ = [
        ("first_ns", u64),
        ("last_ns", u64),
        ("packets", u64),
    ]


class EvictSlot(_Struct):
    _fields_ = [
        ("key", FlowKey),
        ("op", u32),
        ("result", u32),
        ("ct", CtValue),
    ]


class EvictBatch(_Struct):
    _fields_ = [
        ("count", u32),
        ("pad", u32),
        ("slots", EvictSlot * MLB_EVICT_BATCH),
    ]


class LbStats(_Struct):
    _fields_ = [("packets", u64), ("bytes", u64)]


# ------------------------------------------------------ kernel UAPI, for tests
class XdpMd(_Struct):
    """struct xdp_md: the ctx of BPF_PROG_TEST_RUN for XDP (ingress_ifindex makes
    bpf_fib_lookup work inside test runs)."""

    _fields_ = [
        ("data", u32),
        ("data_end", u32),
        ("data_meta", u32),
        ("ingress_ifindex", u32),
        ("rx_queue_index", u32),
        ("egress_ifindex", u32),
    ]


# Python class -> C struct name, for the BTF check.
C_NAMES: dict[type, str] = {
    FlowKey: "flow_key",
    EndpointKey: "endpoint_key",
    EndpointFilter: "endpoint_filter",
    SockEvent: "sock_event",
    TracerConfig: "tracer_config",
    VipKey: "vip_key",
    VipMeta: "vip_meta",
    Backend: "backend",
    CtValue: "ct_value",
    FibCache: "fib_cache",
    NatRevValue: "nat_rev_value",
    SnatConfig: "snat_config",
    ClockSync: "clock_sync",
    NeighMeta: "neigh_meta",
    NeighKey: "neigh_key",
    NeighSeen: "neigh_seen",
    EvictSlot: "evict_slot",
    EvictBatch: "evict_batch",
    LbStats: "lb_stats",
    XdpMd: "xdp_md",
}


# Every map of the two objects (bpf/balancer_maps.h, bpf/tracer_maps.h): name ->
# (key, value) as Python reads and writes its entries; OPAQUE for a map whose entries
# no Python code touches (the programs' own scratch, a ring buffer's records, the
# inner tables of vip_tables, which Python creates itself). Checked against the BTF.
OPAQUE = None
BALANCER_MAPS: dict[str, tuple[type, type] | None] = {
    "vips": (VipKey, VipMeta),
    "vip_info": (u32, VipMeta),
    "vip_filter": (u32, u32),
    "fib_cache": (u32, FibCache),
    "vip_tables": OPAQUE,
    "backends": (u32, Backend),
    "conntrack": (FlowKey, CtValue),
    "nat_reverse": (FlowKey, NatRevValue),
    "ct_closed": (FlowKey, CtValue),
    "snat_cfg": (u32, SnatConfig),
    "counters": (u32, u64),           # indexed by Counter
    "vip_stats": (u32, LbStats),
    "backend_stats": (u32, LbStats),
    "evict_batch": (u32, EvictBatch),
    "progs": OPAQUE,                  # program fds, written once at load
    "too_big_mtu": OPAQUE,
    "neigh_handoff": (u32, u32),
    "neigh_missing": (NeighKey, NeighSeen),
}
TRACER_MAPS: dict[str, tuple[type, type] | None] = {
    "watched_endpoints": (EndpointKey, EndpointFilter),
    "sock_events": OPAQUE,            # ring buffer of SockEvent
    "tracer_stats": (u32, u64),       # indexed by TracerStat
    "primary_seen": OPAQUE,
    "sockops_closed": OPAQUE,
    "reset_budget": OPAQUE,
    # stand-ins the agent replaces with the balancer's own maps
    "conntrack": BALANCER_MAPS["conntrack"],
    "ct_closed": BALANCER_MAPS["ct_closed"],
    "backends": BALANCER_MAPS["backends"],
}
# object file stem -> its maps
MAPS = {"balancer": BALANCER_MAPS, "tracer": TRACER_MAPS}


# ------------------------------------------------------------------ helpers
_WORDS = struct.Struct("<4I")  # a C __u32[4] as this (little-endian) host stores it


def packed_addr(addr) -> bytes:
    """The 4 or 16 bytes of an address given as text (or an ipaddress object).

    Text goes through inet_pton: the agent converts addresses for every eviction, and
    ipaddress costs about ten times more."""
    if type(addr) is str:
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                return socket.inet_pton(fam, addr)
            except OSError:
                pass
        raise ValueError(f"{addr!r} does not appear to be an IPv4 or IPv6 address")
    return ipaddress.ip_address(addr).packed


def addr_words(addr) -> tuple[int, tuple[int, int, int, int]]:
    """(family, 4 u32 words as stored in a C __u32[4]) of an IP address."""
    raw = packed_addr(addr)
    fam = AF_INET if len(raw) == 4 else AF_INET6
    return fam, _WORDS.unpack(raw.ljust(16, b"\0"))


def words_addr(words, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = _WORDS.pack(*words)
    return ipaddress.ip_address(raw[:4] if family == AF_INET else raw)


def words_text(words, family: int) -> str:
    """Text of the address in a C __u32[4] (inet_ntop: cheap, for per-event use)."""
    raw = _WORDS.pack(*words)
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def addr_slot(addr) -> int:
    """addr_slot() of the C: slot of vip_filter; masked, of fib_cache."""
    fam, w = addr_words(addr)
    x = w[0]
    if fam == AF_INET6:
        x ^= w[1] ^ w[2] ^ w[3]
    return ((x * MLB_VIP_FILTER_MULT) & 0xFFFFFFFF) >> MLB_VIP_FILTER_SHIFT


vip_filter_slot = addr_slot


def fib_cache_slot(addr) -> int:
    return addr_slot(addr) & (MLB_FIB_CACHE_SLOTS - 1)


def port_be(port: int) -> int:
    """A port as the u16 the C side stores (network order, read natively)."""
    return socket.htons(port)


def port_host(raw: int) -> int:
    return socket.ntohs(raw)


def flow_key(src, sport: int, dst, dport: int, proto: int) -> FlowKey:
    fam, s = addr_words(src)
    fam2, d = addr_words(dst)
    if fam != fam2:
        raise ValueError("src and dst of a flow must be the same family")
    k = FlowKey()
    k.src[:] = s
    k.dst[:] = d
    k.sport = port_be(sport)
    k.dport = port_be(dport)
    k.proto = proto
    k.family = fam
    return k


_FLOW_KEY = struct.Struct("!16s16sHHBB2x")  # struct flow_key; ports in network order
_PACKED: dict[str, bytes] = {}  # address text -> 16 bytes as in a flow key


def flow_key_bytes(src: str, sport: int, dst: str, dport: int, proto: int) -> bytes:
    """bytes(flow_key(...)) for text addresses, without the ctypes structure: the
    agent builds one for every eviction it receives, and clients and VIPs repeat."""
    s = _PACKED.get(src)
    if s is None:
        s = _packed16(src)
    d = _PACKED.get(dst)
    if d is None:
        d = _packed16(dst)
    if s[0] != d[0]:
        raise ValueError("src and dst of a flow must be the same family")
    try:
        return _FLOW_KEY.pack(s[1:], d[1:], sport, dport, proto, s[0])
    except struct.error as exc:
        raise ValueError(f"flow key: {exc}") from None


def _packed16(text: str) -> bytes:
    raw = packed_addr(text)
    v = bytes([AF_INET if len(raw) == 4 else AF_INET6]) + raw.ljust(16, b"\0")
    if len(_PACKED) >= 4096:
        _PACKED.clear()
    _PACKED[text] = v
    return v


def describe_flow(k: FlowKey) -> dict:
    return {
        "src": words_text(k.src, k.family), "sport": port_host(k.sport),
        "dst": words_text(k.dst, k.family), "dport": port_host(k.dport),
        "proto": k.proto, "family": k.family,
    }
