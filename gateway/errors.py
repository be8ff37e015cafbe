"""The one error type of the gateway and its one renderer (SPEC §4.4)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web


class GatewayError(Exception):
    """An error the gateway answers itself: status, stable code, human message.

    The message is shown to the browser, so it must never contain a token,
    a cookie value or an injected secret.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r})"


class UpstreamFailure(GatewayError):
    """An upstream that could not be reached or answered badly; ``kind`` feeds metrics."""

    def __init__(self, status: int, code: str, message: str, kind: str) -> None:
        super().__init__(status, code, message)
        self.kind = kind


_UPSTREAM_MESSAGES = {
    "tls": "the upstream's TLS certificate was not accepted",
    "connect": "the upstream refused the connection",
    "protocol": "the upstream sent a malformed response",
    "reset": "the upstream connection failed",
}


def upstream_failure_of(kind: str) -> UpstreamFailure:
    """The SPEC §4.4 error for an upstream failure of ``kind``: 504 for a timeout, else 502."""
    if kind == "timeout":
        return UpstreamFailure(
            504, "upstream_timeout", "the upstream did not answer in time", "timeout"
        )
    return UpstreamFailure(502, "upstream_unavailable", _UPSTREAM_MESSAGES[kind], kind)


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, "bad_request", message)


def method_not_allowed(
    method: str, allowed: Iterable[str], message: str | None = None
) -> GatewayError:
    return GatewayError(
        405,
        "method_not_allowed",
        message or f"{method} is not allowed here",
        {"Allow": ", ".join(allowed)},
    )


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON answer the gateway writes itself; never cached."""
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def error_response(error: GatewayError) -> web.Response:
    """Render any GatewayError as the JSON of SPEC §4.4."""
    response = json_response({"error": error.code, "message": error.message}, error.status)
    response.headers.update(error.headers)
    return response
