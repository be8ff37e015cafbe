"""A bounded fuzz run over the config loader (issue 13): any text either loads or
raises ConfigError, whose every problem is ``source: where: reason``; nothing
else escapes, secrets are never quoted, and no document makes it hang.

Three generators feed ``load_config_text``: config-shaped trees (the known
sections and keys with plausible and hostile values) dumped as YAML and then
mutated with YAML-level hostility (explicit tags, impossible dates, anchors,
aliases, flow openers); text over YAML's own punctuation; and deep nesting.
"""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Config, ConfigError, load_config_text
from tests.support import TEST_KEY, fuzz_settings

SOURCE = "fuzz.yaml"
SECRET = "s3cr3t-MARKER-7f1d"  # planted in every value that carries a secret
ENV = {"VAR": "value", "EMPTY": "", "KEY": TEST_KEY, "SECRET_VAR": SECRET + "-env"}

# -- what a config looks like ----------------------------------------------------------

plausible = st.sampled_from(
    [
        "127.0.0.1:8080", "[::1]:9090", "0.0.0.0:0", "host:99999", "http://127.0.0.1:1/",
        "https://api.example/v1/", "ftp://x", "/api/", "/", "api", "10MiB", "1GiB", "16KiB",
        "-1KiB", "1.5MiB", "none", "demo", "password", "oauth2", "cookie", "memory", "redis",
        "redis://127.0.0.1:6379/0", "Strict", "Lax", "None", "json", "text", "debug", "X-CSRF",
        "10.0.0.0/8", "10.0.0.1/8", "::/0", TEST_KEY, TEST_KEY + "==", "k1", "${VAR}",
        "${UNSET}", "${UNSET:-fallback}", "${EMPTY:-x}", "${", "$${VAR}", "a" * 300, "a" * 5000,
        "/tmp", "/nonexistent/dir", "\u00e9\u00e8", "caf\u00e9", "GET", "get", "P0ST", "",
        " ", "\t", "x\x00y", "line\nbreak",
    ]
)  # fmt: skip
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
scalar = st.one_of(plausible, numbers, st.text(max_size=20))
value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
secret_value = st.sampled_from([SECRET, "${SECRET_VAR}", f"{SECRET}:{SECRET}"])

SECTIONS: dict[str, list[str]] = {
    "server": [
        "listen", "admin_listen", "workers", "tls", "public_origin", "trusted_proxies",
        "shutdown_timeout", "limits", "timeouts",
    ],
    "limits": [
        "max_header_size", "max_headers", "max_body_size", "retry_buffer_size",
        "header_timeout", "body_timeout", "keepalive_timeout", "max_connections",
        "max_in_flight",
    ],
    "timeouts": ["connect", "read", "total"],
    "session": [
        "store", "redis_url", "cookie_prefix", "secure", "same_site", "idle_timeout",
        "absolute_timeout", "keys", "csrf",
    ],
    "provider": [
        "type", "login_url", "refresh_url", "logout_url", "access_token_field",
        "refresh_token_field", "expires_in_field", "refresh_body", "refresh_on",
        "refresh_skew", "refresh_grace", "session_claims", "client_id", "client_secret",
        "issuer", "scopes",
    ],
    "route": [
        "path", "upstream", "static", "auth", "methods", "max_body_size", "timeouts",
        "forward_cookies", "inject_headers", "inject_query", "tls",
    ],
    "logging": ["level", "format", "access_log"],
}  # fmt: skip
SECRET_KEYS = {"secret", "client_secret", "redis_url"}


