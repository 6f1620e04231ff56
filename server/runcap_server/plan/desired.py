"""The server state a checked plan implies: the scope's ceilings, the fields
of its default run policy that the plan owns, and its alert rules.

Each part has a *view*: the values `runcap plan apply` compares, normalized
the way the server stores them, so that a plan already applied compares equal
and nothing is written. Secrets are never read back (the server redacts them):
a rule carries a fingerprint of its secrets in a label instead, so a rotated
secret is still seen as a change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from google.protobuf.duration_pb2 import Duration

from runcap.v1 import alerts_pb2, budget_pb2
from runcap_server.money import format_usd
from runcap_server.plan.costs import Costs
from runcap_server.plan.document import Document, Problem
from runcap_server.plan.model import Plan, Target

SCOPE_KINDS: Final = {
    "api_key": budget_pb2.SCOPE_KIND_API_KEY,
    "user": budget_pb2.SCOPE_KIND_USER,
    "team": budget_pb2.SCOPE_KIND_TEAM,
}
MODES: Final = {
    "hard_gate": budget_pb2.ENFORCEMENT_MODE_HARD_GATE,
    "soft_gate": budget_pb2.ENFORCEMENT_MODE_SOFT_GATE,
    "advisory": budget_pb2.ENFORCEMENT_MODE_ADVISORY,
    "actuals_only": budget_pb2.ENFORCEMENT_MODE_ACTUALS_ONLY,
    "calibrated": budget_pb2.ENFORCEMENT_MODE_CALIBRATED,
}
TRIGGERS: Final = {
    "threshold": alerts_pb2.ALERT_TRIGGER_THRESHOLD,
    "throttle": alerts_pb2.ALERT_TRIGGER_THROTTLE,
    "stop": alerts_pb2.ALERT_TRIGGER_STOP,
    "suspended": alerts_pb2.ALERT_TRIGGER_SUSPENDED,
    "approval_requested": alerts_pb2.ALERT_TRIGGER_APPROVAL_REQUESTED,
    "overrun": alerts_pb2.ALERT_TRIGGER_OVERRUN,
    "burn_rate": alerts_pb2.ALERT_TRIGGER_BURN_RATE,
    "backend_down": alerts_pb2.ALERT_TRIGGER_BACKEND_DOWN,
}
RATE_WINDOW_MS: Final = 60_000
# The periods whose ceilings a plan owns (a lifetime ceiling is left alone).
PERIODS: Final = (("daily", budget_pb2.PERIOD_DAILY), ("monthly", budget_pb2.PERIOD_MONTHLY))
FINGERPRINT_LABEL: Final = "secrets_fingerprint"
_DEFAULT_THRESHOLDS: Final = (60, 80, 95)


@dataclass(frozen=True, slots=True)
class Desired:
    """What apply makes true on the server."""

    scope: budget_pb2.ScopeRef
    limits: dict[int, int | None]  # budget_pb2.Period -> ceiling (None: none)
    policy: PolicyFields
    rules: tuple[alerts_pb2.AlertRule, ...]
    rule_ids: tuple[str, ...]  # every id a plan of this agent may own


def rule_ids(agent: str) -> tuple[str, str]:
    """The ids of the rules a plan owns: re-applying replaces them, never duplicates."""
    return (f"plan.{agent}.notify", f"plan.{agent}.page")


def secrets(
    plan: Plan, document: Document, environ: Mapping[str, str]
) -> tuple[dict[str, str], list[Problem]]:
    """The secrets the plan's targets name, read from the environment."""
    found: dict[str, str] = {}
    problems: list[Problem] = []
    for group in ("notify", "page"):
        for index, target in enumerate(getattr(plan.alerts, group)):
            name = target.secret_env
            if not name:
                continue
            value = environ.get(name, "")
            if value:
                found[name] = value
            else:
                field = {"webhook": "secret_env", "slack": "url_env"}.get(
                    target.kind, "routing_key_env"
                )
                problems.append(
                    document.problem(
                        ["alerts", group, index, target.kind, field],
                        f"names ${name}, which is not set in this environment",
                    )
                )
    return found, problems


def desired(plan: Plan, costs: Costs, secret_values: Mapping[str, str]) -> Desired:
    scope = budget_pb2.ScopeRef(kind=SCOPE_KINDS[plan.scope_kind], id=plan.scope_id)
    limits: dict[int, int | None] = {
        budget_pb2.PERIOD_DAILY: costs.daily_ceiling,
        budget_pb2.PERIOD_MONTHLY: costs.monthly_ceiling,
    }
    return Desired(
        scope=scope,
        limits=limits,
        policy=plan_policy(plan, costs),
        rules=tuple(_rules(plan, costs, scope, secret_values)),
        rule_ids=rule_ids(plan.agent),
    )


