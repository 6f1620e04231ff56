"""Alert notifications end to end: a real server process (SQLite, and a Redis
cluster), real HTTP receivers on loopback ports, real runs crossing their
thresholds, blocked, suspended, escalated, overrun and burning money."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from aiohttp import web
from google.rpc import error_details_pb2

from runcap.v1 import alerts_pb2, budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.alerts_pb2_grpc import AlertServiceStub
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.integration.rpc import error_info, new_id
from tests.redis_servers import RedisCluster
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.alerts_pb2_grpc import AlertServiceAsyncStub
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

SECRET = "whsec-test-0123456789"
DASHBOARD = "http://dash.example:8080"
# Short intervals so retries, polls and leases fit the test budget.
FAST_ENV = {
    "RUNCAP_ALERTS_POLL": "50ms",
    "RUNCAP_ALERTS_RETRY_BASE": "50ms",
    "RUNCAP_ALERTS_RETRY_MAX": "200ms",
    "RUNCAP_ALERTS_MAX_ATTEMPTS": "3",
    "RUNCAP_ALERTS_TIMEOUT": "1s",
    "RUNCAP_ALERTS_LEASE": "2s",
    "RUNCAP_DASHBOARD_URL": DASHBOARD,
}
T = alerts_pb2


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on a free loopback port that records every request.

    `script` answers the first requests in turn ("500", "400", "drop" the
    connection, "hang" until released, "429:<seconds>" with Retry-After),
    then every later one with `then` ("ok", or one of those).
    """

    script: Sequence[str] = ()
    then: str = "ok"
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        self._release.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body, time.monotonic()))
        self._arrived.set()
        n = len(self.received)
        action = self.script[n - 1] if n <= len(self.script) else self.then
        if action == "drop":
            assert request.transport is not None
            request.transport.close()
        elif action == "hang":
            await self._release.wait()
        elif action.startswith("429:"):
            return web.Response(status=429, headers={"Retry-After": action[4:]})
        elif action.isdigit():
            return web.Response(status=int(action), text=f"answered {action}")
        return web.Response(text="ok")

    async def wait(self, count: int, timeout_s: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(self.received)} of {count} requests arrived: {self.received}"
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return list(self.received)

    async def quiet(self, count: int, for_s: float = 1.0) -> list[Received]:
        """Exactly `count` requests, and no more for `for_s`."""
        await self.wait(count)
        await asyncio.sleep(for_s)
        assert len(self.received) == count, [r.json.get("trigger") for r in self.received]
        return list(self.received)


def verified(received: Received, secret: str = SECRET, tolerance_s: int = 300) -> Any:
    """The body, after checking its signature as docs/alerts.md tells receivers to."""
    header = received.headers["X-Runcap-Signature"]
    parts = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(parts["t"])
    assert abs(time.time() - timestamp) <= tolerance_s
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + received.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(expected, parts["v1"]), "bad signature"
    assert received.headers["Content-Type"] == "application/json"
    body = received.json
    assert received.headers["X-Runcap-Alert-Id"] == body["alert_id"]
    return body


LEVELS = ("threshold", "throttle", "stop")


def by_level(bodies: Iterable[Any]) -> list[Any]:
    """Bodies in the order of their crossings: workers deliver in parallel, in any order."""
    return sorted(bodies, key=lambda body: LEVELS.index(body["trigger"]))


def webhook(url: str, secret: str = SECRET) -> alerts_pb2.AlertTarget:
    return T.AlertTarget(webhook=T.WebhookTarget(url=url, secret=secret))


def run_scope(run_id: str) -> budget_pb2.ScopeRef:
    return budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_RUN, id=run_id)


