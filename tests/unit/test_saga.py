"""The reserve saga's rules on their own: which parent blocks, and which parent
holds a run's answer lets go (ledger/saga.py). The backends' tests run them
end to end; these pin each branch."""

from __future__ import annotations

import dataclasses

from runcap_server.ledger.saga import parent_block, to_release
from runcap_server.ledger.scopes import ParentOutcome
from runcap_server.ledger.types import (
    BudgetState,
    Decision,
    DecisionReason,
    ReservationStatus,
    ReserveResult,
    RunStatus,
    ScopeKind,
    ScopeRef,
)

TEAM = ScopeRef(ScopeKind.TEAM, "core")
KEY = ScopeRef(ScopeKind.API_KEY, "key-1")
USER = ScopeRef(ScopeKind.USER, "ana")
HELD, BLOCKED, COMMITTED = (
    ReservationStatus.HELD,
    ReservationStatus.BLOCKED,
    ReservationStatus.COMMITTED,
)


def outcome(scope: ScopeRef, status: ReservationStatus, *, replayed: bool = False) -> ParentOutcome:
    return ParentOutcome(scope, status, replayed)


def answer(decision: Decision, *, settled: bool = False) -> ReserveResult:
    return ReserveResult(
        decision=decision,
        reason=DecisionReason.WITHIN_BUDGET,
        reservation_id="r",
        held_micros=0,
        expires_ms=None,
        state=BudgetState("run", 1_000, 0, 0, 1, RunStatus.OPEN, 0, 0),
        replayed=settled,
        settled=settled,
    )


# Fresh on the team, from an earlier attempt on the key, blocked by the user.
MIXED = [outcome(TEAM, HELD), outcome(KEY, HELD, replayed=True), outcome(USER, BLOCKED)]


def test_the_first_blocking_parent_blocks_and_a_settled_one_blocks_as_expired() -> None:
    assert parent_block([outcome(TEAM, HELD), outcome(KEY, HELD)]) is None
    assert parent_block(MIXED) == MIXED[2]
    expired = parent_block([outcome(TEAM, HELD), outcome(KEY, COMMITTED, replayed=True)])
    assert expired is not None
    assert (expired.scope, expired.reason) == (KEY, DecisionReason.RESERVATION_EXPIRED)


def test_a_run_that_holds_it_keeps_every_parent_hold() -> None:
    assert to_release(MIXED, answer(Decision.ALLOW)) == []
    assert to_release(MIXED, answer(Decision.WARN)) == []


def test_a_block_releases_every_parent_hold_earlier_attempts_included() -> None:
    for decision in (Decision.BLOCK, Decision.THROTTLE, Decision.DOWNGRADE):
        assert to_release(MIXED, answer(decision)) == [TEAM, KEY]


def test_an_error_or_a_settled_replay_releases_only_what_this_attempt_held() -> None:
    assert to_release(MIXED, None) == [TEAM]
    # The run settled it long ago and its parents forgot it: this retry's fresh
    # team hold goes; the key's (the original attempt's) settles with the run.
    assert to_release(MIXED, answer(Decision.ALLOW, settled=True)) == [TEAM]


def test_a_block_of_no_scope_releases_nothing_of_it() -> None:
    unpriced = dataclasses.replace(MIXED[0], scope=None)
    assert to_release([unpriced], None) == []
