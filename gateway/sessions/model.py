"""The session: the tokens one browser holds for one provider. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Tokens:
    """What a provider's login or refresh answer yields."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float | None
    claims: dict[str, Any]
    # OpenID Connect: kept for the end-session request's id_token_hint, never shown.
    id_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Session:
    provider: str
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float | None  # access token expiry (unix), None when unknown
    created_at: float
    last_seen: float
    claims: dict[str, Any]
    id_token: str | None = field(default=None, repr=False)

    @classmethod
    def start(cls, provider: str, tokens: Tokens, now: float) -> Session:
        return cls(
            provider=provider,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            expires_at=tokens.expires_at,
            created_at=now,
            last_seen=now,
            claims=tokens.claims,
            id_token=tokens.id_token,
        )

    def with_tokens(self, tokens: Tokens, now: float) -> Session:
        return replace(
            self,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token or self.refresh_token,
            expires_at=tokens.expires_at,
            claims=tokens.claims or self.claims,
            id_token=tokens.id_token or self.id_token,
            last_seen=now,
        )

    def touched(self, now: float) -> Session:
        return replace(self, last_seen=now)

    def to_bytes(self) -> bytes:
        fields: list[Any] = [
            _FORMAT,
            self.provider,
            self.access_token,
            self.refresh_token,
            self.expires_at,
            self.created_at,
            self.last_seen,
            self.claims,
        ]
        if self.id_token is not None:  # only OpenID Connect sessions carry the ninth field
            fields.append(self.id_token)
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Session | None:
        """Decode, or None for anything that is not a session of this format."""
        try:
            fields = json.loads(data)
        except (ValueError, TypeError):
            return None
        if not isinstance(fields, list) or len(fields) not in (8, 9):
            return None
        fmt, provider, access, refresh, expires_at, created, seen, claims = fields[:8]
        id_token = fields[8] if len(fields) == 9 else None
        valid = (
            fmt == _FORMAT
            and isinstance(provider, str)
            and isinstance(access, str)
            and (refresh is None or isinstance(refresh, str))
            and (expires_at is None or isinstance(expires_at, int | float))
            and isinstance(created, int | float)
            and isinstance(seen, int | float)
            and isinstance(claims, dict)
            and (id_token is None or isinstance(id_token, str))
        )
        if not valid:
            return None
        return cls(provider, access, refresh, expires_at, created, seen, claims, id_token)
