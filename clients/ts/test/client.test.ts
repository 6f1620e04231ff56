/** The unary API, typed errors and withReservation against a live server. */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  BudgetBlockedError,
  Code,
  Decision,
  DecisionReason,
  ErrorReason,
  IdempotencyConflictError,
  InvalidArgumentError,
  NO_RETRY,
  ReservationBlockedError,
  ReservationNotFoundError,
  ReservationReleasedError,
  ReservationStatus,
  RunAlreadyExistsError,
  RunNotFoundError,
  RunStatus,
  RuncapError,
  UnavailableError,
  createRuncapClient,
  withReservation,
  type RuncapClient,
} from "../src/index.js";
import { RuncapServer, freePort, uniqueId } from "./server.js";

let server: RuncapServer;
let client: RuncapClient;

before(async () => {
  server = await RuncapServer.start();
  client = createRuncapClient({ target: server.target });
});

after(async () => {
  client?.close();
  await server?.kill();
});

async function newRun(limitMicros: bigint): Promise<string> {
  const runId = uniqueId("run");
  await client.createRun({ runId, limitMicros });
  return runId;
}

describe("unary calls", () => {
  test("create, get, reserve, commit, refund and close, each replayed", async () => {
    const runId = uniqueId("run");
    const created = await client.createRun({ runId, limitMicros: 1_000_000n, labels: { agent: "ts" }, defaultTtl: 60_000 });
    assert.equal(created.replayed, false);
    assert.equal(created.run?.runId, runId);
    assert.equal(created.run?.defaultTtlMillis, 60_000n);
    assert.deepEqual(created.run?.labels, { agent: "ts" });
    assert.equal(created.state?.revision, 1n);
    const again = await client.createRun({ runId, limitMicros: 1_000_000n, labels: { agent: "ts" }, defaultTtl: 60_000 });
    assert.equal(again.replayed, true);

    const got = await client.getRun(runId);
    assert.equal(got.state?.limitMicros, 1_000_000n);
    assert.equal(got.state?.remainingMicros, 1_000_000n);
    assert.equal(got.state?.status, RunStatus.OPEN);

    const reserved = await client.reserve({ runId, amountMicros: 300_000n, reservationId: "r1", ttl: 30_000 });
    assert.equal(reserved.decision, Decision.ALLOW);
    assert.equal(reserved.reason, DecisionReason.WITHIN_BUDGET);
    assert.equal(reserved.reservationId, "r1");
    assert.equal(reserved.amountMicros, 300_000n);
    assert.equal(reserved.state?.reservedMicros, 300_000n);
    assert.equal(reserved.replayed, false);
    const reservedAgain = await client.reserve({ runId, amountMicros: 300_000n, reservationId: "r1", ttl: 30_000 });
    assert.equal(reservedAgain.replayed, true);
    assert.equal(reservedAgain.decision, Decision.ALLOW);
    assert.equal(reservedAgain.state?.reservedMicros, 300_000n);

    const committed = await client.commit({ runId, reservationId: "r1", actualMicros: 250_000n });
    assert.equal(committed.reservationStatus, ReservationStatus.COMMITTED);
    assert.equal(committed.state?.committedMicros, 250_000n);
    assert.equal(committed.state?.reservedMicros, 0n);
    assert.equal(committed.heldMicros, 300_000n);
    assert.equal((await client.commit({ runId, reservationId: "r1", actualMicros: 250_000n })).replayed, true);

    const generated = await client.reserve({ runId, amountMicros: 100_000n });
    assert.match(generated.reservationId, /^[0-9a-f]{32}$/);
    const refunded = await client.refund({ runId, reservationId: generated.reservationId });
    assert.equal(refunded.reservationStatus, ReservationStatus.RELEASED);
    assert.equal(refunded.releasedMicros, 100_000n);
    assert.equal(refunded.replayed, false);
    const refundedAgain = await client.refund({ runId, reservationId: generated.reservationId });
    assert.equal(refundedAgain.replayed, true);
    assert.equal(refundedAgain.releasedMicros, 0n);

    const closed = await client.closeRun(runId);
    assert.equal(closed.state?.status, RunStatus.CLOSED);
    assert.equal(closed.replayed, false);
    assert.equal((await client.closeRun(runId)).replayed, true);
    const late = await client.reserve({ runId, amountMicros: 1n });
    assert.equal(late.decision, Decision.BLOCK);
    assert.equal(late.reason, DecisionReason.RUN_CLOSED);
  });

  test("200 concurrent reserves with budget for exactly 37: exactly 37 allowed", async () => {
    const allowedCount = 37;
    const amount = 10_000n;
    const runId = await newRun(amount * BigInt(allowedCount));
    const responses = await Promise.all(
      Array.from({ length: 200 }, () => client.reserve({ runId, amountMicros: amount })),
    );
    const allowed = responses.filter((r) => r.decision === Decision.ALLOW);
    const blocked = responses.filter((r) => r.decision === Decision.BLOCK);
    assert.equal(allowed.length, allowedCount);
    assert.equal(blocked.length, 200 - allowedCount);
    assert.ok(blocked.every((r) => r.reason === DecisionReason.INSUFFICIENT_BUDGET));
    assert.equal(new Set(responses.map((r) => r.reservationId)).size, 200);
    const { state } = await client.getRun(runId);
    assert.equal(state?.reservedMicros, amount * BigInt(allowedCount));
    assert.equal(state?.remainingMicros, 0n);
    assert.equal(state?.activeReservations, BigInt(allowedCount));
    // One change per allow, then one BLOCKED change for the whole series of blocks.
    assert.equal(state?.revision, 1n + BigInt(allowedCount) + 1n);
    assert.equal(state?.blocked, true);
  });
});

