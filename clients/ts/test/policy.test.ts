/**
 * Run policies: the `policy` createRun sends, the call meter of a reserve,
 * what withReservation makes of the WARN and THROTTLE decisions and of a
 * block on a token or meter ceiling, and the SUBAGENT_LIMIT error, over an
 * in-memory Connect transport that records every request (no server).
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";

import {
  BudgetBlockedError,
  BudgetDimension,
  BudgetService,
  BudgetThrottledError,
  Decision,
  DecisionReason,
  ERROR_TABLE,
  EnforcementMode,
  ErrorReason,
  ParentRunClosedError,
  ReserveResponseSchema,
  RunPolicySchema,
  RuncapError,
  SubagentLimitError,
  createRuncapClient,
  errorClass,
  toRunPolicy,
  toRuncapError,
  withReservation,
  type CommitRequest,
  type CreateRunRequest,
  type RefundRequest,
  type ReserveRequest,
  type RunPolicyInput,
} from "../src/index.js";
import { ErrorInfoSchema, PreconditionFailureSchema } from "../src/gen/google/rpc/error_details_pb.js";

type Answer = (request: ReserveRequest) => MessageInitShape<typeof ReserveResponseSchema>;

/** An advisory run's answer to a call over its meter's ceiling: held anyway. */
const warn: Answer = (request) => ({
  decision: Decision.WARN,
  reason: DecisionReason.INSUFFICIENT_BUDGET,
  reservationId: request.reservationId,
  amountMicros: request.estimate.case === "amountMicros" ? request.estimate.value : 0n,
  blockingDimension: BudgetDimension.METER,
  blockingMeter: request.meter,
  enforcementMode: EnforcementMode.ADVISORY,
});

/** An advisory run's answer while the storage is down: nothing held. */
const failOpen: Answer = (request) => ({
  decision: Decision.WARN,
  reason: DecisionReason.BACKEND_UNAVAILABLE,
  reservationId: request.reservationId,
  enforcementMode: EnforcementMode.ADVISORY,
});

/** A rate-limited call: nothing held, come back in 1.5 s. */
const throttle: Answer = (request) => ({
  decision: Decision.THROTTLE,
  reason: DecisionReason.RATE_LIMITED,
  reservationId: request.reservationId,
  blockingDimension: BudgetDimension.RATE,
  retryAfter: durationFromMs(1500),
  enforcementMode: EnforcementMode.HARD_GATE,
});

const blockOnMeter: Answer = (request) => ({
  decision: Decision.BLOCK,
  reason: DecisionReason.INSUFFICIENT_BUDGET,
  reservationId: request.reservationId,
  blockingDimension: BudgetDimension.METER,
  blockingMeter: request.meter,
  state: { runId: request.runId, limitMicros: 1000n, remainingMicros: 1000n },
});

/** A client over a transport that records every request; reserve answers with the queued answers, then an allow. */
function recordingClient(answers: Answer[] = []) {
  const seen = {
    createRun: [] as CreateRunRequest[],
    reserve: [] as ReserveRequest[],
    commit: [] as CommitRequest[],
    refund: [] as RefundRequest[],
  };
  const transport = createRouterTransport(({ service }) => {
    service(BudgetService, {
      createRun(request) {
        seen.createRun.push(request);
        return { run: { runId: request.runId, policy: request.policy } };
      },
      reserve(request) {
        seen.reserve.push(request);
        const answer = answers.shift();
        if (answer !== undefined) return answer(request);
        const amountMicros = request.estimate.case === "amountMicros" ? request.estimate.value : 0n;
        return {
          decision: Decision.ALLOW,
          reason: DecisionReason.WITHIN_BUDGET,
          reservationId: request.reservationId,
          amountMicros,
        };
      },
      commit(request) {
        seen.commit.push(request);
        return { actualMicros: request.actual.case === "actualMicros" ? request.actual.value : 0n };
      },
      refund(request) {
        seen.refund.push(request);
        return {};
      },
    });
  });
  return { client: createRuncapClient({ transport }), seen };
}

