"""Every RPC fuzzed through a real server on SQLite and on Redis.

Each example is a hostile request: built from the request's descriptor (any
field missing or hostile, oneofs unset or set, unknown enum values), or a valid
request with one or two fields broken. Every answer must be OK or a clear client
error with the documented rich status, and an error must change nothing: the
fixtures read back the same through the API, and the backend's raw contents
(every SQLite row, every Redis key) are equal before and after.

Bugs the fuzzer found are pinned as @example regressions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from hypothesis import example, given
from hypothesis import strategies as st

from runcap.v1 import alerts_pb2, budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from tests.fuzz.harness import (
    FUZZ,
    SERVICES,
    World,
    bad_request,
    find_method,
    for_rpc,
    for_templates,
    message_class,
    method_names,
    templates,
    world,
)
from tests.fuzz.strategies import Builder, descriptor_of, page_tokens, undecodable_bodies

# Hypothesis warns before printing a failing example with a huge string.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def fuzz_world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with world(request.param, tmp_path_factory.mktemp(f"fuzz-{request.param}")) as built:
        yield built


def requests(method: str) -> st.SearchStrategy[Message]:
    """Hostile requests for one RPC: from its descriptor, or a valid one broken."""
    ids = for_rpc(method)
    build = Builder(
        known=ids.known(),
        overrides={
            # Tokens of the templates' queries, so a hostile cursor gets used.
            "runcap.v1.ListRunsRequest.page_token": page_tokens(["0:4102444800000", f"0:{2**53}"]),
            "runcap.v1.ListAlertsRequest.page_token": page_tokens([f"{ids.rule}:2", ":0"]),
        },
    )
    request_type = message_class(find_method(method, SERVICES).input_type)
    return st.one_of(
        build.message(descriptor_of(request_type())), build.mutated(templates(ids)[method])
    )


def fuzz(method: str, *regressions: Message) -> Callable[..., None]:
    """The fuzz test of one RPC, with the requests that once broke it."""

    @FUZZ
    @given(request=requests(method))
    def test(fuzz_world: World, request: Message) -> None:
        fuzz_world.check(method, request, for_rpc(method))

    for regression in regressions:
        test = example(request=regression)(test)
    test.__name__ = f"test_fuzz_{method}"
    # One source for every RPC's test: tell Hypothesis's example database (and
    # derandomize) apart by the RPC, as hypothesis.stateful does for machines.
    test.hypothesis.inner_test._hypothesis_internal_add_digest = method.encode()  # type: ignore[attr-defined]
    return test


def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


COMMIT = for_rpc("Commit")
# Worst case for the size of an error's status: every echoed character is
# percent-encoded in grpc-message.
PERCENT_LABELS = {"%" * 60 + str(i): "v" for i in range(300)}

test_create_run = fuzz(
    "CreateRun", pb.CreateRunRequest(run_id="%", limit_micros=1, labels=PERCENT_LABELS)
)
test_get_run = fuzz("GetRun")
test_list_runs = fuzz(
    "ListRuns",
    pb.ListRunsRequest(created_after=_ts(2**62), created_before=_ts(2**62 + 5)),
    pb.ListRunsRequest(created_after=_ts(0, 10**9), created_before=_ts(4_102_444_800)),
    # A page token's time past a signed 64-bit integer (SQLite: OverflowError).
    pb.ListRunsRequest(
        created_after=_ts(0),
        page_size=5,
        page_token="WzkyMjMzNzIwMzY4NTQ3NzU4MDgsICIiLCAiMDo5MDA3MTk5MjU0NzQwOTkyIl0",
    ),
)
test_reserve = fuzz(
    "Reserve",
    pb.ReserveRequest(
        run_id="x",
        llm_call=pb.LlmCall(provider="a", model="b", candidate_models=["{bad}" * 10] * 256),
    ),
)
test_commit = fuzz(
    "Commit",
    pb.CommitRequest(
        run_id=COMMIT.run, reservation_id="held", usage=pb.TokenUsage(input_tokens=-(2**31))
    ),
)
test_refund = fuzz("Refund")
test_close_run = fuzz("CloseRun")
test_suspend_run = fuzz("SuspendRun")
test_resume_run = fuzz("ResumeRun")
test_watch = fuzz("Watch")
test_set_scope_limit = fuzz("SetScopeLimit")
test_get_scope = fuzz("GetScope")
test_set_scope_policy = fuzz(
    "SetScopePolicy",
    pb.SetScopePolicyRequest(
        scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_TEAM, id="t"),
        policy=budget_pb2.RunPolicy(downgrade_models=[""] * 1000),
    ),
)
test_set_model_price = fuzz("SetModelPrice")
test_delete_model_price = fuzz("DeleteModelPrice")
test_get_model_price = fuzz("GetModelPrice")
test_reload_price_table = fuzz("ReloadPriceTable")
test_get_decision = fuzz("GetDecision")
test_approve = fuzz("Approve")
test_deny = fuzz("Deny")
test_put_alert_rule = fuzz("PutAlertRule")
test_list_alert_rules = fuzz("ListAlertRules")
test_delete_alert_rule = fuzz("DeleteAlertRule")
test_list_alerts = fuzz(
    "ListAlerts",
    # A page token whose time is JSON false (a bool passed isinstance(x, int)).
    alerts_pb2.ListAlertsRequest(
        page_size=10,
        page_token="W2ZhbHNlLCAiIiwgImxpc3RhbGVydHMtcnVsZToyIl0",
        rule_id="listalerts-rule",
        state=alerts_pb2.ALERT_STATE_DELIVERED,
    ),
)


def test_every_rpc_is_fuzzed() -> None:
    tests = [f for f in globals().values() if getattr(f, "__name__", "").startswith("test_fuzz_")]
    assert {f.__name__.removeprefix("test_fuzz_") for f in tests} == set(method_names(SERVICES))


@pytest.mark.parametrize("method", method_names(SERVICES))
def test_templates_are_valid(fuzz_world: World, method: str) -> None:
    """The valid requests mutations start from are valid: each answers OK on
    fixtures of its own (so a mutation fails for what it broke, not for a
    template gone stale)."""
    ids = for_templates(method)
    for request in templates(ids)[method]:
        fuzz_world.undo_hold(method, request, fuzz_world.rpc(method, request))


@FUZZ
@given(method=st.sampled_from(method_names(SERVICES)), body=undecodable_bodies())
@example(method="GetRun", body=b"\x0a\x03\xff\xfe\xfd")  # bad UTF-8: was UNKNOWN
@example(method="Watch", body=b"\x0a\x05ab")  # corrupt: was UNKNOWN
def test_undecodable_bodies(fuzz_world: World, method: str, body: bytes) -> None:
    """Bytes that are not the request message (corrupt wire format, bad UTF-8
    in a string field) are answered like any malformed request: never UNKNOWN,
    INVALID_ARGUMENT when they do not parse (test_fixed_edges_...)."""
    fuzz_world.check(method, body, for_rpc(method))


RESERVE = for_rpc("Reserve")
# What the fuzzer once found accepted or answered wrongly, and the exact answer now.
FIXED: list[tuple[str, Message | bytes, set[str]]] = [
    ("ListRuns", pb.ListRunsRequest(created_after=_ts(2**62)), {"created_after"}),
    ("ListRuns", pb.ListRunsRequest(created_after=_ts(0, 10**9)), {"created_after"}),
    (
        "ListRuns",
        pb.ListRunsRequest(created_after=_ts(0), created_before=_ts(-62_135_596_801)),
        {"created_before"},
    ),
    (
        "Reserve",
        pb.ReserveRequest(
            run_id=RESERVE.run, amount_micros=1, ttl=duration_pb2.Duration(nanos=10**9)
        ),
        {"ttl"},
    ),
    (
        "Commit",
        pb.CommitRequest(
            run_id=COMMIT.run,
            reservation_id="held",
            usage=pb.TokenUsage(input_tokens=-1, reasoning_tokens=-1),
        ),
        {"usage.input_tokens", "usage.reasoning_tokens"},
    ),
    ("GetRun", b"\x0a\x03\xff\xfe\xfd", {"request"}),
    ("Watch", b"\x0a\x05ab", {"request"}),
]


@pytest.mark.parametrize(("method", "request_", "fields"), FIXED)
def test_fixed_edges_are_invalid_arguments(
    fuzz_world: World, method: str, request_: Message | bytes, fields: set[str]
) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        fuzz_world.rpc(method, request_)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in bad_request(failure.value).field_violations} == fields


def test_many_violations_fit_in_the_status(fuzz_world: World) -> None:
    """300 bad label keys, each echoed with characters grpc-message
    percent-encodes: the client still gets the whole rich status, with the
    first violations and a count of the rest."""
    request = pb.CreateRunRequest(run_id="%", limit_micros=1, labels=PERCENT_LABELS)
    with pytest.raises(grpc.RpcError) as failure:
        fuzz_world.rpc("CreateRun", request)
    error = failure.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(error).field_violations
    assert violations[0].field == "run_id"
    assert 1 < len(violations) < len(PERCENT_LABELS)
    total = 2 + len(PERCENT_LABELS)  # run_id, the label count, each label
    assert str(error.details()).endswith(f"; and {total - len(violations)} more")
