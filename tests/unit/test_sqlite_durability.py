"""The SQLite ledger keeps what it acknowledged: across restarts and a SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from runcap_server import errors
from runcap_server.backends.sqlite import SCHEMA_VERSION, SqliteLedger
from runcap_server.clock import ManualClock
from runcap_server.ledger.types import (
    DecisionReason,
    EventType,
    Lineage,
    ReservationStatus,
    RunPolicy,
    RunSpec,
    Threshold,
)
from tests.ledger_backends import open_backend, snapshot

T = "acme"
RUN = "run-1"

WRITER = """
import asyncio, sys
from runcap_server.backends.sqlite import SqliteLedger
from runcap_server.ledger.types import RunSpec

async def main(path, synchronous):
    ledger = SqliteLedger(path=path, default_ttl_ms=3_600_000, synchronous=synchronous)
    await ledger.start()
    created = await ledger.create_run("acme", RunSpec("run-1", 10**12, {"k": "v"}, None))
    print("created", created.run.state.revision, flush=True)
    for i in range(1_000_000):
        rid = f"r{i}"
        reserved = await ledger.reserve("acme", "run-1", rid, 1_000, None)
        print("reserved", rid, reserved.state.revision, flush=True)
        actual = 500 + i % 700
        committed = await ledger.commit("acme", "run-1", rid, actual)
        print("committed", rid, actual, committed.state.revision, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _write_until_killed(db: Path, synchronous: str, commits: int) -> list[str]:
    """Run the writer, SIGKILL it after `commits` acknowledged commits; its output."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), synchronous],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert writer.stdout is not None
        while sum(line.startswith("committed") for line in lines) < commits:
            line = writer.stdout.readline()
            assert line, f"writer stopped early: {writer.stderr.read() if writer.stderr else ''}"
            lines.append(line)
        os.kill(writer.pid, signal.SIGKILL)
        # Whatever was printed before the kill was acknowledged too.
        lines.extend(writer.stdout.readlines())
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(30)
        for stream in (writer.stdout, writer.stderr):
            if stream is not None:
                stream.close()
    assert writer.returncode == -signal.SIGKILL
    return lines


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_acknowledged_operations_survive_sigkill(tmp_path: Path, synchronous: str) -> None:
    db = tmp_path / "ledger.db"
    lines = await asyncio.to_thread(_write_until_killed, db, synchronous, 150)

    reserved: dict[str, int] = {}
    committed: dict[str, tuple[int, int]] = {}
    last_revision = 0
    for line in lines:
        words = line.split()
        if words[0] == "reserved":
            reserved[words[1]] = int(words[2])
        elif words[0] == "committed":
            committed[words[1]] = (int(words[2]), int(words[3]))
        last_revision = max(last_revision, int(words[-1]))

    ledger = SqliteLedger(path=str(db), default_ttl_ms=3_600_000)
    await ledger.start()
    try:
        page = await ledger.read_changes(T, RUN, 0, 1_000_000)
        # Revisions are contiguous from the run's creation to its head.
        assert page.floor == 1
        assert [c.revision for c in page.changes] == list(range(1, page.head + 1))
        assert page.head >= last_revision
        by_revision = {c.revision: c for c in page.changes}
        for rid, revision in reserved.items():
            change = by_revision[revision]
            assert (change.type, change.reservation_id) == (EventType.RESERVED, rid)
        for rid, (actual, revision) in committed.items():
            change = by_revision[revision]
            assert (change.type, change.reservation_id, change.actual_micros) == (
                EventType.COMMITTED,
                rid,
                actual,
            )
        state = page.changes[-1].state
        assert state.committed_micros + state.reserved_micros <= (
            state.limit_micros + state.overrun_micros
        )
        account, reservations = await ledger.snapshot(T, RUN)
        assert account is not None
        assert account.state() == state
        assert state.committed_micros == sum(r.actual_micros or 0 for r in reservations)
        assert state.reserved_micros == sum(
            r.held_micros for r in reservations if r.status is ReservationStatus.HELD
        )
        # Every acknowledged operation replays as already done.
        for rid, (actual, _) in committed.items():
            replay = await ledger.commit(T, RUN, rid, actual)
            assert replay.replayed
            assert replay.reservation_status is ReservationStatus.COMMITTED
        for rid in reserved.keys() - committed.keys():
            again = await ledger.reserve(T, RUN, rid, 1_000, None)
            assert again.replayed
        assert (await ledger.get_run(T, RUN)).state == state
    finally:
        await ledger.close()


async def test_restart_keeps_state_revision_and_log(tmp_path: Path) -> None:
    clock = ManualClock()
    spec = RunSpec(RUN, 1_000, {"team": "t", "agent": "a"}, 5_000)
    async with open_backend("sqlite", tmp_path, clock, log_retention=5) as ledger:
        await ledger.create_run(T, spec)
        await ledger.create_run("globex", RunSpec(RUN, 7, {}, None))
        await ledger.reserve(T, RUN, "a", 300, 1_000)
        await ledger.reserve(T, RUN, "b", 300, None)
        await ledger.reserve(T, RUN, "blocked", 900, None)
        await ledger.commit(T, RUN, "b", 350)
        clock.advance(1_000)
        await ledger.reserve(T, RUN, "c", 200, None)
        await ledger.close_run(T, RUN)
        before = await ledger.get_run(T, RUN)
        rows = await snapshot(ledger, T, RUN)
        log = await ledger.read_changes(T, RUN, 0, 100)
        other = await ledger.get_run("globex", RUN)
    assert log.floor == log.head - 4
    for _ in range(2):  # the schema is created once, then found as it is
        async with open_backend("sqlite", tmp_path, clock, log_retention=5) as ledger:
            assert await snapshot(ledger, T, RUN) == rows
            assert await ledger.read_changes(T, RUN, 0, 100) == log
            assert await ledger.get_run(T, RUN) == before
            assert await ledger.get_run("globex", RUN) == other
            created = await ledger.create_run(
                T, RunSpec(RUN, 1_000, {"agent": "a", "team": "t"}, 5_000)
            )
            assert created.replayed
            assert created.run.spec == spec
            replay = await ledger.commit(T, RUN, "b", 350)
            assert replay.replayed
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


# Version 4's tables that version 5 (run policies) changed, as version 4 made them.
V4_TABLES = """
CREATE TABLE runs (
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
    PRIMARY KEY (tenant, run_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE reservations (
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
    PRIMARY KEY (tenant, run_id, reservation_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE changes (
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
    PRIMARY KEY (tenant, run_id, revision)
) STRICT, WITHOUT ROWID;
"""
NOW = ManualClock().now_ms()


def _write_v4(path: Path) -> None:
    """A version 4 ledger: a root run 70% spent with a hold, its child (lineages
    without depth_left), a run nested 12 deep, and one from before lineages."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(V4_TABLES)
        run = (
            "INSERT INTO runs (tenant, run_id, limit_micros, labels, default_ttl_ms, created_ms, "
            "status, committed_micros, reserved_micros, overrun_micros, active_reservations, "
            "revision, digest, parent_run_id, lineage) "
            "VALUES ('acme', ?, ?, '{}', NULL, ?, 1, ?, ?, 0, ?, ?, ?, ?, ?)"
        )
        deep = [f"a{i}" for i in range(12)]
        conn.executemany(
            run,
            [
                ("root", 1_000, NOW, 700, 100, 1, 3, "d3", "", '[[],"","",""]'),
                ("child", 50, NOW, 0, 0, 0, 1, "d1", "root", '[["root"],"","",""]'),
                ("deep", 50, NOW, 0, 0, 0, 1, "d1", "a0", json.dumps([deep, "", "", ""])),
                ("ancient", 50, NOW, 0, 0, 0, 1, "d1", "", ""),
            ],
        )
        conn.execute(
            "INSERT INTO reservations (tenant, run_id, reservation_id, amount_micros, status, "
            "reason, created_ms, held_micros, expires_ms, overrun_micros) "
            "VALUES ('acme', 'root', 'held', 100, ?, ?, ?, 100, ?, 0)",
            (int(ReservationStatus.HELD), int(DecisionReason.WITHIN_BUDGET), NOW, NOW + 60_000),
        )
        conn.execute(
            "INSERT INTO changes VALUES ('acme', 'root', 3, ?, ?, 'held', 100, 0, 0, 0, "
            "1000, 700, 100, 1, 1, 0, 'd3')",
            (int(EventType.RESERVED), NOW),
        )
        conn.execute("PRAGMA user_version = 4")
        conn.commit()
    finally:
        conn.close()


def _columns(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        tables = [
            name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
        ]
        return {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in sorted(tables)}
    finally:
        conn.close()


async def test_a_version_4_ledger_gains_run_policies(tmp_path: Path) -> None:
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    old.mkdir()
    fresh.mkdir()
    _write_v4(old / "ledger.db")
    clock = ManualClock()
    async with open_backend("sqlite", fresh, clock):
        pass
    for _ in range(2):  # migrated once, then found as it is
        async with open_backend("sqlite", old, clock) as ledger:
            root = await ledger.get_run(T, "root")
            assert (root.policy, root.children, root.usage) == (RunPolicy(), 1, {})
            assert root.spec.policy is None
            assert root.lineage == Lineage(depth_left=5)
            assert (root.state.revision, root.state.threshold) == (3, Threshold.NONE)
            assert (root.state.committed_tokens, root.state.reserved_tokens) == (0, 0)
            assert (await ledger.get_run(T, "child")).lineage == Lineage(("root",), depth_left=5)
            # Its descendants stay within MAX_RUN_DEPTH runs.
            assert (await ledger.get_run(T, "deep")).lineage.depth_left == 3
            assert (await ledger.get_run(T, "ancient")).lineage == Lineage()
            (change,) = (await ledger.read_changes(T, "root", 0, 10)).changes
            assert (change.type, change.threshold, change.state) == (
                EventType.RESERVED,
                Threshold.NONE,
                root.state,
            )
            _, (held,) = await snapshot(ledger, T, "root")
            assert (held.dims, held.dimension, held.meter, held.retry_at_ms) == ({}, None, "", None)
            assert (await ledger.create_run(T, RunSpec("root", 1_000, {}, None))).replayed
    assert _columns(old / "ledger.db") == _columns(fresh / "ledger.db")

    async with open_backend("sqlite", old, clock) as ledger:
        # The bands already reached are announced at the run's next commit.
        committed = await ledger.commit(T, "root", "held", 100)
        assert (committed.state.revision, committed.state.threshold) == (6, Threshold.WARN)
        page = await ledger.read_changes(T, "root", 3, 10)
        assert [(c.type, c.threshold) for c in page.changes] == [
            (EventType.COMMITTED, Threshold.NONE),
            (EventType.THRESHOLD_CROSSED, Threshold.INFO),
            (EventType.THRESHOLD_CROSSED, Threshold.WARN),
        ]
        grandchild = await ledger.create_run(T, RunSpec("grandchild", 10, {}, None, "child"))
        assert grandchild.run.lineage == Lineage(("child", "root"), depth_left=4)
        assert (await ledger.get_run(T, "child")).children == 1


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    ledger = SqliteLedger(path=str(tmp_path / "ledger.db"), default_ttl_ms=1_000)
    with pytest.raises(RuntimeError, match="schema version"):
        await ledger.start()
    await ledger.close()


# -- Storage failures fail closed ----------------------------------------------


async def test_locked_beyond_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(
        path=str(path), default_ttl_ms=1_000, clock=ManualClock(), busy_timeout_ms=50
    )
    await ledger.start()
    try:
        await ledger.create_run(T, RunSpec(RUN, 100, {}, None))
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(errors.BackendUnavailable) as caught:
                await ledger.reserve(T, RUN, "r", 10, None)
            assert caught.value.retry_after_ms > 0
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        # Nothing was decided; the retry decides.
        result = await ledger.reserve(T, RUN, "r", 10, None)
        assert not result.replayed
        assert result.state.revision == 2
        await ledger.ping()
    finally:
        await ledger.close()


async def test_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    ledger = SqliteLedger(path=str(tmp_path / "missing" / "ledger.db"), default_ttl_ms=1_000)
    with pytest.raises(errors.BackendUnavailable):
        await ledger.start()
    await ledger.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, not at all" * 200)
    ledger = SqliteLedger(path=str(garbage), default_ttl_ms=1_000)
    with pytest.raises(errors.BackendUnavailable):
        await ledger.start()
    await ledger.close()


async def test_a_closed_ledger_is_unavailable(tmp_path: Path) -> None:
    ledger = SqliteLedger(path=str(tmp_path / "ledger.db"), default_ttl_ms=1_000)
    with pytest.raises(errors.BackendUnavailable):
        await ledger.ping()
    await ledger.start()
    await ledger.ping()
    await ledger.close()
    await ledger.close()  # idempotent
    with pytest.raises(errors.BackendUnavailable):
        await ledger.ping()
    with pytest.raises(errors.BackendUnavailable):
        await ledger.get_run(T, RUN)


def test_synchronous_must_be_a_known_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteLedger(path=str(tmp_path / "x.db"), default_ttl_ms=1, synchronous="FULL; DROP")
