"""The admin listener: /healthz, /readyz, /metrics (SPEC §7). Never on the public port."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.errors import GatewayError, error_response, json_response, method_not_allowed
from gateway.headers import name_the_server

ReadyCheck = Callable[[], Awaitable[bool]]
Exposition = Callable[[], bytes]

_CHECK_TIMEOUT = 2.0


class Health:
    """Readiness: config loaded, not draining, and every check answers true.

    ``store_ping`` is the session store's ping; ``checks`` adds more, each with
    the reason /readyz reports when it fails (the supervisor adds "workers").
    """

    def __init__(
        self,
        store_ping: ReadyCheck | None = None,
        *,
        checks: Sequence[tuple[str, ReadyCheck]] = (),
    ) -> None:
        self.draining = False
        self._checks: list[tuple[str, ReadyCheck]] = list(checks)
        if store_ping is not None:
            self._checks.append(("session store unreachable", store_ping))

    async def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        for reason, check in self._checks:
            try:
                ok = await asyncio.wait_for(check(), timeout=_CHECK_TIMEOUT)
            except Exception:
                ok = False
            if not ok:
                return False, reason
        return True, "ready"


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The admin port's own errors are JSON too (SPEC §4.4), never aiohttp's text pages."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(GatewayError(404, "not_found", "no such admin endpoint"))
        if exc.status == 405:
            return error_response(
                method_not_allowed(
                    request.method, ("GET", "HEAD"), f"{request.method} is not allowed"
                )
            )
        raise


def admin_app(health: Health, exposition: Exposition) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = await health.ready()
        return json_response({"status": reason}, 200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        response.headers["Cache-Control"] = "no-store"
        return response

    async def on_response_prepare(_: web.Request, response: web.StreamResponse) -> None:
        name_the_server(response)

    app = web.Application(middlewares=[_json_errors])
    app.on_response_prepare.append(on_response_prepare)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
