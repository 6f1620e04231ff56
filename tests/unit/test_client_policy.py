"""Run policies in the Python client: the `policy` CreateRun sends, the call
meter of a Reserve, and what the `reserve(...)` context managers make of the
WARN and THROTTLE decisions and of a block on a token or meter ceiling, over
a scripted in-process gRPC server that records every request (no runcap
server needed)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2

from runcap import (
    AsyncRuncapClient,
    BudgetBlockedError,
    BudgetThrottledError,
    RateLimit,
    RuncapClient,
    RuncapError,
    RunPolicy,
    Thresholds,
)
from runcap._shared import create_run_request, estimate_of, reserve_request
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from tests.unit.fake_budget import RecordingFake, serve


def seconds(value: float) -> duration_pb2.Duration:
    result = duration_pb2.Duration()
    result.FromNanoseconds(round(value * 1_000_000_000))
    return result


def warn(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """An advisory run's answer to a call over its meter's ceiling: held anyway."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_WARN,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        reservation_id=request.reservation_id,
        amount_micros=request.amount_micros,
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_METER,
        blocking_meter=request.meter,
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_ADVISORY,
        state=budget_pb2.BudgetState(run_id=request.run_id, limit_micros=1000),
    )


def fail_open(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """An advisory run's answer while the ledger's storage is down: nothing held."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_WARN,
        reason=budget_pb2.DECISION_REASON_BACKEND_UNAVAILABLE,
        reservation_id=request.reservation_id,
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_ADVISORY,
    )


def throttle(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """A rate-limited call: nothing held, come back in 1.5 s."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_THROTTLE,
        reason=budget_pb2.DECISION_REASON_RATE_LIMITED,
        reservation_id=request.reservation_id,
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_RATE,
        retry_after=seconds(1.5),
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_HARD_GATE,
        state=budget_pb2.BudgetState(run_id=request.run_id, limit_micros=1000),
    )


def block_on_meter(request: pb.ReserveRequest) -> pb.ReserveResponse:
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        reservation_id=request.reservation_id,
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_METER,
        blocking_meter=request.meter,
        state=budget_pb2.BudgetState(run_id=request.run_id, limit_micros=1000),
    )


@pytest.fixture
def fake() -> Iterator[tuple[RecordingFake, str]]:
    """Records every request; CreateRun echoes the policy into the run, and
    Reserve answers with the queued answers first, then an allow."""
    policies = RecordingFake()
    with serve(policies.handler, policies.methods) as target:
        yield policies, target


FULL = RunPolicy(
    enforcement_mode="soft_gate",
    soft_gate_margin_percent=10,
    thresholds=Thresholds(info_percent=50, warn_percent=0, throttle_percent=90),
    throttle_base_delay=0.25,
    throttle_max_delay=timedelta(seconds=30),
    max_tokens=100_000,
    meter_limits={"tool:serp_api": 50, "tool:browse": 5},
    rate_limit=RateLimit(max_calls=30, window=60),
    max_in_flight=4,
    max_depth=2,
    max_children=0,
)

FULL_PROTO = budget_pb2.RunPolicy(
    enforcement_mode=budget_pb2.ENFORCEMENT_MODE_SOFT_GATE,
    soft_gate_margin_percent=10,
    thresholds=budget_pb2.Thresholds(info_percent=50, warn_percent=0, throttle_percent=90),
    throttle_base_delay=seconds(0.25),
    throttle_max_delay=seconds(30),
    max_tokens=100_000,
    meter_limits={"tool:serp_api": 50, "tool:browse": 5},
    rate_limit=budget_pb2.RateLimit(max_calls=30, window=seconds(60)),
    max_in_flight=4,
    max_depth=2,
    max_children=0,
)


# --- request building -------------------------------------------------------------------


def test_run_policy_to_proto_sets_every_field() -> None:
    message = FULL.to_proto()
    assert message == FULL_PROTO
    # A cap of zero is a cap, not "unset".
    assert message.HasField("max_children")
    assert message.max_children == 0


def test_an_empty_policy_leaves_everything_to_the_server() -> None:
    message = RunPolicy().to_proto()
    assert message == budget_pb2.RunPolicy()
    for name in (
        "thresholds",
        "throttle_base_delay",
        "throttle_max_delay",
        "max_tokens",
        "rate_limit",
        "max_in_flight",
        "max_depth",
        "max_children",
    ):
        assert not message.HasField(name), name
    assert message.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_UNSPECIFIED


