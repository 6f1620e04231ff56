"""The reference model: the ledger in memory, one dict per run.

It is the oracle the storage backends are compared against step by step, and
a backend in its own right (`RUNCAP_BACKEND=memory`, nothing survives a
restart).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from runcap_server import errors
from runcap_server.backends.base import ChangeBell, wait_event
from runcap_server.clock import Clock, SystemClock
from runcap_server.ledger import core, saga, scopes
from runcap_server.ledger.scopes import ScopeHold, ScopeView, WindowTotals
from runcap_server.ledger.types import (
    Account,
    ApprovalResult,
    BudgetState,
    Change,
    ChangePage,
    CloseRunResult,
    CommitResult,
    CreateRunResult,
    Period,
    RefundResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunView,
    ScopeRef,
)


@dataclass
class _Run:
    account: Account | None = None
    reservations: dict[str, Reservation] = field(default_factory=dict)
    log: list[Change] = field(default_factory=list)


T = TypeVar("T")


class _MemoryStore:
    """core.RunStore over one run's dicts; writes are whole-object replacements."""

    def __init__(self, run: _Run, retention: int) -> None:
        self.run = run
        self.retention = retention

    def load_account(self) -> Account | None:
        return self.run.account.copy() if self.run.account else None

    def load_reservation(self, reservation_id: str) -> Reservation | None:
        found = self.run.reservations.get(reservation_id)
        return found.copy() if found else None

    def due_reservations(self, now_ms: int) -> list[Reservation]:
        due = [
            r.copy()
            for r in self.run.reservations.values()
            if r.status is ReservationStatus.HELD
            and r.expires_ms is not None
            and r.expires_ms <= now_ms
        ]
        return sorted(due, key=lambda r: (r.expires_ms or 0, r.reservation_id))

    def save_account(self, account: Account) -> None:
        self.run.account = account.copy()

    def save_reservation(self, reservation: Reservation) -> None:
        self.run.reservations[reservation.reservation_id] = reservation.copy()

    def append_change(self, change: Change) -> None:
        self.run.log.append(change)
        if len(self.run.log) > self.retention:
            del self.run.log[: len(self.run.log) - self.retention]


@dataclass
class _Scope:
    limits: dict[Period, int] = field(default_factory=dict)
    policy: str = ""
    windows: dict[str, WindowTotals] = field(default_factory=dict)
    holds: dict[str, ScopeHold] = field(default_factory=dict)
    # Settled holds' ids -> settled ms, in the order they settled (pruned from the front).
    settled: dict[str, int] = field(default_factory=dict)


class _MemoryScopeStore:
    """scopes.ScopeStore over one scope's dicts."""

    def __init__(self, scope: _Scope) -> None:
        self.scope = scope

    def load_limits(self) -> dict[Period, int]:
        return dict(self.scope.limits)

    def save_limit(self, period: Period, limit_micros: int | None) -> None:
        if limit_micros is None:
            self.scope.limits.pop(period, None)
        else:
            self.scope.limits[period] = limit_micros

    def load_policy(self) -> str:
        return self.scope.policy

    def save_policy(self, text: str) -> None:
        self.scope.policy = text

    def load_window(self, key: str) -> WindowTotals:
        return dataclasses.replace(self.scope.windows.get(key) or WindowTotals())

    def save_window(self, key: str, totals: WindowTotals) -> None:
        self.scope.windows[key] = dataclasses.replace(totals)

    def load_hold(self, hold_id: str) -> ScopeHold | None:
        found = self.scope.holds.get(hold_id)
        return found.copy() if found else None

    def due_holds(self, now_ms: int) -> list[ScopeHold]:
        due = [
            h.copy()
            for h in self.scope.holds.values()
            if h.status is ReservationStatus.HELD
            and h.expires_ms is not None
            and h.expires_ms <= now_ms
        ]
        return sorted(due, key=lambda h: (h.expires_ms or 0, h.hold_id))

    def save_hold(self, hold: ScopeHold) -> None:
        self.scope.holds[hold.hold_id] = hold.copy()
        settled = self.scope.settled
        settled.pop(hold.hold_id, None)
        if hold.status is not ReservationStatus.HELD and hold.settled_ms is not None:
            settled[hold.hold_id] = hold.settled_ms

    def prune_settled(self, before_ms: int, limit: int) -> None:
        settled = self.scope.settled
        for hold_id, settled_ms in list(itertools.islice(settled.items(), limit)):
            if settled_ms >= before_ms:
                return
            del settled[hold_id], self.scope.holds[hold_id]


