"""Decisions in the Python client: the capabilities an `LlmCall` sends, the
downgrade settings of a `RunPolicy`, what the `reserve(...)` context managers
make of a DECISION_DOWNGRADE (held, settled under the id the server answered
with), the alternatives and decision id of a block, and `get_decision` with
its DECISION_NOT_FOUND error, over a scripted in-process gRPC server that
records every request (no runcap server needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from runcap import (
    AsyncRuncapClient,
    BudgetBlockedError,
    BudgetThrottledError,
    DecisionNotFoundError,
    LlmCall,
    RuncapClient,
    RuncapError,
    RunNotFoundError,
    RunPolicy,
    TokenUsage,
    from_status,
)
from runcap._shared import reserve_request, to_llm_call
from runcap.errors import REASON_TO_ERROR
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from tests.unit.fake_budget import CORE_METHODS, FAST, RecordingFake, error_status, serve

GPT_4O = LlmCall(
    "openai",
    "gpt-4o",
    input_tokens=1_200,
    max_output_tokens=500,
    needs_tools=True,
    needs_json_schema=True,
    min_context_tokens=32_000,
    modalities=("image", "audio"),
)

GPT_4O_PROTO = pb.LlmCall(
    provider="openai",
    model="gpt-4o",
    input_tokens=1_200,
    max_output_tokens=500,
    needs_tools=True,
    needs_json_schema=True,
    min_context_tokens=32_000,
    modalities=["image", "audio"],
)

MINI = pb.Alternative(
    provider="openai", model="gpt-4o-mini", amount_micros=900, effective_max_output_tokens=500
)
HAIKU = pb.Alternative(
    provider="anthropic", model="claude-haiku", amount_micros=1_400, effective_max_output_tokens=500
)

# The id a downgrade is held under: not the one the client asked with.
DOWNGRADE_SUFFIX = ":downgrade"


def downgrade(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """A run with auto_downgrade: gpt-4o does not fit, gpt-4o-mini is held."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_DOWNGRADE,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        reservation_id=request.reservation_id + DOWNGRADE_SUFFIX,
        amount_micros=MINI.amount_micros,
        state=budget_pb2.BudgetState(run_id=request.run_id, limit_micros=1_000),
        estimate=pb.LlmEstimate(
            provider=MINI.provider,
            model=MINI.model,
            input_tokens=request.llm_call.input_tokens,
            effective_max_output_tokens=MINI.effective_max_output_tokens,
            amount_micros=MINI.amount_micros,
        ),
        decision_id="dec-downgrade",
        alternatives=[MINI, HAIKU],
        requested_model=request.llm_call.model,
    )


