"""The alert engine's pure parts: which changes raise what (and under which
identity), the rule checks and redaction, the message formats and signature,
and the retry arithmetic."""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import hmac
import json
import random
from collections.abc import Iterable
from pathlib import Path

import pytest

from runcap.v1 import alerts_pb2 as T
from runcap.v1 import budget_pb2
from runcap_server.alerts import delivery, formats, rules
from runcap_server.alerts.evaluate import RunMemory, evaluate
from runcap_server.alerts.facts import AlertFacts, summarize
from runcap_server.alerts.rules import Rule, Target, Trigger
from runcap_server.errors import InvalidArgument
from runcap_server.ledger.types import (
    BudgetState,
    Change,
    DecisionReason,
    EventType,
    Lineage,
    RunSpec,
    RunStatus,
    RunView,
    ScopeKind,
    ScopeRef,
    Threshold,
)
from runcap_server.validation import Validator

NOW = 1_800_000_000_000


def rule(*triggers: Trigger, since_ms: int = 0, burn: int = 0, rule_id: str = "r") -> Rule:
    return Rule(
        rule_id=rule_id,
        triggers=frozenset(triggers),
        targets=(Target("webhook", "http://127.0.0.1/x"),),
        min_interval_ms=600_000,
        max_alerts_per_hour=30,
        burn_rate_micros_per_minute=burn,
        since_ms=since_ms,
    )


class Run:
    """Writes a run's changes, one revision at a time."""

    def __init__(self) -> None:
        self.revision = 0

    def change(self, kind: EventType, at_ms: int = NOW, **fields: object) -> Change:
        self.revision += 1
        state = BudgetState("run", 1_000_000, 0, 0, self.revision, RunStatus.OPEN, 0, 0)
        return Change(self.revision, kind, at_ms, state, **fields)  # type: ignore[arg-type]


def raised(
    changes: Iterable[Change], memory: RunMemory, rules_: list[Rule]
) -> list[tuple[str, str]]:
    return [
        (s.trigger.slug, s.identity) for change in changes for s in evaluate(change, memory, rules_)
    ]


def test_a_stop_is_raised_once_until_a_reserve_holds_money_again() -> None:
    run, memory = Run(), RunMemory()
    every = [rule(*Trigger)]
    blocked = {"reason": DecisionReason.INSUFFICIENT_BUDGET}
    changes = [
        run.change(EventType.THRESHOLD_CROSSED, threshold=Threshold.WARN),
        run.change(EventType.THRESHOLD_CROSSED, threshold=Threshold.THROTTLE),
        run.change(EventType.THRESHOLD_CROSSED, threshold=Threshold.STOP),  # 3
        run.change(EventType.BLOCKED, **blocked),  # the same wall
        run.change(EventType.RESERVED),  # unblocked
        run.change(EventType.BLOCKED, **blocked),  # 6: blocked again
    ]
    assert raised(changes, memory, every) == [
        ("threshold", "threshold:2"),
        ("throttle", "threshold:3"),
        ("stop", "stop@3"),
        ("stop", "stop@6"),
    ]
    assert memory.stopped


def test_memory_survives_a_restart_through_its_encoding() -> None:
    run, memory = Run(), RunMemory()
    every = [rule(*Trigger, burn=100)]
    evaluate(run.change(EventType.BLOCKED), memory, every)
    evaluate(run.change(EventType.COMMITTED, actual_micros=150), memory, every)
    resumed = RunMemory.decode(memory.encode())
    assert resumed == memory
    # Neither the wall nor the burn is new after the restart.
    later = [run.change(EventType.BLOCKED), run.change(EventType.COMMITTED, actual_micros=10)]
    assert raised(later, resumed, every) == []


def test_burn_rate_is_one_alert_per_excursion_above_each_rules_rate() -> None:
    run, memory = Run(), RunMemory()
    low, high = (
        rule(Trigger.BURN_RATE, burn=100, rule_id="low"),
        rule(Trigger.BURN_RATE, burn=250, rule_id="high"),
    )

    def commit(at_s: float, micros: int) -> list[tuple[str, str, int]]:
        change = run.change(EventType.COMMITTED, at_ms=NOW + int(at_s * 1000), actual_micros=micros)
        return [
            (s.rule.rule_id, s.identity, int(s.details["burn_micros_per_minute"]))
            for s in evaluate(change, memory, [low, high])
        ]

    assert commit(0, 60) == []
    assert commit(10, 60) == [("low", "burn@2", 120)]
    assert commit(20, 60) == []  # still above low: the same excursion
    assert commit(30, 80) == [("high", "burn@4", 260)]
    # A quiet minute later the trailing minute holds only this commit: re-armed.
    assert commit(95, 120) == [("low", "burn@5", 120)]


