"""The ledger's semantics, written once (docs/semantics.md describes them).

Each operation works on one run through a `RunStore`, a view of that run's
rows inside one transaction of some storage. Operations read and check
everything first and write only when they cannot fail any more, so a failed
operation changes nothing whatever the storage. Expiry is lazy: every
operation first releases the run's holds that are due at `now_ms`.

All functions are synchronous and pure apart from the store, so the
reference model and the SQLite backend share them.
"""

from __future__ import annotations

from typing import Protocol

from runcap_server import errors
from runcap_server.ledger.scopes import ParentOutcome
from runcap_server.ledger.types import (
    MAX_MICROS,
    SETTLED_BY_COMMIT,
    Account,
    BudgetState,
    Change,
    CloseRunResult,
    CommitResult,
    Decision,
    DecisionReason,
    EventType,
    Lineage,
    Period,
    RefundResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    RunSpec,
    RunStatus,
    ScopeKind,
    ScopeRef,
    chain_digest,
)


class RunStore(Protocol):
    """One run's rows inside one storage transaction."""

    def load_account(self) -> Account | None: ...

    def load_reservation(self, reservation_id: str) -> Reservation | None: ...

    def due_reservations(self, now_ms: int) -> list[Reservation]:
        """Held reservations with expires_ms <= now_ms, by (expires_ms, id)."""
        ...

    def save_account(self, account: Account) -> None: ...

    def save_reservation(self, reservation: Reservation) -> None: ...

    def append_change(self, change: Change) -> None: ...


class _Txn:
    """Collects one operation's changes; `store` sees nothing until `apply`."""

    def __init__(self, store: RunStore, account: Account, now_ms: int) -> None:
        self.store = store
        self.account = account.copy()
        self.now_ms = now_ms
        self.reservations: dict[str, Reservation] = {}
        self.changes: list[Change] = []

    def record(
        self,
        type_: EventType,
        reservation: Reservation | None = None,
        *,
        amount_micros: int = 0,
        actual_micros: int = 0,
        overrun_micros: int = 0,
        late: bool = False,
    ) -> None:
        account = self.account
        account.revision += 1
        reservation_id = ""
        if reservation is not None:
            reservation_id = reservation.reservation_id
            self.reservations[reservation_id] = reservation
        account.digest = chain_digest(
            account.digest,
            account.revision,
            type_,
            reservation_id,
            amount_micros,
            actual_micros,
            overrun_micros,
            late,
        )
        self.changes.append(
            Change(
                revision=account.revision,
                type=type_,
                time_ms=self.now_ms,
                state=account.state(),
                reservation_id=reservation_id,
                amount_micros=amount_micros,
                actual_micros=actual_micros,
                overrun_micros=overrun_micros,
                late=late,
            )
        )

    def expire(self, reservation: Reservation) -> None:
        held = reservation.held_micros
        reservation.status = ReservationStatus.EXPIRED
        reservation.settled_ms = self.now_ms
        self.account.reserved_micros -= held
        self.account.active_reservations -= 1
        self.record(EventType.EXPIRED, reservation, amount_micros=held)

    def apply(self) -> BudgetState:
        for reservation in self.reservations.values():
            self.store.save_reservation(reservation)
        for change in self.changes:
            self.store.append_change(change)
        if self.changes:
            self.store.save_account(self.account)
        return self.account.state()


def _open(store: RunStore, run_id: str, now_ms: int) -> _Txn:
    """Start an operation on an existing run, with its due holds expired."""
    account = store.load_account()
    if account is None:
        raise errors.RunNotFound(run_id)
    txn = _Txn(store, account, now_ms)
    for due in store.due_reservations(now_ms):
        txn.expire(due.copy())
    return txn


def _reservation(txn: _Txn, reservation_id: str) -> Reservation | None:
    """The reservation as it stands in this operation (expired if it was due)."""
    if reservation_id in txn.reservations:
        return txn.reservations[reservation_id]
    found = txn.store.load_reservation(reservation_id)
    if found is None:
        return None
    found = found.copy()
    if (
        found.status is ReservationStatus.HELD
        and found.expires_ms is not None
        and found.expires_ms <= txn.now_ms
    ):
        # Due but beyond what due_reservations returned (a bounded batch).
        txn.expire(found)
    return found


