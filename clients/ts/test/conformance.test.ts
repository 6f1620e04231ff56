/**
 * The TypeScript driver of the shared client conformance scenario
 * (tests/conformance/scenario.json, also run by the Python and Go drivers).
 *
 * Every step runs in order, through the public client API only, against a
 * live server: one started by ./server.ts (memory backend), or the one at
 * $RUNCAP_CONFORMANCE_TARGET (host:port) when set. Each step is one test
 * named after it, and every failure message starts with the step.
 *
 * The driver is strict about the file: an unknown op, argument or
 * expectation, or an enum name the generated code does not know, fails the
 * step instead of being ignored.
 */

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { inspect } from "node:util";

import type { DescEnum, DescMessage } from "@bufbuild/protobuf";

import {
  BudgetStateSchema,
  CloseRunResponseSchema,
  Code,
  CommitResponseSchema,
  CreateRunResponseSchema,
  DecisionReasonSchema,
  DecisionSchema,
  ERROR_TABLE,
  ErrorReasonSchema,
  EventTypeSchema,
  GetRunResponseSchema,
  RefundResponseSchema,
  ReserveResponseSchema,
  RunSchema,
  RuncapError,
  createRuncapClient,
  watch,
  type RuncapClient,
  type WatchResponse,
  type WatchStream,
} from "../src/index.js";
import { RuncapServer, uniqueId } from "./server.js";

// ---------------------------------------------------------------------------
// The scenario file

const SCENARIO_PATH = join("tests", "conformance", "scenario.json");

/** Walks up from this file (test/ or dist/test/) to the directory holding tests/conformance/scenario.json. */
function findScenario(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = join(dir, SCENARIO_PATH);
    if (existsSync(candidate)) return candidate;
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`${SCENARIO_PATH} not found above ${fileURLToPath(import.meta.url)}`);
    dir = parent;
  }
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

interface Step {
  readonly index: number;
  readonly name: string;
  readonly op: string;
  /** Everything but name, op and expect. */
  readonly args: JsonObject;
  readonly expect: JsonObject;
}

function isObject(value: Json | undefined): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function loadSteps(path: string): Step[] {
  const root = JSON.parse(readFileSync(path, "utf8")) as Json;
  if (!isObject(root) || !Array.isArray(root["steps"])) throw new Error(`${path}: no "steps" list`);
  return root["steps"].map((raw, i) => {
    if (!isObject(raw)) throw new Error(`${path}: step ${i + 1} is not an object`);
    const { name, op, expect, ...args } = raw;
    if (typeof name !== "string" || typeof op !== "string") {
      throw new Error(`${path}: step ${i + 1} needs a string "name" and "op"`);
    }
    if (!isObject(expect)) throw new Error(`${path}: step ${i + 1} (${name}) needs an "expect" object`);
    return { index: i + 1, name, op, args, expect };
  });
}

// ---------------------------------------------------------------------------
// Failures that name their step

class StepFailure extends assert.AssertionError {}

/** One-line rendering for failure messages (lists of revisions included). */
const show = (value: unknown): string =>
  Array.isArray(value) ? `[${value.map(show).join(", ")}]` : inspect(value, { depth: 6, breakLength: Infinity });

/** Assertions and argument access for one step; every message starts with the step. */
class StepContext {
  constructor(
    readonly step: Step,
    private readonly variables: Map<string, string>,
  ) {}

  get label(): string {
    return `step ${this.step.index} "${this.step.name}" (${this.step.op})`;
  }

  fail(message: string): never {
    throw new StepFailure({ message: `${this.label}: ${message}` });
  }

  equal(actual: unknown, expected: unknown, what: string): void {
    try {
      assert.deepStrictEqual(actual, expected);
    } catch {
      this.fail(`${what}: got ${show(actual)}, want ${show(expected)}`);
    }
  }

  /** Fails on arguments / expectations this driver would otherwise silently ignore. */
  only(kind: "argument" | "expectation", object: JsonObject, known: readonly string[]): void {
    const unknown = Object.keys(object).filter((key) => !known.includes(key));
    if (unknown.length > 0) this.fail(`unknown ${kind}(s) ${unknown.join(", ")} (the driver knows ${known.join(", ")})`);
  }

