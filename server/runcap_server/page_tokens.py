"""Opaque AIP-158 page tokens: where a page ended (a time in ms and an id), and
for which query, so a token is refused on any other query."""

from __future__ import annotations

import base64
import json

Cursor = tuple[int, str]


def page_token(cursor: Cursor, query: str) -> str:
    text = json.dumps([cursor[0], cursor[1], query], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def page_cursor(token: str, query: str) -> Cursor | None:
    """The cursor of a token of `query`; None for any other token, or for none at all."""
    try:
        padded = token + "=" * (-len(token) % 4)
        ms, id_, of = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError):
        return None
    # type(), not isinstance: JSON's true and false are bools, and a bool is an int.
    # Within a signed 64-bit integer: the stores compare it as one (SQLite's INTEGER).
    if of != query or type(ms) is not int or not 0 <= ms < 2**63 or not isinstance(id_, str):
        return None
    return ms, id_
