"""Parent scopes on a Redis Cluster, through real server processes.

A shared team ceiling holds under concurrency across replicas, and a replica
killed (SIGKILL) between two steps of a saga leaves nothing behind that the
sweeper does not settle or release.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import duration_pb2

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.redis_servers import RedisCluster
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

pytestmark = pytest.mark.redis
TEAM = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="acme")
UNIT = 1_000_000


def cluster_env(cluster: RedisCluster, namespace: str, **extra: str) -> dict[str, str]:
    return {
        "RUNCAP_BACKEND": "redis",
        "RUNCAP_REDIS_CLUSTER_NODES": ",".join(cluster.startup_nodes),
        "RUNCAP_REDIS_NAMESPACE": namespace,
        "RUNCAP_SWEEP_INTERVAL": "100ms",
        **extra,
    }


async def team_usage(stub: BudgetServiceAsyncStub) -> budget_pb2.ScopeUsage:
    scope = (await stub.GetScope(pb.GetScopeRequest(scope=TEAM))).scope
    lifetime: budget_pb2.ScopeUsage = scope.usage[0]
    assert lifetime.period == budget_pb2.PERIOD_LIFETIME
    return lifetime


async def test_a_team_ceiling_shared_by_20_runs_on_4_replicas_is_never_exceeded(
    redis_cluster: RedisCluster,
) -> None:
    """1,000 concurrent Reserves over 20 runs of one team, through 4 replicas."""
    env = cluster_env(redis_cluster, f"it-{uuid.uuid4().hex[:10]}")
    servers = [ServerProcess(None, env=env) for _ in range(4)]
    try:
        for server in servers:
            server.start()
        channels = [grpc.aio.insecure_channel(s.target) for s in servers]
        stubs: list[BudgetServiceAsyncStub] = [BudgetServiceStub(c) for c in channels]
        await stubs[0].SetScopeLimit(
            pb.SetScopeLimitRequest(
                scope=TEAM, period=budget_pb2.PERIOD_LIFETIME, limit_micros=60 * UNIT
            )
        )
        runs = [f"run-{n}" for n in range(20)]
        for n, run in enumerate(runs):
            await stubs[n % 4].CreateRun(
                pb.CreateRunRequest(run_id=run, limit_micros=5 * UNIT, team_id="acme")
            )
        replies = await asyncio.gather(
            *(
                stubs[i % 4].Reserve(
                    pb.ReserveRequest(
                        run_id=runs[i % 20], reservation_id=f"r{i}", amount_micros=UNIT
                    )
                )
                for i in range(1_000)
            )
        )
        allowed = [i for i, r in enumerate(replies) if r.decision == budget_pb2.DECISION_ALLOW]
        # 20 runs x 5 would be 100: the team's 60 is the binding ceiling.
        assert len(allowed) == 60
        blocked = [r for r in replies if r.decision == budget_pb2.DECISION_BLOCK]
        assert {(r.blocking_scope.kind, r.blocking_scope.id) for r in blocked} <= {
            (budget_pb2.SCOPE_KIND_TEAM, "acme"),
            *((budget_pb2.SCOPE_KIND_RUN, run) for run in runs),
        }
        states = [(await stubs[0].GetRun(pb.GetRunRequest(run_id=run))).state for run in runs]
        assert all(s.reserved_micros <= 5 * UNIT for s in states)
        team = await team_usage(stubs[1])
        # No hold of a blocked reservation is left on the team: the run holds
        # add up to the team's hold exactly.
        assert team.reserved_micros == sum(s.reserved_micros for s in states) == 60 * UNIT
        assert team.active_reservations == 60

        # Settle through other replicas than the one that reserved.
        await asyncio.gather(
            *(
                stubs[(i + 1) % 4].Commit(
                    pb.CommitRequest(
                        run_id=runs[i % 20], reservation_id=f"r{i}", actual_micros=UNIT // 2
                    )
                )
                for i in allowed
            )
        )
        team = await team_usage(stubs[2])
        states = [(await stubs[3].GetRun(pb.GetRunRequest(run_id=run))).state for run in runs]
        assert (team.committed_micros, team.reserved_micros) == (30 * UNIT, 0)
        assert sum(s.committed_micros for s in states) == team.committed_micros
        for channel in channels:
            await channel.close(None)
    finally:
        for server in servers:
            server.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the ledgers never settled")


@pytest.mark.parametrize(
    "point",
    ["reserve:parents-held", "reserve:run-decided", "commit:run-settled", "refund:run-settled"],
)
async def test_a_replica_killed_between_saga_steps_leaves_every_parent_settled(
    redis_cluster: RedisCluster, point: str
) -> None:
    """SIGKILL after one step; another replica's sweeper finishes or releases the rest."""
    namespace = f"it-{uuid.uuid4().hex[:10]}"
    crashing = ServerProcess(None, env=cluster_env(redis_cluster, namespace, **{
        "RUNCAP_TEST_CRASH_AT": point,
    }))  # fmt: skip
    survivor = ServerProcess(None, env=cluster_env(redis_cluster, namespace))
    try:
        crashing.start()
        survivor.start()
        async with (
            grpc.aio.insecure_channel(crashing.target) as doomed_channel,
            grpc.aio.insecure_channel(survivor.target) as channel,
        ):
            doomed: BudgetServiceAsyncStub = BudgetServiceStub(doomed_channel)
            stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
            # A team ceiling that blocks when the crash must come after a block.
            team_limit = 5 * UNIT if point == "reserve:run-decided" else 100 * UNIT
            await stub.SetScopeLimit(
                pb.SetScopeLimitRequest(
                    scope=TEAM, period=budget_pb2.PERIOD_DAILY, limit_micros=team_limit
                )
            )
            await stub.CreateRun(pb.CreateRunRequest(run_id="root", limit_micros=50 * UNIT))
            await stub.CreateRun(
                pb.CreateRunRequest(
                    run_id="child", limit_micros=50 * UNIT, parent_run_id="root", team_id="acme"
                )
            )
            # Holds that would outlive the test unless settled (commit/refund)
            # or a short one that expires (a reserve that never finished).
            settles = point.startswith(("commit", "refund"))
            ttl = duration_pb2.Duration(seconds=60 if settles else 1)
            reserve = pb.ReserveRequest(
                run_id="child", reservation_id="r1", amount_micros=10 * UNIT, ttl=ttl
            )
            actual = 7 * UNIT if point.startswith("commit") else 0
            if settles:
                assert (await stub.Reserve(reserve)).decision == budget_pb2.DECISION_ALLOW
                root = (await stub.GetRun(pb.GetRunRequest(run_id="root"))).state
                assert root.reserved_micros == 10 * UNIT
            fatal: Awaitable[object]
            if point.startswith("reserve"):
                fatal = doomed.Reserve(reserve)
            elif point.startswith("commit"):
                fatal = doomed.Commit(
                    pb.CommitRequest(run_id="child", reservation_id="r1", actual_micros=actual)
                )
            else:
                fatal = doomed.Refund(pb.RefundRequest(run_id="child", reservation_id="r1"))
            with pytest.raises(grpc.aio.AioRpcError) as died:
                await fatal
            assert died.value.code() == grpc.StatusCode.UNAVAILABLE
            assert crashing.wait(10) != 0  # it really died mid-saga

            async def settled() -> bool:
                root = (await stub.GetRun(pb.GetRunRequest(run_id="root"))).state
                team = await team_usage(stub)
                return root.reserved_micros == 0 and team.reserved_micros == 0

            await eventually(settled)
            child = (await stub.GetRun(pb.GetRunRequest(run_id="child"))).state
            root = (await stub.GetRun(pb.GetRunRequest(run_id="root"))).state
            team = await team_usage(stub)
            # The ledgers add up: every parent carries exactly the child's spend.
            assert child.committed_micros == actual
            assert root.committed_micros == team.committed_micros == actual
            assert root.active_reservations == team.active_reservations == 0
            if point == "reserve:run-decided":
                # The block was recorded before the crash: a retry replays it.
                retry = await stub.Reserve(reserve)
                assert (retry.decision, retry.replayed) == (budget_pb2.DECISION_BLOCK, True)
                assert retry.blocking_scope.id == "acme"
            if point == "reserve:parents-held":
                # The run never decided and its parents' holds expired: the
                # retry cannot silently hold again under the same id.
                retry = await stub.Reserve(reserve)
                assert retry.decision == budget_pb2.DECISION_BLOCK
                assert retry.reason == budget_pb2.DECISION_REASON_RESERVATION_EXPIRED
    finally:
        crashing.kill()
        survivor.stop()