  private raw(key: string, required: boolean): Json | undefined {
    const value = this.step.args[key];
    if (value === undefined && required) this.fail(`missing argument "${key}"`);
    return value;
  }

  /** A string argument; "$name" is a variable, a fresh id per execution. */
  str(key: string): string {
    const value = this.raw(key, true);
    if (typeof value !== "string") this.fail(`argument "${key}" is not a string: ${show(value)}`);
    return this.resolve(value);
  }

  int(key: string): number {
    const value = this.raw(key, true);
    if (typeof value !== "number" || !Number.isSafeInteger(value)) {
      this.fail(`argument "${key}" is not a safe integer: ${show(value)}`);
    }
    return value;
  }

  optInt(key: string): number | undefined {
    return this.raw(key, false) === undefined ? undefined : this.int(key);
  }

  labels(key: string): Record<string, string> | undefined {
    const value = this.raw(key, false);
    if (value === undefined) return undefined;
    if (!isObject(value) || !Object.values(value).every((v) => typeof v === "string")) {
      this.fail(`argument "${key}" is not a map of strings: ${show(value)}`);
    }
    return value as Record<string, string>;
  }

  resolve(value: string): string {
    if (!value.startsWith("$")) return value;
    let id = this.variables.get(value);
    if (id === undefined) {
      id = uniqueId(`conf-${value.slice(1)}`);
      this.variables.set(value, id);
    }
    return id;
  }

  /** The full proto name of an enum value ("RUN_STATUS_OPEN"), failing on numbers the enum lacks. */
  enumName(desc: DescEnum, value: unknown, what: string): string {
    const found = desc.values.find((v) => v.number === value);
    if (found === undefined) this.fail(`${what}: ${show(value)} is not a value of ${desc.typeName}`);
    return found.name;
  }

  /** Checks that a scenario enum name exists, so that a typo fails as a scenario problem. */
  knownEnumName(desc: DescEnum, name: Json | undefined, what: string): string {
    if (typeof name !== "string" || !desc.values.some((v) => v.name === name)) {
      this.fail(`${what}: the scenario names ${show(name)}, which is not a value of ${desc.typeName}`);
    }
    return name;
  }