const FULL: RunPolicyInput = {
  enforcementMode: EnforcementMode.SOFT_GATE,
  softGateMarginPercent: 10,
  thresholds: { infoPercent: 50, warnPercent: 0, throttlePercent: 90 },
  throttleBaseDelay: 250,
  throttleMaxDelay: durationFromMs(30_000),
  maxTokens: 100_000,
  meterLimits: { "tool:serp_api": 50, "tool:browse": 5n },
  rateLimit: { maxCalls: 30, window: 60_000 },
  maxInFlight: 4,
  maxDepth: 2,
  maxChildren: 0,
};

const FULL_PROTO = create(RunPolicySchema, {
  enforcementMode: EnforcementMode.SOFT_GATE,
  softGateMarginPercent: 10,
  thresholds: { infoPercent: 50, warnPercent: 0, throttlePercent: 90 },
  throttleBaseDelay: { seconds: 0n, nanos: 250_000_000 },
  throttleMaxDelay: { seconds: 30n, nanos: 0 },
  maxTokens: 100_000n,
  meterLimits: { "tool:serp_api": 50n, "tool:browse": 5n },
  rateLimit: { maxCalls: 30n, window: { seconds: 60n, nanos: 0 } },
  maxInFlight: 4,
  maxDepth: 2,
  maxChildren: 0,
});

describe("run policies", () => {
  test("toRunPolicy sets every field, and leaves omitted ones to the server", () => {
    assert.deepEqual(toRunPolicy(FULL), FULL_PROTO);
    const empty = toRunPolicy({});
    assert.deepEqual(empty, create(RunPolicySchema));
    assert.equal(empty.maxChildren, undefined);
    assert.equal(empty.thresholds, undefined);
    // Omitted threshold levels are the server's bands, not "off".
    assert.deepEqual(
      [toRunPolicy({ thresholds: { throttlePercent: 90 } }).thresholds].map((t) => [
        t?.infoPercent,
        t?.warnPercent,
        t?.throttlePercent,
      ]),
      [[60, 80, 90]],
    );
    assert.throws(() => toRunPolicy({ maxTokens: 1.5 }), RangeError);
  });

  test("a RunPolicy message is accepted and copied", () => {
    const message = create(RunPolicySchema, { maxInFlight: 2 });
    const copy = toRunPolicy(message);
    message.maxInFlight = 9;
    assert.equal(copy.maxInFlight, 2);
  });

  test("createRun sends the policy", async () => {
    const { client, seen } = recordingClient();
    const created = await client.createRun({ runId: "run-1", limitMicros: 5n, policy: FULL, teamId: "team-7" });
    assert.deepEqual(created.run?.policy, FULL_PROTO);
    await client.createRun({ runId: "run-2", limitMicros: 5n, policy: create(RunPolicySchema, { maxDepth: 1 }) });
    await client.createRun({ runId: "run-3", limitMicros: 5n });
    const [first, second, third] = seen.createRun;
    assert.deepEqual(first?.policy, FULL_PROTO);
    assert.equal(first?.teamId, "team-7");
    assert.equal(second?.policy?.maxDepth, 1);
    assert.equal(third?.policy, undefined);
  });
});

describe("call meters", () => {
  test("reserve and withReservation send the meter and its units", async () => {
    const { client, seen } = recordingClient();
    await client.reserve({ runId: "run-1", amountMicros: 40n, meter: "tool:serp_api", meterUnits: 3 });
    await withReservation(client, { runId: "run-1", amountMicros: 40n, meter: "tool:browse" }, () => undefined);
    await client.reserve({ runId: "run-1", amountMicros: 40n });
    const [once, held, plain] = seen.reserve;
    assert.deepEqual([once?.meter, once?.meterUnits], ["tool:serp_api", 3n]);
    assert.deepEqual([held?.meter, held?.meterUnits], ["tool:browse", undefined]);
    assert.deepEqual([plain?.meter, plain?.meterUnits], ["", undefined]);
  });

  test("meterUnits without a meter is a TypeError before any call", async () => {
    const { client, seen } = recordingClient();
    await assert.rejects(client.reserve({ runId: "run-1", amountMicros: 40n, meterUnits: 2 }), TypeError);
    await assert.rejects(
      withReservation(client, { runId: "run-1", amountMicros: 40n, meterUnits: 2 }, () => undefined),
      TypeError,
    );
    assert.equal(seen.reserve.length, 0);
  });
});

