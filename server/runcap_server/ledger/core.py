"""The ledger's semantics, written once (docs/semantics.md describes them).

Each operation works on one run through a `RunStore`, a view of that run's
rows inside one transaction of some storage. Operations read and check
everything first and write only when they cannot fail any more, so a failed
operation changes nothing whatever the storage. Expiry is lazy: every
operation first releases the run's holds that are due at `now_ms`.

All functions are synchronous and pure apart from the store, so the
reference model and the SQLite backend share them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from runcap_server import errors
from runcap_server.ledger.scopes import ParentOutcome
from runcap_server.ledger.types import (
    ADVISORY_REASONS,
    APPROVAL_REASONS,
    CALIBRATION_MODELS,
    CALIBRATION_RING,
    MAX_MICROS,
    SETTLED_BY_COMMIT,
    SPEND_APPROVAL,
    TOKENS,
    Account,
    ApprovalResult,
    ApprovalStatus,
    BudgetState,
    Change,
    CloseRunResult,
    CommitResult,
    Decision,
    DecisionReason,
    Dimension,
    EnforcementMode,
    EventType,
    Lineage,
    Period,
    RefundResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunStatus,
    ScopeKind,
    ScopeRef,
    Threshold,
    approval_id,
    block_text,
    chain_digest,
)


class RunStore(Protocol):
    """One run's rows inside one storage transaction."""

    def load_account(self) -> Account | None: ...

    def load_reservation(self, reservation_id: str) -> Reservation | None: ...

    def due_reservations(self, now_ms: int) -> list[Reservation]:
        """Held reservations with expires_ms <= now_ms, by (expires_ms, id)."""
        ...

    def save_account(self, account: Account) -> None: ...

    def save_reservation(self, reservation: Reservation) -> None: ...

    def append_change(self, change: Change) -> None: ...


class _Txn:
    """Collects one operation's changes; `store` sees nothing until `apply`."""

    def __init__(self, store: RunStore, account: Account, now_ms: int) -> None:
        self.store = store
        self.account = account.copy()
        self.now_ms = now_ms
        self.reservations: dict[str, Reservation] = {}
        self.changes: list[Change] = []
        # A counter changed without a revision (Account.blocked_calls).
        self.counted = False

    def record(
        self,
        type_: EventType,
        reservation: Reservation | None = None,
        *,
        amount_micros: int = 0,
        actual_micros: int = 0,
        overrun_micros: int = 0,
        late: bool = False,
        threshold: Threshold = Threshold.NONE,
        approval: str = "",
    ) -> None:
        account = self.account
        account.revision += 1
        reservation_id = ""
        if reservation is not None:
            reservation_id = reservation.reservation_id
            self.reservations[reservation_id] = reservation
        # A BLOCKED change carries the reservation's verdict.
        block = reservation if type_ is EventType.BLOCKED else None
        account.digest = chain_digest(
            account.digest,
            account.revision,
            type_,
            reservation_id,
            amount_micros,
            actual_micros,
            overrun_micros,
            late,
            threshold,
            approval,
            block_text(block) if block is not None else "",
        )
        self.changes.append(
            Change(
                revision=account.revision,
                type=type_,
                time_ms=self.now_ms,
                state=account.state(),
                reservation_id=reservation_id,
                amount_micros=amount_micros,
                actual_micros=actual_micros,
                overrun_micros=overrun_micros,
                late=late,
                threshold=threshold,
                approval=approval,
                reason=block.reason if block is not None else None,
                blocking_scope=block.blocking_scope if block is not None else None,
                blocking_period=block.blocking_period if block is not None else None,
                dimension=block.dimension if block is not None else None,
                meter=block.meter if block is not None else "",
            )
        )

    def count_block(self, reservation: Reservation) -> None:
        """Count a Reserve answered DECISION_BLOCK; the first of a series
        marks the run blocked, with a BLOCKED change."""
        account = self.account
        account.blocked_calls += 1
        self.counted = True
        if not account.blocked:
            account.blocked = True
            self.record(EventType.BLOCKED, reservation, amount_micros=reservation.amount_micros)

    def unhold(self, reservation: Reservation) -> int:
        """Take a held reservation's holds off the run's totals. Returns the money."""
        account = self.account
        account.reserved_micros -= reservation.held_micros
        account.active_reservations -= 1
        if account.policy.mode is EnforcementMode.CALIBRATED:
            account.exposure_micros -= reservation.amount_micros
        for dim, units in reservation.dims.items():
            reserved, committed = account.usage[dim]
            _set_usage(account, dim, reserved - units, committed)
        return reservation.held_micros

    def expire(self, reservation: Reservation) -> None:
        held = self.unhold(reservation)
        reservation.status = ReservationStatus.EXPIRED
        reservation.settled_ms = self.now_ms
        self.record(EventType.EXPIRED, reservation, amount_micros=held)

    def apply(self) -> BudgetState:
        for reservation in self.reservations.values():
            self.store.save_reservation(reservation)
        for change in self.changes:
            self.store.append_change(change)
        if self.changes or self.counted:
            self.store.save_account(self.account)
        return self.account.state()


