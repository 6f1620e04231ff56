"""`runcap top`: its model (burn rate, time to exhaustion) as plain code, and
the Textual app driven with its Pilot against the live session server."""

from __future__ import annotations

import argparse
import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from runcap import AsyncRuncapClient
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server import cli
from runcap_server.top import (
    BurnWindow,
    RunModel,
    TopApp,
    format_eta,
    format_rate,
    read_run_ids,
    run_ids_of,
    seconds_to_exhaustion,
    spend_bar,
)

USD = 1_000_000


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------
# The model


def test_burn_rate_is_the_committed_gain_of_the_last_minute_per_minute() -> None:
    burn = BurnWindow()
    assert burn.micros_per_minute(1000.0) is None
    burn.observe(1000.0, 0)
    assert burn.micros_per_minute(1000.0) == 0
    burn.observe(1010.0, 1 * USD)
    burn.observe(1030.0, 3 * USD)
    # 30 s after the first observation: $3 over half a minute.
    assert burn.micros_per_minute(1030.0) == pytest.approx(6 * USD)
    # A full minute: $3 over one minute.
    assert burn.micros_per_minute(1060.0) == pytest.approx(3 * USD)
    # The window slides past the first two changes: only the $2 at 1030 is left.
    assert burn.micros_per_minute(1075.0) == pytest.approx(2 * USD)
    # Nothing gained in the last minute.
    assert burn.micros_per_minute(1090.0) == 0
    assert burn.micros_per_minute(5000.0) == 0


def test_burn_rate_over_a_short_span_is_bounded_and_times_never_go_back() -> None:
    burn = BurnWindow()
    burn.observe(100.0, 0)
    burn.observe(100.1, 50_000)
    # The span counts as at least a second, not a tenth of one.
    assert burn.micros_per_minute(100.1) == pytest.approx(50_000 * 60)
    # An earlier time (clock skew) counts as the last one; a repeat is ignored.
    burn.observe(99.0, 80_000)
    burn.observe(200.0, 80_000)
    assert burn.micros_per_minute(130.0) == pytest.approx(80_000 * 2)


def test_time_to_exhaustion() -> None:
    assert seconds_to_exhaustion(3 * USD, 1.5 * USD) == pytest.approx(120.0)
    assert seconds_to_exhaustion(3 * USD, 0.0) is None
    assert seconds_to_exhaustion(3 * USD, None) is None
    assert seconds_to_exhaustion(0, None) == 0.0
    assert seconds_to_exhaustion(-5, 1.0) == 0.0
    assert [format_eta(s) for s in (None, 0.0, 0.5, 42.9, 125.0, 7380.0, 1e9)] == [
        "-",
        "exhausted",
        "<1s",
        "42s",
        "2m05s",
        "2h03m",
        ">99h",
    ]
    assert format_rate(None) == "-"
    assert format_rate(1_504_999.4) == "$1.50/min"
    assert format_rate(1234.4) == "$0.001234/min"


def state(
    committed: int,
    reserved: int = 0,
    *,
    threshold: budget_pb2.ThresholdLevel.ValueType = budget_pb2.THRESHOLD_LEVEL_UNSPECIFIED,
    status: budget_pb2.RunStatus.ValueType = budget_pb2.RUN_STATUS_OPEN,
) -> budget_pb2.BudgetState:
    limit = 5 * USD
    return budget_pb2.BudgetState(
        run_id="r",
        limit_micros=limit,
        committed_micros=committed,
        reserved_micros=reserved,
        remaining_micros=limit - committed - reserved,
        threshold=threshold,
        status=status,
    )


def event(
    type_: int, at: float, budget: budget_pb2.BudgetState, **fields: object
) -> pb.WatchResponse:
    stamp = Timestamp()
    stamp.FromMicroseconds(int(at * 1e6))
    return pb.WatchResponse(
        event=budget_pb2.BudgetEvent(type=type_, time=stamp, state=budget, **fields)  # type: ignore[arg-type]
    )


