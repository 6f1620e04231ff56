"""Overshoot: micro-USD past any ceiling when 1,000 callers reserve at once on 4 replicas.

Four runcap server processes (replicas) share one Redis cluster of 3 primaries. Four
caller processes, one per replica, fire 1,000 concurrent reservers (250 each) at the
same instant; each reserver reserves and, if allowed, commits at once. Two scenarios:

    one run    every reserver on one run whose limit fits 100 of them
    team       50 runs of 20 reservers, each run's limit fitting 10, all charged to one
               team whose limit fits 100 (the team is the binding ceiling)

After everything settles the ledger is read back: each run's whole change log (Watch
from revision 0: the largest committed + reserved - limit at any revision) and the
team's usage (GetScope: committed + reserved - limit). The figure is the micro-USD
past each ceiling, summed. Modes:

    hard_gate    must be 0
    soft_gate    margin 10%: bounded by the margin (the configured allowance)
    calibrated   LLM calls held at their learned size after 5 warm-up calls, then every
                 output grows to max_tokens: bounded per run by its exposure allowance

The baseline is what a home-grown limiter does: GET the spend, compare, INCRBY (no
script, no hold), on the same Redis cluster from the same four processes and 1,000
concurrent callers. Rounds alternate the baseline and runcap; thresholds are off (no
throttling), so only the ceilings decide.

    .venv/bin/python bench/overshoot.py [--rounds 3] [--reservers 1000]

BENCH_QUICK=1: one round of 200 reservers. The same file is also the caller processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import common
import grpc
import grpc.aio
from common import CHANNEL_OPTIONS, median

from runcap.v1 import budget_pb2, budget_service_pb2, budget_service_pb2_grpc

AMOUNT = 10_000  # micro-USD per reservation ($0.01)
ONE_RUN_FITS = 100
TEAM_RUNS, TEAM_FITS, RUN_FITS = 50, 100, 10
SOFT_MARGIN_PERCENT = 10
# Calibrated: openai/gpt-4o (2.5 and 10 micro-USD per input and output token).
PROVIDER, MODEL = "openai", "gpt-4o"
INPUT_TOKENS, MAX_TOKENS, REAL_OUTPUT = 2_000, 2_000, 100
REAL_COST = INPUT_TOKENS * 25 // 10 + REAL_OUTPUT * 10  # 6,000
WORST_CASE = INPUT_TOKENS * 25 // 10 + MAX_TOKENS * 10  # 25,000
WARM_UP = 5
WARM_UP_RUNS_AT_ONCE = 4
# Exposure allowances, in worst cases: one run, and each run of the team.
ONE_RUN_ALLOWANCE, TEAM_RUN_ALLOWANCE = 10 * WORST_CASE, 2 * WORST_CASE
MODES = ("hard_gate", "soft_gate", "calibrated")
# Connections per node of the naive limiter's client (runcap's default pool size).
NAIVE_POOL = 64
ALLOWED = (budget_pb2.DECISION_ALLOW,)


# --- what a scenario is ----------------------------------------------------------------


@dataclass
class Plan:
    """One scenario in one mode: its runs, limits and team, as every process needs them."""

    scenario: str  # "one run" or "team"
    mode: str  # a MODES entry, or "naive"
    runs: list[str]
    run_limit: int
    team: str = ""
    team_limit: int = 0

    @property
    def llm(self) -> bool:
        return self.mode == "calibrated"

    def policy(self) -> budget_pb2.RunPolicy:
        policy = budget_pb2.RunPolicy(
            enforcement_mode={
                "hard_gate": budget_pb2.ENFORCEMENT_MODE_HARD_GATE,
                "soft_gate": budget_pb2.ENFORCEMENT_MODE_SOFT_GATE,
                "calibrated": budget_pb2.ENFORCEMENT_MODE_CALIBRATED,
            }[self.mode]
        )
        policy.thresholds.SetInParent()  # every threshold off: no throttling
        if self.mode == "soft_gate":
            policy.soft_gate_margin_percent = SOFT_MARGIN_PERCENT
        if self.mode == "calibrated":
            policy.exposure_allowance_micros = self.run_allowance
        return policy

    @property
    def run_allowance(self) -> int:
        """What each run may pass its limit by, as configured."""
        if self.mode == "soft_gate":
            return self.run_limit * SOFT_MARGIN_PERCENT // 100
        if self.mode == "calibrated":
            return TEAM_RUN_ALLOWANCE if self.team else ONE_RUN_ALLOWANCE
        return 0

    @property
    def allowance(self) -> int:
        """The configured allowance over every ceiling (teams have none)."""
        return self.run_allowance * len(self.runs)


def plan(scenario: str, mode: str, fits: int, runs: int = 1, run_fits: int = 0) -> Plan:
    """Limits that fit `fits` reservations (per run `run_fits`, with a team of `runs` runs)."""
    tag = secrets.token_hex(4)
    ids = [f"over-{tag}-{k:02d}" for k in range(runs)]
    unit = REAL_COST if mode == "calibrated" else AMOUNT
    warmed = WARM_UP * REAL_COST if mode == "calibrated" else 0
    if runs == 1:
        return Plan(scenario, mode, ids, warmed + fits * unit)
    return Plan(
        scenario,
        mode,
        ids,
        run_limit=warmed + run_fits * unit,
        team=f"team-{tag}",
        team_limit=runs * warmed + fits * unit,
    )


def llm_call() -> budget_service_pb2.LlmCall:
    # The caller can use this model only (a gateway's served models): a blocked call
    # lists no alternatives, whose search would dominate the replicas' CPU here.
    return budget_service_pb2.LlmCall(
        provider=PROVIDER,
        model=MODEL,
        input_tokens=INPUT_TOKENS,
        max_output_tokens=MAX_TOKENS,
        candidate_models=[f"{PROVIDER}/{MODEL}"],
    )


# --- the caller processes --------------------------------------------------------------


async def burst(
    stubs: Sequence[Any], p: Plan, reservers: Sequence[int], go_at: float
) -> dict[str, Any]:
    """Reserver k reserves on run k mod runs through stub k mod stubs and commits if allowed.

    Everything is built first; all start at `go_at` (CLOCK_MONOTONIC). A calibrated
    commit bills the call's whole max_tokens: outputs grew.
    """
    tag = secrets.token_hex(4)
    requests = []
    for k in reservers:
        request = budget_service_pb2.ReserveRequest(
            run_id=p.runs[k % len(p.runs)], reservation_id=f"r-{tag}-{k}"
        )
        if p.llm:
            request.llm_call.CopyFrom(llm_call())
        else:
            request.amount_micros = AMOUNT
        requests.append((stubs[k % len(stubs)], request))
    counts = {"admitted": 0, "refused": 0, "errors": 0}
    first_error: dict[str, str] = {}

    async def one(stub: Any, request: budget_service_pb2.ReserveRequest) -> None:
        try:
            reply = await stub.Reserve(request, timeout=60)
            if reply.decision not in ALLOWED:
                counts["refused"] += 1
                return
            commit = budget_service_pb2.CommitRequest(
                run_id=request.run_id, reservation_id=request.reservation_id
            )
            if p.llm:
                commit.usage.input_tokens = INPUT_TOKENS
                commit.usage.output_tokens = MAX_TOKENS
            else:
                commit.actual_micros = AMOUNT
            await stub.Commit(commit, timeout=60)
            counts["admitted"] += 1
        except grpc.aio.AioRpcError as error:
            counts["errors"] += 1
            first_error.setdefault("first_error", f"{error.code()}: {error.details()}"[:300])

    await asyncio.sleep(max(0.0, go_at - time.monotonic()))
    await asyncio.gather(*(one(stub, request) for stub, request in requests))
    return {**counts, **first_error}


async def naive_burst(
    client: Any, p: Plan, reservers: Sequence[int], go_at: float
) -> dict[str, Any]:
    """The home-grown limiter: GET each ceiling's spend, compare, then INCRBY each."""
    import redis.exceptions

    counts = {"admitted": 0, "refused": 0, "errors": 0}
    first_error: dict[str, str] = {}
    # Like runcap's RedisLedger: a pool of NAIVE_POOL connections, callers wait for one.
    slots = asyncio.Semaphore(NAIVE_POOL)

    async def call(command: str, *args: Any) -> Any:
        async with slots:
            return await getattr(client, command)(*args)

    async def one(k: int) -> None:
        ceilings = [(naive_key(p.runs[k % len(p.runs)]), p.run_limit)]
        if p.team:
            ceilings.append((naive_key(p.team), p.team_limit))
        try:
            spent = [int(await call("get", key) or 0) for key, _ in ceilings]
            if any(s + AMOUNT > limit for s, (_, limit) in zip(spent, ceilings, strict=True)):
                counts["refused"] += 1
                return
            for key, _ in ceilings:
                await call("incrby", key, AMOUNT)
        except (redis.exceptions.RedisError, OSError, RuntimeError) as error:
            counts["errors"] += 1
            first_error.setdefault("first_error", repr(error)[:300])
            return
        counts["admitted"] += 1

    await asyncio.sleep(max(0.0, go_at - time.monotonic()))
    await asyncio.gather(*(one(k) for k in reservers))
    return {**counts, **first_error}


