"""Property-based fuzzing of Wire.open: whatever arrives, open() returns a result
(never raises, never hits its internal-error fallback), and a dropped datagram
leaves the replay state exactly as it was.

Sources of input: random bytes; a plausible clear header over random
ciphertext; valid datagrams with random mutations; authentic datagrams (sealed
with the real key) whose plaintext is random bytes, random msgpack, a mutated
real body, or a near-valid body with fields of the wrong type or range, so the
post-decryption decoder is fuzzed too. Near-valid bodies are checked against an
independent oracle of what must be accepted.

The structured cases are built by a seeded ``random.Random`` from a seed that
Hypothesis draws: generating nested objects through Hypothesis strategies costs
milliseconds per case, which would put 5000-case runs in minutes. A failure still
reports its seed and replays exactly.
"""
from __future__ import annotations

import os
import random

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlb.cluster.keyring import Keyring
from meshlb.cluster.ratelimit import RateLimiter
from meshlb.cluster.wire import (
    DEFAULT_MAX_DATAGRAM,
    HEADER_SIZE,
    MAGIC,
    MAX_SENDER_BYTES,
    OVERHEAD,
    OVERSIZE_SLACK,
    PROTOCOL_VERSION,
    Drop,
    Opened,
    Wire,
    encode_body,
    label_fingerprint,
    seal_envelope,
)

LABEL = "fuzz-cluster"
KEY = bytes(range(1, 33))
SRC = ("192.0.2.1", 7946)
# 5000 keeps the default run near 15 s of CPU; raise it for a deeper soak.
EXAMPLES = max(5000, int(os.environ.get("MESHLB_FUZZ_EXAMPLES", "5000")))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # keep the shared checkout free of .hypothesis/
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def receiver(**kw) -> Wire:
    return Wire(label=LABEL, keyring=Keyring(KEY), sender="receiver", epoch=10, **kw)


def _valid_pool() -> list[bytes]:
    s = Wire(label=LABEL, keyring=Keyring(KEY), sender="sender", epoch=5)
    pool = []
    for n in (1, 3, 30, 200):
        pool += s.seal([s.encode({"m": i, "p": "x" * (i % 50)}) for i in range(n)])
    return pool


VALID = _valid_pool()


def primed_receiver(rate_limiter: RateLimiter | None = None) -> Wire:
    """A receiver that has state to lose: windows for a few senders, one tombstone."""
    r = receiver()
    for d in VALID[::2]:
        assert isinstance(r.open(0.0, d, SRC), Opened)
    other = Wire(label=LABEL, keyring=Keyring(KEY), sender="other", epoch=1)
    for d in other.seal([other.encode(i) for i in range(3)]):
        r.open(0.0, d, SRC)
    r.forget_sender("other")
    r.rate_limiter = rate_limiter
    return r


SHARED = primed_receiver()  # drops must not change it, so one receiver serves many cases


def snapshot(w: Wire):
    windows = tuple((n, x.epoch, x.top, x.bits) for n, x in w.replay._windows.items())
    return w.accepted, windows, tuple(w.replay._tombstones.items())


def assert_clean_drop(w: Wire, before, result) -> None:
    assert isinstance(result, Drop), result
    assert result is not Drop.INTERNAL_ERROR
    assert Drop.INTERNAL_ERROR not in w.drops
    assert snapshot(w) == before


# -- 1. random bytes behind a more or less plausible clear header ---------------------

_LIMIT = DEFAULT_MAX_DATAGRAM + OVERSIZE_SLACK
_LENGTHS = [0, 1, 2, 3, 10, HEADER_SIZE, OVERHEAD - 1, OVERHEAD, OVERHEAD + 1, 100,
            DEFAULT_MAX_DATAGRAM, _LIMIT, _LIMIT + 1, _LIMIT + 500]
_TIMES = [0.0, 1.0, -1.0, 1e9, -1e18, float("inf"), float("-inf"), float("nan")]
_OUR_KEY_ID = Keyring.key_id(KEY)


def _maybe(rng: random.Random, good: bytes) -> bytes:
    """The right header field most of the time, so later checks get exercised too."""
    return good if rng.random() < 0.8 else rng.randbytes(len(good))


