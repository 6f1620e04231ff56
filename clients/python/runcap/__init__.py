"""runcap: the Python client of the runcap budget authority.

::

    from runcap import (
        BudgetBlockedError,
        BudgetThrottledError,
        LlmCall,
        RateLimit,
        RunPolicy,
        RuncapClient,
        TokenUsage,
    )

    with RuncapClient("127.0.0.1:50051") as client:
        client.create_run("run-1", limit_micros=5_000_000)
        with client.reserve("run-1", 40_000) as hold:
            hold.set_actual(call_the_model())

        # Or let the server price an LLM call, and commit its token usage:
        call = LlmCall("openai", "gpt-4o", input_tokens=1_200, max_output_tokens=500)
        with client.reserve("run-1", llm_call=call) as hold:
            reply = call_the_model()
            hold.set_usage(TokenUsage(input_tokens=1_200, output_tokens=310))

        # A run with a policy: advisory (warns instead of blocking), at most
        # 30 Reserves a minute; a throttled reserve says when to come back.
        policy = RunPolicy(enforcement_mode="advisory", rate_limit=RateLimit(30, 60))
        client.create_run("run-2", limit_micros=5_000_000, policy=policy)
        try:
            with client.reserve("run-2", 40_000, meter="tool:search") as hold:
                if hold.warning:
                    log_the_warning(hold.reason, hold.dimension)
        except BudgetThrottledError as throttled:
            time.sleep(throttled.retry_after)  # then reserve again

        # A run that downgrades an LLM call that does not fit to a cheaper
        # model with the capabilities it needs, instead of blocking it:
        policy = RunPolicy(auto_downgrade=True, downgrade_models=["openai/gpt-4o-mini"])
        client.create_run("run-3", limit_micros=5_000_000, policy=policy)
        call = LlmCall("openai", "gpt-4o", input_tokens=1_200, needs_tools=True)
        with client.reserve("run-3", llm_call=call) as hold:
            reply = call_the_model(hold.model)  # "gpt-4o-mini" when hold.downgraded
        client.get_decision(hold.decision_id)  # the decision and its inputs

        # A run that escalates: past 80 % of its limit, or on a meter not
        # approved, a call waits for a person (or a supervising agent).
        policy = RunPolicy(approval_percent=80, approved_meters=["tool:search"])
        client.create_run("run-4", limit_micros=5_000_000, policy=policy)
        try:
            with client.reserve("run-4", 40_000, meter="tool:deploy") as hold:
                ...
        except ApprovalRequiredError as pending:
            client.approve(pending.approval_id)  # or deny(...); then reserve again

`AsyncRuncapClient` offers the same API for asyncio. Responses are the
generated `runcap.v1` protobuf messages; failures raise `RuncapError`
subclasses (see `runcap.errors`).
"""

from __future__ import annotations

from runcap._shared import (
    DEFAULT_CHANNEL_OPTIONS,
    NO_RETRY,
    WATCH_RECONNECT,
    HoldBase,
    LlmCall,
    RateLimit,
    RetryPolicy,
    RunPolicy,
    Thresholds,
    TokenUsage,
)
from runcap.aio import AsyncHold, AsyncRuncapClient, AsyncWatchStream
from runcap.alerts import AlertClient, AsyncAlertClient
from runcap.client import Hold, RuncapClient, WatchStream
from runcap.errors import (
    REASON_TO_ERROR,
    ApprovalNotFoundError,
    ApprovalRequiredError,
    ApprovalResolvedError,
    BudgetBlockedError,
    BudgetThrottledError,
    DecisionNotFoundError,
    IdempotencyConflictError,
    InternalError,
    InvalidArgumentError,
    OpenRunLimitError,
    ParentRunClosedError,
    ParentRunNotFoundError,
    PermissionDeniedError,
    ReservationBlockedError,
    ReservationNotFoundError,
    ReservationReleasedError,
    RevisionOutOfRangeError,
    RunAlreadyExistsError,
    RuncapError,
    RunClosedError,
    RunNotFoundError,
    SubagentLimitError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
    from_status,
)

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "NO_RETRY",
    "REASON_TO_ERROR",
    "WATCH_RECONNECT",
    "AlertClient",
    "ApprovalNotFoundError",
    "ApprovalRequiredError",
    "ApprovalResolvedError",
    "AsyncAlertClient",
    "AsyncHold",
    "AsyncRuncapClient",
    "AsyncWatchStream",
    "BudgetBlockedError",
    "BudgetThrottledError",
    "DecisionNotFoundError",
    "Hold",
    "HoldBase",
    "IdempotencyConflictError",
    "InternalError",
    "InvalidArgumentError",
    "LlmCall",
    "OpenRunLimitError",
    "ParentRunClosedError",
    "ParentRunNotFoundError",
    "PermissionDeniedError",
    "RateLimit",
    "ReservationBlockedError",
    "ReservationNotFoundError",
    "ReservationReleasedError",
    "RetryPolicy",
    "RevisionOutOfRangeError",
    "RunAlreadyExistsError",
    "RunClosedError",
    "RunNotFoundError",
    "RunPolicy",
    "RuncapClient",
    "RuncapError",
    "SubagentLimitError",
    "Thresholds",
    "TokenUsage",
    "UnauthenticatedError",
    "UnavailableError",
    "WatchStream",
    "from_rpc_error",
    "from_status",
]
