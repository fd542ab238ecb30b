// Talks to the inf_llm server: GET /status, POST /chat (SSE over fetch), POST /tokenize, the document
// library under /v1/contexts.
// Knows nothing of the DOM. All URLs are relative to the page's root, so the UI also works behind a
// reverse proxy that mounts the server under a path prefix.

/** The server root: this module lives at <root>/static/js/api.js. */
export const API_ROOT = new URL("../../", import.meta.url);

/** An error the server described with its `{"error": {message, type, param, code}}` body. */
export class ApiError extends Error {
  constructor(message, { status = 0, type = "error", code = null, param = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
  }
}

function url(path) {
  return new URL(path, API_ROOT).toString();
}

function authHeaders(apiKey) {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

/** Builds an ApiError from a non-2xx response (JSON error body when there is one). */
async function errorFromResponse(res) {
  let message = `${res.status} ${res.statusText || "error"}`;
  let info = {};
  try {
    const body = await res.json();
    const err = body && body.error;
    if (err && typeof err === "object") {
      message = err.message || message;
      info = { type: err.type, code: err.code, param: err.param };
    } else if (body && typeof body.detail === "string") {
      message = body.detail;
    }
  } catch {
    // Not JSON (e.g. a proxy's HTML error page): the status line is all we have.
  }
  return new ApiError(message, { status: res.status, ...info });
}

/**
 * GET /status. Resolves to `{reachable: true, httpStatus, body}`, or `{reachable: false, error}` when the
 * server cannot be reached or does not answer with JSON. 503 is a normal answer while loading. A server with
 * an API key answers only readiness without it: the model, limits and defaults come with the key.
 */
export async function fetchStatus({ apiKey, signal, timeoutMs = 8000 } = {}) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), timeoutMs);
  const onAbort = () => ctrl.abort();
  signal?.addEventListener("abort", onAbort);
  try {
    const res = await fetch(url("status"), { cache: "no-store", signal: ctrl.signal, headers: authHeaders(apiKey) });
    let body = null;
    try {
      body = await res.json();
    } catch {
      return { reachable: false, error: `unexpected answer from /status (${res.status})` };
    }
    return { reachable: true, httpStatus: res.status, body };
  } catch (e) {
    return { reachable: false, error: e.name === "AbortError" ? "timed out" : String(e.message || e) };
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
}

/** A JSON request; resolves to the parsed answer, rejects with an ApiError for a non-2xx answer. */
async function requestJson(method, path, { body, apiKey, signal } = {}) {
  const headers = authHeaders(apiKey);
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url(path), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    signal,
  });
  if (!res.ok) throw await errorFromResponse(res);
  return res.json();
}

/** POST /tokenize -> number of tokens of `text`. */
export async function countTokens(text, { apiKey, signal } = {}) {
  const body = await requestJson("POST", "tokenize", { body: { text }, apiKey, signal });
  return body.tokens;
}

/**
 * Incremental parser for a `text/event-stream` body. Feed it decoded text; it calls
 * `onEvent(name, data)` for each complete event (`data` is the joined data lines, a string) and
 * `onComment(text)` for comment lines such as `: ping`.
 */
export class SSEParser {
  constructor(onEvent, onComment = () => {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = "";
    this.eventName = "";
    this.dataLines = [];
  }

  feed(chunk) {
    this.buffer += chunk;
    let nl;
    // Lines end in \n, \r\n or \r (the spec allows all three).
    while ((nl = this.buffer.search(/\r\n|\r|\n/)) !== -1) {
      const sep = this.buffer[nl] === "\r" && this.buffer[nl + 1] === "\n" ? 2 : 1;
      if (this.buffer[nl] === "\r" && sep === 1 && nl === this.buffer.length - 1) {
        break; // A lone \r at the end may be the first half of \r\n: wait for more input.
      }
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + sep);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") {
      if (this.dataLines.length) this.onEvent(this.eventName || "message", this.dataLines.join("\n"));
      this.eventName = "";
      this.dataLines = [];
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1).trim());
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.eventName = value;
    else if (field === "data") this.dataLines.push(value);
    // `id` and `retry` are meaningless for a POST stream: ignored.
  }

  end() {
    this.feed("\n\n");
  }
}

