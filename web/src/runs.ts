// The active runs page: every run created in a recent window that is not
// closed, each with its spend bar, burn rate and time to exhaustion, live.

import { runPath } from "./api.js";
import { flagBadges, SpendBar, thresholdBadge } from "./bar.js";
import { h, replace } from "./dom.js";
import { RunStore, type RunEntry } from "./model.js";
import { LiveStream, type StreamStatus } from "./stream.js";
import type { View } from "./view.js";

const WINDOWS = [
  ["1h", "the last hour"],
  ["24h", "the last 24 hours"],
  ["7d", "the last 7 days"],
] as const;

interface Row {
  element: HTMLTableRowElement;
  bar: SpendBar;
  burn: HTMLTableCellElement;
  eta: HTMLTableCellElement;
  threshold: HTMLTableCellElement;
  flags: HTMLTableCellElement;
}

export class RunsView implements View {
  private store = new RunStore(0);
  private stream: LiveStream | null = null;
  private readonly rows = new Map<string, Row>();
  private readonly body = h("tbody");
  private readonly empty = h("p", { class: "empty", hidden: true });
  private readonly status = h("p", { class: "stream-status", role: "status" });
  private readonly notice = h("p", { class: "notice", role: "alert", hidden: true });
  private since: string;

  constructor() {
    this.since = sessionStorage.getItem("runcap.since") ?? "24h";
  }

  mount(root: HTMLElement): void {
    const select = h(
      "select",
      { id: "since" },
      WINDOWS.map(([value, text]) => h("option", { value, selected: value === this.since }, text)),
    );
    select.addEventListener("change", () => {
      this.since = select.value;
      sessionStorage.setItem("runcap.since", this.since);
      this.reconnect();
    });
    const table = h(
      "table",
      { class: "runs" },
      h("caption", { class: "visually-hidden" }, "Active runs, newest first"),
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          ["Run", "Agent · team", "Spend of limit", "Burn", "Exhausted in", "Threshold", "Flags"].map(
            (name) => h("th", { scope: "col" }, name),
          ),
        ),
      ),
      this.body,
    );
    replace(
      root,
      h(
        "div",
        { class: "page-head" },
        h("h1", null, "Active runs"),
        h("div", { class: "controls" }, h("label", { for: "since" }, "Created in"), select),
      ),
      this.status,
      this.notice,
      h("div", { class: "table-wrap" }, table),
      this.empty,
    );
    this.connect();
  }

  unmount(): void {
    this.stream?.stop();
  }

  private reconnect(): void {
    this.stream?.stop();
    this.store = new RunStore(0);
    this.rows.clear();
    this.body.replaceChildren();
    this.connect();
  }

  private connect(): void {
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

  private onStatus(status: StreamStatus, detail?: string): void {
    const text: Record<StreamStatus, string> = {
      connecting: "Connecting…",
      live: "Live",
      reconnecting: "Reconnecting…",
      stopped: "Stopped",
    };
    this.status.textContent = detail ? `${text[status]} (${detail})` : text[status];
    this.status.dataset["state"] = status;
  }

  private onMessage(event: string, data: unknown): void {
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
      if (entry) this.draw(entry);
      else this.rows.get(runId)?.element.remove();
    }
    if (event === "ready" || event === "snapshot") {
      this.empty.hidden = this.store.runs.size > 0;
      this.empty.textContent = `No active runs were created in ${WINDOWS.find(([v]) => v === this.since)?.[1] ?? this.since}.`;
    }
  }

  private draw(entry: RunEntry): void {
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
    if (entry.error) flags.push(`ERROR ${entry.error.reason || entry.error.code}`);
    replace(row.flags, flagBadges(flags));
    row.element.dataset["status"] = entry.state.status;
  }

  private newRow(entry: RunEntry): Row {
    const run = entry.run;
    const who = [run?.labels["agent"], run?.team_id].filter(Boolean).join(" · ") || "-";
    const bar = new SpendBar(`Spend of run ${entry.runId}`);
    const row: Row = {
      element: h("tr", { "data-run-id": entry.runId }),
      bar,
      burn: h("td", { class: "num burn" }),
      eta: h("td", { class: "num eta" }),
      threshold: h("td", { class: "threshold" }),
      flags: h("td", { class: "flags" }),
    };
    row.element.append(
      h("th", { scope: "row" }, h("a", { href: runPath(entry.runId) }, entry.runId)),
      h("td", null, who),
      h("td", { class: "bar-cell" }, bar.element),
      row.burn,
      row.eta,
      row.threshold,
      row.flags,
    );
    return row;
  }

  /** Newest first: by creation time, then id. */
  private place(entry: RunEntry, row: Row): void {
    const created = entry.run?.create_time_ms ?? 0;
    for (const other of this.body.children) {
      const otherId = (other as HTMLElement).dataset["runId"] ?? "";
      const otherCreated = this.store.runs.get(otherId)?.run?.create_time_ms ?? 0;
      if (created > otherCreated || (created === otherCreated && entry.runId < otherId)) {
        this.body.insertBefore(row.element, other);
        return;
      }
    }
    this.body.append(row.element);
  }
}
