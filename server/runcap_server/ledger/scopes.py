"""Parent-scope ledgers (API keys, users, teams): ceilings per period, holds by id.

A scope ledger is like a run's, with two differences: it keeps totals per
window (lifetime, the UTC day, the UTC month), and its holds are placed by the
reserve saga (`ledger/saga.py`) on behalf of a run's reservation, named by
`types.hold_id`. A hold counts in the windows current when it was made, also
when it settles later. Every operation is idempotent by hold id, so the saga
can repeat any step.

The same check-then-write discipline as `core`: nothing is written until the
operation cannot fail. The Redis script (`redis_scripts/scope.lua`) implements
the same semantics; the conformance tests hold both to the same answers.
"""

from __future__ import annotations

import calendar
import dataclasses
from dataclasses import dataclass
from typing import Protocol

from runcap_server.ledger.types import (
    DecisionReason,
    Period,
    ReservationStatus,
    RunPolicy,
    ScopeRef,
    decode_given_policy,
    encode_given_policy,
)

DAY_MS = 86_400_000
# A settled hold's record answers only retries and re-driven settlements, which
# come within seconds (SETTLE_WAIT_MS): it is forgotten an hour after, at most
# PRUNE_BATCH per operation on the scope. A commit re-driven later (every replica
# down for an hour between a commit's two steps) would count again.
SETTLED_HOLD_RETENTION_MS = 3_600_000
PRUNE_BATCH = 10
# Checked (and reported when blocking) in this order: the tightest window first.
CHECK_ORDER = (Period.DAILY, Period.MONTHLY, Period.LIFETIME)


def window_key(period: Period, now_ms: int) -> str:
    """The window of `period` that contains now: "l", "d:<epoch day>", "m:<epoch month>"."""
    if period is Period.LIFETIME:
        return "l"
    day = now_ms // DAY_MS
    if period is Period.DAILY:
        return f"d:{day}"
    year, month, _ = _civil(day)
    return f"m:{year * 12 + month - 1}"


def window_bounds(key: str) -> tuple[int | None, int | None]:
    """Start and end (exclusive) of a window in ms; (None, None) for lifetime."""
    kind, _, n = key.partition(":")
    if kind == "d":
        return int(n) * DAY_MS, (int(n) + 1) * DAY_MS
    if kind == "m":
        year, month0 = divmod(int(n), 12)
        start = calendar.timegm((year, month0 + 1, 1, 0, 0, 0)) * 1000
        next_year, next_month0 = divmod(int(n) + 1, 12)
        end = calendar.timegm((next_year, next_month0 + 1, 1, 0, 0, 0)) * 1000
        return start, end
    return None, None


def _civil(day: int) -> tuple[int, int, int]:
    """(year, month, day) of a day counted from 1970-01-01 (Hinnant's algorithm).

    The Redis script has no date library, so it computes exactly this.
    """
    z = day + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if m <= 2 else 0), m, d


def current_windows(now_ms: int) -> tuple[str, str, str]:
    """The lifetime, day and month windows a hold made now counts in."""
    return tuple(window_key(p, now_ms) for p in Period)  # type: ignore[return-value]


@dataclass(slots=True)
class WindowTotals:
    committed_micros: int = 0
    reserved_micros: int = 0
    overrun_micros: int = 0
    active_reservations: int = 0


@dataclass(slots=True)
class ScopeHold:
    """One run reservation's hold on a scope, from its decision to its settlement."""

    hold_id: str
    amount_micros: int
    status: ReservationStatus
    created_ms: int
    # The windows it counts in: lifetime, day, month (as made).
    windows: tuple[str, ...]
    expires_ms: int | None = None
    actual_micros: int | None = None
    overrun_micros: int = 0
    settled_ms: int | None = None
    # For a block: the period whose ceiling blocked.
    blocking_period: Period | None = None

    @property
    def held_micros(self) -> int:
        return self.amount_micros if self.status is not ReservationStatus.BLOCKED else 0

    def copy(self) -> ScopeHold:
        return dataclasses.replace(self)


@dataclass(frozen=True, slots=True)
class ScopeUsage:
    period: Period
    limit_micros: int | None
    window_start_ms: int | None
    window_end_ms: int | None
    committed_micros: int
    reserved_micros: int
    overrun_micros: int
    active_reservations: int

    @property
    def remaining_micros(self) -> int:
        if self.limit_micros is None:
            return 0
        return max(0, self.limit_micros - self.committed_micros - self.reserved_micros)


