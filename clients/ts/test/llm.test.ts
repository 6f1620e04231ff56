/**
 * Priced LLM calls: the requests reserve and commit send for an `llmCall` and
 * a token `usage`, over an in-memory Connect transport that records them and
 * prices them from a one-model table (no server), withReservation's
 * `setUsage`, and a BudgetBlockedError for an unknown price.
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { createRouterTransport } from "@connectrpc/connect";

import {
  BudgetBlockedError,
  BudgetService,
  Decision,
  DecisionReason,
  LlmCallSchema,
  ReserveResponseSchema,
  RuncapError,
  TokenUsageSchema,
  createRuncapClient,
  toLlmCall,
  toTokenUsage,
  withReservation,
  type CommitRequest,
  type RefundRequest,
  type ReserveArgs,
  type ReserveRequest,
  type TokenUsageInput,
} from "../src/index.js";

const VERSION = "test-prices-1";
const GPT_4O = { provider: "openai", model: "gpt-4o", inputTokens: 1200, maxOutputTokens: 500 };
const USAGE = { inputTokens: 1100, outputTokens: 310, cacheReadTokens: 100n };
const ESTIMATE = 2n * 1200n + 8n * 500n; // 6,400
const ACTUAL = 2n * 1100n + 8n * 310n;

/** A client over a router transport that prices openai/gpt-4o at 2 and 8 micros per input and output token. */
function pricedClient(limitMicros = 1_000_000n) {
  const seen = { reserve: [] as ReserveRequest[], commit: [] as CommitRequest[], refund: [] as RefundRequest[] };
  const transport = createRouterTransport(({ service }) => {
    service(BudgetService, {
      reserve(request) {
        seen.reserve.push(request);
        const state = { runId: request.runId, limitMicros, remainingMicros: limitMicros };
        const base = { reservationId: request.reservationId, state };
        if (request.estimate.case !== "llmCall") {
          return { ...base, decision: Decision.ALLOW, amountMicros: request.estimate.value ?? 0n };
        }
        const call = request.estimate.value;
        const out = call.maxOutputTokens ?? 1000n;
        const known = call.provider === "openai" && call.model === "gpt-4o";
        const amountMicros = known ? 2n * call.inputTokens + 8n * out : 0n;
        const estimate = {
          provider: call.provider,
          model: call.model,
          inputTokens: call.inputTokens,
          effectiveMaxOutputTokens: out,
          amountMicros,
          priceTableVersion: VERSION,
        };
        if (!known) return { ...base, decision: Decision.BLOCK, reason: DecisionReason.UNKNOWN_PRICE, estimate };
        if (amountMicros > limitMicros) {
          return { ...base, decision: Decision.BLOCK, reason: DecisionReason.INSUFFICIENT_BUDGET, estimate };
        }
        return { ...base, decision: Decision.ALLOW, reason: DecisionReason.WITHIN_BUDGET, amountMicros, estimate };
      },
      commit(request) {
        seen.commit.push(request);
        const { actual } = request;
        const actualMicros =
          actual.case === "usage" ? 2n * actual.value.inputTokens + 8n * actual.value.outputTokens : (actual.value ?? 0n);
        return { actualMicros };
      },
      refund(request) {
        seen.refund.push(request);
        return {};
      },
    });
  });
  return { client: createRuncapClient({ transport }), seen };
}

describe("LLM call and usage messages", () => {
  test("toLlmCall takes numbers or bigints and leaves an omitted max output unset", () => {
    assert.deepEqual(
      toLlmCall(GPT_4O),
      create(LlmCallSchema, { provider: "openai", model: "gpt-4o", inputTokens: 1200n, maxOutputTokens: 500n }),
    );
    const unset = toLlmCall({ provider: "openai", model: "gpt-4o", inputTokens: 0n });
    assert.equal(unset.maxOutputTokens, undefined);
    assert.throws(() => toLlmCall({ ...GPT_4O, inputTokens: 1.5 }), RangeError);
  });

  test("toTokenUsage fills omitted classes with zero", () => {
    assert.deepEqual(
      toTokenUsage({ outputTokens: 3, reasoningTokens: 9n }),
      create(TokenUsageSchema, { outputTokens: 3n, reasoningTokens: 9n }),
    );
    assert.throws(() => toTokenUsage({ inputTokens: Number.NaN }), /inputTokens must be a whole number/);
  });
});

