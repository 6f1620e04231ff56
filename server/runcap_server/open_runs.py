"""Cardinality limits on runs: open runs per principal, and the run TTL.

An agent loop that creates a run per step and never closes them would grow
the ledger without bound. So each principal (an API key, a certificate's
mapped key, or "anonymous" without authentication) may have at most
RUNCAP_MAX_OPEN_RUNS open runs, and a run still open RUNCAP_RUN_TTL after its
creation is closed by the server (its holds still settle, as with CloseRun).

The register lives beside the ledger in a store of its own (memory, SQLite
tables, or Redis keys of the tenant's `{t/@open}` slot), so admitting a run
is one atomic step whatever the backend. It is not on the Reserve path:
only CreateRun and CloseRun touch it.

Admission comes before the run is created. A crash in between leaves an
entry for a run that does not exist: it counts until the run TTL, when the
closer finds nothing to close and drops it. Counting a run too long errs on
the safe side; a run is never left uncounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
from typing import TYPE_CHECKING, Any, Protocol

from runcap_server import errors
from runcap_server.clock import Clock, SystemClock

if TYPE_CHECKING:
    from runcap_server.backends.base import Backend
    from runcap_server.backends.redis import RedisLedger
    from runcap_server.backends.sqlite import SqliteLedger

_log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
"""The principal of every call when authentication is off (--insecure-dev)."""

# The closer handles at most this many expired runs per pass.
CLOSE_BATCH = 100


class Admission(enum.Enum):
    NEW = "new"  # counted now: release it if the run is not created after all
    KNOWN = "known"  # the run was counted already (a CreateRun retry)


class OpenRunStore(Protocol):
    async def start(self) -> None: ...

    async def admit(
        self, tenant: str, principal: str, run_id: str, deadline_ms: int, limit: int
    ) -> Admission | None:
        """Counts the run against its principal, closing due by `deadline_ms`;
        None when the principal has `limit` open runs already (0: no limit)."""
        ...

    async def release(self, tenant: str, run_id: str) -> None:
        """Stops counting the run (closed, or never created). Idempotent."""
        ...

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` (tenant, run id) past their deadline."""
        ...


class MemoryOpenRuns:
    def __init__(self) -> None:
        # tenant -> run id -> (principal, deadline)
        self._runs: dict[str, dict[str, tuple[str, int]]] = {}

    async def start(self) -> None:
        return None

    async def admit(
        self, tenant: str, principal: str, run_id: str, deadline_ms: int, limit: int
    ) -> Admission | None:
        runs = self._runs.setdefault(tenant, {})
        if run_id in runs:
            return Admission.KNOWN
        if limit and sum(1 for p, _ in runs.values() if p == principal) >= limit:
            return None
        runs[run_id] = (principal, deadline_ms)
        return Admission.NEW

    async def release(self, tenant: str, run_id: str) -> None:
        self._runs.get(tenant, {}).pop(run_id, None)

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        found = [
            (deadline, tenant, run_id)
            for tenant, runs in self._runs.items()
            for run_id, (_, deadline) in runs.items()
            if deadline <= now_ms
        ]
        return [(tenant, run_id) for _, tenant, run_id in sorted(found)[:limit]]


_SQL_SCHEMA = """
CREATE TABLE IF NOT EXISTS open_runs (
    tenant TEXT NOT NULL,
    run_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    deadline_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, run_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS open_runs_by_principal ON open_runs (tenant, principal);
CREATE INDEX IF NOT EXISTS open_runs_by_deadline ON open_runs (deadline_ms)
"""


class SqliteOpenRuns:
    """Tables of their own in the ledger's file, created on start (so the
    ledger's schema version is not touched); one transaction per step."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self.ledger = ledger

    async def start(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            for statement in _SQL_SCHEMA.split(";"):
                conn.execute(statement)

        await self.ledger.transact(create)

    async def admit(
        self, tenant: str, principal: str, run_id: str, deadline_ms: int, limit: int
    ) -> Admission | None:
        def write(conn: sqlite3.Connection) -> Admission | None:
            known = conn.execute(
                "SELECT 1 FROM open_runs WHERE tenant = ? AND run_id = ?", (tenant, run_id)
            ).fetchone()
            if known:
                return Admission.KNOWN
            if limit:
                (count,) = conn.execute(
                    "SELECT COUNT(*) FROM open_runs WHERE tenant = ? AND principal = ?",
                    (tenant, principal),
                ).fetchone()
                if count >= limit:
                    return None
            conn.execute(
                "INSERT INTO open_runs VALUES (?, ?, ?, ?)",
                (tenant, run_id, principal, deadline_ms),
            )
            return Admission.NEW

        return await self.ledger.transact(write)

    async def release(self, tenant: str, run_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM open_runs WHERE tenant = ? AND run_id = ?", (tenant, run_id))

        await self.ledger.transact(write)

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT tenant, run_id FROM open_runs WHERE deadline_ms <= ? "
                "ORDER BY deadline_ms LIMIT ?",
                (now_ms, limit),
            ).fetchall()
            return [(tenant, run_id) for tenant, run_id in rows]

        return await self.ledger.transact(read, write=False)


# KEYS: the tenant's owners (HASH run -> principal), counts (HASH principal ->
# open runs) and deadlines (ZSET run -> deadline); all in the `{t/@open}` slot.
_ADMIT = """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 2 end
local limit = tonumber(ARGV[4])
if limit > 0 and tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') >= limit then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""
_RELEASE = """
local principal = redis.call('HGET', KEYS[1], ARGV[1])
if not principal then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HINCRBY', KEYS[2], principal, -1) <= 0 then
  redis.call('HDEL', KEYS[2], principal)
end
return 1
"""


