// The slmkit playground: a chat page over the server's own OpenAI API (/v1/models, /v1/chat/completions).
// Model output is rendered by markdown-it with raw HTML off, so a reply that contains <script> or
// <img onerror=...> shows as text; the server's Content-Security-Policy allows no inline script either.
"use strict";

const md = window.markdownit({ html: false, linkify: false, breaks: true });
const $ = (id) => document.getElementById(id);
const STORE = "slmkit.conversations";
const KEY = "slmkit.apiKey";
const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop"];

const state = { conversations: loadConversations(), current: null, controller: null, model: null, images: false };
let pending = []; // data: URLs of pictures attached to the next message

// --- storage ---------------------------------------------------------------------------------------------

function validMessage(m) {
  return m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string" &&
    (m.images === undefined || (Array.isArray(m.images) && m.images.every((u) => typeof u === "string" &&
      u.startsWith("data:image/"))));
}

function validConversation(c) {
  return c && typeof c.id === "string" && typeof c.title === "string" && Array.isArray(c.messages) &&
    c.messages.every(validMessage);
}

function loadConversations() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(saved) ? saved.filter(validConversation) : [];
  } catch {
    return [];
  }
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(state.conversations));
  } catch (e) {
    status(`could not save the conversations in this browser (${e.name})`);
  }
}

function newId() {
  return (crypto.randomUUID && crypto.randomUUID()) || `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

function current() {
  let c = state.conversations.find((x) => x.id === state.current);
  if (!c) {
    c = { id: newId(), title: "New chat", messages: [] };
    state.conversations.unshift(c);
    state.current = c.id;
  }
  return c;
}

// --- the API ---------------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function askKey(reason) {
  const key = window.prompt(`${reason}\nAPI key for this server:`, localStorage.getItem(KEY) || "");
  if (key === null) return false;
  localStorage.setItem(KEY, key.trim());
  return true;
}

async function errorOf(res) {
  let message = res.statusText;
  try {
    const body = await res.json();
    message = (body.error && body.error.message) || message;
  } catch { /* not JSON: keep the status text */ }
  return `${res.status}: ${message}`;
}

async function connect() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (res.status === 401 && askKey("The server needs an API key.")) return connect();
  if (!res.ok) {
    $("model").textContent = `not connected (${await errorOf(res)})`;
    return;
  }
  const model = (await res.json()).data[0];
  state.model = model.id;
  state.images = Boolean(model.slmkit && model.slmkit.images);
  $("model").textContent = `${model.id}${state.images ? " · takes pictures" : ""}`;
  $("attach-label").hidden = !state.images;
}

function options() {
  const o = {};
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  for (const id of ["temperature", "top_p", "max_tokens", "seed"]) {
    if (number(id) !== null && !Number.isNaN(number(id))) o[id] = number(id);
  }
  if (number("top_k") > 0) o.top_k = number("top_k");
  const stop = $("stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) o.stop = stop;
  return o;
}

function apiMessages(c, upTo) {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of c.messages.slice(0, upTo)) {
    if (m.error) continue;
    if (m.images && m.images.length) {
      out.push({ role: m.role, content: [{ type: "text", text: m.content },
        ...m.images.map((url) => ({ type: "image_url", image_url: { url } }))] });
    } else {
      out.push({ role: m.role, content: m.content });
    }
  }
  return out;
}

async function reply(c) {
  const index = c.messages.length;
  const msg = { role: "assistant", content: "" };
  c.messages.push(msg);
  render();
  const body = { model: state.model, messages: apiMessages(c, index), stream: true,
    stream_options: { include_usage: true }, ...options() };
  state.controller = new AbortController();
  busy(true);
  const started = performance.now();
  let first = null;
  let usage = null;
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (res.status === 401) {
      msg.error = await errorOf(res);
      if (askKey("The server refused the API key.")) {
        c.messages.pop();
        return reply(c);
      }
      return;
    }
    if (!res.ok) {
      msg.error = await errorOf(res);
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
          if (delta) {
            first = first || performance.now();
            msg.content += delta;
            updateLast(msg);
          }
          if (chunk.usage) usage = chunk.usage;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else msg.error = `${e.message || e}`;
  } finally {
    const seconds = (performance.now() - (first || started)) / 1000;
    if (usage) {
      msg.stats = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} tokens · ` +
        `${(usage.completion_tokens / Math.max(seconds, 1e-3)).toFixed(1)} tok/s`;
    } else if (msg.stopped) {
      msg.stats = "stopped";
    }
    state.controller = null;
    busy(false);
    save();
    render();
  }
}

