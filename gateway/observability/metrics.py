"""Prometheus metrics of SPEC §7.

With ``workers > 1`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
any worker starts, so prometheus-client writes every worker's values to
shared files and the admin listener sums them.

Label values are bounded: routes come from the config, statuses are three
digits, and a method outside the standard set is counted as ``OTHER`` (a
client may send any token as a method; each new label value would be a new
time series kept forever).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


class Metrics:
    def __init__(self) -> None:
        # One registry per Gateway, so that tests can run many in one process.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bff_requests_total",
            "Requests answered",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "bff_request_duration_seconds",
            "Time from request to the end of the response",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "bff_upstream_duration_seconds",
            "Time until the upstream's response headers arrived",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "bff_upstream_errors_total",
            "Upstream calls that failed",
            ["route", "kind"],
            registry=self.registry,
        )
        self.token_refresh = Counter(
            "bff_token_refresh_total",
            "Token refreshes by result",
            ["provider", "result"],
            registry=self.registry,
        )
        self.logins = Counter(
            "bff_logins_total", "Logins by result", ["provider", "result"], registry=self.registry
        )
        self.active = Gauge(
            "bff_active_requests",
            "Requests in progress",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.open_connections = Gauge(
            "bff_open_connections",
            "Client connections open on the public listener",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.rejections = Counter(
            "bff_rejections_total",
            "Connections or requests the edge limits turned away, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.open_websockets = Gauge(
            "bff_open_websockets",
            "WebSocket relays open",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.websocket_messages = Counter(
            "bff_websocket_messages_total",
            "WebSocket data messages relayed, by route and direction (to_upstream, to_client)",
            ["route", "direction"],
            registry=self.registry,
        )
        self.websocket_bytes = Counter(
            "bff_websocket_bytes_total",
            "WebSocket payload bytes relayed, by route and direction",
            ["route", "direction"],
            registry=self.registry,
        )
        self.websocket_closes = Counter(
            "bff_websocket_closes_total",
            "WebSocket relays ended, by route and reason",
            ["route", "reason"],
            registry=self.registry,
        )
        # labels() takes a lock and builds a key per call: children are looked
        # up once per label set and kept (the label sets are bounded, above).
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[str, tuple[Any, Any]] = {}

    def request_done(
        self,
        route: str,
        method: str,
        status: int,
        seconds: float,
        upstream_seconds: float | None,
    ) -> None:
        """One answered request: its count, its duration, its upstream time."""
        key = (route, method if method in METHODS else "OTHER", status)  # bounded labels
        counter = self._counted.get(key)
        if counter is None:
            counter = self.requests.labels(route, key[1], str(status))
            self._counted[key] = counter
        counter.inc()
        timers = self._timed.get(route)
        if timers is None:
            timers = (self.request_duration.labels(route), self.upstream_duration.labels(route))
            self._timed[route] = timers
        timers[0].observe(seconds)
        if upstream_seconds is not None:
            timers[1].observe(upstream_seconds)

    def refresh_result(self, provider: str, result: str) -> None:
        self.token_refresh.labels(provider, result).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def multiprocess_exposition() -> bytes:
    """Every worker's metrics summed (the supervisor's /metrics)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
