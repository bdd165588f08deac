// The API client: the key lives in sessionStorage (never in a URL), every call carries it as a
// bearer token, errors come back as ApiError with the envelope's message and param.

const KEY = "sparsegrad.apiKey";

export const auth = {
  get: () => sessionStorage.getItem(KEY),
  set: (k) => sessionStorage.setItem(KEY, k),
  clear: () => sessionStorage.removeItem(KEY),
};

let unauthorized = () => {};
export function onUnauthorized(f) {
  unauthorized = f;
}

export class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e ? e.message : `HTTP ${status}`);
    this.status = status;
    this.param = e ? e.param : null;
    this.code = e ? e.code : null;
  }
}

function headers(extra = {}) {
  return { authorization: `Bearer ${auth.get() || ""}`, ...extra };
}

export async function api(path, { method = "GET", body, headers: extra = {} } = {}) {
  const h = headers(extra);
  let payload = body;
  if (body !== undefined && typeof body !== "string" && !(body instanceof Blob)) {
    h["content-type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers: h, body: payload });
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!r.ok) {
    if (r.status === 401) unauthorized();
    throw new ApiError(r.status, data);
  }
  return data;
}

/** Downloads an authenticated URL as a file named `name`. */
export async function download(path, name) {
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Uploads a dataset with progress callbacks (XHR: fetch reports no upload progress). */
export function upload(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const name = encodeURIComponent(file.name);
    xhr.open("POST", `/v1/files?purpose=fine-tune&filename=${name}`);
    xhr.setRequestHeader("authorization", `Bearer ${auth.get() || ""}`);
    xhr.setRequestHeader("content-type", "application/octet-stream");
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        data = null;
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else {
        if (xhr.status === 401) unauthorized();
        reject(new ApiError(xhr.status, data));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, null));
    xhr.send(file);
  });
}

/**
 * Follows a job's events over Server-Sent Events (fetch, since EventSource cannot send the
 * key), reconnecting with Last-Event-ID after a drop. `onEnd` runs when the server closes the
 * stream because the job is final. Returns a handle with `close()`.
 */
export function follow(jobId, onEvent, onEnd) {
  let lastId = null;
  let closed = false;
  let ctrl = null;
  async function run() {
    while (!closed) {
      ctrl = new AbortController();
      const h = headers({ accept: "text/event-stream" });
      if (lastId) h["last-event-id"] = lastId;
      try {
        const r = await fetch(`/v1/fine_tuning/jobs/${jobId}/events`, { headers: h, signal: ctrl.signal });
        if (r.status === 401) return unauthorized();
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let id = null;
            let data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("id:")) id = line.slice(3).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trimStart();
            }
            if (id) lastId = id;
            if (data) onEvent(JSON.parse(data));
          }
        }
        // A clean end: the job is final and everything was sent.
        if (!closed) onEnd();
        return;
      } catch (e) {
        if (closed) return;
        await new Promise((res) => setTimeout(res, 1500));
      }
    }
  }
  run();
  return {
    close() {
      closed = true;
      if (ctrl) ctrl.abort();
    },
  };
}

/**
 * POSTs `body` to an OpenAI-style streaming route and calls `onChunk` with each server-sent
 * event's JSON until `[DONE]`. Errors before the stream starts throw ApiError as `api` does.
 */
export async function streamSse(path, body, onChunk) {
  const r = await fetch(path, {
    method: "POST",
    headers: headers({ "content-type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!r.ok) {
    if (r.status === 401) unauthorized();
    throw new ApiError(r.status, await r.json().catch(() => null));
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, at);
      buf = buf.slice(at + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        onChunk(chunk);
      }
    }
  }
}
