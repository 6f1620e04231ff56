// A run's page: its figures and spend bar, the kill switch (suspend and
// resume), its pending approvals, its spend over time and its changes.
import { postJson, runPath } from "./api.js";
import { flagBadges, SpendBar, thresholdBadge } from "./bar.js";
import { h, replace } from "./dom.js";
import { clock, dateTime, tokens, usd } from "./format.js";
import { RunStore } from "./model.js";
import { LiveStream } from "./stream.js";
import { timeline } from "./timeline.js";
/** Past changes replayed for the timeline and the events list. */
const HISTORY = 2000;
const EVENTS_SHOWN = 200;
export class RunView {
    runId;
    store = new RunStore(HISTORY);
    stream = null;
    bar;
    heading = h("h1");
    about = h("p", { class: "about" });
    status = h("p", { class: "stream-status", role: "status" });
    notice = h("p", { class: "notice", role: "alert", hidden: true });
    outcome = h("p", { class: "outcome", role: "status", "aria-live": "polite" });
    figures = h("dl", { class: "figures" });
    suspend = h("button", { type: "button", class: "danger", disabled: true }, "Suspend");
    resume = h("button", { type: "button", disabled: true }, "Resume");
    approvals = h("div", { class: "approvals" });
    chart = h("figure", { class: "chart" });
    events = h("tbody");
    constructor(runId) {
        this.runId = runId;
        this.bar = new SpendBar(`Spend of run ${runId}`);
    }
    mount(root) {
        this.heading.textContent = `Run ${this.runId}`;
        this.suspend.addEventListener("click", () => void this.act("suspend"));
        this.resume.addEventListener("click", () => void this.act("resume"));
        replace(root, h("p", { class: "back" }, h("a", { href: "/" }, "← Active runs")), h("div", { class: "page-head" }, this.heading, h("div", { class: "actions" }, this.suspend, this.resume)), this.about, this.status, this.notice, this.outcome, h("section", { "aria-labelledby": "spend-h" }, h("h2", { id: "spend-h" }, "Spend"), this.bar.element, this.figures), h("section", { "aria-labelledby": "approvals-h" }, h("h2", { id: "approvals-h" }, "Pending approvals"), this.approvals), h("section", { "aria-labelledby": "timeline-h" }, h("h2", { id: "timeline-h" }, "Spend over time"), this.chart), h("section", { "aria-labelledby": "events-h" }, h("h2", { id: "events-h" }, "Changes"), h("div", { class: "table-wrap" }, h("table", { class: "events" }, h("caption", { class: "visually-hidden" }, `Changes of run ${this.runId}, newest first`), h("thead", null, h("tr", null, ["Time", "Revision", "Change", "Detail", "Committed after"].map((name) => h("th", { scope: "col" }, name)))), this.events))));
        this.stream = new LiveStream({
            body: () => {
                const cursor = this.store.cursors()[this.runId];
                return cursor
                    ? { runs: [this.runId], resume: { [this.runId]: cursor } }
                    : { runs: [this.runId], history: HISTORY };
            },
            message: (event, data) => this.onMessage(event, data),
            status: (status, detail) => this.onStatus(status, detail),
            refused: (error) => {
                this.notice.hidden = false;
                this.notice.textContent =
                    error.status === 404 ? `There is no run ${this.runId}.` : error.message;
            },
        });
        this.stream.start();
    }
    unmount() {
        this.stream?.stop();
    }
    onStatus(status, detail) {
        const text = { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…", stopped: "Stopped" }[status];
        this.status.textContent = detail ? `${text} (${detail})` : text;
        this.status.dataset["state"] = status;
    }
    onMessage(event, data) {
        this.store.apply(event, data);
        if (event === "reset") {
            this.stream?.restart();
            return;
        }
        const entry = this.store.runs.get(this.runId);
        if (!entry)
            return;
        this.drawFigures(entry);
        if (event === "live") {
            this.drawChart(entry);
            return;
        }
        this.drawAbout(entry);
        this.drawApprovals(entry);
        this.drawChart(entry);
        this.drawEvents(entry);
    }
    async act(verb) {
        this.outcome.textContent = verb === "suspend" ? "Suspending…" : "Resuming…";
        try {
            const done = await postJson(`/api${runPath(this.runId)}/${verb}`);
            const word = verb === "suspend" ? "suspended" : "resumed";
            this.outcome.textContent = done.replayed ? `The run was already ${word}.` : `The run is ${word}.`;
        }
        catch (error) {
            this.outcome.textContent = `Could not ${verb} the run: ${error.message}`;
        }
    }
    async decide(approvalId, verb) {
        this.outcome.textContent = verb === "approve" ? "Approving…" : "Denying…";
        try {
            const done = await postJson(`/api/approvals/${verb}`, { approval_id: approvalId });
            this.outcome.textContent = `${approvalId}: ${done.approval.status}.`;
        }
        catch (error) {
            this.outcome.textContent = `Could not ${verb} ${approvalId}: ${error.message}`;
        }
    }
    drawAbout(entry) {
        const run = entry.run;
        const parts = [];
        if (run) {
            for (const [key, value] of Object.entries(run.labels))
                parts.push(h("span", { class: "chip" }, `${key}=${value}`));
            const scopes = [
                run.team_id && `team ${run.team_id}`,
                run.user_id && `user ${run.user_id}`,
                run.api_key_id && `API key ${run.api_key_id}`,
                `mode ${run.enforcement_mode.replace(/_/g, " ")}`,
                run.create_time_ms !== null && `created ${dateTime(run.create_time_ms)}`,
            ].filter(Boolean);
            parts.push(scopes.join(" · "));
            if (run.parent_run_id)
                parts.push(" · subagent of ", h("a", { href: runPath(run.parent_run_id) }, run.parent_run_id));
        }
        replace(this.about, parts);
        const status = entry.state.status;
        this.suspend.disabled = status !== "open";
        this.resume.disabled = status !== "suspended";
    }
    drawFigures(entry) {
        const state = entry.state;
        const live = entry.live;
        this.bar.update(state, entry.run);
        const flags = [...(live?.flags ?? [])];
        if (entry.error)
            flags.push(`ERROR ${entry.error.reason || entry.error.code}`);
        const rows = [
            ["Status", h("span", { class: `status status-${state.status}` }, state.status)],
            ["Committed", usd(state.committed_micros)],
            ["Held", `${usd(state.reserved_micros)} (${state.active_reservations} open)`],
            ["Limit", usd(state.limit_micros)],
            ["Remaining", usd(state.remaining_micros)],
            ["Overrun", usd(state.overrun_micros)],
            ["Burn rate", live?.burn ?? "-"],
            ["Exhausted in", live?.exhausted_in ?? "-"],
            ["Threshold", thresholdBadge(state.threshold)],
            ["Flags", flags.length ? h("span", null, flagBadges(flags)) : "none"],
            ["Tokens", tokens(state.committed_tokens)],
            ["Revision", String(state.revision)],
        ];
        replace(this.figures, rows.map(([name, value]) => h("div", { "data-figure": name.toLowerCase().replace(/ /g, "-") }, h("dt", null, name), h("dd", null, value))));
    }
    drawApprovals(entry) {
        const pending = entry.live?.pending_approvals ?? [];
        if (pending.length === 0) {
            replace(this.approvals, h("p", { class: "empty" }, "None."));
            return;
        }
        replace(this.approvals, h("ul", null, pending.map((approvalId) => {
            const what = approvalId.split("/approval:")[1] ?? approvalId;
            const approve = h("button", { type: "button" }, "Approve");
            const deny = h("button", { type: "button", class: "danger" }, "Deny");
            approve.setAttribute("aria-label", `Approve ${what}`);
            deny.setAttribute("aria-label", `Deny ${what}`);
            approve.addEventListener("click", () => void this.decide(approvalId, "approve"));
            deny.addEventListener("click", () => void this.decide(approvalId, "deny"));
            return h("li", { "data-approval-id": approvalId }, h("code", null, what), " ", approve, deny);
        })));
    }
    drawChart(entry) {
        replace(this.chart, timeline(entry, Date.now()), h("figcaption", null, "Committed spend (line), held spend above it, the threshold bands and the ceiling."));
    }
    drawEvents(entry) {
        const shown = entry.changes.slice(-EVENTS_SHOWN).reverse();
        replace(this.events, shown.map((change) => h("tr", { "data-revision": change.revision, class: `event-${change.event.type}` }, h("td", null, change.event.time_ms === null ? "-" : clock(change.event.time_ms)), h("td", { class: "num" }, String(change.revision)), h("td", null, change.event.type.replace(/_/g, " ")), h("td", null, describe(change)), h("td", { class: "num" }, usd(change.state.committed_micros)))));
    }
}
/** A change in words. */
export function describe(change) {
    const event = change.event;
    const id = event.reservation_id ? ` (${event.reservation_id})` : "";
    switch (event.type) {
        case "reserved":
            return `held ${usd(event.amount_micros)}${id}`;
        case "committed": {
            const over = event.overrun_micros ? `, ${usd(event.overrun_micros)} over` : "";
            const late = event.late ? ", late" : "";
            return `${usd(event.actual_micros)} of ${usd(event.amount_micros)} held${over}${late}${id}`;
        }
        case "refunded":
        case "expired":
            return `released ${usd(event.amount_micros)}${id}`;
        case "threshold_crossed":
            return `reached ${event.threshold ?? "?"}`;
        case "approval_requested":
        case "approval_granted":
        case "approval_denied":
            return event.approval_id ?? "";
        case "blocked": {
            const scope = event.blocking_scope ? ` by ${event.blocking_scope.kind} ${event.blocking_scope.id}` : "";
            return `${usd(event.amount_micros)} not held: ${(event.reason ?? "").replace(/_/g, " ")}${scope}${id}`;
        }
        default:
            return "";
    }
}
