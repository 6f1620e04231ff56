"""runcap in a real LiteLLM proxy (`litellm --config`, the hook from
config.yaml), against a real runcap server; providers are LiteLLM's
`mock_response` deployments and a fake streaming endpoint on loopback.

Amounts are worked from the shipped price table: gpt-4o costs 2.5 micro-USD
per input token and 10 per output token, gpt-4o-mini 0.15 and 0.6.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import jsonschema
import pytest

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.integration.rpc import create_run
from tests.litellm_proxy import FakeProvider, ProxyProcess, free_port
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("litellm") is None,
        reason="needs the litellm extra: pip install -e '.[litellm]'",
    ),
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "litellm.md"
SCHEMA = json.loads((ROOT / "docs" / "litellm-problem.schema.json").read_text())
TABLE_VERSION = json.loads((ROOT / "server" / "runcap_server" / "price_table.json").read_text())[
    "version"
]
MASTER_KEY = "sk-master"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
# What the mock deployments answer: 1,000 prompt and 200 completion tokens.
MOCK_PROMPT, MOCK_COMPLETION = 1_000, 200
GPT_4O = (2.5, 10.0)
GPT_4O_MINI = (0.15, 0.6)


def cost(rates: tuple[float, float], input_tokens: int, output_tokens: int) -> int:
    return math.ceil(rates[0] * input_tokens + rates[1] * output_tokens)


def mock(model: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": f"An answer from {model}."}
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": MOCK_PROMPT,
            "completion_tokens": MOCK_COMPLETION,
            "total_tokens": MOCK_PROMPT + MOCK_COMPLETION,
        },
    }


def config(provider: FakeProvider) -> dict[str, Any]:
    def deployment(group: str, model: str, **params: Any) -> dict[str, Any]:
        return {
            "model_name": group,
            "litellm_params": {"model": model, "api_key": "sk-fake", **params},
        }

    return {
        "model_list": [
            deployment("gpt-4o", "openai/gpt-4o", mock_response=mock("gpt-4o")),
            deployment("gpt-4o-mini", "openai/gpt-4o-mini", mock_response=mock("gpt-4o-mini")),
            deployment("gpt-4o-stream", "openai/gpt-4o", api_base=provider.base("fast")),
            deployment("gpt-4o-slow", "openai/gpt-4o", api_base=provider.base("slow")),
            deployment(
                "gpt-4o-broken", "openai/gpt-4o", mock_response="litellm.InternalServerError"
            ),
            deployment("mystery", "openai/mystery-model-9000", mock_response="hi"),
        ],
        "litellm_settings": {"callbacks": ["runcap.litellm.budget_hook"], "num_retries": 0},
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": MASTER_KEY},
    }


class Proxies:
    def __init__(
        self,
        runcap: ServerProcess,
        main: ProxyProcess,
        closed: ProxyProcess,
        open_: ProxyProcess,
        provider: FakeProvider,
    ) -> None:
        self.runcap = runcap
        self.main = main
        self.closed = closed
        self.open = open_
        self.provider = provider


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxies]:
    directory = tmp_path_factory.mktemp("litellm")
    runcap = ServerProcess(directory / "runcap.db").start()
    provider = FakeProvider().start()
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = {
        "main": {"RUNCAP_TARGET": runcap.target},
        "closed": {"RUNCAP_TARGET": nowhere, "RUNCAP_LITELLM_TIMEOUT_S": "0.5"},
        "open": {
            "RUNCAP_TARGET": nowhere,
            "RUNCAP_LITELLM_TIMEOUT_S": "0.5",
            "RUNCAP_LITELLM_FAIL_OPEN": "true",
        },
    }
    with contextlib.ExitStack() as stack:  # every stop runs, whatever fails
        stack.callback(runcap.stop)
        stack.callback(provider.stop)
        started: dict[str, ProxyProcess] = {}
        for name, env in settings.items():  # start all, then wait: they boot in parallel
            (directory / name).mkdir()
            proxy = ProxyProcess(config(provider), directory / name, env).start()
            stack.callback(proxy.stop)
            started[name] = proxy
        for proxy in started.values():
            proxy.wait_ready()
        yield Proxies(runcap, started["main"], started["closed"], started["open"], provider)


@pytest.fixture
async def stub(proxies: Proxies) -> AsyncIterator[BudgetServiceAsyncStub]:
    async with grpc.aio.insecure_channel(proxies.runcap.target) as channel:
        yield BudgetServiceStub(channel)


@pytest.fixture
async def http(proxies: Proxies) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxies.main.url, headers=AUTH, timeout=30) as client:
        yield client


def chat(model: str, *, max_tokens: int = 500, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        **extra,
    }


def run_header(run_id: str, **more: str) -> dict[str, str]:
    return {"x-runcap-run-id": run_id, **more}


async def state_of(stub: BudgetServiceAsyncStub, run_id: str) -> budget_pb2.BudgetState:
    return (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).state


async def settled(
    stub: BudgetServiceAsyncStub, run_id: str, holds: int = 0
) -> budget_pb2.BudgetState:
    """The run's state once only `holds` holds are left (streams settle from a task)."""
    for _ in range(100):
        state = await state_of(stub, run_id)
        if state.active_reservations == holds:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} still holds {state.reserved_micros}")


