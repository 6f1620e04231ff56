"""Run policies through a real server: the contract's fields, validation, and
seed 001's runaway agent meeting its governor (thresholds, throttle, stop)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from tests.integration.rpc import error_info, new_id

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

CENT = 10_000  # micro-USD


def ms(value: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(value)
    return duration


async def create(stub: BudgetServiceAsyncStub, limit: int, **policy: object) -> str:
    run_id = new_id("run")
    await stub.CreateRun(
        pb.CreateRunRequest(
            run_id=run_id,
            limit_micros=limit,
            policy=budget_pb2.RunPolicy(**policy),  # type: ignore[arg-type]
        )
    )
    return run_id


async def test_the_policy_round_trips_with_its_defaults_filled_in(
    stub: BudgetServiceAsyncStub,
) -> None:
    run_id = await create(
        stub,
        1_000,
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_SOFT_GATE,
        soft_gate_margin_percent=10,
        meter_limits={"tool:serp_api": 3},
        rate_limit=budget_pb2.RateLimit(max_calls=60, window=ms(60_000)),
        max_in_flight=4,
    )
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    policy = run.policy
    assert policy.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_SOFT_GATE
    assert (policy.thresholds.info_percent, policy.thresholds.throttle_percent) == (60, 95)
    assert (policy.throttle_base_delay.ToMilliseconds(), policy.max_depth) == (1_000, 5)
    assert (policy.rate_limit.max_calls, policy.max_in_flight) == (60, 4)
    assert not policy.HasField("max_tokens")
    assert run.depth_remaining == 5
    assert [(m.name, m.limit, m.committed) for m in run.meters] == [("tool:serp_api", 3, 0)]


async def test_a_meter_blocks_with_its_name_and_shows_on_the_run(
    stub: BudgetServiceAsyncStub,
) -> None:
    run_id = await create(stub, 10_000_000, meter_limits={"tool:serp_api": 2})
    for _ in range(2):
        allowed = await stub.Reserve(
            pb.ReserveRequest(run_id=run_id, amount_micros=CENT, meter="tool:serp_api")
        )
        assert allowed.decision == budget_pb2.DECISION_ALLOW
        await stub.Commit(
            pb.CommitRequest(
                run_id=run_id, reservation_id=allowed.reservation_id, actual_micros=CENT
            )
        )
    blocked = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, amount_micros=CENT, meter="tool:serp_api")
    )
    assert (blocked.decision, blocked.blocking_dimension, blocked.blocking_meter) == (
        budget_pb2.DECISION_BLOCK,
        budget_pb2.BUDGET_DIMENSION_METER,
        "tool:serp_api",
    )
    other = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, amount_micros=CENT, meter="tool:web", meter_units=5)
    )
    assert other.decision == budget_pb2.DECISION_ALLOW
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert [(m.name, m.HasField("limit"), m.committed, m.reserved) for m in run.meters] == [
        ("tool:serp_api", True, 2, 0),
        ("tool:web", False, 0, 5),
    ]


async def test_advisory_warns_and_holds(stub: BudgetServiceAsyncStub) -> None:
    run_id = await create(stub, 100, enforcement_mode=budget_pb2.ENFORCEMENT_MODE_ADVISORY)
    warned = await stub.Reserve(pb.ReserveRequest(run_id=run_id, amount_micros=500))
    assert (warned.decision, warned.reason, warned.amount_micros) == (
        budget_pb2.DECISION_WARN,
        budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        500,
    )
    assert warned.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_ADVISORY
    assert warned.state.reserved_micros == 500


async def test_bad_policies_are_refused_with_every_violation(
    stub: BudgetServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateRun(
            pb.CreateRunRequest(
                run_id=new_id("run"),
                limit_micros=1_000,
                policy=budget_pb2.RunPolicy(
                    soft_gate_margin_percent=10,
                    thresholds=budget_pb2.Thresholds(info_percent=80, warn_percent=70),
                    meter_limits={"bad meter": 1, "ok": 0},
                    rate_limit=budget_pb2.RateLimit(max_calls=5),
                    max_depth=16,
                ),
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, status = error_info(info.value)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad_request)
    fields = sorted(v.field for v in bad_request.field_violations)
    assert fields == [
        "policy.max_depth",
        "policy.meter_limits['bad meter']",
        "policy.meter_limits['ok']",
        "policy.rate_limit.window",
        "policy.soft_gate_margin_percent",
        "policy.thresholds.warn_percent",
    ]


async def test_subagent_limits_fail_creation_with_their_reason(
    stub: BudgetServiceAsyncStub,
) -> None:
    root = await create(stub, 1_000, max_children=1, max_depth=1)
    kid = new_id("kid")
    await stub.CreateRun(pb.CreateRunRequest(run_id=kid, limit_micros=100, parent_run_id=root))
    for parent, what in ((root, "children"), (kid, "max_depth")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateRun(
                pb.CreateRunRequest(run_id=new_id("x"), limit_micros=100, parent_run_id=parent)
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(info.value)[0].reason == "SUBAGENT_LIMIT"
        assert what in (info.value.details() or "")


async def test_a_0_05_usd_governor_stops_a_runaway_tool_loop_at_exactly_its_ceiling(
    stub: BudgetServiceAsyncStub,
) -> None:
    """Seed 001's exercise: a tool call every 100 ms at $0.01; stop at $0.05."""
    run_id = await create(stub, 5 * CENT)
    decisions = []
    for _ in range(8):
        answer = await stub.Reserve(pb.ReserveRequest(run_id=run_id, amount_micros=CENT))
        decisions.append(answer.decision)
        if answer.decision == budget_pb2.DECISION_ALLOW:
            await stub.Commit(
                pb.CommitRequest(
                    run_id=run_id, reservation_id=answer.reservation_id, actual_micros=CENT
                )
            )
        await asyncio.sleep(0.1)
    assert decisions == [budget_pb2.DECISION_ALLOW] * 5 + [budget_pb2.DECISION_BLOCK] * 3
    state = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert (state.committed_micros, state.overrun_micros) == (5 * CENT, 0)


