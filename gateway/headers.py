"""Header rewriting in both directions (SPEC §4.1, §4.2).

RFC 9110 §7.6.1: a proxy removes the hop-by-hop headers and every header the
``Connection`` header names. The gateway applies that rule to what the client
sent *before* adding what it injects, so a ``Connection: X-Api-Key`` from the
browser can never remove a server-held secret.
"""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiohttp import hdrs
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web import StreamResponse
from multidict import CIMultiDict, CIMultiDictProxy

# The Server header of the gateway's own answers (and of an upstream's that has
# none): no product versions, where aiohttp's default names aiohttp's and Python's.
SERVER = "bff-gateway"


def name_the_server(response: StreamResponse) -> None:
    """Replace the Server header aiohttp added to a response that had none.

    By identity: aiohttp's default is its own string object, so an upstream's
    Server header (read off the wire) is never taken for it, even when equal.
    """
    headers = response.headers
    if headers.get(hdrs.SERVER) is SERVER_SOFTWARE:
        headers[hdrs.SERVER] = SERVER


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Set by the gateway itself or meaningless past this hop.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-request-id",
    "cookie",
}
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Headers = CIMultiDictProxy[str] | CIMultiDict[str]


def connection_named(headers: Headers) -> set[str]:
    """Lower-cased header names listed in every Connection header line."""
    named: set[str] = set()
    for line in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in line.split(",") if token.strip())
    return named


@dataclass(slots=True)
class ForwardedFor:
    """Where the request came from, as the gateway will tell the upstream."""

    client_ip: str
    proto: str
    host: str
    trusted: bool  # peer is a trusted proxy: keep the chain it sent


class _RequestIds:
    """Fresh request ids: 64 random bits per process and 64 per request.

    Ids only need to be unique, not secret: a seeded pseudo-random generator
    is several times cheaper than the system's randomness on every request,
    and unlike a counter it does not tell a client how busy the gateway is.
    The per-process half keeps workers and restarts apart; a forked child
    draws new seeds (``os.register_at_fork``).
    """

    __slots__ = ("_bits", "_prefix")

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._bits = random.Random(os.urandom(16)).getrandbits

    def next(self) -> str:
        return f"{self._prefix}{self._bits(64):016x}"


_REQUEST_IDS = _RequestIds()
os.register_at_fork(after_in_child=_REQUEST_IDS.restart)


def request_id(headers: Headers) -> str:
    """The client's X-Request-Id when it is sane, else a fresh one (32 hex digits)."""
    incoming = headers.get("X-Request-Id")
    # fullmatch: with match, '$' would let a trailing newline through.
    if incoming is not None and _REQUEST_ID_RE.fullmatch(incoming):
        return incoming
    return _REQUEST_IDS.next()


@functools.cache
def _gateway_cookie_prefixes(cookie_prefix: str) -> tuple[str, ...]:
    # "-": sessions (<prefix>-<provider>); "~": oauth2 login flows (<prefix>~flow-<hash>).
    return tuple(
        f"{host}{cookie_prefix}{mark}" for host in ("__Host-", "", "__host-") for mark in "-~"
    )


def is_gateway_cookie(name: str, cookie_prefix: str) -> bool:
    return name.startswith(_gateway_cookie_prefixes(cookie_prefix))


def writable(value: str) -> bool:
    """False for text that was not UTF-8 on the wire.

    aiohttp decodes header bytes as UTF-8 with surrogateescape, and its header
    writer silently skips the surrogates that stand for the other bytes: passed
    on, ``caf\xe9`` would arrive as ``caf`` and a cookie named ``\x80bff-demo``
    as the gateway's own. Such a value is not passed on at all.
    """
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def filter_cookie_header(lines: Iterable[str], cookie_prefix: str) -> str | None:
    """The client's cookies minus the gateway's own, or None when none remain."""
    kept = []
    for line in lines:
        for pair in line.split(";"):
            name = pair.split("=", 1)[0].strip()
            if name and not is_gateway_cookie(name, cookie_prefix) and writable(pair):
                kept.append(pair.strip())
    return "; ".join(kept) or None


def upstream_request_headers(
    incoming: Headers,
    *,
    forwarded: ForwardedFor,
    req_id: str,
    drop: frozenset[str],
    cookie_prefix: str,
    forward_cookies: bool,
    inject: Mapping[str, str],
    authorization: str | None,
) -> CIMultiDict[str]:
    """Headers for the upstream request.

    ``drop`` holds extra lower-case names to remove (the CSRF header; and
    ``authorization`` on a session route). ``Host`` is left out: the caller
    sets the upstream's own (``Upstream.host_header``).
    """
    named = connection_named(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in drop or lower in named or not writable(value):
            continue
        out.add(name, value)

    if forward_cookies and "cookie" not in named:
        cookies = filter_cookie_header(incoming.getall("Cookie", ()), cookie_prefix)
        if cookies:
            out["Cookie"] = cookies

    # add(), not assignment: _REQUEST_DROP already removed the client's copies.
    if forwarded.trusted:
        chain = from_trusted_proxy(incoming, named, "X-Forwarded-For")
        out.add(
            "X-Forwarded-For", f"{chain}, {forwarded.client_ip}" if chain else forwarded.client_ip
        )
        out.add(
            "X-Forwarded-Proto",
            from_trusted_proxy(incoming, named, "X-Forwarded-Proto") or forwarded.proto,
        )
        out.add(
            "X-Forwarded-Host",
            from_trusted_proxy(incoming, named, "X-Forwarded-Host")
            or (forwarded.host if writable(forwarded.host) else ""),
        )
    else:
        out.add("X-Forwarded-For", forwarded.client_ip)
        out.add("X-Forwarded-Proto", forwarded.proto)
        out.add("X-Forwarded-Host", forwarded.host if writable(forwarded.host) else "")
    out.add("X-Request-Id", req_id)

    for name, value in inject.items():
        out[name] = value
    if authorization is not None:
        out["Authorization"] = authorization
    return out


def from_trusted_proxy(incoming: Headers, named: set[str], name: str) -> str | None:
    """A trusted proxy's value of ``name``: its lines as one list (RFC 9110 §5.3);
    none when its Connection header names it."""
    if name.lower() in named:
        return None
    lines = [line.strip() for line in incoming.getall(name, ()) if line.strip() and writable(line)]
    return ", ".join(lines) or None


def response_headers(
    upstream: Headers, cookie_prefix: str, out: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop and any Set-Cookie for our names,
    added to ``out`` (a response's own headers: no copy) or to a new multidict."""
    named = connection_named(upstream)
    if out is None:
        out = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or not writable(value):
            continue
        if lower == "set-cookie" and _sets_gateway_cookie(value, cookie_prefix):
            continue
        out.add(name, value)
    return out


def _sets_gateway_cookie(set_cookie: str, cookie_prefix: str) -> bool:
    # Browsers take the name as the text before the first '='; recent ones
    # compare the __Host- prefix without regard to case, so we do too.
    name = set_cookie.split("=", 1)[0].strip().lower()
    return is_gateway_cookie(name, cookie_prefix.lower())
