"""`runcap top`: a live terminal view of active runs.

One row per run: a spend-vs-limit bar (committed, then held), the burn rate,
the time to exhaustion at that rate, the threshold band, and whether the run
is suspended or waits for an approval. Each run is followed by one Watch
stream (a snapshot, then every change; `AsyncRuncapClient.watch` resumes it
across disconnects): nothing is polled. `s` suspends the selected run, `r`
resumes it, `q` quits.

The API has no "list runs" call yet, so the runs are named on the command line
(or one per line in a file, ``-`` for stdin); a listing by tenant comes with
the report RPC.

The model (`RunModel`, `BurnWindow`) is plain code with no terminal in it; the
Textual app (`TopApp`) only draws it and forwards the keys.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Static

from runcap import AsyncRuncapClient, RuncapError, RunNotFoundError
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server.money import format_usd

BURN_WINDOW_SECONDS: Final = 60.0
"""The burn rate is the committed spend gained over this much wall time."""
MIN_ELAPSED_SECONDS: Final = 1.0
"""The shortest span a burn rate is computed over (right after the first
observation the span is tiny, and the rate would be noise)."""
BAR_WIDTH: Final = 24

THRESHOLD_NAMES: Final = {
    budget_pb2.THRESHOLD_LEVEL_UNSPECIFIED: "none",
    budget_pb2.THRESHOLD_LEVEL_INFO: "info",
    budget_pb2.THRESHOLD_LEVEL_WARN: "warn",
    budget_pb2.THRESHOLD_LEVEL_THROTTLE: "throttle",
    budget_pb2.THRESHOLD_LEVEL_STOP: "stop",
}
THRESHOLD_STYLES: Final = {
    "none": "dim",
    "info": "cyan",
    "warn": "yellow",
    "throttle": "bold dark_orange",
    "stop": "bold red",
}


# --------------------------------------------------------------------------
# Model


@dataclass
class BurnWindow:
    """The rate at which a run's committed spend grows, over a sliding window.

    Committed spend is a step function of time: it changes only at the
    observed points (a Watch change) and stays flat in between. The rate at
    `now` is what it gained since ``now - window`` (or since the first
    observation, when that is later), per minute of that span.
    """

    window: float = BURN_WINDOW_SECONDS
    _points: deque[tuple[float, int]] = field(default_factory=deque)

    def observe(self, at: float, committed_micros: int) -> None:
        """Records the committed spend at time `at` (seconds since the epoch).
        A time before the last one recorded counts as the last one (the
        server's clock and ours may disagree a little)."""
        if self._points:
            last_at, last_committed = self._points[-1]
            at = max(at, last_at)
            if committed_micros == last_committed:
                return
        self._points.append((at, committed_micros))

    def micros_per_minute(self, now: float) -> float | None:
        """The burn rate in micro-USD per minute at `now`; None before any
        observation."""
        if not self._points:
            return None
        start = now - self.window
        # Forget the points the window has passed, but keep the last of them:
        # it is the committed spend at the window's start.
        while len(self._points) > 1 and self._points[1][0] <= start:
            self._points.popleft()
        first_at, first_committed = self._points[0]
        latest = self._points[-1][1]
        elapsed = max(now - max(start, first_at), MIN_ELAPSED_SECONDS)
        return (latest - first_committed) * 60.0 / elapsed


def seconds_to_exhaustion(remaining_micros: int, micros_per_minute: float | None) -> float | None:
    """How long until the remaining budget is gone at the given burn rate:
    0 when nothing remains, None when nothing is burning (or no rate yet)."""
    if remaining_micros <= 0:
        return 0.0
    if not micros_per_minute or micros_per_minute <= 0:
        return None
    return remaining_micros * 60.0 / micros_per_minute


@dataclass
class RunModel:
    """What `runcap top` knows about one run, built from its Watch stream.

    Times of changes are the server's (`BudgetEvent.time`); a snapshot carries
    no time, so it is placed at the moment it was received.
    """

    run_id: str
    state: budget_pb2.BudgetState | None = None
    burn: BurnWindow = field(default_factory=BurnWindow)
    pending_approvals: set[str] = field(default_factory=set)
    error: str | None = None
    ended: bool = False

    def apply(self, message: pb.WatchResponse, received_at: float) -> None:
        """Applies one Watch message received at `received_at`."""
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            self.state = message.snapshot
            self.burn.observe(received_at, message.snapshot.committed_micros)
        elif kind == "event":
            event = message.event
            self.state = event.state
            at = received_at
            if event.HasField("time"):
                # Never after its receipt, whatever the two clocks say.
                at = min(at, event.time.ToMicroseconds() / 1e6)
            self.burn.observe(at, event.state.committed_micros)
            if event.type == budget_pb2.EVENT_TYPE_APPROVAL_REQUESTED:
                self.pending_approvals.add(event.approval_id)
            elif event.type in (
                budget_pb2.EVENT_TYPE_APPROVAL_GRANTED,
                budget_pb2.EVENT_TYPE_APPROVAL_DENIED,
            ):
                self.pending_approvals.discard(event.approval_id)
        self.error = None

    def seed_approvals(self, run: budget_pb2.Run) -> None:
        """Adds the run's pending approvals (a snapshot does not list them)."""
        for approval in run.approvals:
            if approval.status == budget_pb2.APPROVAL_STATUS_PENDING:
                self.pending_approvals.add(approval.approval_id)

    @property
    def threshold(self) -> str:
        if self.state is None:
            return "none"
        return THRESHOLD_NAMES.get(self.state.threshold, "none")

    @property
    def suspended(self) -> bool:
        return self.state is not None and self.state.status == budget_pb2.RUN_STATUS_SUSPENDED

    @property
    def closed(self) -> bool:
        return self.state is not None and self.state.status == budget_pb2.RUN_STATUS_CLOSED

    @property
    def committed_fraction(self) -> float:
        """Committed spend as a fraction of the limit (may pass 1)."""
        if self.state is None:
            return 0.0
        return self.state.committed_micros / max(self.state.limit_micros, 1)

    @property
    def held_fraction(self) -> float:
        """Held (reserved) spend as a fraction of the limit."""
        if self.state is None:
            return 0.0
        return self.state.reserved_micros / max(self.state.limit_micros, 1)

    def rate(self, now: float) -> float | None:
        """Burn rate in micro-USD per minute."""
        return self.burn.micros_per_minute(now)

    def eta(self, now: float) -> float | None:
        """Seconds until the budget is exhausted at the current burn rate."""
        if self.state is None:
            return None
        return seconds_to_exhaustion(self.state.remaining_micros, self.rate(now))

    def flags(self) -> list[str]:
        flags = []
        if self.suspended:
            flags.append("SUSPENDED")
        if self.closed:
            flags.append("CLOSED")
        if self.pending_approvals:
            flags.append(f"APPROVAL({len(self.pending_approvals)})")
        if self.state is not None and self.state.overrun_micros:
            flags.append("OVERRUN")
        if self.error:
            flags.append(self.error)
        return flags


def format_rate(micros_per_minute: float | None) -> str:
    if micros_per_minute is None:
        return "-"
    micros = round(micros_per_minute)
    if abs(micros) >= 10_000:  # whole cents from a cent up
        micros = round(micros_per_minute / 10_000) * 10_000
    return f"{format_usd(micros)}/min"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "exhausted"
    if seconds < 1:
        return "<1s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 100 * 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return ">99h"


def spend_bar(model: RunModel, width: int = BAR_WIDTH) -> Text:
    """The run's limit as a bar: committed (█), held (▓), then free (░)."""
    bar = Text()
    committed = min(width, int(model.committed_fraction * width))
    used = min(width, int((model.committed_fraction + model.held_fraction) * width))
    over = model.committed_fraction + model.held_fraction > 1
    bar.append("█" * committed, style="red" if over else "green")
    bar.append("▓" * (used - committed), style="yellow")
    bar.append("░" * (width - used), style="grey37")
    bar.append(f" {int((model.committed_fraction + model.held_fraction) * 100):>3}%")
    return bar


# --------------------------------------------------------------------------
# The app

COLUMNS: Final = (
    ("run", "RUN"),
    ("bar", "SPEND (committed+held)"),
    ("committed", "COMMITTED"),
    ("held", "HELD"),
    ("limit", "LIMIT"),
    ("burn", "BURN"),
    ("eta", "EXHAUSTED IN"),
    ("threshold", "THRESHOLD"),
    ("flags", "FLAGS"),
)


class TopApp(App[int]):
    """The `runcap top` screen: a table of runs, kept current by Watch streams."""

    TITLE = "runcap top"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "suspend", "Suspend"),
        Binding("r", "resume", "Resume"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        run_ids: Sequence[str],
        target: str,
        *,
        api_key: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.target = target
        self._api_key = api_key
        self.models: dict[str, RunModel] = {run_id: RunModel(run_id) for run_id in run_ids}
        self._clock = clock
        self._client: AsyncRuncapClient | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="status")
        yield Footer()

    @property
    def client(self) -> AsyncRuncapClient:
        if self._client is None:
            self._client = AsyncRuncapClient(self.target, api_key=self._api_key)
        return self._client

    @property
    def table(self) -> DataTable[str | Text]:
        table: DataTable[str | Text] = self.query_one("#runs", DataTable)
        return table

    def on_mount(self) -> None:
        self.sub_title = self.target
        table = self.table
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        for run_id, model in self.models.items():
            table.add_row(*self._cells(model, self._clock()), key=run_id)
            self._follow(run_id)
        # Redraw every second: the burn rate slides even when nothing changes.
        self.set_interval(1.0, self.redraw)

    async def on_unmount(self) -> None:
        self.workers.cancel_all()
        if self._client is not None:
            await self._client.close()

    @work(group="watch", exit_on_error=False)
    async def _follow(self, run_id: str) -> None:
        model = self.models[run_id]
        try:
            async with self.client.watch(run_id) as stream:
                async for message in stream:
                    model.apply(message, self._clock())
                    if message.WhichOneof("kind") == "snapshot":
                        model.seed_approvals((await self.client.get_run(run_id)).run)
                    self.redraw_run(run_id)
        except RunNotFoundError:
            model.error = "NOT FOUND"
        except RuncapError as error:
            model.error = f"ERROR {error.reason or error.code.name}"
        model.ended = True
        self.redraw_run(run_id)

    def redraw(self) -> None:
        for run_id in self.models:
            self.redraw_run(run_id)

    def redraw_run(self, run_id: str) -> None:
        table = self.table
        cells = self._cells(self.models[run_id], self._clock())
        for (column, _), value in zip(COLUMNS, cells, strict=True):
            table.update_cell(run_id, column, value, update_width=True)

    def _cells(self, model: RunModel, now: float) -> list[str | Text]:
        state = model.state
        if state is None:
            waiting = Text(model.error or "waiting...", style="red" if model.error else "dim")
            return [model.run_id, waiting, "", "", "", "", "", "", " ".join(model.flags())]
        threshold = model.threshold
        return [
            model.run_id,
            spend_bar(model),
            format_usd(state.committed_micros),
            format_usd(state.reserved_micros),
            format_usd(state.limit_micros),
            format_rate(model.rate(now)),
            format_eta(model.eta(now)),
            Text(threshold, style=THRESHOLD_STYLES[threshold]),
            Text(" ".join(model.flags()), style="bold"),
        ]

    def selected_run(self) -> str | None:
        table = self.table
        if not self.models or table.row_count == 0:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return row_key.value

    def _say(self, message: str) -> None:
        self.query_one("#status", Static).update(message)

    async def action_suspend(self) -> None:
        await self._set_suspended(True)

    async def action_resume(self) -> None:
        await self._set_suspended(False)

    async def _set_suspended(self, suspend: bool) -> None:
        run_id = self.selected_run()
        if run_id is None:
            return
        verb = "suspend" if suspend else "resume"
        response: pb.SuspendRunResponse | pb.ResumeRunResponse
        try:
            if suspend:
                response = await self.client.suspend_run(run_id)
            else:
                response = await self.client.resume_run(run_id)
        except RuncapError as error:
            self._say(f"{verb} {run_id} failed: {error.reason or error.code.name}")
            return
        done = "suspended" if suspend else "resumed"
        self._say(f"{run_id}: already {done}" if response.replayed else f"{run_id}: {done}")


