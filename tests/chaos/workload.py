"""A mixed client workload for the fault suite and the soak, journaled for `check`.

`Clients` holds one gRPC channel per server replica. Its agents reserve on
random runs, then commit (sometimes above the hold), refund, or abandon the
hold to its TTL; some retry an answered call with the same id to check that
it replays. A call that fails is retried with the same ids, on the next
replica, until it is answered: the client never gives up on an id, so the
ledger must end up agreeing with everything it was told. `Watcher`s follow
runs with the Python client's resuming Watch and record every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf import duration_pb2

from runcap import AsyncRuncapClient, RetryPolicy
from runcap.errors import from_rpc_error
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.ledger.types import Decision
from tests.chaos.invariants import HOLDING, Journal, RunPlan, WatchLog

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

T = TypeVar("T")
CENT = 10_000  # micro-USD
# What a fault may answer: the call is retried. Anything else is a problem.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass
class Mix:
    """How agents behave: shares of the outcomes of an allowed hold, and pacing."""

    commit: float = 0.65
    refund: float = 0.25  # the rest is abandoned to its TTL
    replay: float = 0.1  # retry an answered Reserve or Commit with the same id
    new_child: float = 0.0  # create a child run under a root run
    ttl_ms: int = 2_000
    pause_s: float = 0.005
    max_cents: int = 20


class Clients:
    """Channels to every replica, and the calls agents make through them."""

    def __init__(
        self,
        journal: Journal,
        targets: Sequence[str],
        *,
        deadline_s: float = 10.0,
        give_up_s: float = 90.0,
    ) -> None:
        self.journal = journal
        self.channels = [grpc.aio.insecure_channel(t) for t in targets]
        self.stubs: list[BudgetServiceAsyncStub] = [BudgetServiceStub(c) for c in self.channels]
        self.deadline_s = deadline_s
        self.give_up_s = give_up_s
        # Seconds each answered call took (the soak reads and clears it).
        self.latencies: list[float] = []
        # How long each failed attempt took to fail: (status code, seconds).
        self.failures: list[tuple[grpc.StatusCode, float]] = []
        self._next = 0

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def call(
        self,
        op: str,
        fn: Callable[[BudgetServiceAsyncStub], Awaitable[T]],
        *,
        prefer: int | None = None,
    ) -> T:
        """Call until answered, on `prefer` first, then on the next replicas in turn.

        Every failure is counted in the journal by status code; a code a fault
        may not cause is a problem, and so is no answer within `give_up_s`.
        """
        start = time.monotonic()
        index = self._next if prefer is None else prefer
        self._next += 1
        while True:
            stub = self.stubs[index % len(self.stubs)]
            began = time.monotonic()
            try:
                reply = await fn(stub)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                self.failures.append((code, time.monotonic() - began))
                self.journal.errors[f"{op}:{code.name}"] += 1
                if code not in RETRYABLE:
                    self.journal.problems.append(f"{op}: {code.name}: {error.details()}")
                if time.monotonic() - start > self.give_up_s:
                    raise AssertionError(f"{op} unanswered for {self.give_up_s:g} s") from error
                index += 1
                # As the clients do: the server's RetryInfo, else a short jittered pause.
                hint = getattr(from_rpc_error(error), "retry_after", None)
                await asyncio.sleep(min(hint, 2.0) if hint else random.uniform(0.02, 0.1))
                continue
            self.latencies.append(time.monotonic() - began)
            return reply

    async def create_run(self, plan: RunPlan, prefer: int | None = None) -> None:
        request = pb.CreateRunRequest(
            run_id=plan.run_id,
            limit_micros=plan.limit_micros,
            parent_run_id=plan.parent_run_id,
            team_id=plan.team_id,
        )
        await self.call(
            "CreateRun", lambda s: s.CreateRun(request, timeout=self.deadline_s), prefer=prefer
        )
        self.journal.add_run(plan)

    async def set_team_limit(self, team: str, limit_micros: int) -> None:
        request = pb.SetScopeLimitRequest(
            scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id=team),
            period=budget_pb2.PERIOD_LIFETIME,
            limit_micros=limit_micros,
        )
        await self.call("SetScopeLimit", lambda s: s.SetScopeLimit(request, timeout=10))

    async def status(self, op: str, run_id: str) -> None:
        """CloseRun, SuspendRun or ResumeRun of `run_id`."""
        request = {
            "CloseRun": pb.CloseRunRequest,
            "SuspendRun": pb.SuspendRunRequest,
            "ResumeRun": pb.ResumeRunRequest,
        }[op](run_id=run_id)
        await self.call(op, lambda s: getattr(s, op)(request, timeout=self.deadline_s))

    async def reserve(
        self, run_id: str, rid: str, amount: int, ttl_ms: int, prefer: int | None = None
    ) -> pb.ReserveResponse:
        seen = self.journal.seen(run_id, rid, amount, ttl_ms)
        request = pb.ReserveRequest(
            run_id=run_id,
            reservation_id=rid,
            amount_micros=amount,
            ttl=duration_pb2.Duration(seconds=ttl_ms // 1000, nanos=ttl_ms % 1000 * 1_000_000),
        )
        reply = await self.call(
            "Reserve", lambda s: s.Reserve(request, timeout=self.deadline_s), prefer=prefer
        )
        self.journal.decided(seen, reply)
        return reply

    async def commit(self, run_id: str, rid: str, actual: int, prefer: int | None = None) -> None:
        seen = self.journal.reservations[(run_id, rid)]
        request = pb.CommitRequest(run_id=run_id, reservation_id=rid, actual_micros=actual)
        reply = await self.call(
            "Commit", lambda s: s.Commit(request, timeout=self.deadline_s), prefer=prefer
        )
        self.journal.committed(seen, reply, actual)

    async def refund(self, run_id: str, rid: str, prefer: int | None = None) -> None:
        seen = self.journal.reservations[(run_id, rid)]
        request = pb.RefundRequest(run_id=run_id, reservation_id=rid)
        reply = await self.call(
            "Refund", lambda s: s.Refund(request, timeout=self.deadline_s), prefer=prefer
        )
        self.journal.refunded(seen, reply)

    async def agent(
        self,
        name: str,
        runs: Callable[[], Sequence[str]],
        stop: asyncio.Event,
        mix: Mix,
        *,
        seed: int,
        prefer: Callable[[random.Random], int | None] = lambda rng: None,
    ) -> int:
        """Reserve and settle until `stop`; the last hold is settled before returning.

        Returns the reservations made.
        """
        rng = random.Random(seed)
        made = 0
        while not stop.is_set():
            target = prefer(rng)
            if mix.new_child and rng.random() < mix.new_child:
                await self._new_child(rng, target, name, made)
            run_id = rng.choice(runs())
            rid = f"{name}-{made}"
            made += 1
            amount = rng.randint(1, mix.max_cents) * CENT
            reply = await self.reserve(run_id, rid, amount, mix.ttl_ms, target)
            if rng.random() < mix.replay:
                await self.reserve(run_id, rid, amount, mix.ttl_ms, prefer(rng))
            if Decision(reply.decision) in HOLDING:
                roll = rng.random()
                if roll < mix.commit:
                    # Now and then above the hold: an overrun, recorded all the same.
                    actual = rng.randint(0, amount + amount // 4)
                    await self.commit(run_id, rid, actual, prefer(rng))
                    if rng.random() < mix.replay:
                        await self.commit(run_id, rid, actual, prefer(rng))
                elif roll < mix.commit + mix.refund:
                    await self.refund(run_id, rid, prefer(rng))
            await asyncio.sleep(mix.pause_s)
        return made

    async def _new_child(self, rng: random.Random, target: int | None, name: str, n: int) -> None:
        roots = [p for p in self.journal.runs.values() if not p.parent_run_id]
        root = rng.choice(roots)
        plan = RunPlan(f"{root.run_id}-{name}-{n}", root.limit_micros // 4, root.run_id)
        await self.create_run(plan, target)


class Watcher:
    """One resuming Watch stream (the Python client's), every message recorded."""

    def __init__(self, client: AsyncRuncapClient, journal: Journal, run_id: str) -> None:
        self.log = WatchLog(run_id)
        journal.watches.append(self.log)
        self._moved = asyncio.Event()
        # Reconnects keep trying through a replica's restart or a failover.
        self._stream = client.watch(
            run_id,
            resnapshot_on_out_of_range=True,
            reconnect=RetryPolicy(max_attempts=100, initial_backoff=0.05, max_backoff=0.5),
        )
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for message in self._stream:
            self.log.record(message)
            self._moved.set()

    async def finish(self, head: int, timeout_s: float = 15.0) -> None:
        """Wait until the stream has delivered `head`, then close it."""
        deadline = time.monotonic() + timeout_s
        while self.log.last_revision < head and not self._task.done():
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        await self._stream.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def finish_watchers(watchers: Sequence[Watcher], heads: dict[str, int]) -> None:
    await asyncio.gather(*(w.finish(heads[w.log.run_id]) for w in watchers))
