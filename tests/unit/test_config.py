from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from pathlib import Path

import pytest

from meshlb import config as cfg
from meshlb.config import (
    ConfigError,
    ConntrackConfig,
    DrainConfig,
    HealthConfig,
    HostPort,
    diff_live,
    load,
    load_key_ring,
    merge_cli,
    parse,
    validate_host,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "cluster.toml.example"

BASE = """
[node]
name = "mix1"
iface = "eth0"
[cluster]
key_file = "/etc/meshlb/cluster.key"
"""


def err(text: str, source: str = "cluster.toml") -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text, source=source)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def vip(extra: str = "", address: str = "10.0.0.1", port: int = 80) -> str:
    return f'\n[[vips]]\naddress = "{address}"\nport = {port}\n{extra}\n'


# --- defaults and the example file ----------------------------------------------


def test_minimal_file_gets_documented_defaults():
    c = parse(BASE)
    assert c.node.name == "mix1"
    assert c.node.bind == HostPort("0.0.0.0", 7946)
    assert c.node.xdp_mode == "auto"
    assert c.node.pin_dir == "/sys/fs/bpf/meshlb/mix1"
    assert c.node.control == "/run/meshlb/mix1.sock"
    assert c.node.metrics == HostPort("127.0.0.1", 9477)
    assert c.node.advertise is None
    assert c.cluster.multicast_group == HostPort("239.77.77.77", 7946)
    assert c.cluster.max_datagram == 1400
    assert c.cluster.discovery == "unicast" and c.cluster.preset == "lan"
    assert dict(c.cluster.timings) == {}
    assert c.vips == ()
    assert c.health == HealthConfig() and c.conntrack == ConntrackConfig() and c.drain == DrainConfig()


def test_default_name_is_hostname():
    c = parse('[cluster]\nkey_file = "/k"\n')
    assert c.node.name == __import__("socket").gethostname().split(".")[0]
    assert c.node.pin_dir.endswith("/" + c.node.name)


def test_example_parses_and_matches_defaults_where_it_says_so():
    c = load(EXAMPLE)
    base = parse(BASE)
    # sections the example leaves at their defaults
    assert c.health == HealthConfig()
    assert c.conntrack == ConntrackConfig()
    assert c.drain == DrainConfig()
    # [node] and [cluster]: everything but the values marked "example" is the default
    assert dataclasses.replace(c.node, name="mix1", pin_dir=base.node.pin_dir, control=base.node.control,
                               state_dir=base.node.state_dir) == base.node
    assert dataclasses.replace(c.cluster, peers=()) == base.cluster
    # the example VIPs: the DR one spells out defaults, the NAT one the nat options
    dr, nat, servers = c.vips
    assert dr == cfg.VipConfig(address=ipaddress.ip_address("192.0.2.100"), port=80)
    assert servers.members == ("mix1", "mix2") and servers.servers == (HostPort("192.0.2.21", 80),
                                                                       HostPort("192.0.2.22", 8080))
    assert servers.weights == (("192.0.2.21:80", 3), ("mix1", 2))
    assert nat.mode == "nat" and nat.backend_port == 8443 and nat.snat_ports == cfg.DEFAULT_SNAT_PORTS
    assert nat.address.version == 6


def test_example_documents_every_option():
    text = EXAMPLE.read_text()
    for dc in (cfg.NodeConfig, cfg.ClusterConfig, cfg.VipConfig, HealthConfig, ConntrackConfig, DrainConfig):
        for f in dataclasses.fields(dc):
            assert re.search(rf"^#?{f.name} = ", text, re.M) or f"[{dc.__name__[:-6].lower()}.{f.name}]" in text, (
                dc.__name__,
                f.name,
            )
    for knob in cfg.TIMING_KNOBS:
        assert knob in text


