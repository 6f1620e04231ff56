"""LLM calls through a real server: server-side estimates, fail-closed prices, usage.

The server reads a price table written by the test, so every expected amount
below is computed by hand from the rates here (micro-USD per 1M tokens).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.rpc import error_details_pb2

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.integration.rpc import create_run, error_info, new_id
from tests.servers import ServerProcess

if TYPE_CHECKING:
    from runcap.v1.budget_service_pb2_grpc import BudgetServiceAsyncStub


def model(name: str, **fields: Any) -> dict[str, Any]:
    entry = {
        "provider": "acme",
        "model": name,
        "input": 3_000_000,  # $3 per 1M input tokens
        "output": 15_000_000,  # $15 per 1M output tokens
        "cache_read": 300_000,
        "cache_write": 3_750_000,
        "reasoning": 15_000_000,
        "context_window": 200_000,
        "max_output_tokens": 64_000,
        "tools": True,
        "json_schema": True,
        "modalities": ["text"],
    }
    return {**entry, **fields}


def table(version: str, *models: dict[str, Any]) -> str:
    return json.dumps({"version": version, "sources": {}, "models": list(models)})


V1 = table(
    "test-v1",
    model("big"),
    model("small", input=150_000, output=600_000, cache_read=75_000, max_output_tokens=4_096),
    model("free", input=0, output=0, cache_read=0, cache_write=0, reasoning=0),
)
# v2 doubles big's prices.
V2 = table("test-v2", model("big", input=6_000_000, output=30_000_000))


@pytest.fixture(scope="module")
def price_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prices") / "prices.json"
    path.write_text(V1)
    return path


@pytest.fixture(scope="module")
def llm_server(
    tmp_path_factory: pytest.TempPathFactory, price_file: Path
) -> Iterator[ServerProcess]:
    env = {"RUNCAP_PRICE_TABLE": str(price_file), "RUNCAP_MAX_OUTPUT_TOKENS": "8000"}
    db = tmp_path_factory.mktemp("llm") / "runcap.db"
    server = ServerProcess(db, env=env).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def llm(llm_server: ServerProcess) -> AsyncIterator[BudgetServiceAsyncStub]:
    async with grpc.aio.insecure_channel(llm_server.target) as channel:
        yield BudgetServiceStub(channel)


def call(model_id: str, input_tokens: int, max_output: int | None = None) -> pb.LlmCall:
    request = pb.LlmCall(provider="acme", model=model_id, input_tokens=input_tokens)
    if max_output is not None:
        request.max_output_tokens = max_output
    return request


async def test_an_unknown_model_is_blocked_and_holds_nothing(llm: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(llm, limit_micros=10**9)
    request = pb.ReserveRequest(
        run_id=run_id, reservation_id="r", llm_call=call("gpt-unknown", 1_000, 100)
    )
    reply = await llm.Reserve(request)
    assert (reply.decision, reply.reason) == (
        budget_pb2.DECISION_BLOCK,
        budget_pb2.DECISION_REASON_UNKNOWN_PRICE,
    )
    assert (reply.amount_micros, reply.estimate.amount_micros) == (0, 0)
    assert reply.estimate.price_table_version == "test-v1"
    assert not reply.HasField("blocking_scope")
    # Nothing held; the block is the run's first: one BLOCKED change.
    assert (reply.state.reserved_micros, reply.state.revision, reply.state.blocked) == (0, 2, True)
    # Remembered like any block; a close model name is no match either.
    assert (await llm.Reserve(request)).replayed
    near = pb.ReserveRequest(run_id=run_id, llm_call=call("BIG", 1_000, 100))
    assert (await llm.Reserve(near)).reason == budget_pb2.DECISION_REASON_UNKNOWN_PRICE


@pytest.mark.parametrize(
    ("model_id", "input_tokens", "max_output", "effective", "amount"),
    [
        # 12,345 x 3 + 1,000 x 15 = 52,035 micro-USD exactly.
        ("big", 12_345, 1_000, 1_000, 52_035),
        # The server caps every request at 8,000 output tokens: 8,000 x 15 = 120,000.
        ("big", 0, 50_000, 8_000, 120_000),
        # small's own limit (4,096) is below the cap: 7 x 0.15 + 4,096 x 0.6 = 2,458.65 -> 2,459.
        ("small", 7, 8_000, 4_096, 2_459),
        # One input token of a cheap model still holds a whole micro-USD.
        ("small", 1, 1, 1, 1),
        ("free", 100, 100, 100, 0),
    ],
)
async def test_the_estimate_is_input_plus_effective_max_output(
    llm: BudgetServiceAsyncStub,
    model_id: str,
    input_tokens: int,
    max_output: int,
    effective: int,
    amount: int,
) -> None:
    run_id = await create_run(llm, limit_micros=10**9)
    reply = await llm.Reserve(
        pb.ReserveRequest(run_id=run_id, llm_call=call(model_id, input_tokens, max_output))
    )
    assert reply.decision == budget_pb2.DECISION_ALLOW
    estimate = reply.estimate
    assert (estimate.model, estimate.input_tokens) == (model_id, input_tokens)
    assert (estimate.effective_max_output_tokens, estimate.amount_micros) == (effective, amount)
    assert (reply.amount_micros, reply.state.reserved_micros) == (amount, amount)


async def test_a_call_without_max_output_tokens_is_refused(llm: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(llm, limit_micros=10**9)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=call("big", 10)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, status = error_info(refused.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["llm_call.max_output_tokens"]


async def test_commit_by_usage_prices_every_token_class(llm: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(llm, limit_micros=10**9)
    await llm.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="r", llm_call=call("big", 20_000, 2_000))
    )
    usage = pb.TokenUsage(
        input_tokens=1_000,  # x 3      = 3,000
        cache_read_tokens=18_000,  # x 0.3 = 5,400
        cache_write_tokens=1_000,  # x 3.75 = 3,750
        output_tokens=900,  # x 15     = 13,500
        reasoning_tokens=101,  # x 15  = 1,515
    )
    commit = pb.CommitRequest(run_id=run_id, reservation_id="r", usage=usage)
    reply = await llm.Commit(commit)
    assert (reply.actual_micros, reply.held_micros) == (27_165, 90_000)
    assert reply.state.committed_micros == 27_165
    assert (await llm.Commit(commit)).replayed
    other = pb.CommitRequest(run_id=run_id, reservation_id="r", usage=pb.TokenUsage(input_tokens=1))
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await llm.Commit(other)
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_usage_for_an_amount_reservation_is_refused(llm: BudgetServiceAsyncStub) -> None:
    run_id = await create_run(llm, limit_micros=10**9)
    await llm.Reserve(pb.ReserveRequest(run_id=run_id, reservation_id="r", amount_micros=500))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await llm.Commit(
            pb.CommitRequest(
                run_id=run_id, reservation_id="r", usage=pb.TokenUsage(output_tokens=1)
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _ = error_info(refused.value)
    assert info.reason == "INVALID_ARGUMENT"
    state = (await llm.GetRun(pb.GetRunRequest(run_id=run_id))).state
    assert (state.committed_micros, state.reserved_micros) == (0, 500)


async def test_a_reloaded_table_prices_new_calls_and_keeps_old_ones(
    llm_server: ServerProcess, llm: BudgetServiceAsyncStub, price_file: Path
) -> None:
    """SIGHUP: a valid table replaces the old for new Reserves; a broken one is ignored."""
    run_id = await create_run(llm, limit_micros=10**9)
    before = pb.ReserveRequest(run_id=run_id, reservation_id=new_id(), llm_call=call("big", 0, 10))
    assert (await llm.Reserve(before)).amount_micros == 150

    async def reload(text: str) -> None:
        await asyncio.to_thread(price_file.write_text, text)
        llm_server.signal(signal.SIGHUP)
        await asyncio.sleep(0.3)

    try:
        await reload("{ not json")
        kept = pb.ReserveRequest(run_id=run_id, llm_call=call("big", 0, 10))
        assert (await llm.Reserve(kept)).estimate.price_table_version == "test-v1"
        await reload(V2)
        after = await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=call("big", 0, 10)))
        assert (after.estimate.price_table_version, after.amount_micros) == ("test-v2", 300)
        # small is gone from v2: fail closed.
        gone = await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=call("small", 0, 10)))
        assert gone.reason == budget_pb2.DECISION_REASON_UNKNOWN_PRICE
        # The earlier reservation keeps its v1 rates: retried, it replays...
        assert (await llm.Reserve(before)).replayed
        # ...and its usage is priced at v1's $15/M, not v2's $30/M.
        committed = await llm.Commit(
            pb.CommitRequest(
                run_id=run_id,
                reservation_id=before.reservation_id,
                usage=pb.TokenUsage(output_tokens=10),
            )
        )
        assert committed.actual_micros == 150
    finally:
        await reload(V1)


async def test_the_admin_rpc_reloads_the_table_or_says_why_not(
    llm: BudgetServiceAsyncStub, price_file: Path
) -> None:
    try:
        await asyncio.to_thread(price_file.write_text, '{"version": "broken"')
        refused = await llm.ReloadPriceTable(pb.ReloadPriceTableRequest())
        assert (refused.reloaded, refused.price_table_version) == (False, "test-v1")
        assert "not reloaded" in refused.message
        await asyncio.to_thread(price_file.write_text, V2)
        reloaded = await llm.ReloadPriceTable(pb.ReloadPriceTableRequest())
        assert (reloaded.reloaded, reloaded.price_table_version, reloaded.models) == (
            True,
            "test-v2",
            1,
        )
        run_id = await create_run(llm, limit_micros=10**9)
        after = await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=call("big", 0, 10)))
        assert after.estimate.price_table_version == "test-v2"
    finally:
        await asyncio.to_thread(price_file.write_text, V1)
        assert (await llm.ReloadPriceTable(pb.ReloadPriceTableRequest())).reloaded


def custom_price(model_id: str, input_rate: int, output_rate: int) -> pb.ModelPrice:
    return pb.ModelPrice(
        provider="acme",
        model=model_id,
        input_rate=input_rate,
        output_rate=output_rate,
        cache_read_rate=input_rate,
        cache_write_rate=input_rate,
        reasoning_rate=output_rate,
        max_output_tokens=500,
        tools=True,
        modalities=["text", "image"],
    )


async def test_a_tenant_price_unblocks_a_custom_model_and_overrides_the_table(
    llm: BudgetServiceAsyncStub,
) -> None:
    run_id = await create_run(llm, limit_micros=10**9)
    custom = call(f"custom-{new_id()}", 1_000, 2_000)
    blocked = await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=custom))
    assert blocked.reason == budget_pb2.DECISION_REASON_UNKNOWN_PRICE

    set_reply = await llm.SetModelPrice(
        pb.SetModelPriceRequest(price=custom_price(custom.model, 1_000_000, 2_000_000))
    )
    assert set_reply.price.max_output_tokens == 500
    shown = await llm.GetModelPrice(pb.GetModelPriceRequest(provider="acme", model=custom.model))
    assert shown.tenant_override
    assert (shown.price.input_rate, list(shown.price.modalities)) == (1_000_000, ["image", "text"])

    reserve = pb.ReserveRequest(run_id=run_id, reservation_id="c", llm_call=custom)
    allowed = await llm.Reserve(reserve)
    # 1,000 x 1 + min(2,000, 500 the model's limit) x 2 = 2,000 micro-USD.
    assert (allowed.decision, allowed.amount_micros) == (budget_pb2.DECISION_ALLOW, 2_000)
    assert allowed.estimate.price_table_version.startswith("tenant-")

    # Removing the price blocks new calls again; the reservation keeps its rates.
    deleted = await llm.DeleteModelPrice(
        pb.DeleteModelPriceRequest(provider="acme", model=custom.model)
    )
    assert deleted.deleted
    again = await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=custom))
    assert again.reason == budget_pb2.DECISION_REASON_UNKNOWN_PRICE
    committed = await llm.Commit(
        pb.CommitRequest(run_id=run_id, reservation_id="c", usage=pb.TokenUsage(output_tokens=100))
    )
    assert committed.actual_micros == 200
    assert not (
        await llm.DeleteModelPrice(pb.DeleteModelPriceRequest(provider="acme", model=custom.model))
    ).deleted

    # A tenant price for a table model replaces the table's while it exists.
    await llm.SetModelPrice(pb.SetModelPriceRequest(price=custom_price("small", 0, 1_000_000)))
    try:
        cheap = await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=call("small", 9, 7)))
        assert cheap.amount_micros == 7
    finally:
        await llm.DeleteModelPrice(pb.DeleteModelPriceRequest(provider="acme", model="small"))
    table = await llm.Reserve(pb.ReserveRequest(run_id=run_id, llm_call=call("small", 0, 10)))
    assert (table.amount_micros, table.estimate.price_table_version) == (6, "test-v1")


async def test_a_bad_tenant_price_is_refused_and_changes_nothing(
    llm: BudgetServiceAsyncStub,
) -> None:
    bad = custom_price("", -1, 2**53)
    bad.modalities.append("smell")
    bad.max_output_tokens = 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await llm.SetModelPrice(pb.SetModelPriceRequest(price=bad))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, status = error_info(refused.value)
    violations = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(violations)
    assert {v.field for v in violations.field_violations} == {
        "price.model",
        "price.input_rate",
        "price.output_rate",
        "price.cache_read_rate",
        "price.cache_write_rate",
        "price.reasoning_rate",
        "price.max_output_tokens",
        "price.modalities",
    }
    shown = await llm.GetModelPrice(pb.GetModelPriceRequest(provider="acme", model="big"))
    assert (shown.tenant_override, shown.price.input_rate) == (False, 3_000_000)


async def test_a_calibrated_run_learns_its_outputs_and_reports_its_exposure(
    llm: BudgetServiceAsyncStub,
) -> None:
    policy = budget_pb2.RunPolicy(
        enforcement_mode=budget_pb2.ENFORCEMENT_MODE_CALIBRATED, calibration_min_samples=2
    )
    run_id = await create_run(llm, limit_micros=1_000_000, policy=policy)
    # 1,000 x 3 + 8,000 x 15 = 123,000 worst case; 200 real output tokens cost 6,000.
    for i in range(2):
        warm = await llm.Reserve(
            pb.ReserveRequest(
                run_id=run_id, reservation_id=f"w{i}", llm_call=call("big", 1_000, 8_000)
            )
        )
        assert (warm.amount_micros, warm.estimate.basis) == (123_000, pb.ESTIMATE_BASIS_WORST_CASE)
        assert warm.estimate.calibration_samples == i
        usage = pb.TokenUsage(input_tokens=1_000, output_tokens=150, reasoning_tokens=50)
        await llm.Commit(pb.CommitRequest(run_id=run_id, reservation_id=f"w{i}", usage=usage))

    reply = await llm.Reserve(
        pb.ReserveRequest(run_id=run_id, reservation_id="next", llm_call=call("big", 1_000, 8_000))
    )

    assert reply.decision == budget_pb2.DECISION_ALLOW
    estimate = reply.estimate
    assert (estimate.basis, estimate.calibrated_output_tokens, estimate.calibration_samples) == (
        pb.ESTIMATE_BASIS_CALIBRATED,
        200,
        2,
    )
    assert (estimate.amount_micros, estimate.calibrated_amount_micros) == (123_000, 6_000)
    assert (reply.amount_micros, reply.state.reserved_micros) == (6_000, 6_000)
    assert (reply.exposure_micros, reply.exposure_ceiling_micros) == (12_000 + 123_000, 1_100_000)
    run = (await llm.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert run.policy.enforcement_mode == budget_pb2.ENFORCEMENT_MODE_CALIBRATED
    assert run.policy.calibration_min_samples == 2


async def test_exposure_allowances_apply_only_to_calibrated_runs(
    llm: BudgetServiceAsyncStub,
) -> None:
    for policy in (
        budget_pb2.RunPolicy(exposure_allowance_micros=10),
        budget_pb2.RunPolicy(
            enforcement_mode=budget_pb2.ENFORCEMENT_MODE_CALIBRATED,
            exposure_allowance_micros=10,
            exposure_allowance_percent=5,
        ),
        budget_pb2.RunPolicy(
            enforcement_mode=budget_pb2.ENFORCEMENT_MODE_CALIBRATED, calibration_min_samples=33
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await create_run(llm, limit_micros=1_000, policy=policy)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
