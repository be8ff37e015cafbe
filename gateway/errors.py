"""The one error type of the gateway and its one renderer (SPEC §4.4)."""

from __future__ import annotations

import json

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


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, "bad_request", message)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode()


def error_response(error: GatewayError) -> web.Response:
    """Render any GatewayError as the JSON of SPEC §4.4."""
    response = web.Response(
        status=error.status,
        body=error_body(error.code, error.message),
        content_type="application/json",
        headers={"Cache-Control": "no-store", **error.headers},
    )
    return response
