"""What the benchmarks in bench/ share (a helper module: `make bench` does not run it).

Process and CPU readings from /proc, percentiles, the setup lines every benchmark
prints, the bare grpc.aio baseline server, a closed-loop driver, and `Worker`: a
role of a benchmark script in its own process, driven by JSON lines on its stdin
and stdout, so load generators and watchers never share the server's process.

    .venv/bin/python bench/common.py baseline-server   # the bare baseline (internal)
"""

from __future__ import annotations

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
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from runcap.v1 import budget_pb2, budget_service_pb2, budget_service_pb2_grpc
from runcap_server import convert
from runcap_server.ledger.types import MAX_MICROS, BudgetState, RunStatus
from runcap_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# The benchmarks start redis-server and runcap processes with the test harness.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
TENANT = Settings().tenant
AMOUNT_MICROS = 1_000
ACTUAL_MICROS = 900
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Each channel gets its own TCP connection (grpc shares subchannels across channels).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# Open loop: pairs still unanswered this long after the schedule ended are errors.
OPEN_LOOP_DRAIN_S = 10.0
# BENCH_QUICK=1: every benchmark in about 20 s, for smoke tests of the scripts.
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
CODE_UNDER_TEST = ("server", "clients/python", "proto")
Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


# --- event loop ------------------------------------------------------------------------


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `runcap serve` runs on here (RUNCAP_EVENT_LOOP; None: asyncio's).

    Baselines, load generators and watchers use it too, so a ratio compares the
    server's code, not two event loops.
    """
    try:
        from runcap_server.app import loop_factory as runcap_loop
    except ImportError:  # a runcap without the setting: asyncio's loop
        return None
    return runcap_loop(Settings.from_env().event_loop)


def loop_name() -> str:
    factory = loop_factory()
    return "asyncio" if factory is None else type(factory()).__module__.partition(".")[0]


def run(main: Awaitable[T]) -> T:
    """asyncio.run on `loop_factory()`'s loop."""

    async def wrapper() -> T:
        return await main

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(wrapper())


# --- processes, CPU and memory ---------------------------------------------------------


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


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), in bytes; 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pid(process: subprocess.Popen[Any] | None) -> int:
    assert process is not None
    return process.pid


class CpuMeter:
    """CPU seconds used so far by the servers, by redis-server and by this process."""

    def __init__(self, server_pids: Sequence[int], redis_pids: Sequence[int]) -> None:
        self.server_pids = list(server_pids)
        self.redis_pids = list(redis_pids)

    def read(self) -> tuple[float, float, float]:
        return (
            sum(proc_cpu_s(p) for p in self.server_pids),
            sum(proc_cpu_s(p) for p in self.redis_pids),
            time.process_time(),
        )


