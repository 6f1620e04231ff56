"""`runcap plan check|apply` against a real server (SQLite, API keys): apply
creates the scope's ceilings, default run policy and alert rules; a second
apply makes no write call at all; changing one number changes exactly that;
a plan without a named human is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from runcap.v1 import alerts_pb2, alerts_pb2_grpc, budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server import cli, cli_plan
from runcap_server.auth import KeyEntry, Role, digest, new_key, write_keys
from tests.servers import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "docs" / "examples" / "plan.yaml").read_text()
WRITES = {"SetScopeLimit", "SetScopePolicy", "PutAlertRule", "DeleteAlertRule"}
SLACK = "https://hooks.slack.example/services/T000/B000/first-secret"
PAGERDUTY = "0123456789abcdef0123456789abcdef"


@dataclass
class Keys:
    admin: str
    operator: str
    agent: str  # the key "enrich-agent": its runs are charged to that API key scope


@dataclass
class Server:
    target: str
    keys: Keys
    channel: grpc.Channel

    def as_(self, key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)

    def scope(self, api_key: str) -> budget_pb2.Scope:
        request = pb.GetScopeRequest(
            scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_API_KEY, id=api_key)
        )
        stub = BudgetServiceStub(self.channel)
        return stub.GetScope(request, metadata=self.as_(self.keys.admin)).scope

    def rules(self) -> dict[str, alerts_pb2.AlertRule]:
        stub = alerts_pb2_grpc.AlertServiceStub(self.channel)
        listed = stub.ListAlertRules(
            alerts_pb2.ListAlertRulesRequest(), metadata=self.as_(self.keys.admin)
        )
        return {rule.rule_id: rule for rule in listed.rules}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("plan")
    secrets = {name: new_key(name) for name in ("platform", "oncall", "enrich-agent")}
    roles = {"platform": Role.ADMIN, "oncall": Role.OPERATOR, "enrich-agent": Role.AGENT}
    entries = [
        KeyEntry(id=name, sha256=digest(secret), tenant="acme", role=roles[name], created="now")
        for name, secret in secrets.items()
    ]
    keys_file = directory / "keys.json"
    write_keys(keys_file, entries)
    process = ServerProcess(directory / "runcap.db", env={"RUNCAP_API_KEYS_FILE": str(keys_file)})
    process.start()
    channel = grpc.insecure_channel(process.target)
    try:
        keys = Keys(secrets["platform"], secrets["oncall"], secrets["enrich-agent"])
        yield Server(process.target, keys, channel)
    finally:
        channel.close()
        process.stop()


class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Records the method of every call the CLI makes."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        self.methods.append(client_call_details.method.rsplit("/", 1)[-1])
        return continuation(client_call_details, request)

    @property
    def writes(self) -> list[str]:
        return [method for method in self.methods if method in WRITES]


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    calls: Recorder = field(default_factory=Recorder)


@pytest.fixture
def runcap(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Outcome]:
    """Runs `runcap ARGS` in this process, recording its RPCs; admin key and
    alert secrets in the environment unless `env` says otherwise."""

    def run(*args: str, env: dict[str, str] | None = None) -> Outcome:
        recorder = Recorder()
        monkeypatch.setattr(
            cli_plan,
            "_channel",
            lambda target: grpc.intercept_channel(grpc.insecure_channel(target), recorder),
        )
        values = {
            "RUNCAP_API_KEY": server.keys.admin,
            "RUNCAP_PLAN_SLACK_URL": SLACK,
            "RUNCAP_PLAN_PAGERDUTY_KEY": PAGERDUTY,
            **(env or {}),
        }
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err, recorder)

    return run


def write_plan(
    tmp_path: Path, agent: str, *edits: tuple[str, str], name: str = "plan.yaml"
) -> Path:
    """The example plan for an agent (and API key scope) of the test's own."""
    text = EXAMPLE.replace("customer-enrichment", agent).replace("enrich-agent", f"{agent}-key")
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def limits(scope: budget_pb2.Scope) -> dict[int, int | None]:
    return {
        usage.period: usage.limit_micros if usage.HasField("limit_micros") else None
        for usage in scope.usage
    }


