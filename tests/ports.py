"""Loopback ports for servers the tests and benchmarks start.

Why not "bind to port 0, read the port, close": the kernel hands that port out
again, both to the next bind(0) (so a gateway's public and admin listeners
could be given the same port) and to any outgoing connection as its local
port (so a connection opened meanwhile could take it). Both were seen in CI
as "address already in use". Here a process hands out each port once, from
below the kernel's ephemeral range, where neither can happen; a port that
something else holds is skipped.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

_LOWEST = 10_000
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_HIGHEST = max(_LOWEST + 1000, _ephemeral_low()) - 1
# Each process starts at its own place, so that runs side by side (a test and
# the subprocess it starts, two checkouts) rarely try the same ports.
_next = random.Random(os.getpid()).randrange(_LOWEST, _HIGHEST)


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))  # no SO_REUSEADDR: TIME_WAIT counts as taken
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nobody holds now, never the same twice in this process."""
    global _next
    with _lock:
        for _ in range(_HIGHEST - _LOWEST):
            port = _next
            _next = _LOWEST if _next >= _HIGHEST else _next + 1
            if _is_free(port):
                return port
    raise RuntimeError(f"no free loopback port in {_LOWEST}-{_HIGHEST}")
