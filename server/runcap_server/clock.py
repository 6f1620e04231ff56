"""Server time in integer milliseconds. Clients send durations, never times."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock time that never goes back within a process.

    Holds expire by wall-clock time; if the system clock steps back, time
    stands still until it catches up rather than un-expiring anything.
    """

    def __init__(self) -> None:
        self._last_ms = 0

    def now_ms(self) -> int:
        self._last_ms = max(self._last_ms, time.time_ns() // 1_000_000)
        return self._last_ms


class ManualClock:
    """A clock that moves only when told to: deterministic tests only."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a clock never goes back")
        self._now_ms += ms
