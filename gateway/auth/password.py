"""The ``password`` provider: credentials posted to a login API (SPEC §3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway.auth.provider import LoginStep
from gateway.auth.refresh import InvalidAnswer, RefreshRejected, RefreshUnavailable
from gateway.auth.tokens import scrub, tokens_from_answer
from gateway.config import PasswordProvider, Timeouts
from gateway.errors import GatewayError, json_response
from gateway.proxy import client_timeout, revoke_timeout
from gateway.sessions.model import Session, Tokens

LOGIN_BODY_LIMIT = 64 * 1024
_LOGIN_TYPES = ("application/json", "application/x-www-form-urlencoded")


@dataclass(frozen=True, slots=True)
class LoginResult:
    status: int
    body: Any  # the upstream JSON minus every token
    tokens: Tokens | None


class PasswordLogin:
    """Talks to a login API: login, refresh, logout (a ``Provider``)."""

    browser_flow = False

    def __init__(
        self,
        name: str,
        config: PasswordProvider,
        client: aiohttp.ClientSession,
        timeouts: Timeouts,
    ) -> None:
        self.name = name
        self.config = config
        self._client = client
        self._timeout = client_timeout(timeouts)
        self._revoke_timeout = revoke_timeout(timeouts)

    @property
    def can_refresh(self) -> bool:
        return self.config.refresh_url is not None

    def _tokens(self, answer: Any) -> Tokens | None:
        return tokens_from_answer(
            answer,
            access_field=self.config.access_token_field,
            refresh_field=self.config.refresh_token_field,
            expires_in_field=self.config.expires_in_field,
            claim_names=self.config.session_claims,
        )

    def _scrub(self, answer: Any, tokens: Tokens | None) -> Any:
        secrets = [tokens.access_token, tokens.refresh_token or ""] if tokens else []
        fields = [self.config.access_token_field, self.config.refresh_token_field]
        return scrub(answer, fields, secrets)

    async def start_login(self, request: web.BaseRequest, origin: str) -> LoginStep:
        """``POST /auth/P/login``: the credentials are forwarded to ``login_url``."""
        if request.content_type not in _LOGIN_TYPES:
            raise GatewayError(400, "bad_request", "send the credentials as JSON or a form")
        length = request.content_length
        if length is not None and length > LOGIN_BODY_LIMIT:
            raise _login_too_large()
        body = await _read_limited(request, LOGIN_BODY_LIMIT)
        result = await self.login(body, request.headers.get("Content-Type", ""))
        if result.tokens is None:
            return LoginStep(json_response(result.body, result.status), None, "rejected", len(body))
        return LoginStep(json_response(result.body, 200), result.tokens, "success", len(body))

    async def finish_login(self, request: web.BaseRequest, origin: str) -> LoginStep:
        raise GatewayError(404, "not_found", "no such auth endpoint")

    async def revoke(self, session: Session) -> None:
        await self.logout(session.access_token, session.refresh_token)

    def end_session_url(self, session: Session | None, origin: str) -> str | None:
        return None

    async def login(self, body: bytes, content_type: str) -> LoginResult:
        headers = {"Content-Type": content_type or "application/json", "Accept": "application/json"}
        try:
            async with self._client.post(
                self.config.login_url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                raw = await response.read()
        except TimeoutError:  # aiohttp's connect and read timeouts included
            raise GatewayError(
                504, "upstream_timeout", "the login service did not answer in time"
            ) from None
        except aiohttp.ClientError:
            raise GatewayError(
                502, "upstream_unavailable", "the login service could not be reached"
            ) from None
        try:
            answer = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            answer = None
        if status >= 500:
            raise GatewayError(502, "upstream_unavailable", "the login service failed")
        if status < 200 or 300 <= status < 400:
            # A redirect (never followed) or an informational status is no login answer;
            # relaying it would hand the browser a 3xx without its Location.
            raise GatewayError(
                502, "upstream_invalid_response", "the login service gave no usable answer"
            )
        if status >= 400:
            if answer is None:
                raise GatewayError(status, "login_failed", "login failed")
            return LoginResult(status, self._scrub(answer, None), None)
        tokens = self._tokens(answer) if answer is not None else None
        if tokens is None:
            raise GatewayError(
                502, "upstream_invalid_response", "the login answer had no access token"
            )
        return LoginResult(status, self._scrub(answer, tokens), tokens)

    async def refresh(self, refresh_token: str, stale_access: str = "") -> Tokens:
        if self.config.refresh_url is None:
            raise RefreshRejected()
        payload = _fill_template(self.config.refresh_body, refresh_token)
        try:
            async with self._client.post(
                self.config.refresh_url,
                # The shared client skips auto headers, so say it is JSON
                # ourselves (DRF answers 415 to a body without a type).
                data=json.dumps(payload).encode(),
                headers={"Accept": "application/json", "Content-Type": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                raw = await response.read()
        except (TimeoutError, aiohttp.ClientError):
            raise RefreshUnavailable() from None
        if 400 <= status < 500 and status not in (408, 429):
            raise RefreshRejected()
        if not 200 <= status < 300:
            raise RefreshUnavailable()
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            raise RefreshUnavailable() from None
        tokens = self._tokens(answer)
        if tokens is None:
            raise InvalidAnswer()
        return tokens

    async def logout(self, access_token: str, refresh_token: str | None) -> None:
        """Best effort: tell the provider, never fail the browser's logout."""
        if self.config.logout_url is None:
            return
        payload = {"refresh_token": refresh_token} if refresh_token else {}
        try:
            async with self._client.post(
                self.config.logout_url,
                data=json.dumps(payload).encode(),
                headers={
                    "Authorization": f"Bearer {access_token}",
                    "Content-Type": "application/json",
                },
                timeout=self._revoke_timeout,
                allow_redirects=False,
            ) as response:
                await response.read()
        except (TimeoutError, aiohttp.ClientError):
            return


def _fill_template(template: Any, refresh_token: str) -> Any:
    if isinstance(template, str):
        return (
            refresh_token
            if template == "{refresh_token}"
            else template.replace("{refresh_token}", refresh_token)
        )
    if isinstance(template, dict):
        return {key: _fill_template(value, refresh_token) for key, value in template.items()}
    if isinstance(template, list):
        return [_fill_template(item, refresh_token) for item in template]
    return template


def _login_too_large() -> GatewayError:
    return GatewayError(413, "payload_too_large", "the login body is over 64 KiB")


async def _read_limited(request: web.BaseRequest, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _login_too_large()
        chunks.append(chunk)
    return b"".join(chunks)
