"""Where alerts live: rules, alert records, follow cursors, per tenant.

Three implementations keep the same contract: `MemoryAlertStore` (the memory
backend, and unit tests), `store_sqlite.SqliteAlertStore` (tables of their own
in the ledger's file) and `store_redis.RedisAlertStore` (keys hash-tagged per
tenant, `{t/@alerts}`, so every step that must be atomic is one script in one
slot). `open_store` picks the one that goes with a ledger backend.

The contract that makes delivery at-least-once and never more than that:

- `raise_alert` inserts an alert once per id (the id is deterministic, so
  every replica and every restart computes the same one) and decides, in the
  same atomic step, whether the rule's rate limit lets it be sent (PENDING)
  or not (SUPPRESSED). A second raise of the same id changes nothing.
- A PENDING alert belongs to the engine whose claim token is on it until its
  `due_ms`; `claim_due` hands alerts past it to whoever asks (a crashed
  owner's, or one waiting for its next retry), and `update_alert` writes only
  for the current claim, so a stale owner cannot undo a newer one's work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

HOUR_MS = 3_600_000


class AlertState(IntEnum):
    """runcap.v1.AlertState (same values)."""

    PENDING = 1
    DELIVERED = 2
    DEAD = 3
    SUPPRESSED = 4


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One alert as stored. `payload` is the formats' input (JSON, immutable)."""

    tenant: str
    alert_id: str
    rule_id: str
    trigger: int
    run_id: str
    create_ms: int
    payload: str
    # The rate limit's unit: "<run>/<trigger key>" (see engine.rate_key).
    rate_key: str = ""
    state: AlertState = AlertState.PENDING
    attempts: int = 0
    last_error: str = ""
    # Indexes of the rule's targets that accepted it already.
    done: tuple[int, ...] = ()
    # PENDING: nobody but `owner` touches it before this time.
    due_ms: int = 0
    owner: str = ""

    def replace(self, **changes: Any) -> AlertRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A rule's limits: one alert per rate key per interval, so many an hour."""

    min_interval_ms: int
    max_per_hour: int


@dataclass(frozen=True, slots=True)
class StoredRule:
    rule_id: str
    text: str
    since_ms: int


def encode_done(done: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in done)


def decode_done(text: str) -> tuple[int, ...]:
    return tuple(int(i) for i in text.split(",")) if text else ()