describe("reserve and commit", () => {
  test("reserve sends an llmCall and returns the estimate; commit sends usage", async () => {
    const { client, seen } = pricedClient();
    const response = await client.reserve({ runId: "run-1", llmCall: GPT_4O, reservationId: "res-1", ttl: 30_000 });
    assert.equal(response.decision, Decision.ALLOW);
    assert.equal(response.amountMicros, ESTIMATE);
    assert.equal(response.estimate?.effectiveMaxOutputTokens, 500n);
    assert.equal(response.estimate?.priceTableVersion, VERSION);
    const committed = await client.commit({ runId: "run-1", reservationId: "res-1", usage: USAGE });
    assert.equal(committed.actualMicros, ACTUAL);

    const [reserve] = seen.reserve;
    assert.equal(reserve?.estimate.case, "llmCall");
    assert.deepEqual(reserve?.estimate.value, toLlmCall(GPT_4O));
    assert.equal(reserve?.ttl?.seconds, 30n);
    const [commit] = seen.commit;
    assert.equal(commit?.actual.case, "usage");
    assert.deepEqual(commit?.actual.value, toTokenUsage(USAGE));
  });

  test("amounts still work", async () => {
    const { client, seen } = pricedClient();
    const response = await client.reserve({ runId: "run-1", amountMicros: 40n, reservationId: "res-1" });
    assert.equal(response.amountMicros, 40n);
    assert.equal(response.estimate, undefined);
    await client.commit({ runId: "run-1", reservationId: "res-1", actualMicros: 30n });
    assert.deepEqual(seen.reserve[0]?.estimate, { case: "amountMicros", value: 40n });
    assert.deepEqual(seen.commit[0]?.actual, { case: "actualMicros", value: 30n });
  });

  test("neither or both reject with a TypeError before any call", async () => {
    const { client, seen } = pricedClient();
    const neither = { runId: "run-1" } as unknown as ReserveArgs;
    const both = { runId: "run-1", amountMicros: 1n, llmCall: GPT_4O } as unknown as ReserveArgs;
    await assert.rejects(client.reserve(neither), /exactly one of amountMicros and llmCall/);
    await assert.rejects(client.reserve(both), TypeError);
    await assert.rejects(withReservation(client, both, () => "never"), TypeError);
    await assert.rejects(
      client.commit({ runId: "run-1", reservationId: "r" } as unknown as Parameters<typeof client.commit>[0]),
      /exactly one of actualMicros and usage/,
    );
    await assert.rejects(
      client.commit({ runId: "run-1", reservationId: "r", actualMicros: 1n, usage: {} } as unknown as Parameters<
        typeof client.commit
      >[0]),
      TypeError,
    );
    assert.deepEqual([seen.reserve.length, seen.commit.length], [0, 0]);
  });
});

