"""`runcap plan apply`: read what the server has, list the differences with
the plan (+ add, ~ change, - remove, = unchanged), and write only those.

Reads come first and writes last, so a plan the server cannot take (an
unknown model, a missing secret, a key without the admin role for the first
write) fails before anything changes or at its first write. Applying the same
plan again finds nothing to change and makes no write call at all. Every write
sets a value (SetScopeLimit, SetScopePolicy, PutAlertRule, DeleteAlertRule), so
re-running apply after a failure part-way finishes the job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc

from runcap.errors import RuncapError, from_rpc_error
from runcap.v1 import alerts_pb2, alerts_pb2_grpc, budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.money import format_usd
from runcap_server.plan.desired import (
    FINGERPRINT_LABEL,
    PERIODS,
    Desired,
    PolicyFields,
    RuleFields,
    policy_message,
    rule_fields,
    stored_policy,
)
from runcap_server.prices import ModelPrice, Rates

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Op = Literal["+", "~", "-", "="]


class Remote:
    """The calls apply makes, on one channel, with the caller's API key.
    Failures raise `runcap.errors.RuncapError`."""

    def __init__(
        self, channel: grpc.Channel, *, api_key: str | None = None, timeout: float = 10.0
    ) -> None:
        self._budget = BudgetServiceStub(channel)
        self._alerts = alerts_pb2_grpc.AlertServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout

    def _call(self, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def model_price(self, provider: str, model: str) -> pb.GetModelPriceResponse:
        request = pb.GetModelPriceRequest(provider=provider, model=model)
        return self._call(self._budget.GetModelPrice, request)

    def get_scope(self, scope: budget_pb2.ScopeRef) -> budget_pb2.Scope:
        return self._call(self._budget.GetScope, pb.GetScopeRequest(scope=scope)).scope

    def set_scope_limit(self, scope: budget_pb2.ScopeRef, period: int, limit: int | None) -> None:
        request = pb.SetScopeLimitRequest(scope=scope, period=period)  # type: ignore[arg-type]
        if limit is None:
            request.clear = True
        else:
            request.limit_micros = limit
        self._call(self._budget.SetScopeLimit, request)

    def set_scope_policy(self, scope: budget_pb2.ScopeRef, policy: budget_pb2.RunPolicy) -> None:
        request = pb.SetScopePolicyRequest(scope=scope, policy=policy)
        self._call(self._budget.SetScopePolicy, request)

    def list_rules(self) -> list[alerts_pb2.AlertRule]:
        return list(
            self._call(self._alerts.ListAlertRules, alerts_pb2.ListAlertRulesRequest()).rules
        )

    def put_rule(self, rule: alerts_pb2.AlertRule) -> bool:
        request = alerts_pb2.PutAlertRuleRequest(rule=rule)
        return self._call(self._alerts.PutAlertRule, request).changed

    def delete_rule(self, rule_id: str) -> bool:
        request = alerts_pb2.DeleteAlertRuleRequest(rule_id=rule_id)
        return self._call(self._alerts.DeleteAlertRule, request).deleted


class ServerPrices:
    """The server's prices for the plan's models (tenant prices included), as
    Reserve would use them. The API gives a model's flat rates: a tiered model
    is priced at its base tier."""

    def __init__(self, remote: Remote, models: list[tuple[str, str]]) -> None:
        self._prices: dict[tuple[str, str], ModelPrice] = {}
        versions = set()
        overrides = []
        for provider, model in dict.fromkeys(models):
            answer = remote.model_price(provider, model)
            versions.add(answer.price_table_version)
            if answer.tenant_override:
                overrides.append(f"{provider}/{model}")
            if answer.HasField("price"):
                self._prices[(provider, model)] = _model_price(answer.price)
        self._version = "the server's price table " + ", ".join(sorted(versions))
        if not versions:
            self._version = "the server's prices (the plan names no model)"
        if overrides:
            self._version += " and tenant prices for " + ", ".join(overrides)

    @property
    def version(self) -> str:
        return self._version

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        return self._prices.get((provider, model))


def _model_price(price: pb.ModelPrice) -> ModelPrice:
    return ModelPrice(
        provider=price.provider,
        model=price.model,
        rates=Rates(
            price.input_rate,
            price.output_rate,
            price.cache_read_rate,
            price.cache_write_rate,
            price.reasoning_rate,
        ),
        context_window=price.context_window if price.HasField("context_window") else None,
        max_output_tokens=price.max_output_tokens if price.HasField("max_output_tokens") else None,
        tools=price.tools,
        json_schema=price.json_schema,
        modalities=frozenset(price.modalities) or frozenset({"text"}),
    )


@dataclass(frozen=True)
class Change:
    """One line of the plan of changes, with the write that makes it (none for `=`)."""

    op: Op
    subject: str
    details: tuple[str, ...] = ()
    write: Callable[[Remote], object] | None = None

    def to_json(self) -> dict[str, object]:
        return {"op": self.op, "subject": self.subject, "details": list(self.details)}


def changes(remote: Remote, want: Desired) -> list[Change]:
    """Compares the server's state with `want`; reads only."""
    scope = remote.get_scope(want.scope)
    found = _scope_changes(scope, want)
    rules = {rule.rule_id: rule for rule in remote.list_rules() if rule.rule_id in want.rule_ids}
    return found + _rule_changes(rules, want)


