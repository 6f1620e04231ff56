"""Redis faults under load: a primary killed, pub/sub connections killed, a stalled node.

Each test runs agents and watchers through real server replicas, injects the
fault, lets the load go on, then settles (TTL + sweep) and runs `check`.
(tests/integration/test_redis_backend.py and test_redis_watch.py cover one
run and one watcher under the first two faults.)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from redis.crc import key_slot

from runcap import AsyncRuncapClient
from runcap_server import errors
from runcap_server.backends.redis import SOCKET_TIMEOUT_S
from runcap_server.ledger.types import Decision, Period, RunSpec, ScopeKind, ScopeRef
from tests.chaos.harness import TENANT, namespace, reader, redis_env, scaled
from tests.chaos.invariants import Journal, RunPlan, check, eventually, holds_left
from tests.chaos.workload import CENT, Clients, Mix, Watcher, finish_watchers
from tests.redis_servers import RedisCluster, RedisServer, command
from tests.servers import ServerProcess

pytestmark = [pytest.mark.chaos, pytest.mark.redis]


@contextlib.contextmanager
def replicas(env: dict[str, str], count: int) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(None, env=env) for _ in range(count)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
            # Shown when the test fails: what went wrong inside the replicas.
            print("".join(errors_logged(server.log)))


def errors_logged(log: list[str]) -> Iterator[str]:
    """The ERROR records of a server's log, each with its whole traceback (the
    lines up to the next record, which starts with its date)."""
    inside = False
    for line in log:
        if line[:1].isdigit():
            inside = " ERROR " in line
        if inside:
            yield line


def owner(cluster: RedisCluster, ns: str, run_id: str) -> int:
    """The port of the primary serving the run's slot."""
    return cluster.slot_owner(key_slot(f"{ns}:{{{TENANT}/{run_id}}}:a".encode()))


