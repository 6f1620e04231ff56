"""OpenTelemetry: a span per RPC, the service's metrics, their exporters, JSON logs.

Nothing is exported unless configured: traces when OTEL_TRACES_EXPORTER (or an
OTLP endpoint) says so, metrics over OTLP likewise, and a Prometheus scrape
endpoint when RUNCAP_METRICS_ADDR is set. With nothing configured the server
gets no interceptor at all, so an RPC costs exactly what it did without
telemetry. docs/operations.md lists the metrics and their attributes.

Everything is read from the responses the servicer already builds (one server
interceptor), so the servicer stays free of telemetry code and no RPC makes an
extra backend read for it.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from runcap.v1 import budget_pb2, budget_service_pb2
from runcap_server import auth
from runcap_server.ledger.types import (
    Decision,
    DecisionReason,
    EnforcementMode,
    ReservationStatus,
    ScopeKind,
    Threshold,
)
from runcap_server.settings import Settings

_log = logging.getLogger("runcap.telemetry")
_SERVICE = "/runcap.v1.BudgetService/"
# Runs whose attribution (team, agent label) and threshold band a replica remembers.
RUN_CACHE_SIZE = 65_536
# Latency buckets in seconds: a Reserve takes tens of microseconds in memory,
# milliseconds on SQLite or Redis.
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

# Attribute values: the ledger's enum names in lower case (the enums equal the proto's).
_DECISION = {int(d): d.name.lower() for d in Decision}
_REASON = {int(r): r.name.lower() for r in DecisionReason}
_MODE = {int(m): m.name.lower() for m in EnforcementMode}
_SCOPE = {int(k): k.name.lower() for k in ScopeKind}
_LEVELS = tuple(Threshold)[1:]
_LEVEL_KEYS = {int(t): (("level", t.name.lower()),) for t in _LEVELS}
_HOLDING = frozenset({int(Decision.ALLOW), int(Decision.WARN), int(Decision.DOWNGRADE)})
_THROTTLE = int(Decision.THROTTLE)
_FAILED_OPEN = int(DecisionReason.BACKEND_UNAVAILABLE)
_COMMITTED = int(ReservationStatus.COMMITTED)
_RELEASED = int(ReservationStatus.RELEASED)


# --- logs ------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the trace
    and span ids when the record is logged inside a span."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = format_trace_id(context.trace_id)
            line["span_id"] = format_span_id(context.span_id)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def log_handler(log_format: str, stream: Any = None) -> logging.Handler:
    """The handler `runcap serve` logs through (RUNCAP_LOG_FORMAT=json|text)."""
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


# --- configuration ---------------------------------------------------------


def _exporters(environ: Mapping[str, str], signal: str) -> list[str]:
    """The exporters OTEL_<SIGNAL>_EXPORTER names; unset: otlp when an OTLP
    endpoint is configured, else none (no exporter, no network by default)."""
    names = environ.get(f"OTEL_{signal}_EXPORTER", "").strip()
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [n.strip().lower() for n in names.split(",") if n.strip() not in ("", "none")]


def _otlp_protocol(environ: Mapping[str, str], signal: str) -> str:
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()


def _resource() -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; service.name runcap by default."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "runcap"}))
    return resource


def _span_exporter(name: str, environ: Mapping[str, str]) -> SpanExporter | None:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp" and _otlp_protocol(environ, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    _log.warning(
        "OTEL_TRACES_EXPORTER=%s (protocol %s) is not supported: only otlp over grpc and "
        "console; no traces are exported there",
        name,
        _otlp_protocol(environ, "TRACES"),
    )
    return None


def _metric_reader(name: str, environ: Mapping[str, str]) -> MetricReader | None:
    if name == "otlp" and _otlp_protocol(environ, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        # Export interval and timeout: OTEL_METRIC_EXPORT_INTERVAL / _TIMEOUT.
        return PeriodicExportingMetricReader(OTLPMetricExporter())
    if name == "prometheus":
        return None  # served by RUNCAP_METRICS_ADDR
    _log.warning(
        "OTEL_METRICS_EXPORTER=%s (protocol %s) is not supported: only otlp over grpc "
        "(and RUNCAP_METRICS_ADDR for Prometheus)",
        name,
        _otlp_protocol(environ, "METRICS"),
    )
    return None


def split_host_port(addr: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464"; "[::1]:9464" for IPv6."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65_535:
        raise ValueError(f"{addr!r} is not a host:port address")
    return host.strip("[]") or "0.0.0.0", int(port)


# --- runs --------------------------------------------------------------------


Key = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Run:
    """What a replica knows of a run, from the responses it served."""

    # The attributes its spend is counted with: tenant, and team and agent
    # once a CreateRun or GetRun answer showed them.
    key: Key
    # The highest threshold band seen, and the levels its policy turned off.
    threshold: int = 0
    silent: frozenset[int] = field(default_factory=frozenset)


class _Tally:
    """Cumulative sums by attribute set, kept in plain ints on the hot path
    (an SDK counter's add costs microseconds) and read by an observable
    instrument when a reader collects."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[Key, int] = {}

    def add(self, key: Key, amount: int = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def get(self, key: Key = ()) -> int:
        return self.values.get(key, 0)

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        # Collection runs on the exporter's (or the scrape's) thread: copy first.
        return [Observation(v, dict(k)) for k, v in self.values.copy().items()]


# --- the telemetry object ----------------------------------------------------


class Telemetry:
    """The server's instruments and providers. Built once per server.

    `tracer_provider` / `meter_provider` may be injected (tests pass SDK
    providers with in-memory exporters); `from_settings` builds them from the
    environment. Without either there is nothing to record and `interceptors`
    is empty.
    """

    def __init__(
        self,
        *,
        tenant: str = "default",
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        metrics_addr: str = "",
        prometheus_registry: Any = None,
    ) -> None:
        self.tenant = tenant
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.metrics_addr = metrics_addr
        self.metrics_port = 0
        self._registry = prometheus_registry
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        # (tenant, run) -> what this replica knows of the run, newest last.
        self._runs: collections.OrderedDict[tuple[str, str], _Run] = collections.OrderedDict()
        self._tenant_keys: dict[str, Key] = {}
        self._failed_open: Callable[[], int] | None = None
        self._watchers: Callable[[], int] | None = None
        self._decision_keys: dict[tuple[int, int], Key] = {}
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self.decisions = _Tally()
        self.spend = _Tally()
        self.overrun = _Tally()
        self.holds_active = _Tally()
        self.holds_expired = _Tally()
        self.thresholds = _Tally()
        self.throttles = _Tally()
        self.backend_errors = _Tally()
        provider: metrics.MeterProvider = meter_provider or metrics.NoOpMeterProvider()
        meter = provider.get_meter("runcap")
        self.reserve_duration = meter.create_histogram(
            "runcap.reserve.duration",
            "s",
            "Time to answer a Reserve.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.commit_duration = meter.create_histogram(
            "runcap.commit.duration",
            "s",
            "Time to answer a Commit.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        for name, tally, unit, description in (
            ("runcap.decisions", self.decisions, "{decision}", "Reserve decisions."),
            (
                "runcap.spend.committed_micros",
                self.spend,
                "{micro_usd}",
                "Spend committed, in micro-USD, by tenant, team and agent label.",
            ),
            (
                "runcap.overrun_micros",
                self.overrun,
                "{micro_usd}",
                "Spend committed past its hold or after it expired, in micro-USD.",
            ),
            (
                "runcap.holds.expired",
                self.holds_expired,
                "{hold}",
                "Holds released by the expiry sweeper.",
            ),
            (
                "runcap.threshold.crossings",
                self.thresholds,
                "{crossing}",
                "Threshold bands reached, by level.",
            ),
            ("runcap.throttles", self.throttles, "{decision}", "Reserves throttled, by reason."),
            (
                "runcap.backend.errors",
                self.backend_errors,
                "{error}",
                "Storage failures, by operation (the RPC, sweep or ping).",
            ),
        ):
            meter.create_observable_counter(name, [tally.observe], unit, description)
        meter.create_observable_up_down_counter(
            "runcap.holds.active",
            [self.holds_active.observe],
            "{hold}",
            "Holds made minus holds settled or expired, as counted by this process.",
        )
        meter.create_observable_counter(
            "runcap.failed_open",
            [self._observe_failed_open],
            "{decision}",
            "Reserves answered without the storage (RUNCAP_FAIL_OPEN).",
        )
        meter.create_observable_up_down_counter(
            "runcap.watchers",
            [self._observe_watchers],
            "{stream}",
            "Open Watch streams.",
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> Telemetry:
        """Providers and exporters as the environment configures them (OTEL_*
        and RUNCAP_METRICS_ADDR); none when nothing is configured."""
        environ = os.environ if environ is None else environ
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(tenant=settings.tenant)
        tracer_provider: TracerProvider | None = None
        span_exporters = [
            e for e in (_span_exporter(n, environ) for n in _exporters(environ, "TRACES")) if e
        ]
        if span_exporters:
            tracer_provider = TracerProvider(resource=_resource())
            for exporter in span_exporters:
                tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        readers = [
            r for r in (_metric_reader(n, environ) for n in _exporters(environ, "METRICS")) if r
        ]
        registry = None
        if settings.metrics_addr:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector

            # Our own registry: a server's metrics, plus the process's.
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            GCCollector(registry=registry)
            readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=registry))
        meter_provider = (
            MeterProvider(metric_readers=readers, resource=_resource()) if readers else None
        )
        return cls(
            tenant=settings.tenant,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            metrics_addr=settings.metrics_addr,
            prometheus_registry=registry,
        )

    @property
    def enabled(self) -> bool:
        return self.tracer_provider is not None or self.meter_provider is not None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        """The server's interceptors, outermost first: the OpenTelemetry span
        per RPC (when tracing), then ours (metrics and span attributes)."""
        if not self.enabled:
            return []
        chain: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if self.tracer_provider is not None:
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            chain.append(
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    tracer_provider=self.tracer_provider
                )
            )
        chain.append(_Interceptor(self))
        return chain

    def observe(
        self,
        *,
        failed_open: Callable[[], int] | None = None,
        watchers: Callable[[], int] | None = None,
    ) -> None:
        """Where the observable instruments read from (the servicer, the hub)."""
        self._failed_open = failed_open
        self._watchers = watchers

    def _observe_failed_open(self, options: CallbackOptions) -> Iterable[Observation]:
        source = self._failed_open
        return [Observation(source())] if source else []

    def _observe_watchers(self, options: CallbackOptions) -> Iterable[Observation]:
        source = self._watchers
        return [Observation(source())] if source else []

    def start(self) -> None:
        """Serve the Prometheus endpoint, when RUNCAP_METRICS_ADDR sets one."""
        if not self.metrics_addr or self._registry is None:
            return
        from prometheus_client import start_http_server

        host, port = split_host_port(self.metrics_addr)
        self._http = start_http_server(port, host, registry=self._registry)
        self.metrics_port = self._http[0].server_port
        _log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    def shutdown(self) -> None:
        """Stop the endpoint and flush what the exporters still hold."""
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:
                    _log.exception("telemetry shutdown failed")

    # --- recording (called by the interceptor, the sweeper, the health check) ---

    def expired(self, released: int) -> None:
        """The sweeper released `released` expired holds."""
        self.holds_expired.add((), released)
        self.holds_active.add((), -released)

    def backend_error(self, operation: str) -> None:
        self.backend_errors.add((("operation", operation),))

    def _key(self, run_id: str) -> tuple[str, str]:
        """(tenant, run) of the RPC being served: its key's tenant, else the server's."""
        principal = auth.CALLER.get()
        return (self.tenant if principal is None else principal.tenant), run_id

    def _run(self, key: tuple[str, str]) -> _Run:
        run = self._runs.get(key)
        if run is None:
            tenant = self._tenant_keys.get(key[0])
            if tenant is None:
                tenant = self._tenant_keys[key[0]] = (("tenant", key[0]),)
            run = self._runs[key] = _Run(tenant)
            if len(self._runs) > RUN_CACHE_SIZE:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(key)
        return run

    def _learn(self, run: budget_pb2.Run, state: budget_pb2.BudgetState) -> None:
        """A CreateRun or GetRun answer: who the run's spend is attributed to."""
        key = self._key(run.run_id)
        attrs = [("tenant", key[0])]
        if run.team_id:
            attrs.append(("team", run.team_id))
        agent = run.labels.get("agent", "")
        if agent:
            attrs.append(("agent", agent))
        known = self._run(key)
        known.key = tuple(attrs)
        t = run.policy.thresholds
        known.silent = frozenset(
            level
            for level, percent in zip(
                _LEVELS[:3], (t.info_percent, t.warn_percent, t.throttle_percent), strict=True
            )
            if not percent
        )
        known.threshold = max(known.threshold, state.threshold)

    def _reserved(
        self, run_id: str, response: budget_service_pb2.ReserveResponse, span: Any
    ) -> None:
        decision, reason = response.decision, response.reason
        if span is not None:
            span.set_attribute("runcap.run_id", run_id)
            span.set_attribute("runcap.decision", _DECISION.get(decision, str(decision)))
            span.set_attribute("runcap.reason", _REASON.get(reason, str(reason)))
            span.set_attribute(
                "runcap.enforcement_mode",
                _MODE.get(response.enforcement_mode, str(response.enforcement_mode)),
            )
            if response.HasField("blocking_scope"):
                scope = response.blocking_scope
                span.set_attribute(
                    "runcap.blocking_scope", f"{_SCOPE.get(scope.kind, scope.kind)}:{scope.id}"
                )
            if response.replayed:
                span.set_attribute("runcap.replayed", True)
        if reason == _FAILED_OPEN:
            self.backend_error("Reserve")
        if response.replayed:
            return
        pair = (decision, reason)
        key = self._decision_keys.get(pair)
        if key is None:
            key = self._decision_keys[pair] = (
                ("decision", _DECISION.get(decision, str(decision))),
                ("reason", _REASON.get(reason, str(reason))),
            )
        self.decisions.add(key)
        if decision in _HOLDING:
            if reason != _FAILED_OPEN:
                self.holds_active.add(())
        elif decision == _THROTTLE:
            self.throttles.add(key[1:])
        if reason != _FAILED_OPEN:
            run = self._run(self._key(run_id))
            if response.state.threshold > run.threshold:
                run.threshold = response.state.threshold

    def _committed(self, run_id: str, response: budget_service_pb2.CommitResponse) -> None:
        if response.replayed:
            return
        key = self._key(run_id)
        run = self._runs.get(key)
        if run is None:
            # Never seen here (created on another replica): no team or agent,
            # and no crossing counted for this commit (its band before is unknown).
            run = self._run(key)
            run.threshold = response.state.threshold
        else:
            self._runs.move_to_end(key)
        if response.actual_micros:
            self.spend.add(run.key, response.actual_micros)
        if response.overrun_micros:
            self.overrun.add(run.key, response.overrun_micros)
        if response.reservation_status == _COMMITTED:
            self.holds_active.add((), -1)
        reached = response.state.threshold
        while run.threshold < reached:
            run.threshold += 1
            if run.threshold not in run.silent:
                self.thresholds.add(_LEVEL_KEYS[run.threshold])

    def _refunded(self, response: budget_service_pb2.RefundResponse) -> None:
        if not response.replayed and response.reservation_status == _RELEASED:
            self.holds_active.add((), -1)


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor

