"""Parent scopes in the Python client: the requests it builds for CreateRun's
parent fields, SetScopeLimit, SetScopePolicy and GetScope, sent to a scripted
in-process gRPC server that records them (no runcap server needed), the
blocking scope of a `BudgetBlockedError`, and the typed errors of a bad parent
run."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_status import rpc_status

from runcap import (
    AsyncRuncapClient,
    BudgetBlockedError,
    ParentRunClosedError,
    ParentRunNotFoundError,
    RateLimit,
    RuncapClient,
    RunPolicy,
    UnavailableError,
    from_status,
)
from runcap._shared import (
    create_run_request,
    get_scope_request,
    set_scope_limit_request,
    set_scope_policy_request,
)
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server import errors as server_errors
from tests.unit.fake_budget import FAST, serve

TEAM = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="team-7")
ADVISORY = RunPolicy(enforcement_mode="advisory", rate_limit=RateLimit(30, 60), max_in_flight=4)


def abort(context: grpc.ServicerContext, error: BaseException) -> None:
    _, status = server_errors.to_status(error)
    context.abort_with_status(rpc_status.to_status(status))


class FakeScopes:
    """Records every request; answers with a scope or a run echoing it."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = defaultdict(list)
        self.failures: dict[str, list[BaseException]] = defaultdict(list)
        self.lock = threading.Lock()

    def handler(self, method: str) -> Callable[[Any, grpc.ServicerContext], Message]:
        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            with self.lock:
                self.calls[method].append(request)
                queued = self.failures[method]
                error = queued.pop(0) if queued else None
            if error is not None:
                abort(context, error)
            if method == "CreateRun":
                run = budget_pb2.Run(
                    run_id=request.run_id,
                    parent_run_id=request.parent_run_id,
                    api_key_id=request.api_key_id,
                    user_id=request.user_id,
                    team_id=request.team_id,
                )
                return pb.CreateRunResponse(run=run)
            if method == "Reserve":
                return pb.ReserveResponse(
                    decision=budget_pb2.DECISION_BLOCK,
                    reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
                    reservation_id=request.reservation_id,
                    state=budget_pb2.BudgetState(run_id=request.run_id, limit_micros=1000),
                    blocking_scope=TEAM,
                    blocking_period=budget_pb2.PERIOD_DAILY,
                )
            usage = budget_pb2.ScopeUsage(period=budget_pb2.PERIOD_DAILY)
            if method == "SetScopeLimit" and request.WhichOneof("ceiling") == "limit_micros":
                usage.limit_micros = request.limit_micros
            scope = budget_pb2.Scope(ref=request.scope, usage=[usage])
            if method == "SetScopeLimit":
                return pb.SetScopeLimitResponse(scope=scope)
            if method == "SetScopePolicy":
                if request.WhichOneof("default") == "policy":
                    scope.default_policy.CopyFrom(request.policy)
                return pb.SetScopePolicyResponse(scope=scope)
            return pb.GetScopeResponse(scope=scope)

        return handle


METHODS = ["CreateRun", "Reserve", "SetScopeLimit", "SetScopePolicy", "GetScope"]


@pytest.fixture
def fake() -> Iterator[tuple[FakeScopes, str]]:
    scopes = FakeScopes()
    with serve(scopes.handler, METHODS) as target:
        yield scopes, target


# --- request building -------------------------------------------------------------------


