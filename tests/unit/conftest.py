"""Shared unit fixtures: every ledger backend on a manual clock (`ledger`), and
clients of the in-process fake server for the modules that define a `fake`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from runcap import AsyncRuncapClient, RuncapClient
from runcap_server.clock import ManualClock
from tests.ledger_backends import BACKENDS, Ledger, open_backend, redis_targets
from tests.unit.fake_budget import FAST


@pytest.fixture
def client(fake: tuple[Any, str]) -> Iterator[RuncapClient]:
    """A sync client of the module's `fake` (a (fake, target) fixture)."""
    with RuncapClient(fake[1], retry=FAST) as sync_client:
        yield sync_client


@pytest.fixture
async def aclient(fake: tuple[Any, str]) -> AsyncIterator[AsyncRuncapClient]:
    """An async client of the module's `fake`."""
    async with AsyncRuncapClient(fake[1], retry=FAST) as async_client:
        yield async_client


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=BACKENDS)
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[Ledger]:
    """Each backend in turn (Redis ones on the fixtures' servers), on `clock`."""
    redis = redis_targets(request, request.param)
    async with open_backend(request.param, tmp_path, clock, redis=redis) as backend:
        yield backend
