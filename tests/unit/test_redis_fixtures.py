"""The Redis fixtures give real, working servers: standalone, cluster, failover."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from tests.redis_servers import HOST, RedisCluster, RedisServer

pytestmark = pytest.mark.redis

TRANSFER = """
redis.call('DECRBY', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[1])
return {tonumber(redis.call('GET', KEYS[1])), tonumber(redis.call('GET', KEYS[2]))}
"""


def cluster_client(cluster: RedisCluster) -> AsyncRedisCluster:
    nodes = [ClusterNode(HOST, int(address.rsplit(":", 1)[1])) for address in cluster.startup_nodes]
    return AsyncRedisCluster(startup_nodes=nodes, decode_responses=True)


async def test_standalone_set_get(redis_standalone: RedisServer) -> None:
    key = f"fixture-test:{uuid.uuid4()}"
    client = aioredis.Redis.from_url(redis_standalone.url, decode_responses=True)
    try:
        assert await client.set(key, "value", ex=60)
        assert await client.get(key) == "value"
    finally:
        await client.aclose()


async def test_cluster_hash_tags_spread_over_all_primaries(redis_cluster: RedisCluster) -> None:
    primaries = redis_cluster.primaries()
    assert len(primaries) == 3
    assert sorted(redis_cluster.startup_nodes) == sorted(f"{HOST}:{port}" for port in primaries)
    prefix = uuid.uuid4().hex
    keys = [f"{{{prefix}-{i}}}:spent" for i in range(50)]
    client = cluster_client(redis_cluster)
    try:
        for key in keys:
            await client.set(key, 1, ex=60)
        holders: Counter[int] = Counter()
        for key in keys:
            slot = await client.cluster_keyslot(key)
            assert slot == key_slot(key.encode())
            owner = redis_cluster.slot_owner(slot)
            # The key lives on the primary serving its slot (no redirect, no proxy).
            direct = aioredis.Redis(host=HOST, port=owner, decode_responses=True)
            try:
                assert await direct.exists(key) == 1
            finally:
                await direct.aclose()
            holders[owner] += 1
    finally:
        await client.aclose()
    assert set(holders) == set(primaries), holders
    assert sum(holders.values()) == 50


async def test_cluster_lua_on_one_hash_tag(redis_cluster: RedisCluster) -> None:
    tag = uuid.uuid4().hex
    budget, spent = f"{{run-{tag}}}:budget", f"{{run-{tag}}}:spent"
    client = cluster_client(redis_cluster)
    try:
        await client.set(budget, 100, ex=60)
        await client.set(spent, 0, ex=60)
        assert await client.eval(TRANSFER, 2, budget, spent, 30) == [70, 30]
        assert await client.eval(TRANSFER, 2, budget, spent, 5) == [65, 35]
        # Keys in two slots: the client refuses before sending anything.
        untagged = f"budget-{tag}"
        elsewhere = next(
            key
            for key in (f"spent-{tag}-{i}" for i in range(10))
            if key_slot(key.encode()) != key_slot(untagged.encode())
        )
        with pytest.raises(RedisClusterException, match="same key slot"):
            await client.eval(TRANSFER, 2, untagged, elsewhere, 1)
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_cluster_failover_keeps_acknowledged_write(
    redis_cluster_with_replicas: RedisCluster,
) -> None:
    cluster = redis_cluster_with_replicas
    assert len(cluster.primaries()) == 3
    assert all(cluster.replicas_of(primary) for primary in cluster.primaries())
    key = f"{{failover-{uuid.uuid4().hex}}}:spent"
    primary = cluster.slot_owner(key_slot(key.encode()))
    replica = cluster.replica_of(primary)

    client = aioredis.Redis(host=HOST, port=primary, decode_responses=True)
    try:
        # One connection for both, so WAIT covers the SET.
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(key, "42")
            pipe.execute_command("WAIT", 1, 1000)
            assert await pipe.execute() == [True, 1]
    finally:
        await client.aclose()

    cluster.kill_primary(primary)
    promoted = cluster.wait_for_failover(primary)
    assert promoted == replica
    assert primary not in cluster.primaries()
    assert cluster.slot_owner(key_slot(key.encode())) == promoted

    direct = aioredis.Redis(host=HOST, port=promoted, decode_responses=True)
    try:
        assert await direct.get(key) == "42"
    finally:
        await direct.aclose()
    client_after = cluster_client(cluster)
    try:
        assert await client_after.get(key) == "42"
    finally:
        await client_after.aclose()
