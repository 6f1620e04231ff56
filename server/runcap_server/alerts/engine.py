"""The alert engine: follows the runs of every tenant with rules, raises
alerts from their changes, and delivers them, all in tasks of its own.

- One task (`_loop`) looks, every RUNCAP_ALERTS_POLL, for tenants with rules,
  their new runs (the ListRuns index, from a persisted discovery cursor) and
  alerts due for a (first or next) delivery.
- One follower per run reads its changes through the Watch hub (the same
  change logs and doorbells as Watch), from a cursor persisted with what the
  follower remembers (evaluate.RunMemory), until the run is closed and
  settled.
- Raising is one atomic store step (store.raise_alert): an id per crossing,
  the rule's rate limit decided with it. The raiser owns the new alert until
  its due time and queues it; a bounded pool of workers sends it (a full
  queue only delays it: the alert waits in the store for the next poll).
- A failed attempt sets the alert's next due time (exponential back-off,
  Retry-After honoured); whichever engine polls next takes it, so retries
  survive restarts. After RUNCAP_ALERTS_MAX_ATTEMPTS, or a final refusal, the
  alert is DEAD (logged, listed by ListAlerts).
- Storage down for RUNCAP_ALERTS_BACKEND_DOWN_AFTER: the rules with
  ALERT_TRIGGER_BACKEND_DOWN (as last read) are paged from memory, once per
  outage, and recorded once storage answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Coroutine, Iterable
from typing import Any

import aiohttp

from runcap_server import convert, errors
from runcap_server.alerts import delivery, rules
from runcap_server.alerts.evaluate import RunMemory, Signal, evaluate
from runcap_server.alerts.facts import AlertFacts, summarize
from runcap_server.alerts.rules import Rule, Trigger
from runcap_server.alerts.store import AlertRecord, AlertState, AlertStore, RateLimit
from runcap_server.backends.base import Backend, wait_event
from runcap_server.ledger.types import BudgetState, Change, RunStatus, RunView
from runcap_server.settings import Settings
from runcap_server.tasks import cancel_and_wait
from runcap_server.watch import WatchHub

_log = logging.getLogger("runcap.alerts")
# Alerts queued for the workers, and the workers sending them.
QUEUE_SIZE = 256
WORKERS = 8
# A new rule follows runs created up to this long before it.
DISCOVERY_LOOKBACK_MS = 7 * 86_400_000
DISCOVERY_PAGE = 500
# A follower saves its cursor at most this often (a restart redoes at most
# this much, raising the same alert ids: nothing is sent twice for it).
CURSOR_SAVE_S = 1.0
# How long a follower whose reads fail waits before it tries again.
FOLLOW_RETRY_S = 1.0
PRUNE_EVERY_S = 3600.0
# A tenant's rules are read again at most this often for followers waiting on them.
RULES_REFRESH_S = 0.05


def alert_id(tenant: str, rule_id: str, run_id: str, trigger: Trigger, identity: str) -> str:
    """The alert's id: the same crossing always gets the same one."""
    text = "\n".join((tenant, rule_id, run_id, str(int(trigger)), identity))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _settled(state: BudgetState) -> bool:
    """A closed run with no holds left: nothing more will happen to it."""
    return state.status is RunStatus.CLOSED and state.active_reservations == 0


