/**
 * Typed errors for the runcap TypeScript client.
 *
 * The server reports every failure as a `google.rpc.Status` in the
 * `grpc-status-details-bin` trailer, with exactly one `google.rpc.ErrorInfo`
 * (domain `runcap.dev`, reason a `runcap.v1.ErrorReason` name without its
 * `ERROR_REASON_` prefix) and at most one detail of each other type
 * (BadRequest, ResourceInfo, PreconditionFailure, RetryInfo). Connect decodes
 * that trailer into `ConnectError.details`; {@link toRuncapError} turns it back
 * into one error class per reason. {@link ERROR_TABLE} is the single place
 * that mapping lives. A status without a runcap ErrorInfo (the transport's own
 * UNAVAILABLE, a proxy's error) maps by its code alone.
 *
 * A block decision is not a failure: `reserve()` returns it in the response.
 * Only `withReservation()` turns it into {@link BudgetBlockedError} (a
 * throttle into its subclass {@link BudgetThrottledError}, an escalation into
 * its subclass {@link ApprovalRequiredError}), which
 * deliberately does not extend {@link RuncapError}, so that code which fails
 * open on service trouble (`if (e instanceof RuncapError)`) never fails open
 * on a block.
 */

import { Code, ConnectError } from "@connectrpc/connect";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
  ResourceInfoSchema,
  RetryInfoSchema,
  type ErrorInfo,
  type ResourceInfo,
} from "./gen/google/rpc/error_details_pb.js";
import {
  BudgetDimension,
  Decision,
  DecisionReason,
  Period,
  ScopeKind,
  type BudgetState,
  type EnforcementMode,
  type ScopeRef,
} from "./gen/runcap/v1/budget_pb.js";
import type { Alternative, LlmEstimate, ReserveResponse } from "./gen/runcap/v1/budget_service_pb.js";
import { ErrorReason } from "./gen/runcap/v1/errors_pb.js";

/** The ErrorInfo domain of every error the runcap server sends. */
export const ERROR_DOMAIN = "runcap.dev";

/** One offending field of an INVALID_ARGUMENT error, from `google.rpc.BadRequest`. */
export interface FieldViolation {
  /** The field's path in the request, for example `amount_micros`. */
  readonly field: string;
  /** Why the value was rejected. */
  readonly description: string;
}

/** One failed precondition, from `google.rpc.PreconditionFailure`. */
export interface PreconditionViolation {
  /** The kind of precondition, for example `RESERVATION_BLOCKED`. */
  readonly type: string;
  /** What it is about, for example `run-1/res-1`. */
  readonly subject: string;
  /** What went wrong. */
  readonly description: string;
}

/** A failed runcap call. Every call of the client rejects with one of these. */
export class RuncapError extends Error {
  /** The gRPC status code, as a Connect `Code`. */
  readonly code: Code;
  /**
   * The runcap reason, or `ErrorReason.UNSPECIFIED` when the status carried no
   * runcap ErrorInfo (for example the transport's own UNAVAILABLE).
   */
  readonly reason: ErrorReason;
  /** The ErrorInfo reason as sent (for example `"RUN_NOT_FOUND"`), or `""`. */
  readonly reasonName: string;
  /** The ErrorInfo metadata, for example `run_id`. */
  readonly metadata: Readonly<Record<string, string>>;
  /** Every offending field, from the BadRequest detail (empty when none). */
  readonly fieldViolations: readonly FieldViolation[];
  /** Every failed precondition, from the PreconditionFailure detail (empty when none). */
  readonly preconditionViolations: readonly PreconditionViolation[];
  /** The resource concerned, from the ResourceInfo detail. */
  readonly resourceInfo: ResourceInfo | undefined;
  /** The server's suggested delay before a retry, from RetryInfo, in milliseconds. */
  readonly retryDelayMs: number | undefined;
  /** The ConnectError this error was built from. */
  override readonly cause: ConnectError;

