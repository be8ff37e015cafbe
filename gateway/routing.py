"""Request-target checks and longest-prefix routing on the raw path (SPEC §4). Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from gateway.config import Route
from gateway.errors import bad_request

# A raw control byte or DEL (anywhere in the target), a backslash (in the path:
# browsers send a query's backslash as it is); and their percent-encoded forms.
_FORBIDDEN_RAW = re.compile(r"[\x00-\x1f\x7f]")
_FORBIDDEN_ENCODED = re.compile(r"%(?:[01][0-9a-fA-F]|7[fF]|5[cC])")
_DOT_SEGMENTS = {b".", b".."}


def split_target(raw_target: str) -> tuple[str, str]:
    """Split an origin-form request target into (raw path, raw query or '').

    Rejects absolute-form (``http://host/…``), authority-form (``host:443``)
    and asterisk-form targets, dot segments in any spelling, backslashes and
    control characters, plain or percent-encoded. Nothing is decoded in the
    value returned: the path goes upstream exactly as the client wrote it.
    """
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise bad_request("the request target must be a path")
    path, _, query = raw_target.partition("?")
    if "#" in raw_target:
        raise bad_request("the request target must not contain a fragment")
    if _FORBIDDEN_RAW.search(raw_target) or "\\" in path or _FORBIDDEN_ENCODED.search(path):
        raise bad_request("the path contains a forbidden character")
    if "." in path or "%" in path:
        _reject_dot_segments(path)
    return path, query


def _reject_dot_segments(path: str) -> None:
    # Decode and split again on both separators, so that `..%2F`, `%2e%2E` and
    # `.%5c` are caught however an upstream decodes them; decode up to three
    # times for upstreams that decode twice (`%252e%252e`), and drop `;params`
    # because servlet containers read `..;` as `..`.
    for segment in path.split("/"):
        decoded = segment.encode()
        for _ in range(4):  # the raw segment, then up to three decodings
            for part in re.split(rb"[/\\]", decoded):
                if part.split(b";", 1)[0] in _DOT_SEGMENTS:
                    raise bad_request("the path contains a dot segment")
            if b"%" not in decoded:
                break
            decoded = unquote_to_bytes(decoded)


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    index: int
    remainder: str  # raw path after the route prefix: '' or starting with '/'


class RouteTable:
    """Longest matching prefix wins; a prefix matches on a segment boundary.

    ``/api/demo/`` matches ``/api/demo``, ``/api/demo/`` and ``/api/demo/x``,
    never ``/api/demonstration``.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        entries = [(r.path.rstrip("/"), i, r) for i, r in enumerate(routes)]
        self._entries = sorted(entries, key=lambda e: len(e[0]), reverse=True)

    def match(self, raw_path: str) -> Match | None:
        for prefix, index, route in self._entries:
            if raw_path.startswith(prefix):
                rest = raw_path[len(prefix) :]
                if not rest or rest[0] == "/":
                    return Match(route, index, rest)
        return None


def upstream_path(base_path: str, remainder: str) -> str:
    """Append the raw remainder to the upstream's base path without doubling '/'."""
    if not remainder:
        return base_path or "/"
    return base_path.rstrip("/") + remainder
