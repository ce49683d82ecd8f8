// The runs dashboard: every run under the server's runs directory (/api/runs), one run's live loss curves,
// results and config (#run=NAME), and several runs' curves overlaid (#compare=A,B). Curves are drawn by uPlot
// and grow without a reload: each poll asks only for the metrics lines written since the last one. Everything a
// run wrote is put on the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1500;
const COLORS = ["#2f6fdb", "#d9480f", "#2e7d32", "#8e24aa", "#00838f", "#b26a00", "#5d4037", "#c2185b"];
let stopView = () => {}; // ends the polling of the view on screen

const runUrl = (name) => `/api/runs/${encodeURIComponent(name)}`;

// Polls `work` every POLL_MS until the view changes; a failure is shown and polling goes on.
function poll(work) {
  let alive = true;
  let handle = null;
  const tick = async () => {
    try {
      await work();
      status("");
    } catch (e) {
      if (alive) status(e.message);
    }
    if (alive) handle = setTimeout(tick, POLL_MS);
  };
  tick();
  return () => {
    alive = false;
    clearTimeout(handle);
  };
}

function stateBadge(state) {
  return el("span", { className: `state ${state}`, textContent: state });
}

// A result JSON as tables: a list of records is a table with a column per key; an object of records a table
// with a row per key; any other object a key/value table, nested up to three levels.
function render(value, depth = 0) {
  const plain = (v) => v === null || typeof v !== "object";
  if (plain(value)) return document.createTextNode(number(value));
  if (Array.isArray(value)) {
    if (value.every(plain)) return document.createTextNode(value.slice(0, 50).map(number).join(", ") +
      (value.length > 50 ? ` … (${value.length})` : ""));
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v))) return recordTable(value, null);
  } else {
    const rows = Object.entries(value);
    if (rows.length && rows.every(([, v]) => v && typeof v === "object" && !Array.isArray(v) &&
      Object.values(v).every(plain))) return recordTable(rows.map(([, v]) => v), rows.map(([k]) => k));
  }
  if (depth >= 3) return document.createTextNode(JSON.stringify(value).slice(0, 300));
  const table = el("table");
  for (const [k, v] of Object.entries(value).slice(0, 200)) {
    table.append(el("tr", {}, el("th", { textContent: k }), el("td", {}, render(v, depth + 1))));
  }
  return table;
}

function recordTable(records, names) {
  const columns = [...new Set(records.flatMap((r) => Object.keys(r)))].slice(0, 30);
  const table = el("table");
  table.append(el("tr", {}, ...(names ? [el("th")] : []), ...columns.map((c) => el("th", { textContent: c }))));
  records.slice(0, 500).forEach((r, i) => {
    const cells = columns.map((c) => el("td", { className: typeof r[c] === "number" ? "num" : "" },
      c in r ? render(r[c], 3) : ""));
    table.append(el("tr", {}, ...(names ? [el("th", { textContent: names[i] })] : []), ...cells));
  });
  return table;
}

// --- curves ----------------------------------------------------------------------------------------------

// The metrics of one training stage, read incrementally: rows since the last byte offset.
class Curve {
  constructor(run, stage) {
    Object.assign(this, { run, stage, offset: 0, train: new Map(), val: new Map(), rows: 0 });
  }

  async update() {
    for (;;) {
      const url = `${runUrl(this.run)}/metrics?stage=${encodeURIComponent(this.stage)}&offset=${this.offset}`;
      const part = await api(url);
      if (part.reset) Object.assign(this, { train: new Map(), val: new Map(), rows: 0 });
      for (const row of part.rows) {
        if (typeof row.loss === "number") this.train.set(row.step, row.loss);
        if (typeof row.val_loss === "number") this.val.set(row.step, row.val_loss);
      }
      this.rows = (part.reset ? 0 : this.rows) + part.rows.length;
      this.offset = part.offset;
      if (!part.more) return;
    }
  }
}

// uPlot wants one x array: the union of the curves' steps, with gaps (null) where a curve has no point.
function aligned(series) {
  const steps = [...new Set(series.flatMap((s) => [...s.points.keys()]))].sort((a, b) => a - b);
  return [steps, ...series.map((s) => steps.map((x) => s.points.get(x) ?? null))];
}

function chart(container, series) {
  container.replaceChildren();
  const opts = {
    width: Math.max(320, container.clientWidth - 16), height: 340,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss (nats/token)" }],
    series: [{ label: "step" }, ...series.map((s) => ({
      label: s.label, stroke: s.color, width: s.dashed ? 1.5 : 2, dash: s.dashed ? [6, 4] : undefined,
      spanGaps: true, points: { show: s.dashed },
    }))],
  };
  const plot = new uPlot(opts, aligned(series), container);
  const resize = () => plot.setSize({ width: Math.max(320, container.clientWidth - 16), height: 340 });
  window.addEventListener("resize", resize);
  return { plot, dispose: () => { window.removeEventListener("resize", resize); plot.destroy(); } };
}

// --- the views -------------------------------------------------------------------------------------------

function showOnly(id) {
  for (const view of ["list-view", "run-view", "compare-view"]) $(view).hidden = view !== id;
}

const selected = new Set();

