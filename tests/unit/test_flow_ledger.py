"""The in-process list of used login flows (no Redis): single use, and cheap to keep.

Anyone can start logins and bring them to the callback (GET /auth/P/login, then
/auth/P/callback?error=...), so the list can hold every flow of the last ten
minutes; keeping it must not cost more per callback as it grows, nor more
memory than its bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.auth.flow import Flow, FlowLedger


class CountedTime(float):
    """An expiry time that counts how often it is compared (the ledger's work)."""

    compared = 0

    def __add__(self, other: Any) -> CountedTime:
        return CountedTime(float(self) + other)

    def _count(self) -> None:
        CountedTime.compared += 1

    def __le__(self, other: Any) -> bool:
        self._count()
        return float(self) <= other

    def __lt__(self, other: Any) -> bool:
        self._count()
        return float(self) < other

    def __ge__(self, other: Any) -> bool:
        self._count()
        return float(self) >= other

    def __gt__(self, other: Any) -> bool:
        self._count()
        return float(self) > other


def flow() -> Flow:
    started = Flow.start("oidc", "/", oidc=True)
    return dataclasses.replace(started, expires_at=CountedTime(started.expires_at))


async def test_a_flow_is_used_once() -> None:
    ledger = FlowLedger(None)
    first, second = flow(), flow()
    assert await ledger.first_use(first) is True
    assert await ledger.first_use(first) is False
    assert await ledger.first_use(second) is True


async def test_the_work_per_callback_does_not_grow_with_the_flows_remembered() -> None:
    ledger = FlowLedger(None)
    flows = [flow() for _ in range(3000)]
    CountedTime.compared = 0
    for each in flows:
        assert await ledger.first_use(each) is True
    # A few comparisons per callback, not one per remembered flow (4.5 million here).
    assert CountedTime.compared < 5 * len(flows)


async def test_the_list_is_bounded_and_forgets_the_oldest_first() -> None:
    ledger = FlowLedger(None, kept=100)
    flows = [flow() for _ in range(250)]
    for each in flows:
        assert await ledger.first_use(each) is True
    assert len(ledger) == 100
    # The newest hundred are still refused a second time; the oldest were forgotten.
    for each in flows[150:]:
        assert await ledger.first_use(each) is False
    assert await ledger.first_use(flows[0]) is True
    assert len(ledger) == 100
