"""The `runcap` client subcommands, run as real processes against a live server."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

RUNCAP = [sys.executable, "-m", "runcap_server"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def runcap(
    target: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs `runcap ARGS --target TARGET` (no --target when `target` is empty)."""
    argv = [*RUNCAP, *args] + (["--target", target] if target else [])
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ok(target: str, *args: str) -> list[str]:
    """Runs a command that must succeed; returns its stdout lines."""
    result = runcap(target, *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def as_json(target: str, *args: str, code: int = 0) -> dict[str, Any]:
    result = runcap(target, *args, "--json")
    assert result.returncode == code, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def field(lines: list[str], name: str) -> str:
    """The value of a `name  value` line of the human-readable output."""
    for line in lines:
        key, _, value = line.partition(" ")
        if key == name:
            return value.strip()
    raise AssertionError(f"no {name!r} line in {lines}")


def assert_one_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("runcap: ")
    for needle in needles:
        assert needle in result.stderr


# --------------------------------------------------------------------------
# Runs and reservations


def test_run_reserve_commit_refund_close_round_trip(server_target: str) -> None:
    run_id = new_id("cli")
    labels = "--label agent=coder --label team=core"
    lines = ok(server_target, *f"run create {run_id} --limit 5.00 {labels} --ttl 10m".split())
    assert lines[0] == run_id
    assert field(lines, "status") == "OPEN"
    assert field(lines, "spend") == "committed $0.00 + held $0.00 of $5.00"
    assert field(lines, "remaining") == "$5.00"
    assert field(lines, "revision") == "1"

    # Creating it again with the same arguments is a replay, not an error.
    again = ok(server_target, *f"run create {run_id} --limit $5 {labels} --ttl 600s".split())
    assert again[0] == run_id
    assert field(again, "replayed").startswith("yes")

    shown = as_json(server_target, "run", "show", run_id)
    assert shown["run"]["run_id"] == run_id
    assert shown["run"]["labels"] == {"agent": "coder", "team": "core"}
    assert shown["run"]["default_ttl_millis"] == "600000"
    assert shown["state"]["limit_micros"] == "5000000"
    assert shown["state"]["status"] == "RUN_STATUS_OPEN"

    lines = ok(server_target, "reserve", run_id, "$0.40", "--id", "res-1", "--ttl", "30s")
    assert lines[0] == "res-1"
    assert field(lines, "decision") == "ALLOW (WITHIN_BUDGET)"
    assert field(lines, "held").startswith("$0.40 until ")
    assert field(lines, "spend") == "committed $0.00 + held $0.40 of $5.00"
    assert field(lines, "holds") == "1 active hold"

    reserved = as_json(server_target, "reserve", run_id, "250000", "--micros")
    second = reserved["reservation_id"]
    assert second
    assert second != "res-1"
    assert reserved["decision"] == "DECISION_ALLOW"
    assert reserved["amount_micros"] == "250000"
    assert reserved["state"]["reserved_micros"] == "650000"
    assert reserved["state"]["active_reservations"] == "2"

    lines = ok(server_target, "commit", run_id, "res-1", "0.35")
    assert lines[0] == "res-1"
    assert field(lines, "result") == "COMMITTED"
    assert field(lines, "actual") == "$0.35 of $0.40 held"
    assert field(lines, "spend") == "committed $0.35 + held $0.25 of $5.00"

    replay = as_json(server_target, "commit", run_id, "res-1", "350000", "--micros")
    assert replay["replayed"] is True
    assert replay["actual_micros"] == "350000"
    assert replay["held_micros"] == "400000"
    assert replay["reservation_status"] == "RESERVATION_STATUS_COMMITTED"

    refunded = as_json(server_target, "refund", run_id, second)
    assert refunded["reservation_status"] == "RESERVATION_STATUS_RELEASED"
    assert refunded["released_micros"] == "250000"
    assert refunded["replayed"] is False
    lines = ok(server_target, "refund", run_id, second)
    assert lines[0] == second
    assert field(lines, "released") == "$0.00"
    assert field(lines, "replayed").startswith("yes")

    state = as_json(server_target, "run", "show", run_id)["state"]
    assert state["committed_micros"] == "350000"
    assert state["reserved_micros"] == "0"
    assert state["remaining_micros"] == "4650000"
    assert state["revision"] == "5"

    lines = ok(server_target, "run", "close", run_id)
    assert lines[0] == run_id
    assert field(lines, "status") == "CLOSED"
    assert as_json(server_target, "run", "close", run_id)["replayed"] is True
    lines = ok(server_target, "run", "show", run_id)
    assert field(lines, "status") == "CLOSED"
    assert field(lines, "labels") == "agent=coder, team=core"
    assert field(lines, "closed").endswith("Z")

    # A closed run blocks new reservations: exit 3, with the reason.
    blocked = runcap(server_target, "reserve", run_id, "0.01", "--id", "late")
    assert blocked.returncode == 3, blocked.stderr
    lines = blocked.stdout.splitlines()
    assert lines[0] == "late"
    assert field(lines, "decision") == "BLOCK (RUN_CLOSED)"


def test_create_with_a_generated_id_and_the_target_from_the_environment(
    server_target: str,
) -> None:
    result = runcap(
        "", "run", "create", "--limit-micros", "1500", env={"RUNCAP_TARGET": server_target}
    )
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.splitlines()[0]
    assert run_id
    assert " " not in run_id
    shown = ok(server_target, "run", "show", run_id)
    assert shown[0] == run_id
    assert field(shown, "spend") == "committed $0.00 + held $0.00 of $0.0015"


def test_a_block_prints_the_decision_and_exits_3(server_target: str) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "1")
    ok(server_target, "reserve", run_id, "0.75", "--id", "first")

    result = runcap(server_target, "reserve", run_id, "0.5", "--id", "too-much")
    assert result.returncode == 3, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "too-much"
    assert field(lines, "decision") == "BLOCK (INSUFFICIENT_BUDGET)"
    assert field(lines, "asked") == "$0.50; nothing is held"
    assert field(lines, "remaining") == "$0.25"

    # The same block, replayed, as JSON: still exit 3.
    response = as_json(server_target, "reserve", run_id, "0.5", "--id", "too-much", code=3)
    assert response["decision"] == "DECISION_BLOCK"
    assert response["reason"] == "DECISION_REASON_INSUFFICIENT_BUDGET"
    assert response["replayed"] is True
    assert response["state"]["reserved_micros"] == "750000"


