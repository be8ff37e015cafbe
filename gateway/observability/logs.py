"""Logs: one JSON object per line (SPEC §8), redaction by construction.

Nothing the gateway logs is built from headers, cookies, bodies or tokens:
the access record below has a fixed set of fields, each a number or a short
string the gateway itself chose (route, status) or the raw path, whose query
string is never logged because injected secrets may live there. Other events
carry only the message and an explicit, small ``fields`` mapping; an
exception is logged by its type and code location only (a message or a
traceback's locals may hold a secret).

The access line is on the hot path: :func:`log_access` skips the logging
module's LogRecord and handler machinery once :func:`setup_logging` has
configured the process and writes the formatted line straight to the
configured stream (about 3x cheaper); anywhere else (tests, embedding) the
record takes the ordinary logging path, with the same text.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, TextIO

EVENTS = logging.getLogger("bff.gateway")


@dataclass(slots=True)
class AccessRecord:
    request_id: str
    method: str
    path: str  # raw path only, never the query
    route: str
    status: int
    duration_ms: float  # written with three decimals
    upstream_ms: float | None
    bytes_in: int
    bytes_out: int
    refreshed: bool
    client: str


_RESERVED = frozenset({"time", "level", "logger", "event", "pid"})
_MAX_PENDING_LINES = 256  # a turn that logs more than this writes early
_dumps = json.dumps


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds; the seconds part is formatted once."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int((created - second) * 1000):03d}Z"


def _json_str(text: str) -> str:
    """``text`` as a JSON string; most values need no escaping, and checking is cheaper."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return _dumps(text)


def _access_json(access: AccessRecord, stamp: str, pid: int | None, logger: str) -> str:
    """The access line, field order fixed; strings JSON-escaped (a path may hold quotes)."""
    upstream = access.upstream_ms
    return (
        f'{{"time":"{stamp}","level":"info","logger":{_json_str(logger)},'
        f'"pid":{"null" if pid is None else pid},"event":"request",'
        f'"request_id":{_json_str(access.request_id)},"method":{_json_str(access.method)},'
        f'"path":{_json_str(access.path)},"route":{_json_str(access.route)},'
        f'"status":{access.status:d},"duration_ms":{access.duration_ms:.3f},'
        f'"upstream_ms":{"null" if upstream is None else f"{upstream:.3f}"},'
        f'"bytes_in":{access.bytes_in:d},"bytes_out":{access.bytes_out:d},'
        f'"refreshed":{"true" if access.refreshed else "false"},'
        f'"client":{_json_str(access.client)}}}'
    )


def _access_text(access: AccessRecord, created: float) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(created))
    upstream = f" upstream={access.upstream_ms:.1f}ms" if access.upstream_ms is not None else ""
    return (
        f"{stamp} {access.status} {access.method} {access.path} "
        f"route={access.route} {access.duration_ms:.1f}ms{upstream} "
        f"in={access.bytes_in} out={access.bytes_out} client={access.client} "
        f"id={access.request_id}" + (" refreshed" if access.refreshed else "")
    )


