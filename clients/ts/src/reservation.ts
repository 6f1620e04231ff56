/** `withReservation`: reserve, run the paid call, then commit or refund, whatever happens. */

import {
  newReservationId,
  toTokenUsage,
  type CallOptions,
  type DurationInput,
  type LlmCallInput,
  type ReserveEstimate,
  type RuncapClient,
  type TokenCount,
  type TokenUsageInput,
} from "./client.js";
import {
  ApprovalRequiredError,
  BudgetBlockedError,
  BudgetThrottledError,
  toRuncapError,
  type RuncapError,
} from "./errors.js";
import {
  Decision,
  DecisionReason,
  type BudgetDimension,
  type BudgetState,
} from "./gen/runcap/v1/budget_pb.js";
import type {
  Alternative,
  CommitResponse,
  LlmEstimate,
  RefundResponse,
  ReserveResponse,
  TokenUsage,
} from "./gen/runcap/v1/budget_service_pb.js";

/**
 * Arguments of {@link withReservation}: the run, what to hold (exactly one
 * of `amountMicros` and `llmCall`, see {@link ReserveEstimate}), and options.
 */
export type ReservationArgs = ReserveEstimate & ReservationOptions;

/** The options of {@link withReservation}. */
export interface ReservationOptions {
  /** The run to hold the estimate against. */
  runId: string;
  /** The idempotency key; a fresh one when omitted. Reserve, commit and refund retries all reuse it. */
  reservationId?: string;
  /** How long the hold lives (milliseconds, or a Duration); the run's default when omitted. */
  ttl?: DurationInput;
  /** The call meter the call counts on (for example `"tool:serp_api"`), which the run's policy may cap. */
  meter?: string;
  /** How many units of `meter` the call uses; 1 when omitted. Only with `meter`. */
  meterUnits?: TokenCount;
  /**
   * Options for the reserve, commit and refund calls (timeout, headers). The
   * signal aborts the reserve only: the hold is settled even after an abort.
   */
  callOptions?: CallOptions;
  /**
   * Called when settling the hold fails after the callback threw (the
   * callback's error is what `withReservation` rejects with, and the hold
   * expires at its ttl). Default: `process.emitWarning`.
   */
  onSettleError?: (error: RuncapError, hold: Hold) => void;
}

/**
 * A live reservation inside {@link withReservation}'s callback. When the
 * callback resolves, the hold is committed with the amount given to
 * `setActual` (or the token usage given to `setUsage`, priced by the
 * server), or with the whole held amount when neither was called, or
 * refunded after `release()`. When the callback throws, the hold is
 * refunded, unless `setActual` or `setUsage` was called (the money was
 * spent), in which case that cost is committed.
 *
 * A warning of an advisory run (`Decision.WARN`) is held like an allow:
 * `warning` is then true, and `reason` and `dimension` say what a blocking
 * run would have refused. A warning that `failedOpen` held nothing, so it is
 * not settled.
 *
 * A downgrade (`Decision.DOWNGRADE`, from a run whose policy has
 * `autoDowngrade`) is held like an allow, against a cheaper model than the
 * one asked for: `downgraded` is then true, and `provider` and `model` name
 * the model to call (`requestedModel` the one asked for).
 */
export class Hold {
  /** The run of the reservation. */
  readonly runId: string;
  /**
   * The reservation's id, as the server answered it (a downgrade may be held
   * under an id other than the one asked for): the hold is settled under it.
   */
  readonly reservationId: string;
  /** The ReserveResponse (an allow, a warning or a downgrade: see `warning` and `downgraded`). */
  readonly response: ReserveResponse;
  /** The CommitResponse, once the hold was committed. */
  commitResponse: CommitResponse | undefined;
  /** The RefundResponse, once the hold was refunded. */
  refundResponse: RefundResponse | undefined;
  #actual: bigint | undefined;
  #usage: TokenUsage | undefined;
  #release = false;
  #llmCall: LlmCallInput | undefined;

  /**
   * @internal `requested` is what the reserve asked with: its reservation id
   * (used when the response has none) and its LLM call.
   */
  constructor(
    runId: string,
    response: ReserveResponse,
    requested: { reservationId?: string | undefined; llmCall?: LlmCallInput | undefined } = {},
  ) {
    this.runId = runId;
    this.reservationId = response.reservationId || (requested.reservationId ?? "");
    this.response = response;
    this.#llmCall = requested.llmCall;
  }

  /** The amount held, in micro-USD. */
  get amountMicros(): bigint {
    return this.response.amountMicros;
  }

  /**
   * Whether the server answered `Decision.WARN`: the run is in advisory mode
   * and a blocking run would have blocked or throttled this call (see
   * `reason` and `dimension`). The amount is held all the same.
   */
  get warning(): boolean {
    return this.response.decision === Decision.WARN;
  }

