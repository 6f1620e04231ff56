// A run's spend over time, as inline SVG: committed spend (a step line), held
// spend above it, the threshold bands, the approval threshold and the ceiling.

import { niceTicks, scale } from "./charts.js";
import { s } from "./dom.js";
import { clock, usd, usdShort } from "./format.js";
import type { RunEntry } from "./model.js";

const W = 800;
const H = 280;
const M = { left: 64, right: 118, top: 14, bottom: 30 };
const MIN_SPAN_MS = 10_000;

interface Point {
  t: number;
  committed: number;
  used: number;
}

function points(entry: RunEntry, now: number): Point[] {
  const known: Point[] = entry.changes
    .filter((change) => change.event.time_ms !== null)
    .map((change) => ({
      t: change.event.time_ms!,
      committed: change.state.committed_micros,
      used: change.state.committed_micros + change.state.reserved_micros,
    }));
  if (known.length === 0) {
    const start = entry.run?.create_time_ms ?? now - MIN_SPAN_MS;
    known.push({ t: start, committed: entry.state.committed_micros, used: 0 });
  }
  // The current state holds until now.
  const state = entry.state;
  known.push({
    t: Math.max(now, known[known.length - 1]!.t),
    committed: state.committed_micros,
    used: state.committed_micros + state.reserved_micros,
  });
  return known;
}

function stepPath(values: Point[], x: (t: number) => number, y: (v: number) => number, key: "committed" | "used"): string {
  let path = `M${x(values[0]!.t).toFixed(1)},${y(values[0]![key]).toFixed(1)}`;
  for (const point of values.slice(1)) {
    path += `H${x(point.t).toFixed(1)}V${y(point[key]).toFixed(1)}`;
  }
  return path;
}

export function timeline(entry: RunEntry, now: number): SVGSVGElement {
  const data = points(entry, now);
  const limit = entry.state.limit_micros;
  const t0 = Math.min(data[0]!.t, now - MIN_SPAN_MS);
  const t1 = Math.max(now, data[data.length - 1]!.t);
  const top = Math.max(limit, ...data.map((point) => point.used)) * 1.08;
  const ticks = niceTicks(top);
  const yMax = Math.max(top, ticks[ticks.length - 1]!);
  const x = scale(t0, t1, M.left, W - M.right);
  const y = scale(0, yMax, H - M.bottom, M.top);
  const bottom = y(0).toFixed(1);
  const right = x(t1).toFixed(1);
  const left = x(t0).toFixed(1);
  const area = (key: "committed" | "used") =>
    `${stepPath(data, x, y, key)}V${bottom}H${x(data[0]!.t).toFixed(1)}Z`;

  const titleText = `Spend over time of run ${entry.runId}: ${usd(entry.state.committed_micros)} committed and ${usd(entry.state.reserved_micros)} held of a ${usd(limit)} ceiling`;
  const svg = s("svg", {
    class: "timeline",
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-labelledby": "timeline-title",
  });
  svg.append(s("title", { id: "timeline-title" }, titleText));

  for (const tick of ticks) {
    const at = y(tick).toFixed(1);
    svg.append(
      s("line", { class: "grid", x1: left, x2: right, y1: at, y2: at }),
      s("text", { class: "axis", x: M.left - 6, y: at, "text-anchor": "end", "dominant-baseline": "middle" }, usdShort(tick)),
    );
  }
  for (const [at, anchor] of [
    [t0, "start"],
    [(t0 + t1) / 2, "middle"],
    [t1, "end"],
  ] as const) {
    svg.append(s("text", { class: "axis", x: x(at).toFixed(1), y: H - 8, "text-anchor": anchor }, clock(at)));
  }

  svg.append(
    s("path", { class: "area-held", d: area("used") }),
    s("path", { class: "area-committed", d: area("committed") }),
    s("path", { class: "line-committed", d: stepPath(data, x, y, "committed") }),
  );

  // Threshold bands and the ceiling: a line each, labelled on the right
  // (labels pushed apart when bands are close, as 95% and 100% are).
  const thresholds = entry.run?.thresholds;
  const lines: { cls: string; value: number; text: string }[] = [];
  if (thresholds) {
    for (const [band, pct] of [
      ["info", thresholds.info],
      ["warn", thresholds.warn],
      ["throttle", thresholds.throttle],
    ] as const) {
      if (pct > 0) lines.push({ cls: band, value: (limit * pct) / 100, text: `${band} ${pct}%` });
    }
  }
  const approval = entry.run?.approval_percent ?? 0;
  if (approval > 0) {
    lines.push({ cls: "approval", value: (limit * approval) / 100, text: `approval ${approval}%` });
    lines.sort((a, b) => a.value - b.value);
  }
  lines.push({ cls: "ceiling", value: limit, text: `ceiling ${usdShort(limit)}` });
  let lastLabel = Infinity;
  for (const line of lines) {
    const at = y(line.value);
    const labelAt = Math.min(at, lastLabel - 13);
    lastLabel = labelAt;
    svg.append(
      s("line", { class: `level ${line.cls}`, x1: left, x2: right, y1: at.toFixed(1), y2: at.toFixed(1) }),
      s(
        "text",
        { class: `line-label ${line.cls}`, x: W - M.right + 6, y: labelAt.toFixed(1), "dominant-baseline": "middle" },
        line.text,
      ),
    );
  }
  return svg;
}
