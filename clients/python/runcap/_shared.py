"""What the sync and asyncio clients share: requests, retry policy, Watch
cursor and the state of a reservation hold. Nothing here does I/O."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Literal, TypeAlias

from google.protobuf import duration_pb2

from runcap.errors import (
    BudgetBlockedError,
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
    )


ScopeKindName = Literal["run", "api_key", "user", "team"]
"""The short name of a `runcap.v1.ScopeKind`: ``"api_key"`` is ``SCOPE_KIND_API_KEY``."""

PeriodName = Literal["lifetime", "daily", "monthly"]
"""The short name of a `runcap.v1.Period`: ``"daily"`` is ``PERIOD_DAILY``."""

ScopeKind: TypeAlias = budget_pb2.ScopeKind.ValueType | ScopeKindName
"""A scope kind: a `runcap.v1.ScopeKind` value, or its short name."""

Period: TypeAlias = budget_pb2.Period.ValueType | PeriodName
"""A period: a `runcap.v1.Period` value, or its short name."""

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
    """

    provider: str
    model: str
    input_tokens: int
    max_output_tokens: int | None = None

    def to_proto(self) -> budget_service_pb2.LlmCall:
        """The `runcap.v1.LlmCall` message."""
        return budget_service_pb2.LlmCall(
            provider=self.provider,
            model=self.model,
            input_tokens=self.input_tokens,
            max_output_tokens=self.max_output_tokens,
        )


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


def reserve_request(
    run_id: str,
    estimate: int | budget_service_pb2.LlmCall,
    reservation_id: str,
    ttl: Duration | None,
) -> budget_service_pb2.ReserveRequest:
    """A ReserveRequest for an amount in micro-USD or an LLM call (see
    `estimate_of`)."""
    request = budget_service_pb2.ReserveRequest(
        run_id=run_id, reservation_id=reservation_id, ttl=to_duration(ttl)
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


HoldOutcome = (
    tuple[Literal["commit"], int | budget_service_pb2.TokenUsage] | tuple[Literal["refund"], None]
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

    A block decision raises `BudgetBlockedError` on entering; nothing is held.
    """

    def __init__(
        self,
        run_id: str,
        estimate: int | budget_service_pb2.LlmCall,
        reservation_id: str | None,
        ttl: Duration | None,
    ) -> None:
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
        self.ttl = ttl
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
        """The ReserveResponse (an allow decision)."""
        if self._response is None:
            raise RuntimeError("the hold is not reserved yet: use it as a context manager")
        return self._response

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
        return reserve_request(self.run_id, self._estimate, self.reservation_id, self.ttl)

    def _accept(self, response: budget_service_pb2.ReserveResponse) -> None:
        if response.decision == budget_pb2.DECISION_BLOCK:
            raise BudgetBlockedError(self.run_id, response)
        self._response = response

    def _outcome(self, failed: bool) -> HoldOutcome:
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
