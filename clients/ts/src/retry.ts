/** Jittered exponential back-off, shared by unary retries and Watch reconnects. */

import { UnavailableError, type RuncapError } from "./errors.js";

/**
 * How to retry UNAVAILABLE. The n-th retry waits a random time between half
 * and all of `min(maxBackoffMs, initialBackoffMs * multiplier ** (n - 1))`, or
 * the server's RetryInfo delay when that is longer (capped at `maxBackoffMs`).
 */
export interface RetryPolicy {
  /** Attempts in all, the first included; 1 disables retries. For Watch, consecutive failed (re)connects. */
  readonly maxAttempts: number;
  /** The ceiling of the first wait, in milliseconds. */
  readonly initialBackoffMs: number;
  /** The ceiling of any wait, in milliseconds. */
  readonly maxBackoffMs: number;
  /** How much the ceiling grows per retry. */
  readonly multiplier: number;
}

/** The default policy of idempotent unary calls: 4 attempts, 100 ms doubling up to 5 s. */
export const DEFAULT_RETRY: RetryPolicy = Object.freeze({
  maxAttempts: 4,
  initialBackoffMs: 100,
  maxBackoffMs: 5_000,
  multiplier: 2,
});

/** A policy that never retries. */
export const NO_RETRY: RetryPolicy = Object.freeze({ ...DEFAULT_RETRY, maxAttempts: 1 });

/**
 * The default reconnect policy of Watch: up to 10 consecutive failed connects
 * (about 20 seconds of back-off) before the error reaches the caller.
 */
export const WATCH_RECONNECT: RetryPolicy = Object.freeze({ ...DEFAULT_RETRY, maxAttempts: 10 });

/** The jittered wait before retry number `retry` (1-based), in milliseconds. */
export function backoffMs(policy: RetryPolicy, retry: number): number {
  const ceiling = Math.min(
    policy.maxBackoffMs,
    policy.initialBackoffMs * policy.multiplier ** (retry - 1),
  );
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/**
 * How long to wait before retrying after failed attempt `attempt` (1-based),
 * or undefined when `error` is final or the attempts are spent.
 */
export function retryDelayMs(
  policy: RetryPolicy,
  attempt: number,
  error: RuncapError,
): number | undefined {
  if (!(error instanceof UnavailableError) || attempt >= policy.maxAttempts) return undefined;
  let wait = backoffMs(policy, attempt);
  if (error.retryDelayMs !== undefined) {
    wait = Math.max(wait, Math.min(error.retryDelayMs, policy.maxBackoffMs));
  }
  return wait;
}

/** Resolves after `ms`, or early (without rejecting) when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve();
      return;
    }
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}
