"""The dashboard's HTTP app: the pages, their static files, and the JSON and
server-sent-events endpoints the pages call.

Every /api endpoint but /api/config acts through the gRPC API with the
request's own key (``Authorization: Bearer <key>``), and answers the API's
failures as JSON with the matching HTTP status::

    {"error": {"code": "PERMISSION_DENIED", "reason": "PERMISSION_DENIED",
               "message": "...", "metadata": {...}}}

Bad input the dashboard checks itself is a 400 with ``"field"``. POSTs take
``Content-Type: application/json`` only: a cross-site form cannot send it,
and a cross-site fetch that does needs a CORS preflight, which this app
never grants (with --insecure-dev there is no key to protect the buttons).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Final

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from runcap import AsyncRuncapClient, RuncapError
from runcap.v1 import budget_pb2
from runcap_server import report
from runcap_server.dashboard import params, sse
from runcap_server.dashboard.api import Loopback, list_runs
from runcap_server.dashboard.assets import INDEX, Assets
from runcap_server.dashboard.bridge import LIST_SCAN_LIMIT, Bridge
from runcap_server.dashboard.views import Json, enum_name, error_json, run_json, state_json

_log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 64 * 1024
MAX_SHOWBACK_RUNS: Final = 100_000
"""The most runs one showback reads (the answer says when there were more)."""
TOP_AGENTS: Final = 10
HTTP_STATUS: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
}
PAGES: Final = ("/", "/runs/{run_id}", "/showback")


@dataclass(frozen=True, slots=True)
class Context:
    """What the handlers share."""

    loopback: Loopback
    bridge: Bridge
    assets: Assets
    auth_required: bool
    tls: bool


CONTEXT: Final = web.AppKey("context", Context)


def build_app(context: Context) -> web.Application:
    app = web.Application(middlewares=[_answer_errors], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = context
    app.on_response_prepare.append(_add_headers)
    for path in PAGES:
        app.router.add_get(path, _page)
    app.router.add_get("/static/{name:.+}", _static)
    app.router.add_get("/api/config", _config)
    app.router.add_get("/api/runs", _list_runs)
    app.router.add_get("/api/runs/{run_id}", _get_run)
    app.router.add_post("/api/runs/{run_id}/suspend", _suspend)
    app.router.add_post("/api/runs/{run_id}/resume", _resume)
    app.router.add_post("/api/approvals/approve", _approve)
    app.router.add_post("/api/approvals/deny", _deny)
    app.router.add_get("/api/showback", _showback)
    app.router.add_post("/api/watch", _watch)
    return app


# --------------------------------------------------------------------------
# Errors and headers


def error_response(status: int, error: Json, headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="runcap"'
    return web.json_response({"error": error}, status=status, headers=headers)


def api_error_response(error: RuncapError) -> web.Response:
    """The API's failure as the HTTP answer, with its code, reason and message."""
    return error_response(HTTP_STATUS.get(error.code, 500), error_json(error))


@web.middleware
async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    api = request.path.startswith("/api/")
    try:
        if request.method == "POST" and api:
            _check_post(request)
        return await handler(request)
    except params.BadRequest as bad:
        body = {"code": "INVALID_ARGUMENT", "reason": "", "message": str(bad), "field": bad.field}
        return error_response(400, body)
    except RuncapError as error:
        return api_error_response(error)
    except Refused as refused:
        body = {"code": refused.code, "reason": "", "message": refused.message}
        return error_response(refused.status, body)
    except web.HTTPException as http:
        # The router's own answers: no such endpoint, another method, a body too large.
        if not api or http.status < 400:
            raise
        code = http.reason.upper().replace(" ", "_")
        body = {
            "code": code,
            "reason": "",
            "message": f"{request.method} {request.path}: {http.reason}",
        }
        return error_response(http.status, body, {"Allow": http.headers.get("Allow", "")})
    except Exception:
        _log.exception("dashboard: %s %s failed", request.method, request.path)
        body = {"code": "INTERNAL", "reason": "", "message": "the dashboard failed (see the log)"}
        return error_response(500, body)


