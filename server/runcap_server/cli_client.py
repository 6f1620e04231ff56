"""Client subcommands of the `runcap` command: runs, reservations and a live watch.

Every subcommand talks to a server through the Python client (`--target`, or
RUNCAP_TARGET, or 127.0.0.1:50051), prints a short human-readable answer (or
the response as JSON with `--json`), and exits with:

* 0 on success;
* 1 on any failure, reported as one ``runcap: <message>`` line on stderr
  (followed by the offending fields of an invalid request);
* 3 when a reservation is blocked, so that scripts can branch on it;
* 2 for a malformed command line (argparse's usage errors).

A server with TLS: RUNCAP_TLS_CA_FILE (the CA that issued the server's
certificate; the system's roots when unset), and for mTLS
RUNCAP_TLS_CLIENT_CERT_FILE with RUNCAP_TLS_CLIENT_KEY_FILE. Any of them
turns TLS on; RUNCAP_API_KEY is sent over it as over plaintext.

Amounts are USD as exact decimals (``5``, ``0.25``, ``$1.50``, at most 6
decimal places), or whole micro-USD with ``--micros`` / ``--limit-micros``.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from runcap import (
    InvalidArgumentError,
    RateLimit,
    RuncapClient,
    RuncapError,
    RunPolicy,
    UnavailableError,
    WatchStream,
)
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server import demo as runcap_demo
from runcap_server import report as runcap_report
from runcap_server.money import format_usd, parse_micros, parse_usd
from runcap_server.settings import parse_duration_ms

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.text import Text

DEFAULT_TARGET: Final = "127.0.0.1:50051"
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_BLOCKED: Final = 3
MODES: Final = ("hard_gate", "soft_gate", "advisory", "actuals_only", "calibrated")

Handler = Callable[[argparse.Namespace, RuncapClient], int]


class CliError(Exception):
    """A mistake in the command's arguments, found before calling the server."""


