"""Priced LLM calls in the Python client: the requests it builds for a Reserve
of an `llm_call` and a Commit of token `usage`, sent to a scripted in-process
gRPC server that records them and prices them from a two-model table (no
runcap server needed), the hold's `set_usage`, and a `BudgetBlockedError` for
an unknown price."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from runcap import (
    AsyncRuncapClient,
    BudgetBlockedError,
    Hold,
    LlmCall,
    RuncapClient,
    RuncapError,
    TokenUsage,
)
from runcap._shared import actual_of, commit_request, estimate_of, reserve_request
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from tests.unit.fake_budget import serve

VERSION = "test-prices-1"
# (input, output) micro-USD per token; a model missing here is an unknown price.
PRICES = {("openai", "gpt-4o"): (2, 8)}
DEFAULT_MAX_OUTPUT = 1_000
GPT_4O = LlmCall("openai", "gpt-4o", input_tokens=1_200, max_output_tokens=500)
USAGE = TokenUsage(input_tokens=1_100, output_tokens=310, cache_read_tokens=100)


class FakePricedBudget:
    """Records every request; prices LLM calls like the server does (input
    plus effective max output), blocks unknown models, and commits usage at
    the reservation's rates."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = defaultdict(list)
        self.limit = 1_000_000
        self.lock = threading.Lock()

    def handler(self, method: str) -> Callable[[Any, grpc.ServicerContext], Message]:
        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            with self.lock:
                self.calls[method].append(request)
            state = budget_pb2.BudgetState(
                run_id=request.run_id, limit_micros=self.limit, remaining_micros=self.limit
            )
            if method == "Reserve":
                return self.reserve(request, state)
            if method == "Commit":
                if request.WhichOneof("actual") == "usage":
                    rate_in, rate_out = PRICES[("openai", "gpt-4o")]
                    u = request.usage
                    actual = rate_in * u.input_tokens + rate_out * u.output_tokens
                else:
                    actual = request.actual_micros
                return pb.CommitResponse(state=state, actual_micros=actual)
            return pb.RefundResponse(state=state)

        return handle

    def reserve(self, request: pb.ReserveRequest, state: budget_pb2.BudgetState) -> Message:
        response = pb.ReserveResponse(
            decision=budget_pb2.DECISION_ALLOW,
            reason=budget_pb2.DECISION_REASON_WITHIN_BUDGET,
            reservation_id=request.reservation_id,
            state=state,
        )
        if request.WhichOneof("estimate") == "amount_micros":
            response.amount_micros = request.amount_micros
            return response
        call = request.llm_call
        out = call.max_output_tokens if call.HasField("max_output_tokens") else DEFAULT_MAX_OUTPUT
        rates = PRICES.get((call.provider, call.model))
        amount = 0 if rates is None else rates[0] * call.input_tokens + rates[1] * out
        response.estimate.CopyFrom(
            pb.LlmEstimate(
                provider=call.provider,
                model=call.model,
                input_tokens=call.input_tokens,
                effective_max_output_tokens=out,
                amount_micros=amount,
                price_table_version=VERSION,
            )
        )
        if rates is None:
            response.decision = budget_pb2.DECISION_BLOCK
            response.reason = budget_pb2.DECISION_REASON_UNKNOWN_PRICE
        elif amount > self.limit:
            response.decision = budget_pb2.DECISION_BLOCK
            response.reason = budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET
        else:
            response.amount_micros = amount
        return response


METHODS = ["Reserve", "Commit", "Refund"]


@pytest.fixture
def fake() -> Iterator[tuple[FakePricedBudget, str]]:
    budget = FakePricedBudget()
    with serve(budget.handler, METHODS) as target:
        yield budget, target


# --- request building -------------------------------------------------------------------


def test_reserve_request_carries_an_amount_or_an_llm_call() -> None:
    amount = reserve_request("run-1", estimate_of(40, None), "r", None)
    assert (amount.WhichOneof("estimate"), amount.amount_micros) == ("amount_micros", 40)
    llm = reserve_request("run-1", estimate_of(None, GPT_4O), "r", 30)
    assert llm == pb.ReserveRequest(
        run_id="run-1",
        reservation_id="r",
        llm_call=pb.LlmCall(
            provider="openai", model="gpt-4o", input_tokens=1_200, max_output_tokens=500
        ),
        ttl=llm.ttl,
    )
    assert llm.ttl.ToMilliseconds() == 30_000


def test_an_llm_call_without_max_output_leaves_it_unset() -> None:
    request = reserve_request("run-1", estimate_of(None, LlmCall("openai", "gpt-4o", 0)), "r", None)
    assert request.WhichOneof("estimate") == "llm_call"
    assert not request.llm_call.HasField("max_output_tokens")
    assert request.llm_call.input_tokens == 0


def test_the_llm_call_message_is_accepted_and_copied() -> None:
    message = pb.LlmCall(provider="anthropic", model="claude-x", input_tokens=7)
    estimate = estimate_of(None, message)
    message.model = "changed"
    assert isinstance(estimate, pb.LlmCall)
    assert estimate.model == "claude-x"