class Refused(Exception):
    """A request the dashboard refuses on its own, before reading its body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _check_post(request: web.Request) -> None:
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise Refused(403, "CROSS_SITE", "cross-site requests are refused")
    if request.content_type != "application/json":
        raise Refused(
            415, "UNSUPPORTED_MEDIA_TYPE", "send a JSON body (Content-Type: application/json)"
        )


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
    if response.headers.get("Allow") == "":
        del response.headers["Allow"]


# --------------------------------------------------------------------------
# Pages and static files


async def _page(request: web.Request) -> web.StreamResponse:
    """Every page is the one app; it reads its route from the path."""
    return request.app[CONTEXT].assets.response(request, INDEX)


async def _static(request: web.Request) -> web.StreamResponse:
    return request.app[CONTEXT].assets.response(request, request.match_info["name"])


async def _config(request: web.Request) -> web.StreamResponse:
    """What the page needs before it can call anything: whether to ask for a key."""
    context = request.app[CONTEXT]
    return web.json_response(
        {"auth_required": context.auth_required, "tls": context.tls, "version": _version()}
    )


def _version() -> str:
    try:
        return metadata.version("runcap")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------
# The API


def _client(request: web.Request) -> AsyncRuncapClient:
    key = params.api_key(request.headers.get("Authorization"))
    return request.app[CONTEXT].loopback.client(key)


async def _json_body(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError:
        raise params.BadRequest("body", "is not JSON") from None


async def _list_runs(request: web.Request) -> web.StreamResponse:
    """The runs created since ``since`` (default 24h), oldest first, with
    their state: ListRuns, page by page."""
    since = params.moment("since", request.query.get("since", "24h"), datetime.now(UTC))
    runs, truncated = await list_runs(_client(request), since, None, limit=LIST_SCAN_LIMIT)
    listed = [{"run": run_json(item.run), "state": state_json(item.state)} for item in runs]
    return web.json_response({"runs": listed, "truncated": truncated})


async def _get_run(request: web.Request) -> web.StreamResponse:
    got = await _client(request).get_run(request.match_info["run_id"])
    return web.json_response({"run": run_json(got.run), "state": state_json(got.state)})


async def _suspend(request: web.Request) -> web.StreamResponse:
    done = await _client(request).suspend_run(request.match_info["run_id"])
    return web.json_response({"state": state_json(done.state), "replayed": done.replayed})


async def _resume(request: web.Request) -> web.StreamResponse:
    done = await _client(request).resume_run(request.match_info["run_id"])
    return web.json_response({"state": state_json(done.state), "replayed": done.replayed})


async def _approve(request: web.Request) -> web.StreamResponse:
    approval_id = params.approval_id(await _json_body(request))
    done = await _client(request).approve(approval_id)
    return web.json_response(_approval(done.approval, done.state, done.replayed))


async def _deny(request: web.Request) -> web.StreamResponse:
    approval_id = params.approval_id(await _json_body(request))
    done = await _client(request).deny(approval_id)
    return web.json_response(_approval(done.approval, done.state, done.replayed))


def _approval(approval: budget_pb2.Approval, state: budget_pb2.BudgetState, replayed: bool) -> Json:
    return {
        "approval": {
            "approval_id": approval.approval_id,
            "status": enum_name(
                budget_pb2.ApprovalStatus.DESCRIPTOR, approval.status, "APPROVAL_STATUS_"
            ),
            "meter": approval.meter,
        },
        "state": state_json(state),
        "replayed": replayed,
    }


async def _showback(request: web.Request) -> web.StreamResponse:
    """`runcap report`'s figures for the page's charts: per group (``team``
    by default) its rows as ``runcap report --format json`` prints them, the
    spend per day of each group, and the top agents."""
    now = datetime.now(UTC)
    query = request.query
    since = params.moment("since", query.get("since", "7d"), now)
    until = params.moment("until", query["until"], now) if query.get("until") else None
    if until is not None and until <= since:
        raise params.BadRequest("until", "must be after since")
    by = params.group_by(query.get("group_by", "team"))
    runs, truncated = await list_runs(_client(request), since, until, limit=MAX_SHOWBACK_RUNS)
    groups = report.aggregate(runs, by)
    agents = report.aggregate(runs, "agent")[:TOP_AGENTS]
    return web.json_response(
        {
            "group_by": by,
            "since": since.isoformat(),
            "until": (until or now).isoformat(),
            "runs": len(runs),
            "truncated": truncated,
            "groups": json.loads(report.render(groups, by, "json")),
            "days": report.daily_spend(runs, by),
            "agents": json.loads(report.render(agents, "agent", "json")),
        }
    )


async def _watch(request: web.Request) -> web.StreamResponse:
    """The live stream of the runs a page shows (`bridge`)."""
    context = request.app[CONTEXT]
    spec = params.watch_spec(await _json_body(request), datetime.now(UTC))
    key = params.api_key(request.headers.get("Authorization"))
    stream = context.bridge.open(key, spec)
    await stream.prepare()
    response = web.StreamResponse(
        headers={
            "Content-Type": f"{sse.CONTENT_TYPE}; charset=utf-8",
            "Cache-Control": "no-store",
            # Reverse proxies (nginx) must pass each event on at once.
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the page went away
        await context.bridge.serve(stream, response)
    return response
