/**
 * Parent scopes: the requests createRun, setScopeLimit, clearScopeLimit,
 * setScopePolicy, clearScopePolicy and getScope send, over an in-memory
 * Connect transport that records them (no server), the retries of the scope
 * policy calls, the blocking scope of a BudgetBlockedError, and the parent
 * run errors.
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, equals } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";

import {
  BudgetBlockedError,
  BudgetService,
  Decision,
  DecisionReason,
  EnforcementMode,
  ErrorReason,
  ParentRunClosedError,
  ParentRunNotFoundError,
  Period,
  ReserveResponseSchema,
  RunPolicySchema,
  ScopeKind,
  UnavailableError,
  createRuncapClient,
  toRunPolicy,
  toRuncapError,
  withReservation,
  type CreateRunRequest,
  type GetScopeRequest,
  type ReserveResponse,
  type RetryPolicy,
  type RunPolicyInput,
  type SetScopeLimitRequest,
  type SetScopePolicyRequest,
} from "../src/index.js";
import { ErrorInfoSchema, PreconditionFailureSchema } from "../src/gen/google/rpc/error_details_pb.js";

const FAST: RetryPolicy = { maxAttempts: 4, initialBackoffMs: 1, maxBackoffMs: 5, multiplier: 2 };

const ADVISORY: RunPolicyInput = {
  enforcementMode: EnforcementMode.ADVISORY,
  rateLimit: { maxCalls: 30, window: 60_000 },
  maxInFlight: 4,
};

/** A client over a transport that records every request; setScopePolicy first fails with the queued `failures`. */
function recordingClient(reserve?: ReserveResponse, failures: Error[] = []) {
  const seen = {
    createRun: [] as CreateRunRequest[],
    setScopeLimit: [] as SetScopeLimitRequest[],
    setScopePolicy: [] as SetScopePolicyRequest[],
    getScope: [] as GetScopeRequest[],
  };
  const transport = createRouterTransport(({ service }) => {
    service(BudgetService, {
      createRun(request) {
        seen.createRun.push(request);
        return { run: { runId: request.runId, parentRunId: request.parentRunId, teamId: request.teamId } };
      },
      setScopeLimit(request) {
        seen.setScopeLimit.push(request);
        const limitMicros = request.ceiling.case === "limitMicros" ? request.ceiling.value : undefined;
        return { scope: { ref: request.scope, usage: [{ period: request.period, limitMicros }] } };
      },
      setScopePolicy(request) {
        seen.setScopePolicy.push(request);
        const failure = failures.shift();
        if (failure !== undefined) throw failure;
        const defaultPolicy = request.default.case === "policy" ? request.default.value : undefined;
        return { scope: { ref: request.scope, defaultPolicy } };
      },
      getScope(request) {
        seen.getScope.push(request);
        return { scope: { ref: request.scope } };
      },
      reserve() {
        return reserve ?? {};
      },
      refund() {
        return {};
      },
    });
  });
  return { client: createRuncapClient({ transport, retry: FAST }), seen };
}

