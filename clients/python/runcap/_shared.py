"""What the sync and asyncio clients share: requests, retry policy, Watch
cursor and the state of a reservation hold. Nothing here does I/O."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal, TypeAlias

import grpc
from google.protobuf import duration_pb2

from runcap.errors import (
    ApprovalRequiredError,
    BudgetBlockedError,
    BudgetThrottledError,
    RevisionOutOfRangeError,
    RuncapError,
    UnavailableError,
)
from runcap.v1 import budget_pb2, budget_service_pb2

DEFAULT_TARGET: Final = "127.0.0.1:50051"
"""The address a client connects to when given none."""

Duration = timedelta | float
"""A duration: a `timedelta`, or seconds as a number."""

CallMetadata = Sequence[tuple[str, str | bytes]]
"""Metadata sent with every call, for example ``[("authorization", "Bearer ...")]``."""

ChannelOptions = Sequence[tuple[str, str | int]]
"""gRPC channel options, for example ``[("grpc.primary_user_agent", "my-agent")]``."""

DEFAULT_CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    # Ping an idle connection every 30 s and drop it after 10 s without an
    # answer, so a long Watch stream notices a dead peer (a NAT or load
    # balancer that silently dropped it) and resumes instead of hanging.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
"""The options of every channel a client opens, unless the caller's say otherwise."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Jittered exponential back-off for retrying UNAVAILABLE.

    The n-th retry waits a random time between half and all of
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))`` seconds, or
    the server's RetryInfo delay when that is longer (capped at
    `max_backoff`).

    Attributes:
        max_attempts: Attempts in all, the first included; 1 disables retries.
            For Watch, the number of consecutive failed (re)connects.
        initial_backoff: The ceiling of the first wait, in seconds.
        max_backoff: The ceiling of any wait, in seconds.
        multiplier: How much the ceiling grows per retry.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        """The jittered wait before retry number `retry` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return random.uniform(ceiling / 2, ceiling)

    def delay(self, attempt: int, error: RuncapError) -> float | None:
        """How long to wait before retrying after failed attempt `attempt`
        (1-based), or None when `error` is final or the attempts are spent."""
        if not isinstance(error, UnavailableError) or attempt >= self.max_attempts:
            return None
        wait = self.backoff(attempt)
        hint = error.retry_after
        if hint is not None:
            wait = max(wait, min(hint, self.max_backoff))
        return wait


NO_RETRY: Final = RetryPolicy(max_attempts=1)
"""A policy that never retries."""

WATCH_RECONNECT: Final = RetryPolicy(max_attempts=10)
"""The default reconnect policy of Watch: up to 10 consecutive failed connects
(about 20 seconds of back-off) before the error reaches the caller."""


def api_key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that presents `api_key`; none for None."""
    return () if api_key is None else (("authorization", f"Bearer {api_key}"),)


def list_runs_request(
    created_after: datetime, created_before: datetime | None, page_size: int, page_token: str
) -> budget_service_pb2.ListRunsRequest:
    request = budget_service_pb2.ListRunsRequest(page_size=page_size, page_token=page_token)
    request.created_after.FromDatetime(created_after)
    if created_before is not None:
        request.created_before.FromDatetime(created_before)
    return request


def channel_options(options: ChannelOptions | None) -> list[tuple[str, str | int]]:
    """`DEFAULT_CHANNEL_OPTIONS` merged with the caller's `options`; on the
    same key the caller's value wins."""
    given = list(options or ())
    keys = {key for key, _ in given}
    return [option for option in DEFAULT_CHANNEL_OPTIONS if option[0] not in keys] + given


def to_duration(value: Duration | None) -> duration_pb2.Duration | None:
    """A protobuf Duration, or None when `value` is None. No rounding is done:
    the server rejects durations that are not whole milliseconds."""
    if value is None:
        return None
    result = duration_pb2.Duration()
    if isinstance(value, timedelta):
        result.FromTimedelta(value)
    else:
        result.FromNanoseconds(round(value * 1_000_000_000))
    return result


def new_reservation_id() -> str:
    """A fresh client-side reservation id, so that retries are idempotent."""
    return uuid.uuid4().hex


def create_run_request(
    run_id: str,
    limit_micros: int,
    labels: Mapping[str, str] | None,
    default_ttl: Duration | None,
    *,
    parent_run_id: str = "",
    api_key_id: str = "",
    user_id: str = "",
    team_id: str = "",
    policy: RunPolicyLike | None = None,
) -> budget_service_pb2.CreateRunRequest:
    return budget_service_pb2.CreateRunRequest(
        run_id=run_id,
        limit_micros=limit_micros,
        labels=dict(labels or {}),
        default_ttl=to_duration(default_ttl),
        parent_run_id=parent_run_id,
        api_key_id=api_key_id,
        user_id=user_id,
        team_id=team_id,
        policy=None if policy is None else to_run_policy(policy),
    )


