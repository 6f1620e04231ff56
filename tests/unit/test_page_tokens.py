"""Page tokens: a token answers only its own query, and a forged one is refused
(None: INVALID_ARGUMENT at the edge), never passed on to a store."""

from __future__ import annotations

import base64
import json

import pytest

from runcap_server.page_tokens import page_cursor, page_token


def forged(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def test_a_token_round_trips_for_its_query_only() -> None:
    token = page_token((1_700_000_000_000, "run-7"), "team=data")
    assert page_cursor(token, "team=data") == (1_700_000_000_000, "run-7")
    assert page_cursor(token, "team=web") is None


@pytest.mark.parametrize(
    "token",
    [
        forged(False, "", "q"),  # a bool is an int to isinstance (the fuzz suite found it)
        forged(True, "a", "q"),
        forged(-1, "a", "q"),
        forged(2**63, "a", "q"),  # past SQLite's INTEGER (the long fuzz form found it)
        forged(1.5, "a", "q"),
        forged("12", "a", "q"),
        forged(12, 7, "q"),
        forged(12, "a"),
        forged(12, "a", "q", "extra"),
        "not base64!",
        "",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_forged_tokens_are_refused(token: str) -> None:
    assert page_cursor(token, "q") is None