def test_frozen():
    c = parse(BASE + "[cluster.timings]\nprobe_interval = 1\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.node.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.cluster.timings["probe_interval"] = 2  # type: ignore[index]


# --- error paths ------------------------------------------------------------------


def test_bad_toml_syntax_is_one_line_with_file():
    assert err("[node\n").startswith("cluster.toml: ")


def test_error_names_the_file_given():
    assert err(BASE + vip('mode = "dsr"'), source="/etc/meshlb/prod.toml") == (
        '/etc/meshlb/prod.toml: vips[0].mode: expected "dr" or "nat", got "dsr"'
    )


def test_vip_mode_error_matches_the_documented_form():
    text = BASE + vip() + vip('mode = "dsr"', port=81)
    assert err(text) == 'cluster.toml: vips[1].mode: expected "dr" or "nat", got "dsr"'


@pytest.mark.parametrize(
    "text, where",
    [
        ("bogus = 1\n" + BASE, "cluster.toml: bogus: unknown key"),
        ("[extra]\n" + BASE, "cluster.toml: extra: unknown key"),
        (BASE.replace('iface = "eth0"', 'iface = "eth0"\nifcae = "x"'), "cluster.toml: node.ifcae: unknown key"),
        (BASE + "peerz = []\n", "cluster.toml: cluster.peerz: unknown key"),
        (BASE + "[cluster.timings]\nprobe_intervall = 1\n", "cluster.toml: cluster.timings.probe_intervall: unknown key"),
        (BASE + vip("weight = 3"), "cluster.toml: vips[0].weight: unknown key"),
        (BASE + "[health]\nriser = 2\n", "cluster.toml: health.riser: unknown key"),
        (BASE + "[conntrack]\nmax = 2\n", "cluster.toml: conntrack.max: unknown key"),
        (BASE + "[drain]\ntimeout = 2\n", "cluster.toml: drain.timeout: unknown key"),
    ],
)
def test_unknown_keys_at_every_level(text, where):
    msg = err(text)
    assert msg.startswith(where), msg


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE.replace('"eth0"', "3"), "node.iface: expected a string, got 3"),
        (BASE + "label = true\n", "cluster.label: expected a string, got true"),
        (BASE + 'max_datagram = "1400"\n', 'cluster.max_datagram: expected an integer, got "1400"'),
        (BASE + "max_datagram = 1400.0\n", "cluster.max_datagram: expected an integer, got 1400.0"),
        (BASE + "max_datagram = 100\n", "cluster.max_datagram: expected an integer in 512..65507, got 100"),
        (BASE + "multicast_ttl = 0\n", "cluster.multicast_ttl: expected an integer in 1..255"),
        (BASE + 'peers = "10.0.0.2"\n', "cluster.peers: expected an array"),
        (BASE + "peers = [7]\n", 'cluster.peers[0]: expected a string "host:port", got 7'),
        (BASE + 'discovery = "gossip"\n', 'cluster.discovery: expected "unicast", "multicast" or "broadcast", got "gossip"'),
        (BASE + 'preset = "fast"\n', 'cluster.preset: expected "lan", "wan" or "local"'),
        (BASE + "[cluster.timings]\nprobe_interval = 0\n", "cluster.timings.probe_interval: expected a number > 0, got 0"),
        (BASE + "[cluster.timings]\nprobe_interval = -1.5\n", "cluster.timings.probe_interval: expected a number > 0"),
        (BASE + '[cluster.timings]\ngossip_nodes = "3"\n', 'cluster.timings.gossip_nodes: expected an integer, got "3"'),
        (BASE + "[cluster.timings]\ngossip_nodes = 2.5\n", "cluster.timings.gossip_nodes: expected an integer, got 2.5"),
        (BASE + "[cluster.timings]\nindirect_checks = 0\n", "cluster.timings.indirect_checks: expected an integer >= 1, got 0"),
        (BASE + "max_datagram = 1200\n[cluster.timings]\nmax_datagram = 1300\n", "cluster.timings.max_datagram: conflicts"),
        (BASE + "timings = 3\n", "cluster.timings: expected a table, got 3"),
        (BASE.replace('[node]', '[node]\nxdp_mode = "offload"'), 'node.xdp_mode: expected "native", "generic" or "auto", got "offload"'),
        (BASE.replace('[node]', '[node]\nlog_level = "trace"'), "node.log_level: expected"),
        (BASE.replace('[node]', '[node]\npin_dir = "bpf/x"'), 'node.pin_dir: expected an absolute path, got "bpf/x"'),
        (BASE.replace('[node]', '[node]\ncontrol = "x.sock"'), "node.control: expected an absolute path"),
        (BASE.replace('name = "mix1"', 'name = "a/b"'), 'node.name: expected 1-63 characters'),
        (BASE.replace('iface = "eth0"', 'iface = "eth0/../x"'), "node.iface: expected an interface name"),
        (BASE + "[health]\ninterval = \"2s\"\n", 'health.interval: expected a number, got "2s"'),
        (BASE + "[health]\ninterval = 1\ntimeout = 2\n", "health.timeout: must not exceed health.interval (1), got 2"),
        (BASE + '[health]\nkind = "udp"\n', 'health.kind: expected "tcp" or "http", got "udp"'),
        (BASE + '[health]\nhttp_path = "healthz"\n', "health.http_path: expected a path starting with \"/\""),
        (BASE + '[health]\nhttp_path = "/a b"\n', "health.http_path: expected a path"),
        (BASE + "[health]\nrise = 0\n", "health.rise: expected an integer in 1..100, got 0"),
        (BASE + "[health]\nfall = true\n", "health.fall: expected an integer, got true"),
        (BASE + '[health]\ncheck_peers = "all"\n', 'health.check_peers: expected true, false or an array of member names, got "all"'),
        (BASE + '[health]\ncheck_peers = ["a", "a"]\n', 'health.check_peers[1]: duplicate member name "a"'),
        (BASE + "[health]\ncheck_peers = [1]\n", "health.check_peers[0]: expected a member name, got 1"),
        (BASE + "[health]\napp_port = 0\n", "health.app_port: expected an integer in 1..65535, got 0"),
        (BASE + "[conntrack]\nmax_entries = 0\n", "conntrack.max_entries: expected an integer in"),
        (BASE + "[conntrack]\nidle_timeout_s = -1\n", "conntrack.idle_timeout_s: expected a number >= 0, got -1"),
        (BASE + "[conntrack]\nsweep_interval_s = 0\n", "conntrack.sweep_interval_s: expected a number > 0"),
        (BASE + "[conntrack]\nidle_timeout_s = nan\n", "conntrack.idle_timeout_s: expected a finite number"),
        (BASE + "[conntrack]\nhandshake_timeout_s = -2\n", "conntrack.handshake_timeout_s: expected a number >= 0"),
        (BASE + "[conntrack]\nhandshake_timeout_s = \"10s\"\n", "conntrack.handshake_timeout_s: expected a number"),
        (BASE + '[conntrack]\nsockops_cgroup = "sys/fs/cgroup"\n',
         'conntrack.sockops_cgroup: expected "auto", "off" or an absolute path, got "sys/fs/cgroup"'),
        (BASE + "[conntrack]\nsockops_cgroup = false\n", "conntrack.sockops_cgroup: expected a string, got false"),
        (BASE + "[drain]\ntimeout_s = false\n", "drain.timeout_s: expected a number, got false"),
        (BASE + "[drain]\ntimeout_s = -2\n", "drain.timeout_s: expected a number >= 0"),
        ("vips = 3\n" + BASE, "vips: expected an array of tables"),
        ("vips = [1]\n" + BASE, "vips[0]: expected a table, got 1"),
        ("node = 1\n[cluster]\nkey_file='/k'\n", "node: expected a table, got 1"),
        ('[node]\nname="a"\n', "cluster: required"),
        ('[cluster]\nlabel="x"\n', "cluster.key_file: required"),
        ('[cluster]\nkey_file=""\n', "cluster.key_file: expected a path"),
        ('[cluster]\nkey_file="/k"\nlabel="a b"\n', "cluster.label: expected"),
    ],
)
def test_type_and_range_errors(text, expected):
    msg = err(text)
    assert msg.startswith("cluster.toml: " + expected), msg