ScopeKindName = Literal["run", "api_key", "user", "team"]
"""The short name of a `runcap.v1.ScopeKind`: ``"api_key"`` is ``SCOPE_KIND_API_KEY``."""

PeriodName = Literal["lifetime", "daily", "monthly"]
"""The short name of a `runcap.v1.Period`: ``"daily"`` is ``PERIOD_DAILY``."""

EnforcementModeName = Literal["hard_gate", "soft_gate", "advisory", "actuals_only", "calibrated"]
"""The short name of a `runcap.v1.EnforcementMode`: ``"advisory"`` is
``ENFORCEMENT_MODE_ADVISORY``."""

ScopeKind: TypeAlias = budget_pb2.ScopeKind.ValueType | ScopeKindName
"""A scope kind: a `runcap.v1.ScopeKind` value, or its short name."""

Period: TypeAlias = budget_pb2.Period.ValueType | PeriodName
"""A period: a `runcap.v1.Period` value, or its short name."""

EnforcementMode: TypeAlias = budget_pb2.EnforcementMode.ValueType | EnforcementModeName
"""An enforcement mode: a `runcap.v1.EnforcementMode` value, or its short name."""

_SCOPE_KINDS: Final[dict[str, budget_pb2.ScopeKind.ValueType]] = {
    "run": budget_pb2.SCOPE_KIND_RUN,
    "api_key": budget_pb2.SCOPE_KIND_API_KEY,
    "user": budget_pb2.SCOPE_KIND_USER,
    "team": budget_pb2.SCOPE_KIND_TEAM,
}

_PERIODS: Final[dict[str, budget_pb2.Period.ValueType]] = {
    "lifetime": budget_pb2.PERIOD_LIFETIME,
    "daily": budget_pb2.PERIOD_DAILY,
    "monthly": budget_pb2.PERIOD_MONTHLY,
}


_ENFORCEMENT_MODES: Final[dict[str, budget_pb2.EnforcementMode.ValueType]] = {
    "hard_gate": budget_pb2.ENFORCEMENT_MODE_HARD_GATE,
    "soft_gate": budget_pb2.ENFORCEMENT_MODE_SOFT_GATE,
    "advisory": budget_pb2.ENFORCEMENT_MODE_ADVISORY,
    "actuals_only": budget_pb2.ENFORCEMENT_MODE_ACTUALS_ONLY,
    "calibrated": budget_pb2.ENFORCEMENT_MODE_CALIBRATED,
}


def to_scope_kind(kind: ScopeKind) -> budget_pb2.ScopeKind.ValueType:
    """The `runcap.v1.ScopeKind` value of `kind`; a value passes through
    unchanged (the server validates it)."""
    if not isinstance(kind, str):
        return kind
    try:
        return _SCOPE_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown scope kind {kind!r}: expected one of {', '.join(_SCOPE_KINDS)}"
        ) from None


def to_period(period: Period) -> budget_pb2.Period.ValueType:
    """The `runcap.v1.Period` value of `period`; a value passes through
    unchanged (the server validates it)."""
    if not isinstance(period, str):
        return period
    try:
        return _PERIODS[period]
    except KeyError:
        raise ValueError(
            f"unknown period {period!r}: expected one of {', '.join(_PERIODS)}"
        ) from None


def to_enforcement_mode(mode: EnforcementMode) -> budget_pb2.EnforcementMode.ValueType:
    """The `runcap.v1.EnforcementMode` value of `mode`; a value passes
    through unchanged (the server validates it)."""
    if not isinstance(mode, str):
        return mode
    try:
        return _ENFORCEMENT_MODES[mode]
    except KeyError:
        raise ValueError(
            f"unknown enforcement mode {mode!r}: expected one of {', '.join(_ENFORCEMENT_MODES)}"
        ) from None


def scope_ref(kind: ScopeKind, scope_id: str) -> budget_pb2.ScopeRef:
    """The `runcap.v1.ScopeRef` naming scope `scope_id` of `kind`."""
    return budget_pb2.ScopeRef(kind=to_scope_kind(kind), id=scope_id)


def set_scope_limit_request(
    kind: ScopeKind,
    scope_id: str,
    period: Period,
    limit_micros: int | None,
    clear: bool,
) -> budget_service_pb2.SetScopeLimitRequest:
    """A SetScopeLimitRequest that sets `limit_micros` or, with `clear`,
    removes the ceiling. Exactly one of the two must be given."""
    if (limit_micros is None) == (not clear):
        raise ValueError("give exactly one of limit_micros and clear=True")
    request = budget_service_pb2.SetScopeLimitRequest(
        scope=scope_ref(kind, scope_id), period=to_period(period)
    )
    if limit_micros is not None:
        request.limit_micros = limit_micros
    else:
        request.clear = True
    return request


