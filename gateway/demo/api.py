"""The demo API: the seed tutorial's login/refresh API, and the strict test upstream.

It behaves like a strict identity provider plus resource server:

* ``POST /auth/login`` issues an HS256 access JWT and a rotating refresh JWT;
* ``POST /refresh-token`` rotates: the presented refresh token is revoked, and
  presenting a revoked one again revokes its whole *family* (every refresh token
  descended from that login, and every access token of it);
* every resource wants exactly one valid ``Authorization: Bearer <access token>``.

Everything the gateway's tests need to observe is counted in :class:`DemoStats`,
stored at ``app[STATS_KEY]``; the token authority is at ``app[AUTHORITY_KEY]``.
Nothing here logs a token: the access log format has no headers and no query.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from multidict import CIMultiDict

__all__ = [
    "AUTHORITY_KEY",
    "STATS_KEY",
    "USERS",
    "DemoStats",
    "DemoUser",
    "InvalidToken",
    "TokenAuthority",
    "create_demo_api",
    "decode_jwt",
    "encode_jwt",
    "main",
]

log = logging.getLogger("gateway.demo")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHUNK_SIZE: Final = 64 * 1024
DEFAULT_DOWNLOAD_SIZE: Final = 50 * 1024 * 1024
MAX_DOWNLOAD_SIZE: Final = 16 * 1024 * 1024 * 1024
DEFAULT_EVENT_COUNT: Final = 30
MAX_EVENT_COUNT: Final = 100_000
REALM: Final = 'realm="demo"'


# --------------------------------------------------------------------------- stats


@dataclass
class DemoStats:
    """What the demo API has seen and issued; tests read it directly."""

    logins: int = 0
    login_failures: int = 0
    refresh_calls: int = 0
    refresh_rejected: int = 0
    issued_tokens: list[str] = field(default_factory=list)
    """Every access and refresh token ever issued, in issue order."""
    authorized_requests: int = 0
    unauthorized_requests: int = 0
    last_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    """Headers of the last request to a resource (case-insensitive, repeats kept:
    ``last_headers.getall("Authorization")``)."""
    last_method: str = ""
    last_raw_path: str = ""
    """Raw (still percent-encoded) path and query of the last resource request."""
    logouts: int = 0
    revoked_families: int = 0

    def __repr__(self) -> str:  # never print the tokens
        return (
            f"DemoStats(logins={self.logins}, refresh_calls={self.refresh_calls}, "
            f"refresh_rejected={self.refresh_rejected}, "
            f"issued_tokens=<{len(self.issued_tokens)}>, "
            f"authorized_requests={self.authorized_requests}, "
            f"unauthorized_requests={self.unauthorized_requests})"
        )


STATS_KEY: Final = web.AppKey("demo_stats", DemoStats)


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class DemoUser:
    id: int
    username: str
    password: str
    name: str
    email: str
    roles: tuple[str, ...]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username, "name": self.name, "email": self.email}


USERS: Final[dict[str, DemoUser]] = {
    "demo": DemoUser(1, "demo", "demo", "Demo User", "demo@example.com", ("user",)),
    "alice": DemoUser(2, "alice", "alice", "Alice Martin", "alice@example.com", ("user", "admin")),
}

ITEMS: Final[tuple[dict[str, Any], ...]] = (
    {"id": 1, "name": "Apollo", "status": "active", "description": "Customer portal rewrite"},
    {"id": 2, "name": "Borealis", "status": "planning", "description": "Edge caching rollout"},
    {"id": 3, "name": "Cassini", "status": "active", "description": "Billing API v2"},
    {"id": 4, "name": "Daedalus", "status": "done", "description": "SSO migration"},
    {"id": 5, "name": "Europa", "status": "on hold", "description": "Mobile offline mode"},
)


# --------------------------------------------------------------------------- JWT (HS256)


class InvalidToken(Exception):
    """A token that is malformed, badly signed, expired or revoked."""


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not text or any(c not in _B64URL_ALPHABET for c in text):
        raise InvalidToken("bad base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise InvalidToken("bad base64url") from exc


_B64URL_ALPHABET: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)
_JWT_HEADER: Final = _b64url_encode(b'{"alg":"HS256","typ":"JWT"}')


def encode_jwt(claims: dict[str, Any], secret: bytes) -> str:
    """Return a compact HS256 JWS of ``claims``."""
    payload = _b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{_JWT_HEADER}.{payload}".encode("ascii")
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{_JWT_HEADER}.{payload}.{_b64url_encode(signature)}"


def decode_jwt(token: str, secret: bytes, *, now: float | None = None) -> dict[str, Any]:
    """Verify an HS256 JWT (signature, ``alg``, ``exp``) and return its claims.

    Raises :class:`InvalidToken` for anything else: ``alg: none``, other algorithms,
    bad signatures, missing or past ``exp``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("not a compact JWS")
    header_b64, payload_b64, signature_b64 = parts
    try:
        header = json.loads(_b64url_decode(header_b64))
    except ValueError as exc:
        raise InvalidToken("bad header") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise InvalidToken("unsupported alg")
    expected = hmac.new(
        secret, f"{header_b64}.{payload_b64}".encode("ascii"), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(expected, _b64url_decode(signature_b64)):
        raise InvalidToken("bad signature")
    try:
        claims = json.loads(_b64url_decode(payload_b64))
    except ValueError as exc:
        raise InvalidToken("bad payload") from exc
    if not isinstance(claims, dict):
        raise InvalidToken("bad payload")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise InvalidToken("no exp")
    if (time.time() if now is None else now) >= exp:
        raise InvalidToken("expired")
    return claims


# --------------------------------------------------------------------------- authority


@dataclass
class _Family:
    user: DemoUser
    revoked: bool = False


@dataclass
class _RefreshRecord:
    family: str
    expires_at: float
    revoked: bool = False


class TokenAuthority:
    """Issues, rotates and verifies the demo's tokens; holds all revocation state."""

    def __init__(
        self,
        stats: DemoStats,
        *,
        access_ttl: float,
        refresh_ttl: float,
        token_padding: int = 0,
        secret: bytes | None = None,
    ) -> None:
        self.stats = stats
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.token_padding = token_padding
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._families: dict[str, _Family] = {}
        self._refresh: dict[str, _RefreshRecord] = {}  # by jti
        self._access_jtis: set[str] = set()
        self._expired_jtis: set[str] = set()

    def __repr__(self) -> str:
        return f"TokenAuthority(families={len(self._families)})"

    # -- issuing

    def login(self, user: DemoUser) -> tuple[str, str]:
        """Start a new family for ``user``; return ``(access, refresh)``."""
        family = secrets.token_urlsafe(12)
        self._families[family] = _Family(user)
        return self._issue_pair(user, family)

    def issue_access_token(
        self, user: DemoUser, *, ttl: float | None = None, family: str | None = None
    ) -> str:
        """Issue one access token (``ttl`` may be negative: an already expired token)."""
        if family is None:
            family = secrets.token_urlsafe(12)
            self._families[family] = _Family(user)
        now = time.time()
        jti = secrets.token_urlsafe(12)
        claims: dict[str, Any] = {
            "sub": str(user.id),
            "name": user.name,
            "email": user.email,
            "preferred_username": user.username,
            "roles": list(user.roles),
            "scope": "openid profile email items",
            "iat": int(now),
            "exp": math.ceil(now + (self.access_ttl if ttl is None else ttl)),
            "jti": jti,
            "fam": family,
            "token_use": "access",
        }
        if self.token_padding > 0:
            claims["pad"] = "x" * self.token_padding
        token = encode_jwt(claims, self._secret)
        self._access_jtis.add(jti)
        self.stats.issued_tokens.append(token)
        return token

    def _issue_refresh_token(self, user: DemoUser, family: str) -> str:
        now = time.time()
        jti = secrets.token_urlsafe(16)
        expires_at = now + self.refresh_ttl
        claims = {
            "sub": str(user.id),
            "iat": int(now),
            "exp": math.ceil(expires_at),
            "jti": jti,
            "fam": family,
            "token_use": "refresh",
        }
        token = encode_jwt(claims, self._secret)
        self._refresh[jti] = _RefreshRecord(family, expires_at)
        self.stats.issued_tokens.append(token)
        return token

    def _issue_pair(self, user: DemoUser, family: str) -> tuple[str, str]:
        return self.issue_access_token(user, family=family), self._issue_refresh_token(user, family)

    # -- rotation and revocation

    def refresh(self, refresh_token: str) -> tuple[str, str]:
        """Rotate ``refresh_token``; raise :class:`InvalidToken` (``invalid_grant``).

        Reuse of an already rotated refresh token revokes the whole family.
        """
        claims = self._verify(refresh_token, "refresh")
        record = self._refresh.get(str(claims.get("jti")))
        if record is None:
            raise InvalidToken("unknown refresh token")
        family = self._families.get(record.family)
        if family is None or family.revoked:
            raise InvalidToken("family revoked")
        if record.revoked:
            self.revoke_family(record.family)
            raise InvalidToken("refresh token reused: family revoked")
        if time.time() >= record.expires_at:
            record.revoked = True
            raise InvalidToken("refresh token expired")
        record.revoked = True
        return self._issue_pair(family.user, record.family)

    def revoke_family(self, family_id: str) -> None:
        family = self._families.get(family_id)
        if family is not None and not family.revoked:
            family.revoked = True
            self.stats.revoked_families += 1
        for record in self._refresh.values():
            if record.family == family_id:
                record.revoked = True

    def family_of(self, token: str) -> str | None:
        """The family id of a token this authority signed (expired or not), else None."""
        try:
            claims = decode_jwt(token, self._secret, now=-math.inf)
        except InvalidToken:
            return None
        fam = claims.get("fam")
        return fam if isinstance(fam, str) else None

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far fail as expired (refresh still works).

        Lets tests trigger the gateway's reactive refresh without sleeping.
        """
        self._expired_jtis |= self._access_jtis

    # -- verification

    def _verify(self, token: str, use: str) -> dict[str, Any]:
        claims = decode_jwt(token, self._secret)
        if claims.get("token_use") != use:
            raise InvalidToken("wrong token type")
        return claims

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """Claims of a valid access token; raise :class:`InvalidToken` otherwise."""
        claims = self._verify(token, "access")
        if claims.get("jti") in self._expired_jtis:
            raise InvalidToken("expired")
        family = self._families.get(str(claims.get("fam")))
        if family is None or family.revoked:
            raise InvalidToken("revoked")
        return claims

    def user_of(self, claims: dict[str, Any]) -> DemoUser:
        return USERS[str(claims["preferred_username"])]


AUTHORITY_KEY: Final = web.AppKey("demo_authority", TokenAuthority)
CLAIMS_KEY: Final = web.RequestKey("demo_claims", dict[str, Any])
OIDC_CLAIMS_KEY: Final = web.RequestKey("demo_oidc_claims", dict[str, Any])


# --------------------------------------------------------------------------- helpers


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        data, status=status, headers=headers, dumps=lambda o: json.dumps(o, separators=(",", ":"))
    )


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return _json({"error": code, "message": message}, status=status, headers=headers)


def _invalid_token(message: str, *, token_sent: bool = True) -> web.Response:
    """401 for a resource (RFC 6750 §3: no error code when no token was sent)."""
    challenge = f'Bearer {REALM}, error="invalid_token"' if token_sent else f"Bearer {REALM}"
    return _error(401, "invalid_token", message, {"WWW-Authenticate": challenge})


async def _read_fields(request: web.Request) -> dict[str, Any] | None:
    """A JSON object or form body as a dict; None when the body is malformed."""
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.post()
        except ValueError:
            return None
        return {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _int_query(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid_request", "message": f"bad {name}"}),
            content_type="application/json",
        ) from None
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid_request", "message": f"{name} out of range"}),
            content_type="application/json",
        )
    return value


def _float_query(request: web.Request, name: str, default: float, maximum: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid_request", "message": f"bad {name}"}),
            content_type="application/json",
        )
    return value


# --------------------------------------------------------------------------- the API


class _DemoAPI:
    def __init__(self, stats: DemoStats, authority: TokenAuthority, refresh_delay: float) -> None:
        self.stats = stats
        self.authority = authority
        self.refresh_delay = refresh_delay
        self.next_item_id = 1000

    # -- auth endpoints

    async def login(self, request: web.Request) -> web.Response:
        fields = await _read_fields(request)
        if fields is None:
            return _error(400, "invalid_request", "expected a JSON object or a form")
        username, password = fields.get("username"), fields.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            return _error(400, "invalid_request", "username and password are required")
        user = USERS.get(username)
        if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
            self.stats.login_failures += 1
            return _error(401, "invalid_credentials", "wrong username or password")
        access, refresh = self.authority.login(user)
        self.stats.logins += 1
        return _json({"token": access, "refresh_token": refresh, "user": user.public()})

    async def refresh(self, request: web.Request) -> web.Response:
        self.stats.refresh_calls += 1
        fields = await _read_fields(request)
        if self.refresh_delay > 0:
            await asyncio.sleep(self.refresh_delay)
        if fields is None or not isinstance(fields.get("refresh_token"), str):
            self.stats.refresh_rejected += 1
            return _error(400, "invalid_request", "refresh_token is required")
        try:
            access, refresh = self.authority.refresh(fields["refresh_token"])
        except InvalidToken:
            self.stats.refresh_rejected += 1
            return _error(401, "invalid_grant", "refresh token is invalid, expired or revoked")
        return _json({"token": access, "refresh_token": refresh})

    async def logout(self, request: web.Request) -> web.Response:
        """Revoke the family of the presented refresh token (body) or access token (Bearer)."""
        self.stats.logouts += 1
        fields = await _read_fields(request) or {}
        candidates = [fields.get("refresh_token"), fields.get("token")]
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        for token in candidates:
            family = self.authority.family_of(token) if isinstance(token, str) else None
            if family is not None:
                self.authority.revoke_family(family)
        return web.Response(status=204)

    # -- resource guard

    def resource(self, handler: Handler, *, public: bool = False) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            self.stats.last_headers = CIMultiDict(request.headers)
            self.stats.last_method = request.method
            self.stats.last_raw_path = request.raw_path
            if not public:
                failure = self._authenticate(request)
                if failure is not None:
                    self.stats.unauthorized_requests += 1
                    return failure
                self.stats.authorized_requests += 1
            return await handler(request)

        return guarded

    def _authenticate(self, request: web.Request) -> web.Response | None:
        values = request.headers.getall("Authorization", [])
        if not values:
            return _invalid_token("missing bearer token", token_sent=False)
        if len(values) > 1:
            return _invalid_token("more than one Authorization header")
        scheme, _, token = values[0].partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _invalid_token("expected a bearer token")
        try:
            request[CLAIMS_KEY] = self.authority.verify_access_token(token)
        except InvalidToken:
            return _invalid_token("the access token is invalid or expired")
        return None

    def userinfo_resource(self, handler: Handler, userinfo_url: str) -> Handler:
        """``handler`` behind the OpenID Connect provider's userinfo endpoint: a token
        that endpoint accepts is valid (so expiry and revocation are the provider's)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                self.stats.unauthorized_requests += 1
                return _invalid_token("missing bearer token", token_sent=False)
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(userinfo_url, headers={"Authorization": f"Bearer {token}"}) as answer,
                ):
                    claims = await answer.json() if answer.status == 200 else None
            except (aiohttp.ClientError, ValueError):
                return _error(503, "unavailable", "the identity provider did not answer")
            if not isinstance(claims, dict):
                self.stats.unauthorized_requests += 1
                return _invalid_token("the access token is invalid or expired")
            self.stats.authorized_requests += 1
            request[OIDC_CLAIMS_KEY] = claims
            return await handler(request)

        return guarded

    async def oidc_user(self, request: web.Request) -> web.Response:
        claims = request[OIDC_CLAIMS_KEY]
        sub = str(claims.get("sub", ""))
        return _json(
            {
                "id": sub,
                "username": sub,
                "name": claims.get("name") or sub,
                "email": claims.get("email"),
                "roles": ["oidc"],
            }
        )

    # -- resources

    async def user(self, request: web.Request) -> web.Response:
        user = self.authority.user_of(request[CLAIMS_KEY])
        return _json({**user.public(), "roles": list(user.roles)})

    async def items(self, request: web.Request) -> web.Response:
        return _json(list(ITEMS))

    async def item(self, request: web.Request) -> web.Response:
        for item in ITEMS:
            if str(item["id"]) == request.match_info["id"]:
                return _json(item)
        return _error(404, "not_found", "no such item")

    async def create_item(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "invalid_request", "expected a JSON object")
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "expected a JSON object")
        self.next_item_id += 1
        return _json({**body, "id": self.next_item_id}, status=201)

    async def echo(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            digest.update(chunk)
            length += len(chunk)
        return _json({"sha256": digest.hexdigest(), "length": length})

    async def headers(self, request: web.Request) -> web.Response:
        """The request headers, with bearer tokens replaced by their SHA-256.

        Tokens are fingerprinted rather than echoed so that this endpoint, reached
        through the gateway, never hands a token to the browser.
        """
        raw: list[list[str]] = []
        merged: dict[str, str] = {}
        fingerprints: list[str] = []
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                scheme, _, token = value.partition(" ")
                fingerprints.append(hashlib.sha256(token.strip().encode()).hexdigest())
                value = f"{scheme} [redacted]"
            raw.append([name, value])
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return _json(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": merged,
                "raw_headers": raw,
                "authorization_sha256": fingerprints,
            }
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        count = _int_query(request, "count", DEFAULT_EVENT_COUNT, MAX_EVENT_COUNT)
        interval = _float_query(request, "interval", 1.0, 60.0)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await response.write(b"retry: 3000\n\n")
            for n in range(1, count + 1):
                if n > 1:
                    await asyncio.sleep(interval)
                data = json.dumps({"n": n, "count": count, "time": time.time()})
                await response.write(f"id: {n}\ndata: {data}\n\n".encode())
            await response.write_eof()
        return response

    async def download(self, request: web.Request) -> web.StreamResponse:
        size = _int_query(request, "size", DEFAULT_DOWNLOAD_SIZE, MAX_DOWNLOAD_SIZE)
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": 'attachment; filename="demo.bin"',
            }
        )
        response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        remaining = size
        with contextlib.suppress(ConnectionResetError):
            while remaining > 0:
                n = min(CHUNK_SIZE, remaining)
                await response.write(_CHUNK if n == CHUNK_SIZE else _CHUNK[:n])
                remaining -= n
            await response.write_eof()
        return response

    async def status(self, request: web.Request) -> web.Response:
        """Answer with the status in the path (200-599; 204 and 304 without a body)."""
        code = int(request.match_info["code"])
        if not 200 <= code <= 599:
            return _error(400, "invalid_request", "status must be 200-599")
        if code in (204, 304):
            return web.Response(status=code)
        return _json({"status": code}, status=code)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """Echo text and binary frames; ``close`` as text closes with code 4000.

        With ``?tick=S`` (0.2 to 60 seconds) the socket also sends a JSON tick every
        S seconds saying who the handshake's token belonged to and until when it
        was valid: proof that a valid token arrived, without revealing it.
        """
        # The demo's own token's claims, or the OpenID Connect provider's userinfo.
        claims = request[CLAIMS_KEY] if CLAIMS_KEY in request else request[OIDC_CLAIMS_KEY]
        tick = _float_query(request, "tick", 0.0, 60.0)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        ticker = None
        if tick > 0:
            ticker = asyncio.create_task(self._ticks(ws, claims, min(max(tick, 0.2), 60.0)))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    if msg.data == "close":
                        await ws.close(code=4000, message=b"bye")
                        break
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        return ws

    async def _ticks(self, ws: web.WebSocketResponse, claims: dict[str, Any], every: float) -> None:
        count = 0
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                await asyncio.sleep(every)
                count += 1
                await ws.send_json(
                    {
                        "tick": count,
                        "token_valid": True,
                        "sub": claims.get("sub"),
                        "user": claims.get("preferred_username") or claims.get("sub"),
                        "token_expires_at": claims.get("exp"),
                        "server_time": time.time(),
                    }
                )


