"""Approvals in the Python client: the escalation triggers a `RunPolicy` sends,
what the `reserve(...)` context managers make of a DECISION_APPROVAL_REQUIRED
(`ApprovalRequiredError`, with the approval to resolve) and of a block by a
denied approval, and `approve` / `deny` with their retries and their
APPROVAL_NOT_FOUND and APPROVAL_RESOLVED errors, over a scripted in-process
gRPC server that records every request (no runcap server needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from runcap import (
    ApprovalNotFoundError,
    ApprovalRequiredError,
    ApprovalResolvedError,
    AsyncRuncapClient,
    BudgetBlockedError,
    BudgetThrottledError,
    DecisionNotFoundError,
    RuncapClient,
    RuncapError,
    RunPolicy,
    from_status,
)
from runcap.errors import REASON_TO_ERROR
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from tests.unit.fake_budget import CORE_METHODS, FAST, RecordingFake, error_status, serve

SPEND_APPROVAL = "run-1/approval:spend"
DEPLOY_APPROVAL = "run-1/approval:meter:tool:deploy"


def approval_not_found(approval_id: str, *, metadata: bool = False) -> status_pb2.Status:
    """The status the server sends for Approve or Deny of an unknown approval
    (its ErrorInfo has no metadata: the ResourceInfo names the approval)."""
    return error_status(
        code_pb2.NOT_FOUND,
        f"there is no approval {approval_id!r}: its run never requested it",
        error_details_pb2.ErrorInfo(
            reason="APPROVAL_NOT_FOUND",
            domain="runcap.dev",
            metadata={"approval_id": approval_id} if metadata else {},
        ),
        error_details_pb2.ResourceInfo(
            resource_type="runcap.v1.Approval", resource_name=approval_id
        ),
    )


def approval_resolved(run_id: str, approval_id: str, status: str) -> status_pb2.Status:
    """The status the server sends for Approve of a denied approval, or Deny of
    an approved one (the PreconditionFailure's subject names the approval)."""
    message = f"approval {approval_id!r} is already {status}"
    return error_status(
        code_pb2.FAILED_PRECONDITION,
        message,
        error_details_pb2.ErrorInfo(
            reason="APPROVAL_RESOLVED",
            domain="runcap.dev",
            metadata={"run_id": run_id, "reservation_id": ""},
        ),
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="APPROVAL_RESOLVED", subject=approval_id, description=message
                )
            ]
        ),
    )


def spend_needs_approval(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """The run's spend with this call would pass its approval_percent."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_APPROVAL_REQUIRED,
        reason=budget_pb2.DECISION_REASON_SPEND_NEEDS_APPROVAL,
        reservation_id=request.reservation_id,
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_SPEND,
        state=budget_pb2.BudgetState(
            run_id=request.run_id, limit_micros=10_000, remaining_micros=2_500
        ),
        decision_id="dec-approval",
        approval_id=SPEND_APPROVAL,
    )


def meter_needs_approval(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """The call's meter is not on the run's approved_meters."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_APPROVAL_REQUIRED,
        reason=budget_pb2.DECISION_REASON_METER_NEEDS_APPROVAL,
        reservation_id=request.reservation_id,
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_METER,
        blocking_meter=request.meter,
        approval_id=f"{request.run_id}/approval:meter:{request.meter}",
    )


def approval_denied(request: pb.ReserveRequest) -> pb.ReserveResponse:
    """The escalation this call trips was denied."""
    return pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_APPROVAL_DENIED,
        reservation_id=request.reservation_id,
        blocking_dimension=budget_pb2.BUDGET_DIMENSION_METER,
        blocking_meter=request.meter,
        approval_id=DEPLOY_APPROVAL,
    )


_STATUS_NAMES = {
    budget_pb2.APPROVAL_STATUS_APPROVED: "approved",
    budget_pb2.APPROVAL_STATUS_DENIED: "denied",
}


