"""An in-process gRPC BudgetService for client tests that need no runcap server.

Each test module brings its own fake (what the RPCs answer); this serves it on
a free loopback port, and `client_fixtures` gives the module sync and async
clients of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from runcap import RetryPolicy
from runcap.v1 import budget_service_pb2 as pb

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)
SERVICE = "runcap.v1.BudgetService"
Behavior = Callable[[Any, grpc.ServicerContext], Any]


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
