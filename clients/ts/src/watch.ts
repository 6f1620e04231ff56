/** `watch`: a run's budget changes as an async iterator that resumes across disconnects. */

import { create } from "@bufbuild/protobuf";

import type { HeadersInput, RuncapClient } from "./client.js";
import { RevisionOutOfRangeError, toRuncapError, type RuncapError } from "./errors.js";
import {
  WatchRequestSchema,
  type WatchRequest,
  type WatchResponse,
} from "./gen/runcap/v1/budget_service_pb.js";
import { WATCH_RECONNECT, backoffMs, retryDelayMs, sleep, type RetryPolicy } from "./retry.js";

/** Options of {@link watch}. */
export interface WatchOptions {
  /**
   * Start with every change after this revision instead of a snapshot (for
   * example the `lastRevision` of an earlier stream). `0n` replays the run's
   * whole retained history.
   */
  afterRevision?: bigint;
  /**
   * The digest of the state at `afterRevision` (`BudgetState.digest` of the
   * message that brought the earlier stream there, for example its
   * `lastDigest`). The server then checks that its history up to that
   * revision is still the one seen, and fails with OUT_OF_RANGE
   * ({@link RevisionOutOfRangeError} with `diverged` true) if not. Ignored
   * without `afterRevision`.
   */
  afterDigest?: string;
  /** Stops the stream: iteration then ends quietly. */
  signal?: AbortSignal;
  /**
   * Reconnect from the last revision seen after UNAVAILABLE or after the
   * server ends the stream with a final progress message. Default true.
   */
  resume?: boolean;
  /**
   * When the resume point is no longer retained (OUT_OF_RANGE), start over
   * with a fresh snapshot, which the caller must treat as a reset, instead of
   * throwing {@link RevisionOutOfRangeError}. Default false.
   */
  resnapshotOnOutOfRange?: boolean;
  /** Back-off between reconnects and how many consecutive failures to allow. Default {@link WATCH_RECONNECT}. */
  reconnect?: RetryPolicy;
  /** Headers for the stream, on top of the client's. */
  headers?: HeadersInput;
}

/**
 * The resume logic: remembers the last revision delivered, builds each
 * (re)connect request, filters out what was already delivered, and decides
 * after each disconnect whether and when to reconnect.
 */
class WatchCursor {
  lastRevision: bigint | undefined;
  /**
   * The digest of the history up to `lastRevision`, sent back on every resume
   * so the server can tell when that history is no longer its own ("" when
   * unknown, for example after a progress-only advance).
   */
  lastDigest: string;
  connects = 0;
  #failures = 0;
  #final = false;

  constructor(
    readonly runId: string,
    afterRevision: bigint | undefined,
    afterDigest: string | undefined,
    private readonly resume: boolean,
    private readonly resnapshot: boolean,
    private readonly policy: RetryPolicy,
  ) {
    this.lastRevision = afterRevision;
    this.lastDigest = afterRevision !== undefined ? (afterDigest ?? "") : "";
  }

  /** The request for the next (re)connect. */
  request(): WatchRequest {
    this.#final = false;
    this.connects++;
    return create(WatchRequestSchema, {
      runId: this.runId,
      ...(this.lastRevision !== undefined
        ? { afterRevision: this.lastRevision, afterDigest: this.lastDigest }
        : {}),
    });
  }

  /** Records `message`; true when it should reach the caller. */
  accept(message: WatchResponse): boolean {
    const kind = message.kind;
    const isFinal = kind.case === "progress" && kind.value.final;
    if (!isFinal) this.#failures = 0;
    const last = this.lastRevision;
    if (kind.case === "event") {
      if (last !== undefined && message.revision <= last) return false;
    } else if (kind.case === "progress") {
      if (isFinal) {
        this.#final = true;
        if (this.resume) return false;
      }
      if (last !== undefined && message.revision < last) return false;
    }
    if (last === undefined || message.revision > last) {
      this.lastRevision = message.revision;
      if (kind.case === "event") this.lastDigest = kind.value.state?.digest ?? "";
      else if (kind.case === "snapshot") this.lastDigest = kind.value.digest;
      // A progress message carries no state, so the digest at its revision is unknown.
      else this.lastDigest = "";
    }
    return true;
  }

