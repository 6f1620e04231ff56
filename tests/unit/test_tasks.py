"""cancel_and_wait ends tasks that swallow a cancellation, as redis-py's calls
into asyncio.wait_for can on Python 3.11 (the shutdown hang CI met)."""

from __future__ import annotations

import asyncio
import contextlib

from runcap_server.tasks import cancel_and_wait


async def swallows_first_cancel(started: asyncio.Event) -> None:
    """A background loop whose first cancellation is lost, like a sweeper whose
    cancelled Redis write had just finished inside wait_for."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    while True:  # noqa: ASYNC110 (a loop with work between sleeps, like the sweeper)
        await asyncio.sleep(0.01)


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(swallows_first_cancel(started))
    await started.wait()
    # One cancel is not enough: the task is still running afterwards.
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert not done
    async with asyncio.timeout(5):
        await cancel_and_wait([task])
    assert task.cancelled()


async def test_finished_and_failed_tasks_are_waited_and_their_errors_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    finished = asyncio.create_task(asyncio.sleep(0))
    sleeping = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0.01)
    await cancel_and_wait([failed, finished, sleeping])
    assert sleeping.cancelled()
    assert isinstance(failed.exception(), RuntimeError)
    assert finished.done()
    assert not finished.cancelled()
