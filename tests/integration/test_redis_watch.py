"""Watch on Redis under faults: a killed doorbell, a restarted replica, a trimmed log."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis.asyncio as aioredis

from runcap import AsyncRuncapClient, RuncapError
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.backends.redis import RedisLedger
from runcap_server.ledger.types import Change, RunSpec
from runcap_server.watch import Snapshot, WatchHub
from tests.integration.rpc import error_info
from tests.integration.test_grpc_watch import check_blocked_events, check_calibrated_exposure
from tests.redis_servers import RedisCluster, RedisServer, command
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

pytestmark = pytest.mark.redis
Stream = grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse]


@pytest.fixture
def replicas(redis_standalone: RedisServer) -> Iterator[list[ServerProcess]]:
    """Two server replicas on one Redis, with a namespace of their own."""
    env = {
        "RUNCAP_BACKEND": "redis",
        "RUNCAP_REDIS_URL": redis_standalone.url,
        "RUNCAP_REDIS_NAMESPACE": f"watch-{uuid.uuid4().hex[:8]}",
    }
    servers = [ServerProcess(None, env=env) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


async def write(stub: BudgetServiceAsyncStub, run_id: str, pairs: int, prefix: str) -> None:
    for i in range(pairs):
        rid = f"{prefix}{i}"
        await stub.Reserve(pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=5))
        await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id=rid, actual_micros=3))


async def events_until(stream: Stream, revision: int, timeout_s: float = 10) -> list[int]:
    """Revisions of the events read, up to `revision` (each must arrive in time)."""
    seen: list[int] = []
    while not seen or seen[-1] < revision:
        message = await asyncio.wait_for(stream.read(), timeout_s)
        assert isinstance(message, pb.WatchResponse), f"stream ended after {seen}"
        if message.HasField("event"):
            seen.append(message.revision)
        elif message.progress.final:
            break
    return seen


async def test_killing_the_doorbell_loses_no_event(
    replicas: list[ServerProcess], redis_standalone: RedisServer
) -> None:
    watched, writer = replicas
    async with (
        grpc.aio.insecure_channel(watched.target) as a,
        grpc.aio.insecure_channel(writer.target) as b,
        aioredis.Redis.from_url(redis_standalone.url) as probe,
    ):
        watch_stub: BudgetServiceAsyncStub = BudgetServiceStub(a)
        write_stub: BudgetServiceAsyncStub = BudgetServiceStub(b)
        await write_stub.CreateRun(pb.CreateRunRequest(run_id="bell", limit_micros=10**9))
        stream = watch_stub.Watch(pb.WatchRequest(run_id="bell", after_revision=0))
        await write(write_stub, "bell", 5, "a")
        assert await events_until(stream, 11) == list(range(1, 12))
        # The doorbell connection dies; the feed's periodic check and resubscription carry on.
        killed = await probe.client_kill_filter(_type="pubsub")
        assert killed >= 1
        await write(write_stub, "bell", 5, "b")
        assert await events_until(stream, 21) == list(range(12, 22))
        await write(write_stub, "bell", 5, "c")
        assert await events_until(stream, 31) == list(range(22, 32))
        stream.cancel()


async def test_a_calibrated_runs_events_carry_its_exposure_across_replicas(
    replicas: list[ServerProcess],
) -> None:
    watched, writer = replicas
    async with (
        grpc.aio.insecure_channel(watched.target) as a,
        grpc.aio.insecure_channel(writer.target) as b,
    ):
        await check_calibrated_exposure(BudgetServiceStub(b), BudgetServiceStub(a))


async def test_a_run_at_its_wall_is_one_blocked_event_across_replicas(
    replicas: list[ServerProcess],
) -> None:
    watched, writer = replicas
    async with (
        grpc.aio.insecure_channel(watched.target) as a,
        grpc.aio.insecure_channel(writer.target) as b,
    ):
        await check_blocked_events(BudgetServiceStub(b), BudgetServiceStub(a))


async def test_a_restarted_replica_hands_watchers_over_without_a_gap(
    replicas: list[ServerProcess],
) -> None:
    first, second = replicas
    async with (
        grpc.aio.insecure_channel(first.target) as a,
        grpc.aio.insecure_channel(second.target) as b,
    ):
        stub_a: BudgetServiceAsyncStub = BudgetServiceStub(a)
        stub_b: BudgetServiceAsyncStub = BudgetServiceStub(b)
        await stub_b.CreateRun(pb.CreateRunRequest(run_id="handover", limit_micros=10**9))
        stream = stub_a.Watch(pb.WatchRequest(run_id="handover"))
        first_message = await stream.read()
        assert isinstance(first_message, pb.WatchResponse)
        assert first_message.HasField("snapshot")
        writer = asyncio.create_task(write(stub_b, "handover", 30, "w"))
        seen = await events_until(stream, 10)
        first.stop()  # SIGTERM: the stream ends with a final progress message
        seen += await events_until(stream, 10**9)
        last = seen[-1]
        await writer
        if last < 61:  # the first replica may have delivered everything before it stopped
            resumed = stub_b.Watch(pb.WatchRequest(run_id="handover", after_revision=last))
            seen += await events_until(resumed, 61)
            resumed.cancel()
        assert seen == list(range(2, 62))


async def test_a_trimmed_log_is_out_of_range_never_a_silent_gap(
    replicas: list[ServerProcess], redis_standalone: RedisServer
) -> None:
    server = replicas[0]
    async with (
        grpc.aio.insecure_channel(server.target) as channel,
        aioredis.Redis.from_url(redis_standalone.url) as probe,
    ):
        stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
        await stub.CreateRun(pb.CreateRunRequest(run_id="trim", limit_micros=10**9))
        await write(stub, "trim", 10, "t")
        logs = [key async for key in probe.scan_iter(match="*{default/trim}:log")]
        assert len(logs) == 1
        await probe.xtrim(logs[0], maxlen=5, approximate=False)
        with pytest.raises(grpc.aio.AioRpcError) as old:
            await stub.Watch(pb.WatchRequest(run_id="trim", after_revision=3)).read()
        assert old.value.code() == grpc.StatusCode.OUT_OF_RANGE
        info, _ = error_info(old.value)
        assert (info.metadata["floor"], info.metadata["head"]) == ("17", "21")
        resumed = stub.Watch(pb.WatchRequest(run_id="trim", after_revision=16))
        assert await events_until(resumed, 21) == [17, 18, 19, 20, 21]
        resumed.cancel()


async def test_a_failover_that_lost_writes_is_out_of_range_on_resume(
    replicas: list[ServerProcess], redis_standalone: RedisServer
) -> None:
    """Rolls the run's keys back (as a failover to a lagging replica would) under a watcher."""
    server = replicas[0]
    async with (
        grpc.aio.insecure_channel(server.target) as channel,
        aioredis.Redis.from_url(redis_standalone.url) as probe,
    ):
        stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
        await stub.CreateRun(pb.CreateRunRequest(run_id="lost", limit_micros=10**9))
        await write(stub, "lost", 2, "x")  # revisions 2..5
        keys = [key async for key in probe.scan_iter(match="*{default/lost}:*")]
        saved = {key: await probe.dump(key) for key in keys}  # the replica's copy
        await write(stub, "lost", 3, "y")  # revisions 6..11 reach the client...
        stream = stub.Watch(pb.WatchRequest(run_id="lost", after_revision=0))
        seen: list[pb.WatchResponse] = []
        while not seen or seen[-1].revision < 11:
            message = await stream.read()
            assert isinstance(message, pb.WatchResponse)
            if message.HasField("event"):
                seen.append(message)
        stream.cancel()
        # ...then the primary dies and the replica, without them, takes over.
        for key, value in saved.items():
            assert value is not None
            await probe.restore(key, 0, value, replace=True)
        await write(stub, "lost", 4, "z")  # a different revisions 6..13
        last = seen[-1]
        with pytest.raises(grpc.aio.AioRpcError) as diverged:
            await stub.Watch(
                pb.WatchRequest(
                    run_id="lost",
                    after_revision=last.revision,
                    after_digest=last.event.state.digest,
                )
            ).read()
        assert diverged.value.code() == grpc.StatusCode.OUT_OF_RANGE
        info, _ = error_info(diverged.value)
        assert info.metadata["diverged"] == "true"
        # A resume point from before the loss still matches, and continues.
        agreed = seen[4]
        assert agreed.revision == 5
        resumed = stub.Watch(
            pb.WatchRequest(
                run_id="lost",
                after_revision=agreed.revision,
                after_digest=agreed.event.state.digest,
            )
        )
        assert await events_until(resumed, 13) == list(range(6, 14))
        resumed.cancel()


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
async def test_a_run_no_longer_watched_is_unsubscribed(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """Doorbell subscriptions end with the last watcher of a run, and the process stays live."""
    ns = f"w-{uuid.uuid4().hex[:8]}"
    if topology == "standalone":
        url = request.getfixturevalue("redis_standalone").url
        ledger = RedisLedger(url=url, default_ttl_ms=60_000, namespace=ns)
        probe: Any = aioredis.Redis.from_url(url)
    else:
        nodes = request.getfixturevalue("redis_cluster").startup_nodes
        ledger = RedisLedger(cluster_nodes=nodes, default_ttl_ms=60_000, namespace=ns)
        probe = aioredis.RedisCluster.from_url(f"redis://{nodes[0]}")
    await ledger.start()
    hub = WatchHub(ledger, queue_size=10, heartbeat_s=30)
    channel = ledger._keys("t", "run")[4]

    async def subscribers() -> int:
        if topology == "standalone":
            reply = await probe.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        else:
            await probe.initialize()
            node = probe.get_node_from_key(channel)
            reply = await probe.execute_command("PUBSUB", "SHARDNUMSUB", channel, target_nodes=node)
        return int(reply[1])

    async def becomes(count: int) -> None:
        for _ in range(100):
            if await subscribers() == count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{channel} never had {count} subscribers")

    try:
        await ledger.create_run("t", RunSpec("run", 1_000, {}, None))
        stream = hub.stream("t", "run", None)
        assert isinstance(await anext(stream), Snapshot)
        waiting = asyncio.ensure_future(anext(stream))
        await becomes(1)
        await ledger.reserve("t", "run", "r", 1, None)
        assert isinstance(await asyncio.wait_for(waiting, 5), Change)
        await stream.aclose()
        await becomes(0)
        # With nothing subscribed the doorbell task must not spin: the loop stays live.
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.3)
        assert asyncio.get_running_loop().time() - started < 1.0
        assert (await ledger.get_run("t", "run")).state.revision == 2
    finally:
        await hub.stop()
        await ledger.close()
        await probe.aclose()


