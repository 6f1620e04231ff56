"""Health follows the backend: NOT_SERVING while storage does not answer."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runcap.v1 import budget_service_pb2
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server import app, errors
from runcap_server.ledger.model import ModelLedger
from runcap_server.settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _UnplugableLedger(ModelLedger):
    """The reference ledger, with its storage 'unplugged' on demand."""

    unplugged = False

    async def ping(self) -> None:
        if self.unplugged:
            raise errors.BackendUnavailable("unplugged by the test")


async def _status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    status: int = reply.status
    return status


async def _wait_for(stub: health_pb2_grpc.HealthStub, want: int) -> None:
    for _ in range(200):
        if await _status(stub, "runcap.v1.BudgetService") == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"health never became {want}")


async def test_health_tracks_the_backend_and_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "BACKEND_CHECK_S", 0.05)
    backend = _UnplugableLedger(default_ttl_ms=60_000)
    server = app.RuncapServer(
        Settings(listen_addr="127.0.0.1:0", backend="memory", shutdown_grace_ms=100), backend
    )
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert await _status(stub, "") == SERVING
            backend.unplugged = True
            await _wait_for(stub, NOT_SERVING)
            assert await _status(stub, "") == NOT_SERVING
            assert await _status(stub, "liveness") == SERVING  # the process is alive
            backend.unplugged = False
            await _wait_for(stub, SERVING)
            await server.health.enter_graceful_shutdown()
            assert await _status(stub, "runcap.v1.BudgetService") == NOT_SERVING
            assert await _status(stub, "liveness") == NOT_SERVING
    finally:
        await server.stop()


async def test_a_health_only_port_answers_health_and_nothing_else() -> None:
    settings = Settings(listen_addr="127.0.0.1:0", backend="memory", health_addr="127.0.0.1:0")
    server = app.RuncapServer(settings)
    await server.start()
    try:
        assert server.health_port not in (0, server.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert await _status(stub, "") == SERVING
            assert await _status(stub, "liveness") == SERVING
            budget = BudgetServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await budget.GetRun(budget_service_pb2.GetRunRequest(run_id="r"))
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await server.health.enter_graceful_shutdown()
            assert await _status(stub, "") == NOT_SERVING  # the same statuses as the main port
    finally:
        await server.stop()


def test_a_health_address_must_be_host_and_port() -> None:
    with pytest.raises(ValueError, match="RUNCAP_HEALTH_ADDR"):
        Settings(health_addr="8081")
