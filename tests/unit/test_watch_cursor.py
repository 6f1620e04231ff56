"""A Watch stream the server cancels (a replica stopping past its grace)
resumes like one it dropped, within the reconnect policy's attempts."""

from __future__ import annotations

import grpc

from runcap._shared import RetryPolicy, WatchCursor
from runcap.errors import RuncapError


def cancelled() -> RuncapError:
    return RuncapError(grpc.StatusCode.CANCELLED, "", "CANCELLED")


def cursor(resume: bool, attempts: int = 3) -> WatchCursor:
    policy = RetryPolicy(max_attempts=attempts, initial_backoff=0.01, max_backoff=0.02)
    return WatchCursor("run", None, resume=resume, resnapshot_on_out_of_range=False, policy=policy)


def test_a_server_cancelled_stream_resumes_within_the_attempts() -> None:
    watch = cursor(resume=True, attempts=3)
    for _ in range(2):
        delay = watch.on_error(cancelled())
        assert delay is not None
        assert 0 < delay <= 0.02
    assert watch.on_error(cancelled()) is None  # the third failure in a row is final


def test_without_resume_a_cancelled_stream_ends() -> None:
    assert cursor(resume=False).on_error(cancelled()) is None


def test_other_client_errors_stay_final() -> None:
    error = RuncapError(grpc.StatusCode.INVALID_ARGUMENT, "", "bad")
    assert cursor(resume=True).on_error(error) is None
