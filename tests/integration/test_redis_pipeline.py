"""Automatic pipelining of the ledger's script calls (backends/redis_pipeline.py).

Hundreds of concurrent calls share round trips on one connection per node and
each caller still gets its own reply; a caller that gives up, a batch past its
deadline and a connection cut under the callers' feet touch only the calls in
flight, and the next calls succeed on a new connection. A Reserve and a Commit
of a run without parents stay one EVALSHA each.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from runcap_server import errors
from runcap_server.backends import redis as redis_backend
from runcap_server.backends.redis import RedisLedger
from runcap_server.clock import ManualClock
from runcap_server.ledger.types import (
    Decision,
    Period,
    ReserveResult,
    RunSpec,
    ScopeKind,
    ScopeRef,
)
from tests.redis_servers import RedisCluster, RedisServer, parse_info, text

pytestmark = pytest.mark.redis
T = "tenant"
TOPOLOGIES = ("standalone", "cluster")
# Holds Redis busy for ARGV[1] microseconds (its own clock), so calls queue behind it.
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1])
return 1
"""


def ports_of(request: pytest.FixtureRequest, topology: str) -> list[int]:
    if topology == "standalone":
        server: RedisServer = request.getfixturevalue("redis_standalone")
        return [server.port]
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    return [node.port for node in cluster.nodes]


def new_ledger(
    ports: Sequence[int], topology: str, url: str = "", namespace: str = ""
) -> RedisLedger:
    namespace = namespace or f"pipe-{uuid.uuid4().hex[:10]}"
    if topology == "standalone":
        return RedisLedger(
            url=url or f"redis://127.0.0.1:{ports[0]}", default_ttl_ms=60_000, namespace=namespace
        )
    nodes = [f"127.0.0.1:{port}" for port in ports]
    return RedisLedger(cluster_nodes=nodes, default_ttl_ms=60_000, namespace=namespace)


@pytest.fixture(params=TOPOLOGIES)
async def ledger_and_ports(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[RedisLedger, list[int]]]:
    ports = ports_of(request, request.param)
    ledger = new_ledger(ports, request.param)
    await ledger.start()
    try:
        yield ledger, ports
    finally:
        await ledger.close()


def connections_received(ports: Sequence[int]) -> int:
    return sum(
        int(parse_info(text(port, "INFO", "stats"))["total_connections_received"]) for port in ports
    )


@contextlib.asynccontextmanager
async def busy(ports: Sequence[int], micros: int) -> AsyncIterator[None]:
    """Every node runs a busy script for `micros` (from a connection of its own)."""
    probes = [aioredis.Redis(host="127.0.0.1", port=port) for port in ports]

    async def hold(probe: aioredis.Redis) -> None:
        await probe.eval(BUSY, 0, str(micros))

    scripts = [asyncio.create_task(hold(probe)) for probe in probes]
    try:
        await asyncio.sleep(0.1)  # the scripts are running: whatever comes next waits
        yield
    finally:
        await asyncio.gather(*scripts)
        for probe in probes:
            await probe.aclose()


async def test_hundreds_of_concurrent_reserves_on_distinct_runs_get_their_own_replies(
    ledger_and_ports: tuple[RedisLedger, list[int]],
) -> None:
    ledger, ports = ledger_and_ports
    runs = [f"run-{i:03d}" for i in range(500)]
    await asyncio.gather(*(ledger.create_run(T, RunSpec(run, 1_000_000, {}, None)) for run in runs))
    await ledger.reserve(T, runs[0], "warm-up", 1, None)
    before = connections_received(ports)
    results = await asyncio.gather(
        *(ledger.reserve(T, run, f"r-{run}", 1_000 + i, None) for i, run in enumerate(runs))
    )
    # The burst went over the connections already open (one per node), not a pool:
    # the only new connections are this probe's own (one per node).
    assert connections_received(ports) - before == len(ports)
    for i, (run, result) in enumerate(zip(runs, results, strict=True)):
        assert (result.state.run_id, result.reservation_id) == (run, f"r-{run}")
        assert (result.decision, result.held_micros) == (Decision.ALLOW, 1_000 + i)
        assert result.state.reserved_micros == 1_000 + i + (1 if run == runs[0] else 0)
    committed = await asyncio.gather(
        *(ledger.commit(T, run, f"r-{run}", i) for i, run in enumerate(runs))
    )
    for i, (run, settled) in enumerate(zip(runs, committed, strict=True)):
        assert (settled.state.run_id, settled.actual_micros, settled.state.committed_micros) == (
            run,
            i,
            i,
        )


