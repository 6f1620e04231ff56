"""Shared helpers for the ledger backend tests: every backend under test, one way.

`BACKENDS` names them; `open_backend` starts one on a ManualClock (SQLite on a
file under the given directory, Redis in a namespace of its own on the servers
the fixtures started) and closes it afterwards; `snapshot` reads a run's
stored rows without expiring anything, to compare backends.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis.stateful import run_state_machine_as_test

from runcap_server.backends.base import Backend
from runcap_server.backends.redis import RedisLedger
from runcap_server.backends.sqlite import SqliteLedger
from runcap_server.clock import ManualClock
from runcap_server.ledger.model import ModelLedger
from runcap_server.ledger.types import Account, Reservation, ScopeRef

BACKENDS = ("model", "sqlite", "redis", "redis-cluster")
DEFAULT_TTL_MS = 60_000
Ledger = ModelLedger | SqliteLedger | RedisLedger


@dataclass(frozen=True)
class RedisTargets:
    """Where the fixtures' Redis servers listen."""

    url: str = ""
    cluster_nodes: Sequence[str] = ()


NO_REDIS = RedisTargets()


def redis_targets(request: pytest.FixtureRequest, kind: str) -> RedisTargets:
    """Start (via fixtures) only the Redis topology `kind` needs."""
    if kind == "redis":
        return RedisTargets(url=request.getfixturevalue("redis_standalone").url)
    if kind == "redis-cluster":
        return RedisTargets(cluster_nodes=request.getfixturevalue("redis_cluster").startup_nodes)
    return RedisTargets()


def make_backend(
    kind: str,
    directory: Path,
    clock: ManualClock,
    *,
    default_ttl_ms: int = DEFAULT_TTL_MS,
    log_retention: int = 10_000,
    synchronous: str = "FULL",
    redis: RedisTargets = RedisTargets(),
) -> Ledger:
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
    if kind in ("redis", "redis-cluster"):
        target = redis.url if kind == "redis" else ""
        nodes = redis.cluster_nodes if kind == "redis-cluster" else ()
        assert target or nodes, f"{kind} needs its fixture: use redis_targets()"
        return RedisLedger(
            url=target or None,
            cluster_nodes=nodes,
            default_ttl_ms=default_ttl_ms,
            clock=clock,
            log_retention=log_retention,
            namespace=f"test-{uuid.uuid4().hex[:12]}",
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
    redis: RedisTargets = RedisTargets(),
) -> AsyncIterator[Ledger]:
    """A started backend, closed on exit."""
    backend = make_backend(
        kind,
        directory,
        clock,
        default_ttl_ms=default_ttl_ms,
        log_retention=log_retention,
        synchronous=synchronous,
        redis=redis,
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def snapshot(
    backend: Ledger, tenant: str, run_id: str
) -> tuple[Account | None, list[Reservation]]:
    """A run's account and reservations (by id) as stored, nothing expired."""
    if isinstance(backend, SqliteLedger | RedisLedger):
        return await backend.snapshot(tenant, run_id)
    run = backend._runs.get((tenant, run_id))
    if run is None:
        return None, []
    reservations = [r.copy() for _, r in sorted(run.reservations.items())]
    return (run.account.copy() if run.account else None), reservations


async def scope_hold_ids(backend: Ledger, tenant: str, ref: ScopeRef) -> set[str]:
    """The ids of every hold record a parent scope keeps, settled ones included."""
    if isinstance(backend, SqliteLedger):

        def body(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                "SELECT hold_id FROM scope_holds WHERE tenant = ? AND scope = ?",
                (tenant, ref.token),
            )
            return {row[0] for row in rows}

        return await backend.transact(body, write=False)
    if isinstance(backend, RedisLedger):
        key = backend._scope_keys(tenant, ref)[2]
        ids = await backend.call(lambda client: client.hkeys(key))
        return {i.decode() for i in ids}
    scope = backend._scopes.get((tenant, ref))
    return set(scope.holds) if scope else set()


def as_backend(backend: Ledger) -> Backend:
    """All implement the Backend protocol (checked by mypy here)."""
    return backend


def check_machine(
    machine: type[Any], settings: Any, kinds: tuple[str, ...], redis: RedisTargets = NO_REDIS
) -> None:
    """Run a Hypothesis state machine that holds the backends `kinds` to the model."""
    configured = type("Machine", (machine,), {"kinds": kinds, "redis": redis})
    run_state_machine_as_test(configured, settings=settings)
