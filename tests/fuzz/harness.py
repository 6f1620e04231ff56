"""The fuzz suite's harness: a real server with fixture runs, valid request
templates for every RPC, a snapshot of the whole ledger, and the checks every
fuzzed answer must pass.

Each RPC gets fixtures of its own (ids prefixed with the RPC's name), so one
RPC's fuzzing (closing a run, committing its holds) leaves the others' alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import redis
from google.protobuf import duration_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, settings

from runcap.v1 import alerts_pb2, budget_pb2, budget_service_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.fuzz.strategies import describe, is_oversized
from tests.redis_servers import RedisServer
from tests.servers import ServerProcess

_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The short form (make test): a few dozen examples per RPC and backend; `make
# fuzz` sets RUNCAP_FUZZ_EXAMPLES=2000. In CI the examples are derived from the
# test's name, so CI cannot fail on an example no developer has seen.
EXAMPLES = int(os.environ.get("RUNCAP_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=_CI,
    database=None if _CI else settings().database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# What a malformed request may get: a clear client error, never INTERNAL,
# UNKNOWN, UNAVAILABLE or a crash.
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
BUDGET_SERVICE: ServiceDescriptor = budget_service_pb2.DESCRIPTOR.services_by_name["BudgetService"]
ALERT_SERVICE: ServiceDescriptor = alerts_pb2.DESCRIPTOR.services_by_name["AlertService"]
SERVICES = (BUDGET_SERVICE, ALERT_SERVICE)
DAY = 86_400
MODEL = ("openai", "gpt-4o-mini")
# The fixture run's reservations, one in each state (World.seed).
HOLDS = ("held", "blocked", "done", "llm", "expired", "asks")
RPC_TIMEOUT_S = 15.0


def _documented_codes() -> dict[str, grpc.StatusCode]:
    """ErrorInfo reason -> the one gRPC code errors.proto documents for it
    (each ErrorReason's comment starts with it: "// NOT_FOUND: the run ...")."""
    text = (Path(__file__).parents[2] / "proto/runcap/v1/errors.proto").read_text()
    entries = re.findall(r"((?:[ \t]*//[^\n]*\n)+)[ \t]*ERROR_REASON_(\w+) = \d+;", text)
    codes = {}
    for comment, reason in entries:
        code = re.match(r"\s*//\s*([A-Z_]+):", comment)
        if code is not None:
            codes[reason] = grpc.StatusCode[code.group(1)]
    return codes


REASON_CODES = _documented_codes()


@dataclass(frozen=True)
class Ids:
    """One RPC's fixtures: runs, scopes and an approval, named after the RPC.
    Reservation ids ("held", "blocked", "done", "llm", "expired") are per run."""

    prefix: str

    @property
    def run(self) -> str:
        """A root run with holds in every state and an approval waiting."""
        return f"{self.prefix}-run"

    @property
    def child(self) -> str:
        """A subagent run of `run`, with a hold."""
        return f"{self.prefix}-child"

    @property
    def closed(self) -> str:
        return f"{self.prefix}-closed"

    @property
    def team(self) -> str:
        return f"{self.prefix}-team"

    @property
    def user(self) -> str:
        return f"{self.prefix}-user"

    @property
    def key(self) -> str:
        return f"{self.prefix}-key"

    @property
    def rule(self) -> str:
        """An alert rule on the team."""
        return f"{self.prefix}-rule"

    @property
    def approval(self) -> str:
        return f"{self.run}/approval:meter:tool:other"

    def new(self, name: str) -> str:
        """An id nothing uses yet (until a template creates it)."""
        return f"{self.prefix}-{name}"

    def scopes(self) -> list[tuple[int, str]]:
        """The run's team, user and API key."""
        return [
            (budget_pb2.SCOPE_KIND_TEAM, self.team),
            (budget_pb2.SCOPE_KIND_USER, self.user),
            (budget_pb2.SCOPE_KIND_API_KEY, self.key),
        ]

    def known(self) -> list[str]:
        """Ids worth mixing into fuzzed strings: real runs, holds, scopes."""
        return [
            self.run,
            self.child,
            self.closed,
            self.team,
            self.user,
            self.key,
            *HOLDS,
            f"{self.run}/held",
            self.approval,
            self.rule,
            *MODEL,
        ]


def for_rpc(method: str) -> Ids:
    return Ids(method.lower())


def for_templates(method: str) -> Ids:
    """Fixtures nothing fuzzes: where an RPC's templates are shown valid."""
    return Ids(f"tpl-{method.lower()}")


def _dur(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def _scope(kind: int, scope_id: str) -> budget_pb2.ScopeRef:
    return budget_pb2.ScopeRef(kind=kind, id=scope_id)  # type: ignore[arg-type]


def _policy() -> budget_pb2.RunPolicy:
    return budget_pb2.RunPolicy(
        meter_limits={"tool:search": 1000},
        approved_meters=["tool:search"],
        max_in_flight=50,
    )


def templates(ids: Ids) -> dict[str, list[Message]]:
    """Valid requests for every RPC, on the fixtures of `ids` (all answer OK
    on freshly seeded fixtures: test_templates_are_valid checks it)."""
    team = _scope(budget_pb2.SCOPE_KIND_TEAM, ids.team)
    full_policy = budget_pb2.RunPolicy(
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_SOFT_GATE,
        soft_gate_margin_percent=10,
        thresholds=budget_pb2.Thresholds(info_percent=50, warn_percent=70, throttle_percent=90),
        throttle_base_delay=_dur(1),
        throttle_max_delay=_dur(10),
        max_tokens=1_000_000,
        meter_limits={"tool:search": 10},
        rate_limit=budget_pb2.RateLimit(max_calls=100, window=_dur(60)),
        max_in_flight=8,
        max_depth=3,
        max_children=4,
        auto_downgrade=True,
        downgrade_models=["openai/gpt-4o-mini"],
        approval_percent=90,
        approved_meters=["tool:search"],
    )
    calibrated = budget_pb2.RunPolicy(
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_CALIBRATED,
        calibration_min_samples=3,
        exposure_allowance_percent=10,
    )
    llm = pb.LlmCall(
        provider=MODEL[0],
        model=MODEL[1],
        input_tokens=1000,
        max_output_tokens=500,
        needs_tools=True,
        candidate_models=["openai/gpt-4o"],
    )
    price = pb.ModelPrice(
        provider="fuzz",
        model=ids.new("model"),
        input_rate=1_000_000,
        output_rate=2_000_000,
        cache_read_rate=100_000,
        cache_write_rate=1_250_000,
        reasoning_rate=2_000_000,
        context_window=128_000,
        max_output_tokens=4096,
        tools=True,
        modalities=["text", "image"],
    )
    return {
        "CreateRun": [
            pb.CreateRunRequest(
                run_id=ids.new("new"),
                limit_micros=5_000_000,
                labels={"agent": "fuzz", "team": "x"},
                default_ttl=_dur(60),
                api_key_id=ids.key,
                user_id=ids.user,
                team_id=ids.team,
                policy=full_policy,
            ),
            pb.CreateRunRequest(
                run_id=ids.new("kid"), limit_micros=1_000_000, parent_run_id=ids.run
            ),
            pb.CreateRunRequest(limit_micros=1_000_000, policy=calibrated),
        ],
        "GetRun": [pb.GetRunRequest(run_id=ids.run), pb.GetRunRequest(run_id=ids.child)],
        "ListRuns": [
            pb.ListRunsRequest(
                created_after=timestamp_pb2.Timestamp(seconds=0),
                created_before=timestamp_pb2.Timestamp(seconds=4_102_444_800),
                page_size=5,
            )
        ],
        "Reserve": [
            pb.ReserveRequest(
                run_id=ids.run,
                reservation_id=ids.new("r1"),
                amount_micros=1000,
                ttl=_dur(60),
                meter="tool:search",
                meter_units=2,
            ),
            pb.ReserveRequest(run_id=ids.run, llm_call=llm, ttl=_dur(60)),
            pb.ReserveRequest(run_id=ids.child, amount_micros=1000),
            pb.ReserveRequest(
                run_id=ids.run, reservation_id="held", amount_micros=1000, ttl=_dur(DAY)
            ),
        ],
        "Commit": [
            pb.CommitRequest(run_id=ids.run, reservation_id="held", actual_micros=900),
            pb.CommitRequest(
                run_id=ids.run,
                reservation_id="llm",
                usage=pb.TokenUsage(input_tokens=1000, output_tokens=300),
            ),
            pb.CommitRequest(run_id=ids.run, reservation_id="expired", actual_micros=100),
            pb.CommitRequest(run_id=ids.child, reservation_id="held", actual_micros=1000),
        ],
        "Refund": [
            pb.RefundRequest(run_id=ids.run, reservation_id="held"),
            pb.RefundRequest(run_id=ids.run, reservation_id="done"),
            pb.RefundRequest(run_id=ids.child, reservation_id="held"),
        ],
        "CloseRun": [pb.CloseRunRequest(run_id=ids.run), pb.CloseRunRequest(run_id=ids.closed)],
        "SuspendRun": [pb.SuspendRunRequest(run_id=ids.run)],
        "ResumeRun": [pb.ResumeRunRequest(run_id=ids.run)],
        "Watch": [
            pb.WatchRequest(run_id=ids.run),
            pb.WatchRequest(run_id=ids.run, after_revision=1),
        ],
        "SetScopeLimit": [
            pb.SetScopeLimitRequest(
                scope=team, period=budget_pb2.PERIOD_DAILY, limit_micros=40_000_000
            ),
            pb.SetScopeLimitRequest(scope=team, period=budget_pb2.PERIOD_MONTHLY, clear=True),
        ],
        "GetScope": [pb.GetScopeRequest(scope=team)],
        "SetScopePolicy": [
            pb.SetScopePolicyRequest(scope=team, policy=full_policy),
            pb.SetScopePolicyRequest(
                scope=_scope(budget_pb2.SCOPE_KIND_USER, ids.user), clear=True
            ),
        ],
        "SetModelPrice": [pb.SetModelPriceRequest(price=price)],
        "DeleteModelPrice": [pb.DeleteModelPriceRequest(provider="fuzz", model=ids.new("model"))],
        "GetModelPrice": [pb.GetModelPriceRequest(provider=MODEL[0], model=MODEL[1])],
        "ReloadPriceTable": [pb.ReloadPriceTableRequest()],
        "GetDecision": [
            pb.GetDecisionRequest(decision_id=f"{ids.run}/held"),
            pb.GetDecisionRequest(decision_id=f"{ids.run}/blocked"),
        ],
        "Approve": [pb.ApproveRequest(approval_id=ids.approval)],
        "Deny": [pb.DenyRequest(approval_id=ids.approval)],
        "PutAlertRule": [alerts_pb2.PutAlertRuleRequest(rule=_rule(ids))],
        "ListAlertRules": [alerts_pb2.ListAlertRulesRequest()],
        "DeleteAlertRule": [alerts_pb2.DeleteAlertRuleRequest(rule_id=ids.rule)],
        "ListAlerts": [
            alerts_pb2.ListAlertsRequest(
                page_size=10, rule_id=ids.rule, state=alerts_pb2.ALERT_STATE_DELIVERED
            )
        ],
    }


def _rule(ids: Ids) -> alerts_pb2.AlertRule:
    """An alert rule with every field set. Its targets are loopback addresses
    that nothing listens on, and the fuzz servers run no alert engine: no
    fuzzed URL is ever called."""
    return alerts_pb2.AlertRule(
        rule_id=ids.rule,
        scope=_scope(budget_pb2.SCOPE_KIND_TEAM, ids.team),
        triggers=[alerts_pb2.ALERT_TRIGGER_THRESHOLD, alerts_pb2.ALERT_TRIGGER_BURN_RATE],
        burn_rate_micros_per_minute=1_000_000,
        targets=[
            alerts_pb2.AlertTarget(
                webhook=alerts_pb2.WebhookTarget(url="http://127.0.0.1:9/hook", secret="s")
            ),
            alerts_pb2.AlertTarget(slack=alerts_pb2.SlackTarget(url="http://127.0.0.1:9/slack")),
            alerts_pb2.AlertTarget(
                pagerduty=alerts_pb2.PagerDutyTarget(url="http://127.0.0.1:9/pd", routing_key="k")
            ),
        ],
        min_interval=_dur(60),
        max_alerts_per_hour=10,
        owner="oncall",
        description="fuzz",
        labels={"plan": "fuzz"},
    )


# --- calling any RPC by its descriptor ----------------------------------------------


def message_class(descriptor: Any) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def find_method(name: str, services: Sequence[ServiceDescriptor]) -> MethodDescriptor:
    for service in services:
        if name in service.methods_by_name:
            method: MethodDescriptor = service.methods_by_name[name]
            return method
    raise KeyError(name)


def invoke(channel: grpc.Channel, method: MethodDescriptor, request: Message | bytes) -> Any:
    """One call; a stream answers with its first message (then is cancelled)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response = message_class(method.output_type)
    serialize: Callable[[Any], bytes] | None = (
        None if isinstance(request, bytes) else type(request).SerializeToString
    )
    if method.server_streaming:
        stream = channel.unary_stream(
            path, request_serializer=serialize, response_deserializer=response.FromString
        )(request, timeout=RPC_TIMEOUT_S)
        try:
            return next(iter(stream))
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]
    call = channel.unary_unary(
        path, request_serializer=serialize, response_deserializer=response.FromString
    )
    return call(request, timeout=RPC_TIMEOUT_S)


# --- the ledger's whole state ----------------------------------------------------------


Contents = dict[Any, Any]


class Store(Protocol):
    """The backend's raw contents, read again only where they were written."""

    def refresh(self, contents: Contents | None) -> tuple[bool, Contents]:
        """Whether anything was written since the last call, and the contents
        now: `contents` (the last ones read) updated, or all read when None."""

    def close(self) -> None: ...


class SqliteStore:
    """Every row of every table. PRAGMA data_version tells of other
    connections' commits (the server's); then everything is read again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._version = -1

    def refresh(self, contents: Contents | None) -> tuple[bool, Contents]:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        written = version != self._version
        self._version = version
        if written or contents is None:
            self._db.execute("BEGIN")  # one snapshot for every table
            try:
                tables = self._db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                ).fetchall()
                contents = {
                    t: sorted(self._db.execute(f'SELECT * FROM "{t}"'), key=repr) for (t,) in tables
                }
            finally:
                self._db.execute("ROLLBACK")
        return written, contents

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


class RedisStore:
    """Every key of the namespace with its value, read by type. Keyspace
    notifications name the keys written; only those are read again.

    Left out: `<ns>:due:*`, the sweeper's index and leases, written by the
    server's background task on its own schedule, not by any request.
    """

    def __init__(self, url: str, namespace: str) -> None:
        self.namespace = namespace
        self.client = redis.Redis.from_url(url)
        self.client.config_set("notify-keyspace-events", "KA")
        self._events = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._channel = f"__keyspace@0__:{namespace}:"
        self._events.psubscribe(self._channel + "*")

    def _written(self) -> set[bytes]:
        """The keys written since the last call (the sweeper's left out)."""
        # Redis delivers the notifications of earlier writes before this PONG.
        self._events.ping()
        prefix = len(self._channel) - len(self.namespace) - 1  # keep "<ns>:" in the key
        keys: set[bytes] = set()
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while True:
            # None also stands for a message the client filtered out.
            event = self._events.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if event is None:
                assert time.monotonic() < deadline, "Redis never answered PING (pub/sub)"
                continue
            if event["type"] == "pong":
                return {k for k in keys if not self._sweepers(k)}
            if event["type"] == "pmessage":
                keys.add(event["channel"][prefix:])

    def _sweepers(self, key: bytes) -> bool:
        return key.startswith(f"{self.namespace}:due:".encode())

    def refresh(self, contents: Contents | None) -> tuple[bool, Contents]:
        written = self._written()
        if contents is None:
            found = self.client.scan_iter(match=f"{self.namespace}:*", count=1000)
            return bool(written), self._read({k for k in found if not self._sweepers(k)})
        if not written:
            return False, contents
        now = self._read(written)
        return True, {k: v for k, v in contents.items() if k not in written} | now

    def _read(self, keys: set[bytes]) -> Contents:
        """The values of those of `keys` that exist, read by type."""
        ordered = sorted(keys)
        with self.client.pipeline(transaction=False) as pipe:
            for key in ordered:
                pipe.type(key)
            types = pipe.execute()
        found = [(key, kind) for key, kind in zip(ordered, types, strict=True) if kind != b"none"]
        readers: dict[bytes, Callable[[Any, bytes], Any]] = {
            b"string": lambda p, k: p.get(k),
            b"hash": lambda p, k: p.hgetall(k),
            b"set": lambda p, k: p.smembers(k),
            b"zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
            b"list": lambda p, k: p.lrange(k, 0, -1),
            b"stream": lambda p, k: p.xrange(k),
        }
        with self.client.pipeline(transaction=False) as pipe:
            for key, kind in found:
                readers[kind](pipe, key)
            values = pipe.execute()
        return {key: value for (key, _), value in zip(found, values, strict=True)}

    def close(self) -> None:
        self._events.close()
        self.client.close()


def diff(before: Mapping[Any, Any], after: Mapping[Any, Any], limit: int = 5) -> str:
    """What changed between two dumps, briefly."""
    lines = []
    for key in sorted(set(before) | set(after), key=repr):
        if before.get(key) != after.get(key):
            was, now = repr(before.get(key))[:300], repr(after.get(key))[:300]
            lines.append(f"  {key!r}:\n    before {was}\n    after  {now}")
    shown = "\n".join(lines[:limit])
    return shown + (f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else "")


# --- the world: a server and its fixtures ------------------------------------------------


@dataclass
class World:
    """A server on one backend, with every RPC's fixtures seeded."""

    backend: str
    server: ServerProcess
    store: Store
    services: Sequence[ServiceDescriptor] = SERVICES
    channel: grpc.Channel = field(init=False)
    # The store's contents as last read, and the last baseline with the
    # fixtures it is of (see `baseline`).
    _contents: Contents | None = field(init=False, default=None)
    _baseline: tuple[Ids, dict[str, Any]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.server.target)

    def close(self) -> None:
        self.channel.close()

    def rpc(self, name: str, request: Message | bytes) -> Any:
        return invoke(self.channel, find_method(name, self.services), request)

    def seed(self, ids: Ids) -> None:
        """The fixtures of one RPC: a run with holds in every state and an
        approval waiting, charged to a team with a ceiling; a child run with a
        hold; a closed run."""
        team = _scope(budget_pb2.SCOPE_KIND_TEAM, ids.team)
        self.rpc(
            "SetScopeLimit",
            pb.SetScopeLimitRequest(
                scope=team, period=budget_pb2.PERIOD_LIFETIME, limit_micros=50_000_000
            ),
        )
        self.rpc(
            "CreateRun",
            pb.CreateRunRequest(
                run_id=ids.run,
                limit_micros=10_000_000,
                labels={"agent": "fuzz"},
                api_key_id=ids.key,
                user_id=ids.user,
                team_id=ids.team,
                policy=_policy(),
            ),
        )
        self.rpc(
            "CreateRun",
            pb.CreateRunRequest(run_id=ids.child, limit_micros=5_000_000, parent_run_id=ids.run),
        )
        self.rpc("CreateRun", pb.CreateRunRequest(run_id=ids.closed, limit_micros=1_000_000))
        self.rpc("CloseRun", pb.CloseRunRequest(run_id=ids.closed))
        day = _dur(DAY)
        for run in (ids.run, ids.child):
            self.rpc(
                "Reserve",
                pb.ReserveRequest(run_id=run, reservation_id="held", amount_micros=1000, ttl=day),
            )
        reserve = [
            pb.ReserveRequest(run_id=ids.run, reservation_id="blocked", amount_micros=20_000_000),
            pb.ReserveRequest(run_id=ids.run, reservation_id="done", amount_micros=1000, ttl=day),
            pb.ReserveRequest(
                run_id=ids.run,
                reservation_id="llm",
                llm_call=pb.LlmCall(
                    provider=MODEL[0], model=MODEL[1], input_tokens=1000, max_output_tokens=500
                ),
                ttl=day,
            ),
            pb.ReserveRequest(
                run_id=ids.run, reservation_id="expired", amount_micros=1000, ttl=_dur(0)
            ),
            pb.ReserveRequest(
                run_id=ids.run, reservation_id="asks", amount_micros=1000, meter="tool:other"
            ),
        ]
        reserve[3].ttl.nanos = 1_000_000  # 1 ms: expired by the time fuzzing starts
        for request in reserve:
            self.rpc("Reserve", request)
        self.rpc(
            "Commit", pb.CommitRequest(run_id=ids.run, reservation_id="done", actual_micros=900)
        )
        self.rpc("PutAlertRule", alerts_pb2.PutAlertRuleRequest(rule=_rule(ids)))

    def wait_settled(self, ids: Ids, timeout_s: float = 30.0) -> None:
        """Until the 1 ms hold has expired on the run and on its scopes (the
        sweeper's doing, not a request's): the fixtures then hold still."""
        deadline = time.monotonic() + timeout_s
        while not self._settled(ids):
            assert time.monotonic() < deadline, f"{ids.run}/expired never expired everywhere"
            time.sleep(0.05)

    def _settled(self, ids: Ids) -> bool:
        request = pb.GetDecisionRequest(decision_id=f"{ids.run}/expired")
        if self.rpc("GetDecision", request).reservation_status != (
            budget_pb2.RESERVATION_STATUS_EXPIRED
        ):
            return False
        # The run's holds count its child's too, like its scopes'.
        held = self.rpc("GetRun", pb.GetRunRequest(run_id=ids.run)).state.active_reservations
        for kind, scope_id in ids.scopes():
            scope = self.rpc("GetScope", pb.GetScopeRequest(scope=_scope(kind, scope_id))).scope
            if any(usage.active_reservations != held for usage in scope.usage):
                return False
        return True

    def reads(self, ids: Ids) -> dict[str, Any]:
        """The fixtures through the API (GetRun, GetScope), read concurrently."""
        stub = BudgetServiceStub(self.channel)
        pending: dict[str, grpc.Future[Any]] = {
            f"GetRun {run}": stub.GetRun.future(pb.GetRunRequest(run_id=run), timeout=RPC_TIMEOUT_S)
            for run in (ids.run, ids.child, ids.closed)
        }
        for kind, scope_id in ids.scopes():
            request = pb.GetScopeRequest(scope=_scope(kind, scope_id))
            pending[f"GetScope {scope_id}"] = stub.GetScope.future(request, timeout=RPC_TIMEOUT_S)
        return {name: future.result() for name, future in pending.items()}

    def baseline(self, ids: Ids) -> dict[str, Any]:
        """What an error answer must leave as it was: the backend's raw
        contents and the fixtures through the API. Read again only after the
        store was written (or for other fixtures): until then they are what
        the last check found."""
        written, self._contents = self.store.refresh(self._contents)
        if written or self._baseline is None or self._baseline[0] != ids:
            self._baseline = (ids, {"contents": self._contents, **self.reads(ids)})
        return self._baseline[1]

    def check(self, method: str, request: Message | bytes, ids: Ids) -> None:
        """Sends one fuzzed request and holds its answer to the rules."""
        before = self.baseline(ids)
        log_start = len(self.server.log)
        failure: grpc.RpcError | None = None
        try:
            response = self.rpc(method, request)
        except grpc.RpcError as error:
            failure = error
        else:
            self._baseline = None
            self.undo_hold(method, request, response)
        if failure is not None:
            check_error(method, request, failure)
            _, self._contents = self.store.refresh(self._contents)
            after = {"contents": self._contents, **self.reads(ids)}
            changed = {k for k in before if before[k] != after[k]}
            assert not changed, (
                f"{method} failed with {failure.code().name} but changed {sorted(changed)}:\n"
                + diff(before["contents"], after["contents"])
                + f"\nrequest: {_shown(request)}"
            )
        assert self.server.process is not None
        assert self.server.process.poll() is None, (
            f"the server died on {method}: {_shown(request)}\n" + "".join(self.server.log[-30:])
        )
        logged = [line for line in self.server.log[log_start:] if "Traceback" in line]
        assert not logged, f"the server logged a traceback on {method}: {_shown(request)}"

    def undo_hold(self, method: str, request: Any, response: Any) -> None:
        """Refunds a Reserve's fresh hold at once, so no short-lived hold can
        expire (a change no request made) while a later example is checked."""
        if method != "Reserve" or response.replayed or not response.expire_time.seconds:
            return
        self.rpc(
            "Refund",
            pb.RefundRequest(run_id=request.run_id, reservation_id=response.reservation_id),
        )


def _shown(request: Message | bytes) -> str:
    return repr(request[:200]) if isinstance(request, bytes) else describe(request)


def check_error(method: str, request: Message | bytes, error: grpc.RpcError) -> None:
    """A failed call's status: a client error with a message a person can act
    on, and the rich status the API documents."""
    code = error.code()
    where = f"{method}: {_shown(request)}"
    assert code in CLIENT_ERRORS, f"{method} answered {code.name}: {error.details()}\n{where}"
    assert error.details(), f"{code.name} with an empty message\n{where}"
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError as mismatch:  # the status detail contradicts the call's code
        raise AssertionError(f"{code.name}, but {mismatch}\n{where}") from None
    if status is None:
        # Only the transport's own refusal of an oversized request has no
        # runcap status (it never reached runcap).
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (
            f"{code.name} without a google.rpc.Status: {error.details()}\n{where}"
        )
        assert is_oversized(request), f"RESOURCE_EXHAUSTED: {error.details()}\n{where}"
        return
    info = error_details_pb2.ErrorInfo()
    assert status.details, f"no details\n{where}"
    assert status.details[0].Unpack(info), f"no ErrorInfo first\n{where}"
    assert info.domain == "runcap.dev"
    assert REASON_CODES.get(info.reason) == code, (
        f"reason {info.reason} came with {code.name}, not {REASON_CODES.get(info.reason)}\n{where}"
    )
    kinds = [d.type_url for d in status.details]
    assert len(kinds) == len(set(kinds)), f"a detail type twice: {kinds}\n{where}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = bad_request(error)
        assert bad.field_violations, f"a BadRequest with no violation\n{where}"
        for violation in bad.field_violations:
            assert violation.field, f"{violation}\n{where}"
            assert violation.description, f"{violation}\n{where}"


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest:
    """The BadRequest detail of an INVALID_ARGUMENT."""
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status: {error}"
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details), f"no BadRequest: {error}"
    return bad


# --- servers ------------------------------------------------------------------------------

SERVER_ENV = {
    # A Watch resumed at the head answers with a progress message soon.
    "RUNCAP_WATCH_HEARTBEAT": "200ms",
    "RUNCAP_SWEEP_INTERVAL": "100ms",
    # No alert engine: fuzzed rules never send anything anywhere, and nothing
    # writes alerts behind the requests' backs.
    "RUNCAP_ALERTS": "false",
}


@contextlib.contextmanager
def world(backend: str, directory: Path) -> Iterator[World]:
    """A server on `backend` (its own SQLite file, or its own redis-server with
    keyspace notifications on) with every RPC's fixtures; stopped on exit."""
    env = dict(SERVER_ENV)
    db: Path | None = None
    with contextlib.ExitStack() as cleanup:
        if backend == "sqlite":
            db = directory / "runcap.db"
            store: Store = SqliteStore(db)
        else:
            redis_server = RedisServer(directory).start()
            cleanup.callback(redis_server.stop)
            env.update(RUNCAP_BACKEND="redis", RUNCAP_REDIS_URL=redis_server.url)
            store = RedisStore(redis_server.url, "rc")
        cleanup.callback(store.close)
        server = ServerProcess(db, env=env).start()
        cleanup.callback(server.stop)
        built = World(backend, server, store)
        cleanup.callback(built.close)
        # Each RPC's fixtures to fuzz, and fresh ones to try its templates on.
        every = [ids for m in templates(Ids("x")) for ids in (for_rpc(m), for_templates(m))]
        for ids in every:
            built.seed(ids)
        for ids in every:
            built.wait_settled(ids)
        yield built


def method_names(services: Sequence[ServiceDescriptor]) -> list[str]:
    return [m.name for s in services for m in s.methods]
