// The server's public API, as any OpenAI client uses it: /v1/models, /v1/chat/completions
// (streamed as server-sent events), /v1/qa. A server started with --api-key answers 401; then
// `onKeyNeeded` asks the user for the key (kept in localStorage) and the request is sent again.

const KEY_ITEM = "mlxllama.apiKey";

export class APIError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let askKey = null; // () => Promise<string>: set by the page
export function onKeyNeeded(fn) {
  askKey = fn;
}

export function storedKey() {
  return localStorage.getItem(KEY_ITEM) || "";
}

export function saveKey(key) {
  localStorage.setItem(KEY_ITEM, key);
}

function headers(key) {
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new APIError(response.status, message, code);
}

// fetch with the stored key; on 401 asks for a key once and tries again.
export async function request(path, { method = "GET", body, signal, key } = {}) {
  const send = (k) => fetch(path, { method, headers: headers(k), body: body === undefined ? undefined : JSON.stringify(body), signal });
  let response = await send(key ?? storedKey());
  if (response.status === 401 && askKey && key === undefined) {
    await askKey();
    response = await send(storedKey());
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function models(key) {
  const response = await request("/v1/models", { key });
  return (await response.json()).data || [];
}

export async function askDocuments(body, signal) {
  const response = await request("/v1/qa", { method: "POST", body, signal });
  return response.json();
}

// Streams a chat completion: onDelta(text) for each piece, returns {usage, finishReason}.
export async function streamChat(body, signal, onDelta) {
  const response = await request("/v1/chat/completions", {
    method: "POST",
    body: { ...body, stream: true, stream_options: { include_usage: true } },
    signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let usage = null;
  let finishReason = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return { usage, finishReason };
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(500, chunk.error.message || "generation failed", chunk.error.code);
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (choice) {
        if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
  }
  return { usage, finishReason };
}
