"""What the proxy tells its clients: budget headers on every response, and an
RFC 9457 problem details body (``application/problem+json``) when runcap says
no. Pure functions of runcap's answers; no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
PROBLEM_KEY: Final = "runcap_problem"
"""Where the problem rides inside LiteLLM's error envelope
(``error.provider_specific_fields``) until the middleware unwraps it."""


def usd(micros: int) -> str:
    """Micro-USD as an exact decimal USD string with at least two decimals:
    1_234_500 -> "1.2345", 5_000_000 -> "5.00"."""
    whole, fraction = divmod(abs(micros), 1_000_000)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{'-' if micros < 0 else ''}{whole}.{digits}"


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``DECISION_REASON_INSUFFICIENT_BUDGET`` -> ``insufficient_budget``."""
    return str(enum.Name(value)).removeprefix(prefix).lower()


@dataclass(frozen=True, slots=True)
class ScopeFigures:
    """The money of the scope that blocked, in its current window."""

    kind: str
    id: str
    period: str
    limit_micros: int
    committed_micros: int
    reserved_micros: int

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.committed_micros - self.reserved_micros)

    @classmethod
    def of_run(cls, state: budget_pb2.BudgetState) -> ScopeFigures:
        return cls(
            "run",
            state.run_id,
            "lifetime",
            state.limit_micros,
            state.committed_micros,
            state.reserved_micros,
        )

    @classmethod
    def of_scope(cls, scope: budget_pb2.Scope, period: int) -> ScopeFigures | None:
        """The figures of `scope` in `period`, or None when it has no ceiling there."""
        for usage in scope.usage:
            if usage.period == period and usage.HasField("limit_micros"):
                return cls(
                    enum_name(budget_pb2.ScopeKind, scope.ref.kind, "SCOPE_KIND_"),
                    scope.ref.id,
                    enum_name(budget_pb2.Period, period, "PERIOD_"),
                    usage.limit_micros,
                    usage.committed_micros,
                    usage.reserved_micros,
                )
        return None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the proxy answers a decision that does not let the call through."""

    status: int
    code: str
    title: str


def outcome_of(response: pb.ReserveResponse, block_status: int) -> Outcome:
    """The HTTP status, problem code and title of a refused reservation.

    Throttles and rate limits are 429 (clients retry after Retry-After; the
    OpenAI SDKs do so by themselves); every other refusal is `block_status`
    (402 by default), which no SDK retries.
    """
    reason = response.reason
    code = enum_name(budget_pb2.DecisionReason, reason, "DECISION_REASON_")
    if response.decision == budget_pb2.DECISION_THROTTLE:
        return Outcome(429, code, _TITLES.get(reason, "Slow down: the run is near its budget"))
    if response.decision == budget_pb2.DECISION_APPROVAL_REQUIRED:
        return Outcome(block_status, code, "This call needs approval first")
    return Outcome(block_status, code, _TITLES.get(reason, "The run's budget refused this call"))


_TITLES: Final = {
    budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET: "Budget exceeded",
    budget_pb2.DECISION_REASON_RUN_CLOSED: "The run is closed",
    budget_pb2.DECISION_REASON_SUSPENDED: "The run is suspended",
    budget_pb2.DECISION_REASON_UNKNOWN_PRICE: "The model has no price",
    budget_pb2.DECISION_REASON_THROTTLED: "Slow down: the run is near its budget",
    budget_pb2.DECISION_REASON_RATE_LIMITED: "The run's call rate limit is reached",
    budget_pb2.DECISION_REASON_IN_FLIGHT_LIMIT: "Too many calls of the run are in flight",
    budget_pb2.DECISION_REASON_APPROVAL_DENIED: "A person denied this call",
}


def _detail(response: pb.ReserveResponse, figures: ScopeFigures | None) -> str:
    reason = response.reason
    estimate = response.estimate if response.HasField("estimate") else None
    if reason == budget_pb2.DECISION_REASON_UNKNOWN_PRICE and estimate is not None:
        return (
            f"runcap has no price for {estimate.provider}/{estimate.model}, so the call "
            "cannot be budgeted and is refused (unknown prices fail closed)."
        )
    if reason == budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET and figures is not None:
        scope = "the run" if figures.kind == "run" else f"{figures.kind} {figures.id}"
        period = "" if figures.period == "lifetime" else f" {figures.period}"
        wanted = f"${usd(estimate.amount_micros)} " if estimate is not None else ""
        dimension = response.blocking_dimension
        money = (budget_pb2.BUDGET_DIMENSION_UNSPECIFIED, budget_pb2.BUDGET_DIMENSION_SPEND)
        if dimension not in money:
            limit = enum_name(budget_pb2.BudgetDimension, dimension, "BUDGET_DIMENSION_")
            meter = f" {response.blocking_meter}" if response.blocking_meter else ""
            return f"The call does not fit the run's {limit}{meter} limit."
        return (
            f"This call's estimate of {wanted}does not fit: {scope} has "
            f"${usd(figures.remaining_micros)} left of its{period} ${usd(figures.limit_micros)}."
        )
    if response.decision == budget_pb2.DECISION_THROTTLE:
        wait = response.retry_after.ToMilliseconds() / 1000
        return f"Retry after {wait:g} s: the run is in its throttle band or at a rate limit."
    if response.decision == budget_pb2.DECISION_APPROVAL_REQUIRED:
        return (
            f"Approval {response.approval_id} is pending: retry once a person approves it "
            "(runcap approve)."
        )
    return _TITLES.get(reason, "The run's budget refused this call") + "."


def alternative_entry(alternative: pb.Alternative, served_as: str) -> dict[str, Any]:
    return {
        "model": served_as,
        "provider": alternative.provider,
        "runcap_model": alternative.model,
        "estimate_micros": alternative.amount_micros,
        "estimate_usd": usd(alternative.amount_micros),
        "effective_max_output_tokens": alternative.effective_max_output_tokens,
    }


def problem_body(
    response: pb.ReserveResponse,
    outcome: Outcome,
    figures: ScopeFigures | None,
    alternatives: Sequence[dict[str, Any]],
    *,
    type_base: str,
    run_id: str,
) -> dict[str, Any]:
    """The RFC 9457 problem details of a refused reservation (schema:
    docs/litellm-problem.schema.json)."""
    estimate = response.estimate if response.HasField("estimate") else None
    budget: dict[str, Any] = {
        "run_id": run_id,
        "enforcement_mode": enum_name(
            budget_pb2.EnforcementMode, response.enforcement_mode, "ENFORCEMENT_MODE_"
        ),
    }
    if figures is not None:
        budget["scope"] = {"kind": figures.kind, "id": figures.id, "period": figures.period}
        for name in ("limit", "committed", "reserved", "remaining"):
            micros: int = getattr(figures, f"{name}_micros")
            budget[f"{name}_micros"] = micros
            budget[f"{name}_usd"] = usd(micros)
    if response.blocking_dimension != budget_pb2.BUDGET_DIMENSION_UNSPECIFIED:
        budget["dimension"] = enum_name(
            budget_pb2.BudgetDimension, response.blocking_dimension, "BUDGET_DIMENSION_"
        )
    if response.blocking_meter:
        budget["meter"] = response.blocking_meter
    if estimate is not None:
        budget["estimate_micros"] = estimate.amount_micros
        budget["estimate_usd"] = usd(estimate.amount_micros)
        budget["provider"] = estimate.provider
        budget["model"] = estimate.model
        budget["input_tokens"] = estimate.input_tokens
        budget["effective_max_output_tokens"] = estimate.effective_max_output_tokens
        budget["price_table_version"] = estimate.price_table_version
    body: dict[str, Any] = {
        "type": type_base + outcome.code.replace("_", "-"),
        "title": outcome.title,
        "status": outcome.status,
        "detail": _detail(response, figures),
        "code": outcome.code,
        "decision": enum_name(budget_pb2.Decision, response.decision, "DECISION_"),
        "decision_id": response.decision_id,
        "budget": budget,
        "alternatives": list(alternatives),
    }
    if response.HasField("retry_after"):
        body["retry_after_seconds"] = response.retry_after.ToMilliseconds() / 1000
    if response.approval_id:
        body["approval_id"] = response.approval_id
    return body


def simple_problem(
    status: int, code: str, title: str, detail: str, *, type_base: str
) -> dict[str, Any]:
    """A problem that is not a budget decision (runcap unreachable, a run of
    another key, a request with no run when runs are not created)."""
    return {
        "type": type_base + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }


def budget_headers(record: Mapping[str, Any]) -> dict[str, str]:
    """The X-Budget-* headers of a call's budget record."""
    headers = {"X-Budget-Decision": str(record.get("decision", ""))}
    for header, name in (
        ("X-Budget-Decision-Id", "decision_id"),
        ("X-Budget-Reservation-Id", "reservation_id"),
        ("X-Budget-Enforcement-Mode", "enforcement_mode"),
        ("X-Budget-Blocking-Scope", "blocking_scope"),
        ("X-Budget-Requested-Model", "requested_model"),
        ("X-Budget-Selected-Model", "selected_model"),
        ("X-Budget-Price-Table-Version", "price_table_version"),
        ("X-Run-Id", "run_id"),
    ):
        if record.get(name):
            headers[header] = str(record[name])
    if "remaining_micros" in record:
        headers["X-Budget-Remaining-USD"] = usd(int(record["remaining_micros"]))
    return headers