def _set_usage(account: Account, dim: str, reserved: int, committed: int) -> None:
    """A dimension's use; one with none left is dropped (as backends store it)."""
    if reserved or committed:
        account.usage[dim] = (reserved, committed)
    else:
        account.usage.pop(dim, None)


def _open(store: RunStore, run_id: str, now_ms: int) -> _Txn:
    """Start an operation on an existing run, with its due holds expired."""
    account = store.load_account()
    if account is None:
        raise errors.RunNotFound(run_id)
    txn = _Txn(store, account, now_ms)
    for due in store.due_reservations(now_ms):
        txn.expire(due.copy())
    return txn


def _reservation(txn: _Txn, reservation_id: str) -> Reservation | None:
    """The reservation as it stands in this operation (expired if it was due)."""
    if reservation_id in txn.reservations:
        return txn.reservations[reservation_id]
    found = txn.store.load_reservation(reservation_id)
    if found is None:
        return None
    found = found.copy()
    if (
        found.status is ReservationStatus.HELD
        and found.expires_ms is not None
        and found.expires_ms <= txn.now_ms
    ):
        # Due but beyond what due_reservations returned (a bounded batch).
        txn.expire(found)
    return found


def create_run(
    store: RunStore,
    spec: RunSpec,
    now_ms: int,
    lineage: Lineage | None = None,
    policy: RunPolicy | None = None,
) -> tuple[Account, bool]:
    """Create a run, or find the identical one. Returns (account, replayed).

    `lineage` and `policy` are the run's place under its parent and its
    effective policy (saga.place_under).
    """
    existing = store.load_account()
    if existing is not None:
        if existing.spec != spec:
            raise errors.RunAlreadyExists(spec.run_id)
        return get_state(store, spec.run_id, now_ms), True
    account = Account(
        spec=spec,
        created_ms=now_ms,
        lineage=lineage or Lineage(depth_left=(policy or RunPolicy()).max_depth),
        policy=policy or spec.policy or RunPolicy(),
    )
    txn = _Txn(store, account, now_ms)
    txn.record(EventType.CREATED)
    txn.apply()
    return txn.account, False


def adopt_child(store: RunStore, run_id: str, child_run_id: str) -> None:
    """Count a new child run, within the run's max_children. Not a change of
    the run's budget: no revision. The caller creates the child in the same
    transaction."""
    account = store.load_account()
    assert account is not None
    limit = account.policy.max_children
    if limit is not None and account.children >= limit:
        raise errors.SubagentLimit(
            child_run_id, run_id, f"the parent already has its {limit} children (max_children)"
        )
    account.children += 1
    store.save_account(account)


def get_state(store: RunStore, run_id: str, now_ms: int) -> Account:
    """The run with its due holds expired (the expiries are written)."""
    txn = _open(store, run_id, now_ms)
    txn.apply()
    return txn.account


def expire_due(store: RunStore, run_id: str, now_ms: int) -> int:
    """Release the run's due holds. Returns how many were released."""
    txn = _open(store, run_id, now_ms)
    txn.apply()
    return len(txn.changes)


# A replay of these is ReserveResult.settled: allowed once, held no longer.
_SETTLED_ALLOWED = frozenset(
    {
        ReservationStatus.COMMITTED,
        ReservationStatus.RELEASED,
        ReservationStatus.EXPIRED,
        ReservationStatus.LATE_COMMITTED,
    }
)


def reserve(
    store: RunStore,
    run_id: str,
    reservation_id: str,
    amount_micros: int,
    requested_ttl_ms: int | None,
    server_default_ttl_ms: int,
    now_ms: int,
    parent_block: ParentOutcome | None = None,
    fingerprint: str = "",
    pricing: str = "",
    dims: Mapping[str, int] | None = None,
    downgrade: bool = False,
) -> ReserveResult:
    """Hold `amount` (and `dims`: tokens, meter units) on the run if every
    limit of its policy allows; remember the decision either way.

    `parent_block` is a verdict reached before the run's own: the reserve
    saga's from the run's parent scopes, or an unknown price. When set (and
    this is not a retry), the reservation is blocked by it. A retry is
    compared by `fingerprint` when the request has one, else by amount, and
    by its meter. A block is counted (Account.blocked_calls) unless this is
    an automatic `downgrade`'s hold: the call it stands in for counts.
    """
    dims = dict(dims or {})
    txn = _open(store, run_id, now_ms)
    previous = _reservation(txn, reservation_id)
    if previous is not None:
        asked = _arguments_of(amount_micros, requested_ttl_ms, fingerprint, dims)
        if _arguments(previous) != asked:
            raise errors.IdempotencyConflict(run_id, reservation_id, "reserved")
        return _reserve_result(previous, txn.apply(), txn.account, now_ms, replayed=True)
    ttl_ms = requested_ttl_ms or txn.account.spec.default_ttl_ms or server_default_ttl_ms
    reservation = _decide(
        txn,
        reservation_id,
        amount_micros,
        requested_ttl_ms,
        ttl_ms,
        parent_block,
        dims,
        pricing,
        count=not downgrade,
    )
    reservation.fingerprint = fingerprint
    return _reserve_result(reservation, txn.apply(), txn.account, now_ms, replayed=False)


