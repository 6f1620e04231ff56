/** The runcap client: one typed method per unary RPC, over Connect's gRPC transport. */

import { randomUUID } from "node:crypto";
import type * as http2 from "node:http2";

import { clone, create, isMessage } from "@bufbuild/protobuf";
import { durationFromMs, type Duration } from "@bufbuild/protobuf/wkt";
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import { toRuncapError } from "./errors.js";
import {
  ApproveRequestSchema,
  BudgetService,
  CloseRunRequestSchema,
  CommitRequestSchema,
  CreateRunRequestSchema,
  DenyRequestSchema,
  GetDecisionRequestSchema,
  GetRunRequestSchema,
  GetScopeRequestSchema,
  LlmCallSchema,
  RefundRequestSchema,
  ReserveRequestSchema,
  ResumeRunRequestSchema,
  SetScopeLimitRequestSchema,
  SetScopePolicyRequestSchema,
  SuspendRunRequestSchema,
  TokenUsageSchema,
  type ApproveResponse,
  type CloseRunResponse,
  type CommitResponse,
  type CreateRunResponse,
  type DenyResponse,
  type GetDecisionResponse,
  type GetRunResponse,
  type GetScopeResponse,
  type LlmCall,
  type RefundResponse,
  type ReserveResponse,
  type ResumeRunResponse,
  type SetScopeLimitResponse,
  type SetScopePolicyResponse,
  type SuspendRunResponse,
  type TokenUsage,
} from "./gen/runcap/v1/budget_service_pb.js";
import {
  EnforcementMode,
  RateLimitSchema,
  RunPolicySchema,
  ThresholdsSchema,
  type Period,
  type RunPolicy,
  type ScopeKind,
} from "./gen/runcap/v1/budget_pb.js";
import { DEFAULT_RETRY, retryDelayMs, sleep, type RetryPolicy } from "./retry.js";

/** The address a client connects to when given none. */
export const DEFAULT_TARGET = "127.0.0.1:50051";

/** Headers as `new Headers(...)` takes them: a Headers, a record or a list of pairs. */
export type HeadersInput = ConstructorParameters<typeof Headers>[0];

/** A duration: milliseconds as a number, or a `google.protobuf.Duration`. */
export type DurationInput = number | Duration;

/** Options of {@link createRuncapClient}. */
export interface RuncapClientOptions {
  /** The server: `host:port` (plaintext, or TLS with `tls`), or an `http://` / `https://` URL. */
  target?: string;
  /** Use TLS for a `host:port` target. */
  tls?: boolean;
  /** Options for Node's `http2.connect` (CA, client certificates...). */
  nodeOptions?: http2.ClientSessionOptions | http2.SecureClientSessionOptions;
  /** Headers sent with every call, for example `{ authorization: "Bearer ..." }`. */
  headers?: HeadersInput;
  /** The deadline of each unary attempt in milliseconds; 0 for none. Watch streams have none. Default 10 s. */
  timeoutMs?: number;
  /** The retry policy of idempotent unary calls on UNAVAILABLE. Default {@link DEFAULT_RETRY}. */
  retry?: RetryPolicy;
  /**
   * HTTP/2 keepalive: PING interval on connections with open streams, in
   * milliseconds (the server accepts one every 10 s or more). Default 30 s.
   */
  pingIntervalMs?: number;
  /** Connect interceptors applied to every call. */
  interceptors?: Interceptor[];
  /** A transport to use instead of opening one; `target`, `tls`, `nodeOptions`, `pingIntervalMs` and `interceptors` are then ignored. */
  transport?: Transport;
}

/** Per-call options. */
export interface CallOptions {
  /** Aborts the call (and its retries); it then rejects with `CanceledError`. */
  signal?: AbortSignal;
  /** This call's deadline per attempt, in milliseconds, instead of the client's. */
  timeoutMs?: number;
  /** Headers for this call, on top of the client's. */
  headers?: HeadersInput;
}