_CHUNK: Final = bytes(range(256)) * (CHUNK_SIZE // 256)


def create_demo_api(
    access_ttl: float = 30.0,
    refresh_ttl: float = 86400.0,
    stats: DemoStats | None = None,
    refresh_delay: float = 0.0,
    *,
    token_padding: int = 0,
    oidc_userinfo: str | None = None,
) -> web.Application:
    """Build the demo API.

    ``access_ttl`` may be tiny or negative (tokens born expired); ``refresh_delay``
    makes ``/refresh-token`` sleep before answering; ``token_padding`` adds that many
    bytes to every access token (for cookie-chunking tests). With ``oidc_userinfo``
    (an OpenID Connect provider's userinfo URL), ``/oidc/user``, ``/oidc/items``,
    ``/oidc/events`` and ``/oidc/download`` accept that provider's access tokens.
    """
    stats = stats if stats is not None else DemoStats()
    authority = TokenAuthority(
        stats, access_ttl=access_ttl, refresh_ttl=refresh_ttl, token_padding=token_padding
    )
    api = _DemoAPI(stats, authority, refresh_delay)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS_KEY] = stats
    app[AUTHORITY_KEY] = authority

    app.router.add_post("/auth/login", api.login)
    app.router.add_post("/auth/logout", api.logout)
    app.router.add_post("/refresh-token", api.refresh)

    protected = api.resource
    app.router.add_get("/user", protected(api.user))
    app.router.add_get("/items", protected(api.items))
    app.router.add_post("/items", protected(api.create_item))
    app.router.add_get("/items/{id}", protected(api.item))
    app.router.add_get("/headers", protected(api.headers))
    app.router.add_get("/events", protected(api.events), allow_head=False)
    app.router.add_get("/download", protected(api.download))
    app.router.add_get("/status/{code:[0-9]{3}}", protected(api.status))
    app.router.add_route("*", "/echo", protected(api.echo))
    app.router.add_get("/ws", protected(api.websocket), allow_head=False)

    # The same tools without auth, for routes with `auth: none`.
    for path, handler in (
        ("/public/headers", api.headers),
        ("/public/events", api.events),
        ("/public/download", api.download),
        ("/public/ws", api.websocket),
    ):
        allow_head = path in ("/public/headers", "/public/download")
        app.router.add_get(path, api.resource(handler, public=True), allow_head=allow_head)
    app.router.add_route("*", "/public/echo", api.resource(api.echo, public=True))

    if oidc_userinfo is not None:
        for path, handler in (
            ("/oidc/user", api.oidc_user),
            ("/oidc/items", api.items),
            ("/oidc/events", api.events),
            ("/oidc/download", api.download),
            ("/oidc/ws", api.websocket),
        ):
            guarded = api.userinfo_resource(handler, oidc_userinfo)
            app.router.add_get(path, guarded, allow_head=False)

    async def counters(_: web.Request) -> web.Response:
        # Numbers only, for `make load`'s refresh-storm check; never tokens.
        return _json(
            {
                "logins": stats.logins,
                "refresh_calls": stats.refresh_calls,
                "refresh_rejected": stats.refresh_rejected,
                "revoked_families": stats.revoked_families,
                "logouts": stats.logouts,
            }
        )

    app.router.add_get("/stats", counters)
    return app


# --------------------------------------------------------------------------- CLI


class AccessLogger(AbstractAccessLogger):
    """One line per request: client, method, path without query, status, size, time.

    No headers, no query string, no body: nothing that could carry a token.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m gateway.demo.api --host 127.0.0.1 --port 8081 [--access-ttl 30]``."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--access-ttl", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--refresh-ttl", type=float, default=86400.0, help="seconds")
    parser.add_argument("--refresh-delay", type=float, default=0.0, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_demo_api(
        access_ttl=args.access_ttl, refresh_ttl=args.refresh_ttl, refresh_delay=args.refresh_delay
    )
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log_class=AccessLogger,
        print=lambda _: log.info("demo API on http://%s:%s", args.host, args.port),
    )


if __name__ == "__main__":
    main()
