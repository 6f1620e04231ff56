"""`runcap serve` on uvloop by default (RUNCAP_EVENT_LOOP), asyncio's loop on request."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub


def without_uvloop(directory: Path) -> dict[str, str]:
    """An environment where `import uvloop` fails, as if it were not installed."""
    (directory / "uvloop.py").write_text("raise ImportError('not here')\n")
    return {"PYTHONPATH": str(directory)}


@pytest.mark.parametrize(
    ("setting", "hide_uvloop", "loop"),
    [("", False, "uvloop"), ("asyncio", False, "asyncio"), ("auto", True, "asyncio")],
)
async def test_serve_runs_on_the_event_loop_the_setting_names(
    tmp_path: Path, setting: str, hide_uvloop: bool, loop: str
) -> None:
    env = {"RUNCAP_EVENT_LOOP": setting} if setting else {}
    if hide_uvloop:
        env |= without_uvloop(tmp_path)
    server = ServerProcess(tmp_path / "runcap.db", env=env).start()
    try:
        listening = next(line for line in server.log if "runcap listening on" in line)
        assert f"; {loop} event loop; plaintext)" in listening
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
            run = f"run-{uuid.uuid4().hex}"
            await stub.CreateRun(pb.CreateRunRequest(run_id=run, limit_micros=1_000))
            reserved = await stub.Reserve(
                pb.ReserveRequest(run_id=run, reservation_id="r", amount_micros=600)
            )
            assert reserved.decision == budget_pb2.DECISION_ALLOW
            committed = await stub.Commit(
                pb.CommitRequest(run_id=run, reservation_id="r", actual_micros=500)
            )
            assert committed.state.committed_micros == 500
    finally:
        server.stop()


def serve(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runcap_server", "serve", "--insecure-dev", "--backend", "memory"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        cwd=tmp_path,
    )


def test_serve_refuses_an_unknown_event_loop(tmp_path: Path) -> None:
    done = serve(tmp_path, {"RUNCAP_EVENT_LOOP": "trio"})
    assert done.returncode == 2
    assert "RUNCAP_EVENT_LOOP must be one of auto, uvloop, asyncio" in done.stderr


def test_serve_refuses_uvloop_when_it_cannot_be_imported(tmp_path: Path) -> None:
    done = serve(tmp_path, {**without_uvloop(tmp_path), "RUNCAP_EVENT_LOOP": "uvloop"})
    assert done.returncode == 2
    assert "RUNCAP_EVENT_LOOP=uvloop but uvloop is not installed" in done.stderr