/** Arguments of `createRun`. */
export interface CreateRunArgs {
  /** The run's id. Give one so that a retry finds the same run; when omitted the server generates one (and the call is not retried). */
  runId?: string;
  /** The run's ceiling in micro-USD. */
  limitMicros: bigint;
  /** Free-form labels for reporting (agent, team, feature...). */
  labels?: Record<string, string>;
  /** The default ttl of the run's reservations (milliseconds, or a Duration). */
  defaultTtl?: DurationInput;
  /**
   * Makes the run a subagent of this run: each of its reservations is also
   * held on the parent and every ancestor, so a parent's limit covers its
   * whole tree. The parent must exist and be open.
   */
  parentRunId?: string;
  /** The API key to charge as well; inherited from the parent run when omitted. */
  apiKeyId?: string;
  /** The user to charge as well; inherited from the parent run when omitted. */
  userId?: string;
  /** The team to charge as well; inherited from the parent run when omitted. */
  teamId?: string;
  /**
   * How the run is governed beyond its limit ({@link RunPolicyInput}, or a
   * `runcap.v1.RunPolicy` message): enforcement mode, threshold bands and
   * throttling, token, call-meter, rate and in-flight limits, and caps on
   * its subagents. The response's `run.policy` has every default filled in.
   * When omitted, a subagent run takes its parent's policy and a root run
   * its scopes' default policy (`setScopePolicy`: the API key's, else the
   * user's, else the team's) or the defaults. Creating a child past its parent's `maxChildren` or an
   * ancestor's `maxDepth` rejects with `SubagentLimitError`.
   *
   * ```ts
   * await client.createRun({
   *   runId: "run-1",
   *   limitMicros: 5_000_000n,
   *   policy: { enforcementMode: EnforcementMode.ADVISORY, rateLimit: { maxCalls: 30, window: 60_000 }, maxInFlight: 4 },
   * });
   * ```
   */
  policy?: RunPolicyInput | RunPolicy;
}

/**
 * The graduated response of a run: the percentages of its limit, reached by
 * committed spend, where each band starts. Each set level is above the one
 * before and below 100 (the stop level, always on); 0 turns a level off. An
 * omitted level takes the server's default (60, 80 and 95).
 */
export interface ThresholdsInput {
  /** Where `ThresholdLevel.INFO` starts (default 60). */
  infoPercent?: number;
  /** Where `ThresholdLevel.WARN` starts (default 80). */
  warnPercent?: number;
  /** Where `ThresholdLevel.THROTTLE` starts (default 95): from there on, reserve spaces calls out (`Decision.THROTTLE`). */
  throttlePercent?: number;
}

/** A cap on a run's allowed reserves per window; a reserve over it is throttled (`DecisionReason.RATE_LIMITED`). */
export interface RateLimitInput {
  /** Allowed reserves per window (positive). */
  maxCalls: TokenCount;
  /** The window (milliseconds, or a Duration): whole milliseconds, from 1 ms to 24 hours, aligned to the Unix epoch. */
  window: DurationInput;
}

/**
 * How a run is governed beyond its dollar limit, fixed when it is created.
 * Every limit is checked in the same atomic decision as the dollar ceiling;
 * an omitted field takes the server's default.
 */
export interface RunPolicyInput {
  /** How the ceilings are enforced; `EnforcementMode.HARD_GATE` by default. */
  enforcementMode?: EnforcementMode;
  /** For `EnforcementMode.SOFT_GATE`: how far past the limit estimates may go, in percent of it (0 to 100). */
  softGateMarginPercent?: number;
  /** The graduated response; the server's bands (60, 80, 95) when omitted. */
  thresholds?: ThresholdsInput;
  /** In the throttle band, the delay after the first allowed call (milliseconds, or a Duration); it doubles with each later call. Default 1 s. */
  throttleBaseDelay?: DurationInput;
  /** The longest throttle delay (milliseconds, or a Duration). Default 60 s. */
  throttleMaxDelay?: DurationInput;
  /** A ceiling on the run's LLM tokens (input plus effective maximum output as reserved, actual usage once committed). */
  maxTokens?: TokenCount;
  /** Ceilings on named call meters (`reserve({ meter })`), in units. */
  meterLimits?: Record<string, TokenCount>;
  /** A cap on allowed reserves per window. */
  rateLimit?: RateLimitInput;
  /** A cap on the run's holds in flight at once. */
  maxInFlight?: number;
  /** How many levels of subagent runs may be created below this run (default 5, at most 15). */
  maxDepth?: number;
  /** How many child runs this run may have. */
  maxChildren?: number;
  /**
   * When an LLM call does not fit the budget, hold the best alternative that
   * does (the priciest that fits, with every capability the call needs) and
   * answer `Decision.DOWNGRADE` instead of blocking; `hold.model` then names
   * the model to call.
   */
  autoDowngrade?: boolean;
  /** The models alternatives and downgrades may pick from, as `"provider/model"`; any model with a price when omitted or empty. */
  downgradeModels?: readonly string[];
  /**
   * Escalate once the run's committed and held spend with a call's estimate
   * would pass this percent of its limit (1 to 100; 0 or omitted: never):
   * the call is answered `Decision.APPROVAL_REQUIRED` (an
   * `ApprovalRequiredError` from `withReservation`) until the run's spend
   * approval is approved. A whole number (a RangeError otherwise).
   */
  approvalPercent?: number;
  /**
   * When set, a call naming a meter not on this list needs that meter's
   * approval first. Same names as `meterLimits`; at most 32.
   */
  approvedMeters?: readonly string[];
}