@dataclass(frozen=True, slots=True)
class ScopeView:
    ref: ScopeRef
    usage: tuple[ScopeUsage, ...]
    # The policy root runs charged to the scope get by default.
    policy: RunPolicy | None = None

    def period(self, period: Period) -> ScopeUsage:
        return self.usage[int(period) - 1]


@dataclass(frozen=True, slots=True)
class ParentOutcome:
    """What one parent scope answered to the saga's hold."""

    # None for a block that is no scope's doing (an unknown price).
    scope: ScopeRef | None
    status: ReservationStatus
    replayed: bool
    reason: DecisionReason = DecisionReason.WITHIN_BUDGET
    period: Period | None = None

    @property
    def freshly_held(self) -> bool:
        return self.status is ReservationStatus.HELD and not self.replayed


class ScopeStore(Protocol):
    """One scope's rows inside one storage transaction."""

    def load_limits(self) -> dict[Period, int]: ...

    def save_limit(self, period: Period, limit_micros: int | None) -> None: ...

    def load_policy(self) -> str:
        """The scope's default run policy (types.encode_given_policy); "" when none."""
        ...

    def save_policy(self, text: str) -> None: ...

    def load_window(self, key: str) -> WindowTotals: ...

    def save_window(self, key: str, totals: WindowTotals) -> None: ...

    def load_hold(self, hold_id: str) -> ScopeHold | None: ...

    def due_holds(self, now_ms: int) -> list[ScopeHold]:
        """Held holds with expires_ms <= now_ms, by (expires_ms, id)."""
        ...

    def save_hold(self, hold: ScopeHold) -> None: ...

    def prune_settled(self, before_ms: int, limit: int) -> None:
        """Forget up to `limit` settled holds (any status but HELD) settled before
        `before_ms`, the oldest first."""
        ...


class _ScopeTxn:
    """One operation's reads and writes; the store sees nothing until apply."""

    def __init__(self, store: ScopeStore, now_ms: int) -> None:
        self.store = store
        self.now_ms = now_ms
        self.windows: dict[str, WindowTotals] = {}
        self.holds: dict[str, ScopeHold] = {}
        for due in store.due_holds(now_ms):
            self._expire(due.copy())

    def window(self, key: str) -> WindowTotals:
        if key not in self.windows:
            self.windows[key] = self.store.load_window(key)
        return self.windows[key]

    def find(self, hold_id: str) -> ScopeHold | None:
        """The hold as it stands in this operation (expired if it was due)."""
        if hold_id in self.holds:
            return self.holds[hold_id]
        found = self.store.load_hold(hold_id)
        if found is None:
            return None
        found = found.copy()
        if (
            found.status is ReservationStatus.HELD
            and found.expires_ms is not None
            and found.expires_ms <= self.now_ms
        ):
            self._expire(found)
        return found

    def release(self, hold: ScopeHold, status: ReservationStatus) -> None:
        """Take a held hold out of its windows' reserved totals."""
        for key in hold.windows:
            totals = self.window(key)
            totals.reserved_micros -= hold.amount_micros
            totals.active_reservations -= 1
        hold.status = status
        hold.settled_ms = self.now_ms
        self.holds[hold.hold_id] = hold

    def _expire(self, hold: ScopeHold) -> None:
        self.release(hold, ReservationStatus.EXPIRED)

    def apply(self) -> None:
        for key, totals in self.windows.items():
            self.store.save_window(key, totals)
        for hold in self.holds.values():
            self.store.save_hold(hold)
        self.store.prune_settled(self.now_ms - SETTLED_HOLD_RETENTION_MS, PRUNE_BATCH)


def hold(
    store: ScopeStore,
    ref: ScopeRef,
    hold_id: str,
    amount_micros: int,
    ttl_ms: int,
    now_ms: int,
) -> ParentOutcome:
    """Hold `amount` on the scope if every ceiling has room; remember a block."""
    txn = _ScopeTxn(store, now_ms)
    previous = txn.find(hold_id)
    if previous is not None:
        txn.apply()
        return _outcome(ref, previous, replayed=True)
    windows = current_windows(now_ms)
    limits = store.load_limits()
    blocking: Period | None = None
    for period in CHECK_ORDER:
        limit = limits.get(period)
        totals = txn.window(windows[int(period) - 1])
        if limit is not None and (
            totals.committed_micros + totals.reserved_micros + amount_micros > limit
        ):
            blocking = period
            break
    new = ScopeHold(
        hold_id=hold_id,
        amount_micros=amount_micros,
        status=ReservationStatus.BLOCKED,
        created_ms=now_ms,
        windows=windows,
        settled_ms=now_ms,  # a block is settled as it is made
        blocking_period=blocking,
    )
    if blocking is None:
        new.status = ReservationStatus.HELD
        new.settled_ms = None
        new.expires_ms = now_ms + ttl_ms
        for key in windows:
            totals = txn.window(key)
            totals.reserved_micros += amount_micros
            totals.active_reservations += 1
    txn.holds[hold_id] = new
    txn.apply()
    return _outcome(ref, new, replayed=False)


