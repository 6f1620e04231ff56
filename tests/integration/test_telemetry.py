"""OpenTelemetry: span attributes, metric points, the Prometheus endpoint, JSON logs.

Each test runs its own in-process server with in-memory exporters (or the
environment's configuration), drives real RPCs over gRPC and reads what was
recorded.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server import errors, telemetry
from runcap_server.app import RuncapServer
from runcap_server.ledger.model import ModelLedger
from runcap_server.ledger.saga import NO_EXTRAS, ReserveExtras
from runcap_server.ledger.types import CommitResult, ReserveResult
from runcap_server.settings import Settings
from runcap_server.telemetry import JsonFormatter, Telemetry

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

from tests.integration.rpc import new_id

RESERVE = "/runcap.v1.BudgetService/Reserve"
COMMIT = "/runcap.v1.BudgetService/Commit"
WATCH = "/runcap.v1.BudgetService/Watch"


class _UnplugableLedger(ModelLedger):
    """The reference ledger, with its storage 'unplugged' on demand."""

    unplugged = False

    async def reserve(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        amount_micros: int,
        ttl_ms: int | None,
        extras: ReserveExtras = NO_EXTRAS,
    ) -> ReserveResult:
        if self.unplugged:
            raise errors.BackendUnavailable("unplugged by the test")
        return await super().reserve(tenant, run_id, reservation_id, amount_micros, ttl_ms, extras)

    async def commit(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        actual_micros: int,
        actual_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> CommitResult:
        if self.unplugged:
            raise errors.BackendUnavailable("unplugged by the test")
        return await super().commit(
            tenant, run_id, reservation_id, actual_micros, actual_tokens, output_tokens
        )


@dataclass
class Recorded:
    stub: BudgetServiceAsyncStub
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    backend: _UnplugableLedger

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """The metric's points by attributes: a value, or a histogram point."""
        data = self.reader.get_metrics_data()
        out: dict[frozenset[tuple[str, Any]], Any] = {}
        if data is None:
            return out
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        key = frozenset((point.attributes or {}).items())
                        if isinstance(point, NumberDataPoint):
                            out[key] = point.value
                        else:
                            out[key] = point
        return out

    def value(self, name: str, **attrs: str) -> Any:
        return self.points(name).get(frozenset(attrs.items()))


