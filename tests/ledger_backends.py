"""Shared helpers for the ledger backend tests: every backend under test, one way.

`BACKENDS` names them; `open_backend` starts one on a ManualClock (SQLite on a
file under the given directory) and closes it afterwards; `snapshot` reads a
run's stored rows without expiring anything, to compare backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from runcap_server.backends.base import Backend
from runcap_server.backends.sqlite import SqliteLedger
from runcap_server.clock import ManualClock
from runcap_server.ledger.model import ModelLedger
from runcap_server.ledger.types import Account, Reservation

BACKENDS = ("model", "sqlite")
DEFAULT_TTL_MS = 60_000


def make_backend(
    kind: str,
    directory: Path,
    clock: ManualClock,
    *,
    default_ttl_ms: int = DEFAULT_TTL_MS,
    log_retention: int = 10_000,
    synchronous: str = "FULL",
) -> ModelLedger | SqliteLedger:
    """A backend that is not started yet."""
    if kind == "model":
        return ModelLedger(default_ttl_ms=default_ttl_ms, clock=clock, log_retention=log_retention)
    if kind == "sqlite":
        return SqliteLedger(
            path=str(directory / "ledger.db"),
            default_ttl_ms=default_ttl_ms,
            clock=clock,
            log_retention=log_retention,
            synchronous=synchronous,
        )
    raise ValueError(f"unknown backend {kind!r}")


@asynccontextmanager
async def open_backend(
    kind: str,
    directory: Path,
    clock: ManualClock,
    *,
    default_ttl_ms: int = DEFAULT_TTL_MS,
    log_retention: int = 10_000,
    synchronous: str = "FULL",
) -> AsyncIterator[ModelLedger | SqliteLedger]:
    """A started backend, closed on exit."""
    backend = make_backend(
        kind,
        directory,
        clock,
        default_ttl_ms=default_ttl_ms,
        log_retention=log_retention,
        synchronous=synchronous,
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def snapshot(
    backend: ModelLedger | SqliteLedger, tenant: str, run_id: str
) -> tuple[Account | None, list[Reservation]]:
    """A run's account and reservations (by id) as stored, nothing expired."""
    if isinstance(backend, SqliteLedger):
        return await backend.snapshot(tenant, run_id)
    run = backend._runs.get((tenant, run_id))
    if run is None:
        return None, []
    reservations = [r.copy() for _, r in sorted(run.reservations.items())]
    return (run.account.copy() if run.account else None), reservations


def as_backend(backend: ModelLedger | SqliteLedger) -> Backend:
    """Both implement the Backend protocol (checked by mypy here)."""
    return backend