function listView() {
  showOnly("list-view");
  document.title = "slmkit runs";
  return poll(async () => {
    const { runs_dir: dir, runs } = await api("/api/runs");
    $("runs-dir").textContent = `in ${dir}`;
    $("no-runs").hidden = runs.length > 0;
    $("runs").querySelector("tbody").replaceChildren(...runs.map((r) => {
      const box = el("input", { type: "checkbox", checked: selected.has(r.name) });
      box.addEventListener("change", () => {
        if (box.checked) selected.add(r.name); else selected.delete(r.name);
        $("compare").disabled = selected.size < 2;
      });
      const progress = r.total ? el("span", {}, el("progress", { max: r.total, value: r.step || 0 }),
        ` ${number(r.step || 0)} / ${number(r.total)}`) : "";
      return el("tr", { dataset: { run: r.name } }, el("td", {}, box),
        el("td", {}, el("a", { href: `#run=${encodeURIComponent(r.name)}`, textContent: r.name })),
        el("td", { textContent: r.workflow || "" }), el("td", {}, stateBadge(r.state)), el("td", {}, progress),
        el("td", { textContent: r.state === "running" ? duration(r.eta) : "" }),
        el("td", { textContent: ago(r.updated), title: r.error || "" }));
    }));
    $("compare").disabled = selected.size < 2;
  });
}

function runView(name) {
  showOnly("run-view");
  document.title = `${name} — slmkit runs`;
  $("run-title").textContent = name;
  $("stage").replaceChildren();
  $("chart").replaceChildren();
  $("results").replaceChildren(el("p", { className: "muted", textContent: "none written yet" }));
  let curve = null;
  let drawn = null;
  let files = "";
  const draw = () => {
    drawn?.dispose();
    drawn = chart($("chart"), [{ label: "train loss", color: COLORS[0], points: curve.train },
      { label: "validation loss", color: COLORS[1], points: curve.val, dashed: true }]);
  };
  $("stage").onchange = () => {
    curve = new Curve(name, $("stage").value);
    drawn?.dispose();
    drawn = null;
  };
  const stop = poll(async () => {
    const run = await api(runUrl(name));
    const parts = [stateBadge(run.state), ` ${run.workflow || "workflow not recorded"}`];
    if (run.total) parts.push(` · step ${number(run.step || 0)} / ${number(run.total)}`);
    if (run.state === "running" && run.eta !== null) parts.push(` · ETA ${duration(run.eta)}`);
    $("run-summary").replaceChildren(...parts);
    $("run-error").hidden = !run.error;
    $("run-error").textContent = run.error || "";
    for (const [box, text] of [["run-command", run.command && `slm ${run.command.join(" ")}`],
      ["run-resume", run.resume]]) {
      $(box).hidden = !text;
      $(box).querySelector("code").textContent = text || "";
    }
    $("config").textContent = JSON.stringify(run.stages.map((s) => ({ stage: s.path, ...s.config })), null, 2);
    const paths = run.stages.map((s) => s.path);
    if ([...$("stage").options].map((o) => o.value).join("\n") !== paths.join("\n")) {
      $("stage").replaceChildren(...paths.map((p) => el("option", { value: p, textContent: p === "." ? name : p })));
      $("stage").parentElement.hidden = paths.length < 2;
      $("stage").value = paths.includes(run.stage) ? run.stage : paths[0];
      $("stage").onchange();
    }
    if (curve) {
      const before = curve.rows;
      await curve.update();
      if (!drawn || curve.rows !== before) draw();
      $("chart").dataset.points = curve.train.size + curve.val.size;
      $("points").textContent = `${curve.train.size} training and ${curve.val.size} validation points`;
    }
    if (JSON.stringify(run.files) !== files) {
      files = JSON.stringify(run.files);
      await showResults(name, run.files);
    }
  });
  return () => {
    stop();
    drawn?.dispose();
  };
}

async function showResults(name, files) {
  if (!files.length) return;
  const blocks = await Promise.all(files.map(async (f) => {
    const url = `${runUrl(name)}/files/${f.path.split("/").map(encodeURIComponent).join("/")}`;
    const block = el("div", { className: "file" }, el("h4", { textContent: f.path }));
    try {
      if (f.kind === "png") {
        block.append(el("img", { src: URL.createObjectURL(await api(url, "blob")), alt: f.path }));
      } else {
        block.append(render(await api(url)));
      }
    } catch (e) {
      block.append(el("p", { className: "error", textContent: e.message }));
    }
    return block;
  }));
  $("results").replaceChildren(...blocks);
}

function compareView(names) {
  showOnly("compare-view");
  document.title = "compare — slmkit runs";
  $("compare-names").textContent = names.join(", ");
  let curves = null;
  let drawn = null;
  const stop = poll(async () => {
    if (!curves) {
      const runs = await Promise.all(names.map((n) => api(runUrl(n))));
      curves = runs.filter((r) => r.stages.length).map((r) => new Curve(r.name,
        r.stages.some((s) => s.path === ".") ? "." : r.stages[0].path));
    }
    const before = curves.map((c) => c.rows).join();
    await Promise.all(curves.map((c) => c.update()));
    if (drawn && curves.map((c) => c.rows).join() === before) return;
    drawn?.dispose();
    drawn = chart($("compare-chart"), curves.flatMap((c, i) => [
      { label: `${c.run} train`, color: COLORS[i % COLORS.length], points: c.train },
      { label: `${c.run} validation`, color: COLORS[i % COLORS.length], points: c.val, dashed: true }]));
    $("compare-chart").dataset.points = curves.reduce((n, c) => n + c.train.size + c.val.size, 0);
  });
  return () => {
    stop();
    drawn?.dispose();
  };
}

function route() {
  stopView();
  status("");
  let hash = "";
  try {
    hash = decodeURIComponent(location.hash.slice(1));
  } catch { /* a malformed address: the list */ }
  if (hash.startsWith("run=")) stopView = runView(hash.slice(4));
  else if (hash.startsWith("compare=")) stopView = compareView(hash.slice(8).split(",").filter(Boolean));
  else stopView = listView();
}

$("compare").addEventListener("click", () => {
  location.hash = `compare=${[...selected].map(encodeURIComponent).join(",")}`;
});
window.addEventListener("hashchange", route);
route();
