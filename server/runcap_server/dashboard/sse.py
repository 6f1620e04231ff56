"""Server-sent events (the `text/event-stream` format of the HTML standard).

Each message is an event name and one JSON value. The browser reads the
stream with fetch() (EventSource cannot send an Authorization header) and
parses it the same way an EventSource would.
"""

from __future__ import annotations

import json
import re
from typing import Final

CONTENT_TYPE: Final = "text/event-stream"
# An event name is one line: a newline in it would start a new field.
_EVENT_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def encode(event: str, data: object) -> bytes:
    """One message: ``event: <name>``, ``data: <the JSON of data>``, then a
    blank line."""
    if not _EVENT_NAME.fullmatch(event):
        raise ValueError(f"SSE event name {event!r}: expected letters, digits, '_', '.', '-'")
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # JSON escapes CR and LF, the format's only line ends: one data line. (Not
    # U+2028 and the like, which are no line ends here, whatever str.splitlines says.)
    return f"event: {event}\ndata: {text}\n\n".encode()
