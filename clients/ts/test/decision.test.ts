/**
 * Decisions: the capabilities an LLM call sends, the downgrade settings of a
 * run policy, what withReservation makes of a DOWNGRADE decision (called
 * back, settled under the id the server answered with), the alternatives
 * and decision id of a block, and getDecision with its DECISION_NOT_FOUND
 * error, over an in-memory Connect transport that records every request (no
 * server).
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";

import {
  AlternativeSchema,
  BudgetBlockedError,
  BudgetDimension,
  BudgetService,
  BudgetThrottledError,
  Decision,
  DecisionNotFoundError,
  DecisionReason,
  ERROR_TABLE,
  ErrorReason,
  GetDecisionResponseSchema,
  LlmCallSchema,
  ReservationStatus,
  ReserveResponseSchema,
  RunNotFoundError,
  RunPolicySchema,
  RuncapError,
  createRuncapClient,
  errorClass,
  toLlmCall,
  toRunPolicy,
  toRuncapError,
  withReservation,
  type CommitRequest,
  type CreateRunRequest,
  type GetDecisionRequest,
  type GetDecisionResponse,
  type LlmCallInput,
  type RefundRequest,
  type ReserveRequest,
} from "../src/index.js";
import { ErrorInfoSchema, ResourceInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";

type Answer = (request: ReserveRequest) => MessageInitShape<typeof ReserveResponseSchema>;

/** An LLM call that needs every capability there is. */
const CAPABLE: LlmCallInput = {
  provider: "openai",
  model: "gpt-4o",
  inputTokens: 1200,
  maxOutputTokens: 500,
  needsTools: true,
  needsJsonSchema: true,
  minContextTokens: 32_000,
  modalities: ["image", "audio"],
};

const CAPABLE_PROTO = create(LlmCallSchema, {
  provider: "openai",
  model: "gpt-4o",
  inputTokens: 1200n,
  maxOutputTokens: 500n,
  needsTools: true,
  needsJsonSchema: true,
  minContextTokens: 32_000n,
  modalities: ["image", "audio"],
});

const MINI = create(AlternativeSchema, {
  provider: "openai",
  model: "gpt-4o-mini",
  amountMicros: 900n,
  effectiveMaxOutputTokens: 500n,
});
const HAIKU = create(AlternativeSchema, {
  provider: "anthropic",
  model: "claude-haiku",
  amountMicros: 1400n,
  effectiveMaxOutputTokens: 500n,
});

/** The id a downgrade is held under: not the one the client asked with. */
const DOWNGRADE_SUFFIX = ":downgrade";

/** A run with autoDowngrade: gpt-4o does not fit, gpt-4o-mini is held instead. */
const downgrade: Answer = (request) => ({
  decision: Decision.DOWNGRADE,
  reason: DecisionReason.INSUFFICIENT_BUDGET,
  reservationId: request.reservationId + DOWNGRADE_SUFFIX,
  amountMicros: MINI.amountMicros,
  estimate: { provider: MINI.provider, model: MINI.model, amountMicros: MINI.amountMicros },
  decisionId: "dec-downgrade",
  alternatives: [MINI, HAIKU],
  requestedModel: request.estimate.case === "llmCall" ? request.estimate.value.model : "",
});

/** gpt-4o blocked by money, with two cheaper models that would fit. */
const blockWithAlternatives: Answer = (request) => ({
  decision: Decision.BLOCK,
  reason: DecisionReason.INSUFFICIENT_BUDGET,
  reservationId: request.reservationId,
  blockingDimension: BudgetDimension.SPEND,
  state: { runId: request.runId, limitMicros: 10_000n, remainingMicros: 1500n },
  estimate: { provider: "openai", model: "gpt-4o", amountMicros: 6400n },
  decisionId: "dec-block",
  alternatives: [MINI, HAIKU],
});

/** A failed-open warning: nothing held, no estimate, no decision id. */
const failOpen: Answer = (request) => ({
  decision: Decision.WARN,
  reason: DecisionReason.BACKEND_UNAVAILABLE,
  reservationId: request.reservationId,
});

function decisionNotFound(decisionId: string, metadata = true): ConnectError {
  return new ConnectError(`no decision ${JSON.stringify(decisionId)}`, Code.NotFound, undefined, [
    {
      desc: ErrorInfoSchema,
      value: {
        domain: "runcap.dev",
        reason: "DECISION_NOT_FOUND",
        metadata: metadata ? { decision_id: decisionId } : {},
      },
    },
    { desc: ResourceInfoSchema, value: { resourceType: "runcap.v1.Decision", resourceName: decisionId } },
  ]);
}

/**
 * A client over a transport that records every request; reserve answers with
 * the queued answers, then an allow; getDecision fails `unavailable` times,
 * then answers the decisions it knows and DECISION_NOT_FOUND for others.
 */