def test_create_run_request_carries_the_parent_scopes() -> None:
    request = create_run_request(
        "child",
        5,
        None,
        None,
        parent_run_id="root",
        api_key_id="key-1",
        user_id="ada",
        team_id="team-7",
    )
    assert (request.parent_run_id, request.api_key_id, request.user_id, request.team_id) == (
        "root",
        "key-1",
        "ada",
        "team-7",
    )
    plain = create_run_request("run", 5, None, None)
    assert (plain.parent_run_id, plain.api_key_id, plain.user_id, plain.team_id) == ("",) * 4


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("run", budget_pb2.SCOPE_KIND_RUN),
        ("api_key", budget_pb2.SCOPE_KIND_API_KEY),
        ("user", budget_pb2.SCOPE_KIND_USER),
        ("team", budget_pb2.SCOPE_KIND_TEAM),
    ],
)
def test_scope_kinds_by_name_or_value(name: Any, value: budget_pb2.ScopeKind.ValueType) -> None:
    assert get_scope_request(name, "x").scope == budget_pb2.ScopeRef(kind=value, id="x")
    assert get_scope_request(value, "x").scope == budget_pb2.ScopeRef(kind=value, id="x")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lifetime", budget_pb2.PERIOD_LIFETIME),
        ("daily", budget_pb2.PERIOD_DAILY),
        ("monthly", budget_pb2.PERIOD_MONTHLY),
    ],
)
def test_set_scope_limit_request_sets_or_clears(
    name: Any, value: budget_pb2.Period.ValueType
) -> None:
    limit = set_scope_limit_request("user", "ada", name, 7_000_000, False)
    assert limit == pb.SetScopeLimitRequest(
        scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_USER, id="ada"),
        period=value,
        limit_micros=7_000_000,
    )
    cleared = set_scope_limit_request(budget_pb2.SCOPE_KIND_USER, "ada", value, None, True)
    assert cleared.WhichOneof("ceiling") == "clear"
    assert cleared.clear is True
    assert cleared.period == value


def test_set_scope_limit_needs_exactly_one_ceiling() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        set_scope_limit_request("team", "t", "daily", None, False)
    with pytest.raises(ValueError, match="exactly one"):
        set_scope_limit_request("team", "t", "daily", 5, True)


def test_set_scope_policy_request_sets_or_clears() -> None:
    ada = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_USER, id="ada")
    policy = set_scope_policy_request("user", "ada", ADVISORY, False)
    assert policy == pb.SetScopePolicyRequest(scope=ada, policy=ADVISORY.to_proto())
    cleared = set_scope_policy_request(budget_pb2.SCOPE_KIND_USER, "ada", None, True)
    assert cleared.WhichOneof("default") == "clear"
    assert cleared == pb.SetScopePolicyRequest(scope=ada, clear=True)


def test_set_scope_policy_request_copies_a_message_and_sends_an_empty_one() -> None:
    message = budget_pb2.RunPolicy(max_tokens=100_000)
    request = set_scope_policy_request("team", "t", message, False)
    message.max_tokens = 1
    assert request.policy == budget_pb2.RunPolicy(max_tokens=100_000)
    # An empty policy (every field the server's default) is a policy, not a clear.
    empty = set_scope_policy_request("team", "t", RunPolicy(), False)
    assert empty.WhichOneof("default") == "policy"
    assert pb.SetScopePolicyRequest.FromString(empty.SerializeToString()).HasField("policy")


def test_set_scope_policy_needs_exactly_one_of_policy_and_clear() -> None:
    with pytest.raises(ValueError, match="exactly one of policy and clear"):
        set_scope_policy_request("team", "t", None, False)
    with pytest.raises(ValueError, match="exactly one of policy and clear"):
        set_scope_policy_request("team", "t", ADVISORY, True)
    not_a_policy: Any = {"enforcement_mode": "advisory"}
    with pytest.raises(TypeError, match="policy must be"):
        set_scope_policy_request("team", "t", not_a_policy, False)


def test_unknown_names_are_rejected_on_the_client() -> None:
    bad_kind: Any = "org"
    bad_period: Any = "weekly"
    with pytest.raises(ValueError, match="unknown scope kind 'org'"):
        get_scope_request(bad_kind, "x")
    with pytest.raises(ValueError, match="unknown period 'weekly'"):
        set_scope_limit_request("team", "t", bad_period, 5, False)


# --- through a channel ------------------------------------------------------------------


