"""Releases expired holds promptly, so watchers see them without waiting for traffic.

Correctness never depends on it: every ledger operation expires due holds
first. The sweeper only makes expiry visible on time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from runcap_server.backends.base import Backend

_log = logging.getLogger(__name__)
RUNS_PER_PASS = 100


async def sweep_forever(
    backend: Backend,
    interval_s: float,
    on_released: Callable[[int], None] | None = None,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Sweep every `interval_s`; `on_released` and `on_error` feed telemetry."""
    while True:
        try:
            released = await backend.sweep(RUNS_PER_PASS)
        except Exception:
            _log.exception("expiry sweep failed; retrying in %.2fs", interval_s)
            released = 0
            if on_error is not None:
                on_error()
        if released:
            _log.debug("released %d expired holds", released)
            if on_released is not None:
                on_released(released)
        # A pass that released a full batch may have left more: go again at once.
        if released < RUNS_PER_PASS:
            await asyncio.sleep(interval_s)