describe("warnings and throttles", () => {
  test("a warning is held, says so, and is committed", async () => {
    const { client, seen } = recordingClient([warn]);
    let called = false;
    await withReservation(client, { runId: "run-1", amountMicros: 40n, meter: "tool:serp_api" }, (hold) => {
      called = true;
      assert.equal(hold.warning, true);
      assert.equal(hold.failedOpen, false);
      assert.equal(hold.reason, DecisionReason.INSUFFICIENT_BUDGET);
      assert.equal(hold.dimension, BudgetDimension.METER);
      assert.equal(hold.response.blockingMeter, "tool:serp_api");
      hold.setActual(30n);
    });
    assert.ok(called);
    assert.equal(seen.commit.length, 1);
    assert.equal(seen.commit[0]?.reservationId, seen.reserve[0]?.reservationId);
    assert.deepEqual(seen.commit[0]?.actual, { case: "actualMicros", value: 30n });
    // A plain allow is no warning.
    await withReservation(client, { runId: "run-1", amountMicros: 40n }, (hold) => {
      assert.equal(hold.warning, false);
      assert.equal(hold.reason, DecisionReason.WITHIN_BUDGET);
      assert.equal(hold.dimension, BudgetDimension.UNSPECIFIED);
    });
  });

  test("a warning that failed open runs the callback and settles nothing", async () => {
    const { client, seen } = recordingClient([failOpen, failOpen]);
    const result = await withReservation(client, { runId: "run-1", amountMicros: 40n }, (hold) => {
      assert.equal(hold.warning, true);
      assert.equal(hold.failedOpen, true);
      hold.setActual(30n);
      return "went ahead";
    });
    assert.equal(result, "went ahead");
    await assert.rejects(
      withReservation(client, { runId: "run-1", amountMicros: 40n }, () => {
        throw new Error("the call failed");
      }),
      /the call failed/,
    );
    assert.deepEqual([seen.commit.length, seen.refund.length], [0, 0]);
  });

  test("a throttle rejects with BudgetThrottledError and its retryAfterMs", async () => {
    const { client, seen } = recordingClient([throttle]);
    let called = false;
    const error = await withReservation(client, { runId: "run-1", amountMicros: 40n }, () => {
      called = true;
    }).then(
      () => assert.fail("a throttled reservation must reject"),
      (thrown: unknown) => thrown,
    );
    assert.equal(called, false);
    assert.ok(error instanceof BudgetThrottledError);
    assert.ok(error instanceof BudgetBlockedError);
    assert.ok(!(error instanceof RuncapError));
    assert.equal(error.name, "BudgetThrottledError");
    assert.equal(error.retryAfterMs, 1500);
    assert.equal(error.dimension, BudgetDimension.RATE);
    assert.equal(error.reason, DecisionReason.RATE_LIMITED);
    assert.equal(error.enforcementMode, EnforcementMode.HARD_GATE);
    assert.equal(error.reservationId, seen.reserve[0]?.reservationId);
    assert.match(error.message, /was throttled \(RATE_LIMITED\)/);
    assert.match(error.message, /rate limit is used up/);
    assert.match(error.message, /with a new reservation id after 1500 ms/);
    assert.deepEqual([seen.commit.length, seen.refund.length], [0, 0]);
    // The next reservation gets a new id.
    await withReservation(client, { runId: "run-1", amountMicros: 40n }, (hold) => {
      assert.notEqual(hold.reservationId, error.reservationId);
    });
  });

  test("throttle messages name the cause; no delay is zero", () => {
    for (const [reason, cause] of [
      [DecisionReason.THROTTLED, /throttle band/],
      [DecisionReason.RATE_LIMITED, /rate limit/],
      [DecisionReason.IN_FLIGHT_LIMIT, /holds in flight/],
    ] as const) {
      const response = create(ReserveResponseSchema, {
        decision: Decision.THROTTLE,
        reason,
        retryAfter: durationFromMs(250),
      });
      const error = new BudgetThrottledError("run-1", response);
      assert.match(error.message, cause);
      assert.match(error.message, /after 250 ms/);
      assert.equal(error.retryAfterMs, 250);
    }
    const bare = new BudgetThrottledError("run-1", create(ReserveResponseSchema, { decision: Decision.THROTTLE }));
    assert.equal(bare.retryAfterMs, 0);
  });

  test("a block names its dimension and meter", async () => {
    const { client } = recordingClient([blockOnMeter]);
    const error = await withReservation(
      client,
      { runId: "run-1", amountMicros: 40n, meter: "tool:serp_api", meterUnits: 3 },
      () => assert.fail("a blocked reservation must not call back"),
    ).then(
      () => assert.fail("a blocked reservation must reject"),
      (thrown: unknown) => thrown,
    );
    assert.ok(error instanceof BudgetBlockedError);
    assert.ok(!(error instanceof BudgetThrottledError));
    assert.equal(error.name, "BudgetBlockedError");
    assert.deepEqual([error.dimension, error.meter], [BudgetDimension.METER, "tool:serp_api"]);
    assert.match(error.message, /meter "tool:serp_api" of the run is at its ceiling/);
    assert.doesNotMatch(error.message, /micros remain/);

    const tokens = new BudgetBlockedError(
      "run-1",
      create(ReserveResponseSchema, {
        decision: Decision.BLOCK,
        reason: DecisionReason.INSUFFICIENT_BUDGET,
        blockingDimension: BudgetDimension.TOKENS,
        state: { committedTokens: 900n, reservedTokens: 50n },
        estimate: { provider: "openai", model: "gpt-4o", inputTokens: 100n, effectiveMaxOutputTokens: 20n },
      }),
    );
    assert.match(tokens.message, /token ceiling \(900 tokens committed, 50 held\)/);
    assert.match(tokens.message, /estimated at 120 tokens/);
    assert.doesNotMatch(tokens.message, /micros remain/);
    assert.equal(tokens.meter, "");
  });

  test("a decision the client does not know is not held", async () => {
    const { client, seen } = recordingClient([(request) => ({ reservationId: request.reservationId })]);
    await assert.rejects(
      withReservation(client, { runId: "run-1", amountMicros: 40n }, () => assert.fail("must not call back")),
      (error: unknown) => error instanceof BudgetBlockedError && !(error instanceof BudgetThrottledError),
    );
    assert.deepEqual([seen.commit.length, seen.refund.length], [0, 0]);
  });
});