# --- figures ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    """`median (min-max)` of the rounds' values."""
    if not values:
        return "-"
    return f"{median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


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
    # Open loop only: the offered rate, how late the generator sent (p99), most in flight.
    offered: float = 0.0
    late_p99_ms: float = 0.0
    in_flight_max: int = 0

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
    server_pids: Sequence[int],
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
    meter = CpuMeter(server_pids, redis_pids)

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
        t0, cpu0 = time.perf_counter_ns(), meter.read()
        await asyncio.sleep(seconds)
        t1, cpu1 = time.perf_counter_ns(), meter.read()
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
    server_pids: Sequence[int],
    redis_pids: Sequence[int],
) -> Sample:
    """Start a pair every 1/rate s whatever the answers (an open loop); measure one window.

    A pair's latency runs from the time it was due, not from when it went out: a
    generator that fell behind cannot hide the wait (no coordinated omission). The
    window holds the pairs due after the warmup; `late_p99_ms` says how late the
    generator itself sent them (its own health). Pairs still unanswered
    OPEN_LOOP_DRAIN_S after the schedule ended count as errors.
    """
    loop = asyncio.get_running_loop()
    meter = CpuMeter(server_pids, redis_pids)
    interval = 1.0 / rate
    count = max(1, round((warmup_s + seconds) * rate))
    start = loop.time() + 0.05
    w0, w1 = start + warmup_s, start + warmup_s + seconds
    done: list[tuple[float, float, float]] = []  # (due, sent, answered)
    failed: list[float] = []  # due times of failed pairs
    cpu: dict[str, tuple[float, float, float]] = {}
    loop.call_at(w0, lambda: cpu.setdefault("start", meter.read()))
    loop.call_at(w1, lambda: cpu.setdefault("end", meter.read()))
    in_flight = peak = 0

    async def one(k: int, due: float) -> None:
        nonlocal in_flight, peak
        sent = loop.time()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await pair(k, runs[k % len(runs)], uuid.uuid4().hex)
        except Exception as error:
            failed.append(due)
            if len(failed) == 1:
                print(f"  first error: {error!r}"[:300], file=sys.stderr)
        else:
            done.append((due, sent, loop.time()))
        finally:
            in_flight -= 1

    tasks: set[asyncio.Task[None]] = set()
    for k in range(count):
        due = start + k * interval
        if (delay := due - loop.time()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(k, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if (delay := w1 - loop.time()) > 0:
        await asyncio.sleep(delay)
    unfinished = 0
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=OPEN_LOOP_DRAIN_S)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
    window = [(due, sent, answered) for due, sent, answered in done if w0 <= due < w1]
    latencies = sorted((answered - due) * 1e3 for due, _, answered in window)
    late = sorted((sent - due) * 1e3 for due, sent, _ in window)
    cpu0, cpu1 = cpu.get("start", (0.0, 0.0, 0.0)), cpu.get("end", (0.0, 0.0, 0.0))
    return Sample(
        pairs=sum(1 for _, _, answered in done if w0 <= answered <= w1),
        window_s=seconds,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else float("nan"),
        errors=sum(1 for due in failed if w0 <= due < w1) + unfinished,
        server_cpu_s=cpu1[0] - cpu0[0],
        redis_cpu_s=cpu1[1] - cpu0[1],
        client_cpu_s=cpu1[2] - cpu0[2],
        offered=rate,
        late_p99_ms=percentile(late, 0.99),
        in_flight_max=peak,
    )


def grpc_pair(stubs: Sequence[Any]) -> Pair:
    """Reserve AMOUNT_MICROS then Commit ACTUAL_MICROS, worker w on stub w mod len."""

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

    return pair


async def create_runs(stub: Any, runs: Sequence[str], team: str = "") -> None:
    """Runs with the largest limit (a bare baseline answers UNIMPLEMENTED: none needed)."""
    for run_id in runs:
        try:
            await stub.CreateRun(
                budget_service_pb2.CreateRunRequest(
                    run_id=run_id, limit_micros=MAX_MICROS, team_id=team
                )
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise


# --- setup lines -----------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import version

    redis_server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    server_version = next((w[2:] for w in redis_server if w.startswith("v=")), "?")
    packages = ("grpcio", "protobuf", "redis", "hiredis")
    found = {name: version(name) for name in packages}
    return {"python": platform.python_version(), **found, "redis-server": server_version}


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


def setup_lines(title: str, code: str) -> list[str]:
    """The first lines of every benchmark's output: what ran where."""
    v = versions()
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    return [
        f"# {title}",
        f"date:        {time.strftime('%Y-%m-%d %H:%M:%S %Z')}" + ("  (BENCH_QUICK)" * QUICK),
        f"machine:     {platform.platform()}, {cores} cores ({usable} usable), load {loadavg()}",
        f"versions:    python {v['python']}, grpcio {v['grpcio']}, protobuf {v['protobuf']}, "
        f"redis-py {v['redis']} (hiredis {v['hiredis']}), redis-server {v['redis-server']}",
        f"runcap:      {code} (last change to {', '.join(CODE_UNDER_TEST)})",
        f"event loop:  {loop_name()} in every process of the benchmark (RUNCAP_EVENT_LOOP)",
    ]


def finish(started_at: str) -> None:
    """The closing lines: the load average, and a warning if the code changed meanwhile."""
    print(f"load average at the end: {loadavg()}")
    if (now := revision()) != started_at:
        print(f"warning: the code under test changed during the run ({started_at} -> {now})")


# --- Redis's own accounting ------------------------------------------------------------


def reset_commandstats(ports: Sequence[int]) -> None:
    from tests.redis_servers import command

    for port in ports:
        command(port, "CONFIG", "RESETSTAT")


def commandstats(ports: Sequence[int]) -> dict[str, tuple[int, int]]:
    """(calls, usec) per command since the last reset, summed over the given nodes."""
    from tests.redis_servers import parse_info, text

    totals: dict[str, tuple[int, int]] = {}
    for port in ports:
        for name, value in parse_info(text(port, "INFO", "commandstats")).items():
            fields = dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
            calls, usec = totals.get(name.removeprefix("cmdstat_"), (0, 0))
            totals[name.removeprefix("cmdstat_")] = (
                calls + int(fields.get("calls", 0)),
                usec + int(fields.get("usec", 0)),
            )
    return totals


def script_us_per_call(ports: Sequence[int]) -> float:
    """Redis's own time per EVALSHA/EVAL since the last reset, over the given nodes."""
    stats = commandstats(ports)
    calls = sum(stats.get(name, (0, 0))[0] for name in ("evalsha", "eval"))
    usec = sum(stats.get(name, (0, 0))[1] for name in ("evalsha", "eval"))
    return usec / calls if calls else float("nan")


# --- the bare baseline server ----------------------------------------------------------


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


async def serve(servicer: budget_service_pb2_grpc.BudgetServiceServicer) -> None:
    """Serve `servicer` on a free port, print its address, stop on SIGTERM or SIGINT."""
    server = grpc.aio.server()
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


class ServedProcess:
    """A server role of a bench script in a subprocess (it prints `listening on ADDR`)."""

    def __init__(self, script: Path | str, role: str, *args: str) -> None:
        self.argv = [sys.executable, str(script), role, *args]
        self.process: subprocess.Popen[str] | None = None
        self.target = ""

    def start(self) -> ServedProcess:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{' '.join(self.argv[1:])} did not start: {line!r}")
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


def baseline_process() -> ServedProcess:
    """The bare grpc.aio baseline (BareServicer) in its own process; `.start()` it."""
    return ServedProcess(__file__, "baseline-server")


# --- worker processes ------------------------------------------------------------------


class Worker:
    """A role of a bench script in its own process, one JSON command and reply per line.

    The role reads commands from stdin and answers each with one JSON line on stdout
    (`serve_commands`); anything it logs goes to stderr, which is kept for errors.
    """

    def __init__(self, script: Path | str, role: str, *args: str) -> None:
        self.argv = [sys.executable, str(script), role, *args]
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, command: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(10)
            raise RuntimeError(f"{' '.join(self.argv[1:])} exited:\n{self.stderr()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{' '.join(self.argv[1:])}: {reply['error']}")
        return reply

    def call(self, command: Mapping[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()[-4_000:]

    def close(self) -> None:
        """Close its stdin (the role returns), then make sure it is gone."""
        with contextlib.suppress(OSError):
            if self.process.stdin:
                self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()


async def serve_commands(handle: Callable[[dict[str, Any]], Awaitable[Mapping[str, Any]]]) -> None:
    """A worker role's loop: one JSON command per stdin line, one JSON reply per line."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        try:
            reply = dict(await handle(json.loads(line)))
        except Exception as error:
            reply = {"error": repr(error)}
        print(json.dumps(reply), flush=True)


# --- orchestration ---------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so every cleanup runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def redis_env(url: str = "", cluster_nodes: Sequence[str] = ()) -> dict[str, str]:
    """Environment for a `runcap serve` process on Redis (a URL or cluster nodes)."""
    env = {"RUNCAP_SHUTDOWN_GRACE": "1s", "RUNCAP_BACKEND": "redis"}
    if url:
        env["RUNCAP_REDIS_URL"] = url
    else:
        env["RUNCAP_REDIS_CLUSTER_NODES"] = ",".join(cluster_nodes)
    return env


def main_guard(orchestrate: Callable[[], None]) -> None:
    """Run a benchmark's orchestrator; Ctrl-C stops every process it started."""
    try:
        with interrupts_as_keyboard_interrupt():
            orchestrate()
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and temp dirs removed", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    if sys.argv[1:] != ["baseline-server"]:
        sys.exit(f"usage: {sys.argv[0]} baseline-server (internal: the bare baseline)")
    # The other RPCs keep the generated UNIMPLEMENTED bodies (abstract only in the stubs).
    run(serve(BareServicer()))  # type: ignore[abstract]
