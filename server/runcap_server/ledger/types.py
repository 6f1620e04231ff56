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
    WARN = 3
    THROTTLE = 4
    DOWNGRADE = 5
    APPROVAL_REQUIRED = 6


class DecisionReason(IntEnum):
    WITHIN_BUDGET = 1
    INSUFFICIENT_BUDGET = 2
    RUN_CLOSED = 3
    RESERVATION_EXPIRED = 4
    UNKNOWN_PRICE = 5
    SUSPENDED = 6
    THROTTLED = 7
    RATE_LIMITED = 8
    IN_FLIGHT_LIMIT = 9
    BACKEND_UNAVAILABLE = 10
    SPEND_NEEDS_APPROVAL = 11
    METER_NEEDS_APPROVAL = 12
    APPROVAL_DENIED = 13


# Reasons answered with Decision.THROTTLE: not now, but later.
THROTTLE_REASONS = frozenset(
    {DecisionReason.THROTTLED, DecisionReason.RATE_LIMITED, DecisionReason.IN_FLIGHT_LIMIT}
)
# Reasons answered with Decision.APPROVAL_REQUIRED.
APPROVAL_REASONS = frozenset(
    {DecisionReason.SPEND_NEEDS_APPROVAL, DecisionReason.METER_NEEDS_APPROVAL}
)
# Reasons an advisory run reports as a warning instead of enforcing (a denied
# approval is a person's decision, and blocks in every mode).
ADVISORY_REASONS = THROTTLE_REASONS | APPROVAL_REASONS | {DecisionReason.INSUFFICIENT_BUDGET}


class ApprovalStatus(IntEnum):
    PENDING = 1
    APPROVED = 2
    DENIED = 3


# The approval of a run's spend past policy.approval_percent; a meter's is its
# dimension ("m:<meter>").
SPEND_APPROVAL = "spend"


def approval_id(run_id: str, trigger: str) -> str:
    """The API's id of a run's approval: "run/approval:spend", "run/approval:meter:x"."""
    what = trigger if trigger == SPEND_APPROVAL else "meter:" + trigger[2:]
    return f"{run_id}/approval:{what}"


def parse_approval_id(text: str) -> tuple[str, str] | None:
    """(run id, trigger) of an approval id, or None when it is not one."""
    run_id, _, what = text.partition("/approval:")
    if not run_id or not what:
        return None
    if what == SPEND_APPROVAL:
        return run_id, SPEND_APPROVAL
    if what.startswith("meter:") and len(what) > len("meter:"):
        return run_id, "m:" + what[len("meter:") :]
    return None


class EnforcementMode(IntEnum):
    HARD_GATE = 1
    SOFT_GATE = 2
    ADVISORY = 3
    ACTUALS_ONLY = 4
    CALIBRATED = 5


class Dimension(IntEnum):
    SPEND = 1
    TOKENS = 2
    METER = 3
    RATE = 4
    IN_FLIGHT = 5
    EXPOSURE = 6


class Threshold(IntEnum):
    NONE = 0
    INFO = 1
    WARN = 2
    THROTTLE = 3
    STOP = 4


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
    THRESHOLD_CROSSED = 9
    APPROVAL_REQUESTED = 10
    APPROVAL_GRANTED = 11
    APPROVAL_DENIED = 12
    BLOCKED = 13


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
DEFAULT_MAX_DEPTH = 5
DEFAULT_THRESHOLDS = (60, 80, 95)

# CALIBRATED mode: each model's last CALIBRATION_RING observed output tokens
# are kept with the run, for at most CALIBRATION_MODELS models per run.
CALIBRATION_RING = 32
CALIBRATION_MODELS = 16
DEFAULT_CALIBRATION_MIN_SAMPLES = 5
DEFAULT_EXPOSURE_ALLOWANCE_PERCENT = 10

# A run's dimensions beyond money, as stored: "tokens" and "m:<meter>".
TOKENS = "tokens"


def meter_dim(name: str) -> str:
    return "m:" + name


