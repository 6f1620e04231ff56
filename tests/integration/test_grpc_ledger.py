"""The ledger through the real gRPC server: concurrency, idempotency, expiry."""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import duration_pb2

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

from tests.integration.rpc import create_run, error_info, new_id

ALLOW = budget_pb2.DECISION_ALLOW
BLOCK = budget_pb2.DECISION_BLOCK


def ms(millis: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(millis)
    return duration


async def test_500_concurrent_reserves_allow_exactly_what_fits(
    stub: BudgetServiceAsyncStub,
) -> None:
    run_id = await create_run(stub, limit_micros=100_000_000)
    ids = [new_id("r") for _ in range(500)]
    replies = await asyncio.gather(
        *(
            stub.Reserve(
                pb.ReserveRequest(run_id=run_id, reservation_id=i, amount_micros=1_000_000)
            )
            for i in ids
        )
    )
    allowed = [i for i, r in zip(ids, replies, strict=True) if r.decision == ALLOW]
    blocked = [r for r in replies if r.decision == BLOCK]
    assert len(allowed) == 100
    assert len(blocked) == 400
    assert all(r.reason == budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET for r in blocked)
    assert all(r.state.committed_micros + r.state.reserved_micros <= 100_000_000 for r in replies)

    shown = await stub.GetRun(pb.GetRunRequest(run_id=run_id))
    state = shown.state
    assert (state.reserved_micros, state.active_reservations, state.remaining_micros) == (
        100_000_000,
        100,
        0,
    )
    assert (state.blocked, shown.run.blocked_calls) == (True, 400)

    # Settle them concurrently in random order: half committed at varying cost, half refunded.
    random.shuffle(allowed)
    to_commit = {i: random.randrange(0, 1_000_001) for i in allowed[:50]}
    to_refund = allowed[50:]
    await asyncio.gather(
        *(
            stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id=i, actual_micros=a))
            for i, a in to_commit.items()
        ),
        *(stub.Refund(pb.RefundRequest(run_id=run_id, reservation_id=i)) for i in to_refund),
    )
    state = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert state.committed_micros == sum(to_commit.values())
    assert state.reserved_micros == 0
    assert state.active_reservations == 0
    assert state.overrun_micros == 0
    assert state.remaining_micros == 100_000_000 - sum(to_commit.values())
    # Created + 100 reserved + one BLOCKED for the 400 blocks + 100 settled.
    assert state.revision == 1 + 100 + 1 + 100


