"""API keys, roles and tenants through real server processes: every RPC for
every kind of caller, revocation on two replicas, and keys never in clear."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.auth import read_keys
from tests.integration.rpc import new_id
from tests.servers import ServerProcess

KEYS = {
    # name: (tenant, role, user, team)
    "agent-a": ("acme", "agent", "alice", "ml"),
    "agent-b": ("acme", "agent", "", ""),
    "ops": ("acme", "operator", "", ""),
    "root": ("acme", "admin", "", ""),
    "outsider": ("globex", "agent", "", ""),
    "outside-ops": ("globex", "operator", "", ""),
}


def runcap_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runcap_server", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class Setup:
    keys_file: Path
    secrets: dict[str, str]
    servers: list[ServerProcess]
    channels: list[grpc.Channel]

    def stub(self, replica: int = 0) -> BudgetServiceStub:
        return BudgetServiceStub(self.channels[replica])

    def as_(self, name: str) -> Metadata:
        return (("authorization", f"Bearer {self.secrets[name]}"),)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("auth")
    keys_file = directory / "keys.json"
    secrets = {}
    for name, (tenant, role, user, team) in KEYS.items():
        args = ["keys", "--file", str(keys_file), "create", name, "--tenant", tenant]
        args += ["--role", role, "--user", user, "--team", team]
        done = runcap_cli(*args)
        assert done.returncode == 0, done.stderr
        secrets[name] = done.stdout.strip()
    # Two replicas on one Redis-free SQLite file would not share state, so
    # both serve the memory backend: auth is per replica, the file is shared.
    env = {"RUNCAP_API_KEYS_FILE": str(keys_file)}
    servers = [ServerProcess(directory / "runcap.db", env=env).start()]
    servers.append(ServerProcess(None, env=env).start())
    channels = [grpc.insecure_channel(server.target) for server in servers]
    try:
        yield Setup(keys_file, secrets, servers, channels)
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop()


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def test_keys_are_stored_hashed_and_the_file_is_private(setup: Setup) -> None:
    text = setup.keys_file.read_text()
    assert all(secret not in text for secret in setup.secrets.values())
    assert all(secret.startswith(f"rck_{name}_") for name, secret in setup.secrets.items())
    assert setup.keys_file.stat().st_mode & 0o077 == 0
    listed = runcap_cli("keys", "--file", str(setup.keys_file), "list")
    assert "agent-a\tagent\ttenant=acme\tactive\tuser=alice team=ml" in listed.stdout
    assert all(secret not in listed.stdout for secret in setup.secrets.values())


def test_a_call_without_a_valid_key_is_unauthenticated(setup: Setup) -> None:
    stub = setup.stub()
    request = pb.GetRunRequest(run_id="r")
    assert code_of(lambda: stub.GetRun(request)) == grpc.StatusCode.UNAUTHENTICATED
    bad: Metadata = (("authorization", "Bearer rck_agent-a_not-the-key"),)
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetRun(request, metadata=bad)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid" in str(raised.value.details())
    watch = stub.Watch(pb.WatchRequest(run_id="r"))
    assert code_of(lambda: next(iter(watch))) == grpc.StatusCode.UNAUTHENTICATED
    # Health stays open for probes.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(setup.channels[0])
    assert health.Check(health_pb2.HealthCheckRequest()).status == 1


def test_an_agents_runs_are_bound_to_its_key_user_and_team(setup: Setup) -> None:
    stub = setup.stub()
    run = stub.CreateRun(pb.CreateRunRequest(limit_micros=1_000), metadata=setup.as_("agent-a"))
    assert (run.run.api_key_id, run.run.user_id, run.run.team_id) == ("agent-a", "alice", "ml")
    for field in ("api_key_id", "team_id"):
        request = pb.CreateRunRequest(limit_micros=1_000)
        setattr(request, field, "someone-else")
        agent_a = setup.as_("agent-a")
        code = code_of(functools.partial(stub.CreateRun, request, metadata=agent_a))
        assert code == grpc.StatusCode.PERMISSION_DENIED, field
    # An operator creates runs for any scopes.
    other = pb.CreateRunRequest(limit_micros=1_000, api_key_id="someone-else")
    assert stub.CreateRun(other, metadata=setup.as_("ops")).run.api_key_id == "someone-else"


# Every RPC, as a callable given a stub, metadata and a run of agent-a's.
Call = Callable[[BudgetServiceStub, Metadata, str], Any]
RPCS: dict[str, Call] = {
    "CreateRun": lambda s, m, r: s.CreateRun(
        pb.CreateRunRequest(limit_micros=1_000, parent_run_id=r), metadata=m
    ),
    "GetRun": lambda s, m, r: s.GetRun(pb.GetRunRequest(run_id=r), metadata=m),
    "Reserve": lambda s, m, r: s.Reserve(pb.ReserveRequest(run_id=r, amount_micros=1), metadata=m),
    "Commit": lambda s, m, r: s.Commit(
        pb.CommitRequest(run_id=r, reservation_id="none", actual_micros=1), metadata=m
    ),
    "Refund": lambda s, m, r: s.Refund(
        pb.RefundRequest(run_id=r, reservation_id="none"), metadata=m
    ),
    "CloseRun": lambda s, m, r: s.CloseRun(pb.CloseRunRequest(run_id=r), metadata=m),
    "Watch": lambda s, m, r: next(iter(s.Watch(pb.WatchRequest(run_id=r), metadata=m, timeout=5))),
    "GetDecision": lambda s, m, r: s.GetDecision(
        pb.GetDecisionRequest(decision_id=f"{r}/none"), metadata=m
    ),
    "GetModelPrice": lambda s, m, r: s.GetModelPrice(
        pb.GetModelPriceRequest(provider="openai", model="gpt-4o"), metadata=m
    ),
    "SuspendRun": lambda s, m, r: s.SuspendRun(pb.SuspendRunRequest(run_id=r), metadata=m),
    "ResumeRun": lambda s, m, r: s.ResumeRun(pb.ResumeRunRequest(run_id=r), metadata=m),
    "Approve": lambda s, m, r: s.Approve(
        pb.ApproveRequest(approval_id=f"{r}/approval:spend"), metadata=m
    ),
    "Deny": lambda s, m, r: s.Deny(pb.DenyRequest(approval_id=f"{r}/approval:spend"), metadata=m),
    "GetScope": lambda s, m, r: s.GetScope(
        pb.GetScopeRequest(scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="ml")),
        metadata=m,
    ),
    "SetScopeLimit": lambda s, m, r: s.SetScopeLimit(
        pb.SetScopeLimitRequest(
            scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="ml"),
            period=budget_pb2.PERIOD_DAILY,
            limit_micros=10**9,
        ),
        metadata=m,
    ),
    "SetScopePolicy": lambda s, m, r: s.SetScopePolicy(
        pb.SetScopePolicyRequest(
            scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="ml"), clear=True
        ),
        metadata=m,
    ),
    "SetModelPrice": lambda s, m, r: s.SetModelPrice(
        pb.SetModelPriceRequest(
            price=pb.ModelPrice(provider="acme", model="house", input_rate=1, output_rate=2)
        ),
        metadata=m,
    ),
    "DeleteModelPrice": lambda s, m, r: s.DeleteModelPrice(
        pb.DeleteModelPriceRequest(provider="acme", model="gone"), metadata=m
    ),
    "ListRuns": lambda s, m, r: s.ListRuns(
        pb.ListRunsRequest(created_after=timestamp_pb2.Timestamp(seconds=1)), metadata=m
    ),
    "ReloadPriceTable": lambda s, m, r: s.ReloadPriceTable(
        pb.ReloadPriceTableRequest(), metadata=m
    ),
}
AGENT_RPCS = {"CreateRun", "GetRun", "Reserve", "Commit", "Refund", "CloseRun", "Watch"}
AGENT_RPCS |= {"GetDecision", "GetModelPrice"}
OPERATOR_RPCS = AGENT_RPCS | {"SuspendRun", "ResumeRun", "Approve", "Deny", "GetScope"}
OPERATOR_RPCS |= {"ListRuns"}
# Calls an agent makes about a run (CreateRun: as the parent): refused for a
# run that is not its own.
RUN_BOUND = AGENT_RPCS - {"GetModelPrice"}

DENIED = grpc.StatusCode.PERMISSION_DENIED
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


def test_every_rpc_for_every_kind_of_caller(setup: Setup) -> None:
    stub = setup.stub()
    run_id = stub.CreateRun(
        pb.CreateRunRequest(limit_micros=10**9), metadata=setup.as_("agent-a")
    ).run.run_id
    expected: dict[str, Callable[[str], bool]] = {
        # caller: whether it may make an RPC on agent-a's run
        "agent-a": lambda rpc: rpc in AGENT_RPCS,
        "agent-b": lambda rpc: rpc in AGENT_RPCS and rpc not in RUN_BOUND,
        "ops": lambda rpc: rpc in OPERATOR_RPCS,
        "root": lambda rpc: True,
        "outsider": lambda rpc: rpc in AGENT_RPCS and rpc not in RUN_BOUND,
        "outside-ops": lambda rpc: rpc in OPERATOR_RPCS,
    }
    wrong = []
    for caller, allowed in expected.items():
        metadata = setup.as_(caller)
        for rpc, call in RPCS.items():
            code = code_of(lambda c=call, m=metadata: c(stub, m, run_id))  # type: ignore[misc]
            if allowed(rpc) == (code in REFUSED):
                wrong.append(f"{caller} {rpc}: {code.name}")
    assert wrong == []


def test_run_ids_do_not_leak_across_principals_or_tenants(setup: Setup) -> None:
    stub = setup.stub()
    mine = stub.CreateRun(pb.CreateRunRequest(limit_micros=1_000), metadata=setup.as_("agent-a"))
    run_id = mine.run.run_id
    missing = new_id("run")
    # Another agent: the same answer for a run of someone else and for none.
    for target in (run_id, missing):
        request = pb.GetRunRequest(run_id=target)
        agent_b = setup.as_("agent-b")
        assert code_of(functools.partial(stub.GetRun, request, metadata=agent_b)) == DENIED
    # Another tenant's operator sees its own namespace: no such run there.
    request = pb.GetRunRequest(run_id=run_id)
    outside = code_of(lambda: stub.GetRun(request, metadata=setup.as_("outside-ops")))
    assert outside == grpc.StatusCode.NOT_FOUND
    # ...and may create a run with the same id, without touching acme's.
    twin = pb.CreateRunRequest(run_id=run_id, limit_micros=7)
    assert stub.CreateRun(twin, metadata=setup.as_("outsider")).run.limit_micros == 7
    assert stub.GetRun(request, metadata=setup.as_("ops")).run.limit_micros == 1_000


def test_tenants_have_their_own_prices(setup: Setup) -> None:
    stub = setup.stub()
    price = pb.ModelPrice(provider="openai", model="gpt-4o", input_rate=1, output_rate=1)
    stub.SetModelPrice(pb.SetModelPriceRequest(price=price), metadata=setup.as_("root"))
    request = pb.GetModelPriceRequest(provider="openai", model="gpt-4o")
    ours = stub.GetModelPrice(request, metadata=setup.as_("agent-a"))
    theirs = stub.GetModelPrice(request, metadata=setup.as_("outsider"))
    assert (ours.price.input_rate, ours.tenant_override) == (1, True)
    assert (theirs.price.input_rate, theirs.tenant_override) == (2_500_000, False)


def test_a_revoked_key_stops_working_on_every_replica(setup: Setup) -> None:
    name = "revoke-me"
    done = runcap_cli(
        "keys",
        "--file",
        str(setup.keys_file),
        "create",
        name,
        "--tenant",
        "acme",
        "--role",
        "agent",
    )
    setup.secrets[name] = done.stdout.strip()
    request = pb.GetModelPriceRequest(provider="openai", model="gpt-4o-mini")

    metadata = setup.as_(name)

    def codes() -> list[grpc.StatusCode]:
        return [
            code_of(functools.partial(setup.stub(i).GetModelPrice, request, metadata=metadata))
            for i in range(len(setup.servers))
        ]

    deadline = time.monotonic() + 5
    while codes() != [grpc.StatusCode.OK] * 2:  # a new key: picked up within a second
        assert time.monotonic() < deadline, codes()
        time.sleep(0.1)
    revoked = runcap_cli("keys", "--file", str(setup.keys_file), "revoke", name)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    while codes() != [grpc.StatusCode.UNAUTHENTICATED] * 2:
        assert time.monotonic() - started < 3, codes()
        time.sleep(0.05)
    assert any(key.id == name and key.revoked for key in read_keys(setup.keys_file))
    # No key, valid or not, ever reaches a server's log.
    logs = "\n".join("\n".join(server.log) for server in setup.servers)
    assert all(secret not in logs for secret in setup.secrets.values())


def test_serve_refuses_to_start_without_keys_unless_insecure_dev(tmp_path: Path) -> None:
    env = {"RUNCAP_INSECURE_DEV": "", "RUNCAP_API_KEYS_FILE": ""}
    done = runcap_cli("serve", "--listen", "127.0.0.1:0", "--backend", "memory", env=env)
    assert done.returncode == 2
    assert "RUNCAP_API_KEYS_FILE" in done.stderr
    assert "--insecure-dev" in done.stderr
    (tmp_path / "keys.json").write_text('{"keys": [{"id": "x"}]}')
    env["RUNCAP_API_KEYS_FILE"] = str(tmp_path / "keys.json")
    done = runcap_cli("serve", "--backend", "memory", env=env)
    assert done.returncode == 2
    assert "keys[0]" in done.stderr