def set_scope_policy_request(
    kind: ScopeKind,
    scope_id: str,
    policy: RunPolicyLike | None,
    clear: bool,
) -> budget_service_pb2.SetScopePolicyRequest:
    """A SetScopePolicyRequest that sets `policy` as the scope's default run
    policy or, with `clear`, removes it. Exactly one of the two must be
    given; an empty policy is sent as set (every field the server's
    default)."""
    if (policy is None) == (not clear):
        raise ValueError("give exactly one of policy and clear=True")
    scope = scope_ref(kind, scope_id)
    if policy is not None:
        return budget_service_pb2.SetScopePolicyRequest(scope=scope, policy=to_run_policy(policy))
    return budget_service_pb2.SetScopePolicyRequest(scope=scope, clear=True)


def get_scope_request(kind: ScopeKind, scope_id: str) -> budget_service_pb2.GetScopeRequest:
    return budget_service_pb2.GetScopeRequest(scope=scope_ref(kind, scope_id))


@dataclass(frozen=True, slots=True)
class LlmCall:
    """An LLM call to reserve for; the server prices it from its price table
    (the input tokens at the input price plus the effective maximum output at
    the output price).

    Attributes:
        provider: The provider, as in the price table (``"openai"``,
            ``"anthropic"``...).
        model: The model id, exactly as in the price table.
        input_tokens: The prompt's input tokens (zero or more).
        max_output_tokens: The call's maximum output tokens (its
            ``max_tokens``); None for the server's default (the request is
            refused when the server has none).
        needs_tools: The call uses tool (function) calling.
        needs_json_schema: The call uses JSON-schema structured output.
        min_context_tokens: The context window the call needs at least, in
            tokens; None for no minimum (a stand-in always needs room for the
            input tokens).
        modalities: Input modalities beyond text the call uses (``"image"``,
            ``"audio"``, ``"video"``).
        candidate_models: The models the caller can use instead, as
            ``"provider/model"`` (a gateway's served models, say):
            alternatives and downgrades come only from these. Empty: any.

    What the call needs from a model (the four fields before
    `candidate_models`) decides which models can stand in for it: the
    ``alternatives`` of a block, and the cheaper model a run with
    ``auto_downgrade`` holds instead (``DECISION_DOWNGRADE``).
    """

    provider: str
    model: str
    input_tokens: int
    max_output_tokens: int | None = None
    needs_tools: bool = False
    needs_json_schema: bool = False
    min_context_tokens: int | None = None
    modalities: Sequence[str] = ()
    candidate_models: Sequence[str] = ()

    def to_proto(self) -> budget_service_pb2.LlmCall:
        """The `runcap.v1.LlmCall` message; TypeError when `modalities` is a
        single string rather than a sequence of them."""
        return budget_service_pb2.LlmCall(
            provider=self.provider,
            model=self.model,
            input_tokens=self.input_tokens,
            max_output_tokens=self.max_output_tokens,
            needs_tools=self.needs_tools,
            needs_json_schema=self.needs_json_schema,
            min_context_tokens=self.min_context_tokens,
            modalities=_strings("modalities", self.modalities),
            candidate_models=_strings("candidate_models", self.candidate_models),
        )


def _strings(name: str, values: Sequence[str]) -> list[str]:
    """`values` as a list; TypeError for a bare string (which would otherwise
    be split into its characters)."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, not the string {values!r}")
    return list(values)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """An LLM call's actual usage, in disjoint token classes, to commit a
    reservation made with an `LlmCall`; the server prices it at the
    reservation's own rates.

    Attributes:
        input_tokens: Input tokens billed at the input price (not read from
            or written to a cache).
        output_tokens: Visible output tokens, not counting reasoning tokens.
        cache_read_tokens: Input tokens read from the prompt cache.
        cache_write_tokens: Input tokens written to the prompt cache.
        reasoning_tokens: Reasoning (thinking) output tokens.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def to_proto(self) -> budget_service_pb2.TokenUsage:
        """The `runcap.v1.TokenUsage` message."""
        return budget_service_pb2.TokenUsage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )


LlmCallLike: TypeAlias = LlmCall | budget_service_pb2.LlmCall
"""An LLM call: an `LlmCall`, or the `runcap.v1.LlmCall` message."""

TokenUsageLike: TypeAlias = TokenUsage | budget_service_pb2.TokenUsage
"""Token usage: a `TokenUsage`, or the `runcap.v1.TokenUsage` message."""


def to_llm_call(call: LlmCallLike) -> budget_service_pb2.LlmCall:
    """The `runcap.v1.LlmCall` message of `call` (a copy when it is one)."""
    if isinstance(call, LlmCall):
        return call.to_proto()
    if isinstance(call, budget_service_pb2.LlmCall):
        copy = budget_service_pb2.LlmCall()
        copy.CopyFrom(call)
        return copy
    raise TypeError(f"llm_call must be a runcap.LlmCall or a runcap.v1.LlmCall, not {call!r}")


