"""Watch fan-out: how long one event takes to reach 1,000 or 10,000 watchers of one run.

Two servers, each one process, are watched at the same time by the same watcher
processes, and their events alternate:

    baseline   a bare grpc.aio BudgetService whose Watch yields, to every stream, one
               prebuilt WatchResponse of runcap's size per Reserve (an asyncio.Queue
               per stream): the floor of grpc.aio fan-out, with no storage
    runcap     runcap on one redis-server: Reserve runs the ledger script, rings the
               run's doorbell (SPUBLISH), the run's one feed reads the log and hands
               the change to every stream

The watchers are P processes (4 by default), each holding N/P streams to each server
over a few channels, so they do not share the servers' processes. Each event is one
Reserve; its send time (CLOCK_MONOTONIC, shared by every process on the machine) is
taken just before the call, and each stream records when the event arrived. Per event:
the time until the last watcher had it ("reach all"); per delivery: the time each
watcher waited. Memory per watcher is the server's RSS growth over opening them.

    .venv/bin/python bench/watch_fanout.py [--watchers 1000,10000] [--events 20]

BENCH_QUICK=1 runs 500 watchers and 3 events. The same file is also the bare server
and the watcher processes (internal subcommands).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import grpc
import grpc.aio
from common import percentile

from runcap.v1 import budget_pb2, budget_service_pb2, budget_service_pb2_grpc
from runcap_server import convert
from runcap_server.ledger.types import MAX_MICROS, BudgetState, Change, EventType, RunStatus

# Reserve holds live this long, so no expiry adds events of its own during a run.
HOLD_TTL_S = 3_600
# Streams a watcher process opens at once (then waits for their first messages).
OPEN_BATCH = 100
# How long to wait for one event to reach every watcher before calling it lost.
EVENT_TIMEOUT_S = 60.0


# --- the bare fan-out server -----------------------------------------------------------


def event_message(revision: int) -> budget_service_pb2.WatchResponse:
    """A RESERVED event shaped like runcap's (the same fields, so the same size)."""
    state = BudgetState(
        run_id=common.run_ids(1)[0],
        limit_micros=MAX_MICROS,
        committed_micros=0,
        reserved_micros=revision * common.AMOUNT_MICROS,
        revision=revision,
        status=RunStatus.OPEN,
        active_reservations=revision,
        overrun_micros=0,
        digest=uuid.uuid4().hex + uuid.uuid4().hex[:8],
    )
    change = Change(
        revision=revision,
        type=EventType.RESERVED,
        time_ms=int(time.time() * 1000),
        state=state,
        reservation_id=uuid.uuid4().hex,
        amount_micros=common.AMOUNT_MICROS,
    )
    return budget_service_pb2.WatchResponse(revision=revision, event=convert.event_pb(change))


class FanoutServicer(budget_service_pb2_grpc.BudgetServiceServicer):
    """Watch: a snapshot, then every broadcast message; Reserve broadcasts one."""

    def __init__(self) -> None:
        self.revision = 1
        self.queues: set[asyncio.Queue[budget_service_pb2.WatchResponse]] = set()

    async def Watch(
        self, request: budget_service_pb2.WatchRequest, context: common.Context
    ) -> AsyncIterator[budget_service_pb2.WatchResponse]:
        queue: asyncio.Queue[budget_service_pb2.WatchResponse] = asyncio.Queue()
        self.queues.add(queue)
        try:
            yield budget_service_pb2.WatchResponse(
                revision=self.revision, snapshot=budget_pb2.BudgetState(revision=self.revision)
            )
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)

    async def Reserve(
        self, request: budget_service_pb2.ReserveRequest, context: common.Context
    ) -> budget_service_pb2.ReserveResponse:
        self.revision += 1
        message = event_message(self.revision)  # built once, the same object for all
        for queue in self.queues:
            queue.put_nowait(message)
        return budget_service_pb2.ReserveResponse(
            decision=budget_pb2.DECISION_ALLOW,
            state=budget_pb2.BudgetState(revision=self.revision),
        )


# --- the watcher processes -------------------------------------------------------------


