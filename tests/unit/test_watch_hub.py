"""The watch hub on the reference model: slow consumers and trimmed logs.

A gRPC stream buffers too much to make a consumer reliably slow, so these
drive the hub directly and simply stop pulling from a stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from runcap_server import errors, watch
from runcap_server.ledger.model import ModelLedger
from runcap_server.ledger.types import Change, ChangePage, RunSpec
from runcap_server.watch import Progress, Snapshot, WatchHub, WatchItem

TENANT = "t"


async def churn(ledger: ModelLedger, pairs: int, prefix: str) -> None:
    for i in range(pairs):
        await ledger.reserve(TENANT, "run", f"{prefix}{i}", 10, None)
        await ledger.commit(TENANT, "run", f"{prefix}{i}", 5)


async def settle() -> None:
    """Let the feed task read and fan out what was written."""
    for _ in range(20):
        await asyncio.sleep(0)


async def events(stream: AsyncGenerator[WatchItem, None], count: int) -> list[int]:
    seen: list[int] = []
    while len(seen) < count:
        item = await asyncio.wait_for(anext(stream), 5)
        if isinstance(item, Change):
            seen.append(item.revision)
    return seen


@pytest.fixture
async def ledger() -> ModelLedger:
    ledger = ModelLedger(default_ttl_ms=60_000, log_retention=10)
    await ledger.create_run(TENANT, RunSpec("run", 1_000_000, {}, None))
    return ledger


async def live_stream(hub: WatchHub, ledger: ModelLedger) -> AsyncGenerator[WatchItem, None]:
    """A stream past its snapshot and catch-up, fed by the hub's live feed."""
    stream = hub.stream(TENANT, "run", None)
    assert isinstance(await anext(stream), Snapshot)
    head = (await ledger.get_run(TENANT, "run")).state.revision
    first = asyncio.ensure_future(anext(stream))
    await settle()
    await ledger.reserve(TENANT, "run", "warm-up", 1, None)
    await settle()
    item = await first
    assert isinstance(item, Change)
    assert item.revision == head + 1
    return stream


async def test_overflowed_stream_catches_up_from_the_log(ledger: ModelLedger) -> None:
    hub = WatchHub(ledger, queue_size=4, heartbeat_s=30)
    stream = await live_stream(hub, ledger)
    seen: list[int] = []
    for burst in range(3):
        await churn(ledger, 4, f"b{burst}-")  # 8 changes: twice the queue, within the log
        await settle()
        seen += await events(stream, 8)
    assert seen == list(range(3, 27))
    await stream.aclose()
    await hub.stop()


async def test_stream_trimmed_past_ends_out_of_range(ledger: ModelLedger) -> None:
    hub = WatchHub(ledger, queue_size=4, heartbeat_s=30)
    stream = await live_stream(hub, ledger)
    await churn(ledger, 15, "c")  # 30 changes: past the queue and the 10-entry log
    await settle()
    with pytest.raises(errors.RevisionOutOfRange):
        await events(stream, 30)
    await hub.stop()
    assert hub.watchers == 0


async def test_heartbeat_and_final_progress(ledger: ModelLedger) -> None:
    hub = WatchHub(ledger, queue_size=4, heartbeat_s=0.05)
    stream = hub.stream(TENANT, "run", None)
    assert isinstance(await anext(stream), Snapshot)
    beat = await asyncio.wait_for(anext(stream), 5)
    assert beat == Progress(1)
    hub.close()
    assert await asyncio.wait_for(anext(stream), 5) == Progress(1, final=True)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    await hub.stop()


async def test_one_feed_per_run_shared_by_all_streams(ledger: ModelLedger) -> None:
    hub = WatchHub(ledger, queue_size=100, heartbeat_s=30)
    streams = [hub.stream(TENANT, "run", None) for _ in range(50)]
    for stream in streams:
        assert isinstance(await anext(stream), Snapshot)
    assert len(hub._feeds) == 1
    await churn(ledger, 2, "x")
    await settle()
    for stream in streams:
        assert await events(stream, 4) == [2, 3, 4, 5]
        await stream.aclose()
    await settle()
    assert hub.watchers == 0
    assert hub._feeds == {}
    await hub.stop()


async def test_live_streams_share_each_change_and_encode_it_once(ledger: ModelLedger) -> None:
    hub = WatchHub(ledger, queue_size=100, heartbeat_s=30)
    streams = [hub.stream(TENANT, "run", None) for _ in range(3)]
    for stream in streams:
        assert isinstance(await anext(stream), Snapshot)
    firsts = [asyncio.ensure_future(anext(stream)) for stream in streams]
    await settle()
    await ledger.reserve(TENANT, "run", "warm-up", 1, None)
    await settle()
    assert [(await first).revision for first in firsts] == [2, 2, 2]  # type: ignore[union-attr]
    encoded: list[int] = []

    def encode(change: Change) -> bytes:
        encoded.append(change.revision)
        return b"rev %d" % change.revision

    await churn(ledger, 2, "x")  # revisions 3 to 6, fanned out by the live feed
    await settle()
    seen = [[await anext(stream) for _ in range(4)] for stream in streams]
    changes = [[item for item in items if isinstance(item, Change)] for items in seen]
    assert [[c.revision for c in items] for items in changes] == [[3, 4, 5, 6]] * 3
    # The feed hands every stream the same objects: one encoding serves them all.
    encode_once = watch.EncodedOnce(encode)
    sent = [[encode_once(change) for change in items] for items in changes]
    assert sent[0] == [b"rev 3", b"rev 4", b"rev 5", b"rev 6"]
    assert all(a is b for other in sent[1:] for a, b in zip(sent[0], other, strict=True))
    assert encoded == [3, 4, 5, 6]
    # Past its size the oldest entry goes, and that change is only encoded again.
    small = watch.EncodedOnce(encode, size=1)
    again = [small(changes[0][0]), small(changes[0][1]), small(changes[1][0])]
    assert again == [b"rev 3", b"rev 4", b"rev 3"]
    assert encoded[4:] == [3, 4, 3]
    for stream in streams:
        await stream.aclose()
    await hub.stop()


