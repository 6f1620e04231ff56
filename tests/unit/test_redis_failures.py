"""What a failed Redis call means for the caller: a connection lost under it, a
failover in progress or a node gone is UNAVAILABLE (fail closed, retry), while a
failure raised by runcap's own code stays a bug (INTERNAL). Each case here was an
INTERNAL answer seen in the chaos suite's primary kill.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
import uvloop

from runcap_server import errors
from runcap_server.backends import redis as redis_backend
from runcap_server.backends.redis import RedisLedger
from runcap_server.backends.redis_failures import unavailable
from runcap_server.backends.redis_pipeline import _Call, _Lane
from tests.chaos.harness import namespace


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Connection reset by peer"),
        redis.exceptions.MaxConnectionsError("Too many connections"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.MasterDownError("MASTERDOWN Link with MASTER is down"),
        redis.exceptions.ClusterError("TTL exhausted."),
        redis.exceptions.SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
        redis.exceptions.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_failover_or_a_lost_node_is_unavailable(error: Exception) -> None:
    assert isinstance(unavailable(error), errors.BackendUnavailable)


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("ERR Error running script: bad argument"),
        redis.exceptions.DataError("Invalid input of type: 'dict'"),
        AttributeError("raised by runcap itself"),
        RuntimeError("raised by runcap itself"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_script_error_or_a_bug_of_ours_stays_internal(error: Exception) -> None:
    assert unavailable(error) is None


async def test_a_connection_torn_down_under_a_call_is_unavailable_not_internal() -> None:
    """What a failover's topology refresh does to a call in flight (seen under the
    primary kill above): redis-py finds its writer gone and raises AttributeError
    (redis/redis-py#4287). The call must fail closed with UNAVAILABLE."""
    ledger = RedisLedger(url="redis://127.0.0.1:1", default_ttl_ms=60_000, namespace=namespace())
    await ledger.start()
    try:
        torn = aioredis.Connection()
        torn._reader, torn._writer = object(), None  # type: ignore[assignment]

        async def on_torn(client: object) -> None:
            await torn._send_packed_command([b"PING"])

        with pytest.raises(errors.BackendUnavailable):
            await ledger._call(on_torn)

        async def buggy(client: object) -> None:
            raise AttributeError("a bug of ours stays a bug")

        with pytest.raises(AttributeError):
            await ledger._call(buggy)
    finally:
        await ledger.close()


async def test_a_torn_connection_under_a_pipelined_script_is_unavailable_not_internal() -> None:
    """The same through the pipelined path, whose fallback is redis-py's own call
    (it follows a MOVED during a failover): seen as a Commit answered INTERNAL."""
    torn = aioredis.Connection()
    torn._reader, torn._writer = object(), None  # type: ignore[assignment]

    class TornPipeline:
        async def execute(self, key: str, *args: object) -> list[object]:
            await torn._send_packed_command([b"EVALSHA"])
            return []

    class BuggyPipeline:
        async def execute(self, key: str, *args: object) -> list[object]:
            raise AttributeError("a bug of ours stays a bug")

    script = redis_backend._RUN_SCRIPT
    with pytest.raises(errors.BackendUnavailable):
        await RedisLedger._pipelined(TornPipeline(), script, ["k"], ["get"])  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        await RedisLedger._pipelined(BuggyPipeline(), script, ["k"], ["get"])  # type: ignore[arg-type]


async def closed_connection() -> tuple[aioredis.Connection, socket.socket]:
    """A redis-py connection whose transport has closed under it, as a failover
    leaves one, and the peer's end of its socket (to close)."""
    ours, theirs = socket.socketpair()
    connection = aioredis.Connection()
    connection._reader, connection._writer = await asyncio.open_connection(sock=ours)
    connection._writer.transport.abort()
    await asyncio.sleep(0)  # the handle closes on the next loop pass
    return connection, theirs


def on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """`runcap serve` runs on uvloop, whose closed transport refuses a write with
    RuntimeError, raised from Cython frames named "uvloop/handles/..."."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_a_write_on_a_closed_uvloop_transport_is_unavailable_not_internal() -> None:
    """Seen as a Commit and a Refund answered INTERNAL when a failover closed
    their pooled connection mid-call."""

    async def scenario() -> None:
        connection, peer = await closed_connection()

        async def on_closed(client: object) -> None:
            await connection._send_packed_command([b"EVALSHA"])

        async def buggy(client: object) -> None:
            raise RuntimeError("a bug of ours stays a bug")

        ledger = RedisLedger(
            url="redis://127.0.0.1:1", default_ttl_ms=60_000, namespace=namespace()
        )
        await ledger.start()
        try:
            with pytest.raises(errors.BackendUnavailable, match="connection lost"):
                await ledger._call(on_closed)
            with pytest.raises(RuntimeError, match="a bug of ours"):
                await ledger._call(buggy)
        finally:
            await ledger.close()
            peer.close()
            connection._reader = connection._writer = None  # closed: nothing to warn of

    on_uvloop(scenario)


def test_a_pipelined_batch_on_a_closed_uvloop_transport_fails_unavailable_and_reconnects() -> None:
    """The pipeline's own connections: the batch's callers get ConnectionError
    (UNAVAILABLE), the lane drops the connection and marks the topology stale,
    and its drainer does not die of the RuntimeError."""

    async def scenario() -> None:
        connection, peer = await closed_connection()
        broken: list[bool] = []
        lane = _Lane(lambda: connection, timeout_s=5.0, on_broken=lambda: broken.append(True))
        lane._connection = connection
        loop = asyncio.get_running_loop()
        call = _Call((b"PING",), loop.create_future(), loop.time() + 5.0)
        await lane._round_trip([call], fresh=False)
        with pytest.raises(redis.exceptions.ConnectionError, match="connection lost"):
            await call.future
        assert broken == [True]
        assert not connection.is_connected  # dropped: the next batch connects afresh
        peer.close()

    on_uvloop(scenario)
