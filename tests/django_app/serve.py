"""Migrate a fresh sqlite DB, create the test user, serve on 127.0.0.1:PORT.

    BFF_DJANGO_DIR=/tmp/x python -m tests.django_app.serve PORT

A threaded wsgiref server: quiet (no request lines), starts fast, and handles
the concurrent calls the test makes. Prints ``ready`` once listening.
"""

from __future__ import annotations

import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128  # bursts of concurrent connections must not hit SYN retries


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application

    call_command("migrate", interactive=False, verbosity=0)
    get_user_model().objects.create_user(
        os.environ.get("BFF_DJANGO_USER", "alice"),
        password=os.environ.get("BFF_DJANGO_PASSWORD", "wonderland"),
    )
    server = make_server(
        "127.0.0.1",
        port,
        get_wsgi_application(),
        server_class=ThreadingWSGIServer,
        handler_class=QuietHandler,
    )
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
