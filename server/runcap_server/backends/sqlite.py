"""The SQLite backend: the ledger in one local database file.

The semantics are `runcap_server.ledger.core`'s; this module only maps a
`core.RunStore` onto SQL rows. One connection, used by one dedicated worker
thread, runs every operation as one `BEGIN IMMEDIATE ... COMMIT` transaction,
so operations are serialized (and linearizable) and a failed operation leaves
nothing behind. Server time is read inside the transaction, so the change log's
times follow the order of the transactions.

Storage failures (disk I/O errors, a database locked beyond the busy timeout)
are turned into `errors.BackendUnavailable` in one place, `_call`: the service
fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from runcap_server import errors
from runcap_server.backends.base import ChangeBell, wait_event
from runcap_server.clock import Clock, SystemClock
from runcap_server.ledger import core, saga, scopes
from runcap_server.ledger.scopes import ScopeHold, ScopeView, WindowTotals
from runcap_server.ledger.types import (
    DEFAULT_MAX_DEPTH,
    MAX_RUN_DEPTH,
    Account,
    ApprovalResult,
    BudgetState,
    Change,
    ChangePage,
    CloseRunResult,
    CommitResult,
    CreateRunResult,
    DecisionReason,
    Dimension,
    EventType,
    Lineage,
    Period,
    RefundResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunStatus,
    RunView,
    ScopeRef,
    Threshold,
    decode_approvals,
    decode_calibration,
    decode_dims,
    decode_given_policy,
    decode_usage,
    encode_approvals,
    encode_calibration,
    encode_dims,
    encode_given_policy,
    encode_usage,
)

T = TypeVar("T")

SCHEMA_VERSION = 8
SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

# Every table is keyed by (tenant, run_id, ...): a run's rows are one range of
# each primary key. STRICT keeps every column an exact integer (or text).
_HELD = int(ReservationStatus.HELD)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    tenant TEXT NOT NULL,
    run_id TEXT NOT NULL,
    limit_micros INTEGER NOT NULL,
    labels TEXT NOT NULL,
    default_ttl_ms INTEGER,
    created_ms INTEGER NOT NULL,
    closed_ms INTEGER,
    status INTEGER NOT NULL,
    committed_micros INTEGER NOT NULL,
    reserved_micros INTEGER NOT NULL,
    overrun_micros INTEGER NOT NULL,
    active_reservations INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    digest TEXT NOT NULL DEFAULT '',
    parent_run_id TEXT NOT NULL DEFAULT '',
    api_key_id TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '',
    team_id TEXT NOT NULL DEFAULT '',
    lineage TEXT NOT NULL DEFAULT '',
    spec_policy TEXT NOT NULL DEFAULT '',
    policy TEXT NOT NULL DEFAULT '',
    threshold INTEGER NOT NULL DEFAULT 0,
    throttle_strikes INTEGER NOT NULL DEFAULT 0,
    throttle_until_ms INTEGER NOT NULL DEFAULT 0,
    rate_window_ms INTEGER NOT NULL DEFAULT 0,
    rate_count INTEGER NOT NULL DEFAULT 0,
    children INTEGER NOT NULL DEFAULT 0,
    usage TEXT NOT NULL DEFAULT '',
    approvals TEXT NOT NULL DEFAULT '',
    exposure_micros INTEGER NOT NULL DEFAULT 0,
    calibration TEXT NOT NULL DEFAULT '',
    blocked INTEGER NOT NULL DEFAULT 0,
    blocked_calls INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, run_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS reservations (
    tenant TEXT NOT NULL,
    run_id TEXT NOT NULL,
    reservation_id TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    requested_ttl_ms INTEGER,
    status INTEGER NOT NULL,
    reason INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    held_micros INTEGER NOT NULL,
    expires_ms INTEGER,
    actual_micros INTEGER,
    overrun_micros INTEGER NOT NULL,
    settled_ms INTEGER,
    blocking_scope TEXT,
    blocking_period INTEGER,
    fingerprint TEXT NOT NULL DEFAULT '',
    pricing TEXT NOT NULL DEFAULT '',
    dims TEXT NOT NULL DEFAULT '',
    dimension INTEGER,
    meter TEXT NOT NULL DEFAULT '',
    retry_at_ms INTEGER,
    uncounted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, run_id, reservation_id)
) STRICT, WITHOUT ROWID;

-- ListRuns: a tenant's runs by creation time.
CREATE INDEX IF NOT EXISTS runs_by_creation ON runs (tenant, created_ms, run_id);

-- The sweeper's scan: due holds of every run, oldest first.
CREATE INDEX IF NOT EXISTS reservations_held_by_expiry
    ON reservations (expires_ms) WHERE status = {_HELD};

-- One run's due holds, for the lazy expiry of every operation.
CREATE INDEX IF NOT EXISTS reservations_held_by_run
    ON reservations (tenant, run_id, expires_ms) WHERE status = {_HELD};

CREATE TABLE IF NOT EXISTS changes (
    tenant TEXT NOT NULL,
    run_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    type INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    reservation_id TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    actual_micros INTEGER NOT NULL,
    overrun_micros INTEGER NOT NULL,
    late INTEGER NOT NULL,
    state_limit_micros INTEGER NOT NULL,
    state_committed_micros INTEGER NOT NULL,
    state_reserved_micros INTEGER NOT NULL,
    state_status INTEGER NOT NULL,
    state_active_reservations INTEGER NOT NULL,
    state_overrun_micros INTEGER NOT NULL,
    state_digest TEXT NOT NULL DEFAULT '',
    threshold INTEGER NOT NULL DEFAULT 0,
    state_threshold INTEGER NOT NULL DEFAULT 0,
    state_committed_tokens INTEGER NOT NULL DEFAULT 0,
    state_reserved_tokens INTEGER NOT NULL DEFAULT 0,
    approval TEXT NOT NULL DEFAULT '',
    state_exposure_micros INTEGER NOT NULL DEFAULT 0,
    state_exposure_ceiling_micros INTEGER NOT NULL DEFAULT 0,
    state_blocked INTEGER NOT NULL DEFAULT 0,
    reason INTEGER,
    blocking_scope TEXT,
    blocking_period INTEGER,
    dimension INTEGER,
    meter TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, run_id, revision)
) STRICT, WITHOUT ROWID;

-- Parent scopes (API keys, users, teams): a scope is (tenant, scope), where
-- scope is its ScopeRef token such as "team:acme".
CREATE TABLE IF NOT EXISTS scope_limits (
    tenant TEXT NOT NULL,
    scope TEXT NOT NULL,
    period INTEGER NOT NULL,
    limit_micros INTEGER NOT NULL,
    PRIMARY KEY (tenant, scope, period)
) STRICT, WITHOUT ROWID;

-- A scope's default run policy (SetScopePolicy), created on open so older
-- ledgers gain it too.
CREATE TABLE IF NOT EXISTS scope_policies (
    tenant TEXT NOT NULL,
    scope TEXT NOT NULL,
    policy TEXT NOT NULL,
    PRIMARY KEY (tenant, scope)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS scope_windows (
    tenant TEXT NOT NULL,
    scope TEXT NOT NULL,
    window TEXT NOT NULL,
    committed_micros INTEGER NOT NULL,
    reserved_micros INTEGER NOT NULL,
    overrun_micros INTEGER NOT NULL,
    active_reservations INTEGER NOT NULL,
    PRIMARY KEY (tenant, scope, window)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS scope_holds (
    tenant TEXT NOT NULL,
    scope TEXT NOT NULL,
    hold_id TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    status INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    windows TEXT NOT NULL,
    expires_ms INTEGER,
    actual_micros INTEGER,
    overrun_micros INTEGER NOT NULL,
    settled_ms INTEGER,
    blocking_period INTEGER,
    PRIMARY KEY (tenant, scope, hold_id)
) STRICT, WITHOUT ROWID;

-- A tenant's own model prices (price table entries as JSON) and their version.
CREATE TABLE IF NOT EXISTS price_overrides (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (tenant, key)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS price_override_versions (
    tenant TEXT NOT NULL PRIMARY KEY,
    version INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS scope_holds_held_by_expiry
    ON scope_holds (expires_ms) WHERE status = {_HELD};
CREATE INDEX IF NOT EXISTS scope_holds_held_by_scope
    ON scope_holds (tenant, scope, expires_ms) WHERE status = {_HELD};
-- Settled holds, the oldest first: pruned (scopes.SETTLED_HOLD_RETENTION_MS).
CREATE INDEX IF NOT EXISTS scope_holds_settled
    ON scope_holds (tenant, scope, settled_ms) WHERE status != {_HELD};
"""

