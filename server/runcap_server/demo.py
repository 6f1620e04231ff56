"""`runcap demo runaway`: seed 001's runaway agent, governed by runcap.

A simulated agent loop calls a mock LLM (a local function, no network) every
`--interval` seconds. Like a real agent it resends the whole conversation at
each step, so its input grows by a fixed number of tokens per call (up to the
model's context window, where a harness would drop the oldest turns). Each
call is reserved as an LLM call (the server prices it from its price table)
and committed with its token usage. A throttle (``DECISION_THROTTLE``) makes
the agent wait the `retry_after` it was given; a block stops it. A Watch of
the run collects the timeline meanwhile.

The summary is the run's own: the spend is its committed spend from GetRun,
the per-call costs are the actual costs the server recorded (Watch), and the
hour without a governor is priced at the rates those costs imply.

Where the server is: `--target`, else RUNCAP_TARGET, else (or with
`--embedded`) a server started in this process on a free loopback port with a
temporary SQLite ledger, stopped at the end. With `--proxy URL` the calls go
to a LiteLLM proxy with runcap's callback instead (it reserves and commits);
the demo still creates and watches the run over gRPC, so the proxy and the
demo must use the same runcap server (`--target`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final

from runcap import (
    AsyncRuncapClient,
    BudgetBlockedError,
    BudgetThrottledError,
    LlmCall,
    RuncapError,
    RunPolicy,
    TokenUsage,
    UnavailableError,
)
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server.money import format_usd, parse_usd
from runcap_server.settings import parse_duration_ms

DEFAULT_PROVIDER: Final = "openai"
DEFAULT_MODEL: Final = "gpt-4.1-mini"
DEFAULT_LIMIT: Final = "5.00"
DEFAULT_INTERVAL_S: Final = 0.1
FALLBACK_CONTEXT_WINDOW: Final = 128_000
HOUR_S: Final = 3600.0
WATCH_DRAIN_S: Final = 10.0
PROXY_TIMEOUT_S: Final = 120.0
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1


class DemoError(Exception):
    """A problem to report as one line, such as a missing optional dependency."""


# --------------------------------------------------------------------------
# The simulated agent


@dataclass(frozen=True, slots=True)
class Agent:
    """The runaway agent: which model it calls and how its context grows.

    Step 0 sends `initial_input_tokens`; each later step resends everything
    plus `growth_tokens` (the last reply and a tool result), until the
    prompt fills the context window less the room kept for the output.
    """

    provider: str = DEFAULT_PROVIDER
    model: str = DEFAULT_MODEL
    initial_input_tokens: int = 2_000
    growth_tokens: int = 1_500
    output_tokens: int = 400
    max_output_tokens: int = 1_000
    context_window: int = FALLBACK_CONTEXT_WINDOW

    @property
    def max_input_tokens(self) -> int:
        """The largest prompt: the context window less the output's room."""
        return max(0, self.context_window - self.max_output_tokens)

    def input_tokens(self, step: int) -> int:
        """The prompt of call number `step` (0-based)."""
        return min(self.initial_input_tokens + step * self.growth_tokens, self.max_input_tokens)

    def first_full_step(self) -> int:
        """The first step whose prompt is as long as it will ever be."""
        room = self.max_input_tokens - self.initial_input_tokens
        if room <= 0 or self.growth_tokens <= 0:
            return 0
        return -(-room // self.growth_tokens)


DEFAULT_AGENT: Final = Agent()


def mock_llm(agent: Agent, step: int) -> TokenUsage:
    """The mock model: answers at once with `output_tokens` and bills the
    whole prompt as uncached input."""
    return TokenUsage(input_tokens=agent.input_tokens(step), output_tokens=agent.output_tokens)


def context_window_of(provider: str, model: str) -> int:
    """The model's context window from the price table shipped with the server,
    or `FALLBACK_CONTEXT_WINDOW` when it does not say."""
    from runcap_server.prices import PriceTable, PriceTableError

    try:
        price = PriceTable.packaged().lookup(provider, model)
    except PriceTableError:
        price = None
    if price is None or not price.context_window:
        return FALLBACK_CONTEXT_WINDOW
    return price.context_window


# --------------------------------------------------------------------------
# The timeline and the summary


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One notable moment of the run.

    `kind` is ``"threshold"`` (a THRESHOLD_CROSSED event; `level` says which),
    ``"throttle"`` (a DECISION_THROTTLE; `retry_after_s`), or ``"block"`` (the
    stop; `reason` and `decision_id`). `committed_micros` is the run's
    committed spend at that moment.
    """

    elapsed_s: float
    kind: str
    committed_micros: int
    level: str = ""
    retry_after_s: float = 0.0
    reason: str = ""
    decision_id: str = ""
    estimate_micros: int = 0
    remaining_micros: int = 0


@dataclass(frozen=True, slots=True)
class SpendPoint:
    """A commit seen on Watch: when, what it cost, and the run's spend after it."""

    elapsed_s: float
    actual_micros: int
    committed_micros: int


@dataclass(frozen=True, slots=True)
class StepPricing:
    """What one call costs, in micro-USD: ``ceil(fixed + per_input_token *
    input_tokens)``, the output being the same at every step."""

    fixed_micros: Fraction
    per_input_token_micros: Fraction

    def cost_micros(self, input_tokens: int) -> int:
        return math.ceil(self.fixed_micros + self.per_input_token_micros * input_tokens)


@dataclass(frozen=True, slots=True)
class Extrapolation:
    """The same loop for `seconds` with no governor: `calls` calls at the
    demo's interval, their tokens and their cost."""

    seconds: float
    calls: int
    input_tokens: int
    output_tokens: int
    micros: int
    pricing: StepPricing
    fit_exact: bool


@dataclass(frozen=True, slots=True)
class Setup:
    """What the demo ran: the agent, its pace, the run's ceiling and policy."""

    agent: Agent
    interval_s: float
    limit_micros: int
    target: str
    embedded: bool
    proxy: str
    run_id: str
    enforcement_mode: str
    thresholds_percent: tuple[int, int, int]
    throttle_base_delay_s: float
    throttle_max_delay_s: float


@dataclass(slots=True)
class Recorder:
    """What the agent loop and the watcher saw, in the order they saw it;
    times are seconds since `origin` (`time.monotonic()`)."""

    origin: float = field(default_factory=time.monotonic)
    timeline: list[TimelineEvent] = field(default_factory=list)
    spend: list[SpendPoint] = field(default_factory=list)
    allowed: int = 0
    throttled: int = 0
    blocked: int = 0
    throttle_wait_s: float = 0.0
    price_table_version: str = ""
    committed_micros: int = 0

    def clock(self) -> float:
        return time.monotonic() - self.origin

    def add(self, event: TimelineEvent) -> None:
        self.timeline.append(event)


@dataclass(frozen=True, slots=True)
class Summary:
    """Everything the demo reports; `final` is the run's state from GetRun."""

    setup: Setup
    timeline: tuple[TimelineEvent, ...]
    spend: tuple[SpendPoint, ...]
    allowed: int
    throttled: int
    blocked: int
    throttle_wait_s: float
    price_table_version: str
    final: pb.GetRunResponse
    hour: Extrapolation | None

    @property
    def stop(self) -> TimelineEvent | None:
        return next((e for e in self.timeline if e.kind == "block"), None)

    @property
    def call_costs(self) -> list[int]:
        return [point.actual_micros for point in self.spend]


# --------------------------------------------------------------------------
# Extrapolation (pure)


def fit_pricing(agent: Agent, costs: Sequence[int]) -> tuple[StepPricing, bool] | None:
    """The per-call price implied by the actual costs of the loop's calls
    (`costs[k]` is what call `k` cost, as the server recorded it).

    The fixed part and the price per input token come from the first call
    and the last one with a different prompt size: with one output size and
    untiered prices, a call's cost is linear in its input tokens. The flag
    says whether the fit reproduces every observed cost exactly (it does
    not when the model's price tiers change within the run). None when no
    two calls had different prompt sizes.
    """
    if not costs:
        return None
    first_tokens = agent.input_tokens(0)
    last = next(
        (k for k in range(len(costs) - 1, 0, -1) if agent.input_tokens(k) != first_tokens), None
    )
    if last is None:
        return None
    per_token = Fraction(costs[last] - costs[0], agent.input_tokens(last) - first_tokens)
    pricing = StepPricing(costs[0] - per_token * first_tokens, per_token)
    exact = all(pricing.cost_micros(agent.input_tokens(k)) == cost for k, cost in enumerate(costs))
    return pricing, exact


def extrapolate(
    agent: Agent, pricing: StepPricing, interval_s: float, seconds: float = HOUR_S
) -> tuple[int, int, int, int]:
    """The loop for `seconds` at one call per `interval_s`, with nothing to
    stop it: (calls, input tokens, output tokens, cost in micro-USD).

    Every call is priced with `pricing` at its own prompt size; once the
    prompt has stopped growing every later call costs the same.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    # The epsilon keeps 3600 / 0.1 at 36,000 calls despite binary floats.
    calls = math.floor(seconds / interval_s + 1e-9)
    growing = min(calls, agent.first_full_step())
    input_tokens = micros = 0
    for step in range(growing):
        tokens = agent.input_tokens(step)
        input_tokens += tokens
        micros += pricing.cost_micros(tokens)
    steady = calls - growing
    if steady:
        tokens = agent.input_tokens(growing)
        input_tokens += steady * tokens
        micros += steady * pricing.cost_micros(tokens)
    return calls, input_tokens, calls * agent.output_tokens, micros


def hour_without_governor(
    agent: Agent, costs: Sequence[int], interval_s: float
) -> Extrapolation | None:
    """What an hour of the same loop would cost with no governor, priced at
    the rates the run's own calls were charged; None when they do not say
    (fewer than two calls with different prompt sizes)."""
    fitted = fit_pricing(agent, costs)
    if fitted is None:
        return None
    pricing, exact = fitted
    calls, input_tokens, output_tokens, micros = extrapolate(agent, pricing, interval_s)
    return Extrapolation(HOUR_S, calls, input_tokens, output_tokens, micros, pricing, exact)


# --------------------------------------------------------------------------
# Rendering (pure)


def _name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def _count(n: int) -> str:
    return f"{n:,}"


def _dollars(micros: int) -> str:
    """Rounded to the cent, with thousands separators: ``$14,948.06``."""
    cents = (micros + 5_000) // 10_000
    return f"${cents // 100:,}.{cents % 100:02d}"


def _seconds(value: float) -> str:
    return f"{value:g} s" if value < 1 else f"{value:.2f} s"


def _percent(part: int, whole: int) -> str:
    return f"{part * 100 / whole:.1f}%" if whole else "-"


def _describe(event: TimelineEvent, setup: Setup) -> str:
    if event.kind == "threshold":
        levels = dict(zip(("INFO", "WARN", "THROTTLE"), setup.thresholds_percent, strict=True))
        percent = levels.get(event.level, 100)
        return f"THRESHOLD_CROSSED {event.level} ({percent}% of the limit)"
    if event.kind == "throttle":
        return f"THROTTLE: wait {event.retry_after_s:.2f} s, then go on"
    if event.kind == "block":
        text = f"BLOCK ({event.reason}): the agent stops"
        if event.reason == "UNKNOWN_PRICE":
            model = f"{setup.agent.provider}/{setup.agent.model}"
            return text + f"; the server has no price for {model} (unknown prices fail closed)"
        if event.estimate_micros:
            text += (
                f"; the next call needs {format_usd(event.estimate_micros)}, "
                f"{format_usd(event.remaining_micros)} is left"
            )
        return text
    return event.kind


def render_text(summary: Summary) -> str:
    """The human-readable report."""
    setup, agent = summary.setup, summary.setup.agent
    state = summary.final.state
    info, warn, throttle = setup.thresholds_percent
    where = setup.target + (" (embedded server, temporary SQLite ledger)" if setup.embedded else "")
    lines = [
        "runcap demo runaway: an agent loop with no exit condition, against a "
        f"{format_usd(setup.limit_micros)} ceiling",
        "",
        f"  model      {agent.provider}/{agent.model}, priced by the server"
        + (f" (price table {summary.price_table_version})" if summary.price_table_version else ""),
        f"  pace       one call every {_seconds(setup.interval_s)}"
        + (f", through the LiteLLM proxy at {setup.proxy}" if setup.proxy else " (a mock LLM)"),
        f"  context    {_count(agent.initial_input_tokens)} input tokens, "
        f"+{_count(agent.growth_tokens)} per call (the whole conversation is resent), "
        f"at most {_count(agent.max_input_tokens)}",
        f"  output     {_count(agent.output_tokens)} tokens per call "
        f"(max_tokens {_count(agent.max_output_tokens)}, which is what each reserve holds)",
        f"  run        {setup.run_id} on {where}",
        f"  policy     {setup.enforcement_mode.lower()}: info {info}%, warn {warn}%, "
        f"throttle {throttle}% (delay {setup.throttle_base_delay_s:g} s, doubling up to "
        f"{setup.throttle_max_delay_s:g} s), stop at 100%",
        "",
        "timeline   elapsed  committed  event",
        f"           {0.0:6.2f}s  {format_usd(0):>9}  run created, agent started",
    ]
    for event in summary.timeline:
        lines.append(
            f"           {event.elapsed_s:6.2f}s  {format_usd(event.committed_micros):>9}  "
            + _describe(event, setup)
        )
    stop = summary.stop
    lines.append("")
    if stop is not None:
        lines.append(
            f"hit the wall   after {stop.elapsed_s:.2f} s and {_count(summary.allowed)} calls "
            f"({summary.throttle_wait_s:.2f} s of it waiting out throttles)"
        )
    else:
        lines.append(f"interrupted    after {_count(summary.allowed)} calls, before the wall")
    lines.append(
        f"spent          {format_usd(state.committed_micros)} of "
        f"{format_usd(state.limit_micros)} ({_percent(state.committed_micros, state.limit_micros)}"
        f"), {format_usd(state.reserved_micros)} held, overrun "
        f"{format_usd(state.overrun_micros)}, {_count(state.committed_tokens)} tokens "
        "(the run's own state)"
    )
    lines.append(
        f"calls          {_count(summary.allowed)} allowed, {_count(summary.throttled)} throttled, "
        f"{_count(summary.blocked)} blocked"
    )
    hour = summary.hour
    if hour is None:
        lines.append(
            "no governor    cannot extrapolate: fewer than two calls with different prompt sizes"
        )
    else:
        pricing = hour.pricing
        lines += [
            f"no governor    one hour of the same loop: {_count(hour.calls)} calls, "
            f"{_count(hour.input_tokens + hour.output_tokens)} tokens, "
            f"about {_dollars(hour.micros)}",
            f"               ({_count(hour.calls)} = 3600 s / {setup.interval_s:g} s, each call "
            f"priced at the rates this run was charged: {float(pricing.fixed_micros):g} micro-USD "
            f"+ {float(pricing.per_input_token_micros):g} per input token"
            + ("" if hour.fit_exact else ", approximately: the costs are not quite linear")
            + f"; the prompt stops growing at {_count(agent.max_input_tokens)} tokens)",
        ]
    return "\n".join(lines)


def summary_json(summary: Summary) -> dict[str, Any]:
    """The machine-readable summary: every number from the run itself."""
    setup, agent, state = summary.setup, summary.setup.agent, summary.final.state
    stop = summary.stop
    hour = summary.hour
    info, warn, throttle = setup.thresholds_percent
    return {
        "run_id": setup.run_id,
        "target": setup.target,
        "embedded": setup.embedded,
        "proxy": setup.proxy or None,
        "setup": {
            "provider": agent.provider,
            "model": agent.model,
            "price_table_version": summary.price_table_version,
            "interval_s": setup.interval_s,
            "limit_micros": setup.limit_micros,
            "initial_input_tokens": agent.initial_input_tokens,
            "growth_tokens_per_call": agent.growth_tokens,
            "output_tokens": agent.output_tokens,
            "max_output_tokens": agent.max_output_tokens,
            "context_window": agent.context_window,
            "enforcement_mode": setup.enforcement_mode,
            "thresholds_percent": {"info": info, "warn": warn, "throttle": throttle},
            "throttle_base_delay_s": setup.throttle_base_delay_s,
            "throttle_max_delay_s": setup.throttle_max_delay_s,
        },
        "timeline": [_event_json(event) for event in summary.timeline],
        "stopped": stop is not None,
        "wall_s": None if stop is None else round(stop.elapsed_s, 4),
        "stop": None if stop is None else _event_json(stop),
        "calls": {
            "allowed": summary.allowed,
            "throttled": summary.throttled,
            "blocked": summary.blocked,
        },
        "throttle_wait_s": round(summary.throttle_wait_s, 4),
        "spent": {
            "limit_micros": state.limit_micros,
            "committed_micros": state.committed_micros,
            "reserved_micros": state.reserved_micros,
            "remaining_micros": state.remaining_micros,
            "overrun_micros": state.overrun_micros,
            "committed_tokens": state.committed_tokens,
            "threshold": _name(budget_pb2.ThresholdLevel, state.threshold, "THRESHOLD_LEVEL_"),
            "status": _name(budget_pb2.RunStatus, state.status, "RUN_STATUS_"),
            "revision": state.revision,
        },
        "call_costs_micros": summary.call_costs,
        "spend": [
            {"elapsed_s": round(p.elapsed_s, 4), "committed_micros": p.committed_micros}
            for p in summary.spend
        ],
        "hour_without_governor": None
        if hour is None
        else {
            "seconds": hour.seconds,
            "calls": hour.calls,
            "input_tokens": hour.input_tokens,
            "output_tokens": hour.output_tokens,
            "micros": hour.micros,
            "fixed_micros_per_call": float(hour.pricing.fixed_micros),
            "micros_per_input_token": float(hour.pricing.per_input_token_micros),
            "fit_exact": hour.fit_exact,
            "method": "calls = seconds / interval_s; call k is priced at ceil(fixed + "
            "per_input_token * input_tokens(k)), the rates fitted to the actual costs the "
            "server recorded for this run's calls; input_tokens(k) = initial + k * growth, "
            "capped at the context window less max_output_tokens",
        },
    }


def _event_json(event: TimelineEvent) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "elapsed_s": round(event.elapsed_s, 4),
        "event": event.kind,
        "committed_micros": event.committed_micros,
    }
    if event.kind == "threshold":
        entry["level"] = event.level
    elif event.kind == "throttle":
        entry["retry_after_s"] = event.retry_after_s
    elif event.kind == "block":
        entry["reason"] = event.reason
        entry["decision_id"] = event.decision_id
        entry["estimate_micros"] = event.estimate_micros
        entry["remaining_micros"] = event.remaining_micros
    return entry


def plot_spend(summary: Summary, path: str) -> None:
    """Draws committed spend over time, with the thresholds and the ceiling,
    the throttles and the stop, to the image file `path` (PNG by its name).
    Needs matplotlib (``pip install 'runcap[demo]'``)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise DemoError(
            "--plot needs matplotlib, which is not installed: pip install 'runcap[demo]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    setup = summary.setup
    usd = 1e6
    limit = setup.limit_micros / usd
    figure, axes = plt.subplots(figsize=(9, 5))
    times = [0.0] + [p.elapsed_s for p in summary.spend]
    spent = [0.0] + [p.committed_micros / usd for p in summary.spend]
    stop = summary.stop
    end = stop.elapsed_s if stop is not None else times[-1]
    axes.step([*times, end], [*spent, spent[-1]], where="post", color="tab:blue", label="committed")
    for (name, color), percent in zip(
        (("info", "tab:green"), ("warn", "tab:orange"), ("throttle", "tab:red")),
        setup.thresholds_percent,
        strict=True,
    ):
        if percent:
            axes.axhline(
                limit * percent / 100,
                color=color,
                linestyle="--",
                linewidth=1,
                label=f"{name} {percent}%",
            )
    axes.axhline(
        limit, color="black", linewidth=1.5, label=f"ceiling {format_usd(setup.limit_micros)}"
    )
    throttles = [e for e in summary.timeline if e.kind == "throttle"]
    if throttles:
        axes.scatter(
            [e.elapsed_s for e in throttles],
            [e.committed_micros / usd for e in throttles],
            marker="o",
            facecolors="none",
            edgecolors="tab:red",
            zorder=3,
            label="throttled (waits retry_after)",
        )
    if stop is not None:
        axes.scatter(
            [stop.elapsed_s],
            [stop.committed_micros / usd],
            marker="X",
            s=80,
            color="black",
            zorder=3,
            label=f"blocked at {stop.elapsed_s:.1f} s",
        )
    agent = setup.agent
    axes.set_title(
        f"runaway agent on {agent.provider}/{agent.model}: a call every "
        f"{setup.interval_s:g} s, context +{agent.growth_tokens:,} tokens per call"
    )
    axes.set_xlabel("seconds since the agent started")
    axes.set_ylabel("USD")
    axes.set_ylim(0, limit * 1.08)
    axes.set_xlim(0, max(end, setup.interval_s) * 1.03)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------
# Running it


@dataclass(frozen=True, slots=True)
class Options:
    """The demo's arguments, parsed."""

    agent: Agent
    interval_s: float
    limit_micros: int
    target: str | None
    proxy: str = ""
    proxy_key: str = ""


async def run_demo(options: Options) -> Summary:
    """Runs the demo against `options.target`, or against an embedded
    server when it is None, and returns its summary."""
    async with (
        _server(options.target) as (target, embedded),
        AsyncRuncapClient(target, api_key=os.environ.get("RUNCAP_API_KEY") or None) as client,
    ):
        return await _run(client, options, target, embedded)


@contextlib.asynccontextmanager
async def _server(target: str | None) -> AsyncIterator[tuple[str, bool]]:
    if target:
        yield target, False
        return
    from runcap_server.app import RuncapServer
    from runcap_server.settings import Settings

    with tempfile.TemporaryDirectory(prefix="runcap-demo-") as directory:
        try:
            settings = Settings.from_env(
                listen_addr="127.0.0.1:0",
                backend="sqlite",
                sqlite_path=os.path.join(directory, "runcap.db"),
                sqlite_synchronous="NORMAL",
                shutdown_grace_ms=1000,
            )
        except ValueError as error:
            raise DemoError(f"cannot configure the embedded server: {error}") from None
        server = RuncapServer(settings)
        port = await server.start()
        try:
            if not port:
                raise DemoError("could not start the embedded server on 127.0.0.1")
            yield f"127.0.0.1:{port}", True
        finally:
            await server.stop()


async def _run(client: AsyncRuncapClient, options: Options, target: str, embedded: bool) -> Summary:
    agent = options.agent
    created = await client.create_run(
        f"runaway-{uuid.uuid4().hex[:12]}",
        limit_micros=options.limit_micros,
        labels={"demo": "runaway"},
        policy=RunPolicy(enforcement_mode="hard_gate"),
    )
    run = created.run
    policy = run.policy
    setup = Setup(
        agent=agent,
        interval_s=options.interval_s,
        limit_micros=run.limit_micros,
        target=target,
        embedded=embedded,
        proxy=options.proxy,
        run_id=run.run_id,
        enforcement_mode=_name(
            budget_pb2.EnforcementMode, policy.enforcement_mode, "ENFORCEMENT_MODE_"
        ),
        thresholds_percent=(
            policy.thresholds.info_percent,
            policy.thresholds.warn_percent,
            policy.thresholds.throttle_percent,
        ),
        throttle_base_delay_s=policy.throttle_base_delay.ToMilliseconds() / 1000,
        throttle_max_delay_s=policy.throttle_max_delay.ToMilliseconds() / 1000,
    )
    recorder = Recorder()
    watching = asyncio.Event()
    watcher = asyncio.create_task(_watch(client, run.run_id, recorder, watching))
    try:
        # Start the agent once the watch has its snapshot: every change is
        # then an event, seen as it happens.
        try:
            await asyncio.wait_for(_first(watching, watcher), WATCH_DRAIN_S)
        except TimeoutError:
            raise DemoError(f"no snapshot from the watch of run {run.run_id}") from None
        recorder.origin = time.monotonic()
        if options.proxy:
            await _proxy_loop(options, run.run_id, recorder)
        else:
            await _client_loop(client, options, run.run_id, recorder)
    finally:
        with contextlib.suppress(RuncapError):
            await client.close_run(run.run_id)
        # The watch ends at the CLOSED event: every commit and threshold
        # crossing before it has been recorded.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher, WATCH_DRAIN_S)
    final = await client.get_run(run.run_id)
    timeline = sorted(recorder.timeline, key=lambda e: e.elapsed_s)
    spend = tuple(recorder.spend)
    costs = [point.actual_micros for point in spend]
    return Summary(
        setup=setup,
        timeline=tuple(timeline),
        spend=spend,
        allowed=recorder.allowed,
        throttled=recorder.throttled,
        blocked=recorder.blocked,
        throttle_wait_s=recorder.throttle_wait_s,
        price_table_version=recorder.price_table_version,
        final=final,
        hour=hour_without_governor(agent, costs, options.interval_s),
    )


async def _first(watching: asyncio.Event, watcher: asyncio.Task[None]) -> None:
    """Waits for the watch's snapshot, or raises what ended the watch early."""
    waiter = asyncio.create_task(watching.wait())
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not watching.is_set():
        watcher.result()
        raise DemoError("the watch of the run ended before its snapshot")


async def _watch(
    client: AsyncRuncapClient, run_id: str, recorder: Recorder, watching: asyncio.Event
) -> None:
    async with client.watch(run_id) as stream:
        async for message in stream:
            kind = message.WhichOneof("kind")
            if kind == "snapshot":
                watching.set()
                continue
            if kind != "event":
                continue
            event = message.event
            state = event.state
            recorder.committed_micros = state.committed_micros
            if event.type == budget_pb2.EVENT_TYPE_COMMITTED:
                recorder.spend.append(
                    SpendPoint(recorder.clock(), event.actual_micros, state.committed_micros)
                )
            elif event.type == budget_pb2.EVENT_TYPE_THRESHOLD_CROSSED:
                recorder.add(
                    TimelineEvent(
                        recorder.clock(),
                        "threshold",
                        state.committed_micros,
                        level=_name(budget_pb2.ThresholdLevel, event.threshold, "THRESHOLD_LEVEL_"),
                    )
                )
            elif event.type == budget_pb2.EVENT_TYPE_CLOSED:
                return


async def _client_loop(
    client: AsyncRuncapClient, options: Options, run_id: str, recorder: Recorder
) -> None:
    """The agent through the Python client: reserve, call the mock, commit."""
    agent = options.agent
    step = 0
    while True:
        call = LlmCall(
            agent.provider,
            agent.model,
            input_tokens=agent.input_tokens(step),
            max_output_tokens=agent.max_output_tokens,
        )
        try:
            async with client.reserve(run_id, llm_call=call) as hold:
                hold.set_usage(mock_llm(agent, step))
        except BudgetThrottledError as throttled:
            await _throttle(recorder, throttled.retry_after, throttled.state.committed_micros)
            continue
        except BudgetBlockedError as blocked:
            estimate = blocked.estimate
            recorder.blocked += 1
            recorder.add(
                TimelineEvent(
                    recorder.clock(),
                    "block",
                    blocked.state.committed_micros,
                    reason=_name(budget_pb2.DecisionReason, blocked.reason, "DECISION_REASON_"),
                    decision_id=blocked.decision_id,
                    estimate_micros=0 if estimate is None else estimate.amount_micros,
                    remaining_micros=blocked.state.remaining_micros,
                )
            )
            return
        recorder.allowed += 1
        if not recorder.price_table_version and hold.estimate is not None:
            recorder.price_table_version = hold.estimate.price_table_version
        step += 1
        await asyncio.sleep(options.interval_s)


async def _throttle(recorder: Recorder, retry_after_s: float, committed_micros: int) -> None:
    recorder.throttled += 1
    recorder.throttle_wait_s += retry_after_s
    recorder.add(
        TimelineEvent(recorder.clock(), "throttle", committed_micros, retry_after_s=retry_after_s)
    )
    await asyncio.sleep(retry_after_s)


# --------------------------------------------------------------------------
# Through a LiteLLM proxy


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def proxy_messages(agent: Agent, step: int) -> list[dict[str, str]]:
    """An OpenAI-style conversation of about `agent.input_tokens(step)`
    tokens: a system prompt, then one tool result per earlier step (the
    oldest dropped once the context is full). Each " data" is one token in
    OpenAI's tokenizers."""
    messages = [
        {
            "role": "system",
            "content": "You are a coding agent." + _filler(agent.initial_input_tokens),
        }
    ]
    if agent.growth_tokens > 0:
        turns = (agent.input_tokens(step) - agent.initial_input_tokens) // agent.growth_tokens
        for turn in range(max(0, turns)):
            messages.append(
                {"role": "user", "content": f"tool result {turn}:" + _filler(agent.growth_tokens)}
            )
    return messages


def _filler(tokens: int) -> str:
    return " data" * max(0, tokens - 8)


def _post(url: str, key: str, run_id: str, payload: dict[str, Any]) -> ProxyAnswer:
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "x-runcap-run-id": run_id},
    )
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=PROXY_TIMEOUT_S) as response:
            return ProxyAnswer(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return ProxyAnswer(error.code, dict(error.headers.items()), error.read())
    except urllib.error.URLError as error:
        raise DemoError(f"cannot reach the proxy at {url}: {error.reason}") from None


def _header(answer: ProxyAnswer, name: str) -> str:
    wanted = name.lower()
    return next((v for k, v in answer.headers.items() if k.lower() == wanted), "")


def _problem(answer: ProxyAnswer) -> dict[str, Any]:
    try:
        document = json.loads(answer.body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


async def _proxy_loop(options: Options, run_id: str, recorder: Recorder) -> None:
    """The agent through a LiteLLM proxy with runcap's callback: 2xx is an
    allowed call, 429 a throttle (wait Retry-After), 402 the stop."""
    agent = options.agent
    step = 0
    while True:
        payload = {
            "model": agent.model,
            "messages": proxy_messages(agent, step),
            "max_tokens": agent.max_output_tokens,
        }
        answer = await asyncio.to_thread(_post, options.proxy, options.proxy_key, run_id, payload)
        if 200 <= answer.status < 300:
            recorder.allowed += 1
            step += 1
            await asyncio.sleep(options.interval_s)
        elif answer.status == 429:
            try:
                retry_after = max(0.0, float(_header(answer, "Retry-After") or 1))
            except ValueError:
                retry_after = 1.0
            await _throttle(recorder, retry_after, recorder.committed_micros)
        elif answer.status == 402:
            problem = _problem(answer)
            budget = problem.get("budget")
            budget = budget if isinstance(budget, dict) else {}
            recorder.blocked += 1
            recorder.add(
                TimelineEvent(
                    recorder.clock(),
                    "block",
                    int(budget.get("committed_micros", recorder.committed_micros)),
                    reason=str(problem.get("code") or _header(answer, "X-Budget-Decision")).upper()
                    or "HTTP 402",
                    decision_id=str(problem.get("decision_id", "")),
                    estimate_micros=int(budget.get("estimate_micros", 0)),
                    remaining_micros=int(budget.get("remaining_micros", 0)),
                )
            )
            return
        else:
            text = answer.body[:300].decode("utf-8", "replace")
            raise DemoError(f"the proxy answered HTTP {answer.status}: {text}")


# --------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `runcap demo runaway`."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--target",
        default=os.environ.get("RUNCAP_TARGET") or None,
        metavar="HOST:PORT",
        help="the runcap server (env RUNCAP_TARGET; default: an embedded server)",
    )
    where.add_argument(
        "--embedded",
        action="store_true",
        help="start a server in this process (free loopback port, temporary SQLite "
        "ledger) even when RUNCAP_TARGET is set",
    )
    parser.add_argument(
        "--limit",
        default=DEFAULT_LIMIT,
        metavar="USD",
        help=f"the run's ceiling, USD such as 5 or $0.50 (default {DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--interval",
        default=str(DEFAULT_INTERVAL_S),
        metavar="SECONDS",
        help=f"the pause between calls, seconds or a duration such as 100ms "
        f"(default {DEFAULT_INTERVAL_S})",
    )
    parser.add_argument(
        "--provider",
        default=DEFAULT_PROVIDER,
        help=f"as in the price table (default {DEFAULT_PROVIDER})",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"as in the price table, and the model asked of --proxy (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--input-tokens",
        type=int,
        default=DEFAULT_AGENT.initial_input_tokens,
        metavar="N",
        help="the first call's prompt (default %(default)s)",
    )
    parser.add_argument(
        "--growth",
        type=int,
        default=DEFAULT_AGENT.growth_tokens,
        metavar="N",
        help="tokens the prompt grows by per call (default %(default)s)",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=DEFAULT_AGENT.output_tokens,
        metavar="N",
        help="tokens each reply has (default %(default)s)",
    )
    parser.add_argument(
        "--max-output-tokens",
        type=int,
        default=DEFAULT_AGENT.max_output_tokens,
        metavar="N",
        help="each call's max_tokens, held by its reserve (default %(default)s)",
    )
    parser.add_argument(
        "--context-window",
        type=int,
        metavar="N",
        help="where the prompt stops growing (default: the model's, from the price table)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument(
        "--plot", metavar="PNG", help="draw spend over time to this file (matplotlib)"
    )
    parser.add_argument(
        "--proxy",
        metavar="URL",
        help="send the calls to this LiteLLM proxy (with runcap's callback)",
    )
    parser.add_argument("--proxy-key", default="", metavar="KEY", help="the proxy's API key")


def options_from(args: argparse.Namespace) -> Options:
    """The demo's options; DemoError for a bad argument."""
    try:
        limit = parse_usd(args.limit)
    except ValueError as error:
        raise DemoError(f"invalid --limit: {error}") from None
    if limit <= 0:
        raise DemoError("invalid --limit: must be more than $0")
    interval = parse_interval(args.interval)
    for name in ("input_tokens", "growth", "output_tokens", "max_output_tokens"):
        if getattr(args, name) < 0:
            raise DemoError(f"invalid --{name.replace('_', '-')}: must not be negative")
    if args.max_output_tokens < 1:
        raise DemoError("invalid --max-output-tokens: must be at least 1")
    window = args.context_window or context_window_of(args.provider, args.model)
    agent = Agent(
        provider=args.provider,
        model=args.model,
        initial_input_tokens=args.input_tokens,
        growth_tokens=args.growth,
        output_tokens=args.output_tokens,
        max_output_tokens=args.max_output_tokens,
        context_window=window,
    )
    if agent.max_input_tokens < agent.initial_input_tokens:
        raise DemoError("invalid --context-window: the first prompt and its output do not fit")
    target = None if args.embedded else args.target
    if args.proxy and not target:
        raise DemoError(
            "--proxy needs --target (or RUNCAP_TARGET): the runcap server the proxy's "
            "callback uses, where the demo creates and watches the run"
        )
    return Options(agent, interval, limit, target, args.proxy or "", args.proxy_key)


def parse_interval(text: str) -> float:
    """Seconds (``0.1``) or a duration with a unit (``100ms``); positive."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration_ms(text) / 1000
        except ValueError as error:
            raise DemoError(f"invalid --interval: {error}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise DemoError(f"invalid --interval {text!r}: must be a positive number of seconds")
    return seconds


def main(args: argparse.Namespace) -> int:
    """`runcap demo runaway`."""
    try:
        options = options_from(args)
        summary = asyncio.run(run_demo(options))
        if args.plot:
            plot_spend(summary, args.plot)
    except DemoError as error:
        _error(str(error))
        return EXIT_ERROR
    except UnavailableError as error:
        _error(f"cannot reach the runcap server at {args.target}: {error.message}")
        return EXIT_ERROR
    except RuncapError as error:
        _error(f"{error.message} [{error.reason or error.code.name}]")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    if args.json:
        print(json.dumps(summary_json(summary), indent=2))
    else:
        print(render_text(summary))
        if args.plot:
            print(f"plot           {args.plot}")
    return EXIT_OK


def _error(message: str) -> None:
    print(f"runcap: {message}", file=sys.stderr)
