"""Typed errors for runcap clients.

The server reports every failure as a `google.rpc.Status` with exactly one
`google.rpc.ErrorInfo` (domain ``runcap.dev``, reason a `runcap.v1.ErrorReason`
name without its ``ERROR_REASON_`` prefix) and at most one detail of each other
type. `from_rpc_error` turns such a status, read from the trailing metadata of a
failed sync or asyncio call, back into one exception class per reason; the table
`REASON_TO_ERROR` is the single place that mapping lives. A status without a
runcap ErrorInfo (a proxy's or the transport's own error) maps by its gRPC code.

A block decision is not a failure: `reserve_once` returns it in the response.
Only the `reserve(...)` context managers turn it into `BudgetBlockedError` (a
throttle decision into its subclass `BudgetThrottledError`, an escalation
into its subclass `ApprovalRequiredError`), which
deliberately does not derive from `RuncapError`, so that code which fails
open on service trouble (``except RuncapError``) never fails open on a block.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from runcap.v1 import budget_pb2, budget_service_pb2, errors_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

DOMAIN: Final = "runcap.dev"
"""The ErrorInfo domain of every error the runcap server sends."""

STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
"""The trailing metadata key that carries the serialized `google.rpc.Status`."""

_DETAIL_TYPES: Final[tuple[type[Message], ...]] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.DebugInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)

_M = TypeVar("_M", bound=Message)
_V = TypeVar("_V", bound=int)


class RuncapError(Exception):
    """A failed runcap call.

    Attributes:
        code: The gRPC status code.
        reason: The ErrorInfo reason (for example ``"RUN_NOT_FOUND"``), or ``""``
            when the status carried no runcap ErrorInfo.
        message: The human-readable status message.
        metadata: The ErrorInfo metadata (for example ``run_id``).
        details: Every detail message of the status, unpacked (ErrorInfo,
            BadRequest, ResourceInfo, ...). A detail of a type this module does
            not know stays a packed `google.protobuf.Any`.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.details: list[Message] = list(details)

    def __str__(self) -> str:
        label = f"{self.code.name} {self.reason}" if self.reason else self.code.name
        return f"{label}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason!r}, {self.message!r})"

    def detail(self, kind: type[_M]) -> _M | None:
        """The first detail of type `kind`, or None."""
        for detail in self.details:
            if isinstance(detail, kind):
                return detail
        return None

    @property
    def resource_info(self) -> error_details_pb2.ResourceInfo | None:
        """The ResourceInfo detail, when the status has one."""
        return self.detail(error_details_pb2.ResourceInfo)


class InvalidArgumentError(RuncapError):
    """INVALID_ARGUMENT: a field is missing, malformed or out of range."""

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """Every offending field as ``(field, description)``, from BadRequest."""
        bad = self.detail(error_details_pb2.BadRequest)
        if bad is None:
            return []
        return [(v.field, v.description) for v in bad.field_violations]


class RunNotFoundError(RuncapError):
    """NOT_FOUND: the run does not exist."""

    @property
    def run_id(self) -> str:
        """The run that was not found."""
        return self.metadata.get("run_id", "")


class ReservationNotFoundError(RuncapError):
    """NOT_FOUND: the run has no reservation with this id."""

    @property
    def run_id(self) -> str:
        """The run that was searched."""
        return self.metadata.get("run_id", "")

    @property
    def reservation_id(self) -> str:
        """The reservation that was not found."""
        return self.metadata.get("reservation_id", "")


class ParentRunNotFoundError(RuncapError):
    """NOT_FOUND: CreateRun named a parent run that does not exist."""

    @property
    def run_id(self) -> str:
        """The run that was being created."""
        return self.metadata.get("run_id", "")

    @property
    def parent_run_id(self) -> str:
        """The parent run that was not found."""
        return self.metadata.get("parent_run_id", "")