class ApplyFailed(Exception):
    """A write failed after `done` others were made; `error` says why."""

    def __init__(self, done: int, error: RuncapError) -> None:
        super().__init__(str(error))
        self.done = done
        self.error = error


def apply(remote: Remote, found: list[Change]) -> int:
    """Makes the writes of `found`, in order; returns how many were made.
    Raises ApplyFailed at the first write that fails."""
    done = 0
    for change in found:
        if change.write is not None:
            try:
                change.write(remote)
            except RuncapError as error:
                raise ApplyFailed(done, error) from error
            done += 1
    return done


def _scope_changes(scope: budget_pb2.Scope, want: Desired) -> list[Change]:
    found: list[Change] = []
    current = {usage.period: usage for usage in scope.usage}
    for name, period in PERIODS:
        usage = current.get(period)
        have = usage.limit_micros if usage is not None and usage.HasField("limit_micros") else None
        limit = want.limits[period]
        subject = f"{name} ceiling"
        if have == limit:
            found.append(Change("=", f"{subject} {_usd(limit)}"))
            continue
        op: Op = "~"
        text = f"{_usd(have)} -> {_usd(limit)}"
        if have is None:
            op, text = "+", _usd(limit)
        elif limit is None:
            op, text = "-", f"(was {_usd(have)})"
        found.append(Change(op, f"{subject} {text}", (), _set_limit(want.scope, period, limit)))
    existing = scope.default_policy if scope.HasField("default_policy") else None
    have_fields = stored_policy(existing) if existing is not None else None
    if have_fields == want.policy:
        found.append(Change("=", "default run policy"))
    else:
        message = policy_message(want.policy, existing)
        found.append(
            Change(
                "+" if have_fields is None else "~",
                "default run policy",
                _field_changes(have_fields, want.policy),
                _set_policy(want.scope, message),
            )
        )
    return found


def _rule_changes(have: dict[str, alerts_pb2.AlertRule], want: Desired) -> list[Change]:
    found: list[Change] = []
    wanted = {rule.rule_id for rule in want.rules}
    for rule in want.rules:
        subject = f"alert rule {rule.rule_id}"
        new = rule_fields(rule)
        old = rule_fields(have[rule.rule_id]) if rule.rule_id in have else None
        if old == new:
            found.append(Change("=", subject))
        else:
            added: Op = "+" if old is None else "~"
            found.append(Change(added, subject, _field_changes(old, new), _put_rule(rule)))
    for rule_id in want.rule_ids:
        if rule_id in have and rule_id not in wanted:
            found.append(Change("-", f"alert rule {rule_id}", (), _delete_rule(rule_id)))
    return found


def _field_changes(
    old: PolicyFields | RuleFields | None, new: PolicyFields | RuleFields
) -> tuple[str, ...]:
    lines = []
    for field in dataclasses.fields(new):
        after = getattr(new, field.name)
        before = None if old is None else getattr(old, field.name)
        if (old is not None and before == after) or (old is None and not after):
            continue  # unchanged, or a new item's empty field
        if field.name == "labels":
            lines += _label_changes(before, after)
        elif old is None:
            lines.append(f"{field.name}: {_show(field.name, after)}")
        else:
            lines.append(f"{field.name}: {_show(field.name, before)} -> {_show(field.name, after)}")
    return tuple(lines)


def _label_changes(
    before: tuple[tuple[str, str], ...] | None, after: tuple[tuple[str, str], ...]
) -> list[str]:
    old, new = dict(before or ()), dict(after)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key):
            continue
        if key == FINGERPRINT_LABEL:
            lines.append("secrets: " + ("changed" if key in old else "set"))
        elif before is None:
            lines.append(f"labels[{key}]: {new[key]}")
        else:
            lines.append(f"labels[{key}]: {old.get(key, '(none)')} -> {new.get(key, '(none)')}")
    return lines


def _show(name: str, value: object) -> str:
    """A field's value as people read it."""
    if value is None:
        return "(none)"
    if name == "thresholds" and isinstance(value, tuple):
        return "/".join(str(v) for v in value) + "%"
    if name == "rate_limit" and isinstance(value, tuple):
        calls, window_ms = value
        return f"{calls} calls per {duration_text(window_ms)}"
    if name == "min_interval" and isinstance(value, int):
        return duration_text(value)
    if name == "burn_rate" and isinstance(value, int):
        return f"{format_usd(value)}/min" if value else "(none)"
    if name == "meter_limits" and isinstance(value, tuple):
        return "{" + ", ".join(f"{meter}: {limit}" for meter, limit in value) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def duration_text(ms: int) -> str:
    """``60000`` -> ``1m``."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _usd(micros: int | None) -> str:
    return "none" if micros is None else format_usd(micros)


def _set_limit(
    scope: budget_pb2.ScopeRef, period: int, limit: int | None
) -> Callable[[Remote], object]:
    return lambda remote: remote.set_scope_limit(scope, period, limit)


def _set_policy(
    scope: budget_pb2.ScopeRef, policy: budget_pb2.RunPolicy
) -> Callable[[Remote], object]:
    return lambda remote: remote.set_scope_policy(scope, policy)


def _put_rule(rule: alerts_pb2.AlertRule) -> Callable[[Remote], object]:
    return lambda remote: remote.put_rule(rule)


def _delete_rule(rule_id: str) -> Callable[[Remote], object]:
    return lambda remote: remote.delete_rule(rule_id)
