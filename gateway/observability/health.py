"""The admin listener: /healthz, /readyz, /metrics (SPEC §7). Never on the public port."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

ReadyCheck = Callable[[], Awaitable[bool]]
Exposition = Callable[[], bytes]


class Health:
    """Readiness: config loaded, not draining, and the session store answers."""

    def __init__(self, store_ping: ReadyCheck | None = None) -> None:
        self.draining = False
        self._store_ping = store_ping

    async def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self._store_ping is not None:
            try:
                ok = await asyncio.wait_for(self._store_ping(), timeout=2)
            except Exception:
                ok = False
            if not ok:
                return False, "session store unreachable"
        return True, "ready"


def admin_app(health: Health, exposition: Exposition) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = await health.ready()
        return web.json_response({"status": reason}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
