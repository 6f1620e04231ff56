"""Shared fixtures: a live runcap server on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

from tests.servers import ServerProcess

pytest_plugins = ["tests.redis_fixtures"]


@pytest.fixture(scope="session")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the whole session, on SQLite in a fresh directory.

    Tests share it, so each uses its own run ids (uuid4).
    """
    db = tmp_path_factory.mktemp("runcap") / "runcap.db"
    server = ServerProcess(db, env={"RUNCAP_SWEEP_INTERVAL": "50ms"}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_target(server_process: ServerProcess) -> str:
    return server_process.target


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own (for restarts, kills and settings)."""
    server = ServerProcess(tmp_path / "runcap.db")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def stub(server_target: str) -> AsyncIterator[BudgetServiceAsyncStub]:
    """A raw generated stub on an asyncio channel to the session server."""
    async with grpc.aio.insecure_channel(server_target) as channel:
        yield BudgetServiceStub(channel)
