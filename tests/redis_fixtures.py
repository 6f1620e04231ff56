"""Pytest plugin: Redis fixtures on real redis-server processes.

Registered from tests/conftest.py with `pytest_plugins = ["tests.redis_fixtures"]`.
Every fixture starts Debian's redis-server on free loopback ports and stops it in
`finally`. Without redis-server (or redis-cli) on PATH they fail, never skip: CI
installs them, and a skip would hide a broken CI. Tests that use them get the
`redis` marker, so `-m "not redis"` leaves them out.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_servers import RedisCluster, RedisNotInstalledError, RedisServer, executable

REDIS_FIXTURES = frozenset({"redis_standalone", "redis_cluster", "redis_cluster_with_replicas"})


def _require(*names: str) -> None:
    problems = []
    for name in names:
        try:
            executable(name)
        except RedisNotInstalledError as error:
            problems.append(str(error))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def redis_standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One standalone server for the session (no persistence); connect with `.url`.

    Tests share it, so each uses keys of its own (a uuid4 in the key or hash tag).
    """
    _require("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis-standalone"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-primary cluster without replicas for the session; see `.startup_nodes`.

    Shared like `redis_standalone`: keys of the test's own, and no faults.
    """
    _require("redis-server", "redis-cli")
    cluster = RedisCluster(primaries=3, replicas_per_primary=0)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_with_replicas() -> Iterator[RedisCluster]:
    """A cluster of the test's own: 3 primaries with one replica each, for failovers.

    Node timeout 1 s, so `kill_primary(port)` + `wait_for_failover(port)` take ~2-3 s.
    """
    _require("redis-server", "redis-cli")
    cluster = RedisCluster(primaries=3, replicas_per_primary=1, node_timeout_ms=1_000)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
