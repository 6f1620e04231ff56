"""What a plan costs, and the ceilings it implies: integer micro-USD throughout.

- An LLM call costs what runcap would hold for it: input tokens at the input
  rate plus output tokens at the output rate, rounded up once to a micro-USD
  (`prices.estimate_micros`, tiers included). A run's LLM cost is the sum over
  its entries of calls x that.
- An external API costs calls_per_run x usd_per_call.
- The expected cost of a run is the plan's stated `per_run.usd` when it gives
  one (checked to be at least the itemized cost), else the itemized cost.
- The per-run ceiling is expected x buffer, rounded up (seed 002's 2x), or the
  plan's own. The token and meter ceilings of a run are the expected tokens and
  calls x buffer, rounded up.
- The daily ceiling lets the peak day's runs each reach their ceiling.
- The worst case at 10x volume is 10 x runs_per_day runs, each spending its
  whole per-run ceiling (the most the per-run ceilings let through); the scope
  ceilings then hold it to the daily (and monthly) ceiling.
- A month is 30 days.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Final, Protocol

from runcap_server.plan.model import ExternalApi, LlmUse, Plan
from runcap_server.prices import ModelPrice, estimate_micros

VOLUME_MULTIPLIER: Final = 10
"""The worst case is asked at this many times the expected volume (seed 002)."""

DAYS_PER_MONTH: Final = 30


class Prices(Protocol):
    """Where model prices come from: the built-in table or the server's."""

    @property
    def version(self) -> str: ...

    def lookup(self, provider: str, model: str) -> ModelPrice | None: ...


@dataclass(frozen=True, slots=True)
class LlmCost:
    use: LlmUse
    call_micros: int
    run_micros: int
    run_tokens: int


@dataclass(frozen=True, slots=True)
class ApiCost:
    api: ExternalApi
    run_micros: int
    meter_limit: int


@dataclass(frozen=True, slots=True)
class Costs:
    """A plan's figures. Every amount is micro-USD."""

    llm: tuple[LlmCost, ...]
    apis: tuple[ApiCost, ...]
    itemized_per_run: int
    per_run: int
    per_run_ceiling: int
    tokens_per_run: int
    max_tokens: int | None
    calls_per_run: int
    calls_per_minute: int | None
    runs_per_day: int
    peak_runs_per_day: int
    expected_daily: int
    expected_monthly: int
    daily_ceiling: int
    monthly_ceiling: int | None
    worst_runs_per_day: int
    worst_daily: int
    worst_monthly: int
    held_daily: int
    held_monthly: int

    @property
    def meter_limits(self) -> dict[str, int]:
        return {cost.api.meter: cost.meter_limit for cost in self.apis}


def times(value: int, factor: Fraction) -> int:
    """`value` x `factor`, rounded up to an integer."""
    product = value * factor
    return -(-product.numerator // product.denominator)


def compute(plan: Plan, prices: Prices) -> Costs | None:
    """The plan's figures; None when a model has no price (the rules say which)."""
    llm: list[LlmCost] = []
    for use in plan.llm:
        price = prices.lookup(use.provider, use.model)
        if price is None:
            return None
        rates = price.rates_for(use.input_tokens)
        call = estimate_micros(rates, use.input_tokens, use.output_tokens)
        tokens = use.calls * (use.input_tokens + use.output_tokens)
        llm.append(LlmCost(use, call, use.calls * call, tokens))
    apis = tuple(
        ApiCost(
            api, api.calls_per_run * api.usd_per_call_micros, times(api.calls_per_run, plan.buffer)
        )
        for api in plan.external_apis
    )
    itemized = sum(c.run_micros for c in llm) + sum(c.run_micros for c in apis)
    per_run = itemized if plan.usd_per_run_micros is None else plan.usd_per_run_micros
    ceiling = plan.per_run_ceiling_micros
    if ceiling is None:
        ceiling = times(per_run, plan.buffer)
    tokens = sum(c.run_tokens for c in llm)
    calls = sum(u.calls for u in plan.llm) + sum(a.calls_per_run for a in plan.external_apis)
    rate = plan.max_calls_per_minute
    if rate is None and calls:
        rate = sum(u.calls_per_minute for u in plan.llm)
        rate += sum(a.calls_per_minute for a in plan.external_apis)
    peak = plan.peak_runs_per_day or plan.runs_per_day
    daily_ceiling = plan.daily_ceiling_micros
    if daily_ceiling is None:
        daily_ceiling = peak * ceiling
    worst_runs = VOLUME_MULTIPLIER * plan.runs_per_day
    worst_daily = worst_runs * ceiling
    held_daily = min(worst_daily, daily_ceiling)
    held_monthly = held_daily * DAYS_PER_MONTH
    if plan.monthly_ceiling_micros is not None:
        held_monthly = min(held_monthly, plan.monthly_ceiling_micros)
    return Costs(
        llm=tuple(llm),
        apis=apis,
        itemized_per_run=itemized,
        per_run=per_run,
        per_run_ceiling=ceiling,
        tokens_per_run=tokens,
        max_tokens=times(tokens, plan.buffer) if tokens else None,
        calls_per_run=calls,
        calls_per_minute=rate,
        runs_per_day=plan.runs_per_day,
        peak_runs_per_day=peak,
        expected_daily=plan.runs_per_day * per_run,
        expected_monthly=plan.runs_per_day * per_run * DAYS_PER_MONTH,
        daily_ceiling=daily_ceiling,
        monthly_ceiling=plan.monthly_ceiling_micros,
        worst_runs_per_day=worst_runs,
        worst_daily=worst_daily,
        worst_monthly=worst_daily * DAYS_PER_MONTH,
        held_daily=held_daily,
        held_monthly=held_monthly,
    )
