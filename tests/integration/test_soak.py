"""A short `make soak` end to end (issue 13): the real tool, a real gateway process, the
demo API and the fault upstream, 36 s of mixed traffic with a few users.

It must pass (no growth after warm-up, no 5xx of the gateway's own, no unexpected
answer), and its summary must show that every kind of traffic it claims actually
happened: refreshes across expiry, 408s for slow clients, 502/504 for upstream
faults, upstream 5xx passed through, and a PNG plot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

DURATION = 36
INTERVAL = 2


def test_short_soak_passes_and_covers_every_kind_of_traffic(tmp_path: Path) -> None:
    argv = [sys.executable, str(REPO / "tests/load/soak.py"), "--duration", str(DURATION)]
    argv += ["--interval", str(INTERVAL), "--users", "6", "--access-ttl", "3"]
    argv += ["--out", str(tmp_path), "--seed", "13"]
    run = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=DURATION + 120,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    summary = json.loads((tmp_path / "soak-summary.json").read_text())
    assert summary["ok"] and summary["failures"] == []

    # Sampled all along, and judged on the three metrics after warm-up.
    assert len(summary["samples"]) == DURATION // INTERVAL
    assert [g["metric"] for g in summary["growth"]] == ["rss_mib", "fds", "upstream_conns"]
    sample = summary["samples"][-1]
    assert sample["rss_mib"] > 10 and sample["fds"] > 5 and sample["upstream_conns"] > 0

    traffic = summary["traffic"]
    assert traffic["refresh_calls"] > 0 and traffic["refreshes_by_result"]["success"] > 0
    assert traffic["revoked_families"] == 0
    assert traffic["rejections_by_reason"]["header_timeout"] > 0
    assert {"reset", "timeout", "connect"} <= set(traffic["upstream_errors_by_kind"])
    assert summary["gateway_5xx"] == {} and summary["unexpected"] == {}

    outcomes = summary["outcomes"]
    for label in (
        "api call",
        "login",
        "logout",
        "slow_head: 408 request_timeout",
        "slow_body: 408 request_timeout",
        "trickled upload within body_timeout",
        "fault hang: 504",
        "upload echoed intact",
    ):
        assert outcomes.get(label, 0) > 0, (label, outcomes)
    for fault in ("close", "garbage", "refused", "reset"):
        assert outcomes.get(f"fault {fault}: 502", 0) > 0, (fault, outcomes)
    assert outcomes.get("fault cut: response ended early", 0) > 0
    for status in (500, 502, 503, 504):
        assert outcomes.get(f"upstream {status} passed through", 0) > 0, (status, outcomes)
    assert any(label.startswith("sse") for label in outcomes)
    assert any(label.startswith("download") for label in outcomes)

    # Every client is gone: the gateway holds no client connection and no request.
    after = summary["after_traffic"]
    assert after["client_conns"] == 0 and after["active_requests_metric"] == 0

    png = tmp_path / "soak.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "make soak: PASS" in (tmp_path / "soak-summary.md").read_text()