def _attrs(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


def ms(millis: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(millis)
    return duration


@pytest.fixture
async def recorded() -> AsyncIterator[Recorded]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    backend = _UnplugableLedger(default_ttl_ms=60_000)
    settings = Settings(
        listen_addr="127.0.0.1:0",
        backend="memory",
        sweep_interval_ms=20,
        shutdown_grace_ms=100,
        fail_open="always",
    )
    server = RuncapServer(
        settings,
        backend,
        Telemetry(
            tenant=settings.tenant,
            tracer_provider=tracer_provider,
            meter_provider=MeterProvider(metric_readers=[reader]),
        ),
    )
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Recorded(BudgetServiceStub(channel), spans, reader, backend)
    finally:
        await server.stop()


async def _create(stub: BudgetServiceAsyncStub, limit: int, **kwargs: Any) -> str:
    run_id = new_id("run")
    await stub.CreateRun(pb.CreateRunRequest(run_id=run_id, limit_micros=limit, **kwargs))
    return run_id


async def test_reserve_commit_spans_and_metrics(recorded: Recorded) -> None:
    stub = recorded.stub
    run_id = await _create(stub, 1_000_000, team_id="acme", labels={"agent": "coder"})
    allowed = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="r1", amount_micros=700_000)
    )
    assert allowed.decision == budget_pb2.DECISION_ALLOW
    blocked = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="r2", amount_micros=500_000)
    )
    assert blocked.decision == budget_pb2.DECISION_BLOCK
    # 65% of the limit: past the info threshold (60%).
    await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id="r1", actual_micros=650_000))
    # A commit past its hold: an overrun, and 85% (past warn, 80%).
    await stub.Reserve(pb.ReserveRequest(run_id=run_id, reservation_id="r3", amount_micros=100_000))
    await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id="r3", actual_micros=200_000))
    # A retry changes nothing and counts nothing.
    await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id="r3", actual_micros=200_000))

    reserves = {_attrs(s)["runcap.decision"]: _attrs(s) for s in recorded.finished(RESERVE)}
    assert len(recorded.finished(RESERVE)) == 3
    assert reserves["allow"]["runcap.run_id"] == run_id
    assert reserves["allow"]["runcap.reason"] == "within_budget"
    assert reserves["allow"]["runcap.enforcement_mode"] == "hard_gate"
    assert "runcap.blocking_scope" not in reserves["allow"]
    assert reserves["block"]["runcap.reason"] == "insufficient_budget"
    assert reserves["block"]["runcap.blocking_scope"] == f"run:{run_id}"
    assert reserves["block"]["runcap.enforcement_mode"] == "hard_gate"
    commits = recorded.finished(COMMIT)
    assert len(commits) == 3
    assert all(_attrs(s)["runcap.run_id"] == run_id for s in commits)
    assert all(s.parent is None for s in commits)  # the RPC's own span, not ours

    value = recorded.value
    assert value("runcap.decisions", decision="allow", reason="within_budget") == 2
    assert value("runcap.decisions", decision="block", reason="insufficient_budget") == 1
    spend = {"tenant": "default", "team": "acme", "agent": "coder"}
    assert value("runcap.spend.committed_micros", **spend) == 850_000
    assert value("runcap.overrun_micros", **spend) == 100_000
    assert value("runcap.threshold.crossings", level="info") == 1
    assert value("runcap.threshold.crossings", level="warn") == 1
    assert value("runcap.threshold.crossings", level="throttle") is None
    assert value("runcap.holds.active") == 0
    assert value("runcap.reserve.duration").count == 3
    commit_latency = value("runcap.commit.duration")
    assert commit_latency.count == 3
    assert 0 < commit_latency.sum < 5
    assert value("runcap.failed_open") == 0
    assert value("runcap.watchers") == 0
    assert recorded.points("runcap.backend.errors") == {}


async def test_expiry_throttle_and_watchers(recorded: Recorded) -> None:
    stub = recorded.stub
    policy = budget_pb2.RunPolicy(rate_limit=budget_pb2.RateLimit(max_calls=1, window=ms(60_000)))
    run_id = await _create(stub, 1_000_000, policy=policy)
    held = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="r1", amount_micros=1, ttl=ms(50))
    )
    assert held.decision == budget_pb2.DECISION_ALLOW
    throttled = await stub.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="r2", amount_micros=1)
    )
    assert throttled.decision == budget_pb2.DECISION_THROTTLE
    assert recorded.value("runcap.throttles", reason="rate_limited") == 1
    assert recorded.value("runcap.holds.active") == 1

    call = stub.Watch(pb.WatchRequest(run_id=run_id))
    first = await call.read()
    assert isinstance(first, pb.WatchResponse)
    assert first.HasField("snapshot")
    assert recorded.value("runcap.watchers") == 1
    for _ in range(200):  # the sweeper expires the hold within ~20 ms
        if recorded.value("runcap.holds.expired") == 1:
            break
        await asyncio.sleep(0.02)
    assert recorded.value("runcap.holds.expired") == 1
    assert recorded.value("runcap.holds.active") == 0
    call.cancel()
    for _ in range(200):
        if recorded.finished(WATCH) and recorded.value("runcap.watchers") == 0:
            break
        await asyncio.sleep(0.02)
    assert recorded.value("runcap.watchers") == 0
    assert _attrs(recorded.finished(WATCH)[0])["runcap.run_id"] == run_id


