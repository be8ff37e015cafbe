"""Unit tests for gateway.config (SPEC §2: configuration, interpolation, validation)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import (
    Config,
    ConfigError,
    Listen,
    PasswordProvider,
    default_config_path,
    load_config,
    load_config_text,
    parse_size,
)
from gateway.sessions.seal import decode_key
from tests.support import REPO, TEST_KEY, TEST_KEY_2

SOURCE = "conf.yaml"
# `source: key.path: reason`, the key path made of YAML keys and list indexes.
PROBLEM_RE = re.compile(r"^conf\.yaml: (?P<path>.+?): (?P<reason>.+)$")

# A key that is valid base64url but 16 bytes long, and one that is 33 bytes long.
SHORT_KEY = "c2hvcnQta2V5LTE2LWJ5dA"
LONG_KEY = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"

PROVIDER = {"type": "password", "login_url": "http://127.0.0.1:8081/auth/login"}
UPSTREAM_ROUTE = {"path": "/api/", "upstream": "http://127.0.0.1:8081/"}


def doc(**sections: Any) -> dict[str, Any]:
    """A minimal valid config (one key, one public route) with sections replaced."""
    data: dict[str, Any] = {
        "session": {"keys": [{"id": "k1", "secret": TEST_KEY}]},
        "routes": [dict(UPSTREAM_ROUTE)],
    }
    data.update(sections)
    return data


def load(data: dict[str, Any] | str, env: dict[str, str] | None = None) -> Config:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    return load_config_text(text, env or {}, SOURCE)


def problems(data: dict[str, Any] | str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(data, env)
    listed = caught.value.problems
    assert listed, "a ConfigError must list at least one problem"
    for line in listed:
        assert PROBLEM_RE.match(line), f"not 'source: key.path: reason': {line!r}"
        assert "\n" not in line
    assert str(caught.value) == "\n".join(listed)
    return listed


def paths(listed: list[str]) -> list[str]:
    found = []
    for line in listed:
        match = PROBLEM_RE.match(line)
        assert match is not None
        found.append(match["path"])
    return found


def only_problem_at(
    data: dict[str, Any] | str, path: str, env: dict[str, str] | None = None
) -> str:
    listed = problems(data, env)
    assert paths(listed) == [path], listed
    reason = PROBLEM_RE.match(listed[0])
    assert reason is not None
    return reason["reason"]


# -- the baseline ---------------------------------------------------------------


def test_minimal_config_loads_with_the_documented_defaults() -> None:
    config = load(doc())
    assert str(config.server.listen) == "127.0.0.1:8080"
    assert str(config.server.admin_listen) == "127.0.0.1:9090"
    assert config.server.workers == 1
    assert config.server.limits.max_header_size == 16 * 1024
    assert config.server.limits.max_body_size == 10 * 1024**2
    assert config.server.limits.retry_buffer_size == 1024**2
    limits = config.server.limits
    assert (limits.header_timeout, limits.body_timeout, limits.keepalive_timeout) == (10, 30, 75)
    assert (limits.max_connections, limits.max_in_flight) == (10_000, 4096)
    assert (limits.upstream_connections, limits.upstream_queue_timeout) == (1024, 5)
    assert config.server.timeouts.connect == 5
    assert config.server.timeouts.read == 60
    assert config.server.timeouts.total is None
    assert config.session.store == "cookie"
    assert config.session.secure is True
    assert config.session.same_site == "Strict"
    assert config.session.csrf.header == "X-CSRF"
    assert config.routes[0].auth == "none"
    assert config.routes[0].forward_cookies is False


def test_an_empty_document_is_a_valid_config() -> None:
    config = load("")
    assert config.routes == []
    assert config.providers == {}


def test_source_prefixes_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text("server: {limitz: 1}", {}, "/etc/bff/gateway.yaml")
    assert caught.value.problems == [
        "/etc/bff/gateway.yaml: server.limitz: Extra inputs are not permitted"
    ]


def test_invalid_yaml_names_the_line() -> None:
    listed = problems("server:\n  listen: [unclosed\n")
    assert len(listed) == 1
    assert "not valid YAML" in listed[0]
    assert re.match(r"^conf\.yaml: line \d+: ", listed[0])


def test_a_key_written_twice_is_an_error_not_a_silent_override() -> None:
    text = "routes: []\nserver: {workers: 1}\nroutes:\n  - {path: /, upstream: 'http://x/'}\n"
    assert problems(text) == [f"{SOURCE}: line 3: duplicate key 'routes'"]
    nested = "server:\n  workers: 1\n  listen: 127.0.0.1:1\n  workers: 2\n"
    assert problems(nested) == [f"{SOURCE}: line 4: duplicate key 'workers'"]


def test_yaml_merge_keys_may_be_overridden() -> None:
    text = """
