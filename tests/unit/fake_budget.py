"""An in-process gRPC BudgetService for client tests that need no runcap server.

Each test module brings its own fake (what the RPCs answer), most of them a
`RecordingFake`; `serve` serves it on a free loopback port, and the `client`
and `aclient` fixtures of conftest.py are sync and async clients of it.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from runcap import RetryPolicy
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)
SERVICE = "runcap.v1.BudgetService"
Behavior = Callable[[Any, grpc.ServicerContext], Any]
# A scripted answer to one Reserve: a function of its request.
Answer = Callable[[pb.ReserveRequest], pb.ReserveResponse]
# The RPCs every RecordingFake answers itself.
CORE_METHODS = ("CreateRun", "Reserve", "Commit", "Refund")


def error_status(code: int, message: str, *details: Message) -> status_pb2.Status:
    """A google.rpc.Status with `details` packed, as the server fails an RPC."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=message, details=packed)


class RecordingFake:
    """A scripted BudgetService that records every request in `calls[method]`.

    CreateRun echoes the run and its policy; Reserve answers with the queued
    `answers` first (one popped a call), then `allow`; Commit and Refund settle.
    Every budget state has `limit_micros`. A subclass serves more RPCs by
    listing them in `methods` and answering them in `other`; those first fail
    with UNAVAILABLE while `unavailable` counts down to zero.
    """

    methods: ClassVar[tuple[str, ...]] = CORE_METHODS
    limit_micros: ClassVar[int] = 1_000

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = defaultdict(list)
        self.answers: list[Answer] = []
        self.unavailable = 0
        self.lock = threading.Lock()

    def handler(self, method: str) -> Callable[[Any, grpc.ServicerContext], Message]:
        """The behaviour of `method`, for `serve(fake.handler, fake.methods)`."""

        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            core = method in CORE_METHODS
            with self.lock:
                self.calls[method].append(request)
                answer = self.answers.pop(0) if method == "Reserve" and self.answers else None
                unavailable = not core and self.unavailable > 0
                if unavailable:
                    self.unavailable -= 1
            if unavailable:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            if not core:
                return self.other(method, request, context)
            state = budget_pb2.BudgetState(run_id=request.run_id, limit_micros=self.limit_micros)
            if method == "CreateRun":
                run = budget_pb2.Run(run_id=request.run_id, policy=request.policy)
                return pb.CreateRunResponse(run=run, state=state)
            if method == "Reserve":
                return answer(request) if answer is not None else self.allow(request, state)
            if method == "Commit":
                return pb.CommitResponse(state=state, actual_micros=request.actual_micros)
            return pb.RefundResponse(state=state)

        return handle

    def allow(
        self, request: pb.ReserveRequest, state: budget_pb2.BudgetState
    ) -> pb.ReserveResponse:
        """Reserve's answer when none is queued: the amount asked for, held."""
        return pb.ReserveResponse(
            decision=budget_pb2.DECISION_ALLOW,
            reason=budget_pb2.DECISION_REASON_WITHIN_BUDGET,
            reservation_id=request.reservation_id,
            amount_micros=request.amount_micros,
            state=state,
        )

    def other(self, method: str, request: Any, context: grpc.ServicerContext) -> Message:
        """The answer to an RPC of `methods` beyond the core four (override it)."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"the fake does not serve {method}")


@contextmanager
def serve(
    unary: Callable[[str], Behavior],
    methods: Iterable[str],
    *,
    watch: Callable[..., Any] | None = None,
    workers: int = 4,
) -> Iterator[str]:
    """Serve `unary(name)` for each RPC in `methods` (and `watch`); yield the target."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            unary(name),
            request_deserializer=getattr(pb, f"{name}Request").FromString,
            response_serializer=getattr(pb, f"{name}Response").SerializeToString,
        )
        for name in methods
    }
    if watch is not None:
        handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=pb.WatchRequest.FromString,
            response_serializer=pb.WatchResponse.SerializeToString,
        )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()