describe("parent scopes", () => {
  test("createRun sends the parent run, API key, user and team", async () => {
    const { client, seen } = recordingClient();
    const created = await client.createRun({
      runId: "child",
      limitMicros: 5n,
      parentRunId: "root",
      apiKeyId: "key-1",
      userId: "ada",
      teamId: "team-7",
    });
    assert.equal(created.run?.parentRunId, "root");
    await client.createRun({ runId: "plain", limitMicros: 5n });
    const [child, plain] = seen.createRun;
    assert.deepEqual(
      [child?.parentRunId, child?.apiKeyId, child?.userId, child?.teamId],
      ["root", "key-1", "ada", "team-7"],
    );
    assert.deepEqual([plain?.parentRunId, plain?.apiKeyId, plain?.userId, plain?.teamId], ["", "", "", ""]);
  });

  test("setScopeLimit, clearScopeLimit and getScope", async () => {
    const { client, seen } = recordingClient();
    const set = await client.setScopeLimit({
      kind: ScopeKind.TEAM,
      scopeId: "team-7",
      period: Period.DAILY,
      limitMicros: 50_000_000n,
    });
    assert.equal(set.scope?.ref?.id, "team-7");
    assert.equal(set.scope?.usage[0]?.limitMicros, 50_000_000n);
    const cleared = await client.clearScopeLimit({ kind: ScopeKind.TEAM, scopeId: "team-7", period: Period.MONTHLY });
    assert.equal(cleared.scope?.usage[0]?.limitMicros, undefined);
    const got = await client.getScope({ kind: ScopeKind.USER, scopeId: "ada" });
    assert.deepEqual([got.scope?.ref?.kind, got.scope?.ref?.id], [ScopeKind.USER, "ada"]);

    const [limit, clear] = seen.setScopeLimit;
    assert.deepEqual([limit?.scope?.kind, limit?.scope?.id, limit?.period], [ScopeKind.TEAM, "team-7", Period.DAILY]);
    assert.deepEqual(limit?.ceiling, { case: "limitMicros", value: 50_000_000n });
    assert.equal(clear?.period, Period.MONTHLY);
    assert.deepEqual(clear?.ceiling, { case: "clear", value: true });
    assert.deepEqual([seen.getScope[0]?.scope?.kind, seen.getScope[0]?.scope?.id], [ScopeKind.USER, "ada"]);
  });

  test("setScopePolicy sends the policy, clearScopePolicy the clear", async () => {
    const { client, seen } = recordingClient();
    const team = { kind: ScopeKind.TEAM, scopeId: "team-7" };
    const set = await client.setScopePolicy({ ...team, policy: ADVISORY });
    assert.deepEqual([set.scope?.ref?.kind, set.scope?.ref?.id], [ScopeKind.TEAM, "team-7"]);
    const defaultPolicy = set.scope?.defaultPolicy;
    assert.ok(defaultPolicy !== undefined && equals(RunPolicySchema, defaultPolicy, toRunPolicy(ADVISORY)));
    const message = create(RunPolicySchema, { enforcementMode: EnforcementMode.SOFT_GATE, maxTokens: 100_000n });
    await client.setScopePolicy({ kind: ScopeKind.USER, scopeId: "ada", policy: message });
    message.maxTokens = 1n; // the call copied it
    await client.setScopePolicy({ ...team, policy: {} });
    const cleared = await client.clearScopePolicy(team);
    assert.equal(cleared.scope?.defaultPolicy, undefined);

    const [advisory, copied, empty, clear] = seen.setScopePolicy;
    assert.deepEqual([advisory?.scope?.kind, advisory?.scope?.id], [ScopeKind.TEAM, "team-7"]);
    assert.ok(advisory?.default.case === "policy");
    assert.ok(equals(RunPolicySchema, advisory.default.value, toRunPolicy(ADVISORY)));
    assert.deepEqual([copied?.scope?.kind, copied?.scope?.id], [ScopeKind.USER, "ada"]);
    assert.ok(copied?.default.case === "policy");
    assert.deepEqual(
      [copied.default.value.enforcementMode, copied.default.value.maxTokens],
      [EnforcementMode.SOFT_GATE, 100_000n],
    );
    // An empty policy (every field the server's default) is a policy, not a clear.
    assert.equal(empty?.default.case, "policy");
    assert.deepEqual([clear?.scope?.id, clear?.default], ["team-7", { case: "clear", value: true }]);
  });

  test("setScopePolicy rejects a bad policy before any call", async () => {
    const { client, seen } = recordingClient();
    await assert.rejects(
      client.setScopePolicy({ kind: ScopeKind.TEAM, scopeId: "team-7", policy: { approvalPercent: 12.5 } }),
      RangeError,
    );
    assert.equal(seen.setScopePolicy.length, 0);
  });

  test("setScopePolicy and clearScopePolicy are retried on UNAVAILABLE, up to the policy's attempts", async () => {
    const unavailable = () => [
      new ConnectError("shutting down", Code.Unavailable, undefined, [
        { desc: ErrorInfoSchema, value: { domain: "runcap.dev", reason: "SHUTTING_DOWN" } },
      ]),
      new ConnectError("connection refused", Code.Unavailable),
    ];
    const { client, seen } = recordingClient(undefined, unavailable());
    await client.setScopePolicy({ kind: ScopeKind.API_KEY, scopeId: "key-1", policy: ADVISORY });
    assert.equal(seen.setScopePolicy.length, 3);
    for (const request of seen.setScopePolicy) {
      assert.deepEqual(
        [request.scope?.kind, request.scope?.id, request.default.case],
        [ScopeKind.API_KEY, "key-1", "policy"],
      );
    }
    const retried = recordingClient(undefined, unavailable());
    await retried.client.clearScopePolicy({ kind: ScopeKind.API_KEY, scopeId: "key-1" });
    assert.deepEqual(
      retried.seen.setScopePolicy.map((r) => r.default),
      Array.from({ length: 3 }, () => ({ case: "clear", value: true })),
    );

    const down = Array.from({ length: 10 }, () => new ConnectError("down", Code.Unavailable));
    const gone = recordingClient(undefined, down);
    await assert.rejects(gone.client.clearScopePolicy({ kind: ScopeKind.USER, scopeId: "ada" }), UnavailableError);
    assert.equal(gone.seen.setScopePolicy.length, FAST.maxAttempts);
  });

  test("a block by a parent scope names it", async () => {
    const blocked = create(ReserveResponseSchema, {
      decision: Decision.BLOCK,
      reason: DecisionReason.INSUFFICIENT_BUDGET,
      state: { runId: "run-1", limitMicros: 1000n, remainingMicros: 1000n },
      blockingScope: { kind: ScopeKind.TEAM, id: "team-7" },
      blockingPeriod: Period.DAILY,
    });
    const { client } = recordingClient(blocked);
    const error = await withReservation(client, { runId: "run-1", amountMicros: 10n }, async () => "never").then(
      () => assert.fail("the reservation must be blocked"),
      (thrown: unknown) => thrown,
    );
    assert.ok(error instanceof BudgetBlockedError);
    assert.deepEqual([error.blockingScope?.kind, error.blockingScope?.id], [ScopeKind.TEAM, "team-7"]);
    assert.equal(error.blockingPeriod, Period.DAILY);
    assert.match(error.message, /blocked by TEAM "team-7", DAILY\)$/);

    const own = create(ReserveResponseSchema, {
      decision: Decision.BLOCK,
      reason: DecisionReason.INSUFFICIENT_BUDGET,
      blockingScope: { kind: ScopeKind.RUN, id: "run-1" },
      blockingPeriod: Period.LIFETIME,
    });
    assert.doesNotMatch(new BudgetBlockedError("run-1", own).message, /blocked by/);
    const unsaid = create(ReserveResponseSchema, { decision: Decision.BLOCK, reason: DecisionReason.RUN_CLOSED });
    const plain = new BudgetBlockedError("run-1", unsaid);
    assert.equal(plain.blockingScope, undefined);
    assert.equal(plain.blockingPeriod, Period.UNSPECIFIED);
    assert.doesNotMatch(plain.message, /blocked by/);
  });

  test("parent run errors are typed", () => {
    const missing = toRuncapError(
      new ConnectError("parent run missing", Code.NotFound, undefined, [
        {
          desc: ErrorInfoSchema,
          value: { domain: "runcap.dev", reason: "PARENT_RUN_NOT_FOUND", metadata: { run_id: "child", parent_run_id: "root" } },
        },
      ]),
    );
    assert.ok(missing instanceof ParentRunNotFoundError);
    assert.equal(missing.reason, ErrorReason.PARENT_RUN_NOT_FOUND);
    assert.deepEqual([missing.runId, missing.parentRunId], ["child", "root"]);

    const closed = toRuncapError(
      new ConnectError("parent run closed", Code.FailedPrecondition, undefined, [
        { desc: ErrorInfoSchema, value: { domain: "runcap.dev", reason: "PARENT_RUN_CLOSED", metadata: { run_id: "child" } } },
        {
          desc: PreconditionFailureSchema,
          value: { violations: [{ type: "PARENT_RUN_CLOSED", subject: "root", description: "closed" }] },
        },
      ]),
    );
    assert.ok(closed instanceof ParentRunClosedError);
    assert.equal(closed.reason, ErrorReason.PARENT_RUN_CLOSED);
    assert.deepEqual([closed.runId, closed.parentRunId], ["child", "root"]);
  });
});