function recordingClient(answers: Answer[] = []) {
  const seen = {
    createRun: [] as CreateRunRequest[],
    reserve: [] as ReserveRequest[],
    commit: [] as CommitRequest[],
    refund: [] as RefundRequest[],
    getDecision: [] as GetDecisionRequest[],
  };
  const state = { unavailable: 0, decisions: new Map<string, GetDecisionResponse>() };
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
        const llmCall = request.estimate.case === "llmCall" ? request.estimate.value : undefined;
        return {
          decision: Decision.ALLOW,
          reason: DecisionReason.WITHIN_BUDGET,
          reservationId: request.reservationId,
          decisionId: "dec-allow",
          ...(llmCall === undefined
            ? { amountMicros: request.estimate.case === "amountMicros" ? request.estimate.value : 0n }
            : {
                amountMicros: 6400n,
                estimate: { provider: llmCall.provider, model: llmCall.model, amountMicros: 6400n },
              }),
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
      getDecision(request) {
        seen.getDecision.push(request);
        if (state.unavailable > 0) {
          state.unavailable--;
          throw new ConnectError("connection reset", Code.Unavailable);
        }
        const known = state.decisions.get(request.decisionId);
        if (known === undefined) throw decisionNotFound(request.decisionId);
        return known;
      },
    });
  });
  const client = createRuncapClient({
    transport,
    retry: { maxAttempts: 4, initialBackoffMs: 1, maxBackoffMs: 5, multiplier: 2 },
  });
  return { client, seen, state };
}

describe("what an LLM call needs from a model", () => {
  test("toLlmCall sends every capability, and nothing special by default", () => {
    assert.deepEqual(toLlmCall(CAPABLE), CAPABLE_PROTO);
    const plain = toLlmCall({ provider: "openai", model: "gpt-4o", inputTokens: 1 });
    assert.deepEqual(plain, create(LlmCallSchema, { provider: "openai", model: "gpt-4o", inputTokens: 1n }));
    assert.equal(plain.minContextTokens, undefined);
    assert.throws(() => toLlmCall({ ...CAPABLE, minContextTokens: 1.5 }), RangeError);
  });

  test("reserve and withReservation send it", async () => {
    const { client, seen } = recordingClient();
    await client.reserve({ runId: "run-1", llmCall: CAPABLE });
    await withReservation(client, { runId: "run-1", llmCall: CAPABLE }, () => undefined);
    assert.equal(seen.reserve.length, 2);
    for (const request of seen.reserve) {
      assert.deepEqual(request.estimate, { case: "llmCall", value: CAPABLE_PROTO });
    }
  });

  test("a run policy sends its downgrade settings", async () => {
    const policy = { autoDowngrade: true, downgradeModels: ["openai/gpt-4o-mini"] };
    const want = create(RunPolicySchema, { autoDowngrade: true, downgradeModels: ["openai/gpt-4o-mini"] });
    assert.deepEqual(toRunPolicy(policy), want);
    assert.deepEqual(toRunPolicy({}), create(RunPolicySchema));
    const { client, seen } = recordingClient();
    const created = await client.createRun({ runId: "run-1", limitMicros: 5n, policy });
    policy.downgradeModels[0] = "openai/gpt-4o"; // the request has its own copy
    assert.deepEqual(seen.createRun[0]?.policy, want);
    assert.equal(created.run?.policy?.autoDowngrade, true);
  });
});

