"""The cluster file (TOML) -> typed, validated, frozen configuration.

Everything that can be wrong with a configuration is reported before the agent touches the
kernel, as one ``ConfigError`` line that names the file and the field::

    cluster.toml: vips[1].mode: expected "dr" or "nat", got "dsr"

Three steps, so that the pure part is testable anywhere:

* ``parse(text)`` / ``load(path)``: syntax, types, ranges, unknown keys, cross-field rules.
  Reads nothing but the TOML file itself.
* ``merge_cli(config, ...)``: command-line flags override the file; their values go
  through the same checks and errors name the flag (``command line: --bind: ...``).
* ``validate_host(config)``: what depends on this machine: the interface exists, the key
  file is readable and well formed. Returns the key ring.

``diff_live(old, new)`` tells a SIGHUP reload what it may apply in place and what needs a
restart. cluster.toml.example documents every option with its default; the dataclass
defaults below are the single source of those defaults.
"""
from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import ipaddress
import os
import re
import secrets
import socket
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, NoReturn, Sequence

__all__ = [
    "ConfigError",
    "HostPort",
    "NodeConfig",
    "ClusterConfig",
    "VipConfig",
    "HealthConfig",
    "ConntrackConfig",
    "DrainConfig",
    "Config",
    "TIMING_KNOBS",
    "KEY_BYTES",
    "parse",
    "load",
    "default_config",
    "merge_cli",
    "validate_host",
    "load_key_ring",
    "generate_key",
    "diff_live",
]

DEFAULT_GOSSIP_PORT = 7946
DEFAULT_RING_SIZE = 65537
MAX_RING_SIZE = 1 << 24
KEY_BYTES = 32  # AES-256-GCM and ChaCha20-Poly1305 both take 32-byte keys

# Protocol knobs that [cluster.timings] may override, by name, with their kind. The
# protocol module (meshlb.cluster.protocol_config) owns their meaning, presets and
# cross-checks; this list gates spelling and type so a typo fails at load time with the
# field named. Durations are in seconds.
TIMING_KNOBS: Mapping[str, type] = MappingProxyType(
    {
        "probe_interval": float,
        "probe_timeout": float,
        "indirect_checks": int,
        "suspicion_mult": float,
        "suspicion_max_timeout_mult": float,
        "retransmit_mult": int,
        "gossip_interval": float,
        "gossip_nodes": int,
        "gossip_max_datagrams": int,
        "push_pull_interval": float,
        "awareness_max_multiplier": int,
        "dead_reap_interval": float,
        "eviction_retransmit_mult": int,
        "max_datagram": int,
    }
)

