// What the dashboard pages share: the API with its key, building elements as text (never HTML), number and
// time formatting. Loaded before runs.js and proofs.js.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "slmkit.apiKey"; // the playground asks for it and keeps it under the same name

// --- the API ---------------------------------------------------------------------------------------------

async function api(path, kind = "json") {
  for (;;) {
    const key = localStorage.getItem(KEY);
    const res = await fetch(path, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (res.status === 401) {
      const given = window.prompt("This server needs an API key:", key || "");
      if (given === null) throw new Error("this server needs an API key");
      localStorage.setItem(KEY, given.trim());
      continue;
    }
    if (!res.ok) {
      let message = res.statusText;
      try {
        message = (await res.json()).error.message || message;
      } catch { /* not JSON: keep the status text */ }
      throw new Error(message);
    }
    return kind === "json" ? res.json() : res.blob();
  }
}

function status(text) {
  $("status").textContent = text || "";
}

// --- formatting ------------------------------------------------------------------------------------------

function el(tag, { dataset, ...props } = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  Object.assign(node.dataset, dataset || {});
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function ago(time) {
  return time ? `${duration(Math.max(0, Date.now() / 1000 - time))} ago` : "";
}

function number(v) {
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Math.abs(v) >= 1000 || Math.abs(v) < 0.001 ? v.toExponential(3) : v.toPrecision(4);
}
