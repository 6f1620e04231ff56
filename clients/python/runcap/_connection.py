"""What every runcap client shares: its channel, metadata, deadline and the
retry loop of unary calls, in a sync and an asyncio form. Each client names
the stub of its service in `_STUB`."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import grpc

from runcap._shared import (
    DEFAULT_TARGET,
    CallMetadata,
    ChannelOptions,
    RetryPolicy,
    api_key_metadata,
    channel_options,
)
from runcap.errors import from_rpc_error

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class Connection:
    """A sync client's channel (opened here unless one is given) and calls."""

    _STUB: ClassVar[type[Any]]  # the service stub class, called with the channel

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions | None = None,
        timeout: float | None = 10.0,
        metadata: CallMetadata | None = None,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
    ) -> None:
        self._owns_channel = channel is None
        if channel is None:
            merged = channel_options(options)
            if credentials is None:
                channel = grpc.insecure_channel(target, options=merged)
            else:
                channel = grpc.secure_channel(target, credentials, options=merged)
        self._channel = channel
        self._stub = type(self)._STUB(channel)
        self._timeout = timeout
        self._metadata = tuple(metadata or ()) + api_key_metadata(api_key)
        self._retry = retry or RetryPolicy()

    def close(self) -> None:
        """Closes the channel, if the client opened it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        *,
        idempotent: bool = True,
    ) -> _Resp:
        attempt = 1
        while True:
            try:
                return method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = self._retry.delay(attempt, error) if idempotent else None
                if delay is None:
                    raise error from exc
            time.sleep(delay)
            attempt += 1


class AsyncConnection:
    """An asyncio client's channel (opened here unless one is given) and calls."""

    _STUB: ClassVar[type[Any]]  # the service stub class, called with the channel

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions | None = None,
        timeout: float | None = 10.0,
        metadata: CallMetadata | None = None,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
    ) -> None:
        self._owns_channel = channel is None
        if channel is None:
            merged = channel_options(options)
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=merged)
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=merged)
        self._channel = channel
        self._stub = type(self)._STUB(channel)
        self._timeout = timeout
        self._metadata = tuple(metadata or ()) + api_key_metadata(api_key)
        self._retry = retry or RetryPolicy()

    async def close(self) -> None:
        """Closes the channel, if the client opened it."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        *,
        idempotent: bool = True,
    ) -> _Resp:
        attempt = 1
        while True:
            try:
                return await method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = self._retry.delay(attempt, error) if idempotent else None
                if delay is None:
                    raise error from exc
            await asyncio.sleep(delay)
            attempt += 1