class DecisionNotFoundError(RuncapError):
    """NOT_FOUND: ``get_decision`` named a decision the server does not have
    (never made, or its run aged out of retention)."""

    @property
    def decision_id(self) -> str:
        """The decision that was not found."""
        decision_id = self.metadata.get("decision_id", "")
        if decision_id:
            return decision_id
        info = self.resource_info
        return "" if info is None else info.resource_name


class ApprovalNotFoundError(RuncapError):
    """NOT_FOUND: ``approve`` or ``deny`` named an approval the run never
    requested (an id not taken from a ``DECISION_APPROVAL_REQUIRED`` answer,
    a Watch event or ``run.approvals``)."""

    @property
    def approval_id(self) -> str:
        """The approval that was not found."""
        approval_id = self.metadata.get("approval_id", "")
        if approval_id:
            return approval_id
        info = self.resource_info
        return "" if info is None else info.resource_name


class RunAlreadyExistsError(RuncapError):
    """ALREADY_EXISTS: a run with this id exists with different arguments."""

    @property
    def run_id(self) -> str:
        """The run that already exists."""
        return self.metadata.get("run_id", "")


class IdempotencyConflictError(RuncapError):
    """ALREADY_EXISTS: the reservation id was used before with other arguments.

    Retry only with the original arguments, or use a new reservation id.
    """

    @property
    def run_id(self) -> str:
        """The run of the reservation."""
        return self.metadata.get("run_id", "")

    @property
    def reservation_id(self) -> str:
        """The reservation id that was reused."""
        return self.metadata.get("reservation_id", "")


class _PreconditionError(RuncapError):
    @property
    def violations(self) -> list[tuple[str, str, str]]:
        """Each PreconditionFailure violation as ``(type, subject, description)``."""
        failure = self.detail(error_details_pb2.PreconditionFailure)
        if failure is None:
            return []
        return [(v.type, v.subject, v.description) for v in failure.violations]


class ReservationBlockedError(_PreconditionError):
    """FAILED_PRECONDITION: the reservation was blocked; nothing is held."""


class ReservationReleasedError(_PreconditionError):
    """FAILED_PRECONDITION: the reservation was refunded; it cannot be committed."""


class ParentRunClosedError(_PreconditionError):
    """FAILED_PRECONDITION: CreateRun named a parent run that is closed; a
    closed run takes no new subagent runs."""

    @property
    def run_id(self) -> str:
        """The run that was being created."""
        return self.metadata.get("run_id", "")

    @property
    def parent_run_id(self) -> str:
        """The closed parent run."""
        parent = self.metadata.get("parent_run_id", "")
        if parent:
            return parent
        return next((subject for _, subject, _ in self.violations), "")


class RunClosedError(_PreconditionError):
    """FAILED_PRECONDITION: SuspendRun or ResumeRun named a run that is closed;
    a closed run can no longer be suspended or resumed."""

    @property
    def run_id(self) -> str:
        """The closed run."""
        run_id = self.metadata.get("run_id", "")
        if run_id:
            return run_id
        return next((subject for _, subject, _ in self.violations), "")


class SubagentLimitError(_PreconditionError):
    """FAILED_PRECONDITION: CreateRun would give the parent run more children
    than its policy's ``max_children``, or nest deeper than an ancestor's
    ``max_depth`` allows; the PreconditionFailure detail says which."""

    @property
    def run_id(self) -> str:
        """The run that was being created."""
        return self.metadata.get("run_id", "")

    @property
    def parent_run_id(self) -> str:
        """The parent run it was to be created under."""
        parent = self.metadata.get("parent_run_id", "")
        if parent:
            return parent
        return next((subject for _, subject, _ in self.violations), "")


class ApprovalResolvedError(_PreconditionError):
    """FAILED_PRECONDITION: the approval was already resolved the other way:
    ``approve`` of a denied approval, or ``deny`` of an approved one. A
    resolved approval stays as it is; repeating the same call is a replay,
    not this error."""

    @property
    def run_id(self) -> str:
        """The run the approval belongs to."""
        return self.metadata.get("run_id", "")

    @property
    def approval_id(self) -> str:
        """The approval that is already resolved."""
        approval_id = self.metadata.get("approval_id", "")
        if approval_id:
            return approval_id
        return next((subject for _, subject, _ in self.violations), "")


