"""The small protocol every ledger backend implements.

A backend owns storage and atomicity; the semantics live in
`runcap_server.ledger.core` (or, for Redis, in scripts that pass the same
conformance suite). Arguments arrive validated by the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from runcap_server.ledger.saga import NO_EXTRAS, ReserveExtras
from runcap_server.ledger.scopes import ScopeView
from runcap_server.ledger.types import (
    ApprovalResult,
    BudgetState,
    ChangePage,
    CloseRunResult,
    CommitResult,
    CreateRunResult,
    Period,
    RefundResult,
    Reservation,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunView,
    ScopeRef,
)


class Backend(Protocol):
    async def start(self) -> None:
        """Open connections and prepare storage. Called once before use."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise BackendUnavailable unless storage answers."""
        ...

    async def create_run(self, tenant: str, spec: RunSpec) -> CreateRunResult: ...

    async def get_run(self, tenant: str, run_id: str) -> RunView: ...

    async def list_run_ids(
        self, tenant: str, from_ms: int, to_ms: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        """Up to `limit` runs created in [from_ms, to_ms), as (created_ms,
        run_id), in that order, after the `after` cursor. From an index, not
        a scan of every key; a run that aged out may still be listed (its
        GetRun is then NOT_FOUND)."""
        ...

    async def forget_listed_run(self, tenant: str, run_id: str) -> None:
        """Drops a run that aged out from the listing index (if it has one)."""
        ...

    async def reserve(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        amount_micros: int,
        ttl_ms: int | None,
        extras: ReserveExtras = NO_EXTRAS,
    ) -> ReserveResult: ...

    async def count_block(self, tenant: str, run_id: str, reservation_id: str) -> BudgetState:
        """Count a block Reserve left uncounted (Reservation.uncounted) once the
        server answers it as a block after all (no downgrade held): idempotent,
        one atomic write. Returns the run's state after it."""
        ...

    async def get_reservation(self, tenant: str, run_id: str, reservation_id: str) -> Reservation:
        """A reservation's record as stored (nothing expired); raises if unknown."""
        ...

    async def commit(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        actual_micros: int,
        actual_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> CommitResult:
        """Settle with the actual cost; `actual_tokens` (an LLM call's usage)
        replaces the tokens held, when given, and `output_tokens` (its output,
        reasoning included) feed a CALIBRATED run's samples."""
        ...

    async def refund(self, tenant: str, run_id: str, reservation_id: str) -> RefundResult: ...

    async def close_run(self, tenant: str, run_id: str) -> CloseRunResult: ...

    async def resolve_approval(
        self, tenant: str, run_id: str, trigger: str, approve: bool
    ) -> ApprovalResult:
        """Approve (or deny) one of the run's requested escalations."""
        ...

    async def suspend_run(self, tenant: str, run_id: str) -> CloseRunResult: ...

    async def resume_run(self, tenant: str, run_id: str) -> CloseRunResult: ...

    async def set_scope_limit(
        self, tenant: str, ref: ScopeRef, period: Period, limit_micros: int | None
    ) -> ScopeView:
        """Set (or, with None, clear) one ceiling of an API key, user or team."""
        ...

    async def set_scope_policy(
        self, tenant: str, ref: ScopeRef, policy: RunPolicy | None
    ) -> ScopeView:
        """Set (or, with None, clear) the policy new root runs of the scope get."""
        ...

    async def get_scope(self, tenant: str, ref: ScopeRef) -> ScopeView: ...

    async def set_price_override(self, tenant: str, key: str, entry: str | None) -> bool:
        """Store (or, with None, delete) a tenant's model price, bumping the
        tenant's version. Returns False only for deleting a price never set."""
        ...

    async def price_overrides(self, tenant: str) -> tuple[int, dict[str, str]]:
        """The tenant's version and every stored price, read together."""
        ...

    async def price_overrides_version(self, tenant: str) -> int: ...

    async def sweep(self, max_runs: int) -> int:
        """Release due holds on up to max_runs runs. Returns holds released."""
        ...

    async def read_changes(
        self, tenant: str, run_id: str, after_revision: int, limit: int
    ) -> ChangePage:
        """Up to `limit` logged changes with revision > after_revision, in order."""
        ...

    async def wait_for_change(
        self, tenant: str, run_id: str, after_revision: int, timeout_s: float
    ) -> None:
        """Return once the run may be past after_revision, or after timeout_s.

        A hint only (it may wake early); readers confirm with read_changes.
        """
        ...

    def forget(self, tenant: str, run_id: str) -> None:
        """This process stopped watching the run: drop what wait_for_change kept."""
        ...


class ChangeBell:
    """In-process doorbell: writers ring a run's key, feeds wait on it."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}

    def ring(self, tenant: str, run_id: str) -> None:
        event = self._events.pop((tenant, run_id), None)
        if event is not None:
            event.set()

    def forget(self, tenant: str, run_id: str) -> None:
        self._events.pop((tenant, run_id), None)

    def arm(self, tenant: str, run_id: str) -> asyncio.Event:
        """An event set by the next ring. Arm before checking, then wait."""
        return self._events.setdefault((tenant, run_id), asyncio.Event())


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
