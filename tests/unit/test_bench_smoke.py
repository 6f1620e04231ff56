"""The benchmarks' core functions in tiny configurations, so the scripts do not rot.

Each runs in-process against real servers (runcap on the memory backend, or two
replicas on the session's Redis cluster) and checks the shape of what it reports
and the invariants it exists to show (a hard gate never overshoots, an open loop
counts latency from the due time), never a speed.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest

from runcap.v1 import budget_service_pb2, budget_service_pb2_grpc
from runcap_server.app import RuncapServer
from runcap_server.ledger.types import MAX_MICROS
from runcap_server.settings import Settings
from tests.redis_servers import RedisCluster

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench(name: str) -> ModuleType:
    """A bench/ script as a module (they import their helpers as `common`)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


async def started(settings: Settings) -> tuple[RuncapServer, str]:
    server = RuncapServer(settings)
    port = await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def memory_server() -> AsyncIterator[str]:
    server, target = await started(Settings(backend="memory", listen_addr="127.0.0.1:0"))
    try:
        yield target
    finally:
        await server.stop()


async def test_open_loop_reports_a_window_at_the_offered_rate(memory_server: str) -> None:
    open_loop, common = bench("open_loop"), bench("common")
    async with grpc.aio.insecure_channel(memory_server) as channel:
        stub = budget_service_pb2_grpc.BudgetServiceStub(channel)
        runs = common.run_ids(2)
        await common.create_runs(stub, runs)
        sample = await common.open_loop(
            common.grpc_pair([stub]),
            runs=runs,
            rate=100,
            warmup_s=0.1,
            seconds=0.5,
            server_pids=[],
            redis_pids=[],
        )
    assert isinstance(sample, common.Sample)
    assert (sample.offered, sample.window_s, sample.errors) == (100, 0.5, 0)
    assert 0 < sample.pairs <= 60
    assert 0 < sample.p50_ms <= sample.p99_ms <= sample.max_ms
    assert sample.late_p99_ms >= 0
    assert sample.in_flight_max >= 1
    cell = open_loop.Cell("redis", 50, 100.0, [sample], [sample])
    rows = open_loop.table([cell])
    assert len(rows) == 3
    assert rows[2].startswith("| redis | 50% | 100 |")
    assert "| 1.00 |" in rows[2]  # p99 x baseline


async def test_open_loop_counts_latency_from_the_due_time() -> None:
    """A server that takes 10 ms per pair, one at a time, offered 200 pairs/s: the
    backlog grows, and latency from the due time shows it (a closed loop: ~10 ms)."""
    common = bench("common")
    lock = asyncio.Lock()

    async def pair(worker: int, run_id: str, reservation_id: str) -> None:
        async with lock:
            await asyncio.sleep(0.01)

    sample = await common.open_loop(
        pair, runs=["r"], rate=200, warmup_s=0.0, seconds=0.5, server_pids=[], redis_pids=[]
    )
    assert sample.p99_ms > 100
    assert sample.rate < 150  # it can answer at most 100 per second


async def test_scaleout_drives_several_servers_and_extrapolates() -> None:
    scaleout, common = bench("scaleout"), bench("common")
    servers = [await started(Settings(backend="memory", listen_addr="127.0.0.1:0")) for _ in "ab"]
    runs = common.run_ids(2)
    generator = scaleout.LoadGenerator()
    try:
        # The generator creates the runs through the first server (on a cluster, all
        # servers share them); these memory servers do not share, so the second too.
        async with grpc.aio.insecure_channel(servers[1][1]) as channel:
            await common.create_runs(budget_service_pb2_grpc.BudgetServiceStub(channel), runs)
        reply = await generator.handle(
            {
                "targets": [target for _, target in servers],
                "channels": 1,
                "runs": runs,
                "concurrency": 4,
                "warmup": 0.1,
                "seconds": 0.3,
                "server_pids": [],
                "redis_pids": [],
            }
        )
        # Both servers took pairs (their own ledgers count them).
        for _, target in servers:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = budget_service_pb2_grpc.BudgetServiceStub(channel)
                got = [await stub.GetRun(budget_service_pb2.GetRunRequest(run_id=r)) for r in runs]
                assert sum(g.state.committed_micros for g in got) > 0
    finally:
        await generator.close()
        for server, _ in servers:
            await server.stop()
    sample = common.Sample(**reply)
    assert sample.pairs > 0
    assert sample.errors == 0
    configs = [
        scaleout.Config(name, n, [], [], samples=[sample], script_us=[100.0])
        for n in (1, 2)
        for name in ("baseline", "runcap")
    ]
    rows = scaleout.table(configs)
    assert len(rows) == 6
    assert rows[5].startswith("| runcap | 2 |")
    assert "| 1.00 | 1.00 |" in rows[5]  # x N=1 and x baseline of identical samples
    assert scaleout.extrapolate(100.0, 1_000.0) == {
        "per_node": 10_000.0,
        "cluster": 100_000.0,
        "replica_cores": 50.0,
    }


