"""`make soak`'s judgement (tests/load/soak_report.py, soak_traffic.py, soak.py): when
growth fails a run, and which 5xx count as the gateway's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.load.soak_report import GROWTH_METRICS, growth, growth_verdicts
from tests.load.soak_traffic import FAULT_ERRORS, Tally, gateway_error, parse_raw

FLOOR_FDS = GROWTH_METRICS["fds"][2]


def series(values: list[float], metric: str = "fds", interval: float = 10) -> list[dict[str, Any]]:
    return [{"t": (i + 1) * interval, metric: v} for i, v in enumerate(values)]


def full_samples(rss: list[float], fds: list[float], conns: list[float]) -> list[dict[str, Any]]:
    return [
        {"t": (i + 1) * 10.0, "rss_mib": r, "fds": f, "upstream_conns": c}
        for i, (r, f, c) in enumerate(zip(rss, fds, conns, strict=True))
    ]


def test_flat_series_passes() -> None:
    verdict = growth(series([100.0] * 60), warmup=120, metric="fds", floor=FLOOR_FDS)
    assert verdict is not None and verdict.ok
    assert verdict.baseline == verdict.end == 100.0


def test_steady_growth_after_warmup_fails() -> None:
    # 100 → ~160 descriptors over the run: a leak of one per sample.
    values = [100.0 + i for i in range(60)]
    verdict = growth(series(values), warmup=120, metric="fds", floor=FLOOR_FDS)
    assert verdict is not None and not verdict.ok
    assert verdict.change > 0.10


def test_growth_during_warmup_only_passes() -> None:
    # Caches and pools fill in the first two minutes, then the process holds steady.
    values = [50.0 + 3 * i for i in range(12)] + [86.0] * 48
    verdict = growth(series(values, "rss_mib"), warmup=120, metric="rss_mib", floor=2.0)
    assert verdict is not None and verdict.ok


def test_small_absolute_change_is_under_the_floor() -> None:
    # 20 → 23 descriptors is +15 %, but three sockets open at one instant are noise.
    values = [20.0] * 30 + [23.0] * 30
    verdict = growth(series(values), warmup=60, metric="fds", floor=FLOOR_FDS)
    assert verdict is not None and verdict.ok
    assert verdict.change == pytest.approx(0.15)


def test_growth_just_over_ten_percent_fails_when_above_the_floor() -> None:
    values = [200.0] * 30 + [225.0] * 30  # +12.5 % and +25 descriptors
    verdict = growth(series(values), warmup=60, metric="fds", floor=FLOOR_FDS)
    assert verdict is not None and not verdict.ok
    assert verdict.allowed == pytest.approx(220.0)


def test_one_spike_in_the_last_window_does_not_fail() -> None:
    values = [100.0] * 59 + [400.0]  # a burst of downloads in flight at the last sample
    verdict = growth(series(values), warmup=120, metric="fds", floor=FLOOR_FDS)
    assert verdict is not None and verdict.ok


def test_too_few_samples_after_warmup_is_a_failure() -> None:
    samples = full_samples([50.0] * 5, [20.0] * 5, [5.0] * 5)
    verdicts, failures = growth_verdicts(samples, warmup=20)
    assert verdicts == []
    assert len(failures) == len(GROWTH_METRICS)
    assert all("fewer than" in failure for failure in failures)


def test_verdicts_name_the_metric_that_grew() -> None:
    rss = [60.0] * 30
    conns = [10.0] * 15 + [40.0] * 15  # upstream connections pile up
    verdicts, failures = growth_verdicts(full_samples(rss, [30.0] * 30, conns), warmup=60)
    assert [v.ok for v in verdicts] == [True, True, False]
    assert len(failures) == 1 and failures[0].startswith("established upstream connections")


# -- which 5xx are the gateway's own ----------------------------------------------------


def error_json(code: str) -> bytes:
    return json.dumps({"error": code, "message": "text"}).encode()


def test_gateway_error_recognises_only_the_gateway_json() -> None:
    assert gateway_error(error_json("overloaded")) == "overloaded"
    assert gateway_error(b'{"status": 503}') is None  # the demo API's own body
    assert gateway_error(b'{"error": "x", "message": "y", "detail": 1}') is None
    assert gateway_error(b"<html>503</html>") is None
    assert gateway_error(b"\xff\xfe") is None


def test_upstream_5xx_passed_through_is_not_the_gateways() -> None:
    tally = Tally()
    assert tally.judge("upstream_5xx", 503, b'{"status": 503}', True, "upstream 503")
    assert not tally.gateway_5xx and not tally.unexpected
    assert tally.outcomes["upstream 503"] == 1


@pytest.mark.parametrize(
    "status,code",
    [
        (500, "internal_error"),
        (503, "overloaded"),
        (503, "store_unavailable"),
        (503, "refresh_unavailable"),
        (502, "upstream_unavailable"),  # on a route whose upstream is healthy
        (504, "upstream_timeout"),
    ],
)
def test_gateway_5xx_without_an_upstream_fault_counts_as_its_own(status: int, code: str) -> None:
    tally = Tally()
    assert not tally.judge("api", status, error_json(code), False, "api call")
    assert tally.gateway_5xx == {f"{status} {code}": 1}


def test_502_and_504_for_an_upstream_fault_are_expected() -> None:
    tally = Tally()
    for status, code in sorted(FAULT_ERRORS):
        assert tally.judge("fault", status, error_json(code), True, f"fault {status}", FAULT_ERRORS)
    assert not tally.gateway_5xx and not tally.unexpected


def test_a_gateway_500_on_a_fault_route_is_still_its_own() -> None:
    tally = Tally()
    tally.judge("fault", 500, error_json("internal_error"), False, "fault", FAULT_ERRORS)
    assert tally.gateway_5xx == {"500 internal_error": 1}


def test_a_wrong_answer_is_unexpected_and_kept_as_an_example() -> None:
    tally = Tally()
    assert not tally.judge("api", 401, error_json("login_required"), False, "api call")
    assert tally.unexpected == {"api": 1}
    assert tally.examples["unexpected"] == ["api: api call: 401 login_required"]


def test_parse_raw_reads_the_first_response() -> None:
    raw = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 2\r\n\r\n{}"
    assert parse_raw(raw) == (408, b"{}")
    assert parse_raw(b"") == (0, b"")
    assert parse_raw(b"HTTP/1.1 408 Req") == (0, b"")


def test_access_log_5xx_on_healthy_routes_are_unexplained(tmp_path: Path) -> None:
    from tests.load.soak import gateway_log_findings, log_5xx_unexplained

    def line(route: str, path: str, status: int) -> str:
        entry = {"event": "request", "route": route, "path": path, "status": status}
        return json.dumps(entry)

    log = tmp_path / "gateway.log"
    log.write_text(
        "\n".join(
            [
                line("/api/demo/", "/api/demo/items", 200),
                line("/api/demo/", "/api/demo/status/503", 503),  # passed through
                line("/faults/", "/faults/hang", 504),  # an upstream fault
                line("/refused/", "/refused/x", 502),
                line("/api/demo/", "/api/demo/status/503", 500),  # not what was asked
                line("/api/demo/", "/api/demo/items", 503),
                json.dumps({"event": "unhandled error", "level": "error"}),
                "not json",
            ]
        )
    )
    statuses, unhandled = gateway_log_findings(log)
    assert unhandled == 1
    assert log_5xx_unexplained(statuses) == {
        "/api/demo/ /api/demo/status/503 500": 1,
        "/api/demo/ /api/demo/items 503": 1,
    }
