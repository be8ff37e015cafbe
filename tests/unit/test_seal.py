"""Unit tests for gateway.sessions.seal (SPEC section 6: cookies)."""

from __future__ import annotations

import base64
import os
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.sessions.seal import (
    COOKIE_LIMIT,
    KeyRing,
    Unsealed,
    assemble_cookie,
    chunk_cookie,
    cookie_names_for,
    decode_key,
    new_key_text,
)

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K3 = bytes(range(200, 232))
RING1 = KeyRing([("k1", K1)])
RING21 = KeyRing([("k2", K2), ("k1", K1)])
NAME = "__Host-bff-demo"

# RFC 6265 cookie-octet: %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E
COOKIE_OCTETS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in {'"', ",", ";", "\\"})
# RFC 2616 token characters, as allowed in cookie names.
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"

cookie_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=64)
MAX_VALUE = 20 * 1024


def _stretch(seed: str, size: int) -> str:
    return (seed * (size // len(seed) + 1))[:size]


# Hypothesis rarely draws long text on its own, so mix in values built by repeating a
# random cookie-safe seed out to a random length of up to ~20 KiB.
cookie_values = st.one_of(
    st.text(alphabet=COOKIE_OCTETS, max_size=MAX_VALUE),
    st.builds(
        _stretch,
        st.text(alphabet=COOKIE_OCTETS, min_size=1, max_size=64),
        st.integers(min_value=0, max_value=MAX_VALUE),
    ),
)
plaintexts = st.binary(max_size=2048)
any_names = st.text(max_size=80)
slow = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def is_cookie_safe(value: str) -> bool:
    return all(ch in COOKIE_OCTETS for ch in value)


# --------------------------------------------------------------------------- sealing


@given(plaintext=plaintexts, name=any_names)
def test_round_trip(plaintext: bytes, name: str) -> None:
    value = RING1.seal(plaintext, name)
    assert is_cookie_safe(value)
    assert value.isascii()
    assert RING1.unseal(value, name) == Unsealed(plaintext=plaintext, stale_key=False)


def test_format_has_version_and_key_id_in_clear() -> None:
    value = RING21.seal(b"hello", NAME)
    version, key_id, payload = value.split(".")
    assert (version, key_id) == ("1", "k2")
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert len(raw) == 12 + len(b"hello") + 16  # nonce || ciphertext || tag
    assert b"hello" not in raw
    assert "=" not in payload


def test_fresh_nonce_every_seal() -> None:
    values = {RING1.seal(b"same plaintext", NAME) for _ in range(50)}
    assert len(values) == 50
    nonces = {v.split(".")[2][:16] for v in values}  # first 12 bytes = 16 b64 chars
    assert len(nonces) == 50
    for v in values:
        assert RING1.unseal(v, NAME) == Unsealed(b"same plaintext", False)


@given(plaintext=st.binary(max_size=256), data=st.data())
def test_tamper_any_single_character(plaintext: bytes, data: st.DataObject) -> None:
    value = RING21.seal(plaintext, NAME)
    pos = data.draw(st.integers(min_value=0, max_value=len(value) - 1), label="pos")
    replacement = data.draw(
        st.one_of(st.sampled_from(COOKIE_OCTETS), st.characters()), label="replacement"
    )
    assume(replacement != value[pos])
    tampered = value[:pos] + replacement + value[pos + 1 :]
    assert RING21.unseal(tampered, NAME) is None


def test_tamper_last_character_non_canonical_base64() -> None:
    # Flipping only the unused low bits of the final base64 character must not be accepted.
    for size in range(0, 8):
        value = RING1.seal(b"x" * size, NAME)
        alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
        for ch in alphabet:
            if ch == value[-1]:
                continue
            assert RING1.unseal(value[:-1] + ch, NAME) is None


@given(plaintext=st.binary(max_size=256), data=st.data())
def test_truncation_at_any_length(plaintext: bytes, data: st.DataObject) -> None:
    value = RING1.seal(plaintext, NAME)
    cut = data.draw(st.integers(min_value=0, max_value=len(value) - 1), label="cut")
    assert RING1.unseal(value[:cut], NAME) is None


def test_truncation_every_length_exhaustive() -> None:
    value = RING1.seal(b"session-data", NAME)
    for cut in range(len(value)):
        assert RING1.unseal(value[:cut], NAME) is None
    assert RING1.unseal(value, NAME) is not None


def test_extension_rejected() -> None:
    value = RING1.seal(b"session-data", NAME)
    for suffix in ("A", "AA", "AAAA", ".", "=", "==", " "):
        assert RING1.unseal(value + suffix, NAME) is None
    assert RING1.unseal(" " + value, NAME) is None


@given(garbage=st.text(max_size=300))
def test_garbage_text_never_raises(garbage: str) -> None:
    assert RING21.unseal(garbage, NAME) is None


@given(
    key_id=st.sampled_from(["k1", "k2", "zz", ""]),
    payload=st.text(alphabet=string.ascii_letters + string.digits + "-_=.", max_size=300),
)
def test_well_shaped_garbage_never_raises(key_id: str, payload: str) -> None:
    assert RING21.unseal(f"1.{key_id}.{payload}", NAME) is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "..",
        "1..",
        "1.k1.",
        "1.k1",
        "1.k1.!!!!",
        "1.k1.A",
        "1.k1." + "A" * 37,  # 27 bytes: shorter than nonce + tag
        "1.k1." + "A" * 40,  # long enough, but not a valid seal
        "1.k1." + "A" * 40 + "==",
        "1.k1.+/+/" + "A" * 40,
        "\x00",
        "1.k1.\u00e9" + "A" * 40,
    ],
)
def test_malformed_values(value: str) -> None:
    assert RING1.unseal(value, NAME) is None


