"""``bff-gateway demo``: the demo API and the gateway in one command (SPEC §9)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from gateway.config import Config, ConfigError, load_config
from gateway.sessions.seal import new_key_text

DEMO_API_HOST = "127.0.0.1"
DEMO_API_PORT = 8081
OIDC_PORT = 8082  # the demo's OpenID Connect provider (config.yaml's issuer)
OIDC_TOKEN_SECONDS = 30
KEY_FILE = ".bff-demo-key"


def demo_key(directory: Path) -> str:
    """The demo's session key: generated on first run, kept in a git-ignored file."""
    path = directory / KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    key = new_key_text()
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


@contextlib.contextmanager
def _oidc_provider() -> Iterator[str | None]:
    """The demo's OpenID Connect provider on a thread; its userinfo URL, or None
    (with a note) when the ``demo`` extra is not installed or the port is taken."""
    try:
        from gateway.demo.oidc import provider_app, serve_in_thread
    except ImportError:
        print(
            "  (no OpenID Connect provider: install the demo extra, "
            "pip install -e '.[demo]', for the second sign-in)",
            flush=True,
        )
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                serve_in_thread(provider_app(OIDC_TOKEN_SECONDS), DEMO_API_HOST, OIDC_PORT)
            )
        except OSError as exc:
            print(f"  (no OpenID Connect provider: port {OIDC_PORT}: {exc.strerror})", flush=True)
            yield None
            return
        yield f"http://{DEMO_API_HOST}:{OIDC_PORT}/userinfo"


async def _serve(config: Config) -> None:
    with _oidc_provider() as userinfo:
        await _serve_with(config, userinfo)


async def _serve_with(config: Config, userinfo: str | None) -> None:
    from gateway.demo.api import create_demo_api
    from gateway.server import check_port_free, serve_single

    runner = web.AppRunner(create_demo_api(oidc_userinfo=userinfo), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, DEMO_API_HOST, DEMO_API_PORT).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(
            f"bff-gateway demo: cannot start the demo API on port {DEMO_API_PORT}: {exc.strerror}"
        ) from None
    try:
        check_port_free(config.server.listen)
        scheme = "https" if config.server.tls else "http"
        print(
            f"\n  bff-gateway demo is up: open {scheme}://{config.server.listen}/"
            f"  (log in as demo / demo, or sign in with OpenID Connect as anyone;"
            f" Ctrl-C stops)\n",
            flush=True,
        )
        await serve_single(config)
    finally:
        await runner.cleanup()


def run_demo(config_path: str | None) -> int:
    from gateway.observability.logs import setup_logging
    from gateway.server import StartupError, run_loop

    path = Path(config_path or "config.yaml")
    os.environ.setdefault("BFF_SESSION_KEY", demo_key(path.resolve().parent))
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format, config.logging.access_log)
    try:
        run_loop(_serve(config))
    except StartupError as exc:
        print(f"bff-gateway demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
