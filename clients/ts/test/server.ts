/** Real runcap server processes for tests, on loopback ports. */

import { spawn, type ChildProcessByStdio } from "node:child_process";
import { once } from "node:events";
import { createServer } from "node:net";
import { resolve } from "node:path";
import type { Readable } from "node:stream";
import { fileURLToPath } from "node:url";

/** clients/ts, whether this file runs from test/ or dist/test/. */
const PACKAGE_ROOT = fileURLToPath(new URL(import.meta.url.includes("/dist/") ? "../../" : "../", import.meta.url));

/** The Python that runs the server: $RUNCAP_PYTHON, or the repository's .venv. */
export const PYTHON = process.env["RUNCAP_PYTHON"] ?? resolve(PACKAGE_ROOT, "../../.venv/bin/python");

const LISTENING = /runcap listening on (\S+)/;

export interface ServerOptions {
  /** The address to listen on; a free port by default. */
  listen?: string;
  /** Ledger storage; "memory" unless `sqlitePath` is given. */
  sqlitePath?: string;
  /** Extra RUNCAP_* settings. */
  env?: Record<string, string>;
}

/** `python -m runcap_server serve` as a child process; stderr is kept for failure messages. */
export class RuncapServer {
  readonly log: string[] = [];
  target = "";
  #child: ChildProcessByStdio<null, null, Readable> | undefined;

  private constructor(private readonly options: ServerOptions) {}

  /** Starts a server and resolves once it logs its listening address. */
  static async start(options: ServerOptions = {}): Promise<RuncapServer> {
    const server = new RuncapServer(options);
    await server.start();
    return server;
  }

  async start(timeoutMs = 20_000): Promise<void> {
    const { listen = "127.0.0.1:0", sqlitePath, env = {} } = this.options;
    const args = ["-m", "runcap_server", "serve", "--listen", listen];
    args.push(...(sqlitePath ? ["--backend", "sqlite", "--sqlite-path", sqlitePath] : ["--backend", "memory"]));
    const child = spawn(PYTHON, args, {
      // Test servers on loopback run without API keys.
      env: { ...process.env, RUNCAP_LOG_LEVEL: "INFO", RUNCAP_INSECURE_DEV: "1", ...env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.#child = child;
    child.stderr.setEncoding("utf8");
    this.target = await new Promise<string>((resolveTarget, reject) => {
      let buffered = "";
      const timer = setTimeout(() => fail(new Error(`runcap server did not start in ${timeoutMs} ms`)), timeoutMs);
      const fail = (error: Error): void => {
        clearTimeout(timer);
        child.kill("SIGKILL");
        reject(new Error(`${error.message}\n${this.log.join("")}`));
      };
      child.once("error", fail);
      child.once("exit", (code, signal) => fail(new Error(`runcap server exited (${code ?? signal})`)));
      child.stderr.on("data", (chunk: string) => {
        buffered += chunk;
        let newline: number;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, newline + 1);
          buffered = buffered.slice(newline + 1);
          this.log.push(line);
          const match = LISTENING.exec(line);
          if (match?.[1]) {
            clearTimeout(timer);
            child.removeAllListeners("exit");
            child.removeListener("error", fail);
            resolveTarget(match[1]);
          }
        }
      });
    });
  }

  /** Sends `signal` and waits for the process to exit; SIGKILL after `timeoutMs`. */
  async stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 15_000): Promise<number | null> {
    const child = this.#child;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) {
      return child?.exitCode ?? null;
    }
    const exited = once(child, "exit");
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    const [code] = (await exited) as [number | null];
    clearTimeout(timer);
    return code;
  }

  /** Kills the process at once (for `after` hooks). */
  async kill(): Promise<void> {
    await this.stop("SIGKILL");
  }
}

/** A TCP port that was free a moment ago, on 127.0.0.1. */
export async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  await once(server, "close");
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

/** A unique id for this test process. */
export function uniqueId(prefix: string): string {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
}