def to_token_usage(usage: TokenUsageLike) -> budget_service_pb2.TokenUsage:
    """The `runcap.v1.TokenUsage` message of `usage` (a copy when it is one)."""
    if isinstance(usage, TokenUsage):
        return usage.to_proto()
    if isinstance(usage, budget_service_pb2.TokenUsage):
        copy = budget_service_pb2.TokenUsage()
        copy.CopyFrom(usage)
        return copy
    raise TypeError(f"usage must be a runcap.TokenUsage or a runcap.v1.TokenUsage, not {usage!r}")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The graduated response of a run: the percentages of its limit,
    reached by committed spend, where each band starts. Each set level is
    above the one before and below 100 (the stop level, always on); 0 turns a
    level off. The defaults are the server's (used when a policy has no
    thresholds).

    Attributes:
        info_percent: Where ``THRESHOLD_LEVEL_INFO`` starts.
        warn_percent: Where ``THRESHOLD_LEVEL_WARN`` starts.
        throttle_percent: Where ``THRESHOLD_LEVEL_THROTTLE`` starts: from
            there on Reserve spaces calls out (``DECISION_THROTTLE``).
    """

    info_percent: int = 60
    warn_percent: int = 80
    throttle_percent: int = 95

    def to_proto(self) -> budget_pb2.Thresholds:
        """The `runcap.v1.Thresholds` message."""
        return budget_pb2.Thresholds(
            info_percent=self.info_percent,
            warn_percent=self.warn_percent,
            throttle_percent=self.throttle_percent,
        )


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A cap on a run's allowed Reserves per window. Windows are fixed,
    aligned to multiples of `window` since the Unix epoch; a Reserve over
    the cap is throttled (``DECISION_REASON_RATE_LIMITED``).

    Attributes:
        max_calls: Allowed Reserves per window (positive).
        window: The window: a `timedelta` or seconds, in whole milliseconds,
            from 1 ms to 24 hours.
    """

    max_calls: int
    window: Duration

    def to_proto(self) -> budget_pb2.RateLimit:
        """The `runcap.v1.RateLimit` message."""
        return budget_pb2.RateLimit(max_calls=self.max_calls, window=to_duration(self.window))


@dataclass(frozen=True, slots=True)
class RunPolicy:
    """How a run is governed beyond its dollar limit, fixed when it is
    created (``create_run(..., policy=...)``). Every limit is checked in the
    same atomic decision as the dollar ceiling; a field left at its default
    takes the server's default (or, for a subagent run given no policy at
    all, its parent's policy)::

        RunPolicy(
            enforcement_mode="soft_gate",
            soft_gate_margin_percent=10,
            meter_limits={"tool:serp_api": 50},
            rate_limit=RateLimit(max_calls=30, window=60),
            max_in_flight=4,
        )

    Attributes:
        enforcement_mode: How the ceilings are enforced: a
            `runcap.v1.EnforcementMode` value or its short name
            (``"hard_gate"``, ``"soft_gate"``, ``"advisory"``,
            ``"actuals_only"``, ``"calibrated"``); None for the default (a
            hard gate).
        soft_gate_margin_percent: For a soft gate, how far past the limit
            estimates may go, in percent of it (0 to 100).
        thresholds: The graduated response; None for the server's defaults.
        throttle_base_delay: In the throttle band, the delay after the first
            allowed call (a `timedelta` or seconds); it doubles with each
            later call. None for the default (1 s).
        throttle_max_delay: The longest throttle delay; None for the default
            (60 s).
        max_tokens: A ceiling on the run's LLM tokens (input plus effective
            maximum output as reserved, actual usage once committed).
        meter_limits: Ceilings on named call meters (`reserve(...,
            meter=...)`), in units.
        rate_limit: A cap on allowed Reserves per window.
        max_in_flight: A cap on the run's holds in flight at once.
        max_depth: How many levels of subagent runs may be created below
            this run (server default 5, at most 15).
        max_children: How many child runs this run may have.
        auto_downgrade: When an LLM call does not fit the budget, hold the
            best capability-valid alternative that does (the priciest that
            fits) and answer ``DECISION_DOWNGRADE`` instead of blocking; the
            hold then says which model to call (``hold.model``).
        downgrade_models: The models alternatives and downgrades may pick
            from, as ``"provider/model"``; empty for any model with a price.
        approval_percent: Escalate once the run's committed and held spend
            with a call's estimate would pass this percent of its limit (1 to
            100; 0 never): the call is answered ``DECISION_APPROVAL_REQUIRED``
            (`ApprovalRequiredError` from ``reserve(...)``) until the run's
            spend approval is approved.
        approved_meters: When set, a call naming a meter not on this list
            needs that meter's approval first. Same names as `meter_limits`;
            at most 32.
        calibration_min_samples: For ``"calibrated"``: the committed calls
            to a model (with usage) to observe before its calls are held at
            the learned output estimate (1 to 32; None for the default, 5).
        exposure_allowance_micros: For ``"calibrated"``: how far past the
            limit committed spend plus the worst cases in flight may go.
        exposure_allowance_percent: The same in percent of the limit (at
            most one of the two; neither: 10%).
    """

    enforcement_mode: EnforcementMode | None = None
    soft_gate_margin_percent: int = 0
    thresholds: Thresholds | None = None
    throttle_base_delay: Duration | None = None
    throttle_max_delay: Duration | None = None
    max_tokens: int | None = None
    meter_limits: Mapping[str, int] = field(default_factory=dict)
    rate_limit: RateLimit | None = None
    max_in_flight: int | None = None
    max_depth: int | None = None
    max_children: int | None = None
    auto_downgrade: bool = False
    downgrade_models: Sequence[str] = ()
    approval_percent: int = 0
    approved_meters: Sequence[str] = ()
    calibration_min_samples: int | None = None
    exposure_allowance_micros: int | None = None
    exposure_allowance_percent: int | None = None

    def to_proto(self) -> budget_pb2.RunPolicy:
        """The `runcap.v1.RunPolicy` message; ValueError for an unknown
        enforcement mode name, TypeError when `downgrade_models` or
        `approved_meters` is a single string."""
        mode = budget_pb2.ENFORCEMENT_MODE_UNSPECIFIED
        if self.enforcement_mode is not None:
            mode = to_enforcement_mode(self.enforcement_mode)
        return budget_pb2.RunPolicy(
            enforcement_mode=mode,
            soft_gate_margin_percent=self.soft_gate_margin_percent,
            thresholds=None if self.thresholds is None else self.thresholds.to_proto(),
            throttle_base_delay=to_duration(self.throttle_base_delay),
            throttle_max_delay=to_duration(self.throttle_max_delay),
            max_tokens=self.max_tokens,
            meter_limits=dict(self.meter_limits),
            rate_limit=None if self.rate_limit is None else self.rate_limit.to_proto(),
            max_in_flight=self.max_in_flight,
            max_depth=self.max_depth,
            max_children=self.max_children,
            auto_downgrade=self.auto_downgrade,
            downgrade_models=_strings("downgrade_models", self.downgrade_models),
            approval_percent=self.approval_percent,
            approved_meters=_strings("approved_meters", self.approved_meters),
            calibration_min_samples=self.calibration_min_samples or 0,
            exposure_allowance_micros=self.exposure_allowance_micros,
            exposure_allowance_percent=self.exposure_allowance_percent,
        )


