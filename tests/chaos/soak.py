"""The soak: a bounded mixed workload on a Redis cluster, then a hunt for leaks.

    .venv/bin/python -m tests.chaos.soak [--seconds 600] [--record bench/results/soak.md]

`make soak` runs it for 10 minutes and records the output; CI runs 60 s.
Everything is on loopback and stops by itself: a 3-primary Redis cluster,
two server replicas, and one client process (this one) running

- generations of runs: every GENERATION_S, ROOTS root runs charged to one of
  TEAMS teams, each with a child run; a generation lives two periods, is
  closed, checked with `check` once its last holds expired, and forgotten
  (its keys then age out after RUNCAP_CLOSED_RUN_RETENTION);
- agents reserving on the live runs, committing (sometimes above the hold),
  refunding, abandoning holds to their TTL, and retrying answered calls with
  the same ids (they must replay);
- watchers on two runs of each generation, alternating replicas, checked
  for a complete, ordered stream;
- an operator suspending and resuming a live root run now and then.

Each window it samples the replicas' RSS, Redis's used_memory and key count,
and the latency (p50, p99) of every answered call. At the end it closes
everything, waits for TTL, sweep and retention, and counts what is left:
holds on runs and teams, run keys, due-index entries, listing-index entries.
It prints the drift table and the leak count, and exits 1 on a leak, on a
broken invariant, or when memory more than doubles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from redis.crc import key_slot

from runcap import AsyncRuncapClient
from runcap_server.backends.redis import RedisLedger
from runcap_server.ledger.types import Period, ScopeKind, ScopeRef
from tests.chaos.harness import TENANT, namespace, reader, redis_env
from tests.chaos.invariants import Journal, RunPlan, check, eventually
from tests.chaos.workload import CENT, Clients, Mix, Watcher
from tests.redis_servers import RedisCluster, parse_info, text
from tests.servers import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
GENERATION_S = 10.0
ROOTS = 4
TEAMS = ("acme", "globex", "initech")
# A team scope's keys: limits, window totals, holds, and settled holds by time (to prune).
TEAM_KEYS = (":l", ":w", ":h", ":done")
AGENTS = 8
RETENTION_S = 10
MIX = Mix(commit=0.6, refund=0.25, replay=0.1, ttl_ms=2_000, pause_s=0.01)


@dataclass
class Generation:
    number: int
    runs: list[str]
    watchers: list[Watcher] = field(default_factory=list)


@dataclass
class Window:
    """What one window of the run measured."""

    end_s: float
    calls: int
    p50_ms: float
    p99_ms: float
    rss_mb: list[float]
    redis_mb: float
    keys: int
    # The teams' hold records (each kept an hour after it settles, for retries).
    team_records: int
    # Keys of runs that should have aged out by now (closed and checked more than
    # the retention ago).
    stale_keys: int


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def redis_figures(cluster: RedisCluster) -> tuple[float, int]:
    """used_memory over the primaries in MB, and their keys."""
    used = keys = 0
    for port in cluster.primaries():
        used += int(parse_info(text(port, "INFO", "memory"))["used_memory"])
        keys += int(
            parse_info(text(port, "INFO", "keyspace")).get("db0", "keys=0").split(",")[0][5:]
        )
    return used / 2**20, keys


class Soak:
    """The workload, its samples and its findings."""

    def __init__(self, cluster: RedisCluster, servers: list[ServerProcess], ns: str) -> None:
        self.cluster = cluster
        self.servers = servers
        self.ns = ns
        self.journal = Journal(TENANT)
        self.clients = Clients(self.journal, [s.target for s in servers])
        self.watching = [AsyncRuncapClient(s.target) for s in servers]
        self.live: list[Generation] = []
        self.problems: list[str] = []
        self.team_spend: Counter[str] = Counter()
        self.windows: list[Window] = []
        self.generations = 0
        self.reservations = 0
        self.checked_runs = 0
        self.leftover: Counter[str] = Counter()
        # Generation -> when it was checked (after its close: the last time it changed).
        self.checked_at: dict[int, float] = {}
        self.started = time.monotonic()

    def active_runs(self) -> list[str]:
        return [run for generation in self.live for run in generation.runs]

    async def new_generation(self) -> None:
        number = self.generations
        self.generations += 1
        runs = []
        for n in range(ROOTS):
            root = f"g{number}-r{n}"
            team = TEAMS[(number * ROOTS + n) % len(TEAMS)]
            await self.clients.create_run(RunPlan(root, 200 * 100 * CENT, team_id=team))
            await self.clients.create_run(RunPlan(f"{root}-c", 50 * 100 * CENT, root))
            runs += [root, f"{root}-c"]
        generation = Generation(number, runs)
        for k, run in enumerate((runs[0], runs[1])):
            client = self.watching[(number + k) % len(self.watching)]
            generation.watchers.append(Watcher(client, self.journal, run))
        self.live.append(generation)

    async def retire(self, generation: Generation, ledger: RedisLedger) -> None:
        """Close a generation, let its last holds expire, check it, forget it."""
        self.live.remove(generation)
        for run in generation.runs:
            await self.clients.status("CloseRun", run)

        # Agents may still be settling holds they took before the close; the
        # abandoned ones expire (their parents' copies a grace later).
        async def settled() -> str:
            views = [await ledger.get_run(TENANT, run) for run in generation.runs]
            return ", ".join(v.spec.run_id for v in views if v.state.active_reservations)

        await eventually(settled, 30)
        heads = {
            w.log.run_id: (await ledger.get_run(TENANT, w.log.run_id)).state.revision
            for w in generation.watchers
        }
        await asyncio.gather(*(w.finish(heads[w.log.run_id]) for w in generation.watchers))
        part = self.journal.only(generation.runs)
        report = await check(ledger, part, teams=False)
        self.problems += [f"generation {generation.number}: {p}" for p in report.problems]
        self.team_spend.update(report.team_spend)
        self.reservations += len(part.reservations)
        self.checked_runs += len(generation.runs)
        self.checked_at[generation.number] = time.monotonic()
        self.journal.forget(generation.runs)
        self.journal.problems.clear()

    async def operator(self, stop: asyncio.Event) -> None:
        """Suspends a live root run for half a second now and then."""
        rng = random.Random(7)
        while not stop.is_set():
            await asyncio.sleep(2.0)
            # The newest generation: it is not closed while suspended.
            roots = [r for r in self.live[-1].runs if not r.endswith("-c")]
            run = rng.choice(roots)
            await self.clients.status("SuspendRun", run)
            await asyncio.sleep(0.5)
            await self.clients.status("ResumeRun", run)

    async def dashboard(self, stop: asyncio.Event) -> None:
        """Lists every run of the soak every 2 s, as a dashboard or a report would:
        reading a closed run must not keep it from aging out."""
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
        n = 0
        while not stop.is_set():
            await asyncio.sleep(2.0)
            client = self.watching[n % len(self.watching)]
            n += 1
            token = ""
            while True:
                page = await client.list_runs(since, page_size=1000, page_token=token)
                if not (token := page.next_page_token):
                    break

    def sample(self) -> None:
        now = time.monotonic()
        latencies, self.clients.latencies = self.clients.latencies, []
        used_mb, keys = redis_figures(self.cluster)
        self.windows.append(
            Window(
                end_s=now - self.started,
                calls=len(latencies),
                p50_ms=percentile(latencies, 0.5) * 1000,
                p99_ms=percentile(latencies, 0.99) * 1000,
                rss_mb=[rss_mb(s.process.pid) for s in self.servers if s.process],
                redis_mb=used_mb,
                keys=keys,
                team_records=self.team_records(),
                stale_keys=self.stale_keys(),
            )
        )
        if self.windows[-1].stale_keys:
            self.problems.append(
                f"at {self.windows[-1].end_s:.0f} s: {self.windows[-1].stale_keys} keys of runs "
                f"closed more than {RETENTION_S} s ago"
            )

    def team_records(self) -> int:
        count = 0
        for team in TEAMS:
            key = f"{self.ns}:{{{TENANT}/@team:{team}}}:h"
            port = self.cluster.slot_owner(key_slot(key.encode()))
            with redis.Redis(port=port) as node:
                count += node.hlen(key)
        return count

    def stale_keys(self) -> int:
        """Keys of runs whose generation was checked more than the retention ago."""
        stale = 0
        due = time.monotonic() - RETENTION_S - 3
        for port in self.cluster.primaries():
            with redis.Redis(port=port) as node:
                for raw in node.scan_iter(match=f"{self.ns}:{{{TENANT}/g*", count=1000):
                    generation = int(raw.decode().split("/g", 1)[1].split("-", 1)[0])
                    stale += self.checked_at.get(generation, float("inf")) < due
        return stale

    async def run(self, seconds: float, window_s: float) -> None:
        for team in TEAMS:
            await self.clients.set_team_limit(team, 10**6 * 100 * CENT)
        stop = asyncio.Event()
        async with reader(self.cluster, self.ns, RETENTION_S * 1000) as ledger:
            await self.new_generation()
            agents = [
                asyncio.create_task(
                    self.clients.agent(f"a{i}", self.active_runs, stop, MIX, seed=i)
                )
                for i in range(AGENTS)
            ]
            operator = asyncio.create_task(self.operator(stop))
            dashboard = asyncio.create_task(self.dashboard(stop))
            retiring: list[asyncio.Task[None]] = []
            deadline = self.started + seconds
            next_generation = time.monotonic() + GENERATION_S
            next_sample = time.monotonic() + window_s
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                if time.monotonic() >= next_generation:
                    next_generation += GENERATION_S
                    await self.new_generation()
                    if len(self.live) > 2:
                        retiring.append(asyncio.create_task(self.retire(self.live[0], ledger)))
                if time.monotonic() >= next_sample:
                    next_sample += window_s
                    self.sample()
            stop.set()
            await asyncio.gather(*agents, operator, dashboard)
            for generation in list(self.live):
                retiring.append(asyncio.create_task(self.retire(generation, ledger)))
            await asyncio.gather(*retiring)
            self.sample()
            await self.hunt_leaks(ledger)
        await self.clients.close()
        for client in self.watching:
            await client.close()

    async def hunt_leaks(self, ledger: RedisLedger) -> None:
        """After the retention: no hold, no run key, no stale index entry is left."""
        for team in TEAMS:
            usage = (await ledger.get_scope(TENANT, ScopeRef(ScopeKind.TEAM, team))).period(
                Period.LIFETIME
            )
            if usage.reserved_micros or usage.active_reservations:
                self.problems.append(f"team {team}: {usage.active_reservations} holds left")
            if usage.committed_micros != self.team_spend[team]:
                self.problems.append(
                    f"team {team}: committed {usage.committed_micros}, its runs spent "
                    f"{self.team_spend[team]}"
                )
        await asyncio.sleep(RETENTION_S + 1)
        # ListRuns over the whole soak drops listed runs that aged out.
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        async with AsyncRuncapClient(self.servers[0].target) as client:
            token = ""
            while True:
                page = await client.list_runs(since, page_size=1000, page_token=token)
                if page.runs:
                    self.problems.append(f"{len(page.runs)} closed runs still listed")
                if not (token := page.next_page_token):
                    break
        self.leftover = self.keys_left()
        for kind, count in self.leftover.items():
            if not kind.startswith("kept:"):
                self.problems.append(f"{count} key(s) left: {kind}")

    def keys_left(self) -> Counter[str]:
        """The namespace's keys by kind; "kept:" kinds are expected to stay."""
        found: Counter[str] = Counter()
        prefix = f"{self.ns}:"
        for port in self.cluster.primaries():
            with redis.Redis(port=port) as node:
                for raw in node.scan_iter(match=f"{prefix}*", count=1000):
                    key = raw.decode()[len(prefix) :]
                    if key.startswith(f"{{{TENANT}/@team:") and key.endswith(TEAM_KEYS):
                        size = node.hlen(raw) if key.endswith(":h") else 0
                        found[f"kept: team scope {key.rsplit(':', 1)[1]}"] += 1
                        found["kept: team hold records"] += size
                    elif key == "{@open}:tenants":
                        found["kept: tenants with open-run counts"] += 1
                    elif key.startswith(f"{{{TENANT}/") and "/@" not in key:
                        found["run keys"] += 1
                    elif key.startswith("due:") and not key.endswith("lease"):
                        found["due-index entries"] += node.zcard(raw)
                    elif key.endswith("lease"):
                        continue  # expiring leases (PX)
                    else:
                        found[f"other: {key}"] += 1
        return found

    def report(self, seconds: float, window_s: float) -> str:
        rows = [
            "| t (s) | calls | calls/s | p50 ms | p99 ms | replicas' RSS MB | Redis MB | keys "
            "| stale keys | team records |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        previous = 0.0
        for w in self.windows:
            span = max(w.end_s - previous, 1e-9)
            rss = " / ".join(f"{r:.1f}" for r in w.rss_mb)
            rows.append(
                f"| {w.end_s:.0f} | {w.calls} | {w.calls / span:.0f} | {w.p50_ms:.1f} | "
                f"{w.p99_ms:.1f} | {rss} | {w.redis_mb:.1f} | {w.keys} | {w.stale_keys} | "
                f"{w.team_records} |"
            )
            previous = w.end_s
        measured = self.windows[:-1] or self.windows  # the last one is the drain
        steady = measured[1:] or measured  # the first warms up
        rss_first = sum(steady[0].rss_mb)
        rss_last = sum(steady[-1].rss_mb)
        p99s = [w.p99_ms for w in steady]
        lines = [
            f"soak: {seconds:g} s, windows of {window_s:g} s, {self.generations} generations of "
            f"{ROOTS * 2} runs ({self.checked_runs} runs checked), {self.reservations} "
            f"reservations, {AGENTS} agents, {len(TEAMS)} teams",
            "",
            *rows,
            "",
            "drift (second window to last full window):",
            f"  server RSS (both replicas): {rss_first:.1f} -> {rss_last:.1f} MB "
            f"({rss_last - rss_first:+.1f} MB)",
            f"  Redis used_memory: {steady[0].redis_mb:.1f} -> {steady[-1].redis_mb:.1f} MB; "
            f"keys {steady[0].keys} -> {steady[-1].keys}; the teams' hold records "
            f"{steady[0].team_records} -> {steady[-1].team_records} (one per reservation, "
            "each pruned an hour after it settles: longer than a soak)",
            f"  p99: {steady[0].p99_ms:.1f} -> {steady[-1].p99_ms:.1f} ms (median of windows "
            f"{statistics.median(p99s):.1f} ms)",
            "",
            "left at the end (after closing every run, TTL, sweep and retention):",
        ]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.leftover.items())]
        if not self.leftover:
            lines.append("  nothing")
        if rss_last > 2 * rss_first:
            self.problems.append(f"server RSS more than doubled: {rss_first:.0f} -> {rss_last:.0f}")
        errors = dict(sorted(self.journal.errors.items()))
        lines += ["", f"errors answered (retried): {errors or 'none'}"]
        lines += ["", f"problems: {len(self.problems)}", *(f"  {p}" for p in self.problems[:50])]
        return "\n".join(lines)


