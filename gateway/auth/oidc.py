"""OpenID Connect: discovery, the provider's signing keys, ID token verification.

ID tokens are verified with PyJWT, restricted to asymmetric algorithms
(RS256, ES256, PS256 and their longer variants): ``alg: none`` is refused,
and so is HMAC, which would let anyone holding the *public* key sign.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from gateway.config import OAuth2Provider

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
DISCOVERY_TTL = 3600.0
# Signing keys are fetched again after this long even when every kid is known: a key
# the provider withdrew (compromised, retired) must stop verifying tokens.
KEYS_TTL = 3600.0
LEEWAY = 60.0  # clock skew allowed on exp and iat
_DOCUMENT_LIMIT = 512 * 1024


class ProviderUnavailable(Exception):
    """The provider's metadata or keys could not be fetched now."""


class InvalidIdToken(Exception):
    """The ID token does not prove who logged in (the reason is for the log only)."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    authorize_url: str
    token_url: str
    jwks_url: str | None
    revocation_url: str | None
    end_session_url: str | None


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is longer.

    ``content.read(n)`` is no such thing: it returns whatever has arrived so far
    (one TCP segment, one TLS record, one chunk), so a document sent in parts
    would be cut short.
    """
    body = bytearray()
    while len(body) <= limit and (chunk := await response.content.readany()):
        body += chunk
    return bytes(body[: limit + 1])


