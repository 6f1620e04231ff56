"""The `runcap` command: run the server, manage runs, watch a run live."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from runcap_server.settings import BACKENDS, Settings, parse_duration_ms


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(
            listen_addr=args.listen,
            backend=args.backend,
            sqlite_path=args.sqlite_path,
            log_level=args.log_level,
        )
    except ValueError as error:
        print(f"runcap: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from runcap_server.app import serve

    asyncio.run(serve(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runcap", description="A real-time budget authority for AI agent runs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the server (settings: RUNCAP_* variables, see README)"
    )
    serve.add_argument(
        "--listen", help="address to listen on (RUNCAP_LISTEN_ADDR, default 127.0.0.1:50051)"
    )
    serve.add_argument(
        "--backend", choices=BACKENDS, help="ledger storage (RUNCAP_BACKEND, default sqlite)"
    )
    serve.add_argument(
        "--sqlite-path", help="SQLite ledger file (RUNCAP_SQLITE_PATH, default ./runcap.db)"
    )
    serve.add_argument("--log-level", help="log level (RUNCAP_LOG_LEVEL, default INFO)")
    serve.set_defaults(func=_serve)

    from runcap_server import cli_client

    cli_client.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


__all__ = ["main", "parse_duration_ms"]
