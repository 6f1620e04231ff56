"""Stopping background tasks so that a stop always ends.

One `task.cancel()` is not enough on Python 3.11: `asyncio.wait_for` (which
redis-py calls around socket writes) returns its result and swallows the
cancellation when the inner call finishes in the same loop pass. The task then
goes back to its loop, and `await task` waits forever. A shutdown therefore
cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

RECANCEL_S = 0.1


async def cancel_and_wait(tasks: Collection[asyncio.Task[object]]) -> None:
    """Cancel `tasks` and return once every one has ended (results and errors dropped)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
