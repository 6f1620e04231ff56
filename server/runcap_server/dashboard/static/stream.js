// The live stream: POST /api/watch answered as text/event-stream, read with
// fetch() because EventSource cannot send an Authorization header. It
// reconnects by itself, with the page's resume cursors, after a disconnect.
import { errorOf, headers, refuse } from "./api.js";
/** An incremental parser of the event-stream format (HTML standard, 9.2.6). */
export class SseParser {
    buffer = "";
    event = "";
    data = [];
    /** Feeds decoded text; returns the messages it completed. */
    push(text) {
        this.buffer += text;
        const messages = [];
        for (;;) {
            const match = /\r\n|\r|\n/.exec(this.buffer);
            // A lone \r at the end may be half of \r\n: wait for more.
            if (!match || (match[0] === "\r" && match.index === this.buffer.length - 1))
                break;
            const line = this.buffer.slice(0, match.index);
            this.buffer = this.buffer.slice(match.index + match[0].length);
            if (line === "") {
                if (this.data.length > 0) {
                    messages.push({ event: this.event || "message", data: this.data.join("\n") });
                }
                this.event = "";
                this.data = [];
                continue;
            }
            if (line.startsWith(":"))
                continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value.startsWith(" "))
                value = value.slice(1);
            if (field === "event")
                this.event = value;
            else if (field === "data")
                this.data.push(value);
        }
        return messages;
    }
}
const MAX_BACKOFF_MS = 10_000;
export class LiveStream {
    handlers;
    abort = null;
    stopped = false;
    failures = 0;
    timer;
    constructor(handlers) {
        this.handlers = handlers;
    }
    start() {
        this.stopped = false;
        void this.connect();
    }
    stop() {
        this.stopped = true;
        window.clearTimeout(this.timer);
        this.abort?.abort();
        this.handlers.status("stopped");
    }
    /** Drops the current connection and opens a new one at once (after a reset). */
    restart() {
        window.clearTimeout(this.timer);
        this.abort?.abort();
        this.failures = 0;
        void this.connect();
    }
    async connect() {
        const abort = new AbortController();
        this.abort = abort;
        this.handlers.status(this.failures === 0 ? "connecting" : "reconnecting");
        let detail = "the stream ended";
        try {
            const response = await fetch("/api/watch", {
                method: "POST",
                headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
                body: JSON.stringify(this.handlers.body()),
                signal: abort.signal,
                cache: "no-store",
            });
            if (!response.ok) {
                const error = await errorOf(response);
                if (response.status < 500 && response.status !== 429) {
                    this.handlers.refused(error);
                    return;
                }
                throw error;
            }
            const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
            const parser = new SseParser();
            for (;;) {
                const { value, done } = await reader.read();
                if (done)
                    break;
                for (const message of parser.push(value)) {
                    if (message.event === "ready") {
                        this.failures = 0;
                        this.handlers.status("live");
                    }
                    const data = JSON.parse(message.data);
                    const error = message.event === "error" ? data.error : null;
                    if (error?.code === "UNAUTHENTICATED")
                        refuse(error);
                    this.handlers.message(message.event, data);
                }
            }
        }
        catch (error) {
            if (abort.signal.aborted)
                return;
            detail = error instanceof Error ? error.message : String(error);
        }
        if (this.stopped || abort !== this.abort)
            return;
        this.failures += 1;
        const wait = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(this.failures, 5));
        this.handlers.status("reconnecting", `${detail}; retrying in ${Math.round(wait / 1000)} s`);
        this.timer = window.setTimeout(() => void this.connect(), wait);
    }
}
