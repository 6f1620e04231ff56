"""The LiteLLM proxy for tests: the real `litellm` command in a subprocess on a
free loopback port, with runcap's hook, and a fake OpenAI-compatible provider
on loopback for streams (nothing leaves the machine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LITELLM = Path(sys.executable).with_name("litellm")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ProxyProcess:
    """`litellm --config` with runcap's hook, settings from `env`."""

    def __init__(self, config: Mapping[str, Any], directory: Path, env: Mapping[str, str]) -> None:
        self.config_path = directory / "config.yaml"
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = directory / "proxy.log"
        self.env = dict(env)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ProxyProcess:
        env = {
            **os.environ,
            # Offline: LiteLLM's bundled cost map, no telemetry.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "NO_DOCS": "True",
            **self.env,
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    *(str(LITELLM), "--config", str(self.config_path)),
                    *("--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the proxy exited {self.process.returncode}:\n{self.log()}")
            health = f"{self.url}/health/liveliness"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the proxy did not start in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FakeProvider:
    """An OpenAI-compatible chat completions endpoint on loopback, streaming
    only. The path says how: ``/fast/v1/...`` streams at once, ``/slow/v1/...``
    one chunk every `slow_gap_s`. With ``stream_options.include_usage`` the
    last chunk carries `USAGE`. `closed_early` counts slow streams whose
    client went away before the end."""

    WORDS = 40
    USAGE = {"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50}

    def __init__(self, slow_gap_s: float = 0.1) -> None:
        self.slow_gap_s = slow_gap_s
        self.port = free_port()
        self.closed_early = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def base(self, speed: str) -> str:
        return f"http://127.0.0.1:{self.port}/{speed}/v1"

    def start(self) -> FakeProvider:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop
        )
        self._server = started.result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            # Streams still being served: end them, so their sockets close.
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            path = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            request = json.loads(await reader.readexactly(length))
            await self._stream(path, request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _stream(
        self, path: str, request: dict[str, Any], writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        slow = path.startswith("/slow/")

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            event = f"data: {data}\n\n".encode()
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
        base["model"] = request.get("model", "")
        try:
            for i in range(self.WORDS):
                delta = {"role": "assistant", "content": f"word{i} "}
                await send({**base, "choices": [{"index": 0, "delta": delta}]})
                if slow:
                    await asyncio.sleep(self.slow_gap_s)
            done = {"index": 0, "delta": {}, "finish_reason": "stop"}
            await send({**base, "choices": [done]})
            if (request.get("stream_options") or {}).get("include_usage"):
                await send({**base, "choices": [], "usage": self.USAGE})
            await send("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            if slow:
                self.closed_early += 1
