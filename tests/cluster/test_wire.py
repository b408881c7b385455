from __future__ import annotations

import copy
import os

import msgpack
import pytest

from meshlb.cluster import wire as wire_mod
from meshlb.cluster.keyring import Keyring, generate_key
from meshlb.cluster.ratelimit import RateLimiter
from meshlb.cluster.wire import (
    DEFAULT_MAX_DATAGRAM,
    HEADER_SIZE,
    OVERHEAD,
    OVERSIZE_SLACK,
    PROTOCOL_VERSION,
    Drop,
    Opened,
    Wire,
    encode_body,
    seal_envelope,
)

LABEL = "prod-eu1"
SRC = ("192.0.2.10", 7946)


def make(name: str, key: bytes, *, label: str = LABEL, epoch: int = 1_700_000_000_000_000_000, **kw) -> Wire:
    return Wire(label=label, keyring=Keyring(key), sender=name, epoch=epoch, **kw)


@pytest.fixture
def key() -> bytes:
    return generate_key()


@pytest.fixture
def pair(key):
    return make("alpha", key), make("beta", key)


def replay_snapshot(w: Wire):
    return copy.deepcopy((dict(w.replay._windows), dict(w.replay._tombstones)))


# -- round trip and packing ----------------------------------------------------------


def test_round_trip(pair):
    a, b = pair
    msgs = [{"type": "ping", "seq": 7}, [1, "two", b"\x03"], None, 2**63]
    (d,) = a.seal([a.encode(m) for m in msgs])
    got = b.open(10.0, d, SRC)
    assert isinstance(got, Opened)
    assert got == Opened("alpha", a.epoch, 1, msgs)
    assert isinstance(got.messages[1][2], bytes) and isinstance(got.messages[1][1], str)
    assert b.accepted == 1 and not b.drops


def test_seq_advances_per_datagram_and_empty_seal_sends_nothing(pair):
    a, b = pair
    assert a.seal([]) == [] and a.seq == 0
    for expect in (1, 2, 3):
        (d,) = a.seal([a.encode(expect)])
        assert b.open(0, d, SRC).seq == expect


def test_body_is_not_readable_on_the_wire(pair):
    a, _ = pair
    (d,) = a.seal([a.encode("very-recognisable-payload")])
    assert b"alpha" not in d and b"very-recognisable" not in d


