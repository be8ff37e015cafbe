"""What one request carries through the pipeline (the request path, auth endpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.proxy import RequestBody
from gateway.sessions.manager import SessionState


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