def naive_key(name: str) -> str:
    return f"naive:{{{name}}}:spent"


class Callers:
    """A caller process: channels to one replica, a Redis cluster client for the baseline."""

    def __init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[Any] = []
        self.redis: Any = None

    async def handle(self, command: dict[str, Any]) -> Mapping[str, Any]:
        p = Plan(**command["plan"])
        if p.mode == "naive":
            if self.redis is None:
                from redis.asyncio.cluster import ClusterNode, RedisCluster

                nodes = [n.rpartition(":") for n in command["cluster_nodes"]]
                self.redis = RedisCluster(
                    startup_nodes=[ClusterNode(h, int(port)) for h, _, port in nodes],
                    max_connections=NAIVE_POOL,
                )
                # Before the burst: concurrent first commands would each set it up.
                await self.redis.initialize()
            return await naive_burst(self.redis, p, command["reservers"], command["go_at"])
        if not self.stubs:
            # A few connections, as a replica's clients would have.
            self.channels = [
                grpc.aio.insecure_channel(command["target"], options=CHANNEL_OPTIONS)
                for _ in range(4)
            ]
            for channel in self.channels:
                await asyncio.wait_for(channel.channel_ready(), 10)
            self.stubs = [budget_service_pb2_grpc.BudgetServiceStub(c) for c in self.channels]
        return await burst(self.stubs, p, command["reservers"], command["go_at"])

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)
        if self.redis is not None:
            await self.redis.aclose()


