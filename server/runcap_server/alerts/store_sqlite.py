"""The alert store in the SQLite ledger's file: tables of its own, created on
start (`CREATE ... IF NOT EXISTS`, so the ledger's schema version is not
touched), every step one transaction on the ledger's worker thread."""

from __future__ import annotations

import sqlite3
from typing import Any, cast

from runcap_server.alerts.store import (
    HOUR_MS,
    AlertRecord,
    AlertState,
    RateLimit,
    StoredRule,
    allows,
    decode_done,
    encode_done,
)
from runcap_server.backends.sqlite import SqliteLedger

_PENDING = int(AlertState.PENDING)
_SUPPRESSED = int(AlertState.SUPPRESSED)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS alert_rules (
    tenant TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, rule_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS alerts (
    tenant TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    trigger INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    create_ms INTEGER NOT NULL,
    rate_key TEXT NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    done TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    owner TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (tenant, alert_id)
) STRICT, WITHOUT ROWID;

-- ListAlerts, newest first, and the rate limit's look back per rule.
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (tenant, create_ms, alert_id);
CREATE INDEX IF NOT EXISTS alerts_by_rule ON alerts (tenant, rule_id, create_ms);

-- What claim_due scans: alerts waiting for a (first or next) delivery.
CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (tenant, due_ms) WHERE state = {_PENDING};

CREATE TABLE IF NOT EXISTS alert_cursors (
    tenant TEXT NOT NULL,
    run_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (tenant, run_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS alert_discovery (
    tenant TEXT NOT NULL PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    run_id TEXT NOT NULL
) STRICT, WITHOUT ROWID;
"""
_COLUMNS = (
    "tenant, alert_id, rule_id, trigger, run_id, create_ms, rate_key, state, attempts, "
    "last_error, done, due_ms, owner, payload"
)


def _record(row: tuple[Any, ...]) -> AlertRecord:
    tenant, alert_id, rule_id, trigger, run_id, create_ms, rate_key, state, *rest = row
    attempts, last_error, done, due_ms, owner, payload = rest
    return AlertRecord(
        tenant=tenant,
        alert_id=alert_id,
        rule_id=rule_id,
        trigger=trigger,
        run_id=run_id,
        create_ms=create_ms,
        payload=payload,
        rate_key=rate_key,
        state=AlertState(state),
        attempts=attempts,
        last_error=last_error,
        done=decode_done(done),
        due_ms=due_ms,
        owner=owner,
    )


class SqliteAlertStore:
    def __init__(self, ledger: SqliteLedger) -> None:
        self.ledger = ledger

    async def start(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

        await self.ledger.transact(create)

    async def put_rule(self, tenant: str, rule_id: str, text: str, now_ms: int) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT rule FROM alert_rules WHERE tenant = ? AND rule_id = ?", (tenant, rule_id)
            ).fetchone()
            if row is not None and row[0] == text:
                return False
            conn.execute(
                "INSERT INTO alert_rules VALUES (?, ?, ?, ?) ON CONFLICT (tenant, rule_id) "
                "DO UPDATE SET rule = excluded.rule",
                (tenant, rule_id, text, now_ms),
            )
            return True

        return await self.ledger.transact(write)

    async def delete_rule(self, tenant: str, rule_id: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "DELETE FROM alert_rules WHERE tenant = ? AND rule_id = ?", (tenant, rule_id)
            )
            return cursor.rowcount > 0

        return await self.ledger.transact(write)

    async def rules(self, tenant: str) -> list[StoredRule]:
        def read(conn: sqlite3.Connection) -> list[StoredRule]:
            rows = conn.execute(
                "SELECT rule_id, rule, since_ms FROM alert_rules WHERE tenant = ? ORDER BY rule_id",
                (tenant,),
            )
            return [StoredRule(*row) for row in rows]

        return await self.ledger.transact(read, write=False)

    async def tenants(self) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT tenant FROM alert_rules UNION SELECT tenant FROM alerts ORDER BY tenant"
            )
            return [cast(str, row[0]) for row in rows]

        return await self.ledger.transact(read, write=False)

    async def raise_alert(self, record: AlertRecord, limit: RateLimit | None) -> AlertRecord | None:
        def write(conn: sqlite3.Connection) -> AlertRecord | None:
            exists = conn.execute(
                "SELECT 1 FROM alerts WHERE tenant = ? AND alert_id = ?",
                (record.tenant, record.alert_id),
            ).fetchone()
            if exists:
                return None
            stored = record
            if limit is not None:
                last, hour = conn.execute(
                    "SELECT MAX(CASE WHEN rate_key = ? THEN create_ms END), "
                    "COUNT(CASE WHEN create_ms > ? THEN 1 END) FROM alerts "
                    f"WHERE tenant = ? AND rule_id = ? AND state != {_SUPPRESSED} "
                    "AND create_ms > ?",
                    (
                        record.rate_key,
                        record.create_ms - HOUR_MS,
                        record.tenant,
                        record.rule_id,
                        record.create_ms - max(HOUR_MS, limit.min_interval_ms) - 1,
                    ),
                ).fetchone()
                stored = record.replace(state=allows(limit, record.create_ms, last, hour))
            conn.execute(
                f"INSERT INTO alerts ({_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                _row(stored),
            )
            return stored

        return await self.ledger.transact(write)

    async def claim_due(
        self, tenant: str, owner: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[AlertRecord]:
        def write(conn: sqlite3.Connection) -> list[AlertRecord]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM alerts WHERE tenant = ? AND state = {_PENDING} "
                "AND due_ms <= ? ORDER BY due_ms, alert_id LIMIT ?",
                (tenant, now_ms, limit),
            ).fetchall()
            claimed = [_record(row).replace(owner=owner, due_ms=now_ms + lease_ms) for row in rows]
            conn.executemany(
                "UPDATE alerts SET owner = ?, due_ms = ? WHERE tenant = ? AND alert_id = ?",
                [(a.owner, a.due_ms, tenant, a.alert_id) for a in claimed],
            )
            return claimed

        return await self.ledger.transact(write)

    async def update_alert(self, record: AlertRecord) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE alerts SET state = ?, attempts = ?, last_error = ?, done = ?, due_ms = ? "
                "WHERE tenant = ? AND alert_id = ? AND owner = ?",
                (
                    int(record.state),
                    record.attempts,
                    record.last_error,
                    encode_done(record.done),
                    record.due_ms,
                    record.tenant,
                    record.alert_id,
                    record.owner,
                ),
            )
            return cursor.rowcount > 0

        return await self.ledger.transact(write)

    async def list_alerts(
        self,
        tenant: str,
        before: tuple[int, str] | None,
        limit: int,
        rule_id: str = "",
        state: AlertState | None = None,
    ) -> list[AlertRecord]:
        where = ["tenant = ?"]
        args: list[object] = [tenant]
        if before is not None:
            where.append("(create_ms, alert_id) < (?, ?)")
            args += list(before)
        if rule_id:
            where.append("rule_id = ?")
            args.append(rule_id)
        if state is not None:
            where.append("state = ?")
            args.append(int(state))

        def read(conn: sqlite3.Connection) -> list[AlertRecord]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM alerts WHERE {' AND '.join(where)} "
                "ORDER BY create_ms DESC, alert_id DESC LIMIT ?",
                (*args, limit),
            )
            return [_record(row) for row in rows]

        return await self.ledger.transact(read, write=False)

    async def prune(self, tenant: str, before_ms: int) -> int:
        def write(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                f"DELETE FROM alerts WHERE tenant = ? AND create_ms < ? AND state != {_PENDING}",
                (tenant, before_ms),
            )
            return cursor.rowcount

        return await self.ledger.transact(write)

    async def cursors(self, tenant: str) -> dict[str, tuple[int, str]]:
        def read(conn: sqlite3.Connection) -> dict[str, tuple[int, str]]:
            rows = conn.execute(
                "SELECT run_id, revision, state FROM alert_cursors WHERE tenant = ?", (tenant,)
            )
            return {run_id: (revision, state) for run_id, revision, state in rows}

        return await self.ledger.transact(read, write=False)

    async def save_cursor(self, tenant: str, run_id: str, revision: int, text: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO alert_cursors VALUES (?, ?, ?, ?) ON CONFLICT (tenant, run_id) "
                "DO UPDATE SET revision = excluded.revision, state = excluded.state "
                "WHERE excluded.revision > alert_cursors.revision",
                (tenant, run_id, revision, text),
            )

        await self.ledger.transact(write)

    async def drop_cursor(self, tenant: str, run_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM alert_cursors WHERE tenant = ? AND run_id = ?", (tenant, run_id)
            )

        await self.ledger.transact(write)

    async def discovery(self, tenant: str) -> tuple[int, str] | None:
        def read(conn: sqlite3.Connection) -> tuple[int, str] | None:
            row = conn.execute(
                "SELECT created_ms, run_id FROM alert_discovery WHERE tenant = ?", (tenant,)
            ).fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        return await self.ledger.transact(read, write=False)

    async def save_discovery(self, tenant: str, cursor: tuple[int, str]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO alert_discovery VALUES (?, ?, ?) ON CONFLICT (tenant) "
                "DO UPDATE SET created_ms = excluded.created_ms, run_id = excluded.run_id "
                "WHERE (excluded.created_ms, excluded.run_id) > "
                "(alert_discovery.created_ms, alert_discovery.run_id)",
                (tenant, *cursor),
            )

        await self.ledger.transact(write)


def _row(record: AlertRecord) -> tuple[object, ...]:
    return (
        record.tenant,
        record.alert_id,
        record.rule_id,
        record.trigger,
        record.run_id,
        record.create_ms,
        record.rate_key,
        int(record.state),
        record.attempts,
        record.last_error,
        encode_done(record.done),
        record.due_ms,
        record.owner,
        record.payload,
    )