def test_other_triggers_and_rule_filters() -> None:
    run, memory = Run(), RunMemory()
    late = rule(*Trigger, since_ms=NOW + 1, rule_id="late")
    only_suspend = rule(Trigger.SUSPENDED, rule_id="suspend")
    changes = [
        run.change(EventType.SUSPENDED),
        run.change(EventType.APPROVAL_REQUESTED, approval="m:tool:deploy", reservation_id="x"),
        run.change(EventType.COMMITTED, reservation_id="r9", actual_micros=30, overrun_micros=10),
        run.change(EventType.COMMITTED, reservation_id="ok", actual_micros=5),
        run.change(EventType.THRESHOLD_CROSSED, threshold=Threshold.INFO),
    ]
    signals = [s for c in changes for s in evaluate(c, memory, [late, only_suspend])]
    # `late` was stored after these changes: it raises nothing for them.
    assert [(s.rule.rule_id, s.trigger.slug, s.identity) for s in signals] == [
        ("suspend", "suspended", "suspended@1"),
    ]
    no_burn = rule(*(t for t in Trigger if t is not Trigger.BURN_RATE))
    signals = [s for c in changes for s in evaluate(c, RunMemory(), [no_burn])]
    assert [(s.trigger.slug, s.identity, s.rate_key) for s in signals] == [
        ("suspended", "suspended@1", "suspended"),
        ("approval_requested", "approval:run/approval:meter:tool:deploy", "approval_requested"),
        ("overrun", "overrun:r9", "overrun"),
        ("threshold", "threshold:1", "threshold:1"),
    ]
    assert signals[2].details["overrun_micros"] == 10


def _view(run_id: str = "child", **lineage: object) -> RunView:
    state = BudgetState(run_id, 1, 0, 0, 0, RunStatus.OPEN, 0, 0)
    spec = RunSpec(run_id, 1, {}, None)
    return RunView(spec, 1, 0, None, state, Lineage(**lineage))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "scope_id", "matches"),
    [
        (ScopeKind.RUN, "child", True),
        (ScopeKind.RUN, "root", True),  # an ancestor
        (ScopeKind.RUN, "other", False),
        (ScopeKind.TEAM, "data", True),
        (ScopeKind.TEAM, "ml", False),
        (ScopeKind.USER, "alice", True),
        (ScopeKind.API_KEY, "agent-7", True),
        (ScopeKind.API_KEY, "alice", False),
    ],
)
def test_a_rule_matches_the_runs_charged_to_its_scope(
    kind: ScopeKind, scope_id: str, matches: bool
) -> None:
    view = _view(
        ancestors=("parent", "root"), api_key_id="agent-7", user_id="alice", team_id="data"
    )
    scoped = dataclasses.replace(rule(Trigger.STOP), scope=ScopeRef(kind, scope_id))
    assert scoped.matches(view) is matches
    assert rule(Trigger.STOP).matches(view)  # no scope: every run


def _valid(**fields: object) -> T.AlertRule:
    base = T.AlertRule(
        rule_id="r1",
        triggers=[T.ALERT_TRIGGER_STOP],
        targets=[T.AlertTarget(webhook=T.WebhookTarget(url="https://h.example/x", secret="k"))],
    )
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(base, name)[:]
            getattr(base, name).extend(value)
        else:
            setattr(base, name, value)
    return base


def test_validation_fills_in_defaults_and_storage_is_deterministic() -> None:
    check = Validator()
    message = _valid()
    message.labels["b"] = "2"
    message.labels["a"] = "1"
    normalized = rules.validate(check, message)
    check.done()
    assert normalized.min_interval.ToMilliseconds() == rules.DEFAULT_MIN_INTERVAL_MS
    assert normalized.max_alerts_per_hour == rules.DEFAULT_MAX_PER_HOUR
    other = _valid()
    other.labels["a"] = "1"
    other.labels["b"] = "2"
    check = Validator()
    assert rules.encode(rules.validate(check, other)) == rules.encode(normalized)
    assert rules.decode(rules.encode(normalized)) == normalized
    stored = rules.to_rule(normalized, NOW)
    assert stored.targets == (Target("webhook", "https://h.example/x", secret="k"),)
    assert stored.since_ms == NOW
    assert stored.scope is None
    assert stored.triggers == frozenset({Trigger.STOP})


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://hooks.slack.com/services/T/B/x", True),
        ("http://127.0.0.1:8080/hook", True),
        ("http://[::1]:9/x", True),
        ("ftp://h/x", False),
        ("https:///nohost", False),
        ("https://h:99999/x", False),
        ("https://h/x y", False),
        ("http://[::1/x", False),
        ("", False),
    ],
)
def test_target_urls_must_be_http(url: str, ok: bool) -> None:
    check = Validator()
    rules.validate(check, _valid(targets=[T.AlertTarget(slack=T.SlackTarget(url=url))]))
    if ok:
        check.done()
    else:
        with pytest.raises(InvalidArgument) as raised:
            check.done()
        assert raised.value.fields == ["rule.targets[0].slack.url"]
        assert url not in raised.value.message or not url


