/**
 * Approvals: the escalation triggers a run policy sends, what
 * withReservation makes of an APPROVAL_REQUIRED decision
 * (ApprovalRequiredError, with the approval to resolve) and of a block by a
 * denied approval, and approve / deny with their retries and their
 * APPROVAL_NOT_FOUND and APPROVAL_RESOLVED errors, over an in-memory Connect
 * transport that records every request (no server).
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";

import {
  ApprovalNotFoundError,
  ApprovalRequiredError,
  ApprovalResolvedError,
  ApprovalStatus,
  BudgetBlockedError,
  BudgetDimension,
  BudgetService,
  BudgetThrottledError,
  Decision,
  DecisionNotFoundError,
  DecisionReason,
  ERROR_TABLE,
  ErrorReason,
  ReserveResponseSchema,
  RunPolicySchema,
  RuncapError,
  createRuncapClient,
  errorClass,
  toRunPolicy,
  toRuncapError,
  withReservation,
  type ApproveRequest,
  type CommitRequest,
  type CreateRunRequest,
  type DenyRequest,
  type RefundRequest,
  type ReserveRequest,
} from "../src/index.js";
import {
  ErrorInfoSchema,
  PreconditionFailureSchema,
  ResourceInfoSchema,
} from "../src/gen/google/rpc/error_details_pb.js";

type Answer = (request: ReserveRequest) => MessageInitShape<typeof ReserveResponseSchema>;

const SPEND_APPROVAL = "run-1/approval:spend";
const DEPLOY_APPROVAL = "run-1/approval:meter:tool:deploy";

/** The run's spend with this call would pass its approvalPercent: nothing held. */
const spendNeedsApproval: Answer = (request) => ({
  decision: Decision.APPROVAL_REQUIRED,
  reason: DecisionReason.SPEND_NEEDS_APPROVAL,
  reservationId: request.reservationId,
  blockingDimension: BudgetDimension.SPEND,
  state: { runId: request.runId, limitMicros: 10_000n, remainingMicros: 2500n },
  decisionId: "dec-approval",
  approvalId: SPEND_APPROVAL,
});

/** The call's meter is not on the run's approvedMeters: nothing held. */
const meterNeedsApproval: Answer = (request) => ({
  decision: Decision.APPROVAL_REQUIRED,
  reason: DecisionReason.METER_NEEDS_APPROVAL,
  reservationId: request.reservationId,
  blockingDimension: BudgetDimension.METER,
  blockingMeter: request.meter,
  approvalId: `${request.runId}/approval:meter:${request.meter}`,
});

/** The escalation this call trips was denied: a block. */
const approvalDenied: Answer = (request) => ({
  decision: Decision.BLOCK,
  reason: DecisionReason.APPROVAL_DENIED,
  reservationId: request.reservationId,
  blockingDimension: BudgetDimension.METER,
  blockingMeter: request.meter,
  approvalId: DEPLOY_APPROVAL,
});

/** As the server sends it: no metadata, the ResourceInfo names the approval. */
function approvalNotFound(approvalId: string, metadata = false): ConnectError {
  return new ConnectError(`there is no approval ${JSON.stringify(approvalId)}`, Code.NotFound, undefined, [
    {
      desc: ErrorInfoSchema,
      value: { domain: "runcap.dev", reason: "APPROVAL_NOT_FOUND", metadata: metadata ? { approval_id: approvalId } : {} },
    },
    { desc: ResourceInfoSchema, value: { resourceType: "runcap.v1.Approval", resourceName: approvalId } },
  ]);
}

/** As the server sends it: the run in the metadata, the approval as the violation's subject. */
function approvalResolved(approvalId: string, status: string): ConnectError {
  const message = `approval ${JSON.stringify(approvalId)} is already ${status}`;
  return new ConnectError(message, Code.FailedPrecondition, undefined, [
    {
      desc: ErrorInfoSchema,
      value: { domain: "runcap.dev", reason: "APPROVAL_RESOLVED", metadata: { run_id: "run-1", reservation_id: "" } },
    },
    {
      desc: PreconditionFailureSchema,
      value: { violations: [{ type: "APPROVAL_RESOLVED", subject: approvalId, description: message }] },
    },
  ]);
}

/**
 * A client over a transport that records every request; reserve answers with
 * the queued answers, then an allow; approve and deny fail `unavailable`
 * times, then resolve the approvals in `approvals` (a replay when already
 * resolved the same way, APPROVAL_RESOLVED the other way) and answer
 * APPROVAL_NOT_FOUND for any other id.
 */
