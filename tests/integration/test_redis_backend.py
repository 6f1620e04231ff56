"""The Redis backend against real servers: round trips, lost scripts, failover, replicas."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server import errors
from runcap_server.backends.redis import RedisLedger
from runcap_server.ledger.types import Decision, RunSpec, RunStatus
from tests.redis_servers import RedisCluster, RedisServer, command
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

pytestmark = pytest.mark.redis
T = "tenant"


def namespace() -> str:
    return f"it-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def standalone_ledger(redis_standalone: RedisServer) -> AsyncIterator[RedisLedger]:
    ledger = RedisLedger(url=redis_standalone.url, default_ttl_ms=60_000, namespace=namespace())
    await ledger.start()
    yield ledger
    await ledger.close()


async def command_counts(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def monitor(url: str, ready: threading.Event, seen: list[dict[str, Any]]) -> None:
    """Record every command Redis receives until the probe echoes "done"."""
    with redis.Redis.from_url(url) as client, client.monitor() as stream:
        ready.set()
        for entry in stream.listen():
            if entry["command"] == "ECHO done":
                return
            seen.append(entry)


async def test_a_reserve_is_one_round_trip(
    redis_standalone: RedisServer, standalone_ledger: RedisLedger
) -> None:
    await standalone_ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    await standalone_ledger.reserve(T, "run", "warm-up", 1, None)  # loads the script
    ready, seen = threading.Event(), list[dict[str, Any]]()
    watcher = threading.Thread(target=monitor, args=(redis_standalone.url, ready, seen))
    async with aioredis.Redis.from_url(redis_standalone.url) as probe:
        await probe.ping()  # connected before the monitor starts
        watcher.start()
        assert await asyncio.to_thread(ready.wait, 5)
        await asyncio.sleep(0.1)
        result = await standalone_ledger.reserve(T, "run", "r", 10, None)
        await probe.echo("done")
    await asyncio.to_thread(watcher.join, 5)
    assert result.decision is Decision.ALLOW
    from_clients = [e["command"].split()[0] for e in seen if e.get("client_type") != "lua"]
    assert from_clients == ["EVALSHA"], seen
    # The script itself did the rest, inside Redis.
    assert any(e["command"].startswith("XADD") for e in seen)


async def test_the_script_survives_script_flush(
    redis_standalone: RedisServer, standalone_ledger: RedisLedger
) -> None:
    await standalone_ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    async with aioredis.Redis.from_url(redis_standalone.url) as probe:
        await probe.script_flush()
        await probe.config_resetstat()
        assert (await standalone_ledger.reserve(T, "run", "a", 1, None)).decision is Decision.ALLOW
        counts = await command_counts(probe)
        # EVALSHA answered NOSCRIPT, then EVAL ran the script and cached it.
        assert (counts.get("evalsha"), counts.get("eval")) == (1, 1)
        assert (await standalone_ledger.reserve(T, "run", "b", 1, None)).state.revision == 3


async def test_a_closed_run_gets_a_retention_ttl(
    redis_standalone: RedisServer, standalone_ledger: RedisLedger
) -> None:
    standalone_ledger.closed_retention_ms = 60_000
    await standalone_ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    await standalone_ledger.reserve(T, "run", "a", 1, None)
    keys = standalone_ledger._keys(T, "run")[:4]
    async with aioredis.Redis.from_url(redis_standalone.url) as probe:
        assert [await probe.pttl(k) for k in keys] == [-1, -1, -1, -1]
        await standalone_ledger.close_run(T, "run")
        ttls = [await probe.pttl(k) for k in keys]
    assert all(55_000 < ttl <= 60_000 for ttl in ttls), ttls


async def test_unreachable_redis_fails_closed(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    ledger = RedisLedger(url=server.url, default_ttl_ms=60_000, namespace=namespace())
    await ledger.start()
    try:
        await ledger.create_run(T, RunSpec("run", 1_000, {}, None))
        server.kill()
        with pytest.raises(errors.BackendUnavailable) as down:
            await ledger.reserve(T, "run", "a", 1, None)
        assert down.value.retry_after_ms > 0
        with pytest.raises(errors.BackendUnavailable):
            await ledger.ping()
    finally:
        await ledger.close()
        server.stop()


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing(
    redis_standalone: RedisServer,
) -> None:
    ledger = RedisLedger(
        url=redis_standalone.url, default_ttl_ms=60_000, namespace=namespace(), max_connections=4
    )
    await ledger.start()
    try:
        await ledger.create_run(T, RunSpec("run", 1_000, {}, None))
        results = await asyncio.gather(
            *(ledger.reserve(T, "run", f"r{i}", 1, None) for i in range(300))
        )
        assert sum(r.decision is Decision.ALLOW for r in results) == 300
    finally:
        await ledger.close()


async def test_cluster_runs_spread_and_stay_atomic(redis_cluster: RedisCluster) -> None:
    ledger = RedisLedger(
        cluster_nodes=redis_cluster.startup_nodes, default_ttl_ms=60_000, namespace=namespace()
    )
    await ledger.start()
    try:
        runs = [f"run-{i}" for i in range(12)]
        for run_id in runs:
            await ledger.create_run(T, RunSpec(run_id, 10, {}, None))
        results = await asyncio.gather(
            *(ledger.reserve(T, r, f"h{i}", 1, None) for r in runs for i in range(15))
        )
        for run_id in runs:
            allowed = [
                x for x in results if x.state.run_id == run_id and x.decision is Decision.ALLOW
            ]
            assert len(allowed) == 10
        async with aioredis.RedisCluster.from_url(redis_cluster.url) as probe:
            owners = {probe.keyslot(ledger._keys(T, r)[0]) for r in runs}
        assert len(owners) == len(runs)  # every run in a slot of its own
    finally:
        await ledger.close()


async def test_four_replicas_on_the_cluster_allow_exactly_what_fits(
    redis_cluster: RedisCluster,
) -> None:
    """1,000 concurrent Reserves through 4 server processes on one run with room for 100."""
    env = {
        "RUNCAP_BACKEND": "redis",
        "RUNCAP_REDIS_CLUSTER_NODES": ",".join(redis_cluster.startup_nodes),
        "RUNCAP_REDIS_NAMESPACE": namespace(),
    }
    servers = [ServerProcess(None, env=env) for _ in range(4)]
    try:
        for server in servers:
            server.start()
        channels = [grpc.aio.insecure_channel(s.target) for s in servers]
        stubs: list[BudgetServiceAsyncStub] = [BudgetServiceStub(c) for c in channels]
        await stubs[0].CreateRun(pb.CreateRunRequest(run_id="shared", limit_micros=100_000_000))
        replies = await asyncio.gather(
            *(
                stubs[i % 4].Reserve(
                    pb.ReserveRequest(
                        run_id="shared", reservation_id=f"r{i}", amount_micros=1_000_000
                    )
                )
                for i in range(1_000)
            )
        )
        allowed = [i for i, r in enumerate(replies) if r.decision == budget_pb2.DECISION_ALLOW]
        assert len(allowed) == 100
        # Settle through other replicas than the one that reserved.
        await asyncio.gather(
            *(
                stubs[(i + 1) % 4].Commit(
                    pb.CommitRequest(run_id="shared", reservation_id=f"r{i}", actual_micros=500_000)
                )
                for i in allowed
            )
        )
        shown = await stubs[3].GetRun(pb.GetRunRequest(run_id="shared"))
        state = shown.state
        # Created, 100 reserved, one BLOCKED for the 900 blocks, 100 committed.
        assert (state.committed_micros, state.reserved_micros, state.revision) == (
            50_000_000,
            0,
            202,
        )
        assert shown.run.blocked_calls == 900
        for channel in channels:
            await channel.close(None)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
async def test_primary_failover_keeps_the_invariants(
    redis_cluster_with_replicas: RedisCluster,
) -> None:
    cluster = redis_cluster_with_replicas
    ledger = RedisLedger(
        cluster_nodes=cluster.startup_nodes, default_ttl_ms=60_000, namespace=namespace()
    )
    await ledger.start()
    try:
        await ledger.create_run(T, RunSpec("run", 1_000_000, {}, None))
        async with aioredis.RedisCluster.from_url(cluster.url) as probe:
            slot = probe.keyslot(ledger._keys(T, "run")[0])
        # The run itself must survive the failover: wait until its replica has it
        # (replication is asynchronous; a loaded machine can lag a whole second).
        assert command(cluster.slot_owner(slot), "WAIT", 1, 10_000) == 1
        stop = asyncio.Event()
        acknowledged: list[str] = []

        async def writer(worker: int) -> None:
            i = 0
            while not stop.is_set():
                rid = f"w{worker}-{i}"
                try:
                    result = await ledger.reserve(T, "run", rid, 10, None)
                    if result.decision is Decision.ALLOW:
                        await ledger.commit(T, "run", rid, 7)
                        acknowledged.append(rid)
                except errors.BackendUnavailable:
                    await asyncio.sleep(0.05)
                i += 1

        writers = [asyncio.create_task(writer(w)) for w in range(4)]
        await asyncio.sleep(0.5)
        primary = cluster.slot_owner(slot)
        cluster.kill_primary(primary)
        await asyncio.to_thread(cluster.wait_for_failover, primary)
        before = len(acknowledged)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)
        assert len(acknowledged) > before, "no reserve succeeded after the failover"

        view = await ledger.get_run(T, "run")
        state = view.state
        assert state.status is RunStatus.OPEN
        assert state.committed_micros + state.reserved_micros <= (
            state.limit_micros + state.overrun_micros
        )
        page = await ledger.read_changes(T, "run", 0, 1_000_000)
        assert [c.revision for c in page.changes] == list(range(page.floor, state.revision + 1))
        assert page.changes[-1].state == state
        # Replaying the log gives the state: nothing was half-applied.
        assert state.committed_micros == sum(c.actual_micros for c in page.changes)
    finally:
        await ledger.close()


async def test_health_follows_redis_through_an_outage(tmp_path: Path) -> None:
    """A replica reports NOT_SERVING while its Redis is down, SERVING once it is back."""
    redis_server = RedisServer(tmp_path).start()
    server = ServerProcess(
        None,
        env={
            "RUNCAP_BACKEND": "redis",
            "RUNCAP_REDIS_URL": redis_server.url,
            "RUNCAP_REDIS_NAMESPACE": namespace(),
        },
    )
    try:
        server.start()
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)

            async def status() -> int:
                request = health_pb2.HealthCheckRequest(service="runcap.v1.BudgetService")
                reply = await health.Check(request)
                code: int = reply.status
                return code

            async def becomes(want: int) -> None:
                for _ in range(100):
                    if await status() == want:
                        return
                    await asyncio.sleep(0.1)
                raise AssertionError(f"health never became {want}")

            assert await status() == health_pb2.HealthCheckResponse.SERVING
            redis_server.kill()
            await becomes(health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.CreateRun(pb.CreateRunRequest(run_id="outage", limit_micros=1))
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            redis_server.restart()
            await becomes(health_pb2.HealthCheckResponse.SERVING)
            created = await stub.CreateRun(pb.CreateRunRequest(run_id="outage", limit_micros=1))
            assert created.state.revision == 1
    finally:
        server.stop()
        redis_server.stop()


async def test_advisory_runs_fail_open_loudly_and_hard_gates_fail_closed(tmp_path: Path) -> None:
    """RUNCAP_FAIL_OPEN=advisory: with Redis down, an advisory run's Reserve is a
    warning that holds nothing (and is logged); every other run fails closed."""
    redis_server = RedisServer(tmp_path, appendonly=True).start()
    server = ServerProcess(
        None,
        env={
            "RUNCAP_BACKEND": "redis",
            "RUNCAP_REDIS_URL": redis_server.url,
            "RUNCAP_REDIS_NAMESPACE": namespace(),
            "RUNCAP_FAIL_OPEN": "advisory",
        },
    )
    advisory = budget_pb2.RunPolicy(enforcement_mode=budget_pb2.ENFORCEMENT_MODE_ADVISORY)
    try:
        server.start()
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
            await stub.CreateRun(
                pb.CreateRunRequest(run_id="soft", limit_micros=10, policy=advisory)
            )
            await stub.CreateRun(pb.CreateRunRequest(run_id="hard", limit_micros=10))
            redis_server.kill()

            opened = await stub.Reserve(pb.ReserveRequest(run_id="soft", amount_micros=5))
            assert (opened.decision, opened.reason, opened.amount_micros) == (
                budget_pb2.DECISION_WARN,
                budget_pb2.DECISION_REASON_BACKEND_UNAVAILABLE,
                0,
            )
            assert opened.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_ADVISORY
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                await stub.Reserve(pb.ReserveRequest(run_id="hard", amount_micros=5))
            assert closed.value.code() == grpc.StatusCode.UNAVAILABLE

            redis_server.restart()
            for _ in range(100):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    state = (await stub.GetRun(pb.GetRunRequest(run_id="soft"))).state
                    break
                await asyncio.sleep(0.1)
            assert (state.reserved_micros, state.revision) == (0, 1)  # nothing was recorded
    finally:
        server.stop()
        redis_server.stop()
    assert any("failed OPEN" in line for line in server.log)


@contextlib.asynccontextmanager
async def two_replicas(redis_env: dict[str, str]) -> AsyncIterator[list[BudgetServiceAsyncStub]]:
    """Two runcap server processes on the same Redis (a namespace of their own)."""
    env = {"RUNCAP_BACKEND": "redis", "RUNCAP_REDIS_NAMESPACE": namespace(), **redis_env}
    servers = [ServerProcess(None, env=env) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        async with (
            grpc.aio.insecure_channel(servers[0].target) as first,
            grpc.aio.insecure_channel(servers[1].target) as second,
        ):
            yield [BudgetServiceStub(first), BudgetServiceStub(second)]
    finally:
        for server in servers:
            server.stop()


async def test_a_tenant_price_set_on_one_replica_applies_on_every_replica(
    redis_standalone: RedisServer,
) -> None:
    async with two_replicas({"RUNCAP_REDIS_URL": redis_standalone.url}) as (admin, other):
        await other.CreateRun(pb.CreateRunRequest(run_id="priced", limit_micros=10**9))
        llm = pb.LlmCall(provider="inhouse", model="m1", input_tokens=10, max_output_tokens=10)
        reserve = pb.ReserveRequest(run_id="priced", llm_call=llm)
        assert (await other.Reserve(reserve)).decision == budget_pb2.DECISION_BLOCK
        price = pb.ModelPrice(provider="inhouse", model="m1", input_rate=10**6, output_rate=10**6)
        await admin.SetModelPrice(pb.SetModelPriceRequest(price=price))
        for _ in range(40):  # each replica refreshes every second
            reply = await other.Reserve(reserve)
            if reply.decision == budget_pb2.DECISION_ALLOW:
                break
            await asyncio.sleep(0.1)
        assert (reply.decision, reply.amount_micros) == (budget_pb2.DECISION_ALLOW, 20)
        # Committed through the other replica, which must read the stored rates.
        usage = pb.TokenUsage(input_tokens=3, output_tokens=4)
        committed = await admin.Commit(
            pb.CommitRequest(run_id="priced", reservation_id=reply.reservation_id, usage=usage)
        )
        assert committed.actual_micros == 7


async def test_suspend_on_one_replica_blocks_the_next_reserve_on_another(
    redis_cluster: RedisCluster,
) -> None:
    async with two_replicas(
        {"RUNCAP_REDIS_CLUSTER_NODES": ",".join(redis_cluster.startup_nodes)}
    ) as (operator, agent):
        await agent.CreateRun(pb.CreateRunRequest(run_id="loop", limit_micros=10**9))
        reserve = pb.ReserveRequest(run_id="loop", amount_micros=1)
        assert (await agent.Reserve(reserve)).decision == budget_pb2.DECISION_ALLOW
        await operator.SuspendRun(pb.SuspendRunRequest(run_id="loop"))
        stopped = await agent.Reserve(reserve)
        assert (stopped.decision, stopped.reason) == (
            budget_pb2.DECISION_BLOCK,
            budget_pb2.DECISION_REASON_SUSPENDED,
        )
        await operator.ResumeRun(pb.ResumeRunRequest(run_id="loop"))
        assert (await agent.Reserve(reserve)).decision == budget_pb2.DECISION_ALLOW
