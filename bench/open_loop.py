"""Reserve→Commit latency at a fixed offered load (open loop), against the bare baseline.

A closed loop (bench/reserve_commit.py) measures latency at saturation, where it is
mostly queueing. Here pairs are sent on a fixed schedule instead, at 25%, 50% and 75%
of the saturation each configuration reached earlier in the same run, and each
pair's latency counts from the time it was due to be sent, not from when it went
out: a generator that fell behind cannot hide the wait (no coordinated omission).

    runcap redis    runcap on one redis-server (no persistence)
    runcap sqlite   runcap on SQLite (synchronous=FULL, a temp dir)
    baseline        the bare grpc.aio BudgetService (bench/common.py), driven at the
                    same offered rates as the runcap configuration it is paired with

The load generator is one process of its own (this file's `loadgen`, asyncio, the
server's event loop); each window is warmup + measured seconds. Rounds alternate
runcap and its baseline at every rate; ratios are of same-window pairs.

    .venv/bin/python bench/open_loop.py [--seconds 5] [--rounds 3] [--levels 25,50,75]

BENCH_QUICK=1: one round of 1 s windows at 50% only (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common
import grpc.aio
from common import CHANNEL_OPTIONS, Sample, median

from runcap.v1 import budget_service_pb2_grpc

# --- the load generator process --------------------------------------------------------


class LoadGenerator:
    """Channels to each target, kept across windows; each command is one window."""

    def __init__(self) -> None:
        self.stubs: dict[str, list[Any]] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.created: set[tuple[str, str]] = set()

    async def connect(self, target: str, channels: int) -> list[Any]:
        if target not in self.stubs:
            opened = [
                grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)
            ]
            self.channels += opened
            for channel in opened:
                await asyncio.wait_for(channel.channel_ready(), 10)
            self.stubs[target] = [budget_service_pb2_grpc.BudgetServiceStub(c) for c in opened]
        return self.stubs[target]

    async def handle(self, command: dict[str, Any]) -> Mapping[str, Any]:
        stubs = await self.connect(command["target"], command["channels"])
        runs = command["runs"]
        missing = [r for r in runs if (command["target"], r) not in self.created]
        await common.create_runs(stubs[0], missing)
        self.created |= {(command["target"], r) for r in missing}
        if command["rate"]:
            sample = await common.open_loop(
                common.grpc_pair(stubs),
                runs=runs,
                rate=command["rate"],
                warmup_s=command["warmup"],
                seconds=command["seconds"],
                server_pids=command["server_pids"],
                redis_pids=command["redis_pids"],
            )
        else:
            sample, _ = await common.closed_loop(
                common.grpc_pair(stubs),
                runs=runs,
                concurrency=command["concurrency"],
                warmup_s=command["warmup"],
                seconds=command["seconds"],
                server_pids=command["server_pids"],
                redis_pids=command["redis_pids"],
            )
        return asdict(sample)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)


async def serve_loadgen() -> None:
    generator = LoadGenerator()
    try:
        await common.serve_commands(generator.handle)
    finally:
        await generator.close()


# --- the orchestrator ------------------------------------------------------------------


@dataclass
class Config:
    name: str
    target: str
    server_pid: int
    redis_pids: list[int] = field(default_factory=list)
    runs: list[str] = field(default_factory=lambda: common.run_ids(4))
    saturation: float = 0.0


@dataclass
class Cell:
    """One backend at one load level: its windows and its baseline's, round by round."""

    backend: str
    level: int
    offered: float
    runcap: list[Sample] = field(default_factory=list)
    baseline: list[Sample] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [r.p99_ms / b.p99_ms for r, b in zip(self.runcap, self.baseline, strict=True)]


def window(
    generator: common.Worker, config: Config, args: argparse.Namespace, rate: float
) -> dict[str, Any]:
    return generator.call(
        {
            "target": config.target,
            "channels": args.channels,
            "runs": config.runs,
            "rate": rate,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "seconds": args.seconds,
            "server_pids": [config.server_pid],
            "redis_pids": config.redis_pids,
        }
    )


def line(name: str, s: Sample) -> str:
    return (
        f"  {name:<15} offered {s.offered:7,.0f}/s  achieved {s.rate:7,.0f}/s  "
        f"p50 {s.p50_ms:6.2f}  p99 {s.p99_ms:7.2f}  max {s.max_ms:7.1f} ms  "
        f"server {s.per_pair_us(s.server_cpu_s):,.0f} µs/pair  late p99 {s.late_p99_ms:.2f} ms"
        + (f"  errors {s.errors}" if s.errors else "")
    )


