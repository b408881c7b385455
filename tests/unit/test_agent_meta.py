"""What a member gossips about itself and whom it checks (meshlb/agent/meta.py), and the
count of established connections a leave waits for (meshlb/agent/established.py)."""
from __future__ import annotations

from ipaddress import ip_address
from types import SimpleNamespace

from meshlb.agent.established import count_established, served_endpoints
from meshlb.agent.meta import health_targets, member_meta
from meshlb.cluster.membership import MemberView
from meshlb.cluster.node import MemberMeta, Status
from meshlb.config import HealthConfig, HostPort, VipConfig

DR = VipConfig(address=ip_address("198.19.0.1"), port=80)
NAT = VipConfig(address=ip_address("fd00::1"), port=443, mode="nat", backend_port=8443)


def member(name, status, vips=(DR.key,)):
    return MemberView(name, (f"10.0.0.{name[-1]}", 7946), status, 1, MemberMeta(vips=vips), 0.0)


class FakeHealth:
    def __init__(self, results):
        self._results = results

    def results(self):
        return dict(self._results)

    def result(self, name):
        return self._results.get(name)


def test_meta_reports_failures_only_and_a_draining_member_serves_nothing():
    health = FakeHealth({"mix1": SimpleNamespace(ok=False, checks=3), "mix2": SimpleNamespace(ok=True, checks=1),
                         "mix3": SimpleNamespace(ok=False, checks=2), "mix4": None})
    m = member_meta("mix1", [DR, NAT], "d1", ["10.0.0.1", "fd00::a"], draining=False, health=health)
    assert m == MemberMeta(vips=(DR.key, NAT.key), weight=100, app_healthy=False, table_digest="d1",
                           observations={"mix3": False}, addresses=("10.0.0.1", "fd00::a"))
    # no verdict on its own app yet (a restart): healthy as before
    unchecked = FakeHealth({"mix1": SimpleNamespace(ok=False, checks=0)})
    fresh = member_meta("mix1", [DR], "", [], draining=False, health=unchecked)
    assert fresh.app_healthy and fresh.weight == 100
    assert member_meta("mix1", [DR], "", [], draining=False, health=None).app_healthy
    drain = member_meta("mix1", [DR], "d", [], draining=True, health=FakeHealth({}))
    assert (drain.weight, drain.app_healthy) == (0, False)


def test_health_targets_are_the_own_app_and_the_live_members_allowed():
    members = [member("mix1", Status.ALIVE), member("mix2", Status.SUSPECT), member("mix3", Status.DEAD),
               member("mix4", Status.LEFT), member("mix5", Status.ALIVE)]
    t = health_targets("mix1", "10.0.0.1", HealthConfig(), [NAT, DR], members)
    assert t == {"mix1": ("10.0.0.1", 8443), "mix2": ("10.0.0.2", 8443), "mix5": ("10.0.0.5", 8443)}
    t = health_targets("mix1", "10.0.0.1", HealthConfig(check_peers=("mix5",), app_port=9000), [DR], members)
    assert t == {"mix1": ("10.0.0.1", 9000), "mix5": ("10.0.0.5", 9000)}
    alone = health_targets("mix1", "10.0.0.1", HealthConfig(check_peers=False), [DR], members)
    assert alone == {"mix1": ("10.0.0.1", 80)}


def test_health_targets_cover_every_server_and_only_members_that_serve():
    members = [member("mix2", Status.ALIVE), member("mix3", Status.ALIVE, vips=())]  # mix3 balances only
    dr = VipConfig(address=ip_address("198.19.0.1"), port=80, servers=(HostPort("198.18.0.231", 80),))
    nat = VipConfig(address=ip_address("198.19.0.2"), port=80, mode="nat", backend_port=8080, members=("mix2",),
                    servers=(HostPort("198.18.0.231", 9090), HostPort("198.18.0.232", 8080)))
    t = health_targets("mix1", "10.0.0.1", HealthConfig(check_peers=False), [dr, nat], members)
    assert t == {"mix1": ("10.0.0.1", 80), "198.18.0.231:80": ("198.18.0.231", 80),
                 "198.18.0.231:9090": ("198.18.0.231", 9090), "198.18.0.232:8080": ("198.18.0.232", 8080)}
    t = health_targets("mix1", "10.0.0.1", HealthConfig(), [nat], members)
    # mix1 serves nothing: nat admits mix2 only
    assert set(t) == {"mix2", "198.18.0.231:9090", "198.18.0.232:8080"}
    balancer = health_targets("mix1", "10.0.0.1", HealthConfig(), [dr], members, serve=False)
    assert set(balancer) == {"mix2", "198.18.0.231:80"}


def test_meta_lists_the_vips_this_member_serves():
    admits = VipConfig(address=ip_address("198.19.0.2"), port=80, members=("mix1",))
    other = VipConfig(address=ip_address("198.19.0.3"), port=80, members=("mix2",))
    m = member_meta("mix1", [DR, admits, other], "", [], draining=False, health=None)
    assert m.vips == (DR.key, admits.key)
    sick = FakeHealth({"mix1": SimpleNamespace(ok=False, checks=3)})
    balancer = member_meta("mix1", [DR, admits], "", [], draining=False, health=sick, serve=False)
    # a balancer only lists nothing, and its own app is not its business
    assert balancer.vips == () and balancer.app_healthy


def test_established_counts_only_established_sockets_of_the_served_endpoints(tmp_path):
    ends = served_endpoints([DR, NAT, VipConfig(address=ip_address("198.19.0.2"), port=53, protocol="udp")], "10.0.0.1")
    assert ends == {(ip_address("198.19.0.1"), 80), (ip_address("fd00::1"), 443), (ip_address("10.0.0.1"), 8443)}
    head = "  sl  local_address rem_address   st\n"
    # 198.19.0.1:80 as /proc prints it (host-order words), established twice, listening once
    v4 = "010013C6:0050"
    (tmp_path / "tcp").write_text(head + f"0: {v4} 020013C6:9C41 01\n"
                                         f"1: {v4} 030013C6:9C42 01\n"
                                         f"2: {v4} 00000000:0000 0A\n"
                                         "3: 0100000A:20FB 0200000A:9C43 01\n")  # 10.0.0.1:8443
    # fd00::1:443 and a v4-mapped 198.19.0.1:80
    (tmp_path / "tcp6").write_text(
        head + "0: 000000FD000000000000000001000000:01BB 000000FD000000000000000002000000:9C44 01\n"
               "1: 0000000000000000FFFF0000010013C6:0050 0000000000000000FFFF0000020013C6:9C45 01\n")
    assert count_established(ends, str(tmp_path)) == 5
    assert count_established(ends, str(tmp_path / "missing")) == 0
