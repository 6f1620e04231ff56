"""`runcap report`: showback of spend per team (or agent, user, API key) over
a time range, from the ListRuns RPC (seed 002: who spent what, which agents,
which runs hit their thresholds or overran, how many calls hit a wall).

Aggregation and rendering are pure functions of the listed runs; the command
only pages through ListRuns. A run counts in the range it was created in, and
its spend on the day it was created (runs are short; a run that spans days is
reported on its first).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from runcap import RuncapClient, RuncapError
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server.money import format_usd
from runcap_server.settings import parse_duration_ms

GROUPS: Final = ("team", "agent", "user", "api_key")
FORMATS: Final = ("table", "csv", "json", "markdown")
NONE: Final = "(none)"
# The threshold bands a run's committed spend reached, in order.
LEVELS: Final = (
    (budget_pb2.THRESHOLD_LEVEL_INFO, "info"),
    (budget_pb2.THRESHOLD_LEVEL_WARN, "warn"),
    (budget_pb2.THRESHOLD_LEVEL_THROTTLE, "throttle"),
    (budget_pb2.THRESHOLD_LEVEL_STOP, "stop"),
)


def group_of(run: pb.ListedRun, by: str) -> str:
    """The group a run reports under."""
    value = {
        "team": run.run.team_id,
        "user": run.run.user_id,
        "api_key": run.run.api_key_id,
        "agent": run.run.labels.get("agent", ""),
    }[by]
    return value or NONE


@dataclass
class Group:
    """One row of the report."""

    name: str
    runs: int = 0
    tokens: int = 0
    spend_micros: int = 0
    overrun_micros: int = 0
    overrun_runs: int = 0
    # The Reserves of its runs answered DECISION_BLOCK (Run.blocked_calls).
    blocked_calls: int = 0
    # Runs whose committed spend reached each band (info, warn, throttle, stop).
    reached: dict[str, int] = field(default_factory=lambda: {name: 0 for _, name in LEVELS})
    agents: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def top_agents(self, count: int = 3) -> list[tuple[str, int]]:
        ranked = sorted(self.agents.items(), key=lambda item: (-item[1], item[0]))
        return ranked[:count]


def own_spend(runs: Sequence[pb.ListedRun]) -> dict[str, int]:
    """Each run's committed spend without its subagents': a run's committed
    total includes its descendants' commits, so summing listed runs would
    count a listed child's spend twice. A child whose parent is not listed
    (created before the range) keeps all of its spend."""
    own = {run.run.run_id: run.state.committed_micros for run in runs}
    for run in runs:
        parent = run.run.parent_run_id
        if parent in own:
            own[parent] -= run.state.committed_micros
    return own


def aggregate(runs: Sequence[pb.ListedRun], by: str) -> list[Group]:
    """The report's rows, by spend, highest first."""
    groups: dict[str, Group] = {}
    own = own_spend(runs)
    for run in runs:
        name = group_of(run, by)
        row = groups.setdefault(name, Group(name))
        state = run.state
        spend = own[run.run.run_id]
        row.runs += 1
        row.tokens += state.committed_tokens
        row.spend_micros += spend
        row.overrun_micros += state.overrun_micros
        row.overrun_runs += state.overrun_micros > 0
        row.blocked_calls += run.run.blocked_calls
        for level, level_name in LEVELS:
            row.reached[level_name] += state.threshold >= level
        row.agents[run.run.labels.get("agent", "") or NONE] += spend
    return sorted(groups.values(), key=lambda g: (-g.spend_micros, g.name))


def daily_spend(runs: Sequence[pb.ListedRun], by: str) -> dict[str, dict[str, int]]:
    """Spend per UTC day (of each run's creation) per group: day -> group -> micros."""
    days: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    own = own_spend(runs)
    for run in runs:
        day = run.run.create_time.ToDatetime(tzinfo=UTC).date().isoformat()
        days[day][group_of(run, by)] += own[run.run.run_id]
    return {day: dict(groups) for day, groups in sorted(days.items())}


_COLUMNS: Final = ("runs", "tokens", "spend", "top agents", "info", "warn", "throttle", "stop")