async def test_every_mutation_is_idempotent(stub: BudgetServiceAsyncStub) -> None:
    run_id = new_id("run")
    create = pb.CreateRunRequest(run_id=run_id, limit_micros=5_000_000, labels={"agent": "a"})
    first = await stub.CreateRun(create)
    again = await stub.CreateRun(create)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.run == first.run

    reserve = pb.ReserveRequest(
        run_id=run_id, reservation_id="r1", amount_micros=2_000_000, ttl=ms(60_000)
    )
    first_r = await stub.Reserve(reserve)
    retry_r = await stub.Reserve(reserve)
    assert (first_r.replayed, retry_r.replayed) == (False, True)
    assert retry_r.decision == first_r.decision == ALLOW
    assert retry_r.expire_time == first_r.expire_time
    assert retry_r.state == first_r.state

    commit = pb.CommitRequest(run_id=run_id, reservation_id="r1", actual_micros=1_500_000)
    first_c = await stub.Commit(commit)
    retry_c = await stub.Commit(commit)
    assert (first_c.replayed, retry_c.replayed) == (False, True)
    assert retry_c.state == first_c.state
    assert retry_c.reservation_status == budget_pb2.RESERVATION_STATUS_COMMITTED

    await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="r2", amount_micros=1_000_000)
    )
    refund = pb.RefundRequest(run_id=run_id, reservation_id="r2")
    first_f = await stub.Refund(refund)
    retry_f = await stub.Refund(refund)
    assert (first_f.replayed, retry_f.replayed) == (False, True)
    assert (first_f.released_micros, retry_f.released_micros) == (1_000_000, 0)
    assert retry_f.state == first_f.state
    # Refund after commit is a no-op that says how the reservation settled.
    after_commit = await stub.Refund(pb.RefundRequest(run_id=run_id, reservation_id="r1"))
    assert after_commit.replayed
    assert after_commit.reservation_status == budget_pb2.RESERVATION_STATUS_COMMITTED
    assert after_commit.state == first_f.state

    close = pb.CloseRunRequest(run_id=run_id)
    first_x = await stub.CloseRun(close)
    retry_x = await stub.CloseRun(close)
    assert (first_x.replayed, retry_x.replayed) == (False, True)
    assert retry_x.state == first_x.state
    assert first_x.state.status == budget_pb2.RUN_STATUS_CLOSED

    # A block is remembered too, even once the budget would fit.
    blocked = pb.ReserveRequest(run_id=run_id, reservation_id="r3", amount_micros=1)
    assert (await stub.Reserve(blocked)).reason == budget_pb2.DECISION_REASON_RUN_CLOSED
    replay = await stub.Reserve(blocked)
    assert (replay.decision, replay.replayed) == (BLOCK, True)

    # Same ids, different arguments: rejected, and nothing changes.
    before = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
    conflicts = [
        (
            stub.CreateRun,
            pb.CreateRunRequest(run_id=run_id, limit_micros=6_000_000),
            "RUN_ALREADY_EXISTS",
        ),
        (
            stub.Reserve,
            pb.ReserveRequest(
                run_id=run_id, reservation_id="r1", amount_micros=2_000_001, ttl=ms(60_000)
            ),
            "IDEMPOTENCY_CONFLICT",
        ),
        (
            stub.Reserve,
            pb.ReserveRequest(run_id=run_id, reservation_id="r1", amount_micros=2_000_000),
            "IDEMPOTENCY_CONFLICT",
        ),
        (
            stub.Commit,
            pb.CommitRequest(run_id=run_id, reservation_id="r1", actual_micros=1),
            "IDEMPOTENCY_CONFLICT",
        ),
        (
            stub.Commit,
            pb.CommitRequest(run_id=run_id, reservation_id="r2", actual_micros=1),
            "RESERVATION_RELEASED",
        ),
    ]
    for method, request, reason in conflicts:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await method(request)  # type: ignore[operator]
        info, _ = error_info(failure.value)
        assert info.reason == reason, request
    after = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert after == before


async def test_expired_hold_is_released_and_a_late_commit_is_recorded(
    stub: BudgetServiceAsyncStub,
) -> None:
    run_id = await create_run(stub, limit_micros=1_000_000)
    held = await stub.Reserve(
        pb.ReserveRequest(
            run_id=run_id, reservation_id="slow", amount_micros=1_000_000, ttl=ms(300)
        )
    )
    assert held.decision == ALLOW
    assert (
        await stub.Reserve(pb.ReserveRequest(run_id=run_id, reservation_id="x", amount_micros=1))
    ).decision == BLOCK

    # The sweeper releases the hold, and a watcher sees it happen.
    events = []
    async for message in stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=0)):
        if message.HasField("event"):
            events.append(message.event)
            if message.event.type == budget_pb2.EVENT_TYPE_EXPIRED:
                break
    assert [e.type for e in events] == [
        budget_pb2.EVENT_TYPE_CREATED,
        budget_pb2.EVENT_TYPE_RESERVED,
        budget_pb2.EVENT_TYPE_BLOCKED,
        budget_pb2.EVENT_TYPE_EXPIRED,
    ]
    assert events[-1].reservation_id == "slow"
    assert events[-1].state.reserved_micros == 0

    again = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="fits", amount_micros=400_000)
    )
    assert again.decision == ALLOW

    late = await stub.Commit(
        pb.CommitRequest(run_id=run_id, reservation_id="slow", actual_micros=900_000)
    )
    assert late.reservation_status == budget_pb2.RESERVATION_STATUS_LATE_COMMITTED
    assert late.overrun_micros == 900_000
    assert late.state.committed_micros == 900_000
    assert late.state.reserved_micros == 400_000
    assert late.state.remaining_micros == 0
    # committed + reserved <= limit + overrun, even past the ceiling.
    s = late.state
    assert s.committed_micros + s.reserved_micros <= s.limit_micros + s.overrun_micros


