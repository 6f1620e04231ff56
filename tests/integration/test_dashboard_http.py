"""The web dashboard over HTTP, through real server processes on real ports:
static files, the API's authentication and roles as HTTP statuses, the
buttons' endpoints, showback, and the live stream (snapshot, changes,
resume, reset, shutdown), also over mTLS.

`start_dashboard` is shared with the browser test (test_dashboard_browser.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from runcap import AsyncRuncapClient
from runcap.v1 import budget_pb2
from runcap_server.auth import KeyEntry, Role, digest, new_key, write_keys
from tests.certs import CertificateAuthority
from tests.servers import ServerProcess

USD = 1_000_000
KEYS = {
    # name: (tenant, role, user, team)
    "coder": ("acme", "agent", "alice", "ml"),
    "ops": ("acme", "operator", "", ""),
    "outsider-ops": ("globex", "operator", "", ""),
    "outsider": ("globex", "agent", "", ""),
}
_DASHBOARD = re.compile(r"dashboard on (https?://\S+?)/?$")
Event = tuple[str, dict[str, Any]]


@dataclass
class Dashboard:
    """A server process with its dashboard, and the secrets of its keys."""

    process: ServerProcess
    url: str
    secrets: dict[str, str]

    @property
    def target(self) -> str:
        return self.process.target

    def bearer(self, name: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[name]}"} if name else {}

    def client(self, name: str | None, **options: Any) -> AsyncRuncapClient:
        return AsyncRuncapClient(
            self.target, api_key=self.secrets[name] if name else None, **options
        )


def write_keys_file(path: Path, keys: Mapping[str, tuple[str, str, str, str]]) -> dict[str, str]:
    """A keys file as `runcap keys create` writes it; returns each key."""
    secrets = {name: new_key(name) for name in keys}
    entries = [
        KeyEntry(name, digest(secrets[name]), tenant, Role.parse(role), user, team)
        for name, (tenant, role, user, team) in keys.items()
    ]
    write_keys(path, entries)
    return secrets


def start_dashboard(
    directory: Path,
    *,
    keys: Mapping[str, tuple[str, str, str, str]] | None = KEYS,
    env: Mapping[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Dashboard:
    """`runcap serve` with RUNCAP_HTTP_ADDR on a free port (SQLite in
    `directory`; keys when given, else --insecure-dev)."""
    environment = {"RUNCAP_HTTP_ADDR": "127.0.0.1:0", "RUNCAP_SWEEP_INTERVAL": "50ms"}
    secrets: dict[str, str] = {}
    if keys is not None:
        keys_file = directory / "keys.json"
        secrets = write_keys_file(keys_file, keys)
        environment["RUNCAP_API_KEYS_FILE"] = str(keys_file)
    environment.update(env or {})
    process = ServerProcess(directory / "runcap.db", env=environment, credentials=credentials)
    process.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in process.log:
            matched = _DASHBOARD.search(line.strip())
            if matched:
                return Dashboard(process, matched.group(1), secrets)
        time.sleep(0.02)
    process.stop()
    raise RuntimeError("the dashboard did not start:\n" + "".join(process.log))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Events:
    """The events of a live stream, read as a browser reads text/event-stream."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.seen: list[Event] = []

    async def next(self, within: float = 5.0) -> Event:
        event, data = "", list[str]()
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), within)
            if not line:
                raise EOFError("the stream ended")
            text = line.decode().rstrip("\r\n")
            if text == "":
                if data:
                    item = (event or "message", json.loads("\n".join(data)))
                    self.seen.append(item)
                    return item
                continue
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)

    async def until(self, match: Callable[[Event], bool], within: float = 5.0) -> list[Event]:
        """Every event up to and including the first that `match`es."""
        got: list[Event] = []
        deadline = time.monotonic() + within
        while True:
            item = await self.next(max(0.01, deadline - time.monotonic()))
            got.append(item)
            if match(item):
                return got


def is_change(run_id: str, history: bool = False) -> Callable[[Event], bool]:
    return lambda e: e[0] == "change" and e[1]["run_id"] == run_id and e[1]["history"] is history


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    # A short log, so that one test can outrun it (resuming from a trimmed revision).
    served = start_dashboard(
        tmp_path_factory.mktemp("dashboard"), env={"RUNCAP_LOG_RETENTION": "40"}
    )
    try:
        yield served
    finally:
        served.process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def new_run(
    dash: Dashboard, limit_micros: int = 5 * USD, **options: Any
) -> tuple[str, AsyncRuncapClient]:
    """A run of the agent key `coder` (team ml), and that agent's client."""
    client = dash.client("coder")
    run_id = new_id("run")
    await client.create_run(run_id, limit_micros=limit_micros, labels={"agent": "coder"}, **options)
    return run_id, client