def test_many_messages_packed_greedily_in_order_within_limit(pair):
    a, b = pair
    msgs = [{"k": i, "pad": "x" * (i * 37 % 300)} for i in range(400)]
    encoded = [a.encode(m) for m in msgs]
    datagrams = a.seal(encoded)
    assert len(datagrams) > 1
    assert all(len(d) <= DEFAULT_MAX_DATAGRAM for d in datagrams)
    out, batches = [], []
    for d in datagrams:
        opened = b.open(0, d, SRC)
        assert isinstance(opened, Opened)
        out.extend(opened.messages)
        batches.append([a.encode(m) for m in opened.messages])
    assert out == msgs
    # Greedy: no datagram could have taken the first message of the next one.
    for this, nxt in zip(batches, batches[1:]):
        assert sum(map(len, this)) + len(nxt[0]) > a.capacity
    # And as few datagrams as fit: the total alone needs at least this many.
    assert len(datagrams) >= -(-sum(map(len, encoded)) // a.capacity)


@pytest.mark.parametrize("max_datagram", [200, 512, 1400, 9000])
@pytest.mark.parametrize("name", ["n", "node-with-a-much-longer-name.example.internal", "é" * 60])
def test_capacity_is_exact(key, max_datagram, name):
    a = make(name, key, max_datagram=max_datagram, epoch=2**64 - 1)
    b = make("receiver", key, max_datagram=max_datagram)
    cap = a.capacity
    # One bin message of exactly `cap` bytes (bin8/bin16 header included).
    for hdr in (2, 3):
        payload = b"x" * (cap - hdr)
        m = a.encode(payload)
        if len(m) == cap:
            break
    assert len(m) == cap
    (d,) = a.seal([m])
    assert len(d) == max_datagram
    assert b.open(0, d, SRC).messages == [payload]
    with pytest.raises(ValueError, match="fit"):
        a.seal([m + b"\xc0"])  # any cap+1 bytes
    # Many small messages adding up to exactly `cap` still go in one datagram.
    small = [a.encode(None)] * cap
    assert len(a.seal(small)) == 1
    assert len(a.seal(small + small[:1])) == 2


def test_capacity_does_not_depend_on_seq(key):
    a = make("alpha", key, max_datagram=300)
    a._seq = 2**64 - 10  # the largest seqs the sealer can still issue
    m = a.encode(b"y" * (a.capacity - 2))
    assert len(m) == a.capacity
    assert len(a.seal([m])[0]) == 300


def test_seal_accepts_any_iterable_of_bytes_like(pair):
    a, b = pair
    ds = a.seal(a.encode(i) for i in range(3))
    assert b.open(0, ds[0], SRC).messages == [0, 1, 2]
    (d,) = a.seal([memoryview(a.encode("mv")), bytearray(a.encode("ba"))])
    assert b.open(0, d, SRC).messages == ["mv", "ba"]


def test_oversized_message_raises_before_spending_a_seq(pair):
    a, _ = pair
    ok = a.encode(1)
    too_big = a.encode(b"z" * a.capacity)
    with pytest.raises(ValueError):
        a.seal([ok, too_big])
    assert a.seq == 0
    with pytest.raises(ValueError):
        a.seal([b""])
    with pytest.raises(TypeError):
        a.seal(["not bytes"])  # type: ignore[list-item]


def test_too_small_max_datagram_rejected(key):
    with pytest.raises(ValueError, match="no room"):
        make("alpha", key, max_datagram=OVERHEAD + 20)
    with pytest.raises(ValueError):
        make("x" * 256, key)
    with pytest.raises(ValueError):
        make("alpha", key, epoch=-1)


# -- drops --------------------------------------------------------------------------


def test_wrong_key_is_unknown_key(key):
    a = make("alpha", generate_key())
    b = make("beta", key)
    (d,) = a.seal([a.encode("hi")])
    assert b.open(0, d, SRC) is Drop.UNKNOWN_KEY
    assert b.drops == {Drop.UNKNOWN_KEY: 1} and b.accepted == 0


def test_key_id_pointing_at_our_key_but_sealed_with_another_is_unauthenticated(key):
    a = make("alpha", generate_key())
    b = make("beta", key)
    (d,) = a.seal([a.encode("hi")])
    forged = d[:7] + Keyring.key_id(key) + d[11:]
    assert b.open(0, forged, SRC) is Drop.UNAUTHENTICATED


def test_wrong_label(key):
    a = make("alpha", key, label="staging")
    b = make("beta", key, label="prod")
    (d,) = a.seal([a.encode("hi")])
    assert b.open(0, d, SRC) is Drop.WRONG_LABEL


def test_full_label_is_authenticated_not_just_its_fingerprint(key):
    # Simulate a 32-bit fingerprint collision: rewrite the clear fingerprint.
    a = make("alpha", key, label="staging")
    b = make("beta", key, label="prod")
    (d,) = a.seal([a.encode("hi")])
    colliding = d[:3] + wire_mod.label_fingerprint("prod") + d[7:]
    assert b.open(0, colliding, SRC) is Drop.UNAUTHENTICATED


def test_bad_magic_and_version(pair):
    a, b = pair
    (d,) = a.seal([a.encode("hi")])
    assert b.open(0, b"XX" + d[2:], SRC) is Drop.BAD_MAGIC
    assert b.open(0, d[:2] + bytes([PROTOCOL_VERSION + 1]) + d[3:], SRC) is Drop.BAD_VERSION


def test_truncated_and_oversized(pair):
    a, b = pair
    (d,) = a.seal([a.encode("hi")])
    assert b.open(0, b"", SRC) is Drop.TRUNCATED
    assert b.open(0, d[:OVERHEAD], SRC) is Drop.TRUNCATED
    assert b.open(0, d[:-1], SRC) is Drop.UNAUTHENTICATED
    limit = DEFAULT_MAX_DATAGRAM + OVERSIZE_SLACK
    assert b.open(0, d + bytes(limit + 1 - len(d)), SRC) is Drop.OVERSIZED
    # Exactly at the limit it is read (and fails authentication, having been padded).
    assert b.open(0, d + bytes(limit - len(d)), SRC) is Drop.UNAUTHENTICATED
    assert b.accepted == 0


def test_peer_with_slightly_larger_datagrams_is_still_heard(key):
    a = make("alpha", key, max_datagram=DEFAULT_MAX_DATAGRAM + OVERSIZE_SLACK)
    b = make("beta", key)
    (d,) = a.seal([a.encode(b"q" * (a.capacity - 3))])
    assert len(d) > DEFAULT_MAX_DATAGRAM
    assert isinstance(b.open(0, d, SRC), Opened)


def test_own_datagrams_are_self(pair):
    a, _ = pair
    (d,) = a.seal([a.encode("hi")])
    before = replay_snapshot(a)
    assert a.open(0, d, SRC) is Drop.SELF
    assert replay_snapshot(a) == before


def test_our_name_with_another_epoch_is_a_name_conflict(key):
    a = make("alpha", key, epoch=100)
    twin = make("alpha", key, epoch=200)
    (d,) = twin.seal([twin.encode("hi")])
    before = replay_snapshot(a)
    assert a.open(0, d, SRC) is Drop.NAME_CONFLICT
    assert replay_snapshot(a) == before and a.accepted == 0


@pytest.mark.parametrize("bad", [None, "a string", 12345, 10**9, [b"x"]])
def test_non_bytes_input_is_malformed_not_an_exception(pair, bad):
    _, b = pair
    assert b.open(0, bad, SRC) is Drop.MALFORMED  # type: ignore[arg-type]


def test_bytearray_and_memoryview_accepted(pair):
    a, b = pair
    d1, d2 = a.seal([a.encode(1)]), a.seal([a.encode(2)])
    assert b.open(0, bytearray(d1[0]), SRC).messages == [1]
    assert b.open(0, memoryview(d2[0]), SRC).messages == [2]


def test_every_single_bit_flip_is_dropped_without_state_change(pair):
    a, b = pair
    (d,) = a.seal([a.encode({"evict": [1, 2, 3]})] * 20)
    before = replay_snapshot(b)
    for i in range(len(d)):
        for bit in range(8):
            mutated = bytearray(d)
            mutated[i] ^= 1 << bit
            result = b.open(0, bytes(mutated), SRC)
            assert isinstance(result, Drop), (i, bit)
            assert result is not Drop.INTERNAL_ERROR
    assert b.accepted == 0
    assert replay_snapshot(b) == before
    # The genuine datagram is still accepted afterwards: no flip consumed its seq.
    assert isinstance(b.open(0, d, SRC), Opened)


_GOOD_PREFIX = ("alpha", 5, 9)


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb({"sender": "alpha"}),  # not an array
        msgpack.packb(["alpha", 5, 9]),  # too short
        msgpack.packb(["alpha", 5, 9, [], "extra"]),  # too long
        msgpack.packb([7, 5, 9, []]),  # sender not a str
        msgpack.packb(["", 5, 9, []]),  # empty sender
        msgpack.packb(["a" * 256, 5, 9, []]),  # sender too long
        msgpack.packb([b"alpha", 5, 9, []], use_bin_type=True),  # sender is bin
        msgpack.packb(["alpha", -1, 9, []]),  # negative epoch
        msgpack.packb(["alpha", True, 9, []]),  # bool is not an epoch
        msgpack.packb(["alpha", 5.0, 9, []]),  # float epoch
        msgpack.packb(["alpha", 5, -3, []]),  # negative seq
        msgpack.packb(["alpha", 5, 9, {}]),  # messages not a list
        msgpack.packb(["alpha", 5, 9, "m"]),
        msgpack.packb(["alpha", 5, 9, []]) + b"\xc0",  # trailing bytes
        b"\x94\xa5al\xffha\x05\x09\x90",  # invalid UTF-8 in sender
        msgpack.packb(["alpha", 5, 9, [msgpack.ExtType(1, b"x")]]),  # extension type
        b"\x94\xa5alpha\x05\x09\xdd\xff\xff\xff\xff",  # claims 4G messages
        b"\x94\xa5alpha\x05\x09\x91\xc6\x7f\xff\xff\xff",  # claims a 2 GB bin
        b"\x94\xa5alpha\x05\x09\x91\x81\x91\x01\x02",  # array as a map key
        b"\x94\xa5alpha\x05\x09\x91" + b"\x91" * 1300 + b"\xc0",  # nesting deeper than msgpack's stack
        b"\xc1",  # reserved, never valid
        b"",  # empty body
    ],
    ids=lambda body: body[:24].hex() + f"..{len(body)}",
)
def test_authentic_but_malformed_bodies(key, body):
    b = make("beta", key)
    before = replay_snapshot(b)
    d = seal_envelope(key, LABEL, body)
    assert b.open(0, d, SRC) is (Drop.TRUNCATED if not body else Drop.MALFORMED)
    assert replay_snapshot(b) == before and b.accepted == 0


