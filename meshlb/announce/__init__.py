"""How client traffic for the VIPs reaches the mixes: announcement by BGP (``bgp.py``,
through a BIRD speaker), by L2 ownership (``l2.py``), or not at all (``none.py``), behind
one interface (``interface.py``) the agent drives. Nothing here owns cluster state or
touches the data plane."""
from __future__ import annotations

from collections.abc import Iterable

from meshlb.announce.interface import (
    Announcer,
    ClusterView,
    ready_addresses,
    vip_address,
)
from meshlb.announce.settings import AnnounceSettings

__all__ = ["Announcer", "ClusterView", "make_announcer", "ready_addresses", "vip_address"]


def make_announcer(settings: AnnounceSettings, *, name: str, iface: str = "", router_id: str = "",
                   vips: Iterable[str] = ()) -> Announcer:
    """The announcer of ``settings.mode``. ``name``: this member; ``iface``: its data
    interface (L2); ``router_id``: the BGP router ID when the settings leave it empty
    (the agent's IPv4 address)."""
    if settings.mode == "bgp":
        from meshlb.announce.bgp import BgpAnnouncer

        return BgpAnnouncer(settings.bgp, name=name, router_id=router_id, vips=vips)
    if settings.mode == "l2":
        from meshlb.announce.l2 import L2Announcer

        return L2Announcer(settings.l2, name=name, iface=iface, vips=vips)
    if settings.mode == "none":
        from meshlb.announce.none import NoAnnouncer

        return NoAnnouncer(vips)
    raise ValueError(f"announce mode {settings.mode!r}: expected one of bgp, l2, none")