// --- rendering -------------------------------------------------------------------------------------------

function status(text) {
  $("status").textContent = text || "";
}

function busy(on) {
  $("send").disabled = on;
  $("stop-button").hidden = !on;
  status(on ? "answering…" : "");
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function messageBody(m) {
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "assistant" && !m.error) body.innerHTML = md.render(m.content); // raw HTML escaped
  else body.textContent = m.error || m.content;
  return body;
}

function messageElement(c, m, i) {
  const el = document.createElement("div");
  el.className = `message ${m.role}${m.error ? " error" : ""}`;
  for (const url of m.images || []) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached picture";
    el.append(img);
  }
  el.append(messageBody(m));
  const meta = document.createElement("div");
  meta.className = "meta";
  if (m.stats) meta.append(Object.assign(document.createElement("span"), { className: "stats", textContent: m.stats }));
  const idle = !state.controller;
  if (m.role === "user" && idle) meta.append(button("Edit", () => edit(c, i, el)));
  if (m.role === "assistant" && i === c.messages.length - 1 && idle) {
    meta.append(button("Regenerate", () => { c.messages.pop(); reply(c); }));
  }
  el.append(meta);
  return el;
}

function updateLast(m) {
  const last = $("messages").lastElementChild;
  if (!last) return;
  last.querySelector(".body").replaceWith(messageBody(m));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function edit(c, i, el) {
  const area = document.createElement("textarea");
  area.value = c.messages[i].content;
  area.rows = 3;
  el.replaceChildren(area, button("Save and send", () => {
    if (!area.value.trim()) return;
    c.messages[i].content = area.value;
    c.messages.splice(i + 1);
    reply(c);
  }), button("Cancel", render));
  area.focus();
}

function render() {
  const c = current();
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((x) => {
    const li = document.createElement("li");
    li.className = x.id === c.id ? "current" : "";
    li.append(Object.assign(document.createElement("span"), { textContent: x.title }));
    li.append(button("×", (e) => {
      e.stopPropagation();
      state.conversations = state.conversations.filter((y) => y.id !== x.id);
      if (state.current === x.id) state.current = null;
      save();
      render();
    }));
    li.addEventListener("click", () => { if (!state.controller) { state.current = x.id; render(); } });
    return li;
  }));
  $("messages").replaceChildren(...c.messages.map((m, i) => messageElement(c, m, i)));
  $("attachments").replaceChildren(...pending.map((url) => Object.assign(document.createElement("img"), { src: url })));
  $("messages").scrollTop = $("messages").scrollHeight;
}

// --- actions ---------------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  const c = current();
  c.messages.push({ role: "user", content: text, ...(pending.length ? { images: pending } : {}) });
  if (c.title === "New chat") c.title = text.slice(0, 48);
  pending = [];
  $("prompt").value = "";
  reply(c);
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => { if (!state.controller) { state.current = null; render(); save(); } });
$("api-key").addEventListener("click", () => { if (askKey("Sent as a bearer token.")) connect(); });

$("attach").addEventListener("change", async () => {
  for (const file of $("attach").files) {
    pending.push(await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    }));
  }
  $("attach").value = "";
  render();
});

$("export").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(state.conversations, null, 2)], { type: "application/json" });
  const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob),
    download: "slmkit-conversations.json" });
  a.click();
  URL.revokeObjectURL(a.href);
});

$("import").addEventListener("change", async () => {
  const file = $("import").files[0];
  $("import").value = "";
  if (!file) return;
  let loaded;
  try {
    loaded = JSON.parse(await file.text());
  } catch (e) {
    status(`${file.name}: not JSON (${e.message})`);
    return;
  }
  const list = Array.isArray(loaded) ? loaded : [loaded];
  const good = list.filter(validConversation);
  if (!good.length) {
    status(`${file.name}: no conversations (each needs id, title and messages of role user/assistant)`);
    return;
  }
  for (const c of good) {
    if (state.conversations.some((x) => x.id === c.id)) c.id = newId();
    state.conversations.unshift(c);
  }
  state.current = good[0].id;
  save();
  render();
  status(`imported ${good.length} conversation(s)${good.length < list.length ? `, skipped ${list.length - good.length}` : ""}`);
});

for (const id of SETTINGS) { // the settings persist in this browser
  const saved = localStorage.getItem(`slmkit.setting.${id}`);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem(`slmkit.setting.${id}`, $(id).value));
}

render();
connect();