/**
 * Names a parent scope: arguments of `getScope` and `clearScopePolicy`, and
 * the base of `setScopeLimit`'s, `clearScopeLimit`'s and `setScopePolicy`'s.
 */
export interface ScopeArgs {
  /** What the scope is, for example `ScopeKind.TEAM`. */
  kind: ScopeKind;
  /** The id of the run, API key, user or team. */
  scopeId: string;
}

/** Arguments of `setScopeLimit`. */
export interface SetScopeLimitArgs extends ScopeArgs {
  /** The period the ceiling applies to, for example `Period.DAILY`. */
  period: Period;
  /** The ceiling in micro-USD (positive). */
  limitMicros: bigint;
}

/** Arguments of `clearScopeLimit`. */
export interface ClearScopeLimitArgs extends ScopeArgs {
  /** The period whose ceiling to remove. */
  period: Period;
}

/** Arguments of `setScopePolicy`. */
export interface SetScopePolicyArgs extends ScopeArgs {
  /**
   * The default policy of root runs charged to the scope ({@link RunPolicyInput},
   * or a `runcap.v1.RunPolicy` message); an empty one is sent as set (every
   * field the server's default).
   */
  policy: RunPolicyInput | RunPolicy;
}

/**
 * A token count: a `bigint`, or a `number` that is a whole number (as LLM
 * SDKs report usage).
 */
export type TokenCount = bigint | number;

/**
 * An LLM call to reserve for; the server prices it from its price table
 * (the input tokens at the input price plus the effective maximum output at
 * the output price). A `runcap.v1.LlmCall` message fits too.
 *
 * What the call needs from a model (`needsTools`, `needsJsonSchema`,
 * `minContextTokens`, `modalities`) decides which models can stand in for
 * it: the `alternatives` of a block, and the cheaper model a run with
 * `autoDowngrade` holds instead (`Decision.DOWNGRADE`).
 */
export interface LlmCallInput {
  /** The provider, as in the price table (`"openai"`, `"anthropic"`...). */
  provider: string;
  /** The model id, exactly as in the price table. */
  model: string;
  /** The prompt's input tokens (zero or more). */
  inputTokens: TokenCount;
  /** The call's maximum output tokens (its `max_tokens`); the server's default when omitted. */
  maxOutputTokens?: TokenCount | undefined;
  /** The call uses tool (function) calling. */
  needsTools?: boolean | undefined;
  /** The call uses JSON-schema structured output. */
  needsJsonSchema?: boolean | undefined;
  /** The context window the call needs at least, in tokens; no minimum when omitted (a stand-in always needs room for the input tokens). */
  minContextTokens?: TokenCount | undefined;
  /** Input modalities beyond text the call uses (`"image"`, `"audio"`, `"video"`). */
  modalities?: readonly string[] | undefined;
  /** The models the caller can use instead, as `"provider/model"` (a gateway's served models, say): alternatives and downgrades come only from these. Any when omitted. */
  candidateModels?: readonly string[] | undefined;
}

/**
 * An LLM call's actual usage, in disjoint token classes (each 0 when
 * omitted), to commit a reservation made with an `llmCall`; the server
 * prices it at the reservation's own rates. A `runcap.v1.TokenUsage`
 * message fits too.
 */
export interface TokenUsageInput {
  /** Input tokens billed at the input price (not read from or written to a cache). */
  inputTokens?: TokenCount;
  /** Visible output tokens, not counting reasoning tokens. */
  outputTokens?: TokenCount;
  /** Input tokens read from the prompt cache. */
  cacheReadTokens?: TokenCount;
  /** Input tokens written to the prompt cache. */
  cacheWriteTokens?: TokenCount;
  /** Reasoning (thinking) output tokens. */
  reasoningTokens?: TokenCount;
}

/** What a reservation holds: exactly one of an amount in micro-USD and an LLM call the server prices. */
export type ReserveEstimate =
  | {
      /** The estimate to hold, in micro-USD. */
      amountMicros: bigint;
      llmCall?: undefined;
    }
  | {
      /**
       * An LLM call: the server holds its price, says how it priced it in
       * `response.estimate`, and blocks a model it has no price for
       * (`DecisionReason.UNKNOWN_PRICE`).
       */
      llmCall: LlmCallInput;
      amountMicros?: undefined;
    };