class FakeApprovals(RecordingFake):
    """Records every request. Reserve answers with the queued answers first,
    then an allow. Approve and Deny fail with UNAVAILABLE `unavailable` times
    first, then resolve the approvals in `approvals` (a replay when already
    resolved the same way, APPROVAL_RESOLVED the other way) and answer
    APPROVAL_NOT_FOUND for any other id."""

    methods = (*CORE_METHODS, "Approve", "Deny")
    limit_micros = 10_000

    def __init__(self) -> None:
        super().__init__()
        self.approvals: dict[str, budget_pb2.ApprovalStatus.ValueType] = {}

    def other(
        self, method: str, request: Any, context: grpc.ServicerContext
    ) -> pb.ApproveResponse | pb.DenyResponse:
        with self.lock:
            current = self.approvals.get(request.approval_id)
        if current is None:
            context.abort_with_status(rpc_status.to_status(approval_not_found(request.approval_id)))
        wanted = (
            budget_pb2.APPROVAL_STATUS_APPROVED
            if method == "Approve"
            else budget_pb2.APPROVAL_STATUS_DENIED
        )
        if current not in (budget_pb2.APPROVAL_STATUS_PENDING, wanted):
            run_id = request.approval_id.split("/", 1)[0]
            status = approval_resolved(run_id, request.approval_id, _STATUS_NAMES[current])
            context.abort_with_status(rpc_status.to_status(status))
        with self.lock:
            self.approvals[request.approval_id] = wanted
        approval = budget_pb2.Approval(approval_id=request.approval_id, status=wanted)
        state = budget_pb2.BudgetState(run_id=request.approval_id.split("/", 1)[0])
        kind = pb.ApproveResponse if method == "Approve" else pb.DenyResponse
        return kind(approval=approval, state=state, replayed=current == wanted)


@pytest.fixture
def fake() -> Iterator[tuple[FakeApprovals, str]]:
    approvals = FakeApprovals()
    with serve(approvals.handler, approvals.methods) as target:
        yield approvals, target


# --- the run policy ---------------------------------------------------------------------


def test_a_run_policy_sends_its_escalation_triggers() -> None:
    policy = RunPolicy(approval_percent=80, approved_meters=["tool:search", "tool:fetch"])
    assert policy.to_proto() == budget_pb2.RunPolicy(
        approval_percent=80, approved_meters=["tool:search", "tool:fetch"]
    )
    default = RunPolicy().to_proto()
    assert default.approval_percent == 0
    assert list(default.approved_meters) == []


def test_approved_meters_must_be_a_sequence_of_strings() -> None:
    one_string: Any = "tool:search"
    with pytest.raises(TypeError, match="approved_meters must be a sequence of strings"):
        RunPolicy(approved_meters=one_string).to_proto()