routes:
  - &api {path: /a/, upstream: 'http://x/', forward_cookies: true}
  - <<: *api
    path: /b/
"""
    config = load(text)
    assert [(r.path, r.upstream, r.forward_cookies) for r in config.routes] == [
        ("/a/", "http://x/", True),
        ("/b/", "http://x/", True),
    ]


def test_yaml_errors_do_not_quote_the_text() -> None:
    listed = problems("session:\n  keys: [{id: k1, secret: 'SECRET-TEXT}]\n")
    assert len(listed) == 1
    assert "SECRET-TEXT" not in listed[0]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_document_that_is_not_a_mapping_is_rejected(text: str) -> None:
    assert "expected a mapping" in only_problem_at(text, "<root>")


# -- ${VAR} interpolation ---------------------------------------------------------


def test_variables_are_replaced_anywhere_in_any_string() -> None:
    text = """
server:
  listen: ${HOST}:${PORT}
  public_origin: https://${DOMAIN}
session:
  keys:
    - {id: k1, secret: "${KEY}"}
providers:
  demo:
    type: password
    login_url: http://${API_HOST}:8081/auth/login
routes:
  - path: /api/${NAME}/
    upstream: http://${API_HOST}:8081/v${VERSION}/
    auth: demo
    inject_headers: {X-Api-Key: "key=${SECRET};suffix"}
    inject_query: {appid: "${SECRET}"}
"""
    env = {
        "HOST": "0.0.0.0",
        "PORT": "8443",
        "DOMAIN": "app.example.com",
        "KEY": TEST_KEY,
        "API_HOST": "10.1.2.3",
        "NAME": "weather",
        "VERSION": "2",
        "SECRET": "s3cr3t",
    }
    config = load(text, env)
    assert config.server.listen == Listen(host="0.0.0.0", port=8443)
    assert config.server.public_origin == "https://app.example.com"
    assert decode_key(config.session.keys[0].secret) == decode_key(TEST_KEY)
    provider = config.providers["demo"]
    assert isinstance(provider, PasswordProvider)
    assert provider.login_url == "http://10.1.2.3:8081/auth/login"
    route = config.routes[0]
    assert route.path == "/api/weather/"
    assert route.upstream == "http://10.1.2.3:8081/v2/"
    assert route.inject_headers == {"X-Api-Key": "key=s3cr3t;suffix"}
    assert route.inject_query == {"appid": "s3cr3t"}


def test_default_is_used_when_the_variable_is_unset() -> None:
    text = "server: {listen: '${HOST:-127.0.0.1}:${PORT:-8181}'}"
    assert str(load(text, {}).server.listen) == "127.0.0.1:8181"
    assert str(load(text, {"PORT": "9999"}).server.listen) == "127.0.0.1:9999"
    assert str(load(text, {"HOST": "0.0.0.0"}).server.listen) == "0.0.0.0:8181"


def test_default_is_used_when_the_variable_is_empty_like_a_shell() -> None:
    text = "session: {store: redis, redis_url: '${REDIS_URL:-redis://redis:6379/0}'}"
    assert load(text, {"REDIS_URL": ""}).session.redis_url == "redis://redis:6379/0"
    assert load(text, {"REDIS_URL": "redis://r:1/2"}).session.redis_url == "redis://r:1/2"


def test_an_empty_default_gives_an_empty_string() -> None:
    text = "routes: [{path: /, upstream: 'http://x/', inject_query: {a: '${A:-}'}}]"
    assert load(text, {}).routes[0].inject_query == {"a": ""}


def test_a_set_but_empty_variable_without_default_stays_empty() -> None:
    text = "routes: [{path: /, upstream: 'http://x/', inject_query: {a: 'x${A}y'}}]"
    assert load(text, {"A": ""}).routes[0].inject_query == {"a": "xy"}


def test_values_are_substituted_after_parsing_so_yaml_syntax_in_them_is_inert() -> None:
    value = "a: b # not a comment, [not, a, list] ${NOT_EXPANDED} & *alias"
    text = "routes: [{path: /, upstream: 'http://x/', inject_headers: {X-Key: '${V}'}}]"
    route = load(text, {"V": value}).routes[0]
    assert route.inject_headers == {"X-Key": value}


def test_typed_values_can_come_from_the_environment() -> None:
    text = (
        "server: {workers: '${W:-1}', limits: {max_body_size: '${MAX:-1MiB}'}}\n"
        "session: {secure: '${SECURE:-true}'}\n"
    )
    config = load(text, {"W": "1", "SECURE": "false", "MAX": "2KiB"})
    assert config.server.workers == 1
    assert config.session.secure is False
    assert config.server.limits.max_body_size == 2048


def test_unset_variable_names_the_variable_and_the_key_path() -> None:
    text = (
        "routes: [{path: /, upstream: 'http://x/', inject_headers: {X-Api-Key: '${WEATHER_KEY}'}}]"
    )
    reason = only_problem_at(text, "routes.0.inject_headers.X-Api-Key")
    assert reason == "environment variable WEATHER_KEY is not set"


def test_unset_key_variable_is_reported_once_not_as_a_bad_key_too() -> None:
    text = "session: {keys: [{id: k1, secret: '${BFF_SESSION_KEY}'}]}"
    reason = only_problem_at(text, "session.keys.0.secret")
    assert reason == "environment variable BFF_SESSION_KEY is not set"


def test_every_unset_variable_is_reported() -> None:
    text = """