class UnauthenticatedError(RuncapError):
    """UNAUTHENTICATED: the server needs an API key and the call carried none,
    or one it does not know (or that was revoked). Pass
    ``metadata=[("authorization", "Bearer <key>")]`` to the client."""


class PermissionDeniedError(RuncapError):
    """PERMISSION_DENIED: the key's role may not make this call, or the run is
    not one of the key's own (an agent key sees only its own runs; a run of
    another key and a missing run look the same)."""

    @property
    def key_id(self) -> str:
        """The id of the key that was refused."""
        return self.metadata.get("key_id", "")


class OpenRunLimitError(RuncapError):
    """RESOURCE_EXHAUSTED: the caller already has as many open runs as the
    server allows one principal. Close finished runs and retry; abandoned runs
    are closed by the server after its run TTL."""

    @property
    def limit(self) -> int | None:
        """The most open runs one principal may have."""
        value = self.metadata.get("limit", "")
        return int(value) if value.isdigit() else None


class RevisionOutOfRangeError(RuncapError):
    """OUT_OF_RANGE: Watch cannot resume from the requested revision.

    Watch again without ``after_revision`` to start from a fresh snapshot.
    """

    def _int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        try:
            return None if value is None else int(value)
        except ValueError:
            return None

    @property
    def after_revision(self) -> int | None:
        """The requested resume point."""
        return self._int("after_revision")

    @property
    def floor(self) -> int | None:
        """The oldest revision the server still retains."""
        return self._int("floor")

    @property
    def head(self) -> int | None:
        """The run's current revision."""
        return self._int("head")


class UnavailableError(RuncapError):
    """UNAVAILABLE: the call can be retried, with the same ids (a call that
    timed out on the server's storage may still have been applied; its retry
    returns that outcome, never a second one).

    Covers BACKEND_UNAVAILABLE (the ledger's storage is down), SHUTTING_DOWN
    (this replica is draining) and the transport's own UNAVAILABLE (no
    connection), which carries no ErrorInfo.
    """

    @property
    def retry_after(self) -> float | None:
        """The server's suggested delay in seconds, from RetryInfo, or None."""
        info = self.detail(error_details_pb2.RetryInfo)
        if info is None or not info.HasField("retry_delay"):
            return None
        return float(info.retry_delay.ToNanoseconds()) / 1e9


class InternalError(RuncapError):
    """INTERNAL (or UNKNOWN, DATA_LOSS): an unexpected fault."""

    @property
    def trace_id(self) -> str:
        """The server's trace id to quote in a bug report, or ``""``."""
        return self.metadata.get("trace_id", "")


def _reason(value: errors_pb2.ErrorReason.ValueType) -> str:
    return errors_pb2.ErrorReason.Name(value).removeprefix("ERROR_REASON_")