class Watchers:
    """Streams to a few targets (by name); records when each event reached each stream."""

    def __init__(self) -> None:
        self.channels: dict[str, list[grpc.aio.Channel]] = {}
        self.tasks: dict[str, list[asyncio.Task[None]]] = {}
        # (target name, revision) -> arrival times, and who waits for them to complete.
        self.arrivals: dict[tuple[str, int], list[float]] = {}
        self.complete: dict[tuple[str, int], asyncio.Event] = {}

    async def handle(self, command: dict[str, Any]) -> Mapping[str, Any]:
        if command["op"] == "open":
            return await self.open(
                command["name"], command["target"], command["run_id"], command["streams"],
                command["channels"],
            )  # fmt: skip
        if command["op"] == "await":
            return await self.wait(command["name"], command["revision"], command["within_s"])
        if command["op"] == "close":
            await self.close(command["name"])
            return {}
        raise ValueError(f"unknown op {command['op']!r}")

    async def open(
        self, name: str, target: str, run_id: str, streams: int, channels: int
    ) -> Mapping[str, Any]:
        """Open the streams and return once every one has its first message."""
        opened = self.channels[name] = [
            grpc.aio.insecure_channel(target, options=common.CHANNEL_OPTIONS)
            for _ in range(channels)
        ]
        stubs = [budget_service_pb2_grpc.BudgetServiceStub(channel) for channel in opened]
        started = time.monotonic()
        tasks = self.tasks[name] = []
        # In batches: gRPC core cancels calls beyond 1,000 waiting for the application
        # to take them (grpc.max_pending_requests), which a burst of thousands hits.
        for first_index in range(0, streams, OPEN_BATCH):
            ready: list[asyncio.Future[None]] = []
            for index in range(first_index, min(streams, first_index + OPEN_BATCH)):
                first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                request = budget_service_pb2.WatchRequest(run_id=run_id)
                call = stubs[index % channels].Watch(request)
                tasks.append(asyncio.create_task(self.follow(name, call, first, streams)))
                ready.append(first)
            try:
                await asyncio.wait_for(asyncio.gather(*ready), 300)
            except Exception as error:
                raise RuntimeError(f"opening streams to {name} ({target}): {error!r}") from None
        return {"opened": streams, "seconds": time.monotonic() - started}

    async def follow(
        self, name: str, call: Any, first: asyncio.Future[None], expected: int
    ) -> None:
        try:
            async for message in call:
                now = time.monotonic()
                if not first.done():
                    first.set_result(None)
                if not message.HasField("event"):
                    continue
                key = (name, message.revision)
                times = self.arrivals.setdefault(key, [])
                times.append(now)
                if len(times) == expected:
                    self.complete.setdefault(key, asyncio.Event()).set()
        except grpc.aio.AioRpcError as error:
            if not first.done():
                first.set_exception(error)
            elif error.code() != grpc.StatusCode.CANCELLED:
                raise

    async def wait(self, name: str, revision: int, within_s: float) -> Mapping[str, Any]:
        """The arrival times of one event at every stream (those it reached in time)."""
        key = (name, revision)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self.complete.setdefault(key, asyncio.Event()).wait()
        times = self.arrivals.pop(key, [])
        self.complete.pop(key, None)
        return {"times": times, "missing": len(self.tasks[name]) - len(times)}

    async def close(self, name: str) -> None:
        for task in self.tasks.pop(name, []):
            task.cancel()
        for channel in self.channels.pop(name, []):
            await channel.close(None)


async def serve_watchers() -> None:
    watchers = Watchers()
    try:
        await common.serve_commands(watchers.handle)
    finally:
        for name in list(watchers.channels):
            await watchers.close(name)


# --- measuring -------------------------------------------------------------------------


