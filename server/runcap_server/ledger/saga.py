"""Parent scopes: how one reservation is held on a run and on all its parents.

A run's parents (its ancestor runs, its API key, user and team) live apart
from it (in Redis, in other slots), so a Reserve on a run with parents is a
short saga, coordinated by the hold id `run/reservation`, with no locks:

1. hold the estimate on every parent (each step atomic and idempotent);
2. reserve on the run, blocked by the first parent that blocked, if any;
3. if the run did not newly allow it, release what step 1 newly held.

Commit and Refund settle the run first (its record is the truth), then every
parent. Every step can be repeated, so a retry, or the Redis sweeper after a
crash, finishes what was interrupted; parent holds that nobody finishes expire
like any hold. The rules of steps 2 and 3 live here once; the storage backends
run the steps (SQLite and the model inside one transaction, Redis as separate
scripts, parents concurrently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from runcap_server import errors
from runcap_server.ledger import core, scopes
from runcap_server.ledger.scopes import ParentOutcome
from runcap_server.ledger.types import (
    TOKENS,
    Account,
    CommitResult,
    Decision,
    DecisionReason,
    Lineage,
    RefundResult,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunStatus,
    RunView,
    ScopeKind,
    ScopeRef,
    decode_given_policy,
    hold_id,
    meter_dim,
)


@dataclass(frozen=True, slots=True)
class ReserveExtras:
    """What a priced LLM call adds to a Reserve (see core.reserve)."""

    fingerprint: str = ""
    pricing: str = ""
    # A block decided before the ledgers are asked (an unknown price).
    preblock: DecisionReason | None = None
    # An LLM call's tokens (input + effective max output), and the call
    # meter with its units.
    tokens: int = 0
    meter: str = ""
    meter_units: int = 0
    # An automatic downgrade's hold: a block of it is not counted, the call
    # it stands in for is (Account.blocked_calls).
    downgrade: bool = False

    def dims(self) -> dict[str, int]:
        """What the reservation holds beyond money, by dimension."""
        dims = {TOKENS: self.tokens} if self.tokens else {}
        if self.meter and self.meter_units:
            dims[meter_dim(self.meter)] = self.meter_units
        return dims

    def block(self) -> ParentOutcome | None:
        if self.preblock is None:
            return None
        return ParentOutcome(None, ReservationStatus.BLOCKED, False, self.preblock)


NO_EXTRAS = ReserveExtras()

# Parent holds outlive the run's hold by this much, so that a commit in time
# for the run is in time for its parents too (their clocks and the saga's
# steps differ by a little).
PARENT_HOLD_GRACE_MS = 1_000


def scope_refs(spec: RunSpec) -> list[ScopeRef]:
    """The scopes a root run's default policy comes from, in precedence order."""
    kinds = (ScopeKind.API_KEY, ScopeKind.USER, ScopeKind.TEAM)
    ids = (spec.api_key_id, spec.user_id, spec.team_id)
    return [ScopeRef(kind, id_) for kind, id_ in zip(kinds, ids, strict=True) if id_]


def place_under(
    spec: RunSpec, parent: RunView | None, scope_policy: RunPolicy | None = None
) -> tuple[Lineage, RunPolicy]:
    """A new run's lineage and effective policy; `parent` is its parent run, if
    any, and `scope_policy` a root run's first scope default (scope_refs).

    Checks the parent's subagent limits as they stand; the parent's own
    step (core.adopt_child) counts the child atomically.
    """
    if not spec.parent_run_id:
        policy = spec.policy or scope_policy or RunPolicy()
        lineage = Lineage(
            api_key_id=spec.api_key_id,
            user_id=spec.user_id,
            team_id=spec.team_id,
            depth_left=policy.max_depth,
        )
        return lineage, policy
    if parent is None:
        raise errors.ParentRunNotFound(spec.run_id, spec.parent_run_id)
    if parent.state.status is RunStatus.CLOSED:
        raise errors.ParentRunClosed(spec.run_id, spec.parent_run_id)
    if parent.lineage.depth_left <= 0:
        raise errors.SubagentLimit(
            spec.run_id, spec.parent_run_id, "it would nest deeper than an ancestor's max_depth"
        )
    limit = parent.policy.max_children
    if limit is not None and parent.children >= limit:
        raise errors.SubagentLimit(
            spec.run_id, spec.parent_run_id, f"the parent already has its {limit} children"
        )
    # max_depth is at most MAX_RUN_DEPTH - 1, so depth_left keeps every
    # lineage within MAX_RUN_DEPTH runs.
    policy = spec.policy or parent.policy
    return parent.lineage.child(spec, policy), policy