def test_redaction_keeps_no_secret() -> None:
    message = _valid(
        targets=[
            T.AlertTarget(webhook=T.WebhookTarget(url="https://h/x", secret="s3cret")),
            T.AlertTarget(webhook=T.WebhookTarget(url="https://h/y")),
            T.AlertTarget(slack=T.SlackTarget(url="https://hooks.slack.com/services/T/B/abcdWXYZ")),
            T.AlertTarget(pagerduty=T.PagerDutyTarget(routing_key="0123456789")),
        ]
    )
    shown = rules.redacted(message)
    assert [(t.webhook.secret, t.webhook.secret_set) for t in shown.targets[:2]] == [
        ("", True),
        ("", False),
    ]
    assert shown.targets[2].slack.url == "https://hooks.slack.com/****WXYZ"
    assert shown.targets[3].pagerduty.routing_key == "******6789"
    assert message.targets[0].webhook.secret == "s3cret"  # the stored rule is untouched


def _facts(trigger: Trigger = Trigger.STOP, threshold: int = 0) -> AlertFacts:
    state = budget_pb2.BudgetState(
        run_id="run-1",
        limit_micros=5_000_000,
        committed_micros=4_750_000,
        status=budget_pb2.RUN_STATUS_OPEN,
    )
    return AlertFacts(
        alert_id="abc123",
        tenant="acme",
        rule_id="r1",
        trigger=trigger,
        run_id="run-1",
        time_ms=NOW,
        summary="run run-1 is throttled",
        threshold=threshold,
        budget=state.SerializeToString(),
        labels={"agent": "coder"},
        team_id="ml",
        owner="Dana",
    )


def test_the_webhook_signature_is_hmac_sha256_over_time_dot_body() -> None:
    target = Target("webhook", "https://h/x", secret="whsec")
    body, headers = formats.request(target, _facts(), "http://dash:8080/", 1_700_000_000)
    expected = hmac.new(b"whsec", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert headers["X-Runcap-Signature"] == f"t=1700000000,v1={expected}"
    assert headers["X-Runcap-Alert-Id"] == "abc123"
    sent = json.loads(body)
    assert sent["spend"]["committed_usd"] == "4.75"
    assert sent["spend"]["percent"] == 95
    assert sent["dashboard_url"] == "http://dash:8080/runs/run-1"
    assert sent["time"] == "2027-01-15T08:00:00.000Z"
    unsigned = formats.request(Target("webhook", "https://h/x"), _facts(), "", 1)[1]
    assert "X-Runcap-Signature" not in unsigned


def test_pagerduty_severity_follows_the_trigger() -> None:
    def severity(trigger: Trigger, level: int = 0) -> str:
        event = formats.pagerduty_body(_facts(trigger, level), "key", "")
        assert "links" not in event  # no dashboard configured
        return str(event["payload"]["severity"])

    assert severity(Trigger.STOP) == "critical"
    assert severity(Trigger.THROTTLE) == "error"
    assert severity(Trigger.THRESHOLD, budget_pb2.THRESHOLD_LEVEL_WARN) == "warning"
    assert severity(Trigger.THRESHOLD, budget_pb2.THRESHOLD_LEVEL_INFO) == "info"


def test_retry_after_and_backoff() -> None:
    now = 1_700_000_000.0
    assert delivery.retry_after("7", now) == 7.0
    assert delivery.retry_after("999999", now) == delivery.MAX_RETRY_AFTER_S
    assert delivery.retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert delivery.retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert delivery.retry_after("soon", now) is None
    assert delivery.retry_after(None, now) is None
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (9, 60.0), (200, 60.0)]:
        waits = [delivery.backoff_s(attempt, 1.0, 60.0, None, rng) for _ in range(200)]
        assert ceiling / 2 <= min(waits) <= max(waits) <= ceiling
    assert delivery.backoff_s(1, 1.0, 60.0, 30.0, rng) == 30.0


def test_the_documented_webhook_body_is_what_is_sent() -> None:
    text = (Path(__file__).parents[2] / "docs" / "alerts.md").read_text()
    block = text.split("<!-- example: webhook -->\n```json\n", 1)[1].split("```", 1)[0]
    state = budget_pb2.BudgetState(
        run_id="enrich-2291",
        limit_micros=5_000_000,
        committed_micros=5_000_000,
        revision=412,
        status=budget_pb2.RUN_STATUS_OPEN,
    )
    facts = AlertFacts(
        alert_id="3f0c6a1e9b2d4c7f8a5e1d2c3b4a5968",
        tenant="acme",
        rule_id="data-enrichment",
        trigger=Trigger.STOP,
        run_id="enrich-2291",
        time_ms=1_795_400_951_463,
        summary=summarize(Trigger.STOP, "enrich-2291", "enricher", 5_000_000, 5_000_000, 4, {}),
        threshold=budget_pb2.THRESHOLD_LEVEL_STOP,
        budget=state.SerializeToString(),
        labels={"agent": "enricher", "feature": "crm-sync"},
        api_key_id="pipeline-7",
        team_id="data",
        owner="Dana Whitfield",
        description="from plan data-enrichment",
    )
    assert json.loads(block) == formats.webhook_body(facts, "http://runcap.internal:8080")
