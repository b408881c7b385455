"""The VIP routes in their kernel table, against the real kernel in a namespace."""
from __future__ import annotations

import os

import pytest

from meshlb.announce.kernel_table import KernelVipTable
from meshlb.lab.netns import Topology

pytestmark = pytest.mark.privileged


@pytest.fixture
def ns():
    topo = Topology(f"mlbk{os.getpid()}")
    try:
        yield topo.add_namespace("mix")
    finally:
        assert topo.teardown() == []


def test_sync_adds_and_removes_only_its_own_routes(ns):
    table = KernelVipTable(1234, 77)
    ns.check_output(["ip", "route", "add", "198.19.0.9/32", "dev", "lo", "table", "1234", "proto", "78"])
    added, removed = ns.run(lambda: table.sync({"198.19.0.1", "fd00:0::1", "198.19.0.2"}))
    assert (added, removed) == (["198.19.0.1", "198.19.0.2", "fd00::1"], [])
    assert ns.run(table.read) == {"198.19.0.1", "198.19.0.2", "fd00::1"}
    routes = ns.check_output(["ip", "-4", "route", "show", "table", "1234"])
    assert "198.19.0.1 dev lo proto 77" in routes and "198.19.0.9 dev lo proto 78" in routes
    assert "fd00::1 dev lo proto 77" in ns.check_output(["ip", "-6", "route", "show", "table", "1234"])
    # nothing in the main table: the routes steer no packet
    assert "198.19.0.1" not in ns.check_output(["ip", "route", "show", "table", "main"])
    assert ns.run(lambda: table.sync({"198.19.0.2"})) == ([], ["198.19.0.1", "fd00::1"])
    assert ns.run(table.flush) == ["198.19.0.2"]
    assert ns.run(table.read) == set()
    assert "198.19.0.9" in ns.check_output(["ip", "-4", "route", "show", "table", "1234"])  # not ours: kept


def test_a_route_made_or_removed_behind_its_back_is_put_right(ns):
    table = KernelVipTable(1234, 77)
    ns.run(lambda: table.sync({"198.19.0.1"}))
    ns.check_output(["ip", "route", "del", "198.19.0.1/32", "table", "1234"])
    ns.check_output(["ip", "route", "add", "198.19.0.5/32", "dev", "lo", "table", "1234", "proto", "77"])
    assert ns.run(lambda: table.sync({"198.19.0.1"})) == (["198.19.0.1"], ["198.19.0.5"])


@pytest.mark.parametrize("table, proto", [(254, 77), (0, 77), (100, 0), (100, 256)])
def test_bad_table_or_protocol(table, proto):
    with pytest.raises(ValueError):
        KernelVipTable(table, proto)