_ACCOUNT_COLUMNS = (
    "limit_micros, labels, default_ttl_ms, created_ms, closed_ms, status, "
    "committed_micros, reserved_micros, overrun_micros, active_reservations, revision, digest, "
    "parent_run_id, api_key_id, user_id, team_id, lineage, spec_policy, policy, threshold, "
    "throttle_strikes, throttle_until_ms, rate_window_ms, rate_count, children, usage, "
    "approvals, exposure_micros, calibration, blocked, blocked_calls"
)
_RESERVATION_COLUMNS = (
    "reservation_id, amount_micros, requested_ttl_ms, status, reason, created_ms, "
    "held_micros, expires_ms, actual_micros, overrun_micros, settled_ms, "
    "blocking_scope, blocking_period, fingerprint, pricing, dims, dimension, meter, retry_at_ms, "
    "uncounted"
)
_HOLD_COLUMNS = (
    "hold_id, amount_micros, status, created_ms, windows, expires_ms, actual_micros, "
    "overrun_micros, settled_ms, blocking_period"
)
_CHANGE_COLUMNS = (
    "revision, type, time_ms, reservation_id, amount_micros, actual_micros, overrun_micros, "
    "late, state_limit_micros, state_committed_micros, state_reserved_micros, state_status, "
    "state_active_reservations, state_overrun_micros, state_digest, threshold, "
    "state_threshold, state_committed_tokens, state_reserved_tokens, approval, "
    "state_exposure_micros, state_exposure_ceiling_micros, state_blocked, reason, "
    "blocking_scope, blocking_period, dimension, meter"
)


def _values(columns: str) -> str:
    """The VALUES clause for (tenant, key, *columns)."""
    return "VALUES (" + ", ".join("?" * (2 + columns.count(",") + 1)) + ")"