def test_seal_envelope_with_a_well_formed_body_is_accepted(key):
    b = make("beta", key)
    body = encode_body("gamma", 3, 4, [msgpack.packb("hello")])
    # And a minimally encoded body (not what the sealer writes) is just as good.
    body2 = msgpack.packb(["gamma", 3, 5, ["again"]])
    assert b.open(0, seal_envelope(key, LABEL, body), SRC) == Opened("gamma", 3, 4, ["hello"])
    assert b.open(0, seal_envelope(key, LABEL, body2), SRC) == Opened("gamma", 3, 5, ["again"])


# -- replay -------------------------------------------------------------------------


def test_captured_datagram_replayed(pair):
    a, b = pair
    (d,) = a.seal([a.encode({"evict": "10.0.0.1:443"})])
    assert isinstance(b.open(0, d, SRC), Opened)
    assert b.open(1, d, SRC) is Drop.REPLAYED
    assert b.open(2, d, ("198.51.100.7", 1)) is Drop.REPLAYED
    assert b.accepted == 1 and b.drops == {Drop.REPLAYED: 2}


def test_restart_with_newer_epoch_accepted_older_stale(key):
    b = make("beta", key)
    old = make("alpha", key, epoch=1000)
    old_datagrams = [old.seal([old.encode(i)])[0] for i in range(3)]
    assert isinstance(b.open(0, old_datagrams[0], SRC), Opened)
    new = make("alpha", key, epoch=2000)  # rebooted: seq starts at 1 again
    (d,) = new.seal([new.encode("back")])
    assert b.open(0, d, SRC).epoch == 2000
    assert b.open(0, old_datagrams[1], SRC) is Drop.STALE
    assert b.open(0, old_datagrams[2], SRC) is Drop.STALE


