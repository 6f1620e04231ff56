"""Run policies on every backend: enforcement modes, graduated thresholds and the
throttle, token / meter / rate / in-flight limits, and subagent caps."""

from __future__ import annotations

import asyncio

import pytest

from runcap_server import errors
from runcap_server.clock import ManualClock
from runcap_server.ledger.saga import ReserveExtras
from runcap_server.ledger.types import (
    MAX_MICROS,
    SPEND_APPROVAL,
    ApprovalStatus,
    Decision,
    DecisionReason,
    Dimension,
    EnforcementMode,
    EventType,
    Period,
    RunPolicy,
    RunSpec,
    ScopeKind,
    ScopeRef,
    Threshold,
)
from tests.ledger_backends import Ledger

T = "acme"
NO_THRESHOLDS = (0, 0, 0)


def spec(run_id: str, limit: int = 1_000, **policy: object) -> RunSpec:
    return RunSpec(run_id, limit, {}, None, policy=RunPolicy(**policy))  # type: ignore[arg-type]


# (mode, margin) -> (decision, held) for a 200 reserve on a run with 900 of 1,000 spent.
MODES = [
    pytest.param(EnforcementMode.HARD_GATE, 0, Decision.BLOCK, 0, id="hard_gate"),
    pytest.param(EnforcementMode.SOFT_GATE, 20, Decision.ALLOW, 200, id="soft_gate-fits-margin"),
    pytest.param(EnforcementMode.SOFT_GATE, 5, Decision.BLOCK, 0, id="soft_gate-past-margin"),
    pytest.param(EnforcementMode.ADVISORY, 0, Decision.WARN, 200, id="advisory"),
    pytest.param(EnforcementMode.ACTUALS_ONLY, 0, Decision.ALLOW, 0, id="actuals_only"),
]


@pytest.mark.parametrize(("mode", "margin", "decision", "held"), MODES)
async def test_each_mode_decides_a_reserve_past_the_limit_its_own_way(
    ledger: Ledger, mode: EnforcementMode, margin: int, decision: Decision, held: int
) -> None:
    run = spec("run", mode=mode, soft_margin_percent=margin, thresholds=NO_THRESHOLDS)
    await ledger.create_run(T, run)
    await ledger.reserve(T, "run", "spent", 900, None)
    await ledger.commit(T, "run", "spent", 900)

    result = await ledger.reserve(T, "run", "next", 200, None)

    assert (result.decision, result.held_micros, result.mode) == (decision, held, mode)
    assert result.state.reserved_micros == held
    if decision is not Decision.ALLOW:
        assert (result.reason, result.dimension) == (
            DecisionReason.INSUFFICIENT_BUDGET,
            Dimension.SPEND,
        )
    replay = await ledger.reserve(T, "run", "next", 200, None)
    assert (replay.replayed, replay.decision) == (True, decision)


async def test_actuals_only_lets_the_last_call_overshoot_and_blocks_the_next(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, spec("run", mode=EnforcementMode.ACTUALS_ONLY))
    first = await ledger.reserve(T, "run", "a", 10_000, None)  # an estimate far past the limit
    assert (first.decision, first.held_micros, first.state.active_reservations) == (
        Decision.ALLOW,
        0,
        1,
    )
    await ledger.commit(T, "run", "a", 990)
    last = await ledger.reserve(T, "run", "b", 50, None)
    assert last.decision is Decision.ALLOW  # 990 < 1,000: still under the ceiling
    committed = await ledger.commit(T, "run", "b", 45)
    # The whole cost of an unheld call counts as overrun: 1,035 = 1,000 + 35 past it.
    assert (committed.state.committed_micros, committed.overrun_micros) == (1_035, 45)
    blocked = await ledger.reserve(T, "run", "c", 1, None)
    assert (blocked.decision, blocked.reason) == (
        Decision.BLOCK,
        DecisionReason.INSUFFICIENT_BUDGET,
    )


async def test_advisory_warns_about_a_parent_scope_and_holds_all_the_same(
    ledger: Ledger,
) -> None:
    await ledger.set_scope_limit(T, ScopeRef(ScopeKind.TEAM, "core"), Period.LIFETIME, 100)
    run = RunSpec(
        "run", 1_000, {}, None, team_id="core", policy=RunPolicy(EnforcementMode.ADVISORY)
    )
    await ledger.create_run(T, run)
    result = await ledger.reserve(T, "run", "big", 500, None)
    assert (result.decision, result.reason, result.held_micros) == (
        Decision.WARN,
        DecisionReason.INSUFFICIENT_BUDGET,
        500,
    )
    assert result.blocking_scope == ScopeRef(ScopeKind.TEAM, "core")
    # A closed run blocks even an advisory one.
    await ledger.close_run(T, "run")
    closed = await ledger.reserve(T, "run", "late", 1, None)
    assert (closed.decision, closed.reason) == (Decision.BLOCK, DecisionReason.RUN_CLOSED)