async def fetch_json(
    client: aiohttp.ClientSession, url: str, timeout: aiohttp.ClientTimeout
) -> Any:
    try:
        async with client.get(
            url, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False
        ) as response:
            if response.status != 200:
                raise ProviderUnavailable(f"{url} answered {response.status}")
            raw = await read_bounded(response, _DOCUMENT_LIMIT)
    except (TimeoutError, aiohttp.ClientError):
        raise ProviderUnavailable(f"{url} could not be reached") from None
    if len(raw) > _DOCUMENT_LIMIT:
        raise ProviderUnavailable(f"{url} answered a document over {_DOCUMENT_LIMIT} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ProviderUnavailable(f"{url} did not answer JSON") from None


_SCHEMES = ("https://", "http://")


class Discovery:
    """The provider's endpoints: explicit config first, then OIDC discovery.

    The discovery document is cached for an hour; a failed fetch is not cached
    (the next login tries again), and ``forget`` drops it when what it named
    failed, so a provider that moved its endpoints is found again.
    """

    def __init__(
        self, config: OAuth2Provider, client: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout
    ) -> None:
        self._config = config
        self._client = client
        self._timeout = timeout
        self._document: Mapping[str, Any] | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def endpoints(self) -> Endpoints:
        config = self._config
        document: Mapping[str, Any] = {}
        required = [config.authorize_url, config.token_url]
        if config.oidc:
            required.append(config.jwks_url)
        optional = (config.revocation_url, config.end_session_url)
        if config.issuer is not None and None in (*required, *optional):
            try:
                document = await self._discover()
            except ProviderUnavailable:
                if None in required:
                    raise
                # Everything needed is configured: go on without the optional
                # endpoints (revocation, end session) this time.

        # A document fetched over TLS may not send the code, the client's secret or
        # the tokens anywhere in the clear: its endpoints must be https too. (An http
        # issuer is the operator's own choice, on a trusted network or loopback.)
        schemes = ("https://",) if (config.issuer or "").startswith("https://") else _SCHEMES

        def pick(explicit: str | None, key: str) -> str | None:
            if explicit is not None:
                return explicit
            found = document.get(key)
            return found if isinstance(found, str) and found.startswith(schemes) else None

        authorize = pick(config.authorize_url, "authorization_endpoint")
        token = pick(config.token_url, "token_endpoint")
        if authorize is None or token is None:
            raise ProviderUnavailable(
                "the discovery document names no authorization or token endpoint"
            )
        return Endpoints(
            authorize_url=authorize,
            token_url=token,
            jwks_url=pick(config.jwks_url, "jwks_uri"),
            revocation_url=pick(config.revocation_url, "revocation_endpoint"),
            end_session_url=pick(config.end_session_url, "end_session_endpoint"),
        )

    def forget(self) -> None:
        self._document = None

    async def _discover(self) -> Mapping[str, Any]:
        async with self._lock:
            now = time.monotonic()
            if self._document is not None and now - self._fetched_at < DISCOVERY_TTL:
                return self._document
            issuer = self._config.issuer
            assert issuer is not None
            url = issuer.rstrip("/") + "/.well-known/openid-configuration"
            document = await fetch_json(self._client, url, self._timeout)
            if not isinstance(document, dict):
                raise ProviderUnavailable("the discovery document is not a JSON object")
            # OIDC Discovery §4.3: the issuer in the document must be the one configured.
            if document.get("issuer") not in (issuer, issuer.rstrip("/")):
                raise ProviderUnavailable("the discovery document names another issuer")
            self._document, self._fetched_at = document, now
            return document


class KeySet:
    """The provider's signing keys (JWKS), cached; fetched again, once, for an unknown kid."""

    def __init__(self, client: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        self._client = client
        self._timeout = timeout
        self._keys: list[dict[str, Any]] | None = None
        self._url: str | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def key_for(self, url: str, kid: str | None, alg: str) -> jwt.PyJWK:
        keys = await self._load(url, refetch=False)
        found = _select(keys, kid, alg)
        if found is None:  # rotated keys: the provider may publish the new one now
            keys = await self._load(url, refetch=True, stale=keys)
            found = _select(keys, kid, alg)
        if found is None:
            raise InvalidIdToken("no key of the provider matches the token's kid")
        try:
            return jwt.PyJWK(found, algorithm=alg)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            raise InvalidIdToken("the provider's key does not fit the token's algorithm") from None

    async def _load(
        self, url: str, refetch: bool, stale: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        async with self._lock:
            if (
                self._keys is not None
                and self._url == url
                and (not refetch or self._keys is not stale)
                and time.monotonic() - self._fetched_at < KEYS_TTL
            ):
                return self._keys  # cached, or fetched meanwhile by a concurrent caller
            document = await fetch_json(self._client, url, self._timeout)
            keys = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(keys, list):
                raise ProviderUnavailable("the JWKS document has no keys")
            self._keys = [key for key in keys if isinstance(key, dict)]
            self._url = url
            self._fetched_at = time.monotonic()
            return self._keys


def _select(keys: list[dict[str, Any]], kid: str | None, alg: str) -> dict[str, Any] | None:
    kty = "EC" if alg.startswith("ES") else "RSA"
    candidates = [
        key
        for key in keys
        if key.get("kty") == kty and key.get("use", "sig") == "sig" and key.get("alg", alg) == alg
    ]
    if kid is not None:
        candidates = [key for key in candidates if key.get("kid") == kid]
    elif len(candidates) != 1:
        return None  # without a kid, only an unambiguous key will do
    return candidates[0] if candidates else None


async def verify_id_token(
    token: str,
    *,
    keys: KeySet,
    jwks_url: str,
    issuer: str,
    client_id: str,
    nonce: str | None,
) -> dict[str, Any]:
    """The verified claims of ``token``, or InvalidIdToken (OIDC Core §3.1.3.7).

    ``nonce`` None: a refreshed ID token, which carries none to compare.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidIdToken("the ID token is not a JWS") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise InvalidIdToken("the ID token's algorithm is not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise InvalidIdToken("the ID token's kid is not a string")
    key = await keys.key_for(jwks_url, kid, alg)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key.key,
            algorithms=[alg],
            audience=client_id,
            issuer=issuer,
            leeway=LEEWAY,
            options={"require": ["iss", "sub", "aud", "exp", "iat"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidIdToken(f"the ID token failed verification: {type(exc).__name__}") from None
    iat = claims.get("iat")
    if not isinstance(iat, int | float) or iat > time.time() + LEEWAY:
        raise InvalidIdToken("the ID token was issued in the future")
    audience = claims.get("aud")
    azp = claims.get("azp")
    if isinstance(audience, list) and len(audience) > 1 and azp is None:
        raise InvalidIdToken("the ID token has several audiences and no azp")
    if azp is not None and azp != client_id:
        raise InvalidIdToken("the ID token was issued to another party (azp)")
    if nonce is not None and claims.get("nonce") != nonce:
        raise InvalidIdToken("the ID token's nonce is not this login's")
    return claims


def same_end_user(original: str | None, refreshed: str | None) -> bool:
    """Whether a refreshed ID token names the end user of the login (OIDC Core §12.2).

    ``refreshed`` passed verify_id_token (signature, iss, aud); ``original`` did at
    login and has been kept server-side or sealed since, so neither signature is
    checked again here. Without both tokens there is nothing to compare.
    """
    if original is None or refreshed is None or original == refreshed:
        return True
    try:
        before = jwt.decode(original, options={"verify_signature": False})
        after = jwt.decode(refreshed, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    return before.get("iss") == after.get("iss") and before.get("sub") == after.get("sub")