# --------------------------------------------------------------------------
# The default run policy


@dataclass(frozen=True, slots=True)
class PolicyFields:
    """The fields of a scope's default run policy that a plan owns."""

    enforcement_mode: str
    soft_gate_margin_percent: int
    thresholds: tuple[int, int, int]
    max_tokens: int | None
    meter_limits: tuple[tuple[str, int], ...]
    rate_limit: tuple[int, int] | None  # (calls, window in ms)
    max_in_flight: int | None
    approval_percent: int
    approved_meters: tuple[str, ...]


def plan_policy(plan: Plan, costs: Costs) -> PolicyFields:
    approved: tuple[str, ...] = ()
    if plan.unlisted_apis_need_approval:
        approved = tuple(sorted({api.meter for api in plan.external_apis}))
    rate = None if costs.calls_per_minute is None else (costs.calls_per_minute, RATE_WINDOW_MS)
    return PolicyFields(
        enforcement_mode=plan.mode,
        soft_gate_margin_percent=plan.soft_gate_margin_percent,
        thresholds=plan.thresholds,
        max_tokens=costs.max_tokens,
        meter_limits=tuple(sorted(costs.meter_limits.items())),
        rate_limit=rate,
        max_in_flight=plan.max_parallel_calls,
        approval_percent=plan.approval_percent,
        approved_meters=approved,
    )


def stored_policy(policy: budget_pb2.RunPolicy) -> PolicyFields:
    """The plan-owned fields of a policy as the server stores it (defaults filled in)."""
    modes = {value: name for name, value in MODES.items()}
    thresholds = _DEFAULT_THRESHOLDS
    if policy.HasField("thresholds"):
        t = policy.thresholds
        thresholds = (t.info_percent, t.warn_percent, t.throttle_percent)
    rate = None
    if policy.HasField("rate_limit"):
        rate = (policy.rate_limit.max_calls, policy.rate_limit.window.ToMilliseconds())
    return PolicyFields(
        enforcement_mode=modes.get(policy.enforcement_mode, "hard_gate"),
        soft_gate_margin_percent=policy.soft_gate_margin_percent,
        thresholds=thresholds,
        max_tokens=policy.max_tokens if policy.HasField("max_tokens") else None,
        meter_limits=tuple(sorted(policy.meter_limits.items())),
        rate_limit=rate,
        max_in_flight=policy.max_in_flight if policy.HasField("max_in_flight") else None,
        approval_percent=policy.approval_percent,
        approved_meters=tuple(sorted(set(policy.approved_meters))),
    )


def policy_message(
    fields: PolicyFields, current: budget_pb2.RunPolicy | None
) -> budget_pb2.RunPolicy:
    """The policy to store: the plan's fields over the current policy's others
    (an operator's auto_downgrade or max_depth stays as it is)."""
    policy = budget_pb2.RunPolicy()
    if current is not None:
        policy.CopyFrom(current)
    policy.enforcement_mode = MODES[fields.enforcement_mode]
    if fields.enforcement_mode != "calibrated":
        # The server refuses calibration settings on other modes.
        policy.ClearField("calibration_min_samples")
        policy.ClearField("exposure_allowance_micros")
        policy.ClearField("exposure_allowance_percent")
    policy.soft_gate_margin_percent = fields.soft_gate_margin_percent
    info, warn, throttle = fields.thresholds
    policy.thresholds.CopyFrom(
        budget_pb2.Thresholds(info_percent=info, warn_percent=warn, throttle_percent=throttle)
    )
    policy.ClearField("max_tokens")
    if fields.max_tokens is not None:
        policy.max_tokens = fields.max_tokens
    policy.ClearField("max_in_flight")
    if fields.max_in_flight is not None:
        policy.max_in_flight = fields.max_in_flight
    policy.meter_limits.clear()
    policy.meter_limits.update(dict(fields.meter_limits))
    policy.ClearField("rate_limit")
    if fields.rate_limit is not None:
        calls, window_ms = fields.rate_limit
        window = Duration()
        window.FromMilliseconds(window_ms)
        policy.rate_limit.CopyFrom(budget_pb2.RateLimit(max_calls=calls, window=window))
    policy.approval_percent = fields.approval_percent
    del policy.approved_meters[:]
    policy.approved_meters.extend(fields.approved_meters)
    return policy


# --------------------------------------------------------------------------
# Alert rules


def _rules(
    plan: Plan, costs: Costs, scope: budget_pb2.ScopeRef, secret_values: Mapping[str, str]
) -> list[alerts_pb2.AlertRule]:
    notify_id, page_id = rule_ids(plan.agent)
    alerts = plan.alerts
    rules = []
    if alerts.notify:
        rules.append(
            _rule(plan, costs, scope, notify_id, alerts.notify_on, alerts.notify, secret_values)
        )
    rules.append(_rule(plan, costs, scope, page_id, alerts.page_on, alerts.page, secret_values))
    return rules


