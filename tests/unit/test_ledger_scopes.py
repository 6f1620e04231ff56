"""Parent scopes behave the same on every backend: subagent runs, API keys, users, teams.

A run's reservation is held on its ancestor runs and on its scopes too (the
reserve saga, ledger/saga.py), settles on all of them, and is blocked by the
first of them without room. Same backends and fixtures as the ledger
conformance suite (tests/ledger_backends.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import runcap_server
from runcap_server import errors
from runcap_server.clock import ManualClock
from runcap_server.ledger.saga import PARENT_HOLD_GRACE_MS
from runcap_server.ledger.scopes import (
    DAY_MS,
    PRUNE_BATCH,
    SETTLED_HOLD_RETENTION_MS,
    ScopeUsage,
)
from runcap_server.ledger.types import (
    MAX_MICROS,
    MAX_RUN_DEPTH,
    BudgetState,
    Decision,
    DecisionReason,
    EventType,
    Lineage,
    Period,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
    ScopeKind,
    ScopeRef,
)
from tests.ledger_backends import Ledger, scope_hold_ids, snapshot

T = "acme"
SCRIPTS = Path(runcap_server.__file__).parent / "backends" / "redis_scripts"
BIG = 1_000_000
TEAM = ScopeRef(ScopeKind.TEAM, "core")
KEY = ScopeRef(ScopeKind.API_KEY, "key-1")
ROOT = ScopeRef(ScopeKind.RUN, "root")
LIFETIME, DAILY, MONTHLY = Period.LIFETIME, Period.DAILY, Period.MONTHLY

# ManualClock starts at 2023-11-14T22:13:20Z.
START = 1_700_000_000_000
NOV_14 = 1_699_920_000_000
NOV_15 = 1_700_006_400_000
NOV_1 = 1_698_796_800_000
DEC_1 = 1_701_388_800_000
JAN_1 = 1_704_067_200_000


def spec(
    run_id: str,
    limit: int = BIG,
    *,
    parent: str = "",
    key: str = "",
    user: str = "",
    team: str = "",
    default_ttl_ms: int | None = None,
) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        limit_micros=limit,
        labels={},
        default_ttl_ms=default_ttl_ms,
        parent_run_id=parent,
        api_key_id=key,
        user_id=user,
        team_id=team,
    )


async def state(ledger: Ledger, run_id: str) -> BudgetState:
    return (await ledger.get_run(T, run_id)).state


async def usage(ledger: Ledger, ref: ScopeRef, period: Period = LIFETIME) -> ScopeUsage:
    return (await ledger.get_scope(T, ref)).period(period)


def money(of: BudgetState | ScopeUsage) -> tuple[int, int, int, int]:
    """(committed, reserved, overrun, active)."""
    return (of.committed_micros, of.reserved_micros, of.overrun_micros, of.active_reservations)


async def log(ledger: Ledger, run_id: str) -> list[tuple[EventType, str, int, int, int]]:
    """The run's changes as (type, reservation id, amount, actual, overrun)."""
    page = await ledger.read_changes(T, run_id, 0, 1_000)
    return [
        (c.type, c.reservation_id, c.amount_micros, c.actual_micros, c.overrun_micros)
        for c in page.changes
    ]


def blocked_by(result: ReserveResult) -> tuple[Decision, DecisionReason, ScopeRef | None, Period]:
    assert result.held_micros == 0
    assert result.expires_ms is None
    assert result.blocking_period is not None
    return (result.decision, result.reason, result.blocking_scope, result.blocking_period)


async def block(
    ledger: Ledger, run_id: str, reservation_id: str, amount: int
) -> tuple[Decision, DecisionReason, ScopeRef | None, Period]:
    return blocked_by(await ledger.reserve(T, run_id, reservation_id, amount, None))


def allowed(result: ReserveResult) -> bool:
    return (
        result.decision is Decision.ALLOW
        and result.reason is DecisionReason.WITHIN_BUDGET
        and result.blocking_scope is None
        and result.blocking_period is None
    )


def window(of: ScopeUsage) -> tuple[int | None, int | None]:
    return (of.window_start_ms, of.window_end_ms)


