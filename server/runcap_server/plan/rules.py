"""The semantic rules of a quota plan: what the schema cannot say.

Each rule reports problems with the path (and line) of the value at fault.
Errors make the plan invalid (`runcap plan check` exits 1, `apply` refuses);
warnings are printed and change nothing. The rules that need prices (unknown
models, token limits, the cost figures) run only when prices are given.
"""

from __future__ import annotations

from collections.abc import Iterator

from runcap_server.money import format_usd
from runcap_server.plan import human
from runcap_server.plan.costs import VOLUME_MULTIPLIER, Costs, Prices
from runcap_server.plan.document import Document, PathPart, Problem
from runcap_server.plan.model import Plan


def offline(plan: Plan, doc: Document) -> list[Problem]:
    """The rules that need no prices: who is paged, volume, rates, policy, alerts."""
    rules = (_on_call, _scope, _volume, _apis, _enforcement, _alerts)
    return [problem for rule in rules for problem in rule(plan, doc)]


def priced(plan: Plan, doc: Document, prices: Prices, costs: Costs | None) -> list[Problem]:
    """The rules that need prices: known models and their limits, and the figures."""
    problems = list(_models(plan, doc, prices))
    if costs is not None:
        problems += _figures(plan, doc, costs)
    return problems


def _on_call(plan: Plan, doc: Document) -> Iterator[Problem]:
    base = ["owner", "on_call"]
    person = plan.on_call
    checks = [
        ("name", person.name, human.name_problem),
        ("email", person.email, human.email_problem),
        ("slack", person.slack, human.slack_problem),
    ]
    for field, value, check in checks:
        if field == "name" or value:
            message = check(value, plan.team)
            if message is not None:
                yield doc.problem([*base, field], message)


def _scope(plan: Plan, doc: Document) -> Iterator[Problem]:
    if plan.scope_kind == "team":
        yield doc.problem(
            ["scope", "team"],
            "a team scope is shared by every agent of the team: this plan's ceilings, default "
            "policy and alerts would apply to all of them (give the agent an API key of its "
            "own and use scope.api_key)",
            error=False,
        )


def _volume(plan: Plan, doc: Document) -> Iterator[Problem]:
    peak = plan.peak_runs_per_day
    if peak is not None and peak < plan.runs_per_day:
        yield doc.problem(
            ["volume", "peak_runs_per_day"],
            f"is {peak}, below runs_per_day ({plan.runs_per_day}): the peak is the busiest day",
        )
    if plan.low_confidence and peak is None:
        yield doc.problem(
            ["volume", "confidence"],
            f"is {plan.confidence}: with a low-confidence estimate, state peak_runs_per_day too, "
            "so the daily ceiling allows the busy days you can foresee",
            error=False,
        )


def _apis(plan: Plan, doc: Document) -> Iterator[Problem]:
    names: dict[str, int] = {}
    meters: dict[str, int] = {}
    peak = plan.peak_runs_per_day or plan.runs_per_day
    minutes = plan.duration_minutes
    for index, api in enumerate(plan.external_apis):
        at: list[PathPart] = ["external_apis", index]
        if api.name in names:
            yield doc.problem(
                [*at, "name"], f"{api.name!r} is listed twice (external_apis[{names[api.name]}])"
            )
        names.setdefault(api.name, index)
        if api.meter in meters:
            yield doc.problem(
                [*at, "meter"],
                f"{api.meter!r} is also the meter of external_apis[{meters[api.meter]}]: each API "
                "needs a meter of its own so that its calls are counted and limited apart",
            )
        meters.setdefault(api.meter, index)
        if minutes is not None and api.calls_per_run > api.calls_per_minute * minutes:
            yield doc.problem(
                [*at, "calls_per_minute"],
                f"is {api.calls_per_minute}: {api.calls_per_run} calls in a {minutes}-minute run "
                f"need at least {-(-api.calls_per_run // minutes)} a minute, so a normal run "
                "would be throttled (raise the rate or per_run.duration_minutes)",
            )
        if api.daily_quota is not None:
            needed = api.calls_per_run * peak
            if needed > api.daily_quota:
                yield doc.problem(
                    [*at, "daily_quota"],
                    f"is {api.daily_quota} calls, but {peak} runs a day of {api.calls_per_run} "
                    f"calls need {needed}: the vendor would cut the agent off on a peak day",
                )
            elif (
                worst := api.calls_per_run * plan.runs_per_day * VOLUME_MULTIPLIER
            ) > api.daily_quota:
                yield doc.problem(
                    [*at, "daily_quota"],
                    f"at {VOLUME_MULTIPLIER}x volume the agent would need {worst} calls a day: "
                    f"the vendor's quota of {api.daily_quota} stops it before runcap does",
                    error=False,
                )
    rate = plan.max_calls_per_minute
    if rate is not None and minutes is not None:
        calls = sum(u.calls for u in plan.llm) + sum(a.calls_per_run for a in plan.external_apis)
        if calls > rate * minutes:
            yield doc.problem(
                ["per_run", "max_calls_per_minute"],
                f"is {rate}: a run's {calls} calls in {minutes} minutes need at least "
                f"{-(-calls // minutes)} a minute, so a normal run would be throttled",
            )


