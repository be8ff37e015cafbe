"""Static file routes with a single-page-app fallback to index.html."""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from gateway.errors import GatewayError

_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class StaticSite:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.index = self.root / "index.html"

    def resolve(self, remainder: str) -> Path:
        """The file for a raw remainder; unknown paths fall back to index.html.

        Dot segments were rejected before routing; the containment check
        stays as a second line of defence (symlinks, odd encodings).
        """
        relative = unquote(remainder).lstrip("/")
        if relative:
            candidate = (self.root / relative).resolve()
            with contextlib.suppress(OSError):  # e.g. a name too long for the filesystem
                if candidate.is_relative_to(self.root) and candidate.is_file():
                    return candidate
        return self.index

    async def serve(self, request: web.BaseRequest, remainder: str) -> web.StreamResponse:
        path = self.resolve(remainder)
        if not path.is_file():
            raise GatewayError(404, "not_found", "no such file")
        headers = dict(_HEADERS)
        if path == self.index:
            headers["Cache-Control"] = "no-cache"
        return web.FileResponse(path, headers=headers)