# --- VIPs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        ('[[vips]]\nport = 80\n', "vips[0].address: required"),
        ('[[vips]]\naddress = "10.0.0.1"\n', "vips[0].port: required"),
        ('[[vips]]\naddress = "10.0.0.256"\nport = 80\n', 'vips[0].address: expected an IPv4 or IPv6 address, got "10.0.0.256"'),
        ('[[vips]]\naddress = 10\nport = 80\n', "vips[0].address: expected an IP address string, got 10"),
        ('[[vips]]\naddress = "0.0.0.0"\nport = 80\n', "vips[0].address: expected a unicast address"),
        ('[[vips]]\naddress = "239.1.1.1"\nport = 80\n', "vips[0].address: expected a unicast address"),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 70000\n', "vips[0].port: expected an integer in 1..65535, got 70000"),
        ('[[vips]]\naddress = "10.0.0.1"\nport = "80"\n', 'vips[0].port: expected an integer, got "80"'),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nprotocol = "sctp"\n', 'vips[0].protocol: expected "tcp" or "udp", got "sctp"'),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nring_size = 65536\n', "vips[0].ring_size: expected a prime number (Maglev needs one), got 65536; the next prime is 65537"),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nring_size = 1\n', "vips[0].ring_size: expected an integer in 2..16777216, got 1"),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nbackend_port = 81\n', 'vips[0].backend_port: only valid with mode = "nat"'),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nsnat_ports = "1-2"\n', 'vips[0].snat_ports: only valid with mode = "nat"'),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nmode = "nat"\nsnat_ports = "2000"\n', 'vips[0].snat_ports: expected "low-high"'),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nmode = "nat"\nsnat_ports = "3000-2000"\n', 'vips[0].snat_ports: expected "low-high"'),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nmode = "nat"\nsnat_ports = "0-70000"\n', 'vips[0].snat_ports: expected "low-high"'),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nmode = "nat"\nsnat_address = "::1"\n', "vips[0].snat_address: expected an IPv4 address like the VIP"),
        ('[[vips]]\naddress = "10.0.0.1"\nport = 80\nmode = "nat"\nbackend_port = 0\n', "vips[0].backend_port: expected an integer in 1..65535"),
        ("[vips]\naddress = '10.0.0.1'\n", "vips: expected an array of tables"),
    ],
)
def test_vip_errors(body, expected):
    msg = err(BASE + body)
    assert msg.startswith("cluster.toml: " + expected), msg


def test_vip_in_two_modes_is_an_error():
    text = BASE + vip('mode = "dr"') + vip('mode = "nat"', port=443)
    assert err(text) == 'cluster.toml: vips[1].mode: 10.0.0.1 is "dr" in vips[0]; an address takes one mode'


def test_duplicate_vip_is_an_error():
    text = BASE + vip() + vip('protocol = "udp"') + vip()
    assert err(text) == "cluster.toml: vips[2]: 10.0.0.1:80/tcp is already defined in vips[0]"


def test_same_address_several_ports_and_protocols_is_fine():
    c = parse(BASE + vip() + vip(port=443) + vip('protocol = "udp"'))
    assert [v.key for v in c.vips] == ["10.0.0.1:80/tcp", "10.0.0.1:443/tcp", "10.0.0.1:80/udp"]


def test_ipv6_vips_accepted():
    c = parse(BASE + vip(address="2001:db8::1") + vip('mode = "nat"\nsnat_address = "2001:db8::9"', address="2001:DB8::2", port=443))
    a, b = c.vips
    assert a.address == ipaddress.IPv6Address("2001:db8::1")
    assert a.key == "[2001:db8::1]:80/tcp"
    assert b.snat_address == ipaddress.IPv6Address("2001:db8::9")
    assert b.backend_port == 443 and b.snat_ports == cfg.DEFAULT_SNAT_PORTS


def test_nat_defaults():
    (v,) = parse(BASE + vip('mode = "nat"\nsnat_ports = "20000-20999"')).vips
    assert v.backend_port == 80 and v.snat_address is None and v.snat_ports == (20000, 20999)
    (d,) = parse(BASE + vip()).vips
    assert d.backend_port is None and d.snat_ports is None


# --- addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ('bind = "0.0.0.0"', 'node.bind: expected "address:port" with a port, got "0.0.0.0"'),
        ('bind = "0.0.0.0:"', "node.bind: expected a port in 1..65535"),
        ('bind = "0.0.0.0:0"', "node.bind: expected a port in 1..65535"),
        ('bind = "0.0.0.0:99999"', "node.bind: expected a port in 1..65535"),
        ('bind = "localhost:7946"', 'node.bind: expected an IP address in "address:port"'),
        ('bind = "[::1:7946"', 'node.bind: expected "address:port"'),
        ('bind = "[10.0.0.1]:7946"', "node.bind: expected an IPv6 address inside []"),
        ('bind = "::"', 'node.bind: expected "address:port" with a port'),
        ('advertise = "0.0.0.0"', "node.advertise: expected an address peers can reach"),
        ('advertise = "mix1.example"', "node.advertise: expected an IP address"),
        ('metrics = "9477"', 'node.metrics: expected "address:port" with a port'),
    ],
)
def test_node_address_errors(line, expected):
    msg = err(BASE.replace("[node]", "[node]\n" + line))
    assert msg.startswith("cluster.toml: " + expected), msg