def test_a_policy_from_flags_limits_a_meter_and_the_rate(server_target: str) -> None:
    run_id = new_id("cli")
    ok(
        server_target,
        "run",
        "create",
        run_id,
        "--limit",
        "5",
        "--meter-limit",
        "tool:serp_api=1",
        "--rate",
        "2/1h",
    )
    ok(server_target, "reserve", run_id, "0.01", "--meter", "tool:serp_api")
    metered = runcap(server_target, "reserve", run_id, "0.01", "--meter", "tool:serp_api")
    assert metered.returncode == 3, metered.stderr
    assert field(metered.stdout.splitlines(), "limit") == "METER tool:serp_api"
    ok(server_target, "reserve", run_id, "0.01")
    limited = runcap(server_target, "reserve", run_id, "0.01")
    assert limited.returncode == 3, limited.stderr
    lines = limited.stdout.splitlines()
    assert field(lines, "decision") == "THROTTLE (RATE_LIMITED)"
    assert field(lines, "retry").endswith("with a new reservation id")
    shown = ok(server_target, "run", "show", run_id)
    assert field(shown, "mode") == "HARD_GATE"
    meter = field(shown, "meter")
    assert meter.startswith("tool:serp_api")
    assert meter.endswith("0 used, 1 held of 1")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("run", "show", "no-such-run"), ("RUN_NOT_FOUND", "no-such-run")),
        (("run", "create", "--limit", "1", "--rate", "often"), ("invalid --rate",)),
        (("run", "create", "--limit", "1", "--meter-limit", "x"), ("NAME=N",)),
        (("reserve", "no-such-run", "1"), ("RUN_NOT_FOUND",)),
        (("watch", "no-such-run"), ("RUN_NOT_FOUND",)),
        (("reserve", "some-run", "1.2345678"), ("more than 6 decimal places",)),
        (("reserve", "some-run", "-1"), ("must not be negative",)),
        (("commit", "some-run", "some-res", "-0.5"), ("must not be negative",)),
        (("reserve", "some-run", "12abc"), ("invalid amount '12abc'",)),
        (("reserve", "some-run", "1.5", "--micros"), ("whole number of micro-USD",)),
        (("run", "create", "--limit", "1", "--ttl", "soon"), ("invalid --ttl",)),
        (("run", "create", "--limit", "1", "--label", "oops"), ("KEY=VALUE",)),
        (
            ("run", "create", "bad id!", "--limit", "0"),
            ("INVALID_ARGUMENT", "\n  run_id: ", "\n  limit_micros: must be positive"),
        ),
    ],
)
def test_errors_are_one_clear_line_and_exit_1(
    server_target: str, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    assert_one_error(runcap(server_target, *args), *needles)


def test_errors_of_settling_unknown_or_blocked_reservations(server_target: str) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "1")
    assert_one_error(
        runcap(server_target, "commit", run_id, "nope", "1"), "RESERVATION_NOT_FOUND", "nope"
    )
    assert runcap(server_target, "reserve", run_id, "2", "--id", "big").returncode == 3
    assert_one_error(runcap(server_target, "refund", run_id, "big"), "RESERVATION_BLOCKED")
    # A zero estimate is refused by the server, field by field.
    result = runcap(server_target, "reserve", run_id, "0")
    assert_one_error(result, "INVALID_ARGUMENT", "amount_micros: must be positive")
    assert len(result.stderr.splitlines()) == 2