async def test_hundreds_of_concurrent_reserves_on_one_run_allow_exactly_what_fits(
    ledger_and_ports: tuple[RedisLedger, list[int]],
) -> None:
    ledger, _ = ledger_and_ports
    await ledger.create_run(T, RunSpec("run", 137_000, {}, None))
    results = await asyncio.gather(
        *(ledger.reserve(T, "run", f"r{i}", 1_000, None) for i in range(500))
    )
    allowed = [r for r in results if r.decision is Decision.ALLOW]
    assert len(allowed) == 137
    assert [r.reservation_id for r in results] == [f"r{i}" for i in range(500)]
    # Every caller saw the state its own call left: 137 distinct revisions among the allowed.
    assert len({r.state.revision for r in allowed}) == 137
    await asyncio.gather(*(ledger.commit(T, "run", r.reservation_id, 700) for r in allowed))
    state = (await ledger.get_run(T, "run")).state
    assert (state.committed_micros, state.reserved_micros) == (137 * 700, 0)
    page = await ledger.read_changes(T, "run", 0, 10_000)
    assert [c.revision for c in page.changes] == list(range(page.floor, state.revision + 1))
    assert sum(c.actual_micros for c in page.changes) == state.committed_micros


async def test_a_caller_that_gives_up_does_not_shift_the_replies_of_others(
    ledger_and_ports: tuple[RedisLedger, list[int]],
) -> None:
    ledger, ports = ledger_and_ports
    runs = [f"run-{i:03d}" for i in range(300)]
    await asyncio.gather(*(ledger.create_run(T, RunSpec(run, 1_000_000, {}, None)) for run in runs))
    async with busy(ports, 400_000):
        tasks = [
            asyncio.create_task(ledger.reserve(T, run, f"r-{run}", 1_000 + i, None))
            for i, run in enumerate(runs)
        ]
        await asyncio.sleep(0.1)  # written, and waiting behind the busy scripts
        for task in tasks[::3]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    for i, (run, outcome) in enumerate(zip(runs, done, strict=True)):
        if i % 3 == 0:
            assert isinstance(outcome, asyncio.CancelledError)
            continue
        assert isinstance(outcome, ReserveResult), outcome
        assert (outcome.state.run_id, outcome.held_micros) == (run, 1_000 + i)
    # The connection stays in step: the next calls answer their own runs too.
    again = await asyncio.gather(*(ledger.get_run(T, run) for run in runs))
    for i, (run, view) in enumerate(zip(runs, again, strict=True)):
        assert view.spec.run_id == run
        # A cancelled caller's reserve may have run (it was written): then it holds.
        assert view.state.reserved_micros in ((0, 1_000 + i) if i % 3 == 0 else (1_000 + i,))


async def test_a_batch_past_its_deadline_fails_unavailable_and_the_next_calls_succeed(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "SOCKET_TIMEOUT_S", 0.3)
    ports = ports_of(request, "standalone")
    ledger = new_ledger(ports, "standalone")
    await ledger.start()
    try:
        await ledger.create_run(T, RunSpec("run", 1_000_000, {}, None))
        async with busy(ports, 1_000_000):
            started = time.monotonic()
            late = await asyncio.gather(
                *(ledger.reserve(T, "run", f"late{i}", 10, None) for i in range(50)),
                return_exceptions=True,
            )
            waited = time.monotonic() - started
        assert all(isinstance(outcome, errors.BackendUnavailable) for outcome in late), late
        assert waited < 0.8, "the callers waited past their own deadline"
        fresh = await asyncio.gather(
            *(ledger.reserve(T, "run", f"next{i}", 10, None) for i in range(50))
        )
        assert all(r.decision is Decision.ALLOW and not r.replayed for r in fresh)
    finally:
        await ledger.close()