@dataclass
class Target:
    """One watched server: where it is, which run, and what its events cost."""

    name: str
    address: str
    pid: int
    run_id: str
    rss_before: int = 0
    rss_after: int = 0
    reach_all_ms: list[float] = field(default_factory=list)
    deliveries_ms: list[float] = field(default_factory=list)
    missing: int = 0
    cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    events: int = 0

    def per_watcher_kib(self, watchers: int) -> float:
        return (self.rss_after - self.rss_before) / watchers / 1024

    def row(self, watchers: int, baseline: Target | None) -> list[str]:
        reach = sorted(self.reach_all_ms)
        each = sorted(self.deliveries_ms)
        p99 = percentile(reach, 0.99)
        ratio = p99 / percentile(sorted(baseline.reach_all_ms), 0.99) if baseline else 1.0
        return [
            self.name,
            f"{watchers:,}",
            str(self.events),
            f"{percentile(reach, 0.5):.1f}",
            f"{p99:.1f}",
            f"{reach[-1] if reach else float('nan'):.1f}",
            f"x{ratio:.2f}",
            f"{percentile(each, 0.5):.1f}",
            f"{percentile(each, 0.99):.1f}",
            f"{self.cpu_s / self.events * 1e3 if self.events else float('nan'):.1f}",
            f"{self.client_cpu_s / self.events * 1e3 if self.events else float('nan'):.1f}",
            f"{self.per_watcher_kib(watchers):.1f}",
            str(self.missing),
        ]


COLUMNS = [
    "server",
    "watchers",
    "events",
    "reach all p50 ms",
    "reach all p99 ms",
    "reach all max ms",
    "p99 x baseline",
    "each p50 ms",
    "each p99 ms",
    "server CPU ms/event",
    "watchers CPU ms/event",
    "RSS KiB/watcher",
    "lost",
]


def trigger(stub: Any, target: Target) -> tuple[float, int]:
    """One Reserve on the target's run: (monotonic send time, the event's revision)."""
    request = budget_service_pb2.ReserveRequest(
        run_id=target.run_id,
        reservation_id=uuid.uuid4().hex,
        amount_micros=common.AMOUNT_MICROS,
    )
    request.ttl.FromSeconds(HOLD_TTL_S)
    sent = time.monotonic()
    reply = stub.Reserve(request, timeout=30)
    return sent, reply.state.revision