RunPolicyLike: TypeAlias = RunPolicy | budget_pb2.RunPolicy
"""A run policy: a `RunPolicy`, or the `runcap.v1.RunPolicy` message."""


def to_run_policy(policy: RunPolicyLike) -> budget_pb2.RunPolicy:
    """The `runcap.v1.RunPolicy` message of `policy` (a copy when it is one)."""
    if isinstance(policy, RunPolicy):
        return policy.to_proto()
    if isinstance(policy, budget_pb2.RunPolicy):
        copy = budget_pb2.RunPolicy()
        copy.CopyFrom(policy)
        return copy
    raise TypeError(f"policy must be a runcap.RunPolicy or a runcap.v1.RunPolicy, not {policy!r}")


def estimate_of(
    amount_micros: int | None, llm_call: LlmCallLike | None
) -> int | budget_service_pb2.LlmCall:
    """What a Reserve holds: `amount_micros` or the `llm_call` message.
    Exactly one of the two must be given, or ValueError is raised."""
    if (amount_micros is None) == (llm_call is None):
        raise ValueError("give exactly one of amount_micros and llm_call")
    if llm_call is not None:
        return to_llm_call(llm_call)
    assert amount_micros is not None
    return amount_micros


def actual_of(
    actual_micros: int | None, usage: TokenUsageLike | None
) -> int | budget_service_pb2.TokenUsage:
    """What a Commit records: `actual_micros` or the `usage` message.
    Exactly one of the two must be given, or ValueError is raised."""
    if (actual_micros is None) == (usage is None):
        raise ValueError("give exactly one of actual_micros and usage")
    if usage is not None:
        return to_token_usage(usage)
    assert actual_micros is not None
    return actual_micros


def check_meter(meter: str, meter_units: int | None) -> None:
    """Raises ValueError for `meter_units` without a `meter`."""
    if meter_units is not None and not meter:
        raise ValueError("meter_units needs a meter")


def reserve_request(
    run_id: str,
    estimate: int | budget_service_pb2.LlmCall,
    reservation_id: str,
    ttl: Duration | None,
    meter: str = "",
    meter_units: int | None = None,
) -> budget_service_pb2.ReserveRequest:
    """A ReserveRequest for an amount in micro-USD or an LLM call (see
    `estimate_of`), counted on `meter` when one is given (`meter_units`
    units of it, 1 when None)."""
    check_meter(meter, meter_units)
    request = budget_service_pb2.ReserveRequest(
        run_id=run_id,
        reservation_id=reservation_id,
        ttl=to_duration(ttl),
        meter=meter,
        meter_units=meter_units,
    )
    if isinstance(estimate, budget_service_pb2.LlmCall):
        request.llm_call.CopyFrom(estimate)
    else:
        request.amount_micros = estimate
    return request


