"""Watch through the real server: ordered, unique, complete, resumable."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

from tests.integration.rpc import create_run, error_info
from tests.servers import ServerProcess

Stream = grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse]


async def churn(stub: BudgetServiceAsyncStub, run_id: str, n: int, prefix: str = "c") -> None:
    """n reserve+commit pairs: 2n changes."""
    for i in range(n):
        rid = f"{prefix}{i}"
        await stub.Reserve(pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=10))
        await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id=rid, actual_micros=i % 10))


async def collect_events(stream: Stream, until_revision: int) -> list[pb.WatchResponse]:
    """Read events (skipping heartbeats) up to and including until_revision."""
    seen: list[pb.WatchResponse] = []
    while True:
        message = await stream.read()
        assert isinstance(message, pb.WatchResponse), f"stream ended after {len(seen)} events"
        if message.HasField("event"):
            seen.append(message)
            if message.revision >= until_revision:
                return seen


async def test_snapshot_first_then_every_change_in_order(stub: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(stub, limit_micros=1_000_000)
    stream = stub.Watch(pb.WatchRequest(run_id=run_id))
    first = await stream.read()
    assert isinstance(first, pb.WatchResponse)
    assert first.HasField("snapshot")
    assert (first.revision, first.snapshot.revision) == (1, 1)
    await churn(stub, run_id, 20)
    events = await collect_events(stream, 41)
    stream.cancel()
    assert [e.revision for e in events] == list(range(2, 42))
    assert all(e.event.state.revision == e.revision for e in events)
    final = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert events[-1].event.state == final


async def test_resume_after_disconnect_sees_each_event_exactly_once(
    stub: BudgetServiceAsyncStub,
) -> None:
    run_id = await create_run(stub, limit_micros=10_000_000)
    writer = asyncio.create_task(churn(stub, run_id, 100))
    seen: list[int] = []
    last = 0
    # Reconnect every few events while the writer keeps going.
    while last < 201:
        stream = stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=last))
        for message in await collect_events(stream, min(last + 7, 201)):
            seen.append(message.revision)
            last = message.revision
        stream.cancel()
    await writer
    assert seen == list(range(1, 202))


async def test_200_watchers_see_the_same_ordered_events(stub: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(stub, limit_micros=10_000_000)
    streams = [stub.Watch(pb.WatchRequest(run_id=run_id)) for _ in range(200)]
    for stream in streams:
        first = await stream.read()
        assert isinstance(first, pb.WatchResponse)
        assert first.HasField("snapshot")
    readers = [asyncio.create_task(collect_events(s, 61)) for s in streams]
    await churn(stub, run_id, 30)
    results = await asyncio.wait_for(asyncio.gather(*readers), 60)
    for stream in streams:
        stream.cancel()
    expected = [e.event for e in results[0]]
    assert [e.state.revision for e in expected] == list(range(2, 62))
    for result in results:
        assert [e.event for e in result] == expected


async def test_two_watchers_receive_byte_identical_events(
    stub: BudgetServiceAsyncStub, server_target: str
) -> None:
    # Events go out pre-serialized (once per change): read them as raw bytes.
    async with grpc.aio.insecure_channel(server_target) as channel:
        watch = channel.unary_stream(
            "/runcap.v1.BudgetService/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=None,
        )
        run_id = await create_run(stub, limit_micros=1_000_000)
        streams = [watch(pb.WatchRequest(run_id=run_id)) for _ in range(2)]

        async def read(stream: grpc.aio.UnaryStreamCall[pb.WatchRequest, bytes]) -> bytes:
            raw = await stream.read()
            assert isinstance(raw, bytes), f"the stream ended: {raw!r}"
            return raw

        for stream in streams:
            assert pb.WatchResponse.FromString(await read(stream)).HasField("snapshot")
        await churn(stub, run_id, 3)
        received = [[await read(stream) for _ in range(6)] for stream in streams]
        for stream in streams:
            stream.cancel()
    assert received[0] == received[1]
    events = [pb.WatchResponse.FromString(raw) for raw in received[0]]
    assert [(e.revision, e.event.state.revision) for e in events] == [(r, r) for r in range(2, 8)]
    assert [e.event.type for e in events] == [
        budget_pb2.EVENT_TYPE_RESERVED,
        budget_pb2.EVENT_TYPE_COMMITTED,
    ] * 3
    final = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert events[-1].event.state == final


async def test_unknown_run_and_future_revision_are_rejected(stub: BudgetServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Watch(pb.WatchRequest(run_id="no-such-run")).read()
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    run_id = await create_run(stub, limit_micros=1)
    with pytest.raises(grpc.aio.AioRpcError) as future:
        await stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=5)).read()
    assert future.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(future.value)[0].reason == "REVISION_OUT_OF_RANGE"


@pytest.fixture
def small_log_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path / "runcap.db",
        env={"RUNCAP_LOG_RETENTION": "10"},
    ).start()
    yield server
    server.stop()


async def test_resume_point_older_than_the_log_is_out_of_range(
    small_log_server: ServerProcess,
) -> None:
    async with grpc.aio.insecure_channel(small_log_server.target) as channel:
        stub = BudgetServiceStub(channel)
        run_id = await create_run(stub, limit_micros=1_000_000)
        await churn(stub, run_id, 10)  # revisions 2..21; the log keeps 12..21
        with pytest.raises(grpc.aio.AioRpcError) as old:
            await stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=5)).read()
        assert old.value.code() == grpc.StatusCode.OUT_OF_RANGE
        info, _ = error_info(old.value)
        assert (info.reason, info.metadata["floor"], info.metadata["head"]) == (
            "REVISION_OUT_OF_RANGE",
            "12",
            "21",
        )
        # The oldest retained point still resumes.
        events = await collect_events(
            stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=11)), 21
        )
        assert [e.revision for e in events] == list(range(12, 22))


async def test_closed_run_events(stub: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(stub, limit_micros=100)
    await stub.Reserve(pb.ReserveRequest(run_id=run_id, reservation_id="a", amount_micros=50))
    await stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
    await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id="a", actual_micros=40))
    events = await collect_events(stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=0)), 4)
    assert [e.event.type for e in events] == [
        budget_pb2.EVENT_TYPE_CREATED,
        budget_pb2.EVENT_TYPE_RESERVED,
        budget_pb2.EVENT_TYPE_CLOSED,
        budget_pb2.EVENT_TYPE_COMMITTED,
    ]
    assert events[-1].event.state.status == budget_pb2.RUN_STATUS_CLOSED
    assert events[-1].event.actual_micros == 40


async def check_calibrated_exposure(
    writer: BudgetServiceAsyncStub, watcher: BudgetServiceAsyncStub
) -> None:
    """A calibrated run's snapshot and events carry its exposure and ceiling
    (explicit amounts are their own worst case); other runs show 0."""
    policy = budget_pb2.RunPolicy(enforcement_mode=budget_pb2.ENFORCEMENT_MODE_CALIBRATED)
    run_id = await create_run(writer, limit_micros=1_000, policy=policy)
    stream = watcher.Watch(pb.WatchRequest(run_id=run_id))
    first = await stream.read()
    assert isinstance(first, pb.WatchResponse)
    assert (first.snapshot.exposure_micros, first.snapshot.exposure_ceiling_micros) == (0, 1_100)
    for rid, amount in (("a", 300), ("b", 200)):
        await writer.Reserve(
            pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=amount)
        )
    await writer.Commit(pb.CommitRequest(run_id=run_id, reservation_id="a", actual_micros=250))
    await writer.Refund(pb.RefundRequest(run_id=run_id, reservation_id="b"))
    events = await collect_events(stream, 5)
    stream.cancel()
    assert [(e.event.type, e.event.state.exposure_micros) for e in events] == [
        (budget_pb2.EVENT_TYPE_RESERVED, 300),
        (budget_pb2.EVENT_TYPE_RESERVED, 500),
        (budget_pb2.EVENT_TYPE_COMMITTED, 250 + 200),
        (budget_pb2.EVENT_TYPE_REFUNDED, 250),
    ]
    assert {e.event.state.exposure_ceiling_micros for e in events} == {1_100}
    # A replay from the log shows the same, and so does GetRun.
    replayed = await collect_events(
        watcher.Watch(pb.WatchRequest(run_id=run_id, after_revision=0)), 5
    )
    assert [e.event.state for e in replayed[1:]] == [e.event.state for e in events]
    state = (await watcher.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert (state.exposure_micros, state.exposure_ceiling_micros) == (250, 1_100)
    hard = await create_run(writer, limit_micros=1_000)
    await writer.Reserve(pb.ReserveRequest(run_id=hard, reservation_id="a", amount_micros=300))
    shown = await collect_events(watcher.Watch(pb.WatchRequest(run_id=hard, after_revision=0)), 2)
    assert {
        (e.event.state.exposure_micros, e.event.state.exposure_ceiling_micros) for e in shown
    } == {(0, 0)}


async def test_a_calibrated_runs_events_carry_its_exposure(stub: BudgetServiceAsyncStub) -> None:
    await check_calibrated_exposure(stub, stub)


async def check_blocked_events(
    writer: BudgetServiceAsyncStub, watcher: BudgetServiceAsyncStub
) -> None:
    """A run at its wall is one BLOCKED event however many Reserves it blocks;
    GetRun counts them all; a Reserve that holds money again clears the mark."""
    run_id = await create_run(writer, limit_micros=1_000_000)
    stream = watcher.Watch(pb.WatchRequest(run_id=run_id))
    first = await stream.read()
    assert isinstance(first, pb.WatchResponse)
    assert not first.snapshot.blocked
    await writer.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="s", amount_micros=980_000)
    )
    await writer.Commit(pb.CommitRequest(run_id=run_id, reservation_id="s", actual_micros=980_000))

    async def reserve(rid: str, amount: int) -> pb.ReserveResponse:
        request = pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=amount)
        return await writer.Reserve(request)

    answers = await asyncio.gather(*(reserve(f"loop-{i}", 100_000) for i in range(50)))
    assert {a.decision for a in answers} == {budget_pb2.DECISION_BLOCK}
    assert (await reserve("loop-0", 100_000)).replayed  # a retry counts nothing
    shown = await watcher.GetRun(pb.GetRunRequest(run_id=run_id))
    # Reserved, committed, three thresholds crossed, one BLOCKED: revision 7.
    assert (shown.run.blocked_calls, shown.state.blocked, shown.state.revision) == (50, True, 7)
    assert (await reserve("fits", 10_000)).decision == budget_pb2.DECISION_ALLOW
    await reserve("again", 100_000)
    events = await collect_events(stream, 9)
    stream.cancel()
    blocks = [e.event for e in events if e.event.type == budget_pb2.EVENT_TYPE_BLOCKED]
    assert [(b.state.revision, b.state.blocked) for b in blocks] == [(7, True), (9, True)]
    assert blocks[0].reservation_id.startswith("loop-")
    assert blocks[1].reservation_id == "again"
    assert (blocks[0].amount_micros, blocks[0].reason) == (
        100_000,
        budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
    )
    assert (blocks[0].blocking_scope.kind, blocks[0].blocking_scope.id) == (
        budget_pb2.SCOPE_KIND_RUN,
        run_id,
    )
    assert (blocks[0].blocking_dimension, blocks[0].blocking_period) == (
        budget_pb2.BUDGET_DIMENSION_SPEND,
        budget_pb2.PERIOD_LIFETIME,
    )
    (cleared,) = [e.event for e in events if e.event.reservation_id == "fits"]
    assert (cleared.type, cleared.state.blocked) == (budget_pb2.EVENT_TYPE_RESERVED, False)
    # A replay from the log carries the same events; GetRun counts 51 blocks now.
    replayed = await collect_events(
        watcher.Watch(pb.WatchRequest(run_id=run_id, after_revision=0)), 9
    )
    assert [e.event for e in replayed[1:]] == [e.event for e in events]
    shown = await watcher.GetRun(pb.GetRunRequest(run_id=run_id))
    assert (shown.run.blocked_calls, shown.state.blocked) == (51, True)


async def test_a_run_at_its_wall_is_one_blocked_event(stub: BudgetServiceAsyncStub) -> None:
    await check_blocked_events(stub, stub)
