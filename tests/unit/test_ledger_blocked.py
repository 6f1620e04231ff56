"""Blocked calls on every backend: the BLOCKED change, the blocked mark and the count.

A run that hits its wall gets one BLOCKED change (the mark in its state turns
true), however many Reserves are blocked after it; each one counts in the
run's blocked_calls, without a revision. The next Reserve that holds money
clears the mark (in its RESERVED change), so the next block is a BLOCKED
change again. Same backends and fixtures as the ledger conformance suite
(tests/ledger_backends.py): the model, SQLite, Redis standalone and cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from runcap_server import errors
from runcap_server.backends.sqlite import SCHEMA_VERSION
from runcap_server.clock import ManualClock
from runcap_server.ledger.saga import ReserveExtras
from runcap_server.ledger.types import (
    Change,
    Decision,
    DecisionReason,
    Dimension,
    EnforcementMode,
    EventType,
    Period,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunView,
    ScopeKind,
    ScopeRef,
    block_text,
    chain_digest,
)
from runcap_server.prices import Rates, estimate_micros
from tests.ledger_backends import Ledger, open_backend, snapshot

T = "acme"
RUN = "run"
USD = 1_000_000
SELF = ScopeRef(ScopeKind.RUN, RUN)
TEAM = ScopeRef(ScopeKind.TEAM, "core")


def spec(
    run_id: str = RUN,
    limit: int = 5 * USD,
    *,
    parent: str = "",
    team: str = "",
    policy: RunPolicy | None = None,
) -> RunSpec:
    return RunSpec(run_id, limit, {}, None, parent_run_id=parent, team_id=team, policy=policy)


async def view(ledger: Ledger, run_id: str = RUN) -> RunView:
    return await ledger.get_run(T, run_id)


async def changes(ledger: Ledger, run_id: str = RUN, kind: EventType | None = None) -> list[Change]:
    page = await ledger.read_changes(T, run_id, 0, 100_000)
    return [c for c in page.changes if kind is None or c.type is kind]


def verdict(change: Change) -> tuple[object, ...]:
    """What a BLOCKED change says about its block."""
    return (
        change.reservation_id,
        change.amount_micros,
        change.reason,
        change.blocking_scope,
        change.blocking_period,
        change.dimension,
        change.meter,
    )


async def reserve_many(ledger: Ledger, ids: list[str], amount: int) -> list[ReserveResult]:
    """Reserves issued concurrently, 100 at a time."""
    results: list[ReserveResult] = []
    for start in range(0, len(ids), 100):
        batch = ids[start : start + 100]
        results += await asyncio.gather(*(ledger.reserve(T, RUN, i, amount, None) for i in batch))
    return results


async def test_a_run_at_its_wall_is_one_change_for_a_thousand_blocks(ledger: Ledger) -> None:
    await ledger.create_run(T, spec())
    await ledger.reserve(T, RUN, "spent", 4_980_000, None)
    await ledger.commit(T, RUN, "spent", 4_980_000)  # $4.98 of $5.00: still below the stop
    before = await view(ledger)
    # Created, reserved, committed, and the info, warn and throttle thresholds crossed.
    assert (before.state.revision, before.state.blocked, before.blocked_calls) == (6, False, 0)

    first = await ledger.reserve(T, RUN, "next", 100_000, None)  # the next step does not fit
    assert (first.decision, first.reason) == (Decision.BLOCK, DecisionReason.INSUFFICIENT_BUDGET)
    assert (first.state.revision, first.state.blocked) == (7, True)
    loop = await reserve_many(ledger, [f"loop-{i}" for i in range(1_000)], 100_000)
    assert {r.decision for r in loop} == {Decision.BLOCK}
    assert {r.state.revision for r in loop} == {7}  # the count moves, the revision does not

    after = await view(ledger)
    assert (after.state.revision, after.state.blocked, after.blocked_calls) == (7, True, 1_001)
    assert after.state.committed_micros == 4_980_000
    (blocked,) = await changes(ledger, kind=EventType.BLOCKED)
    assert verdict(blocked) == (
        "next",
        100_000,
        DecisionReason.INSUFFICIENT_BUDGET,
        SELF,
        Period.LIFETIME,
        Dimension.SPEND,
        "",
    )
    assert blocked.revision == 7
    assert blocked.state == after.state
    # Stored as they were counted (the stateful tests compare every backend's rows).
    account, _ = await snapshot(ledger, T, RUN)
    assert account is not None
    assert (account.blocked, account.blocked_calls) == (True, 1_001)


async def test_holding_money_again_clears_the_mark_and_the_next_block_is_a_change(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, spec(limit=1_000))
    await ledger.reserve(T, RUN, "big", 990, None)
    assert (await ledger.reserve(T, RUN, "b1", 100, None)).state.blocked
    assert (await ledger.reserve(T, RUN, "b2", 100, None)).decision is Decision.BLOCK
    await ledger.refund(T, RUN, "big")
    refunded = await view(ledger)
    assert (refunded.state.blocked, refunded.blocked_calls) == (True, 2)  # a refund holds nothing

    small = await ledger.reserve(T, RUN, "small", 10, None)
    assert (small.decision, small.state.blocked) == (Decision.ALLOW, False)
    again = await ledger.reserve(T, RUN, "b3", 991, None)
    assert (again.decision, again.state.blocked) == (Decision.BLOCK, True)

    marks = [
        (c.type, c.reservation_id, c.state.blocked)
        for c in await changes(ledger)
        if c.type in (EventType.BLOCKED, EventType.RESERVED)
    ]
    assert marks == [
        (EventType.RESERVED, "big", False),
        (EventType.BLOCKED, "b1", True),
        (EventType.RESERVED, "small", False),
        (EventType.BLOCKED, "b3", True),
    ]
    assert (await view(ledger)).blocked_calls == 3


async def test_a_retried_block_counts_once(ledger: Ledger) -> None:
    await ledger.create_run(T, spec(limit=100))
    first = await ledger.reserve(T, RUN, "x", 500, None)
    retries = await asyncio.gather(*(ledger.reserve(T, RUN, "x", 500, None) for _ in range(20)))
    assert not first.replayed
    assert all(r.replayed and r.decision is Decision.BLOCK for r in retries)
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(T, RUN, "x", 501, None)  # a conflict is no block either
    current = await view(ledger)
    assert (current.state.revision, current.blocked_calls) == (2, 1)
    assert len(await changes(ledger, kind=EventType.BLOCKED)) == 1


async def test_a_parent_scope_ceiling_blocks_count_on_the_run_not_its_parents(
    ledger: Ledger,
) -> None:
    await ledger.set_scope_limit(T, TEAM, Period.DAILY, 1_000)
    await ledger.create_run(T, spec("root", team="core"))
    await ledger.create_run(T, spec(RUN, parent="root"))
    await ledger.reserve(T, RUN, "held", 900, None)
    blocked = await ledger.reserve(T, RUN, "over", 200, None)  # fits the runs, not the team
    assert (blocked.decision, blocked.blocking_scope) == (Decision.BLOCK, TEAM)
    (change,) = await changes(ledger, kind=EventType.BLOCKED)
    assert verdict(change) == (
        "over",
        200,
        DecisionReason.INSUFFICIENT_BUDGET,
        TEAM,
        Period.DAILY,
        Dimension.SPEND,
        "",
    )
    run, root = await view(ledger), await view(ledger, "root")
    assert (run.state.blocked, run.blocked_calls) == (True, 1)
    # The root held "over" for its descendant and released it: no block of its own.
    assert (root.state.blocked, root.blocked_calls) == (False, 0)
    assert await changes(ledger, "root", EventType.BLOCKED) == []

    # A higher team ceiling lets a Reserve hold money again: the mark clears.
    await ledger.set_scope_limit(T, TEAM, Period.DAILY, 2_000)
    assert not (await ledger.reserve(T, RUN, "fits", 200, None)).state.blocked
    # An ancestor run's ceiling blocks the same way, named as the blocking scope.
    await ledger.create_run(T, spec("tight", 300))
    await ledger.create_run(T, spec("kid", parent="tight"))
    await ledger.reserve(T, "kid", "k1", 301, None)
    (kid,) = await changes(ledger, "kid", EventType.BLOCKED)
    assert (kid.blocking_scope, kid.dimension) == (
        ScopeRef(ScopeKind.RUN, "tight"),
        Dimension.SPEND,
    )
    assert (
        (await view(ledger, "kid")).blocked_calls,
        (await view(ledger, "tight")).blocked_calls,
    ) == (
        1,
        0,
    )


async def test_a_suspended_or_closed_run_counts_its_blocks(ledger: Ledger) -> None:
    await ledger.create_run(T, spec())
    await ledger.suspend_run(T, RUN)
    suspended = await ledger.reserve(T, RUN, "s1", 1, None)
    await ledger.reserve(T, RUN, "s2", 1, None)
    assert (suspended.decision, suspended.reason) == (Decision.BLOCK, DecisionReason.SUSPENDED)
    (change,) = await changes(ledger, kind=EventType.BLOCKED)
    # No limit blocked it: no dimension.
    assert verdict(change) == ("s1", 1, DecisionReason.SUSPENDED, SELF, Period.LIFETIME, None, "")
    await ledger.resume_run(T, RUN)
    await ledger.close_run(T, RUN)
    await ledger.reserve(T, RUN, "c1", 1, None)
    current = await view(ledger)
    # Resuming and closing hold nothing: still one series of blocks, one change.
    assert (current.state.blocked, current.blocked_calls) == (True, 3)
    assert len(await changes(ledger, kind=EventType.BLOCKED)) == 1


async def test_unknown_prices_and_denied_approvals_count_throttles_and_requests_do_not(
    ledger: Ledger,
) -> None:
    policy = RunPolicy(rate_limit=(1, 60_000), approved_meters=("tool:ok",))
    await ledger.create_run(T, spec(policy=policy))
    unknown = ReserveExtras(fingerprint="llm:x", pricing="", preblock=DecisionReason.UNKNOWN_PRICE)
    priceless = await ledger.reserve(T, RUN, "p1", 10, None, unknown)
    assert (priceless.decision, priceless.blocking_scope) == (Decision.BLOCK, None)
    (change,) = await changes(ledger, kind=EventType.BLOCKED)
    assert verdict(change) == ("p1", 10, DecisionReason.UNKNOWN_PRICE, None, None, None, "")

    assert (await ledger.reserve(T, RUN, "ok", 10, None)).decision is Decision.ALLOW
    throttled = await ledger.reserve(T, RUN, "t1", 10, None)  # the rate limit: 1 per minute
    assert throttled.decision is Decision.THROTTLE
    meter = ReserveExtras(meter="tool:x", meter_units=1)
    asked = await ledger.reserve(T, RUN, "m1", 10, None, meter)
    assert asked.decision is Decision.APPROVAL_REQUIRED
    assert ((await view(ledger)).state.blocked, (await view(ledger)).blocked_calls) == (False, 1)

    await ledger.resolve_approval(T, RUN, "m:tool:x", False)
    denied = await ledger.reserve(T, RUN, "m2", 10, None, meter)
    assert (denied.decision, denied.reason) == (Decision.BLOCK, DecisionReason.APPROVAL_DENIED)
    last = (await changes(ledger, kind=EventType.BLOCKED))[-1]
    assert verdict(last) == (
        "m2",
        10,
        DecisionReason.APPROVAL_DENIED,
        SELF,
        None,
        Dimension.METER,
        "tool:x",
    )
    assert (await view(ledger)).blocked_calls == 2


async def test_an_advisory_warning_holds_and_is_no_block(ledger: Ledger) -> None:
    advisory = RunPolicy(mode=EnforcementMode.ADVISORY)
    await ledger.create_run(T, spec(limit=100, policy=advisory))
    warned = await ledger.reserve(T, RUN, "w", 500, None)
    assert warned.decision is Decision.WARN
    current = await view(ledger)
    assert (current.state.blocked, current.blocked_calls) == (False, 0)
    assert await changes(ledger, kind=EventType.BLOCKED) == []


# An LLM call priced like the server prices one (estimates.Estimate.pricing).
RATES = Rates(1_000_000, 4_000_000, 0, 0, 0)


def llm_call(input_tokens: int, max_output: int, *, downgrade: bool = False) -> ReserveExtras:
    return ReserveExtras(
        fingerprint=f"llm:acme:big:{input_tokens}:{max_output}",
        pricing=f"v1#{RATES.encode()}#{max_output}#acme#big#{input_tokens}",
        tokens=input_tokens + max_output,
        downgrade=downgrade,
    )


async def test_a_block_the_server_may_downgrade_counts_only_once_answered_as_a_block(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, spec(limit=1_000, policy=RunPolicy(auto_downgrade=True)))
    amount = estimate_micros(RATES, 100, 400)  # 1,700 micro-USD: over the limit
    blocked = await ledger.reserve(T, RUN, "call", amount, None, llm_call(100, 400))
    assert blocked.decision is Decision.BLOCK
    assert not blocked.state.blocked
    assert ((await view(ledger)).blocked_calls, await changes(ledger, kind=EventType.BLOCKED)) == (
        0,
        [],
    )
    # The downgrade's own hold does not fit either: it never counts, the call does.
    stand_in = await ledger.reserve(T, RUN, "dg", amount, None, llm_call(100, 400, downgrade=True))
    assert stand_in.decision is Decision.BLOCK
    state = await ledger.count_block(T, RUN, "call")
    assert (state.blocked, state.revision) == (True, 2)
    assert await ledger.count_block(T, RUN, "call") == state  # idempotent
    assert await ledger.count_block(T, RUN, "dg") == state  # a downgrade's hold: nothing to count
    (change,) = await changes(ledger, kind=EventType.BLOCKED)
    assert verdict(change) == (
        "call",
        amount,
        DecisionReason.INSUFFICIENT_BUDGET,
        SELF,
        Period.LIFETIME,
        Dimension.SPEND,
        "",
    )
    assert (await view(ledger)).blocked_calls == 1
    with pytest.raises(errors.ReservationNotFound):
        await ledger.count_block(T, RUN, "ghost")
    with pytest.raises(errors.RunNotFound):
        await ledger.count_block(T, "ghost", "call")
    # Without auto_downgrade, the same call counts at once.
    await ledger.create_run(T, spec("plain", limit=1_000))
    await ledger.reserve(T, "plain", "call", amount, None, llm_call(100, 400))
    assert (await view(ledger, "plain")).blocked_calls == 1


async def test_the_digest_covers_the_block(ledger: Ledger) -> None:
    await ledger.create_run(T, spec(limit=100))
    await ledger.reserve(T, RUN, "x", 500, None)
    await ledger.create_run(T, spec("twin", limit=100))
    await ledger.suspend_run(T, "twin")
    await ledger.resume_run(T, "twin")
    created, blocked = await changes(ledger)
    _, reservations = await snapshot(ledger, T, RUN)
    expected = chain_digest(
        created.state.digest,
        2,
        EventType.BLOCKED,
        "x",
        500,
        0,
        0,
        False,
        block=block_text(reservations[0]),
    )
    assert blocked.state.digest == expected
    # Another verdict on the same amount is another history.
    other = dataclasses.replace(reservations[0], reason=DecisionReason.SUSPENDED)
    assert expected != chain_digest(
        created.state.digest, 2, EventType.BLOCKED, "x", 500, 0, 0, False, block=block_text(other)
    )


async def test_a_version_7_ledger_gains_blocked_calls(tmp_path: Path, clock: ManualClock) -> None:
    async with open_backend("sqlite", tmp_path, clock) as ledger:
        await ledger.create_run(T, spec(limit=100))
        await ledger.reserve(T, RUN, "old", 500, None)
    # Back to version 7: the block was stored, never counted, and logged nothing.
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        for table, column in (
            ("runs", "blocked"),
            ("runs", "blocked_calls"),
            ("reservations", "uncounted"),
            *(
                ("changes", c)
                for c in ("state_blocked", "reason", "blocking_scope", "blocking_period")
            ),
            ("changes", "dimension"),
            ("changes", "meter"),
        ):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("DELETE FROM changes WHERE type = ?", (int(EventType.BLOCKED),))
        conn.execute(
            "UPDATE runs SET revision = 1, "
            "digest = (SELECT state_digest FROM changes WHERE revision = 1)"
        )
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    async with open_backend("sqlite", tmp_path, clock) as ledger:
        migrated = await view(ledger)
        assert (migrated.state.revision, migrated.state.blocked, migrated.blocked_calls) == (
            1,
            False,
            0,
        )
        assert (await ledger.reserve(T, RUN, "old", 500, None)).replayed
        assert (await ledger.reserve(T, RUN, "new", 500, None)).state.blocked
        assert (await view(ledger)).blocked_calls == 1
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()
