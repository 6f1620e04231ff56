// The dashboard's JSON API. Every call carries the API key the user signed in
// with (kept for this tab only, in sessionStorage), as `Authorization: Bearer`.

const KEY = "runcap.apiKey";

export interface ErrorBody {
  code: string;
  reason: string;
  message: string;
  field?: string;
}

/** A failed call: the HTTP status and the API's error. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly body: ErrorBody,
  ) {
    super(body.message || `HTTP ${status}`);
  }
}

let unauthorized: (error: ApiError) => void = () => {};

/** What to do when a call is refused as unauthenticated (sign in again). */
export function onUnauthorized(handler: (error: ApiError) => void): void {
  unauthorized = handler;
}

export function apiKey(): string | null {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key: string | null): void {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function headers(extra: Record<string, string> = {}): Record<string, string> {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** Reports an UNAUTHENTICATED error that arrived some other way (on the live stream). */
export function refuse(body: ErrorBody): void {
  unauthorized(new ApiError(401, body));
}

/** The error of a failed response (JSON from the dashboard, or anything else). */
export async function errorOf(response: Response): Promise<ApiError> {
  let body: ErrorBody = { code: `HTTP_${response.status}`, reason: "", message: response.statusText };
  try {
    const parsed = (await response.json()) as { error?: ErrorBody };
    if (parsed.error) body = parsed.error;
  } catch {
    // not JSON: keep the status line
  }
  const error = new ApiError(response.status, body);
  if (response.status === 401) unauthorized(error);
  return error;
}

async function call<T>(path: string, init: RequestInit): Promise<T> {
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return (await response.json()) as T;
}

export function getJson<T>(path: string): Promise<T> {
  return call<T>(path, { headers: headers(), cache: "no-store" });
}

export function postJson<T>(path: string, body: unknown = {}): Promise<T> {
  return call<T>(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
}

/** A run id as a path segment. */
export function runPath(runId: string): string {
  return `/runs/${encodeURIComponent(runId)}`;
}
