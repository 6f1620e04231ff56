"""The server as a process: crash durability, graceful shutdown, the README's command."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.servers import ServerProcess, wait_serving

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

REPO = Path(__file__).resolve().parents[2]


async def writer(
    stub: BudgetServiceAsyncStub, run_id: str, worker: int, acked: dict[str, tuple[str, int]]
) -> None:
    """Reserve and commit until the server dies; record what it acknowledged."""
    i = 0
    while True:
        rid = f"w{worker}-{i}"
        try:
            reply = await stub.Reserve(
                pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=100)
            )
            acked[rid] = ("reserved", reply.decision)
            if reply.decision == budget_pb2.DECISION_ALLOW:
                await stub.Commit(
                    pb.CommitRequest(run_id=run_id, reservation_id=rid, actual_micros=i % 150)
                )
                acked[rid] = ("committed", i % 150)
        except grpc.aio.AioRpcError:
            return
        i += 1


async def test_acknowledged_operations_survive_sigkill(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    run_id = "crash-run"
    acked: dict[str, tuple[str, int]] = {}
    async with grpc.aio.insecure_channel(fresh_server.target) as channel:
        stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
        await stub.CreateRun(pb.CreateRunRequest(run_id=run_id, limit_micros=1_000_000))
        seen_revision = 0
        watch = stub.Watch(pb.WatchRequest(run_id=run_id))
        tasks = [asyncio.create_task(writer(stub, run_id, w, acked)) for w in range(8)]
        while len(acked) < 300:
            message = await watch.read()
            assert isinstance(message, pb.WatchResponse)
            seen_revision = message.revision
        fresh_server.process.kill()  # type: ignore[union-attr]
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        watch.cancel()
    fresh_server.kill()

    fresh_server.start()  # same database, new port
    async with grpc.aio.insecure_channel(fresh_server.target) as channel:
        stub = BudgetServiceStub(channel)
        for rid, (what, value) in acked.items():
            if what == "committed":
                reply = await stub.Commit(
                    pb.CommitRequest(run_id=run_id, reservation_id=rid, actual_micros=value)
                )
                assert reply.replayed, rid
            else:
                again = await stub.Reserve(
                    pb.ReserveRequest(run_id=run_id, reservation_id=rid, amount_micros=100)
                )
                assert (again.replayed, again.decision) == (True, value), rid
        state = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state
        assert state.committed_micros + state.reserved_micros <= (
            state.limit_micros + state.overrun_micros
        )
        assert state.committed_micros >= sum(v for w, v in acked.values() if w == "committed")
        # Watch resumes from a revision seen before the crash, with nothing missing.
        resumed = stub.Watch(pb.WatchRequest(run_id=run_id, after_revision=seen_revision))
        revisions: list[int] = []
        while not revisions or revisions[-1] < state.revision:
            message = await resumed.read()
            assert isinstance(message, pb.WatchResponse)
            if message.HasField("event"):
                revisions.append(message.revision)
        resumed.cancel()
        assert revisions == list(range(seen_revision + 1, state.revision + 1))


async def test_sigterm_ends_watch_streams_cleanly_and_exits_zero(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "runcap.db", env={"RUNCAP_SHUTDOWN_GRACE": "3s"}).start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
            await stub.CreateRun(pb.CreateRunRequest(run_id="drain", limit_micros=100))
            streams = [stub.Watch(pb.WatchRequest(run_id="drain")) for _ in range(5)]
            for stream in streams:
                first = await stream.read()
                assert isinstance(first, pb.WatchResponse)
                assert first.HasField("snapshot")
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            for stream in streams:
                last = await asyncio.wait_for(stream.read(), 5)
                assert isinstance(last, pb.WatchResponse)
                assert last.progress.final
                assert last.revision == 1
                assert await asyncio.wait_for(stream.read(), 5) is grpc.aio.EOF  # type: ignore[attr-defined]
                assert await stream.code() == grpc.StatusCode.OK
        assert await asyncio.to_thread(server.wait, 10) == 0
        assert time.monotonic() - started < 5
        assert any("stopped" in line for line in server.log)
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "runcap").exists(), reason="needs make venv")
def test_make_serve_starts_the_service_on_sqlite(tmp_path: Path) -> None:
    """The README's first command: `make serve`."""
    target = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "RUNCAP_LISTEN_ADDR": target,
        "RUNCAP_SQLITE_PATH": str(tmp_path / "serve.db"),
    }
    make = subprocess.Popen(
        ["make", "-s", "serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_serving(target, timeout_s=60)
        with grpc.insecure_channel(target) as channel:
            stub = BudgetServiceStub(channel)
            created = stub.CreateRun(pb.CreateRunRequest(limit_micros=1_000_000))
            assert created.run.run_id
        assert (tmp_path / "serve.db").exists()
    finally:
        # make dies of the signal itself; the server behind it drains and exits.
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(30)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", int(target.rsplit(":", 1)[1]))) != 0
