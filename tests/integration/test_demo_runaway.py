"""`runcap demo runaway` (seed 001): a runaway agent loop against a real server.

The demo runs once (as a real `runcap` process, at one call every 10 ms, with
the default $5.00 ceiling and policy) and every claim of its summary is
checked against the run itself: GetRun, GetDecision and the run's Watch
history. The pure parts (extrapolation, rendering, arguments) are unit-tested
in-process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from runcap import RuncapClient
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server import demo
from runcap_server.money import parse_usd
from runcap_server.prices import PriceTable

RUNCAP = [sys.executable, "-m", "runcap_server"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
INTERVAL_S = 0.01
LIMIT_MICROS = 5_000_000


def runcap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUNCAP, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else dict(os.environ),
        check=False,
    )


@pytest.fixture(scope="module")
def plot_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "runaway.png"


@pytest.fixture(scope="module")
def summary(server_target: str, plot_path: Path) -> dict[str, Any]:
    """The JSON summary of one demo run against the session server."""
    args = ["demo", "runaway", "--target", server_target, "--interval", str(INTERVAL_S), "--json"]
    if HAS_MATPLOTLIB:
        args += ["--plot", str(plot_path)]
    result = runcap(*args)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


@pytest.fixture(scope="module")
def run(server_target: str, summary: dict[str, Any]) -> pb.GetRunResponse:
    """The demo's run, read independently."""
    with RuncapClient(server_target) as client:
        return client.get_run(summary["run_id"])


def test_spend_never_passes_the_ceiling(summary: dict[str, Any], run: pb.GetRunResponse) -> None:
    state = run.state
    assert summary["setup"]["limit_micros"] == LIMIT_MICROS == state.limit_micros
    assert 0 < state.committed_micros <= state.limit_micros
    assert state.overrun_micros == 0
    assert state.reserved_micros == 0
    assert state.status == budget_pb2.RUN_STATUS_CLOSED
    # The printed numbers are the run's own.
    spent = summary["spent"]
    assert spent == {
        "limit_micros": state.limit_micros,
        "committed_micros": state.committed_micros,
        "reserved_micros": state.reserved_micros,
        "remaining_micros": state.remaining_micros,
        "overrun_micros": state.overrun_micros,
        "committed_tokens": state.committed_tokens,
        "threshold": budget_pb2.ThresholdLevel.Name(state.threshold).removeprefix(
            "THRESHOLD_LEVEL_"
        ),
        "status": "CLOSED",
        "revision": state.revision,
    }
    # Committed spend in the throttle band: the loop got close before it stopped.
    assert state.committed_micros >= LIMIT_MICROS * 95 // 100
    assert run.run.policy.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_HARD_GATE
    assert summary["setup"]["enforcement_mode"] == "HARD_GATE"
    assert summary["setup"]["thresholds_percent"] == {"info": 60, "warn": 80, "throttle": 95}


def test_the_hard_gate_stopped_the_loop(
    server_target: str, summary: dict[str, Any], run: pb.GetRunResponse
) -> None:
    assert summary["stopped"] is True
    assert summary["calls"]["blocked"] == 1
    stop = summary["stop"]
    assert stop == summary["timeline"][-1]
    assert stop["event"] == "block"
    assert stop["reason"] == "INSUFFICIENT_BUDGET"
    assert summary["wall_s"] == stop["elapsed_s"] > 0
    # Nothing was spent after the stop.
    assert stop["committed_micros"] == run.state.committed_micros
    with RuncapClient(server_target) as client:
        decision = client.get_decision(stop["decision_id"])
    assert decision.decision == budget_pb2.DECISION_BLOCK
    assert decision.reason == budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET
    assert decision.held_micros == 0
    # The call that was stopped did not fit what was left.
    assert decision.amount_micros == stop["estimate_micros"]
    assert stop["remaining_micros"] == LIMIT_MICROS - run.state.committed_micros
    assert run.state.committed_micros + decision.amount_micros > LIMIT_MICROS
    # It is the call after the last allowed one, on the same model.
    agent = demo.Agent(context_window=summary["setup"]["context_window"])
    assert decision.estimate.model == agent.model == summary["setup"]["model"]
    assert decision.estimate.input_tokens == agent.input_tokens(summary["calls"]["allowed"])