def _meters(dims: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in dims.items() if k != TOKENS}


def _arguments_of(
    amount_micros: int, requested_ttl_ms: int | None, fingerprint: str, dims: Mapping[str, int]
) -> tuple[object, ...]:
    # Tokens come only with a fingerprint (an LLM call), which covers them.
    return (fingerprint or amount_micros, requested_ttl_ms, _meters(dims))


def _arguments(reservation: Reservation) -> tuple[object, ...]:
    """What a retry of this reservation must repeat."""
    return _arguments_of(
        reservation.amount_micros,
        reservation.requested_ttl_ms,
        reservation.fingerprint,
        reservation.dims,
    )


def _reserve_result(
    reservation: Reservation, state: BudgetState, account: Account, now_ms: int, *, replayed: bool
) -> ReserveResult:
    return ReserveResult(
        decision=reservation.decision,
        reason=reservation.reason,
        reservation_id=reservation.reservation_id,
        held_micros=reservation.held_micros,
        expires_ms=reservation.expires_ms,
        state=state,
        replayed=replayed,
        blocking_scope=reservation.blocking_scope,
        blocking_period=reservation.blocking_period,
        dimension=reservation.dimension,
        meter=reservation.meter,
        retry_at_ms=reservation.retry_at_ms,
        mode=account.policy.mode,
        approval=reservation.approval,
        now_ms=now_ms,
        worst_micros=reservation.amount_micros,
        pricing=reservation.pricing,
        settled=replayed and reservation.status in _SETTLED_ALLOWED,
        **account.exposure(),
    )


# Rates are micro-USD per this many tokens (prices.TOKENS_PER_RATE).
_PER_RATE = 1_000_000


def _llm_call(pricing: str) -> tuple[str, int, int, int, int] | None:
    """An LLM call's (model key "provider/model", input rate, output rate,
    effective max output, input tokens) from its pricing
    (estimates.Estimate.pricing); None for anything else."""
    parts = pricing.split("#")
    if len(parts) < 6:
        return None
    rates = parts[1].split(",")
    return f"{parts[3]}/{parts[4]}", int(rates[0]), int(rates[1]), int(parts[2]), int(parts[5])