@FUZZ
@given(seed=st.integers(0, 2**64 - 1))
def test_random_bytes_never_raise_nor_change_state(seed):
    rng = random.Random(seed)
    n = rng.choice(_LENGTHS) if rng.random() < 0.3 else rng.randint(0, _LIMIT + 64)
    header = (
        _maybe(rng, MAGIC)
        + _maybe(rng, bytes([PROTOCOL_VERSION]))
        + _maybe(rng, label_fingerprint(LABEL))
        + _maybe(rng, _OUR_KEY_ID)
        + rng.randbytes(12)
    )
    data = (header + rng.randbytes(max(0, n - HEADER_SIZE)))[:n] if rng.random() < 0.9 else rng.randbytes(n)
    w = SHARED
    w.rate_limiter = RateLimiter(rate=1, burst=1)
    try:
        before = snapshot(w)
        for attempt in range(rng.randint(1, 3)):
            now = rng.choice(_TIMES) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
            host = rng.choice(("192.0.2.1", "192.0.2.2", "2001:db8::1"))
            result = w.open(now, data, (host, rng.randrange(65536)))
            assert_clean_drop(w, before, result)
            # Oracle: the first cheap check that fails names the drop.
            if len(data) > _LIMIT:
                assert result is Drop.OVERSIZED
            elif len(data) < OVERHEAD + 1:
                assert result is Drop.TRUNCATED
            elif data[:2] != MAGIC:
                assert result is Drop.BAD_MAGIC
            elif data[2] != PROTOCOL_VERSION:
                assert result is Drop.BAD_VERSION
            elif data[3:7] != label_fingerprint(LABEL):
                assert result is Drop.WRONG_LABEL
            elif data[7:11] != _OUR_KEY_ID:
                assert result is Drop.UNKNOWN_KEY
            elif attempt == 0:
                assert result is Drop.UNAUTHENTICATED  # a fresh bucket always has a token
            else:
                assert result in (Drop.UNAUTHENTICATED, Drop.RATE_LIMITED)
    finally:
        w.rate_limiter = None


# -- 2. mutated valid datagrams ----------------------------------------------------