function recordingClient(answers: Answer[] = []) {
  const seen = {
    createRun: [] as CreateRunRequest[],
    reserve: [] as ReserveRequest[],
    commit: [] as CommitRequest[],
    refund: [] as RefundRequest[],
    approve: [] as ApproveRequest[],
    deny: [] as DenyRequest[],
  };
  const state = { unavailable: 0, approvals: new Map<string, ApprovalStatus>() };
  const resolve = (approvalId: string, wanted: ApprovalStatus) => {
    if (state.unavailable > 0) {
      state.unavailable--;
      throw new ConnectError("connection reset", Code.Unavailable);
    }
    const current = state.approvals.get(approvalId);
    if (current === undefined) throw approvalNotFound(approvalId);
    if (current !== ApprovalStatus.PENDING && current !== wanted) {
      throw approvalResolved(approvalId, current === ApprovalStatus.DENIED ? "denied" : "approved");
    }
    state.approvals.set(approvalId, wanted);
    return {
      approval: { approvalId, status: wanted },
      state: { runId: approvalId.split("/")[0] ?? "" },
      replayed: current === wanted,
    };
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
        return {
          decision: Decision.ALLOW,
          reason: DecisionReason.WITHIN_BUDGET,
          reservationId: request.reservationId,
          amountMicros: request.estimate.case === "amountMicros" ? request.estimate.value : 0n,
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
      approve(request) {
        seen.approve.push(request);
        return resolve(request.approvalId, ApprovalStatus.APPROVED);
      },
      deny(request) {
        seen.deny.push(request);
        return resolve(request.approvalId, ApprovalStatus.DENIED);
      },
    });
  });
  const client = createRuncapClient({
    transport,
    retry: { maxAttempts: 4, initialBackoffMs: 1, maxBackoffMs: 5, multiplier: 2 },
  });
  return { client, seen, state };
}

/** What `promise` rejects with; fails the test when it resolves. */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => assert.fail("the call must reject"),
    (thrown: unknown) => thrown,
  );
}

describe("the escalation triggers of a run policy", () => {
  test("toRunPolicy sends approvalPercent and approvedMeters, and nothing by default", () => {
    const policy = { approvalPercent: 80, approvedMeters: ["tool:search", "tool:fetch"] };
    assert.deepEqual(
      toRunPolicy(policy),
      create(RunPolicySchema, { approvalPercent: 80, approvedMeters: ["tool:search", "tool:fetch"] }),
    );
    const none = toRunPolicy({});
    assert.equal(none.approvalPercent, 0);
    assert.deepEqual(none.approvedMeters, []);
    assert.throws(() => toRunPolicy({ approvalPercent: 80.5 }), RangeError);
  });

  test("createRun sends them", async () => {
    const { client, seen } = recordingClient();
    const approvedMeters = ["tool:search"];
    const created = await client.createRun({
      runId: "run-1",
      limitMicros: 10_000n,
      policy: { approvalPercent: 75, approvedMeters },
    });
    approvedMeters[0] = "tool:deploy"; // the request has its own copy
    assert.deepEqual(
      seen.createRun[0]?.policy,
      create(RunPolicySchema, { approvalPercent: 75, approvedMeters: ["tool:search"] }),
    );
    assert.equal(created.run?.policy?.approvalPercent, 75);
  });
});