def test_thresholds_in_order_then_throttles_then_the_stop(summary: dict[str, Any]) -> None:
    timeline = summary["timeline"]
    times = [event["elapsed_s"] for event in timeline]
    assert times == sorted(times)
    crossings = [event for event in timeline if event["event"] == "threshold"]
    assert [event["level"] for event in crossings] == ["INFO", "WARN", "THROTTLE"]
    for event, percent in zip(crossings, (60, 80, 95), strict=True):
        assert event["committed_micros"] >= LIMIT_MICROS * percent // 100
    throttles = [event for event in timeline if event["event"] == "throttle"]
    assert len(throttles) == summary["calls"]["throttled"] >= 1
    kinds = [event["event"] for event in timeline]
    # Every throttle comes after the THROTTLE crossing and before the stop.
    assert kinds.index("throttle") > timeline.index(crossings[-1])
    assert kinds[-1] == "block"
    for event in throttles:
        assert event["committed_micros"] >= LIMIT_MICROS * 95 // 100
    # The delays double: the n-th wait is at most 1 s * 2**n, and the agent
    # waited each one out.
    delays = [event["retry_after_s"] for event in throttles]
    for n, delay in enumerate(delays):
        assert 0 < delay <= 2**n
    if len(delays) > 1:
        assert delays[1] > 1.0
    assert summary["throttle_wait_s"] == pytest.approx(sum(delays), abs=1e-3)
    assert summary["wall_s"] >= sum(delays)


def test_counts_and_costs_match_the_runs_history(
    server_target: str, summary: dict[str, Any], run: pb.GetRunResponse
) -> None:
    committed: list[int] = []
    reserved = 0
    levels: list[str] = []
    with RuncapClient(server_target) as client:
        stream = client.watch(summary["run_id"], after_revision=0)
        try:
            for message in stream:
                event = message.event
                if event.type == budget_pb2.EVENT_TYPE_COMMITTED:
                    committed.append(event.actual_micros)
                elif event.type == budget_pb2.EVENT_TYPE_RESERVED:
                    reserved += 1
                elif event.type == budget_pb2.EVENT_TYPE_THRESHOLD_CROSSED:
                    levels.append(budget_pb2.ThresholdLevel.Name(event.threshold))
                elif event.type == budget_pb2.EVENT_TYPE_CLOSED:
                    break
        finally:
            stream.close()
    allowed = summary["calls"]["allowed"]
    assert allowed == len(committed) == reserved > 0
    assert summary["call_costs_micros"] == committed
    assert sum(committed) == run.state.committed_micros
    crossings = [e["level"] for e in summary["timeline"] if e["event"] == "threshold"]
    assert levels == ["THRESHOLD_LEVEL_" + level for level in crossings]
    spend = summary["spend"]
    assert [point["committed_micros"] for point in spend] == [
        sum(committed[: k + 1]) for k in range(len(committed))
    ]
    # The agent's own calls, priced by the server from its price table.
    table = PriceTable.packaged()
    price = table.lookup(summary["setup"]["provider"], summary["setup"]["model"])
    assert price is not None
    assert summary["setup"]["price_table_version"] == table.version
    agent = demo.Agent(context_window=summary["setup"]["context_window"])
    for k, cost in enumerate(committed):
        tokens = (
            agent.input_tokens(k) * price.rates.input + agent.output_tokens * price.rates.output
        )
        assert cost == -(-tokens // 1_000_000)


def test_hour_without_governor_is_priced_at_the_runs_rates(summary: dict[str, Any]) -> None:
    hour = summary["hour_without_governor"]
    assert hour is not None
    assert hour["seconds"] == 3600
    assert hour["calls"] == round(3600 / INTERVAL_S)
    assert hour["fit_exact"] is True
    price = PriceTable.packaged().lookup(summary["setup"]["provider"], summary["setup"]["model"])
    assert price is not None
    agent = demo.Agent(context_window=summary["setup"]["context_window"])
    assert agent.context_window == price.context_window
    assert hour["micros_per_input_token"] == price.rates.input / 1_000_000
    assert hour["fixed_micros_per_call"] == agent.output_tokens * price.rates.output / 1_000_000
    # Brute force, straight from the price table: every call of the hour.
    micros = input_tokens = 0
    for step in range(hour["calls"]):
        tokens = agent.input_tokens(step)
        input_tokens += tokens
        micros += -(
            -(tokens * price.rates.input + agent.output_tokens * price.rates.output) // 10**6
        )
    assert hour["micros"] == micros
    assert hour["input_tokens"] == input_tokens
    assert hour["output_tokens"] == hour["calls"] * agent.output_tokens
    assert hour["micros"] > 1000 * summary["spent"]["committed_micros"]


@pytest.mark.skipif(
    not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'runcap[demo]')"
)
def test_plot_writes_a_png(summary: dict[str, Any], plot_path: Path) -> None:
    data = plot_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_embedded_server_when_no_target_is_given() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNCAP_TARGET"}
    result = runcap("demo", "runaway", "--interval", "10ms", "--limit", "$0.20", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"run        runaway-\w+ on 127\.0\.0\.1:\d+ \(embedded server", out), out
    assert "THRESHOLD_CROSSED INFO (60% of the limit)" in out
    assert "BLOCK (INSUFFICIENT_BUDGET): the agent stops" in out
    spent = re.search(r"^spent +(\$[\d.]+) of (\$[\d.]+) ", out, re.MULTILINE)
    assert spent is not None, out
    assert parse_usd(spent[2]) == 200_000
    assert 0 < parse_usd(spent[1]) <= 200_000
    calls = re.search(r"^calls +(\d+) allowed, (\d+) throttled, 1 blocked$", out, re.MULTILINE)
    assert calls is not None, out
    assert "no governor    one hour of the same loop: 360,000 calls" in out