def fan_out(
    targets: Sequence[Target],
    stubs: Mapping[str, Any],
    workers: Sequence[common.Worker],
    watchers: int,
    events: int,
    gap_s: float,
) -> None:
    """Open the watchers, then send `events` events to each target, alternating."""
    share, extra = divmod(watchers, len(workers))
    per_worker = [share + (i < extra) for i in range(len(workers))]
    for target in targets:
        target.rss_before = common.proc_rss_bytes(target.pid)
        for worker, streams in zip(workers, per_worker, strict=True):
            worker.send(
                {
                    "op": "open",
                    "name": target.name,
                    "target": target.address,
                    "run_id": target.run_id,
                    "streams": streams,
                    "channels": max(1, min(8, streams // 300)),
                }
            )
        for worker in workers:
            worker.receive()
        time.sleep(1.0)  # let the servers settle before reading their memory
        target.rss_after = common.proc_rss_bytes(target.pid)
    for k in range(events):
        # Alternate which server goes first, so neither always follows the other.
        for target in targets if k % 2 == 0 else list(reversed(targets)):
            cpu0 = common.proc_cpu_s(target.pid)
            client0 = sum(common.proc_cpu_s(worker.pid) for worker in workers)
            sent, revision = trigger(stubs[target.name], target)
            for worker in workers:
                worker.send(
                    {
                        "op": "await",
                        "name": target.name,
                        "revision": revision,
                        "within_s": EVENT_TIMEOUT_S,
                    }
                )
            latest = sent
            for worker in workers:
                reply = worker.receive()
                target.missing += reply["missing"]
                target.deliveries_ms += [(t - sent) * 1e3 for t in reply["times"]]
                latest = max([latest, *reply["times"]])
            target.cpu_s += common.proc_cpu_s(target.pid) - cpu0
            target.client_cpu_s += sum(common.proc_cpu_s(w.pid) for w in workers) - client0
            target.events += 1
            target.reach_all_ms.append((latest - sent) * 1e3)
            time.sleep(gap_s)
    for target in targets:
        for worker in workers:
            worker.send({"op": "close", "name": target.name})
        for worker in workers:
            worker.receive()


def orchestrate(args: argparse.Namespace) -> None:
    from tests.redis_servers import RedisServer
    from tests.servers import ServerProcess

    started_at = common.revision()
    sizes = [int(n) for n in args.watchers.split(",")]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runcap-bench-")))
        print("starting servers ...", file=sys.stderr, flush=True)
        baseline = common.ServedProcess(__file__, "bare-server")
        stack.callback(baseline.stop)
        baseline.start()
        redis_server = RedisServer(work / "redis")
        stack.callback(redis_server.stop)
        redis_server.start()
        runcap = ServerProcess(
            None,
            env={
                **common.redis_env(url=redis_server.url),
                # No heartbeats during a run: every message a watcher gets is an event.
                "RUNCAP_WATCH_HEARTBEAT": "1h",
            },
        )
        stack.callback(runcap.stop)
        runcap.start()
        channels = {
            name: stack.enter_context(grpc.insecure_channel(address))
            for name, address in (("baseline", baseline.target), ("runcap", runcap.target))
        }
        stubs = {name: budget_service_pb2_grpc.BudgetServiceStub(c) for name, c in channels.items()}
        run_id = common.run_ids(1)[0]
        stubs["runcap"].CreateRun(
            budget_service_pb2.CreateRunRequest(run_id=run_id, limit_micros=MAX_MICROS)
        )

        for line in common.setup_lines("Watch fan-out benchmark", started_at):
            print(line)
        print(
            "servers:     baseline = bare grpc.aio fan-out (this script's bare-server: one "
            "prebuilt message per event, an asyncio.Queue per stream); runcap = runcap serve "
            "on one redis-server (--save '' --appendonly no), heartbeats off; one process each"
        )
        print(
            f"watchers:    {', '.join(f'{n:,}' for n in sizes)} streams of one run per server, "
            f"held by {args.processes} watcher processes (grpc.aio, a few channels each), both "
            "servers watched at once"
        )
        print(
            f"events:      {args.events} per server and size, one Reserve each (the event is "
            f"RESERVED), alternating servers, {args.gap:g} s apart once every watcher had "
            "the last one"
        )
        print(
            "figures:     reach all = send time (just before the Reserve) to the last "
            "watcher's receipt; each = every watcher's receipt; CPU = utime+stime per event "
            "of the server (Reserve included) and of all watcher processes; RSS = the "
            "server's VmRSS growth over opening them / watchers"
        )
        print(flush=True)

        rows: list[str] = []
        for size in sizes:
            print(f"{size:,} watchers (load {common.loadavg()}) ...", flush=True)
            targets = [
                Target("baseline", baseline.target, common.pid(baseline.process), run_id),
                Target("runcap", runcap.target, common.pid(runcap.process), run_id),
            ]
            workers = [common.Worker(__file__, "watchers") for _ in range(args.processes)]
            try:
                fan_out(targets, stubs, workers, size, args.events, args.gap)
            finally:
                for worker in workers:
                    worker.close()
            for target in targets:
                cells = target.row(size, targets[0] if target is not targets[0] else None)
                print("  " + "  ".join(f"{c}: {v}" for c, v in zip(COLUMNS, cells, strict=True)))
                rows.append("| " + " | ".join(cells) + " |")
        print()
        print("Per size, over all its events (p99 x baseline: runcap's reach-all p99 over the")
        print("baseline's, measured in the same run with alternating events):")
        print()
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row in rows:
            print(row)
        print()
        common.finish(started_at)
        print("stopping servers ...", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    quick = common.QUICK
    parser.add_argument(
        "--watchers",
        default="500" if quick else "1000,10000",
        help="comma-separated watcher counts (1000,10000)",
    )
    parser.add_argument("--events", type=int, default=3 if quick else 20, help="per size (20)")
    parser.add_argument("--processes", type=int, default=4, help="watcher processes (4)")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between events (0.2)")
    roles = parser.add_subparsers(dest="role", help="internal: the processes this file starts")
    roles.add_parser("bare-server", help="serve the bare fan-out baseline; print its address")
    roles.add_parser("watchers", help="hold watcher streams (JSON commands on stdin)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.role == "bare-server":
        # The other RPCs keep the generated UNIMPLEMENTED bodies (abstract only in the stubs).
        common.run(common.serve(FanoutServicer()))  # type: ignore[abstract]
    elif args.role == "watchers":
        common.run(serve_watchers())
    else:
        common.main_guard(lambda: orchestrate(args))


if __name__ == "__main__":
    main()