describe("withReservation of an LLM call", () => {
  test("setUsage commits the usage; the hold shows the estimate", async () => {
    const { client, seen } = pricedClient();
    const answer = await withReservation(client, { runId: "run-1", llmCall: GPT_4O }, async (hold) => {
      assert.equal(hold.amountMicros, ESTIMATE);
      assert.equal(hold.estimate?.priceTableVersion, VERSION);
      hold.setUsage(USAGE);
      assert.deepEqual(hold.usage, toTokenUsage(USAGE));
      assert.equal(hold.actualMicros, undefined);
      return "answer";
    });
    assert.equal(answer, "answer");
    assert.equal(seen.commit.length, 1);
    assert.deepEqual(seen.commit[0]?.actual, { case: "usage", value: toTokenUsage(USAGE) });
    assert.equal(seen.commit[0]?.reservationId, seen.reserve[0]?.reservationId);
  });

  test("setActual and setUsage replace each other; release drops both", async () => {
    const { client, seen } = pricedClient();
    await withReservation(client, { runId: "run-1", llmCall: GPT_4O }, (hold) => {
      hold.setUsage(USAGE);
      hold.setActual(123n);
      assert.equal(hold.usage, undefined);
    });
    await withReservation(client, { runId: "run-1", llmCall: GPT_4O }, (hold) => {
      hold.setActual(123n);
      hold.setUsage({ outputTokens: 1 });
    });
    await withReservation(client, { runId: "run-1", llmCall: GPT_4O }, (hold) => {
      hold.setUsage(USAGE);
      hold.release();
    });
    assert.deepEqual(
      seen.commit.map((c) => c.actual.case),
      ["actualMicros", "usage"],
    );
    assert.equal(seen.commit[0]?.actual.value, 123n);
    assert.equal(seen.refund.length, 1);
  });

  test("a throw after setUsage commits the usage; a throw before refunds", async () => {
    const { client, seen } = pricedClient();
    const failing = (usage?: TokenUsageInput) =>
      withReservation(client, { runId: "run-1", llmCall: GPT_4O }, (hold) => {
        if (usage) hold.setUsage(usage);
        throw new Error("the model call failed");
      });
    await assert.rejects(failing(USAGE), /the model call failed/);
    await assert.rejects(failing(), /the model call failed/);
    assert.equal(seen.commit.length, 1);
    assert.equal(seen.commit[0]?.actual.case, "usage");
    assert.equal(seen.refund.length, 1);
  });

  test("nothing set commits the whole estimate", async () => {
    const { client, seen } = pricedClient();
    await withReservation(client, { runId: "run-1", llmCall: GPT_4O }, () => undefined);
    assert.deepEqual(seen.commit[0]?.actual, { case: "actualMicros", value: ESTIMATE });
  });

  test("setUsage rejects a token count that is not a whole number", async () => {
    const { client } = pricedClient();
    await withReservation(client, { runId: "run-1", llmCall: GPT_4O }, (hold) => {
      assert.throws(() => hold.setUsage({ outputTokens: 0.5 }), RangeError);
      assert.equal(hold.usage, undefined);
    });
  });
});

describe("blocks of LLM calls", () => {
  test("an unknown price is a BudgetBlockedError that says so", async () => {
    const { client, seen } = pricedClient();
    const llmCall = { provider: "openai", model: "gpt-9-turbo", inputTokens: 10 };
    let called = false;
    const error = await withReservation(client, { runId: "run-1", llmCall }, () => {
      called = true;
    }).then(
      () => assert.fail("the reservation must be blocked"),
      (thrown: unknown) => thrown,
    );
    assert.equal(called, false);
    assert.ok(error instanceof BudgetBlockedError);
    assert.ok(!(error instanceof RuncapError));
    assert.equal(error.reason, DecisionReason.UNKNOWN_PRICE);
    assert.equal(error.unknownPrice, true);
    assert.deepEqual([error.estimate?.provider, error.estimate?.model, error.estimate?.amountMicros], [
      "openai",
      "gpt-9-turbo",
      0n,
    ]);
    assert.match(error.message, /\(UNKNOWN_PRICE\): unknown price: /);
    assert.match(error.message, /no price for model "gpt-9-turbo" of provider "openai" \(price table "test-prices-1"\)/);
    assert.doesNotMatch(error.message, /micros remain/);
    assert.deepEqual([seen.commit.length, seen.refund.length], [0, 0]);
  });

  test("a budget block of an LLM call names its estimate", async () => {
    const { client } = pricedClient(1000n);
    const error = await withReservation(client, { runId: "run-1", llmCall: GPT_4O }, () => "never").then(
      () => assert.fail("the reservation must be blocked"),
      (thrown: unknown) => thrown,
    );
    assert.ok(error instanceof BudgetBlockedError);
    assert.equal(error.unknownPrice, false);
    assert.equal(error.estimate?.amountMicros, ESTIMATE);
    assert.match(error.message, /1000 of 1000 micros remain, the openai\/gpt-4o call was estimated at 6400 micros$/);
  });

  test("an unknown price without an estimate still says so", () => {
    const bare = create(ReserveResponseSchema, { decision: Decision.BLOCK, reason: DecisionReason.UNKNOWN_PRICE });
    const error = new BudgetBlockedError("run-1", bare);
    assert.equal(error.estimate, undefined);
    assert.match(error.message, /unknown price: the server has no price for the model/);
    const plain = create(ReserveResponseSchema, { decision: Decision.BLOCK, reason: DecisionReason.INSUFFICIENT_BUDGET });
    assert.doesNotMatch(new BudgetBlockedError("run-1", plain).message, /estimated/);
  });
});
