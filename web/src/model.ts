// What the live stream says about runs (server/runcap_server/dashboard/views.py
// writes these shapes), and the store a page keeps of it.

import type { ErrorBody } from "./api.js";

export interface RunJson {
  run_id: string;
  limit_micros: number;
  labels: Record<string, string>;
  create_time_ms: number | null;
  close_time_ms: number | null;
  parent_run_id: string;
  api_key_id: string;
  user_id: string;
  team_id: string;
  enforcement_mode: string;
  thresholds: { info: number; warn: number; throttle: number };
  approval_percent: number;
  approvals: { approval_id: string; status: string; meter: string }[];
  children: number;
  blocked_calls: number;
}

export interface StateJson {
  run_id: string;
  revision: number;
  digest: string;
  status: string;
  threshold: string;
  limit_micros: number;
  committed_micros: number;
  reserved_micros: number;
  remaining_micros: number;
  overrun_micros: number;
  active_reservations: number;
  committed_tokens: number;
  reserved_tokens: number;
  blocked: boolean;
}

export interface LiveJson {
  burn_micros_per_minute: number | null;
  burn: string;
  seconds_to_exhaustion: number | null;
  exhausted_in: string;
  pending_approvals: string[];
  flags: string[];
}

export interface EventJson {
  type: string;
  time_ms: number | null;
  reservation_id: string;
  amount_micros: number;
  actual_micros: number;
  overrun_micros: number;
  late: boolean;
  threshold?: string;
  approval_id?: string;
  reason?: string;
  blocking_scope?: { kind: string; id: string };
}

/** One change of a run with the state right after it. */
export interface Change {
  revision: number;
  event: EventJson;
  state: StateJson;
}

export interface RunEntry {
  runId: string;
  run: RunJson | null;
  state: StateJson;
  live: LiveJson | null;
  /** Known changes, oldest first (the run page keeps them for its timeline). */
  changes: Change[];
  error: ErrorBody | null;
}

export interface Cursor {
  revision: number;
  digest: string;
}

/** The runs a page knows, kept current by the live stream's events. */
export class RunStore {
  readonly runs = new Map<string, RunEntry>();
  /** An error of the stream as a whole (the listing of new runs failed). */
  error: ErrorBody | null = null;

  constructor(private readonly keepChanges: number) {}

  /** Applies one event; returns the ids of the runs it changed (or "*": all). */
  apply(event: string, data: any): string[] {
    switch (event) {
      case "snapshot": {
        const state = data.state as StateJson;
        const entry = this.runs.get(state.run_id);
        if (entry) {
          entry.state = state;
          entry.live = data.live ?? entry.live;
          if (data.run) entry.run = data.run as RunJson;
        } else {
          this.runs.set(state.run_id, {
            runId: state.run_id,
            run: (data.run as RunJson) ?? null,
            state,
            live: (data.live as LiveJson) ?? null,
            changes: [],
            error: null,
          });
        }
        return [state.run_id];
      }
      case "change": {
        const entry = this.runs.get(data.run_id as string);
        if (!entry) return [];
        const change: Change = { revision: data.revision, event: data.event, state: data.state };
        if (!data.history) {
          if (change.revision <= entry.state.revision) return [];
          entry.state = change.state;
          if (data.live) entry.live = data.live as LiveJson;
        }
        this.remember(entry, change);
        return [entry.runId];
      }
      case "live": {
        const changed: string[] = [];
        for (const [runId, live] of Object.entries(data.runs as Record<string, LiveJson>)) {
          const entry = this.runs.get(runId);
          if (entry) {
            entry.live = live;
            changed.push(runId);
          }
        }
        return changed;
      }
      case "reset":
        this.runs.delete(data.run_id as string);
        return [data.run_id as string];
      case "error":
        if (data.run_id) {
          const entry = this.runs.get(data.run_id as string);
          if (entry) entry.error = data.error as ErrorBody;
          return [data.run_id as string];
        }
        this.error = data.error as ErrorBody;
        return ["*"];
      default:
        return [];
    }
  }

  private remember(entry: RunEntry, change: Change): void {
    if (this.keepChanges === 0) return;
    const changes = entry.changes;
    if (changes.length === 0 || changes[changes.length - 1]!.revision < change.revision) {
      changes.push(change);
    } else if (!changes.some((known) => known.revision === change.revision)) {
      changes.push(change);
      changes.sort((a, b) => a.revision - b.revision);
    }
    if (changes.length > this.keepChanges) changes.splice(0, changes.length - this.keepChanges);
  }

  /** Where the page's knowledge of each run ends, sent back on reconnect: of
   * the newest `limit` runs (a stream follows at most 200). */
  cursors(limit = 200): Record<string, Cursor> {
    const newest = [...this.runs.values()]
      .sort((a, b) => (b.run?.create_time_ms ?? 0) - (a.run?.create_time_ms ?? 0))
      .slice(0, limit);
    const cursors: Record<string, Cursor> = {};
    for (const entry of newest) {
      cursors[entry.runId] = { revision: entry.state.revision, digest: entry.state.digest };
    }
    return cursors;
  }
}
