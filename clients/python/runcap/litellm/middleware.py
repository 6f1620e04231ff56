"""An ASGI middleware that turns the proxy's error envelope around a runcap
refusal into a real RFC 9457 ``application/problem+json`` response.

LiteLLM renders every error as ``{"error": {...}}`` (its OpenAI-compatible
envelope), and a callback cannot change that. The hook puts the problem body
in ``error.provider_specific_fields.runcap_problem``; this middleware, the
outermost layer of the app, sends that body instead, with its own content
type. Without the middleware clients still get the problem, inside the
envelope. Every other response passes through untouched and unbuffered.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from runcap.litellm.problem import PROBLEM_CONTENT_TYPE, PROBLEM_KEY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_log = logging.getLogger("runcap.litellm")
# Only responses that carry a budget decision header can hold a problem.
_MARKER: Final = b"x-budget-decision"


class ProblemDetailsMiddleware:
    """Wraps an ASGI app; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and start is None:
                if message["status"] >= 400 and _has_header(message, _MARKER):
                    start = message  # hold it back until the body is known
                    return
                start = {}  # pass-through from here on
            if start:
                if message["type"] == "http.response.body":
                    body.extend(message.get("body", b""))
                    if not message.get("more_body", False):
                        await _send_problem(start, bytes(body), send)
                return
            await send(message)

        await self.app(scope, receive, capture)


def _has_header(message: Message, name: bytes) -> bool:
    return any(key.lower() == name for key, _ in message.get("headers", ()))


async def _send_problem(start: Message, body: bytes, send: Send) -> None:
    headers = [(key, value) for key, value in start.get("headers", ())]
    problem = _problem_in(body, headers)
    if problem is not None:
        body = json.dumps(problem, separators=(",", ":")).encode()
        drop = {b"content-type", b"content-length", b"content-encoding"}
        headers = [(key, value) for key, value in headers if key.lower() not in drop]
        headers += [
            (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _problem_in(body: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any] | None:
    """The problem inside LiteLLM's error envelope, or None."""
    try:
        encoding = dict((key.lower(), value) for key, value in headers).get(b"content-encoding")
        if encoding == b"gzip":
            body = gzip.decompress(body)
        envelope = json.loads(body)
        problem = envelope["error"]["provider_specific_fields"][PROBLEM_KEY]
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return problem if isinstance(problem, dict) else None


def install(app: Any) -> bool:
    """Puts the middleware around a Starlette/FastAPI `app` (LiteLLM's proxy
    app), before or after it started; True when it was installed now.

    Before the first request Starlette takes middleware the documented way. A
    callback is loaded while the proxy starts, when the app's middleware stack
    is already built: then the built stack is wrapped, which is what
    `add_middleware` would have produced as the outermost layer.
    """
    if getattr(app, "_runcap_problem_details", False):
        return False
    app._runcap_problem_details = True
    if getattr(app, "middleware_stack", None) is None:
        app.add_middleware(ProblemDetailsMiddleware)
    else:
        app.middleware_stack = ProblemDetailsMiddleware(app.middleware_stack)
    _log.info("runcap: problem+json responses installed on the proxy app")
    return True
