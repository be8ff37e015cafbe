"""CSRF rules for unsafe methods (SPEC §5.4). Pure.

Checked before any session is unsealed: a cross-site request learns nothing
and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.errors import GatewayError
from gateway.headers import Headers

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CsrfPolicy:
    def __init__(self, header: str, public_origin: str | None, allowed: Iterable[str]) -> None:
        self.header = header
        self._public_origin = public_origin
        self._allowed = frozenset(origin.rstrip("/").lower() for origin in allowed)

    def check(self, method: str, headers: Headers, own_origin: str) -> None:
        """Raise 403 csrf_failed unless the request may change state."""
        if method not in UNSAFE_METHODS:
            return
        if not headers.get(self.header, "").strip():
            raise _failed(f"the {self.header} header is required")
        if headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            raise _failed("cross-site requests are not allowed")
        origin = headers.get("Origin")
        if origin is not None:
            self._allow_origin(origin, own_origin)

    def check_origin(self, headers: Headers, own_origin: str) -> None:
        """A WebSocket handshake on a route that carries the browser's credentials:
        ``Origin`` is required (browsers always send it on a handshake, and no CSRF
        header can be added to one) and must be an allowed one; else 403 csrf_failed."""
        origin = headers.get("Origin")
        if origin is None:
            raise _failed("a WebSocket handshake needs an Origin header")
        self._allow_origin(origin, own_origin)

    def _allow_origin(self, origin: str, own_origin: str) -> None:
        origin = origin.strip().lower()
        expected = self._public_origin or own_origin.lower()
        if origin != expected and origin not in self._allowed:
            raise _failed("the request's origin is not allowed")


def _failed(message: str) -> GatewayError:
    return GatewayError(403, "csrf_failed", message)