describe("typed errors", () => {
  test("NOT_FOUND: RunNotFoundError with ResourceInfo", async () => {
    const error = await client.getRun("no-such-run").catch((e: unknown) => e);
    assert.ok(error instanceof RunNotFoundError, String(error));
    assert.ok(error instanceof RuncapError);
    assert.equal(error.code, Code.NotFound);
    assert.equal(error.reason, ErrorReason.RUN_NOT_FOUND);
    assert.equal(error.reasonName, "RUN_NOT_FOUND");
    assert.equal(error.runId, "no-such-run");
    assert.equal(error.resourceInfo?.resourceType, "runcap.v1.Run");
    assert.equal(error.resourceInfo?.resourceName, "no-such-run");
    assert.equal(error.retryable, false);
  });

  test("INVALID_ARGUMENT: every field violation", async () => {
    const error = await client
      .reserve({ runId: "", amountMicros: -5n, reservationId: "bad id!" })
      .catch((e: unknown) => e);
    assert.ok(error instanceof InvalidArgumentError, String(error));
    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.reason, ErrorReason.INVALID_ARGUMENT);
    assert.deepEqual(new Set(error.fields), new Set(["run_id", "reservation_id", "amount_micros"]));
    assert.ok(error.fieldViolations.every((v) => v.description.length > 0));
  });

  test("ALREADY_EXISTS: IdempotencyConflictError and RunAlreadyExistsError", async () => {
    const runId = await newRun(1_000_000n);
    await client.reserve({ runId, amountMicros: 10n, reservationId: "same" });
    const conflict = await client
      .reserve({ runId, amountMicros: 20n, reservationId: "same" })
      .catch((e: unknown) => e);
    assert.ok(conflict instanceof IdempotencyConflictError, String(conflict));
    assert.equal(conflict.code, Code.AlreadyExists);
    assert.equal(conflict.reason, ErrorReason.IDEMPOTENCY_CONFLICT);
    assert.equal(conflict.reservationId, "same");
    assert.equal(conflict.runId, runId);

    const exists = await client.createRun({ runId, limitMicros: 5n }).catch((e: unknown) => e);
    assert.ok(exists instanceof RunAlreadyExistsError, String(exists));
    assert.equal(exists.reason, ErrorReason.RUN_ALREADY_EXISTS);
  });

  test("NOT_FOUND reservation and FAILED_PRECONDITION rows", async () => {
    const runId = await newRun(100n);
    const missing = await client.refund({ runId, reservationId: "nope" }).catch((e: unknown) => e);
    assert.ok(missing instanceof ReservationNotFoundError, String(missing));
    assert.equal(missing.reservationId, "nope");

    await client.reserve({ runId, amountMicros: 50n, reservationId: "refunded" });
    await client.refund({ runId, reservationId: "refunded" });
    const released = await client
      .commit({ runId, reservationId: "refunded", actualMicros: 1n })
      .catch((e: unknown) => e);
    assert.ok(released instanceof ReservationReleasedError, String(released));
    assert.equal(released.code, Code.FailedPrecondition);
    assert.equal(released.preconditionViolations[0]?.type, "RESERVATION_RELEASED");

    const block = await client.reserve({ runId, amountMicros: 1_000n, reservationId: "blocked" });
    assert.equal(block.decision, Decision.BLOCK);
    const blocked = await client
      .commit({ runId, reservationId: "blocked", actualMicros: 1n })
      .catch((e: unknown) => e);
    assert.ok(blocked instanceof ReservationBlockedError, String(blocked));
    assert.equal(blocked.reason, ErrorReason.RESERVATION_BLOCKED);
  });

  test("UNAVAILABLE without a server: UnavailableError, no ErrorInfo", async () => {
    const port = await freePort();
    const nobody = createRuncapClient({ target: `127.0.0.1:${port}`, retry: NO_RETRY });
    try {
      const error = await nobody.getRun("x").catch((e: unknown) => e);
      assert.ok(error instanceof UnavailableError, String(error));
      assert.equal(error.reason, ErrorReason.UNSPECIFIED);
      assert.equal(error.retryable, true);
    } finally {
      nobody.close();
    }
  });
});

