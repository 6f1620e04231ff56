"""Clock jumps through the test clock, on a server whose only time is that clock.

The server runs in this process on SQLite or the Redis cluster with a clock
the test moves: forward past every TTL (the sweeper alone must expire the
holds, on runs and on their parents, and a late commit is still recorded),
and back by an hour, as a Redis failover to a node whose clock is behind
would (an expired hold stays expired, a new hold lasts its whole TTL, holds
count in the day they were made, and no answer carries a negative or
inflated delay). Each ends with `check`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import duration_pb2

from runcap import AsyncRuncapClient
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.app import RuncapServer
from runcap_server.backends.redis import RedisLedger
from runcap_server.backends.sqlite import SqliteLedger
from runcap_server.ledger.types import EventType, ReservationStatus
from runcap_server.settings import Settings
from tests.chaos.harness import TENANT, namespace
from tests.chaos.invariants import Journal, Ledger, RunPlan, check, eventually
from tests.chaos.workload import CENT, Clients, Watcher, finish_watchers
from tests.redis_servers import RedisCluster

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

pytestmark = pytest.mark.chaos

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
# Five seconds past a UTC midnight: an hour back is the day before.
MIDNIGHT_MS = (1_800_000_000_000 // DAY_MS + 1) * DAY_MS
TEAM = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="acme")


class JumpClock:
    """The test clock, free to jump either way (ManualClock only moves on)."""

    def __init__(self, start_ms: int) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def jump(self, ms: int) -> None:
        self._now_ms += ms


@dataclass
class Served:
    clock: JumpClock
    ledger: Ledger
    clients: Clients
    stub: BudgetServiceAsyncStub
    watching: AsyncRuncapClient

    @property
    def journal(self) -> Journal:
        return self.clients.journal


@pytest.fixture(params=["sqlite", "redis-cluster"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    """A server on the test clock, with a team `acme` (root `root`, child `child`)."""
    clock = JumpClock(MIDNIGHT_MS + 5_000)
    ledger: Ledger
    if request.param == "sqlite":
        ledger = SqliteLedger(path=str(tmp_path / "ledger.db"), default_ttl_ms=60_000, clock=clock)
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        ledger = RedisLedger(
            cluster_nodes=cluster.startup_nodes,
            default_ttl_ms=60_000,
            clock=clock,
            namespace=namespace(),
        )
    settings = Settings(listen_addr="127.0.0.1:0", sweep_interval_ms=50)
    server = RuncapServer(settings, backend=ledger)
    port = await server.start()
    target = f"127.0.0.1:{port}"
    clients = Clients(Journal(TENANT), [target])
    try:
        async with grpc.aio.insecure_channel(target) as channel, AsyncRuncapClient(target) as w:
            await clients.set_team_limit("acme", 1_000 * CENT)
            for period in (budget_pb2.PERIOD_DAILY, budget_pb2.PERIOD_MONTHLY):
                limit = pb.SetScopeLimitRequest(scope=TEAM, period=period, limit_micros=500 * CENT)
                await BudgetServiceStub(channel).SetScopeLimit(limit)
            await clients.create_run(RunPlan("root", 1_000 * CENT, team_id="acme"))
            await clients.create_run(RunPlan("child", 500 * CENT, "root"))
            yield Served(clock, ledger, clients, BudgetServiceStub(channel), w)
    finally:
        await clients.close()
        await server.stop()


async def statuses(ledger: Ledger, run_id: str) -> dict[str, ReservationStatus]:
    """A run's reservation records as stored (reading them expires nothing)."""
    _, records = await ledger.snapshot(TENANT, run_id)
    return {r.reservation_id: r.status for r in records}


def expired(ledger: Ledger, run_id: str, *ids: str) -> Callable[[], Awaitable[str]]:
    """A condition for `eventually`: the run's reservations `ids` are EXPIRED."""

    async def condition() -> str:
        found = await statuses(ledger, run_id)
        left = [i for i in ids if found.get(i) is not ReservationStatus.EXPIRED]
        return f"{run_id}: not expired yet: {left}" if left else ""

    return condition


async def daily(stub: BudgetServiceAsyncStub) -> budget_pb2.ScopeUsage:
    usage = (await stub.GetScope(pb.GetScopeRequest(scope=TEAM))).scope.usage
    found: budget_pb2.ScopeUsage = next(u for u in usage if u.period == budget_pb2.PERIOD_DAILY)
    return found