async def test_watchers_see_every_event_of_runcap_and_the_bare_baseline(
    memory_server: str,
) -> None:
    watch_fanout, common = bench("watch_fanout"), bench("common")
    bare = grpc.aio.server()
    budget_service_pb2_grpc.add_BudgetServiceServicer_to_server(watch_fanout.FanoutServicer(), bare)
    bare_target = f"127.0.0.1:{bare.add_insecure_port('127.0.0.1:0')}"
    await bare.start()
    run_id = common.run_ids(1)[0]
    watchers = watch_fanout.Watchers()
    try:
        async with grpc.aio.insecure_channel(memory_server) as channel:
            await budget_service_pb2_grpc.BudgetServiceStub(channel).CreateRun(
                budget_service_pb2.CreateRunRequest(run_id=run_id, limit_micros=MAX_MICROS)
            )
        for name, target in (("runcap", memory_server), ("baseline", bare_target)):
            opened = await watchers.handle(
                {"op": "open", "name": name, "target": target, "run_id": run_id,
                 "streams": 20, "channels": 2}
            )  # fmt: skip
            assert opened["opened"] == 20
            t = watch_fanout.Target(name, target, 0, run_id)
            for _ in range(2):
                # trigger() is the orchestrator's blocking call: off this loop, which
                # serves the in-process server.
                with grpc.insecure_channel(target) as channel:
                    stub = budget_service_pb2_grpc.BudgetServiceStub(channel)
                    sent, revision = await asyncio.to_thread(watch_fanout.trigger, stub, t)
                reply = await watchers.handle(
                    {"op": "await", "name": name, "revision": revision, "within_s": 10}
                )
                assert reply["missing"] == 0
                assert len(reply["times"]) == 20
                assert min(reply["times"]) >= sent
                t.reach_all_ms.append((max(reply["times"]) - sent) * 1e3)
                t.deliveries_ms += [(at - sent) * 1e3 for at in reply["times"]]
                t.events += 1
            await watchers.handle({"op": "close", "name": name})
            row = t.row(20, None)
            assert len(row) == len(watch_fanout.COLUMNS)
            assert row[:3] == [name, "20", "2"]
    finally:
        for name in list(watchers.channels):
            await watchers.close(name)
        await bare.stop(None)


@pytest.fixture
async def replicas(redis_cluster: RedisCluster) -> AsyncIterator[list[str]]:
    """Two runcap replicas in this process on the session's Redis cluster."""
    settings = Settings(
        backend="redis",
        redis_cluster_nodes=",".join(redis_cluster.startup_nodes),
        listen_addr="127.0.0.1:0",
    )
    servers = [await started(settings) for _ in "ab"]
    try:
        yield [target for _, target in servers]
    finally:
        for server, _ in servers:
            await server.stop()


async def test_overshoot_is_zero_in_hard_gate_and_the_allowance_at_most(
    replicas: list[str], redis_cluster: RedisCluster
) -> None:
    overshoot = bench("overshoot")
    from redis.asyncio.cluster import RedisCluster as Client

    channels = [grpc.aio.insecure_channel(target) for target in replicas]
    stubs = [budget_service_pb2_grpc.BudgetServiceStub(c) for c in channels]
    naive: Any = Client.from_url(redis_cluster.url)
    await naive.initialize()
    outcomes = {}
    try:
        for p in (
            *(overshoot.plan("one run", mode, 10) for mode in ("naive", *overshoot.MODES)),
            *(overshoot.plan("team", mode, 6, 4, 2) for mode in ("naive", "hard_gate")),
        ):
            if p.mode == "naive":
                counts = await overshoot.naive_burst(naive, p, range(40), time.monotonic())
                outcome = await overshoot.read_naive(naive, p, counts)
            else:
                await overshoot.prepare(stubs[0], p)
                counts = await overshoot.burst(stubs, p, range(40), time.monotonic())
                outcome = await overshoot.read_back(stubs[1], p, counts)
            assert outcome.errors == 0
            assert outcome.admitted + outcome.refused == 40
            outcomes[p.scenario, p.mode] = (p, outcome)
    finally:
        await naive.aclose()
        for channel in channels:
            await channel.close(None)
    hard = outcomes["one run", "hard_gate"][1]
    assert (hard.admitted, hard.overshoot, hard.committed) == (10, 0, 10 * overshoot.AMOUNT)
    # A 10% margin on 10 fits is exactly one more: the whole allowance, no more.
    plan, soft = outcomes["one run", "soft_gate"]
    assert (soft.admitted, soft.overshoot, soft.allowance) == (11, plan.run_allowance, 10_000)
    plan, calibrated = outcomes["one run", "calibrated"]
    assert 0 < calibrated.overshoot <= calibrated.allowance == overshoot.ONE_RUN_ALLOWANCE
    team = outcomes["team", "hard_gate"][1]
    assert (team.admitted, team.past_runs, team.past_team) == (6, 0, 0)
    for key in (("one run", "naive"), ("team", "naive")):
        naive_outcome = outcomes[key][1]
        assert naive_outcome.admitted >= outcomes[key[0], "hard_gate"][1].admitted
        assert naive_outcome.allowance == 0
    rows = overshoot.table({key: [outcome] for key, (_, outcome) in outcomes.items()})
    assert len(rows) == 2 + len(outcomes)
    assert "| one run | runcap hard_gate | 10 | 0 | 0 | 0 (0-0) | 0 | yes | 0 |" in rows
