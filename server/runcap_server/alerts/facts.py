"""What an alert says: the facts fixed when it is raised, stored with it
(the record's payload) and rendered by each format at delivery time."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from runcap.v1 import budget_pb2
from runcap_server.alerts.rules import Trigger
from runcap_server.money import format_usd


@dataclass(frozen=True, slots=True)
class AlertFacts:
    alert_id: str
    tenant: str
    rule_id: str
    trigger: Trigger
    run_id: str
    time_ms: int
    summary: str
    # The level crossed (runcap.v1.ThresholdLevel), for crossings.
    threshold: int = 0
    # The run's BudgetState at the change, serialized; empty for BACKEND_DOWN.
    budget: bytes = b""
    labels: Mapping[str, str] = field(default_factory=dict)
    api_key_id: str = ""
    user_id: str = ""
    team_id: str = ""
    parent_run_id: str = ""
    # From the rule: who is paged, and what the rule is for.
    owner: str = ""
    description: str = ""
    # The trigger's own facts (approval_id, reservation_id, overrun_micros...).
    details: Mapping[str, str | int] = field(default_factory=dict)

    @property
    def state(self) -> budget_pb2.BudgetState:
        return budget_pb2.BudgetState.FromString(self.budget)

    def to_json(self) -> str:
        return json.dumps(
            {
                "alert_id": self.alert_id,
                "tenant": self.tenant,
                "rule_id": self.rule_id,
                "trigger": int(self.trigger),
                "run_id": self.run_id,
                "time_ms": self.time_ms,
                "summary": self.summary,
                "threshold": self.threshold,
                "budget": base64.b64encode(self.budget).decode(),
                "labels": dict(self.labels),
                "api_key_id": self.api_key_id,
                "user_id": self.user_id,
                "team_id": self.team_id,
                "parent_run_id": self.parent_run_id,
                "owner": self.owner,
                "description": self.description,
                "details": dict(self.details),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> AlertFacts:
        raw = json.loads(text)
        raw["trigger"] = Trigger(raw["trigger"])
        raw["budget"] = base64.b64decode(raw["budget"])
        return cls(**raw)


def level_name(level: int) -> str:
    """A ThresholdLevel's short name ("warn"), "" for none."""
    if not level:
        return ""
    name: str = budget_pb2.ThresholdLevel.Name(budget_pb2.ThresholdLevel.ValueType(level))
    return name.removeprefix("THRESHOLD_LEVEL_").lower()


def summarize(
    trigger: Trigger,
    run_id: str,
    agent: str,
    committed_micros: int,
    limit_micros: int,
    level: int,
    details: Mapping[str, str | int],
) -> str:
    """The alert's one line for people."""
    who = f"run {run_id}" + (f" (agent {agent})" if agent else "")
    percent = committed_micros * 100 // limit_micros if limit_micros else 0
    spend = f"{format_usd(committed_micros)} of {format_usd(limit_micros)} committed ({percent}%)"
    if trigger is Trigger.THRESHOLD:
        return f"{who} crossed its {level_name(level)} threshold: {spend}"
    if trigger is Trigger.THROTTLE:
        return f"{who} is throttled, past its throttle threshold: {spend}"
    if trigger is Trigger.STOP:
        if level:
            return f"{who} reached its limit, new reservations are blocked: {spend}"
        reason = str(details.get("reason", "blocked")).replace("_", " ")
        scope = details.get("blocking_scope")
        return f"{who} is blocked ({reason}{f' on {scope}' if scope else ''}): {spend}"
    if trigger is Trigger.SUSPENDED:
        return f"{who} was suspended: {spend}"
    if trigger is Trigger.APPROVAL_REQUESTED:
        return f"{who} awaits approval {details.get('approval_id', '')}: {spend}"
    if trigger is Trigger.OVERRUN:
        overrun = format_usd(int(details.get("overrun_micros", 0)))
        late = ", a late commit" if details.get("late") else ""
        return (
            f"{who} overran a hold by {overrun} "
            f"(reservation {details.get('reservation_id', '')}{late}): {spend}"
        )
    if trigger is Trigger.BURN_RATE:
        rate = format_usd(int(details.get("burn_micros_per_minute", 0)))
        ceiling = format_usd(int(details.get("burn_rate_micros_per_minute", 0)))
        return f"{who} is burning {rate}/min, above the rule's {ceiling}/min: {spend}"
    return f"{who}: {trigger.slug}"