/** What a commit records: exactly one of the actual cost in micro-USD and the actual token usage. */
export type CommitActual =
  | {
      /** What the call actually cost, in micro-USD (zero or more). */
      actualMicros: bigint;
      usage?: undefined;
    }
  | {
      /** The LLM call's actual token usage (for a reservation made with an `llmCall`), priced at its rates. */
      usage: TokenUsageInput;
      actualMicros?: undefined;
    };

/** Arguments of `reserve`: the run, an amount or an LLM call ({@link ReserveEstimate}), and options. */
export type ReserveArgs = ReserveEstimate & {
  /** The run to hold the estimate against. */
  runId: string;
  /** The idempotency key; a fresh one ({@link newReservationId}) when omitted, so a retry never holds twice. */
  reservationId?: string;
  /** How long the hold lives (milliseconds, or a Duration); the run's default when omitted. */
  ttl?: DurationInput;
  /**
   * The call meter the call counts on (for example `"tool:serp_api"`), which
   * the run's policy may cap (`RunPolicyInput.meterLimits`).
   */
  meter?: string;
  /** How many units of `meter` the call uses; 1 when omitted. Only with `meter` (a TypeError otherwise, before any call). */
  meterUnits?: TokenCount;
};

/** Arguments of `commit`: the reservation, and its actual cost or token usage ({@link CommitActual}). */
export type CommitArgs = CommitActual & {
  runId: string;
  reservationId: string;
};

/** Arguments of `refund`. */
export interface RefundArgs {
  runId: string;
  reservationId: string;
}

/** Arguments of `suspendRun`. */
export interface SuspendRunArgs {
  /** The run to stop (with its descendants). */
  runId: string;
}

/** Arguments of `resumeRun`. */
export interface ResumeRunArgs {
  /** The suspended run to let reserve again. */
  runId: string;
}

/**
 * A runcap client. Every method rejects with a {@link RuncapError} subclass;
 * idempotent calls are retried on UNAVAILABLE with the same ids.
 */
