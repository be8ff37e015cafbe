"""``bff-gateway demo``: the demo API and the gateway in one command (SPEC §9)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from aiohttp import web

from gateway.config import Config, ConfigError, load_config
from gateway.sessions.seal import new_key_text

DEMO_API_HOST = "127.0.0.1"
DEMO_API_PORT = 8081
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


async def _serve(config: Config) -> None:
    from gateway.demo.api import create_demo_api
    from gateway.server import check_port_free, serve_single

    runner = web.AppRunner(create_demo_api(), access_log=None)
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
            f"  (log in as demo / demo; Ctrl-C stops)\n",
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