  constructor(error: ConnectError, info?: ErrorInfo) {
    super(error.rawMessage);
    this.name = new.target.name;
    this.cause = error;
    this.code = error.code;
    this.reasonName = info?.reason ?? "";
    this.reason = reasonOf(info);
    this.metadata = { ...(info?.metadata ?? {}) };
    this.fieldViolations = error
      .findDetails(BadRequestSchema)
      .flatMap((bad) => bad.fieldViolations)
      .map((v) => ({ field: v.field, description: v.description }));
    this.preconditionViolations = error
      .findDetails(PreconditionFailureSchema)
      .flatMap((failure) => failure.violations)
      .map((v) => ({ type: v.type, subject: v.subject, description: v.description }));
    this.resourceInfo = error.findDetails(ResourceInfoSchema)[0];
    const delay = error.findDetails(RetryInfoSchema)[0]?.retryDelay;
    this.retryDelayMs =
      delay === undefined ? undefined : Number(delay.seconds) * 1000 + delay.nanos / 1e6;
  }

  /** Whether the call can be retried unchanged: nothing was decided (UNAVAILABLE). */
  get retryable(): boolean {
    return this.code === Code.Unavailable;
  }

  override toString(): string {
    const label = this.reasonName ? `${Code[this.code]} ${this.reasonName}` : Code[this.code];
    return `${this.name}: ${label}: ${this.message}`;
  }
}

/** INVALID_ARGUMENT: a field is missing, malformed or out of range; see `fieldViolations`. */
export class InvalidArgumentError extends RuncapError {
  /** The names of the offending fields. */
  get fields(): string[] {
    return this.fieldViolations.map((v) => v.field);
  }
}