async def spend(client: AsyncRuncapClient, run_id: str, micros: int) -> None:
    held = await client.reserve_once(run_id, micros)
    assert held.decision == budget_pb2.DECISION_ALLOW
    await client.commit(run_id, held.reservation_id, micros)


# --------------------------------------------------------------------------
# Static files


async def test_pages_and_static_files_have_types_and_caching_headers(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    pages = {}
    for path in ("/", "/runs/any-run", "/showback"):
        async with http.get(dash.url + path) as response:
            assert response.status == 200, path
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            pages[path] = (await response.text(), response.headers["ETag"])
    assert len(set(pages.values())) == 1, "every page is the one app"
    html, etag = pages["/"]
    assert '<script type="module" src="/static/main.js">' in html
    async with http.get(dash.url + "/", headers={"If-None-Match": etag}) as response:
        assert response.status == 304
        assert await response.read() == b""
    # Every module main.js reaches is served, as JavaScript.
    pending, served = ["main.js"], set()
    while pending:
        name = pending.pop()
        async with http.get(f"{dash.url}/static/{name}") as response:
            assert response.status == 200, name
            assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert response.headers["ETag"].startswith('"')
            served.add(name)
            imported = re.findall(r'from "\./([\w-]+\.js)"', await response.text())
            pending += [module for module in imported if module not in served]
    assert {"stream.js", "runs.js", "run.js", "showback.js", "timeline.js"} <= served
    async with http.get(dash.url + "/static/app.css") as response:
        assert response.headers["Content-Type"] == "text/css; charset=utf-8"
    for missing in ("/static/nope.js", "/static/../app.py", "/nope"):
        async with http.get(dash.url + missing) as response:
            assert response.status == 404, missing
    async with http.head(dash.url + "/static/main.js") as response:
        assert response.status == 200


# --------------------------------------------------------------------------
# Authentication and roles: the API's answers, as HTTP


async def test_without_a_valid_key_every_endpoint_is_401(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    async with http.get(dash.url + "/api/config") as response:
        assert await response.json() == {"auth_required": True, "tls": False, "version": "0.1.0"}
    attempts = [
        ("GET", "/api/runs", None),
        ("GET", "/api/runs/any-run", None),
        ("POST", "/api/runs/any-run/suspend", {}),
        ("POST", "/api/watch", {"active_since": "1h"}),
        ("GET", "/api/showback", None),
    ]
    for headers in (
        {},
        {"Authorization": "Bearer rck_ops_not-the-key"},
        {"Authorization": "Basic b3Bz"},
    ):
        for method, path, body in attempts:
            async with http.request(
                method, dash.url + path, json=body, headers=headers
            ) as response:
                assert response.status == 401, (method, path, headers)
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="runcap"'
                assert response.headers["Cache-Control"] == "no-store"
                error = (await response.json())["error"]
                assert (error["code"], error["reason"]) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    async with http.get(
        dash.url + "/api/runs", headers={"Authorization": "Bearer rck_x_y"}
    ) as response:
        assert "not valid" in (await response.json())["error"]["message"]


async def test_an_agent_key_may_not_use_the_operator_endpoints(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    run_id, _ = await new_run(dash)
    coder = dash.bearer("coder")
    for method, path, body in [
        ("GET", "/api/runs", None),
        ("POST", f"/api/runs/{run_id}/suspend", {}),
        ("POST", "/api/watch", {"active_since": "1h"}),
        ("GET", "/api/showback", None),
    ]:
        async with http.request(method, dash.url + path, json=body, headers=coder) as response:
            assert response.status == 403, path
            assert (await response.json())["error"]["code"] == "PERMISSION_DENIED"
    # Its own run it may read, as through the API.
    async with http.get(f"{dash.url}/api/runs/{run_id}", headers=coder) as response:
        assert response.status == 200
    # Another principal's run is PERMISSION_DENIED, like one that does not exist.
    for other in (run_id, "no-such-run"):
        headers = dash.bearer("outsider") if other == run_id else coder
        async with http.get(f"{dash.url}/api/runs/{other}", headers=headers) as response:
            assert response.status == 403


async def test_another_tenants_runs_do_not_exist_for_its_operator(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    run_id, _ = await new_run(dash)
    outsider = dash.bearer("outsider-ops")
    async with http.get(f"{dash.url}/api/runs/{run_id}", headers=outsider) as response:
        assert response.status == 404
        assert (await response.json())["error"]["reason"] == "RUN_NOT_FOUND"
    async with http.post(
        f"{dash.url}/api/runs/{run_id}/suspend", json={}, headers=outsider
    ) as response:
        assert response.status == 404
    async with http.post(
        dash.url + "/api/watch", json={"runs": [run_id]}, headers=outsider
    ) as response:
        assert response.status == 404
    # Its own tenant's listing does not show the run either.
    async with http.get(dash.url + "/api/runs?since=1h", headers=outsider) as response:
        assert run_id not in {item["run"]["run_id"] for item in (await response.json())["runs"]}
    # Nothing changed.
    got = await dash.client("ops").get_run(run_id)
    assert got.state.status == budget_pb2.RUN_STATUS_OPEN


# --------------------------------------------------------------------------
# The buttons


async def test_suspend_and_resume_from_the_dashboard(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    run_id, coder = await new_run(dash)
    ops = dash.bearer("ops")
    async with http.get(f"{dash.url}/api/runs/{run_id}", headers=ops) as response:
        body = await response.json()
        assert body["run"]["labels"] == {"agent": "coder"}
        assert body["run"]["team_id"] == "ml"
        assert body["state"]["status"] == "open"
    suspend = f"{dash.url}/api/runs/{run_id}/suspend"
    # A form post (or any other body type) is refused before anything happens.
    async with http.post(suspend, data="x=1", headers=ops) as response:
        assert response.status == 415
        assert (await response.json())["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    async with http.post(
        suspend, json={}, headers={**ops, "Sec-Fetch-Site": "cross-site"}
    ) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "CROSS_SITE"
    assert (await coder.get_run(run_id)).state.status == budget_pb2.RUN_STATUS_OPEN
    async with http.post(suspend, json={}, headers=ops) as response:
        body = await response.json()
        assert (body["state"]["status"], body["replayed"]) == ("suspended", False)
    async with http.post(suspend, json={}, headers=ops) as response:
        assert (await response.json())["replayed"] is True
    blocked = await coder.reserve_once(run_id, 100_000)
    assert blocked.decision == budget_pb2.DECISION_BLOCK
    assert blocked.reason == budget_pb2.DECISION_REASON_SUSPENDED
    async with http.post(f"{dash.url}/api/runs/{run_id}/resume", json={}, headers=ops) as response:
        assert (await response.json())["state"]["status"] == "open"
    assert (await coder.reserve_once(run_id, 100_000)).decision == budget_pb2.DECISION_ALLOW


async def test_approve_and_deny_from_the_dashboard(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    run_id, coder = await new_run(dash, policy=budget_pb2.RunPolicy(approval_percent=50))
    asked = await coder.reserve_once(run_id, 3 * USD)
    assert asked.decision == budget_pb2.DECISION_APPROVAL_REQUIRED
    ops = dash.bearer("ops")
    async with http.post(dash.url + "/api/approvals/approve", json={}, headers=ops) as response:
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "approval_id"
    async with http.post(
        dash.url + "/api/approvals/deny",
        json={"approval_id": f"{run_id}/approval:meter:x"},
        headers=ops,
    ) as response:
        assert response.status == 404
    async with http.post(
        dash.url + "/api/approvals/approve", json={"approval_id": asked.approval_id}, headers=ops
    ) as response:
        body = await response.json()
        assert body["approval"] == {
            "approval_id": asked.approval_id,
            "status": "approved",
            "meter": "",
        }
    assert (await coder.reserve_once(run_id, 3 * USD)).decision == budget_pb2.DECISION_ALLOW


async def test_bad_input_is_400_and_unknown_endpoints_404(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    ops = dash.bearer("ops")
    cases = [
        ("GET", "/api/runs?since=soon", None, "since"),
        ("GET", "/api/showback?group_by=tenant", None, "group_by"),
        ("GET", "/api/showback?since=1h&until=2h", None, "until"),
        ("POST", "/api/watch", {"runs": "one"}, "runs"),
        ("POST", "/api/watch", {}, "runs"),
    ]
    for method, path, body, field in cases:
        async with http.request(method, dash.url + path, json=body, headers=ops) as response:
            assert response.status == 400, path
            error = (await response.json())["error"]
            assert (error["code"], error["field"]) == ("INVALID_ARGUMENT", field)
    async with http.post(
        dash.url + "/api/watch",
        data="{not json",
        headers={**ops, "Content-Type": "application/json"},
    ) as response:
        assert (await response.json())["error"]["field"] == "body"
    # The API's own INVALID_ARGUMENT (a run id it refuses) is a 400 too.
    async with http.get(dash.url + "/api/runs/-bad-", headers=ops) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "INVALID_ARGUMENT"
    async with http.get(dash.url + "/api/nope", headers=ops) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "NOT_FOUND"
    async with http.get(dash.url + "/api/watch", headers=ops) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
    async with http.post(
        dash.url + "/api/watch", json={"runs": ["r" * 100] * 1000}, headers=ops
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "REQUEST_ENTITY_TOO_LARGE"


# --------------------------------------------------------------------------
# Showback


async def test_showback_is_the_reports_figures(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    run_id, coder = await new_run(dash)
    await spend(coder, run_id, 1_250_000)
    async with http.get(
        dash.url + "/api/showback?since=1h&group_by=team", headers=dash.bearer("ops")
    ) as response:
        assert response.status == 200
        body = await response.json()
    assert body["group_by"] == "team"
    ml = next(row for row in body["groups"] if row["team"] == "ml")
    assert ml["runs"] >= 1
    assert ml["spend_micros"] >= 1_250_000
    assert set(ml) >= {"tokens", "top_agents", "thresholds", "overrun_micros", "overrun_runs"}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert body["days"][today]["ml"] == ml["spend_micros"]
    assert body["agents"][0]["agent"] == "coder"
    assert body["runs"] >= 1
    assert body["truncated"] is False


# --------------------------------------------------------------------------
# The live stream


async def open_stream(
    http: aiohttp.ClientSession, dash: Dashboard, body: dict[str, Any], key: str | None = "ops"
) -> aiohttp.ClientResponse:
    response = await http.post(dash.url + "/api/watch", json=body, headers=dash.bearer(key))
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    return response


async def test_a_run_stream_is_snapshot_history_then_each_change_and_resumes(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    run_id, coder = await new_run(dash)
    await spend(coder, run_id, 500_000)  # revisions 2 and 3
    response = await open_stream(http, dash, {"runs": [run_id], "history": 100})
    events = Events(response)
    first = await events.until(lambda e: e[0] == "ready")
    assert [name for name, _ in first] == ["snapshot", "ready"]
    snapshot = first[0][1]
    assert snapshot["run"]["run_id"] == run_id
    assert snapshot["state"]["committed_micros"] == 500_000
    assert snapshot["state"]["revision"] == 3
    # The past, for the timeline: revisions 1 to 3, as history.
    history = await events.until(lambda e: e[0] == "change" and e[1]["revision"] == 3)
    assert [e[1]["event"]["type"] for e in history if e[0] == "change"] == [
        "created",
        "reserved",
        "committed",
    ]
    assert all(e[1]["history"] for e in history if e[0] == "change")
    # Then each change as it happens, with the live figures.
    await spend(coder, run_id, 1_000_000)
    live = await events.until(is_change(run_id))
    change = live[-1][1]
    assert (change["revision"], change["event"]["type"]) == (4, "reserved")
    committed = (await events.until(is_change(run_id)))[-1][1]
    assert committed["state"]["committed_micros"] == 1_500_000
    assert committed["event"]["actual_micros"] == 1_000_000
    # The burn rate counts the replayed past too: $1.50 within the last minute.
    tick = (await events.until(lambda e: e[0] == "live" and run_id in e[1]["runs"]))[-1][1]
    rate = tick["runs"][run_id]["burn_micros_per_minute"]
    assert rate >= 1_500_000
    assert tick["runs"][run_id]["exhausted_in"] != "-"
    response.close()

    # A page that reconnects sends its cursor and gets only what it missed.
    cursor = {"revision": committed["revision"], "digest": committed["state"]["digest"]}
    await spend(coder, run_id, 250_000)
    response = await open_stream(http, dash, {"runs": [run_id], "resume": {run_id: cursor}})
    events = Events(response)
    got = await events.until(is_change(run_id))
    assert "snapshot" not in [name for name, _ in got]
    assert got[-1][1]["revision"] == cursor["revision"] + 1
    assert (await events.until(is_change(run_id)))[-1][1]["state"]["committed_micros"] == 1_750_000
    response.close()

    # A cursor of another history (a failover lost writes) is reset, not patched.
    wrong = {"revision": cursor["revision"], "digest": "0" * 40}
    response = await open_stream(http, dash, {"runs": [run_id], "resume": {run_id: wrong}})
    got = await Events(response).until(lambda e: e[0] == "reset")
    assert got[-1][1] == {"run_id": run_id}
    response.close()


async def test_a_stream_outlives_a_trimmed_log(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    # 61 changes; the server keeps 40: revision 1 and the burn replay are gone.
    run_id, coder = await new_run(dash, limit_micros=100 * USD)
    for _ in range(30):
        await spend(coder, run_id, 10_000)
    response = await open_stream(http, dash, {"runs": [run_id], "history": 100})
    events = Events(response)
    assert (await events.next())[1]["state"]["revision"] == 61
    await events.until(lambda e: e[0] == "ready")
    await spend(coder, run_id, 10_000)
    change = (await events.until(is_change(run_id)))[-1][1]
    assert change["revision"] == 62
    response.close()
    # A page whose cursor the log no longer holds starts over.
    stale = {"revision": 5, "digest": ""}
    response = await open_stream(http, dash, {"runs": [run_id], "resume": {run_id: stale}})
    assert (await Events(response).until(lambda e: e[0] == "reset"))[-1][1] == {"run_id": run_id}
    response.close()


async def test_the_active_runs_stream_lists_open_runs_and_finds_new_ones(
    dash: Dashboard, http: aiohttp.ClientSession
) -> None:
    open_run, coder = await new_run(dash)
    closed_run, _ = await new_run(dash)
    await coder.close_run(closed_run)
    response = await open_stream(http, dash, {"active_since": "10m"})
    events = Events(response)
    first = await events.until(lambda e: e[0] == "ready")
    listed = {e[1]["state"]["run_id"] for e in first if e[0] == "snapshot"}
    assert open_run in listed
    assert closed_run not in listed
    assert first[-1][1]["runs"] == len(listed)
    # A run created now joins the stream without the page asking.
    later, later_client = await new_run(dash)
    got = await events.until(
        lambda e: e[0] == "snapshot" and e[1]["state"]["run_id"] == later, within=10
    )
    assert got[-1][1]["run"]["labels"] == {"agent": "coder"}
    await spend(later_client, later, 300_000)
    assert (await events.until(is_change(later)))[-1][1]["event"]["type"] == "reserved"
    response.close()


async def test_without_keys_no_key_is_needed_and_shutdown_ends_the_streams(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    dash = start_dashboard(tmp_path, keys=None)
    try:
        async with http.get(dash.url + "/api/config") as response:
            assert (await response.json())["auth_required"] is False
        run_id, client = new_id("dev"), dash.client(None)
        await client.create_run(run_id, limit_micros=USD)
        response = await open_stream(http, dash, {"runs": [run_id]}, key=None)
        events = Events(response)
        await events.until(lambda e: e[0] == "ready")
        started = time.monotonic()
        dash.process.signal(signal.SIGTERM)
        with pytest.raises(EOFError):
            await events.until(lambda e: False, within=10)
        assert dash.process.wait(15) == 0
        assert time.monotonic() - started < 10
        await client.close()
    finally:
        dash.process.stop()


async def test_over_mtls_the_dashboard_is_https_and_still_reaches_the_api(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    ca = CertificateAuthority(tmp_path)
    server_cert = ca.issue_server()
    browser = ca.issue("browser", "ops-laptop")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert.read_bytes(),
        private_key=browser.key_pem(),
        certificate_chain=browser.cert_pem(),
    )
    env = {
        "RUNCAP_TLS_CERT_FILE": str(server_cert.cert),
        "RUNCAP_TLS_KEY_FILE": str(server_cert.key),
        "RUNCAP_TLS_CLIENT_CA_FILE": str(ca.cert),
    }
    dash = start_dashboard(tmp_path, env=env, credentials=credentials)
    try:
        assert dash.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(ca.cert))
        context.load_cert_chain(browser.cert, browser.key)
        client = AsyncRuncapClient(
            dash.target, api_key=dash.secrets["coder"], credentials=credentials
        )
        run_id = new_id("tls")
        await client.create_run(run_id, limit_micros=USD)
        async with http.get(
            f"{dash.url}/api/runs/{run_id}", headers=dash.bearer("ops"), ssl=context
        ) as response:
            assert response.status == 200
            assert (await response.json())["state"]["run_id"] == run_id
        async with http.get(
            f"{dash.url}/api/runs/{run_id}", headers=dash.bearer("outsider-ops"), ssl=context
        ) as response:
            assert response.status == 404
        # No client certificate, or plain HTTP: no connection at all.
        bare = ssl.create_default_context(cafile=str(ca.cert))
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"{dash.url}/api/config", ssl=bare) as response:
                await response.read()
        with pytest.raises(aiohttp.ClientError):
            async with http.get(dash.url.replace("https:", "http:") + "/api/config") as response:
                await response.read()
        await client.close()
    finally:
        dash.process.stop()