def run_ref(run_id: str) -> ScopeRef:
    return ScopeRef(ScopeKind.RUN, run_id)


INSUFFICIENT = (Decision.BLOCK, DecisionReason.INSUFFICIENT_BUDGET)
CLOSED = (Decision.BLOCK, DecisionReason.RUN_CLOSED)


# -- CreateRun under a parent -------------------------------------------------


async def test_a_child_inherits_its_parents_lineage(ledger: Ledger, clock: ManualClock) -> None:
    await ledger.create_run(T, spec("root", key="key-1", user="ann", team="core"))
    child_spec = spec("child", 500, parent="root", user="bob", default_ttl_ms=5_000)
    created = await ledger.create_run(T, child_spec)
    assert not created.replayed
    view = created.run
    assert view.lineage == Lineage(("root",), "key-1", "bob", "core", depth_left=4)
    assert (view.default_ttl_ms, view.created_ms, view.closed_ms) == (5_000, START, None)
    assert (view.state.limit_micros, view.state.revision) == (500, 1)

    grand = await ledger.create_run(T, spec("grand", parent="child", team="labs"))
    assert grand.run.lineage == Lineage(("child", "root"), "key-1", "bob", "labs", depth_left=3)
    assert grand.run.lineage.parents() == (
        run_ref("child"),
        ROOT,
        KEY,
        ScopeRef(ScopeKind.USER, "bob"),
        ScopeRef(ScopeKind.TEAM, "labs"),
    )
    assert (await ledger.get_run(T, "grand")).lineage == grand.run.lineage
    root = await ledger.get_run(T, "root")
    assert root.lineage == Lineage((), "key-1", "ann", "core", depth_left=5)
    assert root.state.revision == 1  # a child's creation is no change of its parent


async def test_a_run_keeps_its_parent_fields_as_given(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("root", key="key-1", team="core"))
    child_spec = spec("child", parent="root", user="bob")
    assert (await ledger.create_run(T, child_spec)).run.spec == child_spec
    assert (await ledger.get_run(T, "child")).spec == child_spec  # nothing inherited


async def test_create_child_replays_and_conflicts(ledger: Ledger, clock: ManualClock) -> None:
    await ledger.create_run(T, spec("root", team="core"))
    await ledger.create_run(T, spec("other", team="core"))
    first = await ledger.create_run(T, spec("child", parent="root"))
    clock.advance(10)
    await ledger.close_run(T, "root")
    # A replay: the parent's close since then does not matter.
    again = await ledger.create_run(T, spec("child", parent="root"))
    assert again.replayed
    assert again.run == first.run
    for other in (
        spec("child", parent="other"),
        spec("child"),
        spec("child", parent="root", team="core"),  # the same team, but given: other args
    ):
        with pytest.raises(errors.RunAlreadyExists):
            await ledger.create_run(T, other)
    view = await ledger.get_run(T, "child")
    assert view.lineage == Lineage(("root",), team_id="core", depth_left=4)
    assert view.state.revision == 1


async def test_create_under_a_missing_or_closed_parent_fails(ledger: Ledger) -> None:
    with pytest.raises(errors.ParentRunNotFound):
        await ledger.create_run(T, spec("child", parent="root"))
    await ledger.create_run("globex", spec("root"))
    with pytest.raises(errors.ParentRunNotFound):  # parents are per tenant
        await ledger.create_run(T, spec("child", parent="root"))
    await ledger.create_run(T, spec("root"))
    await ledger.close_run(T, "root")
    with pytest.raises(errors.ParentRunClosed):
        await ledger.create_run(T, spec("child", parent="root"))
    with pytest.raises(errors.RunNotFound):
        await ledger.get_run(T, "child")
    # The failures kept nothing: the id is free, the parent unchanged.
    assert not (await ledger.create_run(T, spec("child"))).replayed
    assert (await state(ledger, "root")).revision == 2