def test_reordering_inside_window_and_edges(key):
    a = make("alpha", key)
    b = make("beta", key, replay_window=16)
    ds = [a.seal([a.encode(i)])[0] for i in range(40)]  # seqs 1..40
    assert b.open(0, ds[39], SRC).seq == 40
    assert b.open(0, ds[39 - 15], SRC).seq == 25  # oldest seq inside the window
    assert b.open(0, ds[39 - 16], SRC) is Drop.STALE  # first one outside
    assert b.open(0, ds[30], SRC).seq == 31
    assert b.open(0, ds[30], SRC) is Drop.REPLAYED


def test_forget_sender(pair):
    a, b = pair
    d1, d2 = (a.seal([a.encode(i)])[0] for i in range(2))
    assert isinstance(b.open(0, d1, SRC), Opened)
    b.forget_sender("alpha")
    assert "alpha" not in b.replay
    assert b.open(0, d1, SRC) is Drop.STALE  # a reaped member cannot be replayed back
    assert isinstance(b.open(0, d2, SRC), Opened)  # but a live one keeps talking


def test_tracked_senders_are_bounded(key):
    b = make("beta", key, max_tracked_senders=4)
    for i in range(50):
        s = make(f"n{i}", key)
        assert isinstance(b.open(0, s.seal([s.encode(i)])[0], SRC), Opened)
    assert len(b.replay) == 4


# -- rate limiting ------------------------------------------------------------------


def test_rate_limit_before_decryption_without_touching_replay(key):
    a = make("alpha", key)
    b = make("beta", key, rate_limiter=RateLimiter(rate=1, burst=2))
    ds = [a.seal([a.encode(i)])[0] for i in range(4)]
    assert isinstance(b.open(0.0, ds[0], SRC), Opened)
    assert isinstance(b.open(0.0, ds[1], SRC), Opened)
    assert b.open(0.0, ds[2], SRC) is Drop.RATE_LIMITED
    assert isinstance(b.open(0.0, ds[2], ("192.0.2.11", 1)), Opened)  # another host
    # Garbage with a foreign key is refused before it can eat a peer's tokens.
    stranger = make("mallory", generate_key())
    for _ in range(10):
        assert b.open(1.0, stranger.seal([b"\xc0"])[0], SRC) is Drop.UNKNOWN_KEY
    assert isinstance(b.open(1.0, ds[3], SRC), Opened)  # refilled one token
    assert b.drops[Drop.RATE_LIMITED] == 1