def create_run(
    store: RunStore, spec: RunSpec, now_ms: int, lineage: Lineage | None = None
) -> tuple[Account, bool]:
    """Create a run, or find the identical one. Returns (account, replayed).

    `lineage` is the run's place under its parent (saga.lineage_under).
    """
    existing = store.load_account()
    if existing is not None:
        if existing.spec != spec:
            raise errors.RunAlreadyExists(spec.run_id)
        return get_state(store, spec.run_id, now_ms), True
    account = Account(spec=spec, created_ms=now_ms, lineage=lineage or Lineage())
    txn = _Txn(store, account, now_ms)
    txn.record(EventType.CREATED)
    txn.apply()
    return txn.account, False


def get_state(store: RunStore, run_id: str, now_ms: int) -> Account:
    """The run with its due holds expired (the expiries are written)."""
    txn = _open(store, run_id, now_ms)
    txn.apply()
    return txn.account


def expire_due(store: RunStore, run_id: str, now_ms: int) -> int:
    """Release the run's due holds. Returns how many were released."""
    txn = _open(store, run_id, now_ms)
    txn.apply()
    return len(txn.changes)


def reserve(
    store: RunStore,
    run_id: str,
    reservation_id: str,
    amount_micros: int,
    requested_ttl_ms: int | None,
    server_default_ttl_ms: int,
    now_ms: int,
    parent_block: ParentOutcome | None = None,
    fingerprint: str = "",
    pricing: str = "",
) -> ReserveResult:
    """Hold `amount` on the run if it fits; remember the decision either way.

    `parent_block` is a verdict reached before the run's own: the reserve
    saga's from the run's parent scopes, or an unknown price. When set (and
    this is not a retry), the reservation is blocked by it. A retry is
    compared by `fingerprint` when the request has one, else by amount.
    """
    txn = _open(store, run_id, now_ms)
    previous = _reservation(txn, reservation_id)
    if previous is not None:
        if _arguments(previous) != _arguments_of(amount_micros, requested_ttl_ms, fingerprint):
            raise errors.IdempotencyConflict(run_id, reservation_id, "reserved")
        return _reserve_result(previous, txn.apply(), replayed=True)
    ttl_ms = requested_ttl_ms or txn.account.spec.default_ttl_ms or server_default_ttl_ms
    reservation = _decide(
        txn, reservation_id, amount_micros, requested_ttl_ms, ttl_ms, parent_block
    )
    reservation.fingerprint = fingerprint
    reservation.pricing = pricing
    return _reserve_result(reservation, txn.apply(), replayed=False)


def _arguments_of(
    amount_micros: int, requested_ttl_ms: int | None, fingerprint: str
) -> tuple[object, ...]:
    return (fingerprint or amount_micros, requested_ttl_ms)


def _arguments(reservation: Reservation) -> tuple[object, ...]:
    """What a retry of this reservation must repeat."""
    return _arguments_of(
        reservation.amount_micros, reservation.requested_ttl_ms, reservation.fingerprint
    )


def _reserve_result(
    reservation: Reservation, state: BudgetState, *, replayed: bool
) -> ReserveResult:
    return ReserveResult(
        decision=reservation.decision,
        reason=reservation.reason,
        reservation_id=reservation.reservation_id,
        held_micros=reservation.held_micros,
        expires_ms=reservation.expires_ms,
        state=state,
        replayed=replayed,
        blocking_scope=reservation.blocking_scope,
        blocking_period=reservation.blocking_period,
    )


def _decide(
    txn: _Txn,
    reservation_id: str,
    amount_micros: int,
    requested_ttl_ms: int | None,
    ttl_ms: int,
    parent_block: ParentOutcome | None = None,
) -> Reservation:
    """A new reservation: held if the run is open and has room and no parent
    blocked, else blocked (the run's own verdict takes precedence)."""
    account = txn.account
    if account.status is RunStatus.CLOSED:
        reason = DecisionReason.RUN_CLOSED
    elif account.status is RunStatus.SUSPENDED:
        reason = DecisionReason.SUSPENDED
    elif account.committed_micros + account.reserved_micros + amount_micros > (
        account.spec.limit_micros
    ):
        reason = DecisionReason.INSUFFICIENT_BUDGET
    else:
        reason = DecisionReason.WITHIN_BUDGET
    reservation = Reservation(
        reservation_id=reservation_id,
        amount_micros=amount_micros,
        requested_ttl_ms=requested_ttl_ms,
        status=ReservationStatus.BLOCKED,
        reason=reason,
        created_ms=txn.now_ms,
        blocking_scope=ScopeRef(ScopeKind.RUN, account.run_id),
        blocking_period=Period.LIFETIME,
    )
    if reason is DecisionReason.WITHIN_BUDGET and parent_block is not None:
        reservation.reason = parent_block.reason
        reservation.blocking_scope = parent_block.scope
        reservation.blocking_period = parent_block.period
        txn.reservations[reservation_id] = reservation
    elif reason is DecisionReason.WITHIN_BUDGET:
        reservation.blocking_scope = reservation.blocking_period = None
        reservation.status = ReservationStatus.HELD
        reservation.held_micros = amount_micros
        reservation.expires_ms = txn.now_ms + ttl_ms
        account.reserved_micros += amount_micros
        account.active_reservations += 1
        txn.record(EventType.RESERVED, reservation, amount_micros=amount_micros)
    else:
        # A block changes no money and no revision, but is remembered so a
        # retry cannot turn it into an allow once budget frees up.
        txn.reservations[reservation_id] = reservation
    return reservation


