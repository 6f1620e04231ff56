"""CALIBRATED runs on every backend: LLM calls held at a learned output
estimate, and the exposure ceiling that bounds what can go wrong
(docs/decisions.md, "Calibrated reservations")."""

from __future__ import annotations

import pytest

from runcap_server.clock import ManualClock
from runcap_server.estimates import Pricing
from runcap_server.ledger.core import calibrated_micros
from runcap_server.ledger.saga import ReserveExtras
from runcap_server.ledger.types import (
    CALIBRATION_RING,
    Decision,
    DecisionReason,
    Dimension,
    EnforcementMode,
    EventType,
    ReserveResult,
    RunPolicy,
    RunSpec,
)
from runcap_server.prices import Rates, TokenUsage, cost_micros, estimate_micros
from tests.ledger_backends import Ledger

T = "acme"
# $1 per million input tokens, $10 per million output tokens.
RATES = Rates(1_000_000, 10_000_000, 0, 0, 0)
INPUT = 1_000
MAX_OUTPUT = 16_000
WORST = estimate_micros(RATES, INPUT, MAX_OUTPUT)  # 161,000


def calibrated_spec(run_id: str, limit: int, **policy: object) -> RunSpec:
    given = {"mode": EnforcementMode.CALIBRATED, "thresholds": (0, 0, 0), **policy}
    return RunSpec(run_id, limit, {}, None, policy=RunPolicy(**given))  # type: ignore[arg-type]


def call(model: str = "small", max_output: int = MAX_OUTPUT) -> tuple[int, ReserveExtras]:
    """An LLM call's worst case and extras, as the servicer prices it."""
    pricing = f"v1#{RATES.encode()}#{max_output}#acme#{model}#{INPUT}"
    extras = ReserveExtras(
        fingerprint=f"llm:acme:{model}:{INPUT}:{max_output}",
        pricing=pricing,
        tokens=INPUT + max_output,
    )
    return estimate_micros(RATES, INPUT, max_output), extras


def cost(output: int) -> int:
    return cost_micros(RATES, TokenUsage(input_tokens=INPUT, output_tokens=output))


async def reserve(ledger: Ledger, run_id: str, rid: str, model: str = "small") -> ReserveResult:
    worst, extras = call(model)
    return await ledger.reserve(T, run_id, rid, worst, None, extras)


async def observe(ledger: Ledger, run_id: str, rid: str, output: int) -> None:
    """One call reserved and committed by usage with `output` tokens."""
    result = await reserve(ledger, run_id, rid)
    assert result.decision is Decision.ALLOW
    await ledger.commit(T, run_id, rid, cost(output), INPUT + output, output)


async def test_calls_are_held_at_the_worst_case_until_enough_outputs_were_observed(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, calibrated_spec("run", 10_000_000, calibration_min_samples=3))
    for i, output in enumerate((300, 700, 500)):
        first = await reserve(ledger, "run", f"warm-{i}")
        assert (first.held_micros, first.worst_micros) == (WORST, WORST)
        pricing = Pricing.decode(first.pricing)
        assert (pricing.calibrated_output_tokens, pricing.calibration_samples) == (None, i)
        await ledger.commit(T, "run", f"warm-{i}", cost(output), INPUT + output, output)

    result = await reserve(ledger, "run", "next")

    held = calibrated_micros(INPUT, RATES.input, 700, RATES.output)
    assert held == cost(700) == 8_000
    assert (result.decision, result.held_micros, result.worst_micros) == (
        Decision.ALLOW,
        held,
        WORST,
    )
    pricing = Pricing.decode(result.pricing)
    assert (pricing.calibrated_output_tokens, pricing.calibration_samples) == (700, 3)
    assert result.state.reserved_micros == held
    committed = cost(300) + cost(700) + cost(500)
    assert result.exposure_micros == committed + WORST
    assert result.exposure_ceiling_micros == 11_000_000
    # Another model has no samples yet: its worst case.
    other = await reserve(ledger, "run", "other", model="big")
    assert other.held_micros == WORST
    # A replay answers the same.
    replay = await reserve(ledger, "run", "next")
    assert (replay.replayed, replay.held_micros, replay.pricing) == (True, held, result.pricing)


