"""The Python client (sync and asyncio) against a live runcap server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from runcap import (
    AsyncRuncapClient,
    BudgetBlockedError,
    Hold,
    IdempotencyConflictError,
    InvalidArgumentError,
    ReservationBlockedError,
    ReservationNotFoundError,
    ReservationReleasedError,
    RetryPolicy,
    RevisionOutOfRangeError,
    RunAlreadyExistsError,
    RuncapClient,
    RunNotFoundError,
)
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from tests.servers import ServerProcess

ALLOW = budget_pb2.DECISION_ALLOW
BLOCK = budget_pb2.DECISION_BLOCK
# Reconnect quickly to a restarted server (gRPC's own default backoff starts at 1 s).
FAST_RECONNECT_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
PATIENT = RetryPolicy(max_attempts=200, initial_backoff=0.05, max_backoff=0.5)
# Calls outlast the channel's reconnect backoff after a restart (the default
# policy's waits add up to 0.7 s at most, the backoff above to 0.5 s plus jitter).
RESTART_RETRY = RetryPolicy(max_attempts=20, initial_backoff=0.1, max_backoff=0.5)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def client(server_target: str) -> Iterator[RuncapClient]:
    with RuncapClient(server_target) as sync_client:
        yield sync_client


@pytest.fixture
async def aclient(server_target: str) -> AsyncIterator[AsyncRuncapClient]:
    async with AsyncRuncapClient(server_target) as async_client:
        yield async_client


def churn(client: RuncapClient, run_id: str, n: int, prefix: str) -> None:
    """n reserve + commit pairs: 2n changes."""
    for i in range(n):
        reservation_id = f"{prefix}{i}"
        client.reserve_once(run_id, 10, reservation_id=reservation_id)
        client.commit(run_id, reservation_id, i)


async def achurn(client: AsyncRuncapClient, run_id: str, n: int, prefix: str) -> None:
    for i in range(n):
        reservation_id = f"{prefix}{i}"
        await client.reserve_once(run_id, 10, reservation_id=reservation_id)
        await client.commit(run_id, reservation_id, i)


def expected_events(prefixes_and_counts: list[tuple[str, int]]) -> list[tuple[int, str]]:
    """(type, reservation id) of the events churn makes, in order."""
    events = []
    for prefix, n in prefixes_and_counts:
        for i in range(n):
            events += [
                (budget_pb2.EVENT_TYPE_RESERVED, f"{prefix}{i}"),
                (budget_pb2.EVENT_TYPE_COMMITTED, f"{prefix}{i}"),
            ]
    return [(int(kind), rid) for kind, rid in events]


def described(messages: list[pb.WatchResponse]) -> list[tuple[int, str]]:
    return [(int(m.event.type), m.event.reservation_id) for m in messages]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- the unary calls --------------------------------------------------------------------


def test_sync_lifecycle(client: RuncapClient) -> None:
    run_id = new_id("run")
    created = client.create_run(
        run_id, limit_micros=1_000, labels={"agent": "planner"}, default_ttl=timedelta(minutes=5)
    )
    assert (created.run.run_id, created.replayed) == (run_id, False)
    assert dict(created.run.labels) == {"agent": "planner"}
    assert created.run.default_ttl_millis == 300_000
    assert created.state.remaining_micros == 1_000
    again = client.create_run(
        run_id, limit_micros=1_000, labels={"agent": "planner"}, default_ttl=300.0
    )
    assert again.replayed

    held = client.reserve_once(run_id, 300, reservation_id="a", ttl=60)
    assert (held.decision, held.amount_micros, held.state.reserved_micros) == (ALLOW, 300, 300)
    assert client.reserve_once(run_id, 300, reservation_id="a", ttl=60).replayed

    committed = client.commit(run_id, "a", 250)
    assert committed.reservation_status == budget_pb2.RESERVATION_STATUS_COMMITTED
    assert (committed.state.committed_micros, committed.state.reserved_micros) == (250, 0)
    assert client.commit(run_id, "a", 250).replayed

    generated = client.reserve_once(run_id, 100)
    assert generated.reservation_id
    refunded = client.refund(run_id, generated.reservation_id)
    assert (refunded.released_micros, refunded.replayed) == (100, False)
    assert client.refund(run_id, generated.reservation_id).replayed

    blocked = client.reserve_once(run_id, 10_000)
    assert (blocked.decision, blocked.reason) == (
        BLOCK,
        budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
    )

    got = client.get_run(run_id)
    assert (got.run.run_id, got.state.committed_micros, got.state.remaining_micros) == (
        run_id,
        250,
        750,
    )
    closed = client.close_run(run_id)
    assert closed.state.status == budget_pb2.RUN_STATUS_CLOSED
    assert client.close_run(run_id).replayed
    late = client.reserve_once(run_id, 1)
    assert (late.decision, late.reason) == (BLOCK, budget_pb2.DECISION_REASON_RUN_CLOSED)


async def test_async_lifecycle(aclient: AsyncRuncapClient) -> None:
    run_id = new_id("run")
    created = await aclient.create_run(run_id, limit_micros=1_000, default_ttl=2.5)
    assert created.run.default_ttl_millis == 2_500
    server_named = await aclient.create_run(limit_micros=5)
    assert server_named.run.run_id
    held = await aclient.reserve_once(run_id, 400, reservation_id="a")
    assert held.decision == ALLOW
    assert (await aclient.commit(run_id, "a", 500)).overrun_micros == 100
    await aclient.reserve_once(run_id, 100, reservation_id="b")
    assert (await aclient.refund(run_id, "b")).released_micros == 100
    state = (await aclient.get_run(run_id)).state
    assert (state.committed_micros, state.overrun_micros, state.reserved_micros) == (500, 100, 0)
    assert (await aclient.close_run(run_id)).state.status == budget_pb2.RUN_STATUS_CLOSED


# --- typed errors -----------------------------------------------------------------------


def test_sync_typed_errors(client: RuncapClient) -> None:
    missing = new_id("missing")
    with pytest.raises(RunNotFoundError) as not_found:
        client.get_run(missing)
    assert not_found.value.run_id == missing

    with pytest.raises(InvalidArgumentError) as invalid:
        client.create_run("not a valid id!", limit_micros=0)
    assert {f for f, _ in invalid.value.field_violations} == {"run_id", "limit_micros"}

    run_id = new_id("run")
    client.create_run(run_id, limit_micros=1_000)
    with pytest.raises(RunAlreadyExistsError):
        client.create_run(run_id, limit_micros=2_000)

    client.reserve_once(run_id, 100, reservation_id="a")
    with pytest.raises(IdempotencyConflictError) as conflict:
        client.reserve_once(run_id, 200, reservation_id="a")
    assert (conflict.value.run_id, conflict.value.reservation_id) == (run_id, "a")

    with pytest.raises(ReservationNotFoundError) as no_reservation:
        client.commit(run_id, "nope", 1)
    assert no_reservation.value.reservation_id == "nope"

    client.refund(run_id, "a")
    with pytest.raises(ReservationReleasedError):
        client.commit(run_id, "a", 1)

    assert client.reserve_once(run_id, 5_000, reservation_id="big").decision == BLOCK
    with pytest.raises(ReservationBlockedError):
        client.commit(run_id, "big", 1)


async def test_async_typed_errors(aclient: AsyncRuncapClient) -> None:
    with pytest.raises(RunNotFoundError):
        await aclient.get_run(new_id("missing"))
    with pytest.raises(InvalidArgumentError) as invalid:
        await aclient.create_run(new_id("run"), limit_micros=-5)
    assert [f for f, _ in invalid.value.field_violations] == ["limit_micros"]
    run_id = new_id("run")
    await aclient.create_run(run_id, limit_micros=1_000)
    await aclient.reserve_once(run_id, 100, reservation_id="a")
    with pytest.raises(IdempotencyConflictError):
        await aclient.reserve_once(run_id, 100, reservation_id="a", ttl=1)


# --- the reserve context manager --------------------------------------------------------


def test_sync_hold_commits_refunds_and_blocks(client: RuncapClient) -> None:
    run_id = new_id("run")
    client.create_run(run_id, limit_micros=1_000)

    with client.reserve(run_id, 100) as hold:
        assert hold.response.decision == ALLOW
        assert (hold.state.reserved_micros, hold.amount_micros) == (100, 100)
    assert hold.commit_response is not None
    assert hold.commit_response.actual_micros == 100
    assert (hold.state.committed_micros, hold.state.reserved_micros) == (100, 0)

    with client.reserve(run_id, 100, reservation_id="measured", ttl=30) as hold:
        hold.set_actual(40)
    assert hold.reservation_id == "measured"
    assert hold.state.committed_micros == 140

    with client.reserve(run_id, 100) as hold:
        hold.release()
    assert hold.refund_response is not None
    assert hold.refund_response.released_micros == 100

    with (
        pytest.raises(RuntimeError, match="model call failed"),
        client.reserve(run_id, 100) as hold,
    ):
        raise RuntimeError("model call failed")
    assert hold.refund_response is not None
    assert hold.refund_response.reservation_status == budget_pb2.RESERVATION_STATUS_RELEASED

    def spend_then_fail(hold: Hold) -> None:
        hold.set_actual(60)
        raise RuntimeError("could not parse the reply")

    with pytest.raises(RuntimeError, match="parse"), client.reserve(run_id, 100) as hold:
        spend_then_fail(hold)
    assert hold.state.committed_micros == 200

    entered = False
    with pytest.raises(BudgetBlockedError) as blocked, client.reserve(run_id, 900):
        entered = True
    assert not entered
    assert blocked.value.reason == budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET
    assert blocked.value.state.remaining_micros == 800

    state = client.get_run(run_id).state
    assert (state.committed_micros, state.reserved_micros, state.active_reservations) == (200, 0, 0)


async def test_async_hold_commits_refunds_and_blocks(aclient: AsyncRuncapClient) -> None:
    run_id = new_id("run")
    await aclient.create_run(run_id, limit_micros=1_000)
    async with aclient.reserve(run_id, 300) as hold:
        hold.set_actual(250)
    assert hold.state.committed_micros == 250
    with pytest.raises(KeyError):
        async with aclient.reserve(run_id, 300) as hold:
            raise KeyError("boom")
    assert hold.state.reserved_micros == 0
    await aclient.close_run(run_id)
    with pytest.raises(BudgetBlockedError) as blocked:
        async with aclient.reserve(run_id, 1):
            pass
    assert blocked.value.reason == budget_pb2.DECISION_REASON_RUN_CLOSED
    state = (await aclient.get_run(run_id)).state
    assert (state.committed_micros, state.reserved_micros) == (250, 0)


# --- Watch ------------------------------------------------------------------------------


def test_sync_watch_resumes_after_the_client_cancels(client: RuncapClient) -> None:
    run_id = new_id("run")
    client.create_run(run_id, limit_micros=1_000_000)
    churn(client, run_id, 3, "a")  # revisions 2..7
    seen: list[pb.WatchResponse] = []
    with client.watch(run_id) as stream:
        snapshot = next(stream)
        assert snapshot.HasField("snapshot")
        assert snapshot.revision == snapshot.snapshot.revision == 7
        churn(client, run_id, 2, "b")  # 8..11
        for message in stream:
            if message.HasField("event"):
                seen.append(message)
                if message.revision == 9:
                    break
    resume_at = stream.last_revision
    assert resume_at == 9
    churn(client, run_id, 2, "c")  # 12..15
    with client.watch(run_id, after_revision=resume_at) as stream:
        for message in stream:
            assert not message.HasField("snapshot")
            if message.HasField("event"):
                seen.append(message)
                if message.revision == 15:
                    break
    assert [m.revision for m in seen] == list(range(8, 16))
    assert described(seen) == expected_events([("b", 2), ("c", 2)])
    assert all(m.event.state.revision == m.revision for m in seen)
    assert seen[-1].event.state.committed_micros == 3 + 1 + 1


async def test_async_watch_resumes_after_the_client_cancels(aclient: AsyncRuncapClient) -> None:
    run_id = new_id("run")
    await aclient.create_run(run_id, limit_micros=1_000_000)
    seen: list[pb.WatchResponse] = []
    async with aclient.watch(run_id, after_revision=0) as stream:
        await achurn(aclient, run_id, 2, "a")  # 2..5
        async for message in stream:
            if message.HasField("event"):
                seen.append(message)
                if message.revision == 3:
                    break
    assert stream.last_revision == 3
    await achurn(aclient, run_id, 2, "b")  # 6..9
    async with aclient.watch(run_id, after_revision=stream.last_revision) as stream:
        async for message in stream:
            if message.HasField("event"):
                seen.append(message)
                if message.revision == 9:
                    break
    assert [m.revision for m in seen] == list(range(1, 10))
    assert seen[0].event.type == budget_pb2.EVENT_TYPE_CREATED
    assert described(seen[1:]) == expected_events([("a", 2), ("b", 2)])


def test_sync_watch_out_of_range(client: RuncapClient) -> None:
    run_id = new_id("run")
    client.create_run(run_id, limit_micros=100)
    with client.watch(run_id, after_revision=50) as stream, pytest.raises(RevisionOutOfRangeError):
        next(stream)
    with client.watch(run_id, after_revision=50, resnapshot_on_out_of_range=True) as stream:
        first = next(stream)
    assert first.HasField("snapshot")
    assert first.revision == 1


async def test_async_watch_out_of_range(aclient: AsyncRuncapClient) -> None:
    run_id = new_id("run")
    await aclient.create_run(run_id, limit_micros=100)
    async with aclient.watch(run_id, after_revision=7) as stream:
        with pytest.raises(RevisionOutOfRangeError) as caught:
            await anext(stream)
    assert (caught.value.after_revision, caught.value.head) == (7, 1)


def test_sync_watch_resumes_across_a_server_restart(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    server = ServerProcess(tmp_path / "runcap.db", listen=listen).start()
    try:
        with RuncapClient(
            server.target, options=FAST_RECONNECT_OPTIONS, retry=RESTART_RETRY
        ) as client:
            run_id = new_id("run")
            client.create_run(run_id, limit_micros=1_000_000)
            seen: list[pb.WatchResponse] = []
            snapshot, halfway = threading.Event(), threading.Event()
            stream = client.watch(run_id, reconnect=PATIENT)

            def read() -> None:
                for message in stream:
                    snapshot.set()
                    if message.HasField("event"):
                        seen.append(message)
                        if message.revision == 7:
                            halfway.set()
                        if message.revision == 13:
                            return

            reader = threading.Thread(target=read)
            reader.start()
            try:
                assert snapshot.wait(20)
                churn(client, run_id, 3, "a")  # 2..7
                assert halfway.wait(20)
                server.stop()
                time.sleep(0.3)  # the watcher retries against a closed port meanwhile
                server = ServerProcess(tmp_path / "runcap.db", listen=listen).start()
                churn(client, run_id, 3, "b")  # 8..13
                reader.join(30)
                assert not reader.is_alive()
                assert stream.reconnects >= 1
            finally:
                stream.close()
                reader.join(10)
        assert [m.revision for m in seen] == list(range(2, 14))
        assert described(seen) == expected_events([("a", 3), ("b", 3)])
    finally:
        server.stop()


async def test_async_watch_resumes_across_a_server_restart(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    server = await asyncio.to_thread(ServerProcess(tmp_path / "runcap.db", listen=listen).start)
    try:
        async with AsyncRuncapClient(
            server.target, options=FAST_RECONNECT_OPTIONS, retry=RESTART_RETRY
        ) as aclient:
            run_id = new_id("run")
            await aclient.create_run(run_id, limit_micros=1_000_000)
            seen: list[pb.WatchResponse] = []
            snapshot, halfway = asyncio.Event(), asyncio.Event()
            reconnects: list[int] = []

            async def read() -> None:
                async with aclient.watch(run_id, reconnect=PATIENT) as stream:
                    async for message in stream:
                        snapshot.set()
                        if message.HasField("event"):
                            seen.append(message)
                            if message.revision == 5:
                                halfway.set()
                            if message.revision == 9:
                                reconnects.append(stream.reconnects)
                                return

            reader = asyncio.create_task(read())
            await asyncio.wait_for(snapshot.wait(), 20)
            await achurn(aclient, run_id, 2, "a")  # 2..5
            await asyncio.wait_for(halfway.wait(), 20)
            await asyncio.to_thread(server.stop)
            server = await asyncio.to_thread(
                ServerProcess(tmp_path / "runcap.db", listen=listen).start
            )
            await achurn(aclient, run_id, 2, "b")  # 6..9
            await asyncio.wait_for(reader, 30)
        assert reconnects[0] >= 1
        assert [m.revision for m in seen] == list(range(2, 10))
        assert described(seen) == expected_events([("a", 2), ("b", 2)])
    finally:
        await asyncio.to_thread(server.stop)
