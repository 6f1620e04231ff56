"""The alert store's contract on every backend: once per alert id, the rate
limit decided with the insert, claims that only their owner may settle,
newest-first listing, cursors that never go back, tenants kept apart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runcap_server.alerts.store import (
    HOUR_MS,
    AlertRecord,
    AlertState,
    AlertStore,
    RateLimit,
    open_store,
)
from runcap_server.clock import ManualClock
from tests.ledger_backends import BACKENDS, open_backend, redis_targets

NOW = 1_800_000_000_000
LIMIT = RateLimit(min_interval_ms=60_000, max_per_hour=3)


def _params() -> list[object]:
    return [
        pytest.param(kind, marks=pytest.mark.redis) if kind.startswith("redis") else kind
        for kind in BACKENDS
    ]


@pytest.fixture(params=_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AlertStore]:
    kind = request.param
    redis = redis_targets(request, kind)
    async with open_backend(kind, tmp_path, ManualClock(NOW), redis=redis) as backend:
        opened = open_store(backend)
        await opened.start()
        yield opened


def alert(
    n: int, *, ms: int = NOW, rule: str = "r1", key: str = "run/stop", **kw: object
) -> AlertRecord:
    return AlertRecord(
        tenant=str(kw.pop("tenant", "t1")),
        alert_id=f"a{n:03d}",
        rule_id=rule,
        trigger=3,
        run_id="run",
        create_ms=ms,
        payload='{"x": 1}',
        rate_key=key,
        due_ms=ms + 10_000,
        owner="engine-1",
        **kw,  # type: ignore[arg-type]
    )


async def test_rules_are_stored_once_and_keep_their_first_time(store: AlertStore) -> None:
    assert await store.put_rule("t1", "b", "rule-b", NOW)
    assert await store.put_rule("t1", "a", "rule-a", NOW + 1)
    assert not await store.put_rule("t1", "a", "rule-a", NOW + 2)  # the same: unchanged
    assert await store.put_rule("t1", "a", "rule-a2", NOW + 3)  # replaced: since stays
    assert [(r.rule_id, r.text, r.since_ms) for r in await store.rules("t1")] == [
        ("a", "rule-a2", NOW + 1),
        ("b", "rule-b", NOW),
    ]
    assert await store.rules("t2") == []
    assert "t1" in await store.tenants()
    assert await store.delete_rule("t1", "b")
    assert not await store.delete_rule("t1", "b")
    assert [r.rule_id for r in await store.rules("t1")] == ["a"]


async def test_an_alert_is_inserted_once(store: AlertStore) -> None:
    first = await store.raise_alert(alert(1), LIMIT)
    assert first is not None
    assert first.state is AlertState.PENDING
    assert await store.raise_alert(alert(1, ms=NOW + 5), LIMIT) is None
    (stored,) = await store.list_alerts("t1", None, 10)
    assert stored == first


async def test_the_rate_limit_is_decided_with_the_insert(store: AlertStore) -> None:
    states = []
    for n, (ms, key) in enumerate(
        [
            (NOW, "run/stop"),  # sent
            (NOW + 59_999, "run/stop"),  # within min_interval of the last sent: suppressed
            (NOW + 1, "run/throttle:3"),  # another rate key: sent
            (NOW + 60_000, "run/stop"),  # the interval is over: sent
            (NOW + 70_000, "other/stop"),  # a 4th delivery in the hour: over max_per_hour
            (NOW + HOUR_MS + 1, "other/stop"),  # the first one left the hour: sent
        ]
    ):
        stored = await store.raise_alert(alert(n, ms=ms, key=key), LIMIT)
        assert stored is not None
        states.append(stored.state)
    P, S = AlertState.PENDING, AlertState.SUPPRESSED
    assert states == [P, S, P, P, S, P]
    # Per rule: another rule's alerts count apart.
    other = await store.raise_alert(alert(9, ms=NOW + 70_000, rule="r2"), LIMIT)
    assert other is not None
    assert other.state is P
    # Without a limit the record goes in as given.
    given = alert(10, state=AlertState.DELIVERED, attempts=2)
    assert await store.raise_alert(given, None) == given


async def test_claims_and_updates(store: AlertStore) -> None:
    raised = await store.raise_alert(alert(1), LIMIT)
    assert raised is not None
    # Not due before its due time.
    assert await store.claim_due("t1", "engine-2", NOW + 9_999, 5_000, 10) == []
    (claimed,) = await store.claim_due("t1", "engine-2", NOW + 10_000, 5_000, 10)
    assert (claimed.owner, claimed.due_ms) == ("engine-2", NOW + 15_000)
    # The first owner lost it: its writes change nothing.
    assert not await store.update_alert(raised.replace(state=AlertState.DELIVERED, attempts=1))
    retry = claimed.replace(attempts=1, last_error="HTTP 503", due_ms=NOW + 20_000, done=(1,))
    assert await store.update_alert(retry)
    assert await store.claim_due("t1", "engine-3", NOW + 19_999, 5_000, 10) == []
    (again,) = await store.claim_due("t1", "engine-3", NOW + 20_000, 5_000, 10)
    assert (again.attempts, again.last_error, again.done) == (1, "HTTP 503", (1,))
    dead = again.replace(state=AlertState.DEAD, attempts=2)
    assert await store.update_alert(dead)
    assert await store.claim_due("t1", "engine-4", NOW + HOUR_MS, 5_000, 10) == []
    (listed,) = await store.list_alerts("t1", None, 10, state=AlertState.DEAD)
    assert (listed.state, listed.attempts, listed.owner) == (AlertState.DEAD, 2, "engine-3")


async def test_listing_is_newest_first_filtered_and_per_tenant(store: AlertStore) -> None:
    for n in range(6):
        await store.raise_alert(alert(n, ms=NOW + n // 2, rule=f"r{n % 2}", key=f"k{n}"), None)
    await store.raise_alert(alert(99, tenant="t2"), None)
    everything = await store.list_alerts("t1", None, 100)
    assert [a.alert_id for a in everything] == ["a005", "a004", "a003", "a002", "a001", "a000"]
    page = await store.list_alerts("t1", None, 2)
    rest = await store.list_alerts("t1", (page[-1].create_ms, page[-1].alert_id), 10)
    assert [a.alert_id for a in page + rest] == [a.alert_id for a in everything]
    assert [a.alert_id for a in await store.list_alerts("t1", None, 10, rule_id="r1")] == [
        "a005",
        "a003",
        "a001",
    ]
    assert await store.list_alerts("t1", None, 10, state=AlertState.DEAD) == []
    assert [a.alert_id for a in await store.list_alerts("t2", None, 10)] == ["a099"]


async def test_prune_keeps_pending_alerts(store: AlertStore) -> None:
    await store.raise_alert(alert(1, state=AlertState.DELIVERED), None)
    await store.raise_alert(alert(2), None)
    await store.raise_alert(alert(3, ms=NOW + 10, state=AlertState.DEAD), None)
    assert await store.prune("t1", NOW + 1) == 1
    assert [a.alert_id for a in await store.list_alerts("t1", None, 10)] == ["a003", "a002"]


async def test_cursors_never_go_back(store: AlertStore) -> None:
    await store.save_cursor("t1", "run-a", 0, "")
    await store.save_cursor("t1", "run-a", 7, "m7")
    await store.save_cursor("t1", "run-a", 5, "m5")  # a slower replica
    await store.save_cursor("t1", "run-b", 2, "m2")
    assert await store.cursors("t1") == {"run-a": (7, "m7"), "run-b": (2, "m2")}
    await store.drop_cursor("t1", "run-a")
    assert await store.cursors("t1") == {"run-b": (2, "m2")}
    assert await store.cursors("t2") == {}
    assert await store.discovery("t1") is None
    await store.save_discovery("t1", (NOW, "run-b"))
    await store.save_discovery("t1", (NOW, "run-a"))
    await store.save_discovery("t1", (NOW - 1, "run-z"))
    assert await store.discovery("t1") == (NOW, "run-b")
    await store.save_discovery("t1", (NOW + 1, "run-a"))
    assert await store.discovery("t1") == (NOW + 1, "run-a")
