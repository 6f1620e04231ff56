"""runcap: the Python client of the runcap budget authority.

::

    from runcap import BudgetBlockedError, LlmCall, RuncapClient, TokenUsage

    with RuncapClient("127.0.0.1:50051") as client:
        client.create_run("run-1", limit_micros=5_000_000)
        with client.reserve("run-1", 40_000) as hold:
            hold.set_actual(call_the_model())

        # Or let the server price an LLM call, and commit its token usage:
        call = LlmCall("openai", "gpt-4o", input_tokens=1_200, max_output_tokens=500)
        with client.reserve("run-1", llm_call=call) as hold:
            reply = call_the_model()
            hold.set_usage(TokenUsage(input_tokens=1_200, output_tokens=310))

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
    RetryPolicy,
    TokenUsage,
)
from runcap.aio import AsyncHold, AsyncRuncapClient, AsyncWatchStream
from runcap.client import Hold, RuncapClient, WatchStream
from runcap.errors import (
    REASON_TO_ERROR,
    BudgetBlockedError,
    IdempotencyConflictError,
    InternalError,
    InvalidArgumentError,
    ParentRunClosedError,
    ParentRunNotFoundError,
    ReservationBlockedError,
    ReservationNotFoundError,
    ReservationReleasedError,
    RevisionOutOfRangeError,
    RunAlreadyExistsError,
    RuncapError,
    RunClosedError,
    RunNotFoundError,
    UnavailableError,
    from_rpc_error,
    from_status,
)

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "NO_RETRY",
    "REASON_TO_ERROR",
    "WATCH_RECONNECT",
    "AsyncHold",
    "AsyncRuncapClient",
    "AsyncWatchStream",
    "BudgetBlockedError",
    "Hold",
    "HoldBase",
    "IdempotencyConflictError",
    "InternalError",
    "InvalidArgumentError",
    "LlmCall",
    "ParentRunClosedError",
    "ParentRunNotFoundError",
    "ReservationBlockedError",
    "ReservationNotFoundError",
    "ReservationReleasedError",
    "RetryPolicy",
    "RevisionOutOfRangeError",
    "RunAlreadyExistsError",
    "RunClosedError",
    "RunNotFoundError",
    "RuncapClient",
    "RuncapError",
    "TokenUsage",
    "UnavailableError",
    "WatchStream",
    "from_rpc_error",
    "from_status",
]