export interface RuncapClient {
  /** Creates a run, or returns it (`replayed`) when it exists with the same arguments. */
  createRun(args: CreateRunArgs, options?: CallOptions): Promise<CreateRunResponse>;
  /** A run's configuration and current budget state. */
  getRun(runId: string, options?: CallOptions): Promise<GetRunResponse>;
  /**
   * A reserve decision by its id (`response.decisionId`, `hold.decisionId`,
   * `BudgetBlockedError.decisionId`), with the inputs it was made from: the
   * amount asked for and held, every scope checked, what objected, the LLM
   * estimate, and where the reservation is now. Decisions are kept as long
   * as their run; one the server does not have rejects with
   * `DecisionNotFoundError`. A read, so retried on UNAVAILABLE.
   */
  getDecision(decisionId: string, options?: CallOptions): Promise<GetDecisionResponse>;
  /**
   * Asks to hold an estimate: `amountMicros`, or the server's price of an
   * `llmCall` (exactly one; otherwise it rejects with a TypeError before any
   * call). A block is not an error: check `response.decision`
   * (`Decision.ALLOW` or `Decision.BLOCK`; with a run policy also
   * `Decision.WARN`, held on an advisory run that a blocking one would have
   * refused, and `Decision.THROTTLE`, nothing held: reserve again, with a
   * new reservation id, after `response.retryAfter`); for an LLM call,
   * `response.estimate` says how it was priced, and a model the server has
   * no price for is blocked with `DecisionReason.UNKNOWN_PRICE`. A block of
   * an LLM call by money lists the `response.alternatives` that would fit;
   * a run with `autoDowngrade` answers `Decision.DOWNGRADE` instead, holding
   * the estimate of a cheaper model (`response.estimate.model`;
   * `response.requestedModel` is the one asked for) under
   * `response.reservationId`: call that model, and commit with that id.
   * `response.decisionId` names the decision for `getDecision`. A call
   * that trips one of the run's escalation triggers (`approvalPercent`,
   * `approvedMeters`) is answered `Decision.APPROVAL_REQUIRED`: nothing is
   * held, and `response.approvalId` names the approval to `approve` before
   * reserving again with a new reservation id.
   *
   * ```ts
   * await client.reserve({ runId, llmCall: { provider: "openai", model: "gpt-4o", inputTokens: 1200, maxOutputTokens: 500 } });
   * ```
   */
  reserve(args: ReserveArgs, options?: CallOptions): Promise<ReserveResponse>;
  /**
   * Records a reservation's actual cost and releases the rest of its hold:
   * `actualMicros`, or for a reservation of an `llmCall` the token `usage`,
   * which the server prices at the reservation's own rates (exactly one;
   * otherwise it rejects with a TypeError before any call).
   */
  commit(args: CommitArgs, options?: CallOptions): Promise<CommitResponse>;
  /** Releases a reservation's whole hold. */
  refund(args: RefundArgs, options?: CallOptions): Promise<RefundResponse>;
  /** Closes a run to new reservations; holds already made still settle. */
  closeRun(runId: string, options?: CallOptions): Promise<CloseRunResponse>;
  /**
   * The kill switch: stops a run at once. Every later reserve on the run, or
   * on any of its descendants, is blocked with `DecisionReason.SUSPENDED`
   * until `resumeRun`; holds already made still settle, and a watch sees an
   * `EventType.SUSPENDED` change. Suspending a suspended run changes nothing
   * (`replayed`), so the call is retried on UNAVAILABLE. A closed run cannot
   * be suspended: the call rejects with `RunClosedError`.
   *
   * ```ts
   * const { state } = await client.suspendRun({ runId: "run-42" }); // state.status === RunStatus.SUSPENDED
   * ```
   */
  suspendRun(args: SuspendRunArgs, options?: CallOptions): Promise<SuspendRunResponse>;
  /**
   * Lets a suspended run reserve again (a watch sees an `EventType.RESUMED`
   * change). Resuming a run that is not suspended changes nothing
   * (`replayed`), so the call is retried on UNAVAILABLE. A closed run cannot
   * be resumed: the call rejects with `RunClosedError`.
   */
  resumeRun(args: ResumeRunArgs, options?: CallOptions): Promise<ResumeRunResponse>;
  /**
   * Approves a pending escalation (`response.approvalId` of a reserve,
   * `ApprovalRequiredError.approvalId`, a watch event's `approvalId` or
   * `run.approvals`): calls that trip its trigger are decided as usual from
   * now on, on every replica, and a watch sees it. Resolves with the
   * approval and the run's budget state; approving an approved one changes
   * nothing (`replayed`), so the call is retried on UNAVAILABLE. An approval
   * the run never requested rejects with `ApprovalNotFoundError`, and one
   * that was denied with `ApprovalResolvedError`.
   *
   * ```ts
   * const { approval } = await client.approve(error.approvalId); // approval.status === ApprovalStatus.APPROVED
   * ```
   */
  approve(approvalId: string, options?: CallOptions): Promise<ApproveResponse>;
  /**
   * Denies a pending escalation: calls that trip its trigger are blocked
   * from now on (`DecisionReason.APPROVAL_DENIED`, with the `approvalId` on
   * the `BudgetBlockedError`), and a watch sees it. Denying a denied one
   * changes nothing (`replayed`), so the call is retried on UNAVAILABLE. An
   * approval the run never requested rejects with `ApprovalNotFoundError`,
   * and one that was approved with `ApprovalResolvedError`.
   */
  deny(approvalId: string, options?: CallOptions): Promise<DenyResponse>;
  /**
   * Sets a parent scope's ceiling for one period (API keys, users and teams);
   * it applies from the next reservation on. Resolves with the scope after
   * the change. Idempotent, so retried on UNAVAILABLE.
   *
   * ```ts
   * await client.setScopeLimit({ kind: ScopeKind.TEAM, scopeId: "team-7", period: Period.DAILY, limitMicros: 50_000_000n });
   * ```
   */
  setScopeLimit(args: SetScopeLimitArgs, options?: CallOptions): Promise<SetScopeLimitResponse>;
  /** Removes a parent scope's ceiling for one period (its spend is still tracked). Resolves with the scope after the change. */
  clearScopeLimit(args: ClearScopeLimitArgs, options?: CallOptions): Promise<SetScopeLimitResponse>;
  /**
   * Sets a parent scope's default run policy: a root run created without a
   * `policy` gets its API key's, else its user's, else its team's (else the
   * server's defaults); a subagent run still takes its parent's. It applies
   * to runs created afterwards: a run's policy never changes. Resolves with
   * the scope after the change (`scope.defaultPolicy`). Idempotent, so
   * retried on UNAVAILABLE. Rejects with RangeError, before any call, for a
   * policy `toRunPolicy` refuses.
   *
   * ```ts
   * await client.setScopePolicy({ kind: ScopeKind.TEAM, scopeId: "team-7", policy: { enforcementMode: EnforcementMode.ADVISORY } });
   * ```
   */
  setScopePolicy(args: SetScopePolicyArgs, options?: CallOptions): Promise<SetScopePolicyResponse>;
  /** Removes a parent scope's default run policy. Resolves with the scope after the change. */
  clearScopePolicy(args: ScopeArgs, options?: CallOptions): Promise<SetScopePolicyResponse>;
  /**
   * A parent scope's ceilings, its usage in the current window of each
   * period (lifetime, daily, monthly, in that order) and its `defaultPolicy`
   * (undefined when it has none). A scope nobody has charged or limited
   * reads as zeros with no limits.
   */
  getScope(args: ScopeArgs, options?: CallOptions): Promise<GetScopeResponse>;
  /** The generated Connect client underneath, for calls the wrapper does not cover. */
  readonly raw: Client<typeof BudgetService>;
  /** The headers sent with every call. */
  readonly headers: Headers;
  /** Closes the HTTP/2 connection the client opened (open calls fail). Not needed for a `transport` passed in. */
  close(): void;
}