def section(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping of some of the section's keys (and now and then a typo) to values."""
    keys = SECTIONS[name] + ["typo_key"]

    def entry(key: str) -> st.SearchStrategy[Any]:
        if key in SECTIONS:
            return st.one_of(section(key), value)
        if key in SECRET_KEYS:
            return st.one_of(secret_value, value)
        if key == "keys":
            return st.lists(
                st.fixed_dictionaries(
                    {"id": st.sampled_from(["k1", "k2", "bad id", ""])},
                    optional={"secret": st.one_of(secret_value, plausible)},
                ),
                max_size=3,
            )
        if key in ("inject_headers", "inject_query"):
            return st.dictionaries(
                st.sampled_from(["X-Api-Key", "appid", "Host", "Bad Name", "te"]),
                st.one_of(secret_value, value),
                max_size=2,
            )
        return value

    return st.lists(st.sampled_from(keys), unique=True, max_size=6).flatmap(
        lambda chosen: st.fixed_dictionaries({key: entry(key) for key in chosen})
    )


config_tree = st.fixed_dictionaries(
    {},
    optional={
        "server": section("server"),
        "session": section("session"),
        "providers": st.dictionaries(
            st.sampled_from(["demo", "other", "bad name"]), section("provider"), max_size=2
        ),
        "routes": st.lists(section("route"), max_size=3),
        "logging": section("logging"),
        "extra": value,
    },
)

# YAML-level hostility that a dumped tree never contains on its own.
HOSTILE_YAML = [
    "2001-13-45", "2001-02-29", "2001-1-1 25:61:61", "!!int x", "!!int 0x", "!!float x",
    "!!timestamp x", "!!timestamp 2001-13-45", "!!bool maybe", "!!null x", "!!binary ===",
    "!!map x", "!!seq x", "!!set x", "!!omap x", "!!pairs x", "!!str [1]",
    "!!python/name:os.system",
    "!!python/object/apply:os.system [x]", "!custom x", "&a x", "*undefined", "&a [*a]",
    "{", "[", "}", "]", "? x", "? [a]\n: 1", "<<: 1", "<<: *a", "|", ">-", "'", '"\\x"',
    '"\\uDFFF"', "%YAML 1.1", "---", "...", "@", "`", "~", ".inf", "-.inf", ".nan", "0o9",
    "0b2", "1_000", "190:20:30", "1:2:", "1e400", "!!int 1e400", "- - - x",
]  # fmt: skip


@st.composite
def mutated_yaml(draw: st.DrawFn) -> str:
    text = yaml.safe_dump(draw(config_tree), allow_unicode=draw(st.booleans()))
    lines = text.splitlines() or [""]
    for _ in range(draw(st.integers(0, 3))):
        index = draw(st.integers(0, len(lines) - 1))
        line = lines[index]
        snippet = draw(st.sampled_from(HOSTILE_YAML))
        how = draw(st.sampled_from(["value", "line", "chars"]))
        if how == "value" and ": " in line:
            lines[index] = line.partition(": ")[0] + ": " + snippet
        elif how == "line":
            indent = line[: len(line) - len(line.lstrip())]
            lines.insert(index, f"{indent}k{index}: {snippet}")
        else:
            at = draw(st.integers(0, len(line)))
            lines[index] = line[:at] + snippet + line[at:]
    return "\n".join(lines) + "\n"


yaml_punctuation = st.text(
    alphabet=string.ascii_lowercase[:6] + string.digits[:4] + ":-[]{}&*!|>'\"%@`#,?~. \t\n\\$",
    max_size=200,
)


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    depth = draw(st.integers(50, 1200))
    kind = draw(st.sampled_from(["flow", "block", "alias chain"]))
    if kind == "flow":
        return "routes: " + "[" * depth + "]" * draw(st.sampled_from([0, depth]))
    if kind == "block":
        return "".join(f"{'  ' * i}k{i}:\n" for i in range(min(depth, 400))) + "  " * 400 + "x"
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, depth)]
    return "extra:\n" + "\n".join("  " + line for line in lines) + "\n"


config_texts = st.one_of(mutated_yaml(), yaml_punctuation, st.text(max_size=200), deep_nesting())


def load_or_problems(text: str) -> Config | list[str]:
    """What the loader made of ``text``; any exception but ConfigError fails the test."""
    try:
        return load_config_text(text, env=ENV, source=SOURCE)
    except ConfigError as error:
        return error.problems


def assert_well_formed(problems: list[str]) -> None:
    assert problems, "ConfigError without a problem"
    for problem in problems:
        assert problem.startswith(f"{SOURCE}: "), problem
        where, sep, reason = problem.removeprefix(f"{SOURCE}: ").partition(": ")
        assert sep and where and reason, f"no key path and reason: {problem!r}"
        # A key path names YAML keys, never the validator's internals.
        assert not re.search(r"lax-or-strict|function-|json-or-python|is-instance", where), problem
        assert SECRET not in problem, f"a secret was quoted: {problem!r}"