class RedisOpenRuns:
    """Keys of tenant t (namespace `rc`), in the slot of `{t/@open}`:

        rc:{t/@open}:owner   HASH  run id -> principal
        rc:{t/@open}:count   HASH  principal -> open runs
        rc:{t/@open}:due     ZSET  run id by the time the run TTL closes it
        rc:{@open}:tenants   SET   tenants with counted runs (for the closer)

    Tenant ids never contain `{`, `}` or `/` (the edge's identifier rule).
    """

    def __init__(self, ledger: RedisLedger) -> None:
        self.ledger = ledger
        self.namespace = ledger.namespace

    def _keys(self, tenant: str) -> list[str]:
        tag = f"{self.namespace}:{{{tenant}/@open}}"
        return [f"{tag}:owner", f"{tag}:count", f"{tag}:due"]

    def _tenants(self) -> str:
        return f"{self.namespace}:{{@open}}:tenants"

    async def start(self) -> None:
        return None

    async def admit(
        self, tenant: str, principal: str, run_id: str, deadline_ms: int, limit: int
    ) -> Admission | None:
        keys = self._keys(tenant)
        args = (principal, run_id, deadline_ms, limit)

        async def run(client: Any) -> int:
            return int(await client.eval(_ADMIT, 3, *keys, *args))

        answer = await self.ledger.call(run)
        if answer == 0:
            return None
        if answer == 1:

            async def remember(client: Any) -> None:
                await client.sadd(self._tenants(), tenant)

            await self.ledger.call(remember)
            return Admission.NEW
        return Admission.KNOWN

    async def release(self, tenant: str, run_id: str) -> None:
        keys = self._keys(tenant)

        async def run(client: Any) -> None:
            await client.eval(_RELEASE, 3, *keys, run_id)

        await self.ledger.call(run)

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        async def tenants(client: Any) -> set[bytes]:
            return set(await client.smembers(self._tenants()))

        found: list[tuple[str, str]] = []
        for raw in sorted(await self.ledger.call(tenants)):
            tenant = raw.decode()
            if len(found) >= limit:
                break

            async def expired(
                client: Any, key: str = self._keys(tenant)[2], left: int = limit - len(found)
            ) -> list[bytes]:
                return list(await client.zrangebyscore(key, "-inf", now_ms, start=0, num=left))

            found += [(tenant, run_id.decode()) for run_id in await self.ledger.call(expired)]
        return found


def open_store(backend: object) -> OpenRunStore:
    """The register that lives beside this ledger backend."""
    from runcap_server.backends.redis import RedisLedger
    from runcap_server.backends.sqlite import SqliteLedger

    if isinstance(backend, SqliteLedger):
        return SqliteOpenRuns(backend)
    if isinstance(backend, RedisLedger):
        return RedisOpenRuns(backend)
    return MemoryOpenRuns()


class OpenRuns:
    """What the servicer and the closer use: the store with the settings."""

    def __init__(
        self, store: OpenRunStore, max_open_runs: int, run_ttl_ms: int, clock: Clock | None = None
    ) -> None:
        self.store = store
        self.max_open_runs = max_open_runs
        self.run_ttl_ms = run_ttl_ms
        self.clock: Clock = clock or SystemClock()

    async def admit(self, tenant: str, principal: str, run_id: str) -> Admission:
        """Counts a run about to be created; raises OpenRunLimit when the
        principal has its limit of open runs."""
        # No TTL still needs a deadline: far enough never to come.
        ttl = self.run_ttl_ms or 100 * 365 * 86_400_000
        deadline = self.clock.now_ms() + ttl
        admission = await self.store.admit(tenant, principal, run_id, deadline, self.max_open_runs)
        if admission is None:
            raise errors.OpenRunLimit(principal, self.max_open_runs)
        return admission

    async def release(self, tenant: str, run_id: str) -> None:
        await self.store.release(tenant, run_id)

    async def close_due(self, backend: Backend) -> int:
        """Closes the runs open longer than the run TTL; how many it handled."""
        due = await self.store.due(self.clock.now_ms(), CLOSE_BATCH)
        for tenant, run_id in due:
            with contextlib.suppress(errors.RunNotFound):
                await backend.close_run(tenant, run_id)
                _log.info(
                    "closed run %r of tenant %r: open longer than the run TTL", run_id, tenant
                )
            await self.store.release(tenant, run_id)
        return len(due)

    async def close_due_forever(self, backend: Backend, interval_s: float) -> None:
        while True:
            try:
                handled = await self.close_due(backend)
            except errors.BackendUnavailable as error:
                _log.warning("run TTL closer: %s", error.message)
                handled = 0
            # A full batch means more are due: go on at once.
            if handled < CLOSE_BATCH:
                await asyncio.sleep(interval_s)
