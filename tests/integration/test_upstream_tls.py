"""TLS on both sides (SPEC §2 `routes[].tls`, `server.tls`; §4.4).

A local CA made with trustme signs the certificates. An https upstream is
accepted only when the route names that CA; the system CAs never vouch for it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.support import config_dict, running_app, running_gateway


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def upstream_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "scheme": request.scheme,
                "path": request.raw_path,
                "proto": request.headers.get("X-Forwarded-Proto"),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def get_through_gateway(routes: list[dict[str, Any]], path: str) -> tuple[int, Any]:
    """Run a gateway with ``routes``, GET ``path`` on it; return (status, JSON body)."""
    async with (
        running_gateway(config_dict(routes)) as gateway,
        aiohttp.ClientSession() as http,
        http.get(gateway.url + path) as response,
    ):
        return response.status, await response.json()


@pytest.fixture
async def https_upstream(ca: trustme.CA) -> AsyncIterator[str]:
    async with running_app(upstream_app(), ssl_context=server_context(ca)) as url:
        assert url.startswith("https://")
        yield url


async def test_https_upstream_verified_with_the_routes_ca_file(
    https_upstream: str, ca_file: Path
) -> None:
    routes = [{"path": "/api/", "upstream": https_upstream + "/", "tls": {"ca_file": str(ca_file)}}]
    status, payload = await get_through_gateway(routes, "/api/a%2Fb?x=1")
    assert status == 200
    assert payload == {"scheme": "https", "path": "/a%2Fb?x=1", "proto": "http"}


async def test_https_upstream_without_ca_file_is_not_trusted(https_upstream: str) -> None:
    routes = [{"path": "/api/", "upstream": https_upstream + "/"}]
    async with running_gateway(config_dict(routes)) as gateway, aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/api/x") as response:
            assert response.status == 502
            payload = await response.json()
        registry = gateway.listeners.gateway.metrics.registry
    assert payload["error"] == "upstream_unavailable"
    assert payload["message"]
    # It failed on the certificate (the upstream was up and listening), not on the connection.
    labels = {"route": "/api/", "kind": "tls"}
    assert registry.get_sample_value("bff_upstream_errors_total", labels) == 1


async def test_https_upstream_signed_by_another_ca_is_not_trusted(
    https_upstream: str, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    routes = [{"path": "/api/", "upstream": https_upstream + "/", "tls": {"ca_file": str(other)}}]
    status, payload = await get_through_gateway(routes, "/api/x")
    assert status == 502
    assert payload["error"] == "upstream_unavailable"


async def test_certificate_for_another_host_is_not_trusted(ca: trustme.CA, ca_file: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.example.com").configure_cert(context)
    async with running_app(upstream_app(), ssl_context=context) as upstream:
        routes = [{"path": "/api/", "upstream": upstream + "/", "tls": {"ca_file": str(ca_file)}}]
        status, payload = await get_through_gateway(routes, "/api/x")
    assert status == 502
    assert payload["error"] == "upstream_unavailable"


async def test_gateway_serves_https_with_server_tls(
    ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    async with running_app(upstream_app()) as upstream:
        routes = [{"path": "/api/", "upstream": upstream + "/"}]
        server = {"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}}
        async with running_gateway(config_dict(routes, server=server)) as gateway:
            url = f"https://{gateway.config.server.listen}/api/x"
            trusting = ssl.create_default_context(cafile=str(ca_file))
            async with aiohttp.ClientSession() as http:
                async with http.get(url, ssl=trusting) as response:
                    assert response.status == 200
                    answer = await response.json()
                # A client that does not trust the CA refuses the gateway's certificate.
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    async with http.get(url, ssl=ssl.create_default_context()):
                        pass
                # Plain http on the TLS port is not served.
                with pytest.raises(aiohttp.ClientError):
                    async with http.get(url.replace("https://", "http://")) as plain:
                        await plain.read()
    assert answer == {"scheme": "http", "path": "/x", "proto": "https"}