class _GatedBaseline(ModelLedger):
    """The reference ledger, with a feed's first (baseline) read held back."""

    def __init__(self) -> None:
        super().__init__(default_ttl_ms=60_000)
        self.gate = asyncio.Event()

    async def read_changes(
        self, tenant: str, run_id: str, after_revision: int, limit: int
    ) -> ChangePage:
        if (after_revision, limit) == (0, 0):
            await self.gate.wait()
        return await super().read_changes(tenant, run_id, after_revision, limit)


async def test_change_before_the_feed_baseline_still_reaches_waiting_streams() -> None:
    ledger = _GatedBaseline()
    await ledger.create_run(TENANT, RunSpec("run", 1_000, {}, None))
    hub = WatchHub(ledger, queue_size=10, heartbeat_s=30)
    stream = hub.stream(TENANT, "run", None)
    assert isinstance(await anext(stream), Snapshot)
    waiting = asyncio.ensure_future(anext(stream))
    await settle()  # the stream has caught up and waits on the feed
    await ledger.reserve(TENANT, "run", "r", 1, None)  # revision 2, before the baseline
    ledger.gate.set()
    item = await asyncio.wait_for(waiting, 5)
    assert isinstance(item, Change)
    assert item.revision == 2
    await stream.aclose()
    await hub.stop()


class _FailsOnce(ModelLedger):
    """The reference ledger, whose next log read fails once when armed."""

    def __init__(self) -> None:
        super().__init__(default_ttl_ms=60_000)
        self.armed = False

    async def read_changes(
        self, tenant: str, run_id: str, after_revision: int, limit: int
    ) -> ChangePage:
        if self.armed:
            self.armed = False
            raise errors.BackendUnavailable("injected by the test")
        return await super().read_changes(tenant, run_id, after_revision, limit)


async def test_feed_survives_a_failed_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "FEED_RETRY_S", 0.01)
    ledger = _FailsOnce()
    await ledger.create_run(TENANT, RunSpec("run", 1_000, {}, None))
    hub = WatchHub(ledger, queue_size=10, heartbeat_s=30)
    stream = await live_stream(hub, ledger)
    ledger.armed = True  # the feed's next read fails
    await ledger.reserve(TENANT, "run", "a", 1, None)
    assert await events(stream, 1) == [3]
    await ledger.reserve(TENANT, "run", "b", 1, None)
    assert await events(stream, 1) == [4]
    await stream.aclose()
    await hub.stop()


async def test_resuming_on_a_history_that_changed_is_out_of_range() -> None:
    """A failover that lost writes: same revisions, other changes. Never a silent gap."""
    seen_by_client = ModelLedger(default_ttl_ms=60_000)
    after_failover = ModelLedger(default_ttl_ms=60_000)
    for ledger, amounts in ((seen_by_client, (5, 6, 7)), (after_failover, (5, 9, 9, 9))):
        await ledger.create_run(TENANT, RunSpec("run", 1_000, {}, None))
        for i, amount in enumerate(amounts):
            await ledger.reserve(TENANT, "run", f"r{i}", amount, None)
    seen = (await seen_by_client.read_changes(TENANT, "run", 0, 10)).changes
    hub = WatchHub(after_failover, queue_size=10, heartbeat_s=30)
    # Up to revision 2 the histories agree: resuming there continues.
    stream = hub.stream(TENANT, "run", 2, seen[1].state.digest)
    assert await events(stream, 3) == [3, 4, 5]
    await stream.aclose()
    # Revision 4 exists on both, with different histories behind it.
    with pytest.raises(errors.RevisionOutOfRange) as diverged:
        await anext(hub.stream(TENANT, "run", 4, seen[3].state.digest))
    assert diverged.value.metadata["diverged"] == "true"
    # Without a digest the server cannot tell (old clients): it resumes.
    stream = hub.stream(TENANT, "run", 4, "")
    assert await events(stream, 1) == [5]
    await stream.aclose()
    await hub.stop()


async def test_a_digest_for_a_trimmed_revision_cannot_be_checked(ledger: ModelLedger) -> None:
    await churn(ledger, 10, "t")  # 21 revisions, the log keeps 12..21
    hub = WatchHub(ledger, queue_size=10, heartbeat_s=30)
    with pytest.raises(errors.RevisionOutOfRange):
        await anext(hub.stream(TENANT, "run", 11, "whatever"))
    kept = (await ledger.read_changes(TENANT, "run", 11, 1)).changes[0]
    stream = hub.stream(TENANT, "run", 12, kept.state.digest)
    assert await events(stream, 1) == [13]
    await stream.aclose()
    await hub.stop()
