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
import hashlib
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from runcap.v1 import budget_pb2, budget_service_pb2, budget_service_pb2_grpc
from runcap_server import convert
from runcap_server.ledger.types import MAX_MICROS, BudgetState, RunSpec, RunStatus
from runcap_server.settings import EVENT_LOOPS, Settings

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TENANT = Settings().tenant
AMOUNT_MICROS = 1_000
ACTUAL_MICROS = 900
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Each channel gets its own TCP connection (grpc shares subchannels across channels).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
LOADGEN = "Python asyncio grpc.aio client in a separate process ({channels} channels)"
Context = grpc.aio.ServicerContext[Any, Any]


# --- shared helpers -------------------------------------------------------------------


def run_ids(count: int) -> list[str]:
    """Fresh run ids, all of one length (so every response has the same size)."""
    tag = secrets.token_hex(6)
    return [f"bench-{tag}-{k:02d}" for k in range(count)]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces: fields resume after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Sample:
    """One measured window, as a load generator (or the raw loop) reports it."""

    pairs: int
    window_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu_s: float
    redis_cpu_s: float
    client_cpu_s: float
    reserve_bytes: int = 0
    commit_bytes: int = 0

    @property
    def rate(self) -> float:
        return self.pairs / self.window_s if self.window_s else 0.0

    def per_pair_us(self, cpu_s: float) -> float:
        return cpu_s / self.pairs * 1e6 if self.pairs else float("nan")


Pair = Callable[[int, str, str], Awaitable[Any]]


async def closed_loop(
    pair: Pair,
    *,
    runs: Sequence[str],
    concurrency: int,
    warmup_s: float,
    seconds: float,
    server_pid: int,
    redis_pids: Sequence[int],
) -> tuple[Sample, Any]:
    """Run `pair(worker, run_id, reservation_id)` in C workers; measure one window.

    The window starts after the warmup; CPU of the given processes (and of this one)
    is read at its two ends, and it counts the pairs completed inside it.
    """
    done: list[tuple[int, int]] = []  # (end ns, latency ns) of every completed pair
    errors: list[float] = []  # monotonic times of failed pairs
    last_reply: list[Any] = [None]  # the latest pair's reply (for response sizes)
    stop = asyncio.Event()

    def cpu() -> tuple[float, float, float]:
        server = proc_cpu_s(server_pid) if server_pid else 0.0
        return server, sum(proc_cpu_s(pid) for pid in redis_pids), time.process_time()

    async def worker(index: int) -> None:
        run_id = runs[index % len(runs)]
        while not stop.is_set():
            start = time.perf_counter_ns()
            try:
                reply = await pair(index, run_id, uuid.uuid4().hex)
            except Exception as error:
                errors.append(time.perf_counter())
                if len(errors) == 1:
                    print(f"  first error: {error!r}"[:300], file=sys.stderr)
                continue
            end = time.perf_counter_ns()
            done.append((end, end - start))
            last_reply[0] = reply

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        t0, cpu0 = time.perf_counter_ns(), cpu()
        await asyncio.sleep(seconds)
        t1, cpu1 = time.perf_counter_ns(), cpu()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for task in tasks:
            task.cancel()
    latencies = sorted(lat / 1e6 for end, lat in done if t0 <= end <= t1)
    sample = Sample(
        pairs=len(latencies),
        window_s=(t1 - t0) / 1e9,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else float("nan"),
        errors=sum(1 for at in errors if t0 / 1e9 <= at <= t1 / 1e9),
        server_cpu_s=cpu1[0] - cpu0[0],
        redis_cpu_s=cpu1[1] - cpu0[1],
        client_cpu_s=cpu1[2] - cpu0[2],
    )
    return sample, last_reply[0]