@pytest.mark.parametrize(
    "peer, expected",
    [
        ("10.0.0.2", HostPort("10.0.0.2", 7946)),
        ("10.0.0.2:8000", HostPort("10.0.0.2", 8000)),
        ("mix2.example.net", HostPort("mix2.example.net", 7946)),
        ("mix2:7000", HostPort("mix2", 7000)),
        ("[2001:db8::2]:7000", HostPort("2001:db8::2", 7000)),
        ("[2001:db8::2]", HostPort("2001:db8::2", 7946)),
        ("2001:DB8::2", HostPort("2001:db8::2", 7946)),
    ],
)
def test_peer_forms(peer, expected):
    c = parse(BASE + f'peers = ["{peer}"]\n')
    assert c.cluster.peers == (expected,)


@pytest.mark.parametrize("peer", ["", "bad host", "-x", "10.0.0.300", "a:b", "a:1:", "[::1]x"])
def test_bad_peers(peer):
    assert err(BASE + f'peers = ["{peer}"]\n').startswith("cluster.toml: cluster.peers[0]: expected")


def test_address_forms_accepted():
    c = parse(
        BASE.replace("[node]", '[node]\nbind = "[::]:7000"\nadvertise = "2001:db8::5"\nmetrics = ""')
        + 'multicast_group = "ff02::1234"\nbroadcast_address = "10.255.255.255"\n'
    )
    assert c.node.bind == HostPort("::", 7000) and str(c.node.bind) == "[::]:7000"
    assert c.node.advertise == HostPort("2001:db8::5", 7000)  # port follows bind
    assert c.node.metrics is None
    assert c.cluster.multicast_group == HostPort("ff02::1234", 7000)
    assert c.cluster.broadcast_address == "10.255.255.255"


def test_multicast_and_broadcast_checks():
    assert "expected a multicast address" in err(BASE + 'multicast_group = "10.0.0.1:7946"\n')
    assert "broadcast is IPv4 only" in err(BASE + 'broadcast_address = "ff02::1"\n')


def test_timings_typed_and_max_datagram_folded():
    c = parse(BASE + "[cluster.timings]\nprobe_interval = 1\ngossip_nodes = 4\nmax_datagram = 9000\n")
    assert dict(c.cluster.timings) == {"gossip_nodes": 4, "probe_interval": 1.0}
    assert isinstance(c.cluster.timings["probe_interval"], float)
    assert c.cluster.max_datagram == 9000
    assert set(cfg.TIMING_KNOBS) >= {"probe_interval", "suspicion_mult", "dead_reap_interval", "max_datagram"}


def test_check_peers_forms():
    assert parse(BASE + "[health]\ncheck_peers = false\n").health.check_peers is False
    assert parse(BASE + '[health]\ncheck_peers = ["mix2", "mix3"]\n').health.check_peers == ("mix2", "mix3")


# --- files ----------------------------------------------------------------------------