async def test_runs_nest_at_most_max_depth(ledger: Ledger) -> None:
    deepest_policy = RunPolicy(max_depth=MAX_RUN_DEPTH - 1)
    await ledger.create_run(T, dataclasses.replace(spec("r0"), policy=deepest_policy))
    for i in range(1, MAX_RUN_DEPTH):
        await ledger.create_run(T, spec(f"r{i}", parent=f"r{i - 1}"))
    deepest = f"r{MAX_RUN_DEPTH - 1}"
    ancestors = tuple(f"r{i}" for i in reversed(range(MAX_RUN_DEPTH - 1)))
    assert (await ledger.get_run(T, deepest)).lineage.ancestors == ancestors
    with pytest.raises(errors.SubagentLimit, match="max_depth"):
        await ledger.create_run(T, spec("too-deep", parent=deepest))
    with pytest.raises(errors.RunNotFound):
        await ledger.get_run(T, "too-deep")
    # The deepest run's reservation is held on all of its ancestors.
    assert allowed(await ledger.reserve(T, deepest, "x", 7, None))
    for run_id in ancestors:
        assert money(await state(ledger, run_id)) == (0, 7, 0, 1)


# -- A team's ceiling, shared by its runs -------------------------------------


async def test_a_team_ceiling_is_shared_by_its_runs(ledger: Ledger) -> None:
    view = await ledger.set_scope_limit(T, TEAM, LIFETIME, 1_000)
    assert view.ref == TEAM
    lifetime = view.period(LIFETIME)
    assert (lifetime.limit_micros, lifetime.remaining_micros) == (1_000, 1_000)
    assert view.period(DAILY).limit_micros is None
    for run_id in ("a", "b"):
        await ledger.create_run(T, spec(run_id, 10_000, team="core"))

    assert allowed(await ledger.reserve(T, "a", "r", 600, None))
    for period in Period:  # counted in every window, with a ceiling or without
        assert money(await usage(ledger, TEAM, period)) == (0, 600, 0, 1)

    blocked = await ledger.reserve(T, "b", "r", 500, None)  # fits b, not the team
    assert blocked_by(blocked) == (*INSUFFICIENT, TEAM, LIFETIME)
    assert blocked.state.reserved_micros == 0
    assert (blocked.state.revision, blocked.state.blocked) == (2, True)  # one BLOCKED change
    assert money(await usage(ledger, TEAM)) == (0, 600, 0, 1)

    assert allowed(await ledger.reserve(T, "b", "r2", 400, None))  # exactly the ceiling
    team = await usage(ledger, TEAM)
    assert (money(team), team.remaining_micros) == ((0, 1_000, 0, 2), 0)

    committed = await ledger.commit(T, "a", "r", 700)
    assert (committed.held_micros, committed.overrun_micros) == (600, 100)
    for period in Period:
        assert money(await usage(ledger, TEAM, period)) == (700, 400, 100, 1)

    assert (await ledger.refund(T, "b", "r2")).released_micros == 400
    team = await usage(ledger, TEAM)
    assert (money(team), team.remaining_micros) == ((700, 0, 100, 0), 300)
    assert money(await state(ledger, "a")) == (700, 0, 100, 0)
    assert money(await state(ledger, "b")) == (0, 0, 0, 0)


async def test_a_block_leaves_nothing_held_on_any_parent(ledger: Ledger) -> None:
    await ledger.set_scope_limit(T, TEAM, DAILY, 100)
    await ledger.create_run(T, spec("root", 10_000))
    await ledger.create_run(T, spec("child", 100_000, parent="root", key="key-1", team="core"))

    team_block = await ledger.reserve(T, "child", "r1", 150, None)
    assert blocked_by(team_block) == (*INSUFFICIENT, TEAM, DAILY)
    # The root and the team both block r2: the first in parents() order is named.
    root_block = await ledger.reserve(T, "child", "r2", 20_000, None)
    assert blocked_by(root_block) == (*INSUFFICIENT, ROOT, LIFETIME)
    # The run's own verdict comes before every parent's.
    own_block = await ledger.reserve(T, "child", "r3", 200_000, None)
    assert blocked_by(own_block) == (*INSUFFICIENT, run_ref("child"), LIFETIME)

    # The root held r1 first, then released it; it blocked r2 and r3 itself.
    assert await log(ledger, "root") == [
        (EventType.CREATED, "", 0, 0, 0),
        (EventType.RESERVED, "child/r1", 150, 0, 0),
        (EventType.REFUNDED, "child/r1", 150, 0, 0),
    ]
    assert money(await state(ledger, "root")) == (0, 0, 0, 0)
    assert money(await state(ledger, "child")) == (0, 0, 0, 0)
    for ref in (KEY, TEAM):
        for period in Period:
            assert money(await usage(ledger, ref, period)) == (0, 0, 0, 0)