def _rule(
    plan: Plan,
    costs: Costs,
    scope: budget_pb2.ScopeRef,
    rule_id: str,
    triggers: tuple[str, ...],
    targets: tuple[Target, ...],
    secret_values: Mapping[str, str],
) -> alerts_pb2.AlertRule:
    ceiling = costs.per_run_ceiling
    role = "pages" if rule_id.endswith(".page") else "notifies the team of"
    rule = alerts_pb2.AlertRule(
        rule_id=rule_id,
        scope=scope,
        triggers=[TRIGGERS[name] for name in triggers],
        targets=[_target(target, secret_values) for target in targets],
        max_alerts_per_hour=plan.alerts.max_alerts_per_hour,
        owner=plan.on_call.contact()[:256],
        description=(
            f"From the quota plan of agent {plan.agent} (team {plan.team}); {role} "
            f"{', '.join(triggers)}. Each run's ceiling is {format_usd(ceiling)}: create the "
            f"agent's runs with limit_micros={ceiling}."
        )[:1024],
    )
    if "burn_rate" in triggers and plan.alerts.burn_rate_micros_per_minute:
        rule.burn_rate_micros_per_minute = plan.alerts.burn_rate_micros_per_minute
    rule.min_interval.FromMilliseconds(plan.alerts.min_interval_ms)
    labels = {
        "agent": plan.agent,
        "team": plan.team,
        "source": "runcap-plan",
        "per_run_ceiling_micros": str(ceiling),
    }
    if costs.max_tokens is not None:
        labels["max_tokens_per_run"] = str(costs.max_tokens)
    used = [secret_values.get(t.secret_env, "") for t in targets if t.secret_env]
    if used:
        labels[FINGERPRINT_LABEL] = fingerprint(rule_id, used)
    rule.labels.update(labels)
    return rule


def _target(target: Target, secret_values: Mapping[str, str]) -> alerts_pb2.AlertTarget:
    secret = secret_values.get(target.secret_env, "")
    if target.kind == "webhook":
        return alerts_pb2.AlertTarget(
            webhook=alerts_pb2.WebhookTarget(url=target.url, secret=secret)
        )
    if target.kind == "slack":
        return alerts_pb2.AlertTarget(slack=alerts_pb2.SlackTarget(url=secret))
    return alerts_pb2.AlertTarget(
        pagerduty=alerts_pb2.PagerDutyTarget(url=target.url, routing_key=secret)
    )


def fingerprint(rule_id: str, values: list[str]) -> str:
    """64 bits of SHA-256 over a rule's secrets: enough to see that one changed,
    too little to confirm a guess of a random secret with any use."""
    data = "\0".join(["runcap plan secrets", rule_id, *values]).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class RuleFields:
    """What apply compares of a rule: everything but the secrets themselves
    (their fingerprint is a label)."""

    scope: str
    triggers: tuple[str, ...]
    burn_rate: int  # micro-USD per minute
    targets: tuple[str, ...]
    min_interval: int  # milliseconds
    max_alerts_per_hour: int
    owner: str
    description: str
    labels: tuple[tuple[str, str], ...]


def rule_fields(rule: alerts_pb2.AlertRule) -> RuleFields:
    names = {value: name for name, value in TRIGGERS.items()}
    scope = "tenant"
    if rule.HasField("scope"):
        scope = f"{_scope_name(rule.scope.kind)} {rule.scope.id}"
    targets: list[str] = []
    for target in rule.targets:
        kind = target.WhichOneof("target")
        if kind == "webhook":
            signed = target.webhook.secret_set or bool(target.webhook.secret)
            targets.append(f"webhook {target.webhook.url}" + (" (signed)" if signed else ""))
        elif kind == "slack":
            targets.append("slack")
        elif kind == "pagerduty":
            targets.append(f"pagerduty {target.pagerduty.url}")
    return RuleFields(
        scope=scope,
        triggers=tuple(sorted(names.get(t, str(t)) for t in rule.triggers)),
        burn_rate=rule.burn_rate_micros_per_minute,
        targets=tuple(targets),
        min_interval=rule.min_interval.ToMilliseconds(),
        max_alerts_per_hour=rule.max_alerts_per_hour,
        owner=rule.owner,
        description=rule.description,
        labels=tuple(sorted(rule.labels.items())),
    )


def _scope_name(kind: int) -> str:
    names: dict[int, str] = {value: name for name, value in SCOPE_KINDS.items()}
    return names.get(kind, "run")
