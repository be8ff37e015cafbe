"""Sealed cookie values (SPEC section 6).

A session is sealed with AES-256-GCM into a cookie-safe ASCII value::

    "1." + key_id + "." + base64url_nopad(nonce12 || ciphertext || tag16)

The format version and the key id travel in the clear; the associated data binds
the version, the key id and the cookie name, so a value copied to another cookie
name, or relabelled with another key id, fails to unseal.

A sealed value that would not fit in one cookie (name + value <= 4096 bytes) is
split into numbered chunks by :func:`chunk_cookie` and put back together by
:func:`assemble_cookie`.

Everything here is pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "COOKIE_LIMIT",
    "KeyRing",
    "Unsealed",
    "assemble_cookie",
    "chunk_cookie",
    "cookie_names_for",
    "decode_key",
    "new_key_text",
]

COOKIE_LIMIT = 4096
"""Largest ``len(name) + len(value)`` of one cookie (SPEC section 6)."""

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

_VERSION = "1"
_AD_PREFIX = b"bff/" + _VERSION.encode("ascii") + b"|"
_KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_KEY_TEXT_RE = re.compile(r"([A-Za-z0-9_-]+)(=*)")
_CHUNK_COUNT_RE = re.compile(r"([1-9][0-9]{0,8})~")
_CHUNK_SEP = "~"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode_strict(text: str) -> bytes | None:
    """Decode unpadded base64url, accepting only the canonical encoding.

    Non-canonical text (a last character whose unused low bits are set) is
    rejected so that every distinct string decodes to distinct bytes: changing
    any character of a sealed value must change what is authenticated.
    """
    if _B64URL_RE.fullmatch(text) is None or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if _b64encode(data) != text:
        return None
    return data


def _associated_data(key_id: str, name: str) -> bytes:
    # The key id cannot contain "|" and the name comes last, so this is unambiguous.
    return _AD_PREFIX + key_id.encode("ascii") + b"|" + name.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class Unsealed:
    """The result of a successful :meth:`KeyRing.unseal`."""

    plaintext: bytes = field(repr=False)
    stale_key: bool
    """True when the value was sealed under a key other than the first: re-seal it."""


class KeyRing:
    """An ordered set of AES-256 keys: the first seals, every one unseals."""

    __slots__ = ("_aeads", "_primary")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if len(keys) == 0:
            raise ValueError("key ring is empty: at least one session key is required")
        aeads: dict[str, AESGCM] = {}
        for entry in keys:
            key_id, key = entry
            if not isinstance(key_id, str) or _KEY_ID_RE.fullmatch(key_id) is None:
                raise ValueError(
                    f"invalid session key id {key_id!r}: expected 1-32 of [A-Za-z0-9_-]"
                )
            if key_id in aeads:
                raise ValueError(f"duplicate session key id {key_id!r}")
            if not isinstance(key, bytes | bytearray | memoryview):
                raise ValueError(f"session key {key_id!r} is not bytes")
            material = bytes(key)
            if len(material) != KEY_SIZE:
                # Only the length is reported, never the material.
                raise ValueError(
                    f"session key {key_id!r} is {len(material)} bytes; expected {KEY_SIZE}"
                )
            aeads[key_id] = AESGCM(material)
        self._aeads = aeads
        self._primary = keys[0][0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids in ring order; the first is the sealing key."""
        return tuple(self._aeads)

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self.key_ids!r})"

    def seal(self, plaintext: bytes, name: str) -> str:
        """Seal ``plaintext`` for the cookie called ``name``; the result is cookie-safe ASCII."""
        key_id = self._primary
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = self._aeads[key_id].encrypt(nonce, plaintext, _associated_data(key_id, name))
        return f"{_VERSION}.{key_id}.{_b64encode(nonce + sealed)}"

    def unseal(self, value: str, name: str) -> Unsealed | None:
        """Open a value made by :meth:`seal` for the same cookie ``name``.

        Returns None on any failure (tampered, truncated, garbage, unknown key
        id, wrong cookie name, wrong version, bad base64, empty); never raises.
        """
        if not isinstance(value, str) or not isinstance(name, str):
            return None
        parts = value.split(".")
        if len(parts) != 3:
            return None
        version, key_id, payload = parts
        if version != _VERSION:
            return None
        aead = self._aeads.get(key_id)
        if aead is None:
            return None
        blob = _b64decode_strict(payload)
        if blob is None or len(blob) < NONCE_SIZE + TAG_SIZE:
            return None
        try:
            plaintext = aead.decrypt(
                blob[:NONCE_SIZE], blob[NONCE_SIZE:], _associated_data(key_id, name)
            )
        except (InvalidTag, ValueError, OverflowError):
            return None
        return Unsealed(plaintext=plaintext, stale_key=key_id != self._primary)