def test_load_missing_file_names_it(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{p}: cannot read")):
        load(p)


def test_load_relative_key_file_is_relative_to_the_cluster_file(tmp_path):
    (tmp_path / "c.toml").write_text('[cluster]\nkey_file = "keys/cluster.key"\n[node]\nname="m"\n')
    c = load(tmp_path / "c.toml")
    assert c.cluster.key_file == str(tmp_path / "keys" / "cluster.key")
    assert c.source == str(tmp_path / "c.toml")


def test_load_error_names_the_path(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(BASE + "[health]\nrise = -1\n")
    with pytest.raises(ConfigError) as exc:
        load(p)
    assert str(exc.value).startswith(f"{p}: health.rise: ")


# --- host validation and key ring ------------------------------------------------


@pytest.fixture
def fake_net(tmp_path):
    d = tmp_path / "net"
    (d / "eth0").mkdir(parents=True)
    return str(d)


def write_key(tmp_path, text):
    k = tmp_path / "cluster.key"
    k.write_text(text)
    os.chmod(k, 0o600)
    return k


def test_validate_host_ok_returns_key_ring(tmp_path, fake_net):
    k1, k2 = cfg.generate_key(), cfg.generate_key()
    key = write_key(tmp_path, f"# primary first\n{k1}\n\n{k2}  # old key, still accepted\n")
    c = parse(BASE.replace("/etc/meshlb/cluster.key", str(key)))
    assert validate_host(c, sys_class_net=fake_net) == (bytes.fromhex(k1), bytes.fromhex(k2))


def test_validate_host_on_the_real_sysfs(tmp_path):
    key = write_key(tmp_path, cfg.generate_key())
    c = parse(BASE.replace("/etc/meshlb/cluster.key", str(key)).replace('"eth0"', '"lo"'))
    assert len(validate_host(c)) == 1


def test_missing_interface(tmp_path, fake_net):
    key = write_key(tmp_path, cfg.generate_key())
    c = parse(BASE.replace("/etc/meshlb/cluster.key", str(key)).replace('"eth0"', '"eth9"'))
    with pytest.raises(ConfigError) as exc:
        validate_host(c, sys_class_net=fake_net)
    assert str(exc.value) == 'cluster.toml: node.iface: no interface named "eth9" on this host'


def test_interface_required_at_host_validation(tmp_path, fake_net):
    c = parse('[node]\nname = "m"\n[cluster]\nkey_file = "/k"\n')
    with pytest.raises(ConfigError, match=r"^cluster.toml: node.iface: required"):
        validate_host(c, sys_class_net=fake_net)


def test_unreadable_key_file_is_named(tmp_path, fake_net):
    missing = tmp_path / "absent.key"
    c = parse(BASE.replace("/etc/meshlb/cluster.key", str(missing)))
    with pytest.raises(ConfigError) as exc:
        validate_host(c, sys_class_net=fake_net)
    assert str(exc.value) == f"cluster.toml: cluster.key_file: cannot read {missing}: No such file or directory"


def test_key_file_that_is_a_directory(tmp_path, fake_net):
    c = parse(BASE.replace("/etc/meshlb/cluster.key", str(tmp_path)))
    with pytest.raises(ConfigError, match=rf"cluster.key_file: cannot read {re.escape(str(tmp_path))}: Is a directory"):
        validate_host(c, sys_class_net=fake_net)


def test_key_file_path_through_a_file(tmp_path, fake_net):
    # unreadable even for root, unlike a chmod 000 file
    (tmp_path / "plain").write_text("x")
    bad = tmp_path / "plain" / "cluster.key"
    c = parse(BASE.replace("/etc/meshlb/cluster.key", str(bad)))
    with pytest.raises(ConfigError, match=rf"cluster.key_file: cannot read {re.escape(str(bad))}: Not a directory"):
        validate_host(c, sys_class_net=fake_net)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path, fake_net, mode):
    key = write_key(tmp_path, cfg.generate_key())
    os.chmod(key, mode)
    c = parse(BASE.replace("/etc/meshlb/cluster.key", str(key)))
    with pytest.raises(ConfigError, match=rf"cluster.key_file: .* \(mode {mode:04o}\); chmod 600 it"):
        validate_host(c, sys_class_net=fake_net)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "holds no key"),
        ("# only a comment\n\n", "holds no key"),
        ("abcd\n", "line 1: expected a 32-byte key"),
        ("00" * 31 + "\n", "line 1: expected a 32-byte key"),
    ],
)
def test_bad_key_file_contents(tmp_path, content, expected):
    key = write_key(tmp_path, content)
    with pytest.raises(ConfigError) as exc:
        load_key_ring(str(key))
    assert expected in str(exc.value)
    assert str(exc.value).startswith("cluster.toml: cluster.key_file: ")


def test_key_file_base64_and_dedup(tmp_path):
    import base64

    raw = os.urandom(32)
    key = write_key(tmp_path, base64.b64encode(raw).decode() + "\n" + raw.hex() + "\n")
    assert load_key_ring(str(key)) == (raw,)


def test_key_error_does_not_echo_the_secret(tmp_path):
    secret = "deadbeef" * 7  # wrong length
    key = write_key(tmp_path, secret)
    with pytest.raises(ConfigError) as exc:
        load_key_ring(str(key))
    assert secret not in str(exc.value)


# --- merge_cli ------------------------------------------------------------------------


def test_merge_cli_overrides_and_rederives():
    c = parse(BASE + 'peers = ["10.0.0.2", "10.0.0.3:9000"]\n')
    m = merge_cli(c, name="mix7", iface="eth1", bind="10.0.0.7:7000", peers=["10.0.0.9"])
    assert m.node.name == "mix7" and m.node.iface == "eth1"
    assert m.node.bind == HostPort("10.0.0.7", 7000)
    # derived defaults follow the overrides
    assert m.node.pin_dir == "/sys/fs/bpf/meshlb/mix7"
    assert m.node.control == "/run/meshlb/mix7.sock"
    assert m.cluster.peers == (HostPort("10.0.0.9", 7000),)
    # nothing given: unchanged
    assert merge_cli(c) == c
    # the original is untouched
    assert c.node.name == "mix1" and len(c.cluster.peers) == 2


def test_merge_cli_keeps_explicit_file_values():
    c = parse(BASE.replace("[node]", '[node]\npin_dir = "/sys/fs/bpf/custom"'))
    m = merge_cli(c, name="other", control="/tmp/x.sock")
    assert m.node.pin_dir == "/sys/fs/bpf/custom"
    assert m.node.control == "/tmp/x.sock"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"bind": "nonsense"}, 'command line: --bind: expected "address:port" with a port, got "nonsense"'),
        ({"peers": ["ok", "bad host"]}, "command line: --peers[1]: expected a host name"),
        ({"name": "a/b"}, "command line: --name: expected 1-63 characters"),
        ({"iface": "x" * 20}, "command line: --iface: expected an interface name"),
        ({"control": "rel.sock"}, "command line: --control: expected an absolute path"),
    ],
)
def test_merge_cli_errors_name_the_flag(kwargs, expected):
    with pytest.raises(ConfigError) as exc:
        merge_cli(parse(BASE), **kwargs)
    assert str(exc.value).startswith(expected), str(exc.value)


def test_merge_cli_without_node_table():
    c = parse('[cluster]\nkey_file = "/k"\n')
    assert merge_cli(c, iface="eth3").node.iface == "eth3"


# --- diff_live ---------------------------------------------------------------------


def test_diff_identical_is_empty():
    assert diff_live(parse(BASE), parse(BASE)) == ([], [])


