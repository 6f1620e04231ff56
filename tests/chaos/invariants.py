"""What the clients saw, and the one checker every fault ends with.

Clients write down what the service answered them in a `Journal`: each
Reserve decision, each acknowledged Commit and Refund, every error code, and
every message each Watch stream delivered. `check` then reads the ledger as
stored (the backend itself, in a namespace the test owns) and holds it to
what the clients saw:

- every run's change log is contiguous from revision 1, and replaying it
  gives the state recorded at every revision; the hard gate holds at every
  revision (`committed + reserved <= limit + overrun`);
- every reservation is decided at most once and settled at most once:
  one RESERVED, at most one release (commit, refund or expiry) and at most one
  recorded cost, in the log and in its record; a decision a client saw is the
  record's decision; an acknowledged Commit is recorded with its amount, an
  acknowledged Refund with its status; nothing a client was answered is lost;
- once settled (`settled=True`, after TTL + sweep): no hold is left on any
  run or scope, and every parent carries exactly its descendants' spend (an
  ancestor run a record per hold id, a team scope the sum, with its own
  ceiling never passed);
- each Watch stream delivered every revision in order, each with the state
  of that revision in the log (the same digest), unless it restarted from an
  explicit snapshot (after OUT_OF_RANGE), and it reached the head.

Problems are collected, not raised one by one, so a failure lists them all.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runcap_server.backends.redis import RedisLedger
from runcap_server.backends.sqlite import SqliteLedger
from runcap_server.ledger.types import (
    SETTLED_BY_COMMIT,
    Change,
    Decision,
    DecisionReason,
    EventType,
    Period,
    Reservation,
    ReservationStatus,
    ScopeKind,
    ScopeRef,
)

if TYPE_CHECKING:
    from runcap.v1 import budget_service_pb2 as pb

Ledger = RedisLedger | SqliteLedger
# Decisions that hold money (an advisory run's warning holds too).
HOLDING = frozenset({Decision.ALLOW, Decision.WARN, Decision.DOWNGRADE})
RELEASES = frozenset({EventType.REFUNDED, EventType.EXPIRED})
UNSETTLED = frozenset({ReservationStatus.HELD})


@dataclass(frozen=True)
class RunPlan:
    """A run the workload created: its limit and its parents."""

    run_id: str
    limit_micros: int
    parent_run_id: str = ""
    team_id: str = ""


@dataclass
class Seen:
    """What clients were told about one reservation (None: never answered)."""

    run_id: str
    reservation_id: str
    amount_micros: int
    ttl_ms: int
    # When the first attempt was sent (monotonic).
    sent_at: float = 0.0
    decision: Decision | None = None
    decided_at: float = 0.0
    committed_micros: int | None = None
    settled_status: ReservationStatus | None = None
    settled_at: float = 0.0


@dataclass
class WatchLog:
    """The messages one Watch stream delivered: (kind, revision, digest)."""

    run_id: str
    messages: list[tuple[str, int, str]] = field(default_factory=list)

    def record(self, message: pb.WatchResponse) -> None:
        if message.HasField("snapshot"):
            self.messages.append(("snapshot", message.revision, message.snapshot.digest))
        elif message.HasField("event"):
            self.messages.append(("event", message.revision, message.event.state.digest))

    @property
    def last_revision(self) -> int:
        return self.messages[-1][1] if self.messages else 0

    @property
    def restarts(self) -> int:
        """Snapshots after the first message: explicit restarts."""
        return sum(kind == "snapshot" for kind, _, _ in self.messages[1:])


@dataclass
class Journal:
    """Everything the clients of one workload saw."""

    tenant: str
    runs: dict[str, RunPlan] = field(default_factory=dict)
    reservations: dict[tuple[str, str], Seen] = field(default_factory=dict)
    watches: list[WatchLog] = field(default_factory=list)
    # gRPC status code names of failed calls, by operation ("Reserve:UNAVAILABLE").
    errors: Counter[str] = field(default_factory=Counter)
    # What a client saw that was wrong on its face (a status no fault may cause).
    problems: list[str] = field(default_factory=list)
    # Answers that contradict an earlier one (a replay that changed its answer):
    # (run id, when the earlier answer came, what). A lossy failover may excuse them.
    anomalies: list[tuple[str, float, str]] = field(default_factory=list)

    def add_run(self, plan: RunPlan) -> None:
        self.runs[plan.run_id] = plan

    def only(self, run_ids: Collection[str]) -> Journal:
        """The part of this journal about `run_ids` (with all the problems seen)."""
        part = Journal(self.tenant, problems=list(self.problems))
        part.runs = {r: self.runs[r] for r in run_ids}
        part.anomalies = [a for a in self.anomalies if a[0] in part.runs]
        part.reservations = {k: s for k, s in self.reservations.items() if k[0] in part.runs}
        part.watches = [w for w in self.watches if w.run_id in part.runs]
        return part

    def forget(self, run_ids: Collection[str]) -> None:
        """Drop what was seen of `run_ids` (checked, and about to age out)."""
        for run_id in run_ids:
            del self.runs[run_id]
        self.reservations = {k: s for k, s in self.reservations.items() if k[0] in self.runs}
        self.watches = [w for w in self.watches if w.run_id in self.runs]
        self.anomalies = [a for a in self.anomalies if a[0] in self.runs]

    def teams(self) -> dict[str, list[str]]:
        """Team id -> every run charged to it (children inherit their root's team)."""
        teams: dict[str, list[str]] = {}
        for run_id in self.runs:
            root = self.runs[run_id]
            while root.parent_run_id:
                root = self.runs[root.parent_run_id]
            if root.team_id:
                teams.setdefault(root.team_id, []).append(run_id)
        return teams

    def ancestors(self, run_id: str) -> list[str]:
        found: list[str] = []
        parent = self.runs[run_id].parent_run_id
        while parent:
            found.append(parent)
            parent = self.runs[parent].parent_run_id
        return found

    def seen(self, run_id: str, reservation_id: str, amount_micros: int, ttl_ms: int) -> Seen:
        key = (run_id, reservation_id)
        if key not in self.reservations:
            self.reservations[key] = Seen(
                run_id, reservation_id, amount_micros, ttl_ms, time.monotonic()
            )
        return self.reservations[key]

    def decided(self, seen: Seen, reply: pb.ReserveResponse) -> None:
        decision = Decision(reply.decision)
        # Only a hold that expired before the retry reached the run may block it
        # so: a failed attempt must leave nothing that changes its retry's answer.
        early = time.monotonic() - seen.sent_at < seen.ttl_ms / 1000
        if DecisionReason(reply.reason) is DecisionReason.RESERVATION_EXPIRED and early:
            self._anomaly(
                seen,
                seen.sent_at,
                f"blocked as RESERVATION_EXPIRED {time.monotonic() - seen.sent_at:.1f} s "
                f"after it was first sent (TTL {seen.ttl_ms / 1000:g} s)",
            )
        if seen.decision is None:
            seen.decision, seen.decided_at = decision, time.monotonic()
        elif decision is not seen.decision:
            self._anomaly(
                seen,
                seen.decided_at,
                f"a retry answered {decision.name}, the first answer was {seen.decision.name}",
            )
        elif not reply.replayed:
            self._anomaly(seen, seen.decided_at, "a retry was not a replay")

    def committed(self, seen: Seen, reply: pb.CommitResponse, actual_micros: int) -> None:
        if reply.actual_micros != actual_micros:
            self.problems.append(
                f"{seen.run_id}/{seen.reservation_id}: Commit of {actual_micros} answered "
                f"{reply.actual_micros}"
            )
        seen.committed_micros = actual_micros
        self._settled(seen, ReservationStatus(reply.reservation_status))

    def refunded(self, seen: Seen, reply: pb.RefundResponse) -> None:
        self._settled(seen, ReservationStatus(reply.reservation_status))

    def _settled(self, seen: Seen, status: ReservationStatus) -> None:
        if seen.settled_status is not None and seen.settled_status is not status:
            self._anomaly(
                seen, seen.settled_at, f"settled as {status.name} after {seen.settled_status.name}"
            )
        seen.settled_status, seen.settled_at = status, time.monotonic()

    def _anomaly(self, seen: Seen, at: float, what: str) -> None:
        self.anomalies.append((seen.run_id, at, f"{seen.run_id}/{seen.reservation_id}: {what}"))


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    # Acknowledged operations the ledger does not know (a lossy failover).
    lost: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    # What the journal's runs spent, by team (their own reservations' costs).
    team_spend: Counter[str] = field(default_factory=Counter)

    def text(self) -> str:
        lines = [f"{len(self.problems)} problem(s):", *self.problems[:60]]
        if len(self.problems) > 60:
            lines.append(f"... and {len(self.problems) - 60} more")
        if self.lost:
            lines.append(f"{len(self.lost)} acknowledged operation(s) lost: {self.lost[:20]}")
        lines.append(f"counts: {dict(sorted(self.counts.items()))}")
        return "\n".join(lines)


async def check(
    ledger: Ledger,
    journal: Journal,
    *,
    settled: bool = True,
    lossy_between: tuple[float, float] | None = None,
    teams: bool = True,
) -> Report:
    """Check the ledger against what the journal's clients saw (see the module doc).

    With `teams=False` the teams' totals are not compared (the journal holds
    only some of their runs); `Report.team_spend` has what these runs spent.

    `lossy_between` is a window of monotonic time (a Redis failover): an
    operation acknowledged inside it may be missing from the ledger (Redis
    replication is asynchronous, docs/guarantees.md section 10); it is
    reported in `lost`, and the parents' sums are then not compared.
    """
    report = Report(problems=list(journal.problems))
    for _, at, what in journal.anomalies:
        (report.lost if _within(lossy_between, at) else report.problems).append(what)
    tenant = journal.tenant
    records: dict[str, dict[str, Reservation]] = {}
    logs: dict[str, list[Change]] = {}
    for run_id, plan in journal.runs.items():
        view = await ledger.get_run(tenant, run_id)
        state = view.state
        _, stored = await ledger.snapshot(tenant, run_id)
        records[run_id] = {r.reservation_id: r for r in stored}
        logs[run_id] = (await ledger.read_changes(tenant, run_id, 0, 1_000_000)).changes
        _check_log(report, run_id, logs[run_id], state.revision)
        _check_records(report, run_id, records[run_id], logs[run_id])
        if logs[run_id] and logs[run_id][-1].state != state:
            report.problems.append(f"{run_id}: the log's last state is not the run's state")
        if settled and (state.reserved_micros or state.active_reservations):
            report.problems.append(
                f"{run_id}: {state.active_reservations} hold(s) of {state.reserved_micros} "
                "micros left after TTL and sweep"
            )
        children = [p.run_id for p in journal.runs.values() if p.parent_run_id == run_id]
        if view.children != len(children):
            report.problems.append(
                f"{run_id}: counts {view.children} children, {len(children)} exist"
            )
        if plan.limit_micros != state.limit_micros:
            report.problems.append(
                f"{run_id}: limit {state.limit_micros}, created with {plan.limit_micros}"
            )
        report.counts["runs"] += 1
        report.counts["revisions"] += state.revision
    _check_seen(report, journal, records, lossy_between)
    if settled and not report.lost:
        _check_ancestors(report, journal, records)
    for team, runs in journal.teams().items():
        report.team_spend[team] = sum(
            r.actual_micros or 0
            for run_id in runs
            for r in _own(records[run_id]).values()
            if r.status in SETTLED_BY_COMMIT
        )
    if teams:
        await _check_teams(report, ledger, journal, settled=settled, compare=not report.lost)
    for watch in journal.watches:
        changes = logs[watch.run_id]
        digests = {c.revision: c.state.digest for c in changes}
        _check_watch(report, watch, digests, changes[-1].revision if changes else 0)
    for name, count in journal.errors.items():
        report.counts[f"error {name}"] += count
    return report


def _within(window: tuple[float, float] | None, at: float) -> bool:
    return window is not None and window[0] <= at <= window[1]


def _check_log(report: Report, run_id: str, changes: list[Change], head: int) -> None:
    """Contiguous from 1; replaying it gives every recorded state; the hard gate holds."""
    revisions = [c.revision for c in changes]
    if revisions != list(range(1, head + 1)):
        report.problems.append(f"{run_id}: log revisions are not 1..{head}: {revisions[:5]}...")
        return
    held: dict[str, int] = {}
    committed = overrun = 0
    reserved_once: set[str] = set()
    released_once: set[str] = set()
    money_once: set[str] = set()
    for change in changes:
        rid, kind = change.reservation_id, change.type
        where = f"{run_id}@{change.revision} {kind.name} {rid}"
        if kind is EventType.RESERVED:
            if rid in reserved_once:
                report.problems.append(f"{where}: reserved twice")
            reserved_once.add(rid)
            held[rid] = change.amount_micros
        elif kind in RELEASES or (kind is EventType.COMMITTED and not change.late):
            if rid in released_once or rid not in held:
                report.problems.append(f"{where}: releases a hold that is not held")
            released_once.add(rid)
            if held.pop(rid, None) != change.amount_micros:
                report.problems.append(f"{where}: releases another amount than was held")
        if kind is EventType.COMMITTED:
            if rid in money_once:
                report.problems.append(f"{where}: its cost is recorded twice")
            money_once.add(rid)
            committed += change.actual_micros
            overrun += change.overrun_micros
        state = change.state
        replayed = (committed, sum(held.values()), overrun, len(held))
        recorded = (
            state.committed_micros,
            state.reserved_micros,
            state.overrun_micros,
            state.active_reservations,
        )
        if kind is not EventType.CREATED and replayed != recorded:
            report.problems.append(
                f"{where}: (committed, reserved, overrun, holds) replayed {replayed}, "
                f"recorded {recorded}"
            )
        if state.committed_micros + state.reserved_micros > (
            state.limit_micros + state.overrun_micros
        ):
            report.problems.append(f"{where}: past its ceiling: {state}")
    report.counts["holds"] += len(reserved_once)


def _check_records(
    report: Report, run_id: str, records: Mapping[str, Reservation], changes: list[Change]
) -> None:
    """Each record agrees with the log: one release and one cost at most, as recorded."""
    events: dict[str, list[Change]] = {}
    for change in changes:
        if change.reservation_id and change.type in (
            EventType.RESERVED,
            EventType.COMMITTED,
            *RELEASES,
        ):
            events.setdefault(change.reservation_id, []).append(change)
    for rid, record in records.items():
        kinds = [c.type for c in events.get(rid, [])]
        where = f"{run_id}/{rid} ({record.status.name})"
        expected: list[list[EventType]]
        if record.status is ReservationStatus.BLOCKED:
            expected = [[]]
        elif record.status is ReservationStatus.HELD:
            expected = [[EventType.RESERVED]]
        elif record.status is ReservationStatus.COMMITTED:
            expected = [[EventType.RESERVED, EventType.COMMITTED]]
        elif record.status is ReservationStatus.RELEASED:
            expected = [[EventType.RESERVED, EventType.REFUNDED]]
        elif record.status is ReservationStatus.EXPIRED:
            # A parent's record of a child's hold that never reached it is born expired.
            expected = [[EventType.RESERVED, EventType.EXPIRED], []]
        else:  # LATE_COMMITTED
            expected = [
                [EventType.RESERVED, EventType.EXPIRED, EventType.COMMITTED],
                [EventType.COMMITTED],
            ]
        if kinds not in expected:
            report.problems.append(f"{where}: log events {[k.name for k in kinds]}")
        commits = [c for c in events.get(rid, []) if c.type is EventType.COMMITTED]
        if commits and commits[0].actual_micros != record.actual_micros:
            report.problems.append(
                f"{where}: logged cost {commits[0].actual_micros}, recorded {record.actual_micros}"
            )
    for rid in events.keys() - records.keys():
        report.problems.append(f"{run_id}/{rid}: in the log, but no record")


def _check_seen(
    report: Report,
    journal: Journal,
    records: Mapping[str, Mapping[str, Reservation]],
    lossy_between: tuple[float, float] | None,
) -> None:
    """What clients were told is what is recorded; nothing they were told is lost."""

    def lossy(at: float) -> bool:
        return _within(lossy_between, at)

    for (run_id, rid), seen in journal.reservations.items():
        record = records[run_id].get(rid)
        where = f"{run_id}/{rid}"
        report.counts[f"seen {seen.decision.name if seen.decision else 'no answer'}"] += 1
        if seen.decision is None:
            continue
        if record is None:
            if lossy(seen.decided_at):
                report.lost.append(where)
            else:
                report.problems.append(f"{where}: {seen.decision.name} was answered, no record")
            continue
        blocked = record.status is ReservationStatus.BLOCKED
        if blocked == (seen.decision in HOLDING):
            if lossy(seen.decided_at):
                report.lost.append(where)
                continue
            report.problems.append(
                f"{where}: answered {seen.decision.name}, recorded {record.status.name}"
            )
        if seen.settled_status is None:
            continue
        if record.status is not seen.settled_status:
            if lossy(seen.settled_at):
                report.lost.append(f"{where} settlement")
                continue
            report.problems.append(
                f"{where}: settled as {seen.settled_status.name}, recorded {record.status.name}"
            )
        if seen.committed_micros is not None and record.actual_micros != seen.committed_micros:
            report.problems.append(
                f"{where}: committed {seen.committed_micros}, recorded {record.actual_micros}"
            )


def _own(records: Mapping[str, Reservation]) -> dict[str, Reservation]:
    """A run's own reservations (not its descendants' holds, "child/rid")."""
    return {rid: r for rid, r in records.items() if "/" not in rid}


def _check_ancestors(
    report: Report, journal: Journal, records: Mapping[str, Mapping[str, Reservation]]
) -> None:
    """Every ancestor run holds a record of each descendant's hold, settled alike."""
    for run_id in journal.runs:
        for ancestor in journal.ancestors(run_id):
            copies = records[ancestor]
            for rid, own in _own(records[run_id]).items():
                copy = copies.get(f"{run_id}/{rid}")
                where = f"{ancestor} for {run_id}/{rid} ({own.status.name})"
                if own.status in SETTLED_BY_COMMIT:
                    if copy is None or copy.status not in SETTLED_BY_COMMIT:
                        report.problems.append(f"{where}: the cost is not recorded")
                    elif copy.actual_micros != own.actual_micros:
                        report.problems.append(f"{where}: records {copy.actual_micros}")
                elif copy is not None and copy.status in SETTLED_BY_COMMIT | UNSETTLED:
                    report.problems.append(f"{where}: {copy.status.name} on the ancestor")
            for hold in copies:
                child, _, rid = hold.partition("/")
                if child == run_id and rid not in records[run_id]:
                    report.problems.append(f"{ancestor}: holds {hold}, which {run_id} never had")


async def _check_teams(
    report: Report, ledger: Ledger, journal: Journal, *, settled: bool, compare: bool
) -> None:
    """A team's lifetime totals are its runs' own, and it never passes its ceiling."""
    for team in journal.teams():
        usage = (await ledger.get_scope(journal.tenant, ScopeRef(ScopeKind.TEAM, team))).period(
            Period.LIFETIME
        )
        where = f"team {team}"
        if usage.limit_micros is not None and (
            usage.committed_micros + usage.reserved_micros
            > usage.limit_micros + usage.overrun_micros
        ):
            report.problems.append(f"{where}: past its ceiling: {usage}")
        if not settled:
            continue
        if usage.reserved_micros or usage.active_reservations:
            report.problems.append(
                f"{where}: {usage.active_reservations} hold(s) of {usage.reserved_micros} "
                "micros left after TTL and sweep"
            )
        spent = report.team_spend[team]
        if compare and usage.committed_micros != spent:
            report.problems.append(
                f"{where}: committed {usage.committed_micros}, its runs spent {spent}"
            )
        report.counts["team committed"] += usage.committed_micros


def _check_watch(report: Report, watch: WatchLog, digests: Mapping[int, str], head: int) -> None:
    where = f"watch of {watch.run_id}"
    if not watch.messages:
        report.problems.append(f"{where}: delivered nothing")
        return
    for (_, before, _), (kind, revision, _) in itertools.pairwise(watch.messages):
        if kind == "event" and revision != before + 1:
            report.problems.append(f"{where}: revision {revision} after {before}: a silent gap")
            return
    for kind, revision, digest in watch.messages:
        if revision in digests and digests[revision] != digest:
            report.problems.append(f"{where}: {kind} {revision} is not the log's revision")
            return
    if watch.last_revision != head:
        report.problems.append(f"{where}: stopped at {watch.last_revision}, head {head}")
    report.counts["watch messages"] += len(watch.messages)
    report.counts["watch restarts"] += watch.restarts


async def eventually(
    condition: Callable[[], Awaitable[str]], timeout_s: float, interval_s: float = 0.2
) -> None:
    """Wait until `condition` answers "" (nothing wrong); else fail with its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        wrong = await condition()
        if not wrong:
            return
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {wrong}"
        await asyncio.sleep(interval_s)


async def holds_left(ledger: Ledger, journal: Journal) -> str:
    """ "" once no run and no team of the journal holds anything; else what is left."""
    left: list[str] = []
    for run_id in journal.runs:
        state = (await ledger.get_run(journal.tenant, run_id)).state
        if state.reserved_micros or state.active_reservations:
            left.append(f"{run_id}: {state.active_reservations} holds")
    for team in journal.teams():
        scope = await ledger.get_scope(journal.tenant, ScopeRef(ScopeKind.TEAM, team))
        usage = scope.period(Period.LIFETIME)
        if usage.reserved_micros or usage.active_reservations:
            left.append(f"team {team}: {usage.active_reservations} holds")
    return "; ".join(left)