/** NOT_FOUND: the run does not exist. */
export class RunNotFoundError extends RuncapError {
  /** The run that was not found. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
}

/** NOT_FOUND: the run has no reservation with this id. */
export class ReservationNotFoundError extends RuncapError {
  /** The run that was searched. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
  /** The reservation that was not found. */
  get reservationId(): string {
    return this.metadata["reservation_id"] ?? "";
  }
}

/** NOT_FOUND: `createRun` named a parent run that does not exist. */
export class ParentRunNotFoundError extends RuncapError {
  /** The run that was being created. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
  /** The parent run that was not found. */
  get parentRunId(): string {
    return this.metadata["parent_run_id"] ?? this.resourceInfo?.resourceName ?? "";
  }
}

/** NOT_FOUND: `getDecision` named a decision the server does not have (never made, or its run aged out of retention). */
export class DecisionNotFoundError extends RuncapError {
  /** The decision that was not found. */
  get decisionId(): string {
    return this.metadata["decision_id"] || (this.resourceInfo?.resourceName ?? "");
  }
}

/**
 * NOT_FOUND: `approve` or `deny` named an approval the run never requested
 * (an id not taken from a `Decision.APPROVAL_REQUIRED` answer, a watch event
 * or `run.approvals`).
 */
export class ApprovalNotFoundError extends RuncapError {
  /** The approval that was not found. */
  get approvalId(): string {
    return this.metadata["approval_id"] || (this.resourceInfo?.resourceName ?? "");
  }
}

/** ALREADY_EXISTS: a run with this id exists with different arguments. */
export class RunAlreadyExistsError extends RuncapError {
  /** The run that already exists. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
}

/**
 * ALREADY_EXISTS: the reservation id was used before with other arguments.
 * Retry only with the original arguments, or use a new reservation id.
 */
export class IdempotencyConflictError extends RuncapError {
  /** The run of the reservation. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
  /** The reservation id that was reused. */
  get reservationId(): string {
    return this.metadata["reservation_id"] ?? "";
  }
}

/** FAILED_PRECONDITION: the reservation was blocked; nothing is held to commit or refund. */
export class ReservationBlockedError extends RuncapError {}

/** FAILED_PRECONDITION: the reservation was refunded; it can no longer be committed. */
export class ReservationReleasedError extends RuncapError {}

/** FAILED_PRECONDITION: `createRun` named a parent run that is closed; a closed run takes no new subagent runs. */
export class ParentRunClosedError extends RuncapError {
  /** The run that was being created. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
  /** The closed parent run. */
  get parentRunId(): string {
    return this.metadata["parent_run_id"] || (this.preconditionViolations[0]?.subject ?? "");
  }
}

/** FAILED_PRECONDITION: `suspendRun` or `resumeRun` named a run that is closed; a closed run can no longer be suspended or resumed. */
export class RunClosedError extends RuncapError {
  /** The closed run. */
  get runId(): string {
    return this.metadata["run_id"] || (this.preconditionViolations[0]?.subject ?? "");
  }
}

/**
 * FAILED_PRECONDITION: `createRun` would give the parent run more children
 * than its policy's `maxChildren`, or nest deeper than an ancestor's
 * `maxDepth` allows; `preconditionViolations` say which.
 */
export class SubagentLimitError extends RuncapError {
  /** The run that was being created. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
  /** The parent run it was to be created under. */
  get parentRunId(): string {
    return this.metadata["parent_run_id"] || (this.preconditionViolations[0]?.subject ?? "");
  }
}

/**
 * FAILED_PRECONDITION: the approval was already resolved the other way:
 * `approve` of a denied approval, or `deny` of an approved one. A resolved
 * approval stays as it is; repeating the same call is a replay, not this
 * error.
 */
export class ApprovalResolvedError extends RuncapError {
  /** The run the approval belongs to. */
  get runId(): string {
    return this.metadata["run_id"] ?? "";
  }
  /** The approval that is already resolved. */
  get approvalId(): string {
    return this.metadata["approval_id"] || (this.preconditionViolations[0]?.subject ?? "");
  }
}

/**
 * UNAUTHENTICATED: the server needs an API key and the call carried none, or
 * one it does not know (or that was revoked). Send the metadata
 * `authorization: Bearer <key>`.
 */
export class UnauthenticatedError extends RuncapError {}

/**
 * PERMISSION_DENIED: the key's role may not make this call, or the run is
 * not one of the key's own (a run of another key and a missing run look the
 * same).
 */
export class PermissionDeniedError extends RuncapError {
  /** The id of the key that was refused. */
  get keyId(): string {
    return this.metadata["key_id"] ?? "";
  }
}

/**
 * RESOURCE_EXHAUSTED: the caller already has as many open runs as the server
 * allows one principal. Close finished runs and retry; abandoned runs are
 * closed by the server after its run TTL.
 */
export class OpenRunLimitError extends RuncapError {
  /** The most open runs one principal may have, when the server said. */
  get limit(): number | undefined {
    const value = this.metadata["limit"];
    return value !== undefined && /^\d+$/.test(value) ? Number(value) : undefined;
  }
}

/**
 * OUT_OF_RANGE: Watch cannot resume from the requested revision (the server no
 * longer retains it, the run never reached it, or the run's history up to it
 * is not the one `afterDigest` describes: see `diverged`). Watch again without
 * `afterRevision`, or with `resnapshotOnOutOfRange`, to start from a fresh snapshot.
 */
export class RevisionOutOfRangeError extends RuncapError {
  private int(key: string): bigint | undefined {
    const value = this.metadata[key];
    if (value === undefined || !/^-?\d+$/.test(value)) return undefined;
    return BigInt(value);
  }
  /** The requested resume point. */
  get afterRevision(): bigint | undefined {
    return this.int("after_revision");
  }
  /** The oldest revision the server still retains. */
  get floor(): bigint | undefined {
    return this.int("floor");
  }
  /** The run's current revision. */
  get head(): bigint | undefined {
    return this.int("head");
  }
  /**
   * True when the resume point is retained but the server's history up to it
   * is not the one the client saw (its `afterDigest` differs), for example
   * after a failover lost changes. Watch again without `afterRevision`.
   */
  get diverged(): boolean {
    return this.metadata["diverged"] === "true";
  }
}

/**
 * UNAVAILABLE: nothing was decided; the call can be retried (after
 * `retryDelayMs` when set). Covers BACKEND_UNAVAILABLE, SHUTTING_DOWN and the
 * transport's own UNAVAILABLE (no connection), which carries no ErrorInfo.
 */
export class UnavailableError extends RuncapError {}

/** INTERNAL (or UNKNOWN, DATA_LOSS): an unexpected fault. */
export class InternalError extends RuncapError {
  /** The server's trace id to quote in a bug report, or `""`. */
  get traceId(): string {
    return this.metadata["trace_id"] ?? "";
  }
}

/** DEADLINE_EXCEEDED: the call's timeout passed; the outcome is unknown, so retry with the same ids. */
export class DeadlineExceededError extends RuncapError {}

/** CANCELED: the call was aborted by the caller (its AbortSignal). */
export class CanceledError extends RuncapError {}

type ErrorClass = new (error: ConnectError, info?: ErrorInfo) => RuncapError;

/** One row of the error table: a runcap reason, its gRPC code and its error class. */
export interface ErrorRow {
  readonly reason: ErrorReason;
  readonly code: Code;
  readonly error: ErrorClass;
}

/**
 * The one table from `runcap.v1.ErrorReason` to gRPC code and error class,
 * mirroring the server's error table. Statuses without a runcap reason map by
 * code: to the class that every row with that code shares, or to
 * {@link CODE_FALLBACK}.
 */
export const ERROR_TABLE: readonly ErrorRow[] = [
  { reason: ErrorReason.INVALID_ARGUMENT, code: Code.InvalidArgument, error: InvalidArgumentError },
  { reason: ErrorReason.RUN_NOT_FOUND, code: Code.NotFound, error: RunNotFoundError },
  { reason: ErrorReason.RESERVATION_NOT_FOUND, code: Code.NotFound, error: ReservationNotFoundError },
  { reason: ErrorReason.RUN_ALREADY_EXISTS, code: Code.AlreadyExists, error: RunAlreadyExistsError },
  { reason: ErrorReason.IDEMPOTENCY_CONFLICT, code: Code.AlreadyExists, error: IdempotencyConflictError },
  { reason: ErrorReason.RESERVATION_BLOCKED, code: Code.FailedPrecondition, error: ReservationBlockedError },
  { reason: ErrorReason.RESERVATION_RELEASED, code: Code.FailedPrecondition, error: ReservationReleasedError },
  { reason: ErrorReason.REVISION_OUT_OF_RANGE, code: Code.OutOfRange, error: RevisionOutOfRangeError },
  { reason: ErrorReason.BACKEND_UNAVAILABLE, code: Code.Unavailable, error: UnavailableError },
  { reason: ErrorReason.SHUTTING_DOWN, code: Code.Unavailable, error: UnavailableError },
  { reason: ErrorReason.INTERNAL, code: Code.Internal, error: InternalError },
  { reason: ErrorReason.PARENT_RUN_NOT_FOUND, code: Code.NotFound, error: ParentRunNotFoundError },
  { reason: ErrorReason.PARENT_RUN_CLOSED, code: Code.FailedPrecondition, error: ParentRunClosedError },
  { reason: ErrorReason.RUN_CLOSED, code: Code.FailedPrecondition, error: RunClosedError },
  { reason: ErrorReason.SUBAGENT_LIMIT, code: Code.FailedPrecondition, error: SubagentLimitError },
  { reason: ErrorReason.DECISION_NOT_FOUND, code: Code.NotFound, error: DecisionNotFoundError },
  { reason: ErrorReason.APPROVAL_NOT_FOUND, code: Code.NotFound, error: ApprovalNotFoundError },
  { reason: ErrorReason.APPROVAL_RESOLVED, code: Code.FailedPrecondition, error: ApprovalResolvedError },
  { reason: ErrorReason.UNAUTHENTICATED, code: Code.Unauthenticated, error: UnauthenticatedError },
  { reason: ErrorReason.PERMISSION_DENIED, code: Code.PermissionDenied, error: PermissionDeniedError },
  { reason: ErrorReason.OPEN_RUN_LIMIT, code: Code.ResourceExhausted, error: OpenRunLimitError },
];

/** Codes no runcap reason uses, and the class a status with that code gets. */
const CODE_FALLBACK: ReadonlyMap<Code, ErrorClass> = new Map<Code, ErrorClass>([
  [Code.Unknown, InternalError],
  [Code.DataLoss, InternalError],
  [Code.DeadlineExceeded, DeadlineExceededError],
  [Code.Canceled, CanceledError],
]);

const BY_REASON: ReadonlyMap<ErrorReason, ErrorClass> = new Map(
  ERROR_TABLE.map((row) => [row.reason, row.error]),
);

const BY_CODE: ReadonlyMap<Code, ErrorClass> = (() => {
  const byCode = new Map<Code, ErrorClass>(CODE_FALLBACK);
  for (const code of new Set(ERROR_TABLE.map((row) => row.code))) {
    const classes = new Set(ERROR_TABLE.filter((row) => row.code === code).map((r) => r.error));
    if (classes.size === 1) byCode.set(code, [...classes][0] as ErrorClass);
  }
  return byCode;
})();

function reasonOf(info: ErrorInfo | undefined): ErrorReason {
  if (info === undefined || info.domain !== ERROR_DOMAIN) return ErrorReason.UNSPECIFIED;
  const value: unknown = (ErrorReason as unknown as Record<string, unknown>)[info.reason];
  return typeof value === "number" ? (value as ErrorReason) : ErrorReason.UNSPECIFIED;
}

/** The error class for a gRPC code and a runcap reason. */
export function errorClass(code: Code, reason: ErrorReason): ErrorClass {
  return BY_REASON.get(reason) ?? BY_CODE.get(code) ?? RuncapError;
}

/**
 * The typed error for anything a Connect call threw. A `RuncapError` is
 * returned as is; any other value goes through `ConnectError.from` first.
 */
export function toRuncapError(error: unknown): RuncapError {
  if (error instanceof RuncapError) return error;
  const connectError = ConnectError.from(error);
  const infos = connectError.findDetails(ErrorInfoSchema);
  // Prefer runcap's own ErrorInfo; keep a foreign one (a proxy's) for display.
  const info = infos.find((i) => i.domain === ERROR_DOMAIN) ?? infos[0];
  const Class = errorClass(connectError.code, reasonOf(info));
  return new Class(connectError, info);
}

/**
 * The server blocked a reservation made by `withReservation()`. Not a
 * `RuncapError`: the call succeeded and the answer was no. Nothing is held.
 * A throttle is the subclass {@link BudgetThrottledError}, and a call that
 * needs approval first the subclass {@link ApprovalRequiredError}, so
 * `instanceof BudgetBlockedError` is true for all three.
 */
export class BudgetBlockedError extends Error {
  /** The run of the reservation. */
  readonly runId: string;
  /** The ReserveResponse with the block decision. */
  readonly response: ReserveResponse;

