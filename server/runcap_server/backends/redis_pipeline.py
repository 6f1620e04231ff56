"""Automatic pipelining: concurrent Redis calls share one round trip per node.

A call made while its node's connection has a round trip in flight waits for
it, then goes out with every other call that arrived meanwhile: one write of
all of them, their replies read back in order, each handed to its own caller.
Under load a server process makes one round trip per batch instead of one per
call, on one connection per node, with no pool checkout, no per-call timer and
no per-call task (redis-py's client spends more CPU on those than Redis spends
running the script).

Each caller keeps its own outcome: a Redis error reply (NOSCRIPT, a failed
script, MOVED) is raised to that caller only; a caller that gives up (cancelled)
does not shift the replies of the others, since every reply is still read.
A batch waits at most until the earliest deadline among its calls (each call's
is `timeout_s` after it was made): past it the connection is dropped and the
batch's callers get redis-py's TimeoutError, as a read past the socket timeout
would. A broken connection fails the batch's callers with ConnectionError; the
next batch opens a new connection. Nothing is retried here: a call whose reply
was lost may have run, and the callers decide (the ledger fails closed, and
its scripts are idempotent per reservation id).

On a cluster, calls go to the primary of their key's slot; a redirect or a
cluster-state error (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, an uncovered slot)
sends that call through redis-py's cluster client, whose redirect handling
also updates the slot map the next calls are routed by. A connection error
makes the next call refresh the topology first (a failover moves slots).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from runcap_server.backends.redis_failures import connection_lost
from runcap_server.tasks import cancel_and_wait

# The most calls written in one batch (its replies are read under one deadline).
MAX_BATCH = 512
# Cluster replies that redis-py's cluster client knows how to follow or wait out.
_REDIRECTS = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
)


@dataclass(slots=True)
class _Call:
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    deadline: float


class _Lane:
    """One connection to one Redis node and the calls waiting to use it."""

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        timeout_s: float,
        on_broken: Callable[[], None],
    ) -> None:
        self._new_connection = connect
        self._connection: AbstractConnection | None = None
        self._timeout_s = timeout_s
        # Told when a round trip failed on a broken connection.
        self._on_broken = on_broken
        self._queue: list[_Call] = []
        self._drainer: asyncio.Task[None] | None = None

    def submit(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(_Call(args, future, loop.time() + self._timeout_s))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        """Round trips until no call waits; the next call starts a new drainer."""
        try:
            fresh = True  # the connection sat idle: check it before writing
            while self._queue:
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                await self._round_trip(batch, fresh)
                fresh = False
        except BaseException:
            # Closing (cancelled), or a bug: nobody would answer the waiting calls.
            self._fail(self._queue, redis.exceptions.ConnectionError, "Redis pipeline closed")
            self._queue.clear()
            raise
        finally:
            self._drainer = None

    async def _round_trip(self, batch: list[_Call], fresh: bool) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        live = []
        for call in batch:
            if call.future.done():
                continue  # its caller gave up before it was written
            if call.deadline <= now:
                self._fail([call], redis.exceptions.TimeoutError, "Redis did not answer in time")
            else:
                live.append(call)
        if not live:
            return
        answered = 0
        try:
            async with asyncio.timeout_at(min(call.deadline for call in live)):
                connection = await self._ready(fresh)
                # hiredis packs in C; redis-py's asyncio connection packs in Python.
                payload = b"".join([hiredis.pack_command(call.args) for call in live])
                await connection.send_packed_command(payload, check_health=False)
                for call in live:
                    try:
                        reply = await connection.read_response()
                    except redis.exceptions.ResponseError as error:
                        # An error reply: this call's alone; the connection is fine.
                        answered += 1
                        if not call.future.done():
                            call.future.set_exception(error)
                        continue
                    answered += 1
                    if not call.future.done():
                        call.future.set_result(reply)
        except TimeoutError as error:
            self._on_broken()
            unanswered = live[answered:]
            self._fail(
                unanswered, redis.exceptions.TimeoutError, "Redis did not answer in time", error
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as error:
            self._on_broken()
            kind = type(error) if isinstance(error, redis.exceptions.RedisError) else None
            self._fail(live[answered:], kind or redis.exceptions.ConnectionError, str(error), error)
        except BaseException as error:
            if not connection_lost(error):
                # Cancelled (closing) or a bug: these callers get no reply on this connection.
                self._fail(live[answered:], redis.exceptions.ConnectionError, f"aborted: {error!r}")
                raise
            # Torn down under the write (uvloop's closed transport): broken, as above.
            self._on_broken()
            lost = f"connection lost: {error}"
            self._fail(live[answered:], redis.exceptions.ConnectionError, lost, error)
        else:
            return
        # Unread replies would answer the next batch's calls: never reuse the connection.
        await self._drop()

    async def _ready(self, fresh: bool) -> AbstractConnection:
        connection = self._connection
        if connection is None:
            connection = self._connection = self._new_connection()
        elif fresh and connection.is_connected and await connection.can_read():
            # Data or EOF on an idle connection: closed by the server (CLIENT KILL, a
            # timeout, a restart) or out of step. Start over rather than fail a batch.
            await connection.disconnect(nowait=True)
        if not connection.is_connected:
            await connection.connect_check_health(check_health=False)
        return connection

    @staticmethod
    def _fail(
        calls: Sequence[_Call],
        kind: type[Exception],
        message: str,
        cause: BaseException | None = None,
    ) -> None:
        for call in calls:
            if not call.future.done():
                # One exception each: raised in many tasks, one would gather their tracebacks.
                error = kind(message)
                error.__cause__ = cause
                call.future.set_exception(error)

    async def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.disconnect(nowait=True)

    async def aclose(self) -> None:
        if self._drainer is not None:
            await cancel_and_wait([self._drainer])
        await self._drop()
        self._connection = None


def _lane_connection(
    connection_class: type[AbstractConnection], kwargs: dict[str, Any]
) -> Callable[[], AbstractConnection]:
    """A factory of connections like the client's, without a per-call socket
    timer (the lane keeps one deadline per batch) and without retries."""
    own = {**kwargs, "socket_timeout": None, "retry": Retry(NoBackoff(), 0)}
    own["socket_connect_timeout"] = kwargs.get("socket_connect_timeout") or kwargs.get(
        "socket_timeout"
    )
    return lambda: connection_class(**own)


class Pipeliner:
    """Runs commands on a redis-py client (standalone or cluster), pipelined.

    `execute(key, *args)` returns the command's reply (an awaitable); `key`
    routes it on a cluster (a key of the command, whose keys share its hash tag).
    """

    def __init__(self, client: aioredis.Redis | RedisCluster, *, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        # Told once: isinstance against redis-py's cluster class is slow (a Protocol).
        self._cluster: RedisCluster | None = None
        self._single: _Lane | None = None
        if isinstance(client, RedisCluster):
            self._cluster = client
        else:
            pool = client.connection_pool
            connect = _lane_connection(pool.connection_class, pool.connection_kwargs)
            self._single = _Lane(connect, timeout_s, lambda: None)
        # A cluster's lanes by node name.
        self._lanes: dict[str, _Lane] = {}
        # A node's connection broke: refresh the topology before the next call.
        self._stale = False
        self._refresh: asyncio.Task[None] | None = None

    def _mark_stale(self) -> None:
        self._stale = True

    def execute(self, key: str, *args: Any) -> Awaitable[Any]:
        if self._single is not None:
            return self._single.submit(args)  # the reply's future itself: no coroutine
        assert self._cluster is not None
        return self._on_cluster(self._cluster, key, args)

    async def _on_cluster(self, client: RedisCluster, key: str, args: tuple[Any, ...]) -> Any:
        if self._stale or self._refresh is not None:
            await self._refreshed(client)
        try:
            node = client.get_node_from_key(key)
        except redis.exceptions.SlotNotCoveredError:
            node = None  # not initialized yet, or a slot in flux
        if node is None:
            return await client.execute_command(*args)
        lane = self._lanes.get(node.name)
        if lane is None:
            connect = _lane_connection(node.connection_class, node.connection_kwargs)
            lane = self._lanes[node.name] = _Lane(connect, self._timeout_s, self._mark_stale)
        try:
            return await lane.submit(args)
        except _REDIRECTS:
            # redis-py follows it (and updates the slot map for the next calls).
            return await client.execute_command(*args)

    async def _refreshed(self, client: RedisCluster) -> None:
        """One topology refresh after a node's connection broke; callers share it."""
        if self._refresh is None:
            self._stale = False
            self._refresh = asyncio.create_task(client.nodes_manager.initialize())
        refresh = self._refresh
        try:
            await asyncio.shield(refresh)
        except Exception as error:
            raise redis.exceptions.ConnectionError(f"cluster topology: {error}") from error
        finally:
            if self._refresh is refresh and refresh.done():
                self._refresh = None

    async def aclose(self) -> None:
        if self._refresh is not None:
            await cancel_and_wait([self._refresh])
        lanes, self._lanes = list(self._lanes.values()), {}
        if self._single is not None:
            lanes.append(self._single)
        for lane in lanes:
            await lane.aclose()