@dataclass(frozen=True, slots=True)
class RunPolicy:
    """How a run is governed beyond its dollar limit (runcap.v1.RunPolicy).

    Fixed when the run is created. Stored as compact JSON with only the
    non-default fields ("" for the defaults), which the Redis script decodes.
    """

    mode: EnforcementMode = EnforcementMode.HARD_GATE
    soft_margin_percent: int = 0
    # Info, warn and throttle, in percent of the limit; 0 turns one off.
    thresholds: tuple[int, int, int] = DEFAULT_THRESHOLDS
    throttle_base_ms: int = 1_000
    throttle_max_ms: int = 60_000
    max_tokens: int | None = None
    # (meter name, ceiling in units), sorted by name.
    meter_limits: tuple[tuple[str, int], ...] = ()
    # (max calls, window ms), or None.
    rate_limit: tuple[int, int] | None = None
    max_in_flight: int | None = None
    max_depth: int = DEFAULT_MAX_DEPTH
    max_children: int | None = None
    # LLM calls that do not fit: hold the best alternative instead; and the
    # "provider/model"s alternatives may be (empty: any priced model).
    auto_downgrade: bool = False
    downgrade_models: tuple[str, ...] = ()
    # Escalations: spend past this percent of the limit (0: never), and calls
    # to meters not on this list (empty: none), need an approval first.
    approval_percent: int = 0
    approved_meters: tuple[str, ...] = ()
    # CALIBRATED mode: observed outputs per model needed before an LLM call is
    # held at its calibrated estimate, and the exposure allowance (micro-USD,
    # else percent of the limit, else DEFAULT_EXPOSURE_ALLOWANCE_PERCENT).
    calibration_min_samples: int = DEFAULT_CALIBRATION_MIN_SAMPLES
    exposure_allowance_micros: int | None = None
    exposure_allowance_percent: int | None = None

    _KEYS = (
        ("mode", "mode"),
        ("soft_margin_percent", "margin"),
        ("thresholds", "thr"),
        ("throttle_base_ms", "tb"),
        ("throttle_max_ms", "tm"),
        ("max_tokens", "tok"),
        ("meter_limits", "met"),
        ("rate_limit", "rate"),
        ("max_in_flight", "inf"),
        ("max_depth", "depth"),
        ("max_children", "kids"),
        ("auto_downgrade", "dg"),
        ("downgrade_models", "dm"),
        ("approval_percent", "ap"),
        ("approved_meters", "am"),
        ("calibration_min_samples", "cms"),
        ("exposure_allowance_micros", "xa"),
        ("exposure_allowance_percent", "xp"),
    )

    def exposure_allowance(self, limit_micros: int) -> int:
        """How far past the limit a CALIBRATED run's worst-case exposure may go."""
        if self.exposure_allowance_micros is not None:
            return self.exposure_allowance_micros
        percent = self.exposure_allowance_percent
        if percent is None:
            percent = DEFAULT_EXPOSURE_ALLOWANCE_PERCENT
        return limit_micros * percent // 100

    def limit_of(self, dim: str) -> int | None:
        if dim == TOKENS:
            return self.max_tokens
        return dict(self.meter_limits).get(dim[2:])

    def encode(self) -> str:
        default = _DEFAULT_POLICY
        out: dict[str, object] = {}
        for attr, key in self._KEYS:
            value = getattr(self, attr)
            if value == getattr(default, attr):
                continue
            if attr == "meter_limits":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = int(value) if isinstance(value, IntEnum) else value
        return json.dumps(out, separators=(",", ":"), sort_keys=True) if out else ""

    @classmethod
    def decode(cls, text: str) -> RunPolicy:
        if not text:
            return _DEFAULT_POLICY
        raw = json.loads(text)
        values: dict[str, object] = {}
        for attr, key in cls._KEYS:
            if key not in raw:
                continue
            value = raw[key]
            if attr == "mode":
                value = EnforcementMode(value)
            elif attr == "meter_limits":
                value = tuple(sorted(value.items()))
            elif isinstance(value, list):
                value = tuple(value)
            values[attr] = value
        return cls(**values)  # type: ignore[arg-type]