class _MemoryStores:
    """saga.Stores over the model's dicts; remembers which runs it handed out."""

    def __init__(self, ledger: ModelLedger, tenant: str) -> None:
        self.ledger = ledger
        self.tenant = tenant
        self.touched: dict[str, int] = {}

    def run(self, run_id: str) -> _MemoryStore:
        key = (self.tenant, run_id)
        run = self.ledger._runs.setdefault(key, _Run())
        if run_id not in self.touched:
            self.touched[run_id] = run.account.revision if run.account else 0
        return _MemoryStore(run, self.ledger.log_retention)

    def scope(self, ref: ScopeRef) -> _MemoryScopeStore:
        return _MemoryScopeStore(self.ledger._scopes.setdefault((self.tenant, ref), _Scope()))

    def ring_changed(self, bell: ChangeBell) -> None:
        for run_id, before in self.touched.items():
            run = self.ledger._runs.get((self.tenant, run_id))
            if run is not None and run.account is None:
                del self.ledger._runs[(self.tenant, run_id)]  # looked up, never created
            elif run is not None and run.account is not None and run.account.revision != before:
                bell.ring(self.tenant, run_id)


class ModelLedger:
    """The in-memory reference ledger; implements backends.base.Backend."""

    def __init__(
        self,
        *,
        default_ttl_ms: int,
        clock: Clock | None = None,
        log_retention: int = 10_000,
    ) -> None:
        self.default_ttl_ms = default_ttl_ms
        self.clock = clock or SystemClock()
        self.log_retention = log_retention
        self._runs: dict[tuple[str, str], _Run] = {}
        self._scopes: dict[tuple[str, ScopeRef], _Scope] = {}
        self._prices: dict[str, tuple[int, dict[str, str]]] = {}
        self._bell = ChangeBell()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    def _op(self, tenant: str, op: Callable[[_MemoryStores, int], T]) -> T:
        """One operation over any runs and scopes, with nothing else in between."""
        stores = _MemoryStores(self, tenant)
        try:
            return op(stores, self.clock.now_ms())
        finally:
            stores.ring_changed(self._bell)

    async def create_run(self, tenant: str, spec: RunSpec) -> CreateRunResult:
        account, replayed = self._op(tenant, lambda s, now: saga.create_run(s, spec, now))
        return CreateRunResult(run=account.view(self.default_ttl_ms), replayed=replayed)

    async def get_run(self, tenant: str, run_id: str) -> RunView:
        account = self._op(tenant, lambda s, now: core.get_state(s.run(run_id), run_id, now))
        return account.view(self.default_ttl_ms)

    async def list_run_ids(
        self, tenant: str, from_ms: int, to_ms: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        found = sorted(
            (run.account.created_ms, run_id)
            for (owner, run_id), run in self._runs.items()
            if owner == tenant
            and run.account is not None
            and from_ms <= run.account.created_ms < to_ms
            and (after is None or (run.account.created_ms, run_id) > after)
        )
        return found[:limit]

    async def forget_listed_run(self, tenant: str, run_id: str) -> None:
        pass  # runs are listed from their own rows: nothing to forget

    async def reserve(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        amount_micros: int,
        ttl_ms: int | None,
        extras: saga.ReserveExtras = saga.NO_EXTRAS,
    ) -> ReserveResult:
        return self._op(
            tenant,
            lambda s, now: saga.reserve(
                s, run_id, reservation_id, amount_micros, ttl_ms, self.default_ttl_ms, now, extras
            ),
        )

    async def count_block(self, tenant: str, run_id: str, reservation_id: str) -> BudgetState:
        return self._op(
            tenant, lambda s, now: core.count_block(s.run(run_id), run_id, reservation_id, now)
        )

    async def get_reservation(self, tenant: str, run_id: str, reservation_id: str) -> Reservation:
        run = self._runs.get((tenant, run_id))
        if run is None or run.account is None:
            raise errors.RunNotFound(run_id)
        found = run.reservations.get(reservation_id)
        if found is None:
            raise errors.ReservationNotFound(run_id, reservation_id)
        return found.copy()

    async def commit(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        actual_micros: int,
        actual_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> CommitResult:
        return self._op(
            tenant,
            lambda s, now: saga.commit(
                s, run_id, reservation_id, actual_micros, now, actual_tokens, output_tokens
            ),
        )

    async def refund(self, tenant: str, run_id: str, reservation_id: str) -> RefundResult:
        return self._op(tenant, lambda s, now: saga.refund(s, run_id, reservation_id, now))

    async def close_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return self._op(tenant, lambda s, now: core.close_run(s.run(run_id), run_id, now))

    async def resolve_approval(
        self, tenant: str, run_id: str, trigger: str, approve: bool
    ) -> ApprovalResult:
        return self._op(
            tenant,
            lambda s, now: core.resolve_approval(s.run(run_id), run_id, trigger, approve, now),
        )

    async def suspend_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return self._op(tenant, lambda s, now: core.suspend_run(s.run(run_id), run_id, now))

    async def resume_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return self._op(tenant, lambda s, now: core.resume_run(s.run(run_id), run_id, now))

    async def set_scope_limit(
        self, tenant: str, ref: ScopeRef, period: Period, limit_micros: int | None
    ) -> ScopeView:
        return self._op(
            tenant, lambda s, now: scopes.set_limit(s.scope(ref), ref, period, limit_micros, now)
        )

    async def set_scope_policy(
        self, tenant: str, ref: ScopeRef, policy: RunPolicy | None
    ) -> ScopeView:
        return self._op(tenant, lambda s, now: scopes.set_policy(s.scope(ref), ref, policy, now))

    async def get_scope(self, tenant: str, ref: ScopeRef) -> ScopeView:
        return self._op(tenant, lambda s, now: scopes.view(s.scope(ref), ref, now))

    async def set_price_override(self, tenant: str, key: str, entry: str | None) -> bool:
        version, entries = self._prices.get(tenant, (0, {}))
        entries = dict(entries)
        if entry is None and key not in entries:
            return False
        if entry is None:
            del entries[key]
        else:
            entries[key] = entry
        self._prices[tenant] = (version + 1, entries)
        return True

    async def price_overrides(self, tenant: str) -> tuple[int, dict[str, str]]:
        version, entries = self._prices.get(tenant, (0, {}))
        return version, dict(entries)

    async def price_overrides_version(self, tenant: str) -> int:
        return self._prices.get(tenant, (0, {}))[0]

    async def sweep(self, max_runs: int) -> int:
        now_ms = self.clock.now_ms()
        released = 0
        max_scopes = max_runs  # as SQLite: up to max_runs runs, then max_runs scopes
        for (tenant, run_id), run in list(self._runs.items()):
            if max_runs <= 0:
                break
            store = _MemoryStore(run, self.log_retention)
            if run.account is None or not store.due_reservations(now_ms):
                continue
            max_runs -= 1
            released += core.expire_due(store, run_id, now_ms)
            self._bell.ring(tenant, run_id)
        for scope in self._scopes.values():
            if max_scopes <= 0:
                break
            scope_store = _MemoryScopeStore(scope)
            if scope_store.due_holds(now_ms):
                max_scopes -= 1
                released += scopes.expire_due(scope_store, now_ms)
        return released

    async def read_changes(
        self, tenant: str, run_id: str, after_revision: int, limit: int
    ) -> ChangePage:
        run = self._runs.get((tenant, run_id))
        if run is None or run.account is None:
            raise errors.RunNotFound(run_id)
        log = run.log
        head = run.account.revision
        floor = log[0].revision if log else head + 1
        start = max(0, after_revision + 1 - floor)
        return ChangePage(changes=log[start : start + limit], floor=floor, head=head)

    def forget(self, tenant: str, run_id: str) -> None:
        self._bell.forget(tenant, run_id)

    async def wait_for_change(
        self, tenant: str, run_id: str, after_revision: int, timeout_s: float
    ) -> None:
        event = self._bell.arm(tenant, run_id)
        run = self._runs.get((tenant, run_id))
        if run is None or run.account is None or run.account.revision <= after_revision:
            await wait_event(event, timeout_s)
