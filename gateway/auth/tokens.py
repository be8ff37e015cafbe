"""Reading provider answers: dotted field paths, JWT claims, token scrubbing. Pure.

The gateway does not verify the access token (the upstream does); it reads
the JWT payload only to learn the expiry and the claims shown by
``/auth/<p>/session``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Iterable
from typing import Any

from gateway.sessions.model import Tokens

_MISSING = object()


def get_path(data: Any, dotted: str) -> Any:
    """``get_path({"data": {"t": 1}}, "data.t") == 1``; missing → None."""
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def jwt_payload(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload = json.loads(raw)
    except (ValueError, binascii.Error, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def tokens_from_answer(
    answer: Any,
    *,
    access_field: str,
    refresh_field: str,
    expires_in_field: str | None,
    claim_names: Iterable[str],
    now: float | None = None,
) -> Tokens | None:
    """The tokens in a login or refresh answer, or None without an access token."""
    access = get_path(answer, access_field)
    if not isinstance(access, str) or not access:
        return None
    refresh = get_path(answer, refresh_field)
    now = time.time() if now is None else now
    payload = jwt_payload(access) or {}
    expires_at: float | None = None
    expires_in = _number(get_path(answer, expires_in_field)) if expires_in_field else None
    exp = _number(payload.get("exp"))
    if expires_in is not None:
        expires_at = now + expires_in
    elif exp is not None:
        expires_at = exp
    claims = {name: payload[name] for name in claim_names if name in payload}
    return Tokens(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        expires_at=expires_at,
        claims=claims,
    )


def _number(value: Any) -> float | None:
    """A finite number of seconds, from a JSON number or a numeric string; else None.

    Booleans are not numbers here (``True`` would otherwise be 1 second), and NaN or
    infinity would make every expiry comparison false.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):  # not numeric, or an int too big for a float
        return None
    return number if math.isfinite(number) else None


_TOKEN_KEYS = frozenset({"id_token", "access_token", "refresh_token"})


def scrub(answer: Any, field_paths: Iterable[str], secrets: Iterable[str]) -> Any:
    """The answer minus every token: the configured fields, any ``*_token`` key of
    the usual names, and any string (value or key) equal to or containing a token.

    The tokens are the given ``secrets`` plus every string found at a configured
    field or under a usual token key (an ``id_token`` is not handed in by the
    caller, yet a copy of it elsewhere in the answer must go too).
    """
    paths = list(field_paths)
    top_level = {p for p in paths if "." not in p}
    nested = [p.split(".") for p in paths if "." in p]
    secret_values = {s for s in secrets if s}
    for path in paths:
        found = get_path(answer, path)
        if isinstance(found, str) and found:
            secret_values.add(found)

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _TOKEN_KEYS and isinstance(value, str) and value:
                    secret_values.add(value)
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(answer)

    def holds_secret(text: str) -> bool:
        return any(secret in text for secret in secret_values)

    def clean(node: Any, path: list[str]) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                here = [*path, str(key)]
                if (not path and key in top_level) or here in nested or key in _TOKEN_KEYS:
                    continue
                if isinstance(key, str) and holds_secret(key):
                    continue
                cleaned = clean(value, here)
                if cleaned is not _MISSING:
                    out[key] = cleaned
            return out
        if isinstance(node, list):
            return [c for c in (clean(item, path) for item in node) if c is not _MISSING]
        if isinstance(node, str) and holds_secret(node):
            return _MISSING
        return node

    result = clean(answer, [])
    return {} if result is _MISSING else result
