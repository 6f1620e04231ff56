"""Ledger values to runcap.v1 messages. Enum values are shared, so enums are casts."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from runcap.v1 import budget_pb2, budget_service_pb2
from runcap_server.estimates import Estimate
from runcap_server.ledger.scopes import ScopeView
from runcap_server.ledger.types import BudgetState, Change, RunView, ScopeRef
from runcap_server.prices import ModelPrice


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


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
        digest=state.digest,
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
    return run


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
    return budget_pb2.BudgetEvent(
        type=change.type.value,  # type: ignore[arg-type]
        reservation_id=change.reservation_id,
        amount_micros=change.amount_micros,
        actual_micros=change.actual_micros,
        overrun_micros=change.overrun_micros,
        late=change.late,
        time=timestamp(change.time_ms),
        state=state_pb(change.state),
    )