/** A fresh client-side reservation id (a UUID without dashes), so that retries are idempotent. */
export function newReservationId(): string {
  return randomUUID().replaceAll("-", "");
}

function tokens(field: string, value: TokenCount | undefined): bigint {
  if (value === undefined) return 0n;
  if (typeof value === "bigint") return value;
  if (!Number.isSafeInteger(value)) throw new RangeError(`${field} must be a whole number of tokens, not ${value}`);
  return BigInt(value);
}

/** The `runcap.v1.LlmCall` message of an LLM call; throws RangeError for a token count that is not a whole number. */
export function toLlmCall(call: LlmCallInput): LlmCall {
  return create(LlmCallSchema, {
    provider: call.provider,
    model: call.model,
    inputTokens: tokens("inputTokens", call.inputTokens),
    maxOutputTokens: call.maxOutputTokens === undefined ? undefined : tokens("maxOutputTokens", call.maxOutputTokens),
    needsTools: call.needsTools ?? false,
    needsJsonSchema: call.needsJsonSchema ?? false,
    minContextTokens: count("minContextTokens", call.minContextTokens),
    modalities: [...(call.modalities ?? [])],
    candidateModels: [...(call.candidateModels ?? [])],
  });
}

/** The `runcap.v1.TokenUsage` message of a token usage; throws RangeError for a token count that is not a whole number. */
export function toTokenUsage(usage: TokenUsageInput): TokenUsage {
  return create(TokenUsageSchema, {
    inputTokens: tokens("inputTokens", usage.inputTokens),
    outputTokens: tokens("outputTokens", usage.outputTokens),
    cacheReadTokens: tokens("cacheReadTokens", usage.cacheReadTokens),
    cacheWriteTokens: tokens("cacheWriteTokens", usage.cacheWriteTokens),
    reasoningTokens: tokens("reasoningTokens", usage.reasoningTokens),
  });
}

/** The ReserveRequest oneof of an estimate; throws TypeError unless exactly one of `amountMicros` and `llmCall` is given. */
function estimateOf(args: { amountMicros?: bigint | undefined; llmCall?: LlmCallInput | undefined }) {
  if ((args.amountMicros === undefined) === (args.llmCall === undefined)) {
    throw new TypeError("reserve: give exactly one of amountMicros and llmCall");
  }
  return args.llmCall !== undefined
    ? { case: "llmCall" as const, value: toLlmCall(args.llmCall) }
    : { case: "amountMicros" as const, value: args.amountMicros as bigint };
}

/** The meter fields of a ReserveRequest; throws TypeError for `meterUnits` without a `meter`. */
function meterOf(args: { meter?: string | undefined; meterUnits?: TokenCount | undefined }): {
  meter: string;
  meterUnits: bigint | undefined;
} {
  if (args.meterUnits !== undefined && !args.meter) {
    throw new TypeError("reserve: meterUnits needs a meter");
  }
  return {
    meter: args.meter ?? "",
    meterUnits: args.meterUnits === undefined ? undefined : tokens("meterUnits", args.meterUnits),
  };
}

function count(field: string, value: TokenCount | undefined): bigint | undefined {
  return value === undefined ? undefined : tokens(field, value);
}

/**
 * The `runcap.v1.RunPolicy` message of a policy (a copy when it is one);
 * throws RangeError for a count or `approvalPercent` that is not a whole
 * number, or a duration that is not finite.
 */
