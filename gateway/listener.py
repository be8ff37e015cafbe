"""The public listener's low-level aiohttp server, with JSON for parser errors.

A request that aiohttp's parser rejects before any handler runs (an
over-long header line, a bad character) gets aiohttp's own plain-text error
page, and that page quotes part of the offending line: with a Cookie line,
part of a sealed session value. SPEC §5.1 forbids cookie values in any
response, so those pages are replaced by the JSON of SPEC §4.4 (status kept,
nothing quoted, connection closed).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web, web_protocol

from gateway.errors import GatewayError, error_response


class _JsonErrorsHandler(web_protocol.RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response already started: only close
            return super().handle_error(request, status, exc, message)
        if status < 500:
            error = GatewayError(status, "bad_request", "the request could not be parsed")
        else:
            error = GatewayError(500, "internal_error", "the gateway failed to handle the request")
        response = error_response(error)
        response.force_close()
        return response


class PublicServer(web.Server):
    """``web.Server`` whose connections render parser errors as JSON."""

    def __call__(self) -> web_protocol.RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return _JsonErrorsHandler(self, loop=self._loop, **kwargs)