def hold_for_child(
    store: RunStore, run_id: str, hold_id: str, amount_micros: int, ttl_ms: int, now_ms: int
) -> ParentOutcome:
    """The reserve saga's step on an ancestor run: hold a descendant's estimate.

    Idempotent by hold id (a repeat answers what the hold is now). A missing
    ancestor (its keys aged out after it closed) blocks like a closed one.
    """
    scope = ScopeRef(ScopeKind.RUN, run_id)
    if store.load_account() is None:
        return ParentOutcome(
            scope, ReservationStatus.BLOCKED, False, DecisionReason.RUN_CLOSED, Period.LIFETIME
        )
    txn = _open(store, run_id, now_ms)
    found = _reservation(txn, hold_id)
    replayed = found is not None
    if found is None:
        found = _decide(txn, hold_id, amount_micros, ttl_ms, ttl_ms)
    txn.apply()
    blocked = found.status is ReservationStatus.BLOCKED
    return ParentOutcome(
        scope, found.status, replayed, found.reason, Period.LIFETIME if blocked else None
    )


def settle_for_child(
    store: RunStore, run_id: str, hold_id: str, actual_micros: int | None, now_ms: int
) -> None:
    """The commit (or, with None, refund) saga's step on an ancestor run.

    Idempotent. The descendant's record is the truth: a commit always records
    the money (late when the hold expired or never reached this run), and a
    release after any settlement changes nothing. The one exception: a commit
    that would bring this run's committed total past MAX_MICROS is not
    recorded here (the hold stays until it expires), rather than fail the
    descendant's commit, as the Redis script does.
    """
    if store.load_account() is None:
        return  # the ancestor aged out after it closed: nothing left to charge
    txn = _open(store, run_id, now_ms)
    found = _reservation(txn, hold_id)
    if actual_micros is None:
        if found is not None and found.status is ReservationStatus.HELD:
            _release(txn, found)
    elif txn.account.committed_micros + actual_micros > MAX_MICROS:
        pass
    elif found is None:
        found = Reservation(
            reservation_id=hold_id,
            amount_micros=0,
            requested_ttl_ms=None,
            status=ReservationStatus.EXPIRED,
            reason=DecisionReason.WITHIN_BUDGET,
            created_ms=now_ms,
        )
        _commit(txn, run_id, found, actual_micros)
    elif found.status in (ReservationStatus.HELD, ReservationStatus.EXPIRED):
        _commit(txn, run_id, found, actual_micros)
    txn.apply()


def commit(
    store: RunStore, run_id: str, reservation_id: str, actual_micros: int, now_ms: int
) -> CommitResult:
    txn = _open(store, run_id, now_ms)
    reservation = _reservation(txn, reservation_id)
    if reservation is None:
        raise errors.ReservationNotFound(run_id, reservation_id)
    status = reservation.status
    if status is ReservationStatus.BLOCKED:
        raise errors.ReservationBlocked(run_id, reservation_id)
    if status is ReservationStatus.RELEASED:
        raise errors.ReservationReleased(run_id, reservation_id)
    if status in SETTLED_BY_COMMIT:
        if reservation.actual_micros != actual_micros:
            raise errors.IdempotencyConflict(run_id, reservation_id, "committed")
        return CommitResult(
            state=txn.apply(),
            reservation_status=status,
            actual_micros=actual_micros,
            held_micros=reservation.held_micros,
            overrun_micros=reservation.overrun_micros,
            replayed=True,
        )

    overrun = _commit(txn, run_id, reservation, actual_micros)
    return CommitResult(
        state=txn.apply(),
        reservation_status=reservation.status,
        actual_micros=actual_micros,
        held_micros=reservation.held_micros,
        overrun_micros=overrun,
        replayed=False,
    )