def test_commit_request_carries_actual_micros_or_usage() -> None:
    micros = commit_request("run-1", "r", actual_of(0, None))
    assert (micros.WhichOneof("actual"), micros.actual_micros) == ("actual_micros", 0)
    usage = commit_request("run-1", "r", actual_of(None, USAGE))
    assert usage == pb.CommitRequest(
        run_id="run-1",
        reservation_id="r",
        usage=pb.TokenUsage(input_tokens=1_100, output_tokens=310, cache_read_tokens=100),
    )
    message = pb.TokenUsage(output_tokens=3, reasoning_tokens=9)
    assert commit_request("run-1", "r", actual_of(None, message)).usage == message


def test_exactly_one_estimate_and_one_actual() -> None:
    with pytest.raises(ValueError, match="exactly one of amount_micros and llm_call"):
        estimate_of(None, None)
    with pytest.raises(ValueError, match="exactly one of amount_micros and llm_call"):
        estimate_of(40, GPT_4O)
    with pytest.raises(ValueError, match="exactly one of actual_micros and usage"):
        actual_of(None, None)
    with pytest.raises(ValueError, match="exactly one of actual_micros and usage"):
        actual_of(40, USAGE)


def test_wrong_types_are_rejected_on_the_client() -> None:
    not_a_call: Any = {"provider": "openai"}
    not_usage: Any = 40
    with pytest.raises(TypeError, match="llm_call must be"):
        estimate_of(None, not_a_call)
    with pytest.raises(TypeError, match="usage must be"):
        actual_of(None, not_usage)


# --- through a channel ------------------------------------------------------------------


