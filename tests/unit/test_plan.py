"""The quota plan gate's checks, offline: the schema, every semantic rule with
the path (and line) it reports, and the cost arithmetic against figures worked
out by hand (docs/quota-plan.md)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from runcap_server.cli_plan import BuiltinPrices
from runcap_server.plan import human
from runcap_server.plan.check import Report, check_document, check_file
from runcap_server.plan.costs import compute
from runcap_server.plan.document import MAX_BYTES, PlanFileError, parse, schema
from runcap_server.plan.model import build
from runcap_server.plan.render import summary
from runcap_server.prices import ModelPrice, PriceTable, Rates, Tier

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "plan.yaml"

# Made-up models, so that the hand-worked figures do not move with the
# shipped price table. Rates are micro-USD per 1,000,000 tokens.
PRICES = PriceTable(
    "test-prices-1",
    [
        ModelPrice(
            provider="acme",
            model="big",
            rates=Rates(2_500_000, 10_000_000, 0, 0, 10_000_000),
            context_window=128_000,
            max_output_tokens=16_000,
            tools=True,
            json_schema=True,
            modalities=frozenset({"text"}),
        ),
        ModelPrice(
            provider="acme",
            model="tiered",
            rates=Rates(1_000_000, 2_000_000, 0, 0, 2_000_000),
            context_window=1_000_000,
            max_output_tokens=None,
            tools=True,
            json_schema=True,
            modalities=frozenset({"text"}),
            tiers=(Tier(100_000, Rates(2_000_000, 4_000_000, 0, 0, 4_000_000)),),
        ),
    ],
)


def base_plan() -> dict[str, Any]:
    """A valid plan whose figures are worked out in test_figures_match_the_hand_computation."""
    return {
        "plan": 1,
        "agent": "enricher",
        "owner": {
            "team": "data-platform",
            "on_call": {"name": "Priya Raman", "email": "priya.raman@example.com"},
        },
        "scope": {"api_key": "enrich-agent"},
        "volume": {"runs_per_day": 120, "confidence": "medium", "peak_runs_per_day": 150},
        "per_run": {
            "duration_minutes": 4,
            "llm": [
                {"model": "acme/big", "input_tokens": 12_345, "output_tokens": 678, "calls": 3}
            ],
        },
        "external_apis": [
            {"name": "firmo", "usd_per_call": "0.015", "calls_per_run": 40, "calls_per_minute": 30}
        ],
        "ceilings": {"buffer": "2.5"},
        "alerts": {"page": [{"pagerduty": {"routing_key_env": "PD_KEY"}}]},
    }


def run_check(data: dict[str, Any] | str) -> Report:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    return check_document(parse(text.encode()), PRICES, "plan.yaml")


def changed(edit: Callable[[dict[str, Any]], object]) -> Report:
    data = copy.deepcopy(base_plan())
    edit(data)
    return run_check(data)


def errors_at(report: Report) -> dict[str, str]:
    return {problem.path: problem.message for problem in report.errors}


def only_error(report: Report, path: str, *needles: str) -> str:
    """The report has exactly one error, at `path`, saying each needle."""
    assert not report.valid
    assert [p.path for p in report.errors] == [path], report.errors
    message = report.errors[0].message
    for needle in needles:
        assert needle in message, message
    return message


# --------------------------------------------------------------------------
# The schema and the example


def test_the_schema_is_a_valid_draft_2020_12_schema_and_the_docs_copy_is_the_shipped_one() -> None:
    shipped = schema()
    jsonschema.Draft202012Validator.check_schema(shipped)
    assert shipped["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    docs = json.loads((ROOT / "docs" / "quota-plan.schema.json").read_text())
    assert docs == shipped, "docs/quota-plan.schema.json differs from the packaged schema"


def test_the_example_plan_is_valid_against_the_schema_and_the_rules() -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    jsonschema.Draft202012Validator(schema()).validate(document)
    report = check_file(EXAMPLE, PriceTable.packaged())
    assert report.valid, report.problems
    assert report.problems == []
    assert report.plan is not None
    assert report.costs is not None
    # Its stated worst case is the computed one (checked to the cent).
    assert report.plan.stated_worst_daily_micros == report.costs.worst_daily


def test_the_docs_show_what_check_prints_for_the_example() -> None:
    page = summary(check_file(EXAMPLE, BuiltinPrices()))
    assert page.endswith("\nquota plan customer-enrichment: valid\n")
    docs = (ROOT / "docs" / "quota-plan.md").read_text()
    # The price table's version moves with the table; the rest must match.
    shown = [line for line in page.splitlines() if not line.startswith("prices ")]
    assert "\n".join(shown) in "\n".join(
        line for line in docs.splitlines() if not line.startswith("prices ")
    )


def test_the_base_plan_is_valid() -> None:
    report = run_check(base_plan())
    assert report.valid, report.problems
    assert report.problems == []


# --------------------------------------------------------------------------
# The figures


def test_figures_match_the_hand_computation() -> None:
    report = run_check(base_plan())
    costs = report.costs
    assert costs is not None
    # One call: 12,345 in x $2.50/M + 678 out x $10/M = 30,862.5 + 6,780 = 37,642.5 -> 37,643.
    assert costs.llm[0].call_micros == 37_643
    assert costs.llm[0].run_micros == 3 * 37_643 == 112_929
    assert costs.apis[0].run_micros == 40 * 15_000 == 600_000
    assert costs.itemized_per_run == costs.per_run == 712_929
    # 712,929 x 2.5 = 1,782,322.5 -> rounded up.
    assert costs.per_run_ceiling == 1_782_323
    assert costs.tokens_per_run == 3 * (12_345 + 678) == 39_069
    assert costs.max_tokens == 97_673  # 39,069 x 2.5 = 97,672.5
    assert costs.meter_limits == {"tool:firmo": 100}  # 40 x 2.5
    assert costs.calls_per_minute == 3 + 30  # LLM calls (default: all at once) + the API's rate
    assert costs.expected_daily == 120 * 712_929 == 85_551_480
    assert costs.expected_monthly == 30 * 85_551_480 == 2_566_544_400
    assert costs.daily_ceiling == 150 * 1_782_323 == 267_348_450  # the peak day at ceiling
    assert costs.monthly_ceiling is None
    assert costs.worst_runs_per_day == 1_200
    assert costs.worst_daily == 1_200 * 1_782_323 == 2_138_787_600
    assert costs.worst_monthly == 30 * 2_138_787_600 == 64_163_628_000
    assert costs.held_daily == 267_348_450
    assert costs.held_monthly == 30 * 267_348_450 == 8_020_453_500


def test_a_long_prompt_is_priced_at_its_tier() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["per_run"]["llm"] = [
            {"model": "acme/tiered", "input_tokens": 150_000, "output_tokens": 1_000},
            {"model": "acme/tiered", "input_tokens": 100_000, "output_tokens": 1_000},
        ]

    costs = changed(edit).costs
    assert costs is not None
    # Above 100,000 input tokens every token is at the tier's rates.
    assert costs.llm[0].call_micros == 150_000 * 2 + 1_000 * 4 == 304_000
    assert costs.llm[1].call_micros == 100_000 * 1 + 1_000 * 2 == 102_000


def test_stated_dollars_per_run_replace_the_itemized_cost_and_ceilings_may_be_given() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["per_run"]["usd"] = "1.00"
        data["ceilings"] = {"per_run_usd": "1.50", "daily_usd": 300, "monthly_usd": "$5000"}

    report = changed(edit)
    assert report.valid, report.problems
    costs = report.costs
    assert costs is not None
    assert costs.itemized_per_run == 712_929
    assert (costs.per_run, costs.per_run_ceiling) == (1_000_000, 1_500_000)
    assert (costs.daily_ceiling, costs.monthly_ceiling) == (300_000_000, 5_000_000_000)
    assert costs.worst_daily == 1_200 * 1_500_000
    assert costs.held_daily == 300_000_000
    assert costs.held_monthly == 5_000_000_000  # the monthly ceiling binds before 30 days


def test_amounts_are_exact_decimals_never_floats() -> None:
    text = yaml.safe_dump(base_plan(), sort_keys=False).replace("'0.015'", "0.1")
    report = run_check(text)
    assert report.plan is not None
    assert report.plan.external_apis[0].usd_per_call_micros == 100_000
    assert report.costs is not None
    assert report.costs.apis[0].run_micros == 4_000_000  # 40 x 0.1, exactly


# --------------------------------------------------------------------------
# The named human


@pytest.mark.parametrize(
    "name",
    [
        "team-x",
        "Data Platform On-call",
        "SRE rotation",
        "oncall",
        "Payments Team",
        "@priya.raman",
        "priya",
        "Priya R4man",
        "Data Platform Folks",
    ],
)
def test_an_alias_or_handle_is_not_a_named_human(name: str) -> None:
    report = changed(lambda d: d["owner"]["on_call"].update(name=name))
    message = only_error(report, "owner.on_call.name")
    assert "Priya Raman" in message  # the rule explains itself with an example


@pytest.mark.parametrize("name", ["Priya Raman", "Mary-Jane O'Neil", "J. R. Smith", "José Álvarez"])
def test_a_full_name_is_a_named_human(name: str) -> None:
    assert human.name_problem(name, "data-platform") is None


def test_the_named_human_rule_reports_its_line() -> None:
    text = yaml.safe_dump(base_plan(), sort_keys=False).replace("Priya Raman", "The Oncall Team")
    report = run_check(text)
    only_error(report, "owner.on_call.name", "not a named human", "seed 002")
    line = text.splitlines().index("    name: The Oncall Team") + 1
    assert report.errors[0].line == line
    assert report.errors[0].where("plan.yaml") == f"plan.yaml:{line} owner.on_call.name"


@pytest.mark.parametrize(
    "email",
    [
        "oncall@example.com",
        "data-platform@example.com",
        "sre-alerts@example.io",
        "no-reply@example.com",
        "not-an-email",
    ],
)
def test_a_group_mailbox_is_not_a_person(email: str) -> None:
    only_error(changed(lambda d: d["owner"]["on_call"].update(email=email)), "owner.on_call.email")


@pytest.mark.parametrize(
    "handle", ["@channel", "@here", "#incidents", "@data-platform-oncall", "@sre"]
)
def test_a_channel_or_group_handle_is_not_a_person(handle: str) -> None:
    only_error(changed(lambda d: d["owner"]["on_call"].update(slack=handle)), "owner.on_call.slack")


@pytest.mark.parametrize("handle", ["@priya.raman", "U024BE7LH"])
def test_a_person_s_slack_handle_passes(handle: str) -> None:
    assert changed(lambda d: d["owner"]["on_call"].update(slack=handle)).valid


def test_the_on_call_needs_a_way_to_reach_them() -> None:
    only_error(
        changed(lambda d: d["owner"]["on_call"].pop("email")),
        "owner.on_call",
        "at least one way to reach them",
    )


def test_a_plan_without_an_on_call_human_is_invalid() -> None:
    only_error(changed(lambda d: d["owner"].pop("on_call")), "owner.on_call", "is required")


# --------------------------------------------------------------------------
# Prices, rates and ceilings


def test_an_unknown_model_fails_closed() -> None:
    report = changed(lambda d: d["per_run"]["llm"][0].update(model="acme/imaginary"))
    only_error(report, "per_run.llm[0].model", "no price in test-prices-1", "fail closed")
    assert report.costs is None


def test_a_call_cannot_write_more_than_its_model_or_overflow_its_window() -> None:
    report = changed(lambda d: d["per_run"]["llm"][0].update(output_tokens=16_001))
    only_error(report, "per_run.llm[0].output_tokens", "(16000)")
    report = changed(
        lambda d: d["per_run"]["llm"][0].update(input_tokens=120_000, output_tokens=9_000)
    )
    only_error(report, "per_run.llm[0].input_tokens", "context window (128000 tokens)")


def test_an_api_rate_too_low_for_a_normal_run_is_inconsistent() -> None:
    # 40 calls in a 4-minute run need 10 a minute.
    report = changed(lambda d: d["external_apis"][0].update(calls_per_minute=9))
    only_error(report, "external_apis[0].calls_per_minute", "need at least 10 a minute")
    assert changed(lambda d: d["external_apis"][0].update(calls_per_minute=10)).valid


def test_a_run_rate_limit_too_low_for_a_normal_run_is_inconsistent() -> None:
    # 3 LLM calls + 40 API calls in 4 minutes need 11 a minute.
    report = changed(lambda d: d["per_run"].update(max_calls_per_minute=10))
    only_error(report, "per_run.max_calls_per_minute", "need at least 11 a minute")
    report = changed(lambda d: d["per_run"].update(max_calls_per_minute=11))
    assert report.valid
    assert report.costs is not None
    assert report.costs.calls_per_minute == 11


def test_a_vendor_quota_below_the_peak_day_is_an_error_and_below_10x_a_warning() -> None:
    # The peak day: 150 runs x 40 calls = 6,000; 10x volume: 1,200 x 40 = 48,000.
    report = changed(lambda d: d["external_apis"][0].update(daily_quota=5_999))
    only_error(report, "external_apis[0].daily_quota", "need 6000")
    report = changed(lambda d: d["external_apis"][0].update(daily_quota=6_000))
    assert report.valid
    assert [(w.path, "48000" in w.message) for w in report.warnings] == [
        ("external_apis[0].daily_quota", True)
    ]


def test_a_peak_below_the_expected_volume_is_inconsistent() -> None:
    only_error(
        changed(lambda d: d["volume"].update(peak_runs_per_day=119)), "volume.peak_runs_per_day"
    )


def test_low_confidence_without_a_peak_is_a_warning() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["volume"] = {"runs_per_day": 120, "confidence": "30%"}

    report = changed(edit)
    assert report.valid
    assert [w.path for w in report.warnings] == ["volume.confidence"]


def test_two_apis_on_one_meter_are_refused() -> None:
    def edit(data: dict[str, Any]) -> None:
        second = dict(data["external_apis"][0], name="clearbit", meter="tool:firmo")
        data["external_apis"].append(second)

    only_error(changed(edit), "external_apis[1].meter", "a meter of its own")


def test_thresholds_must_rise() -> None:
    report = changed(lambda d: d.update(enforcement={"thresholds": {"info": 70, "warn": 60}}))
    only_error(report, "enforcement.thresholds.warn", "above the ones before it")
    assert changed(lambda d: d.update(enforcement={"thresholds": {"info": 0, "warn": 50}})).valid


def test_stated_dollars_below_the_itemized_cost_are_refused() -> None:
    report = changed(lambda d: d["per_run"].update(usd="0.70"))
    only_error(report, "per_run.usd", "$0.70", "$0.712929")


def test_ceilings_below_the_expected_spend_are_refused() -> None:
    only_error(
        changed(lambda d: d["ceilings"].update(per_run_usd="0.70")),
        "ceilings.per_run_usd",
        "normal runs would be stopped",
    )
    # The peak day expects 150 x $0.712929 = $106.93935.
    only_error(
        changed(lambda d: d["ceilings"].update(daily_usd="106.93")),
        "ceilings.daily_usd",
        "$106.93935",
    )
    only_error(
        changed(lambda d: d["ceilings"].update(monthly_usd="2566.54")),
        "ceilings.monthly_usd",
        "$2566.5444",
    )


def test_the_stated_worst_case_is_checked_against_the_computation() -> None:
    # Computed: $2138.7876 a day.
    only_error(
        changed(lambda d: d.update(worst_case={"daily_usd": "2000"})),
        "worst_case.daily_usd",
        "$2138.7876",
        "understates",
    )
    assert changed(lambda d: d.update(worst_case={"daily_usd": "2138.78"})).problems == []
    report = changed(lambda d: d.update(worst_case={"daily_usd": "2200", "monthly_usd": 1}))
    assert [p.path for p in report.errors] == ["worst_case.monthly_usd"]
    assert [p.path for p in report.warnings] == ["worst_case.daily_usd"]  # conservative


def test_nothing_priced_is_refused() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["per_run"] = {}
        data["external_apis"][0]["usd_per_call"] = 0

    only_error(changed(edit), "per_run", "says nothing a run costs")


# --------------------------------------------------------------------------
# Alerts and secrets


def test_a_secret_written_in_the_plan_is_refused() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["alerts"]["page"] = [{"pagerduty": {"routing_key_env": "PD", "routing_key": "abc"}}]

    only_error(changed(edit), "alerts.page[0].pagerduty.routing_key", "secrets are never written")


def test_a_slack_url_is_read_from_the_environment() -> None:
    report = changed(lambda d: d["alerts"].update(notify=[{"slack": {"url": "https://x"}}]))
    errors = errors_at(report)
    assert set(errors) == {"alerts.notify[0].slack.url", "alerts.notify[0].slack.url_env"}


def test_the_page_rule_must_page_on_stop_and_burn_rate_needs_a_rate() -> None:
    report = changed(lambda d: d["alerts"].update(page_on=["burn_rate"]))
    assert not report.valid
    messages = [p.message for p in report.errors]
    assert all(p.path == "alerts.page_on" for p in report.errors)
    assert any("must include stop" in m for m in messages)
    assert any("burn_rate_usd_per_minute" in m for m in messages)


def test_a_plan_must_page_someone() -> None:
    only_error(changed(lambda d: d["alerts"].update(page=[])), "alerts.page")


def test_a_team_scope_is_allowed_with_a_warning() -> None:
    report = changed(lambda d: d.update(scope={"team": "data-platform"}))
    assert report.valid
    assert [w.path for w in report.warnings] == ["scope.team"]
    report = changed(lambda d: d.update(scope={"team": "a", "api_key": "b"}))
    only_error(report, "scope", "exactly one of api_key, user or team")


# --------------------------------------------------------------------------
# The file itself


def test_unknown_fields_and_wrong_types_are_reported_with_their_paths() -> None:
    def edit(data: dict[str, Any]) -> None:
        data["volume"]["runs_per_day"] = "many"
        data["per_run"]["llm"][0]["calls"] = 1.5
        data["owner"]["manager"] = "someone"

    assert errors_at(changed(edit)) == {
        "volume.runs_per_day": "must be an integer, got 'many'",
        "per_run.llm[0].calls": "must be an integer, got 1.5",
        "owner.manager": "is not a field of a plan here (expected one of: on_call, team)",
    }


def test_more_than_six_decimals_is_refused_with_its_path() -> None:
    text = yaml.safe_dump(base_plan(), sort_keys=False).replace("'0.015'", "0.0000001")
    report = run_check(text)
    only_error(report, "external_apis[0].usd_per_call", "0.0000001 has more than 6 decimal places")


def test_duplicate_keys_are_refused_with_their_line() -> None:
    text = "plan: 1\nagent: a\nagent: b\n"
    with pytest.raises(PlanFileError) as raised:
        parse(text.encode())
    assert raised.value.problem.path == "agent"
    assert raised.value.problem.line == 3
    assert "first on line 2" in raised.value.problem.message


def test_anchors_and_aliases_are_refused() -> None:
    text = "plan: 1\nowner: &o {team: t}\nscope: *o\n"
    with pytest.raises(PlanFileError, match="anchors and aliases"):
        parse(text.encode())


def test_a_file_larger_than_a_page_or_not_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="one page"):
        parse(b"#" * (MAX_BYTES + 1))
    report = check_file(tmp_path / "missing.yaml", PRICES)
    assert [p.path for p in report.errors] == ["(file)"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("plan: [1\n")
    report = check_file(broken, PRICES)
    assert not report.valid
    assert "not valid YAML" in report.errors[0].message


def test_without_prices_only_the_offline_rules_run() -> None:
    document = parse(yaml.safe_dump(base_plan()).encode())
    report = check_document(document, None)
    assert report.valid
    assert report.costs is None
    plan, problems = build(document)
    assert problems == []
    assert compute(plan, PRICES) is not None