def _encode_labels(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


def _decode_labels(text: str) -> dict[str, str]:
    return cast(dict[str, str], json.loads(text))


def _account(run_id: str, row: tuple[Any, ...]) -> Account:
    return Account(
        spec=RunSpec(
            run_id=run_id,
            limit_micros=row[0],
            labels=_decode_labels(row[1]),
            default_ttl_ms=row[2],
            parent_run_id=row[12],
            api_key_id=row[13],
            user_id=row[14],
            team_id=row[15],
            policy=decode_given_policy(row[17]),
        ),
        lineage=Lineage.decode(row[16]),
        policy=RunPolicy.decode(row[18]),
        created_ms=row[3],
        closed_ms=row[4],
        status=RunStatus(row[5]),
        committed_micros=row[6],
        reserved_micros=row[7],
        overrun_micros=row[8],
        active_reservations=row[9],
        revision=row[10],
        digest=row[11],
        threshold=Threshold(row[19]),
        throttle_strikes=row[20],
        throttle_until_ms=row[21],
        rate_window_ms=row[22],
        rate_count=row[23],
        children=row[24],
        usage=decode_usage(row[25]),
        approvals=decode_approvals(row[26]),
        exposure_micros=row[27],
        calibration=decode_calibration(row[28]),
        blocked=bool(row[29]),
        blocked_calls=row[30],
    )


def _reservation(row: tuple[Any, ...]) -> Reservation:
    return Reservation(
        reservation_id=row[0],
        amount_micros=row[1],
        requested_ttl_ms=row[2],
        status=ReservationStatus(row[3]),
        reason=DecisionReason(row[4]),
        created_ms=row[5],
        held_micros=row[6],
        expires_ms=row[7],
        actual_micros=row[8],
        overrun_micros=row[9],
        settled_ms=row[10],
        blocking_scope=ScopeRef.parse(row[11]) if row[11] else None,
        blocking_period=Period(row[12]) if row[12] else None,
        fingerprint=row[13],
        pricing=row[14],
        dims=decode_dims(row[15]),
        dimension=Dimension(row[16]) if row[16] else None,
        meter=row[17],
        retry_at_ms=row[18],
        uncounted=bool(row[19]),
    )


def _hold(row: tuple[Any, ...]) -> ScopeHold:
    return ScopeHold(
        hold_id=row[0],
        amount_micros=row[1],
        status=ReservationStatus(row[2]),
        created_ms=row[3],
        windows=tuple(row[4].split(",")),
        expires_ms=row[5],
        actual_micros=row[6],
        overrun_micros=row[7],
        settled_ms=row[8],
        blocking_period=Period(row[9]) if row[9] else None,
    )


def _change(run_id: str, row: tuple[Any, ...]) -> Change:
    return Change(
        revision=row[0],
        type=EventType(row[1]),
        time_ms=row[2],
        reservation_id=row[3],
        amount_micros=row[4],
        actual_micros=row[5],
        overrun_micros=row[6],
        late=bool(row[7]),
        threshold=Threshold(row[15]),
        approval=row[19],
        reason=DecisionReason(row[23]) if row[23] else None,
        blocking_scope=ScopeRef.parse(row[24]) if row[24] else None,
        blocking_period=Period(row[25]) if row[25] else None,
        dimension=Dimension(row[26]) if row[26] else None,
        meter=row[27],
        state=BudgetState(
            run_id=run_id,
            limit_micros=row[8],
            committed_micros=row[9],
            reserved_micros=row[10],
            revision=row[0],
            status=RunStatus(row[11]),
            active_reservations=row[12],
            overrun_micros=row[13],
            threshold=Threshold(row[16]),
            committed_tokens=row[17],
            reserved_tokens=row[18],
            digest=row[14],
            exposure_micros=row[20],
            exposure_ceiling_micros=row[21],
            blocked=bool(row[22]),
        ),
    )


class _SqlStore:
    """core.RunStore over one run's rows, inside the worker's open transaction."""

    def __init__(self, conn: sqlite3.Connection, tenant: str, run_id: str, retention: int) -> None:
        self.conn = conn
        self.tenant = tenant
        self.run_id = run_id
        self.retention = retention
        # The account as this transaction last read or wrote it: an operation
        # (and the saga around it) reads the row once.
        self._account: Account | None = None
        self._loaded = False

    def load_account(self) -> Account | None:
        if not self._loaded:
            row = self.conn.execute(
                f"SELECT {_ACCOUNT_COLUMNS} FROM runs WHERE tenant = ? AND run_id = ?",
                (self.tenant, self.run_id),
            ).fetchone()
            self._account = _account(self.run_id, row) if row is not None else None
            self._loaded = True
        return self._account.copy() if self._account is not None else None

    def revision(self) -> int | None:
        if self._loaded:
            return self._account.revision if self._account is not None else None
        row = self.conn.execute(
            "SELECT revision FROM runs WHERE tenant = ? AND run_id = ?",
            (self.tenant, self.run_id),
        ).fetchone()
        return cast(int, row[0]) if row is not None else None

    def load_reservation(self, reservation_id: str) -> Reservation | None:
        row = self.conn.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM reservations "
            "WHERE tenant = ? AND run_id = ? AND reservation_id = ?",
            (self.tenant, self.run_id, reservation_id),
        ).fetchone()
        return _reservation(row) if row is not None else None

    def load_reservations(self) -> list[Reservation]:
        rows = self.conn.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM reservations "
            "WHERE tenant = ? AND run_id = ? ORDER BY reservation_id",
            (self.tenant, self.run_id),
        ).fetchall()
        return [_reservation(row) for row in rows]

    def due_reservations(self, now_ms: int) -> list[Reservation]:
        rows = self.conn.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM reservations "
            f"WHERE tenant = ? AND run_id = ? AND status = {_HELD} AND expires_ms <= ? "
            "ORDER BY expires_ms, reservation_id",
            (self.tenant, self.run_id, now_ms),
        ).fetchall()
        return [_reservation(row) for row in rows]

    def save_account(self, account: Account) -> None:
        self._account, self._loaded = account.copy(), True
        spec = account.spec
        self.conn.execute(
            f"INSERT INTO runs (tenant, run_id, {_ACCOUNT_COLUMNS}) {_values(_ACCOUNT_COLUMNS)} "
            "ON CONFLICT (tenant, run_id) DO UPDATE SET "
            "closed_ms = excluded.closed_ms, status = excluded.status, "
            "committed_micros = excluded.committed_micros, "
            "reserved_micros = excluded.reserved_micros, "
            "overrun_micros = excluded.overrun_micros, "
            "active_reservations = excluded.active_reservations, "
            "revision = excluded.revision, digest = excluded.digest, "
            "threshold = excluded.threshold, throttle_strikes = excluded.throttle_strikes, "
            "throttle_until_ms = excluded.throttle_until_ms, "
            "rate_window_ms = excluded.rate_window_ms, rate_count = excluded.rate_count, "
            "children = excluded.children, usage = excluded.usage, "
            "approvals = excluded.approvals, exposure_micros = excluded.exposure_micros, "
            "calibration = excluded.calibration, blocked = excluded.blocked, "
            "blocked_calls = excluded.blocked_calls",
            (
                self.tenant,
                self.run_id,
                spec.limit_micros,
                _encode_labels(spec.labels),
                spec.default_ttl_ms,
                account.created_ms,
                account.closed_ms,
                int(account.status),
                account.committed_micros,
                account.reserved_micros,
                account.overrun_micros,
                account.active_reservations,
                account.revision,
                account.digest,
                spec.parent_run_id,
                spec.api_key_id,
                spec.user_id,
                spec.team_id,
                account.lineage.encode(),
                encode_given_policy(spec.policy),
                account.policy.encode(),
                int(account.threshold),
                account.throttle_strikes,
                account.throttle_until_ms,
                account.rate_window_ms,
                account.rate_count,
                account.children,
                encode_usage(account.usage),
                encode_approvals(account.approvals),
                account.exposure_micros,
                encode_calibration(account.calibration),
                int(account.blocked),
                account.blocked_calls,
            ),
        )

    def save_reservation(self, reservation: Reservation) -> None:
        r = reservation
        self.conn.execute(
            f"INSERT OR REPLACE INTO reservations (tenant, run_id, {_RESERVATION_COLUMNS}) "
            f"{_values(_RESERVATION_COLUMNS)}",
            (
                self.tenant,
                self.run_id,
                r.reservation_id,
                r.amount_micros,
                r.requested_ttl_ms,
                int(r.status),
                int(r.reason),
                r.created_ms,
                r.held_micros,
                r.expires_ms,
                r.actual_micros,
                r.overrun_micros,
                r.settled_ms,
                r.blocking_scope.token if r.blocking_scope else None,
                int(r.blocking_period) if r.blocking_period else None,
                r.fingerprint,
                r.pricing,
                encode_dims(r.dims),
                int(r.dimension) if r.dimension else None,
                r.meter,
                r.retry_at_ms,
                int(r.uncounted),
            ),
        )

    def append_change(self, change: Change) -> None:
        s = change.state
        self.conn.execute(
            f"INSERT INTO changes (tenant, run_id, {_CHANGE_COLUMNS}) {_values(_CHANGE_COLUMNS)}",
            (
                self.tenant,
                self.run_id,
                change.revision,
                int(change.type),
                change.time_ms,
                change.reservation_id,
                change.amount_micros,
                change.actual_micros,
                change.overrun_micros,
                int(change.late),
                s.limit_micros,
                s.committed_micros,
                s.reserved_micros,
                int(s.status),
                s.active_reservations,
                s.overrun_micros,
                s.digest,
                int(change.threshold),
                int(s.threshold),
                s.committed_tokens,
                s.reserved_tokens,
                change.approval,
                s.exposure_micros,
                s.exposure_ceiling_micros,
                int(s.blocked),
                int(change.reason) if change.reason else None,
                change.blocking_scope.token if change.blocking_scope else None,
                int(change.blocking_period) if change.blocking_period else None,
                int(change.dimension) if change.dimension else None,
                change.meter,
            ),
        )
        cutoff = change.revision - self.retention
        if cutoff > 0:
            self.conn.execute(
                "DELETE FROM changes WHERE tenant = ? AND run_id = ? AND revision <= ?",
                (self.tenant, self.run_id, cutoff),
            )

    def read_changes(self, after_revision: int, limit: int) -> ChangePage | None:
        head = self.revision()
        if head is None:
            return None
        row = self.conn.execute(
            "SELECT MIN(revision) FROM changes WHERE tenant = ? AND run_id = ?",
            (self.tenant, self.run_id),
        ).fetchone()
        floor = cast(int, row[0]) if row[0] is not None else head + 1
        rows = self.conn.execute(
            f"SELECT {_CHANGE_COLUMNS} FROM changes "
            "WHERE tenant = ? AND run_id = ? AND revision > ? ORDER BY revision LIMIT ?",
            (self.tenant, self.run_id, after_revision, max(0, limit)),
        ).fetchall()
        return ChangePage(
            changes=[_change(self.run_id, row) for row in rows], floor=floor, head=head
        )


