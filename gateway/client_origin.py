"""Where a request came from: the client's address and the origin the browser used."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

from gateway.headers import ForwardedFor, connection_named, from_trusted_proxy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientOrigin:
    def __init__(self, trusted: Sequence[Network], scheme: str) -> None:
        self.trusted = tuple(trusted)
        self.scheme = scheme

    def _trusted_peer(self, request: web.BaseRequest) -> bool:
        if not self.trusted or not request.remote:
            return False
        try:
            address = ipaddress.ip_address(request.remote)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def forwarded_for(self, request: web.BaseRequest) -> ForwardedFor:
        return ForwardedFor(
            client_ip=request.remote or "",
            proto=self.scheme,
            host=request.headers.get("Host", ""),
            trusted=self._trusted_peer(request),
        )

    def own_origin(self, request: web.BaseRequest, forwarded: ForwardedFor | None = None) -> str:
        """The origin the browser used: from a trusted proxy's X-Forwarded-Proto/-Host
        (read by the same rule as when forwarding them), else this listener's."""
        forwarded = forwarded or self.forwarded_for(request)
        proto, host = forwarded.proto, forwarded.host
        if forwarded.trusted:
            headers = request.headers
            named = connection_named(headers)
            proto = from_trusted_proxy(headers, named, "X-Forwarded-Proto") or proto
            host = from_trusted_proxy(headers, named, "X-Forwarded-Host") or host
        return f"{proto.split(',')[0].strip()}://{host.split(',')[0].strip()}"
