"""The demo API: the seed's login/refresh API and the strict upstream of the refresh tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from yarl import URL

from gateway.demo import api as demo_api
from gateway.demo.api import (
    AUTHORITY_KEY,
    STATS_KEY,
    USERS,
    DemoStats,
    InvalidToken,
    create_demo_api,
    decode_jwt,
    encode_jwt,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make(aiohttp_client: MakeClient, **kwargs: Any) -> tuple[Client, DemoStats]:
    app = create_demo_api(**kwargs)
    return await aiohttp_client(app), app[STATS_KEY]


async def login(client: Client, username: str = "demo") -> dict[str, Any]:
    resp = await client.post("/auth/login", json={"username": username, "password": username})
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def refresh(client: Client, refresh_token: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/refresh-token", json={"refresh_token": refresh_token})
    return resp.status, await resp.json()


# --------------------------------------------------------------------------- login


async def test_login_success_returns_tokens_and_user(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    body = await login(client)
    assert set(body) == {"token", "refresh_token", "user"}
    assert body["user"] == {
        "id": 1,
        "username": "demo",
        "name": "Demo User",
        "email": "demo@example.com",
    }
    assert stats.logins == 1
    assert stats.issued_tokens == [body["token"], body["refresh_token"]]


async def test_login_access_token_is_hs256_jwt_with_claims(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client, access_ttl=30)
    body = await login(client, "alice")
    head_b64 = body["token"].split(".")[0]
    assert json.loads(base64.urlsafe_b64decode(head_b64 + "=" * (-len(head_b64) % 4))) == {
        "alg": "HS256",
        "typ": "JWT",
    }
    claims = claims_of(body["token"])
    assert claims["sub"] == "2"
    assert claims["name"] == "Alice Martin"
    assert claims["email"] == "alice@example.com"
    assert claims["preferred_username"] == "alice"
    assert claims["roles"] == ["user", "admin"]
    assert isinstance(claims["jti"], str) and isinstance(claims["fam"], str)
    assert 29 <= claims["exp"] - time.time() <= 31
    assert claims["iat"] <= time.time()
    assert claims_of(body["refresh_token"])["fam"] == claims["fam"]


async def test_login_form_body(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    resp = await client.post("/auth/login", data={"username": "demo", "password": "demo"})
    assert resp.status == 200
    assert (await resp.json())["user"]["username"] == "demo"


async def test_tokens_are_unique_per_login(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    first, second = await login(client), await login(client)
    assert first["token"] != second["token"]
    assert first["refresh_token"] != second["refresh_token"]
    assert len(set(stats.issued_tokens)) == 4


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "demo", "password": "wrong"},
        {"username": "nobody", "password": "demo"},
        {"username": "alice", "password": "demo"},
    ],
)
async def test_login_wrong_credentials(
    aiohttp_client: MakeClient, credentials: dict[str, str]
) -> None:
    client, stats = await make(aiohttp_client)
    resp = await client.post("/auth/login", json=credentials)
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_credentials"
    assert "WWW-Authenticate" not in resp.headers
    assert stats.logins == 0 and stats.issued_tokens == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'"demo"',
        b'{"username": "demo"}',
        b'{"username": 1, "password": 2}',
    ],
)
async def test_login_malformed_body(aiohttp_client: MakeClient, body: bytes) -> None:
    client, stats = await make(aiohttp_client)
    resp = await client.post("/auth/login", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"
    assert stats.issued_tokens == []


# --------------------------------------------------------------------------- bearer auth


async def test_resources_with_valid_token(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    token = (await login(client))["token"]

    resp = await client.get("/user", headers=bearer(token))
    assert resp.status == 200
    assert (await resp.json())["name"] == "Demo User"

    resp = await client.get("/items", headers=bearer(token))
    items = await resp.json()
    assert resp.status == 200 and len(items) >= 3
    assert {"id", "name", "status"} <= set(items[0])

    resp = await client.get(f"/items/{items[0]['id']}", headers=bearer(token))
    assert resp.status == 200 and await resp.json() == items[0]

    resp = await client.get("/items/999", headers=bearer(token))
    assert resp.status == 404
    assert stats.authorized_requests == 4 and stats.unauthorized_requests == 0
    assert stats.last_headers["authorization"] == f"Bearer {token}"
    assert stats.last_method == "GET" and stats.last_raw_path == "/items/999"


@pytest.mark.parametrize(
    "path", ["/user", "/items", "/items/1", "/events", "/download", "/headers"]
)
async def test_resources_without_token_are_401(aiohttp_client: MakeClient, path: str) -> None:
    client, stats = await make(aiohttp_client)
    resp = await client.get(path)
    assert resp.status == 401
    assert await resp.json() == {"error": "invalid_token", "message": "missing bearer token"}
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="demo"'
    assert stats.unauthorized_requests == 1 and stats.authorized_requests == 0


async def test_bad_tokens_are_401(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    body = await login(client)
    token = body["token"]
    head, payload, sig = token.split(".")
    forged_claims = {**claims_of(token), "sub": "2", "preferred_username": "alice"}
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=")
    alg_none = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    other_key = encode_jwt(claims_of(token), b"k" * 32)
    bad_headers = [
        {"Authorization": f"Bearer {head}.{forged_payload.decode()}.{sig}"},
        {"Authorization": f"Bearer {alg_none}.{payload}."},
        {"Authorization": f"Bearer {other_key}"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not-a-jwt"},
        bearer(body["refresh_token"]),  # a refresh token is not an access token
    ]
    for headers in bad_headers:
        resp = await client.get("/user", headers=headers)
        assert resp.status == 401, headers
        assert (await resp.json())["error"] == "invalid_token"
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert stats.unauthorized_requests == len(bad_headers)
    # the scheme is case-insensitive
    resp = await client.get("/user", headers={"Authorization": f"bearer {token}"})
    assert resp.status == 200


async def test_two_authorization_headers_are_rejected(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    token = (await login(client))["token"]
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    resp = await client.get("/user", headers=headers)
    assert resp.status == 401
    assert stats.last_headers.getall("Authorization") == [f"Bearer {token}"] * 2


# --------------------------------------------------------------------------- refresh


async def test_refresh_rotation_and_reuse_revokes_family(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    first = await login(client)

    status, second = await refresh(client, first["refresh_token"])
    assert status == 200 and set(second) == {"token", "refresh_token"}
    assert second["token"] != first["token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert claims_of(second["token"])["fam"] == claims_of(first["token"])["fam"]
    assert (await client.get("/user", headers=bearer(second["token"]))).status == 200

    status, third = await refresh(client, second["refresh_token"])
    assert status == 200
    assert (await client.get("/user", headers=bearer(third["token"]))).status == 200

    # reuse of the first (rotated) refresh token: rejected, and the family is revoked
    status, body = await refresh(client, first["refresh_token"])
    assert status == 401 and body["error"] == "invalid_grant"
    status, body = await refresh(client, third["refresh_token"])
    assert status == 401 and body["error"] == "invalid_grant"
    for access in (first["token"], second["token"], third["token"]):
        assert (await client.get("/user", headers=bearer(access))).status == 401

    assert stats.refresh_calls == 4 and stats.refresh_rejected == 2
    assert stats.revoked_families == 1
    for tokens in (first, second, third):
        assert tokens["token"] in stats.issued_tokens
        assert tokens["refresh_token"] in stats.issued_tokens
    assert len(stats.issued_tokens) == 6


async def test_family_revocation_spares_other_sessions(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    demo, alice = await login(client), await login(client, "alice")
    await refresh(client, demo["refresh_token"])
    status, _ = await refresh(client, demo["refresh_token"])
    assert status == 401
    assert (await client.get("/user", headers=bearer(alice["token"]))).status == 200
    status, _ = await refresh(client, alice["refresh_token"])
    assert status == 200


async def test_concurrent_refresh_with_one_token_kills_the_family(
    aiohttp_client: MakeClient,
) -> None:
    """What a gateway without single flight would cause: the strict IdP revokes all."""
    client, stats = await make(aiohttp_client, refresh_delay=0.05)
    tokens = await login(client)
    results = await asyncio.gather(*(refresh(client, tokens["refresh_token"]) for _ in range(2)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 401]
    winner = next(body for status, body in results if status == 200)
    assert (await client.get("/user", headers=bearer(winner["token"]))).status == 401
    assert stats.refresh_calls == 2


@pytest.mark.parametrize(
    "body",
    [
        {"refresh_token": "garbage"},
        {"refresh_token": encode_jwt({"exp": time.time() + 60, "token_use": "refresh"}, b"x")},
    ],
)
async def test_refresh_unknown_token(aiohttp_client: MakeClient, body: dict[str, str]) -> None:
    client, stats = await make(aiohttp_client)
    resp = await client.post("/refresh-token", json=body)
    assert resp.status == 401 and (await resp.json())["error"] == "invalid_grant"
    assert stats.refresh_calls == 1 and stats.refresh_rejected == 1


async def test_refresh_with_access_token_is_invalid_grant(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    tokens = await login(client)
    status, body = await refresh(client, tokens["token"])
    assert status == 401 and body["error"] == "invalid_grant"


async def test_refresh_malformed_body(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    resp = await client.post("/refresh-token", data=b"nope")
    assert resp.status == 400
    assert stats.refresh_calls == 1


async def test_expired_refresh_token(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client, refresh_ttl=-1)
    tokens = await login(client)
    status, body = await refresh(client, tokens["refresh_token"])
    assert status == 401 and body["error"] == "invalid_grant"


async def test_refresh_delay(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client, refresh_delay=0.3)
    tokens = await login(client)
    started = time.monotonic()
    status, _ = await refresh(client, tokens["refresh_token"])
    assert status == 200 and time.monotonic() - started >= 0.3


# --------------------------------------------------------------------------- expiry


async def test_access_token_born_expired(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client, access_ttl=-5)
    tokens = await login(client)
    assert claims_of(tokens["token"])["exp"] < time.time()
    resp = await client.get("/user", headers=bearer(tokens["token"]))
    assert resp.status == 401 and (await resp.json())["error"] == "invalid_token"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # the refresh token still works, and gives a (likewise expired) new pair
    status, _ = await refresh(client, tokens["refresh_token"])
    assert status == 200
    assert stats.unauthorized_requests == 1


async def test_expired_token_from_authority(aiohttp_client: MakeClient) -> None:
    app = create_demo_api()
    client = await aiohttp_client(app)
    authority = app[AUTHORITY_KEY]
    past = authority.issue_access_token(USERS["demo"], ttl=-1)
    fresh = authority.issue_access_token(USERS["demo"], ttl=60)
    assert (await client.get("/user", headers=bearer(past))).status == 401
    assert (await client.get("/user", headers=bearer(fresh))).status == 200
    assert past in app[STATS_KEY].issued_tokens


async def test_expire_access_tokens_forces_refresh(aiohttp_client: MakeClient) -> None:
    app = create_demo_api()
    client = await aiohttp_client(app)
    tokens = await login(client)
    app[AUTHORITY_KEY].expire_access_tokens()
    assert (await client.get("/user", headers=bearer(tokens["token"]))).status == 401
    status, new = await refresh(client, tokens["refresh_token"])
    assert status == 200
    assert (await client.get("/user", headers=bearer(new["token"]))).status == 200


async def test_short_ttl_expires_in_real_time(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client, access_ttl=0.01)
    tokens = await login(client)
    exp = claims_of(tokens["token"])["exp"]
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.01)
    assert (await client.get("/user", headers=bearer(tokens["token"]))).status == 401


def test_jwt_encode_decode() -> None:
    secret = os.urandom(32)
    token = encode_jwt({"sub": "x", "exp": time.time() + 10}, secret)
    assert decode_jwt(token, secret)["sub"] == "x"
    with pytest.raises(InvalidToken):
        decode_jwt(token, os.urandom(32))
    with pytest.raises(InvalidToken):
        decode_jwt(encode_jwt({"sub": "x", "exp": time.time() - 1}, secret), secret)
    with pytest.raises(InvalidToken):
        decode_jwt(encode_jwt({"sub": "x"}, secret), secret)
    with pytest.raises(InvalidToken):
        decode_jwt(token + "x", secret)
    with pytest.raises(InvalidToken):
        decode_jwt("a.b", secret)


# --------------------------------------------------------------------------- tools


async def test_create_item_echoes_body(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    payload = {"name": "Zephyr", "tags": ["a", "b"], "nested": {"n": 1}}
    resp = await client.post("/items", json=payload, headers=bearer(token))
    assert resp.status == 201
    body = await resp.json()
    assert isinstance(body.pop("id"), int)
    assert body == payload
    resp = await client.post("/items", data=b"[1]", headers=bearer(token))
    assert resp.status == 400


async def test_echo_sha256(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    token = (await login(client))["token"]
    body = os.urandom(3 * 1024 * 1024 + 17)
    resp = await client.post("/echo", data=body, headers=bearer(token))
    assert resp.status == 200
    assert await resp.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
    assert stats.last_headers["Content-Length"] == str(len(body))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(10):
            yield bytes([i]) * 1000

    resp = await client.post("/echo", data=chunks(), headers=bearer(token))
    expected = b"".join(bytes([i]) * 1000 for i in range(10))
    assert await resp.json() == {
        "sha256": hashlib.sha256(expected).hexdigest(),
        "length": len(expected),
    }
    assert stats.last_headers["Transfer-Encoding"] == "chunked"


async def test_download_size_exact(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    for size in (0, 1, 65536, 200_003):
        resp = await client.get(f"/download?size={size}", headers=bearer(token))
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        assert len(await resp.read()) == size
    resp = await client.head("/download", headers=bearer(token))
    assert resp.headers["Content-Length"] == str(50 * 1024 * 1024)
    resp = await client.get("/download?size=-1", headers=bearer(token))
    assert resp.status == 400


async def test_download_default_is_50_mib(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    resp = await client.get("/download", headers=bearer(token))
    total = 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
    assert total == 50 * 1024 * 1024


def parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        data = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


async def test_sse_count(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    started = time.monotonic()
    resp = await client.get("/events?count=2", headers=bearer(token))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(await resp.text())
    assert [e["n"] for e in events] == [1, 2]
    assert all(isinstance(e["time"], float) for e in events)
    assert time.monotonic() - started >= 0.9  # one event per second


async def test_sse_fast_interval(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    resp = await client.get("/events?count=5&interval=0", headers=bearer(token))
    assert [e["n"] for e in parse_sse(await resp.text())] == [1, 2, 3, 4, 5]
    resp = await client.get("/events?count=x", headers=bearer(token))
    assert resp.status == 400


async def test_headers_endpoint_fingerprints_the_token(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    url = URL("/headers?a=%2F&b=%20", encoded=True)
    resp = await client.get(url, headers={**bearer(token), "X-Test": "1"})
    text = await resp.text()
    assert token not in text
    body = json.loads(text)
    assert body["headers"]["x-test"] == "1"
    assert body["headers"]["authorization"] == "Bearer [redacted]"
    assert body["authorization_sha256"] == [hashlib.sha256(token.encode()).hexdigest()]
    assert body["path"] == "/headers?a=%2F&b=%20"
    assert ["X-Test", "1"] in body["raw_headers"]


async def test_public_tools_need_no_token(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    resp = await client.get("/public/headers", headers={"Cookie": "a=b"})
    assert resp.status == 200 and (await resp.json())["headers"]["cookie"] == "a=b"
    resp = await client.post("/public/echo", data=b"abc")
    assert (await resp.json())["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert stats.authorized_requests == stats.unauthorized_requests == 0
    assert stats.last_raw_path == "/public/echo"


async def test_status_endpoint(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    resp = await client.get("/status/503", headers=bearer(token))
    assert resp.status == 503 and await resp.json() == {"status": 503}
    resp = await client.get("/status/204", headers=bearer(token))
    assert resp.status == 204


async def test_logout_revokes_family(aiohttp_client: MakeClient) -> None:
    client, stats = await make(aiohttp_client)
    tokens = await login(client)
    resp = await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert resp.status == 204
    assert (await client.get("/user", headers=bearer(tokens["token"]))).status == 401
    status, _ = await refresh(client, tokens["refresh_token"])
    assert status == 401
    assert stats.logouts == 1


async def test_websocket_echo(aiohttp_client: MakeClient) -> None:
    client, _ = await make(aiohttp_client)
    token = (await login(client))["token"]
    async with client.ws_connect("/ws", headers=bearer(token)) as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive()).data == b"\x00\x01"
        await ws.send_str("close")
        msg = await ws.receive()
        assert msg.type == WSMsgType.CLOSE and msg.data == 4000


def test_stats_repr_hides_tokens() -> None:
    stats = DemoStats(issued_tokens=["secret.token.value"])
    assert "secret" not in repr(stats)


def test_main_parses_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run_app(app: web.Application, **kwargs: Any) -> None:
        seen.update(kwargs, app=app)

    monkeypatch.setattr(web, "run_app", fake_run_app)
    demo_api.main(["--host", "127.0.0.1", "--port", "18081", "--access-ttl", "5"])
    assert seen["host"] == "127.0.0.1" and seen["port"] == 18081
    assert seen["app"][AUTHORITY_KEY].access_ttl == 5.0
