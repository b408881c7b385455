"""The managed speaker's configuration (checked by BIRD's own parser) and what the
agent reads back from ``birdc`` (parsed from BIRD's real output)."""
from __future__ import annotations

import subprocess
from dataclasses import replace

import pytest

from meshlb.announce.bird import (
    parse_bfd_sessions,
    parse_protocols,
    protocol_name,
    render_config,
    session_status,
)
from meshlb.announce.settings import BgpSettings, Neighbor
from tests.announce.helpers import need_program

BASE = BgpSettings(local_asn=65001, neighbors=(Neighbor("192.0.2.1", 65000), Neighbor("2001:db8::1", 65000)))


def bird_parses(tmp_path, text):
    bird = need_program("bird")
    conf = tmp_path / "bird.conf"
    conf.write_text(text)
    return subprocess.run([bird, "-p", "-c", str(conf)], capture_output=True, text=True, timeout=20)


def test_rendered_config_is_accepted_by_bird(tmp_path):
    s = replace(BASE, neighbors=(*BASE.neighbors, Neighbor("198.51.100.7", 64999, port=1179, password="s3cret",
                                                          multihop=2, local_address="192.0.2.10")))
    res = bird_parses(tmp_path, render_config(s, "192.0.2.10"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_rendered_config_without_bfd_and_with_a_log_file_is_accepted(tmp_path):
    s = replace(BASE, bfd=False, hold_time=0, log=str(tmp_path / "bird.log"))
    text = render_config(s, "192.0.2.10")
    assert "bfd" not in text and "keepalive" not in text
    res = bird_parses(tmp_path, text)
    assert res.returncode == 0, res.stdout + res.stderr


def test_config_says_what_the_announcement_needs():
    text = render_config(BASE, "192.0.2.10")
    assert "router id 192.0.2.10;" in text
    assert "kernel table 100;" in text and "learn;" in text
    assert "import where krt_source = 77;" in text  # only the agent's routes
    assert text.count("import none; export all; next hop self;") == 2
    assert "graceful restart off;" in text and "bfd on;" in text
    assert "min rx interval 100 ms; min tx interval 100 ms; multiplier 3;" in text
    assert "hold time 9;" in text and "keepalive time 3;" in text
    # v4 neighbour on the v4 table, v6 on the v6 table
    v4 = text[text.index(f"protocol bgp {protocol_name(BASE.neighbors[0])}"):]
    assert "ipv4 { table meshlb_vips4;" in v4.split("}\n", 1)[0] + "}"


def test_same_settings_same_text_and_stable_session_names():
    assert render_config(BASE, "192.0.2.10") == render_config(BASE, "192.0.2.10")
    assert protocol_name(Neighbor("2001:db8::1", 1)) == "meshlb_2001_db8__1"
    assert protocol_name(Neighbor("2001:0db8::1", 1, port=1790)) == "meshlb_2001_db8__1_p1790"


@pytest.mark.parametrize("change, error", [
    ({"local_asn": 0}, "local_asn"),
    ({"neighbors": ()}, "neighbors"),
    ({"neighbors": (Neighbor("192.0.2.1", 1, password='a"b'),)}, "password"),
    ({"neighbors": (Neighbor("192.0.2.1", 1, multihop=2),)}, "local_address"),
])
def test_bad_settings_name_the_field(change, error):
    with pytest.raises(ValueError, match=error):
        render_config(replace(BASE, **change), "192.0.2.10")


def test_router_id_must_be_ipv4():
    with pytest.raises(ValueError, match="router_id"):
        render_config(BASE, "2001:db8::10")


# Captured from BIRD 2.0.12 (`birdc show protocols all`, lines of route statistics cut).
SHOW_PROTOCOLS = """\
BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
meshlb_device Device  ---        up     2024-05-01 07:55:18

meshlb_kernel4 Kernel meshlb_vips4 up   2024-05-01 07:55:18
  Channel ipv4
    State:          UP
    Table:          meshlb_vips4
    Routes:         1 imported, 0 exported, 1 preferred

meshlb_10_99_0_1 BGP  ---        up     2024-05-01 07:55:19  Established
  BGP state:          Established
    Neighbor address: 10.99.0.1
    Neighbor AS:      65000
    Local AS:         65001
    Neighbor ID:      10.99.0.1
    Session:          external AS4
    Source address:   10.99.0.11
    Hold timer:       5.968/9
    Keepalive timer:  1.222/3
  Channel ipv4
    State:          UP
    Table:          meshlb_vips4
    Preference:     100
    Input filter:   REJECT
    Output filter:  ACCEPT
    Routes:         0 imported, 2 exported, 0 preferred
    BGP Next hop:   10.99.0.11

meshlb_10_99_0_2 BGP  ---        start  2024-05-01 07:55:18  Active        Socket: Connection refused
  BGP state:          Active
    Neighbor address: 10.99.0.2
    Neighbor AS:      65000
    Local AS:         65001
    Connect delay:    0.473/1
    Last error:       Socket: Connection refused
  Channel ipv4
    State:          DOWN
    Table:          meshlb_vips4

meshlb_10_99_0_3 BGP  ---        start  2024-05-01 07:55:18  Idle          Received: Bad peer AS
  BGP state:          Idle
    Neighbor address: 10.99.0.3
    Neighbor AS:      65099
    Local AS:         65001
  Channel ipv4
    State:          DOWN
    Table:          meshlb_vips4
"""

SHOW_BFD = """\
BIRD 2.0.12 ready.
meshlb_bfd:
IP address                Interface  State      Since         Interval  Timeout
10.99.0.1                 eth0       Up         07:55:20.880    0.100    0.300
fd99::0:1                 eth0       Down       07:55:20.880    1.000    0.000
"""


def test_parse_show_protocols():
    protos = parse_protocols(SHOW_PROTOCOLS)
    assert set(protos) == {"meshlb_device", "meshlb_kernel4", "meshlb_10_99_0_1", "meshlb_10_99_0_2",
                           "meshlb_10_99_0_3"}
    bfd = parse_bfd_sessions(SHOW_BFD)
    assert bfd == {"10.99.0.1": "Up", "fd99::1": "Down"}
    up = session_status(protos["meshlb_10_99_0_1"], bfd)
    assert up == {"session": "meshlb_10_99_0_1", "address": "10.99.0.1", "asn": 65000, "state": "Established",
                  "up": True, "exported": 2, "last_error": "", "bfd": "Up"}
    refused = session_status(protos["meshlb_10_99_0_2"], bfd)
    assert refused["up"] is False and refused["state"] == "Active"
    assert refused["last_error"] == "Socket: Connection refused" and refused["bfd"] is None
    idle = session_status(protos["meshlb_10_99_0_3"], bfd)
    assert idle["last_error"] == "Received: Bad peer AS"  # from the info column
    assert session_status(None, {})["state"] == "unknown"