# The BudgetService methods whose requests name a run.
_RUN_METHODS = frozenset(
    m.name
    for m in budget_service_pb2.DESCRIPTOR.services_by_name["BudgetService"].methods
    if "run_id" in m.input_type.fields_by_name
)


class _Interceptor(_ServerInterceptor):
    """Wraps the BudgetService handlers: latency, decisions, spend and the
    run id (and Reserve's decision) on the current span."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry
        self.tracing = telemetry.tracer_provider is not None

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(_SERVICE):
            return handler
        cached = self.t._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]  # type: ignore[no-any-return]
        wrapped = self._wrap(method[len(_SERVICE) :], handler)
        self.t._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, name: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_stream is not None:
            if not self.tracing or name not in _RUN_METHODS:
                return handler
            stream = handler.unary_stream

            async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                trace.get_current_span().set_attribute("runcap.run_id", request.run_id)
                async for item in stream(request, context):  # type: ignore[attr-defined]
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                streamed, handler.request_deserializer, handler.response_serializer
            )
        behavior = handler.unary_unary
        if behavior is None:
            return handler
        unary = self._unary(name, behavior)
        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )

    def _unary(self, name: str, behavior: Any) -> Callable[[Any, Any], Awaitable[Any]]:
        t = self.t
        tracing = self.tracing
        names_run = name in _RUN_METHODS

        def failed(context: Any) -> None:
            # UNAVAILABLE from a unary handler is the storage (BackendUnavailable).
            if context.code() == grpc.StatusCode.UNAVAILABLE:
                t.backend_error(name)

        if name in ("Reserve", "Commit"):
            histogram = t.reserve_duration if name == "Reserve" else t.commit_duration
            reserve = name == "Reserve"

            async def timed(request: Any, context: Any) -> Any:
                start = time.perf_counter()
                try:
                    response = await behavior(request, context)
                except BaseException:
                    histogram.record(time.perf_counter() - start)
                    failed(context)
                    if tracing:
                        trace.get_current_span().set_attribute("runcap.run_id", request.run_id)
                    raise
                histogram.record(time.perf_counter() - start)
                if reserve:
                    span = trace.get_current_span() if tracing else None
                    t._reserved(request.run_id, response, span)
                else:
                    if tracing:
                        trace.get_current_span().set_attribute("runcap.run_id", request.run_id)
                    t._committed(request.run_id, response)
                return response

            return timed

        async def plain(request: Any, context: Any) -> Any:
            if tracing and names_run:
                trace.get_current_span().set_attribute("runcap.run_id", request.run_id)
            try:
                response = await behavior(request, context)
            except BaseException:
                failed(context)
                raise
            if name == "Refund":
                t._refunded(response)
            elif name in ("CreateRun", "GetRun"):
                t._learn(response.run, response.state)
            return response

        return plain