def _where(tb: Any) -> list[str]:
    """The innermost frames as ``file:line:function``: code locations, no data."""
    if tb is None:
        return []
    return [
        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}:{frame.name}"
        for frame in traceback.extract_tb(tb)[-6:]
    ]


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format_access(self, access: AccessRecord, created: float, pid: int | None) -> str:
        return _access_json(access, self._clock.stamp(created), pid, "bff.access")

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, AccessRecord):
            return _access_json(
                access, self._clock.stamp(record.created), record.process, record.name
            )
        entry: dict[str, Any] = {
            "time": self._clock.stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "event": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                entry[key if key not in _RESERVED else f"field_{key}"] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            entry["where"] = _where(record.exc_info[2])
        return _dumps(entry, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def format_access(self, access: AccessRecord, created: float, pid: int | None) -> str:
        return _access_text(access, created)

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, AccessRecord):
            return _access_text(access, record.created)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = getattr(record, "fields", None) or {}
        text = " ".join(f"{k}={v}" for k, v in extra.items())
        error = ""
        if record.exc_info and record.exc_info[0] is not None:
            error = f" error={record.exc_info[0].__name__}"
        return f"{stamp} {record.levelname.lower()} {record.getMessage()} {text}{error}".rstrip()


class _AccessSink:
    """Where the fast path writes: the handler setup_logging installed, while it is the only one.

    Lines are gathered here and leave in one write() per event-loop turn. The
    stream's own buffering cannot be relied on for that: containers usually
    run Python with PYTHONUNBUFFERED=1, where every line would be a system
    call of its own (measured: a third of all the gateway's writes). The
    handler's own (re-entrant) lock guards the lines, so that an event logged
    from any thread is written after the access lines gathered before it.
    """

    __slots__ = ("flush_loop", "format", "handler", "pending", "pid", "stream")

    def __init__(self, handler: _OrderedStreamHandler, formatter: Any) -> None:
        self.handler = handler
        self.stream = handler.stream
        self.format = formatter.format_access
        self.pid = os.getpid()
        self.pending: list[str] = []
        # The loop a flush is scheduled on; None once it ran. A loop that is
        # stopped or closed before running it does not leave lines stranded:
        # the next line on another loop schedules again.
        self.flush_loop: asyncio.AbstractEventLoop | None = None

    def write(self, access: AccessRecord) -> None:
        line = self.format(access, time.time(), self.pid)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.handler.lock:  # type: ignore[union-attr]  # StreamHandler has one
            self.pending.append(line)
            if loop is None or len(self.pending) >= _MAX_PENDING_LINES:
                self.flush()  # no loop would come back to it; or a turn that logs a lot
            elif self.flush_loop is not loop:
                self.flush_loop = loop
                loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.handler.lock:  # type: ignore[union-attr]
            lines, self.pending = self.pending, []
            self.flush_loop = None
            if lines:
                # stdout gone (closed pipe): never fail a request over a log line.
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()


class _OrderedStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that first lets out the access lines gathered before an event."""

    sink: _AccessSink | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.sink is not None:
            self.sink.flush()
        super().emit(record)


ACCESS = logging.getLogger("bff.access")
_sink: _AccessSink | None = None


def _sink_owns_access(sink: _AccessSink) -> bool:
    """Records of ``bff.access`` would reach the sink's handler and no other: it is
    the root logger's only handler, and none sits on the way (tests add handlers
    on the way, or stop propagation; anyone may reconfigure logging)."""
    handlers = logging.root.handlers
    if len(handlers) != 1 or handlers[0] is not sink.handler:
        return False
    logger: logging.Logger | None = ACCESS
    while logger is not None and logger is not logging.root:
        if logger.handlers or not logger.propagate:
            return False
        logger = logger.parent
    return True


def log_access(access: AccessRecord) -> None:
    """Log one access record (the caller checked ``ACCESS.isEnabledFor(logging.INFO)``).

    Once :func:`setup_logging` has configured the process, and while nobody
    has added handlers since, the line skips the logging machinery; anywhere
    else (tests, embedding) the record takes the ordinary logging path.
    """
    sink = _sink
    if sink is not None and _sink_owns_access(sink):
        sink.write(access)
        return
    ACCESS.info("request", extra={"access": access})


@atexit.register
def _flush_at_exit() -> None:
    """The access lines of the very last loop turn."""
    if _sink is not None:
        _sink.flush()


def setup_logging(level: str, fmt: str, access_log: bool = True) -> None:
    handler = _OrderedStreamHandler(sys.stdout)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    ACCESS.disabled = not access_log
    global _sink
    _sink = handler.sink = _AccessSink(handler, formatter)
    # aiohttp's own loggers print request lines and tracebacks (which may quote
    # headers): keep them quiet. asyncio's "Task exception was never retrieved"
    # and "Unclosed ..." reports carry reprs and tracebacks: the same.
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Python's own last-resort report of an uncaught exception is a traceback
    # on stderr, not JSON: log its type and location instead.
    sys.excepthook = _excepthook


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        return
    EVENTS.critical("uncaught exception", exc_info=(kind, value, tb))


def event(message: str, level: int = logging.INFO, **extra: Any) -> None:
    EVENTS.log(level, message, extra={"fields": extra})
