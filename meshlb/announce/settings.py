"""What the announcement subsystem is told by the cluster file (``[announce]``).

Plain frozen dataclasses with their defaults; reading and checking the file is the
config module's job, which builds these. Durations are seconds unless the name says
otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("none", "bgp", "l2")
SPEAKERS = ("managed", "external")


@dataclass(frozen=True)
class Neighbor:
    """A BGP neighbour of this mix (managed speaker)."""

    address: str
    asn: int
    port: int = 179
    password: str = ""  # TCP MD5 (RFC 2385); "" = none
    # 0: directly connected (the session and BFD are single-hop); n: up to n hops away
    multihop: int = 0
    # This mix's address for the session ("": the kernel picks); a multihop session
    # with BFD needs one.
    local_address: str = ""


@dataclass(frozen=True)
class BgpSettings:
    # "managed": the agent runs BIRD with a configuration it generates from these
    # settings; "external": the operator's BIRD or FRR exports the kernel table.
    speaker: str = "managed"
    # The kernel routing table the agent writes one route per announced VIP into, and the
    # route protocol number that marks them as the agent's. No rule points at the table,
    # so it never affects forwarding; it is the hand-over to the speaker.
    kernel_table: int = 100
    route_protocol: int = 77
    local_asn: int = 0  # required in managed mode
    router_id: str = ""  # "": the agent's IPv4 address (advertise address)
    neighbors: tuple[Neighbor, ...] = ()
    hold_time: int = 9  # 0 or 3..65535 (BGP's rule); keepalives every third of it
    bfd: bool = True
    bfd_interval_ms: int = 100  # wanted transmit and receive interval
    bfd_multiplier: int = 3
    # Managed speaker: where its configuration, control socket and PID file live
    # ("": /run/meshlb/<node name>/bird), its log ("syslog" or a file), the programs.
    run_dir: str = ""
    log: str = "syslog"
    bird: str = "bird"
    birdc: str = "birdc"
    # External speaker: a BIRD control socket to read session states from ("": none,
    # they are reported "unknown").
    control_socket: str = ""
    # How often the speaker's state is read, and its restart is retried after a crash.
    poll_interval: float = 1.0


@dataclass(frozen=True)
class L2Settings:
    iface: str = ""  # "": the node's data-plane interface
    # Gratuitous ARP / unsolicited NA when this mix takes a VIP: `announcements` frames,
    # `announce_interval` apart (receivers and switches drop some).
    announcements: int = 5
    announce_interval: float = 0.5


@dataclass(frozen=True)
class AnnounceSettings:
    mode: str = "none"
    bgp: BgpSettings = field(default_factory=BgpSettings)
    l2: L2Settings = field(default_factory=L2Settings)
