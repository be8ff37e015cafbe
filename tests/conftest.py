"""Shared test setup.

With BFF_REQUIRE_ALL=1 (set by CI) a skipped test is an error: tests that need
Chromium or redis-server must run there, not quietly skip.

Hypothesis runs derandomized (the same examples on every run, so CI is
reproducible) and without its per-example deadline (two shared cores make
timings meaningless). ``BFF_FUZZ_EXAMPLES=N`` switches to random exploration
and runs each fuzz property N times (tests/support.py: fuzz_settings).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# The suite-wide search for tokens and codes in responses and log lines (issue 12).
pytest_plugins = ["tests.leakcheck"]

REQUIRE_ALL = os.environ.get("BFF_REQUIRE_ALL") == "1"

settings.register_profile("bff", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("bff-explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile("bff-explore" if os.environ.get("BFF_FUZZ_EXAMPLES") else "bff")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, but BFF_REQUIRE_ALL=1 forbids skips: {reason}"
