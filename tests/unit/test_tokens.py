"""Unit tests for gateway.auth.tokens: reading provider answers and scrubbing tokens
out of them (SPEC §3 login answer, §4.3 expiry, §5.1)."""

from __future__ import annotations

import base64
import json
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.auth.tokens import get_path, jwt_payload, scrub, tokens_from_answer
from gateway.demo.api import encode_jwt

CLAIMS = ["sub", "name", "email", "preferred_username", "roles", "scope"]
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: Any) -> str:
    """An unsigned-looking compact JWS: the gateway never checks the signature."""
    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.c2ln"


def read(answer: Any, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "access_field": "token",
        "refresh_field": "refresh_token",
        "expires_in_field": None,
        "claim_names": CLAIMS,
        "now": NOW,
    }
    options.update(kwargs)
    return tokens_from_answer(answer, **options)


def strings(node: Any) -> Iterator[str]:
    """Every string in a JSON tree: values and keys."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


# --------------------------------------------------------------------------- get_path


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"token": "t"}, "token", "t"),
        ({"data": {"auth": {"access": "a"}}}, "data.auth.access", "a"),
        ({"data": {"auth": {"access": "a"}}}, "data.auth", {"access": "a"}),
        ({"data": {}}, "data.missing", None),
        ({"data": "flat"}, "data.token", None),
        ({"data": ["a", "b"]}, "data.0", None),  # lists are not indexed
        ({"a.b": 1}, "a.b", None),  # dots always separate
        ([], "token", None),
        (None, "token", None),
        ("token", "token", None),
        ({"n": 0}, "n", 0),
        ({"f": False}, "f", False),
    ],
)
def test_get_path(data: Any, path: str, expected: Any) -> None:
    assert get_path(data, path) == expected


# --------------------------------------------------------------------------- jwt_payload


def test_jwt_payload_reads_the_claims_of_a_real_token() -> None:
    token = encode_jwt({"sub": "1", "exp": 123, "name": "Zoë"}, b"k" * 32)
    assert jwt_payload(token) == {"sub": "1", "exp": 123, "name": "Zoë"}


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5])  # every base64 padding length
def test_jwt_payload_without_padding(size: int) -> None:
    claims = {"p": "x" * size}
    assert jwt_payload(jwt(claims)) == claims


@pytest.mark.parametrize(
    "token",
    [
        "",
        "opaque-token",
        "a.b",
        "a.b.c.d.e",  # JWE compact form: not readable
        f"x.{b64(b'not json')}.y",
        f"x.{b64(b'[1, 2]')}.y",  # JSON, but not an object
        f"x.{b64(b'123')}.y",
        "x.%%%%.y",
        "x.é.y",
        "x.A.y",  # impossible base64 length
        f"x.{b64(b'[' * 100_000)}.y",  # deep nesting must not escape as RecursionError
        f"x.{b64(bytes([0xFF, 0xFE]))}.y",
    ],
)
def test_jwt_payload_is_none_for_anything_else(token: str) -> None:
    assert jwt_payload(token) is None


# --------------------------------------------------------------------------- tokens_from_answer


def test_tokens_from_a_jwt_answer() -> None:
    claims = {
        "sub": "1",
        "name": "Demo",
        "email": "d@example.com",
        "roles": ["user"],
        "exp": NOW + 30,
        "jti": "secret-ish",
    }
    access = jwt(claims)
    tokens = read({"token": access, "refresh_token": "r1", "user": {}})
    assert tokens is not None
    assert tokens.access_token == access
    assert tokens.refresh_token == "r1"
    assert tokens.expires_at == NOW + 30
    # Only the configured claims, and only those present.
    assert tokens.claims == {
        "sub": "1",
        "name": "Demo",
        "email": "d@example.com",
        "roles": ["user"],
    }


def test_expires_in_wins_over_the_jwt_exp() -> None:
    answer = {"token": jwt({"exp": NOW + 30}), "expires_in": 600}
    tokens = read(answer, expires_in_field="expires_in")
    assert tokens is not None
    assert tokens.expires_at == NOW + 600


def test_expires_in_field_absent_from_the_answer_falls_back_to_exp() -> None:
    tokens = read({"token": jwt({"exp": NOW + 30})}, expires_in_field="expires_in")
    assert tokens is not None
    assert tokens.expires_at == NOW + 30


def test_expires_in_at_a_nested_path_and_as_a_numeric_string() -> None:
    answer = {"data": {"access": "opaque", "refresh": "r", "ttl": "120"}}
    tokens = read(
        answer,
        access_field="data.access",
        refresh_field="data.refresh",
        expires_in_field="data.ttl",
    )
    assert tokens is not None
    assert (tokens.access_token, tokens.refresh_token) == ("opaque", "r")
    assert tokens.expires_at == NOW + 120
    assert tokens.claims == {}


@pytest.mark.parametrize(
    "value",
    [True, False, None, "soon", [60], {"s": 60}, float("nan"), float("inf"), 10**400],
    ids=["true", "false", "none", "word", "list", "object", "nan", "inf", "huge-int"],
)
def test_a_non_numeric_expires_in_is_ignored(value: Any) -> None:
    answer = {"token": jwt({"exp": NOW + 30}), "expires_in": value}
    tokens = read(answer, expires_in_field="expires_in")
    assert tokens is not None
    assert tokens.expires_at == NOW + 30


@pytest.mark.parametrize("exp", [True, "later", None, [1], float("inf")])
def test_a_jwt_exp_that_is_not_a_number_means_unknown_expiry(exp: Any) -> None:
    tokens = read({"token": jwt({"exp": exp})})
    assert tokens is not None
    assert tokens.expires_at is None


def test_an_opaque_token_without_expires_in_has_unknown_expiry() -> None:
    tokens = read({"token": "opaque-access"})
    assert tokens is not None
    assert tokens.expires_at is None
    assert tokens.refresh_token is None
    assert tokens.claims == {}


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"token": ""},
        {"token": None},
        {"token": 123},
        {"token": ["a"]},
        {"access_token": "right-name-wrong-field"},
        ["token"],
        "token",
        None,
    ],
)
def test_no_access_token_means_no_tokens(answer: Any) -> None:
    assert read(answer) is None


@pytest.mark.parametrize("refresh", ["", None, 42, {"t": "x"}])
def test_an_unusable_refresh_token_is_none(refresh: Any) -> None:
    tokens = read({"token": "a", "refresh_token": refresh})
    assert tokens is not None
    assert tokens.refresh_token is None


def test_tokens_repr_hides_the_tokens() -> None:
    tokens = read({"token": "access-SECRET", "refresh_token": "refresh-SECRET"})
    assert "SECRET" not in repr(tokens)


# --------------------------------------------------------------------------- scrub

FIELDS = ["token", "refresh_token"]


def test_scrub_removes_the_configured_fields_and_keeps_the_rest() -> None:
    answer = {"token": "A" * 20, "refresh_token": "R" * 20, "user": {"id": 1, "name": "x"}}
    assert scrub(answer, FIELDS, ["A" * 20, "R" * 20]) == {"user": {"id": 1, "name": "x"}}


def test_scrub_removes_nested_configured_fields() -> None:
    answer = {"data": {"auth": {"access": "a-1234567890", "kind": "bearer"}}, "ok": True}
    out = scrub(answer, ["data.auth.access"], [])
    assert out == {"data": {"auth": {"kind": "bearer"}}, "ok": True}


def test_scrub_removes_the_usual_token_keys_anywhere() -> None:
    answer = {
        "id_token": "id-1",
        "nested": {"access_token": "a-1", "refresh_token": "r-1", "expires_in": 30},
        "list": [{"id_token": "id-2", "n": 1}],
    }
    assert scrub(answer, FIELDS, []) == {"nested": {"expires_in": 30}, "list": [{"n": 1}]}


def test_scrub_removes_strings_equal_to_or_containing_a_token() -> None:
    secret = "tok-0123456789abcdef"
    answer = {
        "copy": secret,
        "url": f"https://app.example/#access_token={secret}&x=1",
        "list": [secret, "keep", f"Bearer {secret}"],
        "deep": {"deeper": [{"again": secret, "stay": "here"}]},
        "number": 7,
        "null": None,
    }
    assert scrub(answer, FIELDS, [secret]) == {
        "list": ["keep"],
        "deep": {"deeper": [{"stay": "here"}]},
        "number": 7,
        "null": None,
    }


def test_scrub_removes_copies_of_an_id_token_it_was_not_told_about() -> None:
    id_token = "idt-" + "z" * 30
    answer = {"id_token": id_token, "profile": {"raw": id_token, "name": "Ann"}}
    out = scrub(answer, FIELDS, ["access", "refresh"])
    assert out == {"profile": {"name": "Ann"}}


def test_scrub_removes_copies_of_a_configured_field_value() -> None:
    access = "acc-" + "q" * 30
    answer = {"data": {"jwt": access}, "echo": access, "name": "n"}
    assert scrub(answer, ["data.jwt"], []) == {"data": {}, "name": "n"}


def test_scrub_removes_keys_that_hold_a_token() -> None:
    secret = "tok-0123456789abcdef"
    answer = {"sessions": {secret: {"active": True}, "other": 1}}
    assert scrub(answer, FIELDS, [secret]) == {"sessions": {"other": 1}}


@pytest.mark.parametrize("answer", ["tok-0123456789abcdef", "x tok-0123456789abcdef y"])
def test_a_bare_token_answer_scrubs_to_an_empty_object(answer: str) -> None:
    assert scrub(answer, FIELDS, ["tok-0123456789abcdef"]) == {}


def test_scrub_ignores_empty_secrets() -> None:
    answer = {"name": "x", "empty": ""}
    assert scrub(answer, FIELDS, ["", ""]) == answer


def test_scrub_does_not_change_its_input() -> None:
    answer = {"token": "t-1234567890", "user": {"copy": "t-1234567890"}}
    snapshot = json.loads(json.dumps(answer))
    scrub(answer, FIELDS, ["t-1234567890"])
    assert answer == snapshot


# --------------------------------------------------------------------------- properties

TOKEN_ALPHABET = string.ascii_letters + string.digits + "-_."
token_text = st.text(alphabet=TOKEN_ALPHABET, min_size=8, max_size=40)


@st.composite
def answers_with_tokens(draw: st.DrawFn) -> tuple[Any, list[str]]:
    """A JSON tree in which tokens appear as values, inside values, as keys and under the
    usual token keys, at any depth."""
    tokens = draw(st.lists(token_text, min_size=1, max_size=3, unique=True))
    token = st.sampled_from(tokens)
    text = st.text(max_size=12)
    holding = st.tuples(text, token, text).map("".join)
    keys = st.one_of(
        text,
        holding,
        st.sampled_from(["token", "refresh_token", "id_token", "access_token", "data", "user"]),
    )
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        text,
        token,
        holding,
    )
    tree = st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=25,
    )
    return draw(tree), tokens


@settings(max_examples=150, deadline=None)
@given(answers_with_tokens())
def test_property_no_given_token_survives_anywhere(case: tuple[Any, list[str]]) -> None:
    answer, tokens = case
    out = scrub(answer, FIELDS, tokens)
    for value in strings(out):
        for token in tokens:
            assert token not in value


@settings(max_examples=150, deadline=None)
@given(answers_with_tokens(), st.data())
def test_property_tokens_found_in_the_answer_do_not_survive_even_if_not_given(
    case: tuple[Any, list[str]], data: st.DataObject
) -> None:
    """The login path knows the access and refresh tokens; an id_token or a field the
    provider config names is found in the answer itself, and its copies go too."""
    tree, tokens = case
    where = data.draw(
        st.lists(
            st.sampled_from(["token", "refresh_token", "id_token"]),
            min_size=len(tokens),
            max_size=len(tokens),
            unique=True,
        )
    )
    answer = {"payload": tree, **dict(zip(where, tokens, strict=True))}
    out = scrub(answer, FIELDS, [])
    for value in strings(out):
        for token in tokens:
            assert token not in value


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12))
plain_key = st.text(max_size=12).filter(
    lambda k: k not in {"token", "refresh_token", "id_token", "access_token"}
)
plain_tree = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(plain_key, children, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(plain_tree, st.lists(token_text, max_size=2))
def test_property_an_answer_without_tokens_is_left_alone(answer: Any, secrets: list[str]) -> None:
    assume(not any(secret in value for value in strings(answer) for secret in secrets))
    assert scrub(answer, FIELDS, secrets) == answer