async def team_of_runs(clients: Clients, roots: list[str], dollars: int = 10) -> None:
    """`roots` charged to team acme, each with two children; a root may spend
    `dollars`, a child a third of that, the team as much as its roots."""
    await clients.set_team_limit("acme", dollars * len(roots) * 100 * CENT)
    for root in roots:
        await clients.create_run(RunPlan(root, dollars * 100 * CENT, team_id="acme"))
        for n in range(2):
            await clients.create_run(RunPlan(f"{root}-{n}", dollars * 100 * CENT // 3, root))


@contextlib.asynccontextmanager
async def load(
    clients: Clients, agents: int, mix: Mix, runs: list[str] | None = None, name: str = "a"
) -> AsyncIterator[asyncio.Event]:
    """Agents named `name`<n> on every run of the journal (or `runs`) until the block ends."""
    stop = asyncio.Event()
    journal = clients.journal

    def pick() -> list[str]:
        return runs or list(journal.runs)

    tasks = [
        asyncio.create_task(clients.agent(f"{name}{i}", pick, stop, mix, seed=i))
        for i in range(agents)
    ]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def settle_and_check(
    redis: RedisCluster | RedisServer,
    ns: str,
    journal: Journal,
    watchers: list[Watcher],
    lossy_between: tuple[float, float] | None = None,
) -> tuple[str, list[str]]:
    """Wait for TTL + sweep, let the watchers reach the head, run `check`.

    Returns the report's text and its problems.
    """
    async with reader(redis, ns) as ledger:
        await eventually(lambda: holds_left(ledger, journal), 30)
        heads = {
            w.log.run_id: (await ledger.get_run(TENANT, w.log.run_id)).state.revision
            for w in watchers
        }
        await finish_watchers(watchers, heads)
        report = await check(ledger, journal, lossy_between=lossy_between)
    print(report.text())  # shown with -rP, or on failure
    return report.text(), report.problems


@pytest.mark.timeout(180)
async def test_a_primary_killed_under_load_fails_over_and_keeps_every_invariant(
    redis_cluster_with_replicas: RedisCluster,
) -> None:
    cluster = redis_cluster_with_replicas
    ns = namespace()
    journal = Journal(TENANT)
    with replicas(redis_env(cluster, ns), 2) as servers:
        clients = Clients(journal, [s.target for s in servers])
        await team_of_runs(clients, ["root-a", "root-b"], dollars=100)
        primary = owner(cluster, ns, "root-a")
        # The runs themselves must survive (replication is asynchronous).
        for port in cluster.primaries():
            assert command(port, "WAIT", 1, 10_000) == 1
        async with (
            AsyncRuncapClient(servers[0].target) as first,
            AsyncRuncapClient(servers[1].target) as second,
        ):
            watchers = [
                Watcher(client, journal, run)
                for client in (first, second)
                for run in ("root-a", "root-a-0", "root-b")
            ]
            async with load(clients, 6, Mix()):
                await asyncio.sleep(scaled(2.0, 1.0))
                killed_at = time.monotonic()
                cluster.kill_primary(primary)
                await asyncio.to_thread(cluster.wait_for_failover, primary)
                failed_over = time.monotonic()
                await asyncio.sleep(scaled(3.0, 1.5))
            await clients.close()
            # Writes acknowledged just before the kill may not have reached the replica.
            text, problems = await settle_and_check(
                cluster, ns, journal, watchers, lossy_between=(killed_at - 1.0, killed_at + 1.0)
            )
    assert not problems, text
    assert journal.errors, f"the failover ({failed_over - killed_at:.1f} s) went unnoticed"
    allowed_after = [
        s for s in journal.reservations.values() if s.decision and s.decided_at > failed_over
    ]
    assert allowed_after, "nothing was decided after the failover"


@pytest.mark.timeout(120)
async def test_killed_pubsub_connections_lose_no_watch_event(redis_cluster: RedisCluster) -> None:
    """CLIENT KILL TYPE pubsub on every node, again and again, under watchers."""
    ns = namespace()
    journal = Journal(TENANT)
    with replicas(redis_env(redis_cluster, ns), 2) as (watched, writer):
        # Writes go through the other replica: only Redis can ring the watched one.
        clients = Clients(journal, [writer.target])
        runs = [f"run-{n}" for n in range(4)]
        for run in runs:
            await clients.create_run(RunPlan(run, 10**12))
        async with AsyncRuncapClient(watched.target) as client:
            watchers = [Watcher(client, journal, run) for run in runs for _ in range(10)]
            killed = 0
            async with load(clients, 4, Mix(pause_s=0.02)):
                for _ in range(int(scaled(10, 4))):
                    await asyncio.sleep(0.5)
                    for port in redis_cluster.primaries():
                        reply = command(port, "CLIENT", "KILL", "TYPE", "pubsub")
                        assert isinstance(reply, int)
                        killed += reply
            await clients.close()
            text, problems = await settle_and_check(redis_cluster, ns, journal, watchers)
        assert killed >= 4, "no pub/sub connection was ever killed"
        assert not problems, text
        assert all(w.restarts == 0 for w in journal.watches), text

        # The doorbell is back: each run's channel has the watched replica subscribed.
        async def resubscribed() -> str:
            missing = []
            for run in runs:
                bell = f"{ns}:{{{TENANT}/{run}}}:bell"
                reply = command(owner(redis_cluster, ns, run), "PUBSUB", "SHARDNUMSUB", bell)
                assert isinstance(reply, list)
                if reply[1] != 1:
                    missing.append(f"{bell}: {reply[1]} subscribers")
            return "; ".join(missing)

        # The streams ended above; one more watcher per run subscribes again.
        async with AsyncRuncapClient(watched.target) as client:
            again = [Watcher(client, Journal(TENANT), run) for run in runs]
            await eventually(resubscribed, 10)
            for watcher in again:
                await watcher.finish(0)


@pytest.fixture(params=["standalone", "cluster"])
def stallable(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[RedisCluster | RedisServer]:
    if request.param == "cluster":
        yield request.getfixturevalue("redis_cluster")
        return
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(150)
async def test_a_stalled_redis_fails_fast_with_unavailable_and_applies_nothing_by_halves(
    stallable: RedisCluster | RedisServer,
) -> None:
    """SIGSTOP a node for longer than the Redis client timeout, under load.

    Calls fail with UNAVAILABLE within the timeout (never hang, never
    INTERNAL); after SIGCONT every retry is answered, and the calls Redis ran
    after their caller had given up leave nothing half done: every parent
    carries exactly its children's spend.
    """
    ns = namespace()
    journal = Journal(TENANT)
    roots, victim = ["root-a", "root-b"], "root-a-0"
    node = stallable if isinstance(stallable, RedisServer) else None
    if isinstance(stallable, RedisCluster):
        # A child run on a node of its own: its parents' steps succeed, its own stalls.
        team = stallable.slot_owner(key_slot(f"{ns}:{{{TENANT}/@team:acme}}:l".encode()))
        for attempt in range(1_000):
            roots = [f"root-{attempt}-a", f"root-{attempt}-b"]
            victim = f"{roots[0]}-0"
            if owner(stallable, ns, victim) not in (team, owner(stallable, ns, roots[0])):
                break
        node = stallable.node(owner(stallable, ns, victim))
    with replicas(redis_env(stallable, ns), 1) as servers:
        clients = Clients(journal, [s.target for s in servers])
        # Room enough that the stalled calls are allowed (the case to get right).
        await team_of_runs(clients, roots, dollars=1_000)
        async with AsyncRuncapClient(servers[0].target) as client:
            watchers = [Watcher(client, journal, run) for run in (roots[0], victim)]
            assert node is not None
            assert node.process is not None
            # Holds outlive the stall, and none is abandoned: a retry must find
            # what its failed attempt did, not what expiry did.
            mix = Mix(commit=0.7, refund=0.3, ttl_ms=20_000)
            async with load(clients, 6, mix), load(clients, 4, mix, [victim], "v"):
                await asyncio.sleep(1.0)
                node.process.send_signal(signal.SIGSTOP)
                try:
                    # Past the timeout, and back before the callers retry (RetryInfo:
                    # 1 s): the calls Redis runs late are found by their retries.
                    await asyncio.sleep(SOCKET_TIMEOUT_S + 0.5)
                finally:
                    node.process.send_signal(signal.SIGCONT)
                await asyncio.sleep(scaled(3.0, 2.0))
            await clients.close()
            text, problems = await settle_and_check(stallable, ns, journal, watchers)
    failed = [(code, seconds) for code, seconds in clients.failures]
    assert failed, "no call failed while Redis was stopped"
    assert {code for code, _ in failed} == {grpc.StatusCode.UNAVAILABLE}, text
    slowest = max(seconds for _, seconds in failed)
    assert slowest < SOCKET_TIMEOUT_S + 2.5, f"a call took {slowest:.1f} s to fail\n{text}"
    assert not problems, text


@pytest.mark.timeout(60)
async def test_a_saga_step_redis_runs_after_its_caller_gave_up_keeps_the_parents_whole(
    redis_cluster: RedisCluster,
) -> None:
    """The run's step of four sagas times out (its node is stopped), then Redis
    runs it anyway: the parents must still hold what the run holds, and the
    retries must find the first attempts, not blocks."""
    ns = namespace()
    team = ScopeRef(ScopeKind.TEAM, "acme")
    async with reader(redis_cluster, ns) as ledger:
        team_node = redis_cluster.slot_owner(key_slot(ledger._scope_keys(TENANT, team)[0].encode()))
        run_id = next(
            f"run-{n}" for n in range(1_000) if owner(redis_cluster, ns, f"run-{n}") != team_node
        )
        await ledger.set_scope_limit(TENANT, team, Period.LIFETIME, 1_000 * CENT)
        await ledger.create_run(TENANT, RunSpec(run_id, 1_000 * CENT, {}, None, team_id="acme"))
        await ledger.reserve(TENANT, run_id, "warm", CENT, 60_000)  # the saga's lineage is known
        node = redis_cluster.node(owner(redis_cluster, ns, run_id))
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)
        try:
            attempts = await asyncio.gather(
                *(ledger.reserve(TENANT, run_id, f"r{i}", CENT, 60_000) for i in range(4)),
                return_exceptions=True,
            )
        finally:
            node.process.send_signal(signal.SIGCONT)
        assert all(isinstance(a, errors.BackendUnavailable) for a in attempts), attempts
        for i in range(4):
            retry = await ledger.reserve(TENANT, run_id, f"r{i}", CENT, 60_000)
            assert retry.decision is Decision.ALLOW, retry
            await ledger.commit(TENANT, run_id, f"r{i}", CENT)
        run = (await ledger.get_run(TENANT, run_id)).state
        usage = (await ledger.get_scope(TENANT, team)).period(Period.LIFETIME)
        assert (
            (usage.committed_micros, usage.reserved_micros)
            == (
                run.committed_micros,
                run.reserved_micros,
            )
            == (4 * CENT, CENT)
        )
