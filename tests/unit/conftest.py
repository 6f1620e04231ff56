"""Clients of the in-process fake server, for the modules that define a `fake`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from runcap import AsyncRuncapClient, RuncapClient
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
