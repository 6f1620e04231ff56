"""The dashboard's pure parts: the event-stream encoding, the JSON views
(burn rate, time to exhaustion, flags), request checking and the loopback
address. The HTTP app and the bridge run against real servers in
tests/integration/test_dashboard_http.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server.dashboard import params, sse, views
from runcap_server.dashboard.api import loopback_target
from runcap_server.liveview import RunModel

USD = 1_000_000
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def parse_sse(stream: bytes) -> list[tuple[str, str]]:
    """The messages of an event stream, read as the HTML standard says a
    browser reads them (fields per line, a blank line ends a message)."""
    messages = []
    event, data = "", list[str]()
    for line in stream.decode().split("\n"):
        if line == "":
            if data:
                messages.append((event or "message", "\n".join(data)))
            event, data = "", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    return messages


# --------------------------------------------------------------------------
# Server-sent events


def test_an_event_is_a_name_and_one_json_value() -> None:
    encoded = sse.encode("change", {"run_id": "r-1", "revision": 7})
    assert encoded == b'event: change\ndata: {"run_id":"r-1","revision":7}\n\n'


def test_any_text_survives_the_stream() -> None:
    # Line and paragraph separators are not SSE line ends; CR and LF are
    # escaped by JSON. Splitting on what Python calls lines would break these.
    label = "a\nb\r\nc\u2028d\u2029e\x85f\x1cg é"
    stream = sse.encode("snapshot", {"labels": {"note": label}}) + sse.encode("live", {"runs": {}})
    messages = parse_sse(stream)
    assert [name for name, _ in messages] == ["snapshot", "live"]
    assert json.loads(messages[0][1]) == {"labels": {"note": label}}


@pytest.mark.parametrize("name", ["", "two words", "x\ndata: injected", "1st"])
def test_event_names_cannot_inject_fields(name: str) -> None:
    with pytest.raises(ValueError, match="SSE event name"):
        sse.encode(name, {})


def test_floats_that_are_not_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        sse.encode("live", {"rate": float("nan")})


# --------------------------------------------------------------------------
# Views


def state(
    committed: int,
    reserved: int = 0,
    *,
    status: budget_pb2.RunStatus.ValueType = budget_pb2.RUN_STATUS_OPEN,
    blocked: bool = False,
    revision: int = 1,
) -> budget_pb2.BudgetState:
    limit = 5 * USD
    return budget_pb2.BudgetState(
        run_id="r",
        limit_micros=limit,
        committed_micros=committed,
        reserved_micros=reserved,
        remaining_micros=max(0, limit - committed - reserved),
        status=status,
        blocked=blocked,
        revision=revision,
        digest=f"d{revision}",
    )


def change(
    type_: budget_pb2.EventType.ValueType,
    at: float,
    after: budget_pb2.BudgetState,
    **fields: object,
) -> pb.WatchResponse:
    stamp = Timestamp()
    stamp.FromMicroseconds(int(at * 1e6))
    event = budget_pb2.BudgetEvent(type=type_, time=stamp, state=after, **fields)  # type: ignore[arg-type]
    return pb.WatchResponse(revision=after.revision, event=event)


def test_live_view_has_the_burn_rate_of_the_last_minute_and_the_time_left() -> None:
    model = RunModel("r")
    model.apply(pb.WatchResponse(snapshot=state(0)), received_at=1000.0)
    assert views.live_json(model, 1000.0) == {
        "burn_micros_per_minute": 0.0,
        "burn": "$0.00/min",
        "seconds_to_exhaustion": None,
        "exhausted_in": "-",
        "pending_approvals": [],
        "flags": [],
    }
    # $1.50 committed 30 s in: $3.00/min; $3.50 left lasts 70 s at that rate.
    model.apply(change(budget_pb2.EVENT_TYPE_COMMITTED, 1030.0, state(1_500_000)), 1030.0)
    live = views.live_json(model, 1030.0)
    assert live["burn_micros_per_minute"] == pytest.approx(3 * USD)
    assert live["burn"] == "$3.00/min"
    assert live["seconds_to_exhaustion"] == pytest.approx(70.0)
    assert live["exhausted_in"] == "1m10s"
    # A minute without commits: nothing burns.
    assert views.live_json(model, 1100.0)["burn"] == "$0.00/min"


def test_live_view_flags_suspension_blocks_and_approvals() -> None:
    model = RunModel("r")
    model.apply(pb.WatchResponse(snapshot=state(0)), received_at=1.0)
    after = state(0, status=budget_pb2.RUN_STATUS_SUSPENDED, blocked=True, revision=2)
    model.apply(change(budget_pb2.EVENT_TYPE_BLOCKED, 2.0, after), 2.0)
    requested = state(0, status=budget_pb2.RUN_STATUS_SUSPENDED, blocked=True, revision=3)
    approval = "r/approval:spend"
    model.apply(
        change(budget_pb2.EVENT_TYPE_APPROVAL_REQUESTED, 3.0, requested, approval_id=approval), 3.0
    )
    live = views.live_json(model, 3.0)
    assert live["flags"] == ["SUSPENDED", "APPROVAL(1)", "BLOCKED"]
    assert live["pending_approvals"] == [approval]


def test_states_runs_and_changes_as_json() -> None:
    view = views.state_json(state(2 * USD, 600_000, status=budget_pb2.RUN_STATUS_SUSPENDED))
    assert view["status"] == "suspended"
    assert view["threshold"] == "none"
    assert (view["committed_micros"], view["reserved_micros"], view["remaining_micros"]) == (
        2 * USD,
        600_000,
        2_400_000,
    )
    run = budget_pb2.Run(run_id="r", limit_micros=5 * USD, team_id="ml", labels={"agent": "coder"})
    run.policy.thresholds.warn_percent = 80
    run.create_time.FromMilliseconds(1_700_000_000_123)
    run.approvals.add(approval_id="r/approval:spend", status=budget_pb2.APPROVAL_STATUS_PENDING)
    view = views.run_json(run)
    assert view["thresholds"] == {"info": 0, "warn": 80, "throttle": 0}
    assert view["create_time_ms"] == 1_700_000_000_123
    assert view["close_time_ms"] is None
    assert view["approvals"] == [
        {"approval_id": "r/approval:spend", "status": "pending", "meter": ""}
    ]
    blocked = budget_pb2.BudgetEvent(
        type=budget_pb2.EVENT_TYPE_BLOCKED,
        amount_micros=300_000,
        reason=budget_pb2.DECISION_REASON_SUSPENDED,
        blocking_scope=budget_pb2.ScopeRef(kind=budget_pb2.SCOPE_KIND_RUN, id="r"),
    )
    view = views.event_json(blocked)
    assert view["type"] == "blocked"
    assert view["reason"] == "suspended"
    assert view["blocking_scope"] == {"kind": "run", "id": "r"}
    assert view["time_ms"] is None
    # A number newer than the stubs stays a number rather than failing.
    assert views.event_json(budget_pb2.BudgetEvent(type=99))["type"] == "99"  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Requests


def test_the_key_comes_from_a_bearer_header_only() -> None:
    assert params.api_key("Bearer rck_ops_abc") == "rck_ops_abc"
    assert params.api_key("bearer  rck_ops_abc ") == "rck_ops_abc"
    assert params.api_key(None) is None
    assert params.api_key("Basic dXNlcjpwYXNz") is None
    assert params.api_key("Bearer two words") is None
    assert params.api_key("Bearer caf\u00e9") is None  # metadata is ASCII


def test_a_watch_request_is_checked_field_by_field() -> None:
    spec = params.watch_spec(
        {
            "runs": ["a", "b", "a"],
            "active_since": "24h",
            "history": 50,
            "resume": {"a": {"revision": 4, "digest": "x"}},
        },
        NOW,
    )
    assert spec.runs == ("a", "b")
    assert spec.active_since == NOW - timedelta(hours=24)
    assert spec.resume == {"a": params.Cursor(4, "x")}
    assert spec.history == 50
    assert params.watch_spec({"active_since": "2026-11-01"}, NOW).active_since == datetime(
        2026, 11, 1, tzinfo=UTC
    )
    bad: list[tuple[object, str]] = [
        ([], "body"),
        ({}, "runs"),
        ({"runs": "a"}, "runs"),
        ({"runs": [""]}, "runs"),
        ({"runs": [f"r{i}" for i in range(201)]}, "runs"),
        ({"runs": ["a"], "active_since": "soon"}, "active_since"),
        ({"runs": ["a"], "history": -1}, "history"),
        ({"runs": ["a"], "history": True}, "history"),
        ({"runs": ["a"], "history": 5001}, "history"),
        ({"runs": ["a"], "resume": {"a": {"revision": 0}}}, "resume.a"),
        ({"runs": ["a"], "resume": {"a": 3}}, "resume.a"),
        ({"runs": ["a"], "resume": {"a": {"revision": 2, "digest": 7}}}, "resume.a"),
        ({"runs": ["a"], "since": "1h"}, "since"),
    ]
    for body, field in bad:
        with pytest.raises(params.BadRequest) as raised:
            params.watch_spec(body, NOW)
        assert raised.value.field == field, body


def test_other_inputs() -> None:
    assert params.moment("since", "7d", NOW) == NOW - timedelta(days=7)
    with pytest.raises(params.BadRequest, match="since: 'yesterday'"):
        params.moment("since", "yesterday", NOW)
    assert params.group_by("agent") == "agent"
    with pytest.raises(params.BadRequest, match="group_by"):
        params.group_by("tenant")
    assert params.approval_id({"approval_id": "r/approval:spend"}) == "r/approval:spend"
    for body in ({}, {"approval_id": 3}, ["r/approval:spend"], {"approval_id": ""}):
        with pytest.raises(params.BadRequest, match="approval_id"):
            params.approval_id(body)


def test_the_loopback_reaches_the_api_port_from_the_same_machine() -> None:
    assert loopback_target("0.0.0.0:50051", 50051) == "127.0.0.1:50051"
    assert loopback_target("127.0.0.1:0", 41234) == "127.0.0.1:41234"
    assert loopback_target("[::]:0", 41234) == "[::1]:41234"
    assert loopback_target("10.1.2.3:50051", 50051) == "10.1.2.3:50051"
    assert loopback_target(":50051", 50051) == "127.0.0.1:50051"