@dataclass
class Api:
    budget: BudgetServiceAsyncStub
    alerts: AlertServiceAsyncStub

    async def rule(
        self,
        run_id: str,
        triggers: Sequence[alerts_pb2.AlertTrigger.ValueType],
        targets: Sequence[alerts_pb2.AlertTarget],
        **fields: Any,
    ) -> str:
        """A rule about this run only (the server is shared by the module's tests)."""
        rule_id = new_id("rule")
        rule = T.AlertRule(
            rule_id=rule_id,
            scope=run_scope(run_id),
            triggers=triggers,
            targets=targets,
            owner="Dana Whitfield",
            **fields,
        )
        await self.alerts.PutAlertRule(T.PutAlertRuleRequest(rule=rule))
        return rule_id

    async def run(self, limit_micros: int, **kwargs: Any) -> str:
        run_id = kwargs.pop("run_id", None) or new_id("run")
        await self.budget.CreateRun(
            pb.CreateRunRequest(run_id=run_id, limit_micros=limit_micros, **kwargs)
        )
        return run_id

    async def spend(self, run_id: str, *amounts: int) -> None:
        """Hold every amount first, then commit them in order: each commit is
        one step up, and no Reserve is made inside the throttle band."""
        ids = [new_id("res") for _ in amounts]
        for rid, amount in zip(ids, amounts, strict=True):
            reply = await self.budget.Reserve(
                pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=amount)
            )
            assert reply.decision == budget_pb2.DECISION_ALLOW, reply
        for rid, amount in zip(ids, amounts, strict=True):
            await self.budget.Commit(
                pb.CommitRequest(run_id=run_id, reservation_id=rid, actual_micros=amount)
            )

    async def alerts_of(self, rule_id: str, **filters: Any) -> list[alerts_pb2.Alert]:
        reply = await self.alerts.ListAlerts(T.ListAlertsRequest(rule_id=rule_id, **filters))
        return list(reply.alerts)

    async def settled(self, rule_id: str, count: int, timeout_s: float = 15.0) -> list[Any]:
        """The rule's alerts once `count` exist and none is PENDING."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.alerts_of(rule_id)
            if len(found) >= count and all(a.state != T.ALERT_STATE_PENDING for a in found):
                return found
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = tmp_path_factory.mktemp("alerts") / "runcap.db"
    server = ServerProcess(db, env=FAST_ENV).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster_server(redis_cluster: RedisCluster) -> Iterator[ServerProcess]:
    env = {
        **FAST_ENV,
        "RUNCAP_BACKEND": "redis",
        "RUNCAP_REDIS_CLUSTER_NODES": ",".join(redis_cluster.startup_nodes),
        "RUNCAP_REDIS_NAMESPACE": f"alerts-{uuid.uuid4().hex[:8]}",
    }
    server = ServerProcess(None, env=env).start()
    try:
        yield server
    finally:
        server.stop()


async def _api(target: str) -> AsyncIterator[Api]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield Api(BudgetServiceStub(channel), AlertServiceStub(channel))


@pytest.fixture
async def api(sqlite_server: ServerProcess) -> AsyncIterator[Api]:
    async for value in _api(sqlite_server.target):
        yield value


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    try:
        yield started
    finally:
        await started.stop()


THRESHOLDS = budget_pb2.RunPolicy(
    thresholds=budget_pb2.Thresholds(info_percent=0, warn_percent=80, throttle_percent=95)
)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("redis-cluster", marks=pytest.mark.redis)]
)
async def test_crossing_80_95_100_delivers_one_signed_message_per_crossing(
    backend: str, request: pytest.FixtureRequest, receiver: Receiver
) -> None:
    server: ServerProcess = request.getfixturevalue(
        "sqlite_server" if backend == "sqlite" else "cluster_server"
    )
    async for api in _api(server.target):
        run_id = new_id("run")
        triggers = [T.ALERT_TRIGGER_THRESHOLD, T.ALERT_TRIGGER_THROTTLE, T.ALERT_TRIGGER_STOP]
        rule_id = await api.rule(run_id, triggers, [webhook(receiver.url)])
        await api.run(
            1_000_000,
            run_id=run_id,
            labels={"agent": "enricher"},
            team_id="data",
            policy=THRESHOLDS,
        )
        await api.spend(run_id, 850_000, 110_000, 40_000)
        # At the wall: more calls are blocked, which is not another stop.
        for i in range(5):
            blocked = await api.budget.Reserve(
                pb.ReserveRequest(run_id=run_id, reservation_id=f"b{i}", amount_micros=10)
            )
            assert blocked.decision == budget_pb2.DECISION_BLOCK
        bodies = by_level(verified(r) for r in await receiver.quiet(3))
    assert [(b["trigger"], b["threshold"]) for b in bodies] == [
        ("threshold", "warn"),
        ("throttle", "throttle"),
        ("stop", "stop"),
    ]
    assert len({b["alert_id"] for b in bodies}) == 3
    stop = bodies[2]
    assert stop["rule_id"] == rule_id
    assert stop["run"]["run_id"] == run_id
    assert stop["run"]["agent"] == "enricher"
    assert stop["run"]["team_id"] == "data"
    assert stop["spend"]["committed_micros"] == stop["spend"]["limit_micros"] == 1_000_000
    assert (stop["spend"]["committed_usd"], stop["spend"]["limit_usd"]) == ("1.00", "1.00")
    assert stop["spend"]["percent"] == 100
    assert stop["owner"] == "Dana Whitfield"
    assert stop["dashboard_url"] == f"{DASHBOARD}/runs/{run_id}"
    assert bodies[0]["spend"]["committed_micros"] == 850_000
    assert bodies[1]["spend"]["committed_usd"] == "0.96"
    async for api in _api(server.target):
        listed = await api.settled(rule_id, 3)
    assert {a.alert_id for a in listed} == {b["alert_id"] for b in bodies}
    assert all(a.state == T.ALERT_STATE_DELIVERED and a.attempts == 1 for a in listed)
    assert listed[0].trigger == T.ALERT_TRIGGER_STOP  # newest first
    assert listed[0].budget.committed_micros == 1_000_000
    assert listed[0].threshold == budget_pb2.THRESHOLD_LEVEL_STOP


async def test_failed_attempts_are_retried_until_delivered(api: Api) -> None:
    receiver = await Receiver(script=["500", "drop"]).start()
    try:
        run_id = await api.run(1_000_000)
        rule_id = await api.rule(run_id, [T.ALERT_TRIGGER_SUSPENDED], [webhook(receiver.url)])
        await api.budget.SuspendRun(pb.SuspendRunRequest(run_id=run_id))
        attempts = await receiver.quiet(3)
    finally:
        await receiver.stop()
    assert len({verified(r)["alert_id"] for r in attempts}) == 1
    # Back-off between attempts (50 ms, then up to 100 ms, jittered down to half).
    assert attempts[1].at - attempts[0].at >= 0.02
    (alert,) = await api.settled(rule_id, 1)
    assert alert.state == T.ALERT_STATE_DELIVERED
    assert alert.attempts == 3
    assert "Server disconnected" in alert.last_error  # the last failure stays on record
    assert alert.trigger == T.ALERT_TRIGGER_SUSPENDED
    assert alert.budget.status == budget_pb2.RUN_STATUS_SUSPENDED


async def test_a_receiver_that_keeps_failing_leaves_a_dead_letter(
    api: Api, sqlite_server: ServerProcess
) -> None:
    failing = await Receiver(then="503").start()
    refusing = await Receiver(then="400").start()
    try:
        run_id = await api.run(1_000_000)
        retried = await api.rule(run_id, [T.ALERT_TRIGGER_SUSPENDED], [webhook(failing.url)])
        refused = await api.rule(run_id, [T.ALERT_TRIGGER_SUSPENDED], [webhook(refusing.url)])
        await api.budget.SuspendRun(pb.SuspendRunRequest(run_id=run_id))
        await failing.quiet(3)  # RUNCAP_ALERTS_MAX_ATTEMPTS
        await refusing.quiet(1)  # a 4xx other than 429 is final: no retry
    finally:
        await failing.stop()
        await refusing.stop()
    (dead,) = await api.settled(retried, 1)
    assert (dead.state, dead.attempts) == (T.ALERT_STATE_DEAD, 3)
    assert "HTTP 503" in dead.last_error
    assert "answered 503" in dead.last_error
    assert "/hook" not in dead.last_error  # target named by kind and host only
    (final,) = await api.settled(refused, 1)
    assert (final.state, final.attempts) == (T.ALERT_STATE_DEAD, 1)
    assert "HTTP 400" in final.last_error
    # The dead letters are listed by state, and logged.
    letters = await api.alerts_of(retried, state=T.ALERT_STATE_DEAD)
    assert [a.alert_id for a in letters] == [dead.alert_id]
    assert not await api.alerts_of(retried, state=T.ALERT_STATE_DELIVERED)
    deadline = time.monotonic() + 5
    while not any(f"alert {dead.alert_id} is dead" in line for line in sqlite_server.log):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_retry_after_is_honoured(api: Api) -> None:
    receiver = await Receiver(script=["429:1"]).start()
    try:
        run_id = await api.run(1_000_000)
        await api.rule(run_id, [T.ALERT_TRIGGER_SUSPENDED], [webhook(receiver.url)])
        await api.budget.SuspendRun(pb.SuspendRunRequest(run_id=run_id))
        first, second = await receiver.wait(2)
    finally:
        await receiver.stop()
    # Back-off alone would have tried again within 100 ms.
    assert second.at - first.at >= 0.95


async def test_a_runaway_loop_of_1000_blocked_calls_pages_once(
    api: Api, receiver: Receiver
) -> None:
    run_id = await api.run(1_000_000, labels={"agent": "enricher"})
    every_run_trigger = [t for t in T.AlertTrigger.values() if t not in (0, 8)]
    rule_id = await api.rule(
        run_id,
        every_run_trigger,
        [webhook(receiver.url)],
        burn_rate_micros_per_minute=10_000_000,
    )
    await api.spend(run_id, 500_000)  # 50%: below every threshold
    for start in range(0, 1000, 100):
        replies = await asyncio.gather(
            *(
                api.budget.Reserve(
                    pb.ReserveRequest(
                        run_id=run_id, reservation_id=f"loop{i}", amount_micros=600_000
                    )
                )
                for i in range(start, start + 100)
            )
        )
        assert {r.decision for r in replies} == {budget_pb2.DECISION_BLOCK}
    (page,) = [verified(r) for r in await receiver.quiet(1)]
    assert page["trigger"] == "stop"
    assert page["details"]["reason"] == "insufficient_budget"
    assert page["details"]["blocking_scope"] == f"run:{run_id}"
    assert "is blocked (insufficient budget" in page["summary"]
    # Unblocked (a Reserve holds money), then blocked again: a new stop, but
    # within the rule's min_interval (10 min by default): recorded, not sent.
    await api.spend(run_id, 50_000)
    blocked = await api.budget.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="again", amount_micros=600_000)
    )
    assert blocked.decision == budget_pb2.DECISION_BLOCK
    alerts = await api.settled(rule_id, 2)
    assert [a.state for a in alerts] == [T.ALERT_STATE_SUPPRESSED, T.ALERT_STATE_DELIVERED]
    assert len(receiver.received) == 1


async def test_slack_and_pagerduty_messages(api: Api) -> None:
    slack = await Receiver().start()
    pagerduty = await Receiver().start()
    try:
        run_id = await api.run(
            2_000_000, labels={"agent": "enricher", "feature": "crm"}, team_id="data"
        )
        targets = [
            T.AlertTarget(slack=T.SlackTarget(url=slack.url)),
            T.AlertTarget(pagerduty=T.PagerDutyTarget(url=pagerduty.url, routing_key="R0UT1NGKEY")),
        ]
        rule_id = await api.rule(run_id, [T.ALERT_TRIGGER_STOP], targets)
        await api.spend(run_id, 2_000_000)
        (message,) = await slack.quiet(1, for_s=0.3)
        (event,) = await pagerduty.quiet(1, for_s=0.3)
    finally:
        await slack.stop()
        await pagerduty.stop()
    (alert,) = await api.settled(rule_id, 1)
    body = message.json
    assert message.headers["Content-Type"] == "application/json"
    assert "X-Runcap-Signature" not in message.headers
    assert body["text"].startswith(":octagonal_sign: runcap stop: run ")
    header, summary, facts, footer = body["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": "runcap stop"}}
    assert run_id in summary["text"]["text"]
    fields = [f["text"] for f in facts["fields"]]
    assert fields[:4] == [
        f"*Run*\n`{run_id}`",
        "*Agent*\nenricher",
        "*Team*\ndata",
        "*Spend*\n$2.00 of $2.00 (100%)",
    ]
    assert "*Owner*\nDana Whitfield" in fields
    link = f"<{DASHBOARD}/runs/{run_id}|Open the run in the runcap dashboard>"
    assert footer["elements"][0]["text"].startswith(link)
    assert alert.alert_id in footer["elements"][0]["text"]
    pd = event.json
    assert pd["routing_key"] == "R0UT1NGKEY"
    assert pd["event_action"] == "trigger"
    assert pd["dedup_key"] == alert.alert_id == event.headers["X-Runcap-Alert-Id"]
    payload = pd["payload"]
    assert payload["source"] == "runcap"
    assert payload["severity"] == "critical"
    assert payload["class"] == "stop"
    assert payload["component"] == run_id
    assert payload["group"] == "data"
    assert payload["summary"] == alert.summary
    assert payload["custom_details"]["spend"]["limit_usd"] == "2.00"
    assert payload["custom_details"]["run"]["labels"] == {"agent": "enricher", "feature": "crm"}
    assert pd["links"] == [
        {"href": f"{DASHBOARD}/runs/{run_id}", "text": "The run in the runcap dashboard"}
    ]


async def test_burn_rate_alerts_once_per_excursion(api: Api, receiver: Receiver) -> None:
    run_id = await api.run(10_000_000)
    rule_id = await api.rule(
        run_id,
        [T.ALERT_TRIGGER_BURN_RATE],
        [webhook(receiver.url)],
        burn_rate_micros_per_minute=1_000_000,
    )
    await api.spend(run_id, 400_000, 400_000)  # $0.80 in the last minute: under $1/min
    await api.spend(run_id, 400_000)  # $1.20: above
    await api.spend(run_id, 400_000, 400_000)  # still above: the same excursion
    (body,) = [verified(r) for r in await receiver.quiet(1)]
    assert body["trigger"] == "burn_rate"
    assert body["details"] == {
        "burn_micros_per_minute": 1_200_000,
        "burn_rate_micros_per_minute": 1_000_000,
    }
    assert "is burning $1.20/min, above the rule's $1.00/min" in body["summary"]
    (alert,) = await api.settled(rule_id, 1)
    assert alert.trigger == T.ALERT_TRIGGER_BURN_RATE


async def test_suspend_approval_and_overrun_alerts(api: Api, receiver: Receiver) -> None:
    policy = budget_pb2.RunPolicy(approval_percent=50)
    run_id = await api.run(1_000_000, policy=policy)
    triggers = [
        T.ALERT_TRIGGER_SUSPENDED,
        T.ALERT_TRIGGER_APPROVAL_REQUESTED,
        T.ALERT_TRIGGER_OVERRUN,
    ]
    rule_id = await api.rule(run_id, triggers, [webhook(receiver.url)])
    held = await api.budget.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="small", amount_micros=100_000)
    )
    assert held.decision == budget_pb2.DECISION_ALLOW
    # The provider billed more than was held: an overrun.
    await api.budget.Commit(
        pb.CommitRequest(run_id=run_id, reservation_id="small", actual_micros=150_000)
    )
    escalated = await api.budget.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="big", amount_micros=500_000)
    )
    assert escalated.decision == budget_pb2.DECISION_APPROVAL_REQUIRED
    await api.budget.SuspendRun(pb.SuspendRunRequest(run_id=run_id))
    bodies = {b["trigger"]: b for b in (verified(r) for r in await receiver.quiet(3))}
    assert set(bodies) == {"overrun", "approval_requested", "suspended"}
    assert bodies["overrun"]["details"]["overrun_micros"] == 50_000
    assert bodies["overrun"]["details"]["reservation_id"] == "small"
    assert "overran a hold by $0.05 (reservation small)" in bodies["overrun"]["summary"]
    assert bodies["approval_requested"]["details"]["approval_id"] == escalated.approval_id
    assert escalated.approval_id in bodies["approval_requested"]["summary"]
    assert bodies["suspended"]["spend"]["status"] == "suspended"
    assert len(await api.settled(rule_id, 3)) == 3


async def test_rules_put_list_delete_with_secrets_redacted(api: Api) -> None:
    rule = T.AlertRule(
        rule_id=new_id("rule"),
        scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="data"),
        triggers=[T.ALERT_TRIGGER_STOP],
        targets=[
            webhook("https://hooks.example.com/runcap"),
            T.AlertTarget(
                slack=T.SlackTarget(url="https://hooks.slack.com/services/T0/B0/XyZsecret")
            ),
            T.AlertTarget(pagerduty=T.PagerDutyTarget(routing_key="abcdef123456")),
        ],
        description="from plan data-enrichment",
        labels={"plan": "data-enrichment"},
    )
    put = await api.alerts.PutAlertRule(T.PutAlertRuleRequest(rule=rule))
    assert put.changed
    again = await api.alerts.PutAlertRule(T.PutAlertRuleRequest(rule=rule))
    assert not again.changed
    shown = put.rule
    assert shown.min_interval.seconds == 600
    assert shown.max_alerts_per_hour == 30
    hook, slack, pagerduty = shown.targets
    assert (hook.webhook.secret, hook.webhook.secret_set) == ("", True)
    assert slack.slack.url == "https://hooks.slack.com/****cret"
    assert pagerduty.pagerduty.routing_key == "********3456"
    assert pagerduty.pagerduty.url == "https://events.pagerduty.com/v2/enqueue"
    listed = (await api.alerts.ListAlertRules(T.ListAlertRulesRequest())).rules
    (found,) = [r for r in listed if r.rule_id == rule.rule_id]
    assert found == shown
    assert SECRET not in str(listed)
    assert "XyZsecret" not in str(listed)
    changed = T.AlertRule()
    changed.CopyFrom(rule)
    changed.owner = "Sam Okafor"
    assert (await api.alerts.PutAlertRule(T.PutAlertRuleRequest(rule=changed))).changed
    delete = T.DeleteAlertRuleRequest(rule_id=rule.rule_id)
    assert (await api.alerts.DeleteAlertRule(delete)).deleted
    assert not (await api.alerts.DeleteAlertRule(delete)).deleted


def _violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    info, status = error_info(error)
    assert info.reason == "INVALID_ARGUMENT"
    bad = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad) for detail in status.details)
    return {v.field: v.description for v in bad.field_violations}


async def test_bad_rules_are_invalid_argument_and_change_nothing(api: Api) -> None:
    before = (await api.alerts.ListAlertRules(T.ListAlertRulesRequest())).rules
    bad = T.AlertRule(
        rule_id="bad rule",
        scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id=""),
        triggers=[T.ALERT_TRIGGER_STOP, T.ALERT_TRIGGER_STOP, T.ALERT_TRIGGER_BURN_RATE],
        targets=[
            webhook("ftp://files.example.com/x"),
            T.AlertTarget(slack=T.SlackTarget(url="https://hooks.slack.com/services/has space")),
            T.AlertTarget(pagerduty=T.PagerDutyTarget()),
            T.AlertTarget(),
        ],
        max_alerts_per_hour=-1,
    )
    bad.min_interval.FromMilliseconds(2 * 86_400_000)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.alerts.PutAlertRule(T.PutAlertRuleRequest(rule=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _violations(raised.value)
    assert set(violations) == {
        "rule.rule_id",
        "rule.scope.id",
        "rule.triggers[1]",
        "rule.burn_rate_micros_per_minute",
        "rule.targets[0].webhook.url",
        "rule.targets[1].slack.url",
        "rule.targets[2].pagerduty.routing_key",
        "rule.targets[3]",
        "rule.min_interval",
        "rule.max_alerts_per_hour",
    }
    assert "http:// or https://" in violations["rule.targets[0].webhook.url"]
    assert "has space" not in str(violations)  # URLs are never echoed
    for request in (
        T.PutAlertRuleRequest(),
        T.PutAlertRuleRequest(
            rule=T.AlertRule(rule_id="no-targets", triggers=[T.ALERT_TRIGGER_STOP])
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await api.alerts.PutAlertRule(request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.alerts.ListAlerts(
            T.ListAlertsRequest(page_size=5000, state=T.AlertState.ValueType(9), page_token="x")
        )
    assert set(_violations(raised.value)) == {"page_size", "state", "page_token"}
    after = (await api.alerts.ListAlertRules(T.ListAlertRulesRequest())).rules
    assert list(after) == list(before)


async def test_list_alerts_pages_newest_first(api: Api, receiver: Receiver) -> None:
    run_id = await api.run(10_000_000)
    rule_id = await api.rule(run_id, [T.ALERT_TRIGGER_OVERRUN], [webhook(receiver.url)])
    for i in range(5):
        rid = f"over{i}"
        await api.budget.Reserve(
            pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=10)
        )
        await api.budget.Commit(
            pb.CommitRequest(run_id=run_id, reservation_id=rid, actual_micros=20)
        )
    everything = await api.settled(rule_id, 5)
    pages: list[alerts_pb2.Alert] = []
    token = ""
    while True:
        page = await api.alerts.ListAlerts(
            T.ListAlertsRequest(rule_id=rule_id, page_size=2, page_token=token)
        )
        pages += page.alerts
        token = page.next_page_token
        if not token:
            break
    assert [a.alert_id for a in pages] == [a.alert_id for a in everything]
    stamps = [(a.create_time.ToMilliseconds(), a.alert_id) for a in pages]
    assert stamps == sorted(stamps, reverse=True)
    assert {a.summary.split("(reservation ")[1][:5] for a in pages} == {
        f"over{i}" for i in range(5)
    }
