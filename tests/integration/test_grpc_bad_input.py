"""Every RPC with malformed input: the right status, reason and details, and no change."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from runcap.v1 import budget_service_pb2 as pb
from tests.integration.rpc import error_info

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

RUN = "bad-input-run"
HELD = "held"
BLOCKED = "blocked"
CLOSED = "bad-input-closed-parent"
LONG = "x" * 129
MAX = 2**53 - 1


def dur(seconds: int = 0, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
# (rpc, request fields, code, ErrorInfo reason, the fields a BadRequest must name)
CASES: list[tuple[str, dict[str, Any], grpc.StatusCode, str, set[str]]] = [
    ("CreateRun", {"run_id": "new-1"}, INVALID, "INVALID_ARGUMENT", {"limit_micros"}),
    (
        "CreateRun",
        {"run_id": "new-2", "limit_micros": -5},
        INVALID,
        "INVALID_ARGUMENT",
        {"limit_micros"},
    ),
    (
        "CreateRun",
        {"run_id": "new-3", "limit_micros": MAX + 1},
        INVALID,
        "INVALID_ARGUMENT",
        {"limit_micros"},
    ),
    ("CreateRun", {"run_id": LONG, "limit_micros": 1}, INVALID, "INVALID_ARGUMENT", {"run_id"}),
    (
        "CreateRun",
        {"run_id": "has space", "limit_micros": 1},
        INVALID,
        "INVALID_ARGUMENT",
        {"run_id"},
    ),
    ("CreateRun", {"run_id": "{tag}", "limit_micros": 1}, INVALID, "INVALID_ARGUMENT", {"run_id"}),
    (
        "CreateRun",
        {"run_id": "new-4", "limit_micros": 1, "labels": {"Agent": "x"}},
        INVALID,
        "INVALID_ARGUMENT",
        {"labels['Agent']"},
    ),
    (
        "CreateRun",
        {"run_id": "new-5", "limit_micros": 1, "labels": {"agent": "v" * 257}},
        INVALID,
        "INVALID_ARGUMENT",
        {"labels['agent']"},
    ),
    (
        "CreateRun",
        {"run_id": "new-6", "limit_micros": 1, "labels": {f"k{i}": "v" for i in range(65)}},
        INVALID,
        "INVALID_ARGUMENT",
        {"labels"},
    ),
    (
        "CreateRun",
        {"run_id": "new-7", "limit_micros": 1, "default_ttl": dur(-1)},
        INVALID,
        "INVALID_ARGUMENT",
        {"default_ttl"},
    ),
    (
        "CreateRun",
        {"run_id": "new-8", "limit_micros": 0, "default_ttl": dur(0)},
        INVALID,
        "INVALID_ARGUMENT",
        {"limit_micros", "default_ttl"},
    ),
    (
        "CreateRun",
        {"run_id": RUN, "limit_micros": 1},
        grpc.StatusCode.ALREADY_EXISTS,
        "RUN_ALREADY_EXISTS",
        set(),
    ),
    ("GetRun", {}, INVALID, "INVALID_ARGUMENT", {"run_id"}),
    ("GetRun", {"run_id": "missing"}, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", set()),
    (
        "Reserve",
        {"run_id": RUN, "reservation_id": "r"},
        INVALID,
        "INVALID_ARGUMENT",
        {"amount_micros"},
    ),
    (
        "Reserve",
        {"run_id": RUN, "amount_micros": 0},
        INVALID,
        "INVALID_ARGUMENT",
        {"amount_micros"},
    ),
    (
        "Reserve",
        {"run_id": RUN, "amount_micros": -1},
        INVALID,
        "INVALID_ARGUMENT",
        {"amount_micros"},
    ),
    (
        "Reserve",
        {"run_id": RUN, "amount_micros": MAX + 1},
        INVALID,
        "INVALID_ARGUMENT",
        {"amount_micros"},
    ),
    ("Reserve", {"amount_micros": 1}, INVALID, "INVALID_ARGUMENT", {"run_id"}),
    (
        "Reserve",
        {"run_id": RUN, "reservation_id": LONG, "amount_micros": 1},
        INVALID,
        "INVALID_ARGUMENT",
        {"reservation_id"},
    ),
    (
        "Reserve",
        {"run_id": RUN, "amount_micros": 1, "ttl": dur(90_000)},
        INVALID,
        "INVALID_ARGUMENT",
        {"ttl"},
    ),
    (
        "Reserve",
        {"run_id": RUN, "amount_micros": 1, "ttl": dur(0, 500)},
        INVALID,
        "INVALID_ARGUMENT",
        {"ttl"},
    ),
    (
        "Reserve",
        {"run_id": "missing", "amount_micros": 1},
        grpc.StatusCode.NOT_FOUND,
        "RUN_NOT_FOUND",
        set(),
    ),
    (
        "Reserve",
        {"run_id": RUN, "reservation_id": HELD, "amount_micros": 2},
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        set(),
    ),
    (
        "Commit",
        {"run_id": RUN, "reservation_id": HELD},
        INVALID,
        "INVALID_ARGUMENT",
        {"actual_micros"},
    ),
    (
        "Commit",
        {"run_id": RUN, "reservation_id": HELD, "actual_micros": -1},
        INVALID,
        "INVALID_ARGUMENT",
        {"actual_micros"},
    ),
    (
        "Commit",
        {"run_id": RUN, "actual_micros": 1},
        INVALID,
        "INVALID_ARGUMENT",
        {"reservation_id"},
    ),
    (
        "Commit",
        {"run_id": RUN, "reservation_id": "nope", "actual_micros": 1},
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
        set(),
    ),
    (
        "Commit",
        {"run_id": RUN, "reservation_id": BLOCKED, "actual_micros": 1},
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_BLOCKED",
        set(),
    ),
    ("Refund", {"run_id": RUN}, INVALID, "INVALID_ARGUMENT", {"reservation_id"}),
    (
        "Refund",
        {"run_id": "missing", "reservation_id": "r"},
        grpc.StatusCode.NOT_FOUND,
        "RUN_NOT_FOUND",
        set(),
    ),
    (
        "Refund",
        {"run_id": RUN, "reservation_id": BLOCKED},
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_BLOCKED",
        set(),
    ),
    ("CloseRun", {"run_id": ""}, INVALID, "INVALID_ARGUMENT", {"run_id"}),
    ("CloseRun", {"run_id": "missing"}, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", set()),
    (
        "Watch",
        {"run_id": RUN, "after_revision": -1},
        INVALID,
        "INVALID_ARGUMENT",
        {"after_revision"},
    ),
    ("Watch", {"run_id": "missing"}, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", set()),
    (
        "Watch",
        {"run_id": RUN, "after_revision": 99},
        grpc.StatusCode.OUT_OF_RANGE,
        "REVISION_OUT_OF_RANGE",
        set(),
    ),
    # Parent scopes.
    (
        "CreateRun",
        {"run_id": "kid-1", "limit_micros": 1, "parent_run_id": "kid-1"},
        INVALID,
        "INVALID_ARGUMENT",
        {"parent_run_id"},
    ),
    (
        "CreateRun",
        {"run_id": "kid-2", "limit_micros": 1, "team_id": "a team", "user_id": LONG},
        INVALID,
        "INVALID_ARGUMENT",
        {"team_id", "user_id"},
    ),
    (
        "CreateRun",
        {"run_id": "kid-3", "limit_micros": 1, "parent_run_id": "missing"},
        grpc.StatusCode.NOT_FOUND,
        "PARENT_RUN_NOT_FOUND",
        set(),
    ),
    (
        "CreateRun",
        {"run_id": "kid-4", "limit_micros": 1, "parent_run_id": CLOSED},
        grpc.StatusCode.FAILED_PRECONDITION,
        "PARENT_RUN_CLOSED",
        set(),
    ),
    ("SetScopeLimit", {}, INVALID, "INVALID_ARGUMENT", {"scope.kind", "period", "limit_micros"}),
    (
        "SetScopeLimit",
        {"scope": {"kind": 1, "id": RUN}, "period": 1, "limit_micros": 5},
        INVALID,
        "INVALID_ARGUMENT",
        {"scope.kind"},
    ),
    (
        "SetScopeLimit",
        {"scope": {"kind": 4, "id": ""}, "period": 9, "limit_micros": 0},
        INVALID,
        "INVALID_ARGUMENT",
        {"scope.id", "period", "limit_micros"},
    ),
    (
        "SetScopeLimit",
        {"scope": {"kind": 4, "id": "t"}, "period": 2, "limit_micros": MAX + 1},
        INVALID,
        "INVALID_ARGUMENT",
        {"limit_micros"},
    ),
    (
        "SetScopeLimit",
        {"scope": {"kind": 4, "id": "t"}, "period": 2, "clear": False},
        INVALID,
        "INVALID_ARGUMENT",
        {"limit_micros"},
    ),
    ("GetScope", {"scope": {"kind": 0, "id": "t"}}, INVALID, "INVALID_ARGUMENT", {"scope.kind"}),
    ("GetScope", {"scope": {"kind": 2, "id": "{x}"}}, INVALID, "INVALID_ARGUMENT", {"scope.id"}),
]


@pytest.fixture
async def seeded(stub: BudgetServiceAsyncStub) -> pb.GetRunResponse:
    """A run with one active hold and one blocked reservation (created once)."""
    created = await stub.CreateRun(pb.CreateRunRequest(run_id=RUN, limit_micros=10))
    if not created.replayed:
        await stub.Reserve(pb.ReserveRequest(run_id=RUN, reservation_id=HELD, amount_micros=1))
        await stub.Reserve(pb.ReserveRequest(run_id=RUN, reservation_id=BLOCKED, amount_micros=11))
        await stub.CreateRun(pb.CreateRunRequest(run_id=CLOSED, limit_micros=10))
        await stub.CloseRun(pb.CloseRunRequest(run_id=CLOSED))
    return await stub.GetRun(pb.GetRunRequest(run_id=RUN))


@pytest.mark.parametrize(
    ("rpc", "fields", "code", "reason", "violations"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
async def test_bad_request_is_rejected_and_changes_nothing(
    stub: BudgetServiceAsyncStub,
    seeded: pb.GetRunResponse,
    rpc: str,
    fields: dict[str, Any],
    code: grpc.StatusCode,
    reason: str,
    violations: set[str],
) -> None:
    request = getattr(pb, f"{rpc}Request")(**fields)
    method = getattr(stub, rpc)
    call = method(request).read() if rpc == "Watch" else method(request)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    error = failure.value
    assert error.code() == code
    info, status = error_info(error)
    assert (info.reason, info.domain) == (reason, "runcap.dev")
    assert status.message == error.details()
    assert error.details()  # a message a person can act on
    if violations:
        bad_request = error_details_pb2.BadRequest()
        assert status.details[1].Unpack(bad_request)
        assert {v.field for v in bad_request.field_violations} == violations
        assert all(v.description for v in bad_request.field_violations)
    # One ErrorInfo, at most one detail of each other type.
    kinds = [d.type_url for d in status.details]
    assert len(kinds) == len(set(kinds))
    # Nothing changed: the seeded run is as it was, and no stray run appeared.
    assert await stub.GetRun(pb.GetRunRequest(run_id=RUN)) == seeded
    if rpc == "CreateRun" and fields.get("run_id", RUN) != RUN and len(fields["run_id"]) <= 128:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetRun(pb.GetRunRequest(run_id=fields["run_id"]))
        assert missing.value.code() in (grpc.StatusCode.NOT_FOUND, INVALID)