def calibrated_micros(input_tokens: int, input_rate: int, output_tokens: int, rate: int) -> int:
    """prices.estimate_micros, computed as the Redis script does: every
    product stays below 2**53 (tokens are at most 10**9 each)."""
    whole = input_tokens * (input_rate // _PER_RATE) + output_tokens * (rate // _PER_RATE)
    part = input_tokens * (input_rate % _PER_RATE) + output_tokens * (rate % _PER_RATE)
    return whole + -(-part // _PER_RATE)


def _calibrated(account: Account, amount_micros: int, pricing: str) -> tuple[int, str]:
    """What a new reservation holds, and the pricing stored with it.

    A CALIBRATED run holds an LLM call at its input plus the largest output
    of the model's last CALIBRATION_RING calls (at most the effective max
    output) once it has seen calibration_min_samples of them; before, and in
    every other mode, at `amount_micros` (the worst case). The pricing gains
    the basis: "#<output estimate>#<samples>" ("" estimate: the worst case).
    """
    call = _llm_call(pricing)
    if account.policy.mode is not EnforcementMode.CALIBRATED or call is None:
        return amount_micros, pricing
    key, input_rate, output_rate, effective, input_tokens = call
    samples = account.calibration.get(key, ())
    if len(samples) < account.policy.calibration_min_samples:
        return amount_micros, f"{pricing}##{len(samples)}"
    output = min(max(samples), effective)
    held = calibrated_micros(input_tokens, input_rate, output, output_rate)
    return min(amount_micros, held), f"{pricing}#{output}#{len(samples)}"


def _observe(account: Account, pricing: str, output_tokens: int) -> None:
    """A CALIBRATED run's committed LLM call feeds its model's samples."""
    call = _llm_call(pricing)
    if account.policy.mode is not EnforcementMode.CALIBRATED or call is None:
        return
    key = call[0]
    samples = account.calibration.get(key)
    if samples is None and len(account.calibration) >= CALIBRATION_MODELS:
        return  # bounded: a run's further models stay at their worst case
    account.calibration[key] = (*(samples or ()), output_tokens)[-CALIBRATION_RING:]


@dataclass(frozen=True, slots=True)
class _Verdict:
    """Why a reservation is not simply allowed."""

    reason: DecisionReason
    dimension: Dimension | None = None
    meter: str = ""
    retry_at_ms: int | None = None
    scope: ScopeRef | None = None
    period: Period | None = None


def _fits_exposure(account: Account, worst_micros: int) -> bool:
    """A CALIBRATED run's second ceiling: committed + the worst cases in
    flight, this one's included, within the limit plus the allowance."""
    if account.policy.mode is not EnforcementMode.CALIBRATED:
        return True
    limit = account.spec.limit_micros
    exposure = account.committed_micros + account.exposure_micros + worst_micros
    return exposure <= limit + account.policy.exposure_allowance(limit)


def _fits_money(account: Account, amount_micros: int) -> bool:
    """Whether the run's dollar ceiling, as its mode reads it, admits the amount."""
    policy, limit = account.policy, account.spec.limit_micros
    used = account.committed_micros + account.reserved_micros
    if policy.mode is EnforcementMode.ACTUALS_ONLY:
        return used < limit
    if policy.mode is EnforcementMode.SOFT_GATE:
        limit += limit * policy.soft_margin_percent // 100
    return used + amount_micros <= limit


def band(account: Account) -> Threshold:
    """The highest threshold band the run's committed spend is in."""
    committed, limit = account.committed_micros, account.spec.limit_micros
    if committed >= limit:
        return Threshold.STOP
    reached = Threshold.NONE
    for level, percent in zip(
        (Threshold.INFO, Threshold.WARN, Threshold.THROTTLE), account.policy.thresholds, strict=True
    ):
        if percent and committed * 100 >= percent * limit:
            reached = level
    return reached


def _in_throttle_band(account: Account) -> bool:
    percent = account.policy.thresholds[2]
    return bool(percent) and account.committed_micros * 100 >= percent * account.spec.limit_micros


def _rate_window(policy: RunPolicy, now_ms: int) -> int:
    assert policy.rate_limit is not None
    return now_ms - now_ms % policy.rate_limit[1]


def _check(
    account: Account, amount_micros: int, dims: Mapping[str, int], now_ms: int, worst_micros: int
) -> _Verdict | None:
    """The run's own verdict on a new reservation; None allows it.

    Final verdicts come first (a block is remembered, so it must be the
    lasting one): money, tokens, meters. Then the passing ones (a throttle):
    holds in flight, the rate limit, the throttle band.
    """
    policy = account.policy
    run = ScopeRef(ScopeKind.RUN, account.run_id)
    if not _fits_money(account, amount_micros):
        return _Verdict(
            DecisionReason.INSUFFICIENT_BUDGET, Dimension.SPEND, scope=run, period=Period.LIFETIME
        )
    if not _fits_exposure(account, worst_micros):
        return _Verdict(
            DecisionReason.INSUFFICIENT_BUDGET,
            Dimension.EXPOSURE,
            scope=run,
            period=Period.LIFETIME,
        )
    for dim, units in sorted(dims.items()):
        limit = policy.limit_of(dim)
        if limit is None:
            continue
        reserved, committed = account.usage.get(dim, (0, 0))
        if policy.mode is EnforcementMode.ACTUALS_ONLY and dim == TOKENS:
            over = reserved + committed >= limit
        else:
            over = reserved + committed + units > limit
        if over:
            if dim == TOKENS:
                return _Verdict(DecisionReason.INSUFFICIENT_BUDGET, Dimension.TOKENS, scope=run)
            return _Verdict(
                DecisionReason.INSUFFICIENT_BUDGET, Dimension.METER, meter=dim[2:], scope=run
            )
    escalation = _escalation(account, amount_micros, dims)
    if escalation is not None:
        return escalation
    if policy.max_in_flight is not None and account.active_reservations >= policy.max_in_flight:
        return _Verdict(
            DecisionReason.IN_FLIGHT_LIMIT,
            Dimension.IN_FLIGHT,
            retry_at_ms=now_ms + policy.throttle_base_ms,
            scope=run,
        )
    if policy.rate_limit is not None:
        start = _rate_window(policy, now_ms)
        used = account.rate_count if account.rate_window_ms == start else 0
        if used >= policy.rate_limit[0]:
            return _Verdict(
                DecisionReason.RATE_LIMITED,
                Dimension.RATE,
                retry_at_ms=start + policy.rate_limit[1],
                scope=run,
            )
    # A pause longer than the policy's maximum delay is from a clock that stepped
    # back (a Redis failover to a node behind): it is over, not an hour away.
    until = account.throttle_until_ms
    if _in_throttle_band(account) and now_ms < until <= now_ms + policy.throttle_max_ms:
        return _Verdict(
            DecisionReason.THROTTLED,
            Dimension.SPEND,
            retry_at_ms=account.throttle_until_ms,
            scope=run,
        )
    return None


def _escalation(account: Account, amount_micros: int, dims: Mapping[str, int]) -> _Verdict | None:
    """An escalation trigger the call trips that is not approved: a meter off
    the approved list, or spend past the approval threshold."""
    policy = account.policy
    run = ScopeRef(ScopeKind.RUN, account.run_id)
    if policy.approved_meters:
        for dim in sorted(dims):
            if dim == TOKENS or dim[2:] in policy.approved_meters:
                continue
            status = account.approvals.get(dim)
            if status is ApprovalStatus.DENIED:
                return _Verdict(DecisionReason.APPROVAL_DENIED, Dimension.METER, dim[2:], scope=run)
            if status is not ApprovalStatus.APPROVED:
                return _Verdict(
                    DecisionReason.METER_NEEDS_APPROVAL, Dimension.METER, dim[2:], scope=run
                )
    if policy.approval_percent:
        used = account.committed_micros + account.reserved_micros
        if policy.mode is not EnforcementMode.ACTUALS_ONLY:
            used += amount_micros
        if used * 100 > policy.approval_percent * account.spec.limit_micros:
            status = account.approvals.get(SPEND_APPROVAL)
            if status is ApprovalStatus.DENIED:
                return _Verdict(DecisionReason.APPROVAL_DENIED, Dimension.SPEND, scope=run)
            if status is not ApprovalStatus.APPROVED:
                return _Verdict(DecisionReason.SPEND_NEEDS_APPROVAL, Dimension.SPEND, scope=run)
    return None


def _count_allowed(account: Account, now_ms: int) -> None:
    """An allowed call uses the rate window and, in the throttle band, spaces the next one."""
    policy = account.policy
    if policy.rate_limit is not None:
        start = _rate_window(policy, now_ms)
        if account.rate_window_ms != start:
            account.rate_window_ms, account.rate_count = start, 0
        account.rate_count += 1
    if _in_throttle_band(account):
        account.throttle_strikes += 1
        delay = policy.throttle_base_ms * 2 ** min(account.throttle_strikes - 1, 32)
        account.throttle_until_ms = now_ms + min(policy.throttle_max_ms, delay)


def _decide(
    txn: _Txn,
    reservation_id: str,
    amount_micros: int,
    requested_ttl_ms: int | None,
    ttl_ms: int,
    parent_block: ParentOutcome | None = None,
    dims: Mapping[str, int] | None = None,
    pricing: str = "",
    *,
    own_limits: bool = True,
    count: bool = True,
) -> Reservation:
    """A new reservation: held if the run is open and every limit and parent
    allows it (or the run is advisory and only a limit objects), else blocked
    or throttled. The run's own verdict takes precedence over its parents'.

    `own_limits` False (an ancestor holding for a descendant) checks the
    dollar ceiling only: the other limits govern the run's own calls, and
    its blocks are the descendant's to count. `count` False leaves a block
    uncounted (an automatic downgrade's hold).
    """
    account = txn.account
    dims = dict(dims or {})
    verdict: _Verdict | None
    run = ScopeRef(ScopeKind.RUN, account.run_id)
    hold, pricing = _calibrated(account, amount_micros, pricing)
    # Totals must stay exact in every backend (Lua numbers are doubles): not
    # even an advisory or soft-gated run holds past MAX_MICROS.
    overflow = account.committed_micros + account.reserved_micros + amount_micros > MAX_MICROS
    if overflow:
        verdict = _Verdict(
            DecisionReason.INSUFFICIENT_BUDGET, Dimension.SPEND, scope=run, period=Period.LIFETIME
        )
    elif account.status is RunStatus.CLOSED:
        verdict = _Verdict(DecisionReason.RUN_CLOSED, scope=run, period=Period.LIFETIME)
    elif account.status is RunStatus.SUSPENDED:
        verdict = _Verdict(DecisionReason.SUSPENDED, scope=run, period=Period.LIFETIME)
    elif own_limits:
        verdict = _check(account, hold, dims, txn.now_ms, amount_micros)
    elif not _fits_money(account, hold):
        verdict = _Verdict(
            DecisionReason.INSUFFICIENT_BUDGET, Dimension.SPEND, scope=run, period=Period.LIFETIME
        )
    elif not _fits_exposure(account, amount_micros):
        verdict = _Verdict(
            DecisionReason.INSUFFICIENT_BUDGET,
            Dimension.EXPOSURE,
            scope=run,
            period=Period.LIFETIME,
        )
    else:
        verdict = None
    if verdict is None and parent_block is not None:
        dimension = (
            Dimension.SPEND if parent_block.reason is DecisionReason.INSUFFICIENT_BUDGET else None
        )
        verdict = _Verdict(
            parent_block.reason, dimension, scope=parent_block.scope, period=parent_block.period
        )
    actuals = account.policy.mode is EnforcementMode.ACTUALS_ONLY
    if actuals and TOKENS in dims:
        dims[TOKENS] = 0  # nothing estimated is held
    dims = {k: v for k, v in dims.items() if v}
    reservation = Reservation(
        reservation_id=reservation_id,
        amount_micros=amount_micros,
        requested_ttl_ms=requested_ttl_ms,
        status=ReservationStatus.BLOCKED,
        reason=DecisionReason.WITHIN_BUDGET,
        created_ms=txn.now_ms,
        pricing=pricing,
        dims=dims,
    )
    if verdict is not None:
        reservation.reason = verdict.reason
        reservation.dimension = verdict.dimension
        reservation.meter = verdict.meter
        reservation.blocking_scope = verdict.scope
        reservation.blocking_period = verdict.period
        trigger = reservation.approval
        if verdict.reason in APPROVAL_REASONS and trigger not in account.approvals:
            # The first call to trip it asks for the approval (Watch shows it).
            account.approvals[trigger] = ApprovalStatus.PENDING
            txn.record(EventType.APPROVAL_REQUESTED, reservation, approval=trigger)
    warn = (
        verdict is not None
        and not overflow
        and account.policy.mode is EnforcementMode.ADVISORY
        and verdict.reason in ADVISORY_REASONS
    )
    if verdict is None or warn:
        held = 0 if actuals else hold
        reservation.status = ReservationStatus.HELD
        reservation.held_micros = held
        reservation.expires_ms = txn.now_ms + ttl_ms
        account.reserved_micros += held
        account.active_reservations += 1
        if account.policy.mode is EnforcementMode.CALIBRATED:
            account.exposure_micros += amount_micros
        for dim, units in dims.items():
            reserved, committed = account.usage.get(dim, (0, 0))
            _set_usage(account, dim, reserved + units, committed)
        if own_limits:
            _count_allowed(account, txn.now_ms)
        account.blocked = False  # money is held again: the run is off its wall
        txn.record(EventType.RESERVED, reservation, amount_micros=held)
    else:
        # A block (or throttle) changes no money, but is remembered so a retry
        # cannot turn it into an allow once budget frees up.
        assert verdict is not None
        reservation.retry_at_ms = verdict.retry_at_ms
        txn.reservations[reservation_id] = reservation
        if own_limits and count and reservation.decision is Decision.BLOCK:
            if _may_downgrade(account, reservation):
                reservation.uncounted = True
            else:
                txn.count_block(reservation)
    return reservation


def _may_downgrade(account: Account, reservation: Reservation) -> bool:
    """Whether the server may still answer this block with an automatic
    downgrade (decisions.short_of_money, on a run with auto_downgrade): an
    LLM call blocked by a dollar or exposure ceiling. Such a block is counted
    only once the server answers it as a block (count_block)."""
    return (
        account.policy.auto_downgrade
        and bool(reservation.pricing)
        and reservation.reason is DecisionReason.INSUFFICIENT_BUDGET
        and reservation.dimension in (Dimension.SPEND, Dimension.EXPOSURE)
    )


def count_block(store: RunStore, run_id: str, reservation_id: str, now_ms: int) -> BudgetState:
    """Count a block left uncounted (Reservation.uncounted): the server
    answered it as a block after all. Idempotent. Returns the run's state."""
    txn = _open(store, run_id, now_ms)
    reservation = _reservation(txn, reservation_id)
    if reservation is None:
        raise errors.ReservationNotFound(run_id, reservation_id)
    if reservation.uncounted:
        reservation.uncounted = False
        txn.reservations[reservation_id] = reservation
        txn.count_block(reservation)
    return txn.apply()


def hold_for_child(
    store: RunStore, run_id: str, hold_id: str, amount_micros: int, ttl_ms: int, now_ms: int
) -> ParentOutcome:
    """The reserve saga's step on an ancestor run: hold a descendant's estimate.

    Idempotent by hold id (a repeat answers what the hold is now). A missing
    ancestor (its keys aged out after it closed) blocks like a closed one.
    """
    scope = ScopeRef(ScopeKind.RUN, run_id)
    if store.load_account() is None:
        return ParentOutcome(
            scope, ReservationStatus.BLOCKED, False, DecisionReason.RUN_CLOSED, Period.LIFETIME
        )
    txn = _open(store, run_id, now_ms)
    found = _reservation(txn, hold_id)
    replayed = found is not None
    if found is None:
        found = _decide(txn, hold_id, amount_micros, ttl_ms, ttl_ms, own_limits=False)
    txn.apply()
    blocked = found.status is ReservationStatus.BLOCKED
    return ParentOutcome(
        scope, found.status, replayed, found.reason, Period.LIFETIME if blocked else None
    )


def settle_for_child(
    store: RunStore, run_id: str, hold_id: str, actual_micros: int | None, now_ms: int
) -> None:
    """The commit (or, with None, refund) saga's step on an ancestor run.

    Idempotent. The descendant's record is the truth: a commit always records
    the money (late when the hold expired, never reached this run, or was
    blocked here while an advisory descendant held it), and a
    release after any settlement changes nothing. The one exception: a commit
    that would bring this run's committed total past MAX_MICROS is not
    recorded here (the hold stays until it expires), rather than fail the
    descendant's commit, as the Redis script does.
    """
    if store.load_account() is None:
        return  # the ancestor aged out after it closed: nothing left to charge
    txn = _open(store, run_id, now_ms)
    found = _reservation(txn, hold_id)
    if actual_micros is None:
        if found is not None and found.status is ReservationStatus.HELD:
            _release(txn, found)
    elif txn.account.committed_micros + actual_micros > MAX_MICROS:
        pass
    elif found is None:
        found = Reservation(
            reservation_id=hold_id,
            amount_micros=0,
            requested_ttl_ms=None,
            status=ReservationStatus.EXPIRED,
            reason=DecisionReason.WITHIN_BUDGET,
            created_ms=now_ms,
        )
        _commit(txn, run_id, found, actual_micros)
    elif found.status in (ReservationStatus.HELD, ReservationStatus.EXPIRED):
        _commit(txn, run_id, found, actual_micros)
    elif found.status is ReservationStatus.BLOCKED:
        # Blocked here, yet the descendant held it (an advisory run's warning).
        found.status = ReservationStatus.EXPIRED
        _commit(txn, run_id, found, actual_micros)
    txn.apply()


def commit(
    store: RunStore,
    run_id: str,
    reservation_id: str,
    actual_micros: int,
    now_ms: int,
    actual_tokens: int | None = None,
    output_tokens: int | None = None,
) -> CommitResult:
    """Settle a reservation with its actual cost; `actual_tokens` are all its
    tokens and `output_tokens` its output (reasoning included) when committed
    by usage: they feed a CALIBRATED run's samples."""
    txn = _open(store, run_id, now_ms)
    reservation = _reservation(txn, reservation_id)
    if reservation is None:
        raise errors.ReservationNotFound(run_id, reservation_id)
    status = reservation.status
    if status is ReservationStatus.BLOCKED:
        raise errors.ReservationBlocked(run_id, reservation_id)
    if status is ReservationStatus.RELEASED:
        raise errors.ReservationReleased(run_id, reservation_id)
    if status in SETTLED_BY_COMMIT:
        if reservation.actual_micros != actual_micros:
            raise errors.IdempotencyConflict(run_id, reservation_id, "committed")
        return CommitResult(
            state=txn.apply(),
            reservation_status=status,
            actual_micros=actual_micros,
            held_micros=reservation.held_micros,
            overrun_micros=reservation.overrun_micros,
            replayed=True,
        )

    overrun = _commit(txn, run_id, reservation, actual_micros, actual_tokens)
    if output_tokens is not None:
        _observe(txn.account, reservation.pricing, output_tokens)
    return CommitResult(
        state=txn.apply(),
        reservation_status=reservation.status,
        actual_micros=actual_micros,
        held_micros=reservation.held_micros,
        overrun_micros=overrun,
        replayed=False,
    )


def _commit(
    txn: _Txn,
    run_id: str,
    reservation: Reservation,
    actual_micros: int,
    actual_tokens: int | None = None,
) -> int:
    """Settle a held or expired reservation with its actual cost (and, when
    known, tokens; else the tokens held). Returns the overrun."""
    account = txn.account
    if account.committed_micros + actual_micros > MAX_MICROS:
        # Totals must stay exact in every backend (Lua numbers are doubles).
        raise errors.committed_total_out_of_range(run_id)
    late = reservation.status is ReservationStatus.EXPIRED
    if late:
        # The hold is gone; the money was spent all the same.
        overrun = actual_micros
        reservation.status = ReservationStatus.LATE_COMMITTED
    else:
        overrun = max(0, actual_micros - reservation.held_micros)
        reservation.status = ReservationStatus.COMMITTED
        txn.unhold(reservation)
    actual_dims = dict(reservation.dims)
    if actual_tokens is not None:
        actual_dims[TOKENS] = actual_tokens
    for dim, units in actual_dims.items():
        reserved, committed = account.usage.get(dim, (0, 0))
        _set_usage(account, dim, reserved, committed + units)
    reservation.actual_micros = actual_micros
    reservation.overrun_micros = overrun
    reservation.settled_ms = txn.now_ms
    account.committed_micros += actual_micros
    account.overrun_micros += overrun
    txn.record(
        EventType.COMMITTED,
        reservation,
        amount_micros=reservation.held_micros,
        actual_micros=actual_micros,
        overrun_micros=overrun,
        late=late,
    )
    _cross_thresholds(txn, reservation)
    return overrun


def _cross_thresholds(txn: _Txn, reservation: Reservation) -> None:
    """One event per threshold band the committed spend newly reached, in order."""
    account = txn.account
    reached = band(account)
    percents = (*account.policy.thresholds, 100)
    while account.threshold < reached:
        account.threshold = Threshold(account.threshold + 1)
        if percents[account.threshold - 1]:  # a level turned off is passed silently
            txn.record(EventType.THRESHOLD_CROSSED, reservation, threshold=account.threshold)


def _release(txn: _Txn, reservation: Reservation) -> int:
    held = txn.unhold(reservation)
    reservation.status = ReservationStatus.RELEASED
    reservation.settled_ms = txn.now_ms
    txn.record(EventType.REFUNDED, reservation, amount_micros=held)
    return held


def refund(store: RunStore, run_id: str, reservation_id: str, now_ms: int) -> RefundResult:
    txn = _open(store, run_id, now_ms)
    reservation = _reservation(txn, reservation_id)
    if reservation is None:
        raise errors.ReservationNotFound(run_id, reservation_id)
    if reservation.status is ReservationStatus.BLOCKED:
        raise errors.ReservationBlocked(run_id, reservation_id)
    if reservation.status is not ReservationStatus.HELD:
        # Already settled (refunded, committed or expired): nothing to release.
        return RefundResult(
            state=txn.apply(),
            reservation_status=reservation.status,
            released_micros=0,
            replayed=True,
        )
    held = _release(txn, reservation)
    return RefundResult(
        state=txn.apply(),
        reservation_status=ReservationStatus.RELEASED,
        released_micros=held,
        replayed=False,
    )


def resolve_approval(
    store: RunStore, run_id: str, trigger: str, approve: bool, now_ms: int
) -> ApprovalResult:
    """Approve or deny a requested escalation. Idempotent; a resolved one
    cannot be turned the other way."""
    txn = _open(store, run_id, now_ms)
    account = txn.account
    status = account.approvals.get(trigger)
    if status is None:
        raise errors.ApprovalNotFound(approval_id(run_id, trigger))
    target = ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED
    if status is target:
        return ApprovalResult(status, txn.apply(), replayed=True)
    if status is not ApprovalStatus.PENDING:
        raise errors.ApprovalResolved(run_id, approval_id(run_id, trigger), status.name.lower())
    account.approvals[trigger] = target
    event = EventType.APPROVAL_GRANTED if approve else EventType.APPROVAL_DENIED
    txn.record(event, approval=trigger)
    return ApprovalResult(target, txn.apply(), replayed=False)


def suspend_run(store: RunStore, run_id: str, now_ms: int) -> CloseRunResult:
    """The kill switch: no new holds until resume_run; holds still settle."""
    return _set_status(store, run_id, now_ms, RunStatus.SUSPENDED, EventType.SUSPENDED)


def resume_run(store: RunStore, run_id: str, now_ms: int) -> CloseRunResult:
    return _set_status(store, run_id, now_ms, RunStatus.OPEN, EventType.RESUMED)


def _set_status(
    store: RunStore, run_id: str, now_ms: int, status: RunStatus, event: EventType
) -> CloseRunResult:
    txn = _open(store, run_id, now_ms)
    account = txn.account
    if account.status is RunStatus.CLOSED:
        raise errors.RunClosed(run_id)
    if account.status is status:
        return CloseRunResult(state=txn.apply(), replayed=True)
    account.status = status
    txn.record(event)
    return CloseRunResult(state=txn.apply(), replayed=False)


def close_run(store: RunStore, run_id: str, now_ms: int) -> CloseRunResult:
    txn = _open(store, run_id, now_ms)
    account = txn.account
    if account.status is RunStatus.CLOSED:
        return CloseRunResult(state=txn.apply(), replayed=True)
    account.status = RunStatus.CLOSED
    account.closed_ms = now_ms
    txn.record(EventType.CLOSED)
    return CloseRunResult(state=txn.apply(), replayed=False)


__all__ = [
    "Decision",
    "RunStore",
    "adopt_child",
    "band",
    "close_run",
    "commit",
    "count_block",
    "create_run",
    "expire_due",
    "get_state",
    "refund",
    "reserve",
]
