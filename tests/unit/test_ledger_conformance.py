"""Every backend gives the same outcome, in the same precedence, for every operation.

Run against the reference model and the SQLite backend (tests/ledger_backends.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from runcap_server import errors
from runcap_server.clock import ManualClock
from runcap_server.ledger.types import (
    BudgetState,
    Change,
    Decision,
    DecisionReason,
    EventType,
    ReservationStatus,
    RunSpec,
    RunStatus,
    chain_digest,
)
from tests.ledger_backends import (
    BACKENDS,
    DEFAULT_TTL_MS,
    Ledger,
    open_backend,
    redis_targets,
    snapshot,
)

T = "acme"
RUN = "run-1"
LIMIT = 1_000


def spec(
    run_id: str = RUN,
    limit: int = LIMIT,
    labels: dict[str, str] | None = None,
    default_ttl_ms: int | None = None,
) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        limit_micros=limit,
        labels={"agent": "a", "team": "t"} if labels is None else labels,
        default_ttl_ms=default_ttl_ms,
    )


@pytest.fixture
async def run(ledger: Ledger) -> RunSpec:
    created = await ledger.create_run(T, spec())
    assert not created.replayed
    return created.run.spec


async def state(ledger: Ledger, run_id: str = RUN) -> BudgetState:
    return (await ledger.get_run(T, run_id)).state


async def head(ledger: Ledger, run_id: str = RUN) -> BudgetState:
    """The run's state as of its last change, read without expiring anything."""
    page = await ledger.read_changes(T, run_id, 0, 1_000_000)
    return page.changes[-1].state


# -- CreateRun ---------------------------------------------------------------


async def test_create_run_starts_at_revision_one(ledger: Ledger, clock: ManualClock) -> None:
    created = await ledger.create_run(T, spec(default_ttl_ms=5_000))
    assert not created.replayed
    view = created.run
    assert view.spec == spec(default_ttl_ms=5_000)
    assert view.default_ttl_ms == 5_000
    assert view.created_ms == clock.now_ms()
    assert view.closed_ms is None
    assert view.state == BudgetState(
        run_id=RUN,
        limit_micros=LIMIT,
        committed_micros=0,
        reserved_micros=0,
        revision=1,
        status=RunStatus.OPEN,
        active_reservations=0,
        overrun_micros=0,
    )
    assert view.state.remaining_micros == LIMIT
    page = await ledger.read_changes(T, RUN, 0, 10)
    assert [(c.revision, c.type) for c in page.changes] == [(1, EventType.CREATED)]
    assert (page.floor, page.head) == (1, 1)


async def test_create_run_is_idempotent(ledger: Ledger, clock: ManualClock) -> None:
    first = await ledger.create_run(T, spec())
    clock.advance(10)
    again = await ledger.create_run(T, spec(labels={"team": "t", "agent": "a"}))
    assert again.replayed
    assert again.run == first.run
    assert (await state(ledger)).revision == 1


async def test_create_run_uses_the_server_default_ttl(ledger: Ledger) -> None:
    created = await ledger.create_run(T, spec(default_ttl_ms=None))
    assert created.run.default_ttl_ms == DEFAULT_TTL_MS
    assert created.run.spec.default_ttl_ms is None


@pytest.mark.parametrize(
    "other",
    [
        spec(limit=LIMIT + 1),
        spec(labels={"agent": "a"}),
        spec(labels={"agent": "a", "team": "u"}),
        spec(labels={}),
        spec(default_ttl_ms=1_000),
    ],
    ids=["limit", "fewer-labels", "label-value", "no-labels", "default-ttl"],
)
async def test_create_run_with_other_arguments_fails(ledger: Ledger, other: RunSpec) -> None:
    await ledger.create_run(T, spec())
    with pytest.raises(errors.RunAlreadyExists):
        await ledger.create_run(T, other)
    view = await ledger.get_run(T, RUN)
    assert view.spec == spec()
    assert view.state.revision == 1