def test_thresholds_default_to_the_servers_bands() -> None:
    assert Thresholds().to_proto() == budget_pb2.Thresholds(
        info_percent=60, warn_percent=80, throttle_percent=95
    )
    assert Thresholds(throttle_percent=90).to_proto().warn_percent == 80


@pytest.mark.parametrize(
    ("mode", "value"),
    [
        ("hard_gate", budget_pb2.ENFORCEMENT_MODE_HARD_GATE),
        ("soft_gate", budget_pb2.ENFORCEMENT_MODE_SOFT_GATE),
        ("advisory", budget_pb2.ENFORCEMENT_MODE_ADVISORY),
        ("actuals_only", budget_pb2.ENFORCEMENT_MODE_ACTUALS_ONLY),
        (budget_pb2.ENFORCEMENT_MODE_ADVISORY, budget_pb2.ENFORCEMENT_MODE_ADVISORY),
    ],
)
def test_enforcement_modes_by_name_or_value(
    mode: Any, value: budget_pb2.EnforcementMode.ValueType
) -> None:
    assert RunPolicy(enforcement_mode=mode).to_proto().enforcement_mode == value


def test_create_run_request_carries_the_policy() -> None:
    request = create_run_request("run-1", 5, None, None, policy=FULL)
    assert request.policy == FULL_PROTO
    assert not create_run_request("run-1", 5, None, None).HasField("policy")
    # The message is accepted too, and copied.
    message = budget_pb2.RunPolicy(max_in_flight=2)
    request = create_run_request("run-1", 5, None, None, policy=message)
    message.max_in_flight = 9
    assert request.policy == budget_pb2.RunPolicy(max_in_flight=2)


def test_bad_policies_are_rejected_on_the_client() -> None:
    bad_mode: Any = "strict"
    not_a_policy: Any = {"max_in_flight": 2}
    with pytest.raises(ValueError, match="unknown enforcement mode 'strict'"):
        create_run_request("run-1", 5, None, None, policy=RunPolicy(enforcement_mode=bad_mode))
    with pytest.raises(TypeError, match="policy must be"):
        create_run_request("run-1", 5, None, None, policy=not_a_policy)


def test_reserve_request_carries_the_meter() -> None:
    request = reserve_request("run-1", estimate_of(40, None), "r", None, "tool:serp_api", 3)
    assert (request.meter, request.meter_units) == ("tool:serp_api", 3)
    assert request.HasField("meter_units")
    default_units = reserve_request("run-1", estimate_of(40, None), "r", None, "tool:serp_api")
    assert default_units.meter == "tool:serp_api"
    assert not default_units.HasField("meter_units")
    plain = reserve_request("run-1", estimate_of(40, None), "r", None)
    assert (plain.meter, plain.HasField("meter_units")) == ("", False)
    with pytest.raises(ValueError, match="meter_units needs a meter"):
        reserve_request("run-1", estimate_of(40, None), "r", None, "", 2)


# --- through a channel ------------------------------------------------------------------


def test_create_run_sends_the_policy(fake: tuple[RecordingFake, str], client: RuncapClient) -> None:
    created = client.create_run("run-1", limit_micros=5, policy=FULL)
    assert created.run.policy == FULL_PROTO
    client.create_run("run-2", limit_micros=5, policy=budget_pb2.RunPolicy(max_depth=1))
    client.create_run("run-3", limit_micros=5)
    first, second, third = fake[0].calls["CreateRun"]
    assert first == pb.CreateRunRequest(run_id="run-1", limit_micros=5, policy=FULL_PROTO)
    assert second.policy == budget_pb2.RunPolicy(max_depth=1)
    assert not third.HasField("policy")


