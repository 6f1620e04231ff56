// Showback: `runcap report` as charts. Spend per day of each group (team by
// default), the top agents, and the report's table.

import { getJson } from "./api.js";
import { colour, niceTicks, scale } from "./charts.js";
import { h, replace, s } from "./dom.js";
import { tokens, usd, usdShort } from "./format.js";
import type { View } from "./view.js";

interface Row {
  [group: string]: unknown;
  runs: number;
  tokens: number;
  spend_micros: number;
  top_agents: { agent: string; spend_micros: number }[];
  thresholds: Record<string, number>;
  overrun_micros: number;
  overrun_runs: number;
}

interface Showback {
  group_by: string;
  since: string;
  until: string;
  runs: number;
  truncated: boolean;
  groups: Row[];
  days: Record<string, Record<string, number>>;
  agents: Row[];
}

const RANGES = [
  ["24h", "the last 24 hours"],
  ["7d", "the last 7 days"],
  ["30d", "the last 30 days"],
] as const;
const GROUPS = [
  ["team", "team"],
  ["agent", "agent"],
  ["user", "user"],
  ["api_key", "API key"],
] as const;
const DAY_MS = 86_400_000;

export class ShowbackView implements View {
  private readonly body = h("div", { class: "showback-body", "aria-live": "polite" });
  private since = "7d";
  private groupBy = "team";
  private active = true;

  mount(root: HTMLElement): void {
    const since = h("select", { id: "sb-since" }, RANGES.map(([value, text]) => h("option", { value, selected: value === this.since }, text)));
    const by = h("select", { id: "sb-group" }, GROUPS.map(([value, text]) => h("option", { value, selected: value === this.groupBy }, text)));
    const form = h(
      "form",
      { class: "controls" },
      h("label", { for: "sb-since" }, "Runs created in"),
      since,
      h("label", { for: "sb-group" }, "per"),
      by,
      h("button", { type: "submit" }, "Show"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.since = since.value;
      this.groupBy = by.value;
      void this.load();
    });
    replace(root, h("div", { class: "page-head" }, h("h1", null, "Showback"), form), this.body);
    void this.load();
  }

  unmount(): void {
    this.active = false;
  }

  private async load(): Promise<void> {
    replace(this.body, h("p", { class: "stream-status" }, "Loading…"));
    const query = new URLSearchParams({ since: this.since, group_by: this.groupBy });
    try {
      const data = await getJson<Showback>(`/api/showback?${query}`);
      if (this.active) this.draw(data);
    } catch (error) {
      replace(this.body, h("p", { class: "notice", role: "alert" }, `Could not load the report: ${(error as Error).message}`));
    }
  }

  private draw(data: Showback): void {
    const by = data.group_by;
    const label = GROUPS.find(([value]) => value === by)?.[1] ?? by;
    const total = data.groups.reduce((sum, row) => sum + row.spend_micros, 0);
    const names = data.groups.map((row) => String(row[by]));
    replace(
      this.body,
      h(
        "p",
        { class: "summary" },
        `${data.runs} runs, ${usd(total)} committed, ${data.since.slice(0, 10)} to ${data.until.slice(0, 10)} (UTC).`,
        data.truncated ? " Only the first runs of the range were read." : "",
      ),
      h(
        "section",
        { "aria-labelledby": "daily-h" },
        h("h2", { id: "daily-h" }, `Spend per day per ${label}`),
        h("figure", { class: "chart" }, dailyChart(data, names), legend(names)),
      ),
      h(
        "section",
        { "aria-labelledby": "agents-h" },
        h("h2", { id: "agents-h" }, "Top agents"),
        h("figure", { class: "chart" }, agentsChart(data.agents)),
      ),
      h("section", { "aria-labelledby": "table-h" }, h("h2", { id: "table-h" }, `Per ${label}`), table(data, label)),
    );
  }
}

function days(data: Showback): string[] {
  const first = Date.parse(data.since.slice(0, 10));
  const last = Date.parse(data.until.slice(0, 10));
  const all: string[] = [];
  for (let at = first; at <= last && all.length < 400; at += DAY_MS) {
    all.push(new Date(at).toISOString().slice(0, 10));
  }
  return all;
}