export function toRunPolicy(policy: RunPolicyInput | RunPolicy): RunPolicy {
  if (isMessage(policy, RunPolicySchema)) return clone(RunPolicySchema, policy);
  const { thresholds, rateLimit } = policy;
  return create(RunPolicySchema, {
    enforcementMode: policy.enforcementMode ?? EnforcementMode.UNSPECIFIED,
    softGateMarginPercent: policy.softGateMarginPercent ?? 0,
    thresholds:
      thresholds === undefined
        ? undefined
        : create(ThresholdsSchema, {
            infoPercent: thresholds.infoPercent ?? 60,
            warnPercent: thresholds.warnPercent ?? 80,
            throttlePercent: thresholds.throttlePercent ?? 95,
          }),
    throttleBaseDelay: toDuration(policy.throttleBaseDelay),
    throttleMaxDelay: toDuration(policy.throttleMaxDelay),
    maxTokens: count("maxTokens", policy.maxTokens),
    meterLimits: Object.fromEntries(
      Object.entries(policy.meterLimits ?? {}).map(([meter, limit]) => [meter, tokens(`meterLimits.${meter}`, limit)]),
    ),
    rateLimit:
      rateLimit === undefined
        ? undefined
        : create(RateLimitSchema, {
            maxCalls: tokens("rateLimit.maxCalls", rateLimit.maxCalls),
            window: toDuration(rateLimit.window),
          }),
    maxInFlight: policy.maxInFlight,
    maxDepth: policy.maxDepth,
    maxChildren: policy.maxChildren,
    autoDowngrade: policy.autoDowngrade ?? false,
    downgradeModels: [...(policy.downgradeModels ?? [])],
    approvalPercent: percent("approvalPercent", policy.approvalPercent),
    approvedMeters: [...(policy.approvedMeters ?? [])],
  });
}

/** A percentage field: 0 when omitted; throws RangeError for one that is not a whole number. */
function percent(field: string, value: number | undefined): number {
  if (value === undefined) return 0;
  if (!Number.isSafeInteger(value)) throw new RangeError(`${field} must be a whole number, not ${value}`);
  return value;
}

/** The CommitRequest oneof of an actual; throws TypeError unless exactly one of `actualMicros` and `usage` is given. */
function actualOf(args: { actualMicros?: bigint | undefined; usage?: TokenUsageInput | undefined }) {
  if ((args.actualMicros === undefined) === (args.usage === undefined)) {
    throw new TypeError("commit: give exactly one of actualMicros and usage");
  }
  return args.usage !== undefined
    ? { case: "usage" as const, value: toTokenUsage(args.usage) }
    : { case: "actualMicros" as const, value: args.actualMicros as bigint };
}

/** A `google.protobuf.Duration` from milliseconds or a Duration; undefined stays undefined. */
export function toDuration(value: DurationInput | undefined): Duration | undefined {
  if (value === undefined || typeof value !== "number") return value;
  if (!Number.isFinite(value)) throw new RangeError(`not a finite duration: ${value} ms`);
  return durationFromMs(value);
}

function baseUrl(target: string, tls: boolean): string {
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(target)) return target;
  return `${tls ? "https" : "http"}://${target}`;
}

function mergeHeaders(...all: (HeadersInput | undefined)[]): Headers {
  const merged = new Headers();
  for (const headers of all) {
    if (headers === undefined) continue;
    new Headers(headers).forEach((value, key) => merged.set(key, value));
  }
  return merged;
}

/**
 * Connects to a runcap server. Nothing is sent until the first call.
 *
 * ```ts
 * const client = createRuncapClient({ target: "127.0.0.1:50051" });
 * const { run } = await client.createRun({ runId: "run-1", limitMicros: 5_000_000n });
 * ```
 */