def test_sync_client_sends_parent_scopes_and_scope_calls(
    fake: tuple[FakeScopes, str], client: RuncapClient
) -> None:
    scopes = fake[0]
    created = client.create_run(
        "child", limit_micros=5, parent_run_id="root", api_key_id="k", user_id="u", team_id="t"
    )
    assert (created.run.parent_run_id, created.run.team_id) == ("root", "t")

    response = client.set_scope_limit("team", "team-7", "daily", limit_micros=50_000_000)
    assert response.scope.ref == TEAM
    assert response.scope.usage[0].limit_micros == 50_000_000
    cleared = client.set_scope_limit(budget_pb2.SCOPE_KIND_TEAM, "team-7", "daily", clear=True)
    assert not cleared.scope.usage[0].HasField("limit_micros")
    assert client.get_scope("team", "team-7").scope.ref == TEAM

    limit, clear = scopes.calls["SetScopeLimit"]
    assert (limit.WhichOneof("ceiling"), clear.WhichOneof("ceiling")) == ("limit_micros", "clear")
    (get,) = scopes.calls["GetScope"]
    assert get == pb.GetScopeRequest(scope=TEAM)

    with pytest.raises(ValueError, match="exactly one"):
        client.set_scope_limit("team", "team-7", "daily")
    assert len(scopes.calls["SetScopeLimit"]) == 2  # nothing was sent


def test_sync_client_sets_and_clears_a_scope_policy(
    fake: tuple[FakeScopes, str], client: RuncapClient
) -> None:
    scopes = fake[0]
    response = client.set_scope_policy("team", "team-7", ADVISORY)
    assert response.scope.ref == TEAM
    assert response.scope.default_policy == ADVISORY.to_proto()
    message = budget_pb2.RunPolicy(enforcement_mode=budget_pb2.ENFORCEMENT_MODE_SOFT_GATE)
    client.set_scope_policy(budget_pb2.SCOPE_KIND_TEAM, "team-7", policy=message)
    cleared = client.set_scope_policy("team", "team-7", clear=True)
    assert not cleared.scope.HasField("default_policy")

    assert scopes.calls["SetScopePolicy"] == [
        pb.SetScopePolicyRequest(scope=TEAM, policy=ADVISORY.to_proto()),
        pb.SetScopePolicyRequest(scope=TEAM, policy=message),
        pb.SetScopePolicyRequest(scope=TEAM, clear=True),
    ]
    with pytest.raises(ValueError, match="exactly one"):
        client.set_scope_policy("team", "team-7")
    with pytest.raises(ValueError, match="exactly one"):
        client.set_scope_policy("team", "team-7", ADVISORY, clear=True)
    assert len(scopes.calls["SetScopePolicy"]) == 3  # nothing was sent


def test_scope_calls_retry_unavailable(fake: tuple[FakeScopes, str], client: RuncapClient) -> None:
    scopes = fake[0]
    methods = ("SetScopeLimit", "SetScopePolicy", "GetScope")
    for method in methods:
        scopes.failures[method] += [server_errors.ShuttingDown(retry_after_ms=1)] * 2
    client.set_scope_limit("api_key", "k", "monthly", limit_micros=1)
    client.set_scope_policy("api_key", "k", ADVISORY)
    client.get_scope("api_key", "k")
    assert [len(scopes.calls[method]) for method in methods] == [3, 3, 3]
    key = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_API_KEY, id="k")
    sent = pb.SetScopePolicyRequest(scope=key, policy=ADVISORY.to_proto())
    assert scopes.calls["SetScopePolicy"] == [sent] * 3


def test_set_scope_policy_retries_stop_after_the_policy(
    fake: tuple[FakeScopes, str], client: RuncapClient
) -> None:
    scopes = fake[0]
    scopes.failures["SetScopePolicy"] += [server_errors.ShuttingDown(retry_after_ms=1)] * 10
    with pytest.raises(UnavailableError):
        client.set_scope_policy("user", "ada", clear=True)
    assert len(scopes.calls["SetScopePolicy"]) == FAST.max_attempts


