"""Alternatives, automatic downgrades and decision records through a real server.

The server reads a price table written here; every amount below is worked by
hand from its rates (micro-USD per 1M tokens). The call priced throughout is
10,000 input tokens with at most 1,000 output tokens.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.integration.rpc import error_info, new_id
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub


def model(name: str, input_rate: int, output_rate: int, **fields: Any) -> dict[str, Any]:
    entry = {
        "provider": "acme",
        "model": name,
        "input": input_rate,
        "output": output_rate,
        "cache_read": 0,
        "cache_write": 0,
        "reasoning": output_rate,
        "context_window": 200_000,
        "max_output_tokens": 64_000,
        "tools": True,
        "json_schema": True,
        "modalities": ["text"],
    }
    return {**entry, **fields}


TABLE = {
    "version": "alt-v1",
    "sources": {},
    "models": [
        model("flagship", 15_000_000, 75_000_000),  # 150,000 + 75,000 = 225,000
        model("mid", 3_000_000, 15_000_000, context_window=128_000),  # 30,000 + 15,000 = 45,000
        model("vision", 2_500_000, 10_000_000, modalities=["text", "image"]),  # 35,000
        model("tiny", 150_000, 600_000, context_window=128_000),  # 1,500 + 600 = 2,100
        model("short", 1_000_000, 4_000_000, context_window=32_000),  # too small a context
        model("plain", 100_000, 400_000, tools=False),  # no tools
    ],
}
FLAGSHIP, MID, VISION, TINY = 225_000, 45_000, 35_000, 2_100


@pytest.fixture(scope="module")
def alt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("alternatives")
    (directory / "prices.json").write_text(json.dumps(TABLE))
    env = {"RUNCAP_PRICE_TABLE": str(directory / "prices.json")}
    server = ServerProcess(directory / "runcap.db", env=env).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def stub(alt_server: ServerProcess) -> AsyncIterator[BudgetServiceAsyncStub]:
    async with grpc.aio.insecure_channel(alt_server.target) as channel:
        yield BudgetServiceStub(channel)


def flagship_call(**needs: Any) -> pb.LlmCall:
    return pb.LlmCall(
        provider="acme",
        model="flagship",
        input_tokens=10_000,
        max_output_tokens=1_000,
        needs_tools=True,
        min_context_tokens=128_000,
        **needs,
    )


async def create(stub: BudgetServiceAsyncStub, limit: int, **kwargs: Any) -> str:
    run_id = new_id("run")
    await stub.CreateRun(pb.CreateRunRequest(run_id=run_id, limit_micros=limit, **kwargs))
    return run_id


async def test_a_blocked_call_lists_the_capable_models_that_fit_cheapest_first(
    stub: BudgetServiceAsyncStub,
) -> None:
    run_id = await create(stub, 100_000)
    blocked = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))
    assert (blocked.decision, blocked.reason, blocked.blocking_dimension) == (
        budget_pb2.DECISION_BLOCK,
        budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        budget_pb2.BUDGET_DIMENSION_SPEND,
    )
    # Tools and 128k context: not "plain" (no tools) nor "short" (32k).
    assert [(a.model, a.amount_micros) for a in blocked.alternatives] == [
        ("tiny", TINY),
        ("vision", VISION),
        ("mid", MID),
    ]
    assert blocked.alternatives[0].effective_max_output_tokens == 1_000
    seeing = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, llm_call=flagship_call(modalities=["image"]))
    )
    assert [a.model for a in seeing.alternatives] == ["vision"]
    # Only what fits what is left: hold 60,000 of the 100,000 first.
    await stub.Reserve(pb.ReserveRequest(run_id=run_id, amount_micros=60_000))
    tight = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))
    assert [a.model for a in tight.alternatives] == ["tiny", "vision"]


async def test_alternatives_fit_the_parent_scope_that_blocked(
    stub: BudgetServiceAsyncStub,
) -> None:
    team = new_id("team")
    await stub.SetScopeLimit(
        pb.SetScopeLimitRequest(
            scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id=team),
            period=budget_pb2.PERIOD_DAILY,
            limit_micros=40_000,
        )
    )
    run_id = await create(stub, 10_000_000, team_id=team)
    blocked = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))
    assert blocked.blocking_scope.kind == budget_pb2.SCOPE_KIND_TEAM
    assert [a.model for a in blocked.alternatives] == ["tiny", "vision"]


async def test_auto_downgrade_holds_the_priciest_alternative_that_fits(
    stub: BudgetServiceAsyncStub,
) -> None:
    policy = budget_pb2.RunPolicy(auto_downgrade=True)
    run_id = await create(stub, 100_000, policy=policy)
    request = pb.ReserveRequest(run_id=run_id, reservation_id="step-1", llm_call=flagship_call())
    answer = await stub.Reserve(request)
    assert answer.decision == budget_pb2.DECISION_DOWNGRADE
    assert (answer.requested_model, answer.estimate.model) == ("flagship", "mid")
    assert (answer.amount_micros, answer.state.reserved_micros) == (MID, MID)
    assert answer.reservation_id != "step-1"
    assert [a.model for a in answer.alternatives] == ["tiny", "vision", "mid"]

    replay = await stub.Reserve(request)
    assert (replay.replayed, replay.decision, replay.reservation_id) == (
        True,
        budget_pb2.DECISION_DOWNGRADE,
        answer.reservation_id,
    )
    assert replay.state.reserved_micros == MID  # held once

    # Commit by usage prices at the model held: 10,000 x 3 + 500 x 15 = 37,500.
    committed = await stub.Commit(
        pb.CommitRequest(
            run_id=run_id,
            reservation_id=answer.reservation_id,
            usage=pb.TokenUsage(input_tokens=10_000, output_tokens=500),
        )
    )
    assert committed.actual_micros == 37_500

    record = await stub.GetDecision(pb.GetDecisionRequest(decision_id=answer.decision_id))
    assert record.decision == budget_pb2.DECISION_DOWNGRADE
    assert (record.estimate.model, record.estimate.price_table_version) == ("mid", "alt-v1")
    assert record.reservation_status == budget_pb2.RESERVATION_STATUS_COMMITTED
    assert record.actual_micros == 37_500
    blocked = await stub.GetDecision(pb.GetDecisionRequest(decision_id=f"{run_id}/step-1"))
    assert (blocked.decision, blocked.estimate.model) == (budget_pb2.DECISION_BLOCK, "flagship")


async def test_downgrade_models_limit_what_may_stand_in(stub: BudgetServiceAsyncStub) -> None:
    policy = budget_pb2.RunPolicy(auto_downgrade=True, downgrade_models=["acme/tiny"])
    run_id = await create(stub, 100_000, policy=policy)
    answer = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))
    assert (answer.decision, answer.estimate.model, answer.amount_micros) == (
        budget_pb2.DECISION_DOWNGRADE,
        "tiny",
        TINY,
    )
    assert [a.model for a in answer.alternatives] == ["tiny"]


async def test_candidate_models_are_what_a_gateway_can_serve(
    stub: BudgetServiceAsyncStub,
) -> None:
    # The policy allows mid and tiny; the caller can use vision and mid: only
    # mid is both, and the downgrade takes it.
    policy = budget_pb2.RunPolicy(auto_downgrade=True, downgrade_models=["acme/mid", "acme/tiny"])
    run_id = await create(stub, 100_000, policy=policy)
    call = flagship_call(candidate_models=["acme/vision", "acme/mid"])
    answer = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=call))
    assert (answer.decision, answer.estimate.model) == (budget_pb2.DECISION_DOWNGRADE, "mid")
    assert [a.model for a in answer.alternatives] == ["mid"]
    # Without a policy list the candidates alone decide, cheapest first.
    plain = await create(stub, 100_000)
    call = flagship_call(candidate_models=["acme/mid", "acme/vision", "acme/flagship"])
    blocked = await stub.Reserve(pb.ReserveRequest(run_id=plain, llm_call=call))
    assert [a.model for a in blocked.alternatives] == ["vision", "mid"]

    bad = flagship_call(candidate_models=["acme/mid", "no-slash"])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Reserve(pb.ReserveRequest(run_id=plain, llm_call=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "llm_call.candidate_models[1]" in str(raised.value.details())


async def test_nothing_fits_so_the_block_stands(stub: BudgetServiceAsyncStub) -> None:
    run_id = await create(stub, 1_000, policy=budget_pb2.RunPolicy(auto_downgrade=True))
    answer = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))
    assert (answer.decision, list(answer.alternatives)) == (budget_pb2.DECISION_BLOCK, [])
    assert answer.state.reserved_micros == 0


async def blocks(stub: BudgetServiceAsyncStub, run_id: str) -> tuple[int, list[str]]:
    """The run's blocked calls, and the reservations of its BLOCKED events."""
    shown = await stub.GetRun(pb.GetRunRequest(run_id=run_id))
    stream = stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=0))
    events: list[budget_pb2.BudgetEvent] = []
    while len(events) < shown.state.revision:
        message = await stream.read()
        assert isinstance(message, pb.WatchResponse)
        if message.HasField("event"):
            events.append(message.event)
    stream.cancel()
    blocked = [e.reservation_id for e in events if e.type == budget_pb2.EVENT_TYPE_BLOCKED]
    return shown.run.blocked_calls, blocked