def test_reserve_once_and_commit_an_llm_call(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    response = client.reserve_once("run-1", llm_call=GPT_4O, reservation_id="res-1")
    assert response.decision == budget_pb2.DECISION_ALLOW
    assert response.amount_micros == 2 * 1_200 + 8 * 500
    assert (response.estimate.effective_max_output_tokens, response.estimate.model) == (
        500,
        "gpt-4o",
    )
    committed = client.commit("run-1", "res-1", usage=USAGE)
    assert committed.actual_micros == 2 * 1_100 + 8 * 310
    (reserve,) = budget.calls["Reserve"]
    assert reserve.llm_call == GPT_4O.to_proto()
    (commit,) = budget.calls["Commit"]
    assert commit.usage == USAGE.to_proto()


def test_amounts_still_work_positionally(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    assert client.reserve_once("run-1", 40, reservation_id="res-1").amount_micros == 40
    assert client.commit("run-1", "res-1", 30).actual_micros == 30
    with client.reserve("run-1", 40) as hold:
        assert (hold.requested_micros, hold.llm_call, hold.estimate) == (40, None, None)
    assert [c.WhichOneof("estimate") for c in fake[0].calls["Reserve"]] == ["amount_micros"] * 2
    assert [c.WhichOneof("actual") for c in fake[0].calls["Commit"]] == ["actual_micros"] * 2


def test_bad_arguments_fail_before_any_call(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.reserve_once("run-1")
    with pytest.raises(ValueError, match="exactly one"):
        client.reserve_once("run-1", 40, llm_call=GPT_4O)
    with pytest.raises(ValueError, match="exactly one"):
        client.reserve("run-1", 40, llm_call=GPT_4O)
    with pytest.raises(ValueError, match="exactly one"):
        client.commit("run-1", "res-1")
    with pytest.raises(ValueError, match="exactly one"):
        client.commit("run-1", "res-1", 40, usage=USAGE)
    assert fake[0].calls == {}


def test_hold_of_an_llm_call_commits_its_usage(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    with client.reserve("run-1", llm_call=GPT_4O) as hold:
        assert hold.llm_call == GPT_4O.to_proto()
        assert hold.requested_micros is None
        assert hold.estimate is not None
        assert hold.estimate.price_table_version == VERSION
        assert hold.amount_micros == hold.estimate.amount_micros == 6_400
        hold.set_usage(USAGE)
        assert (hold.usage, hold.actual_micros) == (USAGE.to_proto(), None)
    (commit,) = budget.calls["Commit"]
    assert commit == pb.CommitRequest(
        run_id="run-1", reservation_id=hold.reservation_id, usage=USAGE.to_proto()
    )
    assert hold.commit_response is not None
    assert hold.commit_response.actual_micros == 2 * 1_100 + 8 * 310


def test_set_usage_and_set_actual_replace_each_other(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    with client.reserve("run-1", llm_call=GPT_4O) as hold:
        hold.set_usage(USAGE)
        hold.set_actual(123)
        assert (hold.usage, hold.actual_micros) == (None, 123)
    with client.reserve("run-1", llm_call=GPT_4O) as hold:
        hold.set_actual(123)
        hold.release()
        hold.set_usage(pb.TokenUsage(output_tokens=1))
        assert (hold.usage, hold.actual_micros) == (pb.TokenUsage(output_tokens=1), None)
    first, second = fake[0].calls["Commit"]
    assert (first.WhichOneof("actual"), first.actual_micros) == ("actual_micros", 123)
    assert second.usage == pb.TokenUsage(output_tokens=1)
    assert fake[0].calls["Refund"] == []


def test_a_failing_body_commits_the_usage_it_set(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    def call_then_fail(hold: Hold) -> None:
        hold.set_usage(USAGE)
        raise KeyError("after the call")

    with pytest.raises(KeyError), client.reserve("run-1", llm_call=GPT_4O) as hold:
        call_then_fail(hold)
    (commit,) = fake[0].calls["Commit"]
    assert commit.usage == USAGE.to_proto()
    with pytest.raises(KeyError), client.reserve("run-1", llm_call=GPT_4O):
        raise KeyError("before the call")
    assert len(fake[0].calls["Refund"]) == 1


def test_hold_of_an_llm_call_commits_the_whole_estimate_by_default(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    with client.reserve("run-1", llm_call=GPT_4O):
        pass
    (commit,) = fake[0].calls["Commit"]
    assert (commit.WhichOneof("actual"), commit.actual_micros) == ("actual_micros", 6_400)


async def test_async_hold_of_an_llm_call_commits_its_usage(
    fake: tuple[FakePricedBudget, str], aclient: AsyncRuncapClient
) -> None:
    budget = fake[0]
    async with aclient.reserve("run-1", llm_call=GPT_4O, reservation_id="res-a") as hold:
        assert hold.estimate is not None
        assert hold.estimate.effective_max_output_tokens == 500
        hold.set_usage(USAGE)
    (reserve,) = budget.calls["Reserve"]
    assert (reserve.reservation_id, reserve.llm_call) == ("res-a", GPT_4O.to_proto())
    (commit,) = budget.calls["Commit"]
    assert (commit.reservation_id, commit.usage) == ("res-a", USAGE.to_proto())

    response = await aclient.reserve_once("run-1", llm_call=GPT_4O, reservation_id="res-b")
    assert response.estimate.amount_micros == 6_400
    committed = await aclient.commit("run-1", "res-b", usage=pb.TokenUsage(input_tokens=10))
    assert committed.actual_micros == 20
    with pytest.raises(ValueError, match="exactly one"):
        await aclient.commit("run-1", "res-b", 1, usage=USAGE)
    with pytest.raises(ValueError, match="exactly one"):
        aclient.reserve("run-1")


# --- blocks -----------------------------------------------------------------------------


def test_unknown_price_blocks_with_a_clear_error(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    call = LlmCall("openai", "gpt-9-turbo", input_tokens=10)
    with pytest.raises(BudgetBlockedError) as blocked, client.reserve("run-1", llm_call=call):
        pytest.fail("a blocked hold must not run its block")
    error = blocked.value
    assert not isinstance(error, RuncapError)
    assert error.reason == budget_pb2.DECISION_REASON_UNKNOWN_PRICE
    assert error.unknown_price
    assert error.estimate is not None
    assert (error.estimate.provider, error.estimate.model) == ("openai", "gpt-9-turbo")
    assert error.estimate.amount_micros == 0
    message = str(error)
    assert "DECISION_REASON_UNKNOWN_PRICE" in message
    assert "unknown price" in message
    assert "no price for model 'gpt-9-turbo' of provider 'openai'" in message
    assert f"price table {VERSION!r}" in message
    assert "micros remain" not in message
    assert fake[0].calls["Commit"] == fake[0].calls["Refund"] == []


async def test_async_unknown_price_blocks(
    fake: tuple[FakePricedBudget, str], aclient: AsyncRuncapClient
) -> None:
    entered = False
    with pytest.raises(BudgetBlockedError) as blocked:
        async with aclient.reserve("run-1", llm_call=LlmCall("acme", "m", 1)):
            entered = True
    assert not entered
    assert blocked.value.unknown_price


def test_a_budget_block_of_an_llm_call_names_its_estimate(
    fake: tuple[FakePricedBudget, str], client: RuncapClient
) -> None:
    fake[0].limit = 1_000
    with pytest.raises(BudgetBlockedError) as blocked, client.reserve("run-1", llm_call=GPT_4O):
        pytest.fail("a blocked hold must not run its block")
    error = blocked.value
    assert not error.unknown_price
    assert error.estimate is not None
    assert error.estimate.amount_micros == 6_400
    assert "1000 of 1000 micros remain" in str(error)
    assert "the openai/gpt-4o call was estimated at 6400 micros" in str(error)


def test_an_unknown_price_without_an_estimate_still_says_so() -> None:
    response = pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_UNKNOWN_PRICE,
        reservation_id="r",
    )
    error = BudgetBlockedError("run-1", response)
    assert (error.unknown_price, error.estimate) == (True, None)
    assert "unknown price: the server has no price for the model" in str(error)
    plain = pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
    )
    assert BudgetBlockedError("run-1", plain).estimate is None
    assert "estimated" not in str(BudgetBlockedError("run-1", plain))