def test_diff_live_and_restart():
    old = parse(BASE + 'peers = ["10.0.0.2"]\n' + vip() + vip(port=443) + "[cluster.timings]\nprobe_interval = 1\n")
    new = parse(
        BASE.replace('"eth0"', '"eth1"').replace("[node]", '[node]\nbind = "0.0.0.0:7000"\nlog_level = "debug"')
        + 'peers = ["10.0.0.3"]\nlabel = "other"\n'
        + "[cluster.timings]\nprobe_interval = 2\ngossip_nodes = 5\n"
        + vip('ring_size = 251') + vip(address="10.0.0.2")
        + "[health]\ninterval = 5.0\n[conntrack]\nmax_entries = 1000\nidle_timeout_s = 0\nhandshake_timeout_s = 3\n[drain]\ntimeout_s = 1\n"
    )
    applied, restart = diff_live(old, new)
    assert applied == [
        "node.log_level",
        "cluster.peers",
        "cluster.timings.gossip_nodes",
        "cluster.timings.probe_interval",
        "health.interval",
        "conntrack.idle_timeout_s",
        "conntrack.handshake_timeout_s",
        "drain.timeout_s",
        "vips: add 10.0.0.2:80/tcp",
        "vips: change 10.0.0.1:80/tcp (ring_size)",
        "vips: remove 10.0.0.1:443/tcp",
    ]
    assert restart == ["node.iface", "node.bind", "cluster.label", "conntrack.max_entries"]


def test_diff_name_change_needs_restart():
    old = parse(BASE)
    applied, restart = diff_live(old, merge_cli(old, name="mix2"))
    assert applied == []
    assert restart == ["node.name", "node.pin_dir", "node.control", "node.state_dir"]


def test_diff_key_file_is_live():
    old = parse(BASE)
    new = parse(BASE.replace("cluster.key", "new.key"))
    assert diff_live(old, new) == (["cluster.key_file"], [])


# --- agreement with the protocol module and the agent --------------------------------


def test_timing_knobs_are_protocol_config_fields():
    from meshlb.cluster.protocol_config import ProtocolConfig

    fields = {f.name: f for f in dataclasses.fields(ProtocolConfig)}
    for knob, kind in cfg.TIMING_KNOBS.items():
        assert knob in fields, knob
        # an int knob must not be a float in the protocol (the reverse is fine: 3 -> 3.0)
        if kind is int:
            assert isinstance(getattr(ProtocolConfig(), knob), int), knob


def test_protocol_cross_checks_run_at_load():
    msg = err(BASE + "[cluster.timings]\nprobe_timeout = 2.0\n")
    assert msg.startswith("cluster.toml: cluster.timings: probe_timeout must be in (0, probe_interval]")
    # the same override is fine with the slower preset
    c = parse(BASE + 'preset = "wan"\n[cluster.timings]\nprobe_timeout = 2.0\n')
    assert c.cluster.timings["probe_timeout"] == 2.0
    assert parse(BASE + "[cluster.timings]\nsuspicion_mult = 2.5\n").cluster.timings["suspicion_mult"] == 2.5


def test_default_config_for_flag_only_runs():
    c = cfg.default_config()
    assert c.cluster.key_file == cfg.DEFAULT_KEY_FILE and c.source == "defaults"
    m = merge_cli(c, iface="eth0", name="solo", peers=["10.0.0.2"])
    assert m.node.name == "solo" and m.node.iface == "eth0" and m.cluster.peers == (HostPort("10.0.0.2", 7946),)
    with pytest.raises(ConfigError, match="^command line: --bind: "):
        merge_cli(c, bind="x")


def test_all_zero_key_refused(tmp_path):
    key = write_key(tmp_path, "00" * 32 + "\n")
    with pytest.raises(ConfigError, match="all-zero key"):
        load_key_ring(str(key))


# --- one declaration per option -------------------------------------------------------


def _example_keys() -> set[str]:
    """Every ``key = value`` of the example, commented out or not, as ``table.key``."""
    table, keys = "", set()
    for line in EXAMPLE.read_text().splitlines():
        m = re.match(r"^#?\[\[?([\w.]+)\]\]?\s*$", line)
        if m:
            table = m.group(1)
            continue
        m = re.match(r"^#?(\w+) = ", line)
        if m:
            keys.add(f"{table}.{m.group(1)}")
    return keys


def test_example_documents_every_declared_option_in_its_table():
    declared = set(cfg.option_paths())
    assert {"node.name", "cluster.timings.probe_interval", "vips.snat_ports", "drain.timeout_s"} <= declared
    documented = _example_keys()
    assert declared - documented == set(), "declared but not in cluster.toml.example"
    assert documented - declared == set(), "in cluster.toml.example but not declared"


def test_example_timing_knobs_show_the_lan_values():
    from meshlb.cluster.protocol_config import ProtocolConfig

    lan = ProtocolConfig.lan()
    shown = dict(re.findall(r"^#(\w+) = (\S+)$", EXAMPLE.read_text().split("[cluster.timings]")[1].split("[[vips]]")[0], re.M))
    assert set(shown) == set(cfg.TIMING_KNOBS)
    for knob, value in shown.items():
        assert cfg.TIMING_KNOBS[knob](value) == getattr(lan, knob), knob


def test_timing_knobs_are_the_tunable_protocol_fields_with_their_types():
    from meshlb.cluster.protocol_config import ProtocolConfig

    fields = {f.name: f for f in dataclasses.fields(ProtocolConfig)}
    assert cfg.TIMING_KNOBS["probe_interval"] is float and cfg.TIMING_KNOBS["gossip_nodes"] is int
    # a protocol field not declared tunable is an internal bound, not a knob
    assert "broadcast_queue_max" in fields and "broadcast_queue_max" not in cfg.TIMING_KNOBS
    msg = err(BASE + "[cluster.timings]\nbroadcast_queue_max = 10\n")
    assert msg == ("cluster.toml: cluster.timings.broadcast_queue_max: unknown key (known: "
                   + ", ".join(sorted(cfg.TIMING_KNOBS)) + ")")