def test_apply_creates_the_scope_ceilings_policy_and_rules_and_runs_follow_them(
    server: Server, runcap: Callable[..., Outcome], tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, "enrich", ("enrich-key", "enrich-agent"))
    first = runcap("plan", "apply", str(plan), "--target", server.target)
    assert first.code == 0, first.err
    assert "+ daily ceiling $980.80" in first.out
    assert "applied 4 changes" in first.out
    assert "limit_micros=2_452_000" in first.out  # how the agent's runs get their ceiling
    assert sorted(first.calls.writes) == [
        "PutAlertRule",
        "PutAlertRule",
        "SetScopeLimit",
        "SetScopePolicy",
    ]

    scope = server.scope("enrich-agent")
    assert limits(scope) == {
        budget_pb2.PERIOD_LIFETIME: None,
        budget_pb2.PERIOD_DAILY: 980_800_000,  # 400 peak runs x $2.452
        budget_pb2.PERIOD_MONTHLY: None,
    }
    policy = scope.default_policy
    assert policy.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_HARD_GATE
    assert (policy.thresholds.info_percent, policy.thresholds.warn_percent) == (60, 80)
    assert policy.thresholds.throttle_percent == 95
    assert policy.max_tokens == 548_000  # 274,000 tokens a run x 2
    assert dict(policy.meter_limits) == {"tool:firmographics": 100}  # 50 calls x 2
    assert policy.rate_limit.max_calls == 32  # 20/min firmographics + 12 LLM calls
    assert policy.rate_limit.window.ToMilliseconds() == 60_000
    assert policy.max_in_flight == 4
    assert list(policy.approved_meters) == ["tool:firmographics"]

    rules = server.rules()
    notify, page = rules["plan.enrich.notify"], rules["plan.enrich.page"]
    assert page.scope == budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_API_KEY, id="enrich-agent")
    assert set(page.triggers) == {alerts_pb2.ALERT_TRIGGER_STOP, alerts_pb2.ALERT_TRIGGER_BURN_RATE}
    assert page.burn_rate_micros_per_minute == 5_000_000
    assert page.owner.startswith("Priya Raman <priya.raman@example.com>")
    assert page.labels["per_run_ceiling_micros"] == "2452000"
    assert page.targets[0].pagerduty.routing_key.endswith("cdef")  # masked, never returned
    assert PAGERDUTY not in str(page)
    assert set(notify.triggers) == {
        alerts_pb2.ALERT_TRIGGER_THROTTLE,
        alerts_pb2.ALERT_TRIGGER_APPROVAL_REQUESTED,
        alerts_pb2.ALERT_TRIGGER_OVERRUN,
        alerts_pb2.ALERT_TRIGGER_SUSPENDED,
    }
    assert "first-secret" not in str(notify)

    # The agent's runs, created with no policy of their own, get the plan's.
    stub = BudgetServiceStub(server.channel)
    created = stub.CreateRun(
        pb.CreateRunRequest(run_id="enrich-run-1", limit_micros=2_452_000),
        metadata=server.as_(server.keys.agent),
    )
    assert created.run.api_key_id == "enrich-agent"
    assert created.run.policy.max_tokens == 548_000
    assert dict(created.run.policy.meter_limits) == {"tool:firmographics": 100}
    unlisted = stub.Reserve(
        pb.ReserveRequest(run_id="enrich-run-1", amount_micros=1_000, meter="tool:other-api"),
        metadata=server.as_(server.keys.agent),
    )
    assert unlisted.decision == budget_pb2.DECISION_APPROVAL_REQUIRED

    # Again: nothing to change, and not one write call.
    second = runcap("plan", "apply", str(plan), "--target", server.target)
    assert second.code == 0, second.err
    assert "no changes: the server already matches the plan" in second.out
    assert second.calls.writes == []
    assert set(second.calls.methods) == {"GetModelPrice", "GetScope", "ListAlertRules"}
    assert server.scope("enrich-agent") == scope
    assert server.rules() == rules


