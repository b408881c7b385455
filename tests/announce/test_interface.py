from __future__ import annotations

import asyncio

import pytest

from meshlb.announce import make_announcer
from meshlb.announce.interface import ready_addresses, vip_address
from meshlb.announce.settings import AnnounceSettings


@pytest.mark.parametrize("key, addr", [
    ("10.0.0.1:80/tcp", "10.0.0.1"),
    ("[fd00:0::1]:80/tcp", "fd00::1"),
    ("10.0.0.1", "10.0.0.1"),
    ("fd00::0001", "fd00::1"),
])
def test_vip_address(key, addr):
    assert vip_address(key) == addr


def test_an_address_is_ready_only_when_each_of_its_vips_is_forwardable():
    keys = ["10.0.0.1:80/tcp", "10.0.0.1:443/tcp", "10.0.0.2:80/tcp", "[fd00::1]:80/tcp"]
    assert ready_addresses(keys, set(keys)) == {"10.0.0.1", "10.0.0.2", "fd00::1"}
    assert ready_addresses(keys, {"10.0.0.1:80/tcp", "10.0.0.2:80/tcp"}) == {"10.0.0.2"}
    assert ready_addresses(keys, set()) == frozenset()


def test_mode_none_announces_nothing_and_reports_what_is_ready():
    a = make_announcer(AnnounceSettings(), name="mix1", vips=["10.0.0.1:80/tcp"])

    async def run():
        await a.start()
        await a.update({"10.0.0.1:80/tcp"})
        st = a.status()
        await a.withdraw_all()
        await a.stop(keep=False)
        return st, a.status()

    st, after = asyncio.run(run())
    assert st == {"mode": "none", "ready": ["10.0.0.1"]}
    assert after["ready"] == [] and a.owned == frozenset()


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="announce mode"):
        make_announcer(AnnounceSettings(mode="ospf"), name="x")