async def test_the_state_shows_the_exposure_after_every_change(
    ledger: Ledger, clock: ManualClock
) -> None:
    limit = 1_000_000
    ceiling = limit + limit // 10
    await ledger.create_run(T, calibrated_spec("run", limit, calibration_min_samples=1))
    await observe(ledger, "run", "warm", 500)
    committed = cost(500)
    state = (await ledger.get_run(T, "run")).state
    assert (state.exposure_micros, state.exposure_ceiling_micros) == (committed, ceiling)

    reserved = await reserve(ledger, "run", "a")
    assert reserved.held_micros == cost(500) < WORST
    assert (reserved.state.exposure_micros, reserved.state.exposure_ceiling_micros) == (
        committed + WORST,
        ceiling,
    )
    assert reserved.state.exposure_micros == reserved.exposure_micros
    await reserve(ledger, "run", "b")
    await ledger.reserve(T, "run", "c", 1_000, 1_000)  # an explicit amount, expiring soon
    assert (await ledger.get_run(T, "run")).state.exposure_micros == (committed + 2 * WORST + 1_000)

    committed_a = await ledger.commit(T, "run", "a", cost(900), INPUT + 900, 900)
    committed += cost(900)
    assert committed_a.state.exposure_micros == committed + WORST + 1_000
    refunded = await ledger.refund(T, "run", "b")
    assert refunded.state.exposure_micros == committed + 1_000
    clock.advance(1_000)
    expired = (await ledger.get_run(T, "run")).state
    assert (expired.active_reservations, expired.exposure_micros) == (0, committed)

    # The change log's states carry it too (what Watch replays).
    page = await ledger.read_changes(T, "run", 0, 100)
    shown = [(c.type, c.state.exposure_micros) for c in page.changes]
    assert shown[-5:] == [
        (EventType.RESERVED, committed - cost(900) + 2 * WORST),
        (EventType.RESERVED, committed - cost(900) + 2 * WORST + 1_000),
        (EventType.COMMITTED, committed + WORST + 1_000),
        (EventType.REFUNDED, committed + 1_000),
        (EventType.EXPIRED, committed),
    ]
    assert {c.state.exposure_ceiling_micros for c in page.changes} == {ceiling}