def test_rate_limited_datagram_is_not_recorded_as_seen(key):
    a = make("alpha", key)
    b = make("beta", key, rate_limiter=RateLimiter(rate=1, burst=1))
    d1, d2 = (a.seal([a.encode(i)])[0] for i in range(2))
    assert isinstance(b.open(0.0, d1, SRC), Opened)
    assert b.open(0.0, d2, SRC) is Drop.RATE_LIMITED
    assert b.open(5.0, d2, SRC).seq == 2


# -- key rotation -------------------------------------------------------------------


def test_rotation_with_traffic_throughout_and_zero_drops():
    old, new = generate_key(), generate_key()
    names = ["alpha", "beta", "gamma"]
    nodes = {n: Wire(label=LABEL, keyring=Keyring(old), sender=n, epoch=1) for n in names}
    delivered = 0

    def traffic():
        nonlocal delivered
        for s in names:
            for r in names:
                if s == r:
                    continue
                for d in nodes[s].seal([nodes[s].encode({"from": s, "to": r})]):
                    got = nodes[r].open(0, d, SRC)
                    assert isinstance(got, Opened), (s, r, got)
                    delivered += 1
        for n in names:
            assert not nodes[n].drops, nodes[n].drops

    traffic()
    for step in ("install", "use", "remove"):
        for n in names:  # one member at a time, traffic between every change
            kr = nodes[n].keyring
            if step == "install":
                kr.install(new)
            elif step == "use":
                kr.use(new)
            else:
                kr.remove(old)
            traffic()
    assert all(nodes[n].keyring.keys == (new,) for n in names)
    assert delivered == 6 * 10


def test_removing_old_key_too_early_is_visible(key):
    new = generate_key()
    a = make("alpha", key)
    b = make("beta", key)
    b.keyring.install(new)
    b.keyring.use(new)
    a.keyring.install(new)
    a.keyring.use(new)
    a.keyring.remove(key)
    # b switched to new, a removed old: still fine. Now a laggard that never
    # installed `new` seals with old, which a no longer has.
    laggard = make("gamma", key)
    assert a.open(0, laggard.seal([b"\xc0"])[0], SRC) is Drop.UNKNOWN_KEY


# -- nonces --------------------------------------------------------------------------


def test_nonces_unique_and_prefix_redrawn_on_counter_wrap(pair):
    a, _ = pair
    ds = a.seal([a.encode(b"m" * 1000)] * 200)
    nonces = {d[HEADER_SIZE - 12 : HEADER_SIZE] for d in ds}
    assert len(nonces) == 200
    n = wire_mod._Nonces()
    n._counter = 2**32 - 1
    last = n.next()
    wrapped = n.next()
    assert last[8:] == b"\xff\xff\xff\xff" and wrapped[8:] == b"\0\0\0\0"
    assert last[:8] != wrapped[:8]


def test_two_wires_draw_different_nonce_prefixes(key):
    prefixes = {wire_mod._Nonces()._prefix for _ in range(100)}
    assert len(prefixes) == 100


def test_drop_values_are_distinct_metric_labels():
    values = [d.value for d in Drop]
    assert len(set(values)) == len(values)
    assert all(v.isidentifier() and v.islower() for v in values)
    assert Drop.RATE_LIMITED == "rate_limited"


def test_random_garbage_is_dropped_cheaply(pair):
    _, b = pair
    for n in (0, 1, 38, 39, 40, 200, 1400, 1528, 1529, 5000):
        assert isinstance(b.open(0, os.urandom(n), SRC), Drop)
    assert b.accepted == 0 and Drop.INTERNAL_ERROR not in b.drops


def test_encode_after_a_message_it_cannot_pack_is_clean():
    # every message shares one msgpack Packer: a failed pack must leave nothing behind
    with pytest.raises(TypeError):
        Wire.encode([9, "o", object()])
    msg = [9, "origin", 1, 2, b"\x0a\0\0\1", 40000, b"\x0a\0\0\2", 80, 6]
    assert Wire.encode(msg) == msgpack.packb(msg, use_bin_type=True)
    assert msgpack.unpackb(Wire.encode(msg)) == msg