async def serve_callers() -> None:
    callers = Callers()
    try:
        await common.serve_commands(callers.handle)
    finally:
        await callers.close()


# --- setting up and reading back -------------------------------------------------------


async def prepare(stub: Any, p: Plan) -> None:
    """Create the runs (and the team's limit); a calibrated run's warm-up calls."""
    if p.team:
        await stub.SetScopeLimit(
            budget_service_pb2.SetScopeLimitRequest(
                scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id=p.team),
                period=budget_pb2.PERIOD_LIFETIME,
                limit_micros=p.team_limit,
            )
        )
    for run_id in p.runs:
        await stub.CreateRun(
            budget_service_pb2.CreateRunRequest(
                run_id=run_id, limit_micros=p.run_limit, team_id=p.team, policy=p.policy()
            )
        )

    async def warm_up(run_id: str) -> None:
        for _ in range(WARM_UP):
            reply = await stub.Reserve(
                budget_service_pb2.ReserveRequest(run_id=run_id, llm_call=llm_call())
            )
            if reply.decision not in ALLOWED:
                raise RuntimeError(f"warm-up call on {run_id} was refused: {reply.reason}")
            commit = budget_service_pb2.CommitRequest(
                run_id=run_id, reservation_id=reply.reservation_id
            )
            commit.usage.input_tokens = INPUT_TOKENS
            commit.usage.output_tokens = REAL_OUTPUT
            await stub.Commit(commit)

    if p.llm:
        # A few runs at a time: before its samples a call holds its worst case on the
        # team too, and 50 of them at once would not fit the team's limit.
        slots = asyncio.Semaphore(WARM_UP_RUNS_AT_ONCE)

        async def warm_up_one(run_id: str) -> None:
            async with slots:
                await warm_up(run_id)

        await asyncio.gather(*(warm_up_one(run_id) for run_id in p.runs))


async def run_peak(stub: Any, run_id: str) -> tuple[int, int]:
    """(the run's largest committed + reserved - limit at any revision, its final committed)."""
    head = (await stub.GetRun(budget_service_pb2.GetRunRequest(run_id=run_id))).state
    stream = stub.Watch(budget_service_pb2.WatchRequest(run_id=run_id, after_revision=0))
    peak = head.committed_micros + head.reserved_micros - head.limit_micros
    try:
        async for message in stream:
            if message.HasField("event"):
                s = message.event.state
                peak = max(peak, s.committed_micros + s.reserved_micros - s.limit_micros)
            if message.revision >= head.revision:
                break
    finally:
        stream.cancel()
    return peak, head.committed_micros


@dataclass
class Outcome:
    """One scenario in one mode, read back from the ledger (or the naive keys)."""

    admitted: int
    refused: int
    errors: int
    past_runs: int  # micro-USD past the runs' ceilings, summed
    past_team: int  # micro-USD past the team's ceiling
    committed: int  # the runs' final committed spend, summed
    allowance: int

    @property
    def overshoot(self) -> int:
        return self.past_runs + self.past_team