def test_an_unreachable_server_is_one_clear_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        unused_target = f"127.0.0.1:{sock.getsockname()[1]}"
    result = runcap(unused_target, "run", "show", "anything")
    assert_one_error(result, f"cannot reach the server at {unused_target}", "UNAVAILABLE")
    assert len(result.stderr.splitlines()) == 1


# --------------------------------------------------------------------------
# Watch


class Watcher:
    """`runcap watch` in a subprocess, its stdout lines read on a thread."""

    def __init__(self, target: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [*RUNCAP, "watch", *args, "--target", target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout_s: float = 10.0) -> str:
        line = self._lines.get(timeout=timeout_s)
        assert line is not None, "the watch ended early: " + self.stderr()
        return line

    def rest(self, timeout_s: float = 10.0) -> list[str]:
        """Every remaining line, once the process has ended."""
        self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        lines = []
        while (line := self._lines.get(timeout=timeout_s)) is not None:
            lines.append(line)
        return lines

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.stop()


def words(line: str) -> dict[str, str]:
    """The key=value words of a plain watch line, plus its type as "type"."""
    parts = line.split(" ")
    pairs = dict(part.split("=", 1) for part in parts if "=" in part)
    pairs["type"] = parts[2]
    return pairs


def test_watch_plain_prints_events_and_exits_when_closed_with_no_holds(
    server_target: str, watchers: list[Watcher]
) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "2")
    watcher = Watcher(server_target, run_id, "--plain")
    watchers.append(watcher)
    snapshot = words(watcher.line())
    assert snapshot["type"] == "SNAPSHOT"
    assert snapshot["rev"] == "1"
    assert snapshot["limit"] == "$2.00"
    assert snapshot["status"] == "OPEN"

    ok(server_target, "reserve", run_id, "0.5", "--id", "a")
    ok(server_target, "reserve", run_id, "0.25", "--id", "b")
    ok(server_target, "commit", run_id, "a", "0.6")
    ok(server_target, "run", "close", run_id)
    events = [words(watcher.line()) for _ in range(4)]
    assert [e["type"] for e in events] == ["RESERVED", "RESERVED", "COMMITTED", "CLOSED"]
    assert [e["rev"] for e in events] == ["2", "3", "4", "5"]
    assert events[0]["reservation"] == "a"
    assert events[0]["amount"] == "$0.50"
    assert events[1]["held"] == "$0.75"
    assert events[2]["actual"] == "$0.60"
    assert events[2]["overrun"] == "$0.10"
    assert events[2]["committed"] == "$0.60"
    assert events[3]["status"] == "CLOSED"
    assert events[3]["holds"] == "1"

    # Closed, but "b" is still held: the watch goes on until it settles.
    time.sleep(0.5)
    assert watcher.process.poll() is None
    ok(server_target, "refund", run_id, "b")
    last = [words(line) for line in watcher.rest()]
    assert watcher.process.returncode == 0, watcher.stderr()
    assert [e["type"] for e in last] == ["REFUNDED"]
    assert last[0]["reservation"] == "b"
    assert last[0]["holds"] == "0"
    assert last[0]["remaining"] == "$1.40"
    assert watcher.stderr() == ""


def test_watch_exits_0_on_sigint(server_target: str, watchers: list[Watcher]) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "1")
    watcher = Watcher(server_target, run_id)  # stdout is a pipe: plain lines
    watchers.append(watcher)
    assert words(watcher.line())["type"] == "SNAPSHOT"
    watcher.process.send_signal(signal.SIGINT)
    assert watcher.process.wait(10) == 0
    assert "Traceback" not in watcher.stderr()


def test_watch_json_replays_history_after_a_revision(server_target: str) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "1")
    ok(server_target, "reserve", run_id, "0.1", "--id", "r")
    ok(server_target, "commit", run_id, "r", "0.1")
    ok(server_target, "run", "close", run_id)
    # Closed with nothing held: the replay ends on its own.
    lines = ok(server_target, "watch", run_id, "--after-revision", "1", "--json")
    messages = [json.loads(line) for line in lines]
    assert [m["revision"] for m in messages] == ["2", "3", "4"]
    assert [m["event"]["type"] for m in messages] == [
        "EVENT_TYPE_RESERVED",
        "EVENT_TYPE_COMMITTED",
        "EVENT_TYPE_CLOSED",
    ]
    assert messages[1]["event"]["actual_micros"] == "100000"
    # Without a resume point, a closed and settled run is a snapshot and done.
    lines = ok(server_target, "watch", run_id, "--plain")
    assert len(lines) == 1
    assert words(lines[0])["type"] == "SNAPSHOT"
    assert words(lines[0])["committed"] == "$0.10"