describe("downgrades", () => {
  test("a downgrade calls back, names the model to call, and commits under the answered id", async () => {
    const { client, seen } = recordingClient([downgrade]);
    let called = false;
    await withReservation(client, { runId: "run-1", llmCall: CAPABLE }, (hold) => {
      called = true;
      assert.equal(hold.downgraded, true);
      assert.equal(hold.warning, false);
      assert.equal(hold.failedOpen, false);
      assert.deepEqual([hold.provider, hold.model, hold.requestedModel], ["openai", "gpt-4o-mini", "gpt-4o"]);
      assert.equal(hold.amountMicros, 900n);
      assert.equal(hold.decisionId, "dec-downgrade");
      assert.deepEqual(hold.alternatives, [MINI, HAIKU]);
      hold.setUsage({ inputTokens: 1200, outputTokens: 200 });
    });
    assert.ok(called);
    const [reserve] = seen.reserve;
    assert.equal(seen.commit.length, 1);
    assert.equal(seen.commit[0]?.reservationId, `${reserve?.reservationId}${DOWNGRADE_SUFFIX}`);
    assert.equal(seen.commit[0]?.actual.case, "usage");
  });

  test("a failing callback refunds a downgrade under the answered id", async () => {
    const { client, seen } = recordingClient([downgrade]);
    let reservationId = "";
    await assert.rejects(
      withReservation(client, { runId: "run-1", llmCall: CAPABLE, reservationId: "res-1" }, (hold) => {
        reservationId = hold.reservationId;
        throw new Error("the call failed");
      }),
      /the call failed/,
    );
    assert.equal(reservationId, `res-1${DOWNGRADE_SUFFIX}`);
    assert.equal(seen.reserve[0]?.reservationId, "res-1");
    assert.deepEqual(
      seen.refund.map((r) => r.reservationId),
      [`res-1${DOWNGRADE_SUFFIX}`],
    );
    assert.equal(seen.commit.length, 0);
  });

  test("a plain allow is not downgraded; without an estimate the model asked for is called", async () => {
    const { client, seen } = recordingClient();
    await withReservation(client, { runId: "run-1", llmCall: CAPABLE }, (hold) => {
      assert.equal(hold.downgraded, false);
      assert.deepEqual([hold.provider, hold.model, hold.requestedModel], ["openai", "gpt-4o", "gpt-4o"]);
      assert.equal(hold.decisionId, "dec-allow");
      assert.deepEqual(hold.alternatives, []);
      assert.equal(hold.reservationId, seen.reserve[0]?.reservationId);
    });
    await withReservation(client, { runId: "run-1", amountMicros: 40n }, (hold) => {
      assert.deepEqual([hold.provider, hold.model, hold.requestedModel], [undefined, undefined, undefined]);
    });
    const { client: down } = recordingClient([failOpen]);
    await withReservation(down, { runId: "run-1", llmCall: CAPABLE }, (hold) => {
      assert.equal(hold.failedOpen, true);
      assert.deepEqual([hold.provider, hold.model, hold.decisionId], ["openai", "gpt-4o", ""]);
    });
  });

  test("a block carries its alternatives and decision id", async () => {
    const { client, seen } = recordingClient([blockWithAlternatives]);
    const error = await withReservation(client, { runId: "run-1", llmCall: CAPABLE }, () =>
      assert.fail("a blocked reservation must not call back"),
    ).then(
      () => assert.fail("a blocked reservation must reject"),
      (thrown: unknown) => thrown,
    );
    assert.ok(error instanceof BudgetBlockedError);
    assert.ok(!(error instanceof BudgetThrottledError));
    assert.deepEqual(error.alternatives, [MINI, HAIKU]);
    assert.equal(error.decisionId, "dec-block");
    assert.match(error.message, /1500 of 10000 micros remain/);
    assert.match(error.message, /2 alternative model\(s\) fit, the cheapest openai\/gpt-4o-mini at 900 micros/);
    assert.deepEqual([seen.commit.length, seen.refund.length], [0, 0]);

    const bare = create(ReserveResponseSchema, blockWithAlternatives(seen.reserve[0] as ReserveRequest));
    bare.alternatives = [];
    const quiet = new BudgetBlockedError("run-1", bare);
    assert.deepEqual(quiet.alternatives, []);
    assert.doesNotMatch(quiet.message, /alternative/);
  });
});

describe("getDecision", () => {
  test("returns the decision and retries UNAVAILABLE", async () => {
    const { client, seen, state } = recordingClient();
    const decision = create(GetDecisionResponseSchema, {
      decisionId: "dec-1",
      runId: "run-1",
      reservationId: "res-1",
      decision: Decision.DOWNGRADE,
      amountMicros: 6400n,
      heldMicros: 900n,
      estimate: { provider: "openai", model: "gpt-4o-mini" },
      reservationStatus: ReservationStatus.COMMITTED,
      actualMicros: 850n,
    });
    state.decisions.set("dec-1", decision);
    state.unavailable = 2;
    assert.deepEqual(await client.getDecision("dec-1"), decision);
    assert.deepEqual(
      seen.getDecision.map((r) => r.decisionId),
      ["dec-1", "dec-1", "dec-1"],
    );
  });

  test("an unknown decision rejects with DecisionNotFoundError, not retried", async () => {
    const { client, seen } = recordingClient();
    const error = await client.getDecision("dec-gone").then(
      () => assert.fail("an unknown decision must reject"),
      (thrown: unknown) => thrown,
    );
    assert.ok(error instanceof DecisionNotFoundError, String(error));
    assert.ok(error instanceof RuncapError);
    assert.ok(!(error instanceof RunNotFoundError));
    assert.deepEqual([error.code, error.reason, error.decisionId], [Code.NotFound, ErrorReason.DECISION_NOT_FOUND, "dec-gone"]);
    assert.equal(error.retryable, false);
    assert.equal(seen.getDecision.length, 1);
  });

  test("DECISION_NOT_FOUND is one row of the error table", () => {
    assert.deepEqual(
      ERROR_TABLE.filter((row) => row.reason === ErrorReason.DECISION_NOT_FOUND),
      [{ reason: ErrorReason.DECISION_NOT_FOUND, code: Code.NotFound, error: DecisionNotFoundError }],
    );
    assert.equal(errorClass(Code.NotFound, ErrorReason.DECISION_NOT_FOUND), DecisionNotFoundError);
    // Without the metadata, the ResourceInfo names it.
    const bare = toRuncapError(decisionNotFound("dec-8", false));
    assert.ok(bare instanceof DecisionNotFoundError);
    assert.equal(bare.decisionId, "dec-8");
  });
});