def mutate(rng: random.Random, data: bytes, max_ops: int = 8) -> bytes:
    d = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.choice(("flip", "set", "truncate", "extend", "insert", "delete", "swap"))
        n = len(d)
        if op == "flip" and n:
            d[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == "set" and n:
            d[rng.randrange(n)] = rng.randrange(256)
        elif op == "truncate":
            del d[rng.randint(0, n) :]
        elif op == "extend":
            d += rng.randbytes(rng.randint(1, 200))
        elif op == "insert":
            i = rng.randint(0, n)
            d[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete" and n:
            i = rng.randrange(n)
            del d[i : i + rng.randint(1, 16)]
        elif op == "swap" and n > 1:
            i, j = rng.randrange(n), rng.randrange(n)
            d[i], d[j] = d[j], d[i]
    return bytes(d)


@FUZZ
@given(seed=st.integers(0, 2**64 - 1))
def test_mutated_valid_datagrams_are_dropped(seed):
    rng = random.Random(seed)
    index = rng.randrange(len(VALID))
    original = VALID[index]
    d = mutate(rng, original)
    w = SHARED
    before = snapshot(w)
    if d == original:
        # Mutations cancelled out: the genuine datagram, judged as such. Judge it on
        # a copy-free fresh receiver primed the same way so SHARED stays untouched.
        w = primed_receiver()
        result = w.open(0.0, d, SRC)
        assert result is Drop.REPLAYED if index % 2 == 0 else isinstance(result, Opened)
        return
    assert_clean_drop(w, before, w.open(0.0, d, SRC))


# -- 3. authentic datagrams with hostile plaintext ------------------------------------

_INTS = [0, 1, -1, 10, 31, 32, 127, 128, 255, 256, -32, -33, 2**15, 2**16, 2**31, 2**32,
         2**63 - 1, 2**63, 2**64 - 1, -(2**63)]  # 10 is the receiver's own epoch
_FLOATS = [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e308]
_ALPHABET = "abcxyz-._ \x00\x7fé€\U0001f600"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def _scalar(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(_INTS)
    if kind == 3:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 4:
        return rng.choice(_FLOATS)
    if kind == 5:
        return _text(rng, rng.randint(0, 40))
    return rng.randbytes(rng.randint(0, 40))


def hostile_object(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 5 and r < 0.2:
        return [hostile_object(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    if depth < 5 and r < 0.3:
        # A tuple key packs as an array, which the receiver cannot use as a dict key.
        keys = [
            rng.choice((_text(rng, 3), rng.randint(-5, 5), rng.randbytes(2), (1, "k")))
            for _ in range(rng.randint(0, 5))
        ]
        return {k: hostile_object(rng, depth + 1) for k in keys}
    return _scalar(rng)


def _sender(rng: random.Random):
    if rng.random() < 0.5:
        return _text(rng, rng.randint(1, 30))
    return rng.choice((
        lambda: "",
        lambda: "x" * MAX_SENDER_BYTES,
        lambda: "x" * (MAX_SENDER_BYTES + 1),
        lambda: "é" * 128,  # 256 UTF-8 bytes in 128 characters
        lambda: "receiver",
        lambda: rng.randbytes(5),
        lambda: rng.choice(_INTS),
        lambda: None,
        lambda: [_text(rng, 3)],
    ))()


def _u64(rng: random.Random):
    if rng.random() < 0.6:
        return rng.randint(0, 2**64 - 1)
    return rng.choice((
        lambda: rng.randint(0, 2**64 - 1),
        lambda: rng.choice(_INTS),
        lambda: rng.random() < 0.5,
        lambda: rng.choice(_FLOATS),
        lambda: _text(rng, 2),
        lambda: None,
    ))()


def expected_shape_ok(sender, epoch, seq, messages) -> bool:
    """Independent statement of the body rules, for the oracle below."""
    return (
        isinstance(sender, str)
        and 0 < len(sender.encode("utf-8", "surrogatepass")) <= MAX_SENDER_BYTES
        and all(type(v) is int and 0 <= v < 2**64 for v in (epoch, seq))
        and isinstance(messages, list)
    )


def roundtrip(obj):
    # What msgpack itself gives back for obj (tuples become lists, and so on).
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=False)


def same(a, b) -> bool:
    # Equality that treats NaN as equal to itself, as a byte-level round trip does.
    return msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True)


@FUZZ
@given(seed=st.integers(0, 2**64 - 1))
def test_authentic_near_valid_bodies_against_oracle(seed):
    rng = random.Random(seed)
    sender, epoch, seq = _sender(rng), _u64(rng), _u64(rng)
    if rng.random() < 0.8:
        messages = [hostile_object(rng) for _ in range(rng.randint(0, 8))]
    else:
        messages = hostile_object(rng)
    extra = [hostile_object(rng) for _ in range(rng.randint(1, 2))] if rng.random() < 0.15 else []
    body = [sender, epoch, seq, messages, *extra]
    try:
        plaintext = msgpack.packb(body, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return  # not representable in msgpack: nothing a peer could send
    d = seal_envelope(KEY, LABEL, plaintext)
    if len(d) > DEFAULT_MAX_DATAGRAM + OVERSIZE_SLACK:
        return
    w = receiver()  # fresh, so any well-formed body is also fresh
    before = snapshot(w)
    result = w.open(0.0, d, SRC)
    try:
        decoded_messages = roundtrip(messages)
    except TypeError:
        decoded_messages = None  # an array used as a map key: no Python dict can hold it
    ok = not extra and decoded_messages is not None and expected_shape_ok(sender, epoch, seq, messages)
    if ok and sender == "receiver":
        assert result is (Drop.SELF if epoch == w.epoch else Drop.NAME_CONFLICT)
        assert snapshot(w) == before
    elif ok:
        assert isinstance(result, Opened), result
        assert (result.sender, result.epoch, result.seq) == (sender, epoch, seq)
        assert same(result.messages, decoded_messages)
        assert w.accepted == 1 and sender in w.replay
        assert w.open(0.0, d, SRC) is Drop.REPLAYED
    else:
        assert result is Drop.MALFORMED
        assert_clean_drop(w, before, result)


def _random_plaintext(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 600))
    if kind == 1:
        try:
            return msgpack.packb(hostile_object(rng), use_bin_type=True)
        except (ValueError, TypeError, OverflowError):
            return b"\xc1"
    # A real body as the sealer writes it, then damaged: the decoder sees input
    # that is almost right, the hardest kind to handle.
    msgs = []
    for _ in range(rng.randint(1, 6)):
        try:
            msgs.append(msgpack.packb(hostile_object(rng), use_bin_type=True))
        except (ValueError, TypeError, OverflowError):
            msgs.append(b"\xc0")
    body = encode_body("sender", rng.randint(0, 2**64 - 1), rng.randint(0, 2**64 - 1), msgs)
    if kind == 2:
        body = body[:600]
    return mutate(rng, body, max_ops=3)


@FUZZ
@given(seed=st.integers(0, 2**64 - 1))
def test_authentic_hostile_plaintext(seed):
    rng = random.Random(seed)
    d = seal_envelope(KEY, LABEL, _random_plaintext(rng))
    w = receiver()  # fresh, so a well-formed body cannot be refused as a replay
    before = snapshot(w)
    result = w.open(0.0, d, SRC)
    if isinstance(result, Opened):
        # Random input that happens to be a well-formed body is accepted as one.
        assert expected_shape_ok(result.sender, result.epoch, result.seq, result.messages)
        assert w.accepted == 1 and result.sender in w.replay
    else:
        assert_clean_drop(w, before, result)
        if len(d) > _LIMIT:
            assert result is Drop.OVERSIZED
        elif len(d) >= OVERHEAD + 1:
            assert result is Drop.MALFORMED