def setup_text(seconds: float) -> str:
    def version(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    # "Redis server v=7.0.15 sha=... malloc=..." -> "7.0.15"
    server_fields = version(["redis-server", "--version"]).split()
    redis_server_version = next((f[2:] for f in server_fields if f.startswith("v=")), "?")
    tracked = ["server", "clients/python", "tests/chaos"]
    changed = bool(version(["git", "-C", str(ROOT), "status", "--porcelain", "--", *tracked]))
    return "\n".join(
        [
            f"date:     {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC",
            f"machine:  {platform.platform()}, {os.cpu_count()} cores, load {load}",
            f"versions: python {platform.python_version()}, grpcio {grpc.__version__}, "
            f"redis-py {redis.__version__}, redis-server {redis_server_version}",
            f"runcap:   {version(['git', '-C', str(ROOT), 'log', '-1', '--format=%h %ci'])}"
            + (" + uncommitted changes" if changed else ""),
            f"setup:    3-primary Redis cluster (no replicas, no persistence), 2 server "
            f"replicas, this process as client; {seconds:g} s",
        ]
    )


async def main(seconds: float, record: Path | None) -> int:
    window_s = max(10.0, seconds / 10)
    ns = namespace()
    with RedisCluster(primaries=3) as cluster:
        env = redis_env(cluster, ns, RUNCAP_CLOSED_RUN_RETENTION=f"{RETENTION_S}s")
        servers = [ServerProcess(None, env=env) for _ in range(2)]
        try:
            for server in servers:
                server.start()
            soak = Soak(cluster, servers, ns)
            await soak.run(seconds, window_s)
        finally:
            for server in servers:
                server.stop()
    output = f"{setup_text(seconds)}\n\n{soak.report(seconds, window_s)}"
    print(output)
    if record is not None:
        command = "make soak" if seconds == 600 else f"make soak SOAK_SECONDS={seconds:g}"
        text = (
            "# Soak: a bounded mixed workload on the Redis cluster\n\n"
            f"The last run of `{command}` (`tests/chaos/soak.py`; its module doc says "
            "what it runs and checks).\n\n```\n" + output + "\n```\n"
        )
        await asyncio.to_thread(record.write_text, text)
    return 1 if soak.problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--record", type=Path, help="also write the output to this file")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(args.seconds, args.record)))
    sys.exit(130)