async def test_failing_open_is_counted_and_logged_with_the_trace_id(recorded: Recorded) -> None:
    stub = recorded.stub
    run_id = await _create(stub, 1_000_000)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    servicer_log = logging.getLogger("runcap.servicer")
    servicer_log.addHandler(handler)
    recorded.backend.unplugged = True
    try:
        opened = await stub.Reserve(
            pb.ReserveRequest(run_id=run_id, reservation_id="r1", amount_micros=1)
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id="r1", actual_micros=1))
    finally:
        recorded.backend.unplugged = False
        servicer_log.removeHandler(handler)
    assert opened.reason == budget_pb2.DECISION_REASON_BACKEND_UNAVAILABLE
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert recorded.value("runcap.failed_open") == 1
    assert recorded.value("runcap.backend.errors", operation="Reserve") == 1
    assert recorded.value("runcap.backend.errors", operation="Commit") == 1
    assert recorded.value("runcap.holds.active") is None  # failing open holds nothing
    assert recorded.value("runcap.decisions", decision="warn", reason="backend_unavailable") == 1

    (span,) = recorded.finished(RESERVE)
    assert _attrs(span)["runcap.reason"] == "backend_unavailable"
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    (warning,) = [r for r in records if "failed OPEN" in r["message"]]
    assert warning["level"] == "WARNING"
    assert warning["logger"] == "runcap.servicer"
    assert span.context is not None
    assert warning["trace_id"] == format_trace_id(span.context.trace_id)
    assert len(warning["span_id"]) == 16
    assert warning["time"].endswith("+00:00")


def test_json_log_lines_outside_a_span() -> None:
    lines = io.StringIO()
    log = logging.getLogger("runcap.test-telemetry")
    handler = telemetry.log_handler("json", lines)
    log.addHandler(handler)
    try:
        log.warning("hello %s", "there")
    finally:
        log.removeHandler(handler)
    record = json.loads(lines.getvalue())
    assert record["message"] == "hello there"
    assert record["logger"] == "runcap.test-telemetry"
    assert "trace_id" not in record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text: str = reply.read().decode()
        return text


async def test_prometheus_endpoint_serves_the_metrics() -> None:
    port = _free_port()
    settings = Settings.from_env(
        {"RUNCAP_METRICS_ADDR": f"127.0.0.1:{port}"},
        listen_addr="127.0.0.1:0",
        backend="memory",
        shutdown_grace_ms=100,
    )
    # No OTEL_* variables: Prometheus only, no traces.
    server = RuncapServer(settings, telemetry=Telemetry.from_settings(settings, environ={}))
    assert server.telemetry.tracer_provider is None
    grpc_port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub: BudgetServiceAsyncStub = BudgetServiceStub(channel)
            run_id = await _create(stub, 1_000_000, team_id="acme")
            await stub.Reserve(
                pb.ReserveRequest(run_id=run_id, reservation_id="r1", amount_micros=10)
            )
            await stub.Commit(pb.CommitRequest(run_id=run_id, reservation_id="r1", actual_micros=7))
        assert server.telemetry.metrics_port == port
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    finally:
        await server.stop()
    assert 'runcap_decisions_total{decision="allow",reason="within_budget"} 1.0' in text
    assert 'runcap_spend_committed_micros_total{team="acme",tenant="default"} 7.0' in text
    for name in (
        "runcap_reserve_duration_seconds_bucket",
        "runcap_commit_duration_seconds_count",
        "runcap_holds_active",
        "runcap_watchers",
        "runcap_failed_open_total",
        "process_cpu_seconds_total",
    ):
        assert name in text, name
    # Stopped with the server.
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")


def test_nothing_is_configured_by_default() -> None:
    settings = Settings(backend="memory")
    quiet = Telemetry.from_settings(settings, environ={})
    assert not quiet.enabled
    assert quiet.interceptors() == []
    console = Telemetry.from_settings(settings, environ={"OTEL_TRACES_EXPORTER": "console"})
    try:
        assert console.tracer_provider is not None
        assert console.meter_provider is None
        assert len(console.interceptors()) == 2
    finally:
        console.shutdown()
    assert telemetry._exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, "TRACES") == [
        "otlp"
    ]
    assert telemetry._exporters({"OTEL_TRACES_EXPORTER": "none"}, "TRACES") == []
    with pytest.raises(ValueError, match="RUNCAP_METRICS_ADDR"):
        Settings(metrics_addr="nowhere")
    with pytest.raises(ValueError, match="RUNCAP_LOG_FORMAT"):
        Settings(log_format="xml")
