"""The LiteLLM hook's pure parts: settings, request reading, usage mapping,
problem details and the problem+json middleware (no LiteLLM needed)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
from google.protobuf import duration_pb2

from runcap import TokenUsage
from runcap.litellm import calls
from runcap.litellm.middleware import ProblemDetailsMiddleware
from runcap.litellm.problem import budget_headers, outcome_of, usd
from runcap.litellm.settings import HookSettings
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb

Message = MutableMapping[str, Any]


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "0.00"), (5_000_000, "5.00"), (1_234_500, "1.2345"), (1, "0.000001"), (-1_500, "-0.0015")],
)
def test_usd_is_exact(micros: int, text: str) -> None:
    assert usd(micros) == text


def test_settings_from_the_environment_and_their_errors() -> None:
    settings = HookSettings.from_env(
        {
            "RUNCAP_TARGET": "runcap:50051",
            "RUNCAP_LITELLM_RUN_LIMIT": "$2.50",
            "RUNCAP_LITELLM_RUN_MODE": "Advisory",
            "RUNCAP_LITELLM_FAIL_OPEN": "yes",
            "RUNCAP_LITELLM_BLOCK_STATUS": "429",
        }
    )
    assert (settings.target, settings.run_limit_micros, settings.run_mode) == (
        "runcap:50051",
        2_500_000,
        "advisory",
    )
    assert (settings.fail_open, settings.block_status, settings.create_runs) == (True, 429, True)
    assert HookSettings.from_env({}) == HookSettings()
    for env, named in [
        ({"RUNCAP_LITELLM_RUN_LIMIT": "0.0000001"}, "RUNCAP_LITELLM_RUN_LIMIT"),
        ({"RUNCAP_LITELLM_RUN_LIMIT": "lots"}, "RUNCAP_LITELLM_RUN_LIMIT"),
        ({"RUNCAP_LITELLM_RUN_MODE": "strict"}, "RUNCAP_LITELLM_RUN_MODE"),
        ({"RUNCAP_LITELLM_FAIL_OPEN": "maybe"}, "RUNCAP_LITELLM_FAIL_OPEN"),
        ({"RUNCAP_LITELLM_BLOCK_STATUS": "200"}, "RUNCAP_LITELLM_BLOCK_STATUS"),
        ({"RUNCAP_LITELLM_TIMEOUT_S": "0"}, "RUNCAP_LITELLM_TIMEOUT_S"),
    ]:
        with pytest.raises(ValueError, match=named):
            HookSettings.from_env(env)


def test_the_run_comes_from_the_header_then_the_metadata() -> None:
    data: dict[str, Any] = {
        "proxy_server_request": {"headers": {"X-Runcap-Run-Id": " run-1 "}},
        "metadata": {"runcap_run_id": "run-2"},
    }
    assert calls.run_id_of(data) == "run-1"
    del data["proxy_server_request"]
    assert calls.run_id_of(data) == "run-2"
    assert calls.run_id_of({}) == ""


class Key:
    def __init__(self, api_key: str | None, user_id: str | None, team_id: str | None) -> None:
        self.api_key, self.user_id, self.team_id = api_key, user_id, team_id


def test_identity_binds_a_run_only_to_its_own_scopes() -> None:
    me = calls.Identity.of(Key("hash-1", None, "team-a"), {"user": "bob@example.com"})
    assert me.api_key_id == "hash-1"
    assert me.user_id == calls.scope_id("bob@example.com")
    assert me.user_id.startswith("sha256:")
    assert me.may_use("", "", "")  # a run with no scopes: anyone with its id
    assert me.may_use("hash-1", "", "team-a")
    assert not me.may_use("hash-2", "", "")
    assert not me.may_use("", "", "team-b")


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"litellm_params": {"model": "openai/gpt-4o"}}, ("openai", "gpt-4o")),
        ({"litellm_params": {"model": "gpt-4o-mini"}}, ("openai", "gpt-4o-mini")),
        ({"litellm_params": {"model": "gemini/gemini-2.0-flash"}}, ("google", "gemini-2.0-flash")),
        (
            {"litellm_params": {"model": "anthropic/claude-3-5-haiku", "custom_llm_provider": "x"}},
            ("x", "anthropic/claude-3-5-haiku"),
        ),
        (
            {
                "litellm_params": {"model": "openai/ft-3"},
                "model_info": {"runcap_provider": "openai", "runcap_model": "gpt-4o-mini"},
            },
            ("openai", "gpt-4o-mini"),
        ),
    ],
)
def test_how_runcap_names_a_deployment(entry: dict[str, Any], named: tuple[str, str]) -> None:
    deployment = calls.deployment_of({"model_name": "group", **entry})
    assert deployment is not None
    assert (deployment.provider, deployment.model) == named


def test_what_a_call_needs_and_caps() -> None:
    data = {
        "tools": [{"type": "function"}],
        "response_format": {"type": "json_schema"},
        "messages": [
            {"role": "user", "content": [{"type": "text"}, {"type": "image_url"}]},
            {"role": "user", "content": [{"type": "input_audio"}]},
        ],
        "max_tokens": 300,
        "max_completion_tokens": 200,
    }
    assert calls.needs_of(data) == {
        "needs_tools": True,
        "needs_json_schema": True,
        "modalities": ["audio", "image"],
    }
    assert calls.max_output_of(data) == 200
    assert calls.max_output_of({"max_tokens": True}) is None


def test_usage_maps_to_disjoint_classes() -> None:
    usage = {
        "prompt_tokens": 1_000,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 600},
        "completion_tokens_details": {"reasoning_tokens": 100},
        "cache_creation_input_tokens": 50,
    }
    assert calls.usage_of(usage) == TokenUsage(
        input_tokens=350,
        output_tokens=200,
        cache_read_tokens=600,
        cache_write_tokens=50,
        reasoning_tokens=100,
    )
    assert calls.usage_of(None) is None


def test_streamed_text_joins_content_and_tool_arguments() -> None:
    chunks = [
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": '{"a":'}}]}}]},
        {"choices": [], "usage": {"prompt_tokens": 3}},
    ]
    assert calls.streamed_text(chunks) == 'Hello{"a":'


def response(decision: int, reason: int, **fields: Any) -> pb.ReserveResponse:
    return pb.ReserveResponse(decision=decision, reason=reason, **fields)  # type: ignore[arg-type]


def test_statuses_of_refusals() -> None:
    throttle = response(
        budget_pb2.DECISION_THROTTLE,
        budget_pb2.DECISION_REASON_THROTTLED,
        retry_after=duration_pb2.Duration(seconds=2),
    )
    assert outcome_of(throttle, 402).status == 429
    block = response(budget_pb2.DECISION_BLOCK, budget_pb2.DECISION_REASON_INSUFFICIENT_BUDGET)
    assert (outcome_of(block, 402).status, outcome_of(block, 403).code) == (
        402,
        "insufficient_budget",
    )
    approval = response(
        budget_pb2.DECISION_APPROVAL_REQUIRED, budget_pb2.DECISION_REASON_SPEND_NEEDS_APPROVAL
    )
    assert outcome_of(approval, 402).code == "spend_needs_approval"


def test_budget_headers_name_only_what_the_record_has() -> None:
    record = {
        "decision": "downgrade",
        "decision_id": "run-1/call-1",
        "run_id": "run-1",
        "remaining_micros": 1_250_000,
        "requested_model": "gpt-4o",
        "selected_model": "gpt-4o-mini",
    }
    assert budget_headers(record) == {
        "X-Budget-Decision": "downgrade",
        "X-Budget-Decision-Id": "run-1/call-1",
        "X-Budget-Requested-Model": "gpt-4o",
        "X-Budget-Selected-Model": "gpt-4o-mini",
        "X-Run-Id": "run-1",
        "X-Budget-Remaining-USD": "1.25",
    }


App = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def app_answering(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> App:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        half = len(body) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": body[half:]})

    return app


async def through(app: App) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    await ProblemDetailsMiddleware(app)({"type": "http"}, receive, send)
    return sent


PROBLEM = {"type": "urn:x", "title": "t", "status": 402, "detail": "d", "code": "c"}
ENVELOPE = json.dumps({"error": {"provider_specific_fields": {"runcap_problem": PROBLEM}}})


@pytest.mark.parametrize("zipped", [False, True])
async def test_the_middleware_unwraps_a_runcap_problem(zipped: bool) -> None:
    body = gzip.compress(ENVELOPE.encode()) if zipped else ENVELOPE.encode()
    headers = [(b"content-type", b"application/json"), (b"x-budget-decision", b"block")]
    if zipped:
        headers.append((b"content-encoding", b"gzip"))
    start, end = await through(app_answering(402, body, headers))
    sent_headers = dict(start["headers"])
    assert sent_headers[b"content-type"] == b"application/problem+json"
    assert b"content-encoding" not in sent_headers
    assert sent_headers[b"x-budget-decision"] == b"block"
    assert json.loads(end["body"]) == PROBLEM
    assert int(sent_headers[b"content-length"]) == len(end["body"])


async def test_the_middleware_passes_everything_else_through_unbuffered() -> None:
    plain = app_answering(200, b'{"ok": true}', [(b"x-budget-decision", b"allow")])
    assert len(await through(plain)) == 3  # not buffered: every message as sent
    other_error = json.dumps({"error": {"message": "no"}}).encode()
    error = app_answering(400, other_error, [(b"x-budget-decision", b"allow")])
    start, end = await through(error)
    assert dict(start["headers"]) == {b"x-budget-decision": b"allow"}
    assert end["body"] == other_error
