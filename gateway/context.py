"""What one request carries through the pipeline, and the route target it matched
(the request path, the auth endpoints, the WebSocket relay)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.auth.provider import ProviderRuntime
from gateway.proxy import RequestBody, Upstream
from gateway.sessions.manager import SessionState
from gateway.static import StaticSite


@dataclass(slots=True)
class Context:
    start: float
    request_id: str
    route: str = "unmatched"
    upstream_seconds: float | None = None
    refresh_tried: bool = False  # at most one refresh per request, whatever its outcome
    refreshed: bool = False  # a refresh succeeded (logged)
    bytes_in: int = 0  # a body the gateway read itself (login)
    body: RequestBody | None = None  # a body streamed upstream (its size is logged)
    states: list[SessionState] = field(default_factory=list)


@dataclass(slots=True)
class Target:
    """A route, ready to serve: computed once at startup."""

    label: str
    methods: frozenset[str] | None
    max_body: int
    upstream: Upstream | None
    static: StaticSite | None
    provider: ProviderRuntime | None
    forward_cookies: bool
    drop: frozenset[str]
