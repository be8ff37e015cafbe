"""Prometheus metrics of SPEC §7.

With ``workers > 1`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
any worker starts, so prometheus-client writes every worker's values to
shared files and the admin listener sums them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        # One registry per Gateway, so that tests can run many in one process.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bff_requests_total", "Requests answered", ["route", "method", "status"], registry=self.registry
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
            "bff_upstream_errors_total", "Upstream calls that failed", ["route", "kind"], registry=self.registry
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

    def refresh_result(self, provider: str, result: str) -> None:
        self.token_refresh.labels(provider, result).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def multiprocess_exposition() -> bytes:
    """Every worker's metrics summed (the supervisor's /metrics)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