def hold_ttl_ms(account: Account, requested_ttl_ms: int | None, server_default_ttl_ms: int) -> int:
    """How long the parents hold a reservation of this run."""
    ttl = requested_ttl_ms or account.spec.default_ttl_ms or server_default_ttl_ms
    return ttl + PARENT_HOLD_GRACE_MS


def parent_block(outcomes: Sequence[ParentOutcome]) -> ParentOutcome | None:
    """The parent that blocks the reservation, nearest first; None if all hold it.

    A retry that finds a parent's hold from an earlier attempt already settled
    (it expired before the attempt reached the run) cannot hold it again
    under the same id: it is blocked as RESERVATION_EXPIRED.
    """
    for outcome in outcomes:
        if outcome.status is ReservationStatus.BLOCKED:
            return outcome
    for outcome in outcomes:
        if outcome.status is not ReservationStatus.HELD:
            return ParentOutcome(
                outcome.scope, ReservationStatus.BLOCKED, True, DecisionReason.RESERVATION_EXPIRED
            )
    return None


def to_release(outcomes: Sequence[ParentOutcome], result: ReserveResult | None) -> list[ScopeRef]:
    """The parent holds of this reservation that the run's answer does not keep.

    `result` is None when the run's step failed with an error (an idempotency
    conflict): what step 1 newly held goes. A run that holds the reservation
    keeps every parent's hold, a replay too: the holds are the same whichever
    attempt made them (an earlier one whose answer was lost, or a concurrent
    retry), and releasing them would let the run hold what its parents do
    not. A replay of one the run no longer holds (settled: its parents have
    forgotten it, scopes.SETTLED_HOLD_RETENTION_MS) releases what step 1 newly
    held; the original holds settle with the run's settlement. A run that
    blocked it never holds it (a block is remembered), so every parent's hold
    of it goes.
    """
    if result is None or result.settled:
        return [o.scope for o in outcomes if o.freshly_held and o.scope]
    # An advisory run's warning holds too, so its parents keep their holds.
    if result.decision in (Decision.ALLOW, Decision.WARN):
        return []
    return [o.scope for o in outcomes if o.status is ReservationStatus.HELD and o.scope]


# -- the saga inside one transaction (the model and SQLite) ---------------------


class Stores(Protocol):
    """Every run's and scope's rows, inside one storage transaction."""

    def run(self, run_id: str) -> core.RunStore: ...

    def scope(self, ref: ScopeRef) -> scopes.ScopeStore: ...


def hold_on(
    stores: Stores, ref: ScopeRef, hold: str, amount_micros: int, ttl_ms: int, now_ms: int
) -> ParentOutcome:
    if ref.kind is ScopeKind.RUN:
        return core.hold_for_child(stores.run(ref.id), ref.id, hold, amount_micros, ttl_ms, now_ms)
    return scopes.hold(stores.scope(ref), ref, hold, amount_micros, ttl_ms, now_ms)


def settle_on(
    stores: Stores, ref: ScopeRef, hold: str, actual_micros: int | None, now_ms: int
) -> None:
    """Commit `actual` on one parent, or release it (None)."""
    if ref.kind is ScopeKind.RUN:
        core.settle_for_child(stores.run(ref.id), ref.id, hold, actual_micros, now_ms)
    else:
        scopes.settle(stores.scope(ref), hold, actual_micros, now_ms)