async def test_team_holds_expire_a_grace_after_the_run(ledger: Ledger, clock: ManualClock) -> None:
    await ledger.set_scope_limit(T, TEAM, LIFETIME, 1_000)
    await ledger.create_run(T, spec("a", 10_000, team="core"))
    result = await ledger.reserve(T, "a", "r", 600, 1_000)
    assert result.expires_ms == START + 1_000

    clock.advance(1_000)
    assert await ledger.sweep(10) == 1  # the run's hold; the team's is not due yet
    assert money(await state(ledger, "a")) == (0, 0, 0, 0)
    clock.advance(PARENT_HOLD_GRACE_MS - 1)
    assert money(await usage(ledger, TEAM)) == (0, 600, 0, 1)
    clock.advance(1)
    assert await ledger.sweep(0) == 0
    assert await ledger.sweep(10) == 1
    team = await usage(ledger, TEAM)
    assert (money(team), team.remaining_micros) == ((0, 0, 0, 0), 1_000)

    # A late commit still charges the team: the run's record is the truth.
    late = await ledger.commit(T, "a", "r", 500)
    assert late.reservation_status is ReservationStatus.LATE_COMMITTED
    assert late.overrun_micros == 500
    assert money(await usage(ledger, TEAM)) == (500, 0, 500, 0)

    # Without a sweep, the next decision releases a due team hold first.
    assert allowed(await ledger.reserve(T, "a", "s", 500, 1_000))
    clock.advance(1_000 + PARENT_HOLD_GRACE_MS)
    assert allowed(await ledger.reserve(T, "a", "t", 500, None))
    assert money(await usage(ledger, TEAM)) == (500, 500, 500, 1)


# -- Daily, monthly and lifetime ceilings --------------------------------------


async def test_daily_monthly_and_lifetime_ceilings(ledger: Ledger, clock: ManualClock) -> None:
    await ledger.set_scope_limit(T, TEAM, DAILY, 1_000)
    await ledger.set_scope_limit(T, TEAM, MONTHLY, 1_500)
    view = await ledger.set_scope_limit(T, TEAM, LIFETIME, 2_000)
    assert [(u.period, u.limit_micros, window(u)) for u in view.usage] == [
        (LIFETIME, 2_000, (None, None)),
        (DAILY, 1_000, (NOV_14, NOV_15)),
        (MONTHLY, 1_500, (NOV_1, DEC_1)),
    ]
    await ledger.create_run(T, spec("a", team="core"))
    assert allowed(await ledger.reserve(T, "a", "r1", 800, None))
    await ledger.commit(T, "a", "r1", 800)
    # Over every ceiling: the daily one is reported.
    assert await block(ledger, "a", "r2", 2_500) == (*INSUFFICIENT, TEAM, DAILY)
    # Over the daily ceiling only.
    assert await block(ledger, "a", "r3", 300) == (*INSUFFICIENT, TEAM, DAILY)

    clock.advance(NOV_15 - START)  # UTC midnight: a new day, the same month
    view = await ledger.get_scope(T, TEAM)
    daily, monthly = view.period(DAILY), view.period(MONTHLY)
    assert window(daily) == (NOV_15, NOV_15 + DAY_MS)
    assert (money(daily), daily.remaining_micros) == ((0, 0, 0, 0), 1_000)
    assert window(monthly) == (NOV_1, DEC_1)
    assert (money(monthly), monthly.remaining_micros) == ((800, 0, 0, 0), 700)
    assert await block(ledger, "a", "r4", 800) == (*INSUFFICIENT, TEAM, MONTHLY)
    assert allowed(await ledger.reserve(T, "a", "r5", 700, None))
    await ledger.commit(T, "a", "r5", 700)

    clock.advance(DEC_1 - NOV_15)  # a new month
    view = await ledger.get_scope(T, TEAM)
    daily, monthly = view.period(DAILY), view.period(MONTHLY)
    assert (window(daily), daily.committed_micros) == ((DEC_1, DEC_1 + DAY_MS), 0)
    assert (window(monthly), monthly.committed_micros) == ((DEC_1, JAN_1), 0)
    assert view.period(LIFETIME).committed_micros == 1_500
    assert await block(ledger, "a", "r6", 600) == (*INSUFFICIENT, TEAM, LIFETIME)
    assert allowed(await ledger.reserve(T, "a", "r7", 500, None))
    assert (await usage(ledger, TEAM)).remaining_micros == 0


