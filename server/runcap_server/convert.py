"""Ledger values to runcap.v1 messages. Enum values are shared, so enums are casts."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from runcap.v1 import budget_pb2, budget_service_pb2
from runcap_server.estimates import Estimate
from runcap_server.ledger.scopes import ScopeView
from runcap_server.ledger.types import (
    SPEND_APPROVAL,
    TOKENS,
    ApprovalStatus,
    BudgetState,
    Change,
    EnforcementMode,
    RunPolicy,
    RunView,
    ScopeRef,
    approval_id,
)
from runcap_server.prices import ModelPrice


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def duration(ms: int) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(ms)
    return value


def policy_pb(policy: RunPolicy) -> budget_pb2.RunPolicy:
    info, warn, throttle = policy.thresholds
    message = budget_pb2.RunPolicy(
        enforcement_mode=policy.mode.value,  # type: ignore[arg-type]
        soft_gate_margin_percent=policy.soft_margin_percent,
        thresholds=budget_pb2.Thresholds(
            info_percent=info, warn_percent=warn, throttle_percent=throttle
        ),
        throttle_base_delay=duration(policy.throttle_base_ms),
        throttle_max_delay=duration(policy.throttle_max_ms),
        meter_limits=dict(policy.meter_limits),
        max_depth=policy.max_depth,
        auto_downgrade=policy.auto_downgrade,
        downgrade_models=policy.downgrade_models,
        approval_percent=policy.approval_percent,
        approved_meters=policy.approved_meters,
    )
    if policy.max_tokens is not None:
        message.max_tokens = policy.max_tokens
    if policy.rate_limit is not None:
        calls, window_ms = policy.rate_limit
        message.rate_limit.CopyFrom(
            budget_pb2.RateLimit(max_calls=calls, window=duration(window_ms))
        )
    if policy.max_in_flight is not None:
        message.max_in_flight = policy.max_in_flight
    if policy.max_children is not None:
        message.max_children = policy.max_children
    if policy.mode is EnforcementMode.CALIBRATED:
        message.calibration_min_samples = policy.calibration_min_samples
    if policy.exposure_allowance_micros is not None:
        message.exposure_allowance_micros = policy.exposure_allowance_micros
    if policy.exposure_allowance_percent is not None:
        message.exposure_allowance_percent = policy.exposure_allowance_percent
    return message


def state_pb(state: BudgetState) -> budget_pb2.BudgetState:
    return budget_pb2.BudgetState(
        run_id=state.run_id,
        limit_micros=state.limit_micros,
        committed_micros=state.committed_micros,
        reserved_micros=state.reserved_micros,
        remaining_micros=state.remaining_micros,
        revision=state.revision,
        status=state.status.value,  # type: ignore[arg-type]
        active_reservations=state.active_reservations,
        overrun_micros=state.overrun_micros,
        threshold=state.threshold.value,  # type: ignore[arg-type]
        committed_tokens=state.committed_tokens,
        reserved_tokens=state.reserved_tokens,
        digest=state.digest,
        exposure_micros=state.exposure_micros,
        exposure_ceiling_micros=state.exposure_ceiling_micros,
        blocked=state.blocked,
    )


def run_pb(view: RunView) -> budget_pb2.Run:
    run = budget_pb2.Run(
        run_id=view.spec.run_id,
        limit_micros=view.spec.limit_micros,
        labels=dict(view.spec.labels),
        default_ttl_millis=view.default_ttl_ms,
        create_time=timestamp(view.created_ms),
    )
    if view.closed_ms is not None:
        run.close_time.CopyFrom(timestamp(view.closed_ms))
    lineage = view.lineage
    run.parent_run_id = lineage.ancestors[0] if lineage.ancestors else ""
    run.api_key_id = lineage.api_key_id
    run.user_id = lineage.user_id
    run.team_id = lineage.team_id
    run.ancestor_run_ids.extend(lineage.ancestors)
    run.policy.CopyFrom(policy_pb(view.policy))
    run.depth_remaining = lineage.depth_left
    run.children = view.children
    run.blocked_calls = view.blocked_calls
    limits = dict(view.policy.meter_limits)
    used = {dim[2:]: v for dim, v in view.usage.items() if dim != TOKENS}
    for name in sorted(limits.keys() | used.keys()):
        reserved, committed = used.get(name, (0, 0))
        meter = run.meters.add(name=name, committed=committed, reserved=reserved)
        if name in limits:
            meter.limit = limits[name]
    for trigger, status in sorted(view.approvals.items()):
        run.approvals.append(approval_pb(view.spec.run_id, trigger, status))
    return run


def approval_pb(run_id: str, trigger: str, status: ApprovalStatus) -> budget_pb2.Approval:
    return budget_pb2.Approval(
        approval_id=approval_id(run_id, trigger),
        status=status.value,  # type: ignore[arg-type]
        meter="" if trigger == SPEND_APPROVAL else trigger[2:],
    )


def estimate_pb(priced: Estimate) -> budget_service_pb2.LlmEstimate:
    return budget_service_pb2.LlmEstimate(
        provider=priced.call.provider,
        model=priced.call.model,
        input_tokens=priced.call.input_tokens,
        effective_max_output_tokens=priced.effective_max_output_tokens,
        amount_micros=priced.amount_micros,
        price_table_version=priced.price_table_version,
    )


def model_price_pb(price: ModelPrice) -> budget_service_pb2.ModelPrice:
    rates = price.rates
    message = budget_service_pb2.ModelPrice(
        provider=price.provider,
        model=price.model,
        input_rate=rates.input,
        output_rate=rates.output,
        cache_read_rate=rates.cache_read,
        cache_write_rate=rates.cache_write,
        reasoning_rate=rates.reasoning,
        tools=price.tools,
        json_schema=price.json_schema,
        modalities=sorted(price.modalities),
    )
    if price.context_window is not None:
        message.context_window = price.context_window
    if price.max_output_tokens is not None:
        message.max_output_tokens = price.max_output_tokens
    return message


def scope_ref_pb(ref: ScopeRef) -> budget_pb2.ScopeRef:
    return budget_pb2.ScopeRef(kind=ref.kind.value, id=ref.id)  # type: ignore[arg-type]


def scope_pb(view: ScopeView) -> budget_pb2.Scope:
    scope = budget_pb2.Scope(ref=scope_ref_pb(view.ref))
    if view.policy is not None:
        scope.default_policy.CopyFrom(policy_pb(view.policy))
    for usage in view.usage:
        entry = scope.usage.add(
            period=usage.period.value,
            committed_micros=usage.committed_micros,
            reserved_micros=usage.reserved_micros,
            remaining_micros=usage.remaining_micros,
            overrun_micros=usage.overrun_micros,
            active_reservations=usage.active_reservations,
        )
        if usage.limit_micros is not None:
            entry.limit_micros = usage.limit_micros
        if usage.window_start_ms is not None:
            entry.window_start_time.CopyFrom(timestamp(usage.window_start_ms))
        if usage.window_end_ms is not None:
            entry.window_end_time.CopyFrom(timestamp(usage.window_end_ms))
    return scope


def event_pb(change: Change) -> budget_pb2.BudgetEvent:
    event = budget_pb2.BudgetEvent(
        type=change.type.value,  # type: ignore[arg-type]
        reservation_id=change.reservation_id,
        amount_micros=change.amount_micros,
        actual_micros=change.actual_micros,
        overrun_micros=change.overrun_micros,
        late=change.late,
        time=timestamp(change.time_ms),
        state=state_pb(change.state),
        threshold=change.threshold.value,  # type: ignore[arg-type]
        approval_id=approval_id(change.state.run_id, change.approval) if change.approval else "",
        blocking_meter=change.meter,
    )
    # A BLOCKED change's verdict.
    if change.reason is not None:
        event.reason = change.reason.value  # type: ignore[assignment]
    if change.blocking_scope is not None:
        event.blocking_scope.CopyFrom(scope_ref_pb(change.blocking_scope))
    if change.blocking_period is not None:
        event.blocking_period = change.blocking_period.value  # type: ignore[assignment]
    if change.dimension is not None:
        event.blocking_dimension = change.dimension.value  # type: ignore[assignment]
    return event