def _outcome(ref: ScopeRef, found: ScopeHold, *, replayed: bool) -> ParentOutcome:
    blocked = found.status is ReservationStatus.BLOCKED
    return ParentOutcome(
        scope=ref,
        status=found.status,
        replayed=replayed,
        reason=DecisionReason.INSUFFICIENT_BUDGET if blocked else DecisionReason.WITHIN_BUDGET,
        period=found.blocking_period,
    )


def settle(
    store: ScopeStore, hold_id: str, actual_micros: int | None, now_ms: int
) -> ReservationStatus:
    """Commit `actual` (or release, when None) the hold; idempotent by hold id.

    The run's record is the truth: a commit always records the money, as a
    late commit when the hold had expired, is unknown here, or was blocked
    here (an advisory run holds what its parents block). A release after any
    settlement changes nothing.
    """
    txn = _ScopeTxn(store, now_ms)
    found = txn.find(hold_id)
    if actual_micros is None:
        if found is not None and found.status is ReservationStatus.HELD:
            txn.release(found, ReservationStatus.RELEASED)
        txn.apply()
        return found.status if found is not None else ReservationStatus.RELEASED
    if found is None:
        # Never held here (or forgotten): the money was spent all the same.
        found = ScopeHold(
            hold_id=hold_id,
            amount_micros=0,
            status=ReservationStatus.EXPIRED,
            created_ms=now_ms,
            windows=current_windows(now_ms),
        )
    if found.status is ReservationStatus.BLOCKED:
        # The scope blocked it, yet the run held it (an advisory run's warning).
        found.status = ReservationStatus.EXPIRED
    if found.status in (ReservationStatus.HELD, ReservationStatus.EXPIRED):
        late = found.status is ReservationStatus.EXPIRED
        if not late:
            txn.release(found, ReservationStatus.COMMITTED)
        overrun = actual_micros if late else max(0, actual_micros - found.amount_micros)
        for key in found.windows:
            totals = txn.window(key)
            totals.committed_micros += actual_micros
            totals.overrun_micros += overrun
        found.status = ReservationStatus.LATE_COMMITTED if late else ReservationStatus.COMMITTED
        found.actual_micros = actual_micros
        found.overrun_micros = overrun
        found.settled_ms = now_ms
        txn.holds[hold_id] = found
    txn.apply()
    return found.status


def expire_due(store: ScopeStore, now_ms: int) -> int:
    """Release the scope's due holds. Returns how many were released."""
    txn = _ScopeTxn(store, now_ms)
    txn.apply()
    return len(txn.holds)


def view(store: ScopeStore, ref: ScopeRef, now_ms: int) -> ScopeView:
    """The scope's ceilings and current windows, with due holds expired first."""
    txn = _ScopeTxn(store, now_ms)
    txn.apply()
    limits = store.load_limits()
    usage = []
    for period in Period:
        key = window_key(period, now_ms)
        totals = txn.window(key)
        start, end = window_bounds(key)
        usage.append(
            ScopeUsage(
                period=period,
                limit_micros=limits.get(period),
                window_start_ms=start,
                window_end_ms=end,
                committed_micros=totals.committed_micros,
                reserved_micros=totals.reserved_micros,
                overrun_micros=totals.overrun_micros,
                active_reservations=totals.active_reservations,
            )
        )
    return ScopeView(ref=ref, usage=tuple(usage), policy=decode_given_policy(store.load_policy()))


def set_limit(
    store: ScopeStore, ref: ScopeRef, period: Period, limit_micros: int | None, now_ms: int
) -> ScopeView:
    store.save_limit(period, limit_micros)
    return view(store, ref, now_ms)


def set_policy(
    store: ScopeStore, ref: ScopeRef, policy: RunPolicy | None, now_ms: int
) -> ScopeView:
    """Set (or, with None, clear) the policy new root runs of the scope get."""
    store.save_policy(encode_given_policy(policy))
    return view(store, ref, now_ms)
