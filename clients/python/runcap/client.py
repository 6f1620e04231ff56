"""The synchronous runcap client."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self, cast

import grpc

from runcap._connection import Connection
from runcap._shared import (
    WATCH_RECONNECT,
    Duration,
    HoldBase,
    LlmCallLike,
    Period,
    RetryPolicy,
    RunPolicyLike,
    ScopeKind,
    TokenUsageLike,
    WatchCursor,
    actual_of,
    commit_request,
    create_run_request,
    estimate_of,
    get_scope_request,
    list_runs_request,
    refund_request,
    reserve_request,
    set_scope_limit_request,
    set_scope_policy_request,
    settle_note,
)
from runcap.errors import RuncapError, from_rpc_error
from runcap.v1 import budget_service_pb2, budget_service_pb2_grpc


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


def _cancel(call: object) -> None:
    # grpc-stubs leaves RpcContext.cancel untyped.
    cast(_Cancellable, call).cancel()


class RuncapClient(Connection):
    """A synchronous client of the runcap BudgetService.

    Every failed call raises a `runcap.errors.RuncapError` subclass. Calls that
    are idempotent (those that carry a client-side id, reads, CloseRun,
    SuspendRun, ResumeRun, Approve, Deny, SetScopeLimit and SetScopePolicy)
    are retried on UNAVAILABLE according to `retry`.

    Use it as a context manager, or call `close()`, to close the channel it
    created; a channel passed in stays open (it is the caller's).

    Args:
        target: The server's address, used when no `channel` is given.
        channel: An existing channel to use instead of opening one.
        credentials: Channel credentials for TLS; plaintext when None.
        options: gRPC channel options for the channel the client opens,
            added to `DEFAULT_CHANNEL_OPTIONS` (keepalive pings for long
            Watch streams); on the same key these win.
        timeout: The deadline of each unary attempt in seconds (None: none).
            Watch streams have no deadline.
        metadata: Metadata sent with every call (for example authorization).
        retry: The retry policy of idempotent unary calls.
        api_key: The API key to send with every call (``authorization:
            Bearer <key>``), for a server with keys configured.
    """

    _STUB = budget_service_pb2_grpc.BudgetServiceStub
    _stub: budget_service_pb2_grpc.BudgetServiceStub

    def create_run(
        self,
        run_id: str = "",
        *,
        limit_micros: int,
        labels: Mapping[str, str] | None = None,
        default_ttl: Duration | None = None,
        parent_run_id: str = "",
        api_key_id: str = "",
        user_id: str = "",
        team_id: str = "",
        policy: RunPolicyLike | None = None,
    ) -> budget_service_pb2.CreateRunResponse:
        """Creates a run (or returns it, with `replayed` set, when it exists
        with the same arguments). With an empty `run_id` the server picks one,
        and the call is not retried.

        Parent scopes: `parent_run_id` makes the run a subagent of that run,
        so each of its reservations is also held on the parent and every
        ancestor. `api_key_id`, `user_id` and `team_id` name the API key,
        user and team to charge as well; when empty they are inherited from
        the parent. A reservation must fit every ceiling of all those scopes.

        `policy` governs the run beyond its dollar limit (a `RunPolicy`, or
        the `runcap.v1.RunPolicy` message): enforcement mode, threshold
        bands and throttling, token, call-meter, rate and in-flight limits,
        and caps on its subagents; the server's answer has the policy with
        every default filled in (``run.policy``). A subagent run given no
        policy takes its parent's, and a root run its scopes' default policy
        (`set_scope_policy`: the API key's, else the user's, else the
        team's)::

            client.create_run(
                "run-1",
                limit_micros=5_000_000,
                policy=RunPolicy(enforcement_mode="advisory", max_in_flight=4),
            )

        Creating a child past its parent's ``max_children`` or an ancestor's
        ``max_depth`` raises `SubagentLimitError`.
        """
        request = create_run_request(
            run_id,
            limit_micros,
            labels,
            default_ttl,
            parent_run_id=parent_run_id,
            api_key_id=api_key_id,
            user_id=user_id,
            team_id=team_id,
            policy=policy,
        )
        return self._call(self._stub.CreateRun, request, idempotent=bool(run_id))

    def get_run(self, run_id: str) -> budget_service_pb2.GetRunResponse:
        """Returns a run's configuration and current budget state."""
        request = budget_service_pb2.GetRunRequest(run_id=run_id)
        return self._call(self._stub.GetRun, request, idempotent=True)

    def list_runs(
        self,
        created_after: datetime,
        created_before: datetime | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> budget_service_pb2.ListRunsResponse:
        """One page of the runs created in [created_after, created_before),
        oldest first (operator role); pass `next_page_token` back for the
        next. Times must be timezone-aware."""
        request = list_runs_request(created_after, created_before, page_size, page_token)
        return self._call(self._stub.ListRuns, request, idempotent=True)

    def iter_runs(
        self, created_after: datetime, created_before: datetime | None = None
    ) -> Iterator[budget_service_pb2.ListedRun]:
        """Every run created in the range, page after page."""
        token = ""
        while True:
            page = self.list_runs(created_after, created_before, page_token=token)
            yield from page.runs
            token = page.next_page_token
            if not token:
                return

    def get_decision(self, decision_id: str) -> budget_service_pb2.GetDecisionResponse:
        """Returns a Reserve decision by its id (``ReserveResponse.decision_id``,
        ``hold.decision_id``, ``BudgetBlockedError.decision_id``), with the
        inputs it was made from: the amount asked for and held, every scope
        checked, what objected, the LLM estimate, and where the reservation
        is now. Decisions are kept as long as their run; one the server does
        not have raises `DecisionNotFoundError`."""
        request = budget_service_pb2.GetDecisionRequest(decision_id=decision_id)
        return self._call(self._stub.GetDecision, request, idempotent=True)

    def reserve_once(
        self,
        run_id: str,
        amount_micros: int | None = None,
        *,
        llm_call: LlmCallLike | None = None,
        reservation_id: str = "",
        ttl: Duration | None = None,
        meter: str = "",
        meter_units: int | None = None,
    ) -> budget_service_pb2.ReserveResponse:
        """Asks to hold `amount_micros`, or the server's price of `llm_call`,
        against the run and returns the decision; a block is a response, not
        an exception. Give exactly one of the two, or ValueError is raised
        before any call::

            client.reserve_once(run_id, 50_000)
            client.reserve_once(run_id, llm_call=LlmCall("openai", "gpt-4o", 1_200, 500))

        For an LLM call the response's `estimate` says how it was priced; a
        model the server has no price for is blocked with
        ``DECISION_REASON_UNKNOWN_PRICE``. Retried on UNAVAILABLE only when
        `reservation_id` is given.

        `meter` names the call meter the call counts on (for example
        ``"tool:serp_api"``; `meter_units` units of it, 1 when None), which
        the run's policy may cap. Besides an allow or a block the decision
        may be ``DECISION_WARN`` (an advisory run: held, but a blocking run
        would have refused it), ``DECISION_THROTTLE`` (nothing held:
        reserve again, with a new reservation id, after the response's
        `retry_after`) or, for an LLM call on a run with ``auto_downgrade``,
        ``DECISION_DOWNGRADE`` (the estimate of a cheaper model, in
        ``estimate.model``, is held under the response's `reservation_id`:
        call that model, and commit with that id). The response's
        `decision_id` names the decision for `get_decision`; a block of an
        LLM call by money lists the `alternatives` that would fit. A call
        that trips one of the run's escalation triggers (the policy's
        ``approval_percent`` or ``approved_meters``) is answered
        ``DECISION_APPROVAL_REQUIRED``: nothing held, and the response's
        `approval_id` names the approval to `approve` before reserving
        again with a new reservation id."""
        estimate = estimate_of(amount_micros, llm_call)
        request = reserve_request(run_id, estimate, reservation_id, ttl, meter, meter_units)
        return self._call(self._stub.Reserve, request, idempotent=bool(reservation_id))

    def commit(
        self,
        run_id: str,
        reservation_id: str,
        actual_micros: int | None = None,
        *,
        usage: TokenUsageLike | None = None,
    ) -> budget_service_pb2.CommitResponse:
        """Records a reservation's actual cost and releases the rest of its
        hold. The cost is `actual_micros`, or for a reservation made with an
        `llm_call` the token `usage`, which the server prices at the
        reservation's own rates; give exactly one of the two, or ValueError
        is raised before any call."""
        request = commit_request(run_id, reservation_id, actual_of(actual_micros, usage))
        return self._call(self._stub.Commit, request, idempotent=True)

    def refund(self, run_id: str, reservation_id: str) -> budget_service_pb2.RefundResponse:
        """Releases a reservation's whole hold."""
        request = refund_request(run_id, reservation_id)
        return self._call(self._stub.Refund, request, idempotent=True)

    def close_run(self, run_id: str) -> budget_service_pb2.CloseRunResponse:
        """Closes a run to new reservations; existing holds still settle."""
        request = budget_service_pb2.CloseRunRequest(run_id=run_id)
        return self._call(self._stub.CloseRun, request, idempotent=True)

    def suspend_run(self, run_id: str) -> budget_service_pb2.SuspendRunResponse:
        """The kill switch: every later Reserve on the run and its descendants is
        blocked (SUSPENDED) until `resume_run`; existing holds still settle."""
        request = budget_service_pb2.SuspendRunRequest(run_id=run_id)
        return self._call(self._stub.SuspendRun, request, idempotent=True)

    def resume_run(self, run_id: str) -> budget_service_pb2.ResumeRunResponse:
        """Lets a suspended run reserve again."""
        request = budget_service_pb2.ResumeRunRequest(run_id=run_id)
        return self._call(self._stub.ResumeRun, request, idempotent=True)

    def approve(self, approval_id: str) -> budget_service_pb2.ApproveResponse:
        """Approves a pending escalation (``ReserveResponse.approval_id``,
        `ApprovalRequiredError.approval_id`, a Watch event's ``approval_id`` or
        ``run.approvals``): calls that trip its trigger are decided as usual
        from now on, on every replica, and Watch shows it. Returns the
        approval and the run's budget state; approving an approved one
        changes nothing (`replayed`), so the call is retried on UNAVAILABLE.
        An approval the run never requested raises `ApprovalNotFoundError`,
        and one that was denied `ApprovalResolvedError`."""
        request = budget_service_pb2.ApproveRequest(approval_id=approval_id)
        return self._call(self._stub.Approve, request, idempotent=True)

    def deny(self, approval_id: str) -> budget_service_pb2.DenyResponse:
        """Denies a pending escalation: calls that trip its trigger are
        blocked from now on (``DECISION_REASON_APPROVAL_DENIED``, with the
        `approval_id` on the `BudgetBlockedError`), and Watch shows it.
        Denying a denied one changes nothing (`replayed`), so the call is
        retried on UNAVAILABLE. An approval the run never requested raises
        `ApprovalNotFoundError`, and one that was approved
        `ApprovalResolvedError`."""
        request = budget_service_pb2.DenyRequest(approval_id=approval_id)
        return self._call(self._stub.Deny, request, idempotent=True)

    def set_scope_limit(
        self,
        kind: ScopeKind,
        scope_id: str,
        period: Period,
        *,
        limit_micros: int | None = None,
        clear: bool = False,
    ) -> budget_service_pb2.SetScopeLimitResponse:
        """Sets a parent scope's ceiling for one period to `limit_micros`, or
        with ``clear=True`` removes it (the spend is still tracked); give
        exactly one of the two, or ValueError is raised before any call.

        `kind` and `period` are `runcap.v1` enum values or their short names
        (``"api_key"``, ``"user"``, ``"team"``; ``"lifetime"``, ``"daily"``,
        ``"monthly"``)::

            client.set_scope_limit("team", "team-7", "daily", limit_micros=50_000_000)

        A new ceiling applies from the next reservation on. Returns the scope
        after the change; the call is retried on UNAVAILABLE (it sets a value,
        so a repeat changes nothing).
        """
        request = set_scope_limit_request(kind, scope_id, period, limit_micros, clear)
        return self._call(self._stub.SetScopeLimit, request, idempotent=True)

    def set_scope_policy(
        self,
        kind: ScopeKind,
        scope_id: str,
        policy: RunPolicyLike | None = None,
        *,
        clear: bool = False,
    ) -> budget_service_pb2.SetScopePolicyResponse:
        """Sets a parent scope's default run policy to `policy` (a
        `RunPolicy`, or the `runcap.v1.RunPolicy` message), or with
        ``clear=True`` removes it; give exactly one of the two, or ValueError
        is raised before any call.

        A root run created without a policy gets its API key's default
        policy, else its user's, else its team's (else the server's
        defaults); a subagent run still takes its parent's::

            client.set_scope_policy("team", "team-7", RunPolicy(enforcement_mode="advisory"))
            client.set_scope_policy("team", "team-7", clear=True)

        The policy applies to runs created afterwards; a run's policy never
        changes. Returns the scope after the change (its
        ``default_policy``); the call is retried on UNAVAILABLE (it sets a
        value, so a repeat changes nothing).
        """
        request = set_scope_policy_request(kind, scope_id, policy, clear)
        return self._call(self._stub.SetScopePolicy, request, idempotent=True)

    def get_scope(self, kind: ScopeKind, scope_id: str) -> budget_service_pb2.GetScopeResponse:
        """Returns a parent scope's ceilings, its usage in the current window
        of each period (lifetime, daily, monthly, in that order) and its
        ``default_policy`` (unset when it has none). A scope nobody has
        charged or limited reads as zeros with no limits."""
        request = get_scope_request(kind, scope_id)
        return self._call(self._stub.GetScope, request, idempotent=True)

    def reserve(
        self,
        run_id: str,
        amount_micros: int | None = None,
        *,
        llm_call: LlmCallLike | None = None,
        reservation_id: str | None = None,
        ttl: Duration | None = None,
        meter: str = "",
        meter_units: int | None = None,
    ) -> Hold:
        """A context manager that holds `amount_micros`, or the server's
        price of `llm_call`, for the block (exactly one of the two, or
        ValueError is raised here).

        ::

            with client.reserve(run_id, 50_000) as hold:
                result = call_the_model()
                hold.set_actual(cost_of(result))

            call = LlmCall("openai", "gpt-4o", input_tokens=1_200, max_output_tokens=500)
            with client.reserve(run_id, llm_call=call) as hold:
                reply = call_the_model()
                hold.set_usage(TokenUsage(input_tokens=1_200, output_tokens=310))

        Raises `BudgetBlockedError` on entering when the server blocks (for
        an LLM call, also when it has no price for the model), its
        subclass `BudgetThrottledError` when it throttles (reserve again
        after its `retry_after`), and its subclass `ApprovalRequiredError`
        when the call needs approval first (reserve again once its
        `approval_id` is approved). A warning of an advisory run is held like
        an allow, with `hold.warning` set, and so is a downgrade of an LLM
        call, with `hold.downgraded` set: call `hold.model` (of
        `hold.provider`), the cheaper model held. `meter` and `meter_units` count
        the call on a call meter, as for `reserve_once`. On a normal
        exit the hold is committed (with `set_actual`'s amount or
        `set_usage`'s tokens, or the whole hold when neither was called); on
        an exception it is refunded. See `HoldBase` for the details. Without
        `reservation_id` a random one is generated, so the Reserve, Commit
        and Refund calls are all retried safely.
        """
        return Hold(
            self,
            run_id,
            estimate_of(amount_micros, llm_call),
            reservation_id,
            ttl,
            meter,
            meter_units,
        )

    def watch(
        self,
        run_id: str,
        *,
        after_revision: int | None = None,
        resume: bool = True,
        resnapshot_on_out_of_range: bool = False,
        reconnect: RetryPolicy = WATCH_RECONNECT,
    ) -> WatchStream:
        """Streams a run's budget state.

        Without `after_revision` the stream starts with a snapshot; with it,
        with every change after that revision. When `resume` is true, a
        disconnect (UNAVAILABLE, or the server ending the stream with a final
        progress message) reconnects from the last revision seen, with
        jittered back-off, and no event is delivered twice; the final
        progress message itself is not delivered. After `reconnect`'s
        attempts the last error is raised. A resume point the server no
        longer retains raises `RevisionOutOfRangeError`, or, with
        `resnapshot_on_out_of_range`, restarts with a fresh snapshot that the
        caller must treat as a reset.

        The stream ends when the server ends it otherwise, or on `close()`;
        use it as a context manager so the call is cancelled::

            with client.watch(run_id) as stream:
                for message in stream:
                    ...
        """
        cursor = WatchCursor(
            run_id,
            after_revision,
            resume=resume,
            resnapshot_on_out_of_range=resnapshot_on_out_of_range,
            policy=reconnect,
        )
        return WatchStream(
            lambda request: self._stub.Watch(request, metadata=self._metadata), cursor
        )


class Hold(HoldBase):
    """A reservation held for the duration of a ``with`` block; see
    `RuncapClient.reserve` and `HoldBase`."""

    def __init__(
        self,
        client: RuncapClient,
        run_id: str,
        estimate: int | budget_service_pb2.LlmCall,
        reservation_id: str | None,
        ttl: Duration | None,
        meter: str = "",
        meter_units: int | None = None,
    ) -> None:
        super().__init__(run_id, estimate, reservation_id, ttl, meter, meter_units)
        self._client = client

    def __enter__(self) -> Self:
        request = self._start()
        client = self._client
        self._accept(client._call(client._stub.Reserve, request, idempotent=True))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        action, actual = self._outcome(failed=exc is not None)
        if action == "none":
            return
        client = self._client
        try:
            if action == "refund":
                self.refund_response = client.refund(self.run_id, self.reservation_id)
            elif isinstance(actual, int):
                self.commit_response = client.commit(self.run_id, self.reservation_id, actual)
            else:
                self.commit_response = client.commit(self.run_id, self.reservation_id, usage=actual)
        except RuncapError as error:
            if exc is None:
                raise
            exc.add_note(settle_note(self, error))


class WatchStream(Iterator[budget_service_pb2.WatchResponse]):
    """An iterator of WatchResponse messages that resumes across disconnects.

    `last_revision` is the resume point: the revision of the last message
    delivered (None before the first). `close()` cancels the stream, from any
    thread.
    """

    def __init__(
        self,
        open_call: Callable[
            [budget_service_pb2.WatchRequest], grpc.CallIterator[budget_service_pb2.WatchResponse]
        ],
        cursor: WatchCursor,
    ) -> None:
        self._open = open_call
        self._cursor = cursor
        self._call: grpc.CallIterator[budget_service_pb2.WatchResponse] | None = None
        self._closed = threading.Event()
        self._messages = self._run()

    @property
    def last_revision(self) -> int | None:
        """The revision of the last message delivered."""
        return self._cursor.last_revision

    @property
    def reconnects(self) -> int:
        """How many times the stream has reconnected so far."""
        return max(0, self._cursor.connects - 1)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> budget_service_pb2.WatchResponse:
        return next(self._messages)

    def close(self) -> None:
        """Cancels the stream; iteration then stops."""
        self._closed.set()
        call = self._call
        if call is not None:
            _cancel(call)
        if inspect.getgeneratorstate(self._messages) != inspect.GEN_RUNNING:
            self._messages.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> Generator[budget_service_pb2.WatchResponse, None, None]:
        cursor = self._cursor
        try:
            while not self._closed.is_set():
                self._call = call = self._open(cursor.request())
                try:
                    for message in call:
                        if cursor.accept(message):
                            yield message
                except grpc.RpcError as exc:
                    if self._closed.is_set():
                        return
                    error = from_rpc_error(exc)
                    error_delay = cursor.on_error(error)
                    if error_delay is None:
                        raise error from exc
                    delay = error_delay
                else:
                    end_delay = cursor.on_end()
                    if end_delay is None:
                        return
                    delay = end_delay
                finally:
                    _cancel(call)
                if self._closed.wait(delay):
                    return
        finally:
            self._call = None