# --------------------------------------------------------------------------
# The pure parts


def test_extrapolation_prices_each_call_and_stops_growing_at_the_window() -> None:
    agent = demo.Agent(
        initial_input_tokens=1_000,
        growth_tokens=500,
        output_tokens=100,
        max_output_tokens=200,
        context_window=3_200,
    )
    assert [agent.input_tokens(k) for k in range(7)] == [1000, 1500, 2000, 2500, 3000, 3000, 3000]
    assert agent.first_full_step() == 4
    # 50 micros for the output, a quarter micro per input token.
    costs = [300, 425, 550]
    fitted = demo.fit_pricing(agent, costs)
    assert fitted is not None
    pricing, exact = fitted
    assert (pricing.fixed_micros, pricing.per_input_token_micros) == (Fraction(50), Fraction(1, 4))
    assert exact
    calls, input_tokens, output_tokens, micros = demo.extrapolate(agent, pricing, 1.0, 10.0)
    assert calls == 10
    assert input_tokens == 1000 + 1500 + 2000 + 2500 + 6 * 3000
    assert output_tokens == 1000
    assert micros == 300 + 425 + 550 + 675 + 6 * 800
    # Fewer calls than it takes to fill the window.
    assert demo.extrapolate(agent, pricing, 2.0, 5.0) == (2, 2500, 200, 725)
    # 3600 s / 0.1 s is 36,000 calls, whatever binary floats say.
    assert demo.extrapolate(agent, pricing, 0.1)[0] == 36_000
    # Rounding up, as the server does.
    odd = demo.StepPricing(Fraction(1, 3), Fraction(1, 3))
    assert odd.cost_micros(1) == 1
    assert odd.cost_micros(3) == 2


def test_fit_needs_two_prompt_sizes_and_says_when_it_is_not_exact() -> None:
    agent = demo.Agent(initial_input_tokens=1_000, growth_tokens=500, context_window=100_000)
    assert demo.fit_pricing(agent, []) is None
    assert demo.fit_pricing(agent, [300]) is None
    flat = demo.Agent(initial_input_tokens=1_000, growth_tokens=0)
    assert demo.fit_pricing(flat, [300, 300]) is None
    assert demo.hour_without_governor(flat, [300, 300], 0.1) is None
    # A price tier kicks in at the third call: the line through the first and
    # the last call misses the middle one.
    fitted = demo.fit_pricing(agent, [300, 425, 1000])
    assert fitted is not None
    assert fitted[1] is False