class AlertEngine:
    def __init__(
        self,
        backend: Backend,
        store: AlertStore,
        hub: WatchHub,
        settings: Settings,
        *,
        backend_name: str = "",
    ) -> None:
        self.backend = backend
        self.store = store
        self.hub = hub
        self.settings = settings
        self.backend_name = backend_name or settings.backend
        # Who holds a claimed alert: this engine, in this process.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.poll_s = settings.alerts_poll_ms / 1000
        self._rules: dict[str, dict[str, Rule]] = {}
        # When each tenant's rules were last read (engine clock, ms at the read's
        # start), and the read that followers wait on.
        self._rules_read_ms: dict[str, int] = {}
        self._rules_read_at: dict[str, float] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._followers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Where this engine's listing of each tenant's runs is: every engine
        # lists every run (replicas share no discovery); the persisted cursor
        # only says where a (re)started engine starts.
        self._discovered: dict[str, tuple[int, str] | None] = {}
        self._queue: asyncio.Queue[AlertRecord] = asyncio.Queue(QUEUE_SIZE)
        self._inflight: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        self._storage_down = False
        self._pruned_at = 0.0

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._spawn(self._loop(), "alerts-engine")
        self._spawn(self._watch_storage(), "alerts-storage-watch")
        for n in range(WORKERS):
            self._spawn(self._worker(), f"alerts-worker-{n}")

    async def stop(self) -> None:
        """Stop following and sending; an alert being sent stays PENDING and is
        sent again (by this engine after a restart, or another) once due."""
        tasks = [*self._tasks, *self._followers.values(), *self._refreshing.values()]
        await cancel_and_wait(tasks)
        self._tasks.clear()
        self._followers.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def poke(self) -> None:
        """Look at the rules now (a rule was put or deleted in this process)."""
        self._wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    @property
    def following(self) -> int:
        return len(self._followers)

    # -- the poll loop -------------------------------------------------------

    async def _loop(self) -> None:
        failing = False
        while True:
            try:
                if not self._storage_down:
                    await self._tick()
                failing = False
            except errors.BackendUnavailable as error:
                if not failing:
                    _log.warning("alerts: storage unavailable, retrying: %s", error)
                failing = True
            except Exception:
                _log.exception("alerts: poll failed; retrying")
            await wait_event(self._wake, self.poll_s)
            self._wake.clear()

    async def _tick(self) -> None:
        prune = time.monotonic() - self._pruned_at >= PRUNE_EVERY_S
        for tenant in await self.store.tenants():
            tenant_rules = await self._load_rules(tenant)
            if any(rule.triggers - {Trigger.BACKEND_DOWN} for rule in tenant_rules.values()):
                await self._follow_runs(tenant, tenant_rules)
            else:
                self._unfollow(tenant)
            await self._claim(tenant)
            if prune:
                pruned = await self.store.prune(
                    tenant, self._now_ms() - self.settings.alerts_retention_ms
                )
                if pruned:
                    _log.info("alerts: pruned %d old alerts of tenant %s", pruned, tenant)
        if prune:
            self._pruned_at = time.monotonic()

    async def _load_rules(self, tenant: str) -> dict[str, Rule]:
        started = self._now_ms()
        loaded = {
            stored.rule_id: rules.to_rule(rules.decode(stored.text), stored.since_ms)
            for stored in await self.store.rules(tenant)
        }
        self._rules[tenant] = loaded
        self._rules_read_ms[tenant] = started
        self._rules_read_at[tenant] = time.monotonic()
        return loaded

    async def _rules_after(self, tenant: str, time_ms: int) -> dict[str, Rule]:
        """The tenant's rules as read after `time_ms`: a rule stored before a
        change is never missed for it (a change waits up to one read)."""
        while self._rules_read_ms.get(tenant, 0) <= time_ms:
            refresh = self._refreshing.get(tenant)
            if refresh is None or refresh.done():
                refresh = asyncio.create_task(self._refresh_rules(tenant))
                self._refreshing[tenant] = refresh
            await asyncio.shield(refresh)
        return self._rules.get(tenant, {})

    async def _refresh_rules(self, tenant: str) -> None:
        # Spaced out, so a busy run does not turn into a stream of rule reads.
        wait = self._rules_read_at.get(tenant, 0.0) + RULES_REFRESH_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await self._load_rules(tenant)

    async def _rule(self, tenant: str, rule_id: str) -> Rule | None:
        rule = self._rules.get(tenant, {}).get(rule_id)
        if rule is None:
            rule = (await self._load_rules(tenant)).get(rule_id)
        return rule

    async def _follow_runs(self, tenant: str, tenant_rules: dict[str, Rule]) -> None:
        if tenant not in self._discovered:
            # Runs listed before (by this engine or another): resumed from their cursors.
            cursor = await self.store.discovery(tenant)
            for run_id, (revision, memory) in (await self.store.cursors(tenant)).items():
                self._start_follower(tenant, run_id, revision, memory)
            self._discovered[tenant] = cursor
        cursor = self._discovered[tenant]
        since = min(rule.since_ms for rule in tenant_rules.values())
        from_ms = cursor[0] if cursor else since - DISCOVERY_LOOKBACK_MS
        while True:
            listed = await self.backend.list_run_ids(tenant, from_ms, 2**53, cursor, DISCOVERY_PAGE)
            for _, run_id in listed:
                # Remembered first: a restart resumes every run it was following.
                await self.store.save_cursor(tenant, run_id, 0, "")
                self._start_follower(tenant, run_id, 0, "")
            if listed:
                cursor = self._discovered[tenant] = listed[-1]
                await self.store.save_discovery(tenant, cursor)
            if len(listed) < DISCOVERY_PAGE:
                return

    def _unfollow(self, tenant: str) -> None:
        """The tenant has no rule about runs (any more): stop its followers;
        their cursors stay, for when it has one again."""
        for (of, _), task in list(self._followers.items()):
            if of == tenant:
                task.cancel()
        self._discovered.pop(tenant, None)

    def _start_follower(self, tenant: str, run_id: str, revision: int, memory: str) -> None:
        key = (tenant, run_id)
        if key in self._followers:
            return
        task = asyncio.create_task(
            self._follow(tenant, run_id, revision, memory), name=f"alerts-follow-{run_id}"
        )
        self._followers[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._followers.get(key) is done:
                del self._followers[key]

        task.add_done_callback(forget)

    # -- following a run -----------------------------------------------------

    async def _follow(self, tenant: str, run_id: str, revision: int, text: str) -> None:
        memory = RunMemory.decode(text)
        saved, saved_at = revision, time.monotonic()
        view: RunView | None = None
        failing = False
        try:
            while True:
                try:
                    if view is None:
                        view = await self.backend.get_run(tenant, run_id)
                        if _settled(view.state) and revision >= view.state.revision:
                            await self.store.drop_cursor(tenant, run_id)
                            return
                    items = self.hub.stream(tenant, run_id, revision)
                    async with contextlib.aclosing(items):
                        async for item in items:
                            if isinstance(item, Change):
                                memory = await self._on_change(tenant, view, item, memory)
                                revision, failing = item.revision, False
                                if _settled(item.state):
                                    await self.store.drop_cursor(tenant, run_id)
                                    saved = revision
                                    return
                            if revision > saved and time.monotonic() - saved_at >= CURSOR_SAVE_S:
                                await self.store.save_cursor(
                                    tenant, run_id, revision, memory.encode()
                                )
                                saved, saved_at = revision, time.monotonic()
                    return  # the hub is closing: the server is stopping
                except errors.RunNotFound:
                    await self.store.drop_cursor(tenant, run_id)
                    saved = revision
                    return
                except errors.ShuttingDown:
                    return
                except errors.RevisionOutOfRange as trimmed:
                    # Past the retained log (RUNCAP_LOG_RETENTION): go on from its floor.
                    floor = int(trimmed.metadata["floor"])
                    _log.warning(
                        "alerts: run %s's changes %d to %d were trimmed before the engine read "
                        "them; they raise no alerts",
                        run_id,
                        revision + 1,
                        floor - 1,
                    )
                    revision = floor - 1
                except Exception as error:
                    # Once per streak: an outage would otherwise log every run every second.
                    log = _log.debug if failing else _log.warning
                    log("alerts: following run %s failed (%s); retrying", run_id, error)
                    failing = True
                    await asyncio.sleep(FOLLOW_RETRY_S)
        finally:
            if revision > saved:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await self.store.save_cursor(tenant, run_id, revision, memory.encode())

    async def _on_change(
        self, tenant: str, view: RunView, change: Change, memory: RunMemory
    ) -> RunMemory:
        """Raise what the change calls for; the follower's memory after it.
        On a failure the memory is left as it was, so the change is redone."""
        tenant_rules = await self._rules_after(tenant, change.time_ms)
        matching = [rule for rule in tenant_rules.values() if rule.matches(view)]
        after = RunMemory.decode(memory.encode())
        for signal in evaluate(change, after, matching):
            await self._raise(tenant, view, change, signal)
        return after

    async def _raise(self, tenant: str, view: RunView, change: Change, signal: Signal) -> None:
        rule, run_id, state = signal.rule, view.spec.run_id, change.state
        now = self._now_ms()
        agent = view.spec.labels.get("agent", "")
        facts = AlertFacts(
            alert_id=alert_id(tenant, rule.rule_id, run_id, signal.trigger, signal.identity),
            tenant=tenant,
            rule_id=rule.rule_id,
            trigger=signal.trigger,
            run_id=run_id,
            time_ms=change.time_ms,
            summary=summarize(
                signal.trigger,
                run_id,
                agent,
                state.committed_micros,
                state.limit_micros,
                int(signal.threshold),
                signal.details,
            ),
            threshold=int(signal.threshold),
            budget=convert.state_pb(state).SerializeToString(),
            labels=dict(view.spec.labels),
            api_key_id=view.lineage.api_key_id,
            user_id=view.lineage.user_id,
            team_id=view.lineage.team_id,
            parent_run_id=view.lineage.ancestors[0] if view.lineage.ancestors else "",
            owner=rule.owner,
            description=rule.description,
            details=signal.details,
        )
        record = AlertRecord(
            tenant=tenant,
            alert_id=facts.alert_id,
            rule_id=rule.rule_id,
            trigger=int(signal.trigger),
            run_id=run_id,
            create_ms=now,
            payload=facts.to_json(),
            rate_key=f"{run_id}/{signal.rate_key}",
            due_ms=now + self.settings.alerts_lease_ms,
            owner=self.owner,
        )
        limit = RateLimit(rule.min_interval_ms, rule.max_alerts_per_hour)
        stored = await self.store.raise_alert(record, limit)
        if stored is None:
            return  # raised before (a restart, or another replica)
        if stored.state is AlertState.SUPPRESSED:
            _log.info(
                "alert %s suppressed by rule %s's rate limit: %s",
                stored.alert_id,
                rule.rule_id,
                facts.summary,
            )
            return
        _log.info("alert %s raised by rule %s: %s", stored.alert_id, rule.rule_id, facts.summary)
        self._enqueue(stored)

    # -- delivery ------------------------------------------------------------

    def _enqueue(self, record: AlertRecord) -> None:
        key = (record.tenant, record.alert_id)
        if key in self._inflight:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            return  # it waits in the store; a later poll takes it once due
        self._inflight.add(key)

    async def _claim(self, tenant: str) -> None:
        free = QUEUE_SIZE - self._queue.qsize()
        if free <= 0:
            return
        claimed = await self.store.claim_due(
            tenant, self.owner, self._now_ms(), self.settings.alerts_lease_ms, free
        )
        for record in claimed:
            self._enqueue(record)

    async def _worker(self) -> None:
        while True:
            record = await self._queue.get()
            try:
                await self._deliver(record)
            except errors.BackendUnavailable as error:
                _log.warning(
                    "alerts: could not record alert %s (%s); it is sent again once due",
                    record.alert_id,
                    error,
                )
            except Exception:
                _log.exception("alerts: delivering alert %s failed", record.alert_id)
            finally:
                self._inflight.discard((record.tenant, record.alert_id))

    async def _deliver(self, record: AlertRecord) -> None:
        rule = await self._rule(record.tenant, record.rule_id)
        if rule is None:
            dead = record.replace(
                state=AlertState.DEAD, last_error="the rule was deleted before delivery"
            )
            if await self.store.update_alert(dead):
                _log.warning("alert %s is dead: %s", record.alert_id, dead.last_error)
            return
        facts = AlertFacts.from_json(record.payload)
        attempt = await self._attempt(rule.targets, facts, record.done)
        done, failures = attempt
        attempts = record.attempts + 1
        if not failures:
            updated = record.replace(state=AlertState.DELIVERED, attempts=attempts, done=done)
        else:
            error = "; ".join(f.error for f in failures)
            final = any(not f.retryable for f in failures)
            if final or attempts >= self.settings.alerts_max_attempts:
                updated = record.replace(
                    state=AlertState.DEAD, attempts=attempts, last_error=error, done=done
                )
            else:
                wait_s = delivery.backoff_s(
                    attempts,
                    self.settings.alerts_retry_base_ms / 1000,
                    self.settings.alerts_retry_max_ms / 1000,
                    max((f.retry_after_s or 0.0 for f in failures), default=None) or None,
                    self._rng,
                )
                updated = record.replace(
                    attempts=attempts,
                    last_error=error,
                    done=done,
                    due_ms=self._now_ms() + int(wait_s * 1000),
                )
        if not await self.store.update_alert(updated):
            _log.info("alert %s was taken over by another engine meanwhile", record.alert_id)
            return
        if updated.state is AlertState.DELIVERED:
            _log.info("alert %s delivered (attempt %d)", record.alert_id, attempts)
        elif updated.state is AlertState.DEAD:
            _log.warning(
                "alert %s is dead after %d attempts (rule %s, run %s): %s",
                record.alert_id,
                attempts,
                record.rule_id,
                record.run_id,
                updated.last_error,
            )
        else:
            _log.info(
                "alert %s: attempt %d failed (%s); next in %.1fs",
                record.alert_id,
                attempts,
                updated.last_error,
                (updated.due_ms - self._now_ms()) / 1000,
            )

    async def _attempt(
        self, targets: Iterable[rules.Target], facts: AlertFacts, done: tuple[int, ...]
    ) -> tuple[tuple[int, ...], list[delivery.Outcome]]:
        """One attempt to every target that has not accepted the alert yet."""
        assert self._session is not None
        pending = [(i, t) for i, t in enumerate(targets) if i not in done]
        outcomes = await asyncio.gather(
            *(
                delivery.send(
                    self._session,
                    target,
                    facts,
                    self.settings.dashboard_url,
                    self.settings.alerts_timeout_ms / 1000,
                )
                for _, target in pending
            )
        )
        accepted = {
            i for (i, _), outcome in zip(pending, outcomes, strict=True) if outcome.delivered
        }
        return tuple(sorted(set(done) | accepted)), [o for o in outcomes if not o.delivered]

    # -- storage down --------------------------------------------------------

    async def _watch_storage(self) -> None:
        """Pages the BACKEND_DOWN rules once per outage longer than the setting."""
        down_after_s = self.settings.alerts_backend_down_after_ms / 1000
        check_s = min(1.0, down_after_s / 4)
        down_since: float | None = None
        paged = False
        while True:
            await asyncio.sleep(check_s)
            try:
                async with asyncio.timeout(max(check_s, 0.5)):
                    await self.backend.ping()
            except Exception as error:
                now = time.time()
                if down_since is None:
                    down_since = now
                self._storage_down = True
                if not paged and now - down_since >= down_after_s:
                    paged = True
                    self._page_outage(int(down_since * 1000), now - down_since, error)
                continue
            down_since, paged, self._storage_down = None, False, False

    def _page_outage(self, since_ms: int, down_s: float, error: Exception) -> None:
        _log.error("alerts: storage unreachable for %.0fs: %s", down_s, error)
        for tenant, tenant_rules in self._rules.items():
            for rule in tenant_rules.values():
                if Trigger.BACKEND_DOWN in rule.triggers:
                    facts = AlertFacts(
                        alert_id=alert_id(
                            tenant,
                            rule.rule_id,
                            "",
                            Trigger.BACKEND_DOWN,
                            f"{since_ms}@{self.owner}",
                        ),
                        tenant=tenant,
                        rule_id=rule.rule_id,
                        trigger=Trigger.BACKEND_DOWN,
                        run_id="",
                        time_ms=self._now_ms(),
                        summary=(
                            f"runcap storage ({self.backend_name}) unreachable for "
                            f"{down_s:.0f}s from {socket.gethostname()}: {error}"
                        ),
                        owner=rule.owner,
                        description=rule.description,
                        details={"down_since_ms": since_ms, "replica": self.owner},
                    )
                    self._spawn(
                        self._send_outage(tenant, rule, facts), f"alerts-outage-{rule.rule_id}"
                    )

    async def _send_outage(self, tenant: str, rule: Rule, facts: AlertFacts) -> None:
        """Deliver without the store (it is down), then record the outcome once it answers."""
        done: tuple[int, ...] = ()
        attempts, error = 0, ""
        while attempts < self.settings.alerts_max_attempts:
            attempts += 1
            done, failures = await self._attempt(rule.targets, facts, done)
            if not failures:
                break
            error = "; ".join(f.error for f in failures)
            if any(not f.retryable for f in failures):
                break
            await asyncio.sleep(
                delivery.backoff_s(
                    attempts,
                    self.settings.alerts_retry_base_ms / 1000,
                    self.settings.alerts_retry_max_ms / 1000,
                    None,
                    self._rng,
                )
            )
        state = AlertState.DELIVERED if len(done) == len(rule.targets) else AlertState.DEAD
        log = _log.info if state is AlertState.DELIVERED else _log.error
        log("alert %s (storage down) %s after %d attempts", facts.alert_id, state.name, attempts)
        record = AlertRecord(
            tenant=tenant,
            alert_id=facts.alert_id,
            rule_id=rule.rule_id,
            trigger=int(Trigger.BACKEND_DOWN),
            run_id="",
            create_ms=facts.time_ms,
            payload=facts.to_json(),
            state=state,
            attempts=attempts,
            last_error=error if state is AlertState.DEAD else "",
            done=done,
        )
        while True:
            try:
                await self.store.raise_alert(record, None)
                return
            except Exception:
                await asyncio.sleep(self.poll_s)