def _enforcement(plan: Plan, doc: Document) -> Iterator[Problem]:
    last = 0
    for name, percent in zip(("info", "warn", "throttle"), plan.thresholds, strict=True):
        if percent and percent <= last:
            yield doc.problem(
                ["enforcement", "thresholds", name],
                f"is {percent}: each threshold that is on must be above the ones before it "
                f"(here {last})",
            )
        last = max(last, percent)
    if plan.soft_gate_margin_percent and plan.mode != "soft_gate":
        yield doc.problem(
            ["enforcement", "soft_gate_margin_percent"], "applies only to mode soft_gate"
        )


def _alerts(plan: Plan, doc: Document) -> Iterator[Problem]:
    alerts = plan.alerts
    if "stop" not in alerts.page_on:
        yield doc.problem(
            ["alerts", "page_on"],
            "must include stop: when a run hits its ceiling at 3am, the on-call human is paged",
        )
    for field, triggers in (("notify_on", alerts.notify_on), ("page_on", alerts.page_on)):
        if "burn_rate" in triggers and alerts.burn_rate_micros_per_minute is None:
            yield doc.problem(
                ["alerts", field],
                "has burn_rate, so alerts.burn_rate_usd_per_minute must say at which rate",
            )
    if alerts.burn_rate_micros_per_minute == 0:
        yield doc.problem(["alerts", "burn_rate_usd_per_minute"], "must be more than $0")
    if alerts.notify_on and not alerts.notify and "notify_on" in doc.data["alerts"]:
        yield doc.problem(
            ["alerts", "notify_on"], "has no targets to go to: add alerts.notify", error=False
        )


def _models(plan: Plan, doc: Document, prices: Prices) -> Iterator[Problem]:
    for index, use in enumerate(plan.llm):
        at: list[PathPart] = ["per_run", "llm", index]
        price = prices.lookup(use.provider, use.model)
        if price is None:
            yield doc.problem(
                [*at, "model"],
                f"{use.ref!r} has no price in {prices.version}: runcap blocks calls to a model "
                "it cannot price (fail closed). Use the exact provider/model of the price table, "
                "or have an admin price it (SetModelPrice) and check with --target",
            )
            continue
        if price.max_output_tokens is not None and use.output_tokens > price.max_output_tokens:
            yield doc.problem(
                [*at, "output_tokens"],
                f"is {use.output_tokens}, more than {use.ref} can write "
                f"({price.max_output_tokens})",
            )
        window = price.context_window
        if window is not None and use.input_tokens + use.output_tokens > window:
            yield doc.problem(
                [*at, "input_tokens"],
                f"{use.input_tokens} in + {use.output_tokens} out do not fit "
                f"{use.ref}'s context window ({window} tokens)",
            )


def _figures(plan: Plan, doc: Document, costs: Costs) -> Iterator[Problem]:
    if costs.per_run <= 0:
        yield doc.problem(
            ["per_run"],
            "says nothing a run costs: give its LLM calls (llm), its dollars (usd), or priced "
            "external_apis",
        )
        return
    stated = plan.usd_per_run_micros
    if stated is not None and stated < costs.itemized_per_run:
        yield doc.problem(
            ["per_run", "usd"],
            f"is {format_usd(stated)}, but the run's LLM calls and external APIs alone cost "
            f"{format_usd(costs.itemized_per_run)}",
        )
    if plan.per_run_ceiling_micros is not None and costs.per_run_ceiling < costs.per_run:
        yield doc.problem(
            ["ceilings", "per_run_usd"],
            f"is {format_usd(costs.per_run_ceiling)}, below the expected "
            f"{format_usd(costs.per_run)} a run: normal runs would be stopped",
        )
    if plan.daily_ceiling_micros is not None:
        peak_spend = costs.peak_runs_per_day * costs.per_run
        if costs.daily_ceiling < max(peak_spend, costs.per_run_ceiling):
            yield doc.problem(
                ["ceilings", "daily_usd"],
                f"is {format_usd(costs.daily_ceiling)}, below what the expected peak day spends "
                f"({costs.peak_runs_per_day} runs x {format_usd(costs.per_run)} = "
                f"{format_usd(peak_spend)}) or one run's ceiling "
                f"({format_usd(costs.per_run_ceiling)})",
            )
    if costs.monthly_ceiling is not None and costs.monthly_ceiling < costs.expected_monthly:
        yield doc.problem(
            ["ceilings", "monthly_usd"],
            f"is {format_usd(costs.monthly_ceiling)}, below the expected month "
            f"({format_usd(costs.expected_monthly)})",
        )
    for field, stated_worst, computed in (
        ("daily_usd", plan.stated_worst_daily_micros, costs.worst_daily),
        ("monthly_usd", plan.stated_worst_monthly_micros, costs.worst_monthly),
    ):
        if stated_worst is None:
            continue
        # People state dollars and cents: a figure within a cent of runcap's is right.
        if stated_worst < computed - computed % 10_000:
            yield doc.problem(
                ["worst_case", field],
                f"is {format_usd(stated_worst)}, but at {VOLUME_MULTIPLIER}x volume "
                f"({costs.worst_runs_per_day} runs a day, each up to its "
                f"{format_usd(costs.per_run_ceiling)} ceiling) the agent can spend "
                f"{format_usd(computed)}: the plan understates its worst case",
            )
        elif stated_worst > computed + 10_000:
            yield doc.problem(
                ["worst_case", field],
                f"is {format_usd(stated_worst)}; runcap computes {format_usd(computed)} "
                f"({costs.worst_runs_per_day} runs a day at the per-run ceiling)",
                error=False,
            )
