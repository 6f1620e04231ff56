"""Server replicas on a Redis topology, and a ledger that reads what they wrote."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from runcap_server.backends.redis import RedisLedger
from tests.redis_servers import RedisCluster, RedisServer

# RUNCAP_CHAOS=short: CI's short form (`make chaos CHAOS=short`).
SHORT = os.environ.get("RUNCAP_CHAOS", "") == "short"
TENANT = "default"


def scaled(full: float, short: float) -> float:
    """A duration or count in the full suite, and in its short form."""
    return short if SHORT else full


def namespace() -> str:
    return f"chaos-{uuid.uuid4().hex[:10]}"


def redis_env(redis: RedisCluster | RedisServer, ns: str, **extra: str) -> dict[str, str]:
    """Environment for a server replica on `redis` in namespace `ns`."""
    where = (
        {"RUNCAP_REDIS_CLUSTER_NODES": ",".join(redis.startup_nodes)}
        if isinstance(redis, RedisCluster)
        else {"RUNCAP_REDIS_URL": redis.url}
    )
    return {
        "RUNCAP_BACKEND": "redis",
        "RUNCAP_REDIS_NAMESPACE": ns,
        "RUNCAP_SWEEP_INTERVAL": "100ms",
        # Replicas are stopped with streams the clients have just cancelled.
        "RUNCAP_SHUTDOWN_GRACE": "2s",
        **where,
        **extra,
    }


@contextlib.asynccontextmanager
async def reader(
    redis: RedisCluster | RedisServer, ns: str, closed_retention_ms: int = 30 * 86_400_000
) -> AsyncIterator[RedisLedger]:
    """A ledger on the replicas' namespace, for the checker (it never sweeps).

    Give it the replicas' RUNCAP_CLOSED_RUN_RETENTION: its operations set a
    closed run's retention too.
    """
    where: dict[str, Any] = (
        {"url": redis.url}
        if isinstance(redis, RedisServer)
        else {"cluster_nodes": redis.startup_nodes}
    )
    ledger = RedisLedger(
        **where, default_ttl_ms=60_000, namespace=ns, closed_retention_ms=closed_retention_ms
    )
    await ledger.start()
    try:
        yield ledger
    finally:
        await ledger.close()
