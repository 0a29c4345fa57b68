// Talking to the genserve REST API from the page: the API key (kept in sessionStorage, sent as a Bearer
// token on every call), JSON calls, Server-Sent Events over fetch, and readable errors.

const KEY_ITEM = "genserve.apiKey";

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
  } catch {
    // storage unavailable (private mode): the key lasts as long as the field
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = getKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

/** An error from the API (or the network) with a message a person can read. */
export class ApiError extends Error {
  constructor(status, type, message, requestId) {
    super(message);
    this.status = status;
    this.type = type;
    this.requestId = requestId;
  }

  describe() {
    const where = this.status ? `HTTP ${this.status}` : "network";
    const type = this.type ? ` ${this.type}` : "";
    const id = this.requestId ? ` (request ${this.requestId})` : "";
    return `${where}${type}: ${this.message}${id}`;
  }
}

/** genserve's {"error": {"type", "message"}}, OpenAI's {"error": {"message", "type", "param", "code"}},
 * /v2's {"error": "..."}, or FastAPI's {"detail": ...}: whatever came back, as an ApiError. */
export function errorFrom(status, body, response) {
  let requestId = response ? response.headers.get("x-request-id") : null;
  let type = "";
  let message = "";
  if (body && typeof body === "object") {
    const err = body.error !== undefined ? body.error : body.detail;
    if (typeof err === "string") message = err;
    else if (err && typeof err === "object") {
      type = typeof err.type === "string" ? err.type : "";
      message = typeof err.message === "string" ? err.message : JSON.stringify(err);
      if (err.request_id && !requestId) requestId = String(err.request_id);
    }
  } else if (typeof body === "string") {
    message = body.slice(0, 500);
  }
  if (!message) message = response ? response.statusText || "request failed" : "request failed";
  if (status === 401 && !getKey()) message += " - enter an API key at the top of the page";
  return new ApiError(status, type, message, requestId);
}

async function readBody(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

async function send(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "network_error", `could not reach the server (${e.message})`);
  }
  if (!response.ok) throw errorFrom(response.status, await readBody(response), response);
  return response;
}

export async function getJSON(path) {
  return (await send("GET", path)).json();
}

export async function postJSON(path, body) {
  return (await send("POST", path, body)).json();
}

/** A picture (PNG) as an object URL, fetched with the key like every other call. */
export async function getBlobURL(path) {
  const blob = await (await send("GET", path)).blob();
  return URL.createObjectURL(blob);
}

/** POST with stream: true; calls onEvent(object) for every `data:` event until [DONE]. An `event: error`
 * in the stream is thrown as an ApiError. `signal` aborts. */
export async function postStream(path, body, onEvent, signal) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") return;
    throw new ApiError(0, "network_error", `could not reach the server (${e.message})`);
  }
  if (!response.ok) throw errorFrom(response.status, await readBody(response), response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") return;
      throw e;
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      const text = data.join("\n");
      if (text === "[DONE]") return;
      if (!text) continue;
      const parsed = JSON.parse(text);
      if (event === "error") throw errorFrom(200, parsed, response);
      onEvent(parsed);
    }
  }
}