async def test_thresholds_cross_in_order_and_the_throttle_spaces_calls_out(
    ledger: Ledger, clock: ManualClock
) -> None:
    await ledger.create_run(T, spec("run", throttle_base_ms=1_000, throttle_max_ms=3_000))

    async def spend(res_id: str, amount: int) -> None:
        assert (await ledger.reserve(T, "run", res_id, amount, None)).decision is Decision.ALLOW
        await ledger.commit(T, "run", res_id, amount)

    await spend("a", 600)
    await spend("b", 200)
    await spend("c", 150)  # 950: the throttle band
    assert (await ledger.get_run(T, "run")).state.threshold is Threshold.THROTTLE

    delays = []
    for i in range(4):
        allowed = await ledger.reserve(T, "run", f"ok{i}", 1, None)
        assert allowed.decision is Decision.ALLOW
        await ledger.refund(T, "run", f"ok{i}")
        throttled = await ledger.reserve(T, "run", f"wait{i}", 1, None)
        assert (throttled.decision, throttled.reason, throttled.dimension) == (
            Decision.THROTTLE,
            DecisionReason.THROTTLED,
            Dimension.SPEND,
        )
        assert throttled.held_micros == 0
        assert throttled.retry_at_ms is not None
        delay = throttled.retry_at_ms - clock.now_ms()
        delays.append(delay)
        clock.advance(delay)
    assert delays == [1_000, 2_000, 3_000, 3_000]  # doubling, up to the maximum

    await spend("last", 50)  # 1,000: stop
    page = await ledger.read_changes(T, "run", 0, 1_000)
    crossed = [c.threshold for c in page.changes if c.type is EventType.THRESHOLD_CROSSED]
    assert crossed == [Threshold.INFO, Threshold.WARN, Threshold.THROTTLE, Threshold.STOP]
    first = next(c for c in page.changes if c.type is EventType.THRESHOLD_CROSSED)
    assert (first.reservation_id, first.state.threshold) == ("a", Threshold.INFO)


async def test_a_threshold_turned_off_is_passed_without_an_event(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("run", thresholds=(0, 50, 0)))
    await ledger.reserve(T, "run", "a", 990, None)
    await ledger.commit(T, "run", "a", 990)
    page = await ledger.read_changes(T, "run", 0, 100)
    crossed = [c.threshold for c in page.changes if c.type is EventType.THRESHOLD_CROSSED]
    assert crossed == [Threshold.WARN]
    # No throttle band: the next call is simply allowed.
    assert (await ledger.reserve(T, "run", "b", 5, None)).decision is Decision.ALLOW
    assert (await ledger.reserve(T, "run", "c", 5, None)).decision is Decision.ALLOW


async def test_the_rate_limit_throttles_until_the_next_window(
    ledger: Ledger, clock: ManualClock
) -> None:
    await ledger.create_run(T, spec("run", rate_limit=(3, 60_000)))
    clock.advance(60_000 - clock.now_ms() % 60_000)  # the start of a window
    for i in range(3):
        assert (await ledger.reserve(T, "run", f"r{i}", 1, None)).decision is Decision.ALLOW
    clock.advance(59_999)
    limited = await ledger.reserve(T, "run", "r3", 1, None)
    assert (limited.decision, limited.reason, limited.dimension) == (
        Decision.THROTTLE,
        DecisionReason.RATE_LIMITED,
        Dimension.RATE,
    )
    assert limited.retry_at_ms == clock.now_ms() + 1
    clock.advance(1)
    assert (await ledger.reserve(T, "run", "r4", 1, None)).decision is Decision.ALLOW


async def test_in_flight_holds_are_capped_until_one_settles(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("run", max_in_flight=2))
    for i in range(2):
        assert (await ledger.reserve(T, "run", f"f{i}", 1, None)).decision is Decision.ALLOW
    capped = await ledger.reserve(T, "run", "f2", 1, None)
    assert (capped.decision, capped.reason, capped.dimension) == (
        Decision.THROTTLE,
        DecisionReason.IN_FLIGHT_LIMIT,
        Dimension.IN_FLIGHT,
    )
    await ledger.commit(T, "run", "f0", 1)
    assert (await ledger.reserve(T, "run", "f3", 1, None)).decision is Decision.ALLOW


