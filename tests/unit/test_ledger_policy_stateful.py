"""Run policies on every storage backend against the reference model, under Hypothesis.

Runs get random policies (every enforcement mode, thresholds and throttle
delays, token, meter, rate and in-flight limits, escalation triggers,
calibration and exposure allowances, automatic downgrades), then random
reserves (money, LLM-call tokens, priced LLM calls, meter units, downgrade
holds), commits (with and without actual and output tokens), refunds, blocks
counted late, approvals and denials, sweeps and clock moves. Every answer,
every stored row and every change log must equal the model's; a CALIBRATED
run's exposure invariant (check_exposure) and the blocked-call count
(check_blocks) must hold after every step. test_ledger_policy.py pins the
model's answers to hand-worked examples.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from runcap_server import errors
from runcap_server.clock import ManualClock
from runcap_server.ledger.saga import ReserveExtras
from runcap_server.ledger.types import (
    SETTLED_BY_COMMIT,
    Account,
    ChangePage,
    Decision,
    EnforcementMode,
    EventType,
    Reservation,
    ReservationStatus,
    RunPolicy,
    RunSpec,
)
from runcap_server.prices import Rates, estimate_micros
from tests.ledger_backends import (
    NO_REDIS,
    Ledger,
    RedisTargets,
    check_machine,
    make_backend,
    redis_targets,
    snapshot,
)

T = "t0"
RUNS = st.sampled_from(["r0", "r0", "r1"])
IDS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
METERS = st.sampled_from(["", "", "tool:x", "tool:y"])

# Priced LLM calls (estimates.Estimate.pricing) on two models, one with rates
# large enough to exercise the Redis script's exact arithmetic.
MODELS = {
    "m1": Rates(1_500_000, 2_500_001, 0, 0, 0),
    "m2": Rates(3, 2**40 + 999_999, 0, 0, 0),
}

LIMITS = st.integers(50, 500) | st.just(4_000_000)

POLICIES = st.builds(
    RunPolicy,
    mode=st.sampled_from([*EnforcementMode, EnforcementMode.CALIBRATED]),
    soft_margin_percent=st.sampled_from([0, 10, 50]),
    thresholds=st.sampled_from([(60, 80, 95), (0, 0, 0), (0, 0, 50), (10, 20, 30)]),
    throttle_base_ms=st.sampled_from([1, 100, 400]),
    throttle_max_ms=st.just(800),
    max_tokens=st.none() | st.integers(1, 400),
    meter_limits=st.sampled_from([(), (("tool:x", 2),), (("tool:x", 1), ("tool:y", 3))]),
    rate_limit=st.none() | st.tuples(st.integers(1, 4), st.sampled_from([500, 1_000])),
    max_in_flight=st.none() | st.integers(1, 3),
    approval_percent=st.sampled_from([0, 0, 50, 90]),
    approved_meters=st.sampled_from([(), (), ("tool:x",)]),
    calibration_min_samples=st.integers(1, 4),
    exposure_allowance_micros=st.none() | st.integers(0, 100),
    exposure_allowance_percent=st.none() | st.sampled_from([0, 25]),
    auto_downgrade=st.booleans(),
)


class PolicyMachine(RuleBasedStateMachine):
    kinds: tuple[str, ...] = ("sqlite",)
    redis = RedisTargets()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="runcap-policy-"))
        self.clocks = [ManualClock() for _ in range(len(self.kinds) + 1)]
        self.ledgers: list[Ledger] = [
            make_backend(
                kind,
                self.directory,
                clock,
                default_ttl_ms=1_000,
                log_retention=1_000,
                synchronous="OFF",
                redis=self.redis,
            )
            for kind, clock in zip(("model", *self.kinds), self.clocks, strict=True)
        ]
        for ledger in self.ledgers:
            self.run(ledger.start())
        self.created: set[str] = set()
        # Reservations first made as a downgrade's hold: their blocks never count.
        self.stand_ins: set[tuple[str, str]] = set()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            for ledger in self.ledgers:
                self.run(ledger.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def same(self, call: Callable[[Ledger], Coroutine[Any, Any, Any]]) -> None:
        """Every ledger answers `call` exactly as the model does."""
        outcomes = []
        for ledger in self.ledgers:
            try:
                outcomes.append(("ok", self.run(call(ledger))))
            except errors.RuncapError as exc:
                outcomes.append(("error", (type(exc), exc.message)))
        for kind, outcome in zip(self.kinds, outcomes[1:], strict=True):
            assert outcome == outcomes[0], (kind, outcomes[0], outcome)

    @initialize(policy=POLICIES, limit=LIMITS)
    def create_first(self, policy: RunPolicy, limit: int) -> None:
        self.create("r0", policy, limit)

    @rule(run_id=RUNS, policy=POLICIES, limit=LIMITS)
    def create(self, run_id: str, policy: RunPolicy, limit: int) -> None:
        self.same(
            lambda ledger: ledger.create_run(T, RunSpec(run_id, limit, {}, None, policy=policy))
        )
        self.created.add(run_id)

    @rule(
        run_id=RUNS,
        reservation_id=IDS,
        amount=st.integers(1, 120),
        tokens=st.sampled_from([0, 0, 50, 150]),
        meter=METERS,
        units=st.integers(1, 2),
        ttl=st.none() | st.sampled_from([300, 1_000]),
    )
    def reserve(
        self,
        run_id: str,
        reservation_id: str,
        amount: int,
        tokens: int,
        meter: str,
        units: int,
        ttl: int | None,
    ) -> None:
        # An LLM call's tokens come with its fingerprint (the retry key).
        extras = ReserveExtras(
            fingerprint=f"llm-{amount}-{tokens}" if tokens else "",
            tokens=tokens,
            meter=meter,
            meter_units=units if meter else 0,
        )
        self.same(lambda ledger: ledger.reserve(T, run_id, reservation_id, amount, ttl, extras))

    @rule(
        run_id=RUNS,
        reservation_id=IDS,
        model=st.sampled_from(sorted(MODELS)),
        input_tokens=st.integers(0, 20),
        max_output=st.integers(1, 60),
        ttl=st.none() | st.sampled_from([300, 1_000]),
        downgrade=st.sampled_from([False, False, True]),
    )
    def reserve_llm(
        self,
        run_id: str,
        reservation_id: str,
        model: str,
        input_tokens: int,
        max_output: int,
        ttl: int | None,
        downgrade: bool,
    ) -> None:
        rates = MODELS[model]
        amount = estimate_micros(rates, input_tokens, max_output) if model == "m1" else 0
        if model == "m2":
            # Large rates: only a run with a large limit holds these.
            max_output = max_output % 3 + 1
            amount = estimate_micros(rates, input_tokens, max_output)
        pricing = f"v1#{rates.encode()}#{max_output}#acme#{model}#{input_tokens}"
        extras = ReserveExtras(
            fingerprint=f"llm:acme:{model}:{input_tokens}:{max_output}",
            pricing=pricing,
            tokens=input_tokens + max_output,
            downgrade=downgrade,
        )
        _, before = self.run(snapshot(self.ledgers[0], T, run_id))
        if downgrade and all(r.reservation_id != reservation_id for r in before):
            self.stand_ins.add((run_id, reservation_id))
        self.same(lambda ledger: ledger.reserve(T, run_id, reservation_id, amount, ttl, extras))

    @rule(run_id=RUNS, reservation_id=IDS)
    def count_block(self, run_id: str, reservation_id: str) -> None:
        self.same(lambda ledger: ledger.count_block(T, run_id, reservation_id))

    @rule(
        run_id=RUNS,
        reservation_id=IDS,
        actual=st.integers(0, 150),
        tokens=st.none() | st.integers(0, 200),
        output=st.none() | st.integers(0, 80),
    )
    def commit(
        self, run_id: str, reservation_id: str, actual: int, tokens: int | None, output: int | None
    ) -> None:
        self.same(lambda ledger: ledger.commit(T, run_id, reservation_id, actual, tokens, output))

    @rule(
        run_id=RUNS,
        trigger=st.sampled_from(["spend", "m:tool:x", "m:tool:y"]),
        approve=st.booleans(),
    )
    def resolve(self, run_id: str, trigger: str, approve: bool) -> None:
        self.same(lambda ledger: ledger.resolve_approval(T, run_id, trigger, approve))

    @rule(run_id=RUNS, reservation_id=IDS)
    def refund(self, run_id: str, reservation_id: str) -> None:
        self.same(lambda ledger: ledger.refund(T, run_id, reservation_id))

    @rule(run_id=RUNS)
    def get(self, run_id: str) -> None:
        self.same(lambda ledger: ledger.get_run(T, run_id))

    @rule()
    def sweep(self) -> None:
        self.same(lambda ledger: ledger.sweep(100))

    @rule(ms=st.sampled_from([1, 100, 250, 500, 1_000]) | st.integers(0, 1_500))
    def advance_clock(self, ms: int) -> None:
        for clock in self.clocks:
            clock.advance(ms)

    @invariant()
    def ledgers_agree(self) -> None:
        for run_id in self.created:
            model = self.run(snapshot(self.ledgers[0], T, run_id))
            log = self.run(self.ledgers[0].read_changes(T, run_id, 0, 10_000))
            for kind, ledger in zip(self.kinds, self.ledgers[1:], strict=True):
                assert self.run(snapshot(ledger, T, run_id)) == model, kind
                assert self.run(ledger.read_changes(T, run_id, 0, 10_000)) == log, kind
            account = model[0]
            assert account is not None
            assert account.active_reservations >= 0
            for reserved, committed in account.usage.values():
                assert reserved >= 0
                assert committed >= 0
            if account.policy.mode in (EnforcementMode.HARD_GATE, EnforcementMode.ACTUALS_ONLY):
                state = account.state()
                assert state.committed_micros + state.reserved_micros <= (
                    state.limit_micros + state.overrun_micros
                )
            if account.policy.mode is EnforcementMode.CALIBRATED:
                check_exposure(account, model[1])
            stand_ins = {i for r, i in self.stand_ins if r == run_id}
            check_blocks(account, model[1], log, stand_ins)
            # The state every response and Watch event carries: the last change's.
            if log.changes:
                last = log.changes[-1].state
                assert last.revision == account.revision
                assert (last.exposure_micros, last.exposure_ceiling_micros) == (
                    account.state().exposure_micros,
                    account.state().exposure_ceiling_micros,
                )


def check_blocks(
    account: Account, reservations: list[Reservation], log: ChangePage, stand_ins: set[str]
) -> None:
    """Every Reserve answered BLOCK counts once, except a downgrade's hold and
    a block left uncounted; the run is blocked since its last BLOCKED change
    unless a RESERVED one came after it; the first block of a series is one
    BLOCKED change."""
    counted = [
        r
        for r in reservations
        if r.status is ReservationStatus.BLOCKED
        and r.decision is Decision.BLOCK
        and not r.uncounted
        and r.reservation_id not in stand_ins
    ]
    assert account.blocked_calls == len(counted)
    assert all(r.decision is Decision.BLOCK for r in reservations if r.uncounted)
    marks = [c for c in log.changes if c.type in (EventType.BLOCKED, EventType.RESERVED)]
    assert account.blocked == bool(marks and marks[-1].type is EventType.BLOCKED)
    assert sum(1 for c in marks if c.type is EventType.BLOCKED) <= account.blocked_calls
    for change in log.changes:
        assert (change.reason is not None) == (change.type is EventType.BLOCKED)


def check_exposure(account: Account, reservations: list[Reservation]) -> None:
    """A CALIBRATED run's invariants.

    Its exposure is the sum of the worst cases of the holds in flight, and
    committed + exposure <= limit + allowance + what commits billed beyond
    their own worst case (all of a late commit's cost: its hold was gone).
    The calibrated gate also holds: committed + reserved <= limit + overrun.
    """
    held = [r for r in reservations if r.status is ReservationStatus.HELD]
    assert account.exposure_micros == sum(r.amount_micros for r in held)
    beyond = sum(
        r.actual_micros or 0
        if r.status is ReservationStatus.LATE_COMMITTED
        else max(0, (r.actual_micros or 0) - r.amount_micros)
        for r in reservations
        if r.status in SETTLED_BY_COMMIT
    )
    limit = account.spec.limit_micros
    ceiling = limit + account.policy.exposure_allowance(limit)
    assert account.committed_micros + account.exposure_micros <= ceiling + beyond
    state = account.state()
    assert state.exposure_micros == account.committed_micros + account.exposure_micros
    assert state.exposure_ceiling_micros == ceiling
    assert account.committed_micros + account.reserved_micros <= limit + account.overrun_micros
    for r in held:
        assert r.held_micros <= r.amount_micros


SETTINGS = settings(max_examples=120, deadline=None, stateful_step_count=30)


def _check(kinds: tuple[str, ...], redis: RedisTargets = NO_REDIS) -> None:
    check_machine(PolicyMachine, SETTINGS, kinds, redis)


def test_sqlite_policies_match_the_model() -> None:
    _check(("sqlite",))


@pytest.mark.redis
@pytest.mark.timeout(600)
def test_redis_cluster_policies_match_the_model(request: pytest.FixtureRequest) -> None:
    _check(("redis-cluster",), redis_targets(request, "redis-cluster"))