async def test_runs_are_per_tenant(ledger: Ledger) -> None:
    await ledger.create_run(T, spec())
    other = await ledger.create_run("globex", spec(limit=5))
    assert not other.replayed
    await ledger.reserve("globex", RUN, "r", 5, None)
    assert (await state(ledger)).reserved_micros == 0
    with pytest.raises(errors.RunNotFound):
        await ledger.get_run("initech", RUN)


async def test_get_run_reports_the_run(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    view = await ledger.get_run(T, RUN)
    assert view.spec == run
    assert view.default_ttl_ms == DEFAULT_TTL_MS
    assert view.state.revision == 1


def _unknown_run_ops(ledger: Ledger) -> list[Callable[[], Awaitable[Any]]]:
    return [
        lambda: ledger.get_run(T, "nope"),
        lambda: ledger.reserve(T, "nope", "r", 1, None),
        lambda: ledger.commit(T, "nope", "r", 1),
        lambda: ledger.refund(T, "nope", "r"),
        lambda: ledger.close_run(T, "nope"),
        lambda: ledger.read_changes(T, "nope", 0, 10),
    ]


@pytest.mark.parametrize(
    "index", range(6), ids=["get", "reserve", "commit", "refund", "close", "read"]
)
async def test_unknown_run_is_not_found(ledger: Ledger, run: RunSpec, index: int) -> None:
    with pytest.raises(errors.RunNotFound):
        await _unknown_run_ops(ledger)[index]()
    # The same run id under another tenant does not exist either.
    with pytest.raises(errors.RunNotFound):
        await ledger.reserve("globex", RUN, "r", 1, None)


# -- Reserve -----------------------------------------------------------------


async def test_reserve_allows_and_holds(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    result = await ledger.reserve(T, RUN, "r1", 400, 2_000)
    assert result.decision is Decision.ALLOW
    assert result.reason is DecisionReason.WITHIN_BUDGET
    assert result.reservation_id == "r1"
    assert result.held_micros == 400
    assert result.expires_ms == clock.now_ms() + 2_000
    assert not result.replayed
    assert result.state.reserved_micros == 400
    assert result.state.active_reservations == 1
    assert result.state.revision == 2
    assert result.state.remaining_micros == 600
    assert result.state == await state(ledger)


@pytest.mark.parametrize(
    ("run_ttl", "expected"), [(None, DEFAULT_TTL_MS), (7_000, 7_000)], ids=["server", "run"]
)
async def test_reserve_default_ttl(
    ledger: Ledger, clock: ManualClock, run_ttl: int | None, expected: int
) -> None:
    await ledger.create_run(T, spec(default_ttl_ms=run_ttl))
    result = await ledger.reserve(T, RUN, "r1", 1, None)
    assert result.expires_ms == clock.now_ms() + expected


@pytest.mark.parametrize(
    ("amount", "decision"),
    [(599, Decision.ALLOW), (600, Decision.ALLOW), (601, Decision.BLOCK)],
    ids=["below", "exact", "one-over"],
)
async def test_reserve_boundary(
    ledger: Ledger, run: RunSpec, amount: int, decision: Decision
) -> None:
    await ledger.reserve(T, RUN, "r1", 300, None)
    await ledger.commit(T, RUN, "r1", 100)  # committed 100
    await ledger.reserve(T, RUN, "r2", 300, None)  # reserved 300, remaining 600
    before = await state(ledger)
    assert before.remaining_micros == 600
    result = await ledger.reserve(T, RUN, "r3", amount, None)
    assert result.decision is decision
    assert not result.replayed
    if decision is Decision.ALLOW:
        assert result.state.revision == before.revision + 1
        assert result.state.reserved_micros == 300 + amount
    else:
        assert result.reason is DecisionReason.INSUFFICIENT_BUDGET
        assert result.held_micros == 0
        assert result.expires_ms is None
        # No money moves; the run is marked blocked by one BLOCKED change.
        assert result.state == dataclasses.replace(
            before, revision=before.revision + 1, blocked=True
        )


async def test_blocked_reserve_is_remembered(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "r1", 600, None)
    blocked = await ledger.reserve(T, RUN, "r2", 500, None)
    assert blocked.decision is Decision.BLOCK
    await ledger.refund(T, RUN, "r1")
    retry = await ledger.reserve(T, RUN, "r2", 500, None)
    assert retry.decision is Decision.BLOCK
    assert retry.reason is DecisionReason.INSUFFICIENT_BUDGET
    assert retry.replayed
    assert retry.state.reserved_micros == 0
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(T, RUN, "r2", 400, None)
    # A fresh id fits now.
    assert (await ledger.reserve(T, RUN, "r3", 500, None)).decision is Decision.ALLOW


async def test_reserve_after_close_is_blocked(ledger: Ledger, run: RunSpec) -> None:
    allowed = await ledger.reserve(T, RUN, "r1", 10, None)
    await ledger.close_run(T, RUN)
    blocked = await ledger.reserve(T, RUN, "r2", 10, None)
    assert blocked.decision is Decision.BLOCK
    assert blocked.reason is DecisionReason.RUN_CLOSED
    assert blocked.state.status is RunStatus.CLOSED
    # Closed takes precedence over insufficient budget.
    too_big = await ledger.reserve(T, RUN, "r3", LIMIT * 10, None)
    assert too_big.reason is DecisionReason.RUN_CLOSED
    # A reservation made before the close replays as it was.
    replay = await ledger.reserve(T, RUN, "r1", 10, None)
    assert replay.decision is Decision.ALLOW
    assert replay.replayed
    assert replay.expires_ms == allowed.expires_ms
    again = await ledger.reserve(T, RUN, "r2", 10, None)
    assert again.replayed
    assert again.reason is DecisionReason.RUN_CLOSED


async def test_reserve_replay(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    first = await ledger.reserve(T, RUN, "r1", 100, 5_000)
    clock.advance(1_000)
    replay = await ledger.reserve(T, RUN, "r1", 100, 5_000)
    assert replay.replayed
    assert (replay.decision, replay.reason, replay.held_micros, replay.expires_ms) == (
        first.decision,
        first.reason,
        first.held_micros,
        first.expires_ms,
    )
    assert replay.state == first.state
    # Replays after settlement still report the original decision.
    await ledger.commit(T, RUN, "r1", 50)
    settled = await ledger.reserve(T, RUN, "r1", 100, 5_000)
    assert settled.replayed
    assert settled.decision is Decision.ALLOW
    assert settled.state.committed_micros == 50


@pytest.mark.parametrize(
    ("amount", "ttl"),
    [(101, 5_000), (99, 5_000), (100, 5_001), (100, None)],
    ids=["more", "less", "ttl", "no-ttl"],
)
async def test_reserve_conflict(ledger: Ledger, run: RunSpec, amount: int, ttl: int | None) -> None:
    await ledger.reserve(T, RUN, "r1", 100, 5_000)
    before = await snapshot(ledger, T, RUN)
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(T, RUN, "r1", amount, ttl)
    assert await snapshot(ledger, T, RUN) == before


async def test_reserve_conflict_takes_precedence_over_close(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "r1", 100, None)
    await ledger.close_run(T, RUN)
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(T, RUN, "r1", 200, None)


async def test_reservation_ids_are_per_run(ledger: Ledger, run: RunSpec) -> None:
    await ledger.create_run(T, spec(run_id="run-2"))
    await ledger.reserve(T, RUN, "r1", 100, None)
    other = await ledger.reserve(T, "run-2", "r1", 200, None)
    assert not other.replayed
    assert other.held_micros == 200


# -- Commit ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actual", "overrun"),
    [(0, 0), (300, 0), (400, 0), (550, 150)],
    ids=["zero", "below", "at", "above"],
)
async def test_commit(
    ledger: Ledger, run: RunSpec, clock: ManualClock, actual: int, overrun: int
) -> None:
    await ledger.reserve(T, RUN, "other", 100, None)
    await ledger.reserve(T, RUN, "r1", 400, None)
    clock.advance(5)
    result = await ledger.commit(T, RUN, "r1", actual)
    assert result.reservation_status is ReservationStatus.COMMITTED
    assert (result.actual_micros, result.held_micros, result.overrun_micros) == (
        actual,
        400,
        overrun,
    )
    assert not result.replayed
    assert result.state.committed_micros == actual
    assert result.state.reserved_micros == 100
    assert result.state.overrun_micros == overrun
    assert result.state.active_reservations == 1
    assert result.state.revision == 4
    change = (await ledger.read_changes(T, RUN, 3, 10)).changes[0]
    assert change == Change(
        revision=4,
        type=EventType.COMMITTED,
        time_ms=clock.now_ms(),
        state=result.state,
        reservation_id="r1",
        amount_micros=400,
        actual_micros=actual,
        overrun_micros=overrun,
        late=False,
    )


async def test_commit_replay_and_conflict(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "r1", 400, None)
    first = await ledger.commit(T, RUN, "r1", 500)
    replay = await ledger.commit(T, RUN, "r1", 500)
    assert replay.replayed
    assert replay.state == first.state
    assert (replay.reservation_status, replay.actual_micros, replay.held_micros) == (
        ReservationStatus.COMMITTED,
        500,
        400,
    )
    assert replay.overrun_micros == 100
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.commit(T, RUN, "r1", 499)
    assert await state(ledger) == first.state


async def test_commit_after_refund_is_released(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "r1", 400, None)
    await ledger.refund(T, RUN, "r1")
    with pytest.raises(errors.ReservationReleased):
        await ledger.commit(T, RUN, "r1", 1)


async def test_settling_a_blocked_reservation_fails(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "big", LIMIT + 1, None)
    with pytest.raises(errors.ReservationBlocked):
        await ledger.commit(T, RUN, "big", 1)
    with pytest.raises(errors.ReservationBlocked):
        await ledger.refund(T, RUN, "big")


async def test_settling_an_unknown_reservation_fails(ledger: Ledger, run: RunSpec) -> None:
    with pytest.raises(errors.ReservationNotFound):
        await ledger.commit(T, RUN, "ghost", 1)
    with pytest.raises(errors.ReservationNotFound):
        await ledger.refund(T, RUN, "ghost")


# -- Refund ------------------------------------------------------------------


async def test_refund_and_replay(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "r1", 400, None)
    result = await ledger.refund(T, RUN, "r1")
    assert result.reservation_status is ReservationStatus.RELEASED
    assert result.released_micros == 400
    assert not result.replayed
    assert result.state.reserved_micros == 0
    assert result.state.active_reservations == 0
    assert result.state.revision == 3
    replay = await ledger.refund(T, RUN, "r1")
    assert replay.replayed
    assert replay.released_micros == 0
    assert replay.reservation_status is ReservationStatus.RELEASED
    assert replay.state == result.state


async def test_refund_after_commit_changes_nothing(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "r1", 400, None)
    committed = await ledger.commit(T, RUN, "r1", 300)
    result = await ledger.refund(T, RUN, "r1")
    assert result.replayed
    assert result.reservation_status is ReservationStatus.COMMITTED
    assert result.released_micros == 0
    assert result.state == committed.state


async def test_refund_after_expiry_changes_nothing(
    ledger: Ledger, run: RunSpec, clock: ManualClock
) -> None:
    await ledger.reserve(T, RUN, "r1", 400, 1_000)
    clock.advance(1_000)
    result = await ledger.refund(T, RUN, "r1")
    assert result.replayed
    assert result.reservation_status is ReservationStatus.EXPIRED
    assert result.released_micros == 0
    assert result.state.reserved_micros == 0
    assert result.state.revision == 3  # created, reserved, expired


# -- Expiry ------------------------------------------------------------------


async def test_expiry_is_due_at_exactly_expires_ms(
    ledger: Ledger, run: RunSpec, clock: ManualClock
) -> None:
    reserved = await ledger.reserve(T, RUN, "r1", 400, 1_000)
    clock.advance(999)
    assert (await state(ledger)).reserved_micros == 400
    clock.advance(1)
    assert clock.now_ms() == reserved.expires_ms
    after = await state(ledger)
    assert after.reserved_micros == 0
    assert after.active_reservations == 0
    assert after.revision == 3
    last = (await ledger.read_changes(T, RUN, 2, 10)).changes
    assert [(c.type, c.reservation_id, c.amount_micros, c.time_ms) for c in last] == [
        (EventType.EXPIRED, "r1", 400, clock.now_ms())
    ]


async def test_due_holds_are_released_before_a_decision(
    ledger: Ledger, run: RunSpec, clock: ManualClock
) -> None:
    await ledger.reserve(T, RUN, "r1", 400, 1_000)
    await ledger.reserve(T, RUN, "r2", 500, 2_000)
    clock.advance(1_500)
    # Without the lazy expiry of r1 there would be only 100 left.
    result = await ledger.reserve(T, RUN, "r3", 500, None)
    assert result.decision is Decision.ALLOW
    assert result.state.reserved_micros == 1_000
    changes = (await ledger.read_changes(T, RUN, 3, 10)).changes
    assert [(c.revision, c.type, c.reservation_id) for c in changes] == [
        (4, EventType.EXPIRED, "r1"),
        (5, EventType.RESERVED, "r3"),
    ]


async def test_sweep_releases_due_holds(ledger: Ledger, clock: ManualClock) -> None:
    for run_id in ("a", "b", "c"):
        await ledger.create_run(T, spec(run_id=run_id))
    await ledger.reserve(T, "a", "r1", 10, 1_000)
    await ledger.reserve(T, "a", "r2", 10, 1_000)
    await ledger.reserve(T, "b", "r1", 10, 1_000)
    await ledger.reserve(T, "c", "r1", 10, 10_000)
    assert await ledger.sweep(10) == 0
    clock.advance(1_000)
    first = await ledger.sweep(1)
    assert first in (1, 2)  # one run's holds
    assert first + await ledger.sweep(10) == 3
    assert await ledger.sweep(10) == 0
    assert await ledger.sweep(0) == 0
    for run_id, revision in (("a", 5), ("b", 3), ("c", 2)):
        assert (await head(ledger, run_id)).revision == revision
    assert (await head(ledger, "c")).reserved_micros == 10


async def test_sweep_wakes_watchers(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    await ledger.reserve(T, RUN, "r1", 10, 1_000)
    waiter = asyncio.create_task(ledger.wait_for_change(T, RUN, 2, 30))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.advance(1_000)
    assert await ledger.sweep(10) == 1
    await asyncio.wait_for(waiter, 5)


async def test_late_commit_is_recorded(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    await ledger.reserve(T, RUN, "r1", 400, 1_000)
    clock.advance(2_000)
    assert await ledger.sweep(10) == 1
    result = await ledger.commit(T, RUN, "r1", 300)
    assert result.reservation_status is ReservationStatus.LATE_COMMITTED
    assert (result.actual_micros, result.held_micros, result.overrun_micros) == (300, 400, 300)
    assert result.state.committed_micros == 300
    assert result.state.overrun_micros == 300
    assert result.state.reserved_micros == 0
    assert result.state.active_reservations == 0
    change = (await ledger.read_changes(T, RUN, 3, 10)).changes[0]
    assert (change.type, change.late, change.actual_micros, change.overrun_micros) == (
        EventType.COMMITTED,
        True,
        300,
        300,
    )
    replay = await ledger.commit(T, RUN, "r1", 300)
    assert replay.replayed
    assert replay.reservation_status is ReservationStatus.LATE_COMMITTED
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.commit(T, RUN, "r1", 301)


async def test_commit_of_a_due_hold_is_late(
    ledger: Ledger, run: RunSpec, clock: ManualClock
) -> None:
    await ledger.reserve(T, RUN, "r1", 400, 1_000)
    clock.advance(1_000)
    # No sweep: the commit itself finds the hold due, expires it, then records late.
    result = await ledger.commit(T, RUN, "r1", 100)
    assert result.reservation_status is ReservationStatus.LATE_COMMITTED
    assert result.overrun_micros == 100
    assert result.state.revision == 4


# -- CloseRun ----------------------------------------------------------------


async def test_close_run_is_idempotent(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    clock.advance(7)
    closed = await ledger.close_run(T, RUN)
    assert not closed.replayed
    assert closed.state.status is RunStatus.CLOSED
    assert closed.state.revision == 2
    clock.advance(7)
    again = await ledger.close_run(T, RUN)
    assert again.replayed
    assert again.state == closed.state
    view = await ledger.get_run(T, RUN)
    assert view.closed_ms == clock.now_ms() - 7


async def test_holds_settle_after_close(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    await ledger.reserve(T, RUN, "c", 100, None)
    await ledger.reserve(T, RUN, "r", 100, None)
    await ledger.reserve(T, RUN, "e", 100, 1_000)
    await ledger.close_run(T, RUN)
    assert (await ledger.commit(T, RUN, "c", 150)).state.committed_micros == 150
    assert (await ledger.refund(T, RUN, "r")).released_micros == 100
    clock.advance(1_000)
    assert await ledger.sweep(10) == 1
    final = await state(ledger)
    assert (final.reserved_micros, final.active_reservations, final.status) == (
        0,
        0,
        RunStatus.CLOSED,
    )


# -- Revisions and the change log -------------------------------------------


def _replay(changes: list[Change]) -> None:
    """Fold the log from CREATED and check every entry's state follows from it."""
    assert changes[0].type is EventType.CREATED
    current = changes[0].state
    assert (current.committed_micros, current.reserved_micros, current.revision) == (0, 0, 1)
    for change in changes[1:]:
        c = current
        committed, reserved, overrun = c.committed_micros, c.reserved_micros, c.overrun_micros
        active, status, blocked = c.active_reservations, c.status, c.blocked
        if change.type is EventType.RESERVED:
            reserved += change.amount_micros
            active += 1
            blocked = False
        elif change.type is EventType.BLOCKED:
            # Only the first block of a series is a change; it carries its verdict.
            assert not c.blocked
            assert change.reason is not None
            blocked = True
        elif change.type is EventType.COMMITTED:
            committed += change.actual_micros
            overrun += change.overrun_micros
            if not change.late:
                reserved -= change.amount_micros
                active -= 1
        elif change.type in (EventType.REFUNDED, EventType.EXPIRED):
            reserved -= change.amount_micros
            active -= 1
        elif change.type is EventType.CLOSED:
            status = RunStatus.CLOSED
        else:
            pytest.fail(f"unexpected {change.type}")
        current = BudgetState(
            run_id=c.run_id,
            limit_micros=c.limit_micros,
            committed_micros=committed,
            reserved_micros=reserved,
            revision=c.revision + 1,
            status=status,
            active_reservations=active,
            overrun_micros=overrun,
            blocked=blocked,
        )
        assert change.revision == current.revision
        assert change.state == current


async def _workload(ledger: Ledger, clock: ManualClock) -> None:
    await ledger.reserve(T, RUN, "a", 300, 1_000)
    await ledger.reserve(T, RUN, "b", 300, None)
    await ledger.reserve(T, RUN, "blocked", 900, None)
    await ledger.commit(T, RUN, "b", 350)
    clock.advance(1_000)
    await ledger.reserve(T, RUN, "c", 200, None)
    await ledger.commit(T, RUN, "a", 10)
    await ledger.refund(T, RUN, "c")
    await ledger.close_run(T, RUN)
    await ledger.reserve(T, RUN, "d", 1, None)


async def test_change_log_replays_to_the_final_state(
    ledger: Ledger, run: RunSpec, clock: ManualClock
) -> None:
    await _workload(ledger, clock)
    final = await state(ledger)
    page = await ledger.read_changes(T, RUN, 0, 1_000)
    assert (page.floor, page.head) == (1, final.revision)
    assert [c.revision for c in page.changes] == list(range(1, final.revision + 1))
    assert [c.type for c in page.changes] == [
        EventType.CREATED,
        EventType.RESERVED,
        EventType.RESERVED,
        EventType.BLOCKED,
        EventType.COMMITTED,
        EventType.EXPIRED,
        EventType.RESERVED,
        EventType.COMMITTED,
        EventType.REFUNDED,
        EventType.CLOSED,
        EventType.BLOCKED,
    ]
    _replay(page.changes)
    assert page.changes[-1].state == final
    assert final.committed_micros + final.reserved_micros <= LIMIT + final.overrun_micros


async def test_read_changes_pages(ledger: Ledger, run: RunSpec, clock: ManualClock) -> None:
    await _workload(ledger, clock)
    everything = (await ledger.read_changes(T, RUN, 0, 1_000)).changes
    page = await ledger.read_changes(T, RUN, 3, 2)
    assert page.changes == everything[3:5]
    assert (page.floor, page.head) == (1, 11)
    beyond = await ledger.read_changes(T, RUN, 11, 10)
    assert beyond.changes == []
    assert (beyond.floor, beyond.head) == (1, 11)
    assert (await ledger.read_changes(T, RUN, 50, 10)).changes == []


@pytest.mark.parametrize("kind", BACKENDS)
async def test_log_retention_trims_and_moves_the_floor(
    kind: str, tmp_path: Path, clock: ManualClock, request: pytest.FixtureRequest
) -> None:
    redis = redis_targets(request, kind)
    async with open_backend(kind, tmp_path, clock, log_retention=3, redis=redis) as ledger:
        await ledger.create_run(T, spec())
        page = await ledger.read_changes(T, RUN, 0, 10)
        assert (page.floor, page.head, len(page.changes)) == (1, 1, 1)
        for i in range(5):
            await ledger.reserve(T, RUN, f"r{i}", 1, None)
        page = await ledger.read_changes(T, RUN, 0, 10)
        assert (page.floor, page.head) == (4, 6)
        assert [c.revision for c in page.changes] == [4, 5, 6]
        assert page.changes[-1].state == await state(ledger)
        page = await ledger.read_changes(T, RUN, 5, 10)
        assert [c.revision for c in page.changes] == [6]
        assert page.floor == 4


# -- Failures change nothing -------------------------------------------------


def _failing_ops(ledger: Ledger) -> list[tuple[str, Callable[[], Awaitable[Any]], type[Exception]]]:
    return [
        (
            "reserve-conflict",
            lambda: ledger.reserve(T, RUN, "held", 1, None),
            errors.IdempotencyConflict,
        ),
        ("commit-conflict", lambda: ledger.commit(T, RUN, "done", 2), errors.IdempotencyConflict),
        ("commit-unknown", lambda: ledger.commit(T, RUN, "ghost", 1), errors.ReservationNotFound),
        ("refund-unknown", lambda: ledger.refund(T, RUN, "ghost"), errors.ReservationNotFound),
        ("commit-blocked", lambda: ledger.commit(T, RUN, "blocked", 1), errors.ReservationBlocked),
        ("refund-blocked", lambda: ledger.refund(T, RUN, "blocked"), errors.ReservationBlocked),
        (
            "commit-released",
            lambda: ledger.commit(T, RUN, "refunded", 1),
            errors.ReservationReleased,
        ),
        ("create-other", lambda: ledger.create_run(T, spec(limit=1)), errors.RunAlreadyExists),
    ]


@pytest.mark.parametrize("index", range(8))
async def test_failed_operations_change_nothing(
    ledger: Ledger, run: RunSpec, clock: ManualClock, index: int
) -> None:
    await ledger.reserve(T, RUN, "held", 100, None)
    await ledger.reserve(T, RUN, "done", 100, None)
    await ledger.commit(T, RUN, "done", 1)
    await ledger.reserve(T, RUN, "blocked", LIMIT, None)
    await ledger.reserve(T, RUN, "refunded", 100, None)
    await ledger.refund(T, RUN, "refunded")
    await ledger.reserve(T, RUN, "due", 100, 1_000)
    clock.advance(1_000)  # "due" is due but nothing expired it yet
    before = await snapshot(ledger, T, RUN)
    log = await ledger.read_changes(T, RUN, 0, 100)
    _name, op, error = _failing_ops(ledger)[index]
    with pytest.raises(error):
        await op()
    assert await snapshot(ledger, T, RUN) == before
    assert await ledger.read_changes(T, RUN, 0, 100) == log


# -- Watching ----------------------------------------------------------------


async def test_wait_for_change(ledger: Ledger, run: RunSpec) -> None:
    # Already past: returns at once.
    await asyncio.wait_for(ledger.wait_for_change(T, RUN, 0, 30), 5)
    # Nothing happens: times out quietly.
    await ledger.wait_for_change(T, RUN, 1, 0.01)
    waiter = asyncio.create_task(ledger.wait_for_change(T, RUN, 1, 30))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await ledger.reserve(T, RUN, "r1", 1, None)
    await asyncio.wait_for(waiter, 5)


async def test_ping(ledger: Ledger) -> None:
    await ledger.ping()


async def test_due_holds_expire_in_expiry_order(
    ledger: Ledger, run: RunSpec, clock: ManualClock
) -> None:
    await ledger.reserve(T, RUN, "z", 1, 500)
    await ledger.reserve(T, RUN, "b", 1, 1_000)
    await ledger.reserve(T, RUN, "a", 1, 1_000)
    clock.advance(1_000)
    await ledger.get_run(T, RUN)
    changes = (await ledger.read_changes(T, RUN, 4, 10)).changes
    assert [(c.type, c.reservation_id, c.state.reserved_micros) for c in changes] == [
        (EventType.EXPIRED, "z", 2),
        (EventType.EXPIRED, "a", 1),
        (EventType.EXPIRED, "b", 0),
    ]


async def test_concurrent_reserves_never_oversell(ledger: Ledger, run: RunSpec) -> None:
    results = await asyncio.gather(*(ledger.reserve(T, RUN, f"r{i}", 30, None) for i in range(60)))
    allowed = [r for r in results if r.decision is Decision.ALLOW]
    assert len(allowed) == LIMIT // 30
    view = await ledger.get_run(T, RUN)
    final = view.state
    assert final.reserved_micros == 30 * len(allowed)
    # One change per allow, then one BLOCKED for the whole series of blocks.
    assert final.revision == 1 + len(allowed) + 1
    assert final.blocked
    assert view.blocked_calls == 60 - len(allowed)
    # Revisions were handed out one per allow, without gaps or repeats.
    assert sorted(r.state.revision for r in allowed) == list(range(2, 2 + len(allowed)))


async def test_the_digest_chains_every_change(ledger: Ledger, run: RunSpec) -> None:
    await ledger.reserve(T, RUN, "a", 10, None)
    await ledger.commit(T, RUN, "a", 12)
    await ledger.reserve(T, RUN, "b", 5, None)
    await ledger.refund(T, RUN, "b")
    await ledger.close_run(T, RUN)
    page = await ledger.read_changes(T, RUN, 0, 100)
    digest = ""
    for change in page.changes:
        digest = chain_digest(
            digest,
            change.revision,
            change.type,
            change.reservation_id,
            change.amount_micros,
            change.actual_micros,
            change.overrun_micros,
            change.late,
        )
        assert change.state.digest == digest
    assert len({c.state.digest for c in page.changes}) == len(page.changes)
    assert (await ledger.get_run(T, RUN)).state.digest == digest
    # The same history elsewhere has the same digest; a different one does not.
    await ledger.create_run(T, spec("twin"))
    await ledger.create_run(T, spec("other"))
    await ledger.reserve(T, "twin", "a", 10, None)
    await ledger.reserve(T, "other", "a", 11, None)
    twin, other = (await ledger.get_run(T, "twin")).state, (await ledger.get_run(T, "other")).state
    assert twin.digest == page.changes[1].state.digest
    assert other.digest != twin.digest
