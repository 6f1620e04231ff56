"""The server-sent-events bridge: one HTTP stream per page that multiplexes
the Watch streams of the runs the page shows.

POST /api/watch takes a `params.WatchSpec` and answers `text/event-stream`
with these events (each one JSON object):

- ``snapshot`` ``{"run", "state", "live"}``: a run's current state; it
  replaces what the page knew of the run. ``run`` (its configuration) is
  absent when the page already has it.
- ``change`` ``{"run_id", "revision", "event", "state", "live", "history"}``:
  one change of a run, in revision order, with the state right after it.
  ``history`` is true for the past changes replayed for a timeline (older
  than the snapshot: they do not change the current state, and carry no
  ``live``).
- ``live`` ``{"runs": {run_id: live}}``: every second, the burn rate over
  the last minute, the time to exhaustion at that rate, pending approvals
  and flags (`views.live_json`); the rate slides with time even when the run
  does not change.
- ``ready`` ``{"runs", "truncated"}``: after the first snapshots.
- ``reset`` ``{"run_id"}``: the page's resume point of the run is not in the
  server's history (trimmed, or a failover changed it): the page forgets the
  run and reconnects without that cursor.
- ``error`` ``{"run_id", "error"}``: a run's stream failed for good
  (``run_id`` is empty when the listing of new runs failed).

Nothing is polled for state: each run is one Watch call of the page's key
(`api.Loopback`), snapshot then changes. A page that reconnects sends each
run's cursor (revision and digest) and gets exactly the changes after it.
The runs page also asks for the active runs: those are listed once, then
the listing is read again every `RELIST_S` only to find runs created since
(the API has no stream of new runs).

To know the burn rate as soon as a run appears, each Watch starts up to
`BURN_REPLAY` changes back: those past changes, with their server times,
fill the rate's one-minute window, and are not sent (except as history).
When the transport fails (the server stops, the storage is unreachable) the
stream ends, and the page reconnects and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import grpc
from aiohttp import web

from runcap import RevisionOutOfRangeError, RuncapError
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server.dashboard import sse
from runcap_server.dashboard.api import Loopback, list_runs
from runcap_server.dashboard.params import MAX_WATCHED_RUNS, Cursor, WatchSpec
from runcap_server.dashboard.views import (
    Json,
    error_json,
    event_json,
    live_json,
    run_json,
    state_json,
)
from runcap_server.liveview import RunModel
from runcap_server.tasks import cancel_and_wait

_log = logging.getLogger(__name__)

BURN_REPLAY: Final = 300
"""Past changes each Watch starts with, to fill the burn-rate window."""
TICK_S: Final = 1.0
"""How often the `live` event goes out."""
RELIST_S: Final = 5.0
"""How often the runs page's listing is read again for new runs."""
LIST_SCAN_LIMIT: Final = 20_000
"""The most runs one listing of active runs reads."""
QUEUE_LIMIT: Final = 10_000
"""Events a stream buffers for a slow page before it gives up on it (the
page then reconnects and resumes from its cursors)."""
WRITE_BATCH: Final = 256
# Failures of the transport or the server: the page reconnects and resumes.
RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class Stream:
    """One page's live stream: `prepare`, then `run` until the page leaves
    or `end` is called."""

    def __init__(
        self,
        loopback: Loopback,
        api_key: str | None,
        spec: WatchSpec,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._loopback = loopback
        self._api_key = api_key
        self._spec = spec
        self._clock = clock
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_LIMIT)
        self._overflowed = False
        self._models: dict[str, RunModel] = {}
        # Runs whose Watch has caught up with the snapshot: their live figures hold.
        self._caught_up: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._initial: list[tuple[budget_pb2.Run, budget_pb2.BudgetState, int]] = []
        self._listed_since: datetime | None = spec.active_since
        self._truncated = False

    async def prepare(self) -> None:
        """Reads the named runs and lists the active ones, before any byte
        of the response: a failure here (a key that is not valid, a role that
        may not list, an unknown run) is the HTTP answer, a `RuncapError`."""
        client = self._loopback.client(self._api_key)
        answers = await asyncio.gather(
            *(client.get_run(run_id) for run_id in self._spec.runs), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            self._initial.append((answer.run, answer.state, self._spec.history))
        if self._spec.active_since is None:
            return
        listed, truncated = await list_runs(
            client, self._spec.active_since, None, limit=LIST_SCAN_LIMIT
        )
        named = set(self._spec.runs)
        # A run the page follows stays while it closes; other closed runs are not active.
        active = [
            item
            for item in listed
            if item.run.run_id not in named
            and (
                item.state.status != budget_pb2.RUN_STATUS_CLOSED
                or item.run.run_id in self._spec.resume
            )
        ]
        room = MAX_WATCHED_RUNS - len(self._initial)
        self._truncated = truncated or len(active) > room
        # The newest runs, when there are too many.
        for item in active[-room:] if room > 0 else []:
            self._initial.append((item.run, item.state, 0))
        if listed:
            self._listed_since = max(item.run.create_time.ToDatetime(tzinfo=UTC) for item in listed)

    async def run(self, response: web.StreamResponse) -> None:
        """Writes the events to `response` until the page goes away (the
        write fails) or the stream ends."""
        for run, state, history in self._initial:
            self._follow(run, state, history)
        self._emit("ready", {"runs": len(self._models), "truncated": self._truncated})
        self._tasks.append(asyncio.create_task(self._tick(), name="dashboard-live"))
        if self._spec.active_since is not None:
            self._tasks.append(asyncio.create_task(self._relist(), name="dashboard-relist"))
        try:
            while not self._overflowed:
                item = await self._queue.get()
                batch = [item]
                while len(batch) < WRITE_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await response.write(b"".join(part for part in batch if part is not None))
                if None in batch:
                    break
        finally:
            await cancel_and_wait(self._tasks)

    def end(self) -> None:
        """Ends the stream (the page reconnects and resumes)."""
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self._overflowed = True

    def _emit(self, event: str, data: Json) -> None:
        try:
            self._queue.put_nowait(sse.encode(event, data))
        except asyncio.QueueFull:
            self._overflowed = True

    def _follow(self, run: budget_pb2.Run, state: budget_pb2.BudgetState, history: int) -> None:
        """Starts following a run whose state (at its head revision) is known."""
        run_id = run.run_id
        cursor = self._spec.resume.get(run_id)
        if cursor is not None and cursor.revision > state.revision:
            # The page saw revisions this server never had (a failover lost them).
            self._emit("reset", {"run_id": run_id})
            return
        model = RunModel(run_id, state=state)
        model.seed_approvals(run)
        self._models[run_id] = model
        if cursor is None:
            self._emit(
                "snapshot",
                {
                    "run": run_json(run),
                    "state": state_json(state),
                    "live": live_json(model, self._clock()),
                },
            )
        self._tasks.append(
            asyncio.create_task(
                self._watch(model, state, cursor, history), name=f"dashboard-watch-{run_id}"
            )
        )

    async def _watch(
        self,
        model: RunModel,
        head: budget_pb2.BudgetState,
        cursor: Cursor | None,
        history: int,
    ) -> None:
        try:
            await self._watch_run(model, head, cursor, history)
        except RuncapError as error:
            if error.code in RETRYABLE:
                _log.info(
                    "dashboard: Watch of %s failed (%s): ending its stream", model.run_id, error
                )
                self.end()
            else:
                self._emit("error", {"run_id": model.run_id, "error": error_json(error)})
        except Exception:
            _log.exception("dashboard: following %s failed: ending its stream", model.run_id)
            self.end()

    async def _watch_run(
        self,
        model: RunModel,
        head: budget_pb2.BudgetState,
        cursor: Cursor | None,
        history: int,
    ) -> None:
        run_id = model.run_id
        # What the page has: the snapshot sent (head), or its own cursor.
        base = head.revision if cursor is None else cursor.revision
        sent, sent_digest = base, head.digest if cursor is None else cursor.digest
        # Past changes above this are sent as history (a fresh run page).
        floor = max(0, head.revision - history) if cursor is None and history else base
        after: int | None = max(0, min(floor, base - BURN_REPLAY))
        if after is not None and after >= base:
            self._caught_up.add(run_id)
        while True:
            request = pb.WatchRequest(run_id=run_id)
            if after is not None:
                request.after_revision = after
                request.after_digest = sent_digest if after == sent else ""
            watch = self._loopback.watch(self._api_key, request)
            try:
                async with contextlib.aclosing(watch) as messages:
                    async for message in messages:
                        kind = message.WhichOneof("kind")
                        revision = message.revision
                        if kind == "progress":
                            if message.progress.final:
                                return  # the server stops; so does this stream, soon
                            if revision >= base:
                                self._caught_up.add(run_id)
                            continue
                        model.apply(message, self._clock())
                        if kind == "snapshot":
                            self._caught_up.add(run_id)
                            sent, sent_digest = revision, message.snapshot.digest
                            self._emit(
                                "snapshot",
                                {
                                    "state": state_json(message.snapshot),
                                    "live": live_json(model, self._clock()),
                                },
                            )
                            continue
                        event = message.event
                        if (
                            cursor is not None
                            and cursor.digest
                            and revision == cursor.revision
                            and event.state.digest != cursor.digest
                        ):
                            # Same revision, another history: the page's view is not ours.
                            self._models.pop(run_id, None)
                            self._emit("reset", {"run_id": run_id})
                            return
                        if revision >= base:
                            self._caught_up.add(run_id)
                        if revision > sent:
                            sent, sent_digest = revision, event.state.digest
                            self._emit("change", self._change(message, model, history=False))
                        elif revision > floor:
                            self._emit("change", self._change(message, model, history=True))
                return
            except RevisionOutOfRangeError:
                # The log no longer holds `after`: skip the replay and go on from
                # what the page has; if even that is gone, start over.
                if after is not None and after < sent:
                    after = sent
                elif cursor is not None and sent == cursor.revision:
                    self._models.pop(run_id, None)
                    self._emit("reset", {"run_id": run_id})
                    return
                elif after is not None:
                    after = None  # a fresh snapshot
                else:
                    raise

    def _change(self, message: pb.WatchResponse, model: RunModel, *, history: bool) -> Json:
        change: Json = {
            "run_id": model.run_id,
            "revision": message.revision,
            "event": event_json(message.event),
            "state": state_json(message.event.state),
            "history": history,
        }
        if not history:
            change["live"] = live_json(model, self._clock())
        return change

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = self._clock()
            runs = {
                run_id: live_json(model, now)
                for run_id, model in self._models.items()
                if run_id in self._caught_up
            }
            self._emit("live", {"runs": runs})

    async def _relist(self) -> None:
        """Finds runs created since the last listing, and follows them."""
        client = self._loopback.client(self._api_key)
        while True:
            await asyncio.sleep(RELIST_S)
            if len(self._models) >= MAX_WATCHED_RUNS or self._listed_since is None:
                continue
            try:
                listed, _ = await list_runs(client, self._listed_since, None, limit=LIST_SCAN_LIMIT)
            except RuncapError as error:
                if error.code in RETRYABLE:
                    self.end()
                else:
                    self._emit("error", {"run_id": "", "error": error_json(error)})
                return
            for item in listed:
                self._listed_since = max(
                    self._listed_since, item.run.create_time.ToDatetime(tzinfo=UTC)
                )
                fresh = (
                    item.run.run_id not in self._models
                    and item.state.status != budget_pb2.RUN_STATUS_CLOSED
                )
                if fresh and len(self._models) < MAX_WATCHED_RUNS:
                    self._follow(item.run, item.state, 0)


class Bridge:
    """The open streams of one dashboard, so that shutting down ends them."""

    def __init__(self, loopback: Loopback) -> None:
        self.loopback = loopback
        self._streams: set[Stream] = set()
        self._closed = False

    def open(self, api_key: str | None, spec: WatchSpec) -> Stream:
        return Stream(self.loopback, api_key, spec)

    async def serve(self, stream: Stream, response: web.StreamResponse) -> None:
        """Runs `stream` into `response` (prepared) until either ends."""
        if self._closed:
            return
        self._streams.add(stream)
        try:
            await stream.run(response)
        finally:
            self._streams.discard(stream)

    def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            stream.end()