REASON_TO_ERROR: Final[Mapping[str, type[RuncapError]]] = {
    _reason(errors_pb2.ERROR_REASON_INVALID_ARGUMENT): InvalidArgumentError,
    _reason(errors_pb2.ERROR_REASON_RUN_NOT_FOUND): RunNotFoundError,
    _reason(errors_pb2.ERROR_REASON_RESERVATION_NOT_FOUND): ReservationNotFoundError,
    _reason(errors_pb2.ERROR_REASON_RUN_ALREADY_EXISTS): RunAlreadyExistsError,
    _reason(errors_pb2.ERROR_REASON_IDEMPOTENCY_CONFLICT): IdempotencyConflictError,
    _reason(errors_pb2.ERROR_REASON_RESERVATION_BLOCKED): ReservationBlockedError,
    _reason(errors_pb2.ERROR_REASON_RESERVATION_RELEASED): ReservationReleasedError,
    _reason(errors_pb2.ERROR_REASON_REVISION_OUT_OF_RANGE): RevisionOutOfRangeError,
    _reason(errors_pb2.ERROR_REASON_BACKEND_UNAVAILABLE): UnavailableError,
    _reason(errors_pb2.ERROR_REASON_SHUTTING_DOWN): UnavailableError,
    _reason(errors_pb2.ERROR_REASON_INTERNAL): InternalError,
    _reason(errors_pb2.ERROR_REASON_PARENT_RUN_NOT_FOUND): ParentRunNotFoundError,
    _reason(errors_pb2.ERROR_REASON_PARENT_RUN_CLOSED): ParentRunClosedError,
    _reason(errors_pb2.ERROR_REASON_RUN_CLOSED): RunClosedError,
    _reason(errors_pb2.ERROR_REASON_SUBAGENT_LIMIT): SubagentLimitError,
    _reason(errors_pb2.ERROR_REASON_DECISION_NOT_FOUND): DecisionNotFoundError,
    _reason(errors_pb2.ERROR_REASON_APPROVAL_NOT_FOUND): ApprovalNotFoundError,
    _reason(errors_pb2.ERROR_REASON_APPROVAL_RESOLVED): ApprovalResolvedError,
    _reason(errors_pb2.ERROR_REASON_UNAUTHENTICATED): UnauthenticatedError,
    _reason(errors_pb2.ERROR_REASON_PERMISSION_DENIED): PermissionDeniedError,
    _reason(errors_pb2.ERROR_REASON_OPEN_RUN_LIMIT): OpenRunLimitError,
}
"""The one table from ErrorInfo reason to exception class."""

