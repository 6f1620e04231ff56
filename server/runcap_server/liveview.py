"""The live view of a run, built from its Watch stream: burn rate, time to
exhaustion, threshold band, pending approvals and flags.

Plain code with no terminal or network in it, shared by `runcap top` (the
terminal view) and the web dashboard's server-sent-events bridge, so both
show the same figures.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server.money import format_usd

BURN_WINDOW_SECONDS: Final = 60.0
"""The burn rate is the committed spend gained over this much wall time."""
MIN_ELAPSED_SECONDS: Final = 1.0
"""The shortest span a burn rate is computed over (right after the first
observation the span is tiny, and the rate would be noise)."""

THRESHOLD_NAMES: Final = {
    budget_pb2.THRESHOLD_LEVEL_UNSPECIFIED: "none",
    budget_pb2.THRESHOLD_LEVEL_INFO: "info",
    budget_pb2.THRESHOLD_LEVEL_WARN: "warn",
    budget_pb2.THRESHOLD_LEVEL_THROTTLE: "throttle",
    budget_pb2.THRESHOLD_LEVEL_STOP: "stop",
}


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
    """What a live view knows about one run, built from its Watch stream.

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
        if self.state is not None and self.state.blocked:
            flags.append("BLOCKED")
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
