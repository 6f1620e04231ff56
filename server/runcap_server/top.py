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

The model (`RunModel`, `BurnWindow`, in `runcap_server.liveview`, shared with
the web dashboard) is plain code with no terminal in it; the Textual app
(`TopApp`) only draws it and forwards the keys.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Final

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Static

from runcap import AsyncRuncapClient, RuncapError, RunNotFoundError
from runcap.v1 import budget_service_pb2 as pb

# The model is shared with the web dashboard; its names stay importable from here.
from runcap_server.liveview import BurnWindow as BurnWindow
from runcap_server.liveview import RunModel as RunModel
from runcap_server.liveview import format_eta as format_eta
from runcap_server.liveview import format_rate as format_rate
from runcap_server.liveview import seconds_to_exhaustion as seconds_to_exhaustion
from runcap_server.money import format_usd

BAR_WIDTH: Final = 24

THRESHOLD_STYLES: Final = {
    "none": "dim",
    "info": "cyan",
    "warn": "yellow",
    "throttle": "bold dark_orange",
    "stop": "bold red",
}


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
