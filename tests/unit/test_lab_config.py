"""The cluster file the netns lab writes for each mix (meshlb/lab/lab.py), read back by
the real parser: real servers per family, balancer-only mixes, members and weights."""
from __future__ import annotations

from pathlib import Path

from meshlb.config import HostPort, parse
from meshlb.lab.lab import LabOptions, mix_config, server_addr4, server_addr6, server_names


def test_servers_and_serve_none_reach_the_agents_file():
    opts = LabOptions(servers=2, serve="none")
    opts.vips = [*opts.vips, {"address": "198.19.0.5", "port": 80, "mode": "dr", "members": ["mix1"],
                              "weights": {"mix1": 1, server_addr4(1): 2}},
                 {"address": "198.19.0.6", "port": 80, "mode": "nat", "members": ["mix2"], "servers": []}]
    c = parse(mix_config(opts, 1, Path("/run/meshlb/lab/t")))
    assert c.node.serve is False and c.node.state_dir == "/run/meshlb/lab/t/state/mix1"
    dr, nat, dr6, weighted, one = c.vips
    assert dr.servers == (HostPort(server_addr4(1), 80), HostPort(server_addr4(2), 80)) == nat.servers
    assert dr6.servers == (HostPort(server_addr6(1), 80), HostPort(server_addr6(2), 80))
    assert weighted.members == ("mix1",) and weighted.weights == ((f"{server_addr4(1)}:80", 2), ("mix1", 1))
    assert one.members == ("mix2",) and one.servers == ()
    assert server_names(2, opts.vips[2]) == {f"[{server_addr6(1)}]:80", f"[{server_addr6(2)}]:80"}
    assert server_names(2, opts.vips[4]) == set()
    assert parse(mix_config(LabOptions(), 2, Path("/x"))).node.serve is True