async def test_a_hold_counts_in_the_windows_it_was_made_in(
    ledger: Ledger, clock: ManualClock
) -> None:
    await ledger.set_scope_limit(T, TEAM, DAILY, 1_000)
    await ledger.create_run(T, spec("a", team="core"))
    clock.advance(NOV_15 - START - 60_000)  # 23:59 UTC
    assert allowed(await ledger.reserve(T, "a", "r1", 600, 120_000))
    assert allowed(await ledger.reserve(T, "a", "r2", 300, 120_000))
    clock.advance(60_000)  # midnight
    assert money(await usage(ledger, TEAM, DAILY)) == (0, 0, 0, 0)
    assert money(await usage(ledger, TEAM, MONTHLY)) == (0, 900, 0, 2)

    # Settled after midnight, still yesterday's: today's window stays empty.
    assert (await ledger.commit(T, "a", "r1", 900)).overrun_micros == 300
    assert money(await usage(ledger, TEAM, DAILY)) == (0, 0, 0, 0)
    assert money(await usage(ledger, TEAM, MONTHLY)) == (900, 300, 300, 1)
    clock.advance(60_000 + PARENT_HOLD_GRACE_MS)  # r2 expires everywhere
    assert money(await usage(ledger, TEAM, DAILY)) == (0, 0, 0, 0)
    assert money(await usage(ledger, TEAM, MONTHLY)) == (900, 0, 300, 0)
    assert money(await usage(ledger, TEAM, LIFETIME)) == (900, 0, 300, 0)
    assert allowed(await ledger.reserve(T, "a", "r3", 1_000, None))


# -- A subagent tree ------------------------------------------------------------


async def tree(ledger: Ledger) -> None:
    """root (limit 1,000) -> child -> grandchild (default ttl 5 s)."""
    await ledger.create_run(T, spec("root", 1_000))
    await ledger.create_run(T, spec("child", 5_000, parent="root"))
    await ledger.create_run(T, spec("grandchild", 5_000, parent="child", default_ttl_ms=5_000))


async def test_a_grandchild_holds_on_every_ancestor(ledger: Ledger, clock: ManualClock) -> None:
    await tree(ledger)
    result = await ledger.reserve(T, "grandchild", "res", 300, None)
    assert allowed(result)
    assert result.expires_ms == START + 5_000
    assert (result.state.reserved_micros, result.state.revision) == (300, 2)
    for run_id in ("child", "root"):
        run = await state(ledger, run_id)
        assert (money(run), run.revision) == ((0, 300, 0, 1), 2)
        assert (await log(ledger, run_id))[-1] == (EventType.RESERVED, "grandchild/res", 300, 0, 0)
        _, reservations = await snapshot(ledger, T, run_id)
        [held] = reservations
        assert (held.reservation_id, held.status, held.held_micros, held.expires_ms) == (
            "grandchild/res",
            ReservationStatus.HELD,
            300,
            START + 5_000 + PARENT_HOLD_GRACE_MS,
        )
    # The root's own reservations share its limit with its descendants' holds.
    assert await block(ledger, "root", "own", 701) == (*INSUFFICIENT, ROOT, LIFETIME)
    assert allowed(await ledger.reserve(T, "root", "own2", 700, None))

    clock.advance(5_000 + PARENT_HOLD_GRACE_MS)  # every hold of "res" is due
    assert money(await state(ledger, "child")) == (0, 0, 0, 0)
    assert money(await state(ledger, "root")) == (0, 700, 0, 1)  # own2 is still held
    for run_id in ("child", "root"):
        assert (await log(ledger, run_id))[-1] == (EventType.EXPIRED, "grandchild/res", 300, 0, 0)


