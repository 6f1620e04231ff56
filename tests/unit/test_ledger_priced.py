"""What priced LLM calls need from every backend: fingerprints, stored pricing, pre-blocks."""

from __future__ import annotations

import pytest

from runcap_server import errors
from runcap_server.ledger.saga import ReserveExtras
from runcap_server.ledger.types import (
    Decision,
    DecisionReason,
    Period,
    ReservationStatus,
    RunSpec,
    ScopeKind,
    ScopeRef,
)
from tests.ledger_backends import Ledger

T = "acme"
PRICED = ReserveExtras(fingerprint="llm:acme:big:10:5", pricing="v1#3000000,15000000,1,2,3")


async def test_a_priced_reservation_keeps_its_pricing(ledger: Ledger) -> None:
    await ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    allowed = await ledger.reserve(T, "run", "r", 105, None, PRICED)
    assert allowed.decision is Decision.ALLOW
    stored = await ledger.get_reservation(T, "run", "r")
    assert (stored.fingerprint, stored.pricing, stored.status) == (
        PRICED.fingerprint,
        PRICED.pricing,
        ReservationStatus.HELD,
    )
    with pytest.raises(errors.ReservationNotFound):
        await ledger.get_reservation(T, "run", "missing")
    with pytest.raises(errors.RunNotFound):
        await ledger.get_reservation(T, "nope", "r")


async def test_a_retry_is_compared_by_fingerprint_not_by_amount(ledger: Ledger) -> None:
    """After a price reload the same call estimates differently: still the same request."""
    await ledger.create_run(T, RunSpec("run", 1_000, {}, None))
    await ledger.reserve(T, "run", "r", 105, None, PRICED)
    again = await ledger.reserve(T, "run", "r", 210, None, PRICED)
    assert (again.replayed, again.held_micros) == (True, 105)
    other = ReserveExtras(fingerprint="llm:acme:big:11:5", pricing=PRICED.pricing)
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(T, "run", "r", 105, None, other)
    with pytest.raises(errors.IdempotencyConflict):
        await ledger.reserve(T, "run", "r", 105, None)  # an amount is not an LLM call


async def test_an_unknown_price_blocks_before_any_parent_holds(ledger: Ledger) -> None:
    team = ScopeRef(ScopeKind.TEAM, "t")
    await ledger.create_run(T, RunSpec("root", 1_000, {}, None, team_id="t"))
    await ledger.create_run(T, RunSpec("kid", 1_000, {}, None, parent_run_id="root"))
    unknown = ReserveExtras(fingerprint="llm:acme:nope:1:1", preblock=DecisionReason.UNKNOWN_PRICE)
    blocked = await ledger.reserve(T, "kid", "r", 0, None, unknown)
    assert (blocked.decision, blocked.reason) == (Decision.BLOCK, DecisionReason.UNKNOWN_PRICE)
    assert (blocked.blocking_scope, blocked.held_micros) == (None, 0)
    root = (await ledger.get_run(T, "root")).state
    assert (root.revision, root.reserved_micros) == (1, 0)  # never held, never released
    scope = await ledger.get_scope(T, team)
    assert scope.period(Period.LIFETIME).active_reservations == 0
    replay = await ledger.reserve(T, "kid", "r", 0, None, unknown)
    assert (replay.replayed, replay.reason) == (True, DecisionReason.UNKNOWN_PRICE)
    # A closed run answers RUN_CLOSED first.
    await ledger.close_run(T, "kid")
    closed = await ledger.reserve(T, "kid", "r2", 0, None, unknown)
    assert closed.reason is DecisionReason.RUN_CLOSED


async def test_tenant_prices_are_stored_per_tenant_with_a_version(ledger: Ledger) -> None:
    assert await ledger.price_overrides(T) == (0, {})
    assert await ledger.set_price_override(T, "acme\tbig", '{"a":1}')
    assert await ledger.set_price_override(T, "acme\tsmall", '{"b":2}')
    assert await ledger.set_price_override(T, "acme\tbig", '{"a":3}')
    assert await ledger.price_overrides_version(T) == 3
    assert await ledger.price_overrides(T) == (
        3,
        {"acme\tbig": '{"a":3}', "acme\tsmall": '{"b":2}'},
    )
    assert await ledger.set_price_override(T, "acme\tsmall", None)
    assert not await ledger.set_price_override(T, "acme\tsmall", None)  # nothing to delete
    assert await ledger.price_overrides(T) == (4, {"acme\tbig": '{"a":3}'})
    assert await ledger.price_overrides("other") == (0, {})
