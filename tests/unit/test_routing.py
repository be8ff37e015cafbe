"""Unit tests for gateway.routing (SPEC §4: request targets, longest-prefix routes)."""

from __future__ import annotations

import string
from urllib.parse import unquote_to_bytes

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from gateway.config import Route, load_config_text
from gateway.errors import GatewayError
from gateway.routing import RouteTable, split_target, upstream_path


def rejected(target: str) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        split_target(target)
    error = caught.value
    assert (error.status, error.code) == (400, "bad_request")
    return error


def routes(*paths: str, upstream: str = "http://127.0.0.1:8081/") -> list[Route]:
    data = {"routes": [{"path": path, "upstream": upstream} for path in paths]}
    return load_config_text(yaml.safe_dump(data), {}, "test").routes


def matched_path(table: RouteTable, raw_path: str) -> tuple[str, str] | None:
    match = table.match(raw_path)
    return None if match is None else (match.route.path, match.remainder)


# -- split_target: rejections --------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/a/../b",
        "/a/./b",
        "/a/%2e%2e/b",
        "/a/%2E%2E/b",
        "/a/%2E%2e/b",
        "/a/.%2E/b",
        "/a/%2e./b",
        "/a/%2e/b",
        "/a/..%2Fb",
        "/a/..%2fb",
        "/a/%2e%2e%2fb",
        "/a/..",
        "/a/.",
        "/a/%2e%2e",
        "/..",
        "/.",
        "/../etc/passwd",
        "/a/../",
        "/a/./",
        "/a/b/..?x=1",
        "/a/%2e%2e?x=1",
    ],
)
def test_dot_segments_are_rejected_in_every_spelling(target: str) -> None:
    rejected(target)


@pytest.mark.parametrize(
    "target",
    ["/a\\b", "/a\\..\\b", "/..\\", "/a%5Cb", "/a%5cb", "/a/..%5cb", "/a/%2e%2e%5Cb"],
)
def test_backslashes_are_rejected_plain_and_encoded(target: str) -> None:
    rejected(target)


CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"]


@pytest.mark.parametrize("char", CONTROLS, ids=[f"{ord(c):02x}" for c in CONTROLS])
def test_raw_control_characters_are_rejected_in_path_and_query(char: str) -> None:
    rejected(f"/a{char}b")
    rejected(f"/a?q=x{char}y")


@pytest.mark.parametrize(
    "encoded", ["%00", "%01", "%09", "%0a", "%0A", "%0d", "%0D", "%1b", "%1f", "%1F", "%7f", "%7F"]
)
def test_percent_encoded_controls_are_rejected_in_the_path(encoded: str) -> None:
    rejected(f"/a{encoded}b")
    rejected(f"/a/{encoded}")


@pytest.mark.parametrize(
    "target",
    [
        "http://x/y",
        "https://evil.example/api/demo/",
        "HTTP://x/y",
        "x:443",
        "evil.example:443",
        "*",
        "//evil/x",
        "//evil.example/api/demo/",
        "///x",
        "",
        "a/b",
        "?x=1",
    ],
)
def test_non_origin_form_targets_are_rejected(target: str) -> None:
    rejected(target)


def test_a_fragment_is_rejected() -> None:
    rejected("/a#frag")