def test_reserve_sends_the_meter(fake: tuple[RecordingFake, str], client: RuncapClient) -> None:
    client.reserve_once("run-1", 40, meter="tool:serp_api", meter_units=2)
    with client.reserve("run-1", 40, meter="tool:browse") as hold:
        assert (hold.meter, hold.meter_units) == ("tool:browse", None)
    with pytest.raises(ValueError, match="meter_units needs a meter"):
        client.reserve("run-1", 40, meter_units=2)
    with pytest.raises(ValueError, match="meter_units needs a meter"):
        client.reserve_once("run-1", 40, meter_units=2)
    once, held = fake[0].calls["Reserve"]  # nothing was sent for the bad ones
    assert (once.meter, once.meter_units) == ("tool:serp_api", 2)
    assert once.HasField("meter_units")
    assert (held.meter, held.HasField("meter_units")) == ("tool:browse", False)
    assert held.reservation_id == hold.reservation_id


def test_a_warning_is_held_and_says_so(
    fake: tuple[RecordingFake, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers.append(warn)
    with client.reserve("run-1", 40, meter="tool:serp_api") as hold:
        assert hold.warning
        assert hold.reason == budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET
        assert hold.dimension == budget_pb2.BUDGET_DIMENSION_METER
        assert hold.response.blocking_meter == "tool:serp_api"
        assert hold.amount_micros == 40
        hold.set_actual(30)
    (commit,) = budget.calls["Commit"]
    assert (commit.reservation_id, commit.actual_micros) == (hold.reservation_id, 30)
    # A plain allow is no warning.
    with client.reserve("run-1", 40) as plain:
        assert not plain.warning
        assert plain.reason == budget_pb2.DECISION_REASON_WITHIN_BUDGET
        assert plain.dimension == budget_pb2.BUDGET_DIMENSION_UNSPECIFIED


def test_a_failed_open_warning_runs_the_block_and_settles_nothing(
    fake: tuple[RecordingFake, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers += [fail_open, fail_open]
    with client.reserve("run-1", 40) as hold:
        assert hold.warning
        assert hold.failed_open
        hold.set_actual(30)
    assert (hold.commit_response, hold.refund_response) == (None, None)
    with pytest.raises(KeyError), client.reserve("run-1", 40) as failed:
        raise KeyError("the call failed")
    assert failed.failed_open
    assert budget.calls["Commit"] == budget.calls["Refund"] == []
    # An ordinary warning is held, so it is settled.
    budget.answers.append(warn)
    with client.reserve("run-1", 40, meter="m") as held:
        assert held.warning
        assert not held.failed_open
    assert len(budget.calls["Commit"]) == 1


def test_a_throttle_raises_a_typed_error_with_retry_after(
    fake: tuple[RecordingFake, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers.append(throttle)
    with pytest.raises(BudgetThrottledError) as caught, client.reserve("run-1", 40):
        pytest.fail("a throttled hold must not run its block")
    error = caught.value
    assert isinstance(error, BudgetBlockedError)
    assert not isinstance(error, RuncapError)
    assert error.retry_after == 1.5
    assert error.dimension == budget_pb2.BUDGET_DIMENSION_RATE
    assert error.reason == budget_pb2.DECISION_REASON_RATE_LIMITED
    assert error.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_HARD_GATE
    (request,) = budget.calls["Reserve"]
    assert error.reservation_id == request.reservation_id
    message = str(error)
    assert "was throttled (DECISION_REASON_RATE_LIMITED)" in message
    assert "rate limit is used up" in message
    assert "with a new reservation id after 1.5 s" in message
    assert budget.calls["Commit"] == budget.calls["Refund"] == []
    # The next reserve (a new hold) gets a new id.
    with client.reserve("run-1", 40) as hold:
        assert hold.reservation_id != error.reservation_id


def test_a_throttle_is_still_caught_as_a_block(
    fake: tuple[RecordingFake, str], client: RuncapClient
) -> None:
    fake[0].answers.append(throttle)
    entered = False
    with pytest.raises(BudgetBlockedError) as caught, client.reserve("run-1", 40):
        entered = True
    assert not entered
    assert type(caught.value) is BudgetThrottledError


def test_a_block_names_its_dimension_and_meter(
    fake: tuple[RecordingFake, str], client: RuncapClient
) -> None:
    fake[0].answers.append(block_on_meter)
    with (
        pytest.raises(BudgetBlockedError) as caught,
        client.reserve("run-1", 40, meter="tool:serp_api", meter_units=3),
    ):
        pytest.fail("a blocked hold must not run its block")
    error = caught.value
    assert type(error) is BudgetBlockedError
    assert (error.dimension, error.meter) == (budget_pb2.BUDGET_DIMENSION_METER, "tool:serp_api")
    assert "meter 'tool:serp_api' of the run is at its ceiling" in str(error)
    assert "micros remain" not in str(error)


def test_a_decision_the_client_does_not_know_is_not_held(
    fake: tuple[RecordingFake, str], client: RuncapClient
) -> None:
    fake[0].answers.append(lambda request: pb.ReserveResponse(reservation_id="r"))
    with pytest.raises(BudgetBlockedError), client.reserve("run-1", 40):
        pytest.fail("an unspecified decision must not run the block")
    assert fake[0].calls["Commit"] == fake[0].calls["Refund"] == []


async def test_async_policy_meter_warning_and_throttle(
    fake: tuple[RecordingFake, str], aclient: AsyncRuncapClient
) -> None:
    budget = fake[0]
    created = await aclient.create_run("run-1", limit_micros=5, policy=RunPolicy(max_tokens=9))
    assert created.run.policy.max_tokens == 9
    (create,) = budget.calls["CreateRun"]
    assert create.policy == budget_pb2.RunPolicy(max_tokens=9)

    response = await aclient.reserve_once("run-1", 40, meter="m", meter_units=4)
    assert response.decision == budget_pb2.DECISION_ALLOW

    budget.answers += [warn, throttle]
    async with aclient.reserve("run-1", 40, meter="tool:serp_api") as hold:
        assert hold.warning
        assert hold.dimension == budget_pb2.BUDGET_DIMENSION_METER
    entered = False
    with pytest.raises(BudgetThrottledError) as caught:
        async with aclient.reserve("run-1", 40):
            entered = True
    assert not entered
    assert (caught.value.retry_after, caught.value.dimension) == (
        1.5,
        budget_pb2.BUDGET_DIMENSION_RATE,
    )
    once, warned, throttled = budget.calls["Reserve"]
    assert (once.meter, once.meter_units) == ("m", 4)
    assert warned.meter == "tool:serp_api"
    assert throttled.meter == ""
    # The warned hold was committed; the throttled one was never held.
    (commit,) = budget.calls["Commit"]
    assert commit.reservation_id == warned.reservation_id
    budget.answers.append(fail_open)
    async with aclient.reserve("run-1", 40) as unrecorded:
        assert unrecorded.failed_open
    assert len(budget.calls["Commit"]) == 1
    assert budget.calls["Refund"] == []
    with pytest.raises(ValueError, match="meter_units needs a meter"):
        aclient.reserve("run-1", 40, meter_units=1)


# --- messages of blocks on the new limits ------------------------------------------------


def test_a_token_block_says_tokens_not_micros() -> None:
    response = pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        reservation_id="r",
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_TOKENS,
        state=budget_pb2.BudgetState(committed_tokens=900, reserved_tokens=50),
        estimate=pb.LlmEstimate(
            provider="openai", model="gpt-4o", input_tokens=100, effective_max_output_tokens=20
        ),
    )
    error = BudgetBlockedError("run-1", response)
    assert (error.dimension, error.meter) == (budget_pb2.BUDGET_DIMENSION_TOKENS, "")
    message = str(error)
    assert "token ceiling (900 tokens committed, 50 held)" in message
    assert "estimated at 120 tokens" in message
    assert "micros remain" not in message


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        (budget_pb2.DECISION_REASON_THROTTLED, "throttle band"),
        (budget_pb2.DECISION_REASON_RATE_LIMITED, "rate limit"),
        (budget_pb2.DECISION_REASON_IN_FLIGHT_LIMIT, "holds in flight"),
    ],
)
def test_throttle_messages_name_the_cause(
    reason: budget_pb2.DecisionReason.ValueType, cause: str
) -> None:
    response = pb.ReserveResponse(
        decision=budget_pb2.DECISION_THROTTLE,
        reason=reason,
        reservation_id="r",
        retry_after=seconds(0.25),
    )
    error = BudgetThrottledError("run-1", response)
    assert error.retry_after == 0.25
    assert cause in str(error)
    assert "after 0.25 s" in str(error)


def test_a_throttle_without_a_delay_waits_zero() -> None:
    response = pb.ReserveResponse(decision=budget_pb2.DECISION_THROTTLE, reservation_id="r")
    assert BudgetThrottledError("run-1", response).retry_after == 0.0