async def test_tokens_are_held_then_committed_at_their_actual_count(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("run", max_tokens=1_000))
    first = await ledger.reserve(
        T, "run", "a", 10, None, ReserveExtras(fingerprint="a", tokens=600)
    )
    assert (first.decision, first.state.reserved_tokens) == (Decision.ALLOW, 600)
    blocked = await ledger.reserve(
        T, "run", "b", 10, None, ReserveExtras(fingerprint="b", tokens=600)
    )
    assert (blocked.decision, blocked.reason, blocked.dimension) == (
        Decision.BLOCK,
        DecisionReason.INSUFFICIENT_BUDGET,
        Dimension.TOKENS,
    )
    committed = await ledger.commit(T, "run", "a", 8, actual_tokens=150)
    assert (committed.state.committed_tokens, committed.state.reserved_tokens) == (150, 0)
    again = await ledger.reserve(
        T, "run", "c", 10, None, ReserveExtras(fingerprint="c", tokens=850)
    )
    assert again.decision is Decision.ALLOW
    await ledger.refund(T, "run", "c")
    assert (await ledger.get_run(T, "run")).state.reserved_tokens == 0


async def test_a_meter_blocks_past_its_ceiling_and_every_meter_is_tracked(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("run", meter_limits=(("tool:serp", 2),)))

    def serp(units: int = 1) -> ReserveExtras:
        return ReserveExtras(meter="tool:serp", meter_units=units)

    assert (await ledger.reserve(T, "run", "s1", 5, None, serp())).decision is Decision.ALLOW
    assert (await ledger.reserve(T, "run", "s2", 5, None, serp())).decision is Decision.ALLOW
    blocked = await ledger.reserve(T, "run", "s3", 5, None, serp())
    assert (blocked.decision, blocked.dimension, blocked.meter) == (
        Decision.BLOCK,
        Dimension.METER,
        "tool:serp",
    )
    # The same id with another meter is another request.
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(
            T, "run", "s3", 5, None, ReserveExtras(meter="tool:web", meter_units=1)
        )
    await ledger.refund(T, "run", "s1")
    await ledger.commit(T, "run", "s2", 5)
    free = ReserveExtras(meter="tool:web", meter_units=3)
    assert (await ledger.reserve(T, "run", "w1", 5, None, free)).decision is Decision.ALLOW
    assert (await ledger.reserve(T, "run", "s4", 5, None, serp())).decision is Decision.ALLOW
    view = await ledger.get_run(T, "run")
    assert view.usage == {"m:tool:serp": (1, 1), "m:tool:web": (3, 0)}


@pytest.mark.parametrize(
    ("policy", "extras", "allowed"),
    [
        pytest.param({"max_tokens": 1_000}, ReserveExtras(tokens=100), 10, id="tokens"),
        pytest.param(
            {"meter_limits": (("api", 7),)},
            ReserveExtras(meter="api", meter_units=1),
            7,
            id="meter",
        ),
        pytest.param({"rate_limit": (9, 86_400_000)}, ReserveExtras(), 9, id="rate"),
        pytest.param({"max_in_flight": 11}, ReserveExtras(), 11, id="in-flight"),
    ],
)
async def test_each_limit_allows_exactly_its_count_under_concurrency(
    ledger: Ledger, policy: dict[str, object], extras: ReserveExtras, allowed: int
) -> None:
    await ledger.create_run(T, spec("run", limit=10**9, **policy))

    async def one(i: int) -> Decision:
        request = extras
        if extras.tokens:
            request = ReserveExtras(fingerprint=f"f{i}", tokens=extras.tokens)
        return (await ledger.reserve(T, "run", f"r{i}", 1, None, request)).decision

    decisions = await asyncio.gather(*(one(i) for i in range(100)))
    assert decisions.count(Decision.ALLOW) == allowed
    assert (await ledger.get_run(T, "run")).state.active_reservations == allowed


async def test_subagent_depth_and_children_are_capped_at_creation(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("root", max_children=2))
    parent = "root"
    for level in range(1, 6):
        kid = RunSpec(f"l{level}", 1_000, {}, None, parent_run_id=parent)
        created = await ledger.create_run(T, kid)
        assert created.run.lineage.depth_left == 5 - level
        assert created.run.policy.max_children == 2  # inherited
        parent = kid.run_id
    with pytest.raises(errors.SubagentLimit, match="max_depth"):
        await ledger.create_run(T, RunSpec("l6", 1_000, {}, None, parent_run_id="l5"))

    await ledger.create_run(T, RunSpec("k2", 1_000, {}, None, parent_run_id="root"))
    with pytest.raises(errors.SubagentLimit, match="2 children"):
        await ledger.create_run(T, RunSpec("k3", 1_000, {}, None, parent_run_id="root"))
    # A retried create is not another child.
    replay = await ledger.create_run(T, RunSpec("k2", 1_000, {}, None, parent_run_id="root"))
    assert replay.replayed
    assert (await ledger.get_run(T, "root")).children == 2


