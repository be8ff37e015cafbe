"""Reading provider answers: dotted field paths, JWT claims, token scrubbing. Pure.

The gateway does not verify the access token (the upstream does); it reads
the JWT payload only to learn the expiry and the claims shown by
``/auth/<p>/session``.
"""

from __future__ import annotations

import base64
import binascii
import json
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
    except (ValueError, binascii.Error):
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
    expires_in = get_path(answer, expires_in_field) if expires_in_field else None
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        expires_at = now + float(expires_in)
    elif isinstance(payload.get("exp"), int | float):
        expires_at = float(payload["exp"])
    claims = {name: payload[name] for name in claim_names if name in payload}
    return Tokens(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        expires_at=expires_at,
        claims=claims,
    )


_TOKEN_KEYS = frozenset({"id_token", "access_token", "refresh_token"})


def scrub(answer: Any, field_paths: Iterable[str], secrets: Iterable[str]) -> Any:
    """The answer minus every token: the configured fields, any ``*_token`` key of
    the usual names, and any string equal to (or containing) a known token."""
    secret_values = [s for s in secrets if s]
    top_level = {p for p in field_paths if "." not in p}
    nested = [p.split(".") for p in field_paths if "." in p]

    def clean(node: Any, path: list[str]) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                here = [*path, str(key)]
                if (not path and key in top_level) or here in nested or key in _TOKEN_KEYS:
                    continue
                cleaned = clean(value, here)
                if cleaned is not _MISSING:
                    out[key] = cleaned
            return out
        if isinstance(node, list):
            return [c for c in (clean(item, path) for item in node) if c is not _MISSING]
        if isinstance(node, str) and any(secret in node for secret in secret_values):
            return _MISSING
        return node

    result = clean(answer, [])
    return {} if result is _MISSING else result