async def test_a_forward_jump_past_every_ttl_is_swept_on_runs_and_parents(served: Served) -> None:
    clock, ledger, clients = served.clock, served.ledger, served.clients
    watchers = [Watcher(served.watching, served.journal, run) for run in ("root", "child")]
    holds = {"child": ["c0", "c1", "c2"], "root": ["r0", "r1"]}
    made_at = clock.now_ms()
    for run_id, ids in holds.items():
        for rid in ids:
            reply = await clients.reserve(run_id, rid, 10 * CENT, ttl_ms=60_000)
            assert reply.decision == budget_pb2.DECISION_ALLOW
            assert reply.expire_time.ToMilliseconds() == made_at + 60_000

    clock.jump(59_999)
    await asyncio.sleep(0.5)  # ten sweeps: nothing is due yet
    assert set((await statuses(ledger, "child")).values()) == {ReservationStatus.HELD}
    clock.jump(1)
    # Nothing but the sweeper touches the ledger: it expires the runs' holds...
    for run_id, ids in holds.items():
        await eventually(expired(ledger, run_id, *ids), 10)
    # ...and, a grace later, the copies the parent run holds for the child.
    copies = [f"child/{rid}" for rid in holds["child"]]
    assert {s for c, s in (await statuses(ledger, "root")).items() if c in copies} == {
        ReservationStatus.HELD
    }
    clock.jump(1_000)
    await eventually(expired(ledger, "root", *copies), 10)

    # A commit after expiry is recorded, late, on the run and on every parent.
    await clients.commit("child", "c0", 7 * CENT)
    late = served.journal.reservations[("child", "c0")]
    assert late.settled_status is ReservationStatus.LATE_COMMITTED
    team = (await daily(served.stub)).committed_micros
    assert team == 7 * CENT

    heads = {run: (await ledger.get_run(TENANT, run)).state.revision for run in holds}
    await finish_watchers(watchers, heads)
    report = await check(ledger, served.journal)
    assert not report.problems, report.text()
    for run_id in holds:
        changes = (await ledger.read_changes(TENANT, run_id, 0, 1_000)).changes
        made = {c.reservation_id: c.time_ms for c in changes if c.type is EventType.RESERVED}
        for change in changes:
            if change.type is EventType.EXPIRED:
                # No hold ends before its TTL (a parent's copy: its TTL and a grace).
                assert change.time_ms - made[change.reservation_id] >= 60_000, change


async def test_a_backward_jump_neither_revives_nor_cuts_short_a_hold(served: Served) -> None:
    clock, ledger, clients, stub = served.clock, served.ledger, served.clients, served.stub
    watchers = [Watcher(served.watching, served.journal, "child")]
    await clients.reserve("child", "a", 10 * CENT, ttl_ms=10_000)
    clock.jump(11_000)
    await eventually(expired(ledger, "child", "a"), 10)

    clock.jump(-HOUR_MS)  # into the day before
    # The expired hold stays expired: a refund finds nothing to release.
    await clients.refund("child", "a")
    assert served.journal.reservations[("child", "a")].settled_status is ReservationStatus.EXPIRED
    before = await daily(stub)
    assert before.window_end_time.ToMilliseconds() == MIDNIGHT_MS
    # A new hold lasts its whole TTL on the new timeline.
    reply = await clients.reserve("child", "b", 20 * CENT, ttl_ms=10_000)
    assert reply.decision == budget_pb2.DECISION_ALLOW
    assert reply.expire_time.ToMilliseconds() - clock.now_ms() == 10_000
    clock.jump(9_000)
    await asyncio.sleep(0.5)
    assert (await statuses(ledger, "child"))["b"] is ReservationStatus.HELD
    await clients.commit("child", "b", 15 * CENT)
    assert served.journal.reservations[("child", "b")].settled_status is (
        ReservationStatus.COMMITTED
    )
    # It counts in the day it was held, not in the day the clock returns to.
    assert (await daily(stub)).committed_micros == before.committed_micros + 15 * CENT
    clock.jump(HOUR_MS)
    today = await daily(stub)
    assert today.window_start_time.ToMilliseconds() == MIDNIGHT_MS
    assert (today.committed_micros, today.reserved_micros) == (0, 0)

    heads = {"child": (await ledger.get_run(TENANT, "child")).state.revision}
    await finish_watchers(watchers, heads)
    report = await check(ledger, served.journal)
    assert not report.problems, report.text()


def seconds(value: duration_pb2.Duration) -> float:
    return value.ToMilliseconds() / 1000


async def test_no_delay_is_negative_or_outlasts_its_window_across_a_backward_jump(
    served: Served,
) -> None:
    clock, stub = served.clock, served.stub
    # The ceiling of each run's delays: its throttle's maximum, its rate window.
    ceilings = {"paced": 30.0, "rated": 60.0}
    paced = budget_pb2.RunPolicy(throttle_max_delay=duration_pb2.Duration(seconds=30))
    rated = budget_pb2.RunPolicy(
        rate_limit=budget_pb2.RateLimit(max_calls=2, window=duration_pb2.Duration(seconds=60))
    )
    await stub.CreateRun(pb.CreateRunRequest(run_id="paced", limit_micros=100 * CENT, policy=paced))
    await stub.CreateRun(pb.CreateRunRequest(run_id="rated", limit_micros=10**9, policy=rated))
    # Into the throttle band (95% committed), where each allowed call spaces out the next.
    first = await stub.Reserve(pb.ReserveRequest(run_id="paced", amount_micros=96 * CENT))
    await stub.Commit(
        pb.CommitRequest(
            run_id="paced", reservation_id=first.reservation_id, actual_micros=96 * CENT
        )
    )
    throttled: list[tuple[str, float]] = []
    for jump in (0, -HOUR_MS):
        clock.jump(jump)
        for run_id in ceilings:
            for _ in range(3):
                reply = await stub.Reserve(pb.ReserveRequest(run_id=run_id, amount_micros=1))
                if reply.decision == budget_pb2.DECISION_THROTTLE:
                    throttled.append((run_id, seconds(reply.retry_after)))
    assert {run_id for run_id, _ in throttled} == set(ceilings), throttled
    for run_id, delay in throttled:
        # Never negative, and never longer than the run's policy allows.
        assert 0 <= delay <= ceilings[run_id], throttled