@fuzz_settings(250)
@given(config_texts)
def test_any_text_loads_or_raises_config_error_with_key_paths(text: str) -> None:
    result = load_or_problems(text)
    if isinstance(result, list):
        assert_well_formed(result)
    else:
        assert isinstance(result, Config)


# -- what the fuzz run found (each failed before the fix in gateway/config.py) --------


@pytest.mark.parametrize(
    "text",
    [
        "server:\n  listen: 2001-13-45\n",  # an impossible date: ValueError from PyYAML
        "a: !!int abc\n",  # ValueError
        "a: !!timestamp foo\n",  # AttributeError
        "a: !!bool maybe\n",  # KeyError
        "a: !!map x\n",  # ValueError
        "? !!float x\n: 1\n",  # ValueError while building a key
        "routes: " + "[" * 3000,  # RecursionError in PyYAML's composer
        "extra:\n  a0: &a0 [x]\n"
        + "\n".join(f"  a{i}: &a{i} [*a{i - 1}]" for i in range(1, 3000)),
        "extra: &a [*a]\n",  # a list that contains itself
    ],
    ids=[
        "impossible-date", "bad-int", "bad-timestamp", "bad-bool", "bad-map", "bad-key",
        "deep-flow", "deep-alias-chain", "self-containing-alias",
    ],
)  # fmt: skip
def test_hostile_yaml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config_text(text, env=ENV, source=SOURCE)
    assert_well_formed(raised.value.problems)


def test_an_alias_bomb_is_refused_without_expanding_it() -> None:
    # 9**9 (387 million) strings if expanded: before the fix, interpolation
    # walked every copy (minutes and gigabytes); now the count stops at a cap.
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "extra:\n" + "\n".join("  " + line for line in lines) + "\n"
    with pytest.raises(ConfigError) as raised:
        load_config_text(text, env=ENV, source=SOURCE)
    assert_well_formed(raised.value.problems)
    assert any("values" in p for p in raised.value.problems), raised.value.problems


def test_a_path_too_long_to_check_is_a_config_error() -> None:
    # OSError (ENAMETOOLONG) from Path.is_dir() escaped the loader.
    routes = [{"path": "/", "static": "d" * 5000}, {"path": "/x/", "upstream": "http://h/"}]
    routes[1]["tls"] = {"ca_file": "c" * 5000}
    with pytest.raises(ConfigError) as raised:
        load_config_text(yaml.safe_dump({"routes": routes}), env=ENV, source=SOURCE)
    assert_well_formed(raised.value.problems)
    wheres = [p.split(": ")[1] for p in raised.value.problems]
    assert "routes.0.static" in wheres and "routes.1.tls.ca_file" in wheres


def test_anchors_and_merges_that_configs_use_still_load() -> None:
    text = (
        "routes:\n"
        "  - &base\n    path: /base/\n    upstream: http://127.0.0.1:1/\n"
        "    timeouts: {read: 5}\n"
        "  - <<: *base\n    path: /a/\n"
        "  - <<: *base\n    path: /b/\n"
    )
    config = load_config_text(text, env=ENV, source=SOURCE)
    assert [route.path for route in config.routes] == ["/base/", "/a/", "/b/"]
    assert all(route.timeouts.read == 5 for route in config.routes)


@pytest.mark.parametrize("value", ["true", "1", "167772160", "2.5", "null"])
def test_a_trusted_proxy_that_is_not_a_network_text_is_refused(value: str) -> None:
    # Before: `true` and `1` loaded as 0.0.0.1/32 (ipaddress takes integers), and a
    # float's problem was reported under pydantic's union internals, not a key path.
    with pytest.raises(ConfigError) as raised:
        load_config_text(f"server: {{trusted_proxies: [{value}]}}", env=ENV, source=SOURCE)
    assert raised.value.problems == [
        f"{SOURCE}: server.trusted_proxies.0: expected an IP network in CIDR form, e.g. 10.0.0.0/8"
    ]