def test_run_model_follows_a_watch_stream() -> None:
    model = RunModel("r")
    assert model.eta(0.0) is None
    assert model.threshold == "none"
    model.apply(pb.WatchResponse(snapshot=state(0)), received_at=1000.0)
    assert model.rate(1000.0) == 0
    assert model.eta(1000.0) is None
    # The server's change time is used (30 s after the snapshot) ...
    model.apply(event(budget_pb2.EVENT_TYPE_COMMITTED, 1030.0, state(1 * USD)), 1031.0)
    # ... but never later than its receipt.
    model.apply(event(budget_pb2.EVENT_TYPE_RESERVED, 2000.0, state(1 * USD, 1 * USD)), 1040.0)
    model.apply(
        event(
            budget_pb2.EVENT_TYPE_COMMITTED,
            1060.0,
            state(3 * USD + 500_000, threshold=budget_pb2.THRESHOLD_LEVEL_INFO),
        ),
        1060.0,
    )
    assert model.rate(1060.0) == pytest.approx(3.5 * USD)
    assert model.eta(1060.0) == pytest.approx(1.5 / 3.5 * 60)
    assert model.threshold == "info"
    assert model.committed_fraction == pytest.approx(0.7)
    assert spend_bar(model, width=10).plain == "███████░░░  70%"

    requested = event(
        budget_pb2.EVENT_TYPE_APPROVAL_REQUESTED, 1061.0, state(3_500_000), approval_id="a1"
    )
    model.apply(requested, 1061.0)
    assert model.flags() == ["APPROVAL(1)"]
    suspended = state(3_500_000, status=budget_pb2.RUN_STATUS_SUSPENDED)
    model.apply(event(budget_pb2.EVENT_TYPE_SUSPENDED, 1062.0, suspended), 1062.0)
    assert model.suspended
    assert model.flags() == ["SUSPENDED", "APPROVAL(1)"]
    model.apply(
        event(budget_pb2.EVENT_TYPE_APPROVAL_GRANTED, 1063.0, suspended, approval_id="a1"), 1063.0
    )
    assert model.flags() == ["SUSPENDED"]


def test_run_ids_from_arguments_a_file_and_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_run_ids(["a\n", "\n", "  b  # the second\n", "# none\n"]) == ["a", "b"]
    ids = tmp_path / "ids"
    ids.write_text("b\nc\n")
    args = argparse.Namespace(run_ids=["a", "b"], from_file=str(ids))
    assert run_ids_of(args) == ["a", "b", "c"]
    monkeypatch.setattr("sys.stdin", io.StringIO("d\ne\n"))
    monkeypatch.setattr("runcap_server.top._reattach_terminal", lambda: None)
    assert run_ids_of(argparse.Namespace(run_ids=[], from_file="-")) == ["d", "e"]


def test_top_without_runs_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["top", "--target", "127.0.0.1:1"]) == 2
    assert "name at least one run" in capsys.readouterr().err


# --------------------------------------------------------------------------
# The app, against the live server


@pytest.fixture
async def aclient(server_target: str) -> AsyncIterator[AsyncRuncapClient]:
    async with AsyncRuncapClient(server_target) as client:
        yield client


async def until(condition: Callable[[], bool], what: str) -> None:
    """Waits up to 5 s for `condition`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def run_status(client: AsyncRuncapClient, run_id: str) -> int:
    return (await client.get_run(run_id)).state.status


async def test_top_follows_spend_and_suspends_and_resumes_the_selected_run(
    server_target: str, aclient: AsyncRuncapClient
) -> None:
    first, second = new_id("top"), new_id("top")
    await aclient.create_run(first, limit_micros=5 * USD)
    await aclient.create_run(second, limit_micros=2 * USD)
    missing = new_id("missing")
    app = TopApp([first, second, missing], server_target)
    async with app.run_test(size=(160, 20)) as pilot:
        table = app.table
        models = app.models
        await until(
            lambda: models[first].state is not None and models[second].state is not None,
            "the snapshots",
        )
        await until(lambda: models[missing].error == "NOT FOUND", "the missing run's error")
        assert str(table.get_cell(first, "committed")) == "$0.00"
        assert str(table.get_cell(first, "limit")) == "$5.00"

        # Spend on the second run: a hold, then its commit; the row follows.
        async with aclient.reserve(second, 1_600_000) as hold:
            await until(lambda: str(table.get_cell(second, "held")) == "$1.60", "the hold")
            assert models[second].held_fraction == pytest.approx(0.8)
            hold.set_actual(1_500_000)
        await until(lambda: str(table.get_cell(second, "committed")) == "$1.50", "the commit")
        assert str(table.get_cell(second, "held")) == "$0.00"
        assert models[second].committed_fraction == pytest.approx(0.75)
        # THRESHOLD_CROSSED is a change of its own, right after the commit.
        await until(lambda: str(table.get_cell(second, "threshold")) == "info", "the threshold")
        assert str(table.get_cell(second, "burn")).endswith("/min")
        assert str(table.get_cell(second, "eta")) != "-"
        assert str(table.get_cell(first, "committed")) == "$0.00"
        assert "75%" in str(table.get_cell(second, "bar"))

        # Select the second run, suspend it, resume it.
        await pilot.press("down")
        assert app.selected_run() == second
        await pilot.press("s")
        assert await run_status(aclient, second) == budget_pb2.RUN_STATUS_SUSPENDED
        assert await run_status(aclient, first) == budget_pb2.RUN_STATUS_OPEN
        await until(lambda: "SUSPENDED" in str(table.get_cell(second, "flags")), "the flag")
        await pilot.press("r")
        assert await run_status(aclient, second) == budget_pb2.RUN_STATUS_OPEN
        await until(lambda: "SUSPENDED" not in str(table.get_cell(second, "flags")), "resume")
        await pilot.press("q")
    assert app.return_code == 0
