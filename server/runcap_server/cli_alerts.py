"""`runcap alerts`: manage alert rules and look at the alerts they raised.

    runcap alerts rules put rules.yaml     # one rule, or a list (YAML or JSON)
    runcap alerts rules list
    runcap alerts rules delete RULE_ID
    runcap alerts list [--rule R] [--state dead] [--limit 50]

A rule file holds a rule in the AlertRule JSON form (docs/alerts.md), with
short trigger names allowed. Connection settings as for the other client
commands: --target (RUNCAP_TARGET), RUNCAP_API_KEY, RUNCAP_TLS_*. Exit codes:
0 on success, 1 on a failure (one ``runcap: ...`` line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from runcap import AlertClient, RuncapError
from runcap.alerts import to_alert_rule
from runcap.v1 import alerts_pb2, budget_pb2
from runcap_server.cli_client import (
    DEFAULT_TARGET,
    EXIT_ERROR,
    EXIT_OK,
    CliError,
    _error,
    _json,
    _report,
    tls_credentials_from_env,
)

Handler = Callable[[argparse.Namespace, AlertClient], int]


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("RUNCAP_TARGET") or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the server's address (env RUNCAP_TARGET, default {DEFAULT_TARGET})",
    )
    common.add_argument("--json", action="store_true", help="print the answer as JSON")
    alerts = commands.add_parser("alerts", help="alert rules, and the alerts they raised")
    actions = alerts.add_subparsers(dest="alerts_command", required=True, metavar="{rules,list}")
    rules = actions.add_parser("rules", help="put, list and delete alert rules")
    rule_actions = rules.add_subparsers(
        dest="rules_command", required=True, metavar="{put,list,delete}"
    )
    put = rule_actions.add_parser(
        "put", parents=[common], help="create or replace rules from a YAML or JSON file (admin)"
    )
    put.add_argument("file", type=Path, help="one rule, or a list of rules")
    put.set_defaults(func=_command(_put))
    listing = rule_actions.add_parser(
        "list", parents=[common], help="the tenant's rules, secrets redacted"
    )
    listing.set_defaults(func=_command(_list_rules))
    delete = rule_actions.add_parser("delete", parents=[common], help="delete a rule (admin)")
    delete.add_argument("rule_id")
    delete.set_defaults(func=_command(_delete))
    shown = actions.add_parser(
        "list", parents=[common], help="recent alerts, newest first, with their delivery state"
    )
    shown.add_argument("--rule", default="", help="only this rule's alerts")
    shown.add_argument(
        "--state",
        choices=["pending", "delivered", "dead", "suppressed"],
        help="only alerts in this state (dead: the dead letters)",
    )
    shown.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    shown.set_defaults(func=_command(_list_alerts))


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            api_key = os.environ.get("RUNCAP_API_KEY") or None
            credentials = tls_credentials_from_env()
            with AlertClient(args.target, api_key=api_key, credentials=credentials) as client:
                return handler(args, client)
        except CliError as error:
            _error(str(error))
        except RuncapError as error:
            _report(error, args.target)
        return EXIT_ERROR

    return run


def _read_rules(path: Path) -> list[alerts_pb2.AlertRule]:
    try:
        text = path.read_text()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise CliError(f"{path} is not valid JSON: {error}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise CliError(f"{path} is not valid YAML: {error}") from None
    items = data.get("rules", data) if isinstance(data, dict) else data
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CliError(f"{path}: expected a rule (a mapping), a list of rules, or rules: [...]")
    try:
        return [to_alert_rule(item) for item in items]
    except ValueError as error:
        raise CliError(f"{path}: {error}") from None


def _put(args: argparse.Namespace, client: AlertClient) -> int:
    for rule in _read_rules(args.file):
        answer = client.put_rule(rule)
        if args.json:
            print(_json(answer, indent=2))
        else:
            print(f"{answer.rule.rule_id}\t{'changed' if answer.changed else 'unchanged'}")
    return EXIT_OK


def _short(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _list_rules(args: argparse.Namespace, client: AlertClient) -> int:
    for rule in client.list_rules():
        if args.json:
            print(_json(rule, indent=None))
            continue
        triggers = ",".join(
            _short(alerts_pb2.AlertTrigger, t, "ALERT_TRIGGER_") for t in rule.triggers
        )
        scope = "every run"
        if rule.HasField("scope"):
            kind = _short(budget_pb2.ScopeKind, rule.scope.kind, "SCOPE_KIND_")
            scope = f"{kind}:{rule.scope.id}"
        targets = ",".join(str(t.WhichOneof("target")) for t in rule.targets)
        print(f"{rule.rule_id}\t{scope}\t{triggers}\t{targets}\towner={rule.owner or '-'}")
    return EXIT_OK


def _delete(args: argparse.Namespace, client: AlertClient) -> int:
    deleted = client.delete_rule(args.rule_id)
    print("deleted" if deleted else f"no rule {args.rule_id!r}: nothing deleted")
    return EXIT_OK


def _list_alerts(args: argparse.Namespace, client: AlertClient) -> int:
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    shown: list[alerts_pb2.Alert] = []
    for alert in client.iter_alerts(rule_id=args.rule, state=args.state):
        shown.append(alert)
        if len(shown) >= args.limit:
            break
    for alert in shown:
        if args.json:
            print(_json(alert, indent=None))
            continue
        when = alert.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        state = _short(alerts_pb2.AlertState, alert.state, "ALERT_STATE_")
        trigger = _short(alerts_pb2.AlertTrigger, alert.trigger, "ALERT_TRIGGER_")
        line = f"{when}\t{state}\t{trigger}\t{alert.rule_id}\tattempts={alert.attempts}"
        print(f"{line}\t{alert.summary}")
        if alert.last_error and alert.state != alerts_pb2.ALERT_STATE_DELIVERED:
            print(f"\tlast error: {alert.last_error}")
    return EXIT_OK
