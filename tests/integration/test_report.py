"""`runcap report` over a seeded week of runs, built through the API on a
server whose clock the test moves a day at a time; and ListRuns' paging."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runcap import AsyncRuncapClient, InvalidArgumentError
from runcap.v1 import budget_pb2
from runcap_server import cli
from runcap_server.app import RuncapServer
from runcap_server.backends.sqlite import SqliteLedger
from runcap_server.clock import ManualClock
from runcap_server.settings import Settings

DAY_MS = 86_400_000


class Week:
    def __init__(self, target: str, clock: ManualClock) -> None:
        self.target = target
        self.clock = clock
        # What the seed spent, worked out as it goes: team -> figures.
        self.expected: dict[str, dict[str, Any]] = {}


def spend_of(day: int, agent: str) -> int:
    return {"coder": 100_000, "reviewer": 20_000, "chat": 5_000}[agent] * (day + 1)


@pytest.fixture
async def week(tmp_path: Path) -> AsyncIterator[Week]:
    # A clock a week and a day behind the wall clock, so `--since 9d` covers it.
    now_ms = time.time_ns() // 1_000_000
    clock = ManualClock(start_ms=now_ms - 8 * DAY_MS)
    ledger = SqliteLedger(path=str(tmp_path / "runcap.db"), default_ttl_ms=600_000, clock=clock)
    settings = Settings(listen_addr="127.0.0.1:0", backend="sqlite")
    server = RuncapServer(settings, backend=ledger)
    port = await server.start()
    seeded = Week(f"127.0.0.1:{port}", clock)
    try:
        async with AsyncRuncapClient(seeded.target) as client:
            await _seed(client, seeded)
        yield seeded
    finally:
        await server.stop()


async def _seed(client: AsyncRuncapClient, week: Week) -> None:
    teams = {"ml": ("coder", "reviewer"), "web": ("chat",)}
    for team in teams:
        week.expected[team] = {
            "runs": 0,
            "spend": 0,
            "agents": {},
            "warn": 0,
            "overrun": 0,
            "blocked": 0,
        }
    for day in range(7):
        week.clock.advance(DAY_MS)
        for team, agents in teams.items():
            for agent in agents:
                spend = spend_of(day, agent)
                run = await client.create_run(
                    limit_micros=10_000_000, team_id=team, labels={"agent": agent}
                )
                run_id = run.run.run_id
                async with client.reserve(run_id, spend) as hold:
                    hold.set_actual(spend)
                figures = week.expected[team]
                if day == 6 and agent == "coder":
                    # The last day's coder hits its wall twice (far over its $10).
                    for attempt in ("a", "b"):
                        await blocked(client, run_id, 20_000_000, attempt)
                    figures["blocked"] += 2
                figures["runs"] += 1
                figures["spend"] += spend
                figures["agents"][agent] = figures["agents"].get(agent, 0) + spend
    # One web run reaches its warn band (85%), one overruns its hold by $0.05.
    hot = (await client.create_run(limit_micros=1_000_000, team_id="web")).run.run_id
    async with client.reserve(hot, 850_000) as hold:
        hold.set_actual(850_000)
    # It then loops on a $0.20 step that no longer fits: 3 blocks, and a retry
    # of the first that counts nothing.
    for attempt in ("a", "b", "c", "a"):
        await blocked(client, hot, 200_000, attempt)
    over = (await client.create_run(limit_micros=1_000_000, team_id="web")).run.run_id
    async with client.reserve(over, 100_000) as hold:
        hold.set_actual(150_000)
    web = week.expected["web"]
    web["runs"] += 2
    web["spend"] += 1_000_000
    web["agents"]["(none)"] = 1_000_000
    web["warn"], web["overrun"] = 1, 50_000
    web["blocked"] += 3


async def blocked(client: AsyncRuncapClient, run_id: str, amount: int, attempt: str) -> None:
    response = await client.reserve_once(run_id, amount, reservation_id=attempt)
    assert response.decision == budget_pb2.DECISION_BLOCK


async def report(week: Week, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    argv = ["report", "--target", week.target, "--since", "9d", *args]
    code = await asyncio.to_thread(cli.main, argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


async def test_the_report_has_the_weeks_numbers(
    week: Week, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json.loads(await report(week, capsys, "--format", "json"))
    assert [row["team"] for row in rows] == ["ml", "web"]  # by spend, highest first
    for row in rows:
        expected = week.expected[row["team"]]
        assert (row["runs"], row["spend_micros"]) == (expected["runs"], expected["spend"])
        top = sorted(expected["agents"].items(), key=lambda item: -item[1])[:3]
        assert [(a["agent"], a["spend_micros"]) for a in row["top_agents"]] == top
        assert row["thresholds"]["warn"] == expected["warn"]
        assert row["thresholds"]["stop"] == 0
        assert row["overrun_micros"] == expected["overrun"]
        assert row["blocked_calls"] == expected["blocked"]
    assert [row["blocked_calls"] for row in rows] == [2, 3]
    assert rows[0]["spend_micros"] == 28 * 120_000  # (1 + ... + 7) x ($0.10 + $0.02)

    by_agent = json.loads(await report(week, capsys, "--group-by", "agent", "--format", "json"))
    assert {row["agent"]: row["runs"] for row in by_agent} == {
        "coder": 7,
        "reviewer": 7,
        "chat": 7,
        "(none)": 2,
    }
    assert {row["agent"]: row["blocked_calls"] for row in by_agent} == {
        "coder": 2,
        "reviewer": 0,
        "chat": 0,
        "(none)": 3,
    }
    table = await report(week, capsys)
    header, ml, web = table.splitlines()
    assert header.split()[:4] == ["team", "runs", "tokens", "spend"]
    assert header.split()[-3:] == ["overruns", "blocked", "calls"]
    assert "$3.36" in ml  # ml's spend
    assert "$0.05 (1 runs)" in web
    assert (ml.split()[-1], web.split()[-1]) == ("2", "3")  # blocked calls, the last column
    parsed = list(csv.DictReader(io.StringIO(await report(week, capsys, "--format", "csv"))))
    assert parsed[1]["team"] == "web"
    assert parsed[1]["overrun_micros"] == "50000"
    assert [row["blocked_calls"] for row in parsed] == ["2", "3"]
    markdown = await report(week, capsys, "--format", "markdown")
    assert markdown.startswith("| team | runs |")
    assert markdown.splitlines()[0].endswith("| overruns | blocked calls |")
    assert markdown.splitlines()[2].endswith("| - | 2 |")  # ml: no overrun, 2 blocked calls
    assert markdown.splitlines()[3].endswith("| 3 |")


async def test_the_chart_draws_spend_per_day(
    week: Week, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="--chart needs matplotlib (the demo extra)")
    chart = tmp_path / "spend.png"
    await report(week, capsys, "--chart", str(chart))
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_list_runs_pages_in_creation_order(week: Week) -> None:
    start = datetime.now(UTC) - timedelta(days=9)
    async with AsyncRuncapClient(week.target) as client:
        seen: list[str] = []
        token = ""
        while True:
            page = await client.list_runs(start, page_size=5, page_token=token)
            seen += [run.run.run_id for run in page.runs]
            times = [run.run.create_time.ToMilliseconds() for run in page.runs]
            assert times == sorted(times)
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)) == 23
        # Only the first three days (the clock stood a day apart for each).
        first = datetime.fromtimestamp((week.clock.now_ms() - 7 * DAY_MS) / 1000, UTC)
        early = await client.list_runs(start, first + timedelta(days=3.5), page_size=100)
        assert len(early.runs) == 9
        with pytest.raises(InvalidArgumentError, match="page_token"):
            await client.list_runs(start, page_token="bm90LWEtdG9rZW4")  # not a token
        first_page = await client.list_runs(start, page_size=5)
        later = start + timedelta(days=1)
        with pytest.raises(InvalidArgumentError, match="page_token"):  # another query's
            await client.list_runs(later, page_token=first_page.next_page_token)
