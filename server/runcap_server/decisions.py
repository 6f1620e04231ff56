"""Decisions as the API shows them: ids, Reserve responses and GetDecision records.

A decision is the first answer to one reservation of one run, stored with the
reservation (its inputs, its pricing and its verdict), so its id is the pair:
"<run id>/<reservation id>" ("/" never appears in either). An automatic
downgrade is a second reservation, under the blocked one's downgrade id.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from runcap.v1 import budget_service_pb2
from runcap_server import convert
from runcap_server.alternatives import Alternative
from runcap_server.errors import FieldViolation, InvalidArgument
from runcap_server.estimates import Estimate, Pricing
from runcap_server.ledger.core import calibrated_micros
from runcap_server.ledger.types import (
    Decision,
    DecisionReason,
    Dimension,
    EnforcementMode,
    Reservation,
    ReserveResult,
    RunView,
    ScopeKind,
    ScopeRef,
    approval_id,
)
from runcap_server.validation import ID_PATTERN

# Decisions that hold the estimate.
HOLDING = frozenset({Decision.ALLOW, Decision.WARN, Decision.DOWNGRADE})
DOWNGRADE_PREFIX = "downgrade:"


def decision_id(run_id: str, reservation_id: str) -> str:
    return f"{run_id}/{reservation_id}"


def parse_decision_id(text: str) -> tuple[str, str]:
    """(run id, reservation id) of a decision id; INVALID_ARGUMENT if malformed."""
    run_id, sep, reservation_id = text.partition("/")
    if not (sep and ID_PATTERN.fullmatch(run_id) and ID_PATTERN.fullmatch(reservation_id)):
        shown = text if len(text) <= 60 else text[:60] + "..."
        raise InvalidArgument(
            [FieldViolation("decision_id", f"{shown!r} is not a decision id (RUN/RESERVATION)")]
        )
    return run_id, reservation_id


def downgrade_id(reservation_id: str) -> str:
    """The id an automatic downgrade of `reservation_id` is held under."""
    return DOWNGRADE_PREFIX + hashlib.sha256(reservation_id.encode()).hexdigest()[:32]


def short_of_money(result: ReserveResult) -> bool:
    """Whether a cheaper model could have been allowed: blocked by a dollar
    ceiling, or by a calibrated run's exposure ceiling."""
    return (
        result.decision is Decision.BLOCK
        and result.reason is DecisionReason.INSUFFICIENT_BUDGET
        and result.dimension in (Dimension.SPEND, Dimension.EXPOSURE)
    )


def reserve_response(
    run_id: str,
    result: ReserveResult,
    priced: Estimate | None = None,
    listed: Sequence[Alternative] = (),
    *,
    requested_model: str = "",
) -> budget_service_pb2.ReserveResponse:
    decision = Decision.DOWNGRADE if requested_model else result.decision
    response = budget_service_pb2.ReserveResponse(
        decision=decision.value,  # type: ignore[arg-type]
        reason=result.reason.value,  # type: ignore[arg-type]
        reservation_id=result.reservation_id,
        amount_micros=result.held_micros,
        state=convert.state_pb(result.state),
        replayed=result.replayed,
        blocking_meter=result.meter,
        enforcement_mode=result.mode.value,  # type: ignore[arg-type]
        decision_id=decision_id(run_id, result.reservation_id),
        requested_model=requested_model,
        approval_id=approval_id(run_id, result.approval) if result.approval else "",
    )
    if result.dimension is not None:
        response.blocking_dimension = result.dimension.value  # type: ignore[assignment]
    if result.retry_at_ms is not None:
        # Redis replies carry no time: the replica's clock is close enough for a hint.
        now_ms = result.now_ms or time.time_ns() // 1_000_000
        response.retry_after.CopyFrom(convert.duration(max(0, result.retry_at_ms - now_ms)))
    if result.blocking_scope is not None:
        response.blocking_scope.CopyFrom(convert.scope_ref_pb(result.blocking_scope))
    if result.blocking_period is not None:
        response.blocking_period = result.blocking_period.value  # type: ignore[assignment]
    if result.expires_ms is not None:
        response.expire_time.CopyFrom(convert.timestamp(result.expires_ms))
    if priced is not None:
        response.estimate.CopyFrom(convert.estimate_pb(priced))
        _basis(response.estimate, result)
    if result.mode is EnforcementMode.CALIBRATED:
        response.exposure_micros = result.exposure_micros
        response.exposure_ceiling_micros = result.exposure_ceiling_micros
    for alternative in listed:
        response.alternatives.add(
            provider=alternative.price.provider,
            model=alternative.price.model,
            amount_micros=alternative.estimate.amount_micros,
            effective_max_output_tokens=alternative.estimate.effective_max_output_tokens,
        )
    return response