async def test_a_childs_own_max_depth_can_only_tighten_its_ancestors(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("root", max_depth=2))
    wide = RunSpec("kid", 1_000, {}, None, parent_run_id="root", policy=RunPolicy(max_depth=9))
    assert (await ledger.create_run(T, wide)).run.lineage.depth_left == 1
    await ledger.create_run(T, RunSpec("grandkid", 1_000, {}, None, parent_run_id="kid"))
    with pytest.raises(errors.SubagentLimit):
        await ledger.create_run(T, RunSpec("ggkid", 1_000, {}, None, parent_run_id="grandkid"))


async def test_a_policy_is_part_of_the_create_request(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("run", max_in_flight=3))
    assert (await ledger.create_run(T, spec("run", max_in_flight=3))).replayed
    with pytest.raises(errors.RunAlreadyExists):
        await ledger.create_run(T, spec("run", max_in_flight=4))
    with pytest.raises(errors.RunAlreadyExists):
        await ledger.create_run(T, RunSpec("run", 1_000, {}, None))


async def test_spend_past_the_approval_threshold_waits_for_an_approval(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("run", approval_percent=50, thresholds=(0, 0, 0)))
    assert (await ledger.reserve(T, "run", "a", 500, None)).decision is Decision.ALLOW
    asked = await ledger.reserve(T, "run", "b", 1, None)
    assert (asked.decision, asked.reason, asked.approval, asked.held_micros) == (
        Decision.APPROVAL_REQUIRED,
        DecisionReason.SPEND_NEEDS_APPROVAL,
        SPEND_APPROVAL,
        0,
    )
    # Asked once: a second call waits on the same approval, with no new request.
    again = await ledger.reserve(T, "run", "c", 1, None)
    assert again.decision is Decision.APPROVAL_REQUIRED
    assert (await ledger.get_run(T, "run")).approvals == {SPEND_APPROVAL: ApprovalStatus.PENDING}

    granted = await ledger.resolve_approval(T, "run", SPEND_APPROVAL, True)
    assert (granted.status, granted.replayed) == (ApprovalStatus.APPROVED, False)
    assert (await ledger.resolve_approval(T, "run", SPEND_APPROVAL, True)).replayed
    with pytest.raises(errors.ApprovalResolved):
        await ledger.resolve_approval(T, "run", SPEND_APPROVAL, False)
    assert (await ledger.reserve(T, "run", "d", 400, None)).decision is Decision.ALLOW
    assert (await ledger.reserve(T, "run", "b", 1, None)).replayed  # the id stays spent

    page = await ledger.read_changes(T, "run", 0, 100)
    approvals = [(c.type, c.approval, c.reservation_id) for c in page.changes if c.approval]
    assert approvals == [
        (EventType.APPROVAL_REQUESTED, SPEND_APPROVAL, "b"),
        (EventType.APPROVAL_GRANTED, SPEND_APPROVAL, ""),
    ]


async def test_a_meter_off_the_approved_list_needs_approval_and_a_denial_blocks(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, spec("run", approved_meters=("tool:search",)))

    def call(meter: str) -> ReserveExtras:
        return ReserveExtras(meter=meter, meter_units=1)

    approved = await ledger.reserve(T, "run", "s", 1, None, call("tool:search"))
    assert approved.decision is Decision.ALLOW
    asked = await ledger.reserve(T, "run", "w", 1, None, call("tool:write_db"))
    assert (asked.decision, asked.reason, asked.meter, asked.approval) == (
        Decision.APPROVAL_REQUIRED,
        DecisionReason.METER_NEEDS_APPROVAL,
        "tool:write_db",
        "m:tool:write_db",
    )
    denied = await ledger.resolve_approval(T, "run", "m:tool:write_db", False)
    assert denied.status is ApprovalStatus.DENIED
    blocked = await ledger.reserve(T, "run", "w2", 1, None, call("tool:write_db"))
    assert (blocked.decision, blocked.reason, blocked.approval) == (
        Decision.BLOCK,
        DecisionReason.APPROVAL_DENIED,
        "m:tool:write_db",
    )
    with pytest.raises(errors.ApprovalNotFound):
        await ledger.resolve_approval(T, "run", "m:tool:other", True)
    with pytest.raises(errors.RunNotFound):
        await ledger.resolve_approval(T, "nope", SPEND_APPROVAL, True)


