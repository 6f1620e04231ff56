"""Every failure the service reports, defined once.

The ledger and the edge raise these typed exceptions; `to_status` is the one
place that turns them into a `google.rpc.Status` with an ErrorInfo (reason from
runcap.v1.ErrorReason) and at most one detail of each other type. Anything
else becomes INTERNAL with a trace id and no stack trace.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from runcap.v1 import errors_pb2

DOMAIN = "runcap.dev"
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class RuncapError(Exception):
    """A failure with a fixed gRPC code and ErrorInfo reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: int = errors_pb2.ERROR_REASON_INTERNAL

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata

    def details(self) -> list[Message]:
        """The error's detail messages besides ErrorInfo."""
        return []


# A failed call's status travels in trailing metadata twice (grpc-message,
# percent-encoded, and grpc-status-details-bin, base64), and gRPC clients drop
# a call whose metadata passes 8 KiB: a request with many bad fields gets the
# first of them that fit in MAX_SUMMARY characters and a count of the rest
# (at most ~6.5 KiB of metadata, even if every character is percent-encoded).
MAX_SUMMARY = 1000
MAX_TEXT = 200


def _ascii(text: str) -> str:
    """Echoed input as ASCII (no encoding blow-up; an invisible character shows)."""
    text = text.encode("ascii", "backslashreplace").decode()
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


class InvalidArgument(RuncapError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = errors_pb2.ERROR_REASON_INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations: list[FieldViolation] = []
        size = 0
        for v in violations:
            shown = FieldViolation(_ascii(v.field), _ascii(v.description))
            size += len(shown.field) + len(shown.description)
            if self.violations and size > MAX_SUMMARY:
                break
            self.violations.append(shown)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        if len(violations) > len(self.violations):
            summary += f"; and {len(violations) - len(self.violations)} more"
        super().__init__(f"invalid request: {summary}", fields=",".join(self.fields))

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.violations]

    def details(self) -> list[Message]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        ]


def committed_total_out_of_range(run_id: str) -> InvalidArgument:
    """A commit whose actual cost would push the run's total past exact range."""
    return InvalidArgument(
        [
            FieldViolation(
                "actual_micros",
                f"would bring run {run_id!r}'s committed total past {2**53 - 1} micro-USD",
            )
        ]
    )


class _ResourceError(RuncapError):
    resource_type = ""

    def __init__(self, message: str, resource_name: str, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.resource_name = resource_name

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=self.resource_type,
                resource_name=self.resource_name,
                description=self.message,
            )
        ]


class RunNotFound(_ResourceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_RUN_NOT_FOUND
    resource_type = "runcap.v1.Run"

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run {run_id!r} does not exist; create it with CreateRun first",
            run_id,
            run_id=run_id,
        )


