/** watch() against live servers: ordering, OUT_OF_RANGE, and resuming across a restart. */

import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import type { Interceptor } from "@connectrpc/connect";

import {
  EventType,
  RevisionOutOfRangeError,
  createRuncapClient,
  watch,
  type RuncapClient,
  type WatchRequest,
  type WatchResponse,
  type WatchStream,
} from "../src/index.js";
import { RuncapServer, freePort, uniqueId } from "./server.js";

/** Reads messages until `done` says so, or fails after `timeoutMs`. */
async function collect(
  stream: WatchStream,
  done: (messages: WatchResponse[]) => boolean,
  timeoutMs = 20_000,
): Promise<WatchResponse[]> {
  const messages: WatchResponse[] = [];
  const timer = setTimeout(() => stream.close(), timeoutMs);
  try {
    for await (const message of stream) {
      messages.push(message);
      if (done(messages)) return messages;
    }
  } finally {
    clearTimeout(timer);
  }
  throw new Error(`stream ended after ${messages.length} messages`);
}

/** Polls `condition` every 20 ms; fails after `timeoutMs`. */
async function waitFor(condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("timed out waiting");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const events = (messages: WatchResponse[]): WatchResponse[] =>
  messages.filter((m) => m.kind.case === "event");

/** The digest of the state a snapshot or event carries ("" for progress). */
const digestOf = (message: WatchResponse | undefined): string => {
  const kind = message?.kind;
  if (kind?.case === "snapshot") return kind.value.digest;
  if (kind?.case === "event") return kind.value.state?.digest ?? "";
  return "";
};

/** An interceptor that records every Watch request sent (one per connect). */
function recordWatchRequests(requests: WatchRequest[]): Interceptor {
  return (next) => async (req) => {
    if (req.method.name !== "Watch" || !req.stream) return next(req);
    const messages = req.message as AsyncIterable<WatchRequest>;
    async function* recorded(): AsyncGenerator<WatchRequest> {
      for await (const message of messages) {
        requests.push(message);
        yield message;
      }
    }
    return next({ ...req, message: recorded() });
  };
}

describe("watch on one server", () => {
  let server: RuncapServer;
  let client: RuncapClient;

  before(async () => {
    // A short log, so that old resume points fall out of it.
    server = await RuncapServer.start({ env: { RUNCAP_LOG_RETENTION: "5", RUNCAP_WATCH_HEARTBEAT: "200ms" } });
    client = createRuncapClient({ target: server.target });
  });

  after(async () => {
    client?.close();
    await server?.kill();
  });

  test("a snapshot, then every event in revision order", async () => {
    const runId = uniqueId("run");
    await client.createRun({ runId, limitMicros: 1_000n });
    const stream = watch(client, runId);
    const iterator = stream[Symbol.asyncIterator]();
    const first = await iterator.next();
    assert.equal(first.done, false);
    assert.equal(first.value?.kind.case, "snapshot");
    assert.equal(first.value?.revision, 1n);

    await client.reserve({ runId, amountMicros: 100n, reservationId: "a" });
    await client.reserve({ runId, amountMicros: 200n, reservationId: "b" });
    await client.commit({ runId, reservationId: "a", actualMicros: 90n });
    await client.refund({ runId, reservationId: "b" });
    await client.closeRun(runId);

    // Read on until a heartbeat follows the last event.
    const messages = await collect(
      stream,
      (seen) => events(seen).length === 5 && seen.at(-1)?.kind.case === "progress",
    );
    assert.equal(messages.at(-1)?.revision, 6n, "a heartbeat repeats the last revision");
    const changes = events(messages);
    assert.deepEqual(changes.map((m) => m.revision), [2n, 3n, 4n, 5n, 6n]);
    assert.deepEqual(
      changes.map((m) => (m.kind.case === "event" ? m.kind.value.type : undefined)),
      [EventType.RESERVED, EventType.RESERVED, EventType.COMMITTED, EventType.REFUNDED, EventType.CLOSED],
    );
    const last = changes[4];
    assert.equal(last?.kind.case === "event" && last.kind.value.state?.committedMicros, 90n);
    assert.equal(stream.lastRevision, 6n);
  });

  test("resuming after a revision replays only later changes", async () => {
    const runId = uniqueId("run");
    await client.createRun({ runId, limitMicros: 1_000n });
    await client.reserve({ runId, amountMicros: 1n, reservationId: "a" });
    await client.reserve({ runId, amountMicros: 1n, reservationId: "b" });
    const messages = await collect(watch(client, runId, { afterRevision: 1n }), (seen) => events(seen).length === 2);
    assert.equal(messages[0]?.kind.case, "event");
    assert.deepEqual(events(messages).map((m) => m.revision), [2n, 3n]);
  });

  test("OUT_OF_RANGE: RevisionOutOfRangeError, or a fresh snapshot when asked", async () => {
    const runId = uniqueId("run");
    await client.createRun({ runId, limitMicros: 1_000n });
    for (let i = 0; i < 8; i++) await client.reserve({ runId, amountMicros: 1n });
    const error = await collect(watch(client, runId, { afterRevision: 1n }), () => true).catch((e: unknown) => e);
    assert.ok(error instanceof RevisionOutOfRangeError, String(error));
    assert.equal(error.afterRevision, 1n);
    assert.equal(error.head, 9n);
    assert.ok((error.floor ?? 0n) > 2n);

    const ahead = await collect(watch(client, runId, { afterRevision: 99n }), () => true).catch((e: unknown) => e);
    assert.ok(ahead instanceof RevisionOutOfRangeError, String(ahead));

    const reset = await collect(
      watch(client, runId, { afterRevision: 1n, resnapshotOnOutOfRange: true }),
      () => true,
    );
    assert.equal(reset[0]?.kind.case, "snapshot");
    assert.equal(reset[0]?.revision, 9n);
  });

  test("afterDigest: resumes on a matching history, OUT_OF_RANGE (diverged) on another", async () => {
    const runId = uniqueId("run");
    await client.createRun({ runId, limitMicros: 1_000n });
    await client.reserve({ runId, amountMicros: 1n, reservationId: "a" });
    const first = watch(client, runId);
    const seen = await collect(first, (messages) => messages.some((m) => m.revision === 2n));
    first.close();
    assert.equal(seen[0]?.kind.case, "snapshot");
    assert.match(digestOf(seen[0]), /.+/, "a snapshot carries a digest");
    assert.equal(first.lastRevision, 2n);
    assert.equal(first.lastDigest, digestOf(seen[0]), "the digest of the last message delivered");

    // Two more changes; resuming with the digest seen at revision 2 continues from there.
    await client.reserve({ runId, amountMicros: 1n, reservationId: "b" });
    await client.reserve({ runId, amountMicros: 1n, reservationId: "c" });
    const resumed = watch(client, runId, { afterRevision: first.lastRevision, afterDigest: first.lastDigest });
    const later = await collect(resumed, (messages) => events(messages).length === 2);
    resumed.close();
    assert.deepEqual(events(later).map((m) => m.revision), [3n, 4n]);
    assert.equal(resumed.lastDigest, digestOf(later.at(-1)));
    assert.notEqual(resumed.lastDigest, first.lastDigest, "each change moves the digest on");

    // A digest that is not the server's history at that revision: diverged.
    const wrong = "0".repeat(first.lastDigest.length || 64);
    const error = await collect(
      watch(client, runId, { afterRevision: 2n, afterDigest: wrong }),
      () => true,
    ).catch((e: unknown) => e);
    assert.ok(error instanceof RevisionOutOfRangeError, String(error));
    assert.equal(error.diverged, true);
    assert.equal(error.afterRevision, 2n);
    assert.equal(error.head, 4n);

    // A trimmed or too-new resume point is not a divergence.
    const ahead = await collect(watch(client, runId, { afterRevision: 99n }), () => true).catch((e: unknown) => e);
    assert.ok(ahead instanceof RevisionOutOfRangeError, String(ahead));
    assert.equal(ahead.diverged, false);

    // With resnapshotOnOutOfRange the stream starts over from a fresh snapshot,
    // and its next resume point carries that snapshot's digest.
    const reset = watch(client, runId, { afterRevision: 2n, afterDigest: wrong, resnapshotOnOutOfRange: true });
    const fresh = await collect(reset, () => true);
    reset.close();
    assert.equal(fresh[0]?.kind.case, "snapshot");
    assert.equal(fresh[0]?.revision, 4n);
    assert.equal(reset.lastRevision, 4n);
    assert.equal(reset.lastDigest, digestOf(later.at(-1)), "the snapshot at 4 has the digest of event 4");
  });

  test("afterDigest is sent on every resume, cleared on a re-snapshot", async () => {
    const requests: WatchRequest[] = [];
    const recording = createRuncapClient({ target: server.target, interceptors: [recordWatchRequests(requests)] });
    try {
      const runId = uniqueId("run");
      await recording.createRun({ runId, limitMicros: 1_000n });
      await recording.reserve({ runId, amountMicros: 1n });
      const stream = watch(recording, runId, {
        afterRevision: 1n,
        afterDigest: "not-the-digest",
        resnapshotOnOutOfRange: true,
      });
      const messages = await collect(stream, () => true);
      stream.close();
      assert.equal(messages[0]?.kind.case, "snapshot");
      assert.equal(requests.length, 2);
      assert.equal(requests[0]?.afterRevision, 1n);
      assert.equal(requests[0]?.afterDigest, "not-the-digest");
      assert.equal(requests[1]?.afterRevision, undefined, "the re-snapshot does not resume");
      assert.equal(requests[1]?.afterDigest, "", "nor send the stale digest");
    } finally {
      recording.close();
    }
  });

  test("an aborted signal ends the iteration quietly", async () => {
    const runId = uniqueId("run");
    await client.createRun({ runId, limitMicros: 1_000n });
    const controller = new AbortController();
    const seen: WatchResponse[] = [];
    for await (const message of watch(client, runId, { signal: controller.signal })) {
      seen.push(message);
      controller.abort();
    }
    assert.equal(seen.length, 1);
  });
});

describe("watch across a server restart", () => {
  let dir: string;
  let server: RuncapServer | undefined;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "runcap-ts-"));
  });

  after(async () => {
    await server?.kill();
    await rm(dir, { recursive: true, force: true });
  });

  test("resumes from the last revision with no duplicate and no gap", { timeout: 45_000 }, async () => {
    const port = await freePort();
    const options = { listen: `127.0.0.1:${port}`, sqlitePath: join(dir, "x.db") };
    server = await RuncapServer.start(options);
    const writer = createRuncapClient({ target: `127.0.0.1:${port}` });
    const requests: WatchRequest[] = [];
    const watcher = createRuncapClient({
      target: `127.0.0.1:${port}`,
      interceptors: [recordWatchRequests(requests)],
    });
    try {
      const runId = uniqueId("run");
      await writer.createRun({ runId, limitMicros: 1_000_000n });
      const stream = watch(watcher, runId);
      const delivered: WatchResponse[] = [];
      const reader = (async () => {
        for await (const message of stream) {
          delivered.push(message);
          if (message.revision >= 21n && message.kind.case === "event") return;
        }
      })();
      // Write only once the snapshot (revision 1) is in, so every write is an event.
      await waitFor(() => stream.lastRevision === 1n);
      for (let i = 0; i < 10; i++) await writer.reserve({ runId, amountMicros: 10n });
      // Let the watcher see the first batch, then restart the server under it.
      await waitFor(() => stream.lastRevision === 11n);
      const code = await server.stop("SIGTERM");
      assert.equal(code, 0, server.log.join(""));
      server = await RuncapServer.start(options);
      // These land while the watcher is still backing off: it must catch up from the log.
      for (let i = 0; i < 10; i++) await writer.reserve({ runId, amountMicros: 10n });
      const deadline = setTimeout(() => stream.close(), 30_000);
      await reader.finally(() => clearTimeout(deadline));
      stream.close();

      assert.equal(delivered[0]?.kind.case, "snapshot");
      const revisions = events(delivered).map((m) => m.revision);
      assert.deepEqual(revisions, Array.from({ length: 20 }, (_, i) => BigInt(i + 2)));
      assert.ok(stream.reconnects >= 1, `reconnects: ${stream.reconnects}`);
      assert.ok(
        delivered.every((m) => !(m.kind.case === "progress" && m.kind.value.final)),
        "the final progress message is not delivered",
      );
      // Every reconnect resumed from the last revision delivered, with the
      // digest of the state there, which the restarted server accepted.
      assert.equal(requests[0]?.afterRevision, undefined);
      const resumes = requests.slice(1);
      assert.ok(resumes.length >= 1);
      for (const request of resumes) {
        assert.notEqual(request.afterRevision, undefined);
        const at = delivered.find((m) => m.kind.case !== "progress" && m.revision === request.afterRevision);
        assert.match(request.afterDigest, /.+/, "a resume sends the digest");
        assert.equal(request.afterDigest, digestOf(at), `digest sent with afterRevision ${request.afterRevision}`);
      }
      assert.equal(stream.lastDigest, digestOf(delivered.at(-1)));
    } finally {
      writer.close();
      watcher.close();
    }
  });
});