def problem_of(answer: httpx.Response) -> dict[str, Any]:
    assert answer.headers["content-type"] == "application/problem+json", answer.text
    body: dict[str, Any] = answer.json()
    jsonschema.validate(body, SCHEMA)
    assert body["status"] == answer.status_code
    return body


async def test_an_allowed_call_commits_its_usage_and_says_so_in_headers(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000_000)
    answer = await http.post(
        "/v1/chat/completions", json=chat("gpt-4o"), headers=run_header(run_id)
    )
    assert answer.status_code == 200, answer.text
    spent = cost(GPT_4O, MOCK_PROMPT, MOCK_COMPLETION)  # 4,500
    call_id = answer.headers["x-litellm-call-id"]
    assert answer.headers["x-budget-decision"] == "allow"
    assert answer.headers["x-budget-reservation-id"] == call_id
    assert answer.headers["x-budget-decision-id"] == f"{run_id}/{call_id}"
    assert answer.headers["x-budget-enforcement-mode"] == "hard_gate"
    assert answer.headers["x-budget-price-table-version"] == TABLE_VERSION
    assert answer.headers["x-run-id"] == run_id
    assert answer.headers["x-budget-remaining-usd"] == f"{(1_000_000 - spent) / 1e6:.4f}"
    assert "x-budget-blocking-scope" not in answer.headers
    state = await state_of(stub, run_id)
    assert (state.committed_micros, state.reserved_micros) == (spent, 0)
    record = await stub.GetDecision(pb.GetDecisionRequest(decision_id=f"{run_id}/{call_id}"))
    assert (record.estimate.provider, record.estimate.model) == ("openai", "gpt-4o")
    assert record.estimate.effective_max_output_tokens == 500
    assert record.reservation_status == budget_pb2.RESERVATION_STATUS_COMMITTED