async def test_a_downgrade_is_no_blocked_call_and_a_block_that_stands_counts_once(
    stub: BudgetServiceAsyncStub,
) -> None:
    policy = budget_pb2.RunPolicy(auto_downgrade=True)
    roomy = await create(stub, 100_000, policy=policy)
    request = pb.ReserveRequest(run_id=roomy, reservation_id="step", llm_call=flagship_call())
    for _ in range(2):  # and its replay
        assert (await stub.Reserve(request)).decision == budget_pb2.DECISION_DOWNGRADE
    assert await blocks(stub, roomy) == (0, [])

    tight = await create(stub, 1_000, policy=policy)
    request = pb.ReserveRequest(run_id=tight, reservation_id="step", llm_call=flagship_call())
    answer = await stub.Reserve(request)
    assert (answer.decision, answer.state.blocked) == (budget_pb2.DECISION_BLOCK, True)
    assert (await stub.Reserve(request)).replayed
    assert await blocks(stub, tight) == (1, ["step"])


async def test_a_decision_record_keeps_its_inputs(stub: BudgetServiceAsyncStub) -> None:
    team = new_id("team")
    run_id = await create(stub, 1_000_000, team_id=team, user_id="ann")
    answer = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, llm_call=flagship_call(), meter="llm:acme")
    )
    record = await stub.GetDecision(pb.GetDecisionRequest(decision_id=answer.decision_id))
    assert (record.run_id, record.reservation_id) == (run_id, answer.reservation_id)
    assert (record.decision, record.amount_micros, record.held_micros) == (
        budget_pb2.DECISION_ALLOW,
        FLAGSHIP,
        FLAGSHIP,
    )
    assert [(s.kind, s.id) for s in record.scopes] == [
        (budget_pb2.SCOPE_KIND_RUN, run_id),
        (budget_pb2.SCOPE_KIND_USER, "ann"),
        (budget_pb2.SCOPE_KIND_TEAM, team),
    ]
    assert (record.estimate.input_tokens, record.estimate.effective_max_output_tokens) == (
        10_000,
        1_000,
    )
    assert (record.meter, record.meter_units) == ("llm:acme", 1)
    assert record.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_HARD_GATE
    assert record.reservation_status == budget_pb2.RESERVATION_STATUS_HELD