async def test_a_runaway_loop_sees_info_warn_throttle_then_stop_on_watch(
    stub: BudgetServiceAsyncStub,
) -> None:
    """A $5 run with the default thresholds; a loop spending $0.01 per call as
    fast as it may (seed 001's 100 ms, sped up), ignoring nothing but also
    never stopping by itself. The governor slows it, then stops it."""
    run_id = await create(stub, 5_000_000, throttle_base_delay=ms(10), throttle_max_delay=ms(160))
    stream = stub.Watch(pb.WatchRequest(run_id=run_id))
    crossed: list[int] = []

    async def watch() -> None:
        async for message in stream:
            assert isinstance(message, pb.WatchResponse)
            event = message.event
            if event.type == budget_pb2.EVENT_TYPE_THRESHOLD_CROSSED:
                crossed.append(event.threshold)
                assert event.state.committed_micros <= 5_000_000
                if event.threshold == budget_pb2.THRESHOLD_LEVEL_STOP:
                    return

    watcher = asyncio.create_task(watch())
    delays: list[int] = []
    while True:
        answer = await stub.Reserve(pb.ReserveRequest(run_id=run_id, amount_micros=CENT))
        if answer.decision == budget_pb2.DECISION_BLOCK:
            break
        if answer.decision == budget_pb2.DECISION_THROTTLE:
            assert answer.reason == budget_pb2.DECISION_REASON_THROTTLED
            delays.append(answer.retry_after.ToMilliseconds())
            await asyncio.sleep(answer.retry_after.ToMilliseconds() / 1000)
            continue
        assert answer.decision == budget_pb2.DECISION_ALLOW
        await stub.Commit(
            pb.CommitRequest(
                run_id=run_id, reservation_id=answer.reservation_id, actual_micros=CENT
            )
        )
    await asyncio.wait_for(watcher, 10)
    stream.cancel()

    assert answer.reason == budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET
    assert crossed == [
        budget_pb2.THRESHOLD_LEVEL_INFO,
        budget_pb2.THRESHOLD_LEVEL_WARN,
        budget_pb2.THRESHOLD_LEVEL_THROTTLE,
        budget_pb2.THRESHOLD_LEVEL_STOP,
    ]
    # The delays grow (each allowed call in the band doubles the next wait) up
    # to the maximum; one throttle per allowed call, since the loop waits.
    assert len(delays) >= 4
    assert max(delays) <= 160
    assert delays[-1] > delays[0]
    state = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert (state.committed_micros, state.overrun_micros) == (5_000_000, 0)


