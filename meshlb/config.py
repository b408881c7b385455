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
restart.

Each option is declared once, as a field of the dataclass of its table::

    interval: float = option(2.0, number(positive=True), live=True)

The field's name is the key, its default the default (cluster.toml.example shows the same
defaults, and a test holds the two together), ``read`` turns the TOML value into the
field's value or fails naming the field, ``check`` is a rule about that value alone, and
``live`` says a reload applies a change in place (otherwise it needs a restart). One walker
(``_read_fields``) derives from these declarations the known keys, the required ones, the
defaults and the types; ``diff_live`` derives what is live. Rules that involve several
fields (timeout <= interval, nat-only keys, one mode per address, ...) are functions
registered with ``@_rules(Table)``, run once that table's fields are read.
"""
from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import functools
import ipaddress
import os
import re
import secrets
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from meshlb import maglev
from meshlb.cluster.protocol_config import ProtocolConfig

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
    "DEFAULT_SNAT_PORTS",
    "parse",
    "load",
    "default_config",
    "merge_cli",
    "validate_host",
    "load_key_ring",
    "generate_key",
    "diff_live",
    "option_paths",
]

DEFAULT_GOSSIP_PORT = 7946
DEFAULT_KEY_FILE = "/etc/meshlb/cluster.key"
# Source ports of NAT-mode VIPs: below the kernel's default ephemeral range (32768-60999),
# so they do not collide with the host's own outgoing connections.
DEFAULT_SNAT_PORTS = (10000, 32767)
MAX_RING_SIZE = 1 << 24
# as IPVS: weights 0..65535 (0 takes no new flow)
MAX_WEIGHT = 65535
DEFAULT_WEIGHT = 1
KEY_BYTES = 32  # AES-256-GCM and ChaCha20-Poly1305 both take 32-byte keys

# The protocol knobs [cluster.timings] may override, with their kind: the fields of
# ProtocolConfig declared tunable. The protocol module owns their meaning, presets and
# cross-checks; here they are gated by spelling and type, so a typo fails at load time
# with the field named. Durations are in seconds.
# by annotation, as text (postponed annotations) or as the type itself
_PROTOCOL_TYPES: Mapping[Any, type] = {"int": int, "float": float, int: int, float: float}
TIMING_KNOBS: Mapping[str, type] = MappingProxyType(
    {f.name: _PROTOCOL_TYPES[f.type] for f in dataclasses.fields(ProtocolConfig) if f.metadata.get("tunable")}
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Linux: IFNAMSIZ is 16 including the NUL; '/' and whitespace are rejected by the kernel
_IFACE_RE = re.compile(r"^[^/\s:]{1,15}$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class ConfigError(Exception):
    """A configuration problem, always one line: ``<file>: <field>: <what is wrong>``."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- reading values -----------------------------------------------------------------


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


class _Reader:
    """What every read needs: the file name and the command-line overrides, to locate an
    error; the directory of the file; and the values read so far by dotted path
    (``values["node.bind"]``), for defaults that follow an earlier field."""

    def __init__(self, source: str, base_dir: str | None = None, cli_labels: Mapping[str, str] | None = None):
        self.source = source
        self.base_dir = base_dir
        self.cli_labels = dict(cli_labels or {})
        self.values: dict[str, Any] = {}

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


# (reader, the TOML value, its dotted path) -> the field's value, or reader.fail(...)
Read = Callable[[_Reader, Any, str], Any]
# (the field's value, the TOML value) -> what is wrong with it, or None
Check = Callable[[Any, Any], "str | None"]


def text(*choices: str) -> Read:
    """A string; with ``choices``, one of them."""

    def read(r: _Reader, v: Any, where: str) -> str:
        if choices and (not isinstance(v, str) or v not in choices):
            r.fail(where, f"expected {_choices(choices)}, got {_show(v)}")
        if not isinstance(v, str):
            r.fail(where, f"expected a string, got {_show(v)}")
        return v

    return read


