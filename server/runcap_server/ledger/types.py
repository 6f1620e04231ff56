"""The ledger's values: runs, reservations, changes and operation results.

Enum values equal the runcap.v1 proto values so conversion is a cast. Money is
int micro-USD and time is int milliseconds of server time, everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

# Lua numbers are doubles: Redis scripts are exact only up to 2**53 - 1.
MAX_MICROS = 2**53 - 1


class RunStatus(IntEnum):
    OPEN = 1
    CLOSED = 2
    SUSPENDED = 3


class Decision(IntEnum):
    ALLOW = 1
    BLOCK = 2


class DecisionReason(IntEnum):
    WITHIN_BUDGET = 1
    INSUFFICIENT_BUDGET = 2
    RUN_CLOSED = 3
    RESERVATION_EXPIRED = 4
    UNKNOWN_PRICE = 5
    SUSPENDED = 6


class ScopeKind(IntEnum):
    RUN = 1
    API_KEY = 2
    USER = 3
    TEAM = 4


class Period(IntEnum):
    LIFETIME = 1
    DAILY = 2
    MONTHLY = 3


class ReservationStatus(IntEnum):
    HELD = 1
    COMMITTED = 2
    RELEASED = 3
    EXPIRED = 4
    LATE_COMMITTED = 5
    BLOCKED = 6


SETTLED_BY_COMMIT = frozenset({ReservationStatus.COMMITTED, ReservationStatus.LATE_COMMITTED})


class EventType(IntEnum):
    CREATED = 1
    RESERVED = 2
    COMMITTED = 3
    REFUNDED = 4
    EXPIRED = 5
    CLOSED = 6
    SUSPENDED = 7
    RESUMED = 8


@dataclass(frozen=True, slots=True, order=True)
class ScopeRef:
    """A scope a reservation is held on: a run, or an API key, user or team."""

    kind: ScopeKind
    id: str

    @property
    def token(self) -> str:
        """A compact, unambiguous text form (stored by backends): "team:acme"."""
        return f"{self.kind.name.lower()}:{self.id}"

    @classmethod
    def parse(cls, token: str) -> ScopeRef:
        kind, _, id_ = token.partition(":")
        return cls(ScopeKind[kind.upper()], id_)


# Runs nest at most this deep (a run and 15 ancestors).
MAX_RUN_DEPTH = 16


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What a client asks for when it creates a run (compared for idempotency)."""

    run_id: str
    limit_micros: int
    labels: Mapping[str, str]
    # None: the server's default applies.
    default_ttl_ms: int | None
    # Parent scopes as given; empty ones inherit the parent run's.
    parent_run_id: str = ""
    api_key_id: str = ""
    user_id: str = ""
    team_id: str = ""


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a run sits: its ancestors and the scopes it is charged to (effective)."""

    ancestors: tuple[str, ...] = ()
    api_key_id: str = ""
    user_id: str = ""
    team_id: str = ""

    def parents(self) -> tuple[ScopeRef, ...]:
        """Every scope a reservation of the run is also held on, in saga order."""
        refs = [ScopeRef(ScopeKind.RUN, run_id) for run_id in self.ancestors]
        for kind, id_ in (
            (ScopeKind.API_KEY, self.api_key_id),
            (ScopeKind.USER, self.user_id),
            (ScopeKind.TEAM, self.team_id),
        ):
            if id_:
                refs.append(ScopeRef(kind, id_))
        return tuple(refs)

    def child(self, spec: RunSpec) -> Lineage:
        """The lineage of a run created under this one (this one is spec's parent)."""
        return Lineage(
            ancestors=(spec.parent_run_id, *self.ancestors) if spec.parent_run_id else (),
            api_key_id=spec.api_key_id or self.api_key_id,
            user_id=spec.user_id or self.user_id,
            team_id=spec.team_id or self.team_id,
        )

    def encode(self) -> str:
        return json.dumps(
            [list(self.ancestors), self.api_key_id, self.user_id, self.team_id],
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> Lineage:
        if not text:
            return cls()
        ancestors, key, user, team = json.loads(text)
        return cls(tuple(ancestors), key, user, team)


def hold_id(run_id: str, reservation_id: str) -> str:
    """The id of a run's reservation as held on a parent scope.

    "/" never appears in run or reservation ids, so clients cannot name it.
    """
    return f"{run_id}/{reservation_id}"


@dataclass(frozen=True, slots=True)
class BudgetState:
    run_id: str
    limit_micros: int
    committed_micros: int
    reserved_micros: int
    revision: int
    status: RunStatus
    active_reservations: int
    overrun_micros: int
    # The hash chain of the run's changes up to `revision` (chain_digest). Left
    # out of equality so states can be written down in tests; Account compares it.
    digest: str = dataclasses.field(default="", compare=False)

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.committed_micros - self.reserved_micros)


@dataclass(slots=True)
class Account:
    """A run's ledger row: its configuration and running totals."""

    spec: RunSpec
    created_ms: int
    closed_ms: int | None = None
    lineage: Lineage = dataclasses.field(default_factory=Lineage)
    status: RunStatus = RunStatus.OPEN
    committed_micros: int = 0
    reserved_micros: int = 0
    overrun_micros: int = 0
    active_reservations: int = 0
    revision: int = 0
    digest: str = ""

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def state(self) -> BudgetState:
        return BudgetState(
            run_id=self.spec.run_id,
            limit_micros=self.spec.limit_micros,
            committed_micros=self.committed_micros,
            reserved_micros=self.reserved_micros,
            revision=self.revision,
            status=self.status,
            active_reservations=self.active_reservations,
            overrun_micros=self.overrun_micros,
            digest=self.digest,
        )

    def copy(self) -> Account:
        return dataclasses.replace(self)

    def view(self, server_default_ttl_ms: int) -> RunView:
        """The run as GetRun shows it; the server's default ttl fills in the run's."""
        return RunView(
            spec=self.spec,
            default_ttl_ms=self.spec.default_ttl_ms or server_default_ttl_ms,
            created_ms=self.created_ms,
            closed_ms=self.closed_ms,
            state=self.state(),
            lineage=self.lineage,
        )


@dataclass(slots=True)
class Reservation:
    """One reservation of a run, from its decision to its settlement."""

    reservation_id: str
    # The request's arguments, compared when the same id is retried.
    amount_micros: int
    requested_ttl_ms: int | None
    status: ReservationStatus
    reason: DecisionReason
    created_ms: int
    # What is (or was) held: amount_micros when allowed, 0 when blocked.
    held_micros: int = 0
    expires_ms: int | None = None
    actual_micros: int | None = None
    overrun_micros: int = 0
    settled_ms: int | None = None
    # For a block: the scope and period that blocked.
    blocking_scope: ScopeRef | None = None
    blocking_period: Period | None = None
    # Compared instead of amount_micros on a retry when set: the request's
    # own arguments (an LLM call's estimate depends on the price table).
    fingerprint: str = ""
    # How an LLM call was priced ("<table version>#<rates>"), for Commit by usage.
    pricing: str = ""

    @property
    def decision(self) -> Decision:
        return Decision.BLOCK if self.status is ReservationStatus.BLOCKED else Decision.ALLOW

    def copy(self) -> Reservation:
        return dataclasses.replace(self)


def chain_digest(
    previous: str,
    revision: int,
    type_: EventType,
    reservation_id: str,
    amount_micros: int,
    actual_micros: int,
    overrun_micros: int,
    late: bool,
) -> str:
    """The digest after one more change: sha1 over the previous digest and the change.

    Every backend computes exactly this (the Redis script with redis.sha1hex), so
    a digest names one history whatever stored it.
    """
    fields = (previous, revision, int(type_), reservation_id, amount_micros, actual_micros)
    text = "|".join(str(f) for f in (*fields, overrun_micros, "1" if late else "0"))
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a run's change log: what happened, and the state after it."""

    revision: int
    type: EventType
    time_ms: int
    state: BudgetState
    reservation_id: str = ""
    amount_micros: int = 0
    actual_micros: int = 0
    overrun_micros: int = 0
    late: bool = False


@dataclass(frozen=True, slots=True)
class RunView:
    """A run's configuration with its state, as GetRun returns it."""

    spec: RunSpec
    default_ttl_ms: int
    created_ms: int
    closed_ms: int | None
    state: BudgetState
    lineage: Lineage = Lineage()


@dataclass(frozen=True, slots=True)
class CreateRunResult:
    run: RunView
    replayed: bool


@dataclass(frozen=True, slots=True)
class ReserveResult:
    decision: Decision
    reason: DecisionReason
    reservation_id: str
    held_micros: int
    expires_ms: int | None
    state: BudgetState
    replayed: bool
    blocking_scope: ScopeRef | None = None
    blocking_period: Period | None = None


@dataclass(frozen=True, slots=True)
class CommitResult:
    state: BudgetState
    reservation_status: ReservationStatus
    actual_micros: int
    held_micros: int
    overrun_micros: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class RefundResult:
    state: BudgetState
    reservation_status: ReservationStatus
    released_micros: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class CloseRunResult:
    state: BudgetState
    replayed: bool


@dataclass(frozen=True, slots=True)
class ChangePage:
    """Changes read from a run's log, with the log's bounds at read time."""

    changes: list[Change]
    # The oldest revision still retained (head + 1 when the log is empty).
    floor: int
    # The run's current revision.
    head: int