def _basis(estimate: budget_service_pb2.LlmEstimate, result: ReserveResult) -> None:
    """How the ledger sized an LLM call's hold (a calibrated run's pricing says)."""
    if not estimate.amount_micros or not result.pricing:
        return
    pricing = Pricing.decode(result.pricing)
    if pricing.calibration_samples is not None:
        estimate.calibration_samples = pricing.calibration_samples
    if pricing.calibrated_output_tokens is None:
        estimate.basis = budget_service_pb2.ESTIMATE_BASIS_WORST_CASE
        return
    estimate.basis = budget_service_pb2.ESTIMATE_BASIS_CALIBRATED
    estimate.calibrated_output_tokens = pricing.calibrated_output_tokens
    estimate.calibrated_amount_micros = min(
        result.worst_micros,
        calibrated_micros(
            pricing.input_tokens,
            pricing.rates.input,
            pricing.calibrated_output_tokens,
            pricing.rates.output,
        ),
    )


def record_pb(view: RunView, reservation: Reservation) -> budget_service_pb2.GetDecisionResponse:
    """A stored reservation as the decision it was."""
    run_id = view.spec.run_id
    decision = reservation.decision
    if reservation.reservation_id.startswith(DOWNGRADE_PREFIX) and decision is Decision.ALLOW:
        decision = Decision.DOWNGRADE
    record = budget_service_pb2.GetDecisionResponse(
        decision_id=decision_id(run_id, reservation.reservation_id),
        run_id=run_id,
        reservation_id=reservation.reservation_id,
        decision=decision.value,  # type: ignore[arg-type]
        reason=reservation.reason.value,  # type: ignore[arg-type]
        decide_time=convert.timestamp(reservation.created_ms),
        amount_micros=reservation.amount_micros,
        held_micros=reservation.held_micros,
        enforcement_mode=view.policy.mode.value,  # type: ignore[arg-type]
        blocking_meter=reservation.meter,
        reservation_status=reservation.status.value,  # type: ignore[arg-type]
    )
    scopes = (ScopeRef(ScopeKind.RUN, run_id), *view.lineage.parents())
    record.scopes.extend(convert.scope_ref_pb(ref) for ref in scopes)
    if reservation.blocking_scope is not None:
        record.blocking_scope.CopyFrom(convert.scope_ref_pb(reservation.blocking_scope))
    if reservation.blocking_period is not None:
        record.blocking_period = reservation.blocking_period.value  # type: ignore[assignment]
    if reservation.dimension is not None:
        record.blocking_dimension = reservation.dimension.value  # type: ignore[assignment]
    for dim, units in reservation.dims.items():
        if dim.startswith("m:"):
            record.meter, record.meter_units = dim[2:], units
    if reservation.actual_micros is not None:
        record.actual_micros = reservation.actual_micros
    if reservation.pricing:
        pricing = Pricing.decode(reservation.pricing)
        record.estimate.CopyFrom(
            budget_service_pb2.LlmEstimate(
                provider=pricing.provider,
                model=pricing.model,
                input_tokens=pricing.input_tokens,
                effective_max_output_tokens=pricing.effective_max_output_tokens or 0,
                amount_micros=reservation.amount_micros,
                price_table_version=pricing.version,
            )
        )
    return record