async def test_an_ancestor_limit_blocks_descendants(ledger: Ledger) -> None:
    await tree(ledger)
    assert allowed(await ledger.reserve(T, "grandchild", "res", 300, None))
    blocked = await ledger.reserve(T, "grandchild", "big", 800, None)
    assert blocked_by(blocked) == (*INSUFFICIENT, ROOT, LIFETIME)
    assert (blocked.state.reserved_micros, blocked.state.revision) == (300, 3)  # BLOCKED
    # The child held "big" before the root blocked it, then released it.
    child = await state(ledger, "child")
    assert (money(child), child.revision) == ((0, 300, 0, 1), 4)
    assert (await log(ledger, "child"))[-2:] == [
        (EventType.RESERVED, "grandchild/big", 800, 0, 0),
        (EventType.REFUNDED, "grandchild/big", 800, 0, 0),
    ]
    root = await state(ledger, "root")
    assert (money(root), root.revision) == ((0, 300, 0, 1), 2)  # a block is no change

    committed = await ledger.commit(T, "grandchild", "res", 350)
    assert (committed.held_micros, committed.overrun_micros) == (300, 50)
    for run_id in ("grandchild", "child", "root"):
        assert money(await state(ledger, run_id)) == (350, 0, 50, 0)
        assert (await log(ledger, run_id))[-1] == (
            EventType.COMMITTED,
            "res" if run_id == "grandchild" else "grandchild/res",
            300,
            350,
            50,
        )
    # The root has 650 left, for all of its descendants.
    assert await block(ledger, "grandchild", "b", 651) == (*INSUFFICIENT, ROOT, LIFETIME)
    assert allowed(await ledger.reserve(T, "grandchild", "c", 650, None))


async def test_closing_an_ancestor_blocks_its_descendants(ledger: Ledger) -> None:
    await tree(ledger)
    assert allowed(await ledger.reserve(T, "grandchild", "held", 100, None))
    await ledger.close_run(T, "root")
    for run_id in ("child", "grandchild"):
        blocked = await ledger.reserve(T, run_id, "after", 10, None)
        assert blocked_by(blocked) == (*CLOSED, ROOT, LIFETIME)
    # Only the grandchild's reserve held on the (open) child, and released it;
    # the child's own block is one BLOCKED change.
    child = await state(ledger, "child")
    assert (money(child), child.revision) == ((0, 100, 0, 1), 5)
    # Holds made before the close still settle on the closed root.
    await ledger.commit(T, "grandchild", "held", 100)
    root = await state(ledger, "root")  # created, reserved, closed, committed
    assert (money(root), root.revision) == ((100, 0, 0, 0), 4)
    # A closed middle run blocks below it, and is named.
    await ledger.create_run(T, spec("r2"))
    await ledger.create_run(T, spec("c2", parent="r2"))
    await ledger.create_run(T, spec("g2", parent="c2"))
    await ledger.close_run(T, "c2")
    blocked = await ledger.reserve(T, "g2", "x", 10, None)
    assert blocked_by(blocked) == (*CLOSED, run_ref("c2"), LIFETIME)
    assert (await state(ledger, "r2")).reserved_micros == 0


async def test_an_ancestor_at_the_money_bound_does_not_fail_the_commit(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("root", MAX_MICROS))
    await ledger.create_run(T, spec("child", 100, parent="root"))
    assert allowed(await ledger.reserve(T, "child", "r", 10, None))
    await ledger.reserve(T, "root", "own", 100, None)
    await ledger.commit(T, "root", "own", MAX_MICROS - 5)
    # The child's record is the truth; the root cannot count 10 more exactly.
    committed = await ledger.commit(T, "child", "r", 10)
    assert committed.reservation_status is ReservationStatus.COMMITTED
    assert committed.state.committed_micros == 10
    root = await state(ledger, "root")
    assert (root.committed_micros, root.reserved_micros) == (MAX_MICROS - 5, 10)


# -- Idempotency -------------------------------------------------------------------


