"""What a failed Redis call means for its caller.

Redis unreachable, mid-failover or torn down under the call is UNAVAILABLE:
the ledger fails closed and the caller retries (every step is idempotent per
reservation id). Anything else is a bug and stays one (INTERNAL with a trace id).
"""

from __future__ import annotations

import asyncio
import os
import traceback

import redis.exceptions

from runcap_server import errors

# Failures that mean "Redis cannot answer now".
UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # CLUSTERDOWN, MASTERDOWN, and "TTL exhausted" (redirected too often: mid-failover).
    redis.exceptions.ClusterError,
    # A slot no node serves (yet): a primary lost before its replica took over.
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.TryAgainError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    OSError,
)

# Where a connection torn down under a call raises from: redis-py itself, or
# the event loop's transports (asyncio's in Python; uvloop names its Cython
# frames by a relative path, "uvloop/handles/handle.pyx").
_CLIENT_CODE = (
    os.path.dirname(redis.__file__) + os.sep,
    os.path.dirname(asyncio.__file__) + os.sep,
    "uvloop" + os.sep,
)


def unavailable(error: BaseException) -> errors.BackendUnavailable | None:
    """UNAVAILABLE for a failure of Redis or of the connection to it, None for
    one that is not Redis's (a bug: INTERNAL)."""
    if isinstance(error, UNAVAILABLE):
        return errors.BackendUnavailable(f"Redis: {error}")
    if connection_lost(error):
        return errors.BackendUnavailable(f"Redis: connection lost: {error}")
    return None


def connection_lost(error: BaseException) -> bool:
    """Whether `error` is what a connection torn down under a call leaks instead
    of a ConnectionError: redis-py's AttributeError or TypeError (a failover's
    topology refresh, a reset peer: redis/redis-py#4287), or uvloop's
    RuntimeError for a write on a closed transport."""
    if not isinstance(error, AttributeError | TypeError | RuntimeError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.normpath(frames[-1].filename).startswith(_CLIENT_CODE)