class CuttableProxy:
    """A TCP forwarder to Redis whose connections the test can cut at once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65_536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()

    def cut(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


async def test_a_cut_connection_fails_the_calls_in_flight_and_the_next_succeed(
    request: pytest.FixtureRequest,
) -> None:
    ports = ports_of(request, "standalone")
    proxy = CuttableProxy(ports[0])
    ledger = new_ledger(ports, "standalone", url=await proxy.start())
    await ledger.start()
    try:
        await ledger.create_run(T, RunSpec("run", 1_000_000, {}, None))
        ids = [f"r{i}" for i in range(100)]
        async with busy(ports, 500_000):
            calls = [asyncio.create_task(ledger.reserve(T, "run", r, 10, None)) for r in ids]
            await asyncio.sleep(0.1)  # all written in one batch, waiting behind the script
            proxy.cut()
            cut = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, errors.BackendUnavailable) for outcome in cut), cut
        # Fail closed, retry with the same ids: each reservation is held exactly once.
        retried = await asyncio.gather(*(ledger.reserve(T, "run", r, 10, None) for r in ids))
        assert all(r.decision is Decision.ALLOW for r in retried)
        state = (await ledger.get_run(T, "run")).state
        assert (state.reserved_micros, state.active_reservations) == (1_000, 100)
        await asyncio.gather(*(ledger.commit(T, "run", r, 7) for r in ids))
        state = (await ledger.get_run(T, "run")).state
        assert (state.committed_micros, state.reserved_micros) == (700, 0)
    finally:
        await ledger.close()
        await proxy.close()


async def test_a_connection_killed_while_idle_is_replaced_before_the_next_call(
    ledger_and_ports: tuple[RedisLedger, list[int]],
) -> None:
    ledger, ports = ledger_and_ports
    await ledger.create_run(T, RunSpec("run", 1_000_000, {}, None))
    assert (await ledger.reserve(T, "run", "before", 10, None)).decision is Decision.ALLOW
    killed = 0
    for port in ports:
        async with aioredis.Redis(host="127.0.0.1", port=port) as probe:
            killed += await probe.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    await asyncio.sleep(0.1)
    results = await asyncio.gather(
        *(ledger.reserve(T, "run", f"r{i}", 10, None) for i in range(20))
    )
    assert all(r.decision is Decision.ALLOW for r in results)
    assert (await ledger.get_run(T, "run")).state.active_reservations == 21


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_bursts_from_replicas_on_runs_of_one_team_allow_exactly_its_ceiling(
    request: pytest.FixtureRequest, topology: str
) -> None:
    """Each of 4 replicas bursts 250 Reserves over its 5 runs (of 20, room for 5 each)
    of one team with room for 60. Pipelined, one replica's holds would reach the team
    back to back, 12 per run, and holds their runs refuse would crowd out the rest
    (25 allowed): parent steps stay pooled, so exactly the team's 60 are allowed."""
    ports = ports_of(request, topology)
    namespace = f"pipe-{uuid.uuid4().hex[:10]}"
    ledgers = [new_ledger(ports, topology, namespace=namespace) for _ in range(4)]
    for ledger in ledgers:
        await ledger.start()
    try:
        team = ScopeRef(ScopeKind.TEAM, "acme")
        await ledgers[0].set_scope_limit(T, team, Period.LIFETIME, 60_000)
        runs = [f"run-{n}" for n in range(20)]
        for n, run in enumerate(runs):
            await ledgers[n % 4].create_run(T, RunSpec(run, 5_000, {}, None, team_id="acme"))
        results = await asyncio.gather(
            *(ledgers[i % 4].reserve(T, runs[i % 20], f"r{i}", 1_000, None) for i in range(1_000))
        )
        assert sum(r.decision is Decision.ALLOW for r in results) == 60
        usage = (await ledgers[1].get_scope(T, team)).period(Period.LIFETIME)
        assert (usage.reserved_micros, usage.active_reservations) == (60_000, 60)
    finally:
        for ledger in ledgers:
            await ledger.close()


def monitor(port: int, ready: threading.Event, seen: list[dict[str, Any]]) -> None:
    """Record every command one node receives until a probe echoes "done"."""
    with redis.Redis(host="127.0.0.1", port=port) as client, client.monitor() as stream:
        ready.set()
        for entry in stream.listen():
            if entry["command"] == "ECHO done":
                return
            seen.append(entry)


async def client_commands(ports: Sequence[int], step: Any) -> list[str]:
    """The commands clients sent (not scripts) on every node during `step`."""
    seen: list[dict[str, Any]] = []
    watchers = []
    probes = [aioredis.Redis(host="127.0.0.1", port=port) for port in ports]
    for port, probe in zip(ports, probes, strict=True):
        await probe.ping()  # connected before the monitor starts
        ready = threading.Event()
        watcher = threading.Thread(target=monitor, args=(port, ready, seen))
        watcher.start()
        watchers.append(watcher)
        assert await asyncio.to_thread(ready.wait, 5)
    await asyncio.sleep(0.1)
    await step()
    for probe in probes:
        await probe.echo("done")
        await probe.aclose()
    for watcher in watchers:
        await asyncio.to_thread(watcher.join, 5)
    return [e["command"].split()[0] for e in seen if e.get("client_type") != "lua"]


async def test_a_reserve_and_a_commit_are_one_round_trip_each(
    ledger_and_ports: tuple[RedisLedger, list[int]],
) -> None:
    ledger, ports = ledger_and_ports
    await ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    await ledger.reserve(T, "run", "warm-up", 1, None)  # routes and loads the script

    reserve = await client_commands(ports, lambda: ledger.reserve(T, "run", "r", 10, None))
    assert reserve == ["EVALSHA"]
    assert await client_commands(ports, lambda: ledger.commit(T, "run", "r", 7)) == ["EVALSHA"]
    assert (await ledger.get_run(T, "run")).state.committed_micros == 7