# -- split_target: accepted targets come back byte for byte ------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/a",
        "/a/",
        "/a%2Fb",
        "/a%2fb",
        "/%20",
        "/caf%C3%A9",
        "/café",
        "/a..b",
        "/..a",
        "/a..",
        "/.well-known/x",
        "/a/...",
        "/a/..../b",
        "/a/.b/c.",
        "/a//b",
        "/a%252e%252e/b",
        "/%2e%2e%2e",
        "/a%2Eb",
        "/api/demo/users/42",
        "/a;b=c/d",
        "/a/%25/b",
        "/a+b/c@d/e:f/!$&'()*,=",
    ],
)
def test_safe_paths_are_returned_unchanged(path: str) -> None:
    assert split_target(path) == (path, "")


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/a?x=1&x=2&x=3", "/a", "x=1&x=2&x=3"),
        ("/a?", "/a", ""),
        ("/a?q=%2e%2e/../&r=a%2Fb", "/a", "q=%2e%2e/../&r=a%2Fb"),
        ("/a?q=?x=?", "/a", "q=?x=?"),
        ("/a?q=a\\b", "/a", "q=a\\b"),
        ("/a?q=%00", "/a", "q=%00"),
        ("/a?q=caf%C3%A9+x&&=", "/a", "q=caf%C3%A9+x&&="),
        ("/a%2Fb/?b=2&a=1", "/a%2Fb/", "b=2&a=1"),
    ],
)
def test_the_query_is_returned_unchanged(target: str, path: str, query: str) -> None:
    assert split_target(target) == (path, query)


# Characters allowed in a path segment (RFC 3986 pchar minus '%'), plus some a
# browser sends raw. Percent-escapes are added separately.
SEGMENT_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
FORBIDDEN_OCTETS = set(range(0x20)) | {0x7F, 0x5C}


def _escape(octet: int, upper: bool) -> str:
    text = f"%{octet:02X}"
    return text if upper else text.lower()


safe_escape = st.builds(
    _escape,
    st.integers(0, 255).filter(lambda b: b not in FORBIDDEN_OCTETS),
    st.booleans(),
)


def _is_dot_free(segment: str) -> bool:
    """No dot segment in any spelling the gateway rejects (each tested separately): as it
    is or decoded up to three times, split on '/' or '\\', with any ';params' dropped."""
    decoded = segment.encode()
    for _ in range(4):
        for part in decoded.replace(b"\\", b"/").split(b"/"):
            if part.split(b";", 1)[0] in (b".", b".."):
                return False
        decoded = unquote_to_bytes(decoded)
    return True


segment = (
    st.lists(st.one_of(st.sampled_from(SEGMENT_CHARS), safe_escape), max_size=12)
    .map("".join)
    .filter(_is_dot_free)
)
# The first segment is not empty: `//x` is a network-path reference, rejected.
safe_path = st.builds(
    lambda first, rest: "/" + "/".join([first, *rest]),
    segment.filter(bool),
    st.lists(segment, max_size=7),
)
query_text = st.text(alphabet=st.sampled_from(SEGMENT_CHARS + '/?%\\"<>^`{|} '), max_size=30)


@given(safe_path)
def test_any_path_of_safe_segments_is_returned_unchanged(path: str) -> None:
    assert split_target(path) == (path, "")


@given(safe_path, query_text)
def test_any_safe_path_and_query_come_back_unchanged(path: str, query: str) -> None:
    assert split_target(f"{path}?{query}") == (path, query)


def _dot(encoded: bool, upper: bool) -> str:
    return ("%2E" if upper else "%2e") if encoded else "."


one_dot = st.builds(_dot, st.booleans(), st.booleans())
dot_segment = st.one_of(one_dot, st.builds(lambda a, b: a + b, one_dot, one_dot))


@given(
    st.lists(segment.filter(bool), max_size=5),
    dot_segment,
    st.lists(segment, max_size=5),
    st.booleans(),
)
def test_a_dot_segment_anywhere_in_any_spelling_is_rejected(
    before: list[str], dots: str, after: list[str], encoded_slash: bool
) -> None:
    joined = "/".join([*before, dots])
    if after:
        # `..%2F` is a dot segment too for an upstream that decodes %2F.
        joined += ("%2F" if encoded_slash else "/") + "/".join(after)
    rejected("/" + joined)


