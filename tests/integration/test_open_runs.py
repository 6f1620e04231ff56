"""Cardinality limits through real server processes: open runs per principal
(RUNCAP_MAX_OPEN_RUNS) and the run TTL (RUNCAP_RUN_TTL), on SQLite and on a
Redis cluster, with API keys so each key is its own principal."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from runcap import OpenRunLimitError, from_rpc_error
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from tests.integration.test_grpc_auth import runcap_cli
from tests.redis_servers import RedisCluster
from tests.servers import ServerProcess

LIMIT = 3
Server = tuple[ServerProcess, dict[str, str]]
RUN_TTL_MS = 1500


def _keys(directory: Path) -> tuple[Path, dict[str, str]]:
    keys_file = directory / "keys.json"
    secrets = {}
    for name in ("agent-a", "agent-b"):
        done = runcap_cli(
            "keys", "--file", str(keys_file), "create", name, "--tenant", "acme", "--role", "agent"
        )
        assert done.returncode == 0, done.stderr
        secrets[name] = done.stdout.strip()
    return keys_file, secrets


@pytest.fixture(params=["sqlite", "redis-cluster"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    keys_file, secrets = _keys(tmp_path)
    env = {
        "RUNCAP_API_KEYS_FILE": str(keys_file),
        "RUNCAP_MAX_OPEN_RUNS": str(LIMIT),
        "RUNCAP_RUN_TTL": f"{RUN_TTL_MS}ms",
    }
    db: Path | None = tmp_path / "runcap.db"
    if request.param == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        env |= {
            "RUNCAP_BACKEND": "redis",
            "RUNCAP_REDIS_CLUSTER_NODES": ",".join(cluster.startup_nodes),
            "RUNCAP_REDIS_NAMESPACE": f"open-{uuid.uuid4().hex[:8]}",
        }
        db = None
    process = ServerProcess(db, env=env).start()
    try:
        yield process, secrets
    finally:
        process.stop()


def _as(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def _create(stub: BudgetServiceStub, secret: str, run_id: str) -> pb.CreateRunResponse:
    response: pb.CreateRunResponse = stub.CreateRun(
        pb.CreateRunRequest(run_id=run_id, limit_micros=1_000_000), metadata=_as(secret)
    )
    return response


def _refused(stub: BudgetServiceStub, secret: str, run_id: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _create(stub, secret, run_id)
    return caught.value


def test_open_runs_per_principal_and_the_run_ttl(
    server: tuple[ServerProcess, dict[str, str]],
) -> None:
    process, secrets = server
    tag = uuid.uuid4().hex[:6]
    with grpc.insecure_channel(process.target) as channel:
        stub = BudgetServiceStub(channel)
        a, b = secrets["agent-a"], secrets["agent-b"]
        for i in range(LIMIT):
            _create(stub, a, f"a{i}-{tag}")
        # A retry of a CreateRun that was counted is not a new run.
        assert _create(stub, a, f"a0-{tag}").replayed

        error = _refused(stub, a, f"a-extra-{tag}")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "open runs" in (error.details() or "")
        typed = from_rpc_error(error)
        assert isinstance(typed, OpenRunLimitError)
        assert typed.limit == LIMIT
        quota = typed.detail(error_details_pb2.QuotaFailure)
        assert quota is not None
        assert quota.violations[0].subject == "agent-a"
        # Nothing was created by the refused call.
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetRun(pb.GetRunRequest(run_id=f"a-extra-{tag}"), metadata=_as(a))
        assert missing.value.code() in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
        )

        # Another principal has its own count.
        _create(stub, b, f"b0-{tag}")

        # Closing a run frees its place at once.
        stub.CloseRun(pb.CloseRunRequest(run_id=f"a1-{tag}"), metadata=_as(a))
        _create(stub, a, f"a3-{tag}")
        assert _refused(stub, a, f"a4-{tag}").code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Past the run TTL the server closes the runs and frees their places.
        deadline = time.monotonic() + RUN_TTL_MS / 1000 + 10
        while True:
            # a3 is a's newest run: once it is closed, all of a's are.
            state = stub.GetRun(pb.GetRunRequest(run_id=f"a3-{tag}"), metadata=_as(a)).state
            if state.status == budget_pb2.RUN_STATUS_CLOSED:
                break
            assert time.monotonic() < deadline, "the run TTL never closed the run"
            time.sleep(0.2)
        for i in range(LIMIT):
            _create(stub, a, f"a-after-{i}-{tag}")
        assert any("open longer than the run TTL" in line for line in process.log)