def _commit(txn: _Txn, run_id: str, reservation: Reservation, actual_micros: int) -> int:
    """Settle a held or expired reservation with its actual cost. Returns the overrun."""
    account = txn.account
    if account.committed_micros + actual_micros > MAX_MICROS:
        # Totals must stay exact in every backend (Lua numbers are doubles).
        raise errors.committed_total_out_of_range(run_id)
    late = reservation.status is ReservationStatus.EXPIRED
    if late:
        # The hold is gone; the money was spent all the same.
        overrun = actual_micros
        reservation.status = ReservationStatus.LATE_COMMITTED
    else:
        overrun = max(0, actual_micros - reservation.held_micros)
        reservation.status = ReservationStatus.COMMITTED
        account.reserved_micros -= reservation.held_micros
        account.active_reservations -= 1
    reservation.actual_micros = actual_micros
    reservation.overrun_micros = overrun
    reservation.settled_ms = txn.now_ms
    account.committed_micros += actual_micros
    account.overrun_micros += overrun
    txn.record(
        EventType.COMMITTED,
        reservation,
        amount_micros=reservation.held_micros,
        actual_micros=actual_micros,
        overrun_micros=overrun,
        late=late,
    )
    return overrun


def _release(txn: _Txn, reservation: Reservation) -> int:
    held = reservation.held_micros
    reservation.status = ReservationStatus.RELEASED
    reservation.settled_ms = txn.now_ms
    txn.account.reserved_micros -= held
    txn.account.active_reservations -= 1
    txn.record(EventType.REFUNDED, reservation, amount_micros=held)
    return held


def refund(store: RunStore, run_id: str, reservation_id: str, now_ms: int) -> RefundResult:
    txn = _open(store, run_id, now_ms)
    reservation = _reservation(txn, reservation_id)
    if reservation is None:
        raise errors.ReservationNotFound(run_id, reservation_id)
    if reservation.status is ReservationStatus.BLOCKED:
        raise errors.ReservationBlocked(run_id, reservation_id)
    if reservation.status is not ReservationStatus.HELD:
        # Already settled (refunded, committed or expired): nothing to release.
        return RefundResult(
            state=txn.apply(),
            reservation_status=reservation.status,
            released_micros=0,
            replayed=True,
        )
    held = _release(txn, reservation)
    return RefundResult(
        state=txn.apply(),
        reservation_status=ReservationStatus.RELEASED,
        released_micros=held,
        replayed=False,
    )


def suspend_run(store: RunStore, run_id: str, now_ms: int) -> CloseRunResult:
    """The kill switch: no new holds until resume_run; holds still settle."""
    return _set_status(store, run_id, now_ms, RunStatus.SUSPENDED, EventType.SUSPENDED)


def resume_run(store: RunStore, run_id: str, now_ms: int) -> CloseRunResult:
    return _set_status(store, run_id, now_ms, RunStatus.OPEN, EventType.RESUMED)


def _set_status(
    store: RunStore, run_id: str, now_ms: int, status: RunStatus, event: EventType
) -> CloseRunResult:
    txn = _open(store, run_id, now_ms)
    account = txn.account
    if account.status is RunStatus.CLOSED:
        raise errors.RunClosed(run_id)
    if account.status is status:
        return CloseRunResult(state=txn.apply(), replayed=True)
    account.status = status
    txn.record(event)
    return CloseRunResult(state=txn.apply(), replayed=False)


def close_run(store: RunStore, run_id: str, now_ms: int) -> CloseRunResult:
    txn = _open(store, run_id, now_ms)
    account = txn.account
    if account.status is RunStatus.CLOSED:
        return CloseRunResult(state=txn.apply(), replayed=True)
    account.status = RunStatus.CLOSED
    account.closed_ms = now_ms
    txn.record(EventType.CLOSED)
    return CloseRunResult(state=txn.apply(), replayed=False)


__all__ = [
    "Decision",
    "RunStore",
    "close_run",
    "commit",
    "create_run",
    "expire_due",
    "get_state",
    "refund",
    "reserve",
]
