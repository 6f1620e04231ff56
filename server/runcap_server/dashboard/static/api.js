// The dashboard's JSON API. Every call carries the API key the user signed in
// with (kept for this tab only, in sessionStorage), as `Authorization: Bearer`.
const KEY = "runcap.apiKey";
/** A failed call: the HTTP status and the API's error. */
export class ApiError extends Error {
    status;
    body;
    constructor(status, body) {
        super(body.message || `HTTP ${status}`);
        this.status = status;
        this.body = body;
    }
}
let unauthorized = () => { };
/** What to do when a call is refused as unauthenticated (sign in again). */
export function onUnauthorized(handler) {
    unauthorized = handler;
}
export function apiKey() {
    return sessionStorage.getItem(KEY);
}
export function setApiKey(key) {
    if (key)
        sessionStorage.setItem(KEY, key);
    else
        sessionStorage.removeItem(KEY);
}
export function headers(extra = {}) {
    const key = apiKey();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}
/** Reports an UNAUTHENTICATED error that arrived some other way (on the live stream). */
export function refuse(body) {
    unauthorized(new ApiError(401, body));
}
/** The error of a failed response (JSON from the dashboard, or anything else). */
export async function errorOf(response) {
    let body = { code: `HTTP_${response.status}`, reason: "", message: response.statusText };
    try {
        const parsed = (await response.json());
        if (parsed.error)
            body = parsed.error;
    }
    catch {
        // not JSON: keep the status line
    }
    const error = new ApiError(response.status, body);
    if (response.status === 401)
        unauthorized(error);
    return error;
}
async function call(path, init) {
    const response = await fetch(path, init);
    if (!response.ok)
        throw await errorOf(response);
    return (await response.json());
}
export function getJson(path) {
    return call(path, { headers: headers(), cache: "no-store" });
}
export function postJson(path, body = {}) {
    return call(path, {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
    });
}
/** A run id as a path segment. */
export function runPath(runId) {
    return `/runs/${encodeURIComponent(runId)}`;
}