server: {listen: '${LISTEN_HOST}:${LISTEN_PORT}'}
session: {keys: [{id: k1, secret: '${KEY_ONE}'}]}
routes: [{path: /, upstream: 'http://x/', inject_query: {k: '${Q_KEY}'}}]
"""
    listed = problems(text, {})
    assert sorted(listed) == sorted(
        [
            f"{SOURCE}: server.listen: environment variable LISTEN_HOST is not set",
            f"{SOURCE}: server.listen: environment variable LISTEN_PORT is not set",
            f"{SOURCE}: session.keys.0.secret: environment variable KEY_ONE is not set",
            f"{SOURCE}: routes.0.inject_query.k: environment variable Q_KEY is not set",
        ]
    )


def test_a_substituted_value_is_not_interpolated_again() -> None:
    text = "routes: [{path: /, upstream: 'http://x/', inject_query: {k: '${A}'}}]"
    route = load(text, {"A": "${B}", "B": "leak"}).routes[0]
    assert route.inject_query == {"k": "${B}"}


def test_the_process_environment_is_used_when_env_is_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BFF_TEST_CONFIG_PORT", "8765")
    monkeypatch.delenv("BFF_TEST_CONFIG_UNSET", raising=False)
    config = load_config_text("server: {listen: '127.0.0.1:${BFF_TEST_CONFIG_PORT}'}")
    assert config.server.listen.port == 8765
    with pytest.raises(ConfigError) as caught:
        load_config_text("server: {listen: '127.0.0.1:${BFF_TEST_CONFIG_UNSET}'}")
    assert "BFF_TEST_CONFIG_UNSET is not set" in caught.value.problems[0]


# -- unknown keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (doc(servr={}), "servr"),
        (doc(server={"limitz": {}}), "server.limitz"),
        (doc(server={"limits": {"max_bodysize": 1}}), "server.limits.max_bodysize"),
        (doc(server={"timeouts": {"reed": 1}}), "server.timeouts.reed"),
        (doc(routes=[{**UPSTREAM_ROUTE, "upsteam": "http://x/"}]), "routes.0.upsteam"),
        (
            doc(routes=[dict(UPSTREAM_ROUTE), {"path": "/b", "upstream": "http://x/", "atuh": 1}]),
            "routes.1.atuh",
        ),
        (doc(routes=[{**UPSTREAM_ROUTE, "timeouts": {"conect": 1}}]), "routes.0.timeouts.conect"),
        (doc(routes=[{**UPSTREAM_ROUTE, "tls": {"verfy": False}}]), "routes.0.tls.verfy"),
        (
            doc(providers={"demo": {**PROVIDER, "refresh_ulr": "http://x"}}),
            "providers.demo.refresh_ulr",
        ),
        (
            doc(session={"keys": [{"id": "k1", "secret": TEST_KEY}], "csrf": {"headr": "X"}}),
            "session.csrf.headr",
        ),
        (
            doc(session={"keys": [{"id": "k1", "secret": TEST_KEY, "algo": "aes"}]}),
            "session.keys.0.algo",
        ),
        (doc(logging={"colour": True}), "logging.colour"),
    ],
)
def test_unknown_keys_are_errors_with_their_key_path(data: dict[str, Any], path: str) -> None:
    assert only_problem_at(data, path) == "Extra inputs are not permitted"


def test_all_unknown_keys_are_reported_together() -> None:
    data = doc(
        server={"limitz": 1, "limits": {"max_bodysize": 1}},
        routes=[{**UPSTREAM_ROUTE, "upsteam": "http://x/"}],
        logging={"colour": True},
    )
    assert sorted(paths(problems(data))) == [
        "logging.colour",
        "routes.0.upsteam",
        "server.limits.max_bodysize",
        "server.limitz",
    ]


# -- sizes ------------------------------------------------------------------------

UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1, 1),
        (16384, 16384),
        ("16384", 16384),
        ("16KiB", 16 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("512B", 512),
        ("10 MiB", 10 * 1024**2),
        (" 2KiB ", 2048),
    ],
)
def test_sizes(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_any_whole_number_with_a_unit_is_that_many_bytes(number: int, unit: str) -> None:
    assert parse_size(f"{number}{unit}") == number * UNITS[unit]


@pytest.mark.parametrize(
    "garbage",
    ["", "ten", "10MB", "10KB", "1.5MiB", "-1", "-1KiB", "10 MiBs", "MiB", "0x10", "1e3",
     "10MiB10", -1, 1.5, True, None, [], {}],
)  # fmt: skip
def test_garbage_sizes_are_rejected(garbage: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(garbage)


def test_sizes_in_the_config_and_their_errors() -> None:
    config = load(
        doc(
            server={"limits": {"max_header_size": "32KiB", "max_body_size": 2048}},
            routes=[{**UPSTREAM_ROUTE, "max_body_size": "1GiB"}],
        )
    )
    assert config.server.limits.max_header_size == 32 * 1024
    assert config.server.limits.max_body_size == 2048
    assert config.routes[0].max_body_size == 1024**3
    listed = problems(
        doc(
            server={"limits": {"max_body_size": "10MB", "retry_buffer_size": "lots"}},
            routes=[{**UPSTREAM_ROUTE, "max_body_size": "-5"}],
        )
    )
    assert sorted(paths(listed)) == [
        "routes.0.max_body_size",
        "server.limits.max_body_size",
        "server.limits.retry_buffer_size",
    ]
    assert all("KiB" in line for line in listed)


# -- listen addresses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("0.0.0.0:1", "0.0.0.0", 1, "0.0.0.0:1"),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ("[::1]:8080", "::1", 8080, "[::1]:8080"),
        ("[::]:9090", "::", 9090, "[::]:9090"),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80, "[fe80::1%eth0]:80"),
    ],
)
def test_listen_addresses(text: str, host: str, port: int, shown: str) -> None:
    config = load(doc(server={"listen": text, "admin_listen": text}))
    assert config.server.listen == Listen(host=host, port=port)
    assert config.server.admin_listen == Listen(host=host, port=port)
    assert str(config.server.listen) == shown


@pytest.mark.parametrize(
    "bad",
    ["localhost", "127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:0", "127.0.0.1:65536",
     "127.0.0.1:http", "127.0.0.1:-1", "[::1]8080", "[::1]", "[]:80", "127.0.0.1: 80"],
)  # fmt: skip
def test_bad_listen_addresses_are_rejected(bad: str) -> None:
    reason = only_problem_at(doc(server={"listen": bad}), "server.listen")
    assert "host:port" in reason


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("upstream_connections", 0),
        ("upstream_queue_timeout", 0),
        ("max_in_flight", -1),
        ("header_timeout", "soon"),
    ],
)
def test_edge_limits_must_be_positive(key: str, value: Any) -> None:
    data = doc()
    data["server"] = {"limits": {key: value}}
    only_problem_at(data, f"server.limits.{key}")


def test_admin_listen_can_be_disabled() -> None:
    assert load(doc(server={"admin_listen": None})).server.admin_listen is None


# -- the rejections SPEC §2 lists ----------------------------------------------------


def test_route_auth_naming_no_provider() -> None:
    data = doc(
        providers={"demo": PROVIDER},
        routes=[
            {**UPSTREAM_ROUTE, "auth": "demo"},
            {"path": "/b/", "upstream": "http://x/", "auth": "dmeo"},
        ],
    )
    assert only_problem_at(data, "routes.1.auth") == "no provider named 'dmeo'"


def test_route_auth_none_and_a_named_provider_are_accepted() -> None:
    config = load(
        doc(
            providers={"demo": PROVIDER},
            routes=[{**UPSTREAM_ROUTE, "auth": "demo"}, {"path": "/pub/", "upstream": "http://x/"}],
        )
    )
    assert [r.auth for r in config.routes] == ["demo", "none"]


@pytest.mark.parametrize(
    ("first", "second"), [("/api/", "/api/"), ("/api/", "/api"), ("/api", "/api/"), ("/", "/")]
)
def test_two_routes_with_the_same_path(first: str, second: str) -> None:
    data = doc(
        routes=[
            {"path": first, "upstream": "http://a/"},
            {"path": "/other/", "upstream": "http://b/"},
            {"path": second, "upstream": "http://c/"},
        ]
    )
    reason = only_problem_at(data, "routes.2.path")
    assert "routes.0" in reason


@pytest.mark.parametrize("workers", [0, 2, 8])
def test_memory_store_needs_exactly_one_worker(workers: int) -> None:
    data = doc(
        server={"workers": workers},
        session={"store": "memory", "keys": [{"id": "k1", "secret": TEST_KEY}]},
    )
    assert "workers" in only_problem_at(data, "session.store")


def test_memory_store_with_one_worker_and_cookie_store_with_many_are_fine() -> None:
    keys = [{"id": "k1", "secret": TEST_KEY}]
    assert load(doc(server={"workers": 1}, session={"store": "memory", "keys": keys}))
    assert load(doc(server={"workers": 4}, session={"store": "cookie", "keys": keys}))


def test_redis_store_needs_redis_url() -> None:
    keys = [{"id": "k1", "secret": TEST_KEY}]
    reason = only_problem_at(doc(session={"store": "redis", "keys": keys}), "session.redis_url")
    assert "redis" in reason
    config = load(doc(session={"store": "redis", "redis_url": "redis://r:6379/0", "keys": keys}))
    assert config.session.redis_url == "redis://r:6379/0"


@pytest.mark.parametrize(
    "secret", [SHORT_KEY, LONG_KEY, TEST_KEY[:-1], "not base64!", "", TEST_KEY + "AAAA"]
)
def test_a_key_that_is_not_32_bytes(secret: str) -> None:
    data = doc(session={"keys": [{"id": "k1", "secret": secret}]})
    reason = only_problem_at(data, "session.keys.0.secret")
    assert "32 bytes" in reason
    if secret:
        assert secret not in reason, "the key text must never be echoed"


def test_padded_and_unpadded_keys_are_both_accepted() -> None:
    config = load(
        doc(
            session={
                "keys": [{"id": "a", "secret": TEST_KEY + "="}, {"id": "b", "secret": TEST_KEY_2}]
            }
        )
    )
    assert [k.key_bytes() for k in config.session.keys] == [bytes(32), b"\x01" * 32]


def test_a_bad_key_from_the_environment_is_not_echoed() -> None:
    text = "session: {keys: [{id: k1, secret: '${KEY}'}]}"
    listed = problems(text, {"KEY": SHORT_KEY})
    assert paths(listed) == ["session.keys.0.secret"]
    assert SHORT_KEY not in "\n".join(listed)


def test_no_keys_while_a_provider_needs_a_session() -> None:
    data = doc(session={}, providers={"demo": PROVIDER})
    assert "key" in only_problem_at(data, "session.keys")


def test_no_keys_while_a_route_needs_a_session() -> None:
    # The route's provider is missing too: both are reported.
    data = doc(session={"keys": []}, routes=[{**UPSTREAM_ROUTE, "auth": "demo"}])
    assert sorted(paths(problems(data))) == ["routes.0.auth", "session.keys"]


def test_no_keys_are_needed_without_sessions() -> None:
    config = load(doc(session={}))
    assert config.session.keys == []


def test_secure_false_with_same_site_none() -> None:
    keys = [{"id": "k1", "secret": TEST_KEY}]
    data = doc(session={"secure": False, "same_site": "None", "keys": keys})
    assert "secure" in only_problem_at(data, "session.same_site")
    assert load(doc(session={"secure": True, "same_site": "None", "keys": keys}))
    assert load(doc(session={"secure": False, "same_site": "Lax", "keys": keys}))


def test_duplicate_key_ids() -> None:
    keys = [{"id": "k1", "secret": TEST_KEY}, {"id": "k1", "secret": TEST_KEY_2}]
    assert "session.keys.0" in only_problem_at(doc(session={"keys": keys}), "session.keys.1.id")


# -- routes ------------------------------------------------------------------------


def test_a_route_needs_exactly_one_of_upstream_and_static(tmp_path: Path) -> None:
    data = doc(
        routes=[
            {"path": "/both/", "upstream": "http://x/", "static": str(tmp_path)},
            {"path": "/neither/"},
            {"path": "/ok/", "static": str(tmp_path)},
        ]
    )
    listed = problems(data)
    assert paths(listed) == ["routes.0", "routes.1"]
    assert all("exactly one of upstream or static" in line for line in listed)


def test_static_routes_are_public_and_must_exist(tmp_path: Path) -> None:
    data = doc(
        providers={"demo": PROVIDER},
        routes=[
            {"path": "/a/", "static": str(tmp_path), "auth": "demo"},
            {"path": "/b/", "static": str(tmp_path / "missing")},
        ],
    )
    listed = problems(data)
    assert paths(listed) == ["routes.0.auth", "routes.1.static"]


def test_relative_static_dirs_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    conf = tmp_path / "gw.yaml"
    conf.write_text(yaml.safe_dump({"routes": [{"path": "/", "static": "site"}]}))
    config = load_config(conf, {})
    assert config.routes[0].static == tmp_path / "site"


@pytest.mark.parametrize(
    "upstream",
    ["127.0.0.1:8081", "ftp://x/", "http://", "http://x/a?b=1", "http://x/#f", "http://x y/"],
)
def test_bad_upstream_urls(upstream: str) -> None:
    only_problem_at(doc(routes=[{"path": "/", "upstream": upstream}]), "routes.0.upstream")


@pytest.mark.parametrize("path", ["api/", "", "http://x/"])
def test_route_paths_start_with_a_slash(path: str) -> None:
    only_problem_at(doc(routes=[{"path": path, "upstream": "http://x/"}]), "routes.0.path")


def test_methods_are_upper_cased_and_checked() -> None:
    assert load(doc(routes=[{**UPSTREAM_ROUTE, "methods": ["get", "Post"]}])).routes[0].methods == [
        "GET",
        "POST",
    ]
    only_problem_at(doc(routes=[{**UPSTREAM_ROUTE, "methods": ["GET", "B@D"]}]), "routes.0.methods")


def test_route_timeouts_inherit_what_they_do_not_set() -> None:
    config = load(
        doc(
            server={"timeouts": {"connect": 2, "read": 30, "total": None}},
            routes=[{**UPSTREAM_ROUTE, "timeouts": {"read": 300}}],
        )
    )
    merged = config.routes[0].timeouts.over(config.server.timeouts)
    assert (merged.connect, merged.read, merged.total) == (2, 300, None)


@pytest.mark.parametrize(
    "name", ["Bad Name", "X-Key\n", "X-Key\r\nX-Evil", "X:Y", "X(Y)", "Ünïcode", "X/Y"]
)
def test_bad_inject_header_names(name: str) -> None:
    data = doc(routes=[{**UPSTREAM_ROUTE, "inject_headers": {name: "v", "X-Good": "ok"}}])
    listed = problems(data)
    assert len(listed) == 1
    assert "inject_headers" in listed[0]
    assert "not a valid header name" in listed[0]


@pytest.mark.parametrize(
    "name", ["Host", "content-length", "Transfer-Encoding", "Connection", "TE", "Upgrade"]
)
def test_headers_the_gateway_manages_cannot_be_injected(name: str) -> None:
    data = doc(routes=[{**UPSTREAM_ROUTE, "inject_headers": {name: "1"}}])
    assert "cannot be injected" in only_problem_at(data, f"routes.0.inject_headers.{name}")


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b", "a\x7fb", "a\x1bb"])
def test_inject_header_values_with_line_breaks_or_controls(value: str) -> None:
    secret = "TOPSECRET-" + value
    data = doc(routes=[{**UPSTREAM_ROUTE, "inject_headers": {"X-Api-Key": secret}}])
    listed = problems(data)
    assert paths(listed) == ["routes.0.inject_headers.X-Api-Key"]
    assert "TOPSECRET" not in "\n".join(listed), "an injected secret must never be echoed"


def test_inject_header_values_from_the_environment_are_checked_too() -> None:
    text = "routes: [{path: /, upstream: 'http://x/', inject_headers: {X-Api-Key: '${K}'}}]"
    listed = problems(text, {"K": "SECRETVALUE\r\nX-Admin: yes"})
    assert paths(listed) == ["routes.0.inject_headers.X-Api-Key"]
    assert "SECRETVALUE" not in "\n".join(listed)


def test_good_inject_headers_are_kept_as_written() -> None:
    headers = {"X-Api-Key": "abc def\tghi", "x-lower": "1", "Authorization": "Bearer server-held"}
    config = load(doc(routes=[{**UPSTREAM_ROUTE, "inject_headers": headers}]))
    assert config.routes[0].inject_headers == headers
    assert "abc def" not in repr(config.routes[0]), "inject values are secrets: not in repr"


def test_trusted_proxies_are_networks() -> None:
    config = load(doc(server={"trusted_proxies": ["10.0.0.0/8", "::1/128", "192.168.1.7"]}))
    assert config.server.trusted_proxies == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.7/32"),
    ]
    listed = problems(doc(server={"trusted_proxies": ["10.0.0.0/8", "not-a-cidr", "10.0.0.1/8"]}))
    assert paths(listed) == ["server.trusted_proxies.1", "server.trusted_proxies.2"]


# -- all problems at once ----------------------------------------------------------------


def test_every_problem_is_reported_in_one_error(tmp_path: Path) -> None:
    data = {
        "server": {"listen": "nowhere", "workers": 2, "limitz": 1},
        "session": {
            "store": "memory",
            "secure": False,
            "same_site": "None",
            "keys": [{"id": "k1", "secret": SHORT_KEY}],
        },
        "providers": {"demo": PROVIDER},
        "routes": [
            {"path": "/api/", "upstream": "http://x/", "auth": "nobody"},
            {"path": "/api", "upstream": "http://y/"},
            {"path": "/both/", "upstream": "http://x/", "static": str(tmp_path)},
            {"path": "/h/", "upstream": "http://x/", "inject_headers": {"X-K": "a\r\nb"}},
            {"path": "/u/", "upsteam": "http://x/"},
        ],
    }
    listed = problems(data)
    assert set(paths(listed)) >= {
        "server.listen",
        "server.limitz",
        "session.same_site",
        "session.keys.0.secret",
        "routes.0.auth",
        "routes.1.path",
        "routes.2",
        "routes.3.inject_headers.X-K",
        "routes.4.upsteam",
    }
    assert len(listed) >= 9


def test_a_typo_does_not_hide_the_cross_section_rules() -> None:
    keys = [{"id": "k1", "secret": TEST_KEY}]
    data = {
        "server": {"workers": 2, "limitz": 1},
        "session": {"store": "memory", "keys": keys, "colour": "red"},
        "routes": [
            {"path": "/a/", "upstream": "http://x/", "auth": "nobody", "bogus": 1},
            {"path": "/a", "upstream": "http://y/"},
        ],
    }
    assert sorted(paths(problems(data))) == [
        "routes.0.auth",
        "routes.0.bogus",
        "routes.1.path",
        "server.limitz",
        "session.colour",
        "session.store",
    ]


def test_a_part_that_is_wrong_does_not_invent_problems_elsewhere() -> None:
    # The bad key must not read as "no keys"; the bad upstream not as "no upstream".
    data = doc(
        session={"keys": [{"id": "k1", "secret": SHORT_KEY}]},
        providers={"demo": PROVIDER},
        routes=[{"path": "/api/", "upstream": "ftp://x/", "auth": "demo"}],
    )
    assert sorted(paths(problems(data))) == ["routes.0.upstream", "session.keys.0.secret"]


def test_session_rules_are_checked_beside_a_bad_key() -> None:
    data = doc(
        session={
            "store": "redis",
            "secure": False,
            "same_site": "None",
            "keys": [{"id": "k1", "secret": SHORT_KEY}],
        }
    )
    assert sorted(paths(problems(data))) == [
        "session.keys.0.secret",
        "session.redis_url",
        "session.same_site",
    ]


def test_provider_names_that_look_like_type_tags_keep_their_key_path() -> None:
    data = doc(
        providers={
            "password": {**PROVIDER, "login_url": "ftp://x"},
            "oauth2": {**PROVIDER, "bogus": 1},
        }
    )
    assert sorted(paths(problems(data))) == [
        "providers.oauth2.bogus",
        "providers.password.login_url",
    ]


def test_an_invalid_provider_still_counts_as_named() -> None:
    data = doc(
        providers={"demo": {**PROVIDER, "login_url": "ftp://x"}},
        routes=[{**UPSTREAM_ROUTE, "auth": "demo"}],
    )
    assert paths(problems(data)) == ["providers.demo.login_url"]


# -- files --------------------------------------------------------------------------


@pytest.mark.parametrize("relative", ["config.yaml", "deploy/config.docker.yaml"])
def test_the_repository_configs_load(relative: str) -> None:
    config = load_config(REPO / relative, {"BFF_SESSION_KEY": TEST_KEY})
    assert config.session.keys[0].key_bytes() == bytes(32)
    assert "demo" in config.providers
    assert any(route.path == "/api/demo/" and route.auth == "demo" for route in config.routes)


def test_the_demo_config_serves_the_spa_from_the_repository() -> None:
    config = load_config(REPO / "config.yaml", {"BFF_SESSION_KEY": TEST_KEY})
    static = [route.static for route in config.routes if route.static is not None]
    assert static == [REPO / "gateway/demo/spa"]
    assert (REPO / "gateway/demo/spa/index.html").is_file()


def test_the_docker_config_defaults_redis_url() -> None:
    path = REPO / "deploy/config.docker.yaml"
    assert (
        load_config(path, {"BFF_SESSION_KEY": TEST_KEY}).session.redis_url == "redis://redis:6379/0"
    )
    env = {"BFF_SESSION_KEY": TEST_KEY, "REDIS_URL": "redis://elsewhere:6380/1"}
    assert load_config(path, env).session.redis_url == "redis://elsewhere:6380/1"


@pytest.mark.parametrize("relative", ["config.yaml", "deploy/config.docker.yaml"])
def test_the_repository_configs_need_the_session_key(relative: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / relative, {})
    assert caught.value.problems == [
        f"{REPO / relative}: session.keys.0.secret: environment variable BFF_SESSION_KEY is not set"
    ]


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml", {})
    assert caught.value.problems[0].startswith(f"{tmp_path / 'absent.yaml'}: cannot read")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"server: {listen: \xff\xfe}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(binary, {})
    assert caught.value.problems[0].startswith(f"{binary}: cannot read")


def test_default_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BFF_CONFIG", raising=False)
    assert default_config_path("explicit.yaml") == "explicit.yaml"
    assert default_config_path(None) == "config.yaml"
    monkeypatch.setenv("BFF_CONFIG", "/etc/bff/from-env.yaml")
    assert default_config_path(None) == "/etc/bff/from-env.yaml"
    assert default_config_path("explicit.yaml") == "explicit.yaml"
    (tmp_path / "config.yaml").write_text("{}\n")
    assert default_config_path(None) == "config.yaml"
    (tmp_path / "config.yaml").unlink()
    monkeypatch.setenv("BFF_CONFIG", "")
    assert default_config_path(None) == "config.yaml"
