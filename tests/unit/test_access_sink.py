"""The access log's fast path: lines leave in one write per event-loop turn.

Containers usually run Python with PYTHONUNBUFFERED=1, where the stream
writes every line at once; the sink gathers a turn's lines itself. These
tests drive the real setup_logging() wiring with a stream that records each
write() it is given.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from gateway.observability import logs
from gateway.observability.logs import ACCESS, AccessRecord, event, log_access, setup_logging
from tests.support import captured_json_logs


class RecordingStream(io.StringIO):
    """An unbuffered-looking stream: remembers every write() separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def record(n: int) -> AccessRecord:
    return AccessRecord(
        request_id=f"req-{n}",
        method="GET",
        path='/a"quoted\\path',
        route="/api/",
        status=200,
        duration_ms=1.5,
        upstream_ms=None,
        bytes_in=0,
        bytes_out=10,
        refreshed=False,
        client="127.0.0.1",
    )


# setup_logging() quiets these; the fixture puts them back for the rest of the suite.
QUIETED = ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio")


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingStream]:
    recording = RecordingStream()
    monkeypatch.setattr(sys, "stdout", recording)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, ACCESS.disabled, logs._sink, sys.excepthook)
    quieted = {name: logging.getLogger(name).level for name in QUIETED}
    setup_logging("INFO", "json", access_log=True)
    try:
        yield recording
    finally:
        root.handlers[:], level, ACCESS.disabled, logs._sink, sys.excepthook = saved
        root.setLevel(level)
        for name, previous in quieted.items():
            logging.getLogger(name).setLevel(previous)


def without_pytest_capture() -> None:
    """pytest adds its capture handlers to the root logger for each test phase;
    the fast path (rightly) steps aside for any handler it did not install."""
    assert logs._sink is not None
    logging.getLogger().handlers[:] = [logs._sink.handler]


def lines_of(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


async def turn_ended() -> None:
    """Let the current event-loop turn end and the flush scheduled in it run."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_one_write_per_loop_turn(stream: RecordingStream) -> None:
    without_pytest_capture()
    for n in range(50):
        log_access(record(n))
    assert stream.writes == [], "nothing is written before the turn ends"
    await turn_ended()
    assert len(stream.writes) == 1
    entries = lines_of(stream.writes[0])
    assert [e["request_id"] for e in entries] == [f"req-{n}" for n in range(50)]
    assert entries[0]["path"] == '/a"quoted\\path'  # escaped, and read back intact


async def test_an_event_first_lets_out_the_access_lines_before_it(
    stream: RecordingStream,
) -> None:
    without_pytest_capture()
    log_access(record(1))
    event("something happened", detail="x")
    log_access(record(2))
    await turn_ended()
    events = [e["event"] for e in lines_of(stream.getvalue())]
    assert events == ["request", "something happened", "request"]


def test_without_a_running_loop_each_line_is_written_at_once(stream: RecordingStream) -> None:
    without_pytest_capture()
    log_access(record(7))
    assert [e["request_id"] for e in lines_of(stream.getvalue())] == ["req-7"]


async def test_a_handler_added_later_gets_the_record_instead(stream: RecordingStream) -> None:
    without_pytest_capture()
    with captured_json_logs("bff") as captured:
        log_access(record(3))
    assert [e["request_id"] for e in lines_of(captured.getvalue())] == ["req-3"]


async def test_a_closed_stdout_never_fails_the_request(stream: RecordingStream) -> None:
    without_pytest_capture()
    stream.close()
    log_access(record(4))
    await turn_ended()  # the flush ran against a closed stream, quietly


def test_lines_of_a_loop_that_stopped_before_flushing_are_not_stranded(
    stream: RecordingStream,
) -> None:
    without_pytest_capture()
    loop = asyncio.new_event_loop()
    loop.call_soon(loop.stop)  # stops before the flush scheduled below can run
    loop.call_soon(log_access, record(1))
    loop.run_forever()
    loop.close()
    assert stream.writes == []

    async def more() -> None:
        for n in range(2, 6):
            log_access(record(n))
        await turn_ended()

    asyncio.run(more())
    assert [e["request_id"] for e in lines_of(stream.getvalue())] == [
        f"req-{n}" for n in range(1, 6)
    ]


def test_an_event_from_another_thread_comes_after_the_lines_before_it(
    stream: RecordingStream,
) -> None:
    without_pytest_capture()

    async def scenario() -> None:
        log_access(record(1))
        await asyncio.to_thread(event, "from a thread")
        log_access(record(2))
        await turn_ended()

    asyncio.run(scenario())
    entries = lines_of(stream.getvalue())
    assert [e.get("request_id", e["event"]) for e in entries] == [
        "req-1",
        "from a thread",
        "req-2",
    ]