def block_with_alternatives(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """gpt-4o does not fit the run; two cheaper models would."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        reservation_id=request.reservation_id,
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_SPEND,
        state=budget_pb2.BudgetState(
            run_id=request.run_id, limit_micros=10_000, remaining_micros=1_500
        ),
        estimate=pb.LlmEstimate(
            provider="openai", model="gpt-4o", input_tokens=1_200, amount_micros=6_400
        ),
        decision_id="dec-block",
        alternatives=[MINI, HAIKU],
    )


def throttle(request: pb.ReserveRequest) -> pb.ReserveResponse:
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_THROTTLE,
        reason=budget_pb2.DECISION_REASON_RATE_LIMITED,
        reservation_id=request.reservation_id,
        decision_id="dec-throttle",
    )


def decision_not_found(decision_id: str, *, metadata: bool = True) -> status_pb2.Status:
    """The status the server sends for GetDecision of an unknown decision."""
    info = error_details_pb2.ErrorInfo(
        reason="DECISION_NOT_FOUND",
        domain="runcap.dev",
        metadata={"decision_id": decision_id} if metadata else {},
    )
    resource = error_details_pb2.ResourceInfo(
        resource_type="runcap.v1.Decision",
        resource_name=decision_id,
        description=f"no decision {decision_id!r}",
    )
    return error_status(code_pb2.NOT_FOUND, f"no decision {decision_id!r}", info, resource)


class FakeDecisions(RecordingFake):
    """Records every request. Reserve answers with the queued answers first,
    then an allow; GetDecision fails with UNAVAILABLE `unavailable` times
    first, then answers the decisions it knows, and DECISION_NOT_FOUND for any
    other id."""

    methods = (*CORE_METHODS, "GetDecision")

    def __init__(self) -> None:
        super().__init__()
        self.decisions: dict[str, pb.GetDecisionResponse] = {}

    def allow(
        self, request: pb.ReserveRequest, state: budget_pb2.BudgetState
    ) -> pb.ReserveResponse:
        response = super().allow(request, state)
        response.decision_id = "dec-allow"
        if request.HasField("llm_call"):
            call = request.llm_call
            response.amount_micros = 6_400
            response.estimate.CopyFrom(
                pb.LlmEstimate(provider=call.provider, model=call.model, amount_micros=6_400)
            )
        return response

    def other(self, method: str, request: Any, context: grpc.ServicerContext) -> Message:
        known = self.decisions.get(request.decision_id)
        if known is None:
            status = decision_not_found(request.decision_id)
            context.abort_with_status(rpc_status.to_status(status))
        return known


@pytest.fixture
def fake() -> Iterator[tuple[FakeDecisions, str]]:
    decisions = FakeDecisions()
    with serve(decisions.handler, decisions.methods) as target:
        yield decisions, target


# --- request building -------------------------------------------------------------------


def test_an_llm_call_sends_what_it_needs_from_a_model() -> None:
    assert GPT_4O.to_proto() == GPT_4O_PROTO
    assert GPT_4O.to_proto().HasField("min_context_tokens")
    request = reserve_request("run-1", to_llm_call(GPT_4O), "r", None)
    assert request.llm_call == GPT_4O_PROTO


def test_an_llm_call_needs_nothing_special_by_default() -> None:
    message = LlmCall("openai", "gpt-4o", input_tokens=1).to_proto()
    assert message == pb.LlmCall(provider="openai", model="gpt-4o", input_tokens=1)
    assert not message.HasField("min_context_tokens")
    assert (message.needs_tools, message.needs_json_schema) == (False, False)
    assert list(message.modalities) == []


def test_modalities_and_downgrade_models_must_be_sequences_of_strings() -> None:
    one_string: Any = "image"
    with pytest.raises(TypeError, match="modalities must be a sequence of strings"):
        LlmCall("openai", "gpt-4o", input_tokens=1, modalities=one_string).to_proto()
    with pytest.raises(TypeError, match="downgrade_models must be a sequence of strings"):
        RunPolicy(downgrade_models=one_string).to_proto()


def test_a_run_policy_sends_its_downgrade_settings() -> None:
    policy = RunPolicy(auto_downgrade=True, downgrade_models=["openai/gpt-4o-mini"])
    assert policy.to_proto() == budget_pb2.RunPolicy(
        auto_downgrade=True, downgrade_models=["openai/gpt-4o-mini"]
    )
    assert RunPolicy().to_proto() == budget_pb2.RunPolicy()


# --- through a channel ------------------------------------------------------------------


def test_create_run_and_reserve_send_the_new_fields(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    budget = fake[0]
    policy = RunPolicy(auto_downgrade=True, downgrade_models=("openai/gpt-4o-mini",))
    created = client.create_run("run-1", limit_micros=5, policy=policy)
    assert created.run.policy.auto_downgrade
    (create,) = budget.calls["CreateRun"]
    assert create.policy == budget_pb2.RunPolicy(
        auto_downgrade=True, downgrade_models=["openai/gpt-4o-mini"]
    )
    client.reserve_once("run-1", llm_call=GPT_4O)
    with client.reserve("run-1", llm_call=GPT_4O):
        pass
    once, held = budget.calls["Reserve"]
    assert once.llm_call == GPT_4O_PROTO
    assert held.llm_call == GPT_4O_PROTO


def test_a_downgrade_is_held_and_settled_under_the_answered_id(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers.append(downgrade)
    with client.reserve("run-1", llm_call=GPT_4O) as hold:
        assert hold.downgraded
        assert not hold.warning
        assert not hold.failed_open
        assert (hold.provider, hold.model) == ("openai", "gpt-4o-mini")
        assert hold.requested_model == "gpt-4o"
        assert hold.amount_micros == 900
        assert hold.decision_id == "dec-downgrade"
        assert hold.alternatives == [MINI, HAIKU]
        hold.set_usage(TokenUsage(input_tokens=1_200, output_tokens=200))
    (reserve,) = budget.calls["Reserve"]
    (commit,) = budget.calls["Commit"]
    assert commit.reservation_id == reserve.reservation_id + DOWNGRADE_SUFFIX
    assert hold.reservation_id == commit.reservation_id
    assert commit.usage == pb.TokenUsage(input_tokens=1_200, output_tokens=200)
    assert hold.commit_response is not None


def test_a_failed_downgrade_is_refunded_under_the_answered_id(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers.append(downgrade)
    with pytest.raises(KeyError), client.reserve("run-1", llm_call=GPT_4O) as hold:
        raise KeyError("the call failed")
    (reserve,) = budget.calls["Reserve"]
    (refund,) = budget.calls["Refund"]
    assert refund.reservation_id == reserve.reservation_id + DOWNGRADE_SUFFIX
    assert refund.reservation_id == hold.reservation_id
    assert budget.calls["Commit"] == []


def test_a_plain_allow_is_not_downgraded(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    with client.reserve("run-1", llm_call=GPT_4O) as llm:
        assert not llm.downgraded
        assert (llm.provider, llm.model, llm.requested_model) == ("openai", "gpt-4o", "gpt-4o")
        assert llm.decision_id == "dec-allow"
        assert llm.alternatives == []
    with client.reserve("run-1", 40) as amount:
        assert not amount.downgraded
        assert (amount.provider, amount.model, amount.requested_model) == (None, None, None)
    reserves = fake[0].calls["Reserve"]
    commits = fake[0].calls["Commit"]
    assert [c.reservation_id for c in commits] == [r.reservation_id for r in reserves]


def test_a_hold_without_an_estimate_calls_the_model_asked_for(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    def fail_open(request: pb.ReserveRequest) -> pb.ReserveResponse:
        return pb.ReserveResponse(
            decision=budget_pb2.DECISION_WARN,
            reason=budget_pb2.DECISION_REASON_BACKEND_UNAVAILABLE,
            reservation_id=request.reservation_id,
        )

    fake[0].answers.append(fail_open)
    with client.reserve("run-1", llm_call=GPT_4O) as hold:
        assert hold.failed_open
        assert (hold.provider, hold.model, hold.decision_id) == ("openai", "gpt-4o", "")


def test_a_block_carries_its_alternatives_and_decision_id(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    fake[0].answers.append(block_with_alternatives)
    with (
        pytest.raises(BudgetBlockedError) as caught,
        client.reserve("run-1", llm_call=GPT_4O),
    ):
        pytest.fail("a blocked hold must not run its block")
    error = caught.value
    assert type(error) is BudgetBlockedError
    assert error.alternatives == [MINI, HAIKU]
    assert error.decision_id == "dec-block"
    message = str(error)
    assert "1500 of 10000 micros remain" in message
    assert "2 alternative model(s) fit, the cheapest openai/gpt-4o-mini at 900 micros" in message
    assert fake[0].calls["Commit"] == fake[0].calls["Refund"] == []


def test_a_block_without_alternatives_says_nothing_of_them() -> None:
    response = block_with_alternatives(pb.ReserveRequest(run_id="run-1", reservation_id="r"))
    del response.alternatives[:]
    error = BudgetBlockedError("run-1", response)
    assert error.alternatives == []
    assert "alternative" not in str(error)
    throttled = BudgetThrottledError("run-1", throttle(pb.ReserveRequest(reservation_id="r")))
    assert (throttled.alternatives, throttled.decision_id) == ([], "dec-throttle")


async def test_async_downgrade_block_and_get_decision(
    fake: tuple[FakeDecisions, str], aclient: AsyncRuncapClient
) -> None:
    budget = fake[0]
    budget.answers += [downgrade, block_with_alternatives]
    async with aclient.reserve("run-1", llm_call=GPT_4O) as hold:
        assert hold.downgraded
        assert hold.model == "gpt-4o-mini"
        hold.set_actual(850)
    with pytest.raises(BudgetBlockedError) as caught:
        async with aclient.reserve("run-1", llm_call=GPT_4O):
            pytest.fail("a blocked hold must not run its block")
    assert caught.value.alternatives == [MINI, HAIKU]
    downgraded, _ = budget.calls["Reserve"]
    assert downgraded.llm_call == GPT_4O_PROTO
    (commit,) = budget.calls["Commit"]
    assert commit.reservation_id == downgraded.reservation_id + DOWNGRADE_SUFFIX
    assert commit.actual_micros == 850

    budget.decisions["dec-1"] = pb.GetDecisionResponse(decision_id="dec-1", run_id="run-1")
    budget.unavailable = 2
    found = await aclient.get_decision("dec-1")
    assert (found.decision_id, found.run_id) == ("dec-1", "run-1")
    assert budget.calls["GetDecision"] == [pb.GetDecisionRequest(decision_id="dec-1")] * 3
    with pytest.raises(DecisionNotFoundError) as missing:
        await aclient.get_decision("dec-gone")
    assert missing.value.decision_id == "dec-gone"
    assert len(budget.calls["GetDecision"]) == 4  # final: not retried


# --- GetDecision ------------------------------------------------------------------------


def test_get_decision_returns_the_decision_and_retries_unavailable(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    budget = fake[0]
    decision = pb.GetDecisionResponse(
        decision_id="dec-1",
        run_id="run-1",
        reservation_id="res-1",
        decision=budget_pb2.DECISION_DOWNGRADE,
        amount_micros=6_400,
        held_micros=900,
        estimate=pb.LlmEstimate(provider="openai", model="gpt-4o-mini"),
        reservation_status=budget_pb2.RESERVATION_STATUS_COMMITTED,
        actual_micros=850,
    )
    budget.decisions["dec-1"] = decision
    budget.unavailable = FAST.max_attempts - 1
    assert client.get_decision("dec-1") == decision
    assert budget.calls["GetDecision"] == [pb.GetDecisionRequest(decision_id="dec-1")] * 4


def test_an_unknown_decision_is_decision_not_found(
    fake: tuple[FakeDecisions, str], client: RuncapClient
) -> None:
    with pytest.raises(DecisionNotFoundError) as caught:
        client.get_decision("dec-gone")
    error = caught.value
    assert isinstance(error, RuncapError)
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "DECISION_NOT_FOUND")
    assert error.decision_id == "dec-gone"
    assert error.resource_info is not None
    assert error.resource_info.resource_type == "runcap.v1.Decision"
    assert len(fake[0].calls["GetDecision"]) == 1  # final: not retried


def test_decision_not_found_is_one_row_of_the_table() -> None:
    assert REASON_TO_ERROR["DECISION_NOT_FOUND"] is DecisionNotFoundError
    classes = [kind for kind in REASON_TO_ERROR.values() if kind is DecisionNotFoundError]
    assert classes == [DecisionNotFoundError]
    error = from_status(decision_not_found("dec-7"))
    assert type(error) is DecisionNotFoundError
    assert not isinstance(error, RunNotFoundError)
    assert error.decision_id == "dec-7"
    # Without the metadata, the ResourceInfo names it.
    bare = from_status(decision_not_found("dec-8", metadata=False))
    assert isinstance(bare, DecisionNotFoundError)
    assert bare.decision_id == "dec-8"
