"""Unit tests for gateway.headers (SPEC §4.1 request headers, §4.2 response headers)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.headers import (
    HOP_BY_HOP,
    ForwardedFor,
    filter_cookie_header,
    is_gateway_cookie,
    request_id,
    response_headers,
    upstream_request_headers,
)

CLIENT_IP = "203.0.113.7"
SESSION_VALUE = "1.k1.SEALED-SESSION-VALUE"
ALL_HOP_BY_HOP = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Authorization",
    "Proxy-Authenticate",
]


def forwarded(trusted: bool = False) -> ForwardedFor:
    return ForwardedFor(client_ip=CLIENT_IP, proto="https", host="app.example", trusted=trusted)


def upstream(
    pairs: list[tuple[str, str]],
    *,
    trusted: bool = False,
    req_id: str = "req-1",
    drop: frozenset[str] = frozenset({"x-csrf"}),
    cookie_prefix: str = "bff",
    forward_cookies: bool = False,
    inject: Mapping[str, str] | None = None,
    authorization: str | None = None,
) -> CIMultiDict[str]:
    return upstream_request_headers(
        CIMultiDict(pairs),
        forwarded=forwarded(trusted),
        req_id=req_id,
        drop=drop,
        cookie_prefix=cookie_prefix,
        forward_cookies=forward_cookies,
        inject=inject or {},
        authorization=authorization,
    )


def names(headers: CIMultiDict[str]) -> set[str]:
    return {name.lower() for name in headers}


# -- hop-by-hop ---------------------------------------------------------------------------


def test_the_hop_by_hop_list_is_the_one_the_spec_names() -> None:
    assert {name.lower() for name in ALL_HOP_BY_HOP} == HOP_BY_HOP


@pytest.mark.parametrize("name", ALL_HOP_BY_HOP + [n.lower() for n in ALL_HOP_BY_HOP] + ["tE"])
def test_hop_by_hop_headers_are_removed_from_requests(name: str) -> None:
    out = upstream([(name, "whatever"), ("Accept", "application/json")])
    assert name.lower() not in names(out)
    assert out.getall("Accept") == ["application/json"]


@pytest.mark.parametrize("name", ALL_HOP_BY_HOP + [n.upper() for n in ALL_HOP_BY_HOP])
def test_hop_by_hop_headers_are_removed_from_responses(name: str) -> None:
    out = response_headers(CIMultiDict([(name, "whatever"), ("Content-Type", "text/plain")]), "bff")
    assert name.lower() not in names(out)
    assert out.getall("Content-Type") == ["text/plain"]


CONNECTION_NAMED = [
    ("Connection", "keep-alive, X-Foo"),
    ("connection", " x-BAR ,, X-Baz  "),
    ("X-Foo", "1"),
    ("x-bar", "2"),
    ("X-BAZ", "3"),
    ("X-Qux", "4"),
    ("Keep-Alive", "timeout=5"),
]


def test_headers_named_in_any_connection_line_are_removed_from_requests() -> None:
    out = upstream(CONNECTION_NAMED)
    assert "x-foo" not in names(out)
    assert "x-bar" not in names(out)
    assert "x-baz" not in names(out)
    assert "keep-alive" not in names(out)
    assert out.getall("X-Qux") == ["4"]


def test_headers_named_in_any_connection_line_are_removed_from_responses() -> None:
    out = response_headers(CIMultiDict(CONNECTION_NAMED), "bff")
    assert names(out) == {"x-qux"}


def test_connection_cannot_remove_an_injected_header() -> None:
    out = upstream(
        [("Connection", "close, X-Api-Key"), ("X-Api-Key", "client-value")],
        inject={"X-Api-Key": "server-secret"},
        drop=frozenset({"x-csrf", "x-api-key"}),
    )
    assert out.getall("X-Api-Key") == ["server-secret"]


def test_connection_cannot_remove_an_injected_header_even_if_not_in_drop() -> None:
    out = upstream(
        [("Connection", "X-API-KEY"), ("x-api-key", "client-value")],
        inject={"X-Api-Key": "server-secret"},
    )
    assert out.getall("X-Api-Key") == ["server-secret"]


def test_connection_cannot_remove_the_session_authorization() -> None:
    out = upstream(
        [("Connection", "Authorization"), ("Authorization", "Basic Y2xpZW50")],
        drop=frozenset({"x-csrf", "authorization"}),
        authorization="Bearer access-token",
    )
    assert out.getall("Authorization") == ["Bearer access-token"]


@pytest.mark.parametrize(
    "name", ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-Id"]
)
def test_connection_cannot_remove_the_headers_the_gateway_sets(name: str) -> None:
    out = upstream([("Connection", name)], req_id="req-9")
    assert len(out.getall(name)) == 1


# -- Authorization, CSRF, Host, Expect, Forwarded ---------------------------------------------


def test_client_authorization_is_replaced_by_exactly_one_bearer() -> None:
    out = upstream(
        [
            ("Authorization", "Basic Y2xpZW50"),
            ("authorization", "Bearer forged"),
            ("Accept", "*/*"),
        ],
        drop=frozenset({"x-csrf", "authorization"}),
        authorization="Bearer access-token",
    )
    assert out.getall("Authorization") == ["Bearer access-token"]


def test_client_authorization_passes_on_a_route_without_auth() -> None:
    out = upstream([("Authorization", "Basic Y2xpZW50")])
    assert out.getall("Authorization") == ["Basic Y2xpZW50"]


def test_dropped_authorization_without_a_session_is_not_sent() -> None:
    out = upstream([("Authorization", "Basic Y2xpZW50")], drop=frozenset({"authorization"}))
    assert "authorization" not in names(out)


@pytest.mark.parametrize("sent_as", ["X-CSRF", "x-csrf", "X-Csrf"])
def test_the_csrf_header_is_not_sent_upstream(sent_as: str) -> None:
    out = upstream([(sent_as, "1"), ("X-Other", "kept")])
    assert "x-csrf" not in names(out)
    assert out.getall("X-Other") == ["kept"]


def test_a_custom_csrf_header_is_not_sent_upstream() -> None:
    out = upstream(
        [("X-Requested-With", "fetch"), ("X-CSRF", "1")], drop=frozenset({"x-requested-with"})
    )
    assert "x-requested-with" not in names(out)
    assert out.getall("X-CSRF") == ["1"]


@pytest.mark.parametrize("name", ["Host", "Expect", "Forwarded"])
def test_headers_the_gateway_owns_are_not_copied(name: str) -> None:
    value = {"Host": "evil.example", "Expect": "100-continue", "Forwarded": "for=1.2.3.4"}[name]
    out = upstream([(name, value)])
    assert name.lower() not in names(out)


def test_end_to_end_headers_are_kept_with_their_repeats_and_order() -> None:
    pairs = [
        ("Accept", "text/html"),
        ("Content-Type", "application/json"),
        ("Content-Length", "17"),
        ("Accept", "application/json"),
        ("X-Custom", "a, b"),
        ("If-None-Match", '"etag"'),
    ]
    out = upstream(pairs)
    assert out.getall("Accept") == ["text/html", "application/json"]
    assert out.getall("Content-Length") == ["17"]
    assert out.getall("Content-Type") == ["application/json"]
    assert out.getall("X-Custom") == ["a, b"]
    assert out.getall("If-None-Match") == ['"etag"']


def test_injected_headers_replace_the_clients_in_any_case() -> None:
    out = upstream(
        [("x-api-key", "client"), ("X-API-KEY", "client2"), ("X-Tenant", "t1")],
        inject={"X-Api-Key": "server-secret", "X-Extra": "e"},
        drop=frozenset({"x-api-key", "x-extra"}),
    )
    assert out.getall("X-Api-Key") == ["server-secret"]
    assert out.getall("X-Extra") == ["e"]
    assert out.getall("X-Tenant") == ["t1"]


# -- cookies ------------------------------------------------------------------------------

COOKIE_LINE = (
    f"theme=dark; __Host-bff-demo={SESSION_VALUE}; __Host-bff-demo.1={SESSION_VALUE}; "
    f"bff-github={SESSION_VALUE}; lang=en; __Host-other=1; bffish=2"
)


def test_no_cookie_is_sent_when_forward_cookies_is_false() -> None:
    out = upstream([("Cookie", "theme=dark; lang=en"), ("Cookie", COOKIE_LINE)])
    assert "cookie" not in names(out)


def test_forwarded_cookies_lose_the_gateways_own() -> None:
    out = upstream([("Cookie", COOKIE_LINE)], forward_cookies=True)
    assert out.getall("Cookie") == ["theme=dark; lang=en; __Host-other=1; bffish=2"]
    assert SESSION_VALUE not in str(out)


def test_several_cookie_lines_are_merged_into_one() -> None:
    out = upstream(
        [("Cookie", "a=1; __Host-bff-demo=x"), ("cookie", "b=2"), ("Cookie", "bff-demo=y; c=3")],
        forward_cookies=True,
    )
    assert out.getall("Cookie") == ["a=1; b=2; c=3"]


def test_no_cookie_header_when_only_gateway_cookies_were_sent() -> None:
    out = upstream(
        [("Cookie", f"__Host-bff-demo={SESSION_VALUE}; bff-demo.2={SESSION_VALUE}")],
        forward_cookies=True,
    )
    assert "cookie" not in names(out)


def test_the_cookie_prefix_decides_which_cookies_are_the_gateways() -> None:
    out = upstream(
        [("Cookie", "__Host-edge-demo=s; edge-x=s; __Host-bff-demo=theirs; bff-y=theirs")],
        forward_cookies=True,
        cookie_prefix="edge",
    )
    assert out.getall("Cookie") == ["__Host-bff-demo=theirs; bff-y=theirs"]


def test_a_cookie_header_named_in_connection_is_not_forwarded() -> None:
    out = upstream([("Connection", "Cookie"), ("Cookie", "theme=dark")], forward_cookies=True)
    assert "cookie" not in names(out)


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("__Host-bff-demo", True),
        ("__Host-bff-demo.3", True),
        ("__Host-bff-github", True),
        ("bff-demo", True),
        ("bff-demo.1", True),
        ("__host-bff-demo", True),
        ("bff~flow-0a1b2c", True),
        ("__Host-bff~flow-0a1b2c", True),
        ("bff", False),
        ("bffdemo", False),
        ("__Host-bffdemo", False),
        ("__Secure-bff-demo", False),
        ("theme", False),
        ("x-bff-demo", False),
    ],
)
def test_is_gateway_cookie(name: str, ours: bool) -> None:
    assert is_gateway_cookie(name, "bff") is ours


def test_filter_cookie_header_keeps_pairs_verbatim() -> None:
    assert filter_cookie_header(['a="quoted value"; b=x=y;  c=3 ;d'], "bff") == (
        'a="quoted value"; b=x=y; c=3; d'
    )
    assert filter_cookie_header([], "bff") is None
    assert filter_cookie_header(["; ;"], "bff") is None


cookie_name = st.text(alphabet="abcdefgxyz-_.", min_size=1, max_size=8)
gateway_name = st.sampled_from(["__Host-bff-", "bff-"]).flatmap(
    lambda p: st.builds(lambda s: p + s, cookie_name)
)


@given(st.lists(st.tuples(st.one_of(cookie_name, gateway_name), st.booleans()), max_size=8))
def test_forwarded_cookies_are_exactly_the_others_in_order(cookies: list[tuple[str, bool]]) -> None:
    pairs = [(name, f"v{index}") for index, (name, _) in enumerate(cookies)]
    line = "; ".join(f"{name}={value}" for name, value in pairs)
    out = upstream([("Cookie", line)], forward_cookies=True)
    expected = [f"{n}={v}" for n, v in pairs if not n.startswith(("__Host-bff-", "bff-"))]
    if expected:
        assert out.getall("Cookie") == ["; ".join(expected)]
    else:
        assert "cookie" not in names(out)


# -- X-Forwarded-* -------------------------------------------------------------------------


def test_x_forwarded_for_is_replaced_from_an_untrusted_peer() -> None:
    out = upstream([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "7.7.7.7")])
    assert out.getall("X-Forwarded-For") == [CLIENT_IP]


def test_x_forwarded_for_is_appended_from_a_trusted_peer() -> None:
    out = upstream([("X-Forwarded-For", "198.51.100.1, 10.0.0.2")], trusted=True)
    assert out.getall("X-Forwarded-For") == [f"198.51.100.1, 10.0.0.2, {CLIENT_IP}"]


def test_every_x_forwarded_for_line_of_a_trusted_peer_is_kept() -> None:
    out = upstream(
        [("X-Forwarded-For", "198.51.100.1"), ("x-forwarded-for", "10.0.0.2")], trusted=True
    )
    assert out.getall("X-Forwarded-For") == [f"198.51.100.1, 10.0.0.2, {CLIENT_IP}"]


def test_x_forwarded_for_is_created_when_a_trusted_peer_sent_none() -> None:
    assert upstream([], trusted=True).getall("X-Forwarded-For") == [CLIENT_IP]
    assert upstream([]).getall("X-Forwarded-For") == [CLIENT_IP]


def test_x_forwarded_proto_and_host_from_an_untrusted_peer_are_replaced() -> None:
    out = upstream([("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "evil.example")])
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["app.example"]


def test_x_forwarded_proto_and_host_from_a_trusted_peer_are_kept() -> None:
    out = upstream(
        [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "public.example")], trusted=True
    )
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["public.example"]


def test_x_forwarded_proto_and_host_are_created_when_absent() -> None:
    out = upstream([], trusted=True)
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["app.example"]


# -- X-Request-Id -------------------------------------------------------------------------


@pytest.mark.parametrize("sane", ["abc", "req-1.2:3_x", "0123456789abcdef" * 8, "A"])
def test_a_sane_request_id_is_passed_on(sane: str) -> None:
    assert request_id(CIMultiDict({"X-Request-Id": sane})) == sane


@pytest.mark.parametrize(
    "malformed",
    [
        "has space",
        "x" * 200,
        "x" * 129,
        "abc\r\nX-Evil: 1",
        "abc\n",
        "abc\r",
        "",
        "caf\u00e9",
        "a/b",
        "<script>",
        "a;b",
    ],
)
def test_a_malformed_request_id_is_replaced(malformed: str) -> None:
    first = request_id(CIMultiDict({"X-Request-Id": malformed}))
    second = request_id(CIMultiDict({"X-Request-Id": malformed}))
    assert first != malformed
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second, "a created id is fresh each time"


def test_a_missing_request_id_is_created() -> None:
    created = request_id(CIMultiDict())
    assert re.fullmatch(r"[0-9a-f]{32}", created)
    assert created != request_id(CIMultiDict())


def test_the_request_id_sent_upstream_is_the_one_decided() -> None:
    out = upstream(
        [("X-Request-Id", "client-chosen"), ("x-request-id", "second")], req_id="decided"
    )
    assert out.getall("X-Request-Id") == ["decided"]


# -- response side ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "set_cookie",
    [
        "__Host-bff-demo=evil; Path=/; Secure; HttpOnly",
        "__HOST-bff-demo=evil; Path=/",
        "__host-bff-demo=evil",
        "__HoSt-BFF-demo=evil",
        "__Host-bff-demo.2=evil",
        "__Host-bff-github=evil",
        "bff-demo=evil; Path=/",
        " __Host-bff-demo =evil",
        "__Host-bff-demo=",
    ],
)
def test_set_cookie_for_the_gateways_names_is_dropped(set_cookie: str) -> None:
    out = response_headers(
        CIMultiDict([("Set-Cookie", set_cookie), ("Set-Cookie", "theme=dark")]), "bff"
    )
    assert out.getall("Set-Cookie") == ["theme=dark"]


def test_other_set_cookies_are_kept_with_every_line_in_order() -> None:
    lines = [
        "a=1; Path=/",
        "__Host-other=2; Path=/; Secure",
        "__Host-bff-demo=evil",
        "bffish=3",
        "a=4; Max-Age=0",
        "x-bff-demo=5",
    ]
    out = response_headers(CIMultiDict([("Set-Cookie", line) for line in lines]), "bff")
    assert out.getall("Set-Cookie") == [
        "a=1; Path=/",
        "__Host-other=2; Path=/; Secure",
        "bffish=3",
        "a=4; Max-Age=0",
        "x-bff-demo=5",
    ]


def test_the_response_cookie_prefix_is_the_configured_one() -> None:
    lines = ["__Host-edge-demo=1", "__HOST-EDGE-demo=2", "edge-x=3", "__Host-bff-demo=4"]
    out = response_headers(CIMultiDict([("Set-Cookie", line) for line in lines]), "edge")
    assert out.getall("Set-Cookie") == ["__Host-bff-demo=4"]


def test_response_headers_otherwise_pass_untouched() -> None:
    pairs = [
        ("Content-Type", "text/event-stream"),
        ("Content-Encoding", "gzip"),
        ("Content-Length", "1234"),
        ("Cache-Control", "no-cache"),
        ("Link", "</a>; rel=preload"),
        ("Link", "</b>; rel=preload"),
        ("Location", "https://elsewhere.example/x"),
        ("WWW-Authenticate", 'Bearer error="invalid_token"'),
    ]
    out = response_headers(CIMultiDict(pairs), "bff")
    assert list(out.items()) == pairs


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "__Host-bff-s", "__HOST-bff-s", "bff-s", "__Host-x", "bffx"]),
            st.integers(0, 9),
        ),
        max_size=8,
    )
)
def test_set_cookie_filtering_keeps_exactly_the_others(cookies: list[tuple[str, int]]) -> None:
    lines = [f"{name}={value}; Path=/" for name, value in cookies]
    out = response_headers(CIMultiDict([("Set-Cookie", line) for line in lines]), "bff")
    expected = [line for line in lines if not line.lower().startswith(("__host-bff-", "bff-"))]
    assert out.getall("Set-Cookie", []) == expected
