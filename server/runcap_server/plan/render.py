"""A checked plan as one page of text (or JSON), and apply's list of changes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runcap_server.money import format_usd
from runcap_server.plan.apply import Change, duration_text
from runcap_server.plan.check import Report
from runcap_server.plan.costs import DAYS_PER_MONTH, VOLUME_MULTIPLIER, Costs
from runcap_server.plan.desired import plan_policy, rule_ids
from runcap_server.plan.document import Problem
from runcap_server.plan.model import Plan


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def summary(report: Report) -> str:
    """The one page `runcap plan check` prints."""
    lines: list[str] = []
    plan, costs = report.plan, report.costs
    if plan is not None:
        lines += _header(plan, report)
        if costs is not None:
            lines += ["", *_cost_lines(plan, costs), "", *_limit_lines(plan, costs)]
        lines += ["", *_alert_lines(plan)]
    lines += _problem_lines(report)
    verdict = "valid" if report.valid else f"INVALID ({_count(len(report.errors), 'error')})"
    name = plan.agent if plan is not None else report.file
    lines += ["", f"quota plan {name}: {verdict}"]
    return "\n".join(lines).lstrip("\n") + "\n"


def _header(plan: Plan, report: Report) -> list[str]:
    volume = f"{plan.runs_per_day} runs a day (confidence {plan.confidence})"
    if plan.peak_runs_per_day is not None:
        volume += f", peak {plan.peak_runs_per_day}"
    rows = [
        ["agent", plan.agent + (f": {plan.description}" if plan.description else "")],
        ["owner", f"team {plan.team}"],
        ["on call", plan.on_call.contact()],
        ["scope", f"{plan.scope_kind} {plan.scope_id}"],
        ["volume", volume],
    ]
    if report.prices_version:
        rows.append(["prices", report.prices_version])
    return [f"{key:<9}{value}" for key, value in rows]


def _cost_lines(plan: Plan, costs: Costs) -> list[str]:
    items = [["per run", "calls", "tokens", "cost"]]
    for llm in costs.llm:
        items.append(
            [llm.use.ref, str(llm.use.calls), f"{llm.run_tokens:,}", format_usd(llm.run_micros)]
        )
    for api in costs.apis:
        name = f"{api.api.name} ({api.api.meter})"
        items.append([name, str(api.api.calls_per_run), "-", format_usd(api.run_micros)])
    stated = " (stated)" if plan.usd_per_run_micros is not None else ""
    items.append(
        [
            f"expected{stated}",
            str(costs.calls_per_run),
            f"{costs.tokens_per_run:,}",
            format_usd(costs.per_run),
        ]
    )
    monthly = "none" if costs.monthly_ceiling is None else format_usd(costs.monthly_ceiling)
    buffer = plan.buffer
    factor = str(buffer.numerator) if buffer.denominator == 1 else f"{float(buffer):g}"
    figures = [
        ["", "per run", "per day", f"per month ({DAYS_PER_MONTH} days)"],
        [
            "expected",
            format_usd(costs.per_run),
            format_usd(costs.expected_daily),
            format_usd(costs.expected_monthly),
        ],
        [
            f"ceilings (buffer {factor}x)",
            format_usd(costs.per_run_ceiling),
            format_usd(costs.daily_ceiling),
            monthly,
        ],
        [
            f"worst case at {VOLUME_MULTIPLIER}x volume",
            format_usd(costs.per_run_ceiling),
            format_usd(costs.worst_daily),
            format_usd(costs.worst_monthly),
        ],
        [
            "  held by the ceilings",
            "",
            format_usd(costs.held_daily),
            format_usd(costs.held_monthly),
        ],
    ]
    note = (
        f"  (worst case: {costs.worst_runs_per_day} runs a day, each spending its whole "
        "per-run ceiling)"
    )
    return [*_table(items, right=(1, 2, 3)), "", *_table(figures, right=(1, 2, 3)), note]


def _limit_lines(plan: Plan, costs: Costs) -> list[str]:
    policy = plan_policy(plan, costs)
    lines = ["each run (the scope's default run policy)"]
    lines.append(
        f"  mode {policy.enforcement_mode}; thresholds "
        + "/".join(str(t) for t in policy.thresholds)
        + "%"
        + (f"; approval past {policy.approval_percent}%" if policy.approval_percent else "")
    )
    limits = []
    if policy.max_tokens is not None:
        limits.append(f"max_tokens {policy.max_tokens:,}")
    limits += [f"meter {meter} {limit}" for meter, limit in policy.meter_limits]
    if policy.rate_limit is not None:
        calls, window_ms = policy.rate_limit
        limits.append(f"rate {calls} calls per {duration_text(window_ms)}")
    if policy.max_in_flight is not None:
        limits.append(f"in flight {policy.max_in_flight}")
    if limits:
        lines.append("  " + "; ".join(limits))
    if policy.approved_meters:
        lines.append("  calls on any other meter wait for a human's approval")
    lines.append(
        f"  its dollar ceiling, {format_usd(costs.per_run_ceiling)}, is given at CreateRun "
        f"(limit_micros={costs.per_run_ceiling})"
    )
    return lines


def _alert_lines(plan: Plan) -> list[str]:
    alerts = plan.alerts
    notify_id, page_id = rule_ids(plan.agent)
    rows = []
    if alerts.notify:
        rows.append([notify_id, ", ".join(alerts.notify_on), _targets(alerts.notify)])
    page_on = ", ".join(alerts.page_on)
    if alerts.burn_rate_micros_per_minute:
        page_on = page_on.replace(
            "burn_rate", f"burn_rate above {format_usd(alerts.burn_rate_micros_per_minute)}/min"
        )
    rows.append([page_id, page_on, _targets(alerts.page) + f"; owner {plan.on_call.name}"])
    return ["alerts", *_table(rows)]


def _targets(targets: Sequence[Any]) -> str:
    return "-> " + ", ".join(target.describe() for target in targets)


def _problem_lines(report: Report) -> list[str]:
    lines = []
    for title, found in (("errors", report.errors), ("warnings", report.warnings)):
        if found:
            lines += ["", f"{title}:"]
            lines += [f"  {problem.where(report.file)}: {problem.message}" for problem in found]
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def report_json(report: Report) -> dict[str, Any]:
    """`runcap plan check --json`: the verdict, the problems and the figures."""
    document: dict[str, Any] = {
        "file": report.file,
        "valid": report.valid,
        "agent": report.plan.agent if report.plan else None,
        "prices": report.prices_version or None,
        "errors": [p.to_json() for p in report.errors],
        "warnings": [p.to_json() for p in report.warnings],
        "costs": None,
        "policy": None,
    }
    plan, costs = report.plan, report.costs
    if plan is not None and costs is not None:
        document["costs"] = {
            "per_run_micros": costs.per_run,
            "itemized_per_run_micros": costs.itemized_per_run,
            "per_run_ceiling_micros": costs.per_run_ceiling,
            "tokens_per_run": costs.tokens_per_run,
            "expected_daily_micros": costs.expected_daily,
            "expected_monthly_micros": costs.expected_monthly,
            "daily_ceiling_micros": costs.daily_ceiling,
            "monthly_ceiling_micros": costs.monthly_ceiling,
            "worst_case_runs_per_day": costs.worst_runs_per_day,
            "worst_case_daily_micros": costs.worst_daily,
            "worst_case_monthly_micros": costs.worst_monthly,
            "worst_case_held_daily_micros": costs.held_daily,
            "worst_case_held_monthly_micros": costs.held_monthly,
        }
        policy = plan_policy(plan, costs)
        document["policy"] = {
            "enforcement_mode": policy.enforcement_mode,
            "thresholds": list(policy.thresholds),
            "max_tokens": policy.max_tokens,
            "meter_limits": dict(policy.meter_limits),
            "rate_limit_per_minute": policy.rate_limit[0] if policy.rate_limit else None,
            "max_in_flight": policy.max_in_flight,
            "approval_percent": policy.approval_percent,
            "approved_meters": list(policy.approved_meters),
        }
    return document


def change_lines(found: Sequence[Change]) -> list[str]:
    """Apply's plan of changes: `+` add, `~` change, `-` remove, `=` unchanged."""
    lines = []
    for change in found:
        lines.append(f"  {change.op} {change.subject}")
        lines += [f"      {detail}" for detail in change.details]
    return lines


def problems_only(problems: Sequence[Problem], file: str) -> str:
    return "".join(f"  {p.where(file)}: {p.message}\n" for p in problems)


def create_run_snippet(plan: Plan, costs: Costs) -> list[str]:
    """How the agent's runs get their per-run ceiling (RunPolicy has no dollar limit)."""
    ceiling = costs.per_run_ceiling
    scope_field = {"api_key": "api_key_id", "user": "user_id", "team": "team_id"}[plan.scope_kind]
    return [
        f"create each run of {plan.agent} with its ceiling, {format_usd(ceiling)} (a scope's "
        "default policy has no dollar limit of its own):",
        f'  client.create_run(limit_micros={ceiling:_}, labels={{"agent": "{plan.agent}"}}, '
        f'{scope_field}="{plan.scope_id}")',
        f"  runcap run create --limit {format_usd(ceiling).lstrip('$')} --label agent={plan.agent}",
    ]
