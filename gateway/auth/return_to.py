"""Where a login or logout sends the browser back to: a local path, never elsewhere.

``return_to`` comes from the address bar, so anyone can write it: anything a
browser could read as another origin becomes ``/``. Browsers treat ``\\`` as
``/`` and drop tabs and newlines inside URLs, and a path may be
percent-decoded once more by a framework on the way, so the checks run on the
value as it is and as it decodes.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from aiohttp import web

MAX_LENGTH = 2048
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def local_return_to(value: str | None) -> str:
    """``value`` when it is a local path (``/x``, ``/x?y#z``), else ``/``."""
    if not value or len(value) > MAX_LENGTH:
        return "/"
    decoded = value
    for _ in range(3):  # as it is, and decoded up to twice
        if not _looks_local(decoded):
            return "/"
        decoded = unquote(decoded)
    if not _looks_local(decoded):
        return "/"
    # Only printable ASCII goes into a Location header; the rest stays encoded.
    encoded = quote(value, safe="/?#&=%:@!$'()*+,;-._~")
    # Encoding can make it up to nine times longer: bounded again, so that the login
    # flow cookie carrying it stays within what a browser keeps (4096 bytes).
    return encoded if len(encoded) <= MAX_LENGTH else "/"


def _looks_local(path: str) -> bool:
    return (
        path.startswith("/")
        and not path.startswith(("//", "/\\"))
        and "\\" not in path
        and not _CONTROL.search(path)
    )


def with_error(path: str, code: str) -> str:
    """``path`` with ``bff_error=<code>`` added to its query (before any fragment)."""
    base, hash_mark, fragment = path.partition("#")
    joiner = "&" if "?" in base else "?"
    return f"{base}{joiner}bff_error={code}{hash_mark}{fragment}"


def redirect(location: str) -> web.Response:
    """The 302 of a login or logout step (never cached: it may set or clear cookies)."""
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