class _SqlScopeStore:
    """scopes.ScopeStore over one scope's rows, inside the worker's open transaction."""

    def __init__(self, conn: sqlite3.Connection, tenant: str, ref: ScopeRef) -> None:
        self.conn = conn
        self.key = (tenant, ref.token)

    def load_limits(self) -> dict[Period, int]:
        rows = self.conn.execute(
            "SELECT period, limit_micros FROM scope_limits WHERE tenant = ? AND scope = ?",
            self.key,
        ).fetchall()
        return {Period(period): limit for period, limit in rows}

    def save_limit(self, period: Period, limit_micros: int | None) -> None:
        if limit_micros is None:
            self.conn.execute(
                "DELETE FROM scope_limits WHERE tenant = ? AND scope = ? AND period = ?",
                (*self.key, int(period)),
            )
        else:
            self.conn.execute(
                "INSERT OR REPLACE INTO scope_limits VALUES (?, ?, ?, ?)",
                (*self.key, int(period), limit_micros),
            )

    def load_policy(self) -> str:
        row = self.conn.execute(
            "SELECT policy FROM scope_policies WHERE tenant = ? AND scope = ?", self.key
        ).fetchone()
        return cast(str, row[0]) if row else ""

    def save_policy(self, text: str) -> None:
        if text:
            self.conn.execute(
                "INSERT OR REPLACE INTO scope_policies VALUES (?, ?, ?)", (*self.key, text)
            )
        else:
            self.conn.execute("DELETE FROM scope_policies WHERE tenant = ? AND scope = ?", self.key)

    def load_window(self, key: str) -> WindowTotals:
        row = self.conn.execute(
            "SELECT committed_micros, reserved_micros, overrun_micros, active_reservations "
            "FROM scope_windows WHERE tenant = ? AND scope = ? AND window = ?",
            (*self.key, key),
        ).fetchone()
        return WindowTotals(*row) if row is not None else WindowTotals()

    def save_window(self, key: str, totals: WindowTotals) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO scope_windows VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                *self.key,
                key,
                totals.committed_micros,
                totals.reserved_micros,
                totals.overrun_micros,
                totals.active_reservations,
            ),
        )

    def load_hold(self, hold_id: str) -> ScopeHold | None:
        row = self.conn.execute(
            f"SELECT {_HOLD_COLUMNS} FROM scope_holds "
            "WHERE tenant = ? AND scope = ? AND hold_id = ?",
            (*self.key, hold_id),
        ).fetchone()
        return _hold(row) if row is not None else None

    def due_holds(self, now_ms: int) -> list[ScopeHold]:
        rows = self.conn.execute(
            f"SELECT {_HOLD_COLUMNS} FROM scope_holds "
            f"WHERE tenant = ? AND scope = ? AND status = {_HELD} AND expires_ms <= ? "
            "ORDER BY expires_ms, hold_id",
            (*self.key, now_ms),
        ).fetchall()
        return [_hold(row) for row in rows]

    def save_hold(self, hold: ScopeHold) -> None:
        self.conn.execute(
            f"INSERT OR REPLACE INTO scope_holds (tenant, scope, {_HOLD_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *self.key,
                hold.hold_id,
                hold.amount_micros,
                int(hold.status),
                hold.created_ms,
                ",".join(hold.windows),
                hold.expires_ms,
                hold.actual_micros,
                hold.overrun_micros,
                hold.settled_ms,
                int(hold.blocking_period) if hold.blocking_period else None,
            ),
        )

    def prune_settled(self, before_ms: int, limit: int) -> None:
        self.conn.execute(
            "DELETE FROM scope_holds WHERE tenant = ? AND scope = ? AND hold_id IN ("
            "SELECT hold_id FROM scope_holds INDEXED BY scope_holds_settled "
            f"WHERE tenant = ? AND scope = ? AND status != {_HELD} AND settled_ms < ? "
            "ORDER BY settled_ms LIMIT ?)",
            (*self.key, *self.key, before_ms, limit),
        )