function dailyChart(data: Showback, names: string[]): SVGSVGElement {
  const W = 800;
  const H = 260;
  const M = { left: 64, right: 12, top: 12, bottom: 34 };
  const labels = days(data);
  const totals = labels.map((day) => Object.values(data.days[day] ?? {}).reduce((a, b) => a + b, 0));
  const ticks = niceTicks(Math.max(...totals, 1));
  const y = scale(0, ticks[ticks.length - 1]!, H - M.bottom, M.top);
  const band = (W - M.left - M.right) / Math.max(labels.length, 1);
  const svg = s("svg", { class: "daily", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "daily-title" });
  svg.append(s("title", { id: "daily-title" }, `Spend per day, stacked by ${data.group_by}`));
  for (const tick of ticks) {
    const at = y(tick).toFixed(1);
    svg.append(
      s("line", { class: "grid", x1: M.left, x2: W - M.right, y1: at, y2: at }),
      s("text", { class: "axis", x: M.left - 6, y: at, "text-anchor": "end", "dominant-baseline": "middle" }, usdShort(tick)),
    );
  }
  const every = Math.ceil(labels.length / 10);
  labels.forEach((day, index) => {
    const x0 = M.left + index * band;
    let base = 0;
    names.forEach((name, nameIndex) => {
      const micros = data.days[day]?.[name] ?? 0;
      if (micros <= 0) return;
      const rect = s("rect", {
        x: (x0 + band * 0.15).toFixed(1),
        width: (band * 0.7).toFixed(1),
        y: y(base + micros).toFixed(1),
        height: (y(base) - y(base + micros)).toFixed(1),
        fill: colour(nameIndex),
        "data-day": day,
        "data-group": name,
      });
      rect.append(s("title", null, `${day} · ${name}: ${usd(micros)}`));
      svg.append(rect);
      base += micros;
    });
    if (index % every === 0) {
      svg.append(s("text", { class: "axis", x: (x0 + band / 2).toFixed(1), y: H - 12, "text-anchor": "middle" }, day.slice(5)));
    }
  });
  return svg;
}

function legend(names: string[]): HTMLElement {
  return h(
    "figcaption",
    { class: "legend" },
    h(
      "ul",
      null,
      names.map((name, index) => {
        const swatch = h("span", { class: "swatch", "aria-hidden": "true" });
        swatch.style.background = colour(index);
        return h("li", null, swatch, name);
      }),
    ),
  );
}

function agentsChart(agents: Row[]): SVGSVGElement | HTMLElement {
  if (agents.length === 0) return h("p", { class: "empty" }, "No runs in this range.");
  const W = 800;
  const rowH = 26;
  const M = { left: 180, right: 90, top: 6 };
  const H = M.top * 2 + rowH * agents.length;
  const max = Math.max(...agents.map((row) => row.spend_micros), 1);
  const x = scale(0, max, M.left, W - M.right);
  const svg = s("svg", { class: "agents", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "agents-title" });
  svg.append(s("title", { id: "agents-title" }, "Spend of the top agents"));
  agents.forEach((row, index) => {
    const top = M.top + index * rowH;
    const name = String(row["agent"]);
    svg.append(
      s("text", { class: "axis name", x: M.left - 8, y: top + rowH / 2, "text-anchor": "end", "dominant-baseline": "middle" }, name),
      s("rect", { x: M.left, y: top + 4, width: Math.max(1, x(row.spend_micros) - M.left).toFixed(1), height: rowH - 8, fill: colour(0), "data-agent": name }),
      s("text", { class: "axis value", x: (x(row.spend_micros) + 6).toFixed(1), y: top + rowH / 2, "dominant-baseline": "middle" }, usd(row.spend_micros)),
    );
  });
  return svg;
}

function table(data: Showback, label: string): HTMLElement {
  const levels = ["info", "warn", "throttle", "stop"];
  const head = [label, "Runs", "Tokens", "Spend", "Top agents", ...levels.map((level) => `Reached ${level}`), "Overruns"];
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "report" },
      h("thead", null, h("tr", null, head.map((name) => h("th", { scope: "col" }, name)))),
      h(
        "tbody",
        null,
        data.groups.map((row) =>
          h(
            "tr",
            null,
            h("th", { scope: "row" }, String(row[data.group_by])),
            h("td", { class: "num" }, String(row.runs)),
            h("td", { class: "num" }, tokens(row.tokens)),
            h("td", { class: "num" }, usd(row.spend_micros)),
            h("td", null, row.top_agents.map((agent) => `${agent.agent} ${usd(agent.spend_micros)}`).join(", ") || "-"),
            levels.map((level) => h("td", { class: "num" }, String(row.thresholds[level] ?? 0))),
            h("td", { class: "num" }, row.overrun_runs ? `${usd(row.overrun_micros)} (${row.overrun_runs} runs)` : "-"),
          ),
        ),
      ),
    ),
  );
}
