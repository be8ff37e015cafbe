"""The gateway's cookies on the wire: names, attributes, expiry, reading them back. Pure.

Shared by the session cookies (``SessionManager``) and the oauth2 login-flow
cookies (``FlowCookies``), which differ only in their SameSite and lifetime.
"""

from __future__ import annotations

from gateway.headers import Headers

_EXPIRED_DATE = "Thu, 01 Jan 1970 00:00:00 GMT"


def name_base(cookie_prefix: str, secure: bool) -> str:
    """``__Host-<prefix>`` (Secure, Path=/, no Domain: the browser enforces all three),
    or plain ``<prefix>`` for plain-http development."""
    return f"__Host-{cookie_prefix}" if secure else cookie_prefix


def cookie_attributes(secure: bool, same_site: str) -> str:
    parts = ["Path=/", "HttpOnly", f"SameSite={same_site}"]
    if secure:
        parts.insert(1, "Secure")
    return "; ".join(parts)


def expired_cookie(name: str, attributes: str) -> str:
    """The Set-Cookie line that removes ``name`` (same attributes as when it was set)."""
    return f"{name}=; Max-Age=0; Expires={_EXPIRED_DATE}; {attributes}"


def cookies_named(headers: Headers, prefix: str) -> dict[str, str]:
    """The cookies whose names start with ``prefix``; the first occurrence of a name wins.

    A plain split rather than a full RFC 6265 parse of every cookie: only the
    gateway's names matter, and its values never need quoting.
    """
    found: dict[str, str] = {}
    for line in headers.getall("Cookie", ()):
        for pair in line.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.startswith(prefix) and name not in found:
                found[name] = value
    return found