/**
 * POSTs `body` to `path` and reads the SSE answer, calling `onEvent(name, payload)` with each event's parsed
 * JSON and `onPing()` for comment lines. Resolves with the HTTP status once the stream ends; rejects with an
 * ApiError (HTTP error or `error` event) or an AbortError when `signal` aborts (the server then cancels).
 */
async function postEvents(path, body, { apiKey, signal, onEvent, onPing = () => {} }) {
  const res = await fetch(url(path), {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "text/event-stream",
      ...authHeaders(apiKey),
    },
    body: JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw await errorFromResponse(res);
  if (!res.body) throw new ApiError("the server sent no stream", { status: res.status });

  let streamError = null;
  const parser = new SSEParser((name, data) => {
    let payload;
    try {
      payload = JSON.parse(data);
    } catch {
      return; // A malformed event is skipped rather than ending a long generation.
    }
    if (name === "error" || (name === "message" && payload?.error)) {
      const err = payload.error || {};
      streamError = new ApiError(err.message || "the server reported an error", {
        status: res.status,
        type: err.type,
        code: err.code,
        param: err.param,
      });
    } else onEvent(name, payload);
  }, onPing);

  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done: finished } = await reader.read();
    if (finished) break;
    parser.feed(decoder.decode(value, { stream: true }));
    if (streamError) {
      // After an error event the server ends the stream; don't wait for it.
      reader.cancel().catch(() => {});
      break;
    }
  }
  if (!streamError) {
    parser.feed(decoder.decode());
    parser.end();
  }
  if (streamError) throw streamError;
  return res.status;
}

/**
 * POST /chat and stream the reply. `handlers`: onToken(text), onProgress({processed, total}),
 * onDone(payload), onPing(). Resolves with the `done` payload; rejects like postEvents, or when the stream
 * ends without one.
 */
export async function streamChat(body, { apiKey, signal, handlers = {} } = {}) {
  let done = null;
  const status = await postEvents("chat", body, {
    apiKey,
    signal,
    onPing: () => handlers.onPing?.(),
    onEvent(name, payload) {
      if (name === "token") handlers.onToken?.(payload.text ?? "");
      else if (name === "progress") handlers.onProgress?.(payload);
      else if (name === "done") {
        done = payload;
        handlers.onDone?.(payload);
      }
    },
  });
  if (!done) throw new ApiError("the stream ended before the reply was complete", { status });
  return done;
}

// ------------------------------------------------------------------------------- document library
// A context is a document the server has read once and keeps the memory of (RAM, disk): a chat bound to
// it (`context_id` in the /chat body) starts from that memory instead of reading the document again.

/** GET /v1/contexts -> [info], info: {id, name, tokens, bytes, disk_bytes, where: ["ram"|"disk"], created}. */
export async function listContexts({ apiKey, signal } = {}) {
  const body = await requestJson("GET", "v1/contexts", { apiKey, signal });
  return Array.isArray(body.data) ? body.data : [];
}

/**
 * POST /v1/contexts?stream=true: the server reads `text` (prefill progress through `onProgress({processed,
 * total})`) and keeps its memory. Resolves with the new context's info; rejects like postEvents.
 */
export async function createContext({ name, text, system = null }, { apiKey, signal, onProgress } = {}) {
  let info = null;
  const status = await postEvents("v1/contexts?stream=true", { name, text, system }, {
    apiKey,
    signal,
    onEvent(event, payload) {
      if (event === "progress") onProgress?.(payload);
      else if (event === "context") info = payload;
    },
  });
  if (!info) throw new ApiError("the stream ended before the document was read", { status });
  return info;
}

/** DELETE /v1/contexts/{id}. */
export function deleteContext(id, { apiKey, signal } = {}) {
  return requestJson("DELETE", `v1/contexts/${encodeURIComponent(id)}`, { apiKey, signal });
}