async def read_back(stub: Any, p: Plan, counts: Mapping[str, int]) -> Outcome:
    peaks = await asyncio.gather(*(run_peak(stub, run_id) for run_id in p.runs))
    past_team = 0
    if p.team:
        scope = await stub.GetScope(
            budget_service_pb2.GetScopeRequest(
                scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id=p.team)
            )
        )
        (usage,) = [u for u in scope.scope.usage if u.period == budget_pb2.PERIOD_LIFETIME]
        past_team = max(0, usage.committed_micros + usage.reserved_micros - usage.limit_micros)
    return Outcome(
        admitted=counts["admitted"],
        refused=counts["refused"],
        errors=counts["errors"],
        past_runs=sum(max(0, peak) for peak, _ in peaks),
        past_team=past_team,
        committed=sum(committed for _, committed in peaks),
        allowance=p.allowance,
    )


async def read_naive(client: Any, p: Plan, counts: Mapping[str, int]) -> Outcome:
    spent = {run_id: int(await client.get(naive_key(run_id)) or 0) for run_id in p.runs}
    team = int(await client.get(naive_key(p.team)) or 0) if p.team else 0
    return Outcome(
        admitted=counts["admitted"],
        refused=counts["refused"],
        errors=counts["errors"],
        past_runs=sum(max(0, s - p.run_limit) for s in spent.values()),
        past_team=max(0, team - p.team_limit) if p.team else 0,
        committed=sum(spent.values()),
        allowance=0,
    )


# --- the orchestrator ------------------------------------------------------------------


def plans() -> list[Plan]:
    """Every scenario: the naive baseline first, then each mode."""
    return [
        *(plan("one run", mode, ONE_RUN_FITS) for mode in ("naive", *MODES)),
        *(plan("team", mode, TEAM_FITS, TEAM_RUNS, RUN_FITS) for mode in ("naive", *MODES)),
    ]