async def test_a_request_without_a_run_gets_one_bound_to_its_key(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    answer = await http.post("/v1/chat/completions", json=chat("gpt-4o", user="alice@example.com"))
    assert answer.status_code == 200, answer.text
    run_id = answer.headers["x-run-id"]
    run = await stub.GetRun(pb.GetRunRequest(run_id=run_id))
    # LiteLLM's identity of the master key (a virtual key's is its hash).
    assert run.run.api_key_id == "litellm_proxy_master_key"
    # The key's user (LiteLLM's for the master key); the request's `user` (an
    # end user) stands in only for a key that has none.
    assert run.run.user_id == "default_user_id"
    assert dict(run.run.labels) == {"source": "litellm"}
    assert run.state.limit_micros == 5_000_000
    assert run.state.committed_micros == cost(GPT_4O, MOCK_PROMPT, MOCK_COMPLETION)
    # metadata.runcap_run_id names a run as well as the header does.
    again = chat("gpt-4o", user="alice@example.com", metadata={"runcap_run_id": run_id})
    second = await http.post("/v1/chat/completions", json=again)
    assert second.headers["x-run-id"] == run_id
    assert (await state_of(stub, run_id)).committed_micros == 2 * cost(
        GPT_4O, MOCK_PROMPT, MOCK_COMPLETION
    )


async def test_a_run_of_another_key_is_refused(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000_000, api_key_id="someone-else")
    answer = await http.post(
        "/v1/chat/completions", json=chat("gpt-4o"), headers=run_header(run_id)
    )
    assert answer.status_code == 403
    assert problem_of(answer)["code"] == "run_of_another_caller"
    assert (await state_of(stub, run_id)).active_reservations == 0


async def test_a_block_is_402_with_a_problem_body_headers_and_alternatives(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000)  # $0.001: gpt-4o's hold does not fit, mini's does
    answer = await http.post(
        "/v1/chat/completions", json=chat("gpt-4o", max_tokens=1_000), headers=run_header(run_id)
    )
    assert answer.status_code == 402
    body = problem_of(answer)
    assert (body["code"], body["decision"], body["title"]) == (
        "insufficient_budget",
        "block",
        "Budget exceeded",
    )
    budget = body["budget"]
    assert budget["scope"] == {"kind": "run", "id": run_id, "period": "lifetime"}
    assert (budget["limit_micros"], budget["remaining_micros"], budget["reserved_micros"]) == (
        1_000,
        1_000,
        0,
    )
    assert budget["effective_max_output_tokens"] == 1_000
    assert budget["estimate_micros"] == cost(GPT_4O, budget["input_tokens"], 1_000)
    assert budget["price_table_version"] == TABLE_VERSION
    assert [(a["model"], a["runcap_model"]) for a in body["alternatives"]] == [
        ("gpt-4o-mini", "gpt-4o-mini")
    ]
    assert body["alternatives"][0]["estimate_micros"] == cost(
        GPT_4O_MINI, budget["input_tokens"], 1_000
    )
    assert answer.headers["x-budget-decision"] == "block"
    assert answer.headers["x-budget-blocking-scope"] == f"run:{run_id}"
    assert answer.headers["x-budget-decision-id"] == body["decision_id"]
    assert answer.headers["x-run-id"] == run_id
    state = await state_of(stub, run_id)
    assert (state.committed_micros, state.reserved_micros) == (0, 0)


async def test_a_downgrade_rewrites_the_model_and_commits_at_its_price(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    policy = budget_pb2.RunPolicy(auto_downgrade=True)
    run_id = await create_run(stub, 1_000, policy=policy)
    answer = await http.post(
        "/v1/chat/completions", json=chat("gpt-4o", max_tokens=1_000), headers=run_header(run_id)
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-budget-decision"] == "downgrade"
    assert answer.headers["x-budget-requested-model"] == "gpt-4o"
    assert answer.headers["x-budget-selected-model"] == "gpt-4o-mini"
    assert answer.json()["choices"][0]["message"]["content"] == "An answer from gpt-4o-mini."
    state = await state_of(stub, run_id)
    assert (state.committed_micros, state.reserved_micros) == (
        cost(GPT_4O_MINI, MOCK_PROMPT, MOCK_COMPLETION),
        0,
    )


async def test_a_provider_failure_refunds_the_hold(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000_000)
    answer = await http.post(
        "/v1/chat/completions", json=chat("gpt-4o-broken"), headers=run_header(run_id)
    )
    assert answer.status_code >= 500, answer.text
    decision_id = answer.headers["x-budget-decision-id"]
    record = await stub.GetDecision(pb.GetDecisionRequest(decision_id=decision_id))
    assert record.reservation_status == budget_pb2.RESERVATION_STATUS_RELEASED
    state = await state_of(stub, run_id)
    assert (state.committed_micros, state.reserved_micros) == (0, 0)


async def test_a_stream_commits_the_usage_of_its_last_chunk(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000_000)
    request = chat("gpt-4o-stream", stream=True, stream_options={"include_usage": True})
    async with http.stream(
        "POST", "/v1/chat/completions", json=request, headers=run_header(run_id)
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["x-budget-decision"] == "allow"
        text = "".join([part async for part in answer.aiter_text()])
    assert text.rstrip().endswith("[DONE]")
    assert "word39" in text
    usage = FakeProvider.USAGE
    state = await settled(stub, run_id)
    assert state.committed_micros == cost(
        GPT_4O, usage["prompt_tokens"], usage["completion_tokens"]
    )


async def test_a_client_gone_mid_stream_commits_what_was_streamed(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000_000)
    request = chat("gpt-4o-slow", stream=True)  # no usage asked: counted by the hook
    received = ""
    async with http.stream(
        "POST", "/v1/chat/completions", json=request, headers=run_header(run_id)
    ) as answer:
        assert answer.status_code == 200
        async for part in answer.aiter_text():
            received += part
            if "word4 " in received:
                break  # leave mid-stream: the connection closes
    state = await settled(stub, run_id)
    record = await stub.GetDecision(
        pb.GetDecisionRequest(decision_id=answer.headers["x-budget-decision-id"])
    )
    assert record.reservation_status == budget_pb2.RESERVATION_STATUS_COMMITTED
    held_input = cost(GPT_4O, record.estimate.input_tokens, 0)
    full = cost(GPT_4O, record.estimate.input_tokens, 2 * FakeProvider.WORDS)
    # The prompt and the few words sent, far from the 40 words of a whole answer.
    assert held_input < state.committed_micros < full
    assert state.committed_micros == record.actual_micros


async def test_an_unpriced_model_fails_closed(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000_000)
    answer = await http.post(
        "/v1/chat/completions", json=chat("mystery"), headers=run_header(run_id)
    )
    assert answer.status_code == 402
    body = problem_of(answer)
    assert body["code"] == "unknown_price"
    assert (body["budget"]["provider"], body["budget"]["model"]) == ("openai", "mystery-model-9000")
    assert (await state_of(stub, run_id)).reserved_micros == 0


async def test_runcap_unreachable_fails_closed_or_open_as_configured(proxies: Proxies) -> None:
    async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
        closed = await client.post(f"{proxies.closed.url}/v1/chat/completions", json=chat("gpt-4o"))
        assert closed.status_code == 503
        assert problem_of(closed)["code"] == "budget_authority_unavailable"
        opened = await client.post(f"{proxies.open.url}/v1/chat/completions", json=chat("gpt-4o"))
        assert opened.status_code == 200, opened.text
        assert opened.headers["x-budget-decision"] == "fail_open"
    assert "forwarding the call unbudgeted (fail open, 1 so far)" in proxies.open.log()


async def test_ten_parallel_calls_on_a_nearly_spent_run_never_pass_what_fits(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    # Learn the call's hold on a scratch run, then leave room for three of them.
    request = chat("gpt-4o-slow", max_tokens=100, stream=True)
    scratch = await create_run(stub, 1_000_000)
    async with http.stream(
        "POST", "/v1/chat/completions", json=request, headers=run_header(scratch)
    ) as first:
        decision_id = first.headers["x-budget-decision-id"]
    hold = (await stub.GetDecision(pb.GetDecisionRequest(decision_id=decision_id))).amount_micros
    run_id = await create_run(stub, 10 * hold)
    await stub.Reserve(pb.ReserveRequest(run_id=run_id, amount_micros=7 * hold - hold // 2))

    async def call() -> int:
        async with http.stream(
            "POST", "/v1/chat/completions", json=request, headers=run_header(run_id)
        ) as answer:
            await answer.aread()
            return answer.status_code

    statuses = await asyncio.gather(*(call() for _ in range(10)))
    # Each slow stream lasts 4 s, so all ten holds overlap: exactly 3 fit.
    assert sorted(statuses) == [200] * 3 + [402] * 7
    state = await settled(stub, run_id, holds=1)  # the 6.5 holds reserved above
    assert state.committed_micros + state.reserved_micros <= state.limit_micros


async def test_the_runaway_demo_meets_the_wall_through_the_proxy(
    proxies: Proxies, stub: BudgetServiceAsyncStub
) -> None:
    # runcap demo runaway, with its agent's calls going through the proxy.
    command = [sys.executable, "-m", "runcap_server", "demo", "runaway", "--json"]
    command += ["--target", proxies.runcap.target, "--proxy", proxies.main.url]
    command += ["--proxy-key", MASTER_KEY, "--provider", "openai", "--model", "gpt-4o"]
    command += ["--limit", "0.10", "--interval", "0.01", "--input-tokens", "200"]
    command += ["--growth", "100"]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    state = await state_of(stub, summary["run_id"])
    # Every allowed call committed the mock's usage, and the wall held.
    assert state.committed_micros == summary["calls"]["allowed"] * cost(
        GPT_4O, MOCK_PROMPT, MOCK_COMPLETION
    )
    assert state.committed_micros <= state.limit_micros == 100_000
    assert summary["calls"]["blocked"] == 1


def _normalized(body: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(body)
    text = text.replace(TABLE_VERSION, "2026-11-22+genai-prices-0.2.3")
    return dict(json.loads(re.sub(r"run-[0-9a-f]{16}", "run-7f3a9c", text)))


async def test_the_documented_problem_body_is_the_real_one(
    http: httpx.AsyncClient, stub: BudgetServiceAsyncStub
) -> None:
    run_id = await create_run(stub, 1_000)
    answer = await http.post(
        "/v1/chat/completions",
        json=chat("gpt-4o", max_tokens=1_000, tools=[_TOOL]),
        headers=run_header(run_id, **{"x-litellm-call-id": "call-1"}),
    )
    example = json.dumps(_normalized(problem_of(answer)), indent=2)
    block = f"<!-- problem-example -->\n```json\n{example}\n```\n<!-- /problem-example -->"
    text = DOC.read_text()
    found = re.search(r"<!-- problem-example -->.*?<!-- /problem-example -->", text, re.S)
    assert found is not None, "docs/litellm.md lost its problem-example markers"
    if os.environ.get("RUNCAP_UPDATE_DOCS") == "1":
        DOC.write_text(text.replace(found.group(0), block))
        return
    assert found.group(0) == block, (
        "docs/litellm.md's example differs from the real body: "
        "RUNCAP_UPDATE_DOCS=1 pytest tests/integration/test_litellm_proxy.py -k documented"
    )


_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
}