async def test_an_advisory_run_warns_and_still_asks(ledger: Ledger) -> None:
    await ledger.create_run(
        T, spec("run", mode=EnforcementMode.ADVISORY, approval_percent=10, thresholds=(0, 0, 0))
    )
    warned = await ledger.reserve(T, "run", "a", 500, None)
    assert (warned.decision, warned.reason, warned.held_micros) == (
        Decision.WARN,
        DecisionReason.SPEND_NEEDS_APPROVAL,
        500,
    )
    assert (await ledger.get_run(T, "run")).approvals == {SPEND_APPROVAL: ApprovalStatus.PENDING}


async def test_an_advisory_childs_warned_spend_is_charged_to_every_parent(
    ledger: Ledger,
) -> None:
    await ledger.set_scope_limit(T, ScopeRef(ScopeKind.TEAM, "core"), Period.LIFETIME, 10_000)
    await ledger.create_run(T, RunSpec("root", 100, {}, None, team_id="core"))
    advisory = RunPolicy(EnforcementMode.ADVISORY)
    await ledger.create_run(
        T, RunSpec("kid", 1_000, {}, None, parent_run_id="root", policy=advisory)
    )
    warned = await ledger.reserve(T, "kid", "a", 500, None)  # the root has only 100
    assert (warned.decision, warned.blocking_scope) == (
        Decision.WARN,
        ScopeRef(ScopeKind.RUN, "root"),
    )
    team = (await ledger.get_scope(T, ScopeRef(ScopeKind.TEAM, "core"))).period(Period.LIFETIME)
    assert team.reserved_micros == 500  # the team's hold is kept with the run's
    await ledger.commit(T, "kid", "a", 450)
    root = (await ledger.get_run(T, "root")).state
    assert (root.committed_micros, root.overrun_micros, root.reserved_micros) == (450, 450, 0)
    team = (await ledger.get_scope(T, ScopeRef(ScopeKind.TEAM, "core"))).period(Period.LIFETIME)
    assert (team.committed_micros, team.reserved_micros) == (450, 0)


async def test_no_mode_holds_past_the_largest_exact_total(ledger: Ledger) -> None:
    await ledger.create_run(T, spec("run", 100, mode=EnforcementMode.ADVISORY))
    assert (await ledger.reserve(T, "run", "a", 3, None)).decision is Decision.ALLOW
    too_much = await ledger.reserve(T, "run", "b", MAX_MICROS - 1, None)
    assert (too_much.decision, too_much.reason) == (
        Decision.BLOCK,
        DecisionReason.INSUFFICIENT_BUDGET,
    )
    assert (await ledger.reserve(T, "run", "c", MAX_MICROS - 3, None)).decision is Decision.WARN


async def test_a_root_run_takes_its_scopes_default_policy(ledger: Ledger) -> None:
    team, user = ScopeRef(ScopeKind.TEAM, "core"), ScopeRef(ScopeKind.USER, "ann")
    advisory = RunPolicy(EnforcementMode.ADVISORY)
    view = await ledger.set_scope_policy(T, team, advisory)
    assert view.policy == advisory
    assert (await ledger.get_scope(T, team)).policy == advisory

    charged = RunSpec("a", 1_000, {}, None, team_id="core")
    assert (await ledger.create_run(T, charged)).run.policy == advisory
    # The user's default comes before the team's; a policy given wins over both.
    await ledger.set_scope_policy(T, user, RunPolicy(max_in_flight=2))
    both = RunSpec("b", 1_000, {}, None, user_id="ann", team_id="core")
    assert (await ledger.create_run(T, both)).run.policy == RunPolicy(max_in_flight=2)
    own = RunSpec("c", 1_000, {}, None, team_id="core", policy=RunPolicy())
    assert (await ledger.create_run(T, own)).run.policy == RunPolicy()
    # A subagent takes its parent's policy, not its scopes'.
    kid = RunSpec("kid", 100, {}, None, parent_run_id="c", team_id="core")
    assert (await ledger.create_run(T, kid)).run.policy == RunPolicy()
    # Clearing it leaves runs made before as they are.
    assert (await ledger.set_scope_policy(T, team, None)).policy is None
    later = RunSpec("d", 1_000, {}, None, team_id="core")
    assert (await ledger.create_run(T, later)).run.policy == RunPolicy()
    assert (await ledger.get_run(T, "a")).policy == advisory
