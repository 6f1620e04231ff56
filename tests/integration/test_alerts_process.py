"""Alerts across process lives: a server killed mid-delivery, two replicas on
one Redis, Redis going away, API keys and tenants, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from runcap.v1 import alerts_pb2 as T
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.alerts_pb2_grpc import AlertServiceStub
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.app import RuncapServer
from runcap_server.auth import KeyEntry, Role, digest, new_key, write_keys
from runcap_server.cli import main
from runcap_server.settings import Settings
from tests.integration.rpc import new_id
from tests.integration.test_alerts import (
    FAST_ENV,
    THRESHOLDS,
    Api,
    Receiver,
    by_level,
    run_scope,
    verified,
    webhook,
)
from tests.redis_servers import RedisServer
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.alerts_pb2_grpc import AlertServiceAsyncStub


async def connect(target: str) -> AsyncIterator[Api]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield Api(BudgetServiceStub(channel), AlertServiceStub(channel))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    try:
        yield started
    finally:
        await started.stop()


async def test_a_killed_server_neither_loses_nor_repeats_an_alert(tmp_path: Path) -> None:
    """SIGKILL with one alert delivered and another's first attempt in flight:
    the next server sends the second again once its lease is over, and never
    the first."""
    db = tmp_path / "runcap.db"
    receiver = await Receiver(script=["ok", "hang"]).start()
    env = {**FAST_ENV, "RUNCAP_ALERTS_LEASE": "1s", "RUNCAP_ALERTS_TIMEOUT": "500ms"}
    servers = [ServerProcess(db, env=env) for _ in range(2)]
    try:
        servers[0].start()
        async for api in connect(servers[0].target):
            run_id = await api.run(1_000_000)
            triggers = [T.ALERT_TRIGGER_SUSPENDED, T.ALERT_TRIGGER_OVERRUN]
            rule_id = await api.rule(run_id, triggers, [webhook(receiver.url)])
            await api.budget.Reserve(
                pb.ReserveRequest(run_id=run_id, reservation_id="r", amount_micros=1_000)
            )
            await api.budget.SuspendRun(pb.SuspendRunRequest(run_id=run_id))
            (delivered,) = await api.settled(rule_id, 1)
            await api.budget.Commit(
                pb.CommitRequest(run_id=run_id, reservation_id="r", actual_micros=2_000)
            )
            await receiver.wait(2)
        servers[0].kill()  # the overrun alert's attempt dies with the process
        receiver.release()
        servers[1].start()
        first, in_flight, again = [verified(r) for r in await receiver.quiet(3, for_s=1.5)]
        assert first["alert_id"] == delivered.alert_id
        assert (in_flight["trigger"], in_flight["alert_id"]) == ("overrun", again["alert_id"])
        async for api in connect(servers[1].target):
            alerts = await api.settled(rule_id, 2)
            assert [(a.trigger, a.state, a.attempts) for a in alerts] == [
                (T.ALERT_TRIGGER_OVERRUN, T.ALERT_STATE_DELIVERED, 1),
                (T.ALERT_TRIGGER_SUSPENDED, T.ALERT_STATE_DELIVERED, 1),
            ]
            # The run is still followed (its cursor resumed): a new change alerts
            # (suppressed: a second suspension within the rule's min_interval).
            await api.budget.ResumeRun(pb.ResumeRunRequest(run_id=run_id))
            await api.budget.SuspendRun(pb.SuspendRunRequest(run_id=run_id))
            latest = (await api.settled(rule_id, 3))[0]
        assert (latest.trigger, latest.state) == (
            T.ALERT_TRIGGER_SUSPENDED,
            T.ALERT_STATE_SUPPRESSED,
        )
        assert len(receiver.received) == 3
    finally:
        for server in servers:
            server.stop()
        await receiver.stop()


@contextlib.asynccontextmanager
async def in_process(**env: str) -> AsyncIterator[RuncapServer]:
    """A server in this process (no interpreter start-up: these tests need several)."""
    settings = Settings.from_env(
        {**FAST_ENV, **env}, listen_addr="127.0.0.1:0", insecure_dev=True, shutdown_grace_ms=100
    )
    server = RuncapServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.redis
async def test_two_replicas_send_each_crossing_once(
    redis_standalone: RedisServer, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "runcap.alerts")
    env = {
        "RUNCAP_BACKEND": "redis",
        "RUNCAP_REDIS_URL": redis_standalone.url,
        "RUNCAP_REDIS_NAMESPACE": f"alerts-{uuid.uuid4().hex[:8]}",
    }
    async with in_process(**env) as one, in_process(**env) as two:
        async for api in connect(f"127.0.0.1:{one.port}"):
            run_id = new_id("run")
            triggers = [T.ALERT_TRIGGER_THRESHOLD, T.ALERT_TRIGGER_THROTTLE, T.ALERT_TRIGGER_STOP]
            rule_id = await api.rule(run_id, triggers, [webhook(receiver.url)])
            await api.run(1_000_000, run_id=run_id, policy=THRESHOLDS)
            await api.spend(run_id, 850_000, 110_000, 40_000)
            bodies = by_level(verified(r) for r in await receiver.quiet(3))
            assert [b["trigger"] for b in bodies] == ["threshold", "throttle", "stop"]
            alerts = await api.settled(rule_id, 3)
        # Both engines follow the run; each alert was raised (and sent) once.
        assert one.alerts is not None
        assert two.alerts is not None
        assert (one.alerts.following, two.alerts.following) == (1, 1)
    assert all(a.state == T.ALERT_STATE_DELIVERED for a in alerts)
    assert sum("raised by rule" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.redis
async def test_storage_down_pages_once_per_outage(tmp_path: Path, receiver: Receiver) -> None:
    redis = RedisServer(tmp_path, appendonly=True).start()
    try:
        env = {
            "RUNCAP_BACKEND": "redis",
            "RUNCAP_REDIS_URL": redis.url,
            "RUNCAP_ALERTS_BACKEND_DOWN_AFTER": "500ms",
        }
        async with in_process(**env) as server:
            async for api in connect(f"127.0.0.1:{server.port}"):
                rule = T.AlertRule(
                    rule_id="storage",
                    triggers=[T.ALERT_TRIGGER_BACKEND_DOWN],
                    targets=[webhook(receiver.url)],
                    owner="Dana Whitfield",
                )
                await api.alerts.PutAlertRule(T.PutAlertRuleRequest(rule=rule))
                await asyncio.sleep(0.3)  # the engine reads its rules
                redis.kill()
                (page,) = [verified(r) for r in await receiver.quiet(1, for_s=1.5)]
                redis.restart()
                # Recorded once the store answers again.
                deadline = time.monotonic() + 10
                while True:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        listed = await api.alerts.ListAlerts(T.ListAlertsRequest(rule_id="storage"))
                        if listed.alerts:
                            break
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
    finally:
        redis.stop()
    assert page["trigger"] == "backend_down"
    assert page["run"] is None
    assert page["spend"] is None
    assert page["owner"] == "Dana Whitfield"
    assert page["summary"].startswith("runcap storage (redis) unreachable for")
    (alert,) = listed.alerts
    assert alert.alert_id == page["alert_id"]
    assert (alert.trigger, alert.state) == (T.ALERT_TRIGGER_BACKEND_DOWN, T.ALERT_STATE_DELIVERED)
    assert not alert.HasField("budget")


KEYS = {
    # name: (tenant, role)
    "admin": ("acme", "admin"),
    "ops": ("acme", "operator"),
    "agent": ("acme", "agent"),
    "other-admin": ("globex", "admin"),
}


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    directory = tmp_path_factory.mktemp("alerts-auth")
    keys_file = directory / "keys.json"
    secrets = {name: new_key(name) for name in KEYS}
    entries = [
        KeyEntry(name, digest(secrets[name]), tenant, Role.parse(role))
        for name, (tenant, role) in KEYS.items()
    ]
    write_keys(keys_file, entries)
    env = {**FAST_ENV, "RUNCAP_API_KEYS_FILE": str(keys_file)}
    server = ServerProcess(directory / "runcap.db", env=env).start()
    try:
        yield server.target, secrets
    finally:
        server.stop()


async def test_roles_and_tenants(
    keyed_server: tuple[str, dict[str, str]], receiver: Receiver
) -> None:
    target, secrets = keyed_server

    def as_(name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {secrets[name]}"),)

    async def code(call: object) -> grpc.StatusCode:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    async with grpc.aio.insecure_channel(target) as channel:
        alerts: AlertServiceAsyncStub = AlertServiceStub(channel)
        budget = BudgetServiceStub(channel)
        run = await budget.CreateRun(pb.CreateRunRequest(limit_micros=10**6), metadata=as_("agent"))
        run_id = run.run.run_id
        rule = T.AlertRule(
            rule_id="acme-suspended",
            scope=run_scope(run_id),
            triggers=[T.ALERT_TRIGGER_SUSPENDED],
            targets=[webhook(receiver.url)],
        )
        put = T.PutAlertRuleRequest(rule=rule)
        rules = T.ListAlertRulesRequest()
        listing = T.ListAlertsRequest()
        delete = T.DeleteAlertRuleRequest(rule_id="acme-suspended")
        assert await code(alerts.PutAlertRule(put)) == grpc.StatusCode.UNAUTHENTICATED
        for name in ("agent", "ops"):
            assert await code(alerts.PutAlertRule(put, metadata=as_(name))) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            assert await code(alerts.DeleteAlertRule(delete, metadata=as_(name))) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
        for call in (
            alerts.ListAlertRules(rules, metadata=as_("agent")),
            alerts.ListAlerts(listing, metadata=as_("agent")),
        ):
            assert await code(call) == grpc.StatusCode.PERMISSION_DENIED
        assert (await alerts.PutAlertRule(put, metadata=as_("admin"))).changed
        await budget.SuspendRun(pb.SuspendRunRequest(run_id=run_id), metadata=as_("ops"))
        (suspended,) = await receiver.wait(1)
        assert verified(suspended)["run"]["run_id"] == run_id
        acme_rules = await alerts.ListAlertRules(rules, metadata=as_("ops"))
        assert [r.rule_id for r in acme_rules.rules] == ["acme-suspended"]
        deadline = time.monotonic() + 10
        while not (await alerts.ListAlerts(listing, metadata=as_("ops"))).alerts:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # Another tenant sees none of it, and cannot delete it.
        other = as_("other-admin")
        assert not (await alerts.ListAlertRules(rules, metadata=other)).rules
        assert not (await alerts.ListAlerts(listing, metadata=other)).alerts
        assert not (await alerts.DeleteAlertRule(delete, metadata=other)).deleted
        assert (await alerts.DeleteAlertRule(delete, metadata=as_("admin"))).deleted


def test_cli_puts_lists_and_deletes_rules(
    keyed_server: tuple[str, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target, secrets = keyed_server

    def runcap(*args: str, key: str) -> tuple[int, str, str]:
        monkeypatch.setenv("RUNCAP_API_KEY", secrets[key])
        code = main([*args, "--target", target])
        out, err = capsys.readouterr()
        return code, out, err

    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(
        "rules:\n"
        "  - rule_id: cli-stop\n"
        "    scope: {kind: team, id: data}\n"
        "    triggers: [throttle, stop]\n"
        "    targets:\n"
        "      - webhook: {url: 'https://hooks.example.com/runcap', secret: 's3cret'}\n"
        "      - pagerduty: {routing_key: 'PDKEY12345'}\n"
        "    min_interval: 300s\n"
        "    owner: Dana Whitfield\n"
    )
    put = ("alerts", "rules", "put", str(rule_file))
    assert runcap(*put, key="admin") == (0, "cli-stop\tchanged\n", "")
    assert runcap(*put, key="admin") == (0, "cli-stop\tunchanged\n", "")
    code, out, _ = runcap("alerts", "rules", "list", key="ops")
    assert out == "cli-stop\tteam:data\tthrottle,stop\twebhook,pagerduty\towner=Dana Whitfield\n"
    assert runcap("alerts", "list", "--state", "dead", key="ops") == (0, "", "")
    code, _, err = runcap(*put, key="ops")
    assert code == 1
    assert "needs the admin role" in err
    rule_file.write_text("rule_id: broken\ntriggers: [sometimes]\n")
    code, _, err = runcap(*put, key="admin")
    assert code == 1
    assert "not an alert rule" in err
    rule_file.write_text("rule_id: no-targets\ntriggers: [stop]\n")
    code, _, err = runcap(*put, key="admin")
    assert code == 1
    assert "rule.targets: must have 1 to 8 targets" in err
    delete = ("alerts", "rules", "delete", "cli-stop")
    assert runcap(*delete, key="admin") == (0, "deleted\n", "")
    assert runcap(*delete, key="admin") == (0, "no rule 'cli-stop': nothing deleted\n", "")