def test_non_str_inputs_return_none() -> None:
    value = RING1.seal(b"x", NAME)
    assert RING1.unseal(value.encode(), NAME) is None  # type: ignore[arg-type]
    assert RING1.unseal(None, NAME) is None  # type: ignore[arg-type]
    assert RING1.unseal(value, None) is None  # type: ignore[arg-type]


def test_unknown_key_id() -> None:
    value = KeyRing([("k3", K3)]).seal(b"secret", NAME)
    assert RING21.unseal(value, NAME) is None


def test_relabelled_key_id_fails() -> None:
    # A value sealed under k1 but relabelled "k2" must fail even though k2 is in the ring.
    value = RING1.seal(b"secret", NAME)
    relabelled = value.replace("1.k1.", "1.k2.", 1)
    assert RING21.unseal(relabelled, NAME) is None


def test_key_id_is_bound_as_associated_data() -> None:
    # Same key material under two ids: only the associated data can tell them apart.
    ring = KeyRing([("a", K1), ("b", K1)])
    value = ring.seal(b"secret", NAME)
    assert value.startswith("1.a.")
    assert ring.unseal(value, NAME) == Unsealed(b"secret", False)
    assert ring.unseal("1.b." + value[len("1.a.") :], NAME) is None


def test_same_id_different_key_fails() -> None:
    value = RING1.seal(b"secret", NAME)
    assert KeyRing([("k1", K2)]).unseal(value, NAME) is None


@given(plaintext=plaintexts, name=any_names, other=any_names)
def test_value_moved_to_another_cookie_name(plaintext: bytes, name: str, other: str) -> None:
    assume(name != other)
    value = RING1.seal(plaintext, name)
    assert RING1.unseal(value, other) is None
    assert RING1.unseal(value, name) is not None


def test_moved_cookie_examples() -> None:
    value = RING1.seal(b"tokens", "__Host-bff-a")
    for other in ("__Host-bff-b", "bff-a", "__Host-bff-a ", "__host-bff-a", ""):
        assert RING1.unseal(value, other) is None


@pytest.mark.parametrize("version", ["0", "2", "01", "1 ", "v1", "", "11"])
def test_wrong_version_prefix(version: str) -> None:
    value = RING1.seal(b"secret", NAME)
    assert value.startswith("1.")
    assert RING1.unseal(version + value[1:], NAME) is None


