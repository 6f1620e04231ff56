"""The messages an alert is sent as: a signed JSON webhook, a Slack incoming
webhook message, a PagerDuty Events API v2 event (docs/alerts.md shows each).

Every request carries `Content-Type: application/json` and
`X-Runcap-Alert-Id` (receivers de-duplicate on it). A webhook with a secret
also carries `X-Runcap-Signature: t=<unix seconds>,v1=<hex>`, the
HMAC-SHA256 of `"<t>.<body>"` under the secret (as Stripe signs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

from runcap.v1 import budget_pb2
from runcap_server.alerts.facts import AlertFacts, level_name
from runcap_server.alerts.rules import Target, Trigger
from runcap_server.money import format_usd

SIGNATURE_HEADER = "X-Runcap-Signature"
ALERT_ID_HEADER = "X-Runcap-Alert-Id"
USER_AGENT = "runcap-alerts/1"
# PagerDuty's severities per trigger (threshold crossings below warn are info).
_SEVERITY = {
    Trigger.THRESHOLD: "warning",
    Trigger.THROTTLE: "error",
    Trigger.STOP: "critical",
    Trigger.SUSPENDED: "warning",
    Trigger.APPROVAL_REQUESTED: "warning",
    Trigger.OVERRUN: "warning",
    Trigger.BURN_RATE: "error",
    Trigger.BACKEND_DOWN: "critical",
}
_SLACK_ICON = {
    Trigger.THRESHOLD: ":large_yellow_circle:",
    Trigger.THROTTLE: ":warning:",
    Trigger.STOP: ":octagonal_sign:",
    Trigger.SUSPENDED: ":double_vertical_bar:",
    Trigger.APPROVAL_REQUESTED: ":raised_hand:",
    Trigger.OVERRUN: ":heavy_exclamation_mark:",
    Trigger.BURN_RATE: ":fire:",
    Trigger.BACKEND_DOWN: ":rotating_light:",
}


def usd(micros: int) -> str:
    """Micro-USD as a plain decimal string: 4800000 -> "4.80"."""
    return format_usd(micros).replace("$", "", 1)


def run_link(dashboard_url: str, run_id: str) -> str:
    """The run's page on the dashboard, "" without a dashboard or a run."""
    if not dashboard_url or not run_id:
        return ""
    return f"{dashboard_url.rstrip('/')}/runs/{run_id}"


def _percent(state: budget_pb2.BudgetState) -> int:
    return state.committed_micros * 100 // state.limit_micros if state.limit_micros else 0


def _time(ms: int) -> str:
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_body(facts: AlertFacts, dashboard_url: str) -> dict[str, Any]:
    """The generic webhook's JSON body (version 1; fields are only ever added)."""
    spend: dict[str, Any] | None = None
    if facts.budget:
        state = facts.state
        spend = {
            "committed_micros": state.committed_micros,
            "reserved_micros": state.reserved_micros,
            "limit_micros": state.limit_micros,
            "committed_usd": usd(state.committed_micros),
            "reserved_usd": usd(state.reserved_micros),
            "limit_usd": usd(state.limit_micros),
            "percent": _percent(state),
            "status": budget_pb2.RunStatus.Name(state.status).removeprefix("RUN_STATUS_").lower(),
            "revision": state.revision,
        }
    run = None
    if facts.run_id:
        run = {
            "run_id": facts.run_id,
            "agent": facts.labels.get("agent", ""),
            "api_key_id": facts.api_key_id,
            "user_id": facts.user_id,
            "team_id": facts.team_id,
            "parent_run_id": facts.parent_run_id,
            "labels": dict(facts.labels),
        }
    return {
        "version": 1,
        "alert_id": facts.alert_id,
        "rule_id": facts.rule_id,
        "tenant": facts.tenant,
        "trigger": facts.trigger.slug,
        "summary": facts.summary,
        "time": _time(facts.time_ms),
        "run": run,
        "spend": spend,
        "threshold": level_name(facts.threshold) or None,
        "owner": facts.owner,
        "description": facts.description,
        "dashboard_url": run_link(dashboard_url, facts.run_id),
        "details": dict(facts.details),
    }


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Runcap-Signature value: t=<timestamp>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(facts: AlertFacts, dashboard_url: str) -> dict[str, Any]:
    """A Slack incoming-webhook message: a text fallback and Block Kit blocks."""
    icon = _SLACK_ICON[facts.trigger]
    title = f"runcap {facts.trigger.slug.replace('_', ' ')}"
    text = f"{icon} {title}: {_slack_escape(facts.summary)}"
    fields = []
    if facts.run_id:
        fields.append(f"*Run*\n`{facts.run_id}`")
        fields.append(f"*Agent*\n{_slack_escape(facts.labels.get('agent', '')) or '-'}")
        fields.append(f"*Team*\n{_slack_escape(facts.team_id) or '-'}")
    if facts.budget:
        state = facts.state
        spend = f"{format_usd(state.committed_micros)} of {format_usd(state.limit_micros)}"
        fields.append(f"*Spend*\n{spend} ({_percent(state)}%)")
    fields.append(f"*Owner*\n{_slack_escape(facts.owner) or '-'}")
    fields.append(f"*Rule*\n`{facts.rule_id}`")
    footer = f"alert `{facts.alert_id}` · {_time(facts.time_ms)}"
    link = run_link(dashboard_url, facts.run_id)
    if link:
        footer = f"<{link}|Open the run in the runcap dashboard> · {footer}"
    return {
        "text": text,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}},
            {
                "type": "section",
                "fields": [{"type": "mrkdwn", "text": f[:2000]} for f in fields[:10]],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": footer}]},
        ],
    }


def pagerduty_body(facts: AlertFacts, routing_key: str, dashboard_url: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 trigger event, de-duplicated on the alert id."""
    severity = _SEVERITY[facts.trigger]
    if facts.trigger is Trigger.THRESHOLD and facts.threshold < budget_pb2.THRESHOLD_LEVEL_WARN:
        severity = "info"
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": facts.alert_id,
        "payload": {
            "summary": facts.summary[:1024],
            "source": "runcap",
            "severity": severity,
            "timestamp": _time(facts.time_ms),
            "component": facts.run_id or "storage",
            "group": facts.team_id,
            "class": facts.trigger.slug,
            "custom_details": webhook_body(facts, dashboard_url),
        },
        "client": "runcap",
    }
    link = run_link(dashboard_url, facts.run_id)
    if link:
        event["links"] = [{"href": link, "text": "The run in the runcap dashboard"}]
        event["client_url"] = dashboard_url
    return event


def request(
    target: Target, facts: AlertFacts, dashboard_url: str, now_s: int
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery attempt to `target`."""
    if target.kind == "slack":
        body: dict[str, Any] = slack_body(facts, dashboard_url)
    elif target.kind == "pagerduty":
        body = pagerduty_body(facts, target.routing_key, dashboard_url)
    else:
        body = webhook_body(facts, dashboard_url)
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        ALERT_ID_HEADER: facts.alert_id,
    }
    if target.kind == "webhook" and target.secret:
        headers[SIGNATURE_HEADER] = sign(target.secret, now_s, data)
    return data, headers
