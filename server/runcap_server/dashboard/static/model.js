// What the live stream says about runs (server/runcap_server/dashboard/views.py
// writes these shapes), and the store a page keeps of it.
/** The runs a page knows, kept current by the live stream's events. */
export class RunStore {
    keepChanges;
    runs = new Map();
    /** An error of the stream as a whole (the listing of new runs failed). */
    error = null;
    constructor(keepChanges) {
        this.keepChanges = keepChanges;
    }
    /** Applies one event; returns the ids of the runs it changed (or "*": all). */
    apply(event, data) {
        switch (event) {
            case "snapshot": {
                const state = data.state;
                const entry = this.runs.get(state.run_id);
                if (entry) {
                    entry.state = state;
                    entry.live = data.live ?? entry.live;
                    if (data.run)
                        entry.run = data.run;
                }
                else {
                    this.runs.set(state.run_id, {
                        runId: state.run_id,
                        run: data.run ?? null,
                        state,
                        live: data.live ?? null,
                        changes: [],
                        error: null,
                    });
                }
                return [state.run_id];
            }
            case "change": {
                const entry = this.runs.get(data.run_id);
                if (!entry)
                    return [];
                const change = { revision: data.revision, event: data.event, state: data.state };
                if (!data.history) {
                    if (change.revision <= entry.state.revision)
                        return [];
                    entry.state = change.state;
                    if (data.live)
                        entry.live = data.live;
                }
                this.remember(entry, change);
                return [entry.runId];
            }
            case "live": {
                const changed = [];
                for (const [runId, live] of Object.entries(data.runs)) {
                    const entry = this.runs.get(runId);
                    if (entry) {
                        entry.live = live;
                        changed.push(runId);
                    }
                }
                return changed;
            }
            case "reset":
                this.runs.delete(data.run_id);
                return [data.run_id];
            case "error":
                if (data.run_id) {
                    const entry = this.runs.get(data.run_id);
                    if (entry)
                        entry.error = data.error;
                    return [data.run_id];
                }
                this.error = data.error;
                return ["*"];
            default:
                return [];
        }
    }
    remember(entry, change) {
        if (this.keepChanges === 0)
            return;
        const changes = entry.changes;
        if (changes.length === 0 || changes[changes.length - 1].revision < change.revision) {
            changes.push(change);
        }
        else if (!changes.some((known) => known.revision === change.revision)) {
            changes.push(change);
            changes.sort((a, b) => a.revision - b.revision);
        }
        if (changes.length > this.keepChanges)
            changes.splice(0, changes.length - this.keepChanges);
    }
    /** Where the page's knowledge of each run ends, sent back on reconnect: of
     * the newest `limit` runs (a stream follows at most 200). */
    cursors(limit = 200) {
        const newest = [...this.runs.values()]
            .sort((a, b) => (b.run?.create_time_ms ?? 0) - (a.run?.create_time_ms ?? 0))
            .slice(0, limit);
        const cursors = {};
        for (const entry of newest) {
            cursors[entry.runId] = { revision: entry.state.revision, digest: entry.state.digest };
        }
        return cursors;
    }
}