_DEFAULT_POLICY = RunPolicy()


def encode_given_policy(policy: RunPolicy | None) -> str:
    """A CreateRun request's policy as given (compared on a retry): "" when unset."""
    if policy is None:
        return ""
    return policy.encode() or "{}"


def decode_given_policy(text: str) -> RunPolicy | None:
    return None if not text else RunPolicy.decode("" if text == "{}" else text)


def encode_dims(dims: Mapping[str, int]) -> str:
    """A reservation's holds beyond money: "tokens=123;m:tool:serp=1" (sorted)."""
    return ";".join(f"{k}={v}" for k, v in sorted(dims.items()) if v)


def decode_dims(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(";") if text else ():
        key, _, value = part.rpartition("=")
        out[key] = int(value)
    return out


def encode_calibration(calibration: Mapping[str, tuple[int, ...]]) -> str:
    """A run's observed outputs: "provider/model#12,40,7#provider/model2#..."
    (sorted by model; each model's samples oldest first). "#" never appears in
    provider or model names (estimates.Estimate.pricing)."""
    parts: list[str] = []
    for key, samples in sorted(calibration.items()):
        parts += [key, ",".join(str(v) for v in samples)]
    return "#".join(parts)


def decode_calibration(text: str) -> dict[str, tuple[int, ...]]:
    parts = text.split("#") if text else []
    return {
        parts[i]: tuple(int(v) for v in parts[i + 1].split(",")) for i in range(0, len(parts), 2)
    }


def encode_approvals(approvals: Mapping[str, ApprovalStatus]) -> str:
    """A run's escalations: "m:tool:x=1;spend=2" (sorted)."""
    return encode_dims({k: int(v) for k, v in approvals.items()})


def decode_approvals(text: str) -> dict[str, ApprovalStatus]:
    return {k: ApprovalStatus(v) for k, v in decode_dims(text).items()}


def encode_usage(usage: Mapping[str, tuple[int, int]]) -> str:
    """A run's use per dimension: "tokens=reserved,committed;..." (sorted)."""
    return ";".join(f"{k}={r},{c}" for k, (r, c) in sorted(usage.items()) if r or c)


def decode_usage(text: str) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for part in text.split(";") if text else ():
        key, _, value = part.rpartition("=")
        reserved, committed = value.split(",")
        out[key] = (int(reserved), int(committed))
    return out


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
    # As given; None: the parent's (a root run: the defaults).
    policy: RunPolicy | None = None


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a run sits: its ancestors and the scopes it is charged to (effective)."""

    ancestors: tuple[str, ...] = ()
    api_key_id: str = ""
    user_id: str = ""
    team_id: str = ""
    # Levels of subagents that may still be created below the run.
    depth_left: int = DEFAULT_MAX_DEPTH

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

    def child(self, spec: RunSpec, policy: RunPolicy) -> Lineage:
        """The lineage of a run created under this one (this one is spec's parent)."""
        return Lineage(
            ancestors=(spec.parent_run_id, *self.ancestors) if spec.parent_run_id else (),
            api_key_id=spec.api_key_id or self.api_key_id,
            user_id=spec.user_id or self.user_id,
            team_id=spec.team_id or self.team_id,
            depth_left=min(self.depth_left - 1, policy.max_depth),
        )

    def encode(self) -> str:
        return json.dumps(
            [list(self.ancestors), self.api_key_id, self.user_id, self.team_id, self.depth_left],
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> Lineage:
        if not text:
            return cls()
        ancestors, key, user, team, *rest = json.loads(text)
        # Stored before depth_left existed: the default, within MAX_RUN_DEPTH.
        depth_left = rest[0] if rest else min(DEFAULT_MAX_DEPTH, MAX_RUN_DEPTH - 1 - len(ancestors))
        return cls(tuple(ancestors), key, user, team, depth_left)


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
    threshold: Threshold = Threshold.NONE
    committed_tokens: int = 0
    reserved_tokens: int = 0
    # The hash chain of the run's changes up to `revision` (chain_digest). Left
    # out of equality so states can be written down in tests; Account compares it.
    digest: str = dataclasses.field(default="", compare=False)
    # CALIBRATED runs: committed + the worst cases of the holds in flight, and
    # what it may reach (limit + exposure allowance); 0 in other modes. Not
    # part of the digest: they follow from the history it fingerprints.
    exposure_micros: int = 0
    exposure_ceiling_micros: int = 0
    # At the wall: set by a BLOCKED change, cleared by the next RESERVED one.
    blocked: bool = False

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
    # The effective policy: spec.policy, the parent's, or the defaults.
    policy: RunPolicy = _DEFAULT_POLICY
    status: RunStatus = RunStatus.OPEN
    committed_micros: int = 0
    reserved_micros: int = 0
    overrun_micros: int = 0
    active_reservations: int = 0
    revision: int = 0
    digest: str = ""
    # The policy's counters: the highest threshold band reached, the throttle
    # back-off (allowed calls in the band so far, and when the next may come),
    # the rate limit's current window (start, allowed calls), child runs, and
    # the use of each dimension beyond money: (reserved, committed).
    threshold: Threshold = Threshold.NONE
    throttle_strikes: int = 0
    throttle_until_ms: int = 0
    rate_window_ms: int = 0
    rate_count: int = 0
    children: int = 0
    usage: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Escalations by trigger (SPEND_APPROVAL, "m:<meter>").
    approvals: dict[str, ApprovalStatus] = dataclasses.field(default_factory=dict)
    # CALIBRATED runs only: the worst cases of the holds in flight, and each
    # model's observed output tokens (encode_calibration).
    exposure_micros: int = 0
    calibration: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # At the wall since the last BLOCKED change (BudgetState.blocked), and the
    # run's blocked Reserves: a counter that moves without a revision.
    blocked: bool = False
    blocked_calls: int = 0

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
            threshold=self.threshold,
            committed_tokens=self.usage.get(TOKENS, (0, 0))[1],
            reserved_tokens=self.usage.get(TOKENS, (0, 0))[0],
            digest=self.digest,
            blocked=self.blocked,
            **self.exposure(),
        )

    def exposure(self) -> dict[str, int]:
        """A CALIBRATED run's exposure and its ceiling (BudgetState's fields); {} otherwise."""
        if self.policy.mode is not EnforcementMode.CALIBRATED:
            return {}
        limit = self.spec.limit_micros
        return {
            "exposure_micros": self.committed_micros + self.exposure_micros,
            "exposure_ceiling_micros": limit + self.policy.exposure_allowance(limit),
        }

    def copy(self) -> Account:
        return dataclasses.replace(
            self,
            usage=dict(self.usage),
            approvals=dict(self.approvals),
            calibration=dict(self.calibration),
        )

    def view(self, server_default_ttl_ms: int) -> RunView:
        """The run as GetRun shows it; the server's default ttl fills in the run's."""
        return RunView(
            spec=self.spec,
            default_ttl_ms=self.spec.default_ttl_ms or server_default_ttl_ms,
            created_ms=self.created_ms,
            closed_ms=self.closed_ms,
            state=self.state(),
            lineage=self.lineage,
            policy=self.policy,
            children=self.children,
            usage=dict(self.usage),
            approvals=dict(self.approvals),
            blocked_calls=self.blocked_calls,
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
    # What is held beyond money, by dimension ("tokens", "m:<meter>").
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    # For a block, throttle or warning on a limit: which one.
    dimension: Dimension | None = None
    meter: str = ""
    # For a throttle: when reserving again makes sense.
    retry_at_ms: int | None = None
    # A block not counted yet (Account.blocked_calls): an LLM call short of
    # money on a run with auto_downgrade, which the server may still answer
    # with a downgrade; core.count_block counts it once if it does not.
    uncounted: bool = False

    @property
    def decision(self) -> Decision:
        if self.status is ReservationStatus.BLOCKED:
            if self.reason in THROTTLE_REASONS:
                return Decision.THROTTLE
            if self.reason in APPROVAL_REASONS:
                return Decision.APPROVAL_REQUIRED
            return Decision.BLOCK
        return Decision.ALLOW if self.reason is DecisionReason.WITHIN_BUDGET else Decision.WARN

    @property
    def approval(self) -> str:
        """The escalation trigger this decision awaits or was denied by; "" if none."""
        if (
            self.reason not in APPROVAL_REASONS
            and self.reason is not DecisionReason.APPROVAL_DENIED
        ):
            return ""
        return "m:" + self.meter if self.dimension is Dimension.METER else SPEND_APPROVAL

    def copy(self) -> Reservation:
        return dataclasses.replace(self, dims=dict(self.dims))


def chain_digest(
    previous: str,
    revision: int,
    type_: EventType,
    reservation_id: str,
    amount_micros: int,
    actual_micros: int,
    overrun_micros: int,
    late: bool,
    threshold: Threshold = Threshold.NONE,
    approval: str = "",
    block: str = "",
) -> str:
    """The digest after one more change: sha1 over the previous digest and the change.

    Every backend computes exactly this (the Redis script with redis.sha1hex), so
    a digest names one history whatever stored it. A threshold crossing adds
    its band as one more field, a block its verdict (block_text).
    """
    fields = (previous, revision, int(type_), reservation_id, amount_micros, actual_micros)
    text = "|".join(str(f) for f in (*fields, overrun_micros, "1" if late else "0"))
    if threshold:
        text += f"|{int(threshold)}"
    if approval:
        text += f"|a:{approval}"
    if block:
        text += f"|b:{block}"
    return hashlib.sha1(text.encode()).hexdigest()


def block_text(reservation: Reservation) -> str:
    """A block's verdict as the digest covers it: "reason|dimension|period|scope|meter"
    (0 or "" when unset; no field holds "|")."""
    r = reservation
    scope = r.blocking_scope.token if r.blocking_scope else ""
    fields = (int(r.reason), int(r.dimension or 0), int(r.blocking_period or 0), scope, r.meter)
    return "|".join(str(f) for f in fields)


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
    threshold: Threshold = Threshold.NONE
    # For the APPROVAL_ events: the trigger.
    approval: str = ""
    # For BLOCKED: the reservation's verdict.
    reason: DecisionReason | None = None
    blocking_scope: ScopeRef | None = None
    blocking_period: Period | None = None
    dimension: Dimension | None = None
    meter: str = ""


@dataclass(frozen=True, slots=True)
class RunView:
    """A run's configuration with its state, as GetRun returns it."""

    spec: RunSpec
    default_ttl_ms: int
    created_ms: int
    closed_ms: int | None
    state: BudgetState
    lineage: Lineage = Lineage()
    policy: RunPolicy = _DEFAULT_POLICY
    children: int = 0
    usage: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    approvals: Mapping[str, ApprovalStatus] = dataclasses.field(default_factory=dict)
    # The run's blocked Reserves (Account.blocked_calls).
    blocked_calls: int = 0


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
    dimension: Dimension | None = None
    meter: str = ""
    retry_at_ms: int | None = None
    mode: EnforcementMode = EnforcementMode.HARD_GATE
    # The escalation trigger a decision awaits or was denied by.
    approval: str = ""
    # The decision's server time (a replay's: now), to turn retry_at_ms into a delay.
    now_ms: int = dataclasses.field(default=0, compare=False)
    # The worst case asked for (an LLM call's estimate; else the amount), and
    # how the call was priced (a CALIBRATED run's LLM call: with the basis,
    # see core.calibrated_pricing).
    worst_micros: int = 0
    pricing: str = ""
    # CALIBRATED runs: committed + the worst cases in flight after the
    # decision, and what it may reach (limit + allowance); else 0.
    exposure_micros: int = 0
    exposure_ceiling_micros: int = 0
    # A replay of an allowed reservation that is no longer held (committed,
    # released, expired): the saga releases parent holds its retry made afresh.
    settled: bool = False


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
class ApprovalResult:
    status: ApprovalStatus
    state: BudgetState
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
