"""Watch: live, resumable streams of a run's changes.

One feed per watched run per process reads the run's change log once per
change and fans it out to every local stream. The log is the truth and the
feed only a shortcut: a stream that sees a gap, or whose bounded queue
overflowed, catches up from the log itself, and fails with OUT_OF_RANGE only
when the log no longer holds what it missed. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from runcap_server import errors
from runcap_server.backends.base import Backend
from runcap_server.ledger.types import BudgetState, Change
from runcap_server.tasks import cancel_and_wait

_log = logging.getLogger(__name__)
PAGE_SIZE = 500
# How long a feed waits on its doorbell before it polls the log anyway.
FEED_POLL_S = 1.0
# How long a feed whose reads fail waits before it tries again.
FEED_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: BudgetState


@dataclass(frozen=True, slots=True)
class Progress:
    revision: int
    final: bool = False


WatchItem = Snapshot | Change | Progress


class EncodedOnce:
    """Each change's wire form, made once however many streams send it.

    The feed hands the same Change object to every stream of its run, so the
    first stream to send it encodes it and the others send those same bytes.
    Keyed by identity: an entry holds its change, so the id cannot be reused
    while the entry lives. Bounded: an evicted change is only encoded again.
    """

    def __init__(self, encode: Callable[[Change], bytes], size: int = 4096) -> None:
        self._encode = encode
        self._size = size
        self._entries: dict[int, tuple[Change, bytes]] = {}

    def __call__(self, change: Change) -> bytes:
        entry = self._entries.get(id(change))
        if entry is not None and entry[0] is change:
            return entry[1]
        data = self._encode(change)
        self._entries[id(change)] = (change, data)
        if len(self._entries) > self._size:
            del self._entries[next(iter(self._entries))]  # the oldest
        return data


class _Subscription:
    def __init__(self, capacity: int, heartbeat_s: float) -> None:
        self.capacity = capacity
        self.pending: deque[Change] = deque()
        self.overflowed = False
        self.wake = asyncio.Event()
        # One heartbeat timer per stream, moved only when it fires: arming a
        # timeout on every wait would cost each stream a timer per event.
        self.heartbeat_s = heartbeat_s
        self.heartbeat_due = False
        self._loop = asyncio.get_running_loop()
        self.busy_at = self._loop.time()
        self._timer = self._loop.call_at(self.busy_at + heartbeat_s, self._check)

    def _check(self) -> None:
        due_at = self.busy_at + self.heartbeat_s
        if self._loop.time() >= due_at:
            self.heartbeat_due = True
            self.wake.set()
        else:
            self._timer = self._loop.call_at(due_at, self._check)

    def done(self) -> None:
        """The stream has sent what it was woken for (or its heartbeat)."""
        self.busy_at = self._loop.time()
        if self.heartbeat_due:
            self.heartbeat_due = False
            self._timer = self._loop.call_at(self.busy_at + self.heartbeat_s, self._check)

    def close(self) -> None:
        self._timer.cancel()

    def offer(self, change: Change) -> None:
        if len(self.pending) >= self.capacity:
            # The stream will catch up from the log once it has drained.
            self.overflowed = True
        else:
            self.pending.append(change)
        self.wake.set()


class _Feed:
    """Reads one run's log as it grows and hands each change to every subscriber."""

    def __init__(self, backend: Backend, tenant: str, run_id: str) -> None:
        self.backend = backend
        self.tenant = tenant
        self.run_id = run_id
        self.subscribers: set[_Subscription] = set()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        revision: int | None = None
        while True:
            try:
                if revision is None:
                    page = await self.backend.read_changes(self.tenant, self.run_id, 0, 0)
                    revision = page.head
                    # Changes made before this baseline are not fanned out:
                    # streams already waiting must look at the log for them.
                    self.nudge()
                await self.backend.wait_for_change(self.tenant, self.run_id, revision, FEED_POLL_S)
                page = await self.backend.read_changes(
                    self.tenant, self.run_id, revision, PAGE_SIZE
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("watch feed for run %s failed; retrying", self.run_id)
                # Streams go to the log themselves (and fail there if it is down).
                self.nudge()
                revision = None
                await asyncio.sleep(FEED_RETRY_S)
                continue
            if page.floor > revision + 1:
                # The log was trimmed past this feed: streams check it themselves.
                self.nudge()
            for change in page.changes:
                for subscriber in self.subscribers:
                    subscriber.offer(change)
            revision = page.changes[-1].revision if page.changes else max(revision, page.head)

    def nudge(self) -> None:
        """Send every subscriber to the log to find what it missed."""
        for subscriber in self.subscribers:
            subscriber.overflowed = True
            subscriber.wake.set()


class WatchHub:
    def __init__(self, backend: Backend, *, queue_size: int, heartbeat_s: float) -> None:
        self.backend = backend
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self._feeds: dict[tuple[str, str], _Feed] = {}
        self._closing = asyncio.Event()
        self._streams: set[_Subscription] = set()

    @property
    def watchers(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        """End every stream with a final progress message."""
        self._closing.set()
        for subscription in self._streams:
            subscription.wake.set()

    async def stop(self) -> None:
        self.close()
        await cancel_and_wait([feed.task for feed in self._feeds.values() if feed.task])
        self._feeds.clear()

    def _subscribe(self, tenant: str, run_id: str) -> tuple[_Feed, _Subscription]:
        key = (tenant, run_id)
        feed = self._feeds.get(key)
        if feed is None or feed.task is None or feed.task.done():
            feed = _Feed(self.backend, tenant, run_id)
            self._feeds[key] = feed
            feed.task = asyncio.create_task(feed.run(), name=f"watch-feed-{run_id}")
        subscription = _Subscription(self.queue_size, self.heartbeat_s)
        feed.subscribers.add(subscription)
        self._streams.add(subscription)
        return feed, subscription

    def _unsubscribe(self, feed: _Feed, subscription: _Subscription) -> None:
        subscription.close()
        feed.subscribers.discard(subscription)
        self._streams.discard(subscription)
        if not feed.subscribers and feed.task:
            feed.task.cancel()
            if self._feeds.get((feed.tenant, feed.run_id)) is feed:
                del self._feeds[(feed.tenant, feed.run_id)]
                self.backend.forget(feed.tenant, feed.run_id)

    async def stream(
        self, tenant: str, run_id: str, after_revision: int | None, after_digest: str = ""
    ) -> AsyncGenerator[WatchItem, None]:
        """Snapshot (or replay after `after_revision`), then every change, in order.

        With `after_digest`, the resume point must still be in the log with that
        digest: a history that changed under the client is OUT_OF_RANGE, never a gap.
        """
        if self._closing.is_set():
            raise errors.ShuttingDown()
        # Subscribe before reading so no change can fall between the two.
        feed, subscription = self._subscribe(tenant, run_id)
        try:
            if after_revision is None:
                view = await self.backend.get_run(tenant, run_id)
                cursor = view.state.revision
                yield Snapshot(view.state)
            else:
                page = await self.backend.read_changes(tenant, run_id, after_revision, 0)
                if after_revision > page.head:
                    raise errors.RevisionOutOfRange(run_id, after_revision, page.floor, page.head)
                if after_digest and after_revision > 0:
                    await self._check_history(tenant, run_id, after_revision, after_digest)
                cursor = after_revision
            async for change in self._catch_up(tenant, run_id, cursor):
                cursor = change.revision
                yield change
            subscription.done()
            while True:
                await subscription.wake.wait()
                subscription.wake.clear()
                if self._closing.is_set():
                    yield Progress(cursor, final=True)
                    return
                if subscription.heartbeat_due and not subscription.pending:
                    yield Progress(cursor)
                gap = False
                while subscription.pending:
                    change = subscription.pending.popleft()
                    if change.revision <= cursor:
                        continue
                    if change.revision > cursor + 1:
                        gap = True  # the log fills it below
                        break
                    cursor = change.revision
                    yield change
                if gap or subscription.overflowed:
                    subscription.pending.clear()
                    subscription.overflowed = False
                    async for change in self._catch_up(tenant, run_id, cursor):
                        cursor = change.revision
                        yield change
                subscription.done()
        finally:
            self._unsubscribe(feed, subscription)

    async def _check_history(self, tenant: str, run_id: str, revision: int, digest: str) -> None:
        page = await self.backend.read_changes(tenant, run_id, revision - 1, 1)
        kept = page.changes[0] if page.changes else None
        if kept is None or kept.revision != revision:
            raise errors.RevisionOutOfRange(run_id, revision, page.floor, page.head)
        if kept.state.digest != digest:
            raise errors.RevisionOutOfRange(run_id, revision, page.floor, page.head, diverged=True)

    async def _catch_up(self, tenant: str, run_id: str, cursor: int) -> AsyncIterator[Change]:
        """Every logged change after `cursor`, or OUT_OF_RANGE if it was trimmed."""
        while True:
            page = await self.backend.read_changes(tenant, run_id, cursor, PAGE_SIZE)
            if page.floor > cursor + 1 and page.head > cursor:
                raise errors.RevisionOutOfRange(run_id, cursor, page.floor, page.head)
            if not page.changes:
                return
            for change in page.changes:
                cursor = change.revision
                yield change
