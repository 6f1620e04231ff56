"""What an HTTP request to the dashboard asks for, checked before anything
is called: bad input is a `BadRequest` naming the field, and changes
nothing. Run ids and approval ids are the API's to check (its
INVALID_ARGUMENT becomes a 400 all the same)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from runcap_server import report

_BEARER: Final = re.compile(r"Bearer\s+([\x21-\x7e]+)\s*", re.IGNORECASE)
MAX_WATCHED_RUNS: Final = 200
"""The most runs one live stream follows (named ones and listed ones)."""
MAX_HISTORY: Final = 5000
"""The most past changes of a run a stream replays for its timeline."""


class BadRequest(ValueError):
    """A request the dashboard refuses before calling the API (HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def api_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header; None without
    one (the API then answers UNAUTHENTICATED when it needs a key)."""
    if not authorization:
        return None
    matched = _BEARER.fullmatch(authorization)
    return matched.group(1) if matched else None


def moment(name: str, text: str, now: datetime) -> datetime:
    """`7d`, `24h`, `30m` before `now`, or an ISO date or time (UTC unless
    it says otherwise), as `runcap report --since` takes them."""
    try:
        return report.since(text, now)
    except ValueError:
        raise BadRequest(name, f"{text!r} is not 7d, 24h, 30m or an ISO date") from None


def group_by(text: str) -> str:
    if text not in report.GROUPS:
        raise BadRequest("group_by", f"{text!r} is not one of {', '.join(report.GROUPS)}")
    return text


def approval_id(body: object) -> str:
    """The approval a JSON body ``{"approval_id": "..."}`` names."""
    value = body.get("approval_id") if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise BadRequest(
            "approval_id", 'expected a JSON body {"approval_id": "<run id>/approval:..."}'
        )
    return value


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page's knowledge of a run ends: the revision it has seen last
    and that state's digest (BudgetState.digest)."""

    revision: int
    digest: str = ""


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """What one live stream follows.

    `runs`: runs named by the page (the run page names one). `active_since`:
    also every run created since then that is not closed (the runs page),
    with runs created later joining as they are listed. `resume`: the page's
    cursor of each run it already knows, after a disconnect: the stream sends
    only what came after. `history`: how many past changes of each named run
    to replay, for a timeline (when not resuming it).
    """

    runs: tuple[str, ...] = ()
    active_since: datetime | None = None
    resume: Mapping[str, Cursor] = field(default_factory=dict)
    history: int = 0


def watch_spec(body: object, now: datetime) -> WatchSpec:
    """A `WatchSpec` from the JSON body of POST /api/watch::

    {"runs": ["run-1"], "active_since": "24h", "history": 2000,
     "resume": {"run-1": {"revision": 41, "digest": "..."}}}
    """
    if not isinstance(body, dict):
        raise BadRequest("body", "expected a JSON object")
    unknown = set(body) - {"runs", "active_since", "resume", "history"}
    if unknown:
        raise BadRequest(sorted(unknown)[0], "unknown field")
    runs = body.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(run, str) and run for run in runs):
        raise BadRequest("runs", "expected a list of run ids")
    runs = list(dict.fromkeys(runs))
    if len(runs) > MAX_WATCHED_RUNS:
        raise BadRequest("runs", f"at most {MAX_WATCHED_RUNS} runs (got {len(runs)})")
    since_text = body.get("active_since")
    if since_text is not None and not isinstance(since_text, str):
        raise BadRequest("active_since", "expected 7d, 24h, 30m or an ISO date")
    since = moment("active_since", since_text, now) if since_text else None
    if not runs and since is None:
        raise BadRequest("runs", "name runs, or give active_since (or both)")
    history = body.get("history", 0)
    if not isinstance(history, int) or isinstance(history, bool) or not 0 <= history <= MAX_HISTORY:
        raise BadRequest("history", f"expected a whole number from 0 to {MAX_HISTORY}")
    resume = body.get("resume", {})
    if not isinstance(resume, dict) or len(resume) > MAX_WATCHED_RUNS:
        raise BadRequest("resume", f"expected an object of at most {MAX_WATCHED_RUNS} runs")
    cursors = {}
    for run_id, cursor in resume.items():
        revision = cursor.get("revision") if isinstance(cursor, dict) else None
        digest = cursor.get("digest", "") if isinstance(cursor, dict) else None
        if (
            not isinstance(revision, int)
            or isinstance(revision, bool)
            or revision < 1
            or not isinstance(digest, str)
        ):
            raise BadRequest(
                f"resume.{run_id}", 'expected {"revision": <at least 1>, "digest": "<text>"}'
            )
        cursors[run_id] = Cursor(revision, digest)
    return WatchSpec(tuple(runs), since, cursors, history)
