"""The web dashboard (RUNCAP_HTTP_ADDR, docs/dashboard.md): live runs with
their burn rate, a run's timeline with its kill switch and approvals, and the
showback report as charts, served by `runcap serve` next to the gRPC API.

Modules: `server` (lifecycle), `routes` (the HTTP app), `bridge` (Watch to
server-sent events), `api` (the loopback to the gRPC API), `params` (request
input), `views` (JSON), `sse` (the event-stream format), `assets` (static
files, built from web/ into ``static/``).
"""

from __future__ import annotations

from runcap_server.dashboard.server import Dashboard

__all__ = ["Dashboard"]
