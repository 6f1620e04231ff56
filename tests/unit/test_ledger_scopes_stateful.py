"""Parent scopes on every backend against the reference model, under Hypothesis.

A fixed tree (root -> child -> grandchild, all charged to one team, a sibling
run on the same team) takes random reserves, commits, refunds, team ceiling
changes, clock advances and sweeps. After every step every backend must have
answered exactly as the model did, every run and the team must read the same,
and the ledger identities must hold: each run's totals are its own spend plus
its descendants', the team's are the sum of the root runs', and a parent
always holds at least what its children hold. A block counts on the run whose
Reserve it answered, whichever scope decided it, never on its ancestors.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from runcap_server import errors
from runcap_server.clock import ManualClock
from runcap_server.ledger.types import (
    Decision,
    EventType,
    Period,
    ReserveResult,
    RunSpec,
    ScopeKind,
    ScopeRef,
)
from tests.ledger_backends import (
    NO_REDIS,
    Ledger,
    RedisTargets,
    check_machine,
    make_backend,
    redis_targets,
)

T = "t0"
TEAM = ScopeRef(ScopeKind.TEAM, "acme")
# run -> (parent, limit)
TREE = {"root": ("", 900), "child": ("root", 600), "grandchild": ("child", 400), "solo": ("", 500)}
RUNS = st.sampled_from(list(TREE))
IDS = st.sampled_from(["a", "b", "c", "d"])
AMOUNTS = st.sampled_from([50, 100, 150, 300]) | st.integers(1, 400)
TTLS = st.none() | st.sampled_from([500, 1_000, 2_000])
ADVANCES = st.sampled_from([1, 500, 1_000, 3_000]) | st.integers(0, 4_000)
LIMITS = st.none() | st.sampled_from([200, 500, 1_000]) | st.integers(1, 1_200)


class ScopeMachine(RuleBasedStateMachine):
    kinds: tuple[str, ...] = ("sqlite",)
    redis = RedisTargets()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="runcap-scopes-"))
        self.clocks = [ManualClock() for _ in range(len(self.kinds) + 1)]
        self.ledgers: list[Ledger] = [
            make_backend(kind, self.directory, clock, default_ttl_ms=2_000, redis=self.redis)
            for kind, clock in zip(("model", *self.kinds), self.clocks, strict=True)
        ]
        for ledger in self.ledgers:
            self.run(ledger.start())
        self.team_limit: int | None = None
        # Each run's blocked Reserves, from the model's answers.
        self.blocked_calls = dict.fromkeys(TREE, 0)
        for run_id, (parent, limit) in TREE.items():
            spec = RunSpec(run_id, limit, {}, None, parent_run_id=parent)
            if not parent:
                spec = RunSpec(run_id, limit, {}, None, team_id=TEAM.id)
            self.same(lambda ledger, s=spec: ledger.create_run(T, s))

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            for ledger in self.ledgers:
                self.run(ledger.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def same(self, call: Any) -> Any:
        """Apply one call to every ledger; all must answer as the model did."""
        outcomes = []
        for ledger in self.ledgers:
            try:
                outcomes.append(("ok", self.run(call(ledger))))
            except errors.RuncapError as exc:
                outcomes.append(("error", (type(exc), exc.message)))
        for kind, outcome in zip(self.kinds, outcomes[1:], strict=True):
            assert outcome == outcomes[0], (kind, outcomes[0], outcome)
        return outcomes[0]

    @rule(run_id=RUNS, reservation_id=IDS, amount=AMOUNTS, ttl=TTLS)
    def reserve(self, run_id: str, reservation_id: str, amount: int, ttl: int | None) -> None:
        status, result = self.same(
            lambda ledger: ledger.reserve(T, run_id, reservation_id, amount, ttl)
        )
        if status == "ok":
            assert isinstance(result, ReserveResult)
            if result.decision is Decision.BLOCK and not result.replayed:
                self.blocked_calls[run_id] += 1

    @rule(run_id=RUNS, reservation_id=IDS, actual=st.sampled_from([0, 50, 100, 500]))
    def commit(self, run_id: str, reservation_id: str, actual: int) -> None:
        self.same(lambda ledger: ledger.commit(T, run_id, reservation_id, actual))

    @rule(run_id=RUNS, reservation_id=IDS)
    def refund(self, run_id: str, reservation_id: str) -> None:
        self.same(lambda ledger: ledger.refund(T, run_id, reservation_id))

    @rule(limit=LIMITS, period=st.sampled_from(list(Period)))
    def set_team_limit(self, limit: int | None, period: Period) -> None:
        self.same(lambda ledger: ledger.set_scope_limit(T, TEAM, period, limit))

    @rule(ms=ADVANCES)
    def advance(self, ms: int) -> None:
        for clock in self.clocks:
            clock.advance(ms)

    @rule()
    def sweep(self) -> None:
        # Counts may differ (Redis sweeps runs and scopes in another order and
        # lazily expired holds are not counted): compare what the ledgers read.
        for ledger in self.ledgers:
            self.run(ledger.sweep(100))

    @invariant()
    def ledgers_agree_and_add_up(self) -> None:
        async def views_of(ledger: Ledger) -> list[Any]:
            return [await ledger.get_run(T, r) for r in TREE]

        _, views = self.same(views_of)
        _, team = self.same(lambda ledger: ledger.get_scope(T, TEAM))
        state = {v.spec.run_id: v.state for v in views}
        # Committed spend rolls up the tree and into the team, exactly.
        assert state["child"].committed_micros >= state["grandchild"].committed_micros
        assert state["root"].committed_micros >= state["child"].committed_micros
        lifetime = team.period(Period.LIFETIME)
        roots = state["root"].committed_micros + state["solo"].committed_micros
        assert lifetime.committed_micros == roots
        # Holds: a parent holds at least what its children hold (its holds
        # outlive theirs by the saga's grace), and nothing once all are due.
        roots_held = state["root"].reserved_micros + state["solo"].reserved_micros
        assert lifetime.reserved_micros >= roots_held
        assert state["root"].reserved_micros >= state["child"].reserved_micros
        assert state["child"].reserved_micros >= state["grandchild"].reserved_micros
        for s in state.values():
            assert s.committed_micros + s.reserved_micros <= s.limit_micros + s.overrun_micros
        assert {v.spec.run_id: v.blocked_calls for v in views} == self.blocked_calls
        for run_id, s in state.items():
            # Blocked since the last BLOCKED change, unless a RESERVED one (its
            # own or a descendant's hold on it) came after.
            log = self.run(self.ledgers[0].read_changes(T, run_id, 0, 10_000)).changes
            marks = [c.type for c in log if c.type in (EventType.BLOCKED, EventType.RESERVED)]
            assert s.blocked == bool(marks and marks[-1] is EventType.BLOCKED)


SETTINGS = settings(max_examples=60, deadline=None, stateful_step_count=25)


def _check(kinds: tuple[str, ...], redis: RedisTargets = NO_REDIS) -> None:
    check_machine(ScopeMachine, SETTINGS, kinds, redis)


def test_sqlite_scopes_match_the_model() -> None:
    _check(("sqlite",))


@pytest.mark.redis
@pytest.mark.timeout(600)
def test_redis_cluster_scopes_match_the_model(request: pytest.FixtureRequest) -> None:
    _check(("redis-cluster",), redis_targets(request, "redis-cluster"))