  /** The wait before reconnecting after `error`, or undefined when it must reach the caller. */
  onError(error: RuncapError): number | undefined {
    if (error instanceof RevisionOutOfRangeError && this.resnapshot && this.lastRevision !== undefined) {
      // Start over from a fresh snapshot, which the caller sees next.
      this.lastRevision = undefined;
      this.lastDigest = "";
      return 0;
    }
    if (!this.resume) return undefined;
    this.#failures++;
    return retryDelayMs(this.policy, this.#failures, error);
  }

  /**
   * The wait before reconnecting after the server ended the stream, or
   * undefined when the stream is over (it ended without a final progress
   * message, or resuming is off).
   */
  onEnd(): number | undefined {
    if (!(this.#final && this.resume)) return undefined;
    // The server is draining: reconnect at once, as another replica may take
    // the stream; back off if streams keep ending without progress.
    this.#failures++;
    return this.#failures === 1 ? 0 : backoffMs(this.policy, this.#failures - 1);
  }
}

/**
 * A Watch stream: an async iterable of `WatchResponse` messages (a snapshot,
 * then events with revisions increasing by one, and progress heartbeats) that
 * reconnects on its own. Iterate it once. Leaving the loop (`break`, `return`,
 * an exception) or aborting the signal cancels the call.
 */
export class WatchStream implements AsyncIterableIterator<WatchResponse> {
  readonly #client: RuncapClient;
  readonly #cursor: WatchCursor;
  readonly #options: WatchOptions;
  readonly #controller = new AbortController();
  readonly #messages: AsyncGenerator<WatchResponse, void, undefined>;

  /** Prefer {@link watch}. */
  constructor(client: RuncapClient, runId: string, options: WatchOptions = {}) {
    this.#client = client;
    this.#cursor = new WatchCursor(
      runId,
      options.afterRevision,
      options.afterDigest,
      options.resume ?? true,
      options.resnapshotOnOutOfRange ?? false,
      options.reconnect ?? WATCH_RECONNECT,
    );
    this.#options = options;
    this.#messages = this.#run();
  }

  /** The resume point: the revision of the last message delivered (undefined before the first). */
  get lastRevision(): bigint | undefined {
    return this.#cursor.lastRevision;
  }

  /**
   * The digest of the state at `lastRevision` ("" when unknown): pass it as
   * `afterDigest` with `afterRevision: lastRevision` to resume in a later stream.
   */
  get lastDigest(): string {
    return this.#cursor.lastDigest;
  }

  /** How many times the stream has reconnected so far. */
  get reconnects(): number {
    return Math.max(0, this.#cursor.connects - 1);
  }

  /** Cancels the stream; a pending `next()` resolves as done. */
  close(): void {
    this.#controller.abort();
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  next(): Promise<IteratorResult<WatchResponse, void>> {
    return this.#messages.next();
  }

  async return(): Promise<IteratorResult<WatchResponse, void>> {
    this.close();
    return this.#messages.return(undefined);
  }

  async *#run(): AsyncGenerator<WatchResponse, void, undefined> {
    const cursor = this.#cursor;
    const signal = this.#controller.signal;
    const userSignal = this.#options.signal;
    const onAbort = (): void => this.close();
    if (userSignal?.aborted) return;
    userSignal?.addEventListener("abort", onAbort, { once: true });
    const headers = new Headers(this.#client.headers);
    new Headers(this.#options.headers).forEach((value, key) => headers.set(key, value));
    try {
      while (!signal.aborted) {
        let delay: number | undefined;
        try {
          for await (const message of this.#client.raw.watch(cursor.request(), { signal, headers })) {
            if (cursor.accept(message)) yield message;
          }
          delay = cursor.onEnd();
          if (delay === undefined) return;
        } catch (thrown) {
          if (signal.aborted) return;
          const error = toRuncapError(thrown);
          delay = cursor.onError(error);
          if (delay === undefined) throw error;
        }
        if (delay > 0) await sleep(delay, signal);
      }
    } finally {
      userSignal?.removeEventListener("abort", onAbort);
      this.#controller.abort();
    }
  }
}

/**
 * Streams a run's budget state:
 *
 * ```ts
 * for await (const message of watch(client, runId, { signal })) {
 *   if (message.kind.case === "event") console.log(message.revision, message.kind.value.state);
 * }
 * ```
 *
 * Without `afterRevision` the stream starts with a snapshot; with it, with
 * every change after that revision. A disconnect (UNAVAILABLE, or the server
 * ending the stream with a final progress message because it shuts down)
 * reconnects from the last revision seen, sending the digest of the state
 * there so that a server whose history changed under the stream (for example
 * after a failover lost writes) answers OUT_OF_RANGE instead of leaving a
 * silent gap. Reconnects use jittered exponential back-off, and no event is
 * delivered twice or skipped; the final progress message itself is not
 * delivered. After `reconnect.maxAttempts` consecutive failures the last
 * error is thrown. A resume point the server no longer retains, or whose
 * history diverged, throws {@link RevisionOutOfRangeError}, or, with
 * `resnapshotOnOutOfRange`, restarts with a fresh snapshot. The stream ends
 * when the server ends it otherwise, or when `signal` aborts.
 */
export function watch(client: RuncapClient, runId: string, options: WatchOptions = {}): WatchStream {
  return new WatchStream(client, runId, options);
}