async def open_loop(
    pair: Pair,
    *,
    runs: Sequence[str],
    rate: float,
    warmup_s: float,
    seconds: float,
    server_pid: int,
    redis_pids: Sequence[int],
) -> Sample:
    """Start a pair every 1/rate s whatever the answers (an open loop); measure one window.

    A pair's latency runs from its scheduled start, so a generator that falls
    behind counts against the server, not in its favour.
    """
    done: list[tuple[int, int]] = []  # (end ns, latency ns)
    errors: list[float] = []
    tasks: set[asyncio.Task[None]] = set()

    def cpu() -> tuple[float, float, float]:
        server = proc_cpu_s(server_pid) if server_pid else 0.0
        return server, sum(proc_cpu_s(pid) for pid in redis_pids), time.process_time()

    async def one(index: int, due_ns: int) -> None:
        try:
            await pair(index, runs[index % len(runs)], uuid.uuid4().hex)
        except Exception as error:
            errors.append(time.perf_counter())
            if len(errors) == 1:
                print(f"  first error: {error!r}"[:300], file=sys.stderr)
            return
        end = time.perf_counter_ns()
        done.append((end, end - due_ns))

    start = time.perf_counter_ns()
    t0 = start + int(warmup_s * 1e9)
    t1 = t0 + int(seconds * 1e9)
    interval_ns = 1e9 / rate
    index = 0
    cpu0: tuple[float, float, float] | None = None
    while True:
        due = start + int(index * interval_ns)
        if due >= t1:
            break
        now = time.perf_counter_ns()
        if cpu0 is None and now >= t0:
            cpu0 = cpu()
        if due > now:
            await asyncio.sleep((due - now) / 1e9)
        task = asyncio.create_task(one(index, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    await asyncio.sleep(max(0, t1 - time.perf_counter_ns()) / 1e9)
    cpu1 = cpu()
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    assert cpu0 is not None
    # Pairs started inside the window, however late they finished.
    latencies = sorted(lat / 1e6 for end, lat in done if t0 <= end - lat < t1)
    in_window = sum(1 for end, _ in done if t0 <= end <= t1)
    return Sample(
        pairs=in_window,
        window_s=(t1 - t0) / 1e9,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else float("nan"),
        errors=sum(1 for at in errors if t0 / 1e9 <= at <= t1 / 1e9),
        server_cpu_s=cpu1[0] - cpu0[0],
        redis_cpu_s=cpu1[1] - cpu0[1],
        client_cpu_s=cpu1[2] - cpu0[2],
    )


# --- the bare baseline server ---------------------------------------------------------


def fixed_responses(
    run_id: str,
) -> tuple[budget_service_pb2.ReserveResponse, budget_service_pb2.CommitResponse]:
    """Responses shaped like runcap's a few seconds into a window (the same sizes).

    By then a run has some 2,000 pairs committed, and about 8 of the workers (32
    over 4 runs) hold a reservation on it; the load generator reports the sizes
    it actually received from every configuration, so they can be compared.
    """

    def state(pairs: int, holds: int) -> budget_pb2.BudgetState:
        return convert.state_pb(
            BudgetState(
                run_id=run_id,
                limit_micros=MAX_MICROS,
                committed_micros=pairs * ACTUAL_MICROS,
                reserved_micros=holds * AMOUNT_MICROS,
                revision=2 * pairs + holds,
                status=RunStatus.OPEN,
                active_reservations=holds,
                overrun_micros=0,
                digest=hashlib.sha1(b"%d" % pairs).hexdigest(),
            )
        )

    expires = timestamp_pb2.Timestamp()
    expires.FromMilliseconds(int(time.time() * 1000) + 600_123)
    reserve = budget_service_pb2.ReserveResponse(
        decision=budget_pb2.DECISION_ALLOW,
        reason=budget_pb2.DECISION_REASON_WITHIN_BUDGET,
        reservation_id=uuid.uuid4().hex,
        amount_micros=AMOUNT_MICROS,
        expire_time=expires,
        state=state(2_000, 8),
        replayed=False,
    )
    commit = budget_service_pb2.CommitResponse(
        state=state(2_001, 7),
        overrun_micros=0,
        replayed=False,
        reservation_status=budget_pb2.RESERVATION_STATUS_COMMITTED,
        actual_micros=ACTUAL_MICROS,
        held_micros=AMOUNT_MICROS,
    )
    return reserve, commit


class BareServicer(budget_service_pb2_grpc.BudgetServiceServicer):
    """Reserve and Commit answer a prebuilt response; nothing is read or stored."""

    def __init__(self) -> None:
        self.reserve, self.commit = fixed_responses(run_ids(1)[0])

    async def Reserve(
        self, request: budget_service_pb2.ReserveRequest, context: Context
    ) -> budget_service_pb2.ReserveResponse:
        return self.reserve

    async def Commit(
        self, request: budget_service_pb2.CommitRequest, context: Context
    ) -> budget_service_pb2.CommitResponse:
        return self.commit


async def serve_baseline() -> None:
    server = grpc.aio.server()
    # The other RPCs keep the generated UNIMPLEMENTED bodies (abstract only in the stubs).
    servicer = BareServicer()  # type: ignore[abstract]
    budget_service_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening on {HOST}:{port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


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
                server_pid=args.server_pid,
                redis_pids=redis_pids,
            )
        sample, reply = await closed_loop(
            pair,
            runs=runs,
            concurrency=args.concurrency,
            warmup_s=args.warmup,
            seconds=args.seconds,
            server_pid=args.server_pid,
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
            server_pid=0,
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


class BaselineProcess:
    """This file's `baseline-server` subcommand in a subprocess."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.target = ""

    def start(self) -> BaselineProcess:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "baseline-server"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the baseline server did not start: {line!r}")
        self.target = line.split()[-1]
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


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


def versions() -> dict[str, str]:
    from importlib.metadata import version

    redis_server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    server_version = next((w[2:] for w in redis_server if w.startswith("v=")), "?")
    packages = ("grpcio", "protobuf", "redis", "hiredis")
    found = {name: version(name) for name in packages}
    return {"python": platform.python_version(), **found, "redis-server": server_version}


CODE_UNDER_TEST = ("server", "clients/python", "proto")


def revision() -> str:
    """The commit that last changed the code under test, and whether the tree differs."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h %cd", "--date=iso", "--", *CODE_UNDER_TEST)
    if not commit:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_UNDER_TEST)
    return commit + (" + uncommitted changes" if dirty else "")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


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


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


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


def reset_script_stats(ports: Sequence[int]) -> None:
    from tests.redis_servers import command

    for port in ports:
        command(port, "CONFIG", "RESETSTAT")


def script_us_per_call(ports: Sequence[int]) -> float:
    """Redis's own time per EVALSHA/EVAL since the last reset, over the given nodes."""
    from tests.redis_servers import parse_info, text

    calls = usec = 0
    for port in ports:
        stats = parse_info(text(port, "INFO", "commandstats"))
        for name in ("cmdstat_evalsha", "cmdstat_eval"):
            fields = dict(kv.split("=", 1) for kv in stats.get(name, "").split(",") if "=" in kv)
            calls += int(fields.get("calls", 0))
            usec += int(fields.get("usec", 0))
    return usec / calls if calls else float("nan")


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so every cleanup below runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


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
        + (f", script {config.script_us[-1]:.0f} µs/call" if config.script_us else "")
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

        baseline = BaselineProcess()
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
                reset_script_stats(config.redis_ports)
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
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup per window (1)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop workers (32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all configs (3)")
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
        asyncio.run(serve_baseline())
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