describe("APPROVAL_REQUIRED and APPROVAL_DENIED decisions", () => {
  test("APPROVAL_REQUIRED rejects with ApprovalRequiredError, with the approval id, and holds nothing", async () => {
    const { client, seen } = recordingClient([spendNeedsApproval]);
    const error = await rejection(
      withReservation(client, { runId: "run-1", amountMicros: 4000n }, () =>
        assert.fail("a reservation that needs approval must not call back"),
      ),
    );
    assert.ok(error instanceof ApprovalRequiredError, String(error));
    assert.ok(error instanceof BudgetBlockedError);
    assert.ok(!(error instanceof BudgetThrottledError));
    assert.ok(!(error instanceof RuncapError));
    assert.equal(error.name, "ApprovalRequiredError");
    assert.equal(error.approvalId, SPEND_APPROVAL);
    assert.equal(error.reason, DecisionReason.SPEND_NEEDS_APPROVAL);
    assert.equal(error.decisionId, "dec-approval");
    assert.equal(error.approvalDenied, false);
    assert.equal(error.reservationId, seen.reserve[0]?.reservationId);
    assert.match(error.message, /needs approval \(SPEND_NEEDS_APPROVAL\)/);
    assert.match(error.message, /would pass its approval threshold/);
    assert.match(error.message, /approve "run-1\/approval:spend", then reserve again with a new reservation id/);
    assert.deepEqual([seen.commit.length, seen.refund.length], [0, 0]);
  });

  test("a meter that needs approval names the meter", async () => {
    const { client, seen } = recordingClient([meterNeedsApproval]);
    const error = await rejection(
      withReservation(client, { runId: "run-1", amountMicros: 40n, meter: "tool:deploy" }, () =>
        assert.fail("a reservation that needs approval must not call back"),
      ),
    );
    assert.ok(error instanceof ApprovalRequiredError, String(error));
    assert.equal(error.approvalId, DEPLOY_APPROVAL);
    assert.equal(error.meter, "tool:deploy");
    assert.equal(error.dimension, BudgetDimension.METER);
    assert.match(error.message, /meter "tool:deploy" is not on the run's approved meters/);
    assert.equal(seen.reserve[0]?.meter, "tool:deploy");
  });

  test("reserve resolves with APPROVAL_REQUIRED as a response", async () => {
    const { client } = recordingClient([spendNeedsApproval]);
    const response = await client.reserve({ runId: "run-1", amountMicros: 4000n });
    assert.equal(response.decision, Decision.APPROVAL_REQUIRED);
    assert.equal(response.approvalId, SPEND_APPROVAL);
  });

  test("once approved, a new reservation is held", async () => {
    const { client, seen, state } = recordingClient([spendNeedsApproval]);
    state.approvals.set(SPEND_APPROVAL, ApprovalStatus.PENDING);
    const error = await rejection(withReservation(client, { runId: "run-1", amountMicros: 4000n }, () => undefined));
    assert.ok(error instanceof ApprovalRequiredError, String(error));
    const { approval } = await client.approve(error.approvalId);
    assert.equal(approval?.status, ApprovalStatus.APPROVED);
    await withReservation(client, { runId: "run-1", amountMicros: 4000n }, (hold) => hold.setActual(3000n));
    const [first, second] = seen.reserve;
    assert.notEqual(second?.reservationId, first?.reservationId);
    assert.deepEqual(
      seen.commit.map((c) => c.reservationId),
      [second?.reservationId],
    );
  });

  test("a denied approval blocks with its approval id", async () => {
    const { client } = recordingClient([approvalDenied]);
    const error = await rejection(
      withReservation(client, { runId: "run-1", amountMicros: 40n, meter: "tool:deploy" }, () =>
        assert.fail("a blocked reservation must not call back"),
      ),
    );
    assert.ok(error instanceof BudgetBlockedError, String(error));
    assert.ok(!(error instanceof ApprovalRequiredError));
    assert.equal(error.approvalDenied, true);
    assert.equal(error.approvalId, DEPLOY_APPROVAL);
    assert.match(error.message, /was blocked \(APPROVAL_DENIED\)/);
    assert.match(error.message, /the call needs approval "run-1\/approval:meter:tool:deploy", which was denied/);
  });

  test("a plain block has no approval", () => {
    const plain = new BudgetBlockedError(
      "run-1",
      create(ReserveResponseSchema, { decision: Decision.BLOCK, reason: DecisionReason.INSUFFICIENT_BUDGET }),
    );
    assert.equal(plain.approvalId, "");
    assert.equal(plain.approvalDenied, false);
    assert.doesNotMatch(plain.message, /approv/);
  });
});

describe("approve and deny", () => {
  test("approve sends the id, retries UNAVAILABLE, and replays", async () => {
    const { client, seen, state } = recordingClient();
    state.approvals.set(SPEND_APPROVAL, ApprovalStatus.PENDING);
    state.unavailable = 3;
    const response = await client.approve(SPEND_APPROVAL);
    assert.deepEqual(
      [response.approval?.approvalId, response.approval?.status, response.state?.runId, response.replayed],
      [SPEND_APPROVAL, ApprovalStatus.APPROVED, "run-1", false],
    );
    assert.deepEqual(
      seen.approve.map((r) => r.approvalId),
      [SPEND_APPROVAL, SPEND_APPROVAL, SPEND_APPROVAL, SPEND_APPROVAL],
    );
    assert.equal((await client.approve(SPEND_APPROVAL)).replayed, true);
    assert.equal(seen.deny.length, 0);
  });

  test("deny sends the id, retries UNAVAILABLE, and replays", async () => {
    const { client, seen, state } = recordingClient();
    state.approvals.set(DEPLOY_APPROVAL, ApprovalStatus.PENDING);
    state.unavailable = 2;
    const response = await client.deny(DEPLOY_APPROVAL);
    assert.deepEqual([response.approval?.status, response.replayed], [ApprovalStatus.DENIED, false]);
    assert.deepEqual(
      seen.deny.map((r) => r.approvalId),
      [DEPLOY_APPROVAL, DEPLOY_APPROVAL, DEPLOY_APPROVAL],
    );
    assert.equal((await client.deny(DEPLOY_APPROVAL)).replayed, true);
    assert.equal(seen.approve.length, 0);
  });

  test("retries give up after the policy's attempts", async () => {
    const { client, seen, state } = recordingClient();
    state.approvals.set(SPEND_APPROVAL, ApprovalStatus.PENDING);
    state.unavailable = 100;
    const error = await rejection(client.approve(SPEND_APPROVAL));
    assert.ok(error instanceof RuncapError, String(error));
    assert.equal(error.code, Code.Unavailable);
    assert.equal(seen.approve.length, 4);
  });

  test("an unknown approval rejects with ApprovalNotFoundError, not retried", async () => {
    const { client, seen } = recordingClient();
    for (const resolve of [client.approve, client.deny]) {
      const error = await rejection(resolve("run-1/approval:gone"));
      assert.ok(error instanceof ApprovalNotFoundError, String(error));
      assert.ok(!(error instanceof DecisionNotFoundError));
      assert.deepEqual(
        [error.code, error.reason, error.approvalId, error.retryable],
        [Code.NotFound, ErrorReason.APPROVAL_NOT_FOUND, "run-1/approval:gone", false],
      );
      assert.equal(error.resourceInfo?.resourceType, "runcap.v1.Approval");
    }
    assert.deepEqual([seen.approve.length, seen.deny.length], [1, 1]);
  });

  test("resolving an approval the other way rejects with ApprovalResolvedError, not retried", async () => {
    const { client, seen, state } = recordingClient();
    state.approvals.set(SPEND_APPROVAL, ApprovalStatus.DENIED);
    state.approvals.set(DEPLOY_APPROVAL, ApprovalStatus.APPROVED);
    const denied = await rejection(client.approve(SPEND_APPROVAL));
    assert.ok(denied instanceof ApprovalResolvedError, String(denied));
    assert.deepEqual(
      [denied.code, denied.reason, denied.approvalId, denied.runId],
      [Code.FailedPrecondition, ErrorReason.APPROVAL_RESOLVED, SPEND_APPROVAL, "run-1"],
    );
    assert.match(denied.message, /already denied/);
    const approved = await rejection(client.deny(DEPLOY_APPROVAL));
    assert.ok(approved instanceof ApprovalResolvedError, String(approved));
    assert.equal(approved.approvalId, DEPLOY_APPROVAL);
    assert.match(approved.message, /already approved/);
    assert.deepEqual([seen.approve.length, seen.deny.length], [1, 1]);
  });
});

describe("the approval errors", () => {
  test("APPROVAL_NOT_FOUND and APPROVAL_RESOLVED are one row each of the error table", () => {
    assert.deepEqual(
      ERROR_TABLE.filter(
        (row) => row.reason === ErrorReason.APPROVAL_NOT_FOUND || row.reason === ErrorReason.APPROVAL_RESOLVED,
      ),
      [
        { reason: ErrorReason.APPROVAL_NOT_FOUND, code: Code.NotFound, error: ApprovalNotFoundError },
        { reason: ErrorReason.APPROVAL_RESOLVED, code: Code.FailedPrecondition, error: ApprovalResolvedError },
      ],
    );
    assert.equal(errorClass(Code.NotFound, ErrorReason.APPROVAL_NOT_FOUND), ApprovalNotFoundError);
    assert.equal(errorClass(Code.FailedPrecondition, ErrorReason.APPROVAL_RESOLVED), ApprovalResolvedError);
    // The ErrorInfo metadata names the approval when it is there.
    const named = toRuncapError(approvalNotFound("run-1/approval:spend", true));
    assert.ok(named instanceof ApprovalNotFoundError);
    assert.equal(named.approvalId, "run-1/approval:spend");
    // A proxy's APPROVAL_NOT_FOUND maps by its code only.
    const foreign = toRuncapError(
      new ConnectError("no approval", Code.NotFound, undefined, [
        { desc: ErrorInfoSchema, value: { domain: "proxy.example", reason: "APPROVAL_NOT_FOUND" } },
      ]),
    );
    assert.ok(!(foreign instanceof ApprovalNotFoundError));
    assert.equal(foreign.reason, ErrorReason.UNSPECIFIED);
  });
});
