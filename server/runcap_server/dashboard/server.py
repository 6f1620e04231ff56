"""The dashboard's lifecycle: an aiohttp server on RUNCAP_HTTP_ADDR, started
after the gRPC server it calls and stopped before it."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile

import grpc
from aiohttp import web

from runcap_server.dashboard.api import Loopback, loopback_target
from runcap_server.dashboard.assets import Assets
from runcap_server.dashboard.bridge import Bridge
from runcap_server.dashboard.routes import Context, build_app
from runcap_server.settings import Settings
from runcap_server.telemetry import split_host_port
from runcap_server.tls import ServerTls

_log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 5.0
"""How long requests in flight may finish when the server stops (live
streams are ended first, so only API calls are left)."""


class Dashboard:
    """The web dashboard of one runcap server.

    HTTP, or HTTPS with the API's own certificate and key when it speaks TLS
    (with mTLS, browsers must present a certificate of the client CA too). Its
    calls reach the API over `api.Loopback`.
    """

    def __init__(self, settings: Settings, tls: ServerTls | None, *, auth_required: bool) -> None:
        self.settings = settings
        self.tls = tls
        self.auth_required = auth_required
        # Read now: a server whose build lacks the front end does not start.
        self.assets = Assets()
        self.port = 0
        self._socket_dir: str | None = None
        self._loopback: Loopback | None = None
        self._bridge: Bridge | None = None
        self._runner: web.AppRunner | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    def add_loopback_port(self, server: grpc.aio.Server) -> None:
        """Before the gRPC server starts: with TLS, a Unix socket of its own
        for the dashboard's calls, in a directory only this user can enter
        (docs/dashboard.md, "TLS")."""
        if self.tls is None:
            return
        self._socket_dir = tempfile.mkdtemp(prefix="runcap-dashboard-")
        path = os.path.join(self._socket_dir, "api.sock")
        server.add_insecure_port(f"unix:{path}")

    async def start(self, api_port: int) -> int:
        """Serves the dashboard; returns its port (RUNCAP_HTTP_ADDR port 0 picks one)."""
        if self._socket_dir is not None:
            target = f"unix:{os.path.join(self._socket_dir, 'api.sock')}"
        else:
            target = loopback_target(self.settings.listen_addr, api_port)
        self._loopback = Loopback(target)
        self._bridge = Bridge(self._loopback)
        context = Context(
            self._loopback, self._bridge, self.assets, self.auth_required, self.tls is not None
        )
        self._runner = web.AppRunner(
            build_app(context),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await self._runner.setup()
        host, port = split_host_port(self.settings.http_addr)
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl_context())
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.settings.tls_cert_file, self.settings.tls_key_file)
        if self.tls.mtls:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.settings.tls_client_ca_file)
        return context

    async def stop(self) -> None:
        """Ends the live streams (pages reconnect, to another replica or to
        this one once it is back), then stops serving."""
        if self._bridge is not None:
            self._bridge.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._loopback is not None:
            await self._loopback.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