class _SqlStores:
    """saga.Stores inside one transaction; remembers each run's revision before it."""

    def __init__(self, conn: sqlite3.Connection, tenant: str, retention: int) -> None:
        self.conn = conn
        self.tenant = tenant
        self.retention = retention
        self.before: dict[str, int | None] = {}
        self._runs: dict[str, _SqlStore] = {}

    def run(self, run_id: str) -> _SqlStore:
        store = self._runs.get(run_id)
        if store is None:
            store = self._runs[run_id] = _SqlStore(self.conn, self.tenant, run_id, self.retention)
            account = store.load_account()
            self.before[run_id] = account.revision if account is not None else None
        return store

    def scope(self, ref: ScopeRef) -> _SqlScopeStore:
        return _SqlScopeStore(self.conn, self.tenant, ref)

    def changed(self) -> list[str]:
        return [r for r, rev in self.before.items() if self._runs[r].revision() != rev]


def _expire_run(run_id: str, stores: _SqlStores, now_ms: int) -> int:
    return core.expire_due(stores.run(run_id), run_id, now_ms)


def _expire_scope(token: str, stores: _SqlStores, now_ms: int) -> int:
    return scopes.expire_due(stores.scope(ScopeRef.parse(token)), now_ms)


# Version 5's new columns (run policies), with the values that leave an older
# run as it was: the default policy, no counters, nothing held beyond money.
_POLICY_COLUMNS = {
    "runs": (
        "spec_policy TEXT NOT NULL DEFAULT ''",
        "policy TEXT NOT NULL DEFAULT ''",
        "threshold INTEGER NOT NULL DEFAULT 0",
        "throttle_strikes INTEGER NOT NULL DEFAULT 0",
        "throttle_until_ms INTEGER NOT NULL DEFAULT 0",
        "rate_window_ms INTEGER NOT NULL DEFAULT 0",
        "rate_count INTEGER NOT NULL DEFAULT 0",
        "children INTEGER NOT NULL DEFAULT 0",
        "usage TEXT NOT NULL DEFAULT ''",
        "approvals TEXT NOT NULL DEFAULT ''",
    ),
    "reservations": (
        "dims TEXT NOT NULL DEFAULT ''",
        "dimension INTEGER",
        "meter TEXT NOT NULL DEFAULT ''",
        "retry_at_ms INTEGER",
    ),
    "changes": (
        "threshold INTEGER NOT NULL DEFAULT 0",
        "state_threshold INTEGER NOT NULL DEFAULT 0",
        "state_committed_tokens INTEGER NOT NULL DEFAULT 0",
        "state_reserved_tokens INTEGER NOT NULL DEFAULT 0",
        "approval TEXT NOT NULL DEFAULT ''",
    ),
}


