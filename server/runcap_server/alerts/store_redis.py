"""The alert store in Redis, standalone or cluster, beside the ledger's keys.

Keys of tenant t, for namespace `rc` (all in the slot of `{t/@alerts}`):

    rc:{t/@alerts}:rules    HASH    rule id -> "<since_ms>|<rule>"
    rc:{t/@alerts}:a:<id>   HASH    one alert: its fields and payload
    rc:{t/@alerts}:t        ZSET    alert ids by creation time (ListAlerts)
    rc:{t/@alerts}:p        ZSET    PENDING alert ids by due time (claim_due)
    rc:{t/@alerts}:l:<rule>/<key>   a delivery's rate-limit marker, with a
                                    TTL of the rule's min_interval
    rc:{t/@alerts}:h:<rule> ZSET    the rule's deliveries in the past hour
    rc:{t/@alerts}:cur      HASH    run id -> "<revision>|<follower state>"
    rc:{t/@alerts}:disc     STRING  "<created_ms>|<run id>": runs listed so far
    rc:{@alerts}:tenants    SET     tenants that have (or had) rules

Each step that must be atomic is one op of `alerts.lua` (EVALSHA, EVAL on
NOSCRIPT). Rule, run and alert ids never contain `{`, `}` or `/`.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from typing import Any

import redis.exceptions

from runcap_server.alerts.store import (
    AlertRecord,
    AlertState,
    RateLimit,
    StoredRule,
    decode_done,
    encode_done,
)
from runcap_server.backends.redis import RedisLedger

_SCRIPT = resources.files("runcap_server.alerts").joinpath("alerts.lua").read_text()
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
# ListAlerts reads the time index in batches of this many ids at least.
LIST_BATCH = 100


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class RedisAlertStore:
    def __init__(self, ledger: RedisLedger) -> None:
        self.ledger = ledger
        self.namespace = ledger.namespace

    def _tag(self, tenant: str) -> str:
        return f"{self.namespace}:{{{tenant}/@alerts}}"

    async def _eval(self, keys: list[str], *argv: object) -> Any:
        args = [str(a) for a in argv]

        async def run(client: Any) -> Any:
            try:
                return await client.evalsha(_SHA, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return await client.eval(_SCRIPT, len(keys), *keys, *args)

        return await self.ledger.call(run)

    async def _cmd(self, command: str, *args: Any, **kwargs: Any) -> Any:
        return await self.ledger.call(lambda c: getattr(c, command)(*args, **kwargs))

    async def start(self) -> None:
        pass

    async def put_rule(self, tenant: str, rule_id: str, text: str, now_ms: int) -> bool:
        # Indexed first: a rule the engine cannot find would never alert.
        await self._cmd("sadd", f"{self.namespace}:{{@alerts}}:tenants", tenant)
        changed = await self._eval(
            [f"{self._tag(tenant)}:rules"], "put_rule", rule_id, text, now_ms
        )
        return bool(changed)

    async def delete_rule(self, tenant: str, rule_id: str) -> bool:
        return bool(await self._cmd("hdel", f"{self._tag(tenant)}:rules", rule_id))

    async def rules(self, tenant: str) -> list[StoredRule]:
        stored = await self._cmd("hgetall", f"{self._tag(tenant)}:rules")
        rules = []
        for rule_id, value in stored.items():
            since, _, text = _text(value).partition("|")
            rules.append(StoredRule(_text(rule_id), text, int(since)))
        return sorted(rules, key=lambda r: r.rule_id)

    async def tenants(self) -> list[str]:
        members = await self._cmd("smembers", f"{self.namespace}:{{@alerts}}:tenants")
        return sorted(_text(m) for m in members)

    async def raise_alert(self, record: AlertRecord, limit: RateLimit | None) -> AlertRecord | None:
        tag = self._tag(record.tenant)
        keys = [
            f"{tag}:a:{record.alert_id}",
            f"{tag}:t",
            f"{tag}:p",
            f"{tag}:l:{record.rule_id}/{record.rate_key}",
            f"{tag}:h:{record.rule_id}",
        ]
        reply = await self._eval(
            keys,
            "raise",
            record.alert_id,
            record.create_ms,
            "" if limit is None else "1",
            0 if limit is None else limit.min_interval_ms,
            0 if limit is None else limit.max_per_hour,
            record.due_ms,
            *_fields(record),
        )
        if int(reply[0]) == 0:
            return None
        return record.replace(state=AlertState(int(reply[1])))

    async def claim_due(
        self, tenant: str, owner: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[AlertRecord]:
        tag = self._tag(tenant)
        due = await self._cmd("zrangebyscore", f"{tag}:p", "-inf", now_ms, start=0, num=limit)
        claimed = []
        for member in due:
            alert_id = _text(member)
            reply = await self._eval(
                [f"{tag}:a:{alert_id}", f"{tag}:p"],
                "claim",
                alert_id,
                now_ms,
                now_ms + lease_ms,
                owner,
            )
            if reply:
                claimed.append(_record(tenant, alert_id, reply))
        return claimed

    async def update_alert(self, record: AlertRecord) -> bool:
        tag = self._tag(record.tenant)
        done = await self._eval(
            [f"{tag}:a:{record.alert_id}", f"{tag}:p"],
            "update",
            record.alert_id,
            record.owner,
            int(record.state),
            record.attempts,
            record.last_error,
            encode_done(record.done),
            record.due_ms,
        )
        return bool(done)

    async def list_alerts(
        self,
        tenant: str,
        before: tuple[int, str] | None,
        limit: int,
        rule_id: str = "",
        state: AlertState | None = None,
    ) -> list[AlertRecord]:
        tag = self._tag(tenant)
        top: int | str = "+inf" if before is None else before[0]
        batch = max(limit, LIST_BATCH)
        found: list[AlertRecord] = []
        offset = 0
        while len(found) < limit:
            page = await self._cmd(
                "zrevrangebyscore",
                f"{tag}:t",
                top,
                "-inf",
                start=offset,
                num=batch,
                withscores=True,
            )
            offset += len(page)
            ids = [
                _text(m) for m, score in page if before is None or (int(score), _text(m)) < before
            ]
            hashes = await asyncio.gather(*(self._cmd("hgetall", f"{tag}:a:{i}") for i in ids))
            for alert_id, fields in zip(ids, hashes, strict=True):
                if not fields:
                    continue  # pruned meanwhile
                record = _record(tenant, alert_id, fields)
                if (not rule_id or record.rule_id == rule_id) and (
                    state is None or record.state is state
                ):
                    found.append(record)
            if len(page) < batch:
                break
        return found[:limit]

    async def prune(self, tenant: str, before_ms: int) -> int:
        tag = self._tag(tenant)
        old = await self._cmd("zrangebyscore", f"{tag}:t", "-inf", f"({before_ms}")
        pruned = 0
        for member in old:
            alert_id = _text(member)
            state = await self._cmd("hget", f"{tag}:a:{alert_id}", "state")
            if _text(state) == str(int(AlertState.PENDING)):
                continue
            await self._cmd("delete", f"{tag}:a:{alert_id}")
            await self._cmd("zrem", f"{tag}:t", alert_id)
            pruned += 1
        return pruned

    async def cursors(self, tenant: str) -> dict[str, tuple[int, str]]:
        stored = await self._cmd("hgetall", f"{self._tag(tenant)}:cur")
        out = {}
        for run_id, value in stored.items():
            revision, _, text = _text(value).partition("|")
            out[_text(run_id)] = (int(revision), text)
        return out

    async def save_cursor(self, tenant: str, run_id: str, revision: int, text: str) -> None:
        await self._eval([f"{self._tag(tenant)}:cur"], "save_cursor", run_id, revision, text)

    async def drop_cursor(self, tenant: str, run_id: str) -> None:
        await self._cmd("hdel", f"{self._tag(tenant)}:cur", run_id)

    async def discovery(self, tenant: str) -> tuple[int, str] | None:
        value = await self._cmd("get", f"{self._tag(tenant)}:disc")
        if value is None:
            return None
        created, _, run_id = _text(value).partition("|")
        return int(created), run_id

    async def save_discovery(self, tenant: str, cursor: tuple[int, str]) -> None:
        await self._eval([f"{self._tag(tenant)}:disc"], "save_discovery", *cursor)


def _fields(record: AlertRecord) -> list[object]:
    return [
        "rule",
        record.rule_id,
        "trigger",
        record.trigger,
        "run",
        record.run_id,
        "create",
        record.create_ms,
        "rkey",
        record.rate_key,
        "state",
        int(record.state),
        "attempts",
        record.attempts,
        "err",
        record.last_error,
        "done",
        encode_done(record.done),
        "due",
        record.due_ms,
        "owner",
        record.owner,
        "payload",
        record.payload,
    ]


def _record(tenant: str, alert_id: str, reply: Any) -> AlertRecord:
    if isinstance(reply, dict):
        f = {_text(k): _text(v) for k, v in reply.items()}
    else:
        f = {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}
    return AlertRecord(
        tenant=tenant,
        alert_id=alert_id,
        rule_id=f["rule"],
        trigger=int(f["trigger"]),
        run_id=f["run"],
        create_ms=int(f["create"]),
        payload=f["payload"],
        rate_key=f["rkey"],
        state=AlertState(int(f["state"])),
        attempts=int(f["attempts"]),
        last_error=f["err"],
        done=decode_done(f["done"]),
        due_ms=int(f["due"]),
        owner=f["owner"],
    )