@given(
    safe_path,
    st.one_of(
        st.sampled_from(["\\"] + [chr(b) for b in FORBIDDEN_OCTETS if b != 0x5C]),
        st.builds(_escape, st.sampled_from(sorted(FORBIDDEN_OCTETS)), st.booleans()),
    ),
    st.integers(min_value=0),
)
def test_a_forbidden_character_anywhere_in_the_path_is_rejected(
    path: str, bad: str, where: int
) -> None:
    # Insert after the leading '/' so the target stays origin-form.
    position = 1 + where % len(path)
    rejected(path[:position] + bad + path[position:])


# -- RouteTable ------------------------------------------------------------------------


TABLE_PATHS = ("/", "/api/", "/api/demo/", "/api/demo/deep/", "/exact")


@pytest.mark.parametrize(
    ("raw_path", "route", "remainder"),
    [
        ("/api/demo/deep/x", "/api/demo/deep/", "/x"),
        ("/api/demo/deep", "/api/demo/deep/", ""),
        ("/api/demo/deeper", "/api/demo/", "/deeper"),
        ("/api/demo/x", "/api/demo/", "/x"),
        ("/api/demo/", "/api/demo/", "/"),
        ("/api/demo", "/api/demo/", ""),
        ("/api/demonstration", "/api/", "/demonstration"),
        ("/api/demo%2Fx", "/api/", "/demo%2Fx"),
        ("/api/other/thing", "/api/", "/other/thing"),
        ("/api", "/api/", ""),
        ("/apis", "/", "/apis"),
        ("/exact", "/exact", ""),
        ("/exact/sub", "/exact", "/sub"),
        ("/exactly", "/", "/exactly"),
        ("/", "/", "/"),
        ("/index.html", "/", "/index.html"),
        ("/api/demo/a%2Fb/%20", "/api/demo/", "/a%2Fb/%20"),
    ],
)
def test_longest_prefix_on_a_segment_boundary(raw_path: str, route: str, remainder: str) -> None:
    table = RouteTable(routes(*TABLE_PATHS))
    assert matched_path(table, raw_path) == (route, remainder)


def test_match_reports_the_route_index_in_config_order() -> None:
    configured = routes("/", "/api/demo/", "/api/")
    table = RouteTable(configured)
    match = table.match("/api/demo/x")
    assert match is not None
    assert match.index == 1
    assert match.route is configured[1]


def test_without_a_catch_all_unmatched_paths_have_no_route() -> None:
    table = RouteTable(routes("/api/demo/", "/api"))
    assert table.match("/elsewhere") is None
    assert table.match("/apix") is None
    assert matched_path(table, "/api/demonstration") == ("/api", "/demonstration")
    assert RouteTable([]).match("/") is None


def test_matching_is_on_the_raw_path_and_case_sensitive() -> None:
    table = RouteTable(routes("/api/demo/"))
    assert table.match("/API/demo/x") is None
    assert table.match("/api%2Fdemo/x") is None


route_prefix = st.lists(
    st.sampled_from(["a", "b", "ab", "api", "demo"]), min_size=0, max_size=3
).map(lambda segs: "/" + "/".join(segs) + ("/" if segs else ""))
request_path = st.lists(
    st.sampled_from(["a", "b", "ab", "api", "demo", "x", ""]), min_size=1, max_size=5
).map(lambda segs: "/" + "/".join(segs))


def _oracle(prefixes: list[str], raw_path: str) -> str | None:
    """Brute force: the longest prefix that matches on a segment boundary."""
    best = None
    for prefix in prefixes:
        bare = prefix.rstrip("/")
        matches = raw_path == bare or raw_path.startswith(bare + "/")
        if matches and (best is None or len(bare) > len(best.rstrip("/"))):
            best = prefix
    return best


@given(
    st.lists(route_prefix, min_size=1, max_size=6, unique_by=lambda p: p.rstrip("/")), request_path
)
def test_route_table_agrees_with_a_brute_force_oracle(prefixes: list[str], raw_path: str) -> None:
    table = RouteTable(routes(*prefixes))
    match = table.match(raw_path)
    expected = _oracle(prefixes, raw_path)
    if expected is None:
        assert match is None
        return
    assert match is not None
    assert match.route.path == expected
    # The remainder is what follows the prefix, raw, and the two rebuild the path.
    assert expected.rstrip("/") + match.remainder == raw_path
    assert match.remainder == "" or match.remainder.startswith("/")


