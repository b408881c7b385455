"""The cluster's shared gossip keys.

A keyring holds one *primary* key, which seals every outgoing datagram, and any
number of other installed keys, which are only used to open. That split is what
makes rotation possible without a moment where two members cannot talk:

1. ``install(new)`` on every member (everyone can now open with ``new``);
2. ``use(new)`` on every member (datagrams are sealed with ``new``; members that
   have not switched yet still seal with ``old``, which everyone can still open);
3. ``remove(old)`` on every member.

Key material never leaves this object in a printable form: ``repr`` and every
error message show fingerprints only, so a key cannot end up in a log by accident.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

KEY_SIZE = 32
KEY_ID_SIZE = 4

__all__ = ["KEY_SIZE", "KEY_ID_SIZE", "Keyring", "KeyringError", "generate_key"]


class KeyringError(ValueError):
    """A key or key file is unusable; the message never contains key material."""


def generate_key() -> bytes:
    return os.urandom(KEY_SIZE)


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise KeyringError(f"a key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise KeyringError(f"a key must be {KEY_SIZE} bytes, got {len(key)}")
    if key == bytes(KEY_SIZE):
        # An all-zero key is a placeholder someone forgot to replace, never a real secret.
        raise KeyringError("refusing the all-zero key")
    return key


def _digest(key: bytes) -> bytes:
    # Domain-separated so the fingerprint is not the hash anyone else computes of the key.
    return hashlib.sha256(b"meshlb key fingerprint\x00" + key).digest()


class Keyring:
    """Primary key plus the other keys accepted while a rotation is in progress."""

    __slots__ = ("_primary", "_keys", "_by_id")

    def __init__(self, primary: bytes, others: Iterable[bytes] = ()) -> None:
        primary = _check_key(primary)
        # Insertion-ordered: primary first, then others in the order given, so `keys`
        # and the order in which candidates are tried are deterministic.
        self._keys: dict[bytes, ChaCha20Poly1305] = {}
        self._by_id: dict[bytes, list[bytes]] = {}
        self._primary = primary
        self._add(primary)
        for key in others:
            self._add(_check_key(key))

    # -- fingerprints -------------------------------------------------------------

    @staticmethod
    def key_id(key: bytes) -> bytes:
        """The short identifier carried in the clear in each datagram's header."""
        return _digest(_check_key(key))[:KEY_ID_SIZE]

    @staticmethod
    def fingerprint(key: bytes) -> str:
        """Printable form of ``key_id``: safe to log, compare across hosts, show in a CLI."""
        return Keyring.key_id(key).hex()

    # -- queries ------------------------------------------------------------------

    @property
    def primary(self) -> bytes:
        return self._primary

    @property
    def keys(self) -> tuple[bytes, ...]:
        """All installed keys, primary first."""
        return (self._primary, *(k for k in self._keys if k != self._primary))

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(self.fingerprint(k) for k in self.keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (bytes, bytearray)) and bytes(key) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        others = [self.fingerprint(k) for k in self.keys[1:]]
        return f"Keyring(primary={self.fingerprint(self._primary)}, others={others})"

    __str__ = __repr__

    # -- used by the wire codec -----------------------------------------------------

    def primary_cipher(self) -> tuple[bytes, ChaCha20Poly1305]:
        """(key id, AEAD) for sealing."""
        return self.key_id(self._primary), self._keys[self._primary]

    def ciphers_for(self, key_id: bytes) -> list[ChaCha20Poly1305]:
        """Every installed key whose id matches; usually one, more only on a 32-bit
        fingerprint collision, in which case the codec tries each."""
        return [self._keys[k] for k in self._by_id.get(bytes(key_id), ())]

    # -- rotation -------------------------------------------------------------------

    def install(self, key: bytes) -> None:
        """Accept ``key`` for opening. Idempotent."""
        self._add(_check_key(key))

    def use(self, key: bytes) -> None:
        """Seal with ``key`` from now on. It must already be installed, so that a
        typo cannot silently switch a member to a key nobody else has."""
        key = _check_key(key)
        if key not in self._keys:
            raise KeyringError(
                f"cannot use key {self.fingerprint(key)}: it is not installed (install it first)"
            )
        self._primary = key

    def remove(self, key: bytes) -> None:
        key = _check_key(key)
        if key == self._primary:
            raise KeyringError(
                f"cannot remove key {self.fingerprint(key)}: it is the primary (use another key first)"
            )
        if key not in self._keys:
            raise KeyringError(f"cannot remove key {self.fingerprint(key)}: it is not installed")
        del self._keys[key]
        kid = self.key_id(key)
        bucket = self._by_id[kid]
        bucket.remove(key)
        if not bucket:
            del self._by_id[kid]

    def _add(self, key: bytes) -> None:
        if key in self._keys:
            return
        self._keys[key] = ChaCha20Poly1305(key)
        self._by_id.setdefault(self.key_id(key), []).append(key)

    # -- files ----------------------------------------------------------------------

    @staticmethod
    def parse_key(text: str) -> bytes:
        """One key written as 64 hex digits or as base64 of 32 bytes."""
        text = text.strip()
        raw: bytes | None = None
        if len(text) == 2 * KEY_SIZE:
            try:
                raw = bytes.fromhex(text)
            except ValueError:
                raw = None
        if raw is None:
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                # Never echo the text: a slightly mangled key is still mostly a key.
                raise KeyringError(
                    f"not a key: expected {2 * KEY_SIZE} hex digits or base64 of {KEY_SIZE} bytes"
                ) from None
        return _check_key(raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Load a key file: one key per line (hex or base64), the first is primary.
        Blank lines and lines starting with ``#`` are ignored."""
        name = os.fspath(path)
        try:
            with open(name, encoding="ascii") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise KeyringError(f"{name}: key file is not ASCII text") from None
        except OSError as e:
            raise KeyringError(f"{name}: cannot read key file: {e.strerror or e}") from None
        keys: list[bytes] = []
        first_line: dict[bytes, int] = {}
        for lineno, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = cls.parse_key(line)
            except KeyringError as e:
                raise KeyringError(f"{name}:{lineno}: {e}") from None
            if key in first_line:
                raise KeyringError(
                    f"{name}:{lineno}: duplicate key (same as line {first_line[key]})"
                )
            first_line[key] = lineno
            keys.append(key)
        if not keys:
            raise KeyringError(f"{name}: key file contains no key")
        return cls(keys[0], keys[1:])