def test_create_run_sends_the_escalation_triggers(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    policy = RunPolicy(approval_percent=75, approved_meters=("tool:search",))
    created = client.create_run("run-1", limit_micros=10_000, policy=policy)
    assert created.run.policy.approval_percent == 75
    (create,) = fake[0].calls["CreateRun"]
    assert create.policy == budget_pb2.RunPolicy(
        approval_percent=75, approved_meters=["tool:search"]
    )


# --- APPROVAL_REQUIRED and APPROVAL_DENIED decisions ------------------------------------


def test_approval_required_raises_a_typed_error_with_the_approval_id(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers.append(spend_needs_approval)
    with pytest.raises(ApprovalRequiredError) as caught, client.reserve("run-1", 4_000):
        pytest.fail("a reservation that needs approval must not run its block")
    error = caught.value
    assert isinstance(error, BudgetBlockedError)
    assert not isinstance(error, BudgetThrottledError)
    assert not isinstance(error, RuncapError)
    assert error.approval_id == SPEND_APPROVAL
    assert error.reason == budget_pb2.DECISION_REASON_SPEND_NEEDS_APPROVAL
    assert error.decision_id == "dec-approval"
    (reserve,) = budget.calls["Reserve"]
    assert error.reservation_id == reserve.reservation_id
    message = str(error)
    assert "needs approval (DECISION_REASON_SPEND_NEEDS_APPROVAL)" in message
    assert "would pass its approval threshold" in message
    assert f"approve {SPEND_APPROVAL!r}, then reserve again with a new reservation id" in message
    assert budget.calls["Commit"] == []
    assert budget.calls["Refund"] == []


def test_a_meter_that_needs_approval_names_the_meter(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers.append(meter_needs_approval)
    with (
        pytest.raises(BudgetBlockedError) as caught,
        client.reserve("run-1", 40, meter="tool:deploy"),
    ):
        pytest.fail("a reservation that needs approval must not run its block")
    error = caught.value
    assert type(error) is ApprovalRequiredError
    assert error.approval_id == DEPLOY_APPROVAL
    assert error.meter == "tool:deploy"
    assert error.dimension == budget_pb2.BUDGET_DIMENSION_METER
    assert "meter 'tool:deploy' is not on the run's approved meters" in str(error)
    (reserve,) = budget.calls["Reserve"]
    assert reserve.meter == "tool:deploy"


def test_reserve_once_returns_approval_required_as_a_response(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    fake[0].answers.append(spend_needs_approval)
    response = client.reserve_once("run-1", 4_000)
    assert response.decision == budget_pb2.DECISION_APPROVAL_REQUIRED
    assert response.approval_id == SPEND_APPROVAL


def test_once_approved_a_new_reservation_is_held(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.answers.append(spend_needs_approval)
    budget.approvals[SPEND_APPROVAL] = budget_pb2.APPROVAL_STATUS_PENDING
    with pytest.raises(ApprovalRequiredError) as caught, client.reserve("run-1", 4_000):
        pytest.fail("a reservation that needs approval must not run its block")
    approved = client.approve(caught.value.approval_id)
    assert approved.approval.status == budget_pb2.APPROVAL_STATUS_APPROVED
    with client.reserve("run-1", 4_000) as hold:
        hold.set_actual(3_000)
    first, second = budget.calls["Reserve"]
    assert second.reservation_id != first.reservation_id
    (commit,) = budget.calls["Commit"]
    assert commit.reservation_id == second.reservation_id


def test_a_denied_approval_blocks_with_its_approval_id(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    fake[0].answers.append(approval_denied)
    with (
        pytest.raises(BudgetBlockedError) as caught,
        client.reserve("run-1", 40, meter="tool:deploy"),
    ):
        pytest.fail("a blocked hold must not run its block")
    error = caught.value
    assert type(error) is BudgetBlockedError
    assert error.approval_denied
    assert error.approval_id == DEPLOY_APPROVAL
    assert error.reason == budget_pb2.DECISION_REASON_APPROVAL_DENIED
    assert f"the call needs approval {DEPLOY_APPROVAL!r}, which was denied" in str(error)


def test_a_plain_block_has_no_approval() -> None:
    response = pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        reservation_id="r",
    )
    error = BudgetBlockedError("run-1", response)
    assert error.approval_id == ""
    assert not error.approval_denied
    assert "approv" not in str(error)


# --- Approve and Deny -------------------------------------------------------------------


def test_approve_sends_the_id_and_retries_unavailable(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.approvals[SPEND_APPROVAL] = budget_pb2.APPROVAL_STATUS_PENDING
    budget.unavailable = FAST.max_attempts - 1
    response = client.approve(SPEND_APPROVAL)
    assert response.approval == budget_pb2.Approval(
        approval_id=SPEND_APPROVAL, status=budget_pb2.APPROVAL_STATUS_APPROVED
    )
    assert response.state.run_id == "run-1"
    assert not response.replayed
    assert budget.calls["Approve"] == [pb.ApproveRequest(approval_id=SPEND_APPROVAL)] * 4
    # Idempotent: approving again is a replay.
    assert client.approve(SPEND_APPROVAL).replayed
    assert budget.calls["Deny"] == []


def test_deny_sends_the_id_and_retries_unavailable(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.approvals[DEPLOY_APPROVAL] = budget_pb2.APPROVAL_STATUS_PENDING
    budget.unavailable = 2
    response = client.deny(DEPLOY_APPROVAL)
    assert response.approval.status == budget_pb2.APPROVAL_STATUS_DENIED
    assert not response.replayed
    assert budget.calls["Deny"] == [pb.DenyRequest(approval_id=DEPLOY_APPROVAL)] * 3
    assert client.deny(DEPLOY_APPROVAL).replayed
    assert budget.calls["Approve"] == []


def test_retries_of_approve_and_deny_give_up_after_the_policy(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.approvals[SPEND_APPROVAL] = budget_pb2.APPROVAL_STATUS_PENDING
    budget.unavailable = 100
    with pytest.raises(RuncapError) as caught:
        client.approve(SPEND_APPROVAL)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(budget.calls["Approve"]) == FAST.max_attempts


def test_an_unknown_approval_is_approval_not_found(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    for resolve in (client.approve, client.deny):
        with pytest.raises(ApprovalNotFoundError) as caught:
            resolve("run-1/approval:gone")
        error = caught.value
        assert isinstance(error, RuncapError)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND")
        assert error.approval_id == "run-1/approval:gone"
        assert error.resource_info is not None
        assert error.resource_info.resource_type == "runcap.v1.Approval"
    # Final: neither is retried.
    assert len(budget.calls["Approve"]) == 1
    assert len(budget.calls["Deny"]) == 1


def test_resolving_an_approval_the_other_way_is_approval_resolved(
    fake: tuple[FakeApprovals, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.approvals[SPEND_APPROVAL] = budget_pb2.APPROVAL_STATUS_DENIED
    budget.approvals[DEPLOY_APPROVAL] = budget_pb2.APPROVAL_STATUS_APPROVED
    with pytest.raises(ApprovalResolvedError) as denied:
        client.approve(SPEND_APPROVAL)
    error = denied.value
    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "APPROVAL_RESOLVED",
    )
    assert error.approval_id == SPEND_APPROVAL
    assert error.run_id == "run-1"
    assert error.violations[0][:2] == ("APPROVAL_RESOLVED", SPEND_APPROVAL)
    assert "already denied" in error.message
    with pytest.raises(ApprovalResolvedError) as approved:
        client.deny(DEPLOY_APPROVAL)
    assert approved.value.approval_id == DEPLOY_APPROVAL
    assert "already approved" in approved.value.message
    assert len(budget.calls["Approve"]) == 1
    assert len(budget.calls["Deny"]) == 1


def test_approval_errors_are_one_row_each_of_the_table() -> None:
    assert REASON_TO_ERROR["APPROVAL_NOT_FOUND"] is ApprovalNotFoundError
    assert REASON_TO_ERROR["APPROVAL_RESOLVED"] is ApprovalResolvedError
    for kind in (ApprovalNotFoundError, ApprovalResolvedError):
        assert [k for k in REASON_TO_ERROR.values() if k is kind] == [kind]
    missing = from_status(approval_not_found("run-1/approval:spend"))
    assert type(missing) is ApprovalNotFoundError
    assert not isinstance(missing, DecisionNotFoundError)
    assert missing.approval_id == "run-1/approval:spend"
    # The ErrorInfo metadata wins over the ResourceInfo when it names one.
    named = from_status(approval_not_found("run-1/approval:spend", metadata=True))
    assert isinstance(named, ApprovalNotFoundError)
    assert named.approval_id == "run-1/approval:spend"
    resolved = from_status(approval_resolved("run-1", DEPLOY_APPROVAL, "approved"))
    assert type(resolved) is ApprovalResolvedError
    assert (resolved.run_id, resolved.approval_id) == ("run-1", DEPLOY_APPROVAL)
    # A proxy's APPROVAL_NOT_FOUND maps by its code only.
    foreign = approval_not_found("x")
    info = error_details_pb2.ErrorInfo(reason="APPROVAL_NOT_FOUND", domain="proxy.example")
    foreign.details[0].Pack(info)
    assert type(from_status(foreign)) is RuncapError


# --- asyncio ----------------------------------------------------------------------------


async def test_async_approval_required_approve_and_deny(
    fake: tuple[FakeApprovals, str], aclient: AsyncRuncapClient
) -> None:
    budget = fake[0]
    budget.answers += [spend_needs_approval, meter_needs_approval]
    budget.approvals[SPEND_APPROVAL] = budget_pb2.APPROVAL_STATUS_PENDING
    budget.approvals[DEPLOY_APPROVAL] = budget_pb2.APPROVAL_STATUS_PENDING
    with pytest.raises(ApprovalRequiredError) as spend:
        async with aclient.reserve("run-1", 4_000):
            pytest.fail("a reservation that needs approval must not run its block")
    assert spend.value.approval_id == SPEND_APPROVAL
    with pytest.raises(BudgetBlockedError) as meter:
        async with aclient.reserve("run-1", 40, meter="tool:deploy"):
            pytest.fail("a reservation that needs approval must not run its block")
    assert isinstance(meter.value, ApprovalRequiredError)
    assert meter.value.approval_id == DEPLOY_APPROVAL
    assert budget.calls["Commit"] == budget.calls["Refund"] == []

    budget.unavailable = 2
    approved = await aclient.approve(SPEND_APPROVAL)
    assert approved.approval.status == budget_pb2.APPROVAL_STATUS_APPROVED
    assert budget.calls["Approve"] == [pb.ApproveRequest(approval_id=SPEND_APPROVAL)] * 3
    budget.unavailable = 1
    denied = await aclient.deny(DEPLOY_APPROVAL)
    assert denied.approval.status == budget_pb2.APPROVAL_STATUS_DENIED
    assert budget.calls["Deny"] == [pb.DenyRequest(approval_id=DEPLOY_APPROVAL)] * 2

    with pytest.raises(ApprovalResolvedError):
        await aclient.approve(DEPLOY_APPROVAL)
    with pytest.raises(ApprovalNotFoundError) as missing:
        await aclient.deny("run-1/approval:gone")
    assert missing.value.approval_id == "run-1/approval:gone"
    assert len(budget.calls["Approve"]) == 4  # final: not retried
    assert len(budget.calls["Deny"]) == 3
