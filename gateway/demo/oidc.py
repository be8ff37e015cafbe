"""The demo's OpenID Connect provider: oidc-provider-mock (Authlib underneath) on a thread.

What the demo (and the test suite, which builds on this) adds to the package,
using Authlib's own parts:

- an RFC 7009 revocation endpoint at ``/oauth2/revoke`` (the package has none),
  on the mock's own token storage;
- the access token lifetime also for tokens from a refresh (the package sets it
  for the authorization_code grant only; Authlib's per-grant table is given the
  same value while the app is built, then restored).

Needs the ``demo`` extra (``pip install 'bff-gateway[demo]'``); ``make run``
installs it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import flask
import werkzeug.serving

with warnings.catch_warnings():
    # Authlib deprecates modules the package still imports: not the demo's concern.
    # (Authlib installs an "always" filter for its warnings on import: ours goes after.)
    import authlib.deprecate  # type: ignore[import-untyped]  # noqa: F401

    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.oauth2.rfc6750 import BearerTokenGenerator  # type: ignore[import-untyped]
    from authlib.oauth2.rfc7009 import RevocationEndpoint  # type: ignore[import-untyped]
    from oidc_provider_mock import _app as mock_internals  # type: ignore[import-untyped]
    from oidc_provider_mock import app as mock_app

WSGIApp = Callable[..., Any]


class _Revocation(RevocationEndpoint):  # type: ignore[misc]
    """Authlib's RFC 7009 endpoint on the mock's token storage."""

    CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")

    def authenticate_token(self, request: Any, client: Any) -> Any:
        # The mock's access tokens do not implement check_client (it raises);
        # refresh tokens do, and are checked.
        self.check_params(request, client)
        token = self.query_token(request.form["token"], request.form.get("token_type_hint"))
        if token is not None and hasattr(token, "client_id") and not token.check_client(client):
            return None
        return token

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        storage = mock_internals.storage
        return storage.get_refresh_token(token_string) or storage.get_access_token(token_string)

    def revoke_token(self, token: Any, request: Any) -> None:
        storage = mock_internals.storage
        storage.remove_refresh_token(token.token)
        storage.remove_access_token(getattr(token, "access_token", token.token))


def provider_app(access_ttl: int, *, refresh_tokens: bool = True) -> flask.Flask:
    """The mock's Flask app with a revocation endpoint; tokens live ``access_ttl`` s."""
    table = BearerTokenGenerator.GRANT_TYPES_EXPIRES_IN
    before = table.get("refresh_token")
    table["refresh_token"] = access_ttl  # read once, while the app is built
    try:
        app: flask.Flask = mock_app(
            require_nonce=True,
            issue_refresh_token=refresh_tokens,
            access_token_max_age=timedelta(seconds=access_ttl),
        )
    finally:
        if before is None:
            del table["refresh_token"]
        else:
            table["refresh_token"] = before
    registered: list[bool] = []

    def revoke() -> Any:
        server = flask.g._authlib_authorization_server
        if not registered:
            server.register_endpoint(_Revocation)
            registered.append(True)
        return server.create_endpoint_response("revocation")

    app.add_url_rule("/oauth2/revoke", "revoke", revoke, methods=["POST"])
    return app


@contextlib.contextmanager
def serve_in_thread(app: WSGIApp, host: str, port: int) -> Iterator[int]:
    """Serve a WSGI app on a background thread; yield its port."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = werkzeug.serving.make_server(host, port, app, threaded=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()