async def test_retrying_an_allowed_reserve_holds_once(ledger: Ledger, clock: ManualClock) -> None:
    await ledger.set_scope_limit(T, TEAM, LIFETIME, 1_000)
    await ledger.create_run(T, spec("root", team="core"))
    await ledger.create_run(T, spec("child", parent="root"))
    first = await ledger.reserve(T, "child", "r", 400, 2_000)
    clock.advance(10)
    again = await ledger.reserve(T, "child", "r", 400, 2_000)
    assert again.replayed
    assert allowed(again)
    assert (again.held_micros, again.expires_ms) == (400, first.expires_ms)
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(T, "child", "r", 500, 2_000)
    root = await state(ledger, "root")
    assert (money(root), root.revision) == ((0, 400, 0, 1), 2)
    assert money(await usage(ledger, TEAM)) == (0, 400, 0, 1)
    # The parents' holds are the first attempt's: the commit settles them.
    await ledger.commit(T, "child", "r", 400)
    for of in (await state(ledger, "root"), await usage(ledger, TEAM)):
        assert money(of) == (400, 0, 0, 0)


async def test_retrying_a_parent_blocked_reserve_replays_the_block(ledger: Ledger) -> None:
    await ledger.set_scope_limit(T, TEAM, LIFETIME, 500)
    await ledger.create_run(T, spec("root", team="core"))
    for run_id in ("a", "b"):
        await ledger.create_run(T, spec(run_id, parent="root"))
    assert allowed(await ledger.reserve(T, "a", "r", 400, None))
    first = await ledger.reserve(T, "b", "x", 200, None)
    assert blocked_by(first) == (*INSUFFICIENT, TEAM, LIFETIME)
    await ledger.refund(T, "a", "r")  # the team has room now
    root_revision = (await state(ledger, "root")).revision

    again = await ledger.reserve(T, "b", "x", 200, None)
    assert again.replayed
    assert blocked_by(again) == (*INSUFFICIENT, TEAM, LIFETIME)
    assert money(await usage(ledger, TEAM)) == (0, 0, 0, 0)
    root = await state(ledger, "root")
    assert (money(root), root.revision) == ((0, 0, 0, 0), root_revision)
    assert (await state(ledger, "b")).revision == 2  # the first block's BLOCKED only
    # A new id is decided afresh.
    assert allowed(await ledger.reserve(T, "b", "y", 200, None))
    assert money(await usage(ledger, TEAM)) == (0, 200, 0, 1)


async def test_retrying_settlements_charges_parents_once(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("root", team="core"))
    await ledger.create_run(T, spec("child", parent="root"))
    await ledger.reserve(T, "child", "r", 300, None)
    await ledger.reserve(T, "child", "s", 100, None)
    assert not (await ledger.commit(T, "child", "r", 250)).replayed
    assert (await ledger.commit(T, "child", "r", 250)).replayed
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.commit(T, "child", "r", 260)
    assert (await ledger.refund(T, "child", "r")).reservation_status is (
        ReservationStatus.COMMITTED
    )
    assert (await ledger.refund(T, "child", "s")).released_micros == 100
    assert (await ledger.refund(T, "child", "s")).replayed

    root = await state(ledger, "root")
    # created, reserved r, reserved s, committed r, refunded s
    assert (money(root), root.revision) == ((250, 0, 0, 0), 5)
    # A team without a ceiling is tracked all the same.
    team = await usage(ledger, TEAM)
    assert (money(team), team.limit_micros, team.remaining_micros) == ((250, 0, 0, 0), None, 0)