  /**
   * Compares the listed fields of `message` (scenario keys are proto field
   * names) by the message's descriptor: int64 as bigint, enums by their full
   * proto names, nested messages recursively, maps as plain objects.
   */
  fields(desc: DescMessage, message: unknown, expected: JsonObject, path: string): void {
    if (message === undefined || message === null) this.fail(`${path}: missing (want ${show(expected)})`);
    const record = message as Record<string, unknown>;
    for (const [key, want] of Object.entries(expected)) {
      const field = desc.fields.find((f) => f.name === key);
      const where = `${path}.${key}`;
      if (field === undefined) this.fail(`${where}: ${desc.typeName} has no field "${key}"`);
      const got = record[field.localName];
      switch (field.fieldKind) {
        case "message":
          if (!isObject(want)) this.fail(`${where}: the scenario gives ${show(want)} for a message`);
          this.fields(field.message, got, want, where);
          break;
        case "enum":
          this.equal(
            this.enumName(field.enum, got, where),
            this.knownEnumName(field.enum, want, where),
            where,
          );
          break;
        case "map":
          this.equal({ ...(got as object) }, want, where);
          break;
        case "scalar":
          if (typeof got === "bigint") {
            if (typeof want !== "number" && typeof want !== "string") this.fail(`${where}: want ${show(want)} for an int64`);
            this.equal(got, BigInt(want), where);
          } else {
            this.equal(got, want, where);
          }
          break;
        default:
          this.fail(`${where}: ${field.fieldKind} fields are not supported by the driver`);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Errors

/** gRPC status code names by Connect code (Connect's numbers are gRPC's). */
const GRPC_CODE_NAMES: Readonly<Record<Code, string>> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

const ERROR_KEYS = ["code", "reason", "field_violations"] as const;

/** Checks a thrown value against an `expect.error` object. */
function checkError(ctx: StepContext, thrown: unknown, expected: Json | undefined): void {
  if (!isObject(expected)) ctx.fail(`expect.error is not an object: ${show(expected)}`);
  ctx.only("expectation", expected, ERROR_KEYS);
  if (!(thrown instanceof RuncapError)) ctx.fail(`threw something other than a RuncapError: ${show(thrown)}`);
  const detail = ` (${thrown.toString()})`;
  if (expected["code"] !== undefined) {
    ctx.equal(GRPC_CODE_NAMES[thrown.code] ?? `code ${thrown.code}`, expected["code"], `error code${detail}`);
  }
  const reason = expected["reason"];
  if (reason !== undefined) {
    ctx.equal(thrown.reasonName, reason, `error reason${detail}`);
    // The typed error: the reason enum and the error class of the client's error table.
    const enumName = ctx.knownEnumName(ErrorReasonSchema, `ERROR_REASON_${String(reason)}`, "error reason");
    ctx.equal(ctx.enumName(ErrorReasonSchema, thrown.reason, "error.reason"), enumName, `error.reason${detail}`);
    const row = ERROR_TABLE.find((r) => r.reason === thrown.reason);
    if (row === undefined) ctx.fail(`no ERROR_TABLE row for ${enumName}`);
    const className = thrown.name;
    if (!(thrown instanceof row.error)) ctx.fail(`error class: got ${className}, want ${row.error.name}${detail}`);
  }
  const violations = expected["field_violations"];
  if (violations !== undefined) {
    const fields = thrown.fieldViolations.map((v) => v.field).sort();
    ctx.equal(fields, violations, `error field_violations${detail}`);
  }
}

// ---------------------------------------------------------------------------
// Watch helpers

const WATCH_TIMEOUT_MS = 10_000;

/**
 * Reads events from `stream` until one reaches `untilRevision` (or `limit`
 * events were read), skipping progress heartbeats. A snapshot fails the step
 * unless `allowSnapshot`. Typed errors propagate.
 */
async function readEvents(
  ctx: StepContext,
  stream: WatchStream,
  untilRevision: bigint,
  limit = Number.POSITIVE_INFINITY,
): Promise<WatchResponse[]> {
  const events: WatchResponse[] = [];
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    stream.close();
  }, WATCH_TIMEOUT_MS);
  try {
    for await (const message of stream) {
      if (message.kind.case === "progress") continue;
      if (message.kind.case !== "event") {
        ctx.fail(`unexpected ${message.kind.case ?? "empty"} message at revision ${message.revision} on a resumed watch`);
      }
      events.push(message);
      if (message.revision >= untilRevision || events.length >= limit) return events;
    }
  } finally {
    clearTimeout(timer);
  }
  ctx.fail(
    `the watch ${timedOut ? `timed out after ${WATCH_TIMEOUT_MS} ms` : "ended"} after revisions ` +
      `${show(events.map((m) => m.revision))}, before revision ${untilRevision}`,
  );
}

async function firstMessage(ctx: StepContext, stream: WatchStream): Promise<WatchResponse> {
  const timer = setTimeout(() => stream.close(), WATCH_TIMEOUT_MS);
  try {
    const first = await stream.next();
    if (first.done) ctx.fail("the watch ended (or timed out) before its first message");
    return first.value;
  } finally {
    clearTimeout(timer);
    await stream.return();
  }
}

// ---------------------------------------------------------------------------
// The ops

/** Runs `call`; with `expect.error`, checks the error, else returns the result for the caller's checks. */
async function unary<T>(ctx: StepContext, call: () => Promise<T>): Promise<T | undefined> {
  const { error } = ctx.step.expect;
  let result: T;
  try {
    result = await call();
  } catch (thrown) {
    if (error === undefined) ctx.fail(`unexpected error: ${thrown instanceof RuncapError ? thrown.toString() : show(thrown)}`);
    checkError(ctx, thrown, error);
    return undefined;
  }
  if (error !== undefined) ctx.fail(`succeeded, want error ${show(error)}; got ${show(result)}`);
  return result;
}

/** Checks a unary response: `expect` keys are the response's proto fields, plus "error". */
function checkResponse(ctx: StepContext, desc: DescMessage, response: unknown): void {
  const { error: _error, ...fields } = ctx.step.expect;
  ctx.fields(desc, response, fields, "response");
}

type Op = (ctx: StepContext, client: RuncapClient) => Promise<void>;

const OPS: Record<string, { args: readonly string[]; expect: readonly string[]; run: Op }> = {
  create_run: {
    args: ["run_id", "limit_micros", "labels"],
    expect: ["replayed", "state", "error"],
    async run(ctx: StepContext, client: RuncapClient) {
      const labels = ctx.labels("labels");
      const response = await unary(ctx, () =>
        client.createRun({
          runId: ctx.str("run_id"),
          limitMicros: BigInt(ctx.int("limit_micros")),
          ...(labels !== undefined ? { labels } : {}),
        }),
      );
      if (response !== undefined) checkResponse(ctx, CreateRunResponseSchema, response);
    },
  },

  get_run: {
    args: ["run_id"],
    expect: ["state", "labels", "run", "error"],
    async run(ctx: StepContext, client: RuncapClient) {
      const response = await unary(ctx, () => client.getRun(ctx.str("run_id")));
      if (response === undefined) return;
      const { error: _error, labels, ...fields } = ctx.step.expect;
      ctx.fields(GetRunResponseSchema, response, fields, "response");
      // The labels are the run's configuration: GetRunResponse.run.labels.
      if (labels !== undefined) ctx.fields(RunSchema, response.run, { labels }, "response.run");
    },
  },

  reserve: {
    args: ["run_id", "reservation_id", "amount_micros", "ttl_ms"],
    expect: ["decision", "reason", "replayed", "amount_micros", "state", "error"],
    async run(ctx: StepContext, client: RuncapClient) {
      const ttl = ctx.optInt("ttl_ms");
      const response = await unary(ctx, () =>
        client.reserve({
          runId: ctx.str("run_id"),
          reservationId: ctx.str("reservation_id"),
          amountMicros: BigInt(ctx.int("amount_micros")),
          ...(ttl !== undefined ? { ttl } : {}),
        }),
      );
      if (response !== undefined) checkResponse(ctx, ReserveResponseSchema, response);
    },
  },

  commit: {
    args: ["run_id", "reservation_id", "actual_micros"],
    expect: ["replayed", "reservation_status", "overrun_micros", "state", "error"],
    async run(ctx: StepContext, client: RuncapClient) {
      const response = await unary(ctx, () =>
        client.commit({
          runId: ctx.str("run_id"),
          reservationId: ctx.str("reservation_id"),
          actualMicros: BigInt(ctx.int("actual_micros")),
        }),
      );
      if (response !== undefined) checkResponse(ctx, CommitResponseSchema, response);
    },
  },

  refund: {
    args: ["run_id", "reservation_id"],
    expect: ["replayed", "reservation_status", "released_micros", "state", "error"],
    async run(ctx: StepContext, client: RuncapClient) {
      const response = await unary(ctx, () =>
        client.refund({ runId: ctx.str("run_id"), reservationId: ctx.str("reservation_id") }),
      );
      if (response !== undefined) checkResponse(ctx, RefundResponseSchema, response);
    },
  },

  close_run: {
    args: ["run_id"],
    expect: ["replayed", "state", "error"],
    async run(ctx: StepContext, client: RuncapClient) {
      const response = await unary(ctx, () => client.closeRun(ctx.str("run_id")));
      if (response !== undefined) checkResponse(ctx, CloseRunResponseSchema, response);
    },
  },

  reserve_concurrently: {
    args: ["run_id", "count", "amount_micros", "id_prefix"],
    expect: ["allowed", "blocked", "block_reason", "state"],
    async run(ctx: StepContext, client: RuncapClient) {
      const runId = ctx.str("run_id");
      const count = ctx.int("count");
      const amountMicros = BigInt(ctx.int("amount_micros"));
      const prefix = ctx.str("id_prefix");
      const { expect } = ctx.step;
      const responses = await Promise.all(
        Array.from({ length: count }, (_, i) =>
          client.reserve({ runId, reservationId: `${prefix}${i}`, amountMicros }).catch((thrown: unknown) =>
            ctx.fail(`reserve ${prefix}${i}: ${thrown instanceof RuncapError ? thrown.toString() : show(thrown)}`),
          ),
        ),
      );
      const decisions = responses.map((r) => ctx.enumName(DecisionSchema, r.decision, `${r.reservationId}.decision`));
      const other = decisions.filter((d) => d !== "DECISION_ALLOW" && d !== "DECISION_BLOCK");
      if (other.length > 0) ctx.fail(`decisions other than allow/block: ${show(other)}`);
      if (expect["allowed"] !== undefined) {
        ctx.equal(decisions.filter((d) => d === "DECISION_ALLOW").length, expect["allowed"], "allowed");
      }
      if (expect["blocked"] !== undefined) {
        ctx.equal(decisions.filter((d) => d === "DECISION_BLOCK").length, expect["blocked"], "blocked");
      }
      if (expect["block_reason"] !== undefined) {
        const want = ctx.knownEnumName(DecisionReasonSchema, expect["block_reason"], "block_reason");
        for (const response of responses) {
          if (ctx.enumName(DecisionSchema, response.decision, "decision") !== "DECISION_BLOCK") continue;
          ctx.equal(
            ctx.enumName(DecisionReasonSchema, response.reason, "reason"),
            want,
            `reason of blocked reservation ${response.reservationId}`,
          );
        }
      }
      const state = expect["state"];
      if (state !== undefined) {
        if (!isObject(state)) ctx.fail(`expect.state is not an object: ${show(state)}`);
        const run = await client.getRun(runId).catch((thrown: unknown) => ctx.fail(`getRun: ${show(thrown)}`));
        ctx.fields(BudgetStateSchema, run.state, state, "getRun.state");
      }
    },
  },

  watch: {
    args: ["run_id", "after_revision", "until_revision"],
    expect: ["revisions", "event_types", "error"],
    async run(ctx: StepContext, client: RuncapClient) {
      const { expect } = ctx.step;
      const stream = watch(client, ctx.str("run_id"), { afterRevision: BigInt(ctx.int("after_revision")) });
      const until = BigInt(ctx.int("until_revision"));
      let events: WatchResponse[];
      try {
        events = await readEvents(ctx, stream, until);
      } catch (thrown) {
        if (thrown instanceof StepFailure) throw thrown;
        if (expect["error"] === undefined) {
          ctx.fail(`unexpected error: ${thrown instanceof RuncapError ? thrown.toString() : show(thrown)}`);
        }
        checkError(ctx, thrown, expect["error"]);
        return;
      } finally {
        stream.close();
      }
      if (expect["error"] !== undefined) ctx.fail(`got revisions ${show(events.map((m) => m.revision))}, want error ${show(expect["error"])}`);
      checkRevisions(ctx, events, expect["revisions"]);
      const types = expect["event_types"];
      if (types !== undefined) {
        if (!Array.isArray(types)) ctx.fail(`expect.event_types is not a list`);
        types.forEach((t, i) => ctx.knownEnumName(EventTypeSchema, t, `event_types[${i}]`));
        ctx.equal(
          events.map((m) => (m.kind.case === "event" ? ctx.enumName(EventTypeSchema, m.kind.value.type, "event.type") : "")),
          types,
          "event types",
        );
      }
    },
  },

  watch_snapshot: {
    args: ["run_id"],
    expect: ["revision", "state"],
    async run(ctx: StepContext, client: RuncapClient) {
      const first = await firstMessage(ctx, watch(client, ctx.str("run_id"))).catch((thrown: unknown) => {
        if (thrown instanceof StepFailure) throw thrown;
        return ctx.fail(`unexpected error: ${thrown instanceof RuncapError ? thrown.toString() : show(thrown)}`);
      });
      if (first.kind.case !== "snapshot") ctx.fail(`the first message is a ${first.kind.case ?? "empty"} message, not a snapshot`);
      const { revision, state } = ctx.step.expect;
      if (revision !== undefined) {
        if (typeof revision !== "number") ctx.fail(`expect.revision is not a number`);
        ctx.equal(first.revision, BigInt(revision), "snapshot message revision");
      }
      if (state !== undefined) {
        if (!isObject(state)) ctx.fail(`expect.state is not an object: ${show(state)}`);
        ctx.fields(BudgetStateSchema, first.kind.value, state, "snapshot");
      }
    },
  },

  watch_resume: {
    args: ["run_id", "after_revision", "disconnect_after", "until_revision"],
    expect: ["revisions"],
    async run(ctx: StepContext, client: RuncapClient) {
      const runId = ctx.str("run_id");
      const until = BigInt(ctx.int("until_revision"));
      const disconnectAfter = ctx.int("disconnect_after");
      const guard = async (work: () => Promise<WatchResponse[]>): Promise<WatchResponse[]> =>
        work().catch((thrown: unknown) => {
          if (thrown instanceof StepFailure) throw thrown;
          return ctx.fail(`unexpected error: ${thrown instanceof RuncapError ? thrown.toString() : show(thrown)}`);
        });

      // The first stream: read `disconnect_after` events, then drop it.
      const first = watch(client, runId, { afterRevision: BigInt(ctx.int("after_revision")) });
      const before = await guard(() => readEvents(ctx, first, until, disconnectAfter));
      await first.return();
      if (before.length !== disconnectAfter && before.at(-1)?.revision !== until) {
        ctx.fail(`read ${before.length} events before the disconnect, want ${disconnectAfter}`);
      }
      const resumeFrom = first.lastRevision;
      ctx.equal(resumeFrom, before.at(-1)?.revision, "WatchStream.lastRevision after the disconnect");

      // The second stream resumes from the last revision seen.
      const second = watch(client, runId, resumeFrom === undefined ? {} : { afterRevision: resumeFrom });
      let rest: WatchResponse[] = [];
      try {
        if (resumeFrom === undefined || resumeFrom < until) rest = await guard(() => readEvents(ctx, second, until));
      } finally {
        second.close();
      }
      checkRevisions(ctx, [...before, ...rest], ctx.step.expect["revisions"]);
    },
  },
};

function checkRevisions(ctx: StepContext, events: WatchResponse[], expected: Json | undefined): void {
  if (expected === undefined) return;
  if (!Array.isArray(expected) || !expected.every((r) => typeof r === "number")) {
    ctx.fail(`expect.revisions is not a list of numbers: ${show(expected)}`);
  }
  ctx.equal(
    events.map((m) => m.revision),
    expected.map((r) => BigInt(r as number)),
    "event revisions",
  );
}

// ---------------------------------------------------------------------------
// The test

/** $RUNCAP_CONFORMANCE_SCENARIO runs another scenario file (for example a mutated copy, to see the driver fail). */
const scenarioPath = process.env["RUNCAP_CONFORMANCE_SCENARIO"] || findScenario();
const steps = loadSteps(scenarioPath);

describe(`conformance scenario ${scenarioPath}`, () => {
  let server: RuncapServer | undefined;
  let client: RuncapClient;
  /** "$run", "$race"... → fresh ids, for this execution. */
  const variables = new Map<string, string>();

  before(async () => {
    const target = process.env["RUNCAP_CONFORMANCE_TARGET"];
    if (target === undefined || target === "") server = await RuncapServer.start();
    client = createRuncapClient({ target: target || server?.target });
  });

  after(async () => {
    client?.close();
    await server?.kill();
  });

  for (const step of steps) {
    test(`${step.index}. ${step.name}`, { timeout: 30_000 }, async () => {
      const ctx = new StepContext(step, variables);
      const op = OPS[step.op];
      if (op === undefined) ctx.fail(`unknown op (the driver knows ${Object.keys(OPS).join(", ")})`);
      ctx.only("argument", step.args, op.args);
      ctx.only("expectation", step.expect, op.expect);
      const besides = Object.keys(step.expect).filter((key) => key !== "error");
      if (step.expect["error"] !== undefined && besides.length > 0) {
        ctx.fail(`a step that expects an error can expect nothing else, got ${besides.join(", ")} too`);
      }
      await op.run(ctx, client);
    });
  }
});
