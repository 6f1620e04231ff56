"""The dashboard's way into the API: a gRPC channel to this same server, on
which every call carries the key of the HTTP request it serves.

So the dashboard decides nothing itself: roles, tenants, PERMISSION_DENIED
and NOT_FOUND are the API's answers to the caller's own key. With a
plaintext API port the channel goes to that port over loopback. With TLS the
server has no client certificate of its own to present (mTLS) and its
certificate need not name a loopback address, so the dashboard's calls go
to a Unix socket on the same gRPC server instead, in a directory only the
server's user can enter (`Dashboard.add_loopback_port`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Final

import grpc

from runcap import AsyncRuncapClient
from runcap.errors import from_rpc_error
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub

UNARY_TIMEOUT_S: Final = 10.0
LIST_PAGE_SIZE: Final = 500


def loopback_target(listen_addr: str, port: int) -> str:
    """The address this server's API answers on from the same machine: the
    listen host, or the loopback address for a wildcard one."""
    host = listen_addr.rpartition(":")[0]
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


class Loopback:
    """A channel to this server's API, shared by every dashboard request."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target)
        self._stub = BudgetServiceStub(self.channel)

    def client(self, api_key: str | None) -> AsyncRuncapClient:
        """A client that calls as the holder of `api_key` (None: no key, for
        a server without authentication)."""
        return AsyncRuncapClient(channel=self.channel, api_key=api_key, timeout=UNARY_TIMEOUT_S)

    async def watch(
        self, api_key: str | None, request: pb.WatchRequest
    ) -> AsyncGenerator[pb.WatchResponse, None]:
        """One Watch call, as is (no reconnects: the browser resumes); a
        failure raises the typed `RuncapError`."""
        metadata = () if api_key is None else (("authorization", f"Bearer {api_key}"),)
        call = self._stub.Watch(request, metadata=metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close(None)


async def list_runs(
    client: AsyncRuncapClient, since: datetime, until: datetime | None, *, limit: int
) -> tuple[list[pb.ListedRun], bool]:
    """The runs created in [since, until), oldest first, page by page; at
    most `limit` (the oldest), and whether there were more."""
    runs: list[pb.ListedRun] = []
    token = ""
    while True:
        page = await client.list_runs(since, until, page_size=LIST_PAGE_SIZE, page_token=token)
        runs.extend(page.runs)
        token = page.next_page_token
        if len(runs) >= limit:
            return runs[:limit], bool(token) or len(runs) > limit
        if not token:
            return runs, False