def test_unknown_key_lists_the_declared_options():
    known = sorted(f.name for f in dataclasses.fields(cfg.NodeConfig))
    assert err(BASE.replace("[node]", "[node]\ncolour = 1")) == (
        f"cluster.toml: node.colour: unknown key (known: {', '.join(known)})"
    )
    assert err(BASE + "[drain]\ntimeout = 2\n") == "cluster.toml: drain.timeout: unknown key (known: timeout_s)"
    # the top level: the tables, not Config's bookkeeping fields (source, ...)
    assert err("bogus = 1\n" + BASE) == (
        "cluster.toml: bogus: unknown key (known: cluster, conntrack, drain, health, node, vips)"
    )


def test_nat_only_key_is_named_before_its_value_is_judged():
    assert err(BASE + vip("backend_port = 0")) == 'cluster.toml: vips[0].backend_port: only valid with mode = "nat"'
    assert err(BASE + vip('snat_address = 7')) == 'cluster.toml: vips[0].snat_address: only valid with mode = "nat"'


def test_vip_config_is_the_vip_type():
    v = cfg.VipConfig(address=ipaddress.ip_address("10.0.0.1"), port=80)
    assert v.target_port == 80 and v.key == "10.0.0.1:80/tcp"
    nat = cfg.VipConfig(address=ipaddress.ip_address("2001:db8::1"), port=443, mode="nat", backend_port=8443)
    assert nat.target_port == 8443 and nat.key == "[2001:db8::1]:443/tcp"
    (parsed,) = parse(BASE + vip('mode = "nat"')).vips
    assert parsed.target_port == 80
    assert {v, v, nat} == {v, nat}  # hashable, by value
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.port = 81  # type: ignore[misc]


def test_diff_live_follows_the_declarations():
    old = parse(BASE)
    applied, restart = diff_live(old, parse(BASE + 'discovery = "multicast"\npreset = "wan"\n'
                                              + '[conntrack]\nsockops_cgroup = "off"\n[health]\nkind = "http"\n'))
    assert applied == ["cluster.preset", "health.kind"]
    assert restart == ["cluster.discovery", "conntrack.sockops_cgroup"]


