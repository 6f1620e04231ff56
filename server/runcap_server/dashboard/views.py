"""The JSON the dashboard's endpoints and events carry: runs, budget states
and changes as plain objects with integer micro-USD, enum values as short
lowercase names and times as milliseconds since the epoch."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from runcap import RuncapError
from runcap.v1 import budget_pb2
from runcap_server.liveview import THRESHOLD_NAMES, RunModel, format_eta, format_rate

Json = dict[str, Any]


def enum_name(enum: EnumDescriptor, value: int, prefix: str) -> str:
    """``EVENT_TYPE_COMMITTED`` -> ``committed``; a number the stubs do not
    know yet stays a number, as text."""
    known = enum.values_by_number.get(value)
    return str(value) if known is None else known.name.removeprefix(prefix).lower()


def _time_ms(stamp: Timestamp, present: bool) -> int | None:
    return stamp.ToMilliseconds() if present else None


def state_json(state: budget_pb2.BudgetState) -> Json:
    """A BudgetState."""
    return {
        "run_id": state.run_id,
        "revision": state.revision,
        "digest": state.digest,
        "status": enum_name(budget_pb2.RunStatus.DESCRIPTOR, state.status, "RUN_STATUS_"),
        "threshold": THRESHOLD_NAMES.get(state.threshold, str(state.threshold)),
        "limit_micros": state.limit_micros,
        "committed_micros": state.committed_micros,
        "reserved_micros": state.reserved_micros,
        "remaining_micros": state.remaining_micros,
        "overrun_micros": state.overrun_micros,
        "active_reservations": state.active_reservations,
        "committed_tokens": state.committed_tokens,
        "reserved_tokens": state.reserved_tokens,
        "exposure_micros": state.exposure_micros,
        "exposure_ceiling_micros": state.exposure_ceiling_micros,
        "blocked": state.blocked,
    }


def run_json(run: budget_pb2.Run) -> Json:
    """A run's configuration: what the pages show and the timeline draws
    (its thresholds are percentages of its limit, defaults filled in)."""
    policy = run.policy
    return {
        "run_id": run.run_id,
        "limit_micros": run.limit_micros,
        "labels": dict(run.labels),
        "create_time_ms": _time_ms(run.create_time, run.HasField("create_time")),
        "close_time_ms": _time_ms(run.close_time, run.HasField("close_time")),
        "parent_run_id": run.parent_run_id,
        "api_key_id": run.api_key_id,
        "user_id": run.user_id,
        "team_id": run.team_id,
        "enforcement_mode": enum_name(
            budget_pb2.EnforcementMode.DESCRIPTOR, policy.enforcement_mode, "ENFORCEMENT_MODE_"
        ),
        "thresholds": {
            "info": policy.thresholds.info_percent,
            "warn": policy.thresholds.warn_percent,
            "throttle": policy.thresholds.throttle_percent,
        },
        "approval_percent": policy.approval_percent,
        "approvals": [
            {
                "approval_id": approval.approval_id,
                "status": enum_name(
                    budget_pb2.ApprovalStatus.DESCRIPTOR, approval.status, "APPROVAL_STATUS_"
                ),
                "meter": approval.meter,
            }
            for approval in run.approvals
        ],
        "children": run.children,
        "blocked_calls": run.blocked_calls,
    }


def event_json(event: budget_pb2.BudgetEvent) -> Json:
    """One change of a run (its state travels beside it)."""
    view: Json = {
        "type": enum_name(budget_pb2.EventType.DESCRIPTOR, event.type, "EVENT_TYPE_"),
        "time_ms": _time_ms(event.time, event.HasField("time")),
        "reservation_id": event.reservation_id,
        "amount_micros": event.amount_micros,
        "actual_micros": event.actual_micros,
        "overrun_micros": event.overrun_micros,
        "late": event.late,
    }
    if event.threshold:
        view["threshold"] = THRESHOLD_NAMES.get(event.threshold, str(event.threshold))
    if event.approval_id:
        view["approval_id"] = event.approval_id
    if event.reason:
        view["reason"] = enum_name(
            budget_pb2.DecisionReason.DESCRIPTOR, event.reason, "DECISION_REASON_"
        )
    if event.HasField("blocking_scope"):
        scope = event.blocking_scope
        kind = enum_name(budget_pb2.ScopeKind.DESCRIPTOR, scope.kind, "SCOPE_KIND_")
        view["blocking_scope"] = {"kind": kind, "id": scope.id}
    return view


def live_json(model: RunModel, now: float) -> Json:
    """What only a live view knows: the burn rate over the last minute, the
    time to exhaustion at that rate, pending approvals and flags."""
    rate = model.rate(now)
    eta = model.eta(now)
    flags = model.flags()
    return {
        "burn_micros_per_minute": rate,
        "burn": format_rate(rate),
        "seconds_to_exhaustion": eta,
        "exhausted_in": format_eta(eta),
        "pending_approvals": sorted(model.pending_approvals),
        "flags": flags,
    }


def error_json(error: RuncapError) -> Json:
    """A failed API call, as the API reported it."""
    return {
        "code": error.code.name,
        "reason": error.reason,
        "message": error.message,
        "metadata": dict(error.metadata),
    }