# --------------------------------------------------------------------------- rotation


def test_rotation_new_ring_accepts_old_value_as_stale() -> None:
    old = RING1.seal(b"session", NAME)
    result = RING21.unseal(old, NAME)
    assert result == Unsealed(plaintext=b"session", stale_key=True)


def test_rotation_old_ring_rejects_new_value() -> None:
    new = RING21.seal(b"session", NAME)
    assert RING1.unseal(new, NAME) is None


def test_rotation_seals_under_first_key() -> None:
    new = RING21.seal(b"session", NAME)
    assert new.startswith("1.k2.")
    assert RING21.unseal(new, NAME) == Unsealed(plaintext=b"session", stale_key=False)
    assert KeyRing([("k2", K2)]).unseal(new, NAME) == Unsealed(b"session", False)
    # Re-sealing a stale value under the first key produces a non-stale one.
    stale = RING21.unseal(RING1.seal(b"session", NAME), NAME)
    assert stale is not None and stale.stale_key
    resealed = RING21.seal(stale.plaintext, NAME)
    assert RING21.unseal(resealed, NAME) == Unsealed(b"session", False)


def test_key_ids_in_order() -> None:
    assert RING21.key_ids == ("k2", "k1")


# --------------------------------------------------------------------------- key ring validation


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_keyring_rejects_wrong_key_size(size: int) -> None:
    with pytest.raises(ValueError):
        KeyRing([("k1", b"\x01" * size)])


def test_keyring_rejects_bad_key_in_later_position() -> None:
    with pytest.raises(ValueError):
        KeyRing([("k1", K1), ("k0", b"\x01" * 31)])


@pytest.mark.parametrize(
    "key_id", ["", "a.b", "a b", "a|b", "é", "a" * 33, "k1\n", "k/1", "k=1", "k~1"]
)
def test_keyring_rejects_bad_id(key_id: str) -> None:
    with pytest.raises(ValueError):
        KeyRing([(key_id, K1)])


@pytest.mark.parametrize("key_id", ["a", "A-z_0", "a" * 32, "2024-06_primary"])
def test_keyring_accepts_good_ids(key_id: str) -> None:
    ring = KeyRing([(key_id, K1)])
    assert ring.unseal(ring.seal(b"x", NAME), NAME) == Unsealed(b"x", False)


def test_keyring_rejects_empty() -> None:
    with pytest.raises(ValueError):
        KeyRing([])


def test_keyring_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError):
        KeyRing([("k1", K1), ("k1", K2)])


def test_keyring_error_does_not_leak_key() -> None:
    bad = bytes(range(1, 32))
    with pytest.raises(ValueError) as info:
        KeyRing([("k1", bad)])
    assert repr(bad) not in str(info.value)
    assert bad.hex() not in str(info.value)


def test_repr_hides_key_material() -> None:
    text = repr(RING21)
    assert text == "KeyRing(key_ids=('k2', 'k1'))"
    assert str(RING21) == text
    for key in (K1, K2):
        for form in (
            repr(key),
            key.hex(),
            base64.b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode().rstrip("="),
        ):
            assert form not in text
    assert not hasattr(RING21, "__dict__")


# --------------------------------------------------------------------------- key text


def test_decode_key_with_and_without_padding() -> None:
    padded = base64.urlsafe_b64encode(K2).decode()
    assert padded.endswith("=")
    assert decode_key(padded) == K2
    assert decode_key(padded.rstrip("=")) == K2
    assert decode_key(padded + "\n") == K2  # surrounding whitespace from env/files


def test_decode_key_accepts_url_alphabet() -> None:
    key = b"\xfb\xff" * 16  # encodes with '-' and '_'
    text = base64.urlsafe_b64encode(key).decode()
    assert "-" in text or "_" in text
    assert decode_key(text) == key


