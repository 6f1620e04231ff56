"""The Python client against a scripted in-process gRPC server.

Statuses are built by the server's own `runcap_server.errors.to_status` and sent
over a real channel, so these tests check the wire path and that client and
server agree on every row of the errors table. The same fake server scripts
UNAVAILABLE bursts (retries) and Watch disconnects (resume).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import runcap
from runcap import (
    NO_RETRY,
    AsyncRuncapClient,
    BudgetBlockedError,
    IdempotencyConflictError,
    InternalError,
    InvalidArgumentError,
    PermissionDeniedError,
    ReservationBlockedError,
    ReservationNotFoundError,
    ReservationReleasedError,
    RetryPolicy,
    RevisionOutOfRangeError,
    RunAlreadyExistsError,
    RuncapClient,
    RuncapError,
    RunClosedError,
    RunNotFoundError,
    SubagentLimitError,
    UnavailableError,
    from_status,
)
from runcap.errors import REASON_TO_ERROR
from runcap.v1 import budget_pb2, errors_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server import errors as server_errors
from tests.unit.fake_budget import FAST, serve

End = Literal["unavailable", "shutting_down", "final", "end", "hang"]


@dataclass
class Connection:
    """How the fake serves one Watch connection: `send` messages, then `end`."""

    send: int
    end: End
    # Re-send this many already-delivered events first (a buggy replay).
    overlap: int = 0
    # Send a non-final heartbeat before the events.
    heartbeat: bool = False


@dataclass
class FakeBudget:
    """A scripted BudgetService: canned answers, queued failures, Watch plans."""

    failures: dict[str, list[BaseException]] = field(default_factory=lambda: defaultdict(list))
    calls: dict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))
    head: int = 10
    floor: int = 0
    watch_plan: list[Connection] = field(default_factory=list)
    block: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _fail_first(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method].append(request)
            queued = self.failures[method]
            error = queued.pop(0) if queued else None
        if error is not None:
            abort(context, error)

    def _state(self, run_id: str) -> budget_pb2.BudgetState:
        return budget_pb2.BudgetState(run_id=run_id, limit_micros=1000, revision=self.head)

    def unary(self, method: str) -> Callable[[Any, grpc.ServicerContext], Message]:
        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            self._fail_first(method, request, context)
            state = self._state(request.run_id)
            if method == "CreateRun":
                return pb.CreateRunResponse(run=budget_pb2.Run(run_id=request.run_id), state=state)
            if method == "GetRun":
                return pb.GetRunResponse(run=budget_pb2.Run(run_id=request.run_id), state=state)
            if method == "Reserve":
                if self.block:
                    return pb.ReserveResponse(
                        decision=budget_pb2.DECISION_BLOCK,
                        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
                        reservation_id=request.reservation_id,
                        state=state,
                    )
                return pb.ReserveResponse(
                    decision=budget_pb2.DECISION_ALLOW,
                    reason=budget_pb2.DECISION_REASON_WITHIN_BUDGET,
                    reservation_id=request.reservation_id or "server-made",
                    amount_micros=request.amount_micros,
                    state=state,
                )
            if method == "Commit":
                return pb.CommitResponse(state=state, actual_micros=request.actual_micros)
            if method == "Refund":
                return pb.RefundResponse(state=state)
            if method == "SuspendRun":
                state.status = budget_pb2.RUN_STATUS_SUSPENDED
                return pb.SuspendRunResponse(state=state)
            if method == "ResumeRun":
                return pb.ResumeRunResponse(state=state)
            return pb.CloseRunResponse(state=state)

        return handle

    def event(self, revision: int) -> pb.WatchResponse:
        return pb.WatchResponse(
            revision=revision,
            event=budget_pb2.BudgetEvent(
                type=budget_pb2.EVENT_TYPE_RESERVED, reservation_id=f"r{revision}"
            ),
        )

    def watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[Message]:
        with self.lock:
            self.calls["Watch"].append(request)
            number = len(self.calls["Watch"]) - 1
        plan = self.watch_plan[number] if number < len(self.watch_plan) else Connection(99, "end")
        after = request.after_revision if request.HasField("after_revision") else None
        if after is not None and (after < self.floor or after > self.head):
            abort(context, server_errors.RevisionOutOfRange(request.run_id, after, 1, self.head))
        messages: list[pb.WatchResponse] = []
        if plan.heartbeat:
            messages.append(pb.WatchResponse(revision=after or 1, progress=pb.Progress()))
        if after is None:
            snapshot = pb.WatchResponse(revision=1, snapshot=self._state(request.run_id))
            snapshot.snapshot.revision = 1
            messages.append(snapshot)
            after = 1
        messages += [self.event(r) for r in range(after + 1 - plan.overlap, self.head + 1)]
        yield from messages[: plan.send]
        last = messages[: plan.send][-1].revision if plan.send and messages else after
        if plan.end == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        elif plan.end == "shutting_down":
            abort(context, server_errors.ShuttingDown(retry_after_ms=1))
        elif plan.end == "final":
            yield pb.WatchResponse(revision=last, progress=pb.Progress(final=True))
        elif plan.end == "hang":
            while context.is_active():
                time.sleep(0.01)


def abort(context: grpc.ServicerContext, error: BaseException) -> None:
    _, status = server_errors.to_status(error)
    context.abort_with_status(rpc_status.to_status(status))


@pytest.fixture
def fake() -> Iterator[tuple[FakeBudget, str]]:
    budget = FakeBudget()
    methods = [
        "CreateRun",
        "GetRun",
        "Reserve",
        "Commit",
        "Refund",
        "CloseRun",
        "SuspendRun",
        "ResumeRun",
    ]
    with serve(budget.unary, methods, watch=budget.watch, workers=16) as target:
        yield budget, target


# --- the errors table -------------------------------------------------------------------


def test_every_error_reason_has_one_class() -> None:
    names = {
        name.removeprefix("ERROR_REASON_")
        for name in errors_pb2.ErrorReason.DESCRIPTOR.values_by_name
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert set(REASON_TO_ERROR) == names


@dataclass(frozen=True)
class Row:
    """A server exception and what the client must make of it."""

    error: BaseException
    kind: type[RuncapError]
    code: grpc.StatusCode
    reason: str
    check: Callable[[Any], None] = lambda _: None


ROWS = [
    Row(
        server_errors.InvalidArgument(
            [
                server_errors.FieldViolation("run_id", "is required"),
                server_errors.FieldViolation("limit_micros", "must be positive"),
            ]
        ),
        InvalidArgumentError,
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        lambda e: _eq(
            e.field_violations,
            [("run_id", "is required"), ("limit_micros", "must be positive")],
        ),
    ),
    Row(
        server_errors.RunNotFound("run-1"),
        RunNotFoundError,
        grpc.StatusCode.NOT_FOUND,
        "RUN_NOT_FOUND",
        lambda e: _eq(
            (e.run_id, e.resource_info.resource_type, e.resource_info.resource_name),
            ("run-1", "runcap.v1.Run", "run-1"),
        ),
    ),
    Row(
        server_errors.ReservationNotFound("run-1", "res-1"),
        ReservationNotFoundError,
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
        lambda e: _eq((e.run_id, e.reservation_id), ("run-1", "res-1")),
    ),
    Row(
        server_errors.RunAlreadyExists("run-1"),
        RunAlreadyExistsError,
        grpc.StatusCode.ALREADY_EXISTS,
        "RUN_ALREADY_EXISTS",
        lambda e: _eq(e.run_id, "run-1"),
    ),
    Row(
        server_errors.IdempotencyConflict("run-1", "res-1", "reserved"),
        IdempotencyConflictError,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        lambda e: _eq((e.run_id, e.reservation_id), ("run-1", "res-1")),
    ),
    Row(
        server_errors.ReservationBlocked("run-1", "res-1"),
        ReservationBlockedError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_BLOCKED",
        lambda e: _eq(e.violations[0][:2], ("RESERVATION_BLOCKED", "run-1/res-1")),
    ),
    Row(
        server_errors.ReservationReleased("run-1", "res-1"),
        ReservationReleasedError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_RELEASED",
        lambda e: _eq(e.violations[0][:2], ("RESERVATION_RELEASED", "run-1/res-1")),
    ),
    Row(
        server_errors.RunClosed("run-1"),
        RunClosedError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "RUN_CLOSED",
        lambda e: _eq((e.run_id, e.violations[0][:2]), ("run-1", ("RUN_CLOSED", "run-1"))),
    ),
    Row(
        server_errors.SubagentLimit("child", "root", "run 'root' has its 2 children"),
        SubagentLimitError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "SUBAGENT_LIMIT",
        lambda e: _eq(
            (e.run_id, e.parent_run_id, e.violations[0][:2]),
            ("child", "root", ("SUBAGENT_LIMIT", "root")),
        ),
    ),
    Row(
        server_errors.RevisionOutOfRange("run-1", 3, 10, 20),
        RevisionOutOfRangeError,
        grpc.StatusCode.OUT_OF_RANGE,
        "REVISION_OUT_OF_RANGE",
        lambda e: _eq((e.after_revision, e.floor, e.head), (3, 10, 20)),
    ),
    Row(
        server_errors.BackendUnavailable("disk full", retry_after_ms=1500),
        UnavailableError,
        grpc.StatusCode.UNAVAILABLE,
        "BACKEND_UNAVAILABLE",
        lambda e: _eq(e.retry_after, 1.5),
    ),
    Row(
        server_errors.ShuttingDown(retry_after_ms=100),
        UnavailableError,
        grpc.StatusCode.UNAVAILABLE,
        "SHUTTING_DOWN",
        lambda e: _eq(e.retry_after, 0.1),
    ),
    Row(
        ValueError("boom"),
        InternalError,
        grpc.StatusCode.INTERNAL,
        "INTERNAL",
        lambda e: _eq((len(e.trace_id), e.trace_id in e.message), (32, True)),
    ),
]


def _eq(actual: object, expected: object) -> None:
    assert actual == expected


def _check(row: Row, error: BaseException) -> None:
    assert type(error) is row.kind
    assert isinstance(error, RuncapError)
    assert (error.code, error.reason) == (row.code, row.reason)
    assert error.message
    assert isinstance(error.details[0], error_details_pb2.ErrorInfo)
    assert error.details[0].domain == "runcap.dev"
    row.check(error)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.reason)
def test_from_status_maps_every_server_error(row: Row) -> None:
    _, status = server_errors.to_status(row.error)
    _check(row, from_status(status))


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.reason)
def test_sync_call_raises_typed_error(
    fake: tuple[FakeBudget, str], client: RuncapClient, row: Row
) -> None:
    fake[0].failures["GetRun"].append(row.error)
    with RuncapClient(fake[1], retry=NO_RETRY) as once, pytest.raises(RuncapError) as caught:
        once.get_run("run-1")
    _check(row, caught.value)
    assert isinstance(caught.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.reason)
async def test_async_call_raises_typed_error(fake: tuple[FakeBudget, str], row: Row) -> None:
    fake[0].failures["GetRun"].append(row.error)
    async with AsyncRuncapClient(fake[1], retry=NO_RETRY) as once:
        with pytest.raises(RuncapError) as caught:
            await once.get_run("run-1")
    _check(row, caught.value)
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.UNKNOWN, InternalError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, RevisionOutOfRangeError),
        (grpc.StatusCode.NOT_FOUND, RuncapError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.ABORTED, RuncapError),
    ],
)
def test_status_without_runcap_error_info_maps_by_code(
    code: grpc.StatusCode, kind: type[RuncapError]
) -> None:
    foreign = error_details_pb2.ErrorInfo(reason="RUN_NOT_FOUND", domain="proxy.example")
    status = status_pb2.Status(code=code.value[0], message="from a proxy")
    status.details.add().Pack(foreign)
    error = from_status(status)
    assert type(error) is kind
    assert (error.code, error.reason, error.message) == (code, "RUN_NOT_FOUND", "from a proxy")
    bare = from_status(status_pb2.Status(code=code.value[0], message="bare"))
    assert type(bare) is kind
    assert bare.reason == ""


def test_plain_transport_unavailable_is_unavailable_error() -> None:
    # Nothing listens on port 1 of loopback: the channel itself fails.
    with (
        RuncapClient("127.0.0.1:1", retry=NO_RETRY, timeout=5) as nowhere,
        pytest.raises(UnavailableError) as caught,
    ):
        nowhere.get_run("run-1")
    assert caught.value.reason == ""
    assert caught.value.retry_after is None


def test_from_rpc_error_survives_a_garbled_status() -> None:
    garbled = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", b"\xff\xff not a status")),
        "reset by peer",
        None,
    )
    error = runcap.from_rpc_error(garbled)
    assert type(error) is UnavailableError
    assert (error.reason, error.message, error.details) == ("", "reset by peer", [])


def test_unknown_detail_types_are_kept_packed() -> None:
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="gone")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="RUN_NOT_FOUND", domain="runcap.dev")
    )
    status.details.add().Pack(pb.Progress())
    error = from_status(status)
    assert isinstance(error, RunNotFoundError)
    assert error.details[1].DESCRIPTOR.full_name == "google.protobuf.Any"
    assert str(error) == "NOT_FOUND RUN_NOT_FOUND: gone"


# --- retries ----------------------------------------------------------------------------


def test_retry_policy_backs_off_and_honours_retry_info() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=5.0)
    plain = UnavailableError(grpc.StatusCode.UNAVAILABLE, "", "down")
    waits = [policy.delay(n, plain) for n in range(1, 5)]
    for n, wait in enumerate(waits, start=1):
        assert wait is not None
        ceiling = min(5.0, 0.1 * 2 ** (n - 1))
        assert ceiling / 2 <= wait <= ceiling
    assert policy.delay(5, plain) is None
    _, status = server_errors.to_status(server_errors.BackendUnavailable("x", 2000))
    hinted = from_status(status)
    assert policy.delay(1, hinted) == 2.0
    _, status = server_errors.to_status(server_errors.BackendUnavailable("x", 60_000))
    assert policy.delay(1, from_status(status)) == 5.0
    internal = InternalError(grpc.StatusCode.INTERNAL, "INTERNAL", "boom")
    assert policy.delay(1, internal) is None


def test_idempotent_calls_retry_unavailable(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    for method in ("Reserve", "Commit", "Refund", "CloseRun", "CreateRun", "GetRun"):
        budget.failures[method] += [
            server_errors.ShuttingDown(retry_after_ms=1),
            server_errors.BackendUnavailable("busy", retry_after_ms=1),
        ]
    assert client.reserve_once("run-1", 10, reservation_id="res-1").amount_micros == 10
    assert client.commit("run-1", "res-1", 7).actual_micros == 7
    client.refund("run-1", "res-1")
    client.close_run("run-1")
    client.create_run("run-1", limit_micros=5)
    client.get_run("run-1")
    for method in ("Reserve", "Commit", "Refund", "CloseRun", "CreateRun", "GetRun"):
        assert len(budget.calls[method]) == 3, method


def test_suspend_and_resume_retry_unavailable_and_type_a_closed_run(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    for method in ("SuspendRun", "ResumeRun"):
        budget.failures[method] += [
            server_errors.ShuttingDown(retry_after_ms=1),
            server_errors.BackendUnavailable("busy", retry_after_ms=1),
        ]
    assert client.suspend_run("run-1").state.status == budget_pb2.RUN_STATUS_SUSPENDED
    assert client.resume_run("run-1").state.run_id == "run-1"
    assert budget.calls["SuspendRun"] == [pb.SuspendRunRequest(run_id="run-1")] * 3
    assert budget.calls["ResumeRun"] == [pb.ResumeRunRequest(run_id="run-1")] * 3

    budget.failures["SuspendRun"].append(server_errors.RunClosed("run-2"))
    with pytest.raises(RunClosedError) as caught:
        client.suspend_run("run-2")
    assert (caught.value.code, caught.value.run_id) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "run-2",
    )
    assert len(budget.calls["SuspendRun"]) == 4  # final: not retried


async def test_async_suspend_and_resume_retry_unavailable_and_type_a_closed_run(
    fake: tuple[FakeBudget, str], aclient: AsyncRuncapClient
) -> None:
    budget = fake[0]
    budget.failures["SuspendRun"] += [server_errors.ShuttingDown(retry_after_ms=1)] * 2
    suspended = await aclient.suspend_run("run-1")
    assert suspended.state.status == budget_pb2.RUN_STATUS_SUSPENDED
    assert len(budget.calls["SuspendRun"]) == 3
    budget.failures["ResumeRun"].append(server_errors.RunClosed("run-1"))
    with pytest.raises(RunClosedError):
        await aclient.resume_run("run-1")
    assert len(budget.calls["ResumeRun"]) == 1


def test_calls_without_client_side_id_are_not_retried(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.failures["Reserve"].append(server_errors.ShuttingDown(retry_after_ms=1))
    budget.failures["CreateRun"].append(server_errors.ShuttingDown(retry_after_ms=1))
    with pytest.raises(UnavailableError):
        client.reserve_once("run-1", 10)
    with pytest.raises(UnavailableError):
        client.create_run(limit_micros=5)
    assert (len(budget.calls["Reserve"]), len(budget.calls["CreateRun"])) == (1, 1)


def test_retries_stop_after_max_attempts(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.failures["Commit"] += [server_errors.ShuttingDown(retry_after_ms=1)] * 10
    with pytest.raises(UnavailableError):
        client.commit("run-1", "res-1", 1)
    assert len(budget.calls["Commit"]) == FAST.max_attempts


async def test_async_idempotent_calls_retry_unavailable(
    fake: tuple[FakeBudget, str], aclient: AsyncRuncapClient
) -> None:
    budget = fake[0]
    budget.failures["Reserve"] += [server_errors.ShuttingDown(retry_after_ms=1)] * 2
    budget.failures["Refund"] += [server_errors.ShuttingDown(retry_after_ms=1)] * 10
    response = await aclient.reserve_once("run-1", 10, reservation_id="res-1")
    assert response.replayed is False
    assert len(budget.calls["Reserve"]) == 3
    with pytest.raises(UnavailableError):
        await aclient.refund("run-1", "res-1")
    assert len(budget.calls["Refund"]) == FAST.max_attempts


# --- the reserve context manager --------------------------------------------------------


def test_hold_reserves_with_a_generated_id_and_commits_on_exit(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.failures["Reserve"].append(server_errors.ShuttingDown(retry_after_ms=1))
    with client.reserve("run-1", 40, ttl=30) as hold:
        assert hold.amount_micros == 40
    first, retry = budget.calls["Reserve"]
    assert first == retry
    assert isinstance(first, pb.ReserveRequest)
    assert len(first.reservation_id) == 32
    assert first.ttl.ToMilliseconds() == 30_000
    (commit,) = budget.calls["Commit"]
    assert (commit, hold.commit_response is not None) == (
        pb.CommitRequest(run_id="run-1", reservation_id=first.reservation_id, actual_micros=40),
        True,
    )


def test_settle_failure_is_a_note_on_the_body_exception(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    fake[0].failures["Refund"].append(server_errors.RunNotFound("run-1"))
    with pytest.raises(KeyError) as caught, client.reserve("run-1", 40) as hold:
        raise KeyError("body failed")
    assert hold.refund_response is None
    assert "expires at its ttl" in caught.value.__notes__[0]


def test_settle_failure_after_a_clean_body_raises(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    fake[0].failures["Commit"].append(server_errors.ReservationReleased("run-1", "x"))
    with pytest.raises(ReservationReleasedError), client.reserve("run-1", 40):
        pass


async def test_async_hold_blocked_raises_before_the_body(
    fake: tuple[FakeBudget, str], aclient: AsyncRuncapClient
) -> None:
    fake[0].block = True
    entered = False
    with pytest.raises(BudgetBlockedError) as caught:
        async with aclient.reserve("run-1", 40):
            entered = True
    assert not entered
    assert caught.value.reason == budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET
    assert caught.value.state.limit_micros == 1000
    assert not isinstance(caught.value, RuncapError)
    assert fake[0].calls["Commit"] == fake[0].calls["Refund"] == []


async def test_async_hold_refunds_when_the_task_is_cancelled(
    fake: tuple[FakeBudget, str], aclient: AsyncRuncapClient
) -> None:
    started = asyncio.Event()

    async def body() -> None:
        async with aclient.reserve("run-1", 40):
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake[0].calls["Refund"]) == 1
    assert fake[0].calls["Commit"] == []


# --- Watch ------------------------------------------------------------------------------


def revisions(messages: list[pb.WatchResponse]) -> list[tuple[str | None, int]]:
    return [(m.WhichOneof("kind"), m.revision) for m in messages]


EVENTS_2_TO_10 = [("event", r) for r in range(2, 11)]


def test_watch_resumes_across_disconnects_without_duplicates(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.watch_plan = [
        Connection(3, "unavailable"),
        Connection(2, "shutting_down", overlap=2),
        Connection(3, "final", heartbeat=True),
        Connection(0, "unavailable"),
        Connection(99, "end", overlap=1),
    ]
    with client.watch("run-1", reconnect=FAST) as stream:
        seen = list(stream)
    assert revisions(seen) == [
        ("snapshot", 1),
        ("event", 2),
        ("event", 3),
        ("progress", 3),
        ("event", 4),
        ("event", 5),
        ("event", 6),
        ("event", 7),
        ("event", 8),
        ("event", 9),
        ("event", 10),
    ]
    assert (stream.last_revision, stream.reconnects) == (10, 4)
    resumed = [
        r.after_revision if r.HasField("after_revision") else None
        for r in budget.calls["Watch"]
        if isinstance(r, pb.WatchRequest)
    ]
    assert resumed == [None, 3, 3, 5, 5]


async def test_async_watch_resumes_across_disconnects_without_duplicates(
    fake: tuple[FakeBudget, str], aclient: AsyncRuncapClient
) -> None:
    fake[0].watch_plan = [
        Connection(4, "shutting_down"),
        Connection(2, "final", overlap=3),
        Connection(99, "end"),
    ]
    async with aclient.watch("run-1", after_revision=2, reconnect=FAST) as stream:
        seen = [message async for message in stream]
    assert revisions(seen) == [("event", r) for r in range(3, 11)]


def test_watch_without_resume_surfaces_disconnects(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    fake[0].watch_plan = [Connection(2, "final"), Connection(2, "shutting_down")]
    with client.watch("run-1", resume=False) as stream:
        seen = list(stream)
    assert revisions(seen) == [("snapshot", 1), ("event", 2), ("progress", 2)]
    assert seen[-1].progress.final
    with client.watch("run-1", resume=False) as stream, pytest.raises(UnavailableError):
        list(stream)


def test_watch_backs_off_when_streams_keep_ending_at_once(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    fake[0].watch_plan = [Connection(2, "final")] + [Connection(0, "final")] * 3
    slow = RetryPolicy(max_attempts=2, initial_backoff=0.1, max_backoff=0.1)
    started = time.monotonic()
    with client.watch("run-1", reconnect=slow) as stream:
        seen = list(stream)
    # Three empty connections in a row: the first reconnect is immediate,
    # the next three wait 0.05 to 0.1 s each; the attempt limit does not apply.
    assert time.monotonic() - started >= 0.15
    assert revisions(seen) == [("snapshot", 1), *EVENTS_2_TO_10]
    assert stream.reconnects == 4


def test_watch_gives_up_after_max_attempts(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    fake[0].watch_plan = [Connection(0, "unavailable")] * 10
    with client.watch("run-1", reconnect=FAST) as stream, pytest.raises(UnavailableError):
        list(stream)
    assert len(fake[0].calls["Watch"]) == FAST.max_attempts


def test_watch_out_of_range_raises_or_resnapshots(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    budget = fake[0]
    budget.floor = 5
    with (
        client.watch("run-1", after_revision=2) as stream,
        pytest.raises(RevisionOutOfRangeError) as caught,
    ):
        next(stream)
    assert caught.value.head == 10
    with client.watch("run-1", after_revision=2, resnapshot_on_out_of_range=True) as stream:
        seen = list(stream)
    assert revisions(seen) == [("snapshot", 1), *EVENTS_2_TO_10]


def test_watch_close_from_another_thread_stops_iteration(
    fake: tuple[FakeBudget, str], client: RuncapClient
) -> None:
    fake[0].watch_plan = [Connection(3, "hang")]
    stream = client.watch("run-1")
    seen: list[pb.WatchResponse] = []
    reader = threading.Thread(target=lambda: seen.extend(stream))
    reader.start()
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stream.close()
    reader.join(10)
    assert not reader.is_alive()
    assert revisions(seen) == [("snapshot", 1), ("event", 2), ("event", 3)]
    assert len(fake[0].calls["Watch"]) == 1


async def test_async_watch_aclose_from_another_task_stops_iteration(
    fake: tuple[FakeBudget, str], aclient: AsyncRuncapClient
) -> None:
    fake[0].watch_plan = [Connection(3, "hang")]
    stream = aclient.watch("run-1")
    seen: list[pb.WatchResponse] = []
    three = asyncio.Event()

    async def read() -> None:
        async for message in stream:
            seen.append(message)
            if len(seen) == 3:
                three.set()

    reader = asyncio.create_task(read())
    await asyncio.wait_for(three.wait(), 10)
    await stream.aclose()
    await asyncio.wait_for(reader, 10)
    assert revisions(seen) == [("snapshot", 1), ("event", 2), ("event", 3)]


def test_public_api_is_exported() -> None:
    for name in runcap.__all__:
        assert hasattr(runcap, name), name


def test_a_suspended_block_says_so_not_how_much_remains() -> None:
    response = pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_SUSPENDED,
        reservation_id="r1",
        blocking_scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_RUN, id="root"),
        state=budget_pb2.BudgetState(run_id="kid", limit_micros=100, remaining_micros=100),
    )
    error = BudgetBlockedError("kid", response)
    assert error.suspended
    assert not error.unknown_price
    assert "run 'root' is suspended" in str(error)
    assert "remain" not in str(error)
