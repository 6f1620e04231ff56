"""The Redis backend: the ledger in Redis, standalone or a Redis Cluster.

Every key of a run carries the run's hash tag `{tenant/run_id}`, so every
operation on a run is one Lua script (`redis_scripts/ledger.lua`) in one slot
and one round trip. The script is run with EVALSHA and, when the node does not
know it (NOSCRIPT: a restart, a failover or SCRIPT FLUSH), with EVAL, which
also loads it. Server time comes from Redis `TIME` inside the script; a test
clock replaces it only when one is passed to the constructor.

Keys, for namespace `rc`:

    rc:{t/run}:a    HASH    the account: limit, totals, revision, status, config
    rc:{t/run}:r    HASH    reservation id -> record (held, settled or blocked)
    rc:{t/run}:x    ZSET    ids of held reservations by expiry time
    rc:{t/run}:log  STREAM  one entry per change; entry id = revision
    rc:{t/run}:bell         shard channel rung (SPUBLISH) after each change
    rc:{t/run}:p    ZSET    settled reservations whose parents await settlement
    rc:{t/run}:k    SET     ids of the run's child runs (counted against max_children)
    rc:{t/@team:acme}:l|w|h|x  a parent scope: limits, window totals, holds,
                    expiry ZSET (redis_scripts/scope.lua)
    rc:due:{n}      ZSET    best-effort index of runs and scopes with holds (or
                    pending settlements), by when to look next
    rc:{t/@runs}:c  ZSET    the tenant's run ids by creation time (ListRuns);
                    written after each create, pruned when a listed run aged out

A run with parent scopes reserves by the saga of `ledger/saga.py`: its
parents concurrently (one script each, in their own slots), then the run.
A run's lineage never changes, so each replica caches it; a run without
parents stays one round trip. A child run is created in three steps: its
parent is read (and the child looked up: a retry is a replay whatever the
parent's state), the parent counts it (`adopt`, atomic and idempotent per
child, within the parent's max_children), then the child is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster

from runcap_server import errors
from runcap_server.backends.base import wait_event
from runcap_server.backends.redis_failures import unavailable
from runcap_server.backends.redis_pipeline import Pipeliner
from runcap_server.bounded import BoundedDict
from runcap_server.clock import Clock
from runcap_server.ledger import saga, scopes
from runcap_server.ledger.scopes import ParentOutcome, ScopeUsage, ScopeView
from runcap_server.ledger.types import (
    Account,
    ApprovalResult,
    ApprovalStatus,
    BudgetState,
    Change,
    ChangePage,
    CloseRunResult,
    CommitResult,
    CreateRunResult,
    Decision,
    DecisionReason,
    Dimension,
    EnforcementMode,
    EventType,
    Lineage,
    Period,
    RefundResult,
    Reservation,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunStatus,
    RunView,
    ScopeKind,
    ScopeRef,
    Threshold,
    approval_id,
    decode_approvals,
    decode_calibration,
    decode_dims,
    decode_given_policy,
    decode_usage,
    encode_given_policy,
    hold_id,
)
from runcap_server.tasks import cancel_and_wait

T = TypeVar("T")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Script:
    """A Lua script shipped with the package. EVALSHA needs no SCRIPT LOAD: a
    node that lacks it answers NOSCRIPT and the EVAL fallback loads it there."""

    text: str
    sha: str

    @classmethod
    def load(cls, name: str) -> _Script:
        scripts = resources.files("runcap_server.backends").joinpath("redis_scripts")
        # The shared helpers come first: a script is still one EVAL.
        text = scripts.joinpath("prelude.lua").read_text() + scripts.joinpath(name).read_text()
        return cls(text, hashlib.sha1(text.encode()).hexdigest())


_RUN_SCRIPT = _Script.load("ledger.lua")
_SCOPE_SCRIPT = _Script.load("scope.lua")
_PRICES_SCRIPT = _Script.load("prices.lua")
_DUE_SCRIPT = _Script.load("due.lua")
_PRICES_VERSION = "~version"
# A scope's default run policy: a field of its limits hash (the periods' are digits).
_SCOPE_POLICY = "policy"
# How long a settled reservation's parents may wait for the saga before the
# sweeper settles them itself.
SETTLE_WAIT_MS = 5_000
DUE_BUCKETS = 16
# How often a replica tries to reconcile the due index, and its lease.
RECONCILE_EVERY_S = 60.0
RECONCILE_LEASE_MS = 30_000
# How often the doorbell task looks for subscriptions to change.
DOORBELL_POLL_S = 0.1
# No call waits on a silent server longer than this: it fails closed instead.
SOCKET_TIMEOUT_S = 5.0
# How long a replica may keep a due bucket to itself while it sweeps it.
SWEEP_LEASE_MS = 5_000
# Runs with parents whose lineage a replica remembers (a miss costs one round trip).
LINEAGE_CACHE_SIZE = 65_536
Client = aioredis.Redis | RedisCluster

# Tests only: the saga step after which this process kills itself (SIGKILL),
# to prove a crash between steps heals. Points: create:parent-adopted,
# reserve:parents-held, reserve:run-decided, reserve:parents-released,
# commit:run-settled, refund:run-settled, settle:parents-settled. "POINT@N"
# dies the N-th time the point is reached (under load: mid-flight sagas).
_CRASH_AT, _, _CRASH_NTH = os.environ.get("RUNCAP_TEST_CRASH_AT", "").partition("@")
_crash_countdown = [int(_CRASH_NTH or 1)]


def _crash_point(point: str) -> None:
    if point == _CRASH_AT:
        _crash_countdown[0] -= 1
        if _crash_countdown[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


def _labels_json(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


def _opt_int(value: bytes | str | None) -> int | None:
    return None if value is None or value in (b"", "") else int(value)


# A run's state in a script's reply: limit, committed, reserved, revision,
# status, active holds, overrun, digest, threshold, committed and reserved tokens,
# a CALIBRATED run's exposure and its ceiling (0 in other modes), blocked (0 or 1).
STATE_LEN = 14
# A run's configuration in a script's reply (ledger.lua, config()).
CONFIG_LEN = 15


def _state(run_id: str, values: Sequence[Any]) -> BudgetState:
    limit, committed, reserved, revision, status, active, overrun = (int(v) for v in values[:7])
    threshold, committed_tokens, reserved_tokens, exposure, ceiling, blocked = (
        int(v) for v in values[8:STATE_LEN]
    )
    return BudgetState(
        run_id=run_id,
        limit_micros=limit,
        committed_micros=committed,
        reserved_micros=reserved,
        revision=revision,
        status=RunStatus(status),
        active_reservations=active,
        overrun_micros=overrun,
        threshold=Threshold(threshold),
        committed_tokens=committed_tokens,
        reserved_tokens=reserved_tokens,
        digest=values[7].decode(),
        exposure_micros=exposure,
        exposure_ceiling_micros=ceiling,
        blocked=blocked == 1,
    )


@functools.lru_cache(maxsize=4096)
def _lineage(text: bytes) -> Lineage:
    """A lineage from a reply (each Commit's): few distinct texts, decoded once each."""
    return Lineage.decode(text.decode())


def _calibration(values: Sequence[Any]) -> dict[str, Any]:
    """A reserve reply's tail: worst case, pricing, then a CALIBRATED run's
    exposure and its ceiling ("" otherwise)."""
    worst, pricing, exposure, ceiling = values
    out: dict[str, Any] = {"worst_micros": int(worst), "pricing": pricing.decode()}
    if exposure:
        out["exposure_micros"] = int(exposure)
        out["exposure_ceiling_micros"] = int(ceiling)
    return out


def _dims_arg(dims: Mapping[str, int]) -> str:
    """A Reserve's dims for the script: sorted, zeros kept (a limit checks them too)."""
    return ";".join(f"{k}={v}" for k, v in sorted(dims.items()))


def _change(run_id: str, entry_id: bytes, fields: Sequence[bytes]) -> Change:
    revision = int(entry_id.split(b"-", 1)[0])
    f = {fields[i].decode(): fields[i + 1] for i in range(0, len(fields), 2)}
    state = BudgetState(
        run_id=run_id,
        limit_micros=int(f["L"]),
        committed_micros=int(f["C"]),
        reserved_micros=int(f["R"]),
        revision=revision,
        status=RunStatus(int(f["S"])),
        active_reservations=int(f["N"]),
        overrun_micros=int(f["O"]),
        threshold=Threshold(int(f.get("B", 0))),
        committed_tokens=int(f.get("U", 0)),
        reserved_tokens=int(f.get("V", 0)),
        digest=f["d"].decode(),
        exposure_micros=int(f.get("X", 0)),
        exposure_ceiling_micros=int(f.get("Y", 0)),
        blocked=f.get("K") == b"1",
    )
    return Change(
        revision=revision,
        type=EventType(int(f["t"])),
        time_ms=int(f["ts"]),
        state=state,
        reservation_id=f["r"].decode(),
        amount_micros=int(f["a"]),
        actual_micros=int(f["c"]),
        overrun_micros=int(f["o"]),
        late=f["l"] == b"1",
        threshold=Threshold(int(f.get("h", 0))),
        approval=f.get("g", b"").decode(),
        # Only on BLOCKED changes (ledger.lua, record()).
        reason=DecisionReason(int(f["k"])) if "k" in f else None,
        blocking_scope=ScopeRef.parse(f["q"].decode()) if f.get("q") else None,
        blocking_period=Period(int(f["p"])) if f.get("p") else None,
        dimension=Dimension(int(f["m"])) if f.get("m") else None,
        meter=f.get("n", b"").decode(),
    )


class RedisLedger:
    """The ledger on Redis; implements backends.base.Backend."""

    def __init__(
        self,
        *,
        url: str | None = None,
        cluster_nodes: Sequence[str] = (),
        default_ttl_ms: int,
        clock: Clock | None = None,
        log_retention: int = 10_000,
        closed_retention_ms: int = 30 * 86_400_000,
        namespace: str = "rc",
        max_connections: int = 64,
        expiry_batch: int = 100,
        replica_id: str = "",
        pipelining: bool = True,
    ) -> None:
        if bool(url) == bool(cluster_nodes):
            raise ValueError("give exactly one of a Redis URL or cluster nodes")
        self.url = url
        self.cluster_nodes = list(cluster_nodes)
        self.default_ttl_ms = default_ttl_ms
        self.clock = clock
        self.log_retention = log_retention
        self.closed_retention_ms = closed_retention_ms
        self.namespace = namespace
        self.max_connections = max_connections
        self.expiry_batch = expiry_batch
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:12]}"
        self._client: Client | None = None
        # Script calls share round trips (redis_pipeline); off: one pooled call each.
        self.pipelining = pipelining
        self._pipeline: Pipeliner | None = None
        # Bursts wait here instead of failing on an exhausted pool.
        self._slots = asyncio.Semaphore(max_connections)
        self._bells: dict[tuple[str, str], asyncio.Event] = {}
        self._pubsub_task: asyncio.Task[None] | None = None
        # Doorbell channels the feeds want, and those subscribed right now.
        self._wanted: set[str] = set()
        self._subscribed: set[str] = set()
        self._doorbell_changed = asyncio.Event()
        self._index_pending: dict[str, dict[str, int]] = {}
        # Run lineages (immutable once created), so a saga needs no extra read.
        # Runs with parents -> (lineage, default TTL), fixed at creation: with it, a
        # Reserve goes straight to the saga instead of asking the run first.
        self._lineages: BoundedDict[tuple[str, str], tuple[Lineage, int | None]] = BoundedDict(
            LINEAGE_CACHE_SIZE
        )
        # The first sweep reconciles: a restarted replica repairs what it lost.
        self._next_reconcile = 0.0

    # -- connection ---------------------------------------------------------

    async def start(self) -> None:
        if self.url:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=5,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
            )
            self._client = aioredis.Redis.from_pool(pool)  # owns and closes the pool
        else:
            nodes = []
            for node in self.cluster_nodes:
                host, _, port = node.rpartition(":")
                nodes.append(ClusterNode(host, int(port)))
            self._client = RedisCluster(
                startup_nodes=nodes,
                max_connections=self.max_connections,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
            )
            # Learn the slots now: redis-py's lazy first discovery, raced by a burst of
            # first calls, closes connections in use. Unreachable: it learns them later.
            try:
                await self._client.initialize()
            except Exception as error:
                _log.warning("Redis cluster not reachable at start (%s); retrying on use", error)
        if self.pipelining:
            self._pipeline = Pipeliner(self._client, timeout_s=SOCKET_TIMEOUT_S)

    async def close(self) -> None:
        if self._pubsub_task:
            await cancel_and_wait([self._pubsub_task])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._flush_index()
        if self._pipeline is not None:
            await self._pipeline.aclose()
            self._pipeline = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise errors.BackendUnavailable("the Redis backend is not started")
        return self._client

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run one Redis call, narrowing every connectivity failure to UNAVAILABLE."""
        async with self._slots:
            try:
                return await fn(self.client)
            except Exception as error:
                failure = unavailable(error)
                if failure is None:
                    raise
                raise failure from error

    async def _cmd(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """One Redis command by its redis-py method name."""
        return await self._call(lambda c: getattr(c, command)(*args, **kwargs))

    async def ping(self) -> None:
        await self._cmd("ping")

    async def call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """fn(client) for a store that keeps keys of its own beside the ledger
        (alerts): the same connections, failures narrowed as in _call."""
        return await self._call(fn)

    # -- keys and the script ------------------------------------------------

    def _keys(self, tenant: str, run_id: str) -> list[str]:
        tag = f"{self.namespace}:{{{tenant}/{run_id}}}"
        return [
            f"{tag}:a",
            f"{tag}:r",
            f"{tag}:x",
            f"{tag}:log",
            f"{tag}:bell",
            f"{tag}:p",
            f"{tag}:k",
        ]

    def _scope_keys(self, tenant: str, ref: ScopeRef) -> list[str]:
        tag = f"{self.namespace}:{{{tenant}/@{ref.token}}}"
        return [f"{tag}:l", f"{tag}:w", f"{tag}:h", f"{tag}:x", f"{tag}:done"]

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(self.clock.now_ms())

    async def _eval(
        self, script: _Script, keys: list[str], argv: list[str], *, pipelined: bool = True
    ) -> list[Any]:
        """One script call: pipelined (redis_pipeline), or on a pooled connection.

        A saga's steps on parents are pooled: pipelined, one replica's burst
        would reach a shared scope as one contiguous run of holds, and holds
        that their own runs then refuse would crowd out the others (released
        too late for them) instead of interleaving with other replicas' calls.
        """
        if pipelined and self._pipeline is not None:
            return await self._pipelined(self._pipeline, script, keys, argv)

        async def run(client: Any) -> list[Any]:
            try:
                return list(await client.evalsha(script.sha, len(keys), *keys, *argv))
            except redis.exceptions.NoScriptError:
                # This node lost its script cache; EVAL runs and caches it.
                return list(await client.eval(script.text, len(keys), *keys, *argv))

        return await self._call(run)

    @staticmethod
    async def _pipelined(
        pipeline: Pipeliner, script: _Script, keys: list[str], argv: list[str]
    ) -> list[Any]:
        args = (len(keys), *keys, *argv)
        try:
            try:
                reply: list[Any] = await pipeline.execute(keys[0], "EVALSHA", script.sha, *args)
            except redis.exceptions.NoScriptError:
                # This node lost its script cache; EVAL runs and caches it.
                reply = await pipeline.execute(keys[0], "EVAL", script.text, *args)
        except Exception as error:
            # Also redis-py's own call, which follows a redirect during a failover.
            failure = unavailable(error)
            if failure is None:
                raise
            raise failure from error
        return reply  # the scripts answer arrays: lists

    async def _script(
        self, tenant: str, run_id: str, op: str, *args: object, pipelined: bool = True
    ) -> list[Any]:
        argv = [
            op,
            self._now_arg(),
            str(self.log_retention),
            str(self.expiry_batch),
            str(self.closed_retention_ms),
            *("" if a is None else str(a) for a in args),
        ]
        reply = await self._eval(_RUN_SCRIPT, self._keys(tenant, run_id), argv, pipelined=pipelined)
        if reply[0] == b"ERR":
            raise self._error(reply[1].decode(), reply[2].decode(), run_id, args)
        return reply[1:]

    async def _scope_script(self, tenant: str, ref: ScopeRef, op: str, *args: object) -> list[Any]:
        argv = [op, self._now_arg(), str(self.expiry_batch)]
        argv += ["" if a is None else str(a) for a in args]
        # Scopes are parents: pooled (see _eval).
        keys = self._scope_keys(tenant, ref)
        reply = await self._eval(_SCOPE_SCRIPT, keys, argv, pipelined=False)
        return reply[1:]

    @staticmethod
    def _error(reason: str, detail: str, run_id: str, args: Sequence[object]) -> Exception:
        # The operation's first argument: a reservation id (an approval's trigger).
        reservation_id = str(args[0]) if args else ""
        if reason == "RUN_NOT_FOUND":
            return errors.RunNotFound(run_id)
        if reason == "RUN_ALREADY_EXISTS":
            return errors.RunAlreadyExists(run_id)
        if reason == "RESERVATION_NOT_FOUND":
            return errors.ReservationNotFound(run_id, reservation_id)
        if reason == "RESERVATION_BLOCKED":
            return errors.ReservationBlocked(run_id, reservation_id)
        if reason == "RESERVATION_RELEASED":
            return errors.ReservationReleased(run_id, reservation_id)
        if reason == "IDEMPOTENCY_CONFLICT":
            return errors.IdempotencyConflict(run_id, reservation_id, detail)
        if reason == "RUN_CLOSED":
            return errors.RunClosed(run_id)
        if reason == "TOTAL_OUT_OF_RANGE":
            return errors.committed_total_out_of_range(run_id)
        if reason == "APPROVAL_NOT_FOUND":
            return errors.ApprovalNotFound(approval_id(run_id, reservation_id))
        if reason == "APPROVAL_RESOLVED":
            status = ApprovalStatus(int(detail)).name.lower()
            return errors.ApprovalResolved(run_id, approval_id(run_id, reservation_id), status)
        if reason == "SUBAGENT_LIMIT":
            # Only `adopt` answers this: run_id is the parent, the argument the child.
            return errors.SubagentLimit(
                reservation_id,
                run_id,
                f"the parent already has its {detail} children (max_children)",
            )
        return RuntimeError(f"ledger script answered {reason} {detail}")

    def _ring(self, tenant: str, run_id: str) -> None:
        event = self._bells.pop((tenant, run_id), None)
        if event is not None:
            event.set()

    # -- operations ---------------------------------------------------------

    def _view(self, tenant: str, run_id: str, config: Sequence[Any], state: BudgetState) -> RunView:
        created, closed, labels, ttl, lineage_json, *given = config[:9]
        given_policy, policy, children, usage, approvals, blocked_calls = (
            c.decode() for c in config[9:CONFIG_LEN]
        )
        lineage = Lineage.decode(lineage_json.decode())
        parent, key, user, team = (g.decode() for g in given)
        spec = RunSpec(
            run_id,
            state.limit_micros,
            json.loads(labels),
            _opt_int(ttl),
            parent,
            key,
            user,
            team,
            decode_given_policy(given_policy),
        )
        if lineage.parents():
            self._lineages[(tenant, run_id)] = (lineage, spec.default_ttl_ms)
        return RunView(
            spec=spec,
            default_ttl_ms=spec.default_ttl_ms or self.default_ttl_ms,
            created_ms=int(created),
            closed_ms=_opt_int(closed),
            state=state,
            lineage=lineage,
            policy=RunPolicy.decode(policy),
            children=int(children),
            usage=decode_usage(usage),
            approvals=decode_approvals(approvals),
            blocked_calls=int(blocked_calls),
        )

    async def create_run(self, tenant: str, spec: RunSpec) -> CreateRunResult:
        if not spec.parent_run_id:
            defaults = await self._scope_default(tenant, spec) if spec.policy is None else None
            return await self._create(tenant, spec, *saga.place_under(spec, None, defaults))

        async def parent_view() -> RunView | None:
            try:
                return await self.get_run(tenant, spec.parent_run_id)
            except errors.RunNotFound:
                return None

        account_key = self._keys(tenant, spec.run_id)[0]
        parent, exists = await asyncio.gather(parent_view(), self._cmd("exists", account_key))
        if exists:
            # A replay or a conflict, whatever the parent's state (as on the model).
            with contextlib.suppress(errors.RunNotFound):  # aged out meanwhile
                return await self._create(tenant, spec, None, None)
        lineage, policy = saga.place_under(spec, parent)
        await self._adopt(tenant, spec)
        _crash_point("create:parent-adopted")
        return await self._create(tenant, spec, lineage, policy)

    async def _scope_default(self, tenant: str, spec: RunSpec) -> RunPolicy | None:
        """A new root run's first scope default policy (saga.scope_refs), if any."""
        refs = saga.scope_refs(spec)
        texts = await asyncio.gather(
            *(self._cmd("hget", self._scope_keys(tenant, ref)[0], _SCOPE_POLICY) for ref in refs)
        )
        return decode_given_policy(next((t.decode() for t in texts if t), ""))

    async def _adopt(self, tenant: str, spec: RunSpec) -> None:
        """The parent's step: count the child within its max_children (idempotent)."""
        try:
            await self._script(tenant, spec.parent_run_id, "adopt", spec.run_id)
        except errors.RunNotFound:
            raise errors.ParentRunNotFound(spec.run_id, spec.parent_run_id) from None
        except errors.RunClosed:
            raise errors.ParentRunClosed(spec.run_id, spec.parent_run_id) from None

    async def _create(
        self, tenant: str, spec: RunSpec, lineage: Lineage | None, policy: RunPolicy | None
    ) -> CreateRunResult:
        """The run's step; without a lineage, only a replay (else RunNotFound)."""
        reply = await self._script(
            tenant,
            spec.run_id,
            "create",
            spec.limit_micros,
            _labels_json(spec.labels),
            spec.default_ttl_ms,
            spec.parent_run_id,
            spec.api_key_id,
            spec.user_id,
            spec.team_id,
            lineage.encode() if lineage is not None else "",
            len(lineage.parents()) if lineage is not None else 0,
            encode_given_policy(spec.policy),
            policy.encode() if policy is not None else "",
            "" if lineage is not None else "1",
        )
        state = _state(spec.run_id, reply[1 : 1 + STATE_LEN])
        view = self._view(tenant, spec.run_id, reply[1 + STATE_LEN :], state)
        # The listing index, in its own slot: after the run exists, so a crash
        # between the two only leaves a run unlisted (a replayed create adds it).
        await self._cmd("zadd", self._runs_index(tenant), {spec.run_id: view.created_ms}, nx=True)
        return CreateRunResult(run=view, replayed=reply[0] == b"1")

    def _runs_index(self, tenant: str) -> str:
        return f"{self.namespace}:{{{tenant}/@runs}}:c"

    async def list_run_ids(
        self, tenant: str, from_ms: int, to_ms: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        key = self._runs_index(tenant)
        low = from_ms if after is None else max(from_ms, after[0])
        found: list[tuple[int, str]] = []
        offset = 0
        while len(found) < limit:
            batch = await self._cmd(
                "zrangebyscore", key, low, f"({to_ms}", start=offset, num=limit, withscores=True
            )
            offset += len(batch)
            for member, score in batch:
                item = (int(score), member.decode())
                if after is None or item > after:
                    found.append(item)
            if len(batch) < limit:
                break
        return found[:limit]

    async def forget_listed_run(self, tenant: str, run_id: str) -> None:
        """Drops a run that aged out from the listing index."""
        await self._cmd("zrem", self._runs_index(tenant), run_id)

    async def get_run(self, tenant: str, run_id: str) -> RunView:
        reply = await self._script(tenant, run_id, "get")
        state = _state(run_id, reply[:STATE_LEN])
        return self._view(tenant, run_id, reply[STATE_LEN:], state)

    async def reserve(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        amount_micros: int,
        ttl_ms: int | None,
        extras: saga.ReserveExtras = saga.NO_EXTRAS,
    ) -> ReserveResult:
        cached = self._lineages.get((tenant, run_id))
        tail = (
            extras.fingerprint,
            extras.pricing,
            _dims_arg(extras.dims()),
            "1" if extras.downgrade else "",
        )
        if extras.preblock is not None:
            # Decided before any ledger (an unknown price): no saga, no holds.
            reply = await self._script(
                tenant, run_id, "reserve", reservation_id, amount_micros, ttl_ms,
                self.default_ttl_ms, run_id, "1", int(extras.preblock), "", "", *tail,
            )  # fmt: skip
            return self._reserved(tenant, run_id, reservation_id, reply)
        if cached is None:
            # One round trip; a run with parents answers SAGA and writes nothing.
            reply = await self._script(
                tenant, run_id, "reserve", reservation_id, amount_micros, ttl_ms,
                self.default_ttl_ms, run_id, "0", "", "", "", *tail,
            )  # fmt: skip
            if reply[0] != b"SAGA":
                return self._reserved(tenant, run_id, reservation_id, reply)
            cached = (Lineage.decode(reply[1].decode()), _opt_int(reply[2]))
            self._lineages[(tenant, run_id)] = cached
        lineage, run_ttl = cached
        hold = hold_id(run_id, reservation_id)
        ttl = (ttl_ms or run_ttl or self.default_ttl_ms) + saga.PARENT_HOLD_GRACE_MS
        steps = [self._hold_on(tenant, p, hold, amount_micros, ttl) for p in lineage.parents()]
        held = await asyncio.gather(*steps, return_exceptions=True)
        outcomes = [o for o in held if isinstance(o, ParentOutcome)]
        result: ReserveResult | None = None
        unanswered = False
        try:
            for failure in held:
                if isinstance(failure, BaseException):
                    raise failure
            _crash_point("reserve:parents-held")
            block = saga.parent_block(outcomes)
            pb: tuple[object, ...] = ("", "", "")
            if block is not None:
                scope = block.scope.token if block.scope else ""
                pb = (int(block.reason), scope, block.period and int(block.period))
            reply = await self._script(
                tenant, run_id, "reserve", reservation_id, amount_micros, ttl_ms,
                self.default_ttl_ms, run_id, "1", *pb, *tail,
            )  # fmt: skip
            result = self._reserved(tenant, run_id, reservation_id, reply)
            _crash_point("reserve:run-decided")
        except (errors.BackendUnavailable, asyncio.CancelledError):
            # No answer is not a no: Redis may still run a step it got (after a
            # timeout). Every parent hold stays for the retry to find (releasing
            # them would let the run hold what its parents do not); unclaimed,
            # they expire like any hold.
            unanswered = True
            raise
        finally:
            # Also after an error: a parent hold the run does not keep is released.
            releases = [] if unanswered else saga.to_release(outcomes, result)
            await asyncio.gather(
                *(self._settle_on(tenant, scope, hold, None) for scope in releases),
                return_exceptions=True,
            )
        _crash_point("reserve:parents-released")
        return result

    def _reserved(
        self, tenant: str, run_id: str, reservation_id: str, reply: Sequence[Any]
    ) -> ReserveResult:
        replayed, decision, reason, held, expires, scope, period = reply[0:7]
        dimension, meter, retry_at, mode, now, approval = reply[7:13]
        result = ReserveResult(
            decision=Decision(int(decision)),
            reason=DecisionReason(int(reason)),
            reservation_id=reservation_id,
            held_micros=int(held),
            expires_ms=_opt_int(expires),
            state=_state(run_id, reply[13 : 13 + STATE_LEN]),
            replayed=replayed != b"0",
            blocking_scope=ScopeRef.parse(scope.decode()) if scope else None,
            blocking_period=Period(int(period)) if period else None,
            dimension=Dimension(int(dimension)) if dimension else None,
            meter=meter.decode(),
            retry_at_ms=_opt_int(retry_at),
            mode=EnforcementMode(int(mode)),
            approval=approval.decode(),
            now_ms=int(now),
            # ledger.lua calibration(): worst case, pricing, exposure, ceiling.
            **_calibration(reply[13 + STATE_LEN : 17 + STATE_LEN]),
            settled=replayed == b"2",
        )
        if result.expires_ms is not None and not result.replayed:
            self._index(tenant, run_id, result.expires_ms)
        return result

    async def _hold_on(
        self, tenant: str, ref: ScopeRef, hold: str, amount_micros: int, ttl_ms: int
    ) -> ParentOutcome:
        """The saga's hold on one parent: an ancestor run or a scope."""
        if ref.kind is ScopeKind.RUN:
            reply = await self._script(
                tenant, ref.id, "child_hold", hold, amount_micros, ttl_ms, ref.id, pipelined=False
            )
            replayed, status, reason = reply[0:3]
            outcome = ParentOutcome(
                ref,
                ReservationStatus(int(status)),
                replayed == b"1",
                DecisionReason(int(reason)),
            )
            if outcome.status is ReservationStatus.BLOCKED:
                outcome = dataclasses.replace(outcome, period=Period.LIFETIME)
        else:
            replayed, status, period = await self._scope_script(
                tenant, ref, "hold", hold, amount_micros, ttl_ms
            )
            blocked = int(status) == ReservationStatus.BLOCKED
            outcome = ParentOutcome(
                ref,
                ReservationStatus(int(status)),
                replayed == b"1",
                DecisionReason.INSUFFICIENT_BUDGET if blocked else DecisionReason.WITHIN_BUDGET,
                Period(int(period)) if period else None,
            )
        if outcome.freshly_held:
            self._index_member(self._member(tenant, ref), self._now_ms_guess() + ttl_ms)
        return outcome

    async def _settle_on(
        self, tenant: str, ref: ScopeRef, hold: str, actual_micros: int | None
    ) -> None:
        """Commit `actual` on one parent, or release it (None); idempotent."""
        if ref.kind is ScopeKind.RUN:
            await self._script(tenant, ref.id, "child_settle", hold, actual_micros, pipelined=False)
        else:
            await self._scope_script(tenant, ref, "settle", hold, actual_micros)

    async def _settle_parents(
        self,
        tenant: str,
        run_id: str,
        lineage: Lineage,
        settlements: Sequence[tuple[str, int | None]],
    ) -> None:
        """Settle the parents of a run's settled reservations, then mark them done.

        A crash before the end leaves them in the run's pending set, and the
        sweeper calls this again: every step is idempotent.
        """
        parents = lineage.parents()
        await asyncio.gather(
            *(
                self._settle_on(tenant, parent, hold_id(run_id, reservation_id), actual)
                for reservation_id, actual in settlements
                for parent in parents
            )
        )
        _crash_point("settle:parents-settled")
        await self._script(tenant, run_id, "settled", *(r for r, _ in settlements))

    async def count_block(self, tenant: str, run_id: str, reservation_id: str) -> BudgetState:
        reply = await self._script(tenant, run_id, "count_block", reservation_id)
        return _state(run_id, reply[:STATE_LEN])

    async def get_reservation(self, tenant: str, run_id: str, reservation_id: str) -> Reservation:
        a, r = self._keys(tenant, run_id)[:2]
        record = await self._cmd("hget", r, reservation_id)
        if record is not None:
            return _decode_reservation(reservation_id, record.decode())
        if not await self._cmd("exists", a):
            raise errors.RunNotFound(run_id)
        raise errors.ReservationNotFound(run_id, reservation_id)

    async def commit(
        self,
        tenant: str,
        run_id: str,
        reservation_id: str,
        actual_micros: int,
        actual_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> CommitResult:
        reply, noted = await self._settle_run(
            tenant, run_id, "commit", reservation_id, actual_micros, actual_tokens, output_tokens
        )
        replayed, status, actual, held, overrun = reply[0:5]
        result = CommitResult(
            state=_state(run_id, reply[5 : 5 + STATE_LEN]),
            reservation_status=ReservationStatus(int(status)),
            actual_micros=int(actual),
            held_micros=int(held),
            overrun_micros=int(overrun),
            replayed=replayed == b"1",
        )
        lineage = _lineage(reply[5 + STATE_LEN])
        if lineage.parents():
            # A replay comes with its parents only while they still wait for it:
            # settling them again finishes what a crash interrupted.
            if not noted:
                await self._note_pending(tenant, run_id)
            _crash_point("commit:run-settled")
            await self._settle_parents(tenant, run_id, lineage, [(reservation_id, actual_micros)])
        return result

    async def refund(self, tenant: str, run_id: str, reservation_id: str) -> RefundResult:
        reply, noted = await self._settle_run(tenant, run_id, "refund", reservation_id)
        replayed, status, released = reply[0:3]
        result = RefundResult(
            state=_state(run_id, reply[3 : 3 + STATE_LEN]),
            reservation_status=ReservationStatus(int(status)),
            released_micros=int(released),
            replayed=replayed == b"1",
        )
        lineage = _lineage(reply[3 + STATE_LEN])
        if lineage.parents() and result.reservation_status is ReservationStatus.RELEASED:
            if not noted:
                await self._note_pending(tenant, run_id)
            _crash_point("refund:run-settled")
            await self._settle_parents(tenant, run_id, lineage, [(reservation_id, None)])
        return result

    async def set_scope_limit(
        self, tenant: str, ref: ScopeRef, period: Period, limit_micros: int | None
    ) -> ScopeView:
        reply = await self._scope_script(tenant, ref, "set_limit", int(period), limit_micros)
        return _scope_view(ref, reply)

    async def set_scope_policy(
        self, tenant: str, ref: ScopeRef, policy: RunPolicy | None
    ) -> ScopeView:
        # The scope's limits hash holds it too; scope.lua reads only the periods.
        limits = self._scope_keys(tenant, ref)[0]
        text = encode_given_policy(policy)
        if text:
            await self._cmd("hset", limits, _SCOPE_POLICY, text)
        else:
            await self._cmd("hdel", limits, _SCOPE_POLICY)
        return await self.get_scope(tenant, ref)

    async def get_scope(self, tenant: str, ref: ScopeRef) -> ScopeView:
        limits = self._scope_keys(tenant, ref)[0]
        reply, policy = await asyncio.gather(
            self._scope_script(tenant, ref, "view"), self._cmd("hget", limits, _SCOPE_POLICY)
        )
        view = _scope_view(ref, reply)
        return dataclasses.replace(
            view, policy=decode_given_policy(policy.decode() if policy else "")
        )

    def _prices_key(self, tenant: str) -> str:
        return f"{self.namespace}:{{{tenant}/@prices}}:o"

    async def set_price_override(self, tenant: str, key: str, entry: str | None) -> bool:
        op = "delete" if entry is None else "set"
        argv = [op, "", key, entry or ""]
        reply = await self._eval(_PRICES_SCRIPT, [self._prices_key(tenant)], argv)
        return bool(reply[1] == b"1")

    async def price_overrides(self, tenant: str) -> tuple[int, dict[str, str]]:
        stored = await self._cmd("hgetall", self._prices_key(tenant))
        entries = {k.decode(): v.decode() for k, v in stored.items()}
        version = int(entries.pop(_PRICES_VERSION, 0))
        return version, entries

    async def price_overrides_version(self, tenant: str) -> int:
        version = await self._cmd("hget", self._prices_key(tenant), _PRICES_VERSION)
        return int(version or 0)

    async def resolve_approval(
        self, tenant: str, run_id: str, trigger: str, approve: bool
    ) -> ApprovalResult:
        reply = await self._script(tenant, run_id, "approve", trigger, "1" if approve else "0")
        replayed, status = reply[0:2]
        return ApprovalResult(
            status=ApprovalStatus(int(status)),
            state=_state(run_id, reply[2 : 2 + STATE_LEN]),
            replayed=replayed == b"1",
        )

    async def close_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return await self._status_op(tenant, run_id, "close")

    async def suspend_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return await self._status_op(tenant, run_id, "suspend")

    async def resume_run(self, tenant: str, run_id: str) -> CloseRunResult:
        return await self._status_op(tenant, run_id, "resume")

    async def _status_op(self, tenant: str, run_id: str, op: str) -> CloseRunResult:
        reply = await self._script(tenant, run_id, op)
        state = _state(run_id, reply[1 : 1 + STATE_LEN])
        return CloseRunResult(state=state, replayed=reply[0] == b"1")

    # -- the change log and watch doorbell -----------------------------------

    async def read_changes(
        self, tenant: str, run_id: str, after_revision: int, limit: int
    ) -> ChangePage:
        reply = await self._script(tenant, run_id, "read", after_revision, max(0, limit))
        floor, head = int(reply[0]), int(reply[1])
        entries = reply[2:]
        changes = [_change(run_id, entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
        return ChangePage(changes=changes, floor=floor, head=head)

    async def wait_for_change(
        self, tenant: str, run_id: str, after_revision: int, timeout_s: float
    ) -> None:
        key = (tenant, run_id)
        event = self._bells.setdefault(key, asyncio.Event())
        await self._subscribe(tenant, run_id)
        revision = await self._cmd("hget", self._keys(tenant, run_id)[0], "rev")
        if revision is None or int(revision) <= after_revision:
            await wait_event(event, timeout_s)

    def forget(self, tenant: str, run_id: str) -> None:
        self._bells.pop((tenant, run_id), None)
        self._wanted.discard(self._keys(tenant, run_id)[4])
        self._doorbell_changed.set()

    async def _subscribe(self, tenant: str, run_id: str) -> None:
        """Ask for the run's doorbell; the doorbell task (SSUBSCRIBE) does the rest.

        The doorbell is a hint, never the truth: feeds re-read the log anyway.
        """
        channel = self._keys(tenant, run_id)[4]
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._doorbell_changed.set()
        if self._pubsub_task is None or self._pubsub_task.done():
            self._pubsub_task = asyncio.create_task(self._doorbell(), name="redis-doorbell")

    async def _doorbell(self) -> None:
        """The one task that uses the pubsub connection: (un)subscribes and listens.

        Sharing a pubsub connection between tasks hangs the cluster client, so
        subscriptions change only here, between reads. A lost connection is
        replaced and every wanted channel subscribed again.
        """
        prefix = f"{self.namespace}:{{"
        subscribed: set[str] = set()
        pubsub: Any = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub()
                    subscribed = set()
                if self._doorbell_changed.is_set():
                    self._doorbell_changed.clear()
                    wanted = set(self._wanted)
                    if wanted - subscribed:
                        await pubsub.ssubscribe(*sorted(wanted - subscribed))
                    if subscribed - wanted:
                        await pubsub.sunsubscribe(*sorted(subscribed - wanted))
                    subscribed = wanted
                    self._subscribed = set(subscribed)
                if not subscribed:
                    # Nothing to read: a read would return at once and spin.
                    await wait_event(self._doorbell_changed, DOORBELL_POLL_S)
                    continue
                # Cluster pubsub reads shard messages apart; standalone mixes them in.
                read = getattr(pubsub, "get_sharded_message", pubsub.get_message)
                started = time.monotonic()
                message = await read(ignore_subscribe_messages=True, timeout=DOORBELL_POLL_S)
                if message is None and time.monotonic() - started < DOORBELL_POLL_S / 2:
                    await asyncio.sleep(DOORBELL_POLL_S)  # never spin on a read that won't wait
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await pubsub.aclose()
                raise
            except Exception as error:
                _log.warning("doorbell connection lost (%s); subscribing again", error)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                pubsub = None
                self._doorbell_changed.set()
                # Changes may have rung while nobody listened: wake every feed.
                for event in self._bells.values():
                    event.set()
                await asyncio.sleep(DOORBELL_POLL_S)
                continue
            if not message or message["type"] not in ("smessage", b"smessage"):
                continue  # nothing, or a subscription confirmation
            channel = message["channel"].decode()
            if channel.startswith(prefix) and channel.endswith("}:bell"):
                tenant, _, run_id = channel[len(prefix) : -len("}:bell")].partition("/")
                self._ring(tenant, run_id)

    # -- expiry sweeping ------------------------------------------------------

    @staticmethod
    def _member(tenant: str, ref: ScopeRef) -> str:
        """A due-index member: "tenant/run" or "tenant/@team:acme" (ids have no "/")."""
        return f"{tenant}/{ref.id}" if ref.kind is ScopeKind.RUN else f"{tenant}/@{ref.token}"

    def _now_ms_guess(self) -> int:
        """This process's idea of server time: good enough for the due index."""
        return self.clock.now_ms() if self.clock else int(time.time() * 1000)

    async def _settle_run(
        self, tenant: str, run_id: str, op: str, *args: object
    ) -> tuple[list[Any], bool]:
        """A Commit's or Refund's step on the run, and whether the run was put in the
        due index with it: on a run this replica knows has parents, in parallel (no
        added latency), so that even a step Redis applies after its timeout gets its
        parents settled by a sweeper, not only by the reconciler."""
        if (tenant, run_id) not in self._lineages:
            return await self._script(tenant, run_id, op, *args), False
        _, reply = await asyncio.gather(
            self._note_pending(tenant, run_id), self._script(tenant, run_id, op, *args)
        )
        return reply, True

    async def _note_pending(self, tenant: str, run_id: str) -> None:
        """Put the run in the due index now, for when its parents' settlement is due
        (not batched, as holds are): if this process dies before it settles them, any
        replica's sweeper re-drives it (a death before this line: the reconciler)."""
        member = f"{tenant}/{run_id}"
        due_ms = self._now_ms_guess() + SETTLE_WAIT_MS
        await self._cmd("zadd", self._bucket(member), {member: due_ms}, lt=True)

    def _bucket(self, member: str) -> str:
        return f"{self.namespace}:due:{{{zlib.crc32(member.encode()) % DUE_BUCKETS}}}"

    def _index(self, tenant: str, run_id: str, expires_ms: int) -> None:
        self._index_member(f"{tenant}/{run_id}", expires_ms)

    def _index_member(self, member: str, due_ms: int) -> None:
        """Note when to look at a run or scope next; the next sweep writes it (batched).

        Off the Reserve path, so a Reserve stays one round trip. A hold noted
        here and lost in a crash is found by the reconciler.
        """
        members = self._index_pending.setdefault(self._bucket(member), {})
        members[member] = min(due_ms, members.get(member, due_ms))

    async def _flush_index(self) -> None:
        pending, self._index_pending = self._index_pending, {}
        # LT: only ever move a run's next expiry earlier.
        await asyncio.gather(
            *(self._cmd("zadd", bucket, members, lt=True) for bucket, members in pending.items())
        )

    async def reconcile(self) -> int:
        """Repair the due index from the runs' own expiry sets (slow; one replica at a time).

        The index is best effort: a replica that crashed before its next sweep
        never wrote what it noted. Returns the runs (re)indexed.
        """
        lease = f"{self.namespace}:due:reconcile-lease"
        if not await self._cmd("set", lease, self.replica_id, nx=True, px=RECONCILE_LEASE_MS):
            return 0
        found = 0
        prefix = f"{self.namespace}:{{"
        # Holds (":x", of runs and scopes) and pending parent settlements (":p").
        for suffix in ("}:x", "}:p"):
            async for key in self.client.scan_iter(match=f"{prefix}*{suffix}", count=1000):
                member = key.decode()[len(prefix) : -len(suffix)]
                first = await self._cmd("zrange", key, 0, 0, withscores=True)
                if first:
                    self._index_member(member, int(first[0][1]))
                    found += 1
        await self._flush_index()
        return found

    async def sweep(self, max_runs: int) -> int:
        """Expire due holds of runs in the due index, each bucket under a lease."""
        now = time.monotonic()
        if now >= self._next_reconcile:
            self._next_reconcile = now + RECONCILE_EVERY_S
            await self.reconcile()
        # This replica's own holds first, so it never misses what it just made.
        await self._flush_index()
        # Every bucket at once (one round trip per node): most passes find nothing due.
        buckets = [f"{self.namespace}:due:{{{n}}}" for n in range(DUE_BUCKETS)]
        claims = await asyncio.gather(*(self._claim(bucket, max_runs) for bucket in buckets))
        released = 0
        for bucket, members in zip(buckets, claims, strict=True):
            if not members:
                continue  # nothing due, or another replica sweeps this bucket now
            try:
                for member in members[:max_runs]:
                    count, next_due = await self._sweep_member(member.decode())
                    released += count
                    max_runs -= 1
                    if next_due:
                        await self._cmd("zadd", bucket, {member: int(float(next_due))}, xx=True)
                    else:
                        await self._cmd("zrem", bucket, member)
            finally:
                await self._cmd("delete", f"{bucket}:lease")
        return released

    async def _claim(self, bucket: str, max_runs: int) -> list[bytes]:
        """The bucket's members due now, under its lease; [] if none or leased elsewhere."""
        if max_runs <= 0:
            return []
        argv = [self.replica_id, self._now_arg(), str(SWEEP_LEASE_MS), str(max_runs)]
        return await self._eval(_DUE_SCRIPT, [bucket, f"{bucket}:lease"], argv)

    async def _sweep_member(self, member: str) -> tuple[int, bytes]:
        """Expire a run's or scope's due holds and finish its stale settlements.

        Returns the holds released and when to look next (b"" for never).
        """
        if "/@" in member:
            tenant, _, token = member.partition("/@")
            count, next_due = await self._scope_script(tenant, ScopeRef.parse(token), "expire")
            return int(count), next_due
        tenant, _, run_id = member.partition("/")
        reply = await self._script(tenant, run_id, "expire", SETTLE_WAIT_MS)
        count, next_due = int(reply[0]), reply[1]
        if count:
            self._ring(tenant, run_id)
        if len(reply) > 3:
            # A saga was interrupted after the run settled: settle its parents.
            pending = reply[3:]
            settlements = [
                (pending[i].decode(), _opt_int(pending[i + 1])) for i in range(0, len(pending), 2)
            ]
            lineage = Lineage.decode(reply[2].decode())
            await self._settle_parents(tenant, run_id, lineage, settlements)
        return count, next_due

    async def snapshot(self, tenant: str, run_id: str) -> tuple[Account | None, list[Reservation]]:
        """A run's stored account and reservations, nothing expired (tests)."""
        keys = self._keys(tenant, run_id)
        a, r, kids = keys[0], keys[1], keys[6]
        fields = await self._cmd("hgetall", a)
        if not fields:
            return None, []
        f = {k.decode(): v.decode() for k, v in fields.items()}
        account = Account(
            spec=RunSpec(
                run_id,
                int(f["lim"]),
                json.loads(f["lab"]),
                _opt_int(f["ttl"]),
                f.get("pr", ""),
                f.get("ak", ""),
                f.get("us", ""),
                f.get("tm", ""),
                decode_given_policy(f.get("gp", "")),
            ),
            created_ms=int(f["cr"]),
            closed_ms=_opt_int(f["cl"]),
            status=RunStatus(int(f["st"])),
            committed_micros=int(f["com"]),
            reserved_micros=int(f["res"]),
            overrun_micros=int(f["ovr"]),
            active_reservations=int(f["act"]),
            revision=int(f["rev"]),
            digest=f["dig"],
            lineage=Lineage.decode(f.get("lin", "")),
            policy=RunPolicy.decode(f.get("pol", "")),
            threshold=Threshold(int(f.get("thr", 0))),
            throttle_strikes=int(f.get("tst", 0)),
            throttle_until_ms=int(f.get("tun", 0)),
            rate_window_ms=int(f.get("rw", 0)),
            rate_count=int(f.get("rc", 0)),
            children=int(await self._cmd("scard", kids)),
            usage=decode_usage(f.get("use", "")),
            approvals=decode_approvals(f.get("apv", "")),
            exposure_micros=int(f.get("xpo", 0)),
            calibration=decode_calibration(f.get("cal", "")),
            blocked=f.get("blk") == "1",
            blocked_calls=int(f.get("bc", 0)),
        )
        records = await self._cmd("hgetall", r)
        reservations = [_decode_reservation(k.decode(), v.decode()) for k, v in records.items()]
        return account, sorted(reservations, key=lambda x: x.reservation_id)


def _decode_reservation(reservation_id: str, record: str) -> Reservation:
    f = record.split("|")
    return Reservation(
        reservation_id=reservation_id,
        amount_micros=int(f[0]),
        requested_ttl_ms=_opt_int(f[1]),
        status=ReservationStatus(int(f[2])),
        reason=DecisionReason(int(f[3])),
        created_ms=int(f[4]),
        held_micros=int(f[5]),
        expires_ms=_opt_int(f[6]),
        actual_micros=_opt_int(f[7]),
        overrun_micros=int(f[8]),
        settled_ms=_opt_int(f[9]),
        blocking_scope=ScopeRef.parse(f[10]) if len(f) > 10 and f[10] else None,
        blocking_period=Period(int(f[11])) if len(f) > 11 and f[11] else None,
        fingerprint=f[12] if len(f) > 12 else "",
        pricing=f[13] if len(f) > 13 else "",
        dims=decode_dims(f[14]) if len(f) > 14 else {},
        dimension=Dimension(int(f[15])) if len(f) > 15 and f[15] else None,
        meter=f[16] if len(f) > 16 else "",
        retry_at_ms=_opt_int(f[17]) if len(f) > 17 else None,
        uncounted=len(f) > 18 and f[18] == "1",
    )


def _scope_view(ref: ScopeRef, reply: Sequence[Any]) -> ScopeView:
    """A ScopeView from the scope script's view reply."""
    usage = []
    for i, period in enumerate(Period):
        window, limit, committed, reserved, overrun, active = reply[1 + 6 * i : 7 + 6 * i]
        start, end = scopes.window_bounds(window.decode())
        usage.append(
            ScopeUsage(
                period=period,
                limit_micros=_opt_int(limit),
                window_start_ms=start,
                window_end_ms=end,
                committed_micros=int(committed),
                reserved_micros=int(reserved),
                overrun_micros=int(overrun),
                active_reservations=int(active),
            )
        )
    return ScopeView(ref=ref, usage=tuple(usage))