def commit_request(
    run_id: str, reservation_id: str, actual: int | budget_service_pb2.TokenUsage
) -> budget_service_pb2.CommitRequest:
    """A CommitRequest for a cost in micro-USD or a token usage (see
    `actual_of`)."""
    request = budget_service_pb2.CommitRequest(run_id=run_id, reservation_id=reservation_id)
    if isinstance(actual, budget_service_pb2.TokenUsage):
        request.usage.CopyFrom(actual)
    else:
        request.actual_micros = actual
    return request


def refund_request(run_id: str, reservation_id: str) -> budget_service_pb2.RefundRequest:
    return budget_service_pb2.RefundRequest(run_id=run_id, reservation_id=reservation_id)


class WatchCursor:
    """The resume logic of a Watch stream, shared by both clients.

    It remembers the last revision delivered, builds each (re)connect
    request, filters out anything already delivered, and decides after each
    disconnect whether and when to reconnect.
    """

    def __init__(
        self,
        run_id: str,
        after_revision: int | None,
        *,
        resume: bool,
        resnapshot_on_out_of_range: bool,
        policy: RetryPolicy,
    ) -> None:
        self.run_id = run_id
        self.last_revision = after_revision
        # The digest of the history up to last_revision, sent back on resume so the
        # server can tell when that history is no longer its own ("" = unknown).
        self.last_digest = ""
        self._resume = resume
        self._resnapshot = resnapshot_on_out_of_range
        self._policy = policy
        self._failures = 0
        self._final = False
        self.connects = 0

    def request(self) -> budget_service_pb2.WatchRequest:
        """The request for the next (re)connect."""
        self._final = False
        self.connects += 1
        return budget_service_pb2.WatchRequest(
            run_id=self.run_id,
            after_revision=self.last_revision,
            after_digest=self.last_digest if self.last_revision is not None else "",
        )

    def accept(self, message: budget_service_pb2.WatchResponse) -> bool:
        """Records `message`; True when it should reach the caller."""
        kind = message.WhichOneof("kind")
        if not (kind == "progress" and message.progress.final):
            self._failures = 0
        last = self.last_revision
        if kind == "event":
            if last is not None and message.revision <= last:
                return False
        elif kind == "progress":
            if message.progress.final:
                self._final = True
                if self._resume:
                    return False
            if last is not None and message.revision < last:
                return False
        if last is None or message.revision > last:
            self.last_revision = message.revision
            if kind == "event":
                self.last_digest = message.event.state.digest
            elif kind == "snapshot":
                self.last_digest = message.snapshot.digest
            else:
                self.last_digest = ""
        return True

    def on_error(self, error: RuncapError) -> float | None:
        """The wait before reconnecting after `error`, or None when the error
        is final and must reach the caller."""
        if (
            isinstance(error, RevisionOutOfRangeError)
            and self._resnapshot
            and self.last_revision is not None
        ):
            # Start over from a fresh snapshot, which the caller sees next.
            self.last_revision = None
            self.last_digest = ""
            return 0.0
        if not self._resume:
            return None
        self._failures += 1
        if error.code is grpc.StatusCode.CANCELLED:
            # Not ours (the stream checks its own close first): the server
            # cancelled it, a replica stopping past its grace. Watch is a
            # read, so it resumes as after UNAVAILABLE.
            if self._failures >= self._policy.max_attempts:
                return None
            return self._policy.backoff(self._failures)
        return self._policy.delay(self._failures, error)

    def on_end(self) -> float | None:
        """The wait before reconnecting after the server ended the stream, or
        None when the stream is over (the server ended it without a final
        progress message, or resuming is off)."""
        if not (self._final and self._resume):
            return None
        # The server is draining: reconnect at once, as another replica may
        # take the stream; back off if streams keep ending without progress.
        self._failures += 1
        return 0.0 if self._failures == 1 else self._policy.backoff(self._failures - 1)


_HELD_DECISIONS: Final = frozenset(
    (budget_pb2.DECISION_ALLOW, budget_pb2.DECISION_WARN, budget_pb2.DECISION_DOWNGRADE)
)
"""The decisions a `reserve(...)` context manager holds and goes on with."""

HoldOutcome = (
    tuple[Literal["commit"], int | budget_service_pb2.TokenUsage]
    | tuple[Literal["refund"], None]
    | tuple[Literal["none"], None]
)