async def test_approvals_round_trip_through_watch(stub: BudgetServiceAsyncStub) -> None:
    """An agent asks for an unapproved tool; a supervisor watching the run
    sees the request, approves it, and the agent's next call goes through."""
    run_id = await create(stub, 1_000_000, approved_meters=["tool:search"])
    stream = stub.Watch(pb.WatchRequest(run_id=run_id))
    first = await stream.read()
    assert isinstance(first, pb.WatchResponse)
    assert first.HasField("snapshot")

    async def supervise() -> list[int]:
        seen: list[int] = []
        while True:
            message = await stream.read()
            assert isinstance(message, pb.WatchResponse)
            event = message.event
            if event.approval_id:
                seen.append(int(event.type))
                if event.type != budget_pb2.EVENT_TYPE_APPROVAL_REQUESTED:
                    return seen
                await stub.Approve(pb.ApproveRequest(approval_id=event.approval_id))

    supervisor = asyncio.create_task(supervise())
    asked = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, amount_micros=CENT, meter="tool:write_db")
    )
    assert asked.decision == budget_pb2.DECISION_APPROVAL_REQUIRED
    assert asked.approval_id == f"{run_id}/approval:meter:tool:write_db"
    seen = await asyncio.wait_for(supervisor, 10)
    stream.cancel()
    assert seen == [
        budget_pb2.EVENT_TYPE_APPROVAL_REQUESTED,
        budget_pb2.EVENT_TYPE_APPROVAL_GRANTED,
    ]
    allowed = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, amount_micros=CENT, meter="tool:write_db")
    )
    assert allowed.decision == budget_pb2.DECISION_ALLOW
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert [(a.meter, a.status) for a in run.approvals] == [
        ("tool:write_db", budget_pb2.APPROVAL_STATUS_APPROVED)
    ]
    again = await stub.Approve(pb.ApproveRequest(approval_id=asked.approval_id))
    assert again.replayed
    with pytest.raises(grpc.aio.AioRpcError) as resolved:
        await stub.Deny(pb.DenyRequest(approval_id=asked.approval_id))
    assert resolved.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(resolved.value)[0].reason == "APPROVAL_RESOLVED"


@pytest.mark.parametrize(
    ("approval_id", "code", "reason"),
    [
        ("no-such-run/approval:spend", grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND"),
        ("run/approval:later", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
)
async def test_unknown_and_malformed_approval_ids(
    stub: BudgetServiceAsyncStub, approval_id: str, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Deny(pb.DenyRequest(approval_id=approval_id))
    assert info.value.code() == code
    assert error_info(info.value)[0].reason == reason


async def test_a_teams_default_policy_governs_its_new_runs(stub: BudgetServiceAsyncStub) -> None:
    team = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id=new_id("team"))
    advisory = budget_pb2.RunPolicy(enforcement_mode=budget_pb2.ENFORCEMENT_MODE_ADVISORY)
    set_ = await stub.SetScopePolicy(pb.SetScopePolicyRequest(scope=team, policy=advisory))
    assert set_.scope.default_policy.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_ADVISORY
    shown = await stub.GetScope(pb.GetScopeRequest(scope=team))
    assert shown.scope.HasField("default_policy")
    run_id = new_id("run")
    created = await stub.CreateRun(
        pb.CreateRunRequest(run_id=run_id, limit_micros=100, team_id=team.id)
    )
    assert created.run.policy.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_ADVISORY
    warned = await stub.Reserve(pb.ReserveRequest(run_id=run_id, amount_micros=500))
    assert warned.decision == budget_pb2.DECISION_WARN
    cleared = await stub.SetScopePolicy(pb.SetScopePolicyRequest(scope=team, clear=True))
    assert not cleared.scope.HasField("default_policy")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SetScopePolicy(pb.SetScopePolicyRequest(scope=team))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