  /**
   * Whether the server failed open: an advisory run's reserve answered
   * `Decision.WARN` with `DecisionReason.BACKEND_UNAVAILABLE` while the
   * ledger's storage was unreachable. Nothing was held or recorded: the call
   * may go ahead, but there is nothing to commit or refund, so
   * `withReservation` settles nothing.
   */
  get failedOpen(): boolean {
    return this.warning && this.response.reason === DecisionReason.BACKEND_UNAVAILABLE;
  }

  /**
   * Whether the server answered `Decision.DOWNGRADE`: the LLM call asked for
   * did not fit, the run's policy allows automatic downgrades, and the
   * estimate of a cheaper model that has every capability the call needs is
   * held instead. Call `model` (of `provider`), not the model asked for
   * (`requestedModel`).
   */
  get downgraded(): boolean {
    return this.response.decision === Decision.DOWNGRADE;
  }

  /**
   * The model to call: the one the server priced and held
   * (`estimate.model`; for a downgrade, the cheaper stand-in), or the model
   * of the LLM call asked for when the server gave no estimate (it failed
   * open); undefined for a hold of an amount.
   */
  get model(): string | undefined {
    return this.response.estimate?.model || this.#llmCall?.model;
  }

  /**
   * The provider of `model`: `estimate.provider` (a downgrade may pick
   * another provider's model), or that of the LLM call asked for when the
   * server gave no estimate; undefined for a hold of an amount.
   */
  get provider(): string | undefined {
    return this.response.estimate?.provider || this.#llmCall?.provider;
  }

  /** The model the LLM call asked for (for a downgrade, `response.requestedModel`); undefined for a hold of an amount. */
  get requestedModel(): string | undefined {
    return this.response.requestedModel || this.#llmCall?.model;
  }

  /**
   * The decision's id, for `client.getDecision` (the decision with the
   * inputs it was made from); `""` when the server did not say (a warning
   * that failed open records nothing).
   */
  get decisionId(): string {
    return this.response.decisionId;
  }

  /** For a downgrade, the models that could stand in for the LLM call, cheapest first; empty otherwise. */
  get alternatives(): readonly Alternative[] {
    return this.response.alternatives;
  }

  /**
   * Why the server decided as it did: `DecisionReason.WITHIN_BUDGET` for a
   * plain allow; for a warning, what a blocking run would have refused it for.
   */
  get reason(): DecisionReason {
    return this.response.reason;
  }

  /** For a warning, the limit it is about (spend, tokens, a meter, the rate limit or the in-flight cap); `UNSPECIFIED` for a plain allow. */
  get dimension(): BudgetDimension {
    return this.response.blockingDimension;
  }

  /** How the server priced the LLM call (tokens, amount, price table version); undefined for a hold of an amount. */
  get estimate(): LlmEstimate | undefined {
    return this.response.estimate;
  }

  /** The actual cost given to `setActual`, or undefined. */
  get actualMicros(): bigint | undefined {
    return this.#actual;
  }

  /** The token usage given to `setUsage`, or undefined. */
  get usage(): TokenUsage | undefined {
    return this.#usage;
  }

  /** Whether `release()` was called (and `setActual` not since). */
  get released(): boolean {
    return this.#release;
  }

  /** The run's latest known budget state: after the reserve, or after the commit or refund once settled. */
  get state(): BudgetState | undefined {
    return this.commitResponse?.state ?? this.refundResponse?.state ?? this.response.state;
  }

  /** Commit `micros` (zero or more) when the callback ends. Replaces a `setUsage`. */
  setActual(micros: bigint): void {
    if (micros < 0n) throw new RangeError(`actual cost must be zero or more, not ${micros}`);
    this.#actual = micros;
    this.#usage = undefined;
    this.#release = false;
  }

  /**
   * Commit the LLM call's actual token usage when the callback ends; the
   * server prices it at the rates it reserved with. Only for a hold of an
   * `llmCall` (the server rejects usage for an amount). Replaces a
   * `setActual`.
   *
   * ```ts
   * hold.setUsage({ inputTokens: reply.usage.prompt_tokens, outputTokens: reply.usage.completion_tokens });
   * ```
   */
  setUsage(usage: TokenUsageInput): void {
    this.#usage = toTokenUsage(usage);
    this.#actual = undefined;
    this.#release = false;
  }

  /** Refund the whole hold when the callback ends (the paid call did not happen). */
  release(): void {
    this.#actual = undefined;
    this.#usage = undefined;
    this.#release = true;
  }
}

/** The decisions `withReservation` holds and calls back for. */
const HELD_DECISIONS: ReadonlySet<Decision> = new Set([Decision.ALLOW, Decision.WARN, Decision.DOWNGRADE]);