def _summary(*, hour: bool = True) -> demo.Summary:
    agent = demo.Agent(context_window=128_000)
    setup = demo.Setup(
        agent=agent,
        interval_s=0.1,
        limit_micros=1_000_000,
        target="127.0.0.1:1",
        embedded=True,
        proxy="",
        run_id="runaway-test",
        enforcement_mode="HARD_GATE",
        thresholds_percent=(60, 80, 95),
        throttle_base_delay_s=1.0,
        throttle_max_delay_s=60.0,
    )
    costs = [1440, 2040, 2640]
    spend = tuple(
        demo.SpendPoint(0.1 * (k + 1), cost, sum(costs[: k + 1])) for k, cost in enumerate(costs)
    )
    timeline = (
        demo.TimelineEvent(0.2, "threshold", 600_000, level="INFO"),
        demo.TimelineEvent(0.25, "throttle", 960_000, retry_after_s=0.75),
        demo.TimelineEvent(1.5, "block", 990_000, reason="INSUFFICIENT_BUDGET", decision_id="d"),
    )
    state = budget_pb2.BudgetState(
        limit_micros=1_000_000,
        committed_micros=990_000,
        remaining_micros=10_000,
        committed_tokens=123_456,
        status=budget_pb2.RUN_STATUS_CLOSED,
    )
    return demo.Summary(
        setup=setup,
        timeline=timeline,
        spend=spend,
        allowed=3,
        throttled=1,
        blocked=1,
        throttle_wait_s=0.75,
        price_table_version="v1",
        final=pb.GetRunResponse(state=state),
        hour=demo.hour_without_governor(agent, costs, 0.1) if hour else None,
    )


def test_render_text_reports_the_runs_own_numbers() -> None:
    text = demo.render_text(_summary())
    assert "  policy     hard_gate: info 60%, warn 80%, throttle 95%" in text
    assert re.search(r"0\.20s +\$0\.60  THRESHOLD_CROSSED INFO \(60% of the limit\)", text)
    assert re.search(r"0\.25s +\$0\.96  THROTTLE: wait 0\.75 s, then go on", text)
    assert re.search(r"1\.50s +\$0\.99  BLOCK \(INSUFFICIENT_BUDGET\): the agent stops", text)
    assert "hit the wall   after 1.50 s and 3 calls (0.75 s of it waiting out throttles)" in text
    assert (
        "spent          $0.99 of $1.00 (99.0%), $0.00 held, overrun $0.00, 123,456 tokens" in text
    )
    assert "calls          3 allowed, 1 throttled, 1 blocked" in text
    assert "no governor    one hour of the same loop: 36,000 calls," in text
    assert "640 micro-USD + 0.4 per input token" in text
    assert "cannot extrapolate" in demo.render_text(_summary(hour=False))
    document = demo.summary_json(_summary())
    assert document["calls"] == {"allowed": 3, "throttled": 1, "blocked": 1}
    assert document["wall_s"] == 1.5
    assert document["spent"]["committed_micros"] == 990_000
    assert math.isclose(document["hour_without_governor"]["micros_per_input_token"], 0.4)


def test_plot_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(demo.DemoError, match=r"pip install 'runcap\[demo\]'"):
        demo.plot_spend(_summary(), str(tmp_path / "out.png"))
    assert not (tmp_path / "out.png").exists()


def _parse(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(args))


def test_arguments() -> None:
    options = demo.options_from(_parse("--embedded", "--limit", "$0.50", "--interval", "250ms"))
    assert (options.target, options.limit_micros, options.interval_s) == (None, 500_000, 0.25)
    assert options.agent.context_window == 1_047_576  # gpt-4.1-mini's, from the price table
    options = demo.options_from(_parse("--target", "host:1", "--interval", "0.5"))
    assert (options.target, options.interval_s) == ("host:1", 0.5)
    for bad, message in (
        (["--interval", "0"], "invalid --interval"),
        (["--interval", "soon"], "invalid --interval"),
        (["--limit", "-1"], "invalid --limit"),
        (["--limit", "0"], "invalid --limit"),
        (["--growth", "-5"], "invalid --growth"),
        (["--context-window", "500"], "invalid --context-window"),
        (["--embedded", "--proxy", "http://127.0.0.1:4000"], "--proxy needs --target"),
    ):
        with pytest.raises(demo.DemoError, match=message):
            demo.options_from(_parse(*bad))
