"""`runcap plan check|apply`: the quota plan gate (seed 002, docs/quota-plan.md).

``check`` validates a plan file offline (prices from the built-in table, or
the server's with ``--target``) and prints one page: the expected and
worst-case cost per run, day and month, the ceilings and limits the plan
implies, its alert rules, and every problem with its place in the file. Exit
0 when the plan is valid, 1 when not.

``apply`` refuses an invalid plan (a plan without a named human on call
included) before it connects; otherwise it reads the scope and the alert rules
from the server (``--target``, RUNCAP_API_KEY: an admin key), prints the
changes, and writes only those (none with ``--dry-run``). Exit 0 when the
server matches the plan, 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from runcap import RuncapError
from runcap_server.cli_client import DEFAULT_TARGET, CliError, tls_credentials_from_env
from runcap_server.plan import desired as plan_desired
from runcap_server.plan import render
from runcap_server.plan.apply import (
    ApplyFailed,
    Change,
    Remote,
    ServerPrices,
    apply,
    changes,
)
from runcap_server.plan.check import Report, check_document, check_file
from runcap_server.prices import ModelPrice, PriceTable

EXIT_OK = 0
EXIT_INVALID = 1


class BuiltinPrices:
    """The price table shipped with runcap, named as such in the report."""

    def __init__(self) -> None:
        self._table = PriceTable.packaged()

    @property
    def version(self) -> str:
        return f"the built-in price table {self._table.version}"

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        return self._table.lookup(provider, model)


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    plan = commands.add_parser(
        "plan",
        help="the quota plan gate: check a plan file and apply it (docs/quota-plan.md)",
    )
    actions = plan.add_subparsers(dest="plan_command", required=True, metavar="{check,apply}")
    check = actions.add_parser(
        "check",
        help="validate a quota plan and print its expected and worst-case cost",
        description="Validates PLAN against the schema (docs/quota-plan.schema.json) and the "
        "rules (a named human on call, known models, consistent rates, ...), and prints one "
        "page: costs per run, day and month, expected and at 10x volume, the ceilings, limits "
        "and alert rules it implies, and every problem with its place in the file. Offline "
        "unless --target is given. Exits 0 when valid, 1 when not.",
    )
    check.add_argument("file", metavar="PLAN", help="the plan file (YAML)")
    check.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="price models with this server's prices (tenant prices included) instead of the "
        "built-in table",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_check)

    apply_parser = actions.add_parser(
        "apply",
        help="create or update the scope ceilings, default run policy and alert rules of a plan",
        description="Refuses an invalid plan (one without a named human on call included). "
        "Otherwise reads the scope and alert rules from the server, prints the changes (+ add, "
        "~ change, - remove, = unchanged) and makes only those, with an admin key "
        "(RUNCAP_API_KEY). Applying the same plan again changes nothing. Secrets come from the "
        "environment variables the plan names.",
    )
    apply_parser.add_argument("file", metavar="PLAN", help="the plan file (YAML)")
    apply_parser.add_argument(
        "--target",
        default=os.environ.get("RUNCAP_TARGET") or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the server's address (env RUNCAP_TARGET, default {DEFAULT_TARGET})",
    )
    apply_parser.add_argument(
        "--dry-run", action="store_true", help="print the changes without making them"
    )
    apply_parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    apply_parser.set_defaults(func=_apply)


def _channel(target: str) -> grpc.Channel:
    credentials = tls_credentials_from_env()
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def _remote(channel: grpc.Channel) -> Remote:
    return Remote(channel, api_key=os.environ.get("RUNCAP_API_KEY") or None)


def _models(report: Report) -> list[tuple[str, str]]:
    assert report.plan is not None
    return [(use.provider, use.model) for use in report.plan.llm]


def _error(message: str) -> None:
    print(f"runcap: {message}", file=sys.stderr)


def _server_error(error: RuncapError, target: str) -> None:
    label = error.reason or error.code.name
    message = error.message
    if error.code == grpc.StatusCode.UNIMPLEMENTED:
        message = (
            f"the server at {target} does not serve this call (a runcap without alerts?): {message}"
        )
    elif error.code == grpc.StatusCode.UNAVAILABLE and not error.reason:
        message = f"cannot reach the server at {target}: {message}"
    _error(f"{message} [{label}]")


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(render.report_json(report), indent=2))
    else:
        print(render.summary(report), end="")


def _check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not args.target:
        report = check_file(path, BuiltinPrices())
        _print_report(report, args.json)
        return EXIT_OK if report.valid else EXIT_INVALID
    report = check_file(path, None)
    if report.valid:
        assert report.document is not None
        try:
            with _channel(args.target) as channel:
                prices = ServerPrices(_remote(channel), _models(report))
        except CliError as error:
            _error(str(error))
            return EXIT_INVALID
        except RuncapError as error:
            _server_error(error, args.target)
            return EXIT_INVALID
        report = check_document(report.document, prices, str(path))
    _print_report(report, args.json)
    return EXIT_OK if report.valid else EXIT_INVALID


def _refuse(report: Report, args: argparse.Namespace, why: str) -> int:
    _print_report(report, args.json)
    _error(f"{why}; nothing was written")
    return EXIT_INVALID


def _apply(args: argparse.Namespace) -> int:
    path = Path(args.file)
    report = check_file(path, None)  # a plan without a named owner never reaches the server
    if not report.valid:
        return _refuse(report, args, f"refusing to apply {path}: the plan is invalid")
    assert report.plan is not None
    assert report.document is not None
    secret_values, missing = plan_desired.secrets(report.plan, report.document, os.environ)
    if missing:
        sys.stderr.write(render.problems_only(missing, str(path)))
        _error(f"refusing to apply {path}: a secret is missing")
        return EXIT_INVALID
    try:
        with _channel(args.target) as channel:
            remote = _remote(channel)
            priced = check_document(
                report.document, ServerPrices(remote, _models(report)), str(path)
            )
            if not priced.valid or priced.costs is None:
                return _refuse(priced, args, f"refusing to apply {path}: the plan is invalid")
            want = plan_desired.desired(report.plan, priced.costs, secret_values)
            found = changes(remote, want)
            pending = [change for change in found if change.write is not None]
            if not args.json:  # the plan of changes first, so a failed write shows its context
                _print_changes(priced, args, found)
            done = 0 if args.dry_run else apply(remote, pending)
    except CliError as error:
        _error(str(error))
        return EXIT_INVALID
    except ApplyFailed as failure:
        _server_error(failure.error, args.target)
        _error(
            f"made {failure.done} of {_count(len(pending))} before this one failed; every write "
            "sets a value, so running apply again finishes the job"
        )
        return EXIT_INVALID
    except RuncapError as error:
        _server_error(error, args.target)
        return EXIT_INVALID
    if args.json:
        document = {
            "agent": report.plan.agent,
            "target": args.target,
            "dry_run": args.dry_run,
            "changes": [change.to_json() for change in found],
            "applied": done,
            "per_run_ceiling_micros": priced.costs.per_run_ceiling,
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    if not pending:
        print("no changes: the server already matches the plan")
    elif args.dry_run:
        print(f"dry run: {_count(len(pending))} not made")
    else:
        print(f"applied {_count(done)}")
    print()
    print("\n".join(render.create_run_snippet(report.plan, priced.costs)))
    return EXIT_OK


def _count(n: int) -> str:
    return f"{n} change" + ("" if n == 1 else "s")


def _print_changes(report: Report, args: argparse.Namespace, found: Sequence[Change]) -> None:
    assert report.plan is not None
    plan = report.plan
    print(f"quota plan {plan.agent} -> {args.target}, scope {plan.scope_kind} {plan.scope_id}")
    print(f"prices   {report.prices_version}")
    for warning in report.warnings:
        print(f"warning  {warning.where(report.file)}: {warning.message}")
    print("\n".join(render.change_lines(found)))


__all__ = ["BuiltinPrices", "add_commands"]