async def rounds(
    args: argparse.Namespace,
    targets: Sequence[str],
    nodes: Sequence[str],
    callers: Sequence[common.Worker],
) -> dict[tuple[str, str], list[Outcome]]:
    """Every plan in every round; returns the outcomes by (scenario, limiter)."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    addresses = [n.rpartition(":") for n in nodes]
    redis = RedisCluster(startup_nodes=[ClusterNode(h, int(port)) for h, _, port in addresses])
    results: dict[tuple[str, str], list[Outcome]] = {}
    async with grpc.aio.insecure_channel(targets[0]) as admin:
        stub = budget_service_pb2_grpc.BudgetServiceStub(admin)
        try:
            for round_no in range(1, args.rounds + 1):
                print(f"round {round_no}/{args.rounds} (load {common.loadavg()})", flush=True)
                for p in plans():
                    if p.mode != "naive":
                        await prepare(stub, p)
                    go_at = time.monotonic() + 1.0
                    for index, caller in enumerate(callers):
                        caller.send(
                            {
                                "plan": p.__dict__,
                                "target": targets[index],
                                "cluster_nodes": list(nodes),
                                "reservers": list(range(index, args.reservers, len(callers))),
                                "go_at": go_at,
                            }
                        )
                    counts = {"admitted": 0, "refused": 0, "errors": 0}
                    for caller in callers:
                        reply = await asyncio.to_thread(caller.receive)
                        if "first_error" in reply:
                            print(f"  first error: {reply.pop('first_error')}", flush=True)
                        for key, value in reply.items():
                            counts[key] += value
                    if p.mode == "naive":
                        outcome = await read_naive(redis, p, counts)
                    else:
                        outcome = await read_back(stub, p, counts)
                    results.setdefault((p.scenario, p.mode), []).append(outcome)
                    took = time.monotonic() - go_at
                    print(
                        f"  {p.scenario:<8} {p.mode:<11} {describe(outcome)}  ({took:.1f} s)",
                        flush=True,
                    )
        finally:
            await redis.aclose()
    return results


def orchestrate(args: argparse.Namespace) -> None:
    from tests.redis_servers import RedisCluster as Cluster
    from tests.servers import ServerProcess

    started_at = common.revision()
    with contextlib.ExitStack() as stack:
        print("starting a 3-primary cluster and 4 replicas ...", file=sys.stderr, flush=True)
        cluster = Cluster(primaries=3)
        stack.callback(cluster.stop)
        cluster.start()
        nodes = cluster.startup_nodes
        replicas = [
            ServerProcess(None, env=common.redis_env(cluster_nodes=nodes))
            for _ in range(args.replicas)
        ]
        for replica in replicas:
            stack.callback(replica.stop)
            replica.start()
        callers = [common.Worker(__file__, "callers") for _ in range(args.replicas)]
        for caller in callers:
            stack.callback(caller.close)

        for setup in common.setup_lines("Overshoot under concurrency", started_at):
            print(setup)
        print(
            f"servers:     {args.replicas} runcap replicas (runcap serve, one process each) on "
            "one Redis cluster of 3 primaries (no replicas, no persistence)"
        )
        print(
            f"callers:     {args.replicas} processes, one per replica, {args.reservers:,} "
            "reservers in all starting at one instant; each reserves and, if allowed, "
            "commits at once; thresholds off"
        )
        print(
            f"one run:     limit fits {ONE_RUN_FITS} reservations; team: {TEAM_RUNS} runs "
            f"({args.reservers // TEAM_RUNS} reservers each), each run's limit fits "
            f"{RUN_FITS}, the team's {TEAM_FITS}"
        )
        print(
            f"modes:       hard_gate and soft_gate ({SOFT_MARGIN_PERCENT}% margin) reserve and "
            f"commit {AMOUNT:,} micro-USD; calibrated: {PROVIDER}/{MODEL} calls of "
            f"{INPUT_TOKENS:,} input tokens, max_tokens {MAX_TOKENS:,}, held at their learned "
            f"size after {WARM_UP} warm-up calls writing {REAL_OUTPUT} tokens (real cost "
            f"{REAL_COST:,}, worst case {WORST_CASE:,}), then every call writes max_tokens; "
            f"exposure allowance {ONE_RUN_ALLOWANCE:,} (one run), {TEAM_RUN_ALLOWANCE:,} per "
            "team run"
        )
        print(
            "baseline:    naive = GET each ceiling's spend, compare, INCRBY each (redis-py "
            "cluster client, no script), same callers and cluster"
        )
        print(
            "figure:      micro-USD past each ceiling, summed: runs from their whole change log "
            "(largest committed + reserved - limit at any revision), the team from GetScope "
            "after everything settled; naive from the final counters"
        )
        print(f"timing:      {args.rounds} rounds; in each, every scenario: naive, then each mode")
        print(flush=True)

        results = common.run(rounds(args, [r.target for r in replicas], nodes, callers))
        print()
        print(f"Medians over {args.rounds} rounds (overshoot: median (min-max) micro-USD):")
        print()
        for row in table(results):
            print(row)
        print()
        common.finish(started_at)
        print("stopping servers ...", file=sys.stderr, flush=True)


def describe(o: Outcome) -> str:
    return (
        f"admitted {o.admitted:4}  refused {o.refused:4}  past runs {o.past_runs:>10,}  "
        f"past team {o.past_team:>10,}  allowance {o.allowance:>10,}"
        + (f"  errors {o.errors}" if o.errors else "")
    )


def table(results: Mapping[tuple[str, str], Sequence[Outcome]]) -> list[str]:
    columns = [
        "scenario",
        "limiter",
        "admitted",
        "past the runs' ceilings",
        "past the team's ceiling",
        "overshoot (micro-USD)",
        "configured allowance",
        "within it",
        "errors",
    ]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for (scenario, mode), outcomes in results.items():
        rows.append(
            "| "
            + " | ".join(
                [
                    scenario,
                    "naive GET+INCRBY" if mode == "naive" else f"runcap {mode}",
                    f"{median([o.admitted for o in outcomes]):,.0f}",
                    f"{median([o.past_runs for o in outcomes]):,.0f}",
                    f"{median([o.past_team for o in outcomes]):,.0f}",
                    common.spread([o.overshoot for o in outcomes]),
                    "-" if mode == "naive" else f"{outcomes[0].allowance:,}",
                    "-"
                    if mode == "naive"
                    else yes(all(o.overshoot <= o.allowance for o in outcomes)),
                    str(sum(o.errors for o in outcomes)),
                ]
            )
            + " |"
        )
    return rows


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=1 if common.QUICK else 3, help="(3)")
    parser.add_argument(
        "--reservers",
        type=int,
        default=200 if common.QUICK else 1_000,
        help="concurrent callers (1000)",
    )
    parser.add_argument("--replicas", type=int, default=4, help="runcap replicas (4)")
    roles = parser.add_subparsers(dest="role", help="internal: the processes this file starts")
    roles.add_parser("callers", help="fire bursts of reservers (JSON commands on stdin)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.role == "callers":
        common.run(serve_callers())
    else:
        common.main_guard(lambda: orchestrate(args))


if __name__ == "__main__":
    main()