async def test_commit_above_the_hold_is_recorded_as_overrun(stub: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(stub, limit_micros=10_000_000)
    await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="r", amount_micros=1_000_000)
    )
    reply = await stub.Commit(
        pb.CommitRequest(run_id=run_id, reservation_id="r", actual_micros=1_250_000)
    )
    assert (reply.overrun_micros, reply.held_micros, reply.actual_micros) == (
        250_000,
        1_000_000,
        1_250_000,
    )
    assert reply.state.committed_micros == 1_250_000
    assert reply.state.overrun_micros == 250_000


async def test_parent_scopes_through_the_api(stub: BudgetServiceAsyncStub) -> None:
    """A subagent under a team ceiling: lineage, the blocking scope, and GetScope."""
    team = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id=new_id("team"))
    limited = await stub.SetScopeLimit(
        pb.SetScopeLimitRequest(scope=team, period=budget_pb2.PERIOD_DAILY, limit_micros=300)
    )
    daily = limited.scope.usage[1]
    assert (daily.period, daily.limit_micros, daily.remaining_micros) == (
        budget_pb2.PERIOD_DAILY,
        300,
        300,
    )
    day_ms = daily.window_end_time.ToMilliseconds() - daily.window_start_time.ToMilliseconds()
    assert day_ms == 86_400_000
    assert not limited.scope.usage[0].HasField("limit_micros")  # lifetime: none

    root = await create_run(stub, limit_micros=1_000, team_id=team.id, user_id="ada")
    child = (
        await stub.CreateRun(
            pb.CreateRunRequest(run_id=new_id("kid"), limit_micros=1_000, parent_run_id=root)
        )
    ).run
    assert (child.parent_run_id, list(child.ancestor_run_ids)) == (root, [root])
    assert (child.team_id, child.user_id, child.api_key_id) == (team.id, "ada", "")

    allowed = await stub.Reserve(
        pb.ReserveRequest(run_id=child.run_id, reservation_id="a", amount_micros=200)
    )
    assert allowed.decision == ALLOW
    assert not allowed.HasField("blocking_scope")
    blocked = await stub.Reserve(
        pb.ReserveRequest(run_id=child.run_id, reservation_id="b", amount_micros=200)
    )
    assert (blocked.decision, blocked.reason) == (
        BLOCK,
        budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
    )
    assert (blocked.blocking_scope, blocked.blocking_period) == (team, budget_pb2.PERIOD_DAILY)
    parent = (await stub.GetRun(pb.GetRunRequest(run_id=root))).state
    assert (parent.reserved_micros, parent.active_reservations) == (200, 1)

    await stub.Commit(pb.CommitRequest(run_id=child.run_id, reservation_id="a", actual_micros=150))
    scope = (await stub.GetScope(pb.GetScopeRequest(scope=team))).scope
    assert [(u.committed_micros, u.reserved_micros) for u in scope.usage] == [(150, 0)] * 3
    parent = (await stub.GetRun(pb.GetRunRequest(run_id=root))).state
    assert (parent.committed_micros, parent.reserved_micros) == (150, 0)

    # The run's own ceiling is reported as the run itself.
    own = await stub.Reserve(
        pb.ReserveRequest(run_id=child.run_id, reservation_id="c", amount_micros=5_000)
    )
    assert own.blocking_scope == budget_pb2.ScopeRef(
        kind=budget_pb2.SCOPE_KIND_RUN, id=child.run_id
    )
