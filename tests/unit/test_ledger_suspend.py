"""The kill switch on every backend: SuspendRun stops a run and its subtree at once."""

from __future__ import annotations

import pytest

from runcap_server import errors
from runcap_server.ledger.types import (
    Decision,
    DecisionReason,
    EventType,
    RunSpec,
    RunStatus,
    ScopeKind,
    ScopeRef,
)
from tests.ledger_backends import Ledger

T = "acme"


async def test_a_suspended_run_blocks_new_holds_and_still_settles_old_ones(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    await ledger.reserve(T, "run", "before", 100, None)
    suspended = await ledger.suspend_run(T, "run")
    assert (suspended.replayed, suspended.state.status) == (False, RunStatus.SUSPENDED)
    assert suspended.state.revision == 3
    assert (await ledger.suspend_run(T, "run")).replayed

    blocked = await ledger.reserve(T, "run", "during", 1, None)
    assert (blocked.decision, blocked.reason) == (Decision.BLOCK, DecisionReason.SUSPENDED)
    assert blocked.blocking_scope == ScopeRef(ScopeKind.RUN, "run")
    committed = await ledger.commit(T, "run", "before", 80)
    assert committed.state.committed_micros == 80

    resumed = await ledger.resume_run(T, "run")
    assert (resumed.replayed, resumed.state.status) == (False, RunStatus.OPEN)
    assert (await ledger.resume_run(T, "run")).replayed
    # The block is remembered; a new reservation is allowed.
    assert (await ledger.reserve(T, "run", "during", 1, None)).replayed
    assert (await ledger.reserve(T, "run", "after", 1, None)).decision is Decision.ALLOW

    page = await ledger.read_changes(T, "run", 0, 100)
    kinds = [c.type for c in page.changes]
    assert kinds == [
        EventType.CREATED,
        EventType.RESERVED,
        EventType.SUSPENDED,
        EventType.BLOCKED,
        EventType.COMMITTED,
        EventType.RESUMED,
        EventType.RESERVED,
    ]
    assert page.changes[2].state.status is RunStatus.SUSPENDED


async def test_suspending_an_ancestor_stops_its_whole_subtree(ledger: Ledger) -> None:
    await ledger.create_run(T, RunSpec("root", 1_000, {}, None))
    await ledger.create_run(T, RunSpec("kid", 1_000, {}, None, parent_run_id="root"))
    await ledger.create_run(T, RunSpec("grandkid", 1_000, {}, None, parent_run_id="kid"))
    await ledger.suspend_run(T, "kid")
    blocked = await ledger.reserve(T, "grandkid", "r", 10, None)
    assert (blocked.reason, blocked.blocking_scope) == (
        DecisionReason.SUSPENDED,
        ScopeRef(ScopeKind.RUN, "kid"),
    )
    assert (await ledger.get_run(T, "root")).state.reserved_micros == 0  # released
    assert (await ledger.reserve(T, "root", "r", 10, None)).decision is Decision.ALLOW
    await ledger.resume_run(T, "kid")
    assert (await ledger.reserve(T, "grandkid", "r2", 10, None)).decision is Decision.ALLOW


async def test_a_closed_run_cannot_be_suspended_or_resumed(ledger: Ledger) -> None:
    await ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    await ledger.suspend_run(T, "run")
    closed = await ledger.close_run(T, "run")  # a suspended run can be closed
    assert closed.state.status is RunStatus.CLOSED
    with pytest.raises(errors.RunClosed):
        await ledger.suspend_run(T, "run")
    with pytest.raises(errors.RunClosed):
        await ledger.resume_run(T, "run")
    with pytest.raises(errors.RunNotFound):
        await ledger.suspend_run(T, "missing")