describe("withReservation", () => {
  test("commits the actual cost when the callback resolves", async () => {
    const runId = await newRun(1_000_000n);
    let seen = "";
    const result = await withReservation(client, { runId, amountMicros: 400_000n }, async (hold) => {
      seen = hold.reservationId;
      assert.equal(hold.amountMicros, 400_000n);
      assert.equal(hold.state?.reservedMicros, 400_000n);
      hold.setActual(123_000n);
      return "answer";
    });
    assert.equal(result, "answer");
    assert.match(seen, /^[0-9a-f]{32}$/);
    const { state } = await client.getRun(runId);
    assert.equal(state?.committedMicros, 123_000n);
    assert.equal(state?.reservedMicros, 0n);
  });

  test("commits the whole hold when no actual cost was set", async () => {
    const runId = await newRun(1_000_000n);
    await withReservation(client, { runId, amountMicros: 70_000n, reservationId: "whole" }, () => undefined);
    const { state } = await client.getRun(runId);
    assert.equal(state?.committedMicros, 70_000n);
    // The id was used: a commit replay with the same cost is recognised.
    const replay = await client.commit({ runId, reservationId: "whole", actualMicros: 70_000n });
    assert.equal(replay.replayed, true);
  });

  test("refunds and rethrows when the callback throws", async () => {
    const runId = await newRun(1_000_000n);
    const boom = new Error("model call failed");
    let reservationId = "";
    await assert.rejects(
      withReservation(client, { runId, amountMicros: 500_000n }, async (hold) => {
        reservationId = hold.reservationId;
        throw boom;
      }),
      (error) => error === boom,
    );
    const { state } = await client.getRun(runId);
    assert.equal(state?.committedMicros, 0n);
    assert.equal(state?.reservedMicros, 0n);
    assert.equal(state?.remainingMicros, 1_000_000n);
    const refund = await client.refund({ runId, reservationId });
    assert.equal(refund.replayed, true);
    assert.equal(refund.reservationStatus, ReservationStatus.RELEASED);
  });

  test("release() refunds on success", async () => {
    const runId = await newRun(1_000n);
    await withReservation(client, { runId, amountMicros: 600n }, (hold) => hold.release());
    const { state } = await client.getRun(runId);
    assert.equal(state?.committedMicros, 0n);
    assert.equal(state?.remainingMicros, 1_000n);
  });

  test("a block throws BudgetBlockedError and never calls the callback", async () => {
    const runId = await newRun(1_000n);
    let called = false;
    const error = await withReservation(client, { runId, amountMicros: 5_000n }, () => {
      called = true;
    }).catch((e: unknown) => e);
    assert.ok(error instanceof BudgetBlockedError, String(error));
    assert.ok(!(error instanceof RuncapError));
    assert.equal(called, false);
    assert.equal(error.reason, DecisionReason.INSUFFICIENT_BUDGET);
    assert.equal(error.state?.remainingMicros, 1_000n);
  });
});