class AlertStore(Protocol):
    async def start(self) -> None:
        """Prepare storage (tables); the ledger backend is started already."""
        ...

    async def put_rule(self, tenant: str, rule_id: str, text: str, now_ms: int) -> bool:
        """Store a rule; False when the same text was stored already. A new
        rule's since_ms is now; a replaced one keeps its own."""
        ...

    async def delete_rule(self, tenant: str, rule_id: str) -> bool: ...

    async def rules(self, tenant: str) -> list[StoredRule]:
        """The tenant's rules by rule id."""
        ...

    async def tenants(self) -> list[str]:
        """Every tenant that has (or had) a rule."""
        ...

    async def raise_alert(self, record: AlertRecord, limit: RateLimit | None) -> AlertRecord | None:
        """Insert the alert unless its id exists (then None). With a limit,
        the stored state is PENDING if the limit allows a delivery now
        (counting it), else SUPPRESSED; without one, the record as given."""
        ...

    async def claim_due(
        self, tenant: str, owner: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[AlertRecord]:
        """Take up to `limit` PENDING alerts whose due_ms has passed: each now
        belongs to `owner` until now + lease."""
        ...

    async def update_alert(self, record: AlertRecord) -> bool:
        """Write state, attempts, last_error, done and due_ms, only while
        `record.owner` holds the claim. False if it does not any more."""
        ...

    async def list_alerts(
        self,
        tenant: str,
        before: tuple[int, str] | None,
        limit: int,
        rule_id: str = "",
        state: AlertState | None = None,
    ) -> list[AlertRecord]:
        """Newest first, strictly older than `before` (create_ms, alert_id)."""
        ...

    async def prune(self, tenant: str, before_ms: int) -> int:
        """Forget alerts created before `before_ms` (not PENDING ones)."""
        ...

    async def cursors(self, tenant: str) -> dict[str, tuple[int, str]]:
        """Every followed run: run id -> (revision processed, follower state)."""
        ...

    async def save_cursor(self, tenant: str, run_id: str, revision: int, text: str) -> None:
        """Store a run's cursor, unless a later one is stored already."""
        ...

    async def drop_cursor(self, tenant: str, run_id: str) -> None: ...

    async def discovery(self, tenant: str) -> tuple[int, str] | None:
        """The last run listed for the tenant (created_ms, run_id), if any."""
        ...

    async def save_discovery(self, tenant: str, cursor: tuple[int, str]) -> None:
        """Store the discovery cursor, unless a later one is stored already."""
        ...


def allows(limit: RateLimit, now_ms: int, last_ms: int | None, sent_last_hour: int) -> AlertState:
    """The rate limit's verdict for a new alert, given the last delivery of
    its rate key and the rule's deliveries in the past hour."""
    if last_ms is not None and now_ms - last_ms < limit.min_interval_ms:
        return AlertState.SUPPRESSED
    if sent_last_hour >= limit.max_per_hour:
        return AlertState.SUPPRESSED
    return AlertState.PENDING


class MemoryAlertStore:
    """In process; nothing survives a restart (the memory backend)."""

    def __init__(self) -> None:
        self._rules: dict[str, dict[str, StoredRule]] = {}
        self._alerts: dict[str, dict[str, AlertRecord]] = {}
        self._cursors: dict[str, dict[str, tuple[int, str]]] = {}
        self._discovery: dict[str, tuple[int, str]] = {}

    async def start(self) -> None:
        pass

    async def put_rule(self, tenant: str, rule_id: str, text: str, now_ms: int) -> bool:
        rules = self._rules.setdefault(tenant, {})
        old = rules.get(rule_id)
        if old is not None and old.text == text:
            return False
        rules[rule_id] = StoredRule(rule_id, text, old.since_ms if old else now_ms)
        return True

    async def delete_rule(self, tenant: str, rule_id: str) -> bool:
        return self._rules.get(tenant, {}).pop(rule_id, None) is not None

    async def rules(self, tenant: str) -> list[StoredRule]:
        return sorted(self._rules.get(tenant, {}).values(), key=lambda r: r.rule_id)

    async def tenants(self) -> list[str]:
        return sorted(set(self._rules) | set(self._alerts))

    async def raise_alert(self, record: AlertRecord, limit: RateLimit | None) -> AlertRecord | None:
        alerts = self._alerts.setdefault(record.tenant, {})
        if record.alert_id in alerts:
            return None
        if limit is not None:
            sent = [
                a
                for a in alerts.values()
                if a.rule_id == record.rule_id and a.state is not AlertState.SUPPRESSED
            ]
            last = max((a.create_ms for a in sent if a.rate_key == record.rate_key), default=None)
            hour = sum(1 for a in sent if a.create_ms > record.create_ms - HOUR_MS)
            record = record.replace(state=allows(limit, record.create_ms, last, hour))
        alerts[record.alert_id] = record
        return record

    async def claim_due(
        self, tenant: str, owner: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[AlertRecord]:
        alerts = self._alerts.get(tenant, {})
        due = [a for a in alerts.values() if a.state is AlertState.PENDING and a.due_ms <= now_ms]
        due.sort(key=lambda a: (a.due_ms, a.alert_id))
        claimed = []
        for alert in due[:limit]:
            alerts[alert.alert_id] = alert.replace(owner=owner, due_ms=now_ms + lease_ms)
            claimed.append(alerts[alert.alert_id])
        return claimed

    async def update_alert(self, record: AlertRecord) -> bool:
        alerts = self._alerts.get(record.tenant, {})
        stored = alerts.get(record.alert_id)
        if stored is None or stored.owner != record.owner:
            return False
        alerts[record.alert_id] = stored.replace(
            state=record.state,
            attempts=record.attempts,
            last_error=record.last_error,
            done=record.done,
            due_ms=record.due_ms,
        )
        return True

    async def list_alerts(
        self,
        tenant: str,
        before: tuple[int, str] | None,
        limit: int,
        rule_id: str = "",
        state: AlertState | None = None,
    ) -> list[AlertRecord]:
        found = [
            a
            for a in self._alerts.get(tenant, {}).values()
            if (before is None or (a.create_ms, a.alert_id) < before)
            and (not rule_id or a.rule_id == rule_id)
            and (state is None or a.state is state)
        ]
        found.sort(key=lambda a: (a.create_ms, a.alert_id), reverse=True)
        return found[:limit]

    async def prune(self, tenant: str, before_ms: int) -> int:
        alerts = self._alerts.get(tenant, {})
        old = [
            i
            for i, a in alerts.items()
            if a.create_ms < before_ms and a.state is not AlertState.PENDING
        ]
        for alert_id in old:
            del alerts[alert_id]
        return len(old)

    async def cursors(self, tenant: str) -> dict[str, tuple[int, str]]:
        return dict(self._cursors.get(tenant, {}))

    async def save_cursor(self, tenant: str, run_id: str, revision: int, text: str) -> None:
        cursors = self._cursors.setdefault(tenant, {})
        if revision > cursors.get(run_id, (-1, ""))[0]:
            cursors[run_id] = (revision, text)

    async def drop_cursor(self, tenant: str, run_id: str) -> None:
        self._cursors.get(tenant, {}).pop(run_id, None)

    async def discovery(self, tenant: str) -> tuple[int, str] | None:
        return self._discovery.get(tenant)

    async def save_discovery(self, tenant: str, cursor: tuple[int, str]) -> None:
        if tenant not in self._discovery or cursor > self._discovery[tenant]:
            self._discovery[tenant] = cursor


def open_store(backend: object) -> AlertStore:
    """The alert store that lives beside this ledger backend."""
    from runcap_server.backends.redis import RedisLedger
    from runcap_server.backends.sqlite import SqliteLedger

    if isinstance(backend, SqliteLedger):
        from runcap_server.alerts.store_sqlite import SqliteAlertStore

        return SqliteAlertStore(backend)
    if isinstance(backend, RedisLedger):
        from runcap_server.alerts.store_redis import RedisAlertStore

        return RedisAlertStore(backend)
    return MemoryAlertStore()
