/**
 * Parent scopes: the requests createRun, setScopeLimit, clearScopeLimit and
 * getScope send, over an in-memory Connect transport that records them (no
 * server), the blocking scope of a BudgetBlockedError, and the parent run
 * errors.
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";

import {
  BudgetBlockedError,
  BudgetService,
  Decision,
  DecisionReason,
  ErrorReason,
  ParentRunClosedError,
  ParentRunNotFoundError,
  Period,
  ReserveResponseSchema,
  ScopeKind,
  createRuncapClient,
  toRuncapError,
  withReservation,
  type CreateRunRequest,
  type GetScopeRequest,
  type ReserveResponse,
  type SetScopeLimitRequest,
} from "../src/index.js";
import { ErrorInfoSchema, PreconditionFailureSchema } from "../src/gen/google/rpc/error_details_pb.js";

function recordingClient(reserve?: ReserveResponse) {
  const seen = {
    createRun: [] as CreateRunRequest[],
    setScopeLimit: [] as SetScopeLimitRequest[],
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
  return { client: createRuncapClient({ transport }), seen };
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