def _migrate_to_policies(conn: sqlite3.Connection) -> None:
    """Version 5 added run policies.

    Older runs get the default policy, and the lineage gains depth_left: the
    default max_depth, less where the run already nests so deep that its
    descendants would pass MAX_RUN_DEPTH. `children` counts the child runs
    already created. The threshold band stays NONE (as the change log has
    it): bands already reached are announced at the run's next commit.
    """
    for table, columns in _POLICY_COLUMNS.items():
        for column in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    rows = conn.execute("SELECT tenant, run_id, lineage FROM runs WHERE lineage != ''").fetchall()
    for tenant, run_id, text in rows:
        ancestors, key, user, team, *rest = json.loads(text)
        if rest:
            continue
        depth_left = max(0, min(DEFAULT_MAX_DEPTH, MAX_RUN_DEPTH - 1 - len(ancestors)))
        lineage = Lineage(tuple(ancestors), key, user, team, depth_left)
        conn.execute(
            "UPDATE runs SET lineage = ? WHERE tenant = ? AND run_id = ?",
            (lineage.encode(), tenant, run_id),
        )
    conn.execute(
        "UPDATE runs SET children = counts.n FROM ("
        "SELECT tenant, parent_run_id, COUNT(*) AS n FROM runs "
        "WHERE parent_run_id != '' GROUP BY tenant, parent_run_id) AS counts "
        "WHERE runs.tenant = counts.tenant AND runs.run_id = counts.parent_run_id"
    )


# Version 8's new columns (blocked calls and BLOCKED changes).
_BLOCK_COLUMNS = {
    "runs": ("blocked INTEGER NOT NULL DEFAULT 0", "blocked_calls INTEGER NOT NULL DEFAULT 0"),
    "reservations": ("uncounted INTEGER NOT NULL DEFAULT 0",),
    "changes": (
        "state_blocked INTEGER NOT NULL DEFAULT 0",
        "reason INTEGER",
        "blocking_scope TEXT",
        "blocking_period INTEGER",
        "dimension INTEGER",
        "meter TEXT NOT NULL DEFAULT ''",
    ),
}


def _migrate_to_blocks(conn: sqlite3.Connection) -> None:
    """Version 8 counts blocked Reserves and logs BLOCKED changes.

    Older runs start unblocked with no blocked calls: blocks stored before
    were never counted, and inventing a BLOCKED change would rewrite history
    (revisions and digests) that watchers already saw.
    """
    for table, columns in _BLOCK_COLUMNS.items():
        for column in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