@given(
    st.permutations(list(TABLE_PATHS)), st.sampled_from(["/api/demo/x", "/api/x", "/x", "/exact/y"])
)
def test_configuration_order_does_not_change_the_winner(order: list[str], raw_path: str) -> None:
    reference = matched_path(RouteTable(routes(*TABLE_PATHS)), raw_path)
    assert matched_path(RouteTable(routes(*order)), raw_path) == reference


# -- upstream_path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "remainder", "expected"),
    [
        ("/", "", "/"),
        ("", "", "/"),
        ("/", "/", "/"),
        ("/", "/x", "/x"),
        ("", "/x", "/x"),
        ("/v1/", "", "/v1/"),
        ("/v1", "", "/v1"),
        ("/v1/", "/", "/v1/"),
        ("/v1/", "/users/42", "/v1/users/42"),
        ("/v1", "/users/42", "/v1/users/42"),
        ("/v1/", "/a%2Fb/%20", "/v1/a%2Fb/%20"),
        ("/a%20b/", "/c", "/a%20b/c"),
    ],
)
def test_upstream_path_joins_without_doubling_or_dropping_slashes(
    base: str, remainder: str, expected: str
) -> None:
    assert upstream_path(base, remainder) == expected


@given(
    st.sampled_from(["", "/", "/v1", "/v1/", "/a/b/"]),
    st.lists(st.sampled_from(["x", "a%2Fb", "%20", "caf%C3%A9"]), max_size=4),
    st.booleans(),
)
def test_upstream_path_keeps_the_remainder_raw(
    base: str, segments: list[str], trailing: bool
) -> None:
    remainder = "".join("/" + s for s in segments) + ("/" if trailing and segments else "")
    joined = upstream_path(base, remainder)
    assert joined.startswith("/")
    assert "//" not in joined
    assert joined.endswith(remainder)
    assert joined.startswith(base.rstrip("/"))


@pytest.mark.parametrize(
    ("route_path", "upstream", "target", "expected"),
    [
        ("/api/demo/", "http://127.0.0.1:8081/", "/api/demo/user?x=1", "/user"),
        ("/api/demo/", "http://127.0.0.1:8081/", "/api/demo", "/"),
        ("/api/weather/", "https://api.example/data/2.5/", "/api/weather/w%2Fx", "/data/2.5/w%2Fx"),
        ("/api/weather/", "https://api.example/data/2.5", "/api/weather/", "/data/2.5/"),
        ("/api/", "http://h", "/api/x", "/x"),
        ("/", "http://h/base/", "/a/b", "/base/a/b"),
    ],
)
def test_request_to_upstream_path_end_to_end(
    route_path: str, upstream: str, target: str, expected: str
) -> None:
    table = RouteTable(routes(route_path, upstream=upstream))
    path, _ = split_target(target)
    match = table.match(path)
    assert match is not None
    assert upstream_path(URL(upstream).raw_path, match.remainder) == expected


@pytest.mark.parametrize(
    "target",
    ["/a/..;/b", "/a/.;x/b", "/a/%2e%2e;jsessionid=1/b", "/a/%252e%252e/b", "/a/%25252e%25252e/b"],
)
def test_servlet_path_params_and_double_encoded_dot_segments_are_rejected(target: str) -> None:
    with pytest.raises(GatewayError) as caught:
        split_target(target)
    assert caught.value.status == 400


@pytest.mark.parametrize("target", ["/a;b/c", "/a/%2541", "/files/v1.2;rev=3", "/%25"])
def test_path_params_and_encoded_percent_are_kept(target: str) -> None:
    assert split_target(target) == (target, "")
