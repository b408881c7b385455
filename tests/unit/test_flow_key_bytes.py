"""The agent's fast flow-key builder against the ctypes structure the maps are read with."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlb.dataplane import layouts as L

v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)
proto = st.sampled_from([6, 17])


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), port, port, proto)
def test_same_bytes_as_the_structure(addrs, sport, dport, p):
    src, dst = addrs
    want = bytes(L.flow_key(src, sport, dst, dport, p))
    assert L.flow_key_bytes(src, sport, dst, dport, p) == want
    assert L.flow_key_bytes(src, sport, dst, dport, p) == want  # from the cache


@pytest.mark.parametrize("args", [
    ("198.18.1.2", 1, "::1", 80, 6),          # families differ
    ("198.18.1.x", 1, "198.19.0.1", 80, 6),   # not an address
    ("198.18.1.2", 65536, "198.19.0.1", 80, 6),
    ("198.18.1.2", 1, "198.19.0.1", -1, 6),
])
def test_bad_input_is_a_value_error(args):
    with pytest.raises(ValueError):
        L.flow_key_bytes(*args)
