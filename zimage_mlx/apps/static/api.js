// The server's HTTP API as the page uses it (docs/server.md): /info, the streamed images endpoints, /history.
"use strict";

const api = {
  key: localStorage.getItem("zimage-mlx-key") || "",

  headers(extra) {
    const h = Object.assign({}, extra);
    if (api.key) h.Authorization = "Bearer " + api.key;
    return h;
  },

  // An error in the API's own words ({"error": {"message"}}), or the HTTP status text.
  async failure(res) {
    const body = await res.json().catch(() => null);
    const msg = body && body.error ? body.error.message : `${res.status} ${res.statusText}`;
    return Object.assign(new Error(msg), { status: res.status });
  },

  async get(path) {
    const res = await fetch(path, { headers: api.headers() });
    if (!res.ok) throw await api.failure(res);
    return res.json();
  },

  async del(path) {
    const res = await fetch(path, { method: "DELETE", headers: api.headers() });
    if (!res.ok) throw await api.failure(res);
    return res.json();
  },

  // An image URL an <img> can show: plain when no key is needed, else fetched with the key into a blob URL.
  async imageURL(url) {
    if (!api.key) return url;
    const res = await fetch(url, { headers: api.headers() });
    if (!res.ok) throw await api.failure(res);
    return URL.createObjectURL(await res.blob());
  },

  // POST a generation (a JSON body, or FormData for files) with stream: true; onEvent(ev) for each SSE event.
  async stream(path, body, signal, onEvent) {
    const isForm = body instanceof FormData;
    const res = await fetch(path, {
      method: "POST", signal, body: isForm ? body : JSON.stringify(body),
      headers: api.headers(isForm ? {} : { "Content-Type": "application/json" }),
    });
    if (!res.ok) throw await api.failure(res);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        const ev = JSON.parse(data);
        if (ev.type === "error") throw new Error(ev.error.message);
        onEvent(ev);
      }
    }
  },
};

// A form body: files as they are, objects as JSON text, the rest as text (the server reads them as JSON would).
function formBody(fields, files) {
  const fd = new FormData();
  for (const [k, v] of Object.entries(fields)) {
    if (v === undefined || v === null) continue;
    fd.append(k, typeof v === "object" ? JSON.stringify(v) : String(v));
  }
  for (const [k, blob] of Object.entries(files)) if (blob) fd.append(k, blob, `${k}.png`);
  return fd;
}

function b64Blob(b64, type) {
  return new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type: type || "image/png" });
}
