"""The `runcap` command: run the server, manage runs, watch a run live."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from runcap_server.auth import read_keys
from runcap_server.settings import BACKENDS, Settings, parse_duration_ms
from runcap_server.tls import load_server_tls


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(
            listen_addr=args.listen,
            backend=args.backend,
            sqlite_path=args.sqlite_path,
            log_level=args.log_level,
            insecure_dev=args.insecure_dev or None,
        )
        load_server_tls(settings)  # unreadable or mismatched TLS files: exit 2
        if settings.api_keys_file:
            read_keys(Path(settings.api_keys_file))
        elif not settings.insecure_dev:
            raise ValueError(
                "no API keys: set RUNCAP_API_KEYS_FILE (see `runcap keys create`), or pass "
                "--insecure-dev to serve without authentication on a machine of your own"
            )
    except ValueError as error:
        print(f"runcap: {error}", file=sys.stderr)
        return 2
    from runcap_server.app import loop_factory, serve
    from runcap_server.telemetry import log_handler

    try:
        new_loop = loop_factory(settings.event_loop)
    except ValueError as error:
        print(f"runcap: {error}", file=sys.stderr)
        return 2

    # RUNCAP_LOG_FORMAT: text, or JSON lines with the trace and span ids.
    logging.basicConfig(
        level=settings.log_level.upper(), handlers=[log_handler(settings.log_format, sys.stderr)]
    )

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve(settings))
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
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="serve without authentication, for a first run on your own machine "
        "(RUNCAP_INSECURE_DEV); otherwise RUNCAP_API_KEYS_FILE is required",
    )
    serve.set_defaults(func=_serve)

    from runcap_server import cli_alerts, cli_client, cli_keys, cli_plan

    cli_client.add_commands(commands)
    cli_keys.add_commands(commands)
    cli_alerts.add_commands(commands)
    cli_plan.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


__all__ = ["main", "parse_duration_ms"]
