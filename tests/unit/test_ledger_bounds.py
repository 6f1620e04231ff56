"""Totals stay within 2**53 - 1 micro-USD, the exact range of every backend."""

from __future__ import annotations

import pytest

from runcap_server import errors
from runcap_server.ledger.model import ModelLedger
from runcap_server.ledger.types import MAX_MICROS, RunSpec


async def test_commit_that_would_overflow_the_committed_total_is_rejected() -> None:
    ledger = ModelLedger(default_ttl_ms=60_000)
    await ledger.create_run("t", RunSpec("run", MAX_MICROS, {}, None))
    await ledger.reserve("t", "run", "a", 1, None)
    await ledger.reserve("t", "run", "b", 1, None)
    await ledger.commit("t", "run", "a", MAX_MICROS - 10)
    before = (await ledger.get_run("t", "run")).state
    with pytest.raises(errors.InvalidArgument) as rejected:
        await ledger.commit("t", "run", "b", 11)
    assert rejected.value.fields == ["actual_micros"]
    assert (await ledger.get_run("t", "run")).state == before
    assert (await ledger.commit("t", "run", "b", 10)).state.committed_micros == MAX_MICROS