def test_a_table_declared_with_the_vocabulary_reads_like_the_others():
    """How a new table is declared (here a sketch of an [announce] table with an array of
    neighbour tables): the same walker gives it unknown keys, required keys, types,
    choices, nat-only-like gates and located errors without code of its own."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Neighbour:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = cfg.option(read=cfg.ip_address())
        asn: int = cfg.option(read=cfg.integer(1, 4294967295))
        hold_time_s: float = cfg.option(90.0, cfg.number(positive=True))
        bfd: bool = cfg.option(False, cfg.flag())

    @dataclass(frozen=True)
    class Announce:
        mode: str = cfg.option("none", cfg.text("bgp", "l2", "none"))
        asn: int | None = cfg.option(None, cfg.integer(1, 4294967295), only_with=("mode", "bgp"))
        neighbours: tuple[Neighbour, ...] = cfg.option(
            (), cfg.tables(Neighbour, of="tables ([[announce.neighbours]])"), only_with=("mode", "bgp"), live=True
        )

    def read(raw):
        return cfg._Table(Announce)(cfg._Reader("cluster.toml"), raw, "announce")

    def fails(raw):
        with pytest.raises(ConfigError) as exc:
            read(raw)
        return str(exc.value)

    assert read({}) == Announce()
    a = read({"mode": "bgp", "asn": 65001, "neighbours": [{"address": "192.0.2.1", "asn": 65000, "bfd": True}]})
    assert a.neighbours == (Neighbour(address=ipaddress.ip_address("192.0.2.1"), asn=65000, bfd=True),)
    assert fails({"mode": "ospf"}) == 'cluster.toml: announce.mode: expected "bgp", "l2" or "none", got "ospf"'
    assert fails({"asn": 1}) == 'cluster.toml: announce.asn: only valid with mode = "bgp"'
    assert fails({"mode": "bgp", "neighbours": {}}) == (
        "cluster.toml: announce.neighbours: expected an array of tables ([[announce.neighbours]]), got a table"
    )
    bad = {"mode": "bgp", "neighbours": [{"address": "192.0.2.1", "asn": 1}, {"address": "192.0.2.2", "asn": 0}]}
    assert fails(bad) == "cluster.toml: announce.neighbours[1].asn: expected an integer in 1..4294967295, got 0"
    assert fails({"mode": "bgp", "neighbours": [{"asn": 1}]}) == "cluster.toml: announce.neighbours[0].address: required"
    assert fails({"mode": "bgp", "neighbours": [{"address": "192.0.2.1", "asn": 1, "port": 179}]}) == (
        "cluster.toml: announce.neighbours[0].port: unknown key (known: address, asn, bfd, hold_time_s)"
    )
    assert list(cfg.option_paths(Announce)) == [
        "mode", "asn", "neighbours.address", "neighbours.asn", "neighbours.hold_time_s", "neighbours.bfd",
    ]


def test_only_with_must_name_an_earlier_option():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Backwards:
        asn: int | None = cfg.option(None, cfg.integer(1), only_with=("mode", "bgp"))
        mode: str = cfg.option("none", cfg.text("bgp", "none"))

    with pytest.raises(TypeError, match="only_with names 'mode'"):
        cfg._Table(Backwards)(cfg._Reader("x"), {}, "t")


# --- backends: members, servers, weights ---------------------------------------------


@pytest.mark.parametrize("body, expected", [
    ('servers = ["192.0.2.1", "192.0.2.1:80"]',
     "vips[0].servers[1]: 192.0.2.1:80 is listed twice (also vips[0].servers[0])"),
    ('members = ["a", "b", "a"]', 'vips[0].members[2]: "a" is listed twice (also vips[0].members[0])'),
    ('servers = ["192.0.2.1"]\nweights = { "192.0.2.1" = 1, "192.0.2.1:80" = 2 }',
     'vips[0].weights."192.0.2.1:80": 192.0.2.1:80 is weighted twice (also vips[0].weights."192.0.2.1")'),
    ("weights = { mix1 = -1 }", "vips[0].weights.mix1: expected an integer in 0..65535, got -1"),
    ("weights = { mix1 = 1.5 }", "vips[0].weights.mix1: expected an integer, got 1.5"),
    ('weights = { mix1 = "2" }', 'vips[0].weights.mix1: expected an integer, got "2"'),
    ("weights = 3", "vips[0].weights: expected a table of backend = weight, got 3"),
    ('members = "none"', 'vips[0]: no possible backend: members = "none" and no servers'),
    ("members = []", "vips[0]: no possible backend: members = [] and no servers"),
    ('members = "some"', 'vips[0].members: expected "all", "none" or an array of member names, got "some"'),
    ('servers = ["2001:db8::1"]',
     "vips[0].servers[0]: 2001:db8::1 is IPv6 and the VIP 10.0.0.1 is IPv4: in dr mode the server receives the "
     "client's packets to the VIP unchanged, so it must hold the VIP itself"),
    ('mode = "nat"\nservers = ["[2001:db8::1]:80"]',
     "vips[0].servers[0]: 2001:db8::1 is IPv6 and the VIP 10.0.0.1 is IPv4: nat translates within one address family"),
    ('servers = ["192.0.2.1:8080"]',
     "vips[0].servers[0]: dr does not change the destination port: the server must listen on 80 (drop the port), "
     "got 8080"),
    ('servers = ["127.0.0.1"]', 'vips[0].servers[0]: expected a unicast address a mix can reach, got "127.0.0.1"'),
    ('servers = ["10.0.0.1"]', "vips[0].servers[0]: 10.0.0.1 is the VIP itself"),
    ('servers = ["server1"]', 'vips[0].servers[0]: expected an IP address in "address:port", got "server1"'),
    ('members = ["mix2"]\nweights = { mix1 = 1 }', 'vips[0].weights.mix1: "mix1" is not in vips[0].members'),
    ('members = "none"\nservers = ["192.0.2.1"]\nweights = { mix1 = 1 }',
     'vips[0].weights.mix1: members = "none": no member backs this VIP'),
    ('weights = { "192.0.2.9" = 1 }', 'vips[0].weights."192.0.2.9": 192.0.2.9:80 is not one of vips[0].servers'),
])
def test_backend_errors_name_the_field(body, expected):
    assert err(BASE + vip(body)) == f"cluster.toml: {expected}"


def test_backends_read_and_resolve():
    (dr, nat) = parse(BASE + vip('servers = ["192.0.2.1"]\nweights = { mix1 = 0, "192.0.2.1:80" = 3 }')
                      + vip('mode = "nat"\nbackend_port = 8080\nmembers = "none"\n'
                            'servers = ["192.0.2.1", "192.0.2.2:9090"]\nweights = { "192.0.2.2:9090" = 2 }',
                            address="10.0.0.2")).vips
    assert dr.members is None and dr.servers == (HostPort("192.0.2.1", 80),)
    assert dr.weight("mix1") == 0 and dr.weight("192.0.2.1:80") == 3 and dr.weight("mix2") == 1
    assert nat.members == () and nat.servers == (HostPort("192.0.2.1", 8080), HostPort("192.0.2.2", 9090))
    assert nat.weights == (("192.0.2.2:9090", 2),)
    (v6,) = parse(BASE + vip('servers = ["[2001:db8::1]", "2001:db8::2", "[2001:db8::3]:80"]\n'
                             'weights = { "2001:db8::1" = 4 }', address="2001:db8::9")).vips
    assert [str(s) for s in v6.servers] == ["[2001:db8::1]:80", "[2001:db8::2]:80", "[2001:db8::3]:80"]
    assert v6.weights == (("[2001:db8::1]:80", 4),)
    node = parse(BASE.replace("[node]", "[node]\nserve = false\nstate_dir = \"/srv/meshlb\"")).node
    assert (node.serve, node.state_dir) == (False, "/srv/meshlb")
    assert parse(BASE).node.state_dir == "/var/lib/meshlb/mix1"
    assert err(BASE.replace("[node]", "[node]\nserve = 1")) == "cluster.toml: node.serve: expected true or false, got 1"


def test_backends_change_live():
    old = parse(BASE + vip())
    applied, restart = diff_live(old, parse(BASE.replace("[node]", "[node]\nserve = false")
                                            + vip('servers = ["192.0.2.1"]\nweights = { mix1 = 2 }')))
    assert applied == ["node.serve", "vips: change 10.0.0.1:80/tcp (servers, weights)"] and restart == []


def test_the_dedicated_mode_example_parses():
    c = load(REPO / "docs" / "examples" / "dedicated.toml")
    assert c.node.serve is False
    nat, dr = c.vips
    assert nat.members == () == dr.members and len(nat.servers) == len(dr.servers) == 3
    assert nat.servers[0] == HostPort("192.0.2.21", 8080) and dr.servers[0] == HostPort("192.0.2.21", 80)
    assert nat.weight("192.0.2.23:8080") == 2 and nat.weight("192.0.2.21:8080") == 1
