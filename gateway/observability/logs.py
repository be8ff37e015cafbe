"""Logs: one JSON object per line (SPEC §8), redaction by construction.

Nothing the gateway logs is built from headers, cookies, bodies or tokens:
the access record below has a fixed set of fields, each a number or a short
string the gateway itself chose (route, status) or the raw path, whose query
string is never logged because injected secrets may live there. Other events
carry only the message and an explicit, small ``fields`` mapping.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

ACCESS = logging.getLogger("bff.access")
EVENTS = logging.getLogger("bff.gateway")


@dataclass(slots=True)
class AccessRecord:
    request_id: str
    method: str
    path: str  # raw path only, never the query
    route: str
    status: int
    duration_ms: float
    upstream_ms: float | None
    bytes_in: int
    bytes_out: int
    refreshed: bool
    client: str


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, AccessRecord):
            entry["event"] = "request"
            entry.update(asdict(access))
        else:
            entry["event"] = record.getMessage()
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict):
                entry.update(fields)
            if record.exc_info and record.exc_info[0] is not None:
                # The type only: a traceback's locals and messages may hold secrets.
                entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        access = getattr(record, "access", None)
        if isinstance(access, AccessRecord):
            return (
                f"{stamp} {access.status} {access.method} {access.path} "
                f"route={access.route} {access.duration_ms:.1f}ms id={access.request_id}"
                + (" refreshed" if access.refreshed else "")
            )
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        error = ""
        if record.exc_info and record.exc_info[0] is not None:
            error = f" error={record.exc_info[0].__name__}"
        return f"{stamp} {record.levelname.lower()} {record.getMessage()} {extra}{error}".rstrip()


def setup_logging(level: str, fmt: str, access_log: bool = True) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    ACCESS.disabled = not access_log
    # aiohttp's own loggers print request lines and tracebacks: keep them quiet.
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    EVENTS.log(level, message, extra={"fields": fields})