describe("the error table", () => {
  test("every ErrorReason has exactly one row", () => {
    const reasons = Object.values(ErrorReason).filter(
      (value): value is ErrorReason => typeof value === "number" && value !== ErrorReason.UNSPECIFIED,
    );
    for (const reason of reasons) {
      const rows = ERROR_TABLE.filter((row) => row.reason === reason);
      assert.equal(rows.length, 1, `ERROR_TABLE rows of ${ErrorReason[reason]}`);
    }
    assert.equal(ERROR_TABLE.length, reasons.length);
  });

  test("SUBAGENT_LIMIT is SubagentLimitError", () => {
    const rows = ERROR_TABLE.filter((row) => row.reason === ErrorReason.SUBAGENT_LIMIT);
    assert.deepEqual(rows, [
      { reason: ErrorReason.SUBAGENT_LIMIT, code: Code.FailedPrecondition, error: SubagentLimitError },
    ]);
    assert.equal(errorClass(Code.FailedPrecondition, ErrorReason.SUBAGENT_LIMIT), SubagentLimitError);
    const error = toRuncapError(
      new ConnectError("too many children", Code.FailedPrecondition, undefined, [
        { desc: ErrorInfoSchema, value: { domain: "runcap.dev", reason: "SUBAGENT_LIMIT", metadata: { run_id: "child" } } },
        {
          desc: PreconditionFailureSchema,
          value: { violations: [{ type: "SUBAGENT_LIMIT", subject: "root", description: "2 children" }] },
        },
      ]),
    );
    assert.ok(error instanceof SubagentLimitError);
    assert.ok(!(error instanceof ParentRunClosedError));
    assert.deepEqual([error.runId, error.parentRunId, error.reason], ["child", "root", ErrorReason.SUBAGENT_LIMIT]);
    assert.equal(error.retryable, false);
  });
});