def test_show_counts_blocked_calls_and_watch_prints_the_blocked_event(
    server_target: str,
) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "1")
    assert field(ok(server_target, "run", "show", run_id), "blocked") == "0 calls"
    ok(server_target, "reserve", run_id, "0.75", "--id", "first")
    for attempt in ("b1", "b2"):
        assert runcap(server_target, "reserve", run_id, "0.5", "--id", attempt).returncode == 3
    assert field(ok(server_target, "run", "show", run_id), "blocked") == "2 calls, at its wall now"
    ok(server_target, "refund", run_id, "first")
    ok(server_target, "run", "close", run_id)
    # Closed with nothing held: the replay ends on its own.
    lines = ok(server_target, "watch", run_id, "--after-revision", "2", "--plain")
    events = [words(line) for line in lines]
    assert [e["type"] for e in events] == ["BLOCKED", "REFUNDED", "CLOSED"]
    blocked = events[0]
    assert (blocked["reservation"], blocked["amount"], blocked["reason"]) == (
        "b1",
        "$0.50",
        "INSUFFICIENT_BUDGET",
    )
    assert (blocked["scope"], blocked["dimension"], blocked["blocked"]) == (
        f"run:{run_id}",
        "SPEND",
        "yes",
    )
    assert "blocked" in events[1]  # a refund holds nothing: still at the wall


def test_suspend_blocks_reserves_until_resume(server_target: str) -> None:
    run_id = new_id("cli-kill")
    ok(server_target, "run", "create", run_id, "--limit", "1.00")
    lines = ok(server_target, "run", "suspend", run_id)
    assert (lines[0], field(lines, "status")) == (run_id, "SUSPENDED")
    again = ok(server_target, "run", "suspend", run_id)
    assert field(again, "replayed").startswith("yes")
    blocked = runcap(server_target, "reserve", run_id, "0.10")
    assert blocked.returncode == 3  # a block, as for an empty budget
    assert "SUSPENDED" in blocked.stdout
    resumed = as_json(server_target, "run", "resume", run_id)
    assert resumed["state"]["status"] == "RUN_STATUS_OPEN"
    assert field(ok(server_target, "reserve", run_id, "0.10"), "decision").startswith("ALLOW")


def test_approve_and_decision_from_the_terminal(server_target: str) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "5")
    asked = runcap(server_target, "reserve", run_id, "0.01", "--meter", "tool:deploy")
    assert asked.returncode == 0, asked.stderr  # no approved list: no approval needed
    shown = ok(server_target, "decision", f"{run_id}/{asked.stdout.splitlines()[0]}")
    assert field(shown, "decision") == "ALLOW (WITHIN_BUDGET)"
    assert field(shown, "meter") == "tool:deploy x1"
    assert field(shown, "now") == "HELD"
    missing = runcap(server_target, "approve", f"{run_id}/approval:spend")
    assert_one_error(missing, "APPROVAL_NOT_FOUND")

    guarded = new_id("cli")
    ok(server_target, "run", "create", guarded, "--limit", "5", "--approved-meter", "tool:search")
    waiting = runcap(server_target, "reserve", guarded, "0.01", "--meter", "tool:deploy")
    assert waiting.returncode == 3, waiting.stderr
    lines = waiting.stdout.splitlines()
    assert field(lines, "decision") == "APPROVAL_REQUIRED (METER_NEEDS_APPROVAL)"
    approval = field(lines, "approval")
    assert approval == f"{guarded}/approval:meter:tool:deploy"
    approved = ok(server_target, "approve", approval)
    assert (approved[0], field(approved, "status")) == (approval, "APPROVED")
    ok(server_target, "reserve", guarded, "0.01", "--meter", "tool:deploy")
    bad = runcap(server_target, "decision", "not-a-decision")
    assert_one_error(bad, "INVALID_ARGUMENT")


def test_a_calibrated_run_shows_its_exposure(server_target: str) -> None:
    run_id = new_id("cli")
    ok(server_target, "run", "create", run_id, "--limit", "1", "--mode", "calibrated")
    ok(server_target, "reserve", run_id, "0.25")
    # Committed 0 + the $0.25 hold's worst case, of the limit + the default 10%.
    assert field(ok(server_target, "run", "show", run_id), "exposure") == "$0.25 of $1.10"
