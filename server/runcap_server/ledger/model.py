"""The reference model: the ledger in memory, one dict per run.

It is the oracle the storage backends are compared against step by step, and
a backend in its own right (`RUNCAP_BACKEND=memory`, nothing survives a
restart).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runcap_server import errors
from runcap_server.backends.base import ChangeBell, wait_event
from runcap_server.clock import Clock, SystemClock
from runcap_server.ledger import core
from runcap_server.ledger.types import (
    Account,
    Change,
    ChangePage,
    CloseRunResult,
    CommitResult,
    CreateRunResult,
    RefundResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    RunSpec,
    RunView,
)


@dataclass
class _Run:
    account: Account | None = None
    reservations: dict[str, Reservation] = field(default_factory=dict)
    log: list[Change] = field(default_factory=list)


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
        self._bell = ChangeBell()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    def _store(self, tenant: str, run_id: str, create: bool = False) -> _MemoryStore:
        key = (tenant, run_id)
        run = self._runs.get(key)
        if run is None:
            run = _Run()
            if create:
                self._runs[key] = run
        return _MemoryStore(run, self.log_retention)

    def _existing(self, tenant: str, run_id: str) -> _MemoryStore:
        store = self._store(tenant, run_id)
        if store.run.account is None:
            raise errors.RunNotFound(run_id)
        return store

    def _rang(self, tenant: str, run_id: str, before: int, store: _MemoryStore) -> None:
        if store.run.account and store.run.account.revision != before:
            self._bell.ring(tenant, run_id)

    async def create_run(self, tenant: str, spec: RunSpec) -> CreateRunResult:
        store = self._store(tenant, spec.run_id, create=True)
        account, replayed = core.create_run(store, spec, self.clock.now_ms())
        self._bell.ring(tenant, spec.run_id)
        return CreateRunResult(run=account.view(self.default_ttl_ms), replayed=replayed)

    async def get_run(self, tenant: str, run_id: str) -> RunView:
        store = self._existing(tenant, run_id)
        before = store.run.account.revision if store.run.account else 0
        account = core.get_state(store, run_id, self.clock.now_ms())
        self._rang(tenant, run_id, before, store)
        return account.view(self.default_ttl_ms)

    async def reserve(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        amount_micros: int,
        ttl_ms: int | None,
    ) -> ReserveResult:
        store = self._existing(tenant, run_id)
        assert store.run.account is not None
        before = store.run.account.revision
        result = core.reserve(
            store,
            run_id,
            reservation_id,
            amount_micros,
            ttl_ms,
            self.default_ttl_ms,
            self.clock.now_ms(),
        )
        self._rang(tenant, run_id, before, store)
        return result

    async def commit(
        self, tenant: str, run_id: str, reservation_id: str, actual_micros: int
    ) -> CommitResult:
        store = self._existing(tenant, run_id)
        before = store.run.account.revision if store.run.account else 0
        result = core.commit(store, run_id, reservation_id, actual_micros, self.clock.now_ms())
        self._rang(tenant, run_id, before, store)
        return result

    async def refund(self, tenant: str, run_id: str, reservation_id: str) -> RefundResult:
        store = self._existing(tenant, run_id)
        before = store.run.account.revision if store.run.account else 0
        result = core.refund(store, run_id, reservation_id, self.clock.now_ms())
        self._rang(tenant, run_id, before, store)
        return result

    async def close_run(self, tenant: str, run_id: str) -> CloseRunResult:
        store = self._existing(tenant, run_id)
        before = store.run.account.revision if store.run.account else 0
        result = core.close_run(store, run_id, self.clock.now_ms())
        self._rang(tenant, run_id, before, store)
        return result

    async def sweep(self, max_runs: int) -> int:
        now_ms = self.clock.now_ms()
        released = 0
        for (tenant, run_id), run in list(self._runs.items()):
            if max_runs <= 0:
                break
            store = _MemoryStore(run, self.log_retention)
            if run.account is None or not store.due_reservations(now_ms):
                continue
            max_runs -= 1
            released += core.expire_due(store, run_id, now_ms)
            self._bell.ring(tenant, run_id)
        return released

    async def read_changes(
        self, tenant: str, run_id: str, after_revision: int, limit: int
    ) -> ChangePage:
        store = self._existing(tenant, run_id)
        assert store.run.account is not None
        log = store.run.log
        head = store.run.account.revision
        floor = log[0].revision if log else head + 1
        start = max(0, after_revision + 1 - floor)
        return ChangePage(changes=log[start : start + limit], floor=floor, head=head)

    def forget(self, tenant: str, run_id: str) -> None:
        self._bell.forget(tenant, run_id)

    async def wait_for_change(
        self, tenant: str, run_id: str, after_revision: int, timeout_s: float
    ) -> None:
        event = self._bell.arm(tenant, run_id)
        account = self._store(tenant, run_id).run.account
        if account is None or account.revision <= after_revision:
            await wait_event(event, timeout_s)