_CODE_TO_ERROR: Final[Mapping[grpc.StatusCode, type[RuncapError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: RevisionOutOfRangeError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}
"""The fallback for statuses without a known runcap reason."""

_CODES_BY_NUMBER: Final[Mapping[int, grpc.StatusCode]] = {
    code.value[0]: code for code in grpc.StatusCode
}


def _unpack(packed: any_pb2.Any) -> Message:
    for kind in _DETAIL_TYPES:
        if packed.TypeName() == kind.DESCRIPTOR.full_name:
            message = kind()
            packed.Unpack(message)
            return message
    return packed


def error_class(code: grpc.StatusCode, reason: str) -> type[RuncapError]:
    """The exception class for a status code and a runcap ErrorInfo reason."""
    return REASON_TO_ERROR.get(reason) or _CODE_TO_ERROR.get(code, RuncapError)


def from_status(status: status_pb2.Status, code: grpc.StatusCode | None = None) -> RuncapError:
    """The typed error for a `google.rpc.Status`.

    `code` overrides the status's own code, for example with the code the
    transport reported.
    """
    if code is None:
        code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    details = [_unpack(packed) for packed in status.details]
    infos = [d for d in details if isinstance(d, error_details_pb2.ErrorInfo)]
    ours = [info for info in infos if info.domain == DOMAIN]
    if ours:
        reason, metadata = ours[0].reason, dict(ours[0].metadata)
        kind = error_class(code, reason)
    else:
        # No ErrorInfo from runcap (a proxy's, say): keep its reason for
        # display, but choose the class by the code alone.
        reason = infos[0].reason if infos else ""
        metadata = dict(infos[0].metadata) if infos else {}
        kind = _CODE_TO_ERROR.get(code, RuncapError)
    return kind(code, reason, status.message, metadata, details)


def _status_from_metadata(
    trailing: Iterable[tuple[str, str | bytes]] | None,
) -> status_pb2.Status | None:
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY:
            raw = value if isinstance(value, bytes) else value.encode("latin-1")
            try:
                return status_pb2.Status.FromString(raw)
            except DecodeError:
                return None
    return None


def from_rpc_error(error: grpc.RpcError) -> RuncapError:
    """The typed error for a failed gRPC call.

    Works for the errors of sync calls (which are `grpc.Call` objects) and of
    asyncio calls (`grpc.aio.AioRpcError`), whose code, details and trailing
    metadata are all available without awaiting.
    """
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_of = getattr(error, "details", None)
    message = (details_of() if callable(details_of) else None) or str(error)
    trailing_of = getattr(error, "trailing_metadata", None)
    status = _status_from_metadata(trailing_of() if callable(trailing_of) else None)
    if status is None:
        return _CODE_TO_ERROR.get(code, RuncapError)(code, "", message)
    return from_status(status, code)


class BudgetBlockedError(Exception):
    """The server blocked a reservation made by a `reserve(...)` context manager.

    Not a `RuncapError`: the call succeeded and the answer was no. Nothing is
    held. A throttle decision is the subclass `BudgetThrottledError`, and a
    call that needs approval first (``DECISION_APPROVAL_REQUIRED``) the
    subclass `ApprovalRequiredError`, so ``except BudgetBlockedError``
    catches all three.

    Attributes:
        response: The ReserveResponse with the block decision.
        reason: Why (`runcap.v1.DecisionReason`), for example
            ``DECISION_REASON_INSUFFICIENT_BUDGET``.
        state: The run's budget state at the decision.
        blocking_scope: The scope whose ceiling (or closed ancestor run)
            blocked: the run itself, an ancestor run, or the run's API key,
            user or team. None when the server did not say.
        blocking_period: The period of the ceiling that blocked
            (`runcap.v1.Period`; ``PERIOD_LIFETIME`` for runs), or
            ``PERIOD_UNSPECIFIED`` when the server did not say.
        dimension: Which limit blocked (`runcap.v1.BudgetDimension`): spend,
            the run's token ceiling, a call meter, its rate limit or its
            in-flight cap; ``BUDGET_DIMENSION_UNSPECIFIED`` for a block by
            the run's lifecycle (closed, suspended) or when the server did
            not say.
        meter: For ``BUDGET_DIMENSION_METER``, the call meter at its
            ceiling; ``""`` otherwise.
        enforcement_mode: The run's `runcap.v1.EnforcementMode`, which
            shaped the decision (``ENFORCEMENT_MODE_UNSPECIFIED`` when the
            server did not say).
        estimate: For a reservation of an LLM call, how the server priced it
            (`runcap.v1.LlmEstimate`: provider, model, tokens, amount and
            price table version); None for an amount.
        decision_id: The decision's id, for ``get_decision`` (the decision
            with the inputs it was made from); ``""`` when the server did not
            say.
        alternatives: For an LLM call blocked by money, the models that could
            stand in for it (`runcap.v1.Alternative`: provider, model, the
            call's estimate on it and the output tokens that prices): each
            has every capability the call needs (see `LlmCall`) and fits what
            the blocking scope has left. Cheapest first, at most 5; empty
            when none fits or for an amount.
        approval_id: The escalation the decision is about: for a block by a
            denied approval (``DECISION_REASON_APPROVAL_DENIED``) the one that
            was denied, for an `ApprovalRequiredError` the one to approve;
            ``""`` otherwise.
    """

    def __init__(self, run_id: str, response: budget_service_pb2.ReserveResponse) -> None:
        self.run_id = run_id
        self.response = response
        self.reason: budget_pb2.DecisionReason.ValueType = response.reason
        self.state: budget_pb2.BudgetState = response.state
        self.blocking_scope: budget_pb2.ScopeRef | None = (
            response.blocking_scope if response.HasField("blocking_scope") else None
        )
        self.blocking_period: budget_pb2.Period.ValueType = response.blocking_period
        self.dimension: budget_pb2.BudgetDimension.ValueType = response.blocking_dimension
        self.meter: str = response.blocking_meter
        self.enforcement_mode: budget_pb2.EnforcementMode.ValueType = response.enforcement_mode
        self.estimate: budget_service_pb2.LlmEstimate | None = (
            response.estimate if response.HasField("estimate") else None
        )
        self.decision_id: str = response.decision_id
        self.alternatives: list[budget_service_pb2.Alternative] = list(response.alternatives)
        self.approval_id: str = response.approval_id
        super().__init__(self._describe())

    def _describe(self) -> str:
        response, run_id = self.response, self.run_id
        message = (
            f"reservation {response.reservation_id!r} of run {run_id!r} was blocked "
            f"({_enum_name(budget_pb2.DecisionReason, response.reason)}): "
        )
        estimate = self.estimate
        state = response.state
        if self.unknown_price:
            model = "the model"
            if estimate is not None:
                model = f"model {estimate.model!r} of provider {estimate.provider!r}"
                if estimate.price_table_version:
                    model += f" (price table {estimate.price_table_version!r})"
            return message + (
                f"unknown price: the server has no price for {model}, "
                "so runcap fails closed; nothing is held"
            )
        if self.approval_denied:
            which = f"approval {self.approval_id!r}" if self.approval_id else "its approval"
            return message + f"the call needs {which}, which was denied; nothing is held"
        if self.suspended:
            scope = self.blocking_scope
            which = f"run {scope.id!r}" if scope is not None else "the run"
            return message + (
                f"{which} is suspended (the kill switch); nothing is held until resumed"
            )
        if self.dimension == budget_pb2.BUDGET_DIMENSION_METER:
            which = f"meter {self.meter!r}" if self.meter else "the call meter"
            return message + f"{which} of the run is at its ceiling"
        if self.dimension == budget_pb2.BUDGET_DIMENSION_TOKENS:
            message += (
                f"the call does not fit the run's token ceiling ({state.committed_tokens} "
                f"tokens committed, {state.reserved_tokens} held)"
            )
            if estimate is not None:
                message += (
                    f"; the {estimate.provider}/{estimate.model} call was estimated at "
                    f"{estimate.input_tokens + estimate.effective_max_output_tokens} tokens"
                )
            return message
        message += f"{state.remaining_micros} of {state.limit_micros} micros remain"
        if estimate is not None:
            message += (
                f", the {estimate.provider}/{estimate.model} call was estimated at "
                f"{estimate.amount_micros} micros"
            )
        scope = self.blocking_scope
        if scope is not None and not (
            scope.kind == budget_pb2.SCOPE_KIND_RUN and scope.id == run_id
        ):
            kind = _enum_name(budget_pb2.ScopeKind, scope.kind)
            message += f" (blocked by {kind} {scope.id!r}"
            if response.blocking_period != budget_pb2.PERIOD_UNSPECIFIED:
                message += f", {_enum_name(budget_pb2.Period, response.blocking_period)}"
            message += ")"
        if self.alternatives:
            cheapest = self.alternatives[0]
            message += (
                f"; {len(self.alternatives)} alternative model(s) fit, the cheapest "
                f"{cheapest.provider}/{cheapest.model} at {cheapest.amount_micros} micros"
            )
        return message

    @property
    def reservation_id(self) -> str:
        """The blocked reservation's id."""
        return self.response.reservation_id

    @property
    def suspended(self) -> bool:
        """True when the block is ``DECISION_REASON_SUSPENDED``: an operator
        stopped the run or one of its ancestors (SuspendRun)."""
        return self.reason == budget_pb2.DECISION_REASON_SUSPENDED

    @property
    def approval_denied(self) -> bool:
        """True when the block is ``DECISION_REASON_APPROVAL_DENIED``: the call
        trips one of the run's escalation triggers, and its approval
        (`approval_id`) was denied."""
        return self.reason == budget_pb2.DECISION_REASON_APPROVAL_DENIED

    @property
    def unknown_price(self) -> bool:
        """True when the block is ``DECISION_REASON_UNKNOWN_PRICE``: the
        server has no price for the LLM call's provider and model (a typo,
        an alias, or a model newer than its price table), not a budget
        ceiling."""
        return self.reason == budget_pb2.DECISION_REASON_UNKNOWN_PRICE


_THROTTLE_CAUSES: Final[Mapping[budget_pb2.DecisionReason.ValueType, str]] = {
    budget_pb2.DECISION_REASON_THROTTLED: "the run's committed spend is in its throttle band",
    budget_pb2.DECISION_REASON_RATE_LIMITED: "the run's rate limit is used up for this window",
    budget_pb2.DECISION_REASON_IN_FLIGHT_LIMIT: "the run has its maximum of holds in flight",
}


class BudgetThrottledError(BudgetBlockedError):
    """The server throttled a reservation made by a `reserve(...)` context
    manager (``DECISION_THROTTLE``): not now. Nothing is held.

    The run is in its throttle band (``DECISION_REASON_THROTTLED``), over its
    rate limit (``DECISION_REASON_RATE_LIMITED``) or at its cap of holds in
    flight (``DECISION_REASON_IN_FLIGHT_LIMIT``); `dimension` says which
    limit. Wait `retry_after` seconds, then reserve again with a new
    reservation id: the throttled id is spent, like a blocked one (a retry
    of it only replays this answer). ``client.reserve(...)`` without a
    `reservation_id` makes a fresh id each time::

        while True:
            try:
                with client.reserve(run_id, 50_000) as hold:
                    ...
                break
            except BudgetThrottledError as throttled:
                time.sleep(throttled.retry_after)

    A subclass of `BudgetBlockedError`, so code that treats every refusal
    alike keeps working.
    """

    @property
    def retry_after(self) -> float:
        """How long to wait before reserving again, in seconds (0.0 when the
        server gave no delay, or for a replay whose delay has passed)."""
        return float(self.response.retry_after.ToNanoseconds()) / 1e9

    def _describe(self) -> str:
        response = self.response
        message = (
            f"reservation {response.reservation_id!r} of run {self.run_id!r} was throttled "
            f"({_enum_name(budget_pb2.DecisionReason, response.reason)}): "
        )
        cause = _THROTTLE_CAUSES.get(response.reason)
        if cause:
            message += f"{cause}; "
        return message + (
            f"reserve again with a new reservation id after {self.retry_after:g} s; nothing is held"
        )


class ApprovalRequiredError(BudgetBlockedError):
    """A reservation made by a `reserve(...)` context manager needs approval
    first (``DECISION_APPROVAL_REQUIRED``). Nothing is held.

    The call trips one of the run's escalation triggers: its committed and
    held spend with this estimate would pass the policy's
    ``approval_percent`` of its limit (``DECISION_REASON_SPEND_NEEDS_APPROVAL``),
    or its meter is not on the policy's ``approved_meters``
    (``DECISION_REASON_METER_NEEDS_APPROVAL``; `meter` names it). A person
    or a supervising agent resolves `approval_id` with ``approve`` or
    ``deny`` (Watch shows the request and its outcome); once it is approved,
    reserve again with a new reservation id (the one answered is spent, like
    a blocked one). Once it is denied, such calls are blocked
    (``DECISION_REASON_APPROVAL_DENIED``)::

        try:
            with client.reserve(run_id, 50_000, meter="tool:deploy") as hold:
                ...
        except ApprovalRequiredError as pending:
            ask_a_human(pending.approval_id)  # who calls client.approve(...)

    A subclass of `BudgetBlockedError`, so code that treats every refusal
    alike keeps working.
    """

    def _describe(self) -> str:
        response = self.response
        message = (
            f"reservation {response.reservation_id!r} of run {self.run_id!r} needs approval "
            f"({_enum_name(budget_pb2.DecisionReason, response.reason)}): "
        )
        if response.reason == budget_pb2.DECISION_REASON_METER_NEEDS_APPROVAL:
            which = f"meter {self.meter!r}" if self.meter else "the call's meter"
            message += f"{which} is not on the run's approved meters; "
        elif response.reason == budget_pb2.DECISION_REASON_SPEND_NEEDS_APPROVAL:
            message += "the run's spend with this call would pass its approval threshold; "
        return message + (
            f"approve {self.approval_id!r}, then reserve again with a new reservation id; "
            "nothing is held"
        )


def _enum_name(enum: _EnumTypeWrapper[_V], value: _V) -> str:
    """The name of `value` in `enum`, or the number for a value this client
    does not know (a newer server)."""
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)
