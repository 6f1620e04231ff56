"""A quota plan as typed values, built from a document that passed the schema.

Money is integer micro-USD from here on; the buffer is an exact `Fraction`.
What the schema cannot say (at most 6 decimals in a number, amounts within
the server's bound) is checked here and reported as problems with paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final, Literal

from runcap_server.money import MAX_MICROS, format_usd, parse_usd
from runcap_server.plan.document import Document, PathPart, Problem
from runcap_server.settings import parse_duration_ms

ScopeKindName = Literal["api_key", "user", "team"]

DEFAULT_BUFFER: Final = Fraction(2)
DEFAULT_THRESHOLDS: Final = (60, 80, 95)
DEFAULT_NOTIFY_ON: Final = ("throttle", "approval_requested", "overrun", "suspended")
DEFAULT_MIN_INTERVAL_MS: Final = 10 * 60 * 1000
DEFAULT_MAX_ALERTS_PER_HOUR: Final = 30
PAGERDUTY_EVENTS_URL: Final = "https://events.pagerduty.com/v2/enqueue"


@dataclass(frozen=True, slots=True)
class OnCall:
    """The named human paged at 3am."""

    name: str
    email: str = ""
    slack: str = ""
    pagerduty: str = ""
    phone: str = ""

    def contact(self) -> str:
        """``Priya Raman <priya@example.com>, slack @priya``: for alert rules."""
        text = self.name + (f" <{self.email}>" if self.email else "")
        others = (("slack", self.slack), ("pagerduty", self.pagerduty), ("phone", self.phone))
        return ", ".join([text, *(f"{kind} {value}" for kind, value in others if value)])


@dataclass(frozen=True, slots=True)
class LlmUse:
    """One kind of LLM call of a run."""

    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    calls: int
    calls_per_minute: int

    @property
    def ref(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True, slots=True)
class ExternalApi:
    """A paid external API the agent calls, reserved on its own meter."""

    name: str
    meter: str
    usd_per_call_micros: int
    calls_per_run: int
    calls_per_minute: int
    daily_quota: int | None


@dataclass(frozen=True, slots=True)
class Target:
    """An alert destination; secrets are environment variable names."""

    kind: Literal["webhook", "slack", "pagerduty"]
    url: str = ""
    secret_env: str = ""

    def describe(self) -> str:
        if self.kind == "webhook":
            return f"webhook {self.url}"
        if self.kind == "slack":
            return f"slack (${self.secret_env})"
        return f"pagerduty (${self.secret_env})"


@dataclass(frozen=True, slots=True)
class Alerts:
    notify: tuple[Target, ...]
    page: tuple[Target, ...]
    notify_on: tuple[str, ...]
    page_on: tuple[str, ...]
    burn_rate_micros_per_minute: int | None
    min_interval_ms: int
    max_alerts_per_hour: int


@dataclass(frozen=True, slots=True)
class Plan:
    """A quota plan, typed. Amounts are micro-USD."""

    agent: str
    description: str
    team: str
    on_call: OnCall
    scope_kind: ScopeKindName
    scope_id: str
    runs_per_day: int
    confidence: str
    peak_runs_per_day: int | None
    llm: tuple[LlmUse, ...]
    usd_per_run_micros: int | None
    duration_minutes: int | None
    max_parallel_calls: int | None
    max_calls_per_minute: int | None
    external_apis: tuple[ExternalApi, ...]
    buffer: Fraction
    per_run_ceiling_micros: int | None
    daily_ceiling_micros: int | None
    monthly_ceiling_micros: int | None
    mode: str
    soft_gate_margin_percent: int
    thresholds: tuple[int, int, int]
    approval_percent: int
    unlisted_apis_need_approval: bool
    alerts: Alerts
    stated_worst_daily_micros: int | None
    stated_worst_monthly_micros: int | None

    @property
    def low_confidence(self) -> bool:
        """ "low", or a stated percentage below 50."""
        if self.confidence.endswith("%"):
            return int(self.confidence[:-1]) < 50
        return self.confidence == "low"


def build(document: Document) -> tuple[Plan, list[Problem]]:
    """The typed plan of a document that passed the schema, with the problems
    of its amounts (an amount in error reads as $0)."""
    builder = _Builder(document)
    plan = builder.plan(document.data)
    return plan, builder.problems


class _Builder:
    def __init__(self, document: Document) -> None:
        self.document = document
        self.problems: list[Problem] = []

    def fail(self, parts: Sequence[PathPart], message: str) -> None:
        self.problems.append(self.document.problem(parts, message))

    def usd(self, value: object, parts: Sequence[PathPart]) -> int:
        """Exact micro-USD of a schema-checked amount (number or "$1.25")."""
        try:
            if isinstance(value, str):
                return parse_usd(value)
            exact = Decimal(value) if isinstance(value, int) else value
            assert isinstance(exact, Decimal)
            micros = exact.scaleb(6)
            if micros != micros.to_integral_value():
                raise ValueError(
                    f"{exact:f} has more than 6 decimal places (the smallest unit is $0.000001)"
                )
            if micros > MAX_MICROS:
                raise ValueError(f"{exact:f} is more than {format_usd(MAX_MICROS)}")
            return int(micros)
        except ValueError as error:
            self.fail(parts, str(error))
            return 0

    def optional_usd(
        self, section: dict[str, Any], key: str, parts: Sequence[PathPart]
    ) -> int | None:
        return self.usd(section[key], [*parts, key]) if key in section else None

    def plan(self, data: dict[str, Any]) -> Plan:
        owner = data["owner"]
        on_call = owner["on_call"]
        [(scope_kind, scope_id)] = data["scope"].items()
        volume = data["volume"]
        per_run = data["per_run"]
        ceilings = data.get("ceilings", {})
        enforcement = data.get("enforcement", {})
        worst = data.get("worst_case", {})
        buffer = DEFAULT_BUFFER
        if "buffer" in ceilings:
            buffer = Fraction(Decimal(str(ceilings["buffer"])))
        thresholds = enforcement.get("thresholds", {})
        defaults = dict(zip(("info", "warn", "throttle"), DEFAULT_THRESHOLDS, strict=True))
        return Plan(
            agent=data["agent"],
            description=data.get("description", ""),
            team=owner["team"],
            on_call=OnCall(
                name=on_call["name"],
                email=on_call.get("email", ""),
                slack=on_call.get("slack", ""),
                pagerduty=on_call.get("pagerduty", ""),
                phone=on_call.get("phone", ""),
            ),
            scope_kind=scope_kind,
            scope_id=scope_id,
            runs_per_day=volume["runs_per_day"],
            confidence=volume["confidence"],
            peak_runs_per_day=volume.get("peak_runs_per_day"),
            llm=tuple(self.llm(item) for item in per_run.get("llm", [])),
            usd_per_run_micros=self.optional_usd(per_run, "usd", ["per_run"]),
            duration_minutes=per_run.get("duration_minutes"),
            max_parallel_calls=per_run.get("max_parallel_calls"),
            max_calls_per_minute=per_run.get("max_calls_per_minute"),
            external_apis=tuple(
                self.api(index, item) for index, item in enumerate(data.get("external_apis", []))
            ),
            buffer=buffer,
            per_run_ceiling_micros=self.optional_usd(ceilings, "per_run_usd", ["ceilings"]),
            daily_ceiling_micros=self.optional_usd(ceilings, "daily_usd", ["ceilings"]),
            monthly_ceiling_micros=self.optional_usd(ceilings, "monthly_usd", ["ceilings"]),
            mode=enforcement.get("mode", "hard_gate"),
            soft_gate_margin_percent=enforcement.get("soft_gate_margin_percent", 0),
            thresholds=(
                thresholds.get("info", defaults["info"]),
                thresholds.get("warn", defaults["warn"]),
                thresholds.get("throttle", defaults["throttle"]),
            ),
            approval_percent=enforcement.get("approval_percent", 0),
            unlisted_apis_need_approval=enforcement.get("unlisted_apis_need_approval", True),
            alerts=self.alerts(data["alerts"]),
            stated_worst_daily_micros=self.optional_usd(worst, "daily_usd", ["worst_case"]),
            stated_worst_monthly_micros=self.optional_usd(worst, "monthly_usd", ["worst_case"]),
        )

    def llm(self, item: dict[str, Any]) -> LlmUse:
        provider, _, model = item["model"].partition("/")
        calls = item.get("calls", 1)
        return LlmUse(
            provider=provider,
            model=model,
            input_tokens=item["input_tokens"],
            output_tokens=item["output_tokens"],
            calls=calls,
            calls_per_minute=item.get("calls_per_minute", calls),
        )

    def api(self, index: int, item: dict[str, Any]) -> ExternalApi:
        return ExternalApi(
            name=item["name"],
            meter=item.get("meter", f"tool:{item['name']}"),
            usd_per_call_micros=self.usd(
                item["usd_per_call"], ["external_apis", index, "usd_per_call"]
            ),
            calls_per_run=item["calls_per_run"],
            calls_per_minute=item["calls_per_minute"],
            daily_quota=item.get("daily_quota"),
        )

    def alerts(self, section: dict[str, Any]) -> Alerts:
        burn = self.optional_usd(section, "burn_rate_usd_per_minute", ["alerts"])
        page_on = ("stop", "burn_rate") if burn else ("stop",)
        interval = DEFAULT_MIN_INTERVAL_MS
        if "min_interval" in section:
            interval = parse_duration_ms(section["min_interval"])
            if interval > 24 * 3_600_000:
                self.fail(["alerts", "min_interval"], "must be at most 24h")
        return Alerts(
            notify=tuple(_target(item) for item in section.get("notify", [])),
            page=tuple(_target(item) for item in section["page"]),
            notify_on=tuple(section.get("notify_on", DEFAULT_NOTIFY_ON)),
            page_on=tuple(section.get("page_on", page_on)),
            burn_rate_micros_per_minute=burn,
            min_interval_ms=interval,
            max_alerts_per_hour=section.get("max_alerts_per_hour", DEFAULT_MAX_ALERTS_PER_HOUR),
        )


def _target(item: dict[str, Any]) -> Target:
    [(kind, fields)] = item.items()
    if kind == "webhook":
        return Target("webhook", url=fields["url"], secret_env=fields.get("secret_env", ""))
    if kind == "slack":
        return Target("slack", secret_env=fields["url_env"])
    return Target(
        "pagerduty",
        url=fields.get("url", PAGERDUTY_EVENTS_URL),
        secret_env=fields["routing_key_env"],
    )


__all__ = [
    "Alerts",
    "ExternalApi",
    "LlmUse",
    "OnCall",
    "Plan",
    "Target",
    "build",
]
