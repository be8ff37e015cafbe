"""The ``oauth2`` provider: authorization code with PKCE, OpenID Connect when the
scopes ask for ``openid`` (SPEC §3; README "OAuth 2.0 and OpenID Connect").

``start_login`` sends the browser to the authorization server with ``state``,
a PKCE S256 challenge and (OIDC) a ``nonce``, the flow kept in a sealed
cookie; ``finish_login`` checks the flow, exchanges the code on the back
channel, verifies the ID token and hands the tokens to the caller, which starts
the session as for any provider. Every failure of the callback is a redirect
to the local ``return_to`` with ``bff_error=<code>``: never a 500, and never a
token or code in a URL the gateway writes.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from gateway.auth.flow import Flow, FlowCookies, FlowLedger, pkce_challenge
from gateway.auth.oidc import (
    Discovery,
    Endpoints,
    InvalidIdToken,
    KeySet,
    ProviderUnavailable,
    read_bounded,
    verify_id_token,
)
from gateway.auth.provider import LoginStep
from gateway.auth.refresh import InvalidAnswer, RefreshRejected, RefreshUnavailable
from gateway.auth.return_to import local_return_to, redirect, with_error
from gateway.auth.tokens import tokens_from_answer
from gateway.config import OAuth2Provider, SessionConfig, Timeouts
from gateway.observability.logs import event
from gateway.proxy import client_timeout, revoke_timeout
from gateway.sessions.model import Session, Tokens
from gateway.sessions.seal import KeyRing

_ANSWER_LIMIT = 1024 * 1024


class TokenRejected(Exception):
    """The token endpoint refused the grant (a used or wrong code, a dead refresh token)."""


class OAuth2Login:
    """A ``Provider`` backed by an OAuth 2.0 / OpenID Connect authorization server."""

    browser_flow = True
    can_refresh = True  # each session can if its provider gave it a refresh token

    def __init__(
        self,
        name: str,
        config: OAuth2Provider,
        client: aiohttp.ClientSession,
        timeouts: Timeouts,
        session: SessionConfig,
        keyring: KeyRing,
        redis: Redis | None,
    ) -> None:
        self.name = name
        self.config = config
        self._client = client
        self._timeout = client_timeout(timeouts)
        self._revoke_timeout = revoke_timeout(timeouts)
        self._discovery = Discovery(config, client, self._timeout)
        self._keys = KeySet(client, self._timeout)
        self._flows = FlowCookies(session, keyring)
        self._ledger = FlowLedger(redis)
        self._end_session: str | None = config.end_session_url

    # -- login ---------------------------------------------------------------

    def _redirect_uri(self, origin: str) -> str:
        return f"{origin}/auth/{self.name}/callback"

    async def _endpoints(self) -> Endpoints:
        endpoints = await self._discovery.endpoints()
        self._end_session = endpoints.end_session_url
        return endpoints

    async def start_login(self, request: web.BaseRequest, origin: str) -> LoginStep:
        """``GET /auth/P/login?return_to=/path`` -> 302 to the authorization endpoint."""
        return_to = local_return_to(request.query.get("return_to"))
        try:
            endpoints = await self._endpoints()
        except ProviderUnavailable as exc:
            return self._failed(return_to, "provider_unavailable", "error", None, str(exc))
        config = self.config
        flow = Flow.start(self.name, return_to, config.oidc)
        params = {
            **config.authorize_params,
            "response_type": "code",
            "client_id": config.client_id,
            "redirect_uri": self._redirect_uri(origin),
            "scope": " ".join(config.scopes),
            "state": flow.state,
            "code_challenge": pkce_challenge(flow.verifier),
            "code_challenge_method": "S256",
        }
        if flow.nonce is not None:
            params["nonce"] = flow.nonce
        response = redirect(_add_query(endpoints.authorize_url, params))
        for name in self._flows.stale(request.headers):
            response.headers.add("Set-Cookie", self._flows.clear_named(name))
        response.headers.add("Set-Cookie", self._flows.set_cookie(flow))
        return LoginStep(response)

    async def finish_login(self, request: web.BaseRequest, origin: str) -> LoginStep:
        """``GET /auth/P/callback?code=...&state=...`` from the authorization server."""
        query = request.query
        state = query.get("state")
        if not state:
            return self._failed("/", "invalid_state", "rejected", None, "no state")
        flow = self._flows.read(request.headers, state)
        if flow is None or flow.provider != self.name:
            return self._failed("/", "invalid_state", "rejected", state, "no flow for this state")
        return_to = local_return_to(flow.return_to)
        if flow.expires_at <= time.time():
            return self._failed(return_to, "flow_expired", "rejected", state, "flow expired")
        if not await self._ledger.first_use(flow):
            return self._failed(return_to, "flow_reused", "rejected", state, "flow replayed")
        error = query.get("error")
        if error is not None:
            code = "access_denied" if error == "access_denied" else "authorization_failed"
            return self._failed(return_to, code, "rejected", state, "the provider said no")
        auth_code = query.get("code")
        if not auth_code:
            return self._failed(return_to, "authorization_failed", "rejected", state, "no code")
        try:
            endpoints = await self._endpoints()
            answer = await self._token_call(
                endpoints.token_url,
                {
                    "grant_type": "authorization_code",
                    "code": auth_code,
                    "redirect_uri": self._redirect_uri(origin),
                    "code_verifier": flow.verifier,
                },
            )
            tokens = await self._tokens(answer, endpoints, flow.nonce)
        except TokenRejected:
            return self._failed(
                return_to, "token_exchange_failed", "rejected", state, "code refused"
            )
        except ProviderUnavailable as exc:
            self._discovery.forget()  # it may name endpoints that moved: look again next time
            return self._failed(return_to, "provider_unavailable", "error", state, str(exc))
        except InvalidIdToken as exc:
            return self._failed(return_to, "invalid_id_token", "rejected", state, str(exc))
        except InvalidAnswer:
            return self._failed(
                return_to, "invalid_token_response", "error", state, "no Bearer access token"
            )
        response = redirect(return_to)
        response.headers.add("Set-Cookie", self._flows.clear_cookie(state))
        return LoginStep(response, tokens, "success")

    def _failed(
        self, return_to: str, code: str, result: str, state: str | None, reason: str
    ) -> LoginStep:
        # The reason is ours (never a token, code or provider text).
        event(
            "login failed",
            logging.WARNING,
            provider=self.name,
            bff_error=code,
            reason=reason,
        )
        response = redirect(with_error(return_to, code))
        if state is not None:
            response.headers.add("Set-Cookie", self._flows.clear_cookie(state))
        return LoginStep(response, None, result)

    # -- tokens ----------------------------------------------------------------

    async def _tokens(
        self, answer: dict[str, Any], endpoints: Endpoints, nonce: str | None
    ) -> Tokens:
        """The session's tokens from a token endpoint answer.

        ``nonce`` None: a refresh answer, whose ID token (if any) has no nonce
        and whose absence of one is fine (OIDC Core §12.2).
        """
        config = self.config
        base = tokens_from_answer(
            answer,
            access_field="access_token",
            refresh_field="refresh_token",
            expires_in_field="expires_in",
            claim_names=config.session_claims,
        )
        if base is None:
            raise InvalidAnswer()
        # RFC 6749 §7.1: not a token type we understand (say DPoP-bound), not usable as
        # the Bearer token the gateway sends. Tolerated when missing, as some providers do.
        token_type = answer.get("token_type")
        if token_type is not None and str(token_type).lower() != "bearer":
            raise InvalidAnswer()
        if not config.oidc:
            return base
        id_token = answer.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            if nonce is not None:
                raise InvalidIdToken("the token answer has no ID token")
            return base
        if endpoints.jwks_url is None:
            raise ProviderUnavailable("the provider publishes no signing keys (jwks_uri)")
        assert config.issuer is not None  # config validation: openid needs an issuer
        verified = await verify_id_token(
            id_token,
            keys=self._keys,
            jwks_url=endpoints.jwks_url,
            issuer=config.issuer,
            client_id=config.client_id,
            nonce=nonce,
        )
        claims = {**base.claims}
        claims.update({k: verified[k] for k in config.session_claims if k in verified})
        return Tokens(base.access_token, base.refresh_token, base.expires_at, claims, id_token)

    def _client_auth(self, form: dict[str, str]) -> dict[str, str]:
        """Add the client's credentials (RFC 6749 §2.3.1); return the extra headers."""
        config = self.config
        method = config.auth_method
        if method == "client_secret_basic":
            assert config.client_secret is not None
            pair = f"{quote(config.client_id, safe='')}:{quote(config.client_secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        form["client_id"] = config.client_id
        if method == "client_secret_post":
            assert config.client_secret is not None
            form["client_secret"] = config.client_secret
        return {}

    async def _post_form(
        self, url: str, form: dict[str, str], timeout: aiohttp.ClientTimeout | None = None
    ) -> tuple[int, str, bytes]:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            **self._client_auth(form),
        }
        try:
            async with self._client.post(
                url,
                data=urlencode(form).encode(),
                headers=headers,
                timeout=timeout or self._timeout,
                allow_redirects=False,
            ) as response:
                raw = await read_bounded(response, _ANSWER_LIMIT)
                return response.status, response.content_type, raw
        except (TimeoutError, aiohttp.ClientError):
            raise ProviderUnavailable("the token endpoint could not be reached") from None

    async def _token_call(self, url: str, form: dict[str, str]) -> dict[str, Any]:
        status, content_type, raw = await self._post_form(url, form)
        if 400 <= status < 500 and status not in (408, 429):
            raise TokenRejected()
        if not 200 <= status < 300 or len(raw) > _ANSWER_LIMIT:
            raise ProviderUnavailable(f"the token endpoint answered {status}")
        answer = _parse_answer(content_type, raw)
        if answer is None:
            raise ProviderUnavailable("the token endpoint's answer could not be read")
        if "error" in answer:  # GitHub answers 200 with error=bad_verification_code
            raise TokenRejected()
        return answer

    # -- refresh, logout ---------------------------------------------------------

    async def refresh(self, refresh_token: str, stale_access: str = "") -> Tokens:
        try:
            endpoints = await self._endpoints()
            answer = await self._token_call(
                endpoints.token_url, {"grant_type": "refresh_token", "refresh_token": refresh_token}
            )
            return await self._tokens(answer, endpoints, None)
        except TokenRejected:
            raise RefreshRejected() from None
        except ProviderUnavailable:
            self._discovery.forget()
            raise RefreshUnavailable() from None
        except InvalidIdToken:
            raise InvalidAnswer() from None

    async def revoke(self, session: Session) -> None:
        """RFC 7009, best effort: the refresh token (which ends its access tokens at
        most providers), else the access token."""
        try:
            endpoints = await self._endpoints()
        except ProviderUnavailable:
            return
        if endpoints.revocation_url is None:
            return
        if session.refresh_token is not None:
            form = {"token": session.refresh_token, "token_type_hint": "refresh_token"}
        else:
            form = {"token": session.access_token, "token_type_hint": "access_token"}
        try:
            await self._post_form(endpoints.revocation_url, form, self._revoke_timeout)
        except ProviderUnavailable:
            return

    def end_session_url(self, session: Session | None, origin: str) -> str | None:
        """OIDC RP-initiated logout: the provider's end_session_endpoint, with the ID
        token as ``id_token_hint`` (the one token that URL is meant to carry)."""
        if self._end_session is None or session is None:
            return None
        params = {"client_id": self.config.client_id, "post_logout_redirect_uri": f"{origin}/"}
        if session.id_token is not None:
            params["id_token_hint"] = session.id_token
        return _add_query(self._end_session, params)


def _parse_answer(content_type: str, raw: bytes) -> dict[str, Any] | None:
    """JSON, or a form-encoded answer (GitHub's without ``Accept: application/json``)."""
    if content_type == "application/json" or content_type.endswith("+json") or raw[:1] == b"{":
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        return answer if isinstance(answer, dict) else None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pairs = parse_qsl(text, keep_blank_values=False)
    return dict(pairs) if pairs else None


def _add_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit(parts._replace(query=query))