class ReservationNotFound(_ResourceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_RESERVATION_NOT_FOUND
    resource_type = "runcap.v1.Reservation"

    def __init__(self, run_id: str, reservation_id: str) -> None:
        super().__init__(
            f"run {run_id!r} has no reservation {reservation_id!r}",
            f"{run_id}/{reservation_id}",
            run_id=run_id,
            reservation_id=reservation_id,
        )


class DecisionNotFound(_ResourceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_DECISION_NOT_FOUND
    resource_type = "runcap.v1.Decision"

    def __init__(self, decision_id: str) -> None:
        super().__init__(
            f"there is no decision {decision_id!r} (never made, or its run aged out)",
            decision_id,
        )


class ApprovalNotFound(_ResourceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_APPROVAL_NOT_FOUND
    resource_type = "runcap.v1.Approval"

    def __init__(self, approval_id: str) -> None:
        super().__init__(
            f"there is no approval {approval_id!r}: its run never requested it", approval_id
        )


class RunAlreadyExists(_ResourceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = errors_pb2.ERROR_REASON_RUN_ALREADY_EXISTS
    resource_type = "runcap.v1.Run"

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run {run_id!r} already exists with different arguments; "
            "use a new run id, or repeat the original arguments",
            run_id,
            run_id=run_id,
        )


class IdempotencyConflict(_ResourceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = errors_pb2.ERROR_REASON_IDEMPOTENCY_CONFLICT
    resource_type = "runcap.v1.Reservation"

    def __init__(self, run_id: str, reservation_id: str, what: str) -> None:
        super().__init__(
            f"reservation {reservation_id!r} of run {run_id!r} was already {what} "
            "with different arguments; retry only with the original arguments, "
            "or use a new reservation id",
            f"{run_id}/{reservation_id}",
            run_id=run_id,
            reservation_id=reservation_id,
        )


class ParentRunNotFound(_ResourceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_PARENT_RUN_NOT_FOUND
    resource_type = "runcap.v1.Run"

    def __init__(self, run_id: str, parent_run_id: str) -> None:
        super().__init__(
            f"parent run {parent_run_id!r} of run {run_id!r} does not exist; "
            "create the parent first",
            parent_run_id,
            run_id=run_id,
            parent_run_id=parent_run_id,
        )


class _PreconditionError(RuncapError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    violation_type = ""

    def __init__(self, message: str, run_id: str, reservation_id: str) -> None:
        super().__init__(message, run_id=run_id, reservation_id=reservation_id)
        self.subject = f"{run_id}/{reservation_id}"

    def details(self) -> list[Message]:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=self.violation_type, subject=self.subject, description=self.message
                    )
                ]
            )
        ]


class ReservationBlocked(_PreconditionError):
    reason = errors_pb2.ERROR_REASON_RESERVATION_BLOCKED
    violation_type = "RESERVATION_BLOCKED"

    def __init__(self, run_id: str, reservation_id: str) -> None:
        super().__init__(
            f"reservation {reservation_id!r} of run {run_id!r} was blocked, "
            "so nothing is held to commit or refund",
            run_id,
            reservation_id,
        )


class ReservationReleased(_PreconditionError):
    reason = errors_pb2.ERROR_REASON_RESERVATION_RELEASED
    violation_type = "RESERVATION_RELEASED"

    def __init__(self, run_id: str, reservation_id: str) -> None:
        super().__init__(
            f"reservation {reservation_id!r} of run {run_id!r} was refunded and "
            "can no longer be committed; reserve again under a new id",
            run_id,
            reservation_id,
        )


class ParentRunClosed(_PreconditionError):
    reason = errors_pb2.ERROR_REASON_PARENT_RUN_CLOSED
    violation_type = "PARENT_RUN_CLOSED"

    def __init__(self, run_id: str, parent_run_id: str) -> None:
        super().__init__(
            f"parent run {parent_run_id!r} of run {run_id!r} is closed and takes "
            "no new subagent runs",
            run_id,
            "",
        )
        self.subject = parent_run_id


class SubagentLimit(_PreconditionError):
    reason = errors_pb2.ERROR_REASON_SUBAGENT_LIMIT
    violation_type = "SUBAGENT_LIMIT"

    def __init__(self, run_id: str, parent_run_id: str, what: str) -> None:
        super().__init__(
            f"run {run_id!r} cannot be created under {parent_run_id!r}: {what}", run_id, ""
        )
        self.subject = parent_run_id


class ApprovalResolved(_PreconditionError):
    reason = errors_pb2.ERROR_REASON_APPROVAL_RESOLVED
    violation_type = "APPROVAL_RESOLVED"

    def __init__(self, run_id: str, approval_id: str, status: str) -> None:
        super().__init__(f"approval {approval_id!r} is already {status}", run_id, "")
        self.subject = approval_id


class RunClosed(_PreconditionError):
    reason = errors_pb2.ERROR_REASON_RUN_CLOSED
    violation_type = "RUN_CLOSED"

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run {run_id!r} is closed: it can no longer be suspended or resumed", run_id, ""
        )
        self.subject = run_id


class RevisionOutOfRange(RuncapError):
    code = grpc.StatusCode.OUT_OF_RANGE
    reason = errors_pb2.ERROR_REASON_REVISION_OUT_OF_RANGE

    def __init__(
        self, run_id: str, after_revision: int, floor: int, head: int, *, diverged: bool = False
    ) -> None:
        if diverged:
            why = (
                "the run's history at that revision is not the one the client saw "
                "(a failover may have lost changes)"
            )
        elif after_revision > head:
            why = f"the run is only at revision {head}"
        else:
            why = f"the oldest retained change is revision {floor}"
        super().__init__(
            f"cannot resume run {run_id!r} after revision {after_revision}: {why}; "
            "watch again without after_revision to get a fresh snapshot",
            run_id=run_id,
            after_revision=str(after_revision),
            floor=str(floor),
            head=str(head),
            diverged="true" if diverged else "false",
        )


class Unauthenticated(RuncapError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = errors_pb2.ERROR_REASON_UNAUTHENTICATED


class PermissionDenied(RuncapError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = errors_pb2.ERROR_REASON_PERMISSION_DENIED


class OpenRunLimit(RuncapError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = errors_pb2.ERROR_REASON_OPEN_RUN_LIMIT

    def __init__(self, principal: str, limit: int) -> None:
        super().__init__(
            f"{principal} already has {limit} open runs, the most one caller may have: "
            "close finished runs (CloseRun) and retry; abandoned runs close by themselves "
            "after the run TTL",
            principal=principal,
            limit=str(limit),
        )
        self.principal = principal
        self.limit = limit

    def details(self) -> list[Message]:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=self.principal, description=f"at most {self.limit} open runs"
        )
        return [error_details_pb2.QuotaFailure(violations=[violation])]


class _RetryableError(RuncapError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def details(self) -> list[Message]:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(self.retry_after_ms)
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class BackendUnavailable(_RetryableError):
    reason = errors_pb2.ERROR_REASON_BACKEND_UNAVAILABLE

    def __init__(self, what: str, retry_after_ms: int = 1000) -> None:
        super().__init__(
            f"the budget ledger is unavailable ({what}); retry later with the same ids "
            "(a call that timed out may still have been applied: its retry returns the outcome)",
            retry_after_ms,
        )


class ShuttingDown(_RetryableError):
    reason = errors_pb2.ERROR_REASON_SHUTTING_DOWN

    def __init__(self, retry_after_ms: int = 100) -> None:
        super().__init__("this server is shutting down; retry on another replica", retry_after_ms)


def reason_name(reason: int) -> str:
    """The ErrorInfo reason string: the enum name without its prefix."""
    return errors_pb2.ErrorReason.Name(reason).removeprefix("ERROR_REASON_")  # type: ignore[arg-type]


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC code and rich status for any exception raised by a handler."""
    if not isinstance(error, RuncapError):
        trace_id = uuid.uuid4().hex
        _log.error("internal error, trace id %s", trace_id, exc_info=error)
        error = RuncapError(f"internal error; quote trace id {trace_id} when reporting it")
        error.metadata["trace_id"] = trace_id
    info = error_details_pb2.ErrorInfo(
        reason=reason_name(error.reason), domain=DOMAIN, metadata=error.metadata
    )
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=error.message,
        details=[_pack(info), *(_pack(d) for d in error.details())],
    )
    return error.code, status