  constructor(runId: string, response: ReserveResponse) {
    const reason = DecisionReason[response.reason] ?? response.reason;
    const throttled = response.decision === Decision.THROTTLE;
    const escalated = response.decision === Decision.APPROVAL_REQUIRED;
    const outcome = throttled ? "was throttled" : escalated ? "needs approval" : "was blocked";
    super(
      `reservation ${JSON.stringify(response.reservationId)} of run ${JSON.stringify(runId)} ` +
        `${outcome} (${reason}): ` +
        (throttled ? throttleDetail(response) : escalated ? approvalDetail(response) : blockDetail(runId, response)),
    );
    this.name = new.target.name;
    this.runId = runId;
    this.response = response;
  }

  /**
   * The limit that blocked: spend, the run's token ceiling, a call meter
   * (see `meter`), its rate limit or its in-flight cap;
   * `BudgetDimension.UNSPECIFIED` for a block by the run's lifecycle
   * (closed, suspended) or when the server did not say.
   */
  get dimension(): BudgetDimension {
    return this.response.blockingDimension;
  }

  /** For `BudgetDimension.METER`, the call meter at its ceiling; `""` otherwise. */
  get meter(): string {
    return this.response.blockingMeter;
  }

  /** The run's enforcement mode, which shaped the decision (`UNSPECIFIED` when the server did not say). */
  get enforcementMode(): EnforcementMode {
    return this.response.enforcementMode;
  }