@pytest.mark.parametrize("size", [0, 16, 31, 33, 48, 64])
def test_decode_key_rejects_wrong_length(size: int) -> None:
    text = base64.urlsafe_b64encode(b"\x07" * size).decode()
    with pytest.raises(ValueError):
        decode_key(text)
    with pytest.raises(ValueError):
        decode_key(text.rstrip("="))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(b"\xfb\xff" * 16).decode(),  # standard alphabet '+/'
        base64.urlsafe_b64encode(K1).decode() + "=",  # too much padding
        base64.urlsafe_b64encode(K1).decode().rstrip("=") + "A",  # 44 chars, 33 bytes
        "=" * 44,
    ],
)
def test_decode_key_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        decode_key(text)


def test_new_key_text() -> None:
    texts = {new_key_text() for _ in range(20)}
    assert len(texts) == 20
    for text in texts:
        assert "=" not in text
        assert len(text) == 43
        assert len(decode_key(text)) == 32
    ring = KeyRing([("k", decode_key(texts.pop()))])
    assert ring.unseal(ring.seal(b"ok", NAME), NAME) == Unsealed(b"ok", False)


# --------------------------------------------------------------------------- chunking


def check_chunks(name: str, value: str, pairs: list[tuple[str, str]], limit: int) -> None:
    for chunk_name, chunk_value in pairs:
        assert len(chunk_name) + len(chunk_value) <= limit
    if len(name) + len(value) <= limit:
        assert pairs == [(name, value)]
    else:
        assert [n for n, _ in pairs] == [f"{name}.{i}" for i in range(len(pairs))]
        assert len(pairs) >= 2
        assert pairs[0][1].startswith(f"{len(pairs)}~")
    assert assemble_cookie(name, dict(pairs)) == value


@slow
@given(name=cookie_names, value=cookie_values)
def test_chunk_round_trip_default_limit(name: str, value: str) -> None:
    check_chunks(name, value, chunk_cookie(name, value), COOKIE_LIMIT)


@slow
@given(name=cookie_names, value=cookie_values, extra=st.integers(min_value=16, max_value=4096))
def test_chunk_round_trip_any_limit(name: str, value: str, extra: int) -> None:
    limit = len(name) + extra
    check_chunks(name, value, chunk_cookie(name, value, limit), limit)


@pytest.mark.parametrize("size", [0, 1, 4000, 4096 - 5, 4096 - 4, 4096 - 3, 8192, 12288, 20480])
def test_chunk_boundaries(size: int) -> None:
    name = "bff"
    value = "v" * size
    pairs = chunk_cookie(name, value)
    check_chunks(name, value, pairs, COOKIE_LIMIT)
    assert (len(pairs) == 1) == (size <= COOKIE_LIMIT - len(name))


@slow
@given(
    name=cookie_names,
    extra=st.integers(min_value=16, max_value=4096),
    data=st.data(),
)
def test_removing_any_chunk_gives_none(name: str, extra: int, data: st.DataObject) -> None:
    limit = len(name) + extra
    size = data.draw(st.integers(min_value=extra + 1, max_value=MAX_VALUE), label="size")
    seed = data.draw(st.text(alphabet=COOKIE_OCTETS, min_size=1, max_size=64), label="seed")
    value = _stretch(seed, size)
    pairs = chunk_cookie(name, value, limit)
    assert len(pairs) >= 2
    drop = data.draw(st.integers(min_value=0, max_value=len(pairs) - 1), label="drop")
    cookies = dict(pairs)
    del cookies[pairs[drop][0]]
    cookies["unrelated"] = "x"
    assert assemble_cookie(name, cookies) is None


def test_removing_each_chunk_of_large_session() -> None:
    pairs = chunk_cookie(NAME, RING1.seal(os.urandom(12 * 1024), NAME))
    for i in range(len(pairs)):
        cookies = dict(pairs[:i] + pairs[i + 1 :])
        assert assemble_cookie(NAME, cookies) is None


