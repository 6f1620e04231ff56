"""ListRuns' index on every backend: runs by creation time, paged by cursor."""

from __future__ import annotations

from runcap_server.clock import ManualClock
from runcap_server.ledger.types import RunSpec
from tests.ledger_backends import Ledger


async def test_runs_are_listed_by_creation_time_page_by_page(
    ledger: Ledger, clock: ManualClock
) -> None:
    start = clock.now_ms()
    created = []
    for i in range(7):
        # Two runs share each millisecond: ties go by run id.
        for run_id in (f"run-{i}-b", f"run-{i}-a"):
            await ledger.create_run("t", RunSpec(run_id, 1_000, {}, None))
            created.append((clock.now_ms(), run_id))
        clock.advance(10)
    await ledger.create_run("other-tenant", RunSpec("run-0-a", 1_000, {}, None))
    await ledger.create_run("t", RunSpec("run-0-a", 1_000, {}, None))  # a replay: listed once
    expected = sorted(created)

    pages, after = [], None
    while True:
        page = await ledger.list_run_ids("t", start, start + 1_000, after, 3)
        pages.append(page)
        if len(page) < 3:
            break
        after = page[-1]
    assert [item for page in pages for item in page] == expected
    assert [len(page) for page in pages] == [3, 3, 3, 3, 2]
    # The range bounds: [from, to).
    middle = await ledger.list_run_ids("t", start + 10, start + 30, None, 100)
    assert middle == [item for item in expected if start + 10 <= item[0] < start + 30]
    assert await ledger.list_run_ids("nobody", start, start + 1_000, None, 10) == []