def create_run(stores: Stores, spec: RunSpec, now_ms: int) -> tuple[Account, bool]:
    store = stores.run(spec.run_id)
    if store.load_account() is not None:
        return core.create_run(store, spec, now_ms)  # a replay or a conflict
    parent = stores.run(spec.parent_run_id).load_account() if spec.parent_run_id else None
    scope_policy = None
    if parent is None and spec.policy is None:
        defaults = (stores.scope(ref).load_policy() for ref in scope_refs(spec))
        scope_policy = decode_given_policy(next((p for p in defaults if p), ""))
    lineage, policy = place_under(
        spec, parent.view(0) if parent is not None else None, scope_policy
    )
    if parent is not None:
        core.adopt_child(stores.run(spec.parent_run_id), spec.parent_run_id, spec.run_id)
    return core.create_run(store, spec, now_ms, lineage, policy)


def _account(stores: Stores, run_id: str) -> Account:
    account = stores.run(run_id).load_account()
    if account is None:
        raise errors.RunNotFound(run_id)
    return account


def reserve(
    stores: Stores,
    run_id: str,
    reservation_id: str,
    amount_micros: int,
    requested_ttl_ms: int | None,
    server_default_ttl_ms: int,
    now_ms: int,
    request: ReserveExtras = NO_EXTRAS,
) -> ReserveResult:
    account = _account(stores, run_id)
    args = (run_id, reservation_id, amount_micros, requested_ttl_ms, server_default_ttl_ms, now_ms)
    parents = account.lineage.parents()

    def on_run(block: ParentOutcome | None) -> ReserveResult:
        return core.reserve(
            stores.run(run_id),
            *args,
            parent_block=block,
            fingerprint=request.fingerprint,
            pricing=request.pricing,
            dims=request.dims(),
            downgrade=request.downgrade,
        )

    if request.preblock is not None:
        # Decided before any ledger (an unknown price): no parent holds anything.
        return on_run(request.block())
    if not parents:
        return on_run(None)
    hold = hold_id(run_id, reservation_id)
    ttl = hold_ttl_ms(account, requested_ttl_ms, server_default_ttl_ms)
    outcomes = [hold_on(stores, p, hold, amount_micros, ttl, now_ms) for p in parents]
    result: ReserveResult | None = None
    try:
        result = on_run(parent_block(outcomes))
    finally:
        # On an error too (an idempotency conflict): hold nothing for it.
        for scope in to_release(outcomes, result):
            settle_on(stores, scope, hold, None, now_ms)
    return result


def commit(
    stores: Stores,
    run_id: str,
    reservation_id: str,
    actual_micros: int,
    now_ms: int,
    actual_tokens: int | None = None,
    output_tokens: int | None = None,
) -> CommitResult:
    result = core.commit(
        stores.run(run_id),
        run_id,
        reservation_id,
        actual_micros,
        now_ms,
        actual_tokens,
        output_tokens,
    )
    if result.replayed:
        # Its parents were settled with it, in the same transaction. (Settling
        # again is not harmless: a parent may have pruned the hold's record since.)
        return result
    hold = hold_id(run_id, reservation_id)
    for parent in _account(stores, run_id).lineage.parents():
        settle_on(stores, parent, hold, actual_micros, now_ms)
    return result


def refund(stores: Stores, run_id: str, reservation_id: str, now_ms: int) -> RefundResult:
    result = core.refund(stores.run(run_id), run_id, reservation_id, now_ms)
    if result.reservation_status is ReservationStatus.RELEASED:
        hold = hold_id(run_id, reservation_id)
        for parent in _account(stores, run_id).lineage.parents():
            settle_on(stores, parent, hold, None, now_ms)
    return result
