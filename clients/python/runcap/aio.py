"""The asyncio runcap client: the same API as `runcap.client`, as coroutines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Self

import grpc

from runcap._connection import AsyncConnection
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


class AsyncRuncapClient(AsyncConnection):
    """An asyncio client of the runcap BudgetService.

    The same methods as `runcap.RuncapClient`, as coroutines; `reserve` is an
    async context manager and `watch` an async iterator. Use it with
    ``async with``, or await `close()`, to close the channel it created; a
    channel passed in stays open (it is the caller's).

    Args:
        target: The server's address, used when no `channel` is given.
        channel: An existing `grpc.aio` channel to use instead of opening one.
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
    _stub: budget_service_pb2_grpc.BudgetServiceAsyncStub

    async def create_run(
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
        """See `RuncapClient.create_run`."""
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
        return await self._call(self._stub.CreateRun, request, idempotent=bool(run_id))

    async def get_run(self, run_id: str) -> budget_service_pb2.GetRunResponse:
        """See `RuncapClient.get_run`."""
        request = budget_service_pb2.GetRunRequest(run_id=run_id)
        return await self._call(self._stub.GetRun, request, idempotent=True)

    async def list_runs(
        self,
        created_after: datetime,
        created_before: datetime | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> budget_service_pb2.ListRunsResponse:
        """See `RuncapClient.list_runs`."""
        request = list_runs_request(created_after, created_before, page_size, page_token)
        return await self._call(self._stub.ListRuns, request, idempotent=True)

    async def get_decision(self, decision_id: str) -> budget_service_pb2.GetDecisionResponse:
        """See `RuncapClient.get_decision`."""
        request = budget_service_pb2.GetDecisionRequest(decision_id=decision_id)
        return await self._call(self._stub.GetDecision, request, idempotent=True)

    async def reserve_once(
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
        """See `RuncapClient.reserve_once`."""
        estimate = estimate_of(amount_micros, llm_call)
        request = reserve_request(run_id, estimate, reservation_id, ttl, meter, meter_units)
        return await self._call(self._stub.Reserve, request, idempotent=bool(reservation_id))

    async def commit(
        self,
        run_id: str,
        reservation_id: str,
        actual_micros: int | None = None,
        *,
        usage: TokenUsageLike | None = None,
    ) -> budget_service_pb2.CommitResponse:
        """See `RuncapClient.commit`."""
        request = commit_request(run_id, reservation_id, actual_of(actual_micros, usage))
        return await self._call(self._stub.Commit, request, idempotent=True)

    async def refund(self, run_id: str, reservation_id: str) -> budget_service_pb2.RefundResponse:
        """See `RuncapClient.refund`."""
        request = refund_request(run_id, reservation_id)
        return await self._call(self._stub.Refund, request, idempotent=True)

    async def close_run(self, run_id: str) -> budget_service_pb2.CloseRunResponse:
        """See `RuncapClient.close_run`."""
        request = budget_service_pb2.CloseRunRequest(run_id=run_id)
        return await self._call(self._stub.CloseRun, request, idempotent=True)

    async def suspend_run(self, run_id: str) -> budget_service_pb2.SuspendRunResponse:
        """See `RuncapClient.suspend_run`."""
        request = budget_service_pb2.SuspendRunRequest(run_id=run_id)
        return await self._call(self._stub.SuspendRun, request, idempotent=True)

    async def resume_run(self, run_id: str) -> budget_service_pb2.ResumeRunResponse:
        """See `RuncapClient.resume_run`."""
        request = budget_service_pb2.ResumeRunRequest(run_id=run_id)
        return await self._call(self._stub.ResumeRun, request, idempotent=True)

    async def approve(self, approval_id: str) -> budget_service_pb2.ApproveResponse:
        """See `RuncapClient.approve`."""
        request = budget_service_pb2.ApproveRequest(approval_id=approval_id)
        return await self._call(self._stub.Approve, request, idempotent=True)

    async def deny(self, approval_id: str) -> budget_service_pb2.DenyResponse:
        """See `RuncapClient.deny`."""
        request = budget_service_pb2.DenyRequest(approval_id=approval_id)
        return await self._call(self._stub.Deny, request, idempotent=True)

    async def set_scope_limit(
        self,
        kind: ScopeKind,
        scope_id: str,
        period: Period,
        *,
        limit_micros: int | None = None,
        clear: bool = False,
    ) -> budget_service_pb2.SetScopeLimitResponse:
        """See `RuncapClient.set_scope_limit`."""
        request = set_scope_limit_request(kind, scope_id, period, limit_micros, clear)
        return await self._call(self._stub.SetScopeLimit, request, idempotent=True)

    async def set_scope_policy(
        self,
        kind: ScopeKind,
        scope_id: str,
        policy: RunPolicyLike | None = None,
        *,
        clear: bool = False,
    ) -> budget_service_pb2.SetScopePolicyResponse:
        """See `RuncapClient.set_scope_policy`."""
        request = set_scope_policy_request(kind, scope_id, policy, clear)
        return await self._call(self._stub.SetScopePolicy, request, idempotent=True)

    async def get_scope(
        self, kind: ScopeKind, scope_id: str
    ) -> budget_service_pb2.GetScopeResponse:
        """See `RuncapClient.get_scope`."""
        request = get_scope_request(kind, scope_id)
        return await self._call(self._stub.GetScope, request, idempotent=True)

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
    ) -> AsyncHold:
        """An async context manager that holds `amount_micros`, or the
        server's price of `llm_call`, for the block::

            async with client.reserve(run_id, 50_000) as hold:
                result = await call_the_model()
                hold.set_actual(cost_of(result))

        See `RuncapClient.reserve`. Cancelling the task inside the block
        refunds the hold like any other exception.
        """
        return AsyncHold(
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
    ) -> AsyncWatchStream:
        """See `RuncapClient.watch`. Use it with ``async with`` so the call is
        cancelled when the loop is left::

            async with client.watch(run_id) as stream:
                async for message in stream:
                    ...
        """
        cursor = WatchCursor(
            run_id,
            after_revision,
            resume=resume,
            resnapshot_on_out_of_range=resnapshot_on_out_of_range,
            policy=reconnect,
        )
        return AsyncWatchStream(
            lambda request: self._stub.Watch(request, metadata=self._metadata), cursor
        )


class AsyncHold(HoldBase):
    """A reservation held for the duration of an ``async with`` block; see
    `AsyncRuncapClient.reserve` and `HoldBase`."""

    def __init__(
        self,
        client: AsyncRuncapClient,
        run_id: str,
        estimate: int | budget_service_pb2.LlmCall,
        reservation_id: str | None,
        ttl: Duration | None,
        meter: str = "",
        meter_units: int | None = None,
    ) -> None:
        super().__init__(run_id, estimate, reservation_id, ttl, meter, meter_units)
        self._client = client

    async def __aenter__(self) -> Self:
        request = self._start()
        client = self._client
        self._accept(await client._call(client._stub.Reserve, request, idempotent=True))
        return self

    async def __aexit__(
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
                self.refund_response = await client.refund(self.run_id, self.reservation_id)
            elif isinstance(actual, int):
                self.commit_response = await client.commit(self.run_id, self.reservation_id, actual)
            else:
                self.commit_response = await client.commit(
                    self.run_id, self.reservation_id, usage=actual
                )
        except RuncapError as error:
            if exc is None:
                raise
            exc.add_note(settle_note(self, error))


class AsyncWatchStream(AsyncIterator[budget_service_pb2.WatchResponse]):
    """An async iterator of WatchResponse messages that resumes across
    disconnects; see `RuncapClient.watch`.

    `last_revision` is the resume point: the revision of the last message
    delivered (None before the first). `aclose()` cancels the stream.
    """

    def __init__(
        self,
        open_call: Callable[
            [budget_service_pb2.WatchRequest],
            grpc.aio.UnaryStreamCall[
                budget_service_pb2.WatchRequest, budget_service_pb2.WatchResponse
            ],
        ],
        cursor: WatchCursor,
    ) -> None:
        self._open = open_call
        self._cursor = cursor
        self._call: (
            grpc.aio.UnaryStreamCall[
                budget_service_pb2.WatchRequest, budget_service_pb2.WatchResponse
            ]
            | None
        ) = None
        self._closed = asyncio.Event()
        self._reading = False
        self._messages = self._run()

    @property
    def last_revision(self) -> int | None:
        """The revision of the last message delivered."""
        return self._cursor.last_revision

    @property
    def reconnects(self) -> int:
        """How many times the stream has reconnected so far."""
        return max(0, self._cursor.connects - 1)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> budget_service_pb2.WatchResponse:
        self._reading = True
        try:
            return await anext(self._messages)
        finally:
            self._reading = False

    async def aclose(self) -> None:
        """Cancels the stream; iteration then stops. Safe to call from another
        task while one is waiting for the next message."""
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        if not self._reading:
            await self._messages.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[budget_service_pb2.WatchResponse, None]:
        cursor = self._cursor
        try:
            while not self._closed.is_set():
                self._call = call = self._open(cursor.request())
                try:
                    async for message in call:
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
                except asyncio.CancelledError:
                    # `aclose()` from another task cancels the call under a
                    # pending read; a cancellation of the task itself goes on.
                    task = asyncio.current_task()
                    if self._closed.is_set() and not (task and task.cancelling()):
                        return
                    raise
                else:
                    end_delay = cursor.on_end()
                    if end_delay is None:
                        return
                    delay = end_delay
                finally:
                    call.cancel()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closed.wait(), delay)
        finally:
            self._call = None