  /** Why the reservation was blocked, for example `DecisionReason.INSUFFICIENT_BUDGET`. */
  get reason(): DecisionReason {
    return this.response.reason;
  }

  /** The blocked reservation's id. */
  get reservationId(): string {
    return this.response.reservationId;
  }

  /** The run's budget state at the decision. */
  get state(): BudgetState | undefined {
    return this.response.state;
  }

  /**
   * The scope whose ceiling (or closed ancestor run) blocked: the run itself,
   * an ancestor run, or the run's API key, user or team. Undefined when the
   * server did not say.
   */
  get blockingScope(): ScopeRef | undefined {
    return this.response.blockingScope;
  }

  /** The period of the ceiling that blocked (`Period.LIFETIME` for runs), or `Period.UNSPECIFIED` when the server did not say. */
  get blockingPeriod(): Period {
    return this.response.blockingPeriod;
  }

  /**
   * For a reservation of an LLM call, how the server priced it (provider,
   * model, tokens, amount and price table version); undefined for an amount.
   */
  get estimate(): LlmEstimate | undefined {
    return this.response.estimate;
  }

  /**
   * True when the block is `DecisionReason.UNKNOWN_PRICE`: the server has no
   * price for the LLM call's provider and model (a typo, an alias, or a
   * model newer than its price table), not a budget ceiling.
   */
  get unknownPrice(): boolean {
    return this.response.reason === DecisionReason.UNKNOWN_PRICE;
  }

