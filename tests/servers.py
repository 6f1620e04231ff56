"""Real runcap server processes for tests, on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_LISTENING = re.compile(r"runcap listening on (\S+)")


class ServerProcess:
    """`python -m runcap_server serve` in a subprocess; stderr is kept for asserts.

    SQLite at `db_path`, the memory backend without one, or Redis when `env`
    sets RUNCAP_BACKEND=redis (with RUNCAP_REDIS_URL or _CLUSTER_NODES).
    With RUNCAP_TLS_* in `env`, `credentials` are what the readiness check
    connects with (for mTLS, with a client certificate).
    """

    def __init__(
        self,
        db_path: Path | None,
        env: Mapping[str, str] | None = None,
        listen: str = "127.0.0.1:0",
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.db_path = db_path
        self.credentials = credentials
        self.extra_env = dict(env or {})
        self.listen = listen
        self.process: subprocess.Popen[str] | None = None
        self.target = ""
        self.log: list[str] = []
        self._reader: threading.Thread | None = None
        self._listening = threading.Event()

    def start(self, timeout_s: float = 20.0) -> ServerProcess:
        env = {**os.environ, "RUNCAP_LOG_LEVEL": "INFO", **self.extra_env}
        if not env.get("RUNCAP_API_KEYS_FILE"):
            env.setdefault("RUNCAP_INSECURE_DEV", "1")  # loopback test servers: no keys
        args = [sys.executable, "-m", "runcap_server", "serve", "--listen", self.listen]
        if env.get("RUNCAP_BACKEND") == "redis":
            pass  # RUNCAP_REDIS_* in env say where
        elif self.db_path is None:
            args += ["--backend", "memory"]
        else:
            args += ["--backend", "sqlite", "--sqlite-path", str(self.db_path)]
        self.process = subprocess.Popen(
            args, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self._listening.clear()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout_s):
            self.kill()
            raise RuntimeError("runcap server did not start:\n" + "".join(self.log))
        wait_serving(self.target, credentials=self.credentials)
        return self

    def _read(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = _LISTENING.search(line)
            if match:
                self.target = match.group(1)
                self._listening.set()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout_s)
        if self._reader:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process and self.process.stderr:
            if self._reader:
                self._reader.join(5)
            self.process.stderr.close()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        code = self.process.poll()
        self.kill()
        return code


def wait_serving(
    target: str, timeout_s: float = 10.0, credentials: grpc.ChannelCredentials | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
