"""A bounded fuzz run over cookie unsealing (issue 13, SPEC §6).

Whatever a browser sends in its Cookie lines, ``SessionManager.read_cookies``
and ``load`` give a session only for a value the gateway sealed for that
cookie name: arbitrary bytes (decoded as aiohttp decodes header bytes), odd
chunk counts and names, and every mutation of a valid sealed value — single
or chunked — come out as "no session", never as an exception.
(tests/unit/test_seal.py covers single-character tampering and truncation of
``KeyRing.unseal`` itself; this goes through the cookie codec and the manager.)
"""

from __future__ import annotations

import asyncio
import functools
import time

from hypothesis import assume, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.config import SessionConfig
from gateway.sessions.manager import Absent, SessionManager, SessionState
from gateway.sessions.model import Session
from gateway.sessions.seal import KeyRing, chunk_cookie, decode_key
from gateway.sessions.stores import CookieStore
from tests.support import TEST_KEY, TEST_KEY_2, fuzz_settings

PROVIDER = "demo"
NAME = "bff-demo"  # secure: false, so no __Host- prefix
RING = KeyRing([("k1", decode_key(TEST_KEY)), ("k2", decode_key(TEST_KEY_2))])
MANAGER = SessionManager(
    SessionConfig.model_validate({"secure": False, "keys": [{"id": "k1", "secret": TEST_KEY}]}),
    RING,
    CookieStore(),
)


@functools.cache
def _sealed(token_size: int, key: str) -> tuple[tuple[str, str], ...]:
    # Sealed once per shape: hypothesis replays draws against the same value.
    now = float(int(time.time()))
    session = Session(PROVIDER, "a" * token_size, "r", None, now, now, {"sub": "x"})
    ring = RING if key == "k1" else KeyRing([("k2", decode_key(TEST_KEY_2))])
    return tuple(chunk_cookie(NAME, ring.seal(session.to_bytes(), NAME)))


def sealed_pairs(token_size: int, key: str = "k1") -> list[tuple[str, str]]:
    """A live session's cookie as (name, value) pairs: one, or chunks when it is large."""
    return list(_sealed(token_size, key))


def load(lines: list[str]) -> SessionState:
    headers = CIMultiDict(("Cookie", line) for line in lines)
    return asyncio.run(MANAGER.load(MANAGER.read_cookies(headers), PROVIDER, time.time()))


def as_line(pairs: list[tuple[str, str]]) -> str:
    return "; ".join(f"{name}={value}" for name, value in pairs)


# -- arbitrary Cookie lines -------------------------------------------------------------

# aiohttp decodes header bytes as UTF-8 with surrogateescape: any byte sequence reaches us.
header_text = st.binary(max_size=300).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
our_names = st.sampled_from(
    [NAME, f"{NAME}.0", f"{NAME}.1", f"{NAME}.2", f"{NAME}.00", f"{NAME}.-1", f"{NAME}.x",
     f"{NAME}.\u0661", f"__Host-{NAME}", "bff-other", "BFF-demo", f" {NAME}", f"{NAME} "]
)  # fmt: skip
chunk_prefix = st.sampled_from(
    ["", "0~", "1~", "2~", "3~", "01~", "-1~", "999999999~", "9" * 30 + "~", "~", "2~~", "\u0662~"]
)
our_values = st.one_of(
    header_text,
    st.builds(lambda prefix, rest: prefix + rest, chunk_prefix, st.text(max_size=60)),
    st.builds(
        lambda key, rest: f"1.{key}.{rest}",
        st.sampled_from(["k1", "k2", "k3", "", "k1.k1"]),
        st.text(alphabet="ABCDEFGHIJKLMNOPabcdef0123456789-_=.", max_size=120),
    ),
)
pair = st.builds(lambda name, value: f"{name}={value}", our_names, our_values)
cookie_line = st.one_of(
    header_text,
    st.lists(st.one_of(pair, header_text), max_size=6).map("; ".join),
)


@fuzz_settings(300)
@given(st.lists(cookie_line, max_size=4))
def test_arbitrary_cookie_lines_unseal_to_no_session(lines: list[str]) -> None:
    state = load(lines)
    assert state.session is None
    assert state.absent in (Absent.NONE, Absent.INVALID)
    assert not state.dirty


# -- mutations of a valid sealed value ---------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    """``text`` after one to four edits: replace, insert, delete, swap or case-flip."""
    out = text
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(out) - 1)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "swap", "flip", "cut"]))
        char = draw(st.one_of(st.sampled_from("A_-.~0aZ="), st.characters()))
        if kind == "replace":
            out = out[:at] + char + out[at + 1 :]
        elif kind == "insert":
            out = out[:at] + char + out[at:]
        elif kind == "delete":
            out = out[:at] + out[at + 1 :]
        elif kind == "swap" and at + 1 < len(out):
            out = out[:at] + out[at + 1] + out[at] + out[at + 2 :]
        elif kind == "flip":
            out = out[:at] + out[at : at + 1].swapcase() + out[at + 1 :]
        else:
            out = out[:at]
    return out


@fuzz_settings(300)
@given(
    st.sampled_from([40, 6000, 12000]),  # one cookie, two chunks, four chunks
    st.sampled_from(["k1", "k2"]),  # the sealing key, and an older one still in the ring
    st.data(),
)
def test_no_mutation_of_a_valid_sealed_value_unseals(
    token_size: int, key: str, data: st.DataObject
) -> None:
    pairs = sealed_pairs(token_size, key)
    assert load([as_line(pairs)]).session is not None  # the unmutated cookie works
    index = data.draw(st.integers(0, len(pairs) - 1), label="which cookie")
    name, value = pairs[index]
    changed = data.draw(mutated(value), label="mutated value")
    # read_cookies splits on ';' and strips around each pair, as browsers do:
    # an edit that only adds surrounding blanks leaves the same value.
    assume(changed.strip() != value and ";" not in changed)
    pairs[index] = (name, changed)
    state = load([as_line(pairs)])
    assert state.session is None
    assert state.absent is Absent.INVALID


@fuzz_settings(150)
@given(st.sampled_from([40, 6000]), st.data())
def test_chunks_shuffled_dropped_or_duplicated_never_unseal_to_another_value(
    token_size: int, data: st.DataObject
) -> None:
    pairs = sealed_pairs(token_size)
    names = [name for name, _ in pairs]
    values = [value for _, value in pairs]
    # Rebuild the cookie from the original chunk values under any names:
    # only the original assignment may unseal.
    chosen = data.draw(
        st.lists(st.sampled_from(range(len(values))), min_size=1, max_size=len(values) + 1)
    )
    renamed = data.draw(st.permutations([*names, f"{NAME}.{len(names)}", NAME]))
    rebuilt = list(zip(renamed, [values[i] for i in chosen], strict=False))
    first = {}
    for name, value in rebuilt:
        first.setdefault(name, value)  # read_cookies: the first occurrence wins
    state = load([as_line(rebuilt)])
    if state.session is not None:
        original = dict(pairs)
        assert all(first.get(name) == value for name, value in original.items())


def test_a_value_relabelled_with_another_key_id_does_not_unseal() -> None:
    ((name, value),) = sealed_pairs(40)
    assert load([f"{name}={value}"]).session is not None
    relabelled = value.replace("1.k1.", "1.k2.", 1)
    assert load([f"{name}={relabelled}"]).absent is Absent.INVALID