# --------------------------------------------------------------------------
# Command line


def read_run_ids(lines: Iterable[str]) -> list[str]:
    """Run ids from lines of text: one per line; blank lines and ``#``
    comments are skipped."""
    ids = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            ids.append(text)
    return ids


def run_ids_of(args: argparse.Namespace) -> list[str]:
    """The run ids of the command line and of `--from-file` (``-``: stdin),
    in order, without repeats."""
    ids: list[str] = list(args.run_ids)
    if args.from_file == "-":
        ids += read_run_ids(sys.stdin)
        _reattach_terminal()
    elif args.from_file:
        with open(args.from_file, encoding="utf-8") as file:
            ids += read_run_ids(file)
    return list(dict.fromkeys(ids))


def _reattach_terminal() -> None:
    """After the ids were read from a pipe, make the terminal stdin again so
    that the keys reach the app."""
    if sys.stdin.isatty():
        return
    with contextlib.suppress(OSError):
        tty = os.open("/dev/tty", os.O_RDONLY)
        os.dup2(tty, 0)
        os.close(tty)


def main(args: argparse.Namespace) -> int:
    """Runs `runcap top` with the parsed arguments."""
    try:
        run_ids = run_ids_of(args)
    except OSError as error:
        print(f"runcap: cannot read run ids: {error}", file=sys.stderr)
        return 1
    if not run_ids:
        print(
            "runcap: name at least one run (RUN_ID ..., or --from-file FILE, - for stdin)",
            file=sys.stderr,
        )
        return 2
    api_key = os.environ.get("RUNCAP_API_KEY") or None
    code = TopApp(run_ids, args.target, api_key=api_key).run()
    return 0 if code is None else code
