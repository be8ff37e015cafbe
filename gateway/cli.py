"""``bff-gateway run | check | keygen | demo`` (SPEC §1)."""

from __future__ import annotations

import argparse
import sys

from gateway.config import ConfigError, default_config_path, load_config
from gateway.sessions.seal import new_key_text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bff-gateway", description="Browser-facing gateway: sealed cookies in, tokens out."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve")
    run.add_argument("--config", help="config file (default ./config.yaml, then $BFF_CONFIG)")
    run.add_argument("--workers", type=int, help="override server.workers (0 = one per CPU)")
    check = commands.add_parser("check", help="validate the config and exit")
    check.add_argument("--config")
    commands.add_parser("keygen", help="print a fresh session key")
    demo = commands.add_parser("demo", help="start the demo API and the gateway")
    demo.add_argument("--config", help="gateway config (default ./config.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        print(new_key_text())
        return 0
    if args.command == "demo":
        from gateway.demo.launcher import run_demo

        return run_demo(args.config)
    path = default_config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.command == "check":
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
        print(
            f"bff-gateway: {exc.problems[0]}"
            + (
                f" (and {len(exc.problems) - 1} more: run `bff-gateway check`)"
                if len(exc.problems) > 1
                else ""
            ),
            file=sys.stderr,
        )
        return 2
    if args.command == "check":
        print(f"{path}: ok")
        return 0
    if args.workers is not None and args.workers < 0:
        print("bff-gateway: --workers cannot be negative", file=sys.stderr)
        return 2
    from gateway.server import run

    return run(config, args.workers)


def entry() -> None:
    """Console-script entry point: exit with main()'s status."""
    sys.exit(main())