async def test_the_exposure_ceiling_blocks_what_the_calibrated_gate_would_allow(
    ledger: Ledger,
) -> None:
    # Room for 10 real calls; the allowance is 10% of the limit.
    limit = 10 * cost(1_600)
    await ledger.create_run(T, calibrated_spec("run", limit, calibration_min_samples=1))
    await observe(ledger, "run", "warm", 1_600)
    committed = cost(1_600)

    decisions = [await reserve(ledger, "run", f"c{i}") for i in range(10)]

    allowed = [d for d in decisions if d.decision is Decision.ALLOW]
    # committed + n * worst <= limit + allowance.
    fits = (limit + limit // 10 - committed) // WORST
    assert len(allowed) == fits == 1
    blocked = decisions[fits]
    assert (blocked.decision, blocked.reason, blocked.dimension) == (
        Decision.BLOCK,
        DecisionReason.INSUFFICIENT_BUDGET,
        Dimension.EXPOSURE,
    )
    assert blocked.exposure_micros == committed + WORST * fits


async def test_with_a_generous_allowance_calibrated_calls_use_nearly_all_the_budget(
    ledger: Ledger,
) -> None:
    limit = 10 * cost(1_600)
    await ledger.create_run(
        T,
        calibrated_spec(
            "run", limit, calibration_min_samples=1, exposure_allowance_micros=10 * WORST
        ),
    )
    await observe(ledger, "run", "warm", 1_600)
    decisions = [await reserve(ledger, "run", f"c{i}") for i in range(12)]
    allowed = [d for d in decisions if d.decision is Decision.ALLOW]
    # Each holds input + 1,600 output tokens: the 9 that fit beside the warm-up.
    assert len(allowed) == 9
    assert decisions[9].dimension is Dimension.SPEND
    hard = RunSpec("hard", limit, {}, None, policy=RunPolicy(thresholds=(0, 0, 0)))
    await ledger.create_run(T, hard)
    hard_gate = [await reserve(ledger, "hard", f"c{i}") for i in range(10)]
    assert sum(d.decision is Decision.ALLOW for d in hard_gate) == 1


async def test_when_outputs_suddenly_grow_the_overshoot_stays_within_the_allowance(
    ledger: Ledger,
) -> None:
    limit = 10 * cost(1_600)
    allowance = 2 * WORST
    await ledger.create_run(
        T,
        calibrated_spec(
            "run", limit, calibration_min_samples=1, exposure_allowance_micros=allowance
        ),
    )
    await observe(ledger, "run", "w0", 1_600)

    allowed = []
    for i in range(20):
        result = await reserve(ledger, "run", f"c{i}")
        if result.decision is Decision.ALLOW:
            allowed.append(f"c{i}")
    # The agent starts writing long answers: every call in flight bills its max.
    for rid in allowed:
        await ledger.commit(T, "run", rid, WORST, INPUT + MAX_OUTPUT, MAX_OUTPUT)
    state = (await ledger.get_run(T, "run")).state
    assert state.committed_micros > limit
    assert state.committed_micros - limit <= allowance
    assert state.overrun_micros == len(allowed) * (WORST - cost(1_600))
    # The estimator adapted: the next call is held at its worst case again.
    await ledger.create_run(T, calibrated_spec("fresh", 10 * WORST, calibration_min_samples=2))
    for i in range(2):
        await observe(ledger, "fresh", f"w{i}", 1_600)
    await ledger.commit(
        T, "fresh", (await reserve(ledger, "fresh", "long")).reservation_id, WORST,
        INPUT + MAX_OUTPUT, MAX_OUTPUT,
    )  # fmt: skip
    adapted = await reserve(ledger, "fresh", "after")
    assert adapted.held_micros == WORST
    assert Pricing.decode(adapted.pricing).calibrated_output_tokens == MAX_OUTPUT


async def test_samples_are_the_last_32_and_outputs_past_the_max_are_capped(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, calibrated_spec("run", 10**12, calibration_min_samples=1))
    await observe(ledger, "run", "big", 20_000)  # more than the effective max
    first = await reserve(ledger, "run", "capped")
    assert first.held_micros == WORST
    for i in range(CALIBRATION_RING):
        await observe(ledger, "run", f"s{i}", 100 + i)
    result = await reserve(ledger, "run", "after")
    assert result.held_micros == cost(100 + CALIBRATION_RING - 1)
    assert Pricing.decode(result.pricing).calibration_samples == CALIBRATION_RING


async def test_explicit_amounts_hold_the_amount_and_count_against_exposure(
    ledger: Ledger,
) -> None:
    await ledger.create_run(T, calibrated_spec("run", 1_000, exposure_allowance_percent=0))
    first = await ledger.reserve(T, "run", "a", 600, None)
    assert (first.held_micros, first.worst_micros, first.exposure_micros) == (600, 600, 600)
    second = await ledger.reserve(T, "run", "b", 500, None)
    assert (second.decision, second.dimension) == (Decision.BLOCK, Dimension.SPEND)
    await ledger.refund(T, "run", "a")
    third = await ledger.reserve(T, "run", "c", 1_000, None)
    assert (third.decision, third.exposure_micros, third.exposure_ceiling_micros) == (
        Decision.ALLOW,
        1_000,
        1_000,
    )


@pytest.mark.parametrize("mode", [EnforcementMode.HARD_GATE, EnforcementMode.SOFT_GATE])
async def test_other_modes_learn_nothing_and_report_no_exposure(
    ledger: Ledger, mode: EnforcementMode
) -> None:
    policy = RunPolicy(mode=mode, thresholds=(0, 0, 0))
    await ledger.create_run(T, RunSpec("run", 10**9, {}, None, policy=policy))
    for i in range(6):
        await observe(ledger, "run", f"w{i}", 100)
    result = await reserve(ledger, "run", "next")
    assert (result.held_micros, result.exposure_micros, result.exposure_ceiling_micros) == (
        WORST,
        0,
        0,
    )
    assert (result.state.exposure_micros, result.state.exposure_ceiling_micros) == (0, 0)
    page = await ledger.read_changes(T, "run", 0, 100)
    assert {(c.state.exposure_micros, c.state.exposure_ceiling_micros) for c in page.changes} == {
        (0, 0)
    }
    assert Pricing.decode(result.pricing).calibration_samples is None