  /** The decision's id, for `getDecision` (the decision with the inputs it was made from); `""` when the server did not say. */
  get decisionId(): string {
    return this.response.decisionId;
  }

  /**
   * For an LLM call blocked by money, the models that could stand in for it
   * (provider, model, the call's estimate on it and the output tokens that
   * prices): each has every capability the call needs (see `LlmCallInput`)
   * and fits what the blocking scope has left. Cheapest first, at most 5;
   * empty when none fits or for an amount.
   */
  get alternatives(): readonly Alternative[] {
    return this.response.alternatives;
  }

  /**
   * The escalation the decision is about: for a block by a denied approval
   * (`DecisionReason.APPROVAL_DENIED`) the one that was denied, for an
   * {@link ApprovalRequiredError} the one to approve; `""` otherwise.
   */
  get approvalId(): string {
    return this.response.approvalId;
  }

  /**
   * True when the block is `DecisionReason.APPROVAL_DENIED`: the call trips
   * one of the run's escalation triggers, and its approval (`approvalId`)
   * was denied.
   */
  get approvalDenied(): boolean {
    return this.response.reason === DecisionReason.APPROVAL_DENIED;
  }
}

/**
 * The server throttled a reservation made by `withReservation()`
 * (`Decision.THROTTLE`): not now. Nothing is held. The run is in its throttle
 * band (`DecisionReason.THROTTLED`), over its rate limit (`RATE_LIMITED`) or
 * at its cap of holds in flight (`IN_FLIGHT_LIMIT`); `dimension` says which
 * limit. Wait `retryAfterMs`, then reserve again with a new reservation id:
 * the throttled id is spent like a blocked one (a retry of it only replays
 * this answer). Without a `reservationId` each `withReservation` call makes a
 * fresh one:
 *
 * ```ts
 * for (;;) {
 *   try {
 *     return await withReservation(client, { runId, amountMicros: 50_000n }, fn);
 *   } catch (error) {
 *     if (!(error instanceof BudgetThrottledError)) throw error;
 *     await new Promise((resolve) => setTimeout(resolve, error.retryAfterMs));
 *   }
 * }
 * ```
 */
export class BudgetThrottledError extends BudgetBlockedError {
  /** How long to wait before reserving again, in milliseconds (0 when the server gave no delay, or for a replay whose delay has passed). */
  get retryAfterMs(): number {
    return durationMs(this.response.retryAfter);
  }
}

/**
 * A reservation made by `withReservation()` needs approval first
 * (`Decision.APPROVAL_REQUIRED`). Nothing is held. The call trips one of the
 * run's escalation triggers: its committed and held spend with this
 * estimate would pass the policy's `approvalPercent` of its limit
 * (`DecisionReason.SPEND_NEEDS_APPROVAL`), or its meter is not on the
 * policy's `approvedMeters` (`DecisionReason.METER_NEEDS_APPROVAL`; `meter`
 * names it). A person or a supervising agent resolves `approvalId` with
 * `client.approve` or `client.deny` (a watch shows the request and its
 * outcome); once it is approved, reserve again with a new reservation id
 * (the one answered is spent, like a blocked one). Once it is denied, such
 * calls are blocked (`DecisionReason.APPROVAL_DENIED`).
 *
 * ```ts
 * try {
 *   await withReservation(client, { runId, amountMicros: 50_000n, meter: "tool:deploy" }, fn);
 * } catch (error) {
 *   if (!(error instanceof ApprovalRequiredError)) throw error;
 *   await askAHuman(error.approvalId); // who calls client.approve(error.approvalId)
 * }
 * ```
 */
export class ApprovalRequiredError extends BudgetBlockedError {}

function durationMs(duration: { seconds: bigint; nanos: number } | undefined): number {
  return duration === undefined ? 0 : Number(duration.seconds) * 1000 + duration.nanos / 1e6;
}

const THROTTLE_CAUSES: ReadonlyMap<DecisionReason, string> = new Map([
  [DecisionReason.THROTTLED, "the run's committed spend is in its throttle band"],
  [DecisionReason.RATE_LIMITED, "the run's rate limit is used up for this window"],
  [DecisionReason.IN_FLIGHT_LIMIT, "the run has its maximum of holds in flight"],
]);

/** What a throttle message says after the reason: the cause and when to come back. */
function throttleDetail(response: ReserveResponse): string {
  const cause = THROTTLE_CAUSES.get(response.reason);
  return (
    (cause === undefined ? "" : `${cause}; `) +
    `reserve again with a new reservation id after ${durationMs(response.retryAfter)} ms; nothing is held`
  );
}

/** What an escalation's message says after the reason: the trigger, and what to approve. */
function approvalDetail(response: ReserveResponse): string {
  let trigger = "";
  if (response.reason === DecisionReason.METER_NEEDS_APPROVAL) {
    const which = response.blockingMeter ? `meter ${JSON.stringify(response.blockingMeter)}` : "the call's meter";
    trigger = `${which} is not on the run's approved meters; `;
  } else if (response.reason === DecisionReason.SPEND_NEEDS_APPROVAL) {
    trigger = "the run's spend with this call would pass its approval threshold; ";
  }
  return (
    trigger +
    `approve ${JSON.stringify(response.approvalId)}, then reserve again with a new reservation id; nothing is held`
  );
}

/** What a block message says after the reason: the unknown price, or the budget, the estimate and the blocking scope. */
function blockDetail(runId: string, response: ReserveResponse): string {
  const estimate = response.estimate;
  if (response.reason === DecisionReason.UNKNOWN_PRICE) {
    let model = "the model";
    if (estimate !== undefined) {
      model = `model ${JSON.stringify(estimate.model)} of provider ${JSON.stringify(estimate.provider)}`;
      if (estimate.priceTableVersion) model += ` (price table ${JSON.stringify(estimate.priceTableVersion)})`;
    }
    return `unknown price: the server has no price for ${model}, so runcap fails closed; nothing is held`;
  }
  if (response.reason === DecisionReason.APPROVAL_DENIED) {
    const which = response.approvalId ? `approval ${JSON.stringify(response.approvalId)}` : "its approval";
    return `the call needs ${which}, which was denied; nothing is held`;
  }
  const state = response.state;
  if (response.blockingDimension === BudgetDimension.METER) {
    const which = response.blockingMeter ? `meter ${JSON.stringify(response.blockingMeter)}` : "the call meter";
    return `${which} of the run is at its ceiling`;
  }
  if (response.blockingDimension === BudgetDimension.TOKENS) {
    let detail =
      `the call does not fit the run's token ceiling (${state?.committedTokens ?? 0n} tokens committed, ` +
      `${state?.reservedTokens ?? 0n} held)`;
    if (estimate !== undefined) {
      detail +=
        `; the ${estimate.provider}/${estimate.model} call was estimated at ` +
        `${estimate.inputTokens + estimate.effectiveMaxOutputTokens} tokens`;
    }
    return detail;
  }
  let detail = `${state?.remainingMicros ?? 0n} of ${state?.limitMicros ?? 0n} micros remain`;
  if (estimate !== undefined) {
    detail += `, the ${estimate.provider}/${estimate.model} call was estimated at ${estimate.amountMicros} micros`;
  }
  const scope = response.blockingScope;
  if (scope !== undefined && !(scope.kind === ScopeKind.RUN && scope.id === runId)) {
    const period = response.blockingPeriod;
    detail +=
      ` (blocked by ${ScopeKind[scope.kind] ?? scope.kind} ${JSON.stringify(scope.id)}` +
      (period === Period.UNSPECIFIED ? ")" : `, ${Period[period] ?? period})`);
  }
  const [cheapest] = response.alternatives;
  if (cheapest !== undefined) {
    detail +=
      `; ${response.alternatives.length} alternative model(s) fit, the cheapest ` +
      `${cheapest.provider}/${cheapest.model} at ${cheapest.amountMicros} micros`;
  }
  return detail;
}
