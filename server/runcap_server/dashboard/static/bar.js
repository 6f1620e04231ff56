// The spend-vs-limit bar: committed spend, then held spend (open
// reservations), then what remains, with the run's threshold bands marked.
import { h } from "./dom.js";
import { percent, usd } from "./format.js";
export class SpendBar {
    element;
    track;
    committed;
    held;
    label;
    ticksFor = "";
    constructor(name) {
        this.committed = h("span", { class: "seg committed" });
        this.held = h("span", { class: "seg held" });
        this.track = h("div", { class: "track", role: "meter", "aria-label": name, "aria-valuemin": 0 }, this.committed, this.held);
        this.label = h("span", { class: "bar-label" });
        this.element = h("div", { class: "spend" }, this.track, this.label);
    }
    update(state, run) {
        const limit = Math.max(state.limit_micros, 1);
        const used = state.committed_micros + state.reserved_micros;
        const committedPct = Math.min(100, (state.committed_micros * 100) / limit);
        const heldPct = Math.min(100 - committedPct, (state.reserved_micros * 100) / limit);
        this.committed.style.width = `${committedPct.toFixed(2)}%`;
        this.held.style.width = `${heldPct.toFixed(2)}%`;
        this.element.classList.toggle("over", used > state.limit_micros);
        const held = state.reserved_micros > 0 ? ` + ${usd(state.reserved_micros)} held` : "";
        const text = `${percent(used, state.limit_micros)}% · ${usd(state.committed_micros)}${held} of ${usd(state.limit_micros)}`;
        this.label.textContent = text;
        this.track.setAttribute("aria-valuemax", String(state.limit_micros));
        this.track.setAttribute("aria-valuenow", String(Math.min(used, state.limit_micros)));
        this.track.setAttribute("aria-valuetext", text);
        this.drawTicks(run);
    }
    drawTicks(run) {
        if (!run)
            return;
        const { info, warn, throttle } = run.thresholds;
        const key = `${info}/${warn}/${throttle}`;
        if (key === this.ticksFor)
            return;
        this.ticksFor = key;
        this.track.querySelectorAll(".tick").forEach((tick) => tick.remove());
        for (const [band, at] of [
            ["info", info],
            ["warn", warn],
            ["throttle", throttle],
        ]) {
            if (at <= 0)
                continue;
            const tick = h("span", { class: `tick ${band}`, title: `${band} at ${at}%` });
            tick.style.left = `${at}%`;
            this.track.append(tick);
        }
    }
}
/** A threshold band as a badge. */
export function thresholdBadge(threshold) {
    return h("span", { class: `badge threshold-${threshold}` }, threshold);
}
/** A run's flags (SUSPENDED, APPROVAL(1), BLOCKED, ...) as badges. */
export function flagBadges(flags) {
    return flags.map((flag) => {
        const kind = flag.replace(/\(.*$/, "").toLowerCase().replace(/[^a-z]+/g, "-");
        return h("span", { class: `badge flag flag-${kind}` }, flag);
    });
}