@pytest.mark.slow
async def test_a_watcher_through_a_primary_failover_never_sees_a_silent_gap(
    redis_cluster_with_replicas: RedisCluster,
) -> None:
    """Kill the run's primary under load: the watcher continues or resyncs, never skips."""
    cluster = redis_cluster_with_replicas
    namespace = f"fo-{uuid.uuid4().hex[:8]}"
    env = {
        "RUNCAP_BACKEND": "redis",
        "RUNCAP_REDIS_CLUSTER_NODES": ",".join(cluster.startup_nodes),
        "RUNCAP_REDIS_NAMESPACE": namespace,
        "RUNCAP_WATCH_HEARTBEAT": "200ms",
    }
    servers = [ServerProcess(None, env=env) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        async with (
            AsyncRuncapClient(servers[0].target) as watcher_client,
            AsyncRuncapClient(servers[1].target) as writer_client,
            aioredis.RedisCluster.from_url(cluster.url) as probe,
        ):
            await writer_client.create_run("fo", limit_micros=10**12)
            slot = probe.keyslot(f"{namespace}:{{default/fo}}:a")
            # The run itself must survive the failover (replication is asynchronous).
            assert command(cluster.slot_owner(slot), "WAIT", 1, 10_000) == 1
            delivered: list[pb.WatchResponse] = []
            stop = asyncio.Event()

            async def watch() -> None:
                async with watcher_client.watch("fo", resnapshot_on_out_of_range=True) as stream:
                    async for message in stream:
                        if not message.HasField("progress"):
                            delivered.append(message)
                        if stop.is_set() and message.revision >= final_revision:
                            return

            async def write() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    with contextlib.suppress(RuncapError):
                        async with writer_client.reserve("fo", 10, reservation_id=f"r{i}") as h:
                            h.set_actual(7)
                    await asyncio.sleep(0.005)

            final_revision = 10**9
            watching = asyncio.create_task(watch())
            writing = asyncio.create_task(write())
            await asyncio.sleep(0.5)
            primary = cluster.slot_owner(slot)
            cluster.kill_primary(primary)
            await asyncio.to_thread(cluster.wait_for_failover, primary)
            await asyncio.sleep(1.0)
            stop.set()
            await writing
            final = (await writer_client.get_run("fo")).state
            final_revision = final.revision
            await asyncio.wait_for(watching, 30)

        # Every event follows the one before it, unless a fresh snapshot resynced.
        assert delivered[0].HasField("snapshot")
        for before, after in itertools.pairwise(delivered):
            if after.HasField("event"):
                assert after.revision == before.revision + 1, (before, after)
        last = delivered[-1]
        last_state = last.snapshot if last.HasField("snapshot") else last.event.state
        assert (last_state.revision, last_state.digest) == (final.revision, final.digest)
        assert last_state.committed_micros == final.committed_micros
    finally:
        for server in servers:
            server.stop()