def test_twelve_kib_sealed_value_chunks() -> None:
    plaintext = os.urandom(12 * 1024)
    sealed = RING1.seal(plaintext, NAME)
    assert len(sealed) >= 12 * 1024
    pairs = chunk_cookie(NAME, sealed)
    assert len(pairs) >= 4
    check_chunks(NAME, sealed, pairs, COOKIE_LIMIT)
    assembled = assemble_cookie(NAME, dict(pairs))
    assert assembled is not None
    assert RING1.unseal(assembled, NAME) == Unsealed(plaintext, False)


def test_sealed_value_of_exactly_12_kib_gives_four_chunks() -> None:
    # Smallest plaintext whose sealed value is >= 12 KiB.
    size = next(n for n in range(8000, 10000) if len(RING1.seal(b"\0" * n, NAME)) >= 12 * 1024)
    sealed = RING1.seal(b"\0" * size, NAME)
    pairs = chunk_cookie(NAME, sealed)
    assert len(pairs) >= 4
    check_chunks(NAME, sealed, pairs, COOKIE_LIMIT)


def test_bare_name_wins_and_missing_gives_none() -> None:
    assert assemble_cookie("s", {"s": "bare", "s.0": "2~a", "s.1": "b"}) == "bare"
    assert assemble_cookie("s", {"s.0": "2~a", "s.1": "b"}) == "ab"
    assert assemble_cookie("s", {}) is None
    assert assemble_cookie("s", {"other": "x"}) is None
    assert assemble_cookie("s", {"s.1": "b"}) is None


@pytest.mark.parametrize(
    "first", ["", "a", "~a", "0~a", "-1~a", "x~a", "2a", "02~a", "3~a", " 2~a", "2 ~a", "9" * 50]
)
def test_malformed_chunk_count(first: str) -> None:
    assert assemble_cookie("s", {"s.0": first, "s.1": "b"}) is None


def test_huge_chunk_count_does_not_loop() -> None:
    assert assemble_cookie("s", {"s.0": "999999999~a", "s.1": "b"}) is None


def test_extra_chunks_beyond_count_ignored() -> None:
    assert assemble_cookie("s", {"s.0": "2~a", "s.1": "b", "s.2": "stale"}) == "ab"


def test_chunk_cookie_rejects_impossible_limit() -> None:
    with pytest.raises(ValueError):
        chunk_cookie("a" * 10, "v" * 100, limit=12)
    with pytest.raises(ValueError):
        chunk_cookie("name", "\u00e9" * 10)


def test_cookie_names_for_examples() -> None:
    jar = [
        "sess",
        "sess.0",
        "sess.1",
        "sess.12",
        "sess.007",
        "sessx",
        "sess.",
        "sess.x",
        "sess.1a",
        "sess.0.1",
        "xsess.0",
        "other",
        "other.0",
        "sess.\u0661",  # non-ASCII digit
        "Sess.0",
    ]
    assert cookie_names_for("sess", jar) == ["sess", "sess.0", "sess.1", "sess.12", "sess.007"]
    assert cookie_names_for("sess", ["other"]) == []
    assert cookie_names_for("a.b", ["a.b.0", "aXb.0", "a.b", "a.b.c"]) == ["a.b.0", "a.b"]


@slow
@given(
    name=cookie_names,
    value=cookie_values,
    unrelated=st.lists(cookie_names, max_size=10),
    extra=st.integers(min_value=16, max_value=4096),
)
def test_cookie_names_for_finds_exactly_the_chunks(
    name: str, value: str, unrelated: list[str], extra: int
) -> None:
    limit = len(name) + extra
    pairs = chunk_cookie(name, value, limit)
    emitted = [n for n, _ in pairs]
    others = [
        u
        for u in unrelated
        if u != name and not (u.startswith(name + ".") and u[len(name) + 1 :].isdigit())
    ]
    jar = others + emitted
    assert cookie_names_for(name, jar) == emitted
    assert cookie_names_for(name, others) == []


def test_unsealed_repr_hides_the_plaintext() -> None:
    ring = KeyRing([("k1", bytes(32))])
    unsealed = ring.unseal(ring.seal(b"access-token-value", "c"), "c")
    assert unsealed is not None
    assert unsealed.plaintext == b"access-token-value"
    assert "access-token-value" not in repr(unsealed)
