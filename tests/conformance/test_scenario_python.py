"""The Python driver of the client conformance scenario (scenario.json).

A small interpreter: each step names an op of the public Python client
(`runcap.RuncapClient`), its arguments, and what must hold afterwards. The Go
and TypeScript drivers read the same file; see its "about" field for the format.

Expectation rules, shared by all three drivers:

* strings starting with ``$`` are variables, each a fresh run id per execution;
* ``state`` (and the top level of a response) compares only the listed fields;
  enums compare by their runcap.v1 name, int64 fields as ints;
* ``error`` expects a failed call: ``code`` is the gRPC status code name,
  ``reason`` the typed error's ErrorInfo reason, ``field_violations`` the
  offending field names (in any order).

An expectation key or argument the driver does not know fails the step, so a
scenario that grows cannot be passed by a driver that silently skips checks.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from runcap import REASON_TO_ERROR, InvalidArgumentError, RuncapClient, RuncapError, WatchStream
from runcap.v1 import budget_pb2, budget_service_pb2
from tests.redis_servers import RedisCluster
from tests.servers import ServerProcess

SCENARIO_PATH = Path(__file__).with_name("scenario.json")

WATCH_TIMEOUT_S = 10.0
"""How long a watch step waits for its events before it fails."""

Json = Any
"""A value decoded from the scenario file."""


class StepFailed(AssertionError):
    """An expectation of the current step did not hold."""


def load_scenario() -> list[dict[str, Json]]:
    with SCENARIO_PATH.open(encoding="utf-8") as file:
        scenario = json.load(file)
    steps: list[dict[str, Json]] = scenario["steps"]
    return steps


# --- comparing protobuf messages with JSON expectations ---------------------------------


def _check(condition: bool, path: str, expected: object, actual: object) -> None:
    if not condition:
        raise StepFailed(f"{path}: expected {expected!r}, got {actual!r}")


def _field_value(message: Message, field: FieldDescriptor) -> object:
    """A field's value in JSON terms: enum names, ints, strs, bools, dicts."""
    value = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def check_message(message: Message, expected: Mapping[str, Json], path: str) -> None:
    """Every key of `expected` must equal the field of the same name; nested
    messages (``state``) compare their listed fields only."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, want in expected.items():
        where = f"{path}.{key}"
        # The stubs type descriptors as a union of the pure-Python and upb classes.
        field = cast(FieldDescriptor | None, fields.get(key))
        if field is None:
            raise StepFailed(f"{where}: {message.DESCRIPTOR.name} has no field {key!r}")
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.message_type is not None and not is_map:
            if not isinstance(want, dict):
                raise StepFailed(f"{where}: expected an object in the scenario, got {want!r}")
            check_message(getattr(message, key), want, where)
            continue
        got = _field_value(message, field)
        if field.type == FieldDescriptor.TYPE_BOOL:
            _check(isinstance(want, bool) and got is want, where, want, got)
        elif isinstance(got, int):
            # Money and revisions are int64: JSON numbers, compared as ints.
            ok = (
                isinstance(want, int | float)
                and not isinstance(want, bool)
                and float(want).is_integer()
                and int(want) == got
            )
            _check(ok, where, want, got)
        else:
            _check(want == got, where, want, got)


# --- the interpreter ---------------------------------------------------------------------


class Driver:
    """Runs one execution of the scenario against one server."""

    def __init__(self, client: RuncapClient) -> None:
        self.client = client
        self.variables: dict[str, str] = {}
        self.ops: dict[str, Callable[[dict[str, Json], dict[str, Json]], None]] = {
            "create_run": self.create_run,
            "get_run": self.get_run,
            "reserve": self.reserve,
            "commit": self.commit,
            "refund": self.refund,
            "close_run": self.close_run,
            "reserve_concurrently": self.reserve_concurrently,
            "watch": self.watch,
            "watch_snapshot": self.watch_snapshot,
            "watch_resume": self.watch_resume,
        }

    def resolve(self, value: Json) -> Json:
        """Replaces a ``$variable`` with its fresh id for this execution."""
        if isinstance(value, str) and value.startswith("$"):
            if value not in self.variables:
                self.variables[value] = f"conf-{value[1:]}-{uuid.uuid4().hex[:12]}"
            return self.variables[value]
        return value

    def run_step(self, step: Mapping[str, Json]) -> None:
        op = step["op"]
        if op not in self.ops:
            raise StepFailed(f"unknown op {op!r}")
        args = {k: self.resolve(v) for k, v in step.items() if k not in ("name", "op", "expect")}
        expect = dict(step.get("expect", {}))
        self.ops[op](args, expect)

    # Unary ops: the call either returns a response or raises a typed error.

    def _unary(
        self,
        args: dict[str, Json],
        expect: dict[str, Json],
        required: tuple[str, ...],
        optional: tuple[str, ...],
        call: Callable[[dict[str, Json]], Message],
        extra: Callable[[Message, dict[str, Json]], None] | None = None,
    ) -> None:
        _check_args(args, required, optional)
        want_error = expect.pop("error", None)
        if want_error is not None and expect:
            raise StepFailed(f"expect: an error step cannot also expect {sorted(expect)}")
        try:
            response = call(args)
        except RuncapError as error:
            if want_error is None:
                raise StepFailed(f"unexpected error: {error!r}") from error
            check_error(error, want_error)
            return
        if want_error is not None:
            raise StepFailed(f"expected error {want_error}, got a response: {response}")
        if extra is not None:
            extra(response, expect)
        check_message(response, expect, "response")

    def create_run(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        self._unary(
            args,
            expect,
            ("run_id", "limit_micros"),
            ("labels",),
            lambda a: self.client.create_run(
                a["run_id"], limit_micros=a["limit_micros"], labels=a.get("labels")
            ),
        )

    def get_run(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        def run_fields(response: Message, expect: dict[str, Json]) -> None:
            # GetRunResponse keeps labels in its Run; the scenario lists them flat.
            assert isinstance(response, budget_service_pb2.GetRunResponse)
            if "labels" in expect:
                check_message(response.run, {"labels": expect.pop("labels")}, "response.run")

        self._unary(
            args,
            expect,
            ("run_id",),
            (),
            lambda a: self.client.get_run(a["run_id"]),
            run_fields,
        )

    def reserve(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        self._unary(
            args,
            expect,
            ("run_id", "reservation_id", "amount_micros"),
            ("ttl_ms",),
            lambda a: self.client.reserve_once(
                a["run_id"],
                a["amount_micros"],
                reservation_id=a["reservation_id"],
                ttl=None if a.get("ttl_ms") is None else a["ttl_ms"] / 1000,
            ),
        )

    def commit(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        self._unary(
            args,
            expect,
            ("run_id", "reservation_id", "actual_micros"),
            (),
            lambda a: self.client.commit(a["run_id"], a["reservation_id"], a["actual_micros"]),
        )

    def refund(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        self._unary(
            args,
            expect,
            ("run_id", "reservation_id"),
            (),
            lambda a: self.client.refund(a["run_id"], a["reservation_id"]),
        )

    def close_run(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        self._unary(args, expect, ("run_id",), (), lambda a: self.client.close_run(a["run_id"]))

    def reserve_concurrently(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        _check_args(args, ("run_id", "count", "amount_micros", "id_prefix"), ())
        _check_expect(expect, ("allowed", "blocked", "block_reason", "state"))
        run_id, count = args["run_id"], args["count"]
        start = threading.Barrier(count)

        def one(i: int) -> budget_service_pb2.ReserveResponse:
            start.wait(WATCH_TIMEOUT_S)  # release them all at once
            return self.client.reserve_once(
                run_id, args["amount_micros"], reservation_id=f"{args['id_prefix']}{i}"
            )

        with ThreadPoolExecutor(max_workers=count) as pool:
            responses = list(pool.map(one, range(count)))
        allowed = [r for r in responses if r.decision == budget_pb2.DECISION_ALLOW]
        blocked = [r for r in responses if r.decision == budget_pb2.DECISION_BLOCK]
        if "allowed" in expect:
            _check(len(allowed) == expect["allowed"], "allowed", expect["allowed"], len(allowed))
        if "blocked" in expect:
            _check(len(blocked) == expect["blocked"], "blocked", expect["blocked"], len(blocked))
        _check(
            len(allowed) + len(blocked) == count,
            "decisions",
            f"{count} allow or block",
            [budget_pb2.Decision.Name(r.decision) for r in responses],
        )
        if "block_reason" in expect:
            reasons = sorted({budget_pb2.DecisionReason.Name(r.reason) for r in blocked})
            want = expect["block_reason"]
            _check(reasons in ([want], []), "block_reason", want, reasons)
        if "state" in expect:
            after = self.client.get_run(run_id)
            check_message(after.state, expect["state"], "get_run.state")

    # Watch ops. Streams are closed by a timer if the events do not come.

    def _open_watch(self, run_id: str, after_revision: int | None) -> WatchStream:
        # resume=False: this driver does its own resume (watch_resume), and an
        # unexpected disconnect must fail the step rather than be hidden.
        return self.client.watch(run_id, after_revision=after_revision, resume=False)

    def _events(
        self, stream: WatchStream, until_revision: int, stop_after: int | None = None
    ) -> list[budget_service_pb2.WatchResponse]:
        """Event messages until `until_revision` (or `stop_after` of them);
        progress heartbeats are skipped; snapshots fail the step."""
        seen: list[budget_service_pb2.WatchResponse] = []
        timer = threading.Timer(WATCH_TIMEOUT_S, stream.close)
        timer.start()
        try:
            for message in stream:
                kind = message.WhichOneof("kind")
                if kind == "progress":
                    continue
                if kind != "event":
                    raise StepFailed(f"watch: expected events, got {kind}: {message}")
                seen.append(message)
                if message.revision >= until_revision or len(seen) == stop_after:
                    break
        finally:
            timer.cancel()
        return seen

    def watch(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        _check_args(args, ("run_id", "after_revision", "until_revision"), ())
        _check_expect(expect, ("revisions", "event_types", "error"))
        try:
            with self._open_watch(args["run_id"], args["after_revision"]) as stream:
                events = self._events(stream, args["until_revision"])
        except RuncapError as error:
            if "error" not in expect:
                raise StepFailed(f"unexpected error: {error!r}") from error
            check_error(error, expect["error"])
            return
        if "error" in expect:
            raise StepFailed(f"expected error {expect['error']}, got events {events}")
        _check_events(events, expect)

    def watch_snapshot(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        _check_args(args, ("run_id",), ())
        _check_expect(expect, ("revision", "state"))
        with self._open_watch(args["run_id"], None) as stream:
            timer = threading.Timer(WATCH_TIMEOUT_S, stream.close)
            timer.start()
            try:
                first = next(stream, None)
            finally:
                timer.cancel()
        if first is None or first.WhichOneof("kind") != "snapshot":
            raise StepFailed(f"watch: the first message is not a snapshot: {first}")
        if "revision" in expect:
            _check(first.revision == expect["revision"], "revision", expect["revision"], first)
        if "state" in expect:
            check_message(first.snapshot, expect["state"], "snapshot")

    def watch_resume(self, args: dict[str, Json], expect: dict[str, Json]) -> None:
        _check_args(args, ("run_id", "after_revision", "disconnect_after", "until_revision"), ())
        _check_expect(expect, ("revisions", "event_types"))
        run_id, until = args["run_id"], args["until_revision"]
        with self._open_watch(run_id, args["after_revision"]) as stream:
            first = self._events(stream, until, stop_after=args["disconnect_after"])
            resume_from = stream.last_revision
        _check(
            len(first) == args["disconnect_after"],
            "events before the disconnect",
            args["disconnect_after"],
            [m.revision for m in first],
        )
        assert resume_from is not None
        _check(
            resume_from == first[-1].revision,
            "resume point",
            first[-1].revision,
            resume_from,
        )
        with self._open_watch(run_id, resume_from) as stream:
            rest = self._events(stream, until)
        _check_events(first + rest, expect)


def _check_args(
    args: Mapping[str, Json], required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    missing = [k for k in required if k not in args]
    unknown = [k for k in args if k not in required + optional]
    if missing or unknown:
        raise StepFailed(f"arguments: missing {missing}, unknown {unknown}")


def _check_expect(expect: Mapping[str, Json], known: tuple[str, ...]) -> None:
    unknown = [k for k in expect if k not in known]
    if unknown:
        raise StepFailed(f"expect: unknown keys {unknown}")


def _check_events(
    events: list[budget_service_pb2.WatchResponse], expect: Mapping[str, Json]
) -> None:
    revisions = [m.revision for m in events]
    if "revisions" in expect:
        _check(revisions == expect["revisions"], "revisions", expect["revisions"], revisions)
    if "event_types" in expect:
        types = [budget_pb2.EventType.Name(m.event.type) for m in events]
        _check(types == expect["event_types"], "event_types", expect["event_types"], types)
    for message in events:
        # Each event carries the state after it, at the same revision.
        _check(
            message.event.state.revision == message.revision,
            f"revision {message.revision}: event.state.revision",
            message.revision,
            message.event.state.revision,
        )


def check_error(error: RuncapError, expected: Mapping[str, Json]) -> None:
    _check_expect(expected, ("code", "reason", "field_violations"))
    if "code" in expected:
        want = grpc.StatusCode[expected["code"]]
        _check(error.code == want, "error.code", want.name, error.code.name)
    if "reason" in expected:
        _check(error.reason == expected["reason"], "error.reason", expected["reason"], error)
        kind = REASON_TO_ERROR[expected["reason"]]
        _check(isinstance(error, kind), "error class", kind.__name__, type(error).__name__)
    if "field_violations" in expected:
        if not isinstance(error, InvalidArgumentError):
            raise StepFailed(f"error: expected field violations, got {error!r}")
        fields = sorted(field for field, _ in error.field_violations)
        want_fields = sorted(expected["field_violations"])
        _check(fields == want_fields, "error.field_violations", want_fields, fields)


# --- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_cluster_target(redis_cluster: RedisCluster) -> Iterator[str]:
    """A server of this module's own on the session's 3-primary Redis cluster."""
    server = ServerProcess(
        None,
        env={
            "RUNCAP_BACKEND": "redis",
            "RUNCAP_REDIS_CLUSTER_NODES": ",".join(redis_cluster.startup_nodes),
            "RUNCAP_REDIS_NAMESPACE": f"conf-{uuid.uuid4().hex[:10]}",
        },
    ).start()
    try:
        yield server.target
    finally:
        server.stop()


@pytest.fixture
def external_target() -> str:
    """A server someone else started (RUNCAP_CONFORMANCE_TARGET), shared with the other drivers."""
    target = os.environ.get("RUNCAP_CONFORMANCE_TARGET", "")
    if not target:
        pytest.skip("RUNCAP_CONFORMANCE_TARGET is not set")
    return target


@pytest.mark.parametrize(
    "target_fixture",
    [
        pytest.param("server_target", id="sqlite"),
        pytest.param("redis_cluster_target", id="redis-cluster", marks=pytest.mark.redis),
        pytest.param("external_target", id="external"),
    ],
)
def test_conformance_scenario(request: pytest.FixtureRequest, target_fixture: str) -> None:
    target: str = request.getfixturevalue(target_fixture)
    steps = load_scenario()
    with RuncapClient(target) as client:
        driver = Driver(client)
        for number, step in enumerate(steps, 1):
            try:
                driver.run_step(step)
            except (StepFailed, RuncapError) as failure:
                pytest.fail(
                    f"step {number} {step['name']!r} (op {step['op']}) failed: {failure}",
                    pytrace=False,
                )
