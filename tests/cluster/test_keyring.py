from __future__ import annotations

import base64
import os

import pytest

from meshlb.cluster.keyring import KEY_SIZE, Keyring, KeyringError, generate_key


def keys(n: int) -> list[bytes]:
    return [generate_key() for _ in range(n)]


def test_primary_first_and_others_in_order():
    a, b, c = keys(3)
    kr = Keyring(a, [b, c])
    assert kr.primary == a
    assert kr.keys == (a, b, c)
    assert len(kr) == 3 and b in kr and generate_key() not in kr


def test_install_is_idempotent_and_use_requires_install():
    a, b = keys(2)
    kr = Keyring(a)
    kr.install(b)
    kr.install(b)
    assert kr.keys == (a, b)
    kr.use(b)
    assert kr.primary == b and kr.keys == (b, a)
    with pytest.raises(KeyringError, match="not installed"):
        kr.use(generate_key())
    assert kr.primary == b


def test_remove_never_the_primary():
    a, b = keys(2)
    kr = Keyring(a, [b])
    with pytest.raises(KeyringError, match="primary"):
        kr.remove(a)
    kr.remove(b)
    assert kr.keys == (a,)
    assert kr.ciphers_for(Keyring.key_id(b)) == []
    with pytest.raises(KeyringError, match="not installed"):
        kr.remove(b)


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, bytes(KEY_SIZE)])
def test_rejects_bad_keys(bad):
    with pytest.raises(KeyringError):
        Keyring(bad)


def test_rejects_non_bytes():
    with pytest.raises(KeyringError, match="bytes"):
        Keyring("a" * 32)  # type: ignore[arg-type]


def test_fingerprint_is_stable_short_and_distinct():
    a, b = keys(2)
    assert Keyring.fingerprint(a) == Keyring.fingerprint(bytes(a))
    assert len(Keyring.fingerprint(a)) == 8
    assert Keyring.fingerprint(a) != Keyring.fingerprint(b)
    assert Keyring.fingerprint(a) not in a.hex()  # not a prefix of the key itself


def test_ciphers_for_finds_the_installed_key():
    a, b = keys(2)
    kr = Keyring(a, [b])
    assert len(kr.ciphers_for(Keyring.key_id(b))) == 1
    assert kr.ciphers_for(b"\0\0\0\0") == [] or Keyring.key_id(a) == b"\0\0\0\0"
    kid, _ = kr.primary_cipher()
    assert kid == Keyring.key_id(a)


def test_repr_never_shows_key_material():
    a, b = keys(2)
    kr = Keyring(a, [b])
    text = repr(kr) + str(kr)
    for k in (a, b):
        assert k.hex() not in text
        assert base64.b64encode(k).decode() not in text
        assert Keyring.fingerprint(k) in text


def test_from_file_hex_and_base64_first_is_primary(tmp_path):
    a, b, c = keys(3)
    p = tmp_path / "keys"
    p.write_text(
        "# cluster keys\n\n"
        f"{a.hex()}\n"
        f"  {base64.b64encode(b).decode()}  \n"
        f"{c.hex().upper()}\n"
    )
    kr = Keyring.from_file(p)
    assert kr.keys == (a, b, c)
    assert kr.primary == a


def test_from_file_errors_name_the_file_and_line_but_not_the_key(tmp_path):
    a = generate_key()
    p = tmp_path / "keys"
    mangled = a.hex()[:-1] + "z"
    p.write_text(f"{a.hex()}\n{mangled}\n")
    with pytest.raises(KeyringError) as e:
        Keyring.from_file(p)
    msg = str(e.value)
    assert str(p) in msg and ":2:" in msg
    assert mangled not in msg and a.hex()[:16] not in msg


def test_from_file_wrong_length_base64(tmp_path):
    p = tmp_path / "keys"
    p.write_text(base64.b64encode(os.urandom(16)).decode() + "\n")
    with pytest.raises(KeyringError, match=r"keys:1: .*32 bytes"):
        Keyring.from_file(p)


def test_from_file_duplicate(tmp_path):
    a = generate_key()
    p = tmp_path / "keys"
    p.write_text(f"{a.hex()}\n{base64.b64encode(a).decode()}\n")
    with pytest.raises(KeyringError, match=r":2: duplicate key \(same as line 1\)"):
        Keyring.from_file(p)


def test_from_file_empty_missing_and_binary(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(KeyringError, match=f"{empty}: key file contains no key"):
        Keyring.from_file(empty)
    missing = tmp_path / "missing"
    with pytest.raises(KeyringError, match=f"{missing}: cannot read key file"):
        Keyring.from_file(missing)
    binary = tmp_path / "binary"
    binary.write_bytes(os.urandom(32) + b"\xff")
    with pytest.raises(KeyringError, match=f"{binary}: key file is not ASCII"):
        Keyring.from_file(binary)