XDP_MODES = ("native", "generic", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
DISCOVERY_KINDS = ("unicast", "multicast", "broadcast")
PRESETS = ("lan", "wan", "local")
PROTOCOLS = ("tcp", "udp")
MODES = ("dr", "nat")
HEALTH_KINDS = ("tcp", "http")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Linux: IFNAMSIZ is 16 including the NUL; '/' and whitespace are rejected by the kernel
_IFACE_RE = re.compile(r"^[^/\s:]{1,15}$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class ConfigError(Exception):
    """A configuration problem, always one line: ``<file>: <field>: <what is wrong>``."""


# --- value types --------------------------------------------------------------------


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    pin_dir: str
    control: str
    iface: str | None = None
    bind: HostPort = HostPort("0.0.0.0", DEFAULT_GOSSIP_PORT)
    # None: the agent advertises the first address of iface
    advertise: HostPort | None = None
    xdp_mode: str = "auto"
    metrics: HostPort | None = HostPort("127.0.0.1", 9477)
    log_level: str = "info"


@dataclass(frozen=True)
class ClusterConfig:
    key_file: str
    label: str = "meshlb"
    peers: tuple[HostPort, ...] = ()
    discovery: str = "unicast"
    multicast_group: HostPort = HostPort("239.77.77.77", DEFAULT_GOSSIP_PORT)
    multicast_ttl: int = 1
    broadcast_address: str = "255.255.255.255"
    preset: str = "lan"
    max_datagram: int = 1400
    timings: Mapping[str, int | float] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class VipConfig:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    protocol: str = "tcp"
    mode: str = "dr"
    ring_size: int = DEFAULT_RING_SIZE
    # the rest applies to mode = "nat" only
    backend_port: int | None = None
    snat_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    snat_ports: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """Stable text identity, e.g. ``10.0.0.1:80/tcp`` (used in table digests)."""
        return f"{HostPort(str(self.address), self.port)}/{self.protocol}"

    @property
    def target_port(self) -> int:
        """The port backends listen on: ``backend_port`` (nat) or the VIP's own."""
        return self.backend_port or self.port


DEFAULT_SNAT_PORTS = (10000, 32767)


@dataclass(frozen=True)
class HealthConfig:
    interval: float = 2.0
    timeout: float = 1.0
    kind: str = "tcp"
    http_path: str = "/"
    rise: int = 2
    fall: int = 3
    # True: every member; False: none (membership alone decides); or a tuple of names
    check_peers: bool | tuple[str, ...] = True
    # None: each VIP's backend_port (or port)
    app_port: int | None = None


@dataclass(frozen=True)
class ConntrackConfig:
    max_entries: int = 262144
    idle_timeout_s: float = 300.0
    sweep_interval_s: float = 30.0
    # a TCP entry whose handshake the client never acknowledged; 0 keeps them
    handshake_timeout_s: float = 10.0
    # cgroup v2 directory whose sockets' closes a sock_ops program reports besides the
    # tracepoint: "auto" (the root of the first cgroup2 mount), "off", or a path
    sockops_cgroup: str = "auto"


@dataclass(frozen=True)
class DrainConfig:
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    cluster: ClusterConfig
    vips: tuple[VipConfig, ...] = ()
    health: HealthConfig = HealthConfig()
    conntrack: ConntrackConfig = ConntrackConfig()
    drain: DrainConfig = DrainConfig()
    # where it came from, for error messages; not part of the configuration's value
    source: str = field(default="cluster.toml", compare=False)
    _raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _base_dir: str | None = field(default=None, compare=False, repr=False)


# --- parsing helpers --------------------------------------------------------------


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"


def _choices(opts: Sequence[str]) -> str:
    quoted = [f'"{o}"' for o in opts]
    if len(quoted) == 2:
        return f"{quoted[0]} or {quoted[1]}"
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def _next_prime(n: int) -> int:
    from meshlb.maglev import is_prime

    n = max(n, 2)
    while not is_prime(n):
        n += 1
    return n


class _Parser:
    """Carries the file name and the CLI overrides so every error can be located."""

    def __init__(self, source: str, cli_labels: Mapping[str, str] | None = None):
        self.source = source
        self.cli_labels = dict(cli_labels or {})

    def fail(self, path: str, msg: str) -> NoReturn:
        for dotted, flag in self.cli_labels.items():
            if path == dotted or path.startswith(dotted + "["):
                raise ConfigError(f"command line: {flag}{path[len(dotted):]}: {msg}")
        raise ConfigError(f"{self.source}: {path}: {msg}")

    def table(self, value: Any, path: str, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table, got {_show(value)}")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            where = f"{path}.{unknown[0]}" if path else unknown[0]
            self.fail(where, f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    # Each getter takes the table, its dotted path and the key, and returns the default
    # when the key is absent.

    def string(self, t: dict, path: str, key: str, default: Any, choices: Sequence[str] | None = None):
        if key not in t:
            return default
        v = t[key]
        where = f"{path}.{key}"
        if choices is not None and (not isinstance(v, str) or v not in choices):
            self.fail(where, f"expected {_choices(choices)}, got {_show(v)}")
        if not isinstance(v, str):
            self.fail(where, f"expected a string, got {_show(v)}")
        return v

    def integer(self, t: dict, path: str, key: str, default: Any, lo: int | None = None, hi: int | None = None):
        if key not in t:
            return default
        return self.int_value(t[key], f"{path}.{key}", lo, hi)

    def int_value(self, v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(where, f"expected an integer, got {_show(v)}")
        if lo is not None and v < lo or hi is not None and v > hi:
            if hi is None:
                self.fail(where, f"expected an integer >= {lo}, got {v}")
            self.fail(where, f"expected an integer in {lo}..{hi}, got {v}")
        return v

    def number(self, t: dict, path: str, key: str, default: Any, *, positive: bool = False):
        if key not in t:
            return default
        return self.num_value(t[key], f"{path}.{key}", positive=positive)

    def num_value(self, v: Any, where: str, *, positive: bool) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(where, f"expected a number, got {_show(v)}")
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(where, f"expected a finite number, got {v}")
        if positive and v <= 0:
            self.fail(where, f"expected a number > 0, got {v}")
        if not positive and v < 0:
            self.fail(where, f"expected a number >= 0, got {v}")
        return float(v)

    def boolean(self, t: dict, path: str, key: str, default: Any):
        if key not in t:
            return default
        v = t[key]
        if not isinstance(v, bool):
            self.fail(f"{path}.{key}", f"expected true or false, got {_show(v)}")
        return v

    def ip(self, v: Any, where: str):
        if not isinstance(v, str):
            self.fail(where, f"expected an IP address string, got {_show(v)}")
        try:
            return ipaddress.ip_address(v)
        except ValueError:
            self.fail(where, f"expected an IPv4 or IPv6 address, got {_show(v)}")

    def host_port(self, v: Any, where: str, *, default_port: int | None, ip_only: bool) -> HostPort:
        """Parse ``host:port``, ``[v6]:port``, or (with a default port) a bare host."""
        if not isinstance(v, str):
            self.fail(where, f"expected a string \"host:port\", got {_show(v)}")
        form = '"address:port"' if ip_only else '"host:port"'
        host, port_text = v, None
        if v.startswith("["):
            close = v.find("]")
            if close < 0 or (close + 1 < len(v) and v[close + 1] != ":"):
                self.fail(where, f"expected {form}, got {_show(v)}")
            host = v[1:close]
            port_text = v[close + 2 :] if close + 1 < len(v) else None
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                self.fail(where, f"expected an IPv6 address inside [], got {_show(v)}")
        elif v.count(":") == 1:
            host, port_text = v.split(":")
        elif v.count(":") > 1:
            # a bare IPv6 address: the port cannot be told apart without brackets
            pass
        if port_text is None:
            if default_port is None:
                self.fail(where, f"expected {form} with a port, got {_show(v)}")
            port = default_port
        else:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                self.fail(where, f"expected a port in 1..65535 in {form}, got {_show(v)}")
            port = int(port_text)
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        if addr is None:
            if ip_only:
                self.fail(where, f"expected an IP address in {form}, got {_show(v)}")
            # all-numeric names would be read as (bad) IPv4 addresses by resolvers
            if not _HOSTNAME_RE.match(host) or re.fullmatch(r"[\d.]+", host):
                self.fail(where, f"expected a host name or IP address in {form}, got {_show(v)}")
            return HostPort(host, port)
        return HostPort(str(addr), port)

    def abs_path(self, t: dict, path: str, key: str, default: str) -> str:
        v = self.string(t, path, key, default)
        if not os.path.isabs(v):
            self.fail(f"{path}.{key}", f"expected an absolute path, got {_show(v)}")
        return os.path.normpath(v)


# --- sections -----------------------------------------------------------------------


def _parse_node(p: _Parser, raw: Any) -> NodeConfig:
    keys = ("name", "iface", "bind", "advertise", "xdp_mode", "pin_dir", "control", "metrics", "log_level")
    t = p.table(raw, "node", keys)
    d = NodeConfig
    name = p.string(t, "node", "name", None)
    if name is None:
        name = socket.gethostname().split(".")[0]
        if not _NAME_RE.match(name):
            p.fail("node.name", f"the host name {_show(name)} is not a valid member name; set node.name")
    elif not _NAME_RE.match(name):
        p.fail("node.name", f"expected 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit, got {_show(name)}")

    iface = p.string(t, "node", "iface", None)
    if iface is not None and (not _IFACE_RE.match(iface) or iface in (".", "..")):
        p.fail("node.iface", f"expected an interface name (1-15 characters, no '/', ':' or spaces), got {_show(iface)}")

    bind = d.bind
    if "bind" in t:
        bind = p.host_port(t["bind"], "node.bind", default_port=None, ip_only=True)

    advertise = None
    if "advertise" in t:
        advertise = p.host_port(t["advertise"], "node.advertise", default_port=bind.port, ip_only=True)
        a = ipaddress.ip_address(advertise.host)
        if a.is_unspecified or a.is_multicast:
            p.fail("node.advertise", f"expected an address peers can reach, got {_show(t['advertise'])}")

    metrics: HostPort | None = d.metrics
    if "metrics" in t:
        if t["metrics"] == "":
            metrics = None
        else:
            metrics = p.host_port(t["metrics"], "node.metrics", default_port=None, ip_only=True)

    return NodeConfig(
        name=name,
        iface=iface,
        bind=bind,
        advertise=advertise,
        xdp_mode=p.string(t, "node", "xdp_mode", d.xdp_mode, XDP_MODES),
        pin_dir=p.abs_path(t, "node", "pin_dir", f"/sys/fs/bpf/meshlb/{name}"),
        control=p.abs_path(t, "node", "control", f"/run/meshlb/{name}.sock"),
        metrics=metrics,
        log_level=p.string(t, "node", "log_level", d.log_level, LOG_LEVELS),
    )


def _parse_cluster(p: _Parser, raw: Any, node: NodeConfig, base_dir: str | None) -> ClusterConfig:
    keys = (
        "label", "key_file", "peers", "discovery", "multicast_group", "multicast_ttl",
        "broadcast_address", "preset", "max_datagram", "timings",
    )
    t = p.table(raw, "cluster", keys)
    d = ClusterConfig

    label = p.string(t, "cluster", "label", d.label)
    if not _NAME_RE.match(label):
        p.fail("cluster.label", f"expected 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit, got {_show(label)}")

    if "key_file" not in t:
        p.fail("cluster.key_file", "required: gossip is authenticated with a shared key (create one with `meshlb keygen` or the lab)")
    key_file = p.string(t, "cluster", "key_file", None)
    if not key_file:
        p.fail("cluster.key_file", "expected a path, got \"\"")
    if not os.path.isabs(key_file) and base_dir is not None:
        # relative to the cluster file, so a directory with both can be moved as a whole
        key_file = os.path.join(base_dir, key_file)
    key_file = os.path.normpath(key_file)

    peers: list[HostPort] = []
    if "peers" in t:
        if not isinstance(t["peers"], list):
            p.fail("cluster.peers", f"expected an array of \"host[:port]\" strings, got {_show(t['peers'])}")
        for i, v in enumerate(t["peers"]):
            peers.append(p.host_port(v, f"cluster.peers[{i}]", default_port=node.bind.port, ip_only=False))

    group = d.multicast_group
    if "multicast_group" in t:
        group = p.host_port(t["multicast_group"], "cluster.multicast_group", default_port=node.bind.port, ip_only=True)
        if not ipaddress.ip_address(group.host).is_multicast:
            p.fail("cluster.multicast_group", f"expected a multicast address, got {_show(t['multicast_group'])}")

    bcast = d.broadcast_address
    if "broadcast_address" in t:
        a = p.ip(t["broadcast_address"], "cluster.broadcast_address")
        if a.version != 4:
            p.fail("cluster.broadcast_address", f"broadcast is IPv4 only, got {_show(t['broadcast_address'])}")
        bcast = str(a)

    max_dgram = p.integer(t, "cluster", "max_datagram", d.max_datagram, 512, 65507)

    timings: dict[str, int | float] = {}
    if "timings" in t:
        tt = p.table(t["timings"], "cluster.timings", tuple(TIMING_KNOBS))
        for k, v in tt.items():
            where = f"cluster.timings.{k}"
            if TIMING_KNOBS[k] is int:
                timings[k] = p.int_value(v, where, lo=1)
            else:
                timings[k] = p.num_value(v, where, positive=True)
        if "max_datagram" in timings:
            if "max_datagram" in t and t["max_datagram"] != timings["max_datagram"]:
                p.fail("cluster.timings.max_datagram", f"conflicts with cluster.max_datagram = {t['max_datagram']}; set one")
            max_dgram = p.int_value(timings.pop("max_datagram"), "cluster.timings.max_datagram", 512, 65507)

    preset = p.string(t, "cluster", "preset", d.preset, PRESETS)
    _check_protocol(p, preset, timings, max_dgram)

    return ClusterConfig(
        label=label,
        key_file=key_file,
        peers=tuple(peers),
        discovery=p.string(t, "cluster", "discovery", d.discovery, DISCOVERY_KINDS),
        multicast_group=group,
        multicast_ttl=p.integer(t, "cluster", "multicast_ttl", d.multicast_ttl, 1, 255),
        broadcast_address=bcast,
        preset=preset,
        max_datagram=max_dgram,
        timings=MappingProxyType(dict(sorted(timings.items()))),
    )


def _check_protocol(p: _Parser, preset: str, timings: Mapping[str, int | float], max_dgram: int) -> None:
    """Let the protocol's own rules (e.g. probe_timeout <= probe_interval) judge the
    preset with the overrides applied, so a bad combination fails here, not at join."""
    from meshlb.cluster.protocol_config import ProtocolConfig

    try:
        ProtocolConfig.preset(preset, **{**timings, "max_datagram": max_dgram})
    except (ValueError, TypeError) as exc:
        where = "cluster.timings" if timings else "cluster.max_datagram"
        p.fail(where, f"{exc} (preset \"{preset}\" with these overrides)")


def _parse_vip(p: _Parser, raw: Any, i: int) -> VipConfig:
    path = f"vips[{i}]"
    keys = ("address", "port", "protocol", "mode", "ring_size", "backend_port", "snat_address", "snat_ports")
    t = p.table(raw, path, keys)
    d = VipConfig
    for req in ("address", "port"):
        if req not in t:
            p.fail(f"{path}.{req}", "required")
    address = p.ip(t["address"], f"{path}.address")
    if address.is_unspecified or address.is_multicast:
        p.fail(f"{path}.address", f"expected a unicast address, got {_show(t['address'])}")
    port = p.int_value(t["port"], f"{path}.port", 1, 65535)
    mode = p.string(t, path, "mode", d.mode, MODES)

    ring = p.integer(t, path, "ring_size", d.ring_size, 2, MAX_RING_SIZE)
    if _next_prime(ring) != ring:
        p.fail(f"{path}.ring_size", f"expected a prime number (Maglev needs one), got {ring}; the next prime is {_next_prime(ring)}")

    if mode != "nat":
        for k in ("backend_port", "snat_address", "snat_ports"):
            if k in t:
                p.fail(f"{path}.{k}", 'only valid with mode = "nat"')
        return VipConfig(address=address, port=port, protocol=p.string(t, path, "protocol", d.protocol, PROTOCOLS),
                         mode=mode, ring_size=ring)

    snat_address = None
    if "snat_address" in t:
        snat_address = p.ip(t["snat_address"], f"{path}.snat_address")
        if snat_address.version != address.version:
            p.fail(f"{path}.snat_address", f"expected an IPv{address.version} address like the VIP, got {_show(t['snat_address'])}")
        if snat_address.is_unspecified or snat_address.is_multicast:
            p.fail(f"{path}.snat_address", f"expected a unicast address, got {_show(t['snat_address'])}")

    snat_ports = DEFAULT_SNAT_PORTS
    if "snat_ports" in t:
        v = t["snat_ports"]
        m = re.fullmatch(r"(\d{1,5})-(\d{1,5})", v) if isinstance(v, str) else None
        lo, hi = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        if not m or not (1 <= lo <= hi <= 65535):
            p.fail(f"{path}.snat_ports", f'expected "low-high" with 1 <= low <= high <= 65535, got {_show(v)}')
        snat_ports = (lo, hi)

    return VipConfig(
        address=address,
        port=port,
        protocol=p.string(t, path, "protocol", d.protocol, PROTOCOLS),
        mode=mode,
        ring_size=ring,
        backend_port=p.integer(t, path, "backend_port", port, 1, 65535),
        snat_address=snat_address,
        snat_ports=snat_ports,
    )


def _parse_vips(p: _Parser, raw: Any) -> tuple[VipConfig, ...]:
    if not isinstance(raw, list):
        p.fail("vips", f"expected an array of tables ([[vips]]), got {_show(raw)}")
    vips: list[VipConfig] = []
    seen: dict[tuple, int] = {}
    mode_of: dict[Any, tuple[str, int]] = {}
    for i, item in enumerate(raw):
        v = _parse_vip(p, item, i)
        ident = (v.address, v.port, v.protocol)
        if ident in seen:
            p.fail(f"vips[{i}]", f"{v.key} is already defined in vips[{seen[ident]}]")
        seen[ident] = i
        # In DR mode the VIP address is configured on every mix and packets keep it as
        # destination; in NAT mode it is rewritten. One address cannot be both, or
        # traffic for a NAT port would also be answered by the DR-configured address.
        prev = mode_of.get(v.address)
        if prev is not None and prev[0] != v.mode:
            p.fail(f"vips[{i}].mode", f"{v.address} is \"{prev[0]}\" in vips[{prev[1]}]; an address takes one mode")
        mode_of.setdefault(v.address, (v.mode, i))
        vips.append(v)
    return tuple(vips)


def _parse_health(p: _Parser, raw: Any) -> HealthConfig:
    keys = ("interval", "timeout", "kind", "http_path", "rise", "fall", "check_peers", "app_port")
    t = p.table(raw, "health", keys)
    d = HealthConfig
    interval = p.number(t, "health", "interval", d.interval, positive=True)
    timeout = p.number(t, "health", "timeout", d.timeout, positive=True)
    if timeout > interval:
        p.fail("health.timeout", f"must not exceed health.interval ({interval:g}), got {timeout:g}")
    http_path = p.string(t, "health", "http_path", d.http_path)
    # the path goes verbatim into a request line: no spaces or control characters
    if not http_path.startswith("/") or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in http_path):
        p.fail("health.http_path", f"expected a path starting with \"/\" without spaces, got {_show(http_path)}")

    check_peers: bool | tuple[str, ...] = d.check_peers
    if "check_peers" in t:
        v = t["check_peers"]
        if isinstance(v, bool):
            check_peers = v
        elif isinstance(v, list):
            names = []
            for j, n in enumerate(v):
                if not isinstance(n, str) or not _NAME_RE.match(n):
                    p.fail(f"health.check_peers[{j}]", f"expected a member name, got {_show(n)}")
                if n in names:
                    p.fail(f"health.check_peers[{j}]", f"duplicate member name {_show(n)}")
                names.append(n)
            check_peers = tuple(names)
        else:
            p.fail("health.check_peers", f"expected true, false or an array of member names, got {_show(v)}")

    return HealthConfig(
        interval=interval,
        timeout=timeout,
        kind=p.string(t, "health", "kind", d.kind, HEALTH_KINDS),
        http_path=http_path,
        rise=p.integer(t, "health", "rise", d.rise, 1, 100),
        fall=p.integer(t, "health", "fall", d.fall, 1, 100),
        check_peers=check_peers,
        app_port=p.integer(t, "health", "app_port", d.app_port, 1, 65535),
    )


def _parse_conntrack(p: _Parser, raw: Any) -> ConntrackConfig:
    t = p.table(raw, "conntrack", ("max_entries", "idle_timeout_s", "sweep_interval_s",
                                   "handshake_timeout_s", "sockops_cgroup"))
    d = ConntrackConfig
    cgroup = p.string(t, "conntrack", "sockops_cgroup", d.sockops_cgroup)
    if cgroup not in ("auto", "off"):
        if not os.path.isabs(cgroup):
            p.fail("conntrack.sockops_cgroup", f'expected "auto", "off" or an absolute path, got {_show(cgroup)}')
        cgroup = os.path.normpath(cgroup)
    return ConntrackConfig(
        max_entries=p.integer(t, "conntrack", "max_entries", d.max_entries, 1, 1 << 28),
        idle_timeout_s=p.number(t, "conntrack", "idle_timeout_s", d.idle_timeout_s),
        sweep_interval_s=p.number(t, "conntrack", "sweep_interval_s", d.sweep_interval_s, positive=True),
        handshake_timeout_s=p.number(t, "conntrack", "handshake_timeout_s", d.handshake_timeout_s),
        sockops_cgroup=cgroup,
    )


def _parse_drain(p: _Parser, raw: Any) -> DrainConfig:
    t = p.table(raw, "drain", ("timeout_s",))
    return DrainConfig(timeout_s=p.number(t, "drain", "timeout_s", DrainConfig.timeout_s))


def _build(doc: Mapping[str, Any], source: str, base_dir: str | None, cli_labels: Mapping[str, str] | None = None) -> Config:
    p = _Parser(source, cli_labels)
    p.table(doc, "", ("node", "cluster", "vips", "health", "conntrack", "drain"))
    node = _parse_node(p, doc.get("node", {}))
    if "cluster" not in doc:
        p.fail("cluster", "required: the [cluster] table (at least key_file)")
    cluster = _parse_cluster(p, doc["cluster"], node, base_dir)
    return Config(
        node=node,
        cluster=cluster,
        vips=_parse_vips(p, doc.get("vips", [])),
        health=_parse_health(p, doc.get("health", {})),
        conntrack=_parse_conntrack(p, doc.get("conntrack", {})),
        drain=_parse_drain(p, doc.get("drain", {})),
        source=source,
        _raw=copy.deepcopy(dict(doc)),
        _base_dir=base_dir,
    )


# --- public entry points ----------------------------------------------------------


def parse(text: str, source: str = "cluster.toml", base_dir: str | None = None) -> Config:
    """Parse cluster-file text. ``base_dir`` anchors a relative key_file."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {' '.join(str(exc).split())}") from None
    return _build(doc, source, base_dir)


def load(path: str | os.PathLike[str]) -> Config:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start})") from None
    return parse(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


_CLI_FLAGS = {
    "node.name": "--name",
    "node.iface": "--iface",
    "node.bind": "--bind",
    "node.control": "--control",
    "cluster.peers": "--peers",
}


DEFAULT_KEY_FILE = "/etc/meshlb/cluster.key"


def default_config(key_file: str = DEFAULT_KEY_FILE) -> Config:
    """The configuration of a node started without a cluster file (flags only)."""
    return _build({"cluster": {"key_file": key_file}}, "defaults", None)


def merge_cli(
    config: Config,
    *,
    peers: Sequence[str] | None = None,
    iface: str | None = None,
    name: str | None = None,
    bind: str | None = None,
    control: str | None = None,
) -> Config:
    """Apply command-line overrides (None = not given) and re-validate.

    The file is re-evaluated with the overrides in place, so values derived from others
    follow them: ``--name`` moves the default pin_dir and control socket, ``--bind``
    changes the default port of peers given without one. ``--peers`` replaces the list.
    """
    doc = copy.deepcopy(dict(config._raw))
    labels = {}
    for dotted, value in (
        ("node.name", name), ("node.iface", iface), ("node.bind", bind),
        ("node.control", control),
        ("cluster.peers", list(peers) if peers is not None else None),
    ):
        if value is None:
            continue
        section, key = dotted.split(".")
        doc.setdefault(section, {})
        if isinstance(doc[section], dict):
            doc[section][key] = value
        labels[dotted] = _CLI_FLAGS[dotted]
    return _build(doc, config.source, config._base_dir, labels)


def generate_key() -> str:
    """A new cluster key as one line of hex, the format load_key_ring reads."""
    return secrets.token_hex(KEY_BYTES)


def load_key_ring(path: str, source: str = "cluster.toml") -> tuple[bytes, ...]:
    """Read the cluster key file: one key per line (64 hex digits or base64 of 32 bytes),
    blank lines and ``#`` comments ignored. The first key seals outgoing datagrams; all of
    them open incoming ones, which is how a key is rotated without a flag day."""
    where = f"{source}: cluster.key_file"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        # the key lets anyone forge evictions and membership: like an ssh private key,
        # refuse one that other users can read or change
        raise ConfigError(f"{where}: {path} is accessible to group or others (mode {mode & 0o777:04o}); "
                          f"chmod 600 it")
    keys: list[bytes] = []
    for lineno, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key = None
        if re.fullmatch(r"[0-9a-fA-F]{%d}" % (2 * KEY_BYTES), line):
            key = bytes.fromhex(line)
        else:
            try:
                decoded = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            if len(decoded) == KEY_BYTES:
                key = decoded
        if key == bytes(KEY_BYTES):
            raise ConfigError(f"{where}: {path} line {lineno}: the all-zero key is a placeholder, not a secret")
        if key is None:
            # never echo the line: it may be a mistyped secret
            raise ConfigError(f"{where}: {path} line {lineno}: expected a {KEY_BYTES}-byte key as {2 * KEY_BYTES} hex digits or base64")
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ConfigError(f"{where}: {path} holds no key")
    return tuple(keys)


def validate_host(config: Config, *, sys_class_net: str = "/sys/class/net") -> tuple[bytes, ...]:
    """Checks that need this machine. Returns the key ring (see load_key_ring)."""
    iface = config.node.iface
    if iface is None:
        raise ConfigError(f"{config.source}: node.iface: required (set it in the file or pass --iface)")
    if sys_class_net == "/sys/class/net":
        # /sys shows the namespace that mounted it, not necessarily ours (an agent
        # started in a namespace by setns alone): ask the kernel in our own namespace
        try:
            socket.if_nametoindex(iface)
            found = True
        except OSError:
            found = False
    else:
        found = os.path.exists(os.path.join(sys_class_net, iface))
    if not found:
        raise ConfigError(f"{config.source}: node.iface: no interface named {_show(iface)} on this host")
    return load_key_ring(config.cluster.key_file, config.source)


# --- live reload ------------------------------------------------------------------

# What a SIGHUP can change in place. Everything else is fixed for the agent's life:
# identity (name), kernel attachment (iface, xdp_mode, pin_dir, map sizes), listening
# sockets (bind, control, metrics, discovery) and cluster identity (label).
_LIVE_FIELDS = {
    "node": {"log_level"},
    "cluster": {"key_file", "peers", "preset", "max_datagram", "timings"},
    "health": {f.name for f in dataclasses.fields(HealthConfig)},
    "conntrack": {"idle_timeout_s", "sweep_interval_s", "handshake_timeout_s"},
    "drain": {"timeout_s"},
}


def diff_live(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Compare two configurations for a reload: (changes applied live, changes that need
    a restart). Entries name the field, e.g. ``health.interval``,
    ``cluster.timings.probe_interval``, ``vips: add 10.0.0.2:80/tcp``. The key file is
    re-read on every reload whether or not its path changed; that is not listed here."""
    applied: list[str] = []
    restart: list[str] = []
    for section in ("node", "cluster", "health", "conntrack", "drain"):
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va == vb:
                continue
            if section == "cluster" and f.name == "timings":
                for k in sorted(set(va) | set(vb)):
                    if va.get(k) != vb.get(k):
                        applied.append(f"cluster.timings.{k}")
                continue
            (applied if f.name in _LIVE_FIELDS[section] else restart).append(f"{section}.{f.name}")

    before = {v.key: v for v in old.vips}
    after = {v.key: v for v in new.vips}
    for k in before.keys() - after.keys():
        applied.append(f"vips: remove {k}")
    for k in after.keys() - before.keys():
        applied.append(f"vips: add {k}")
    for k in before.keys() & after.keys():
        if before[k] != after[k]:
            changed = [f.name for f in dataclasses.fields(VipConfig) if getattr(before[k], f.name) != getattr(after[k], f.name)]
            applied.append(f"vips: change {k} ({', '.join(changed)})")
    return _sorted_vips_last(applied), restart


def _sorted_vips_last(items: list[str]) -> list[str]:
    plain = [i for i in items if not i.startswith("vips:")]
    vips = sorted(i for i in items if i.startswith("vips:"))
    return plain + vips