def _cells(group: Group) -> list[str]:
    top = ", ".join(f"{agent} {format_usd(micros)}" for agent, micros in group.top_agents())
    overrun = (
        f"{format_usd(group.overrun_micros)} ({group.overrun_runs} runs)"
        if group.overrun_runs
        else "-"
    )
    return [
        group.name,
        str(group.runs),
        f"{group.tokens:,}",
        format_usd(group.spend_micros),
        top or "-",
        *(str(group.reached[name]) for _, name in LEVELS),
        overrun,
        f"{group.blocked_calls:,}",
    ]


def render(groups: Sequence[Group], by: str, fmt: str) -> str:
    """The report as text in `fmt`."""
    header = [by, *_COLUMNS, "overruns", "blocked calls"]
    if fmt == "json":
        return json.dumps([_json_row(group, by) for group in groups], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        levels = [name for _, name in LEVELS]
        counts = ["runs", "tokens", "spend_micros", "top_agents"]
        writer.writerow([by, *counts, *levels, "overrun_micros", "overrun_runs", "blocked_calls"])
        for group in groups:
            row = _json_row(group, by)
            writer.writerow(
                [row[by], row["runs"], row["tokens"], row["spend_micros"]]
                + [";".join(f"{a}={m}" for a, m in group.top_agents())]
                + [row["thresholds"][name] for _, name in LEVELS]
                + [row["overrun_micros"], row["overrun_runs"], row["blocked_calls"]]
            )
        return out.getvalue()
    rows = [_cells(group) for group in groups]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _json_row(group: Group, by: str) -> dict[str, Any]:
    return {
        by: group.name,
        "runs": group.runs,
        "tokens": group.tokens,
        "spend_micros": group.spend_micros,
        "top_agents": [{"agent": a, "spend_micros": m} for a, m in group.top_agents()],
        "thresholds": dict(group.reached),
        "overrun_micros": group.overrun_micros,
        "overrun_runs": group.overrun_runs,
        "blocked_calls": group.blocked_calls,
    }


def draw(days: dict[str, dict[str, int]], by: str, path: str) -> None:
    """Spend per day per group as stacked bars, to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--chart needs matplotlib: pip install 'runcap[demo]'") from None
    names = sorted({name for groups in days.values() for name in groups})
    labels = list(days)
    figure, axes = plt.subplots(figsize=(10, 5))
    bottom = [0.0] * len(labels)
    for name in names:
        values = [days[day].get(name, 0) / 1e6 for day in labels]
        axes.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.set_ylabel("USD")
    axes.set_title(f"spend per day per {by}")
    axes.legend(loc="upper left")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def since(text: str, now: datetime) -> datetime:
    """`7d`, `36h`, `30m`... before `now`, or an ISO date/time (UTC if no zone)."""
    stripped = text.strip()
    if stripped.endswith("d") and stripped[:-1].isdigit():
        return now - timedelta(days=int(stripped[:-1]))
    try:
        return now - timedelta(milliseconds=parse_duration_ms(stripped))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected 7d, 12h or an ISO date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_command(commands: argparse._SubParsersAction[Any], target_default: str) -> None:
    report = commands.add_parser(
        "report",
        help="showback: spend per team, agent, user or API key (operator role)",
        description="Spend, tokens, top agents, threshold bands reached, overruns and "
        "blocked calls of the runs created in a time range, grouped. From ListRuns, page by "
        "page.",
    )
    report.add_argument("--since", default="7d", help="7d, 24h or an ISO date (default 7d)")
    report.add_argument("--until", help="an ISO date (default now)")
    report.add_argument("--group-by", choices=GROUPS, default="team")
    report.add_argument("--format", choices=FORMATS, default="table")
    report.add_argument("--chart", metavar="PNG", help="draw spend per day per group")
    report.add_argument("--target", default=target_default, metavar="HOST:PORT")
    report.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    try:
        start = since(args.since, now)
        end = since(args.until, now) if args.until else None
        with RuncapClient(args.target, api_key=os.environ.get("RUNCAP_API_KEY") or None) as client:
            runs = list(client.iter_runs(start, end))
        print(render(aggregate(runs, args.group_by), args.group_by, args.format), end="")
        if args.chart:
            draw(daily_spend(runs, args.group_by), args.group_by, args.chart)
            print(f"chart: {args.chart}", file=sys.stderr)
    except (ValueError, RuntimeError, RuncapError) as error:
        print(f"runcap: {error}", file=sys.stderr)
        return 1
    return 0
