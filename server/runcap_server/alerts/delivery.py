"""One HTTP attempt to one target, and how long to wait before the next.

Network errors, timeouts, 5xx and 429 are worth retrying (429 and 503 after
their Retry-After, when they give one); any other answer outside 2xx is
final: the receiver refused the message and sending it again will not help.
Redirects are not followed (a POST would turn into a GET).
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import aiohttp

from runcap_server.alerts import formats
from runcap_server.alerts.facts import AlertFacts
from runcap_server.alerts.rules import Target

# The longest Retry-After honoured; a receiver asking for more gets this.
MAX_RETRY_AFTER_S = 3600.0
_SNIPPET = 200


@dataclass(frozen=True, slots=True)
class Outcome:
    """An attempt's result: delivered, or why not and whether to try again."""

    delivered: bool
    retryable: bool = False
    error: str = ""
    retry_after_s: float | None = None


def retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - now_s), MAX_RETRY_AFTER_S)


def backoff_s(
    attempt: int, base_s: float, max_s: float, after_s: float | None, rng: random.Random
) -> float:
    """The wait after failed attempt `attempt` (1-based): exponential from
    base_s, capped at max_s, jittered down to half (so replicas spread out),
    and never shorter than the receiver's Retry-After."""
    ceiling = min(max_s, base_s * 2 ** min(attempt - 1, 32))
    delay = rng.uniform(ceiling / 2, ceiling)
    return max(delay, after_s) if after_s is not None else delay


async def send(
    session: aiohttp.ClientSession,
    target: Target,
    facts: AlertFacts,
    dashboard_url: str,
    timeout_s: float,
) -> Outcome:
    now = time.time()
    body, headers = formats.request(target, facts, dashboard_url, int(now))
    try:
        async with session.post(
            target.url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            if 200 <= response.status < 300:
                return Outcome(True)
            snippet = (await response.text(errors="replace"))[:_SNIPPET].strip()
            error = f"{target.describe()}: HTTP {response.status}" + (
                f" {snippet}" if snippet else ""
            )
            if response.status == 429 or response.status >= 500:
                after = retry_after(response.headers.get("Retry-After"), now)
                return Outcome(False, retryable=True, error=error, retry_after_s=after)
            return Outcome(False, error=error)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        return Outcome(False, retryable=True, error=f"{target.describe()}: {reason}")
