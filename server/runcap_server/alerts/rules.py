"""Alert rules: validation at the edge, storage form, redaction, scope matching.

A rule is stored as its normalized `runcap.v1.AlertRule` (defaults filled in,
secrets kept), serialized deterministically: putting the same rule twice
stores the same text, which is how PutAlertRule knows nothing changed.
Secrets never leave the store: `redacted` is what the API answers with.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from urllib.parse import urlsplit

from google.protobuf import duration_pb2

from runcap.v1 import alerts_pb2
from runcap_server.ledger.types import MAX_MICROS, RunView, ScopeKind, ScopeRef
from runcap_server.validation import Validator

DEFAULT_MIN_INTERVAL_MS = 600_000
MAX_MIN_INTERVAL_MS = 86_400_000
DEFAULT_MAX_PER_HOUR = 30
MAX_PER_HOUR = 10_000
MAX_TARGETS = 8
MAX_RULE_LABELS = 16
MAX_OWNER = 256
MAX_DESCRIPTION = 1024
MAX_URL = 2048
MAX_SECRET = 256
MAX_ROUTING_KEY = 128
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"


class Trigger(IntEnum):
    """runcap.v1.AlertTrigger (same values)."""

    THRESHOLD = 1
    THROTTLE = 2
    STOP = 3
    SUSPENDED = 4
    APPROVAL_REQUESTED = 5
    OVERRUN = 6
    BURN_RATE = 7
    BACKEND_DOWN = 8

    @property
    def slug(self) -> str:
        """The trigger's name in messages: "stop", "approval_requested"."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Target:
    """One destination: "webhook", "slack" or "pagerduty"."""

    kind: str
    url: str
    secret: str = ""
    routing_key: str = ""

    def describe(self) -> str:
        """For logs and last_error: the kind and host, never the path (Slack
        URLs are secrets) or a key."""
        return f"{self.kind} {urlsplit(self.url).hostname or '?'}"


@dataclass(frozen=True, slots=True)
class Rule:
    """A stored rule, as the engine uses it."""

    rule_id: str
    triggers: frozenset[Trigger]
    targets: tuple[Target, ...]
    min_interval_ms: int
    max_alerts_per_hour: int
    scope: ScopeRef | None = None
    burn_rate_micros_per_minute: int = 0
    owner: str = ""
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    # When the rule was first stored: it alerts on changes from then on.
    since_ms: int = 0

    def matches(self, view: RunView) -> bool:
        """Whether the run is charged to the rule's scope (or the rule has none)."""
        scope = self.scope
        if scope is None:
            return True
        lineage = view.lineage
        if scope.kind is ScopeKind.RUN:
            return scope.id == view.spec.run_id or scope.id in lineage.ancestors
        charged = {
            ScopeKind.API_KEY: lineage.api_key_id,
            ScopeKind.USER: lineage.user_id,
            ScopeKind.TEAM: lineage.team_id,
        }[scope.kind]
        return scope.id == charged


def encode(message: alerts_pb2.AlertRule) -> str:
    """The storage form: deterministic, so equal rules store equal text."""
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode()


def decode(text: str) -> alerts_pb2.AlertRule:
    return alerts_pb2.AlertRule.FromString(base64.b64decode(text))


def to_rule(message: alerts_pb2.AlertRule, since_ms: int) -> Rule:
    """A stored (normalized) rule for the engine."""
    targets = []
    for target in message.targets:
        kind = target.WhichOneof("target")
        if kind == "webhook":
            targets.append(Target("webhook", target.webhook.url, secret=target.webhook.secret))
        elif kind == "slack":
            targets.append(Target("slack", target.slack.url))
        elif kind == "pagerduty":
            pd = target.pagerduty
            targets.append(Target("pagerduty", pd.url, routing_key=pd.routing_key))
    scope = None
    if message.HasField("scope"):
        scope = ScopeRef(ScopeKind(message.scope.kind), message.scope.id)
    return Rule(
        rule_id=message.rule_id,
        triggers=frozenset(Trigger(t) for t in message.triggers),
        targets=tuple(targets),
        min_interval_ms=message.min_interval.ToMilliseconds(),
        max_alerts_per_hour=message.max_alerts_per_hour,
        scope=scope,
        burn_rate_micros_per_minute=message.burn_rate_micros_per_minute,
        owner=message.owner,
        description=message.description,
        labels=dict(message.labels),
        since_ms=since_ms,
    )


def redacted(message: alerts_pb2.AlertRule) -> alerts_pb2.AlertRule:
    """The rule as the API shows it: no webhook secret, Slack path and
    PagerDuty routing key masked."""
    out = alerts_pb2.AlertRule()
    out.CopyFrom(message)
    for target in out.targets:
        kind = target.WhichOneof("target")
        if kind == "webhook":
            target.webhook.secret_set = bool(target.webhook.secret)
            target.webhook.secret = ""
        elif kind == "slack":
            target.slack.url = _mask_url(target.slack.url)
        elif kind == "pagerduty":
            key = target.pagerduty.routing_key
            target.pagerduty.routing_key = "*" * max(0, len(key) - 4) + key[-4:]
    return out


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    tail = parts.path[-4:] if len(parts.path) > 8 else ""
    return f"{parts.scheme}://{parts.netloc}/****{tail}"