async def test_settled_scope_holds_are_forgotten_an_hour_on_and_retries_count_once(
    ledger: Ledger, clock: ManualClock
) -> None:
    """A scope keeps a record per hold for retries; settled ones go an hour after
    settling, PRUNE_BATCH per operation. A retried Commit or Reserve, or a late
    commit, still counts exactly once."""
    await ledger.set_scope_limit(T, TEAM, LIFETIME, 10_000)
    await ledger.create_run(T, spec("a", team="core"))
    committed = [f"c{n}" for n in range(8)]
    for rid in committed:
        assert allowed(await ledger.reserve(T, "a", rid, 100, None))
        await ledger.commit(T, "a", rid, 80)
    for rid in ("f0", "f1", "f2"):
        await ledger.reserve(T, "a", rid, 100, None)
        await ledger.refund(T, "a", rid)
    blocked = await ledger.reserve(T, "a", "big", 20_000, None)
    assert blocked.decision is Decision.BLOCK
    assert allowed(await ledger.reserve(T, "a", "late", 100, 1_000))
    settled = {"a/" + rid for rid in [*committed, "f0", "f1", "f2", "big"]}
    assert await scope_hold_ids(ledger, T, TEAM) == settled | {"a/late"}
    assert money(await usage(ledger, TEAM)) == (640, 100, 0, 1)

    clock.advance(SETTLED_HOLD_RETENTION_MS)
    # "late" expired an hour ago, and settled only now: kept for another hour.
    assert money(await usage(ledger, TEAM)) == (640, 0, 0, 0)
    assert await scope_hold_ids(ledger, T, TEAM) == settled | {"a/late"}
    clock.advance(1)
    await usage(ledger, TEAM)  # one operation: the oldest PRUNE_BATCH go
    assert len(await scope_hold_ids(ledger, T, TEAM)) == len(settled) + 1 - PRUNE_BATCH
    await usage(ledger, TEAM)
    assert await scope_hold_ids(ledger, T, TEAM) == {"a/late"}

    # Retries of forgotten holds change nothing; a late commit counts once.
    again = await ledger.commit(T, "a", "c0", 80)
    assert again.replayed
    replayed = await ledger.reserve(T, "a", "c1", 100, None)
    assert replayed.replayed
    assert replayed.decision is Decision.ALLOW
    assert money(await usage(ledger, TEAM)) == (640, 0, 0, 0)
    late = await ledger.commit(T, "a", "late", 70)
    assert late.reservation_status is ReservationStatus.LATE_COMMITTED
    assert money(await usage(ledger, TEAM)) == (710, 0, 70, 0)
    assert (await ledger.commit(T, "a", "late", 70)).replayed
    assert money(await usage(ledger, TEAM)) == (710, 0, 70, 0)


def test_the_scope_script_prunes_as_scopes_py_does() -> None:
    """The Redis script has its own copies of the retention and batch constants."""
    script = (SCRIPTS / "scope.lua").read_text()
    assert f"local SETTLED_RETENTION_MS = {SETTLED_HOLD_RETENTION_MS}\n" in script
    assert f"local PRUNE_BATCH = {PRUNE_BATCH}\n" in script


# -- SetScopeLimit ---------------------------------------------------------------


async def test_clearing_and_lowering_a_scope_limit(ledger: Ledger) -> None:
    await ledger.set_scope_limit(T, TEAM, LIFETIME, 1_000)
    await ledger.set_scope_limit(T, TEAM, DAILY, 800)
    await ledger.create_run(T, spec("a", team="core"))
    await ledger.reserve(T, "a", "r", 600, None)
    await ledger.commit(T, "a", "r", 600)

    cleared = await ledger.set_scope_limit(T, TEAM, LIFETIME, None)
    lifetime, daily = cleared.period(LIFETIME), cleared.period(DAILY)
    assert (lifetime.limit_micros, lifetime.remaining_micros, lifetime.committed_micros) == (
        None,
        0,
        600,
    )
    assert (daily.limit_micros, daily.remaining_micros) == (800, 200)  # untouched
    assert await block(ledger, "a", "big", 5_000) == (*INSUFFICIENT, TEAM, DAILY)
    await ledger.set_scope_limit(T, TEAM, DAILY, None)
    assert allowed(await ledger.reserve(T, "a", "big2", 5_000, None))  # no ceiling at all
    await ledger.refund(T, "a", "big2")

    lowered = await ledger.set_scope_limit(T, TEAM, LIFETIME, 500)  # below what was spent
    lifetime = lowered.period(LIFETIME)
    assert (lifetime.limit_micros, lifetime.committed_micros, lifetime.remaining_micros) == (
        500,
        600,
        0,
    )
    assert await block(ledger, "a", "small", 1) == (*INSUFFICIENT, TEAM, LIFETIME)
    # Scopes are per tenant.
    other = (await ledger.get_scope("globex", TEAM)).period(LIFETIME)
    assert (other.limit_micros, money(other)) == (None, (0, 0, 0, 0))