async def test_async_client_sends_parent_scopes_and_scope_calls(
    fake: tuple[FakeScopes, str], aclient: AsyncRuncapClient
) -> None:
    scopes = fake[0]
    await aclient.create_run("child", limit_micros=5, parent_run_id="root", user_id="ada")
    (create,) = scopes.calls["CreateRun"]
    assert (create.parent_run_id, create.user_id, create.api_key_id) == ("root", "ada", "")
    response = await aclient.set_scope_limit("user", "ada", "lifetime", limit_micros=9)
    assert response.scope.usage[0].limit_micros == 9
    await aclient.set_scope_limit("user", "ada", "lifetime", clear=True)
    got = await aclient.get_scope("user", "ada")
    assert got.scope.ref == budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_USER, id="ada")
    assert [r.WhichOneof("ceiling") for r in scopes.calls["SetScopeLimit"]] == [
        "limit_micros",
        "clear",
    ]


async def test_async_client_sets_clears_and_retries_a_scope_policy(
    fake: tuple[FakeScopes, str], aclient: AsyncRuncapClient
) -> None:
    scopes = fake[0]
    scopes.failures["SetScopePolicy"] += [server_errors.ShuttingDown(retry_after_ms=1)] * 2
    response = await aclient.set_scope_policy("user", "ada", ADVISORY)
    assert response.scope.default_policy == ADVISORY.to_proto()
    cleared = await aclient.set_scope_policy("user", "ada", clear=True)
    assert not cleared.scope.HasField("default_policy")
    ada = budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_USER, id="ada")
    assert scopes.calls["SetScopePolicy"] == [
        *[pb.SetScopePolicyRequest(scope=ada, policy=ADVISORY.to_proto())] * 3,
        pb.SetScopePolicyRequest(scope=ada, clear=True),
    ]
    with pytest.raises(ValueError, match="exactly one"):
        await aclient.set_scope_policy("user", "ada")
    assert len(scopes.calls["SetScopePolicy"]) == 4


def test_budget_blocked_error_names_the_blocking_scope(client: RuncapClient) -> None:
    with pytest.raises(BudgetBlockedError) as blocked, client.reserve("run-1", 10):
        pytest.fail("a blocked hold must not run its block")
    assert blocked.value.blocking_scope == TEAM
    assert blocked.value.blocking_period == budget_pb2.PERIOD_DAILY
    assert "blocked by SCOPE_KIND_TEAM 'team-7', PERIOD_DAILY" in str(blocked.value)


def test_budget_blocked_error_without_a_blocking_scope() -> None:
    response = pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_RUN_CLOSED,
        reservation_id="r",
    )
    error = BudgetBlockedError("run-1", response)
    assert (error.blocking_scope, error.blocking_period) == (None, budget_pb2.PERIOD_UNSPECIFIED)
    assert "blocked by" not in str(error)
    own = pb.ReserveResponse(
        decision=budget_pb2.DECISION_BLOCK,
        reason=budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET,
        blocking_scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_RUN, id="run-1"),
        blocking_period=budget_pb2.PERIOD_LIFETIME,
    )
    assert "blocked by" not in str(BudgetBlockedError("run-1", own))


# --- CreateRun's parent errors -----------------------------------------------------------


def test_parent_run_errors_are_typed() -> None:
    _, status = server_errors.to_status(server_errors.ParentRunNotFound("child", "root"))
    missing = from_status(status)
    assert type(missing) is ParentRunNotFoundError
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "PARENT_RUN_NOT_FOUND")
    assert (missing.run_id, missing.parent_run_id) == ("child", "root")

    _, status = server_errors.to_status(server_errors.ParentRunClosed("child", "root"))
    closed = from_status(status)
    assert type(closed) is ParentRunClosedError
    assert (closed.code, closed.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PARENT_RUN_CLOSED",
    )
    assert (closed.run_id, closed.parent_run_id) == ("child", "root")
