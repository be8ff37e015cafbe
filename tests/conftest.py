"""Shared test setup.

With BFF_REQUIRE_ALL=1 (set by CI) a skipped test is an error: tests that need
Chromium or redis-server must run there, not quietly skip.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ALL = os.environ.get("BFF_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, but BFF_REQUIRE_ALL=1 forbids skips: {reason}"