def integer(lo: int | None = None, hi: int | None = None) -> Read:
    def read(r: _Reader, v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            r.fail(where, f"expected an integer, got {_show(v)}")
        if lo is not None and v < lo or hi is not None and v > hi:
            if hi is None:
                r.fail(where, f"expected an integer >= {lo}, got {v}")
            r.fail(where, f"expected an integer in {lo}..{hi}, got {v}")
        return v

    return read


def number(*, positive: bool = False) -> Read:
    """A finite number (an integer is taken as a float), >= 0 or, if ``positive``, > 0."""

    def read(r: _Reader, v: Any, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            r.fail(where, f"expected a number, got {_show(v)}")
        if v != v or v in (float("inf"), float("-inf")):
            r.fail(where, f"expected a finite number, got {v}")
        if positive and v <= 0:
            r.fail(where, f"expected a number > 0, got {v}")
        if not positive and v < 0:
            r.fail(where, f"expected a number >= 0, got {v}")
        return float(v)

    return read


def flag() -> Read:
    def read(r: _Reader, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            r.fail(where, f"expected true or false, got {_show(v)}")
        return v

    return read


def ip_address(*, as_text: bool = False) -> Read:
    """An IPv4 or IPv6 address, as an ``ipaddress`` object or (``as_text``) its text."""

    def read(r: _Reader, v: Any, where: str) -> Any:
        if not isinstance(v, str):
            r.fail(where, f"expected an IP address string, got {_show(v)}")
        try:
            a = ipaddress.ip_address(v)
        except ValueError:
            r.fail(where, f"expected an IPv4 or IPv6 address, got {_show(v)}")
        return str(a) if as_text else a

    return read


def host_port(*, ip_only: bool, port_from: str | None = None, blank_is_none: bool = False) -> Read:
    """``host:port``, ``[v6]:port``, or a bare host taking the port of the HostPort read
    at ``port_from`` (e.g. "node.bind"); without ``port_from`` the port is required.
    ``ip_only``: the host must be an address, not a name. ``blank_is_none``: "" is None."""

    def read(r: _Reader, v: Any, where: str) -> HostPort | None:
        if blank_is_none and v == "":
            return None
        default_port = r.values[port_from].port if port_from else None
        return _host_port(r, v, where, default_port=default_port, ip_only=ip_only)

    return read


def _host_port(r: _Reader, v: Any, where: str, *, default_port: int | None, ip_only: bool) -> HostPort:
    if not isinstance(v, str):
        r.fail(where, f"expected a string \"host:port\", got {_show(v)}")
    form = '"address:port"' if ip_only else '"host:port"'
    host, port_text = v, None
    if v.startswith("["):
        close = v.find("]")
        if close < 0 or (close + 1 < len(v) and v[close + 1] != ":"):
            r.fail(where, f"expected {form}, got {_show(v)}")
        host = v[1:close]
        port_text = v[close + 2 :] if close + 1 < len(v) else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            r.fail(where, f"expected an IPv6 address inside [], got {_show(v)}")
    elif v.count(":") == 1:
        host, port_text = v.split(":")
    elif v.count(":") > 1:
        # a bare IPv6 address: the port cannot be told apart without brackets
        pass
    if port_text is None:
        if default_port is None:
            r.fail(where, f"expected {form} with a port, got {_show(v)}")
        port = default_port
    else:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            r.fail(where, f"expected a port in 1..65535 in {form}, got {_show(v)}")
        port = int(port_text)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is None:
        if ip_only:
            r.fail(where, f"expected an IP address in {form}, got {_show(v)}")
        # all-numeric names would be read as (bad) IPv4 addresses by resolvers
        if not _HOSTNAME_RE.match(host) or re.fullmatch(r"[\d.]+", host):
            r.fail(where, f"expected a host name or IP address in {form}, got {_show(v)}")
        return HostPort(host, port)
    return HostPort(str(addr), port)


def absolute_path() -> Read:
    def read(r: _Reader, v: Any, where: str) -> str:
        v = text()(r, v, where)
        if not os.path.isabs(v):
            r.fail(where, f"expected an absolute path, got {_show(v)}")
        return os.path.normpath(v)

    return read


class _Array:
    """An array whose items are read with ``item``; the value is a tuple."""

    def __init__(self, item: Read, of: str):
        self.item, self.of = item, of

    def __call__(self, r: _Reader, v: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(v, list):
            r.fail(where, f"expected an array of {self.of}, got {_show(v)}")
        return tuple(self.item(r, x, f"{where}[{i}]") for i, x in enumerate(v))


def array(item: Read, *, of: str) -> Read:
    """``of`` names the items in the error for a non-array: 'expected an array of <of>'."""
    return _Array(item, of)


class _Table:
    """A TOML table read into ``cls``, a dataclass whose fields are declared with option()."""

    def __init__(self, cls: type):
        self.cls = cls

    def __call__(self, r: _Reader, v: Any, where: str) -> Any:
        return self.cls(**_read_fields(r, self.cls, v, where))


def tables(cls: type, *, of: str) -> Read:
    """An array of tables (``[[name]]``), each read into ``cls``. When ``cls`` has a
    ``key`` property, diff_live reports changes per item by that key."""
    return _Array(_Table(cls), of)


class _Knobs:
    """A table of named counts and durations, each of a kind (int or float), all > 0."""

    def __init__(self, kinds: Mapping[str, type]):
        self.kinds = kinds

    def __call__(self, r: _Reader, v: Any, where: str) -> Mapping[str, int | float]:
        t = r.table(v, where, tuple(self.kinds))
        out = {}
        for k, x in t.items():
            read = integer(lo=1) if self.kinds[k] is int else number(positive=True)
            out[k] = read(r, x, f"{where}.{k}")
        return MappingProxyType(dict(sorted(out.items())))


@dataclass(frozen=True)
class _Option:
    read: Read
    check: Check | None
    when_absent: Callable[[_Reader, str], Any] | None
    required: str
    live: bool
    only_with: tuple[str, Any] | None


_OPTION = "meshlb.config.option"


def option(
    default: Any = MISSING,
    read: Read | None = None,
    *,
    factory: Any = MISSING,
    check: Check | None = None,
    when_absent: Callable[[_Reader, str], Any] | None = None,
    required: str = "",
    live: bool = False,
    only_with: tuple[str, Any] | None = None,
) -> Any:
    """Declare a dataclass field as an option of the file.

    When the key is absent: ``when_absent(reader, path)`` if given (a default computed
    from fields read before), else ``default`` / ``factory()``, else it is required
    (``required`` says why, after "required: "). ``live``: a reload applies a change of
    it in place; otherwise diff_live lists it as needing a restart. ``only_with=(key,
    value)``: the key may be given only when the option ``key``, declared before it in
    the same table, has that value.
    """
    if read is None:
        raise TypeError("option() needs read=")
    meta = {_OPTION: _Option(read, check, when_absent, required, live, only_with)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, default: Any = MISSING, *, required: str = "") -> Any:
    """A ``[table]`` of options read into ``cls``. Absent, it reads as an empty table (its
    options' defaults), unless ``required``. ``default`` is for constructing in code."""
    read = _Table(cls)
    absent = None if required else (lambda r, where: read(r, {}, where))
    return option(default, read, when_absent=absent, required=required)


# --- single-field checks --------------------------------------------------------------


def _member_name(v: str, raw: Any) -> str | None:
    if not _NAME_RE.match(v):
        return f"expected 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit, got {_show(v)}"
    return None


def _host_name(r: _Reader, where: str) -> str:
    name = socket.gethostname().split(".")[0]
    if not _NAME_RE.match(name):
        r.fail(where, f"the host name {_show(name)} is not a valid member name; set node.name")
    return name


def _interface_name(v: str, raw: Any) -> str | None:
    if not _IFACE_RE.match(v) or v in (".", ".."):
        return f"expected an interface name (1-15 characters, no '/', ':' or spaces), got {_show(v)}"
    return None


def _reachable(hp: HostPort, raw: Any) -> str | None:
    a = ipaddress.ip_address(hp.host)
    if a.is_unspecified or a.is_multicast:
        return f"expected an address peers can reach, got {_show(raw)}"
    return None


def _multicast(hp: HostPort, raw: Any) -> str | None:
    if not ipaddress.ip_address(hp.host).is_multicast:
        return f"expected a multicast address, got {_show(raw)}"
    return None


def _ipv4(a: str, raw: Any) -> str | None:
    if ipaddress.ip_address(a).version != 4:
        return f"broadcast is IPv4 only, got {_show(raw)}"
    return None


def _unicast(a: ipaddress.IPv4Address | ipaddress.IPv6Address, raw: Any) -> str | None:
    if a.is_unspecified or a.is_multicast:
        return f"expected a unicast address, got {_show(raw)}"
    return None


def _prime(n: int, raw: Any) -> str | None:
    nxt = max(n, 2)
    while not maglev.is_prime(nxt):
        nxt += 1
    if nxt != n:
        return f"expected a prime number (Maglev needs one), got {n}; the next prime is {nxt}"
    return None


def _request_path(p: str, raw: Any) -> str | None:
    # the path goes verbatim into a request line: no spaces or control characters
    if not p.startswith("/") or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in p):
        return f"expected a path starting with \"/\" without spaces, got {_show(p)}"
    return None


def _key_file(r: _Reader, v: Any, where: str) -> str:
    v = text()(r, v, where)
    if not v:
        r.fail(where, "expected a path, got \"\"")
    if not os.path.isabs(v) and r.base_dir is not None:
        # relative to the cluster file, so a directory with both can be moved as a whole
        v = os.path.join(r.base_dir, v)
    return os.path.normpath(v)


def _check_peers(r: _Reader, v: Any, where: str) -> bool | tuple[str, ...]:
    if isinstance(v, bool):
        return v
    if not isinstance(v, list):
        r.fail(where, f"expected true, false or an array of member names, got {_show(v)}")
    names: list[str] = []
    for j, n in enumerate(v):
        if not isinstance(n, str) or not _NAME_RE.match(n):
            r.fail(f"{where}[{j}]", f"expected a member name, got {_show(n)}")
        if n in names:
            r.fail(f"{where}[{j}]", f"duplicate member name {_show(n)}")
        names.append(n)
    return tuple(names)


def _port_range(r: _Reader, v: Any, where: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,5})-(\d{1,5})", v) if isinstance(v, str) else None
    lo, hi = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if not m or not (1 <= lo <= hi <= 65535):
        r.fail(where, f'expected "low-high" with 1 <= low <= high <= 65535, got {_show(v)}')
    return lo, hi


def _cgroup(r: _Reader, v: Any, where: str) -> str:
    v = text()(r, v, where)
    if v in ("auto", "off"):
        return v
    if not os.path.isabs(v):
        r.fail(where, f'expected "auto", "off" or an absolute path, got {_show(v)}')
    return os.path.normpath(v)


def _vip_members(r: _Reader, v: Any, where: str) -> tuple[str, ...] | None:
    """"all" (None: every member that serves the VIP), "none" (()) or member names."""
    if v == "all":
        return None
    if v == "none":
        return ()
    if not isinstance(v, list):
        r.fail(where, f'expected "all", "none" or an array of member names, got {_show(v)}')
    names: list[str] = []
    for j, n in enumerate(v):
        if not isinstance(n, str) or not _NAME_RE.match(n):
            r.fail(f"{where}[{j}]", f"expected a member name, got {_show(n)}")
        if n in names:
            r.fail(f"{where}[{j}]", f"{_show(n)} is listed twice (also {where}[{names.index(n)}])")
        names.append(n)
    return tuple(names)


def _server(r: _Reader, v: Any, where: str) -> HostPort:
    """"address[:port]" of a real server; port 0 when not given (the VIP's rule fills it)."""
    hp = _host_port(r, v, where, default_port=0, ip_only=True)
    a = ipaddress.ip_address(hp.host)
    if a.is_unspecified or a.is_multicast or a.is_loopback or a.is_link_local:
        r.fail(where, f"expected a unicast address a mix can reach, got {_show(v)}")
    return hp


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _show(k)


def _weights(r: _Reader, v: Any, where: str) -> tuple[tuple[str, int], ...]:
    """A table backend -> weight (an integer, 0 drains it); the VIP's rule resolves and
    checks the names. Kept as sorted pairs so that the VIP stays hashable."""
    if not isinstance(v, dict):
        r.fail(where, f"expected a table of backend = weight, got {_show(v)}")
    read = integer(0, MAX_WEIGHT)
    return tuple(sorted((k, read(r, w, f"{where}.{_toml_key(k)}")) for k, w in v.items()))


# --- the options ----------------------------------------------------------------------
# cluster.toml.example documents each of them, with the same default.


@dataclass(frozen=True)
class NodeConfig:
    # default: the host name up to the first dot
    name: str = option(read=text(), check=_member_name, when_absent=_host_name)
    pin_dir: str = option(read=absolute_path(), when_absent=lambda r, _: f"/sys/fs/bpf/meshlb/{r.values['node.name']}")
    control: str = option(read=absolute_path(), when_absent=lambda r, _: f"/run/meshlb/{r.values['node.name']}.sock")
    iface: str | None = option(None, text(), check=_interface_name)
    bind: HostPort = option(HostPort("0.0.0.0", DEFAULT_GOSSIP_PORT), host_port(ip_only=True))
    # None: the agent advertises the first address of iface
    advertise: HostPort | None = option(None, host_port(ip_only=True, port_from="node.bind"), check=_reachable)
    xdp_mode: str = option("auto", text("native", "generic", "auto"))
    metrics: HostPort | None = option(HostPort("127.0.0.1", 9477), host_port(ip_only=True, blank_is_none=True))
    log_level: str = option("info", text("debug", "info", "warning", "error"), live=True)
    # false: this node balances but backs no VIP (a dedicated balancer)
    serve: bool = option(True, flag(), live=True)
    # what the agent keeps across restarts and reboots (the cluster's drain map); the
    # default is for code that builds a NodeConfig, the file's is per name
    state_dir: str = option("/var/lib/meshlb", absolute_path(),
                            when_absent=lambda r, _: f"/var/lib/meshlb/{r.values['node.name']}")


@dataclass(frozen=True)
class ClusterConfig:
    key_file: str = option(
        read=_key_file, live=True,
        required="gossip is authenticated with a shared key (create one with `meshlb keygen` or the lab)",
    )
    label: str = option("meshlb", text(), check=_member_name)
    peers: tuple[HostPort, ...] = option(
        (), array(host_port(ip_only=False, port_from="node.bind"), of='"host[:port]" strings'), live=True
    )
    discovery: str = option("unicast", text("unicast", "multicast", "broadcast"))
    multicast_group: HostPort = option(
        HostPort("239.77.77.77", DEFAULT_GOSSIP_PORT), host_port(ip_only=True, port_from="node.bind"), check=_multicast
    )
    multicast_ttl: int = option(1, integer(1, 255))
    broadcast_address: str = option("255.255.255.255", ip_address(as_text=True), check=_ipv4)
    preset: str = option("lan", text("lan", "wan", "local"), live=True)
    max_datagram: int = option(1400, integer(512, 65507), live=True)
    timings: Mapping[str, int | float] = option(
        factory=lambda: MappingProxyType({}), read=_Knobs(TIMING_KNOBS), live=True
    )


@dataclass(frozen=True)
class VipConfig:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = option(read=ip_address(), check=_unicast)
    port: int = option(read=integer(1, 65535))
    protocol: str = option("tcp", text("tcp", "udp"))
    mode: str = option("dr", text("dr", "nat"))
    ring_size: int = option(maglev.DEFAULT_SIZE, integer(2, MAX_RING_SIZE), check=_prime)
    # with mode = "nat" the defaults are port and DEFAULT_SNAT_PORTS (see _vip)
    backend_port: int | None = option(None, integer(1, 65535), only_with=("mode", "nat"))
    snat_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = option(
        None, ip_address(), check=_unicast, only_with=("mode", "nat")
    )
    snat_ports: tuple[int, int] | None = option(None, _port_range, only_with=("mode", "nat"))
    # None: every member that serves the VIP; (): none (external servers only)
    members: tuple[str, ...] | None = option(None, _vip_members)
    # real servers that run no meshlb; the port is resolved by the VIP's rule (_vip)
    servers: tuple[HostPort, ...] = option((), array(_server, of='"address[:port]" strings'))
    # backend name (member name or server "address:port") -> weight, sorted; absent: 1
    weights: tuple[tuple[str, int], ...] = option((), _weights)

    @property
    def key(self) -> str:
        """Stable text identity, e.g. ``10.0.0.1:80/tcp`` (used in table digests)."""
        return f"{HostPort(str(self.address), self.port)}/{self.protocol}"

    @property
    def target_port(self) -> int:
        """The port the backends listen on."""
        return self.backend_port or self.port

    def weight(self, backend: str) -> int:
        """The file's weight of a backend (member name or server "address:port")."""
        for name, w in self.weights:
            if name == backend:
                return w
        return DEFAULT_WEIGHT


@dataclass(frozen=True)
class HealthConfig:
    interval: float = option(2.0, number(positive=True), live=True)
    timeout: float = option(1.0, number(positive=True), live=True)
    kind: str = option("tcp", text("tcp", "http"), live=True)
    http_path: str = option("/", text(), check=_request_path, live=True)
    rise: int = option(2, integer(1, 100), live=True)
    fall: int = option(3, integer(1, 100), live=True)
    # True: every member; False: none (membership alone decides); or a tuple of names
    check_peers: bool | tuple[str, ...] = option(True, _check_peers, live=True)
    # None: each VIP's backend_port (or port)
    app_port: int | None = option(None, integer(1, 65535), live=True)


@dataclass(frozen=True)
class ConntrackConfig:
    # the conntrack map's size; None: sized for this host (meshlb/dataplane/capacity.py)
    max_entries: int | None = option(None, integer(1, 1 << 28))
    idle_timeout_s: float = option(300.0, number(), live=True)
    sweep_interval_s: float = option(30.0, number(positive=True), live=True)
    # a TCP entry whose handshake the client never acknowledged; 0 keeps them
    handshake_timeout_s: float = option(10.0, number(), live=True)
    # a flow to a real server (no tracer reports its close) that saw a FIN or RST and
    # has been quiet this long is over; 0 keeps such entries until idle_timeout_s
    closing_timeout_s: float = option(10.0, number(), live=True)
    # cgroup v2 directory whose sockets' closes a sock_ops program reports besides the
    # tracepoint: "auto" (the root of the first cgroup2 mount), "off", or a path
    sockops_cgroup: str = option("auto", _cgroup)


@dataclass(frozen=True)
class DrainConfig:
    timeout_s: float = option(30.0, number(), live=True)


@dataclass(frozen=True)
class Config:
    node: NodeConfig = section(NodeConfig)
    cluster: ClusterConfig = section(ClusterConfig, required="the [cluster] table (at least key_file)")
    vips: tuple[VipConfig, ...] = option((), tables(VipConfig, of="tables ([[vips]])"), live=True)
    health: HealthConfig = section(HealthConfig, HealthConfig())
    conntrack: ConntrackConfig = section(ConntrackConfig, ConntrackConfig())
    drain: DrainConfig = section(DrainConfig, DrainConfig())
    # where it came from, for error messages; not part of the configuration's value
    source: str = field(default="cluster.toml", compare=False)
    _raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _base_dir: str | None = field(default=None, compare=False, repr=False)


# --- rules between fields ---------------------------------------------------------------
# Each gets the reader, the table's path, its values (which it may complete) and the keys
# the file gave; it runs after the table's own fields are read, before it is built.

_Rule = Callable[[_Reader, str, dict[str, Any], Mapping[str, Any]], None]
_RULES: dict[type, _Rule] = {}


def _rules(cls: type) -> Callable[[_Rule], _Rule]:
    def register(fn: _Rule) -> _Rule:
        if cls in _RULES:
            raise TypeError(f"{cls.__name__} has rules already ({_RULES[cls].__name__}): put them in one function")
        _RULES[cls] = fn
        return fn

    return register


@_rules(ClusterConfig)
def _cluster(r: _Reader, path: str, got: dict[str, Any], given: Mapping[str, Any]) -> None:
    timings = dict(got["timings"])
    if "max_datagram" in timings:
        # a protocol knob too, but it sizes buffers outside the protocol: kept in one field
        where = f"{path}.timings.max_datagram"
        if "max_datagram" in given and given["max_datagram"] != timings["max_datagram"]:
            r.fail(where, f"conflicts with {path}.max_datagram = {given['max_datagram']}; set one")
        got["max_datagram"] = _option_of(ClusterConfig, "max_datagram").read(r, timings.pop("max_datagram"), where)
        got["timings"] = MappingProxyType(timings)
    # the protocol's own rules (e.g. probe_timeout <= probe_interval) judge the preset with
    # the overrides applied, so a bad combination fails here, not at join
    try:
        ProtocolConfig.preset(got["preset"], **{**timings, "max_datagram": got["max_datagram"]})
    except (ValueError, TypeError) as exc:
        where = f"{path}.timings" if timings else f"{path}.max_datagram"
        r.fail(where, f"{exc} (preset \"{got['preset']}\" with these overrides)")


@_rules(VipConfig)
def _vip(r: _Reader, path: str, got: dict[str, Any], given: Mapping[str, Any]) -> None:
    if got["mode"] == "nat":
        if got["backend_port"] is None:
            got["backend_port"] = got["port"]
        if got["snat_ports"] is None:
            got["snat_ports"] = DEFAULT_SNAT_PORTS
        snat, vip = got["snat_address"], got["address"]
        if snat is not None and snat.version != vip.version:
            r.fail(f"{path}.snat_address", f"expected an IPv{vip.version} address like the VIP, got {_show(given['snat_address'])}")
    got["servers"] = _vip_servers(r, path, got)
    got["weights"] = _vip_weights(r, path, got, given)
    if got["members"] == () and not got["servers"]:
        members = '"none"' if given.get("members") == "none" else "[]"
        r.fail(path, f"no possible backend: members = {members} and no servers")


def _vip_servers(r: _Reader, path: str, got: dict[str, Any]) -> tuple[HostPort, ...]:
    """Each server with its port: nat, the one given or the VIP's backend port; dr keeps
    the VIP's port (only the MACs change), so a server must listen on it."""
    vip, mode = got["address"], got["mode"]
    out: list[HostPort] = []
    for j, hp in enumerate(got["servers"]):
        where = f"{path}.servers[{j}]"
        a = ipaddress.ip_address(hp.host)
        if a.version != vip.version:
            why = ("in dr mode the server receives the client's packets to the VIP unchanged, so it must "
                   "hold the VIP itself" if mode == "dr" else "nat translates within one address family")
            r.fail(where, f"{hp.host} is IPv{a.version} and the VIP {vip} is IPv{vip.version}: {why}")
        if a == vip:
            r.fail(where, f"{hp.host} is the VIP itself")
        if mode == "dr":
            if hp.port not in (0, got["port"]):
                r.fail(where, f"dr does not change the destination port: the server must listen on "
                              f"{got['port']} (drop the port), got {hp.port}")
            port = got["port"]
        else:
            port = hp.port or got["backend_port"]
        resolved = HostPort(hp.host, port)
        if resolved in out:
            r.fail(where, f"{resolved} is listed twice (also {path}.servers[{out.index(resolved)}])")
        out.append(resolved)
    return tuple(out)


def _vip_weights(r: _Reader, path: str, got: dict[str, Any], given: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """The weights' keys as backend names: a member of the VIP (any member when members
    = "all"), or one of its servers as "address[:port]" (the port as for servers)."""
    servers, members = got["servers"], got["members"]
    out: dict[str, tuple[str, int]] = {}
    for key, w in got["weights"]:
        where = f"{path}.weights.{_toml_key(key)}"
        if _NAME_RE.match(key) and not _is_address(key):
            if members == ():
                r.fail(where, "members = \"none\": no member backs this VIP")
            if members is not None and key not in members:
                r.fail(where, f"{_show(key)} is not in {path}.members")
            name = key
        else:
            hp = _host_port(r, key, where, default_port=0, ip_only=True)
            port = (hp.port or got["backend_port"]) if got["mode"] == "nat" else (hp.port or got["port"])
            name = str(HostPort(hp.host, port))
            if HostPort(hp.host, port) not in servers:
                r.fail(where, f"{name} is not one of {path}.servers")
        if name in out:
            r.fail(where, f"{name} is weighted twice (also {path}.weights.{_toml_key(out[name][0])})")
        out[name] = (key, w)
    return tuple(sorted((name, w) for name, (_, w) in out.items()))


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@_rules(HealthConfig)
def _health(r: _Reader, path: str, got: dict[str, Any], given: Mapping[str, Any]) -> None:
    if got["timeout"] > got["interval"]:
        r.fail(f"{path}.timeout", f"must not exceed {path}.interval ({got['interval']:g}), got {got['timeout']:g}")


@_rules(Config)
def _vips(r: _Reader, path: str, got: dict[str, Any], given: Mapping[str, Any]) -> None:
    seen: dict[tuple, int] = {}
    mode_of: dict[Any, tuple[str, int]] = {}
    for i, v in enumerate(got["vips"]):
        ident = (v.address, v.port, v.protocol)
        if ident in seen:
            r.fail(f"vips[{i}]", f"{v.key} is already defined in vips[{seen[ident]}]")
        seen[ident] = i
        # In DR mode the VIP address is configured on every mix and packets keep it as
        # destination; in NAT mode it is rewritten. One address cannot be both, or
        # traffic for a NAT port would also be answered by the DR-configured address.
        prev = mode_of.setdefault(v.address, (v.mode, i))
        if prev[0] != v.mode:
            r.fail(f"vips[{i}].mode", f"{v.address} is \"{prev[0]}\" in vips[{prev[1]}]; an address takes one mode")


# --- the walker -------------------------------------------------------------------------


@functools.cache
def _options(cls: type) -> tuple[tuple[dataclasses.Field, _Option], ...]:
    opts = tuple((f, f.metadata[_OPTION]) for f in dataclasses.fields(cls) if _OPTION in f.metadata)
    for i, (f, o) in enumerate(opts):
        # the walker reads in declaration order: what a field depends on must come first
        if o.only_with is not None and o.only_with[0] not in [g.name for g, _ in opts[:i]]:
            raise TypeError(f"{cls.__name__}.{f.name}: only_with names {o.only_with[0]!r}, not an option declared before it")
    return opts


def _option_of(cls: type, name: str) -> _Option:
    return next(o for f, o in _options(cls) if f.name == name)


def _read_fields(r: _Reader, cls: type, raw: Any, path: str) -> dict[str, Any]:
    """Read the table ``raw`` at ``path`` as the options of ``cls``: unknown keys,
    required keys, each value, then the table's rules. Returns the constructor's kwargs."""
    opts = _options(cls)
    given = r.table(raw, path, [f.name for f, _ in opts])
    got: dict[str, Any] = {}
    for f, o in opts:
        where = f"{path}.{f.name}" if path else f.name
        if f.name in given:
            if o.only_with is not None and got[o.only_with[0]] != o.only_with[1]:
                r.fail(where, f"only valid with {o.only_with[0]} = {_show(o.only_with[1])}")
            value = o.read(r, given[f.name], where)
            problem = o.check(value, given[f.name]) if o.check else None
            if problem:
                r.fail(where, problem)
        elif o.when_absent is not None:
            value = o.when_absent(r, where)
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            r.fail(where, f"required: {o.required}" if o.required else "required")
        got[f.name] = r.values[where] = value
    if cls in _RULES:
        _RULES[cls](r, path, got, given)
    return got


def option_paths(cls: type = Config, prefix: str = "") -> Iterator[str]:
    """Every option the file takes, as a dotted path: ``node.name``, ``vips.port`` (an
    array of tables without an index), ``cluster.timings.probe_interval``."""
    for f, o in _options(cls):
        path = prefix + f.name
        read = o.read.item if isinstance(o.read, _Array) else o.read
        if isinstance(read, _Table):
            yield from option_paths(read.cls, path + ".")
        elif isinstance(read, _Knobs):
            yield from (f"{path}.{k}" for k in read.kinds)
        else:
            yield path


def _build(doc: Mapping[str, Any], source: str, base_dir: str | None, cli_labels: Mapping[str, str] | None = None) -> Config:
    r = _Reader(source, base_dir, cli_labels)
    return Config(**_read_fields(r, Config, doc, ""), source=source, _raw=copy.deepcopy(dict(doc)), _base_dir=base_dir)


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
        table, key = dotted.split(".")
        doc.setdefault(table, {})
        if isinstance(doc[table], dict):
            doc[table][key] = value
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
        if re.fullmatch(rf"[0-9a-fA-F]{{{2 * KEY_BYTES}}}", line):
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
# What a SIGHUP can change in place is declared by each option (live=True). Everything
# else is fixed for the agent's life: identity (name), kernel attachment (iface, xdp_mode,
# pin_dir, map sizes), listening sockets (bind, control, metrics, discovery) and cluster
# identity (label).


def diff_live(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Compare two configurations for a reload: (changes applied live, changes that need
    a restart). Entries name the field, e.g. ``health.interval``,
    ``cluster.timings.probe_interval``, ``vips: add 10.0.0.2:80/tcp``; the entries of
    arrays of tables come last, sorted. The key file is re-read on every reload whether or
    not its path changed; that is not listed here."""
    # live? -> (fields, array entries)
    out: dict[bool, tuple[list[str], list[str]]] = {True: ([], []), False: ([], [])}
    _diff(Config, old, new, "", out)
    return [*out[True][0], *sorted(out[True][1])], [*out[False][0], *sorted(out[False][1])]


def _diff(cls: type, a: Any, b: Any, prefix: str, out: dict[bool, tuple[list[str], list[str]]]) -> None:
    for f, o in _options(cls):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va == vb:
            continue
        path = prefix + f.name
        if isinstance(o.read, _Table):
            _diff(o.read.cls, va, vb, path + ".", out)
            continue
        fields, entries = out[o.live]
        keyed = isinstance(o.read, _Array) and isinstance(o.read.item, _Table) and hasattr(o.read.item.cls, "key")
        if isinstance(va, Mapping):
            fields += [f"{path}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        elif keyed:
            entries += _diff_items(path, va, vb)
        else:
            fields.append(path)


def _diff_items(path: str, old: Sequence[Any], new: Sequence[Any]) -> list[str]:
    before = {v.key: v for v in old}
    after = {v.key: v for v in new}
    out = [f"{path}: remove {k}" for k in before.keys() - after.keys()]
    out += [f"{path}: add {k}" for k in after.keys() - before.keys()]
    for k in before.keys() & after.keys():
        if before[k] != after[k]:
            changed = [f.name for f in dataclasses.fields(before[k]) if getattr(before[k], f.name) != getattr(after[k], f.name)]
            out.append(f"{path}: change {k} ({', '.join(changed)})")
    return out
