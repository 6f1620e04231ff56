"""Small helpers for tests that speak raw runcap.v1 over gRPC."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from runcap.v1 import budget_service_pb2 as pb

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


async def create_run(stub: BudgetServiceAsyncStub, limit_micros: int, **kwargs: object) -> str:
    run_id = new_id("run")
    await stub.CreateRun(pb.CreateRunRequest(run_id=run_id, limit_micros=limit_micros, **kwargs))  # type: ignore[arg-type]
    return run_id


def error_info(
    error: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo, status_pb2.Status]:
    """The ErrorInfo and full google.rpc.Status of a failed call."""
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info, status