# --------------------------------------------------------------------------
# Command line


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Adds the client subcommands: run, reserve, commit, refund, approve, deny, decision,
    watch, top, and demo."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("RUNCAP_TARGET") or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the server's address (env RUNCAP_TARGET, default {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--json", action="store_true", help="print the response as JSON (field names as in proto)"
    )
    amount_help = "USD as an exact decimal such as 0.25 or $1.50 (at most 6 decimal places)"

    run = commands.add_parser("run", help="create, show, close, suspend and resume runs")
    run_commands = run.add_subparsers(
        dest="run_command", required=True, metavar="{create,show,close,suspend,resume}"
    )

    create = run_commands.add_parser(
        "create",
        parents=[common],
        help="create a run with a spending limit",
        description="Creates a run (idempotent for a given RUN_ID) and prints its id "
        "on the first line, then its budget state.",
    )
    create.add_argument(
        "run_id", nargs="?", default="", metavar="RUN_ID", help="the run's id (default: generated)"
    )
    limit = create.add_mutually_exclusive_group(required=True)
    limit.add_argument("--limit", metavar="USD", help=f"the run's ceiling in {amount_help}")
    limit.add_argument("--limit-micros", metavar="N", help="the run's ceiling in micro-USD")
    create.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label for reporting, such as agent=coder (repeatable)",
    )
    create.add_argument(
        "--ttl",
        metavar="DURATION",
        help="default time-to-live of the run's holds, such as 30s or 10m (default: the server's)",
    )
    create.add_argument(
        "--mode",
        choices=MODES,
        help="enforcement mode (default: hard_gate, or the parent's policy for a subagent)",
    )
    create.add_argument(
        "--soft-margin", metavar="PERCENT", type=int, help="soft_gate: how far past the limit"
    )
    create.add_argument("--max-tokens", metavar="N", type=int, help="a ceiling on LLM tokens")
    create.add_argument(
        "--meter-limit",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a ceiling on a call meter, such as tool:serp_api=50 (repeatable)",
    )
    create.add_argument(
        "--rate", metavar="N/DURATION", help="allowed reserves per window, such as 60/1m"
    )
    create.add_argument("--max-in-flight", metavar="N", type=int, help="a cap on holds in flight")
    create.add_argument(
        "--approval-percent",
        metavar="PERCENT",
        type=int,
        help="spend past this share of the limit waits for an approval",
    )
    create.add_argument(
        "--approved-meter",
        action="append",
        default=[],
        metavar="NAME",
        help="a meter calls may use without approval; others wait for one (repeatable)",
    )
    create.set_defaults(func=_command(_run_create))

    show = run_commands.add_parser(
        "show", parents=[common], help="show a run's configuration and budget state"
    )
    show.add_argument("run_id", metavar="RUN_ID")
    show.set_defaults(func=_command(_run_show))

    close = run_commands.add_parser(
        "close", parents=[common], help="close a run to new reservations (holds still settle)"
    )
    close.add_argument("run_id", metavar="RUN_ID")
    close.set_defaults(func=_command(_run_close))

    suspend = run_commands.add_parser(
        "suspend",
        parents=[common],
        help="the kill switch: block every new reservation of the run and its subagents",
    )
    suspend.add_argument("run_id", metavar="RUN_ID")
    suspend.set_defaults(func=_command(_run_suspend))

    resume = run_commands.add_parser(
        "resume", parents=[common], help="let a suspended run reserve again"
    )
    resume.add_argument("run_id", metavar="RUN_ID")
    resume.set_defaults(func=_command(_run_resume))

    reserve = commands.add_parser(
        "reserve",
        parents=[common],
        help="hold an estimated cost against a run",
        description="Asks to hold AMOUNT against the run. Prints the reservation id on the "
        "first line, then the decision and the budget state. Exits 3 when blocked.",
    )
    reserve.add_argument("run_id", metavar="RUN_ID")
    reserve.add_argument("amount", metavar="AMOUNT", help=f"the estimate, in {amount_help}")
    reserve.add_argument(
        "--id",
        dest="reservation_id",
        metavar="RESERVATION_ID",
        help="the reservation's id, for idempotent retries (default: a random one)",
    )
    reserve.add_argument(
        "--ttl", metavar="DURATION", help="how long the hold lives (default: the run's)"
    )
    reserve.add_argument("--micros", action="store_true", help="AMOUNT is whole micro-USD")
    reserve.add_argument("--meter", metavar="NAME", help="the call meter it counts on")
    reserve.add_argument("--units", metavar="N", type=int, help="units of --meter (default 1)")
    reserve.set_defaults(func=_command(_reserve))

    commit = commands.add_parser(
        "commit", parents=[common], help="record a reservation's actual cost"
    )
    commit.add_argument("run_id", metavar="RUN_ID")
    commit.add_argument("reservation_id", metavar="RESERVATION_ID")
    commit.add_argument("actual", metavar="ACTUAL", help=f"the actual cost, in {amount_help}")
    commit.add_argument("--micros", action="store_true", help="ACTUAL is whole micro-USD")
    commit.set_defaults(func=_command(_commit))

    refund = commands.add_parser(
        "refund", parents=[common], help="release a reservation's whole hold"
    )
    refund.add_argument("run_id", metavar="RUN_ID")
    refund.add_argument("reservation_id", metavar="RESERVATION_ID")
    refund.set_defaults(func=_command(_refund))

    for verb, what in (("approve", "let calls that trip it go on"), ("deny", "block them")):
        resolve = commands.add_parser(
            verb,
            parents=[common],
            help=f"resolve a pending approval: {what}",
            description=f"Resolves APPROVAL_ID (from a Reserve answer or `runcap watch`): {what}. "
            "Idempotent.",
        )
        resolve.add_argument("approval_id", metavar="APPROVAL_ID", help="RUN/approval:...")
        resolve.set_defaults(func=_command(_approve if verb == "approve" else _deny))

    decision = commands.add_parser(
        "decision",
        parents=[common],
        help="show a Reserve decision and its inputs",
        description="Shows a decision (its id is RUN/RESERVATION, as Reserve answers it) with "
        "what it was made from and where its reservation is now.",
    )
    decision.add_argument("decision_id", metavar="DECISION_ID")
    decision.set_defaults(func=_command(_decision))

    watch = commands.add_parser(
        "watch",
        parents=[common],
        help="watch a run's budget live",
        description="Shows a run's spend live, with one line per change, resuming across "
        "disconnects. Exits 0 on Ctrl-C, or once the run is closed with no active holds. "
        "When stdout is not a terminal (or with --plain), prints one line per event instead; "
        "with --json, one JSON object per stream message.",
    )
    watch.add_argument("run_id", metavar="RUN_ID")
    watch.add_argument(
        "--after-revision",
        type=int,
        metavar="N",
        help="start with every change after revision N instead of a snapshot (0: all history)",
    )
    watch.add_argument(
        "--plain", action="store_true", help="one plain line per event, even on a terminal"
    )
    watch.set_defaults(func=_command(_watch))

    top = commands.add_parser(
        "top",
        help="a live terminal view of active runs",
        description="Shows the named runs live, one row each: spend against the limit, burn "
        "rate over the last minute, time to exhaustion, threshold band, suspended and "
        "approval flags. Follows a Watch stream per run. Keys: s suspends the selected run, "
        "r resumes it, q quits (docs/top.md).",
    )
    top.add_argument("run_ids", nargs="*", metavar="RUN_ID")
    top.add_argument(
        "--from-file", metavar="FILE", help="also the run ids in FILE, one a line (-: stdin)"
    )
    top.add_argument(
        "--target",
        default=common.get_default("target"),
        metavar="HOST:PORT",
        help=f"the server's address (env RUNCAP_TARGET, default {DEFAULT_TARGET})",
    )
    top.set_defaults(func=_top)

    runcap_report.add_command(commands, common.get_default("target"))

    demo = commands.add_parser("demo", help="demonstrations of runcap at work")
    demos = demo.add_subparsers(dest="demo_command", required=True, metavar="{runaway}")
    runaway = demos.add_parser(
        "runaway",
        help="seed 001: a runaway agent loop against a $5 ceiling, live",
        description="A simulated agent calls a mock LLM in a loop with a growing context; runcap "
        "throttles it near its ceiling, then stops it. Prints the timeline, the spend and what "
        "an hour without a governor would cost (docs/runaway.md). Without --target or "
        "RUNCAP_TARGET it starts a server of its own.",
    )
    runcap_demo.add_arguments(runaway)
    runaway.set_defaults(func=runcap_demo.main)


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wraps a handler: a client for `--target`, and failures as one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            api_key = os.environ.get("RUNCAP_API_KEY") or None
            credentials = tls_credentials_from_env()
            with RuncapClient(args.target, api_key=api_key, credentials=credentials) as client:
                return handler(args, client)
        except CliError as error:
            _error(str(error))
        except RuncapError as error:
            _report(error, args.target)
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR

    return run


