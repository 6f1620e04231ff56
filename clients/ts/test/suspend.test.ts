/**
 * The kill switch: the requests suspendRun and resumeRun send, their retries
 * on UNAVAILABLE, and the RunClosedError of a closed run, over an in-memory
 * Connect transport that records them (no server).
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";

import {
  BudgetService,
  ERROR_TABLE,
  ErrorReason,
  ParentRunClosedError,
  RunClosedError,
  RunStatus,
  RuncapError,
  UnavailableError,
  createRuncapClient,
  errorClass,
  toRuncapError,
  type ResumeRunRequest,
  type RetryPolicy,
  type SuspendRunRequest,
} from "../src/index.js";
import { ErrorInfoSchema, PreconditionFailureSchema } from "../src/gen/google/rpc/error_details_pb.js";

const FAST: RetryPolicy = { maxAttempts: 4, initialBackoffMs: 1, maxBackoffMs: 5, multiplier: 2 };

function runcapError(code: Code, reason: string, runId = "run-1"): ConnectError {
  const details = [{ desc: ErrorInfoSchema, value: { domain: "runcap.dev", reason, metadata: { run_id: runId } } }];
  return new ConnectError(reason, code, undefined, details);
}

function runClosed(runId: string): ConnectError {
  return new ConnectError("run closed", Code.FailedPrecondition, undefined, [
    { desc: ErrorInfoSchema, value: { domain: "runcap.dev", reason: "RUN_CLOSED", metadata: { run_id: runId } } },
    {
      desc: PreconditionFailureSchema,
      value: { violations: [{ type: "RUN_CLOSED", subject: runId, description: "closed" }] },
    },
  ]);
}

/** A client over a transport that fails each call with the queued errors first, then answers. */
function recordingClient(failures: { suspendRun?: Error[]; resumeRun?: Error[] } = {}) {
  const seen = { suspendRun: [] as SuspendRunRequest[], resumeRun: [] as ResumeRunRequest[] };
  const suspended = new Set<string>();
  const transport = createRouterTransport(({ service }) => {
    service(BudgetService, {
      suspendRun(request) {
        seen.suspendRun.push(request);
        const failure = failures.suspendRun?.shift();
        if (failure !== undefined) throw failure;
        const replayed = suspended.has(request.runId);
        suspended.add(request.runId);
        return { state: { runId: request.runId, status: RunStatus.SUSPENDED }, replayed };
      },
      resumeRun(request) {
        seen.resumeRun.push(request);
        const failure = failures.resumeRun?.shift();
        if (failure !== undefined) throw failure;
        const replayed = !suspended.delete(request.runId);
        return { state: { runId: request.runId, status: RunStatus.OPEN }, replayed };
      },
    });
  });
  return { client: createRuncapClient({ transport, retry: FAST }), seen };
}

describe("kill switch", () => {
  test("suspendRun and resumeRun send the run and return its state", async () => {
    const { client, seen } = recordingClient();
    const suspended = await client.suspendRun({ runId: "run-1" });
    assert.deepEqual(
      [suspended.state?.runId, suspended.state?.status, suspended.replayed],
      ["run-1", RunStatus.SUSPENDED, false],
    );
    assert.equal((await client.suspendRun({ runId: "run-1" })).replayed, true);
    const resumed = await client.resumeRun({ runId: "run-1" });
    assert.deepEqual([resumed.state?.status, resumed.replayed], [RunStatus.OPEN, false]);
    assert.equal((await client.resumeRun({ runId: "run-1" })).replayed, true);
    assert.deepEqual(seen.suspendRun.map((r) => r.runId), ["run-1", "run-1"]);
    assert.deepEqual(seen.resumeRun.map((r) => r.runId), ["run-1", "run-1"]);
  });

  test("both are retried on UNAVAILABLE, up to the policy's attempts", async () => {
    const unavailable = () => [
      runcapError(Code.Unavailable, "SHUTTING_DOWN"),
      new ConnectError("connection refused", Code.Unavailable),
    ];
    const { client, seen } = recordingClient({ suspendRun: unavailable(), resumeRun: unavailable() });
    assert.equal((await client.suspendRun({ runId: "run-1" })).state?.status, RunStatus.SUSPENDED);
    assert.equal((await client.resumeRun({ runId: "run-1" })).state?.status, RunStatus.OPEN);
    assert.equal(seen.suspendRun.length, 3);
    assert.equal(seen.resumeRun.length, 3);

    const down = Array.from({ length: 10 }, () => new ConnectError("down", Code.Unavailable));
    const gone = recordingClient({ suspendRun: down });
    await assert.rejects(gone.client.suspendRun({ runId: "run-1" }), UnavailableError);
    assert.equal(gone.seen.suspendRun.length, FAST.maxAttempts);
  });

  test("a closed run rejects with RunClosedError, without a retry", async () => {
    const { client, seen } = recordingClient({ suspendRun: [runClosed("run-1")], resumeRun: [runClosed("run-2")] });
    const suspendError = await client.suspendRun({ runId: "run-1" }).then(
      () => assert.fail("suspending a closed run must fail"),
      (thrown: unknown) => thrown,
    );
    assert.ok(suspendError instanceof RunClosedError);
    assert.ok(suspendError instanceof RuncapError);
    assert.equal(suspendError.code, Code.FailedPrecondition);
    assert.equal(suspendError.reason, ErrorReason.RUN_CLOSED);
    assert.equal(suspendError.runId, "run-1");
    assert.equal(suspendError.retryable, false);
    await assert.rejects(client.resumeRun({ runId: "run-2" }), (error: unknown) => {
      assert.ok(error instanceof RunClosedError);
      assert.equal(error.runId, "run-2");
      return true;
    });
    assert.deepEqual([seen.suspendRun.length, seen.resumeRun.length], [1, 1]);
  });
});

describe("RunClosedError", () => {
  test("is the one ERROR_TABLE row of RUN_CLOSED", () => {
    const rows = ERROR_TABLE.filter((row) => row.reason === ErrorReason.RUN_CLOSED);
    assert.deepEqual(rows, [{ reason: ErrorReason.RUN_CLOSED, code: Code.FailedPrecondition, error: RunClosedError }]);
    assert.equal(errorClass(Code.FailedPrecondition, ErrorReason.RUN_CLOSED), RunClosedError);
  });

  test("reads the run from the precondition when the metadata lacks it, and is not a parent run error", () => {
    const bare = toRuncapError(
      new ConnectError("run closed", Code.FailedPrecondition, undefined, [
        { desc: ErrorInfoSchema, value: { domain: "runcap.dev", reason: "RUN_CLOSED" } },
        {
          desc: PreconditionFailureSchema,
          value: { violations: [{ type: "RUN_CLOSED", subject: "run-9", description: "" }] },
        },
      ]),
    );
    assert.ok(bare instanceof RunClosedError);
    assert.ok(!(bare instanceof ParentRunClosedError));
    assert.equal(bare.runId, "run-9");
    const foreign = toRuncapError(
      new ConnectError("closed", Code.FailedPrecondition, undefined, [
        { desc: ErrorInfoSchema, value: { domain: "proxy.example", reason: "RUN_CLOSED" } },
      ]),
    );
    assert.ok(!(foreign instanceof RunClosedError));
    assert.equal(foreign.reason, ErrorReason.UNSPECIFIED);
  });
});
