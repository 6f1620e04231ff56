"""Scale-out: Reserve→Commit throughput with 1, 2 and 4 server processes on one cluster.

N runcap server processes share one Redis cluster of 3 primaries; one load-generator
process drives all N at once (its channels spread evenly over them) with a closed
loop of C workers. The baseline is N bare grpc.aio servers (bench/common.py) driven
the same way, so the ratio at each N says what runcap costs over gRPC itself, and
"x N=1" how each scales. Rounds alternate baseline and runcap at every N.

On this machine's 2 cores the processes share them: the figures show the shape of
scaling (where the CPU goes, whether replicas contend), not the ceiling. The Redis
figures are what a larger deployment is sized from: redis-server CPU per decision
(utime+stime from /proc over the window, per Reserve or Commit) and Redis's own time
per script call (INFO commandstats usec_per_call of EVALSHA).

    .venv/bin/python bench/scaleout.py [--servers 1,2,4] [--seconds 5] [--rounds 3]

BENCH_QUICK=1: one round of 1 s windows, 1 and 2 processes. The same file is also the
load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import common
import grpc.aio
from common import CHANNEL_OPTIONS, Sample, median

from runcap.v1 import budget_service_pb2_grpc


class LoadGenerator:
    """Channels to every target, kept across windows; each command is one window."""

    def __init__(self) -> None:
        self.channels: dict[str, list[grpc.aio.Channel]] = {}
        self.created: set[tuple[str, str]] = set()

    async def stubs(self, targets: Sequence[str], per_target: int) -> list[Any]:
        for target in targets:
            if target not in self.channels:
                opened = [
                    grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
                    for _ in range(per_target)
                ]
                for channel in opened:
                    await asyncio.wait_for(channel.channel_ready(), 10)
                self.channels[target] = opened
        # Interleaved, so worker w of C lands on target w mod N.
        return [
            budget_service_pb2_grpc.BudgetServiceStub(self.channels[t][k])
            for k in range(per_target)
            for t in targets
        ]

    async def handle(self, command: dict[str, Any]) -> Mapping[str, Any]:
        stubs = await self.stubs(command["targets"], command["channels"])
        runs = command["runs"]
        missing = [r for r in runs if (command["targets"][0], r) not in self.created]
        # The runs live in the cluster: creating them through one server will do.
        await common.create_runs(stubs[0], missing)
        self.created |= {(command["targets"][0], r) for r in missing}
        pair = common.grpc_pair(stubs)

        async def through_every_server(worker: int, run_id: str, reservation_id: str) -> Any:
            # Worker w works on run w mod R; shifting its stub by w // R sends each
            # run's calls through every server, as an agent's reach any replica.
            return await pair(worker + worker // len(runs), run_id, reservation_id)

        sample, _ = await common.closed_loop(
            through_every_server,
            runs=runs,
            concurrency=command["concurrency"],
            warmup_s=command["warmup"],
            seconds=command["seconds"],
            server_pids=command["server_pids"],
            redis_pids=command["redis_pids"],
        )
        return asdict(sample)

    async def close(self) -> None:
        for channels in self.channels.values():
            for channel in channels:
                await channel.close(None)


async def serve_loadgen() -> None:
    generator = LoadGenerator()
    try:
        await common.serve_commands(generator.handle)
    finally:
        await generator.close()


@dataclass
class Config:
    """One kind of server at one process count, and its windows round by round."""

    name: str
    count: int
    targets: list[str]
    pids: list[int]
    runs: list[str] = field(default_factory=lambda: common.run_ids(16))
    samples: list[Sample] = field(default_factory=list)
    script_us: list[float] = field(default_factory=list)


def extrapolate(redis_us_per_decision: float, server_us_per_pair: float) -> dict[str, float]:
    """Decisions per second a 10-primary cluster could take, on paper.

    Each primary is one core at 100% running only runcap's scripts; runs spread
    evenly over the slots; the runcap replicas are scaled out to keep up, at the
    measured server CPU per pair. Returns what the docs quote.
    """
    per_node = 1e6 / redis_us_per_decision
    cluster = 10 * per_node
    replica_cores = cluster / 2 * server_us_per_pair / 1e6
    return {"per_node": per_node, "cluster": cluster, "replica_cores": replica_cores}


def table(configs: Sequence[Config]) -> list[str]:
    columns = [
        "servers",
        "processes",
        "pairs/s median (min-max)",
        "x N=1",
        "x baseline",
        "p50 ms",
        "p99 ms",
        "server CPU µs/pair",
        "redis CPU µs/decision",
        "EVALSHA µs/call",
        "generator CPU µs/pair",
        "errors",
    ]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    first = {c.name: c for c in configs if c.count == min(x.count for x in configs)}
    baseline = {c.count: c for c in configs if c.name == "baseline"}
    for c in configs:
        s = c.samples
        rates = [x.rate for x in s]
        scale = [x.rate / y.rate for x, y in zip(s, first[c.name].samples, strict=True)]
        base = baseline[c.count].samples
        ratio = [x.rate / y.rate for x, y in zip(s, base, strict=True)]
        redis = c.name != "baseline"
        rows.append(
            "| "
            + " | ".join(
                [
                    c.name,
                    str(c.count),
                    common.spread(rates),
                    f"{median(scale):.2f}",
                    f"{median(ratio):.2f}",
                    f"{median([x.p50_ms for x in s]):.1f}",
                    f"{median([x.p99_ms for x in s]):.1f}",
                    f"{median([x.per_pair_us(x.server_cpu_s) for x in s]):,.0f}",
                    f"{median([x.per_pair_us(x.redis_cpu_s) / 2 for x in s]):,.0f}"
                    if redis
                    else "-",
                    f"{median(c.script_us):.0f}" if redis else "-",
                    f"{median([x.per_pair_us(x.client_cpu_s) for x in s]):,.0f}",
                    str(sum(x.errors for x in s)),
                ]
            )
            + " |"
        )
    return rows


def orchestrate(args: argparse.Namespace) -> None:
    from tests.redis_servers import RedisCluster
    from tests.servers import ServerProcess

    started_at = common.revision()
    counts = [int(n) for n in args.servers.split(",")]
    most = max(counts)
    with contextlib.ExitStack() as stack:
        print(f"starting a 3-primary cluster and {most}+{most} servers ...", file=sys.stderr)
        cluster = RedisCluster(primaries=3)
        stack.callback(cluster.stop)
        cluster.start()
        nodes = cluster.startup_nodes
        runcaps = [
            ServerProcess(None, env=common.redis_env(cluster_nodes=nodes)) for _ in range(most)
        ]
        bares = [common.baseline_process() for _ in range(most)]
        stops = [r.stop for r in runcaps] + [b.stop for b in bares]
        for stop in stops:
            stack.callback(stop)
        with concurrent.futures.ThreadPoolExecutor(2 * most) as pool:
            # Many processes importing at once on 2 cores: give them time.
            starting: list[concurrent.futures.Future[Any]] = []
            starting += [pool.submit(r.start, 120) for r in runcaps]
            starting += [pool.submit(b.start) for b in bares]
            for started in starting:
                started.result()
        generator = common.Worker(__file__, "loadgen")
        stack.callback(generator.close)
        redis_pids = [common.pid(node.process) for node in cluster.nodes]
        redis_ports = [node.port for node in cluster.nodes]

        configs = []
        for n in counts:
            configs.append(
                Config(
                    "baseline",
                    n,
                    [b.target for b in bares[:n]],
                    [common.pid(b.process) for b in bares[:n]],
                )
            )
            configs.append(
                Config(
                    "runcap",
                    n,
                    [r.target for r in runcaps[:n]],
                    [common.pid(r.process) for r in runcaps[:n]],
                )
            )
        for line in common.setup_lines("Scale-out on a Redis cluster", started_at):
            print(line)
        print(
            f"servers:     runcap serve x {', '.join(map(str, counts))} processes on one Redis "
            "cluster of 3 primaries (no replicas, no persistence); baseline: as many bare "
            "grpc.aio servers (bench/common.py)"
        )
        print(
            f"generator:   one process, a closed loop of {args.concurrency} workers spread evenly "
            f"over the servers ({args.channels} channels to each), 16 runs (limit 2^53-1), "
            f"Reserve {common.AMOUNT_MICROS} then Commit {common.ACTUAL_MICROS} micro-USD"
        )
        print(
            f"timing:      {args.rounds} rounds x {len(counts)} process counts x (baseline, "
            f"runcap), each {args.warmup:g} s warmup + {args.seconds:g} s measured"
        )
        print(
            "cpu:         utime+stime from /proc over the window: the servers summed, the 3 "
            "redis-servers summed (per decision: per Reserve or Commit), the generator; "
            "EVALSHA µs/call from INFO commandstats (reset before each window)"
        )
        print(
            f"note:        {len(os.sched_getaffinity(0))} cores for everything (servers, "
            "redis-servers, generator): this shows the shape of scaling, not its ceiling"
        )
        print(flush=True)

        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}/{args.rounds} (load {common.loadavg()})", flush=True)
            for n in counts:
                pair = [c for c in configs if c.count == n]
                for config in pair if round_no % 2 else pair[::-1]:
                    common.reset_commandstats(redis_ports)
                    reply = generator.call(
                        {
                            "targets": config.targets,
                            "channels": args.channels,
                            "runs": config.runs,
                            "concurrency": args.concurrency,
                            "warmup": args.warmup,
                            "seconds": args.seconds,
                            "server_pids": config.pids,
                            "redis_pids": redis_pids if config.name == "runcap" else [],
                        }
                    )
                    sample = Sample(**reply)
                    config.samples.append(sample)
                    if config.name == "runcap":
                        config.script_us.append(common.script_us_per_call(redis_ports))
                    print(
                        f"  {config.name:<8} x{n}  {sample.rate:7,.0f} pairs/s  "
                        f"p50 {sample.p50_ms:6.2f}  p99 {sample.p99_ms:6.2f} ms  "
                        f"server {sample.per_pair_us(sample.server_cpu_s):,.0f} µs/pair"
                        + (
                            f"  redis {sample.per_pair_us(sample.redis_cpu_s) / 2:,.0f} "
                            f"µs/decision  EVALSHA {config.script_us[-1]:.0f} µs/call"
                            if config.name == "runcap"
                            else ""
                        )
                        + (f"  errors {sample.errors}" if sample.errors else ""),
                        flush=True,
                    )
        print()
        print(
            f"Medians over {args.rounds} rounds (x N=1 and x baseline: medians of same-round "
            "ratios):"
        )
        print()
        for row in table(configs):
            print(row)
        print()
        runcap = [c for c in configs if c.name == "runcap"]
        redis_us = median([x.per_pair_us(x.redis_cpu_s) / 2 for c in runcap for x in c.samples])
        server_us = median([x.per_pair_us(x.server_cpu_s) for c in runcap for x in c.samples])
        paper = extrapolate(redis_us, server_us)
        print(
            f"On paper (docs/benchmarks.md): at {redis_us:,.0f} µs of redis-server CPU per "
            f"decision, one primary core takes ~{paper['per_node']:,.0f} decisions/s, 10 "
            f"primaries ~{paper['cluster']:,.0f}/s (~{paper['cluster'] / 2:,.0f} Reserve→Commit "
            f"pairs/s), needing ~{paper['replica_cores']:,.0f} cores of runcap replicas at "
            f"{server_us:,.0f} µs per pair"
        )
        print()
        common.finish(started_at)
        print("stopping servers ...", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    quick = common.QUICK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--servers", default="1,2" if quick else "1,2,4", help="process counts (1,2,4)"
    )
    parser.add_argument("--seconds", type=float, default=1.0 if quick else 5.0, help="(5)")
    parser.add_argument("--warmup", type=float, default=0.3 if quick else 1.0, help="(1)")
    parser.add_argument("--rounds", type=int, default=1 if quick else 3, help="(3)")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop workers (64)")
    parser.add_argument("--channels", type=int, default=2, help="channels per server (2)")
    roles = parser.add_subparsers(dest="role", help="internal: the processes this file starts")
    roles.add_parser("loadgen", help="run windows (JSON commands on stdin)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.role == "loadgen":
        common.run(serve_loadgen())
    else:
        common.main_guard(lambda: orchestrate(args))


if __name__ == "__main__":
    main()
