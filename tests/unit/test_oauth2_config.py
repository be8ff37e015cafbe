"""Unit tests: the type: oauth2 provider config (SPEC §2) and local return_to."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth.return_to import local_return_to, with_error
from gateway.config import OAuth2Provider
from tests.unit.test_config import doc, load, paths, problems

OIDC = {
    "type": "oauth2",
    "issuer": "https://idp.example",
    "client_id": "bff",
    "client_secret": "top-secret-value",
}
GITHUB = {
    "type": "oauth2",
    "authorize_url": "https://github.com/login/oauth/authorize",
    "token_url": "https://github.com/login/oauth/access_token",
    "client_id": "Iv1.x",
    "client_secret": "gh-secret",
    "client_auth": "client_secret_post",
    "scopes": ["read:user"],
}


def provider(**over: Any) -> dict[str, Any]:
    return doc(providers={"p": {**OIDC, **over}})


def test_an_oidc_provider_loads_with_its_defaults() -> None:
    config = load(provider())
    p = config.providers["p"]
    assert isinstance(p, OAuth2Provider)
    assert p.oidc and p.scopes == ["openid"] and p.auth_method == "client_secret_basic"
    assert p.refresh_on == [401] and p.refresh_skew == 30 and p.refresh_grace == 60
    assert "top-secret-value" not in repr(p), "the client secret is not in reprs"


def test_a_github_like_provider_loads() -> None:
    p = load(doc(providers={"gh": GITHUB})).providers["gh"]
    assert isinstance(p, OAuth2Provider)
    assert not p.oidc and p.auth_method == "client_secret_post"


def test_a_public_client_defaults_to_no_client_authentication() -> None:
    p = load(provider(client_secret=None)).providers["p"]
    assert isinstance(p, OAuth2Provider) and p.auth_method == "none"


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"issuer": None}, ["providers.p.issuer"]),
        ({"issuer": "ftp://idp"}, ["providers.p.issuer"]),
        ({"token_url": "not a url"}, ["providers.p.token_url"]),
        ({"client_id": ""}, ["providers.p.client_id"]),
        ({"client_auth": "private_key_jwt"}, ["providers.p.client_auth"]),
        (
            {"client_secret": None, "client_auth": "client_secret_basic"},
            ["providers.p.client_secret"],
        ),
        (
            {"client_secret": None, "client_auth": "client_secret_post"},
            ["providers.p.client_secret"],
        ),
        ({"client_auth": "none"}, ["providers.p.client_auth"]),
        (
            {"authorize_params": {"state": "x", "prompt": "login"}},
            ["providers.p.authorize_params.state"],
        ),
        ({"authorize_params": {"audience": 3}}, ["providers.p.authorize_params.audience"]),
        ({"scopes": "openid"}, ["providers.p.scopes"]),
        ({"refresh_skew": -1}, ["providers.p.refresh_skew"]),
        ({"bogus": 1}, ["providers.p.bogus"]),
    ],
)
def test_oauth2_config_problems_name_their_key(over: dict[str, Any], expected: list[str]) -> None:
    assert paths(problems(provider(**over))) == expected


def test_without_issuer_a_plain_provider_needs_both_urls() -> None:
    data = doc(providers={"gh": {**GITHUB, "authorize_url": None, "token_url": None}})
    assert sorted(paths(problems(data))) == ["providers.gh.authorize_url", "providers.gh.token_url"]


def test_problems_never_echo_the_client_secret() -> None:
    listed = problems(provider(client_auth="none", client_secret="do-not-print-me"))
    assert not any("do-not-print-me" in line for line in listed)


@pytest.mark.parametrize(
    "value",
    [
        "//evil.example",
        "/\\evil.example",
        "https:evil.example",
        "%09/evil.example",
        "/%2F/evil.example",
        "/%2f%2fevil.example",
        "/%252F%252Fevil.example",
        "/%5Cevil.example",
        "https://evil.example",
        "\t/evil",
        "/ok\r\nSet-Cookie: x=y",
        "",
        None,
        "relative/path",
        "/" + "a" * 3000,
    ],
)
def test_return_to_off_this_site_is_the_root(value: str | None) -> None:
    assert local_return_to(value) == "/"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/", "/"),
        ("/app", "/app"),
        ("/app/x?tab=1&b=2#frag", "/app/x?tab=1&b=2#frag"),
        ("/caf\u00e9", "/caf%C3%A9"),
        ("/a b", "/a%20b"),
    ],
)
def test_local_paths_are_kept(value: str, expected: str) -> None:
    assert local_return_to(value) == expected


def test_the_error_code_goes_in_the_query_before_the_fragment() -> None:
    assert with_error("/", "x") == "/?bff_error=x"
    assert with_error("/a?b=1#c", "x") == "/a?b=1&bff_error=x#c"
