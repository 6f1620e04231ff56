/**
 * @runcap/client: the TypeScript client of runcap, the budget authority for AI
 * agent runs. The public API is re-exported from here; the generated
 * protobuf-es code lives under ./gen and is re-exported for its types,
 * schemas and enums.
 */

export {
  DEFAULT_TARGET,
  createRuncapClient,
  newReservationId,
  toDuration,
  toLlmCall,
  toRunPolicy,
  toTokenUsage,
  type CallOptions,
  type ClearScopeLimitArgs,
  type CommitActual,
  type CommitArgs,
  type CreateRunArgs,
  type DurationInput,
  type HeadersInput,
  type LlmCallInput,
  type RateLimitInput,
  type RefundArgs,
  type ReserveArgs,
  type ReserveEstimate,
  type ResumeRunArgs,
  type RunPolicyInput,
  type RuncapClient,
  type RuncapClientOptions,
  type ScopeArgs,
  type SetScopeLimitArgs,
  type SetScopePolicyArgs,
  type SuspendRunArgs,
  type ThresholdsInput,
  type TokenCount,
  type TokenUsageInput,
} from "./client.js";
export {
  ApprovalNotFoundError,
  ApprovalRequiredError,
  ApprovalResolvedError,
  OpenRunLimitError,
  PermissionDeniedError,
  UnauthenticatedError,
  BudgetBlockedError,
  BudgetThrottledError,
  CanceledError,
  DeadlineExceededError,
  DecisionNotFoundError,
  ERROR_DOMAIN,
  ERROR_TABLE,
  IdempotencyConflictError,
  InternalError,
  InvalidArgumentError,
  ParentRunClosedError,
  ParentRunNotFoundError,
  ReservationBlockedError,
  ReservationNotFoundError,
  ReservationReleasedError,
  RevisionOutOfRangeError,
  RunAlreadyExistsError,
  RunClosedError,
  RunNotFoundError,
  RuncapError,
  SubagentLimitError,
  UnavailableError,
  errorClass,
  toRuncapError,
  type ErrorRow,
  type FieldViolation,
  type PreconditionViolation,
} from "./errors.js";
export { Hold, withReservation, type ReservationArgs, type ReservationOptions } from "./reservation.js";
export { DEFAULT_RETRY, NO_RETRY, WATCH_RECONNECT, type RetryPolicy } from "./retry.js";
export { WatchStream, watch, type WatchOptions } from "./watch.js";

export * from "./gen/runcap/v1/budget_pb.js";
export * from "./gen/runcap/v1/budget_service_pb.js";
export * from "./gen/runcap/v1/errors_pb.js";
export { Code, ConnectError } from "@connectrpc/connect";
