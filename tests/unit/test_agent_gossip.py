"""How the agent turns its configuration into a gossip driver (meshlb/agent/gossip.py)."""
import os

from meshlb.agent.gossip import build_driver
from meshlb.config import ClusterConfig, Config, HostPort, NodeConfig


def test_driver_from_agent_config(tmp_path):
    """The agent builds its driver from cluster.toml; check the mapping of the fields."""
    keyfile = tmp_path / "key"
    keyfile.write_text(bytes(range(32)).hex() + "\n")
    os.chmod(keyfile, 0o600)
    cfg = Config(
        node=NodeConfig(name="m1", pin_dir="/tmp/x", control="/tmp/y", iface=None,
                        bind=HostPort("0.0.0.0", 17946)),
        cluster=ClusterConfig(key_file=str(keyfile), peers=(HostPort("10.1.0.2", 7946),),
                              discovery="multicast", multicast_group=HostPort("239.1.2.3", 17947),
                              preset="local", timings={"probe_interval": 0.5}),
    )
    d = build_driver(cfg, name="m1", address="10.1.0.1:27946")
    t = d.transport.config
    assert (t.mode, t.bind, t.port, t.advertise, t.advertise_port) == ("multicast", "0.0.0.0", 17946, "10.1.0.1", 27946)
    assert (t.group, t.group_port) == ("239.1.2.3", 17947)
    assert d.protocol.probe_interval == 0.5 and d.protocol.gossip_interval == 0.1
    assert d._peer_specs == ["10.1.0.2:7946"]
    assert d.wire.epoch > 1_600_000_000_000  # boot time in ms: grows across restarts
