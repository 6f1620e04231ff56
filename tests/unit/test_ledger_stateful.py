"""Every storage backend against the reference model, step by step, under Hypothesis.

All ledgers get the same operations at the same (manual) time; every result or
error must be identical, and after every step the stored rows, the change logs
and the ledger invariants are checked against what this test tracked itself.
Runs here have no thresholds (the plain two-phase ledger);
test_ledger_policy_stateful.py covers policies.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from runcap_server import errors
from runcap_server.clock import ManualClock
from runcap_server.ledger.model import ModelLedger
from runcap_server.ledger.types import (
    CommitResult,
    CreateRunResult,
    Decision,
    DecisionReason,
    RefundResult,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
)
from tests.ledger_backends import (
    NO_REDIS,
    Ledger,
    RedisTargets,
    check_machine,
    make_backend,
    redis_targets,
    snapshot,
)

DEFAULT_TTL_MS = 2_000
# (tenant, run id): mostly one run, so its holds pile up; the same run id under
# another tenant is a different run.
KEYS = st.sampled_from([("t0", "r0"), ("t0", "r0"), ("t0", "r0"), ("t0", "r1"), ("t1", "r0")])
RESERVATION_IDS = st.sampled_from(["a", "b", "c", "d", "e"])
LABELS = st.sampled_from([{}, {"agent": "x"}, {"agent": "x", "team": "y"}])
# Round durations too, so that the clock often lands exactly on an expiry.
TTLS = st.none() | st.sampled_from([500, 1_000, 2_000]) | st.integers(1, 3_000)
ADVANCES = st.sampled_from([1, 500, 1_000]) | st.integers(0, 3_000)
# Small enough that a long example trims its logs.
LOG_RETENTION = 6
# No graduated response: every decision is the dollar ceiling's alone.
PLAIN = RunPolicy(thresholds=(0, 0, 0))


def plain_spec(run_id: str, limit: int, labels: dict[str, str], ttl: int | None) -> RunSpec:
    return RunSpec(run_id, limit, labels, ttl, policy=PLAIN)


@dataclass
class Hold:
    status: ReservationStatus
    held: int = 0
    expires_ms: int | None = None
    actual: int | None = None


@dataclass
class Tracked:
    """What the test knows about one run from the results it was given."""

    spec: RunSpec
    closed: bool = False
    committed: int = 0
    # Whether committed spend has reached the limit: the stop threshold's
    # one THRESHOLD_CROSSED change (the only level PLAIN leaves on).
    stopped: bool = False
    # The number of changes the run has had, counted from the results.
    revision: int = 1
    holds: dict[str, Hold] = field(default_factory=dict)
    # At the wall (a BLOCKED change since the last RESERVED one), and the
    # blocked Reserves so far (retries not counted).
    blocked: bool = False
    blocked_calls: int = 0

    def expire(self, now_ms: int) -> None:
        for hold in self.holds.values():
            if (
                hold.status is ReservationStatus.HELD
                and hold.expires_ms is not None
                and hold.expires_ms <= now_ms
            ):
                hold.status = ReservationStatus.EXPIRED
                self.revision += 1

    @property
    def reserved(self) -> int:
        return sum(h.held for h in self.holds.values() if h.status is ReservationStatus.HELD)

    @property
    def active(self) -> int:
        return sum(1 for h in self.holds.values() if h.status is ReservationStatus.HELD)


@dataclass(frozen=True)
class Op:
    kind: str
    tenant: str = ""
    run_id: str = ""
    args: tuple[Any, ...] = ()


Outcome = tuple[str, Any]


class LedgerMachine(RuleBasedStateMachine):
    # The backends held to the model, and where Redis listens (set per test).
    kinds: tuple[str, ...] = ("sqlite",)
    redis = RedisTargets()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="runcap-stateful-"))
        self.clocks = [ManualClock() for _ in range(len(self.kinds) + 1)]
        self.model_clock = self.clocks[0]
        model = make_backend(
            "model",
            self.directory,
            self.model_clock,
            default_ttl_ms=DEFAULT_TTL_MS,
            log_retention=LOG_RETENTION,
        )
        assert isinstance(model, ModelLedger)
        self.model = model
        self.others = [
            make_backend(
                kind,
                self.directory,
                clock,
                default_ttl_ms=DEFAULT_TTL_MS,
                log_retention=LOG_RETENTION,
                synchronous="OFF",
                redis=self.redis,
            )
            for kind, clock in zip(self.kinds, self.clocks[1:], strict=True)
        ]
        for ledger in (self.model, *self.others):
            self.run(ledger.start())
        self.runs: dict[tuple[str, str], Tracked] = {}
        self.last: Op | None = None

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            for ledger in (*self.others, self.model):
                self.run(ledger.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- applying one operation to both ledgers ------------------------------

    async def _call(self, ledger: Ledger, op: Op) -> Any:
        if op.kind == "create":
            limit, labels, ttl = op.args
            return await ledger.create_run(op.tenant, plain_spec(op.run_id, limit, labels, ttl))
        if op.kind == "get":
            return await ledger.get_run(op.tenant, op.run_id)
        if op.kind == "reserve":
            return await ledger.reserve(op.tenant, op.run_id, *op.args)
        if op.kind == "commit":
            return await ledger.commit(op.tenant, op.run_id, *op.args)
        if op.kind == "refund":
            return await ledger.refund(op.tenant, op.run_id, *op.args)
        if op.kind == "close":
            return await ledger.close_run(op.tenant, op.run_id)
        if op.kind == "sweep":
            return await ledger.sweep(100)
        raise AssertionError(op.kind)

    def _outcome(self, ledger: Ledger, op: Op) -> Outcome:
        try:
            return ("ok", self.run(self._call(ledger, op)))
        except errors.BackendUnavailable:
            raise
        except errors.RuncapError as exc:
            return ("error", (type(exc), exc.message))

    def apply(self, op: Op) -> None:
        model = self._outcome(self.model, op)
        for kind, ledger in zip(self.kinds, self.others, strict=True):
            other = self._outcome(ledger, op)
            assert model == other, (kind, op, model, other)
        self.last = op
        self.track(op, model)

    # -- what the test expects and tracks ------------------------------------

    def track(self, op: Op, outcome: Outcome) -> None:
        now = self.model_clock.now_ms()
        status, value = outcome
        key = (op.tenant, op.run_id)
        tracked = self.runs.get(key)
        if op.kind == "sweep":
            for run in self.runs.values():
                run.expire(now)
            return
        if op.kind == "create":
            limit, labels, ttl = op.args
            spec = plain_spec(op.run_id, limit, labels, ttl)
            if tracked is None:
                assert status == "ok"
                assert isinstance(value, CreateRunResult)
                assert not value.replayed
                self.runs[key] = Tracked(spec)
            elif tracked.spec == spec:
                assert status == "ok"
                assert value.replayed
            else:
                assert value[0] is errors.RunAlreadyExists
            return
        if tracked is None:
            assert status == "error"
            assert value[0] is errors.RunNotFound
            return
        if status == "error":
            self._check_error(op, tracked, now, value[0])
            return
        tracked.expire(now)
        if op.kind == "reserve":
            self._track_reserve(op, tracked, now, value)
        elif op.kind == "commit":
            self._track_commit(op, tracked, value)
        elif op.kind == "refund":
            self._track_refund(op, tracked, value)
        elif op.kind == "close":
            assert value.replayed == tracked.closed
            tracked.revision += 0 if tracked.closed else 1
            tracked.closed = True

    def _check_error(self, op: Op, tracked: Tracked, now: int, error: type[Exception]) -> None:
        """Predict the error from the tracked holds (as they stand after expiry)."""
        probe = Tracked(tracked.spec, tracked.closed, tracked.committed)
        probe.holds = {
            k: Hold(h.status, h.held, h.expires_ms, h.actual) for k, h in tracked.holds.items()
        }
        probe.expire(now)
        hold = probe.holds.get(op.args[0]) if op.args else None
        if op.kind == "reserve":
            assert error is errors.IdempotencyConflict
            assert hold is not None
            return
        assert op.kind in ("commit", "refund"), op
        if hold is None:
            assert error is errors.ReservationNotFound
        elif hold.status is ReservationStatus.BLOCKED:
            assert error is errors.ReservationBlocked
        elif hold.status is ReservationStatus.RELEASED:
            assert error is errors.ReservationReleased
        else:
            assert op.kind == "commit"
            assert hold.actual is not None
            assert hold.actual != op.args[1]
            assert error is errors.IdempotencyConflict

    def _track_reserve(self, op: Op, tracked: Tracked, now: int, result: ReserveResult) -> None:
        reservation_id, amount, ttl = op.args
        previous = tracked.holds.get(reservation_id)
        assert result.replayed == (previous is not None)
        if previous is not None:
            assert result.decision is (
                Decision.BLOCK if previous.status is ReservationStatus.BLOCKED else Decision.ALLOW
            )
            return
        if tracked.closed:
            expected = DecisionReason.RUN_CLOSED
        elif tracked.committed + tracked.reserved + amount > tracked.spec.limit_micros:
            expected = DecisionReason.INSUFFICIENT_BUDGET
        else:
            expected = DecisionReason.WITHIN_BUDGET
        assert result.reason is expected
        if expected is DecisionReason.WITHIN_BUDGET:
            assert result.expires_ms == now + (ttl or tracked.spec.default_ttl_ms or DEFAULT_TTL_MS)
            tracked.holds[reservation_id] = Hold(ReservationStatus.HELD, amount, result.expires_ms)
            tracked.revision += 1
            tracked.blocked = False
        else:
            assert result.held_micros == 0
            tracked.holds[reservation_id] = Hold(ReservationStatus.BLOCKED)
            tracked.blocked_calls += 1
            # Only the first block of a series is a change.
            tracked.revision += 0 if tracked.blocked else 1
            tracked.blocked = True
        assert result.state.blocked == tracked.blocked

    def _track_commit(self, op: Op, tracked: Tracked, result: CommitResult) -> None:
        reservation_id, actual = op.args
        hold = tracked.holds[reservation_id]
        if hold.status in (ReservationStatus.COMMITTED, ReservationStatus.LATE_COMMITTED):
            assert result.replayed
            assert result.reservation_status is hold.status
            return
        assert not result.replayed
        if hold.status is ReservationStatus.HELD:
            assert result.reservation_status is ReservationStatus.COMMITTED
            assert result.overrun_micros == max(0, actual - hold.held)
        else:
            assert hold.status is ReservationStatus.EXPIRED
            assert result.reservation_status is ReservationStatus.LATE_COMMITTED
            assert result.overrun_micros == actual
        hold.status = result.reservation_status
        hold.actual = actual
        tracked.committed += actual
        tracked.revision += 1
        if not tracked.stopped and tracked.committed >= tracked.spec.limit_micros:
            tracked.stopped = True
            tracked.revision += 1

    def _track_refund(self, op: Op, tracked: Tracked, result: RefundResult) -> None:
        hold = tracked.holds[op.args[0]]
        if hold.status is ReservationStatus.HELD:
            assert not result.replayed
            assert result.released_micros == hold.held
            hold.status = ReservationStatus.RELEASED
            tracked.revision += 1
        else:
            assert result.replayed
            assert result.released_micros == 0
            assert result.reservation_status is hold.status

    # -- rules ---------------------------------------------------------------

    @initialize(limit=st.integers(1, 300), labels=LABELS)
    def create_first(self, limit: int, labels: dict[str, str]) -> None:
        self.apply(Op("create", "t0", "r0", (limit, labels, None)))

    @rule(
        key=KEYS,
        limit=st.integers(1, 300),
        labels=LABELS,
        ttl=st.none() | st.sampled_from([1_000, 2_000]) | st.integers(1, 3_000),
    )
    def create(
        self, key: tuple[str, str], limit: int, labels: dict[str, str], ttl: int | None
    ) -> None:
        self.apply(Op("create", *key, (limit, labels, ttl)))

    @rule(
        key=KEYS,
        reservation_id=RESERVATION_IDS,
        amount=st.integers(1, 150),
        ttl=TTLS,
    )
    def reserve(
        self, key: tuple[str, str], reservation_id: str, amount: int, ttl: int | None
    ) -> None:
        self.apply(Op("reserve", *key, (reservation_id, amount, ttl)))

    @rule(key=KEYS, reservation_id=RESERVATION_IDS, actual=st.integers(0, 200))
    def commit(self, key: tuple[str, str], reservation_id: str, actual: int) -> None:
        self.apply(Op("commit", *key, (reservation_id, actual)))

    @rule(key=KEYS, reservation_id=RESERVATION_IDS)
    def refund(self, key: tuple[str, str], reservation_id: str) -> None:
        self.apply(Op("refund", *key, (reservation_id,)))

    @rule(key=KEYS)
    def close(self, key: tuple[str, str]) -> None:
        self.apply(Op("close", *key))

    @rule(key=KEYS)
    def get(self, key: tuple[str, str]) -> None:
        self.apply(Op("get", *key))

    @rule()
    def sweep(self) -> None:
        self.apply(Op("sweep"))

    @rule(ms=ADVANCES)
    def advance_clock(self, ms: int) -> None:
        for clock in self.clocks:
            clock.advance(ms)

    @precondition(lambda self: self.last is not None)
    @rule()
    def retry_previous(self) -> None:
        assert self.last is not None
        self.apply(self.last)

    # -- invariants ----------------------------------------------------------

    @invariant()
    def ledgers_agree(self) -> None:
        for (tenant, run_id), tracked in self.runs.items():
            model = self.run(snapshot(self.model, tenant, run_id))
            for ledger in self.others:
                assert self.run(snapshot(ledger, tenant, run_id)) == model
            account, reservations = model
            assert account is not None
            state = account.state()
            assert state.committed_micros + state.reserved_micros <= (
                state.limit_micros + state.overrun_micros
            )
            assert state.remaining_micros >= 0
            assert state.reserved_micros == tracked.reserved
            assert state.active_reservations == tracked.active
            assert state.committed_micros == tracked.committed
            assert (state.blocked, account.blocked_calls) == (
                tracked.blocked,
                tracked.blocked_calls,
            )
            assert {r.reservation_id: r.status for r in reservations} == {
                k: h.status for k, h in tracked.holds.items()
            }
            sql_log = self.run(self.model.read_changes(tenant, run_id, 0, 10_000))
            for ledger in self.others:
                assert self.run(ledger.read_changes(tenant, run_id, 0, 10_000)) == sql_log
            assert state.revision == tracked.revision
            retained = min(state.revision, LOG_RETENTION)
            assert (sql_log.floor, sql_log.head) == (state.revision - retained + 1, state.revision)
            assert [c.revision for c in sql_log.changes] == list(
                range(sql_log.floor, state.revision + 1)
            )
            assert sql_log.changes[-1].state == state


SETTINGS = settings(max_examples=200, deadline=None, stateful_step_count=30)


def _check(kinds: tuple[str, ...], redis: RedisTargets = NO_REDIS) -> None:
    check_machine(LedgerMachine, SETTINGS, kinds, redis)


def test_sqlite_matches_the_model() -> None:
    _check(("sqlite",))


@pytest.mark.redis
@pytest.mark.timeout(600)
def test_redis_standalone_matches_the_model(request: pytest.FixtureRequest) -> None:
    _check(("redis",), redis_targets(request, "redis"))


@pytest.mark.redis
@pytest.mark.timeout(600)
def test_redis_cluster_matches_the_model(request: pytest.FixtureRequest) -> None:
    _check(("redis-cluster",), redis_targets(request, "redis-cluster"))