export function createRuncapClient(options: RuncapClientOptions = {}): RuncapClient {
  const {
    target = DEFAULT_TARGET,
    tls = false,
    timeoutMs = 10_000,
    retry = DEFAULT_RETRY,
    pingIntervalMs = 30_000,
  } = options;
  let sessionManager: Http2SessionManager | undefined;
  let transport = options.transport;
  if (transport === undefined) {
    const url = baseUrl(target, tls);
    sessionManager = new Http2SessionManager(url, { pingIntervalMs }, options.nodeOptions);
    transport = createGrpcTransport({
      baseUrl: url,
      sessionManager,
      interceptors: options.interceptors ?? [],
    });
  }
  const raw = createClient(BudgetService, transport);
  const headers = mergeHeaders(options.headers);

  /** One unary call with the client's defaults, typed errors and (when idempotent) retries. */
  async function call<Res>(
    invoke: (opts: { signal?: AbortSignal; timeoutMs?: number; headers: Headers }) => Promise<Res>,
    idempotent: boolean,
    callOptions: CallOptions = {},
  ): Promise<Res> {
    const { signal } = callOptions;
    const perAttempt = callOptions.timeoutMs ?? timeoutMs;
    const callHeaders = mergeHeaders(headers, callOptions.headers);
    for (let attempt = 1; ; attempt++) {
      try {
        return await invoke({
          ...(signal ? { signal } : {}),
          ...(perAttempt > 0 ? { timeoutMs: perAttempt } : {}),
          headers: callHeaders,
        });
      } catch (thrown) {
        const error = toRuncapError(thrown);
        const delay = idempotent && !signal?.aborted ? retryDelayMs(retry, attempt, error) : undefined;
        if (delay === undefined) throw error;
        await sleep(delay, signal);
      }
    }
  }

  return {
    raw,
    headers,
    createRun(args, opts) {
      const request = create(CreateRunRequestSchema, {
        runId: args.runId ?? "",
        limitMicros: args.limitMicros,
        labels: { ...(args.labels ?? {}) },
        defaultTtl: toDuration(args.defaultTtl),
        parentRunId: args.parentRunId ?? "",
        apiKeyId: args.apiKeyId ?? "",
        userId: args.userId ?? "",
        teamId: args.teamId ?? "",
        policy: args.policy === undefined ? undefined : toRunPolicy(args.policy),
      });
      return call((o) => raw.createRun(request, o), Boolean(args.runId), opts);
    },
    getRun(runId, opts) {
      const request = create(GetRunRequestSchema, { runId });
      return call((o) => raw.getRun(request, o), true, opts);
    },
    getDecision(decisionId, opts) {
      const request = create(GetDecisionRequestSchema, { decisionId });
      return call((o) => raw.getDecision(request, o), true, opts);
    },
    async reserve(args, opts) {
      const request = create(ReserveRequestSchema, {
        runId: args.runId,
        reservationId: args.reservationId ?? newReservationId(),
        estimate: estimateOf(args),
        ttl: toDuration(args.ttl),
        ...meterOf(args),
      });
      return call((o) => raw.reserve(request, o), true, opts);
    },
    async commit(args, opts) {
      const request = create(CommitRequestSchema, {
        runId: args.runId,
        reservationId: args.reservationId,
        actual: actualOf(args),
      });
      return call((o) => raw.commit(request, o), true, opts);
    },
    refund(args, opts) {
      const request = create(RefundRequestSchema, {
        runId: args.runId,
        reservationId: args.reservationId,
      });
      return call((o) => raw.refund(request, o), true, opts);
    },
    closeRun(runId, opts) {
      const request = create(CloseRunRequestSchema, { runId });
      return call((o) => raw.closeRun(request, o), true, opts);
    },
    suspendRun(args, opts) {
      const request = create(SuspendRunRequestSchema, { runId: args.runId });
      return call((o) => raw.suspendRun(request, o), true, opts);
    },
    resumeRun(args, opts) {
      const request = create(ResumeRunRequestSchema, { runId: args.runId });
      return call((o) => raw.resumeRun(request, o), true, opts);
    },
    approve(approvalId, opts) {
      const request = create(ApproveRequestSchema, { approvalId });
      return call((o) => raw.approve(request, o), true, opts);
    },
    deny(approvalId, opts) {
      const request = create(DenyRequestSchema, { approvalId });
      return call((o) => raw.deny(request, o), true, opts);
    },
    setScopeLimit(args, opts) {
      const request = create(SetScopeLimitRequestSchema, {
        scope: { kind: args.kind, id: args.scopeId },
        period: args.period,
        ceiling: { case: "limitMicros", value: args.limitMicros },
      });
      return call((o) => raw.setScopeLimit(request, o), true, opts);
    },
    clearScopeLimit(args, opts) {
      const request = create(SetScopeLimitRequestSchema, {
        scope: { kind: args.kind, id: args.scopeId },
        period: args.period,
        ceiling: { case: "clear", value: true },
      });
      return call((o) => raw.setScopeLimit(request, o), true, opts);
    },
    async setScopePolicy(args, opts) {
      const request = create(SetScopePolicyRequestSchema, {
        scope: { kind: args.kind, id: args.scopeId },
        default: { case: "policy", value: toRunPolicy(args.policy) },
      });
      return call((o) => raw.setScopePolicy(request, o), true, opts);
    },
    clearScopePolicy(args, opts) {
      const request = create(SetScopePolicyRequestSchema, {
        scope: { kind: args.kind, id: args.scopeId },
        default: { case: "clear", value: true },
      });
      return call((o) => raw.setScopePolicy(request, o), true, opts);
    },
    getScope(args, opts) {
      const request = create(GetScopeRequestSchema, { scope: { kind: args.kind, id: args.scopeId } });
      return call((o) => raw.getScope(request, o), true, opts);
    },
    close() {
      sessionManager?.abort();
    },
  };
}