@pytest.mark.parametrize(
    ("decision_id", "code", "reason"),
    [
        ("no-such-run/r1", grpc.StatusCode.NOT_FOUND, "DECISION_NOT_FOUND"),
        ("not a decision", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
)
async def test_unknown_and_malformed_decision_ids(
    stub: BudgetServiceAsyncStub, decision_id: str, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetDecision(pb.GetDecisionRequest(decision_id=decision_id))
    assert info.value.code() == code
    assert error_info(info.value)[0].reason == reason


@pytest.mark.parametrize("auto_downgrade", [False, True])
async def test_a_calibrated_run_blocked_by_its_exposure_lists_what_fits_its_ceiling(
    stub: BudgetServiceAsyncStub, auto_downgrade: bool
) -> None:
    # One flagship call observed (100 output tokens): the next ones hold
    # 150,000 + 7,500 = 157,500 each, but count their worst case, FLAGSHIP,
    # against the exposure ceiling (the limit: no allowance).
    policy = budget_pb2.RunPolicy(
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_CALIBRATED,
        calibration_min_samples=1,
        exposure_allowance_micros=0,
        auto_downgrade=auto_downgrade,
    )
    observed = 157_500
    limit = observed + 3 * FLAGSHIP + 40_000
    run_id = await create(stub, limit, policy=policy)
    warm = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))
    usage = pb.TokenUsage(input_tokens=10_000, output_tokens=100)
    await stub.Commit(
        pb.CommitRequest(run_id=run_id, reservation_id=warm.reservation_id, usage=usage)
    )
    for _ in range(3):
        held = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))
        assert (held.decision, held.amount_micros) == (budget_pb2.DECISION_ALLOW, observed)

    answer = await stub.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=flagship_call()))

    # 40,000 left under the exposure ceiling (money has 242,500): not mid.
    assert [a.model for a in answer.alternatives] == ["tiny", "vision"]
    if not auto_downgrade:
        assert (answer.decision, answer.blocking_dimension) == (
            budget_pb2.DECISION_BLOCK,
            budget_pb2.BUDGET_DIMENSION_EXPOSURE,
        )
        assert answer.state.remaining_micros == limit - 4 * observed == 242_500
        assert answer.state.exposure_micros == limit - 40_000
        return
    assert (answer.decision, answer.estimate.model, answer.amount_micros) == (
        budget_pb2.DECISION_DOWNGRADE,
        "vision",
        VISION,
    )
    assert answer.state.exposure_micros == answer.exposure_micros == limit - 40_000 + VISION