def test_changing_one_number_changes_exactly_that(
    server: Server, runcap: Callable[..., Outcome], tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, "onenum")
    assert runcap("plan", "apply", str(plan), "--target", server.target).code == 0
    scope, rules = server.scope("onenum-key"), server.rules()

    busier = write_plan(
        tmp_path, "onenum", ("peak_runs_per_day: 400", "peak_runs_per_day: 500"), name="b.yaml"
    )
    dry = runcap("plan", "apply", str(busier), "--target", server.target, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    outcome = json.loads(dry.out)
    assert outcome["applied"] == 0
    assert [c for c in outcome["changes"] if c["op"] != "="] == [
        {"op": "~", "subject": "daily ceiling $980.80 -> $1226.00", "details": []}
    ]
    assert dry.calls.writes == []
    again = runcap("plan", "apply", str(busier), "--target", server.target)
    assert again.code == 0, again.err
    assert "~ daily ceiling $980.80 -> $1226.00" in again.out
    assert again.calls.writes == ["SetScopeLimit"]
    after = server.scope("onenum-key")
    assert limits(after)[budget_pb2.PERIOD_DAILY] == 1_226_000_000
    assert after.default_policy == scope.default_policy
    assert server.rules() == rules

    # A field the plan does not own (auto_downgrade) survives a policy change.
    stub = BudgetServiceStub(server.channel)
    edited = budget_pb2.RunPolicy()
    edited.CopyFrom(after.default_policy)
    edited.auto_downgrade = True
    stub.SetScopePolicy(
        pb.SetScopePolicyRequest(scope=after.ref, policy=edited),
        metadata=server.as_(server.keys.admin),
    )
    wider = write_plan(
        tmp_path,
        "onenum",
        ("peak_runs_per_day: 400", "peak_runs_per_day: 500"),
        ("max_parallel_calls: 4", "max_parallel_calls: 6"),
        name="c.yaml",
    )
    third = runcap("plan", "apply", str(wider), "--target", server.target)
    assert third.code == 0, third.err
    assert "max_in_flight: 4 -> 6" in third.out
    assert third.calls.writes == ["SetScopePolicy"]
    policy = server.scope("onenum-key").default_policy
    assert policy.max_in_flight == 6
    assert policy.auto_downgrade
    expected = budget_pb2.RunPolicy()
    expected.CopyFrom(edited)
    expected.max_in_flight = 6
    assert policy == expected


def test_a_rotated_secret_and_a_removed_target_are_seen(
    server: Server, runcap: Callable[..., Outcome], tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, "rotate")
    assert runcap("plan", "apply", str(plan), "--target", server.target).code == 0

    rotated = runcap(
        "plan",
        "apply",
        str(plan),
        "--target",
        server.target,
        env={"RUNCAP_PLAN_SLACK_URL": SLACK.replace("first", "second")},
    )
    assert rotated.code == 0, rotated.err
    assert "~ alert rule plan.rotate.notify" in rotated.out
    assert "secrets: changed" in rotated.out
    assert rotated.calls.writes == ["PutAlertRule"]

    quiet = write_plan(
        tmp_path,
        "rotate",
        ("  notify:  ", "  # notify:"),
        ("    - slack: {url_env: RUNCAP_PLAN_SLACK_URL}\n", ""),
        name="quiet.yaml",
    )
    removed = runcap("plan", "apply", str(quiet), "--target", server.target)
    assert removed.code == 0, removed.err
    assert "- alert rule plan.rotate.notify" in removed.out
    assert removed.calls.writes == ["DeleteAlertRule"]
    assert "plan.rotate.notify" not in server.rules()
    assert "plan.rotate.page" in server.rules()


def test_a_plan_without_a_named_human_is_refused_and_nothing_is_written(
    server: Server, runcap: Callable[..., Outcome], tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, "noowner", ("name: Priya Raman", "name: Data Platform On-call"))
    before = server.scope("noowner-key"), server.rules()
    refused = runcap("plan", "apply", str(plan), "--target", server.target)
    assert refused.code == 1
    assert "owner.on_call.name" in refused.out
    assert "not a named human" in refused.out
    assert "refusing to apply" in refused.err
    assert "nothing was written" in refused.err
    assert refused.calls.methods == []  # refused before connecting
    assert (server.scope("noowner-key"), server.rules()) == before
    assert not server.scope("noowner-key").HasField("default_policy")


def test_apply_needs_an_admin_key_and_a_missing_secret_stops_it(
    server: Server, runcap: Callable[..., Outcome], tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, "roles")
    operator = {"RUNCAP_API_KEY": server.keys.operator}
    denied = runcap("plan", "apply", str(plan), "--target", server.target, env=operator)
    assert denied.code == 1
    assert "PERMISSION_DENIED" in denied.err
    assert "SetScopeLimit needs the admin role" in denied.err
    assert "made 0 of 4 changes before this one failed" in denied.err
    assert denied.calls.writes == ["SetScopeLimit"]  # the first write, refused
    assert not server.scope("roles-key").HasField("default_policy")

    unset = {"RUNCAP_PLAN_PAGERDUTY_KEY": ""}
    missing = runcap("plan", "apply", str(plan), "--target", server.target, env=unset)
    assert missing.code == 1
    assert "alerts.page[0].pagerduty.routing_key_env" in missing.err
    assert "$RUNCAP_PLAN_PAGERDUTY_KEY" in missing.err
    assert missing.calls.methods == []


def test_check_with_the_server_s_prices_knows_a_tenant_s_own_model(
    server: Server, runcap: Callable[..., Outcome], tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, "custom", ("openai/gpt-4o\n", "acme/house-model\n"))
    offline = runcap("plan", "check", str(plan))
    assert offline.code == 1
    assert "per_run.llm[1].model" in offline.out
    assert "fail closed" in offline.out

    price = pb.ModelPrice(
        provider="acme", model="house-model", input_rate=1_000_000, output_rate=2_000_000
    )
    BudgetServiceStub(server.channel).SetModelPrice(
        pb.SetModelPriceRequest(price=price), metadata=server.as_(server.keys.admin)
    )
    online = runcap("plan", "check", str(plan), "--target", server.target, "--json")
    report = json.loads(online.out)
    # 2 calls of 30,000 in at $1/M + 2,000 out at $2/M = 2 x $0.034; the rest as in the example.
    assert report["costs"]["itemized_per_run_micros"] == 36_000 + 68_000 + 1_000_000
    assert "tenant prices for acme/house-model" in report["prices"]
    assert set(online.calls.methods) == {"GetModelPrice"}
    # The example's stated worst case is now above the figures: conservative, a warning.
    assert online.code == 0, online.out
    assert report["valid"] is True
    assert [w["path"] for w in report["warnings"]] == ["worst_case.daily_usd"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runcap_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUNCAP_TARGET": ""},
        check=False,
    )


def test_plan_check_from_the_command_line(runcap: Callable[..., Outcome], tmp_path: Path) -> None:
    valid = run_cli("plan", "check", str(ROOT / "docs" / "examples" / "plan.yaml"))
    assert valid.returncode == 0, valid.stderr
    assert valid.stderr == ""
    assert "worst case at 10x volume" in valid.stdout
    assert "$4904.00" in valid.stdout  # 2,000 runs a day at the $2.452 ceiling
    assert valid.stdout.rstrip().endswith("quota plan customer-enrichment: valid")

    bad = write_plan(tmp_path, "bad", ('slack: "@priya.raman"', 'slack: "@channel"'))
    invalid = runcap("plan", "check", str(bad), "--json")
    assert invalid.code == 1
    assert invalid.calls.methods == []  # offline
    report = json.loads(invalid.out)
    assert report["valid"] is False
    [error] = report["errors"]
    assert error["path"] == "owner.on_call.slack"
    assert error["line"] == EXAMPLE.splitlines().index('    slack: "@priya.raman"') + 1
    assert report["costs"]["worst_case_daily_micros"] == 4_904_000_000