def table(cells: Sequence[Cell]) -> list[str]:
    columns = [
        "backend",
        "load",
        "offered /s",
        "achieved /s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "baseline p50 ms",
        "baseline p99 ms",
        "baseline max ms",
        "p99 x baseline",
        "server CPU µs/pair",
        "generator late p99 ms",
        "errors",
    ]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for c in cells:
        r, b = c.runcap, c.baseline
        rows.append(
            "| "
            + " | ".join(
                [
                    c.backend,
                    f"{c.level}%",
                    f"{c.offered:,.0f}",
                    f"{median([x.rate for x in r]):,.0f}",
                    common.spread([x.p50_ms for x in r], ".2f"),
                    common.spread([x.p99_ms for x in r], ".2f"),
                    f"{median([x.max_ms for x in r]):.1f}",
                    f"{median([x.p50_ms for x in b]):.2f}",
                    f"{median([x.p99_ms for x in b]):.2f}",
                    f"{median([x.max_ms for x in b]):.1f}",
                    f"{median(c.ratios()):.2f}",
                    f"{median([x.per_pair_us(x.server_cpu_s) for x in r]):,.0f}",
                    f"{median([x.late_p99_ms for x in r + b]):.2f}",
                    str(sum(x.errors for x in r + b)),
                ]
            )
            + " |"
        )
    return rows


def orchestrate(args: argparse.Namespace) -> None:
    from tests.redis_servers import RedisServer
    from tests.servers import ServerProcess

    started_at = common.revision()
    levels = [int(level) for level in args.levels.split(",")]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runcap-bench-")))
        print("starting servers ...", file=sys.stderr, flush=True)
        baseline = common.baseline_process()
        stack.callback(baseline.stop)
        baseline.start()
        sqlite = ServerProcess(work / "bench.db", env={"RUNCAP_SHUTDOWN_GRACE": "1s"})
        stack.callback(sqlite.stop)
        sqlite.start()
        redis_server = RedisServer(work / "redis")
        stack.callback(redis_server.stop)
        redis_server.start()
        redis = ServerProcess(None, env=common.redis_env(url=redis_server.url))
        stack.callback(redis.stop)
        redis.start()
        generator = common.Worker(__file__, "loadgen")
        stack.callback(generator.close)

        redis_pids = [common.pid(redis_server.process)]
        base = Config("baseline", baseline.target, common.pid(baseline.process))
        backends = {
            "redis": Config("runcap redis", redis.target, common.pid(redis.process), redis_pids),
            "sqlite": Config("runcap sqlite", sqlite.target, common.pid(sqlite.process)),
        }
        for setup in common.setup_lines("Open-loop Reserve→Commit latency", started_at):
            print(setup)
        print(
            "servers:     runcap redis (one redis-server, --save '' --appendonly no), runcap "
            "sqlite (synchronous=FULL, temp dir), baseline = bare grpc.aio BudgetService "
            "(bench/common.py); one process each"
        )
        print(
            f"generator:   one process (asyncio, {args.channels} channels per server); pairs "
            f"due every 1/rate s over {len(base.runs)} runs (limit 2^53-1), fresh reservation "
            f"id, Reserve {common.AMOUNT_MICROS} then Commit {common.ACTUAL_MICROS} micro-USD; "
            "latency from the due time (no coordinated omission)"
        )
        print(
            f"saturation:  a closed loop of {args.concurrency} workers first, one window per "
            "configuration; offered loads are percentages of it"
        )
        print(
            f"timing:      {args.rounds} rounds x {len(levels)} loads x {len(backends)} backends "
            f"x (runcap, baseline at the same rate), each {args.warmup:g} s warmup + "
            f"{args.seconds:g} s measured"
        )
        print(flush=True)

        print(f"saturation (closed loop, load {common.loadavg()}):", flush=True)
        for config in [base, *backends.values()]:
            sample = Sample(**window(generator, config, args, 0.0))
            config.saturation = sample.rate
            print(
                f"  {config.name:<15} {sample.rate:7,.0f} pairs/s  p50 {sample.p50_ms:6.2f}  "
                f"p99 {sample.p99_ms:6.2f} ms",
                flush=True,
            )
        cells = [
            Cell(key, level, backends[key].saturation * level / 100)
            for key in backends
            for level in levels
        ]
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}/{args.rounds} (load {common.loadavg()})", flush=True)
            for cell in cells:
                print(f" {cell.backend} at {cell.level}% of its saturation", flush=True)
                pair = [(backends[cell.backend], cell.runcap), (base, cell.baseline)]
                # Alternate which goes first, so neither always runs on a warmer machine.
                for config, samples in pair if round_no % 2 else pair[::-1]:
                    sample = Sample(**window(generator, config, args, cell.offered))
                    samples.append(sample)
                    print(line(config.name, sample), flush=True)
        print()
        print(
            f"Medians over {args.rounds} rounds (p99: median (min-max); x baseline: median of "
            "same-round ratios of p99):"
        )
        print()
        for row in table(cells):
            print(row)
        print()
        common.finish(started_at)
        print("stopping servers ...", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    quick = common.QUICK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0 if quick else 5.0, help="(5)")
    parser.add_argument("--warmup", type=float, default=0.3 if quick else 1.0, help="(1)")
    parser.add_argument("--rounds", type=int, default=1 if quick else 3, help="(3)")
    parser.add_argument(
        "--levels", default="50" if quick else "25,50,75", help="percent of saturation (25,50,75)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="saturation workers (32)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels per server (4)")
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
