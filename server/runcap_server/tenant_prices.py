"""A tenant's own model prices (SetModelPrice), over the shipped price table.

They live in the backend, so every replica applies them: each replica keeps a
copy and refreshes it when the backend's version counter moves (checked every
second in the background, and at once after a change made through it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from runcap_server.backends.base import Backend
from runcap_server.prices import ModelPrice, PriceTableError

_log = logging.getLogger(__name__)
REFRESH_S = 1.0


def override_key(provider: str, model: str) -> str:
    """Names a model in storage. Model names never contain a tab."""
    return f"{provider}\t{model}"


class TenantPrices:
    """One tenant's overrides, as last read from the backend."""

    def __init__(self, backend: Backend, tenant: str) -> None:
        self.backend = backend
        self.tenant = tenant
        self.version = 0
        self._prices: dict[tuple[str, str], ModelPrice] = {}

    def lookup(self, provider: str, model: str) -> ModelPrice | None:
        return self._prices.get((provider, model))

    def models(self) -> list[ModelPrice]:
        return list(self._prices.values())

    @property
    def label(self) -> str:
        """The version recorded with a decision priced by an override."""
        return f"tenant-{self.version}"

    async def refresh(self) -> None:
        version = await self.backend.price_overrides_version(self.tenant)
        if version == self.version:
            return
        version, entries = await self.backend.price_overrides(self.tenant)
        prices: dict[tuple[str, str], ModelPrice] = {}
        for key, text in entries.items():
            try:
                price = ModelPrice.from_entry(json.loads(text), f"tenant price {key!r}")
            except (PriceTableError, ValueError) as error:
                _log.error("ignoring an unreadable tenant price: %s", error)
                continue
            prices[(price.provider, price.model)] = price
        self._prices, self.version = prices, version

    async def set(self, price: ModelPrice) -> None:
        text = json.dumps(price.to_entry(), sort_keys=True, separators=(",", ":"))
        key = override_key(price.provider, price.model)
        await self.backend.set_price_override(self.tenant, key, text)
        await self.refresh()

    async def delete(self, provider: str, model: str) -> bool:
        key = override_key(provider, model)
        deleted = await self.backend.set_price_override(self.tenant, key, None)
        await self.refresh()
        return deleted

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            with contextlib.suppress(Exception):  # the backend's health is reported elsewhere
                await self.refresh()
