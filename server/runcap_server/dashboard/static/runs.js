// The active runs page: every run created in a recent window that is not
// closed, each with its spend bar, burn rate and time to exhaustion, live.
import { runPath } from "./api.js";
import { flagBadges, SpendBar, thresholdBadge } from "./bar.js";
import { h, replace } from "./dom.js";
import { RunStore } from "./model.js";
import { LiveStream } from "./stream.js";
const WINDOWS = [
    ["1h", "the last hour"],
    ["24h", "the last 24 hours"],
    ["7d", "the last 7 days"],
];
export class RunsView {
    store = new RunStore(0);
    stream = null;
    rows = new Map();
    body = h("tbody");
    empty = h("p", { class: "empty", hidden: true });
    status = h("p", { class: "stream-status", role: "status" });
    notice = h("p", { class: "notice", role: "alert", hidden: true });
    since;
    constructor() {
        this.since = sessionStorage.getItem("runcap.since") ?? "24h";
    }
    mount(root) {
        const select = h("select", { id: "since" }, WINDOWS.map(([value, text]) => h("option", { value, selected: value === this.since }, text)));
        select.addEventListener("change", () => {
            this.since = select.value;
            sessionStorage.setItem("runcap.since", this.since);
            this.reconnect();
        });
        const table = h("table", { class: "runs" }, h("caption", { class: "visually-hidden" }, "Active runs, newest first"), h("thead", null, h("tr", null, ["Run", "Agent · team", "Spend of limit", "Burn", "Exhausted in", "Threshold", "Flags"].map((name) => h("th", { scope: "col" }, name)))), this.body);
        replace(root, h("div", { class: "page-head" }, h("h1", null, "Active runs"), h("div", { class: "controls" }, h("label", { for: "since" }, "Created in"), select)), this.status, this.notice, h("div", { class: "table-wrap" }, table), this.empty);
        this.connect();
    }
    unmount() {
        this.stream?.stop();
    }
    reconnect() {
        this.stream?.stop();
        this.store = new RunStore(0);
        this.rows.clear();
        this.body.replaceChildren();
        this.connect();
    }
    connect() {
        this.stream = new LiveStream({
            body: () => ({ active_since: this.since, resume: this.store.cursors() }),
            message: (event, data) => this.onMessage(event, data),
            status: (status, detail) => this.onStatus(status, detail),
            refused: (error) => {
                this.notice.hidden = false;
                this.notice.textContent = error.message;
            },
        });
        this.stream.start();
    }
    onStatus(status, detail) {
        const text = {
            connecting: "Connecting…",
            live: "Live",
            reconnecting: "Reconnecting…",
            stopped: "Stopped",
        };
        this.status.textContent = detail ? `${text[status]} (${detail})` : text[status];
        this.status.dataset["state"] = status;
    }
    onMessage(event, data) {
        const changed = this.store.apply(event, data);
        if (event === "reset") {
            this.stream?.restart();
            return;
        }
        if (this.store.error) {
            this.notice.hidden = false;
            this.notice.textContent = `New runs are not listed: ${this.store.error.message}`;
        }
        for (const runId of changed) {
            const entry = this.store.runs.get(runId);
            if (entry)
                this.draw(entry);
            else
                this.rows.get(runId)?.element.remove();
        }
        if (event === "ready" || event === "snapshot") {
            this.empty.hidden = this.store.runs.size > 0;
            this.empty.textContent = `No active runs were created in ${WINDOWS.find(([v]) => v === this.since)?.[1] ?? this.since}.`;
        }
    }
    draw(entry) {
        let row = this.rows.get(entry.runId);
        if (!row) {
            row = this.newRow(entry);
            this.rows.set(entry.runId, row);
            this.place(entry, row);
        }
        row.bar.update(entry.state, entry.run);
        const live = entry.live;
        row.burn.textContent = live?.burn ?? "-";
        row.eta.textContent = live?.exhausted_in ?? "-";
        replace(row.threshold, thresholdBadge(entry.state.threshold));
        const flags = [...(live?.flags ?? [])];
        if (entry.error)
            flags.push(`ERROR ${entry.error.reason || entry.error.code}`);
        replace(row.flags, flagBadges(flags));
        row.element.dataset["status"] = entry.state.status;
    }
    newRow(entry) {
        const run = entry.run;
        const who = [run?.labels["agent"], run?.team_id].filter(Boolean).join(" · ") || "-";
        const bar = new SpendBar(`Spend of run ${entry.runId}`);
        const row = {
            element: h("tr", { "data-run-id": entry.runId }),
            bar,
            burn: h("td", { class: "num burn" }),
            eta: h("td", { class: "num eta" }),
            threshold: h("td", { class: "threshold" }),
            flags: h("td", { class: "flags" }),
        };
        row.element.append(h("th", { scope: "row" }, h("a", { href: runPath(entry.runId) }, entry.runId)), h("td", null, who), h("td", { class: "bar-cell" }, bar.element), row.burn, row.eta, row.threshold, row.flags);
        return row;
    }
    /** Newest first: by creation time, then id. */
    place(entry, row) {
        const created = entry.run?.create_time_ms ?? 0;
        for (const other of this.body.children) {
            const otherId = other.dataset["runId"] ?? "";
            const otherCreated = this.store.runs.get(otherId)?.run?.create_time_ms ?? 0;
            if (created > otherCreated || (created === otherCreated && entry.runId < otherId)) {
                this.body.insertBefore(row.element, other);
                return;
            }
        }
        this.body.append(row.element);
    }
}
