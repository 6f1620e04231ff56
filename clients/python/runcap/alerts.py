"""Clients of the runcap AlertService: alert rules and the alerts they raised.

::

    from runcap import AlertClient

    with AlertClient("127.0.0.1:50051", api_key=ADMIN_KEY) as alerts:
        alerts.put_rule(
            {
                "rule_id": "enrichment-stop",
                "scope": {"kind": "team", "id": "data"},
                "triggers": ["throttle", "stop"],
                "targets": [
                    {"webhook": {"url": "https://hooks.example.com/runcap", "secret": SECRET}},
                    {"pagerduty": {"routing_key": PD_KEY}},
                ],
                "owner": "Dana Whitfield",
            }
        )
        for alert in alerts.iter_alerts(state="dead"):
            print(alert.alert_id, alert.last_error)

A rule is a `runcap.v1.AlertRule` message or a mapping in its JSON form
(field names as in the proto; `min_interval` as "600s"), where triggers may
be short names ("stop" for ALERT_TRIGGER_STOP) and a scope's kind too
("team"). `AsyncAlertClient` has the same methods as coroutines. Failures
raise `runcap.errors.RuncapError` subclasses, as with `RuncapClient`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, TypeAlias

from google.protobuf import json_format

from runcap._connection import AsyncConnection, Connection
from runcap.v1 import alerts_pb2, alerts_pb2_grpc

AlertRuleLike: TypeAlias = alerts_pb2.AlertRule | Mapping[str, Any]
AlertStateLike: TypeAlias = alerts_pb2.AlertState.ValueType | str | None


def to_alert_rule(rule: AlertRuleLike) -> alerts_pb2.AlertRule:
    """An AlertRule message from a message or its JSON form (short trigger
    and scope kind names allowed). Raises ValueError on an unknown field."""
    if isinstance(rule, alerts_pb2.AlertRule):
        return rule
    raw = dict(rule)
    if "triggers" in raw:
        raw["triggers"] = [_prefixed(t, "ALERT_TRIGGER_") for t in raw["triggers"]]
    if isinstance(raw.get("scope"), Mapping) and "kind" in raw["scope"]:
        raw["scope"] = {**raw["scope"], "kind": _prefixed(raw["scope"]["kind"], "SCOPE_KIND_")}
    try:
        return json_format.ParseDict(raw, alerts_pb2.AlertRule())
    except json_format.ParseError as error:
        raise ValueError(f"not an alert rule: {error}") from None


def _prefixed(value: object, prefix: str) -> object:
    if isinstance(value, str) and not value.upper().startswith(prefix):
        return prefix + value.upper()
    return value


def to_alert_state(state: AlertStateLike) -> alerts_pb2.AlertState.ValueType:
    """ALERT_STATE_* from a value, a name ("dead", "ALERT_STATE_DEAD") or None (any)."""
    if state is None:
        return alerts_pb2.ALERT_STATE_UNSPECIFIED
    if isinstance(state, str):
        name = state.upper()
        try:
            return alerts_pb2.AlertState.Value(
                name if name.startswith("ALERT_STATE_") else "ALERT_STATE_" + name
            )
        except ValueError:
            raise ValueError(
                f"unknown alert state {state!r}: expected pending, delivered, dead or suppressed"
            ) from None
    return state


def _list_request(
    rule_id: str, state: AlertStateLike, page_size: int, page_token: str
) -> alerts_pb2.ListAlertsRequest:
    return alerts_pb2.ListAlertsRequest(
        rule_id=rule_id, state=to_alert_state(state), page_size=page_size, page_token=page_token
    )


class AlertClient(Connection):
    """A synchronous client of the runcap AlertService.

    Takes the same connection arguments as `runcap.RuncapClient` (or its
    channel: ``AlertClient(channel=...)``). Every call is idempotent and
    retried on UNAVAILABLE according to `retry`. PutAlertRule and
    DeleteAlertRule need an admin key, the reads an operator key.
    """

    _STUB = alerts_pb2_grpc.AlertServiceStub
    _stub: alerts_pb2_grpc.AlertServiceStub

    def put_rule(self, rule: AlertRuleLike) -> alerts_pb2.PutAlertRuleResponse:
        """Creates or replaces a rule; `changed` is False when the same rule
        was stored already. The answer's rule has its defaults filled in and
        its secrets redacted."""
        request = alerts_pb2.PutAlertRuleRequest(rule=to_alert_rule(rule))
        return self._call(self._stub.PutAlertRule, request)

    def list_rules(self) -> list[alerts_pb2.AlertRule]:
        """The tenant's rules, by rule id, secrets redacted."""
        return list(self._call(self._stub.ListAlertRules, alerts_pb2.ListAlertRulesRequest()).rules)

    def delete_rule(self, rule_id: str) -> bool:
        """Deletes a rule; False when there was none."""
        request = alerts_pb2.DeleteAlertRuleRequest(rule_id=rule_id)
        return bool(self._call(self._stub.DeleteAlertRule, request).deleted)

    def list_alerts(
        self,
        *,
        rule_id: str = "",
        state: AlertStateLike = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> alerts_pb2.ListAlertsResponse:
        """One page of alerts, newest first; pass `next_page_token` back for
        the next. `state` filters ("dead" lists the dead letters)."""
        request = _list_request(rule_id, state, page_size, page_token)
        return self._call(self._stub.ListAlerts, request)

    def iter_alerts(
        self, *, rule_id: str = "", state: AlertStateLike = None
    ) -> Iterator[alerts_pb2.Alert]:
        """Every alert kept, newest first, page after page."""
        token = ""
        while True:
            page = self.list_alerts(rule_id=rule_id, state=state, page_token=token)
            yield from page.alerts
            token = page.next_page_token
            if not token:
                return


class AsyncAlertClient(AsyncConnection):
    """The asyncio twin of `AlertClient`: the same methods, as coroutines
    (`iter_alerts` is an async iterator)."""

    _STUB = alerts_pb2_grpc.AlertServiceStub
    _stub: alerts_pb2_grpc.AlertServiceAsyncStub

    async def put_rule(self, rule: AlertRuleLike) -> alerts_pb2.PutAlertRuleResponse:
        """See `AlertClient.put_rule`."""
        request = alerts_pb2.PutAlertRuleRequest(rule=to_alert_rule(rule))
        return await self._call(self._stub.PutAlertRule, request)

    async def list_rules(self) -> list[alerts_pb2.AlertRule]:
        """See `AlertClient.list_rules`."""
        response = await self._call(self._stub.ListAlertRules, alerts_pb2.ListAlertRulesRequest())
        return list(response.rules)

    async def delete_rule(self, rule_id: str) -> bool:
        """See `AlertClient.delete_rule`."""
        request = alerts_pb2.DeleteAlertRuleRequest(rule_id=rule_id)
        return bool((await self._call(self._stub.DeleteAlertRule, request)).deleted)

    async def list_alerts(
        self,
        *,
        rule_id: str = "",
        state: AlertStateLike = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> alerts_pb2.ListAlertsResponse:
        """See `AlertClient.list_alerts`."""
        request = _list_request(rule_id, state, page_size, page_token)
        return await self._call(self._stub.ListAlerts, request)

    async def iter_alerts(
        self, *, rule_id: str = "", state: AlertStateLike = None
    ) -> AsyncIterator[alerts_pb2.Alert]:
        """See `AlertClient.iter_alerts`."""
        token = ""
        while True:
            page = await self.list_alerts(rule_id=rule_id, state=state, page_token=token)
            for alert in page.alerts:
                yield alert
            token = page.next_page_token
            if not token:
                return