def _top(args: argparse.Namespace) -> int:
    from runcap_server import top  # Textual loads only for `runcap top`

    return top.main(args)


TLS_ENV: Final = ("RUNCAP_TLS_CA_FILE", "RUNCAP_TLS_CLIENT_CERT_FILE", "RUNCAP_TLS_CLIENT_KEY_FILE")


def tls_credentials_from_env(
    environ: Mapping[str, str] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from RUNCAP_TLS_CA_FILE and, for mTLS,
    RUNCAP_TLS_CLIENT_CERT_FILE and RUNCAP_TLS_CLIENT_KEY_FILE; None (plaintext)
    when none is set."""
    environ = os.environ if environ is None else environ
    ca, cert, key = (environ.get(name) or "" for name in TLS_ENV)
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise CliError("RUNCAP_TLS_CLIENT_CERT_FILE and RUNCAP_TLS_CLIENT_KEY_FILE go together")
    contents: dict[str, bytes | None] = {}
    for name, path in zip(TLS_ENV, (ca, cert, key), strict=True):
        try:
            contents[name] = Path(path).read_bytes() if path else None
        except OSError as error:
            raise CliError(f"cannot read {name} {path}: {error.strerror}") from None
    return grpc.ssl_channel_credentials(
        root_certificates=contents["RUNCAP_TLS_CA_FILE"],
        private_key=contents["RUNCAP_TLS_CLIENT_KEY_FILE"],
        certificate_chain=contents["RUNCAP_TLS_CLIENT_CERT_FILE"],
    )


def _error(message: str) -> None:
    print(f"runcap: {message}", file=sys.stderr)


def _report(error: RuncapError, target: str) -> None:
    label = error.reason or error.code.name
    if isinstance(error, InvalidArgumentError) and error.field_violations:
        _error(f"the server rejected the request [{label}]:")
        for field, description in error.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return
    message = error.message
    if isinstance(error, UnavailableError) and not error.reason:
        message = f"cannot reach the server at {target}: {message}"
    _error(f"{message} [{label}]")


# --------------------------------------------------------------------------
# Argument parsing


def _amount(text: str, micros: bool) -> int:
    try:
        return parse_micros(text) if micros else parse_usd(text)
    except ValueError as error:
        raise CliError(str(error)) from None


def _ttl(text: str | None, option: str = "--ttl") -> timedelta | None:
    if text is None:
        return None
    try:
        return timedelta(milliseconds=parse_duration_ms(text))
    except ValueError as error:
        raise CliError(f"invalid {option}: {error}") from None


def _labels(items: Iterable[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"invalid --label {item!r}: expected KEY=VALUE, such as agent=coder")
        if key in labels:
            raise CliError(f"invalid --label {item!r}: label {key!r} is given twice")
        labels[key] = value
    return labels


# --------------------------------------------------------------------------
# Output


def _print_json(message: Message) -> None:
    print(_json(message, indent=2))


def _json(message: Message, *, indent: int | None) -> str:
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=indent,
    )


def _name(enum: Any, value: int, prefix: str) -> str:
    """An enum value's name without its prefix (``RUN_STATUS_OPEN`` -> ``OPEN``)."""
    try:
        name = str(enum.Name(value))
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def _status(state: budget_pb2.BudgetState) -> str:
    return _name(budget_pb2.RunStatus, state.status, "RUN_STATUS_")


def _when(stamp: Timestamp) -> str:
    moment = stamp.ToDatetime(tzinfo=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _duration(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _spend(state: budget_pb2.BudgetState) -> str:
    return (
        f"committed {format_usd(state.committed_micros)} + held "
        f"{format_usd(state.reserved_micros)} of {format_usd(state.limit_micros)}"
    )


def _holds(count: int) -> str:
    return f"{count} active hold" + ("" if count == 1 else "s")


def _field(name: str, value: str) -> None:
    print(f"{name:<11}{value}")


def _print_state(state: budget_pb2.BudgetState) -> None:
    _field("status", _status(state))
    _field("spend", _spend(state))
    _field("remaining", format_usd(state.remaining_micros))
    if state.overrun_micros:
        _field("overrun", format_usd(state.overrun_micros))
    if state.exposure_ceiling_micros:  # a calibrated run
        exposure = format_usd(state.exposure_micros)
        _field("exposure", f"{exposure} of {format_usd(state.exposure_ceiling_micros)}")
    _field("holds", _holds(state.active_reservations))
    _field("revision", str(state.revision))


# --------------------------------------------------------------------------
# Commands


def _run_create(args: argparse.Namespace, client: RuncapClient) -> int:
    if args.limit is not None:
        limit = _amount(args.limit, micros=False)
    else:
        limit = _amount(args.limit_micros, micros=True)
    labels = _labels(args.label)
    ttl = _ttl(args.ttl)
    policy = _policy(args)
    response = client.create_run(
        args.run_id, limit_micros=limit, labels=labels, default_ttl=ttl, policy=policy
    )
    if args.json:
        _print_json(response)
        return EXIT_OK
    print(response.run.run_id)
    if response.replayed:
        _field("replayed", "yes: the run already existed with these arguments")
    _print_state(response.state)
    return EXIT_OK


def _policy(args: argparse.Namespace) -> RunPolicy | None:
    """The run policy the flags describe; None when no policy flag is given."""
    meters = {}
    for item in args.meter_limit:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise CliError(
                f"invalid --meter-limit {item!r}: expected NAME=N, such as tool:serp_api=50"
            )
        meters[name] = int(count)
    rate = None
    if args.rate:
        calls, sep, window = args.rate.partition("/")
        if not sep or not calls.isdigit():
            raise CliError(f"invalid --rate {args.rate!r}: expected N/DURATION, such as 60/1m")
        rate = RateLimit(max_calls=int(calls), window=_ttl(window, "--rate") or timedelta(0))
    given: list[object] = [args.mode, args.soft_margin, args.max_tokens, args.max_in_flight]
    given += [rate, args.approval_percent]
    if not meters and not args.approved_meter and all(v is None for v in given):
        return None
    return RunPolicy(
        enforcement_mode=args.mode,
        soft_gate_margin_percent=args.soft_margin or 0,
        max_tokens=args.max_tokens,
        meter_limits=meters,
        rate_limit=rate,
        max_in_flight=args.max_in_flight,
        approval_percent=args.approval_percent or 0,
        approved_meters=args.approved_meter,
    )


def _run_show(args: argparse.Namespace, client: RuncapClient) -> int:
    response = client.get_run(args.run_id)
    if args.json:
        _print_json(response)
        return EXIT_OK
    run = response.run
    print(run.run_id)
    if run.labels:
        _field("labels", ", ".join(f"{k}={v}" for k, v in sorted(run.labels.items())))
    _field("ttl", _duration(run.default_ttl_millis) + " (default of the run's holds)")
    _field("created", _when(run.create_time))
    if run.HasField("close_time"):
        _field("closed", _when(run.close_time))
    _field(
        "mode", _name(budget_pb2.EnforcementMode, run.policy.enforcement_mode, "ENFORCEMENT_MODE_")
    )
    for meter in run.meters:
        limit = f" of {meter.limit}" if meter.HasField("limit") else ""
        _field(f"meter {meter.name}", f"{meter.committed} used, {meter.reserved} held{limit}")
    wall = ", at its wall now" if response.state.blocked else ""
    _field("blocked", f"{run.blocked_calls:,} calls{wall}")
    _print_state(response.state)
    return EXIT_OK


def _run_close(args: argparse.Namespace, client: RuncapClient) -> int:
    response = client.close_run(args.run_id)
    if args.json:
        _print_json(response)
        return EXIT_OK
    print(args.run_id)
    if response.replayed:
        _field("replayed", "yes: the run was already closed")
    _print_state(response.state)
    return EXIT_OK


def _run_suspend(args: argparse.Namespace, client: RuncapClient) -> int:
    return _status_change(args, client.suspend_run(args.run_id), "was already suspended")


def _run_resume(args: argparse.Namespace, client: RuncapClient) -> int:
    return _status_change(args, client.resume_run(args.run_id), "was not suspended")


def _status_change(
    args: argparse.Namespace,
    response: pb.SuspendRunResponse | pb.ResumeRunResponse,
    already: str,
) -> int:
    if args.json:
        _print_json(response)
        return EXIT_OK
    print(args.run_id)
    if response.replayed:
        _field("replayed", f"yes: the run {already}")
    _print_state(response.state)
    return EXIT_OK


def _reserve(args: argparse.Namespace, client: RuncapClient) -> int:
    amount = _amount(args.amount, args.micros)
    ttl = _ttl(args.ttl)
    # A client-side id makes the call safe to retry.
    reservation_id = args.reservation_id or uuid.uuid4().hex
    response = client.reserve_once(
        args.run_id,
        amount,
        reservation_id=reservation_id,
        ttl=ttl,
        meter=args.meter or "",
        meter_units=args.units,
    )
    blocked = response.decision in (
        budget_pb2.DECISION_BLOCK,
        budget_pb2.DECISION_THROTTLE,
        budget_pb2.DECISION_APPROVAL_REQUIRED,
    )
    if args.json:
        _print_json(response)
        return EXIT_BLOCKED if blocked else EXIT_OK
    print(response.reservation_id)
    decision = _name(budget_pb2.Decision, response.decision, "DECISION_")
    reason = _name(budget_pb2.DecisionReason, response.reason, "DECISION_REASON_")
    _field("decision", f"{decision} ({reason})")
    if response.blocking_dimension:
        dimension = _name(
            budget_pb2.BudgetDimension, response.blocking_dimension, "BUDGET_DIMENSION_"
        )
        _field("limit", f"{dimension} {response.blocking_meter}".strip())
    if response.decision == budget_pb2.DECISION_THROTTLE:
        wait = _duration(response.retry_after.ToMilliseconds())
        _field("retry", f"after {wait}, with a new reservation id")
    if response.approval_id:
        _field("approval", response.approval_id)
    if blocked:
        _field("asked", f"{format_usd(amount)}; nothing is held")
    else:
        _field("held", f"{format_usd(response.amount_micros)} until {_when(response.expire_time)}")
    if response.replayed:
        _field("replayed", "yes: this is the first decision; nothing changed")
    _print_state(response.state)
    return EXIT_BLOCKED if blocked else EXIT_OK


def _commit(args: argparse.Namespace, client: RuncapClient) -> int:
    actual = _amount(args.actual, args.micros)
    response = client.commit(args.run_id, args.reservation_id, actual)
    if args.json:
        _print_json(response)
        return EXIT_OK
    print(args.reservation_id)
    status = _name(budget_pb2.ReservationStatus, response.reservation_status, "RESERVATION_STATUS_")
    _field("result", status)
    _field(
        "actual",
        f"{format_usd(response.actual_micros)} of {format_usd(response.held_micros)} held",
    )
    if response.overrun_micros:
        _field("overrun", format_usd(response.overrun_micros))
    if response.replayed:
        _field("replayed", "yes: already committed with this cost; nothing changed")
    _print_state(response.state)
    return EXIT_OK


def _refund(args: argparse.Namespace, client: RuncapClient) -> int:
    response = client.refund(args.run_id, args.reservation_id)
    if args.json:
        _print_json(response)
        return EXIT_OK
    print(args.reservation_id)
    status = _name(budget_pb2.ReservationStatus, response.reservation_status, "RESERVATION_STATUS_")
    _field("result", status)
    _field("released", format_usd(response.released_micros))
    if response.replayed:
        _field("replayed", f"yes: the reservation had already settled ({status}); nothing changed")
    _print_state(response.state)
    return EXIT_OK


def _approve(args: argparse.Namespace, client: RuncapClient) -> int:
    return _resolved(args, client.approve(args.approval_id), "approved")


def _deny(args: argparse.Namespace, client: RuncapClient) -> int:
    return _resolved(args, client.deny(args.approval_id), "denied")


def _resolved(
    args: argparse.Namespace, response: pb.ApproveResponse | pb.DenyResponse, already: str
) -> int:
    if args.json:
        _print_json(response)
        return EXIT_OK
    print(response.approval.approval_id)
    _field("status", _name(budget_pb2.ApprovalStatus, response.approval.status, "APPROVAL_STATUS_"))
    if response.replayed:
        _field("replayed", f"yes: it was already {already}")
    _print_state(response.state)
    return EXIT_OK


def _decision(args: argparse.Namespace, client: RuncapClient) -> int:
    record = client.get_decision(args.decision_id)
    if args.json:
        _print_json(record)
        return EXIT_OK
    print(record.decision_id)
    decision = _name(budget_pb2.Decision, record.decision, "DECISION_")
    reason = _name(budget_pb2.DecisionReason, record.reason, "DECISION_REASON_")
    _field("decision", f"{decision} ({reason})")
    _field("when", _when(record.decide_time))
    _field("mode", _name(budget_pb2.EnforcementMode, record.enforcement_mode, "ENFORCEMENT_MODE_"))
    _field("asked", format_usd(record.amount_micros))
    _field("held", format_usd(record.held_micros))
    if record.HasField("estimate"):
        e = record.estimate
        _field(
            "llm call",
            f"{e.provider}/{e.model}, {e.input_tokens} in + {e.effective_max_output_tokens} out "
            f"(prices {e.price_table_version})",
        )
    if record.meter:
        _field("meter", f"{record.meter} x{record.meter_units}")
    if record.HasField("blocking_scope"):
        kind = _name(budget_pb2.ScopeKind, record.blocking_scope.kind, "SCOPE_KIND_").lower()
        _field("blocked by", f"{kind} {record.blocking_scope.id}")
    status = _name(budget_pb2.ReservationStatus, record.reservation_status, "RESERVATION_STATUS_")
    if record.HasField("actual_micros"):
        status += f", actual {format_usd(record.actual_micros)}"
    _field("now", status)
    return EXIT_OK


# --------------------------------------------------------------------------
# Watch

_TICK_S: Final = 0.25


def _watch(args: argparse.Namespace, client: RuncapClient) -> int:
    stream = client.watch(args.run_id, after_revision=args.after_revision)
    inbox: queue.Queue[pb.WatchResponse | RuncapError | None] = queue.Queue()

    def pump() -> None:
        # The stream blocks in gRPC; reading it on a thread of its own keeps
        # the main thread free for Ctrl-C and for refreshing the view.
        try:
            for message in stream:
                inbox.put(message)
        except RuncapError as error:
            inbox.put(error)
        finally:
            inbox.put(None)

    view: _View
    if args.json or args.plain or not sys.stdout.isatty():
        view = _PlainView(as_json=args.json)
    else:
        view = _LiveView(args.run_id)
    reader = threading.Thread(target=pump, name="runcap-watch", daemon=True)
    try:
        with view:
            reader.start()
            return _follow(inbox, view, stream)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        stream.close()


def _follow(
    inbox: queue.Queue[pb.WatchResponse | RuncapError | None], view: _View, stream: WatchStream
) -> int:
    while True:
        try:
            item = inbox.get(timeout=_TICK_S)
        except queue.Empty:
            continue
        if isinstance(item, RuncapError):
            raise item
        if item is None:
            _error(f"the server ended the watch stream at revision {stream.last_revision}")
            return EXIT_ERROR
        view.show(item)
        state = view.state
        if (
            state is not None
            and state.status == budget_pb2.RUN_STATUS_CLOSED
            and state.active_reservations == 0
        ):
            view.finish()
            return EXIT_OK


_EVENT_STYLES: Final = {
    budget_pb2.EVENT_TYPE_CREATED: "cyan",
    budget_pb2.EVENT_TYPE_RESERVED: "yellow",
    budget_pb2.EVENT_TYPE_COMMITTED: "green",
    budget_pb2.EVENT_TYPE_REFUNDED: "blue",
    budget_pb2.EVENT_TYPE_EXPIRED: "magenta",
    budget_pb2.EVENT_TYPE_CLOSED: "bold",
    budget_pb2.EVENT_TYPE_BLOCKED: "bold red",
}


def _event_type(event: budget_pb2.BudgetEvent) -> str:
    return _name(budget_pb2.EventType, event.type, "EVENT_TYPE_")


def _event_details(event: budget_pb2.BudgetEvent) -> list[tuple[str, str]]:
    """What an event says beyond its type and state, as (key, value) pairs."""
    details: list[tuple[str, str]] = []
    if event.reservation_id:
        details.append(("reservation", event.reservation_id))
    kind = event.type
    if kind == budget_pb2.EVENT_TYPE_CREATED:
        details.append(("limit", format_usd(event.state.limit_micros)))
    elif kind != budget_pb2.EVENT_TYPE_CLOSED:
        details.append(("amount", format_usd(event.amount_micros)))
    if kind == budget_pb2.EVENT_TYPE_COMMITTED:
        details.append(("actual", format_usd(event.actual_micros)))
        if event.overrun_micros:
            details.append(("overrun", format_usd(event.overrun_micros)))
        if event.late:
            details.append(("late", "yes"))
    if kind == budget_pb2.EVENT_TYPE_BLOCKED:
        # `amount` above is the estimate that did not fit.
        details.append(
            ("reason", _name(budget_pb2.DecisionReason, event.reason, "DECISION_REASON_"))
        )
        if event.HasField("blocking_scope"):
            scope = event.blocking_scope
            kind_name = _name(budget_pb2.ScopeKind, scope.kind, "SCOPE_KIND_").lower()
            details.append(("scope", f"{kind_name}:{scope.id}"))
        if event.blocking_dimension:
            dimension = _name(
                budget_pb2.BudgetDimension, event.blocking_dimension, "BUDGET_DIMENSION_"
            )
            meter = event.blocking_meter
            details.append(("dimension", f"{dimension}:{meter}" if meter else dimension))
    return details


def _state_pairs(state: budget_pb2.BudgetState) -> list[tuple[str, str]]:
    pairs = [
        ("committed", format_usd(state.committed_micros)),
        ("held", format_usd(state.reserved_micros)),
        ("remaining", format_usd(state.remaining_micros)),
        ("limit", format_usd(state.limit_micros)),
    ]
    if state.overrun_micros:
        pairs.append(("overrun_total", format_usd(state.overrun_micros)))
    if state.exposure_ceiling_micros:  # a calibrated run
        pairs.append(("exposure", format_usd(state.exposure_micros)))
    pairs += [("holds", str(state.active_reservations)), ("status", _status(state))]
    if state.blocked:
        pairs.append(("blocked", "yes"))
    return pairs


class _View:
    """How `runcap watch` shows a stream; it tracks the run's latest state."""

    def __init__(self) -> None:
        self.state: budget_pb2.BudgetState | None = None

    def __enter__(self) -> _View:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def show(self, message: pb.WatchResponse) -> None:
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            self.state = message.snapshot
        elif kind == "event":
            self.state = message.event.state

    def finish(self) -> None:
        """The run is closed and nothing is held any more."""


class _PlainView(_View):
    """One line per snapshot and event (or per message, as JSON), flushed at once."""

    def __init__(self, *, as_json: bool) -> None:
        super().__init__()
        self._json = as_json

    def show(self, message: pb.WatchResponse) -> None:
        super().show(message)
        kind = message.WhichOneof("kind")
        if self._json:
            line = _json(message, indent=None)
        elif kind == "snapshot":
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            line = _plain_line(now, message.revision, "SNAPSHOT", [], message.snapshot)
        elif kind == "event":
            event = message.event
            line = _plain_line(
                _when(event.time),
                message.revision,
                _event_type(event),
                _event_details(event),
                event.state,
            )
        else:
            return
        print(line, flush=True)


def _plain_line(
    when: str,
    revision: int,
    kind: str,
    details: Sequence[tuple[str, str]],
    state: budget_pb2.BudgetState,
) -> str:
    pairs = [*details, *_state_pairs(state)]
    return f"{when} rev={revision} {kind} " + " ".join(f"{k}={v}" for k, v in pairs)


class _LiveView(_View):
    """A live panel (spend bar, remaining, revision, holds, status) under a
    scrolling line per event, drawn with rich."""

    def __init__(self, run_id: str) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__()
        self._run_id = run_id
        self._last_message: datetime | None = None
        self._done = False
        self._console = Console()
        self._live = Live(
            console=self._console,
            refresh_per_second=4,
            get_renderable=self._render,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def __enter__(self) -> _View:
        self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._live.stop()

    def show(self, message: pb.WatchResponse) -> None:
        super().show(message)
        self._last_message = datetime.now().astimezone()
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            self._console.print(
                f"[dim]{self._last_message:%H:%M:%S}[/]  r{message.revision:<4} [bold]SNAPSHOT[/]"
            )
        elif kind == "event":
            self._console.print(self._event_line(message.revision, message.event))
        self._live.refresh()

    def finish(self) -> None:
        self._done = True
        self._live.refresh()

    def _event_line(self, revision: int, event: budget_pb2.BudgetEvent) -> Text:
        from rich.text import Text

        moment = event.time.ToDatetime(tzinfo=UTC).astimezone()
        line = Text()
        line.append(f"{moment:%H:%M:%S}", style="dim")
        line.append(f"  r{revision:<4} ")
        line.append(f"{_event_type(event):<10}", style=_EVENT_STYLES.get(event.type, ""))
        for key, value in _event_details(event):
            line.append(f" {key} ", style="dim")
            line.append(value)
        return line

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        state = self.state
        title = f"runcap watch [bold]{self._run_id}[/]"
        if state is None:
            return Panel(Text("waiting for the run's state...", style="dim"), title=title)
        spend = Text()
        spend.append("committed ")
        spend.append(format_usd(state.committed_micros), style="green")
        spend.append(" + held ")
        spend.append(format_usd(state.reserved_micros), style="yellow")
        spend.append(f" of {format_usd(state.limit_micros)}")
        remaining = Text(f"remaining {format_usd(state.remaining_micros)}")
        if state.overrun_micros:
            remaining.append(f"   overrun {format_usd(state.overrun_micros)}", style="bold red")
        status = _status(state)
        facts = Text()
        facts.append(status, style="green" if status == "OPEN" else "bold")
        facts.append(f"   revision {state.revision}   {_holds(state.active_reservations)}")
        if state.blocked:
            facts.append("   BLOCKED", style="bold red")
        if self._last_message is not None:
            facts.append(f"   last message {self._last_message:%H:%M:%S}", style="dim")
        return Panel(
            Group(_SpendBar(state), spend, remaining, facts),
            title=title,
            title_align="left",
            subtitle="closed with no active holds: done" if self._done else "Ctrl-C to quit",
            subtitle_align="right",
        )


class _SpendBar:
    """A bar of the run's limit: committed, then held, then what remains."""

    def __init__(self, state: budget_pb2.BudgetState) -> None:
        self._state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.text import Text

        state = self._state
        limit = max(state.limit_micros, 1)
        used = state.committed_micros + state.reserved_micros
        width = max(options.max_width - 6, 10)
        committed = min(width, state.committed_micros * width // limit)
        held = min(width, used * width // limit) - committed
        bar = Text()
        bar.append("█" * committed, style="red" if used > limit else "green")
        bar.append("▓" * held, style="yellow")
        bar.append("░" * (width - committed - held), style="grey37")
        bar.append(f" {used * 100 // limit:>3}%")
        yield bar