def validate(check: Validator, message: alerts_pb2.AlertRule) -> alerts_pb2.AlertRule:
    """The rule normalized (defaults filled in), or violations added to `check`."""
    out = alerts_pb2.AlertRule()
    out.rule_id = check.identifier("rule.rule_id", message.rule_id)
    if message.HasField("scope"):
        out.scope.CopyFrom(message.scope)
        if message.scope.kind not in {k.value for k in ScopeKind}:
            check.fail(
                "rule.scope.kind",
                "must be SCOPE_KIND_RUN, SCOPE_KIND_API_KEY, SCOPE_KIND_USER or SCOPE_KIND_TEAM",
            )
        check.identifier("rule.scope.id", message.scope.id)
    triggers = list(message.triggers)
    if not triggers:
        check.fail("rule.triggers", "must name at least one trigger")
    for i, trigger in enumerate(triggers):
        if trigger not in {t.value for t in Trigger}:
            check.fail(f"rule.triggers[{i}]", f"is not an AlertTrigger (got {trigger})")
        elif trigger in triggers[:i]:
            check.fail(f"rule.triggers[{i}]", f"repeats {alerts_pb2.AlertTrigger.Name(trigger)}")
    out.triggers.extend(triggers)
    rate = message.burn_rate_micros_per_minute
    if alerts_pb2.ALERT_TRIGGER_BURN_RATE in triggers:
        check.micros("rule.burn_rate_micros_per_minute", rate, minimum=1)
    elif rate:
        check.fail(
            "rule.burn_rate_micros_per_minute", "is only for ALERT_TRIGGER_BURN_RATE: leave it 0"
        )
    out.burn_rate_micros_per_minute = min(max(rate, 0), MAX_MICROS)
    if not 1 <= len(message.targets) <= MAX_TARGETS:
        check.fail("rule.targets", f"must have 1 to {MAX_TARGETS} targets")
    for i, target in enumerate(message.targets[:MAX_TARGETS]):
        out.targets.append(_target(check, f"rule.targets[{i}]", target))
    interval_ms = check.duration_ms(
        "rule.min_interval",
        message.min_interval if message.HasField("min_interval") else None,
        max_ms=MAX_MIN_INTERVAL_MS,
    )
    out.min_interval.CopyFrom(_duration(interval_ms or DEFAULT_MIN_INTERVAL_MS))
    per_hour = message.max_alerts_per_hour
    if not 0 <= per_hour <= MAX_PER_HOUR:
        check.fail("rule.max_alerts_per_hour", f"must be 0 (default) to {MAX_PER_HOUR}")
    out.max_alerts_per_hour = per_hour if per_hour > 0 else DEFAULT_MAX_PER_HOUR
    for name, limit in (("owner", MAX_OWNER), ("description", MAX_DESCRIPTION)):
        value = getattr(message, name)
        if len(value) > limit:
            check.fail(f"rule.{name}", f"must be at most {limit} characters (got {len(value)})")
        setattr(out, name, value)
    if len(message.labels) > MAX_RULE_LABELS:
        check.fail("rule.labels", f"has {len(message.labels)}; at most {MAX_RULE_LABELS}")
    out.labels.update(check.labels("rule.labels", message.labels))
    return out


def _target(check: Validator, where: str, target: alerts_pb2.AlertTarget) -> alerts_pb2.AlertTarget:
    out = alerts_pb2.AlertTarget()
    kind = target.WhichOneof("target")
    if kind == "webhook":
        out.webhook.url = _url(check, f"{where}.webhook.url", target.webhook.url)
        secret = target.webhook.secret
        if len(secret.encode()) > MAX_SECRET:
            check.fail(f"{where}.webhook.secret", f"must be at most {MAX_SECRET} bytes")
        out.webhook.secret = secret
    elif kind == "slack":
        out.slack.url = _url(check, f"{where}.slack.url", target.slack.url)
    elif kind == "pagerduty":
        url = target.pagerduty.url or PAGERDUTY_URL
        out.pagerduty.url = _url(check, f"{where}.pagerduty.url", url)
        key = target.pagerduty.routing_key
        if not key:
            check.fail(f"{where}.pagerduty.routing_key", "is required")
        elif len(key) > MAX_ROUTING_KEY or not key.isprintable() or " " in key:
            check.fail(
                f"{where}.pagerduty.routing_key",
                f"must be 1 to {MAX_ROUTING_KEY} printable characters without spaces",
            )
        out.pagerduty.routing_key = key
    else:
        check.fail(where, "must set one of webhook, slack or pagerduty")
    return out


def _url(check: Validator, where: str, url: str) -> str:
    # The URL itself is never echoed: a Slack webhook URL is a secret.
    if not url:
        check.fail(where, "is required")
        return url
    try:
        parts = urlsplit(url)
        web = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        web = False
    if len(url) > MAX_URL or any(c.isspace() for c in url):
        check.fail(where, f"must be an http(s) URL of at most {MAX_URL} characters, no spaces")
    elif not web:
        check.fail(where, "must be an http:// or https:// URL with a host")
    return url


def _duration(ms: int) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(ms)
    return value
