"""A replica SIGKILLed at every step of the parent-scope saga, under load.

Two replicas on a Redis cluster serve agents that reserve, commit, refund and
abandon holds on runs charged to a team (roots with children, and children
created during the load), while watchers follow the runs through the replica
that dies. That replica kills itself (RUNCAP_TEST_CRASH_AT=<step>@<n>) the
n-th time it reaches the step, with other sagas in flight; it is restarted
on the same port, the clients retry every unanswered call with the same ids,
and the next requests and the sweepers finish or release what was left.
`check` then holds the ledger to everything the clients were told.
(tests/integration/test_redis_scopes.py kills one saga of one reservation.)
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Sequence

import pytest

from runcap import AsyncRuncapClient
from tests.chaos.harness import SHORT, TENANT, namespace, reader, redis_env, scaled
from tests.chaos.invariants import Journal, RunPlan, check, eventually, holds_left
from tests.chaos.workload import CENT, Clients, Mix, Watcher, finish_watchers
from tests.redis_servers import RedisCluster, free_port
from tests.servers import ServerProcess

pytestmark = [pytest.mark.chaos, pytest.mark.redis]

# Every step after which a crash leaves work behind, and the occurrence to die at.
STEPS = {
    "create:parent-adopted": 2,
    "reserve:parents-held": 25,
    "reserve:run-decided": 25,
    "reserve:parents-released": 25,
    "commit:run-settled": 15,
    "refund:run-settled": 6,
    "settle:parents-settled": 15,
}
CRASH_AT = "RUNCAP_TEST_CRASH_AT"


async def crash_in_turn(cluster: RedisCluster, steps: Sequence[str], load_after_s: float) -> None:
    """Kill the doomed replica at each step in turn; then settle and check."""
    ns = namespace()
    env = redis_env(cluster, ns)
    # A fixed port: the restarted replica is where its clients left it.
    doomed = ServerProcess(None, env=env, listen=f"127.0.0.1:{free_port()}")
    survivor = ServerProcess(None, env=env)
    journal = Journal(TENANT)
    try:
        doomed.extra_env[CRASH_AT] = f"{steps[0]}@{STEPS[steps[0]]}"
        doomed.start()
        survivor.start()
        clients = Clients(journal, [doomed.target, survivor.target])
        await clients.set_team_limit("acme", 3_000 * CENT)
        for root in ("root-a", "root-b"):
            await clients.create_run(RunPlan(root, 1_500 * CENT, team_id="acme"), prefer=1)
            for n in range(2):
                await clients.create_run(RunPlan(f"{root}-{n}", 400 * CENT, root), prefer=1)
        async with AsyncRuncapClient(doomed.target) as watching:
            watchers = [Watcher(watching, journal, run) for run in ("root-a", "root-a-0")]
            stop = asyncio.Event()
            mix = Mix(new_child=0.03)

            def runs() -> list[str]:
                return list(journal.runs)

            def mostly_doomed(rng: random.Random) -> int:
                return 0 if rng.random() < 0.75 else 1

            agents = [
                asyncio.create_task(
                    clients.agent(f"a{i}", runs, stop, mix, seed=i, prefer=mostly_doomed)
                )
                for i in range(6)
            ]
            for n, step in enumerate(steps):
                code = await asyncio.to_thread(doomed.wait, 60)
                assert code == -signal.SIGKILL, f"{step} was never reached"
                doomed.kill()
                following = steps[n + 1] if n + 1 < len(steps) else ""
                doomed.extra_env[CRASH_AT] = f"{following}@{STEPS[following]}" if following else ""
                doomed.start()
            await asyncio.sleep(load_after_s)
            stop.set()
            made = sum(await asyncio.gather(*agents))
            await clients.close()

            async with reader(cluster, ns) as ledger:
                await eventually(lambda: holds_left(ledger, journal), 30)
                heads = {
                    w.log.run_id: (await ledger.get_run(TENANT, w.log.run_id)).state.revision
                    for w in watchers
                }
                await finish_watchers(watchers, heads)
                report = await check(ledger, journal)
        assert not report.problems, report.text()
        # The crashes were felt: calls in flight failed and were retried elsewhere.
        assert sum(journal.errors.values()) >= len(steps), report.text()
        assert made > 50, report.text()
        assert report.counts["seen ALLOW"] > 20, report.text()
        # Watchers resumed on the restarted replica without a fresh snapshot.
        assert all(w.restarts == 0 for w in journal.watches), report.text()
    finally:
        doomed.kill()
        survivor.stop()


@pytest.mark.timeout(120)
@pytest.mark.skipif(SHORT, reason="the short form kills at every step in one test")
@pytest.mark.parametrize("step", list(STEPS))
async def test_a_replica_killed_at_a_saga_step_under_load_heals(
    redis_cluster: RedisCluster, step: str
) -> None:
    await crash_in_turn(redis_cluster, [step], load_after_s=3.0)


@pytest.mark.timeout(180)
async def test_a_replica_killed_at_every_saga_step_in_turn_heals(
    redis_cluster: RedisCluster,
) -> None:
    await crash_in_turn(redis_cluster, list(STEPS), load_after_s=scaled(3.0, 1.0))
