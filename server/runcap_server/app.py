"""Builds the gRPC server, runs it, and shuts it down gracefully.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING, every Watch stream
ends with a final progress message (its resume point), in-flight calls get
the grace period, then storage closes and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from runcap.v1 import alerts_pb2, alerts_pb2_grpc, budget_service_pb2
from runcap_server.alerts.engine import AlertEngine
from runcap_server.alerts.service import AlertServicer
from runcap_server.alerts.store import open_store
from runcap_server.auth import KeyStore
from runcap_server.backends.base import Backend
from runcap_server.ledger.model import ModelLedger
from runcap_server.open_runs import OpenRuns
from runcap_server.open_runs import open_store as open_runs_store
from runcap_server.prices import PriceBook
from runcap_server.servicer import BudgetServicer, add_to_server, register
from runcap_server.settings import Settings
from runcap_server.sweeper import sweep_forever
from runcap_server.tasks import cancel_and_wait
from runcap_server.telemetry import Telemetry
from runcap_server.tenant_prices import TenantPrices
from runcap_server.tls import load_server_tls
from runcap_server.watch import WatchHub

if TYPE_CHECKING:
    from runcap_server.dashboard import Dashboard

_log = logging.getLogger("runcap")
BACKEND_CHECK_S = 1.0
# How often runs open past the run TTL are looked for.
RUN_TTL_CHECK_S = 1.0
SERVICE_NAME: str = budget_service_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name
ALERT_SERVICE_NAME: str = alerts_pb2.DESCRIPTOR.services_by_name["AlertService"].full_name
# A health service name that says only that the process serves: SERVING from
# start to drain, whatever the storage does, for liveness probes (restarting
# replicas does not bring Redis back). "" and SERVICE_NAME are for readiness.
LIVENESS_SERVICE = "liveness"


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "memory":
        return ModelLedger(
            default_ttl_ms=settings.default_ttl_ms, log_retention=settings.log_retention
        )
    if settings.backend == "redis":
        from runcap_server.backends.redis import RedisLedger

        nodes = [n.strip() for n in settings.redis_cluster_nodes.split(",") if n.strip()]
        return RedisLedger(
            url=settings.redis_url or None,
            cluster_nodes=nodes,
            default_ttl_ms=settings.default_ttl_ms,
            log_retention=settings.log_retention,
            closed_retention_ms=settings.closed_run_retention_ms,
            namespace=settings.redis_namespace,
            max_connections=settings.redis_max_connections,
            pipelining=settings.redis_pipelining,
        )
    from runcap_server.backends.sqlite import SqliteLedger

    return SqliteLedger(
        path=settings.sqlite_path,
        default_ttl_ms=settings.default_ttl_ms,
        log_retention=settings.log_retention,
        synchronous=settings.sqlite_synchronous.upper(),
    )


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Spread long-lived clients over replicas; Watch clients resume.
        ("grpc.max_connection_age_ms", settings.max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", settings.shutdown_grace_ms),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_receive_message_length", 1 << 20),
    ]


class RuncapServer:
    """The service on one port. `start` returns the bound port (0 picks one)."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        # OTEL_* and RUNCAP_METRICS_ADDR; nothing configured: no interceptor at all.
        self.telemetry = telemetry or Telemetry.from_settings(settings)
        self.backend = backend or build_backend(settings)
        self.hub = WatchHub(
            self.backend,
            queue_size=settings.watch_queue_size,
            heartbeat_s=settings.watch_heartbeat_ms / 1000,
        )
        self.health = HealthServicer()
        # Read now: a server with an unreadable price table does not start.
        self.prices = PriceBook(settings.price_table or None)
        self.tenant_prices = TenantPrices(self.backend, settings.tenant)
        # Read now: a server with unreadable TLS files or keys file does not start.
        self.tls = load_server_tls(settings)
        mtls = self.tls is not None and self.tls.mtls
        self.keys = (
            KeyStore(Path(settings.api_keys_file), mtls=mtls) if settings.api_keys_file else None
        )
        # Open runs per principal and the run TTL, counted beside the ledger.
        self.open_runs = OpenRuns(
            open_runs_store(self.backend),
            settings.max_open_runs,
            settings.run_ttl_ms,
            clock=getattr(self.backend, "clock", None),
        )
        # Alert rules and alerts live beside the ledger; the engine (RUNCAP_ALERTS)
        # follows runs and delivers, off the Reserve path.
        self.alert_store = open_store(self.backend)
        self.alerts = (
            AlertEngine(self.backend, self.alert_store, self.hub, settings)
            if settings.alerts
            else None
        )
        self.server = grpc.aio.server(
            options=_server_options(settings),
            interceptors=self.telemetry.interceptors(),
        )
        # Health only, plaintext (RUNCAP_HEALTH_ADDR): the same statuses as the main port.
        self.health_server = grpc.aio.server() if settings.health_addr else None
        # The web dashboard (RUNCAP_HTTP_ADDR); aiohttp is loaded only for it.
        self.dashboard: Dashboard | None = None
        if settings.http_addr:
            from runcap_server.dashboard import Dashboard

            self.dashboard = Dashboard(settings, self.tls, auth_required=self.keys is not None)
        self.http_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.health_port = 0

    async def start(self) -> int:
        await self.backend.start()
        servicer = BudgetServicer(
            self.backend,
            self.hub,
            self.settings,
            self.prices,
            self.tenant_prices,
            keys=self.keys,
            open_runs=self.open_runs,
        )
        add_to_server(servicer, self.server)
        await self.open_runs.store.start()
        await self.alert_store.start()
        alert_servicer = AlertServicer(
            self.alert_store,
            self.settings.tenant,
            keys=self.keys,
            on_rules_changed=self.alerts.poke if self.alerts else lambda: None,
        )
        register(alerts_pb2_grpc.add_AlertServiceServicer_to_server, alert_servicer, self.server)
        self.telemetry.observe(
            failed_open=lambda: servicer.failed_open, watchers=lambda: self.hub.watchers
        )
        self.telemetry.start()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                ALERT_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        if self.tls is None:
            self.port = self.server.add_insecure_port(self.settings.listen_addr)
        else:
            self.port = self.server.add_secure_port(
                self.settings.listen_addr, self.tls.credentials()
            )
        if self.dashboard is not None:
            self.dashboard.add_loopback_port(self.server)
        await self.server.start()
        if self.health_server is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(self.settings.health_addr)
            await self.health_server.start()
        if self.dashboard is not None:
            self.http_port = await self.dashboard.start(self.port)
        for service in ("", SERVICE_NAME, LIVENESS_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._tasks = [
            asyncio.create_task(
                sweep_forever(
                    self.backend,
                    self.settings.sweep_interval_ms / 1000,
                    on_released=self.telemetry.expired,
                    on_error=lambda: self.telemetry.backend_error("sweep"),
                ),
                name="expiry-sweeper",
            ),
            asyncio.create_task(
                self.open_runs.close_due_forever(self.backend, RUN_TTL_CHECK_S),
                name="run-ttl-closer",
            ),
            asyncio.create_task(self._watch_backend(), name="backend-health"),
            asyncio.create_task(self.tenant_prices.refresh_forever(), name="tenant-prices"),
        ]
        if self.alerts is not None:
            await self.alerts.start()
        return self.port

    async def _watch_backend(self) -> None:
        """Report NOT_SERVING while storage does not answer, so meshes route around us."""
        serving = True
        while True:
            await asyncio.sleep(BACKEND_CHECK_S)
            try:
                async with asyncio.timeout(BACKEND_CHECK_S):
                    await self.backend.ping()
                healthy = True
            except Exception as error:
                healthy = False
                self.telemetry.backend_error("ping")
                if serving:
                    _log.error("backend unavailable, health is NOT_SERVING: %s", error)
            if healthy != serving:
                serving = healthy
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if healthy
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                if healthy:
                    _log.info("backend answers again, health is SERVING")
                for service in ("", SERVICE_NAME):
                    await self.health.set(service, status)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self.alerts is not None:
            await self.alerts.stop()
        self.hub.close()
        # Give streams a moment to send their final progress message.
        await asyncio.sleep(0.05)
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.server.stop(self.settings.shutdown_grace_ms / 1000)
        await self.hub.stop()
        await cancel_and_wait(self._tasks)
        await self.backend.close()
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.telemetry.shutdown()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop RUNCAP_EVENT_LOOP names (None: asyncio's own).

    uvloop runs the server's Python side (gRPC callbacks, Redis sockets) with
    less CPU per call; auto uses it when it is installed.
    """
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ValueError(
                "RUNCAP_EVENT_LOOP=uvloop but uvloop is not installed "
                "(pip install uvloop, or set RUNCAP_EVENT_LOOP=asyncio)"
            ) from None
        return None
    return uvloop.new_event_loop


def _bound_address(listen_addr: str, port: int) -> str:
    host = listen_addr.rsplit(":", 1)[0]
    return f"{host}:{port}"


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RuncapServer(settings)
    port = await server.start()
    if port == 0:
        raise OSError(f"could not listen on {settings.listen_addr}")
    # What start-up made (modules, descriptors, the price table) lives as long as the
    # process: out of the collector's sight, a full collection takes a few ms, not 50.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP reloads the price table; an invalid file keeps the current one.
    loop.add_signal_handler(signal.SIGHUP, server.prices.reload)
    if server.keys is None:
        _log.warning(
            "INSECURE: no authentication (--insecure-dev): any caller that reaches %s may "
            "read, spend and change every budget. Use RUNCAP_API_KEYS_FILE outside a "
            "single-user machine.",
            _bound_address(settings.listen_addr, port),
        )
    location = {
        "sqlite": settings.sqlite_path,
        "memory": "nothing survives a restart",
        "redis": settings.redis_url or settings.redis_cluster_nodes,
    }[settings.backend]
    _log.info(
        "runcap listening on %s (backend %s: %s; %s event loop; %s)",
        _bound_address(settings.listen_addr, port),
        settings.backend,
        location,
        type(loop).__module__.partition(".")[0],
        "plaintext" if server.tls is None else server.tls.describe(),
    )
    if server.dashboard is not None:
        dashboard_at = _bound_address(settings.http_addr, server.http_port)
        _log.info("dashboard on %s://%s/", server.dashboard.scheme, dashboard_at)
    if server.health_server is not None:
        health_at = _bound_address(settings.health_addr, server.health_port)
        _log.info("health checks (plaintext, health service only) on %s", health_at)
    await stop.wait()
    _log.info("shutting down: draining for up to %d ms", settings.shutdown_grace_ms)
    await server.stop()
    _log.info("stopped")