async def test_the_lineage_cache_is_bounded_and_a_forgotten_one_still_holds_on_parents(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only runs with parents are remembered, at most LINEAGE_CACHE_SIZE of them; a
    run forgotten since reserves through the run first (SAGA) and still holds on its team."""
    monkeypatch.setattr(redis_backend, "LINEAGE_CACHE_SIZE", 3)
    ledger = new_ledger(ports_of(request, "standalone"), "standalone")
    await ledger.start()
    try:
        team = ScopeRef(ScopeKind.TEAM, "acme")
        await ledger.set_scope_limit(T, team, Period.LIFETIME, 1_000_000)
        await ledger.create_run(T, RunSpec("alone", 5_000, {}, None))
        for n in range(8):
            await ledger.create_run(T, RunSpec(f"run-{n}", 5_000, {}, None, team_id="acme"))
        assert list(ledger._lineages) == [(T, "run-5"), (T, "run-6"), (T, "run-7")]
        reserved = await ledger.reserve(T, "run-0", "r", 1_000, None)
        assert reserved.decision is Decision.ALLOW
        usage = (await ledger.get_scope(T, team)).period(Period.LIFETIME)
        assert (usage.reserved_micros, usage.active_reservations) == (1_000, 1)
        assert len(ledger._lineages) == 3
        assert (T, "run-0") in ledger._lineages  # remembered again, the newest
    finally:
        await ledger.close()


async def test_a_sweep_with_nothing_due_is_one_script_per_bucket(
    ledger_and_ports: tuple[RedisLedger, list[int]],
) -> None:
    """50 runs hold for another minute: a sweep looks at the 16 due buckets (one
    script each, sent together) and touches no run and no lease."""
    ledger, ports = ledger_and_ports
    for n in range(50):
        await ledger.create_run(T, RunSpec(f"run-{n}", 1_000, {}, None))
        await ledger.reserve(T, f"run-{n}", "r", 10, 60_000)
    await ledger.sweep(100)  # writes the due index
    commands = await client_commands(ports, lambda: ledger.sweep(100))
    assert commands == ["EVALSHA"] * redis_backend.DUE_BUCKETS
    # When they are due, the sweep releases them all.
    ledger.clock = ManualClock(int(time.time() * 1000) + 61_000)
    assert await ledger.sweep(100) == 50


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_a_commit_whose_answer_was_lost_still_gets_its_parents_settled(
    request: pytest.FixtureRequest, topology: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis applied the run's step of a Commit, but its answer never came (a timeout):
    the replica, which knew the run has parents, had put it in the due index with the
    step, so the next sweep after SETTLE_WAIT_MS settles the team (not the reconciler,
    a minute later)."""
    ports = ports_of(request, topology)
    clock = ManualClock()
    nodes = [f"127.0.0.1:{port}" for port in ports]
    target = (
        {"url": f"redis://127.0.0.1:{ports[0]}"}
        if topology == "standalone"
        else {"cluster_nodes": nodes}
    )
    ledger = RedisLedger(
        **target, default_ttl_ms=60_000, clock=clock, namespace=f"lost-{uuid.uuid4().hex[:8]}"
    )
    await ledger.start()
    try:
        team = ScopeRef(ScopeKind.TEAM, "acme")
        await ledger.create_run(T, RunSpec("run", 5_000, {}, None, team_id="acme"))
        await ledger.reserve(T, "run", "r", 1_000, None)
        await ledger.sweep(100)  # writes the due index (the hold, a minute away)
        script = ledger._script

        async def answer_lost(*args: Any, **kwargs: Any) -> list[Any]:
            reply = await script(*args, **kwargs)
            if args[2] == "commit":
                raise errors.BackendUnavailable("Redis: Timeout reading from socket")
            return reply

        monkeypatch.setattr(ledger, "_script", answer_lost)
        with pytest.raises(errors.BackendUnavailable):
            await ledger.commit(T, "run", "r", 700)
        monkeypatch.undo()
        usage = (await ledger.get_scope(T, team)).period(Period.LIFETIME)
        assert (usage.committed_micros, usage.reserved_micros) == (0, 1_000)
        clock.advance(redis_backend.SETTLE_WAIT_MS)
        await ledger.sweep(100)
        usage = (await ledger.get_scope(T, team)).period(Period.LIFETIME)
        assert (usage.committed_micros, usage.reserved_micros) == (700, 0)
    finally:
        await ledger.close()
