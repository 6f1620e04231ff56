"""The runcap.v1.AlertService servicer: rules in, alerts out, per tenant.

Authentication and errors go the BudgetService's way (servicer._unary): the
caller's key decides the tenant, PutAlertRule and DeleteAlertRule need the
admin role, the reads the operator role. Secrets are never returned or logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from runcap.v1 import alerts_pb2, alerts_pb2_grpc, budget_pb2
from runcap_server import auth
from runcap_server.alerts import rules
from runcap_server.alerts.facts import AlertFacts
from runcap_server.alerts.store import AlertRecord, AlertState, AlertStore
from runcap_server.auth import KeyStore
from runcap_server.convert import timestamp
from runcap_server.page_tokens import page_cursor, page_token
from runcap_server.servicer import Context, _unary
from runcap_server.validation import Validator

LIST_PAGE_SIZE = 100
MAX_LIST_PAGE_SIZE = 1000
# What each RPC needs (the alerts' own part of servicer._ACCESS).
_ACCESS = {
    "PutAlertRule": auth.Role.ADMIN,
    "DeleteAlertRule": auth.Role.ADMIN,
    "ListAlertRules": auth.Role.OPERATOR,
    "ListAlerts": auth.Role.OPERATOR,
}


class AlertServicer(alerts_pb2_grpc.AlertServiceServicer):
    def __init__(
        self,
        store: AlertStore,
        default_tenant: str,
        keys: KeyStore | None = None,
        on_rules_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.default_tenant = default_tenant
        self.keys = keys
        self.on_rules_changed = on_rules_changed

    @property
    def tenant(self) -> str:
        principal = auth.CALLER.get()
        return self.default_tenant if principal is None else principal.tenant

    async def _enter(self, method: str, request: Any, context: Context) -> None:
        if self.keys is None:
            return
        principal = self.keys.authenticate(context.invocation_metadata(), context.auth_context())
        auth.CALLER.set(principal)
        auth.require(_ACCESS[method], method)

    @_unary
    async def PutAlertRule(
        self, request: alerts_pb2.PutAlertRuleRequest, context: Context
    ) -> alerts_pb2.PutAlertRuleResponse:
        check = Validator()
        if not request.HasField("rule"):
            check.fail("rule", "is required")
        rule = rules.validate(check, request.rule)
        check.done()
        changed = await self.store.put_rule(
            self.tenant, rule.rule_id, rules.encode(rule), int(time.time() * 1000)
        )
        if changed:
            self.on_rules_changed()
        return alerts_pb2.PutAlertRuleResponse(rule=rules.redacted(rule), changed=changed)

    @_unary
    async def ListAlertRules(
        self, request: alerts_pb2.ListAlertRulesRequest, context: Context
    ) -> alerts_pb2.ListAlertRulesResponse:
        stored = await self.store.rules(self.tenant)
        return alerts_pb2.ListAlertRulesResponse(
            rules=[rules.redacted(rules.decode(r.text)) for r in stored]
        )

    @_unary
    async def DeleteAlertRule(
        self, request: alerts_pb2.DeleteAlertRuleRequest, context: Context
    ) -> alerts_pb2.DeleteAlertRuleResponse:
        check = Validator()
        rule_id = check.identifier("rule_id", request.rule_id)
        check.done()
        deleted = await self.store.delete_rule(self.tenant, rule_id)
        if deleted:
            self.on_rules_changed()
        return alerts_pb2.DeleteAlertRuleResponse(deleted=deleted)

    @_unary
    async def ListAlerts(
        self, request: alerts_pb2.ListAlertsRequest, context: Context
    ) -> alerts_pb2.ListAlertsResponse:
        check = Validator()
        size = request.page_size or LIST_PAGE_SIZE
        if not 0 < size <= MAX_LIST_PAGE_SIZE:
            check.fail("page_size", f"must be between 1 and {MAX_LIST_PAGE_SIZE} (got {size})")
        rule_id = check.identifier("rule_id", request.rule_id, required=False)
        state: AlertState | None = None
        if request.state:
            if request.state in {s.value for s in AlertState}:
                state = AlertState(request.state)
            else:
                check.fail("state", f"is not an AlertState (got {request.state})")
        query = f"{rule_id}:{int(state or 0)}"
        before = page_cursor(request.page_token, query) if request.page_token else None
        if request.page_token and before is None:
            check.fail("page_token", "is not a token of this query (same rule_id and state)")
        check.done()
        found = await self.store.list_alerts(self.tenant, before, size, rule_id, state)
        response = alerts_pb2.ListAlertsResponse(alerts=[alert_pb(a) for a in found])
        if len(found) == size:
            last = found[-1]
            response.next_page_token = page_token((last.create_ms, last.alert_id), query)
        return response


def alert_pb(record: AlertRecord) -> alerts_pb2.Alert:
    facts = AlertFacts.from_json(record.payload)
    alert = alerts_pb2.Alert(
        alert_id=record.alert_id,
        rule_id=record.rule_id,
        trigger=alerts_pb2.AlertTrigger.ValueType(record.trigger),
        run_id=record.run_id,
        create_time=timestamp(record.create_ms),
        state=alerts_pb2.AlertState.ValueType(record.state),
        attempts=record.attempts,
        last_error=record.last_error,
        summary=facts.summary,
        threshold=budget_pb2.ThresholdLevel.ValueType(facts.threshold),
    )
    if facts.budget:
        alert.budget.CopyFrom(facts.state)
    return alert
