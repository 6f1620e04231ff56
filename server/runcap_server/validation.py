"""Edge validation: every request is checked here before the ledger sees it.

Each check adds to one list of field violations, so a client learns about all
of its mistakes in a single INVALID_ARGUMENT answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from runcap.v1 import budget_pb2, budget_service_pb2
from runcap_server.errors import FieldViolation, InvalidArgument
from runcap_server.estimates import LlmCall
from runcap_server.ledger.types import (
    CALIBRATION_RING,
    DEFAULT_CALIBRATION_MIN_SAMPLES,
    DEFAULT_MAX_DEPTH,
    MAX_MICROS,
    MAX_RUN_DEPTH,
    SPEND_APPROVAL,
    EnforcementMode,
    Period,
    RunPolicy,
    ScopeKind,
    ScopeRef,
    parse_approval_id,
)
from runcap_server.prices import MAX_RATE, ModelPrice, Rates, TokenUsage

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
METER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MAX_METERS = 32
# Lists of "provider/model" names (downgrade_models, candidate_models).
MAX_MODEL_REFS = 256
# Counts of calls, units and runs: far below where Lua doubles lose exactness.
MAX_COUNT = 10**12
DAY_MS = 86_400_000
# google.protobuf.Timestamp's range (0001-01-01 to 9999-12-31) and nanos.
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799
MAX_NANOS = 999_999_999
MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")
# Token counts: far above any context window, far below where sums lose exactness.
MAX_TOKENS = 10**9
MODALITIES = frozenset({"text", "image", "audio", "video"})
LABEL_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
ID_RULE = (
    "must be 1 to 128 characters of letters, digits and . _ - :, starting with a letter or digit"
)


class Validator:
    """Collects the violations of one request."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)

    def identifier(self, field: str, value: str, *, required: bool = True) -> str:
        if not value:
            if required:
                self.fail(field, "is required")
        elif not ID_PATTERN.fullmatch(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            self.fail(field, f"{shown!r} {ID_RULE}")
        return value

    def micros(self, field: str, value: int | None, *, minimum: int) -> int:
        if value is None:
            self.fail(field, "is required")
            return 0
        if value < minimum:
            rule = "positive" if minimum == 1 else f"at least {minimum}"
            self.fail(field, f"must be {rule} (got {value})")
        elif value > MAX_MICROS:
            self.fail(field, f"must be at most {MAX_MICROS} micro-USD (got {value})")
        return value

    def duration_ms(
        self, field: str, value: duration_pb2.Duration | None, *, max_ms: int
    ) -> int | None:
        """A Duration in whole milliseconds, or None when unset."""
        if value is None:
            return None
        if value.seconds < 0 or value.nanos < 0:
            self.fail(field, "must not be negative")
            return None
        if value.nanos > MAX_NANOS:
            self.fail(field, f"is not a Duration: nanos must be at most {MAX_NANOS}")
            return None
        if value.nanos % 1_000_000:
            self.fail(field, "must be a whole number of milliseconds")
            return None
        ms = value.seconds * 1000 + value.nanos // 1_000_000
        if ms < 1:
            self.fail(field, "must be at least 1 ms")
        elif ms > max_ms:
            self.fail(field, f"must be at most {max_ms} ms (got {ms} ms)")
        return ms

    def timestamp_ms(self, field: str, value: timestamp_pb2.Timestamp) -> int | None:
        """A Timestamp in milliseconds, or None when it is not a valid one."""
        if not (
            MIN_TIMESTAMP_S <= value.seconds <= MAX_TIMESTAMP_S and 0 <= value.nanos <= MAX_NANOS
        ):
            self.fail(
                field,
                "is not a Timestamp: seconds must be in years 1 to 9999 "
                f"and nanos 0 to {MAX_NANOS} (got {value.seconds} s, {value.nanos} ns)",
            )
            return None
        return value.seconds * 1000 + value.nanos // 1_000_000

    def usage(self, field: str, usage: budget_service_pb2.TokenUsage) -> TokenUsage | None:
        """An LLM call's token usage; None when any count is invalid."""
        before = len(self.violations)
        counts = {
            name: self.tokens(f"{field}.{name}", getattr(usage, name))
            for name in (
                "input_tokens",
                "output_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            )
        }
        return None if len(self.violations) > before else TokenUsage(**counts)

    def model_name(self, field: str, value: str) -> str:
        if not value:
            self.fail(field, "is required")
        elif not MODEL_PATTERN.fullmatch(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            self.fail(
                field,
                f"{shown!r} must be 1 to 256 characters of letters, digits and . _ : / @ + -, "
                "starting with a letter or digit",
            )
        return value

    def tokens(self, field: str, value: int, *, minimum: int = 0) -> int:
        if value < minimum:
            self.fail(field, f"must be at least {minimum} (got {value})")
        elif value > MAX_TOKENS:
            self.fail(field, f"must be at most {MAX_TOKENS} (got {value})")
        return value

    def model_price(self, field: str, price: budget_service_pb2.ModelPrice) -> ModelPrice | None:
        """A tenant's price for a model; None when any part is invalid."""
        before = len(self.violations)
        provider = self.model_name(f"{field}.provider", price.provider)
        model = self.model_name(f"{field}.model", price.model)
        rates = []
        for name in ("input", "output", "cache_read", "cache_write", "reasoning"):
            value = getattr(price, f"{name}_rate")
            if not 0 <= value <= MAX_RATE:
                self.fail(f"{field}.{name}_rate", f"must be 0 to {MAX_RATE} (got {value})")
            rates.append(value)
        limits: list[int | None] = [
            price.context_window if price.HasField("context_window") else None,
            price.max_output_tokens if price.HasField("max_output_tokens") else None,
        ]
        for name, value in zip(("context_window", "max_output_tokens"), limits, strict=True):
            if value is not None:
                self.tokens(f"{field}.{name}", value, minimum=1)
        modalities = frozenset(price.modalities) or frozenset({"text"})
        for modality in sorted(modalities - MODALITIES):
            self.fail(f"{field}.modalities", f"{modality!r} is not one of {sorted(MODALITIES)}")
        if len(self.violations) > before:
            return None
        return ModelPrice(
            provider=provider,
            model=model,
            rates=Rates(*rates),
            context_window=limits[0],
            max_output_tokens=limits[1],
            tools=price.tools,
            json_schema=price.json_schema,
            modalities=modalities,
        )

    def llm_call(self, field: str, llm: budget_service_pb2.LlmCall) -> LlmCall:
        modalities = frozenset(llm.modalities)
        for modality in sorted(modalities - MODALITIES):
            self.fail(f"{field}.modalities", f"{modality!r} is not one of {sorted(MODALITIES)}")
        return LlmCall(
            provider=self.model_name(f"{field}.provider", llm.provider),
            model=self.model_name(f"{field}.model", llm.model),
            input_tokens=self.tokens(f"{field}.input_tokens", llm.input_tokens),
            max_output_tokens=(
                self.tokens(f"{field}.max_output_tokens", llm.max_output_tokens, minimum=1)
                if llm.HasField("max_output_tokens")
                else None
            ),
            needs_tools=llm.needs_tools,
            needs_json_schema=llm.needs_json_schema,
            min_context_tokens=(
                self.tokens(f"{field}.min_context_tokens", llm.min_context_tokens, minimum=1)
                if llm.HasField("min_context_tokens")
                else None
            ),
            modalities=modalities - {"text"},
            candidates=self.model_refs(f"{field}.candidate_models", llm.candidate_models),
        )

    def model_refs(self, field: str, names: Sequence[str]) -> frozenset[str]:
        """A list of "provider/model" names, as a set."""
        if len(names) > MAX_MODEL_REFS:
            self.fail(field, f"has more than {MAX_MODEL_REFS} models")
        for i, name in enumerate(names):
            provider, sep, model = name.partition("/")
            if not (sep and MODEL_PATTERN.fullmatch(provider) and MODEL_PATTERN.fullmatch(model)):
                self.fail(f"{field}[{i}]", f"{name[:60]!r} is not provider/model")
        return frozenset(names)

    def approval_id(self, field: str, value: str) -> tuple[str, str]:
        """(run id, trigger) of an approval id."""
        parsed = parse_approval_id(value)
        if not value:
            self.fail(field, "is required")
        elif parsed is None or not ID_PATTERN.fullmatch(parsed[0]):
            shown = value if len(value) <= 60 else value[:60] + "..."
            self.fail(
                field,
                f"{shown!r} is not an approval id (RUN/approval:spend or RUN/approval:meter:NAME)",
            )
        elif parsed[1] != SPEND_APPROVAL:
            self.meter(field, parsed[1][2:])
        return parsed or ("", "")

    def meter(self, field: str, value: str) -> str:
        if not METER_PATTERN.fullmatch(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            self.fail(
                field,
                f"{shown!r} must be 1 to 128 characters of letters, digits and . _ - : /, "
                "starting with a letter or digit",
            )
        return value

    def count(self, field: str, value: int, *, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
        if not minimum <= value <= maximum:
            self.fail(field, f"must be {minimum} to {maximum} (got {value})")
        return value

    def policy(self, field: str, message: budget_pb2.RunPolicy) -> RunPolicy:
        """A run's policy, defaults filled in."""
        mode = EnforcementMode.HARD_GATE
        if message.enforcement_mode in {int(m) for m in EnforcementMode}:
            mode = EnforcementMode(message.enforcement_mode)
        elif message.enforcement_mode:
            self.fail(f"{field}.enforcement_mode", "is not a known EnforcementMode")
        margin = self.count(
            f"{field}.soft_gate_margin_percent",
            message.soft_gate_margin_percent,
            minimum=0,
            maximum=100,
        )
        if margin and mode is not EnforcementMode.SOFT_GATE:
            self.fail(
                f"{field}.soft_gate_margin_percent", "applies only to ENFORCEMENT_MODE_SOFT_GATE"
            )
        thresholds = RunPolicy().thresholds
        if message.HasField("thresholds"):
            t = message.thresholds
            thresholds = (t.info_percent, t.warn_percent, t.throttle_percent)
            last = 0
            for name, percent in zip(("info", "warn", "throttle"), thresholds, strict=True):
                if not percent:
                    continue
                if not last < percent < 100:
                    self.fail(
                        f"{field}.thresholds.{name}_percent",
                        "must be 0 (off), or above the levels before it and below 100 "
                        f"(got {percent})",
                    )
                last = max(last, percent)
        base = RunPolicy().throttle_base_ms
        if message.HasField("throttle_base_delay"):
            base = (
                self.duration_ms(
                    f"{field}.throttle_base_delay", message.throttle_base_delay, max_ms=DAY_MS
                )
                or base
            )
        most = RunPolicy().throttle_max_ms
        if message.HasField("throttle_max_delay"):
            most = (
                self.duration_ms(
                    f"{field}.throttle_max_delay", message.throttle_max_delay, max_ms=DAY_MS
                )
                or most
            )
        if most < base:
            self.fail(f"{field}.throttle_max_delay", f"must be at least the base delay ({base} ms)")
        max_tokens = None
        if message.HasField("max_tokens"):
            max_tokens = self.count(f"{field}.max_tokens", message.max_tokens)
        if len(message.meter_limits) > MAX_METERS:
            self.fail(f"{field}.meter_limits", f"has more than {MAX_METERS} meters")
        meters = []
        for name, limit in sorted(message.meter_limits.items()):
            self.meter(f"{field}.meter_limits[{name[:40]!r}]", name)
            meters.append((name, self.count(f"{field}.meter_limits[{name[:40]!r}]", limit)))
        rate = None
        if message.HasField("rate_limit"):
            calls = self.count(f"{field}.rate_limit.max_calls", message.rate_limit.max_calls)
            window = self.duration_ms(
                f"{field}.rate_limit.window",
                message.rate_limit.window if message.rate_limit.HasField("window") else None,
                max_ms=DAY_MS,
            )
            if window is None:
                self.fail(f"{field}.rate_limit.window", "is required")
            rate = (calls, window or 1)
        in_flight = None
        if message.HasField("max_in_flight"):
            in_flight = self.count(f"{field}.max_in_flight", message.max_in_flight)
        depth = DEFAULT_MAX_DEPTH
        if message.HasField("max_depth"):
            depth = self.count(
                f"{field}.max_depth", message.max_depth, minimum=0, maximum=MAX_RUN_DEPTH - 1
            )
        children = None
        if message.HasField("max_children"):
            children = self.count(f"{field}.max_children", message.max_children, minimum=0)
        if len(message.approved_meters) > MAX_METERS:
            self.fail(f"{field}.approved_meters", f"has more than {MAX_METERS} meters")
        for i, name in enumerate(message.approved_meters):
            self.meter(f"{field}.approved_meters[{i}]", name)
        self.model_refs(f"{field}.downgrade_models", message.downgrade_models)
        calibrated = mode is EnforcementMode.CALIBRATED
        min_samples = message.calibration_min_samples or DEFAULT_CALIBRATION_MIN_SAMPLES
        self.count(
            f"{field}.calibration_min_samples", min_samples, minimum=1, maximum=CALIBRATION_RING
        )
        allowance_micros = allowance_percent = None
        if message.HasField("exposure_allowance_micros"):
            allowance_micros = self.micros(
                f"{field}.exposure_allowance_micros", message.exposure_allowance_micros, minimum=0
            )
        if message.HasField("exposure_allowance_percent"):
            allowance_percent = self.count(
                f"{field}.exposure_allowance_percent",
                message.exposure_allowance_percent,
                minimum=0,
                maximum=100,
            )
            if allowance_micros is not None:
                self.fail(
                    f"{field}.exposure_allowance_percent",
                    "is not allowed with exposure_allowance_micros (set one)",
                )
        for name, given in (
            ("calibration_min_samples", message.calibration_min_samples),
            ("exposure_allowance_micros", allowance_micros is not None),
            ("exposure_allowance_percent", allowance_percent is not None),
        ):
            if given and not calibrated:
                self.fail(f"{field}.{name}", "applies only to ENFORCEMENT_MODE_CALIBRATED")
        return RunPolicy(
            mode=mode,
            soft_margin_percent=margin,
            thresholds=thresholds,
            throttle_base_ms=base,
            throttle_max_ms=most,
            max_tokens=max_tokens,
            meter_limits=tuple(meters),
            rate_limit=rate,
            max_in_flight=in_flight,
            max_depth=depth,
            max_children=children,
            auto_downgrade=message.auto_downgrade,
            downgrade_models=tuple(sorted(set(message.downgrade_models))),
            approval_percent=self.count(
                f"{field}.approval_percent", message.approval_percent, minimum=0, maximum=100
            ),
            approved_meters=tuple(sorted(set(message.approved_meters))),
            calibration_min_samples=min_samples,
            exposure_allowance_micros=allowance_micros,
            exposure_allowance_percent=allowance_percent,
        )

    def scope(self, field: str, kind: int, scope_id: str) -> ScopeRef:
        """A parent scope (API key, user or team); runs are not set through scopes."""
        if kind not in (ScopeKind.API_KEY, ScopeKind.USER, ScopeKind.TEAM):
            if kind == ScopeKind.RUN:
                self.fail(
                    f"{field}.kind",
                    "must be SCOPE_KIND_API_KEY, SCOPE_KIND_USER or SCOPE_KIND_TEAM "
                    "(a run's limit is set by CreateRun and read by GetRun)",
                )
            else:
                self.fail(
                    f"{field}.kind",
                    "must be SCOPE_KIND_API_KEY, SCOPE_KIND_USER or SCOPE_KIND_TEAM",
                )
            return ScopeRef(ScopeKind.TEAM, "")
        return ScopeRef(ScopeKind(kind), self.identifier(f"{field}.id", scope_id))

    def period(self, field: str, period: int) -> Period:
        if period not in tuple(Period):
            self.fail(field, "must be PERIOD_LIFETIME, PERIOD_DAILY or PERIOD_MONTHLY")
            return Period.LIFETIME
        return Period(period)

    def labels(self, field: str, labels: Mapping[str, str]) -> dict[str, str]:
        if len(labels) > MAX_LABELS:
            self.fail(field, f"has {len(labels)} labels; at most {MAX_LABELS} are allowed")
        for key, value in sorted(labels.items()):
            if not LABEL_KEY_PATTERN.fullmatch(key):
                self.fail(
                    f"{field}[{key[:40]!r}]",
                    "key must be 1 to 63 characters of lowercase letters, digits and _ . -, "
                    "starting with a letter",
                )
            if len(value) > MAX_LABEL_VALUE:
                self.fail(
                    f"{field}[{key[:40]!r}]",
                    f"value must be at most {MAX_LABEL_VALUE} characters (got {len(value)})",
                )
        return dict(labels)
