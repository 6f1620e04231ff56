"""Reserve→Commit pairs per second through one server process, against baselines.

Configurations, each server in its own process, measured in alternating rounds:

    baseline       a bare grpc.aio BudgetService (Reserve and Commit only) that answers
                   every call with a fixed, prebuilt response of runcap's size; no storage
    sqlite         runcap on SQLite (the default synchronous=FULL, on a temp dir)
    redis          runcap on one redis-server
    redis raw      no gRPC: an asyncio loop calling RedisLedger.reserve + commit (the
                   ledger script) directly on the same redis-server
    cluster        runcap on a 3-primary Redis cluster (no replicas)
    cluster team   the same, with every run charged to one team: each Reserve and
                   Commit is the parent-scope saga (team, then run; then settled)
    cluster raw    the raw loop on the cluster

A closed loop of C workers, each pair with a fresh reservation id on one of a few runs
with a huge limit, runs in a separate process (the load generator, or the raw loop), so
it does not share the server's process. Each configuration reports pairs/s, p50/p99/max
latency of the pair, its ratio to the baseline of the same round, and CPU microseconds
per pair of the server, of redis-server and of the client, from /proc/<pid>/stat.

    .venv/bin/python bench/reserve_commit.py [--seconds N] [--concurrency C] [--rounds R]

Levers of the Redis hot path, to measure each against the others in one run:

    --event-loop asyncio|uvloop   the runcap servers' RUNCAP_EVENT_LOOP (default: auto)
    --pipelining off              RUNCAP_REDIS_PIPELINING=false (servers and raw loop)
    --levers                      adds "runcap redis" servers with each lever off
    --compare-code DIR            adds "runcap redis" running the runcap_server package
                                  in DIR (repeatable; e.g. `git archive` of an older
                                  commit's server/)
    --only redis,cluster          only the configs whose names contain one of these
    --open-loop 25,50,75          then latency at fixed offered loads: these percentages
                                  of each runcap and baseline config's median saturation

The same file is also the baseline server and the load generator (internal subcommands).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

# The helpers every benchmark shares (bench/ is on sys.path when this file runs).
from common import (
    ACTUAL_MICROS,
    AMOUNT_MICROS,
    CHANNEL_OPTIONS,
    CODE_UNDER_TEST,
    QUICK,
    ROOT,
    TENANT,
    BareServicer,
    Sample,
    ServedProcess,
    closed_loop,
    interrupts_as_keyboard_interrupt,
    loadavg,
    median,
    open_loop,
    reset_commandstats,
    revision,
    run_ids,
    script_us_per_call,
    serve,
    versions,
)

from runcap.v1 import budget_pb2, budget_service_pb2, budget_service_pb2_grpc
from runcap_server.ledger.types import MAX_MICROS, RunSpec
from runcap_server.settings import EVENT_LOOPS, Settings

LOADGEN = "Python asyncio grpc.aio client in a separate process ({channels} channels)"


# --- the load generator and the raw Redis loop (each in its own process) ---------------


async def load_grpc(args: argparse.Namespace) -> Sample:
    channels = [
        grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS)
        for _ in range(args.channels)
    ]
    try:
        stubs = [budget_service_pb2_grpc.BudgetServiceStub(channel) for channel in channels]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        runs = args.run_ids.split(",")
        if args.create:
            for run_id in runs:
                await stubs[0].CreateRun(
                    budget_service_pb2.CreateRunRequest(
                        run_id=run_id, limit_micros=MAX_MICROS, team_id=args.team
                    )
                )

        async def pair(
            worker: int, run_id: str, reservation_id: str
        ) -> tuple[budget_service_pb2.ReserveResponse, budget_service_pb2.CommitResponse]:
            stub = stubs[worker % len(stubs)]
            reserved = await stub.Reserve(
                budget_service_pb2.ReserveRequest(
                    run_id=run_id, reservation_id=reservation_id, amount_micros=AMOUNT_MICROS
                )
            )
            if reserved.decision != budget_pb2.DECISION_ALLOW:
                raise RuntimeError(f"Reserve was not allowed: {reserved}")
            committed = await stub.Commit(
                budget_service_pb2.CommitRequest(
                    run_id=run_id, reservation_id=reservation_id, actual_micros=ACTUAL_MICROS
                )
            )
            return reserved, committed

        redis_pids = [int(p) for p in args.redis_pids.split(",") if p]
        if args.rate:
            return await open_loop(
                pair,
                runs=runs,
                rate=args.rate,
                warmup_s=args.warmup,
                seconds=args.seconds,
                server_pids=[args.server_pid] if args.server_pid else [],
                redis_pids=redis_pids,
            )
        sample, reply = await closed_loop(
            pair,
            runs=runs,
            concurrency=args.concurrency,
            warmup_s=args.warmup,
            seconds=args.seconds,
            server_pids=[args.server_pid] if args.server_pid else [],
            redis_pids=redis_pids,
        )
        if reply is not None:
            sample.reserve_bytes = reply[0].ByteSize()
            sample.commit_bytes = reply[1].ByteSize()
        return sample
    finally:
        for channel in channels:
            await channel.close(None)


async def load_redis(args: argparse.Namespace) -> Sample:
    from runcap_server.backends.redis import RedisLedger

    settings = Settings()
    ledger = RedisLedger(
        url=args.redis_url or None,
        cluster_nodes=[n for n in args.cluster_nodes.split(",") if n],
        default_ttl_ms=settings.default_ttl_ms,
        max_connections=settings.redis_max_connections,
        pipelining=args.pipelining == "on",
    )
    await ledger.start()
    try:
        runs = args.run_ids.split(",")
        for run_id in runs:
            await ledger.create_run(TENANT, RunSpec(run_id, MAX_MICROS, {}, None))

        async def pair(worker: int, run_id: str, reservation_id: str) -> None:
            await ledger.reserve(TENANT, run_id, reservation_id, AMOUNT_MICROS, None)
            await ledger.commit(TENANT, run_id, reservation_id, ACTUAL_MICROS)

        sample, _ = await closed_loop(
            pair,
            runs=runs,
            concurrency=args.concurrency,
            warmup_s=args.warmup,
            seconds=args.seconds,
            server_pids=[],
            redis_pids=[int(p) for p in args.redis_pids.split(",") if p],
        )
        return sample
    finally:
        await ledger.close()


# --- the orchestrator -----------------------------------------------------------------


@dataclass
class Config:
    name: str
    # "grpc": the load generator against `target`; "redis": the raw loop.
    kind: str
    target: str = ""
    create_runs: bool = True
    # Runs charged to this team (a parent scope), or none.
    team: str = ""
    server_pid: int = 0
    redis_pids: list[int] = field(default_factory=list)
    # For Redis's own time per script call (INFO commandstats).
    redis_ports: list[int] = field(default_factory=list)
    redis_url: str = ""
    cluster_nodes: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    script_us: list[float] = field(default_factory=list)


def measure(config: Config, args: argparse.Namespace, rate: float = 0) -> Sample:
    """One window of one configuration, by a fresh load-generator process
    (an open loop at `rate` pairs/s, else the closed loop)."""
    common = [
        "--run-ids", ",".join(run_ids(args.runs)),
        "--concurrency", str(args.concurrency),
        "--warmup", str(args.warmup),
        "--seconds", str(args.seconds),
        "--redis-pids", ",".join(str(p) for p in config.redis_pids),
    ]  # fmt: skip
    if config.kind == "grpc":
        argv = ["loadgen", "--target", config.target, "--channels", str(args.channels)]
        argv += ["--server-pid", str(config.server_pid)]
        argv += ["--create"] if config.create_runs else []
        argv += ["--team", config.team] if config.team else []
        argv += ["--rate", str(rate)] if rate else []
    else:
        argv = ["redis-loop", "--redis-url", config.redis_url, "--pipelining", args.pipelining]
        argv += ["--cluster-nodes", ",".join(config.cluster_nodes)]
    done = subprocess.run(
        [sys.executable, __file__, *argv, *common],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=args.warmup + args.seconds + 120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{config.name}: the load generator failed:\n{done.stderr}")
    return Sample(**json.loads(done.stdout.strip().splitlines()[-1]))


def print_setup(args: argparse.Namespace, configs: Sequence[Config], code: str) -> None:
    v = versions()
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    print("# Reserve→Commit benchmark")
    print(f"date:        {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine:     {platform.platform()}, {cores} cores ({usable} usable), load {loadavg()}")
    print(
        f"versions:    python {v['python']}, grpcio {v['grpcio']}, protobuf {v['protobuf']}, "
        f"redis-py {v['redis']} (hiredis {v['hiredis']}), redis-server {v['redis-server']}"
    )
    print(f"runcap:      {code} (last change to {', '.join(CODE_UNDER_TEST)})")
    print(f"configs:     {', '.join(c.name for c in configs)} (each server in its own process)")
    print(
        "backends:    sqlite synchronous=FULL on a temp dir; redis-server without persistence "
        "(--save '' --appendonly no); cluster = 3 primaries, no replicas; "
        f"RedisLedger pool {Settings().redis_max_connections} connections"
    )
    print(
        f"load:        closed loop, {args.concurrency} concurrent workers, {args.runs} runs "
        f"(limit 2^53-1), fresh reservation id per pair, Reserve {AMOUNT_MICROS} then "
        f"Commit {ACTUAL_MICROS} micro-USD"
    )
    print(f"generator:   {LOADGEN.format(channels=args.channels)}; asyncio default loop")
    print(
        f"servers:     RUNCAP_EVENT_LOOP={args.event_loop}, RUNCAP_REDIS_PIPELINING="
        f"{'true' if args.pipelining == 'on' else 'false'} (unless a config's name says otherwise)"
    )
    print(
        "raw loop:    RedisLedger.reserve + commit (EVALSHA of ledger.lua) in a separate "
        f"process, same workers and runs, no gRPC, pipelining {args.pipelining}"
    )
    print(
        f"timing:      {args.rounds} rounds x {len(configs)} configs, each {args.warmup:g} s "
        f"warmup + {args.seconds:g} s measured by a fresh generator process"
    )
    print(
        "cpu:         utime+stime from /proc/<pid>/stat over the measured window (busy: "
        "CPU s per s, 100% = one core); script µs/call: Redis's own time per EVALSHA "
        "(INFO commandstats, reset before each window)"
    )
    print(flush=True)


def table(configs: Sequence[Config]) -> list[str]:
    columns = [
        "config",
        "pairs/s median (min-max)",
        "x baseline",
        "p50 ms",
        "p99 ms",
        "max ms",
        "server CPU µs/pair",
        "server busy",
        "client CPU µs/pair",
        "client busy",
        "redis CPU µs/pair",
        "script µs/call",
        "resp bytes R/C",
        "errors",
    ]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def us(values: Sequence[float]) -> str:
        return f"{median(values):,.0f}" if values else "-"

    def busy(values: Sequence[float]) -> str:
        return f"{median(values):.0%}" if values else "-"

    for c in configs:
        s = c.samples
        if not s:
            continue
        rates = [x.rate for x in s]
        grpc_only = c.kind == "grpc"
        cells = [
            c.name,
            f"{median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})",
            f"{median(c.ratios):.2f}",
            f"{median([x.p50_ms for x in s]):.1f}",
            f"{median([x.p99_ms for x in s]):.1f}",
            f"{median([x.max_ms for x in s]):.1f}",
            us([x.per_pair_us(x.server_cpu_s) for x in s] if grpc_only else []),
            busy([x.server_cpu_s / x.window_s for x in s] if grpc_only else []),
            us([x.per_pair_us(x.client_cpu_s) for x in s]),
            busy([x.client_cpu_s / x.window_s for x in s]),
            us([x.per_pair_us(x.redis_cpu_s) for x in s] if c.redis_pids else []),
            f"{median(c.script_us):.1f}" if c.script_us else "-",
            f"{s[-1].reserve_bytes}/{s[-1].commit_bytes}" if grpc_only else "-",
            str(sum(x.errors for x in s)),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def selected(name: str, only: str) -> bool:
    parts = [part.strip() for part in only.split(",") if part.strip()]
    return not parts or name.startswith("baseline") or any(part in name for part in parts)


def report_window(config: Config, sample: Sample, ratio: float | None, label: str = "") -> None:
    """One window's line; `ratio` to the round's baseline (None: an open-loop window)."""
    server = (
        f"server {sample.per_pair_us(sample.server_cpu_s):,.0f} µs/pair, "
        if config.kind == "grpc"
        else ""
    )
    versus = f"x{ratio:4.2f}" if ratio is not None else "     "
    print(
        f"  {label + config.name:<34} {sample.rate:8,.0f} pairs/s  {versus}  "
        f"p50 {sample.p50_ms:6.2f}  p99 {sample.p99_ms:6.2f}  "
        f"max {sample.max_ms:6.1f} ms  {server}"
        f"client {sample.per_pair_us(sample.client_cpu_s):,.0f} µs/pair"
        + (f", script {config.script_us[-1]:.0f} µs/call" if config.script_us and ratio else "")
        + (f"  errors {sample.errors}" if sample.errors else ""),
        flush=True,
    )


def orchestrate(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.redis_servers import RedisCluster, RedisServer
    from tests.servers import ServerProcess

    runcap_env = {
        "RUNCAP_SHUTDOWN_GRACE": "1s",
        "RUNCAP_EVENT_LOOP": args.event_loop,
        "RUNCAP_REDIS_PIPELINING": "true" if args.pipelining == "on" else "false",
    }
    started_at = revision()  # before any server imports the code
    with interrupts_as_keyboard_interrupt(), contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runcap-bench-")))
        print("starting servers ...", file=sys.stderr, flush=True)

        def pid(process: subprocess.Popen[Any] | None) -> int:
            assert process is not None
            return process.pid

        def runcap(db: Path | None, **env: str) -> ServerProcess:
            server = ServerProcess(db, env={**runcap_env, **env})
            stack.callback(server.stop)
            return server.start()

        baseline = ServedProcess(__file__, "baseline-server")
        stack.callback(baseline.stop)
        baseline.start()
        configs = [
            Config(
                "baseline (bare grpc.aio)",
                "grpc",
                baseline.target,
                create_runs=False,
                server_pid=pid(baseline.process),
            )
        ]

        if selected("runcap sqlite", args.only):
            sqlite = runcap(work / "bench.db")
            configs.append(
                Config("runcap sqlite", "grpc", sqlite.target, server_pid=pid(sqlite.process))
            )

        redis_server = RedisServer(work / "redis")
        stack.callback(redis_server.stop)
        redis_server.start()
        standalone = {"RUNCAP_BACKEND": "redis", "RUNCAP_REDIS_URL": redis_server.url}
        redis_pids = [pid(redis_server.process)]
        redis_ports = [redis_server.port]
        variants: list[tuple[str, dict[str, str]]] = [("runcap redis", {})]
        if args.levers:
            other_loop = "asyncio" if args.event_loop != "asyncio" else "uvloop"
            variants += [
                (f"runcap redis, {other_loop} loop", {"RUNCAP_EVENT_LOOP": other_loop}),
                ("runcap redis, no pipelining", {"RUNCAP_REDIS_PIPELINING": "false"}),
                (
                    f"runcap redis, {other_loop}, no pipelining",
                    {"RUNCAP_EVENT_LOOP": other_loop, "RUNCAP_REDIS_PIPELINING": "false"},
                ),
            ]
        for directory in args.compare_code:
            code = str(Path(directory).resolve())
            variants.append((f"runcap redis, code in {Path(code).name}", {"PYTHONPATH": code}))
        for name, env in variants:
            if selected(name, args.only):
                server = runcap(None, **standalone, **env)
                configs.append(
                    Config(
                        name,
                        "grpc",
                        server.target,
                        server_pid=pid(server.process),
                        redis_pids=redis_pids,
                        redis_ports=redis_ports,
                    )
                )
        if selected("raw redis script", args.only):
            configs.append(
                Config(
                    "raw redis script",
                    "redis",
                    redis_pids=redis_pids,
                    redis_ports=redis_ports,
                    redis_url=redis_server.url,
                )
            )

        cluster_names = ("runcap cluster", "runcap cluster, team", "raw cluster script")
        if any(selected(name, args.only) for name in cluster_names):
            cluster = RedisCluster(primaries=3)
            stack.callback(cluster.stop)
            cluster.start()
            nodes = cluster.startup_nodes
            cluster_pids = [pid(node.process) for node in cluster.nodes]
            cluster_ports = [node.port for node in cluster.nodes]
            if selected("runcap cluster", args.only) or selected("team", args.only):
                cluster_server = runcap(
                    None, RUNCAP_BACKEND="redis", RUNCAP_REDIS_CLUSTER_NODES=",".join(nodes)
                )
                target, server_pid = cluster_server.target, pid(cluster_server.process)
                if selected("runcap cluster", args.only):
                    configs.append(
                        Config(
                            "runcap cluster",
                            "grpc",
                            target,
                            server_pid=server_pid,
                            redis_pids=cluster_pids,
                            redis_ports=cluster_ports,
                        )
                    )
                if selected("runcap cluster, team", args.only):
                    configs.append(
                        Config(
                            "runcap cluster, team",
                            "grpc",
                            target,
                            team=f"bench-{secrets.token_hex(4)}",
                            server_pid=server_pid,
                            redis_pids=cluster_pids,
                            redis_ports=cluster_ports,
                        )
                    )
            if selected("raw cluster script", args.only):
                configs.append(
                    Config(
                        "raw cluster script",
                        "redis",
                        cluster_nodes=list(nodes),
                        redis_pids=cluster_pids,
                        redis_ports=cluster_ports,
                    )
                )
        print_setup(args, configs, started_at)

        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}/{args.rounds} (load {loadavg()})", flush=True)
            base_rate = 0.0
            for config in configs:
                reset_commandstats(config.redis_ports)
                sample = measure(config, args)
                config.samples.append(sample)
                if config.redis_ports:
                    config.script_us.append(script_us_per_call(config.redis_ports))
                if config is configs[0]:
                    base_rate = sample.rate
                ratio = sample.rate / base_rate if base_rate else float("nan")
                config.ratios.append(ratio)
                report_window(config, sample, ratio)
        print()
        print(f"Medians over {args.rounds} rounds (x baseline: median of same-round ratios):")
        print()
        for row in table(configs):
            print(row)
        if args.open_loop:
            open_loop_phase(args, [c for c in configs if c.kind == "grpc"])
        print()
        print(f"load average at the end: {loadavg()}")
        if (now := revision()) != started_at:
            print(f"warning: the code under test changed during the run ({started_at} -> {now})")
        print("stopping servers ...", file=sys.stderr, flush=True)


def open_loop_phase(args: argparse.Namespace, configs: Sequence[Config]) -> None:
    """Latency at fixed offered loads: percentages of each config's median closed-loop rate."""
    percents = [float(p) for p in args.open_loop.split(",") if p.strip()]
    results: dict[tuple[str, float], list[Sample]] = {}
    print()
    print(f"Open loop: a pair started every 1/rate s, {args.rounds} rounds (alternating)")
    for round_no in range(1, args.rounds + 1):
        print(f"round {round_no}/{args.rounds} (load {loadavg()})", flush=True)
        for percent in percents:
            for config in configs:
                rate = median([x.rate for x in config.samples]) * percent / 100
                sample = measure(config, args, rate=rate)
                results.setdefault((config.name, percent), []).append(sample)
                report_window(config, sample, None, label=f"{percent:g}% ")
    print()
    columns = ["config", "offered", "pairs/s", "p50 ms", "p99 ms", "max ms", "server CPU µs/pair"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for percent in percents:
        for config in configs:
            s = results[(config.name, percent)]
            rate = median([x.rate for x in config.samples]) * percent / 100
            cells = [
                config.name,
                f"{percent:g}% ({rate:,.0f}/s)",
                f"{median([x.rate for x in s]):,.0f}",
                f"{median([x.p50_ms for x in s]):.2f}",
                f"{median([x.p99_ms for x in s]):.2f}",
                f"{median([x.max_ms for x in s]):.1f}",
                f"{median([x.per_pair_us(x.server_cpu_s) for x in s]):,.0f}",
            ]
            print("| " + " | ".join(cells) + " |")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    # BENCH_QUICK=1 (a smoke run): one round of 1 s windows.
    parser.add_argument(
        "--seconds", type=float, default=1.0 if QUICK else 5.0, help="measured window (5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.3 if QUICK else 1.0, help="warmup per window (1)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop workers (32)")
    parser.add_argument(
        "--rounds", type=int, default=1 if QUICK else 3, help="rounds of all configs (3)"
    )
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels (4)")
    parser.add_argument("--runs", type=int, default=4, help="runs the workers spread over (4)")
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="RUNCAP_EVENT_LOOP of the runcap servers (auto: uvloop when installed)",
    )
    parser.add_argument(
        "--pipelining",
        choices=("on", "off"),
        default="on",
        help="RUNCAP_REDIS_PIPELINING of the runcap servers and the raw loop (on)",
    )
    parser.add_argument(
        "--levers",
        action="store_true",
        help="also runcap redis with the asyncio loop, without pipelining, and without both",
    )
    parser.add_argument(
        "--compare-code",
        action="append",
        default=[],
        metavar="DIR",
        help="also runcap redis running the runcap_server package found in DIR (repeatable)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts of config names: run only those (and the baseline)",
    )
    parser.add_argument(
        "--open-loop",
        default="",
        metavar="PCTS",
        help="then open-loop windows at these percentages of each config's saturation",
    )
    roles = parser.add_subparsers(dest="role", help="internal: the processes this file starts")
    roles.add_parser("baseline-server", help="serve the bare baseline; print its address")
    for name in ("loadgen", "redis-loop"):
        role = roles.add_parser(name, help="measure one window; print it as JSON")
        role.add_argument("--run-ids", required=True, help="comma-separated run ids")
        role.add_argument("--concurrency", type=int, required=True)
        role.add_argument("--warmup", type=float, required=True)
        role.add_argument("--seconds", type=float, required=True)
        role.add_argument("--redis-pids", default="", help="comma-separated redis-server pids")
    loadgen = roles.choices["loadgen"]
    loadgen.add_argument("--target", required=True)
    loadgen.add_argument("--channels", type=int, required=True)
    loadgen.add_argument("--server-pid", type=int, default=0)
    loadgen.add_argument("--create", action="store_true", help="create the runs first")
    loadgen.add_argument("--team", default="", help="charge the created runs to this team")
    loadgen.add_argument("--rate", type=float, default=0, help="open loop: pairs/s (0: closed)")
    redis_loop = roles.choices["redis-loop"]
    redis_loop.add_argument("--redis-url", default="")
    redis_loop.add_argument("--pipelining", choices=("on", "off"), default="on")
    redis_loop.add_argument("--cluster-nodes", default="")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.role == "baseline-server":
        # The other RPCs keep the generated UNIMPLEMENTED bodies (abstract only in the stubs).
        asyncio.run(serve(BareServicer()))  # type: ignore[abstract]
    elif args.role in ("loadgen", "redis-loop"):
        runner = load_grpc if args.role == "loadgen" else load_redis
        sample = asyncio.run(runner(args))
        print(json.dumps(sample.__dict__))
    else:
        try:
            orchestrate(args)
        except KeyboardInterrupt:
            print("\ninterrupted; servers stopped and temp dirs removed", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()