def decode_key(text: str) -> bytes:
    """Decode a base64url session key ('=' padding optional); it must be exactly 32 bytes.

    Surrounding whitespace is ignored. Error messages never echo the key text.
    """
    if not isinstance(text, str):
        raise ValueError("session key must be base64url text")
    match = _KEY_TEXT_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError("session key is not base64url text")
    core, padding = match.groups()
    if padding and (len(padding) > 2 or (len(core) + len(padding)) % 4 != 0):
        raise ValueError("session key has incorrect base64 padding")
    if len(core) % 4 == 1:
        raise ValueError("session key is not valid base64url")
    try:
        key = base64.urlsafe_b64decode(core + "=" * (-len(core) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("session key is not valid base64url") from None
    if len(key) != KEY_SIZE:
        raise ValueError(f"session key decodes to {len(key)} bytes; expected {KEY_SIZE}")
    return key


def new_key_text() -> str:
    """A fresh random 32-byte key as unpadded base64url (for ``session.keys``)."""
    return _b64encode(secrets.token_bytes(KEY_SIZE))


def _chunk_name(name: str, index: int) -> str:
    return f"{name}.{index}"


def chunk_cookie(name: str, value: str, limit: int = COOKIE_LIMIT) -> list[tuple[str, str]]:
    """Split one logical cookie into ``(name, value)`` pairs of at most ``limit`` bytes each.

    When ``len(name) + len(value) <= limit`` the result is the single pair
    ``(name, value)``. Otherwise the bare name is not used: the pairs are named
    ``name.0`` .. ``name.<n-1>`` and the first value starts with ``f"{n}~"`` so a
    missing chunk is detectable. Raises ValueError if ``name`` or ``value`` is
    not ASCII (lengths are byte counts) or if ``limit`` leaves no room for data.
    """
    if not (name.isascii() and value.isascii()):
        raise ValueError("cookie names and values must be ASCII")
    if len(name) + len(value) <= limit:
        return [(name, value)]

    # Find the smallest chunk count n whose capacity holds the value. Chunk i
    # holds limit - len(f"{name}.{i}") characters, less the "n~" prefix on chunk 0.
    # Capacities never grow with i, so once a chunk has no room none will.
    total = 0
    count = 0
    while True:
        room = limit - len(_chunk_name(name, count))
        if room <= 0:
            raise ValueError(f"cookie limit {limit} leaves no room for chunks of {name!r}")
        total += room
        count += 1
        if count >= 2 and total - len(f"{count}{_CHUNK_SEP}") >= len(value):
            break
    if limit - len(_chunk_name(name, 0)) - len(f"{count}{_CHUNK_SEP}") < 0:
        raise ValueError(f"cookie limit {limit} leaves no room for chunks of {name!r}")

    out: list[tuple[str, str]] = []
    pos = 0
    for index in range(count):
        chunk_name = _chunk_name(name, index)
        prefix = f"{count}{_CHUNK_SEP}" if index == 0 else ""
        room = limit - len(chunk_name) - len(prefix)
        out.append((chunk_name, prefix + value[pos : pos + room]))
        pos += room
    return out


def assemble_cookie(name: str, cookies: Mapping[str, str]) -> str | None:
    """Inverse of :func:`chunk_cookie` over the cookies of a request.

    The bare ``name`` wins when present. Otherwise ``name.0`` must start with a
    chunk count ``n~`` and every ``name.i`` for ``i < n`` must be present; a
    missing chunk or a malformed count gives None. Never raises.
    """
    try:
        bare = cookies.get(name)
        if bare is not None:
            return bare
        first = cookies.get(_chunk_name(name, 0))
        if first is None:
            return None
        match = _CHUNK_COUNT_RE.match(first)
        if match is None:
            return None
        count = int(match.group(1))
        if count > len(cookies):
            return None
        parts = [first[match.end() :]]
        for index in range(1, count):
            part = cookies.get(_chunk_name(name, index))
            if part is None:
                return None
            parts.append(part)
        return "".join(parts)
    except Exception:  # a hostile or odd mapping must not break the request
        return None


def cookie_names_for(name: str, cookies: Iterable[str]) -> list[str]:
    """Every name in ``cookies`` that belongs to the logical cookie ``name``.

    That is the bare name and any ``name.<digits>`` (ASCII digits), in input
    order without repeats; used to expire every chunk together.
    """
    dotted = name + "."
    found: list[str] = []
    seen: set[str] = set()
    for candidate in cookies:
        if candidate in seen:
            continue
        suffix = candidate[len(dotted) :] if candidate.startswith(dotted) else ""
        if candidate == name or (suffix.isascii() and suffix.isdigit()):
            seen.add(candidate)
            found.append(candidate)
    return found