function defaultSettleError(error: RuncapError, hold: Hold): void {
  process.emitWarning(
    `runcap: settling reservation ${JSON.stringify(hold.reservationId)} of run ` +
      `${JSON.stringify(hold.runId)} failed (${error.message}); the hold expires at its ttl`,
    { code: "RUNCAP_SETTLE_FAILED" },
  );
}

/**
 * Holds `amountMicros`, or the server's price of an `llmCall`, against the
 * run for the duration of `fn`, then settles:
 *
 * ```ts
 * const answer = await withReservation(client, { runId, amountMicros: 50_000n }, async (hold) => {
 *   const result = await callTheModel();
 *   hold.setActual(costOf(result));
 *   return result;
 * });
 *
 * const llmCall = { provider: "openai", model: "gpt-4o", inputTokens: 1200, maxOutputTokens: 500 };
 * const reply = await withReservation(client, { runId, llmCall }, async (hold) => {
 *   const reply = await callTheModel();
 *   hold.setUsage({ inputTokens: 1200, outputTokens: reply.outputTokens });
 *   return reply;
 * });
 * ```
 *
 * Rejects with {@link BudgetBlockedError} when the server blocks the
 * reservation (nothing is held and `fn` is not called), also when it has no
 * price for the LLM call's model (`error.unknownPrice`), and with its
 * subclass {@link BudgetThrottledError} when it throttles it (reserve again
 * after `error.retryAfterMs`), and with its subclass
 * {@link ApprovalRequiredError} when the call needs approval first (reserve
 * again once `error.approvalId` is approved). A warning of an advisory run calls `fn` like
 * an allow (`hold.warning`), and so does a downgrade of an LLM call
 * (`hold.downgraded`: call `hold.model`, the cheaper model held; the hold
 * is settled under the reservation id the server answered with). A block
 * of an LLM call by money lists the models that would fit in
 * `error.alternatives`. `meter` and `meterUnits` count the call on a
 * call meter. Otherwise resolves
 * with `fn`'s result once the hold is committed (see {@link Hold}), or, when
 * `fn` throws, refunds the hold and rethrows `fn`'s error. Reserve, commit and
 * refund use one reservation id, so their retries are idempotent.
 */
export async function withReservation<T>(
  client: RuncapClient,
  args: ReservationArgs,
  fn: (hold: Hold) => Promise<T> | T,
): Promise<T> {
  const { runId, callOptions } = args;
  if ((args.amountMicros === undefined) === (args.llmCall === undefined)) {
    throw new TypeError("withReservation: give exactly one of amountMicros and llmCall");
  }
  const estimate: ReserveEstimate =
    args.llmCall === undefined ? { amountMicros: args.amountMicros } : { llmCall: args.llmCall };
  const reservationId = args.reservationId ?? newReservationId();
  const response = await client.reserve(
    {
      runId,
      ...estimate,
      reservationId,
      ...(args.ttl !== undefined ? { ttl: args.ttl } : {}),
      ...(args.meter !== undefined ? { meter: args.meter } : {}),
      ...(args.meterUnits !== undefined ? { meterUnits: args.meterUnits } : {}),
    },
    callOptions,
  );
  if (response.decision === Decision.THROTTLE) throw new BudgetThrottledError(runId, response);
  if (response.decision === Decision.APPROVAL_REQUIRED) throw new ApprovalRequiredError(runId, response);
  // A block, or a decision this client does not know: nothing to go on with.
  if (!HELD_DECISIONS.has(response.decision)) throw new BudgetBlockedError(runId, response);
  const hold = new Hold(runId, response, { reservationId, llmCall: args.llmCall });
  // Settle even when the caller's signal aborted the work: an unsettled hold
  // stays reserved until its ttl.
  const { signal: _signal, ...settleOptions } = callOptions ?? {};

  const settle = async (failed: boolean): Promise<void> => {
    if (hold.failedOpen) return; // nothing was held
    const actual = hold.actualMicros;
    const usage = hold.usage;
    if (usage !== undefined) {
      hold.commitResponse = await client.commit({ runId, reservationId: hold.reservationId, usage }, settleOptions);
    } else if (actual === undefined && (failed || hold.released)) {
      hold.refundResponse = await client.refund(
        { runId, reservationId: hold.reservationId },
        settleOptions,
      );
    } else {
      hold.commitResponse = await client.commit(
        { runId, reservationId: hold.reservationId, actualMicros: actual ?? hold.amountMicros },
        settleOptions,
      );
    }
  };

  let result: T;
  try {
    result = await fn(hold);
  } catch (error) {
    try {
      await settle(true);
    } catch (settleError) {
      (args.onSettleError ?? defaultSettleError)(toRuncapError(settleError), hold);
    }
    throw error;
  }
  await settle(false);
  return result;
}
