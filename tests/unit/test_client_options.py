"""The channel options the Python clients open their channels with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from runcap import DEFAULT_CHANNEL_OPTIONS, AsyncRuncapClient, RuncapClient

Seen = list[list[tuple[str, str | int]]]

KEEPALIVE = {
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
}


def _recording(real: Callable[..., Any], seen: Seen) -> Callable[..., Any]:
    def make(*args: Any, options: list[tuple[str, str | int]], **kwargs: Any) -> Any:
        seen.append(list(options))
        return real(*args, options=options, **kwargs)

    return make


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    """The options of every channel opened, sync or asyncio, plaintext or TLS."""
    calls: Seen = []
    monkeypatch.setattr(grpc, "insecure_channel", _recording(grpc.insecure_channel, calls))
    monkeypatch.setattr(grpc, "secure_channel", _recording(grpc.secure_channel, calls))
    monkeypatch.setattr(grpc.aio, "insecure_channel", _recording(grpc.aio.insecure_channel, calls))
    monkeypatch.setattr(grpc.aio, "secure_channel", _recording(grpc.aio.secure_channel, calls))
    return calls


def test_defaults_are_the_keepalive_settings() -> None:
    assert dict(DEFAULT_CHANNEL_OPTIONS) == KEEPALIVE


def test_sync_client_channels_get_keepalive_by_default(seen: Seen) -> None:
    with RuncapClient("127.0.0.1:1"):
        pass
    with RuncapClient("127.0.0.1:1", credentials=grpc.ssl_channel_credentials()):
        pass
    assert [dict(options) for options in seen] == [KEEPALIVE, KEEPALIVE]


async def test_async_client_channels_get_keepalive_by_default(seen: Seen) -> None:
    async with AsyncRuncapClient("127.0.0.1:1"):
        pass
    async with AsyncRuncapClient("127.0.0.1:1", credentials=grpc.ssl_channel_credentials()):
        pass
    assert [dict(options) for options in seen] == [KEEPALIVE, KEEPALIVE]


def test_user_options_are_merged_and_win(seen: Seen) -> None:
    user: list[tuple[str, str | int]] = [
        ("grpc.keepalive_time_ms", 120_000),
        ("grpc.primary_user_agent", "my-agent"),
    ]
    with RuncapClient("127.0.0.1:1", options=user):
        pass
    (options,) = seen
    keys = [key for key, _ in options]
    assert len(keys) == len(set(keys)), options  # no key twice: grpc's pick is undefined
    assert dict(options) == {
        **KEEPALIVE,
        "grpc.keepalive_time_ms": 120_000,
        "grpc.primary_user_agent": "my-agent",
    }


async def test_async_user_options_are_merged_and_win(seen: Seen) -> None:
    async with AsyncRuncapClient("127.0.0.1:1", options=[("grpc.keepalive_timeout_ms", 5)]):
        pass
    assert [dict(options) for options in seen] == [{**KEEPALIVE, "grpc.keepalive_timeout_ms": 5}]


def test_a_channel_passed_in_is_left_alone(seen: Seen) -> None:
    with grpc.insecure_channel("127.0.0.1:1", options=[]) as channel:
        seen.clear()
        with RuncapClient(channel=channel):
            pass
    assert seen == []