class SqliteLedger:
    """The ledger in a SQLite file; implements backends.base.Backend."""

    def __init__(
        self,
        *,
        path: str,
        default_ttl_ms: int,
        clock: Clock | None = None,
        log_retention: int = 10_000,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5_000,
    ) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {sorted(SYNCHRONOUS_MODES)}")
        if log_retention < 1:
            raise ValueError("log_retention must be at least 1")
        self.path = path
        self.default_ttl_ms = default_ttl_ms
        self.clock = clock or SystemClock()
        self.log_retention = log_retention
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self._bell = ChangeBell()
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # -- the worker thread ---------------------------------------------------

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run fn on the worker thread: the one place storage errors are narrowed."""
        if self._executor is None:
            raise errors.BackendUnavailable("the SQLite ledger is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.DatabaseError as exc:
            # OperationalError: disk I/O, full disk, locked beyond the busy
            # timeout; plain DatabaseError: an unreadable file. Anything else
            # (an IntegrityError, say) is a bug and stays INTERNAL.
            if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
                raise errors.BackendUnavailable(f"SQLite: {exc}") from exc
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise errors.BackendUnavailable("the SQLite ledger is closed")
        return self._conn

    def _transaction(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """fn inside one transaction, committed if it returns, rolled back otherwise."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # The original failure is the one worth reporting.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return result

    def _run_op(
        self,
        loop: asyncio.AbstractEventLoop,
        tenant: str,
        op: Callable[[_SqlStores, int], T],
    ) -> T:
        """One operation, over any runs and scopes, in one transaction (on the worker)."""

        def body(conn: sqlite3.Connection) -> tuple[T, list[str]]:
            stores = _SqlStores(conn, tenant, self.log_retention)
            result = op(stores, self.clock.now_ms())
            return result, stores.changed()

        result, changed = self._transaction(body)
        for run_id in changed:
            # Rung on the event loop, and even if the caller was cancelled
            # meanwhile: the change is committed, watchers must hear of it.
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._bell.ring, tenant, run_id)
        return result

    async def _op(self, tenant: str, op: Callable[[_SqlStores, int], T]) -> T:
        loop = asyncio.get_running_loop()
        return await self._call(lambda: self._run_op(loop, tenant, op))

    def _open_connection(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_ms / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._conn = conn
            self._transaction(self._migrate)
        except BaseException:
            self._conn = None
            conn.close()
            raise

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = cast(int, conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the SQLite ledger has schema version {version}; "
                f"this server knows only up to {SCHEMA_VERSION}"
            )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        if 0 < version < 2:
            # Version 2 added the change-chain digest; older histories start from "".
            conn.execute("ALTER TABLE runs ADD COLUMN digest TEXT NOT NULL DEFAULT ''")
            conn.execute("ALTER TABLE changes ADD COLUMN state_digest TEXT NOT NULL DEFAULT ''")
        if 0 < version < 3:
            # Version 3 added parent scopes; older runs have none.
            for column in ("parent_run_id", "api_key_id", "user_id", "team_id", "lineage"):
                conn.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            conn.execute("ALTER TABLE reservations ADD COLUMN blocking_scope TEXT")
            conn.execute("ALTER TABLE reservations ADD COLUMN blocking_period INTEGER")
        if 0 < version < 4:
            # Version 4 added priced LLM calls.
            for column in ("fingerprint", "pricing"):
                conn.execute(
                    f"ALTER TABLE reservations ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
                )
        if 0 < version < 5:
            _migrate_to_policies(conn)
        if 0 < version < 6:
            # Version 6 added CALIBRATED runs (none exist before it).
            conn.execute("ALTER TABLE runs ADD COLUMN exposure_micros INTEGER NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE runs ADD COLUMN calibration TEXT NOT NULL DEFAULT ''")
        if 0 < version < 7:
            # Version 7 added a CALIBRATED run's exposure to the change log's
            # states; older entries read 0.
            for column in ("state_exposure_micros", "state_exposure_ceiling_micros"):
                conn.execute(f"ALTER TABLE changes ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        if 0 < version < 8:
            _migrate_to_blocks(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _close_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    # -- Backend -------------------------------------------------------------

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runcap-sqlite")
        try:
            await self._call(self._open_connection)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._close_connection)
        finally:
            executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._call(lambda: self._connection().execute("SELECT 1").fetchone())

    async def transact(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """fn in one transaction on the worker thread, for a store that keeps
        tables of its own in this file (alerts); failures narrowed as above."""
        return await self._call(lambda: self._transaction(fn, write=write))

    async def create_run(self, tenant: str, spec: RunSpec) -> CreateRunResult:
        account, replayed = await self._op(tenant, lambda s, now: saga.create_run(s, spec, now))
        return CreateRunResult(run=account.view(self.default_ttl_ms), replayed=replayed)

    async def get_run(self, tenant: str, run_id: str) -> RunView:
        account = await self._op(tenant, lambda s, now: core.get_state(s.run(run_id), run_id, now))
        return account.view(self.default_ttl_ms)

    async def list_run_ids(
        self, tenant: str, from_ms: int, to_ms: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        after_ms, after_id = after if after is not None else (from_ms - 1, "")

        def query() -> list[tuple[int, str]]:
            rows = self._connection().execute(
                "SELECT created_ms, run_id FROM runs WHERE tenant = ? AND created_ms >= ? "
                "AND created_ms < ? AND (created_ms, run_id) > (?, ?) "
                "ORDER BY created_ms, run_id LIMIT ?",
                (tenant, from_ms, to_ms, after_ms, after_id, limit),
            )
            return [(int(ms), str(run_id)) for ms, run_id in rows]

        return await self._call(query)

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
        return await self._op(
            tenant,
            lambda s, now: saga.reserve(
                s, run_id, reservation_id, amount_micros, ttl_ms, self.default_ttl_ms, now, extras
            ),
        )

    async def count_block(self, tenant: str, run_id: str, reservation_id: str) -> BudgetState:
        return await self._op(
            tenant, lambda s, now: core.count_block(s.run(run_id), run_id, reservation_id, now)
        )

    async def get_reservation(self, tenant: str, run_id: str, reservation_id: str) -> Reservation:
        def read(stores: _SqlStores, now_ms: int) -> Reservation:
            store = stores.run(run_id)
            if store.revision() is None:
                raise errors.RunNotFound(run_id)
            found = store.load_reservation(reservation_id)
            if found is None:
                raise errors.ReservationNotFound(run_id, reservation_id)
            return found

        return await self._op(tenant, read)

    async def commit(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        actual_micros: int,
        actual_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> CommitResult:
        return await self._op(
            tenant,
            lambda s, now: saga.commit(
                s, run_id, reservation_id, actual_micros, now, actual_tokens, output_tokens
            ),
        )

    async def refund(self, tenant: str, run_id: str, reservation_id: str) -> RefundResult:
        return await self._op(tenant, lambda s, now: saga.refund(s, run_id, reservation_id, now))

    async def close_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return await self._op(tenant, lambda s, now: core.close_run(s.run(run_id), run_id, now))

    async def resolve_approval(
        self, tenant: str, run_id: str, trigger: str, approve: bool
    ) -> ApprovalResult:
        return await self._op(
            tenant,
            lambda s, now: core.resolve_approval(s.run(run_id), run_id, trigger, approve, now),
        )

    async def suspend_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return await self._op(tenant, lambda s, now: core.suspend_run(s.run(run_id), run_id, now))

    async def resume_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return await self._op(tenant, lambda s, now: core.resume_run(s.run(run_id), run_id, now))

    async def set_scope_limit(
        self, tenant: str, ref: ScopeRef, period: Period, limit_micros: int | None
    ) -> ScopeView:
        return await self._op(
            tenant, lambda s, now: scopes.set_limit(s.scope(ref), ref, period, limit_micros, now)
        )

    async def set_scope_policy(
        self, tenant: str, ref: ScopeRef, policy: RunPolicy | None
    ) -> ScopeView:
        return await self._op(
            tenant, lambda s, now: scopes.set_policy(s.scope(ref), ref, policy, now)
        )

    async def get_scope(self, tenant: str, ref: ScopeRef) -> ScopeView:
        return await self._op(tenant, lambda s, now: scopes.view(s.scope(ref), ref, now))

    def _due_runs(self, max_runs: int) -> list[tuple[str, str]]:
        now_ms = self.clock.now_ms()
        rows = (
            self._connection()
            .execute(
                f"SELECT DISTINCT tenant, run_id FROM reservations INDEXED BY "
                f"reservations_held_by_expiry WHERE status = {_HELD} AND expires_ms <= ? LIMIT ?",
                (now_ms, max_runs),
            )
            .fetchall()
        )
        return [(cast(str, tenant), cast(str, run_id)) for tenant, run_id in rows]

    async def sweep(self, max_runs: int) -> int:
        if max_runs <= 0:
            return 0
        released = 0
        # Each run and scope expires in its own transaction, so operations interleave.
        for tenant, run_id in await self._call(lambda: self._due_runs(max_runs)):
            released += await self._op(tenant, functools.partial(_expire_run, run_id))
        for tenant, token in await self._call(lambda: self._due_scopes(max_runs)):
            released += await self._op(tenant, functools.partial(_expire_scope, token))
        return released

    async def set_price_override(self, tenant: str, key: str, entry: str | None) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            if entry is None:
                changed = conn.execute(
                    "DELETE FROM price_overrides WHERE tenant = ? AND key = ?", (tenant, key)
                ).rowcount
                if not changed:
                    return False
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO price_overrides VALUES (?, ?, ?)", (tenant, key, entry)
                )
            conn.execute(
                "INSERT INTO price_override_versions VALUES (?, 1) ON CONFLICT (tenant) "
                "DO UPDATE SET version = version + 1",
                (tenant,),
            )
            return True

        return await self._call(lambda: self._transaction(write))

    async def price_overrides(self, tenant: str) -> tuple[int, dict[str, str]]:
        def read(conn: sqlite3.Connection) -> tuple[int, dict[str, str]]:
            rows = conn.execute(
                "SELECT key, entry FROM price_overrides WHERE tenant = ?", (tenant,)
            ).fetchall()
            return self._price_version(conn, tenant), {k: e for k, e in rows}

        return await self._call(lambda: self._transaction(read, write=False))

    async def price_overrides_version(self, tenant: str) -> int:
        return await self._call(lambda: self._price_version(self._connection(), tenant))

    @staticmethod
    def _price_version(conn: sqlite3.Connection, tenant: str) -> int:
        row = conn.execute(
            "SELECT version FROM price_override_versions WHERE tenant = ?", (tenant,)
        ).fetchone()
        return cast(int, row[0]) if row else 0

    def _due_scopes(self, max_scopes: int) -> list[tuple[str, str]]:
        rows = (
            self._connection()
            .execute(
                f"SELECT DISTINCT tenant, scope FROM scope_holds INDEXED BY "
                f"scope_holds_held_by_expiry WHERE status = {_HELD} AND expires_ms <= ? LIMIT ?",
                (self.clock.now_ms(), max_scopes),
            )
            .fetchall()
        )
        return [(cast(str, tenant), cast(str, scope)) for tenant, scope in rows]

    async def read_changes(
        self, tenant: str, run_id: str, after_revision: int, limit: int
    ) -> ChangePage:
        def body(conn: sqlite3.Connection) -> ChangePage | None:
            store = _SqlStore(conn, tenant, run_id, self.log_retention)
            return store.read_changes(after_revision, limit)

        page = await self._call(lambda: self._transaction(body, write=False))
        if page is None:
            raise errors.RunNotFound(run_id)
        return page

    async def _revision(self, tenant: str, run_id: str) -> int | None:
        def read() -> int | None:
            return _SqlStore(self._connection(), tenant, run_id, self.log_retention).revision()

        return await self._call(read)

    def forget(self, tenant: str, run_id: str) -> None:
        self._bell.forget(tenant, run_id)

    async def wait_for_change(
        self, tenant: str, run_id: str, after_revision: int, timeout_s: float
    ) -> None:
        event = self._bell.arm(tenant, run_id)
        revision = await self._revision(tenant, run_id)
        if revision is None or revision <= after_revision:
            await wait_event(event, timeout_s)

    async def snapshot(self, tenant: str, run_id: str) -> tuple[Account | None, list[Reservation]]:
        """A run's stored rows as they are, with nothing expired (tests, debugging)."""

        def body(conn: sqlite3.Connection) -> tuple[Account | None, list[Reservation]]:
            store = _SqlStore(conn, tenant, run_id, self.log_retention)
            return store.load_account(), store.load_reservations()

        return await self._call(lambda: self._transaction(body, write=False))