class HoldBase:
    """The state of a reservation made by a `reserve(...)` context manager.

    Inside the block the hold is live: `response`, `reservation_id`, `state`,
    `amount_micros` and, for an LLM call, `estimate` describe it. On leaving
    the block:

    * normally: the hold is committed with the amount given to `set_actual`
      (or the token usage given to `set_usage`, priced by the server), or
      with the whole held amount when neither was called; after `release()`
      it is refunded instead;
    * with an exception: the hold is refunded, unless `set_actual` or
      `set_usage` was called, in which case that cost is committed (the money
      was spent). The exception propagates; a failure to settle is attached
      to it as a note and the hold is left to expire at its ttl.

    A block decision raises `BudgetBlockedError` on entering, a throttle
    decision its subclass `BudgetThrottledError` (reserve again after its
    `retry_after`), and an escalation (``DECISION_APPROVAL_REQUIRED``) its
    subclass `ApprovalRequiredError` (reserve again once its `approval_id`
    is approved); nothing is held. A warning (``DECISION_WARN``, from a run
    in advisory mode) is held like an allow: `warning` is then true, and
    `reason` and `dimension` say what a blocking run would have refused.
    A warning with reason ``DECISION_REASON_BACKEND_UNAVAILABLE`` is the
    server failing open while its storage is down: nothing was held or
    recorded, so `failed_open` is true and nothing is settled on exit.

    A downgrade (``DECISION_DOWNGRADE``, from a run whose policy has
    ``auto_downgrade``) is held like an allow, against a cheaper model than
    the one asked for: `downgraded` is then true, and `provider` and `model`
    name the model to call (`requested_model` the one asked for). The
    server may hold a downgrade under a reservation id of its own:
    `reservation_id` is always the one the server answered with, and the
    hold is settled under it.
    """

    def __init__(
        self,
        run_id: str,
        estimate: int | budget_service_pb2.LlmCall,
        reservation_id: str | None,
        ttl: Duration | None,
        meter: str = "",
        meter_units: int | None = None,
    ) -> None:
        check_meter(meter, meter_units)
        self.run_id = run_id
        self._estimate = estimate
        self.requested_micros: int | None = (
            None if isinstance(estimate, budget_service_pb2.LlmCall) else estimate
        )
        """The amount asked for, or None for an LLM call (see `llm_call`)."""
        self.llm_call: budget_service_pb2.LlmCall | None = (
            estimate if isinstance(estimate, budget_service_pb2.LlmCall) else None
        )
        """The LLM call asked for, or None for an amount."""
        self.reservation_id = reservation_id or new_reservation_id()
        """The reservation's id: the one asked for (generated when not given)
        until the server answers, then the one it answered with, which the
        hold is settled under."""
        self.ttl = ttl
        self.meter = meter
        """The call meter the hold counts on, or ``""``."""
        self.meter_units = meter_units
        """The units of `meter` asked for, or None for the default (1)."""
        self._response: budget_service_pb2.ReserveResponse | None = None
        self._actual: int | budget_service_pb2.TokenUsage | None = None
        self._release = False
        self._entered = False
        self.commit_response: budget_service_pb2.CommitResponse | None = None
        """The CommitResponse, once the hold was committed on exit."""
        self.refund_response: budget_service_pb2.RefundResponse | None = None
        """The RefundResponse, once the hold was refunded on exit."""

    @property
    def response(self) -> budget_service_pb2.ReserveResponse:
        """The ReserveResponse (an allow, a warning or a downgrade)."""
        if self._response is None:
            raise RuntimeError("the hold is not reserved yet: use it as a context manager")
        return self._response

    @property
    def warning(self) -> bool:
        """True when the server answered ``DECISION_WARN``: the run is in
        advisory mode and a blocking run would have blocked or throttled
        this call (see `reason` and `dimension`). The amount is held all
        the same."""
        return self.response.decision == budget_pb2.DECISION_WARN

    @property
    def failed_open(self) -> bool:
        """True when the server failed open: an advisory run's Reserve
        answered ``DECISION_WARN`` with ``DECISION_REASON_BACKEND_UNAVAILABLE``
        while the ledger's storage was unreachable. Nothing was held or
        recorded: the call may go ahead, but there is nothing to commit or
        refund, so leaving the block settles nothing."""
        response = self.response
        return (
            response.decision == budget_pb2.DECISION_WARN
            and response.reason == budget_pb2.DECISION_REASON_BACKEND_UNAVAILABLE
        )

    @property
    def downgraded(self) -> bool:
        """True when the server answered ``DECISION_DOWNGRADE``: the LLM call
        asked for did not fit, the run's policy allows automatic downgrades,
        and the estimate of a cheaper model that has every capability the
        call needs is held instead. Call `model` (of `provider`), not the
        model asked for (`requested_model`)."""
        return self.response.decision == budget_pb2.DECISION_DOWNGRADE

    @property
    def model(self) -> str | None:
        """The model to call: the one the server priced and held
        (``estimate.model``; for a downgrade, the cheaper stand-in), or the
        model of the LLM call asked for when the server gave no estimate (it
        failed open); None for a hold of an amount."""
        estimate = self.estimate
        if estimate is not None and estimate.model:
            return estimate.model
        return None if self.llm_call is None else self.llm_call.model

    @property
    def provider(self) -> str | None:
        """The provider of `model`: ``estimate.provider`` (a downgrade may
        pick another provider's model), or that of the LLM call asked for
        when the server gave no estimate; None for a hold of an amount."""
        estimate = self.estimate
        if estimate is not None and estimate.provider:
            return estimate.provider
        return None if self.llm_call is None else self.llm_call.provider

    @property
    def requested_model(self) -> str | None:
        """The model the LLM call asked for (for a downgrade, the response's
        ``requested_model``); None for a hold of an amount."""
        if self.response.requested_model:
            return self.response.requested_model
        return None if self.llm_call is None else self.llm_call.model

    @property
    def decision_id(self) -> str:
        """The decision's id, for ``get_decision`` (the decision with the
        inputs it was made from); ``""`` when the server did not say (a
        failed-open warning records nothing)."""
        return self.response.decision_id

    @property
    def alternatives(self) -> list[budget_service_pb2.Alternative]:
        """For a downgrade, the models that could stand in for the LLM call
        (`runcap.v1.Alternative`: provider, model, estimate and output
        tokens), cheapest first; empty otherwise."""
        return list(self.response.alternatives)

    @property
    def reason(self) -> budget_pb2.DecisionReason.ValueType:
        """Why the server decided as it did (`runcap.v1.DecisionReason`):
        ``DECISION_REASON_WITHIN_BUDGET`` for a plain allow; for a warning,
        what a blocking run would have refused it for."""
        return self.response.reason

    @property
    def dimension(self) -> budget_pb2.BudgetDimension.ValueType:
        """For a warning, the limit it is about (`runcap.v1.BudgetDimension`:
        spend, tokens, a meter, the rate limit or the in-flight cap);
        ``BUDGET_DIMENSION_UNSPECIFIED`` for a plain allow."""
        return self.response.blocking_dimension

    @property
    def amount_micros(self) -> int:
        """The amount held."""
        return self.response.amount_micros

    @property
    def estimate(self) -> budget_service_pb2.LlmEstimate | None:
        """How the server priced the LLM call (tokens, amount, price table
        version), or None for a hold of an amount."""
        response = self.response
        return response.estimate if response.HasField("estimate") else None

    @property
    def state(self) -> budget_pb2.BudgetState:
        """The run's latest known budget state: after the reserve inside the
        block, after the commit or refund once it has left."""
        if self.commit_response is not None:
            return self.commit_response.state
        if self.refund_response is not None:
            return self.refund_response.state
        return self.response.state

    @property
    def actual_micros(self) -> int | None:
        """The actual cost given to `set_actual`, or None."""
        return self._actual if isinstance(self._actual, int) else None

    @property
    def usage(self) -> budget_service_pb2.TokenUsage | None:
        """The token usage given to `set_usage`, or None."""
        return self._actual if isinstance(self._actual, budget_service_pb2.TokenUsage) else None

    def set_actual(self, micros: int) -> None:
        """Commit `micros` (zero or more) on leaving the block. Replaces a
        `set_usage`."""
        self._actual = micros
        self._release = False

    def set_usage(self, usage: TokenUsageLike) -> None:
        """Commit the LLM call's actual token usage on leaving the block; the
        server prices it at the rates it reserved with. Only for a hold
        reserved with an `llm_call` (the server rejects usage for an amount).
        Replaces a `set_actual`::

            hold.set_usage(TokenUsage(input_tokens=1_200, output_tokens=310))
        """
        self._actual = to_token_usage(usage)
        self._release = False

    def release(self) -> None:
        """Refund the whole hold on leaving the block (the call did not happen)."""
        self._actual = None
        self._release = True

    def _start(self) -> budget_service_pb2.ReserveRequest:
        if self._entered:
            raise RuntimeError("a hold can be entered only once")
        self._entered = True
        return reserve_request(
            self.run_id,
            self._estimate,
            self.reservation_id,
            self.ttl,
            self.meter,
            self.meter_units,
        )

    def _accept(self, response: budget_service_pb2.ReserveResponse) -> None:
        decision = response.decision
        if decision == budget_pb2.DECISION_THROTTLE:
            raise BudgetThrottledError(self.run_id, response)
        if decision == budget_pb2.DECISION_APPROVAL_REQUIRED:
            raise ApprovalRequiredError(self.run_id, response)
        if decision not in _HELD_DECISIONS:
            # A block, or a decision this client does not know: nothing to go on with.
            raise BudgetBlockedError(self.run_id, response)
        if response.reservation_id:
            # Settle what the server holds: a downgrade's id may not be the one asked for.
            self.reservation_id = response.reservation_id
        self._response = response

    def _outcome(self, failed: bool) -> HoldOutcome:
        if self.failed_open:
            return ("none", None)
        if self._actual is not None:
            return ("commit", self._actual)
        if failed or self._release:
            return ("refund", None)
        return ("commit", self.response.amount_micros)


def settle_note(hold: HoldBase, error: BaseException) -> str:
    """The note attached to a body's exception when settling its hold failed."""
    return (
        f"runcap: settling reservation {hold.reservation_id!r} of run {hold.run_id!r} "
        f"failed ({error}); the hold expires at its ttl"
    )
