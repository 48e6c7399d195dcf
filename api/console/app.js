// textcls console: plain JavaScript over the control plane's REST API (no build step).
// Every action is an ordinary API call; what the API refuses, the console shows.
"use strict";

const POLL_MS = 1500;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
// Job kinds, statuses and pipeline steps, as the core defines them (filled in by /ui).
const CONFIG = JSON.parse(document.getElementById("console-config").textContent);
const STATUSES = CONFIG.statuses;
const KINDS = CONFIG.kinds;
const PIPELINE_STEPS = CONFIG.pipeline_steps;
const DEFAULT_STEPS = CONFIG.default_steps;
const KEY_STORAGE = "textcls-api-key";

let pollTimer = null;
let renderSeq = 0;

// ------------------------------------------------------------------ DOM helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fill(node, ...children) {
  const kept = children.flat().filter((c) => c !== null && c !== undefined && c !== false);
  node.replaceChildren(...kept);
  return node;
}

function svgEl(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c));
  return node;
}

function table(headings, rows, attrs) {
  return el("div", { class: "table-wrap" },
    el("table", attrs || {},
      el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)));
}

function flash(message, kind) {
  const box = document.getElementById("flash");
  fill(box, el("div", { class: `flash ${kind || "ok"}` }, message));
  if (kind !== "error") setTimeout(() => fill(box), 4000);
}

const fmt = {
  pct: (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(2)}`),
  num: (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toPrecision(d)),
  mb: (v) => (v === null || v === undefined ? "–" : `${(v / 1e6).toFixed(2)} MB`),
  time: (v) => (v ? new Date(v).toLocaleString() : "–"),
};

function statusBadge(status) {
  return el("span", { class: `badge ${status}`, "data-status": status }, status);
}

function progressBar(job) {
  const pct = Math.round((job.progress || 0) * 100);
  return el("div", { class: "progress", title: `${pct}%` },
    el("div", { class: "bar", style: `width:${pct}%` }),
    el("span", { class: "pct" }, `${pct}%`));
}

// ------------------------------------------------------------------ API

function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }

function updateKeyButton() {
  const b = document.getElementById("key-button");
  b.textContent = apiKey() ? "API key ✓" : "API key";
}

function askKey(message) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-error").textContent = message || "";
  input.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      dialog.close();
      document.getElementById("key-save").onclick = null;
      document.getElementById("key-cancel").onclick = null;
      resolve(value);
    };
    document.getElementById("key-save").onclick = (ev) => {
      ev.preventDefault();
      if (!input.value) return;
      sessionStorage.setItem(KEY_STORAGE, input.value);
      updateKeyButton();
      done(input.value);
    };
    document.getElementById("key-cancel").onclick = () => done(null);
    dialog.showModal();
    input.focus();
  });
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : errorText(detail));
    this.status = status;
    this.detail = detail;
  }
}

function errorText(detail) {
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`)
      .join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

// The API's 422 names fields by their location; the last part is the field.
function fieldErrors(detail) {
  const out = {};
  if (!Array.isArray(detail)) return out;
  for (const e of detail) {
    const loc = (e.loc || []).filter((p) => p !== "body" && p !== "params");
    const field = loc.length ? String(loc[0]) : "_";
    out[field] = out[field] ? `${out[field]}; ${e.msg}` : e.msg;
  }
  return out;
}

async function api(path, options = {}) {
  const method = options.method || "GET";
  const headers = {};
  let body;
  if (options.form) body = options.form;
  else if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  const write = method !== "GET";
  for (let tries = 0; tries < 2; tries += 1) {
    const key = apiKey();
    if (write && key) headers["X-API-Key"] = key;
    const r = await fetch(path, { method, headers, body });
    if (r.status === 401 && write && tries === 0) {
      const typed = await askKey(key ? "That key was refused: type it again." : "");
      if (typed === null) throw new ApiError(401, "an API key is needed for this");
      continue;
    }
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_e) { data = text; }
    if (!r.ok) throw new ApiError(r.status, data && data.detail !== undefined ? data.detail : text);
    return data;
  }
  throw new ApiError(401, "an API key is needed for this");
}

async function apiOrNull(path) {
  try { return await api(path); } catch (e) { if (e.status === 404) return null; throw e; }
}

// ------------------------------------------------------------------ forms

function field(label, input, name) {
  return el("label", { class: "field" },
    el("span", { class: "label" }, label), input,
    el("span", { class: "field-error", "data-error-for": name }));
}

function showErrors(form, err) {
  form.querySelectorAll(".field-error").forEach((n) => { n.textContent = ""; });
  const general = form.querySelector(".form-error");
  if (general) general.textContent = "";
  if (!err) return;
  // Each message beside its field; the rest (or a plain-text refusal) under the form.
  const byField = fieldErrors(err.detail);
  const rest = [];
  for (const [name, msg] of Object.entries(byField)) {
    const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (slot) slot.textContent = msg;
    else rest.push(name === "_" ? msg : `${name}: ${msg}`);
  }
  if (!Array.isArray(err.detail)) rest.push(err.message);
  const slot = general || form.querySelector("[data-error-default]");
  if (slot && rest.length) slot.textContent = rest.join("; ");
}

// ------------------------------------------------------------------ chart

// Accuracy (y) against batch-1 p50 latency (x, log scale), as api/report_html.py draws it.
function tradeoffChart(variants) {
  const pts = variants.filter((v) => v.accuracy !== null && v.accuracy !== undefined
    && v.latency_p50_ms);
  if (!pts.length) return el("p", { class: "muted" }, "No evaluated variants to plot yet.");
  const W = 640, H = 360, L = 70, R = 20, T = 20, B = 50;
  const xs = pts.map((v) => Math.log10(Math.max(v.latency_p50_ms, 1e-3)));
  const ys = pts.map((v) => v.accuracy * 100);
  const x0 = Math.min(...xs) - 0.1, x1 = Math.max(...xs) + 0.1;
  const y0 = Math.min(...ys) - 1, y1 = Math.max(...ys) + 1;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const svg = svgEl("svg", { id: "tradeoff-chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "accuracy against latency" });
  svg.append(svgEl("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }));
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#333" }));
  svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#333" }));
  svg.append(svgEl("text", { x: (W + L) / 2, y: H - 12, "text-anchor": "middle",
    "font-size": 13 }, "latency p50 at batch 1 (ms, log scale)"));
  svg.append(svgEl("text", { x: 16, y: (H - B) / 2, "text-anchor": "middle", "font-size": 13,
    transform: `rotate(-90 16 ${(H - B) / 2})` }, "accuracy (%)"));
  for (let i = 0; i < 5; i += 1) {
    const yv = y0 + ((y1 - y0) * i) / 4;
    svg.append(svgEl("text", { x: L - 6, y: sy(yv) + 4, "text-anchor": "end",
      "font-size": 11 }, yv.toFixed(1)));
    const xv = x0 + ((x1 - x0) * i) / 4;
    svg.append(svgEl("text", { x: sx(xv), y: H - B + 16, "text-anchor": "middle",
      "font-size": 11 }, Number(10 ** xv).toPrecision(3)));
  }
  pts.forEach((v, i) => {
    let color = "#7f7f7f";
    if (v.chosen) color = "#d62728";
    else if (v.within_budget) color = "#2ca02c";
    const label = `${v.step} (${v.format})`;
    const c = svgEl("circle", { class: "point", cx: sx(xs[i]), cy: sy(ys[i]), r: 6, fill: color });
    c.append(svgEl("title", {}, `${label}: ${ys[i].toFixed(2)}% at ${v.latency_p50_ms} ms`));
    svg.append(c);
    svg.append(svgEl("text", { x: sx(xs[i]) + 8, y: sy(ys[i]) - 8, "font-size": 11 }, label));
  });
  return el("figure", { class: "chart" }, svg,
    el("figcaption", { class: "legend" },
      el("span", { style: "color:#d62728" }, "● chosen"),
      el("span", { style: "color:#2ca02c" }, "● within budget"),
      el("span", { style: "color:#7f7f7f" }, "● over budget")));
}

function reportSection(report, jobId) {
  const rows = (report.variants || []).map((v) => el("tr", { class: v.chosen ? "chosen" : null },
    el("td", {}, v.step), el("td", {}, el("a", { href: `#/models/${v.model_id}` }, v.model_id)),
    el("td", {}, v.format), el("td", { class: "n" }, fmt.mb(v.size_bytes)),
    el("td", { class: "n" }, fmt.pct(v.accuracy)), el("td", { class: "n" }, fmt.pct(v.macro_f1)),
    el("td", { class: "n" }, fmt.num(v.latency_p50_ms)),
    el("td", { class: "n" }, fmt.num(v.throughput_per_s)),
    el("td", { class: "n" }, fmt.num(v.drop_points)),
    el("td", {}, v.within_budget ? "yes" : ""), el("td", {}, v.chosen ? "chosen" : "")));
  return el("section", { id: "report" },
    el("h2", {}, "Comparison report ", el("a", { class: "small", href: `/jobs/${jobId}/report.html`,
      target: "_blank" }, "(HTML page)")),
    el("p", { class: "muted" }, `Budget: at most ${report.max_accuracy_drop} points below `
      + `${fmt.pct(report.baseline_accuracy)}% · target ${report.target_device} · chosen: `
      + `${report.chosen_model_id ? `model ${report.chosen_model_id}` : "none yet"}`),
    table(["step", "model", "format", "size", "acc %", "F1 %", "p50 ms", "sent/s", "drop",
      "in budget", ""], rows, { id: "report-table" }),
    tradeoffChart(report.variants || []));
}

// ------------------------------------------------------------------ pages

async function datasetsPage(view) {
  const nameInput = el("input", { name: "name", maxlength: 200, placeholder: "optional" });
  const fileInput = el("input", { name: "file", type: "file", accept: ".tsv,.txt,text/*",
    required: true });
  const form = el("form", { id: "upload-form", class: "card form" },
    el("h2", {}, "Upload a dataset"),
    el("p", { class: "muted" }, "UTF-8 TSV with the header index, sentence, label."),
    field("TSV file", fileInput, "file"), field("Name", nameInput, "name"),
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Upload")));
  fileInput.parentElement.querySelector(".field-error").setAttribute("data-error-default", "");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showErrors(form, null);
    const data = new FormData();
    data.append("file", fileInput.files[0]);
    if (nameInput.value.trim()) data.append("name", nameInput.value.trim());
    try {
      const ds = await api("/datasets", { method: "POST", form: data });
      flash(`Dataset ${ds.id} stored: ${ds.rows} rows.`);
      form.reset();
      await renderList();
    } catch (err) {
      const slot = err.message.startsWith("name") ? "name" : "file";
      form.querySelector(`[data-error-for="${slot}"]`).textContent = err.message;
    }
  });
  const list = el("section", { id: "dataset-list" });
  async function renderList() {
    const rows = (await api("/datasets")).map((d) => el("tr", { "data-id": d.id },
      el("td", {}, d.id), el("td", {}, d.name), el("td", { class: "n" }, d.rows),
      el("td", {}, el("span", { class: "labels" }, Object.entries(d.label_counts || {})
        .map(([label, n]) => el("span", { class: "chip" }, `${label}: ${n}`)))),
      el("td", { class: "n" }, fmt.mb(d.size_bytes)),
      el("td", { class: "mono" }, d.sha256.slice(0, 12)), el("td", {}, fmt.time(d.created_at))));
    fill(list, el("h2", {}, "Datasets"), rows.length
      ? table(["id", "name", "rows", "labels (count)", "size", "sha256", "uploaded"], rows,
        { id: "datasets-table" })
      : el("p", { class: "muted" }, "No datasets yet."));
  }
  fill(view, el("div", { class: "grid" }, list, form));
  await renderList();
}

function pipelineForm(datasets) {
  const options = () => datasets.map((d) => el("option", { value: d.id }, `${d.id} · ${d.name}`));
  const inputs = {
    dataset_id: el("select", { name: "dataset_id" }, options()),
    eval_dataset_id: el("select", { name: "eval_dataset_id" }, options()),
    base_model: el("input", { name: "base_model", value: "scratch:tiny" }),
    max_accuracy_drop: el("input", { name: "max_accuracy_drop", type: "number", step: "0.1",
      value: "1.0" }),
    epochs: el("input", { name: "epochs", type: "number", min: 1, value: 1 }),
    target_device: el("select", { name: "target_device" }, el("option", {}, "cpu"),
      el("option", {}, "gpu")),
    promote: el("input", { name: "promote", type: "checkbox" }),
    extra: el("input", { name: "extra", placeholder: '{"max_length": 64, "batch_size": 32}' }),
  };
  // Defaults: train on the largest dataset, evaluate on the newest other one.
  if (datasets.length > 1) {
    const big = datasets.reduce((a, b) => (b.rows > a.rows ? b : a));
    inputs.dataset_id.value = String(big.id);
    inputs.eval_dataset_id.value = String(datasets.find((d) => d.id !== big.id).id);
  }
  const steps = el("span", { class: "steps" }, PIPELINE_STEPS.map((s) => el("label", {},
    el("input", { type: "checkbox", name: "step", value: s, checked: DEFAULT_STEPS.includes(s) }), s)));
  const form = el("form", { id: "pipeline-form", class: "card form" },
    el("h2", {}, "Start a pipeline"),
    field("Training data", inputs.dataset_id, "dataset_id"),
    field("Evaluation data", inputs.eval_dataset_id, "eval_dataset_id"),
    field("Base model", inputs.base_model, "base_model"),
    field("Budget (accuracy points)", inputs.max_accuracy_drop, "max_accuracy_drop"),
    field("Epochs", inputs.epochs, "epochs"),
    field("Target device", inputs.target_device, "target_device"),
    field("Steps", steps, "steps"),
    field("More parameters (JSON object)", inputs.extra, "extra"),
    el("label", { class: "check" }, inputs.promote, " promote the chosen variant"),
    el("p", { class: "field-error form-error" }),
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Start pipeline")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showErrors(form, null);
    let extra = {};
    try {
      extra = inputs.extra.value.trim() ? JSON.parse(inputs.extra.value) : {};
      if (typeof extra !== "object" || extra === null || Array.isArray(extra)) throw new Error();
    } catch (_e) {
      form.querySelector('[data-error-for="extra"]').textContent =
        "not a JSON object, e.g. {\"max_length\": 64}";
      return;
    }
    const params = {
      ...extra,
      dataset_id: Number(inputs.dataset_id.value),
      eval_dataset_id: Number(inputs.eval_dataset_id.value),
      base_model: inputs.base_model.value.trim(),
      max_accuracy_drop: Number(inputs.max_accuracy_drop.value),
      epochs: Number(inputs.epochs.value),
      target_device: inputs.target_device.value,
      promote: inputs.promote.checked,
      steps: [...form.querySelectorAll('input[name="step"]:checked')].map((c) => c.value),
    };
    try {
      const job = await api("/jobs", { method: "POST", json: { kind: "pipeline", params } });
      flash(`Pipeline job ${job.id} queued.`);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      showErrors(form, err);
    }
  });
  return form;
}

async function jobsPage(view, seq) {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const statusSel = el("select", { name: "status", id: "filter-status" },
    el("option", { value: "" }, "any status"),
    STATUSES.map((s) => el("option", { value: s, selected: q.get("status") === s }, s)));
  const kindSel = el("select", { name: "kind", id: "filter-kind" },
    el("option", { value: "" }, "any kind"),
    KINDS.map((k) => el("option", { value: k, selected: q.get("kind") === k }, k)));
  const topOnly = el("input", { type: "checkbox", id: "filter-top", checked: q.get("all") !== "1" });
  const applyFilters = () => {
    const p = new URLSearchParams();
    if (statusSel.value) p.set("status", statusSel.value);
    if (kindSel.value) p.set("kind", kindSel.value);
    if (!topOnly.checked) p.set("all", "1");
    location.hash = `#/jobs${p.toString() ? `?${p}` : ""}`;
  };
  [statusSel, kindSel, topOnly].forEach((n) => n.addEventListener("change", applyFilters));
  const filters = el("div", { class: "filters" }, statusSel, kindSel,
    el("label", { class: "check" }, topOnly, " hide pipeline steps"));
  const body = el("tbody");
  const list = el("section", {}, el("h2", {}, "Jobs"), filters,
    el("div", { class: "table-wrap" }, el("table", { id: "jobs-table" },
      el("thead", {}, el("tr", {}, ["id", "kind", "status", "progress", "stage", "created"]
        .map((h) => el("th", {}, h)))), body)));
  const datasets = await api("/datasets");
  fill(view, el("div", { class: "grid" }, list, pipelineForm(datasets)));
  async function refresh() {
    const p = new URLSearchParams({ limit: 50 });
    if (q.get("status")) p.set("status", q.get("status"));
    if (q.get("kind")) p.set("kind", q.get("kind"));
    let jobs = await api(`/jobs?${p}`);
    if (q.get("all") !== "1") jobs = jobs.filter((j) => j.parent_id === null);
    if (seq !== renderSeq) return;
    fill(body, ...(jobs.length ? jobs.map((j) => el("tr", { "data-id": j.id },
      el("td", {}, el("a", { href: `#/jobs/${j.id}` }, j.id)), el("td", {}, j.kind),
      el("td", {}, statusBadge(j.status)), el("td", {}, progressBar(j)),
      el("td", { class: "stage" }, j.stage || ""), el("td", {}, fmt.time(j.created_at))))
      : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No jobs match."))]));
  }
  await refresh();
  poll(refresh, seq);
}

function kv(obj) {
  const entries = Object.entries(obj || {})
    .filter(([k, v]) => !k.startsWith("_") && v !== null && v !== undefined);
  if (!entries.length) return el("p", { class: "muted" }, "none");
  return el("dl", { class: "kv" }, entries.flatMap(([k, v]) => [el("dt", {}, k),
    el("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))]));
}

async function jobPage(view, seq, jobId) {
  const head = el("section", { class: "card", id: "job-head" });
  const details = el("div", { class: "grid" });
  const children = el("section", { id: "job-children" });
  const report = el("div");
  const logBox = el("section", { id: "job-log" });
  fill(view, head, details, children, report, logBox);
  let lastReport = "";
  async function refresh() {
    const job = await api(`/jobs/${jobId}`);
    if (seq !== renderSeq) return;
    const cancel = FINAL.has(job.status) ? null : el("button", { id: "cancel-job", class: "danger",
      onclick: async () => {
        try {
          const j = await api(`/jobs/${jobId}/cancel`, { method: "POST" });
          flash(`Job ${jobId}: cancel requested (${j.status}).`);
          await refresh();
        } catch (err) { flash(err.message, "error"); }
      } }, "Cancel job");
    fill(head,
      el("h1", {}, `Job ${job.id} · ${job.kind} `, statusBadge(job.status)),
      progressBar(job), el("p", { class: "stage", id: "job-stage" }, job.stage || ""),
      el("p", { class: "muted" }, `queue ${job.queue} · attempt ${job.attempt} · created `
        + `${fmt.time(job.created_at)} · finished ${fmt.time(job.finished_at)}`,
      job.parent_id ? el("span", {}, " · step of ", el("a", { href: `#/jobs/${job.parent_id}` },
        `pipeline ${job.parent_id}`)) : null,
      job.output_model_id ? el("span", {}, " · output ", el("a",
        { href: `#/models/${job.output_model_id}` }, `model ${job.output_model_id}`)) : null),
      cancel,
      job.error ? el("pre", { class: "error", id: "job-error" }, job.error) : null);
    const metrics = { ...(job.metrics || {}) };
    delete metrics.variants;
    delete metrics.steps;
    fill(details,
      el("section", { class: "card" }, el("h2", {}, "Parameters"), kv(job.params)),
      el("section", { class: "card" }, el("h2", {}, "Metrics"), kv(metrics)));
    if (job.kind === "pipeline") {
      const [kids, rep] = await Promise.all([api(`/jobs?parent_id=${jobId}&limit=200`),
        api(`/jobs/${jobId}/report`)]);
      if (seq !== renderSeq) return;
      fill(children, el("h2", {}, "Steps"), table(["job", "step", "status", "progress"],
        kids.slice().reverse().map((c) => el("tr", {},
          el("td", {}, el("a", { href: `#/jobs/${c.id}` }, c.id)),
          el("td", {}, (c.params || {})._step || c.kind), el("td", {}, statusBadge(c.status)),
          el("td", {}, progressBar(c))))));
      const repKey = JSON.stringify(rep.variants);
      if (repKey !== lastReport) {
        lastReport = repKey;
        fill(report, reportSection(rep, jobId));
      }
    }
    await refreshLog();
    return FINAL.has(job.status);
  }
  async function refreshLog() {
    let text = null;
    try {
      const r = await fetch(`/jobs/${jobId}/logs`);
      if (r.ok) text = await r.text();
    } catch (_e) { text = null; }
    if (seq !== renderSeq) return;
    fill(logBox, el("h2", {}, "Log"), text
      ? el("pre", { class: "log" }, text.slice(-20000))
      : el("p", { class: "muted" }, "No log available for this job."));
  }
  const final = await refresh();
  if (!final) poll(refresh, seq);
}

function evalRows(models) {
  const rows = [];
  for (const m of models) {
    for (const e of m.evaluations || []) {
      const met = e.metrics || {};
      const lat = met.latency_ms || {};
      rows.push(el("tr", {}, el("td", {}, el("a", { href: `#/models/${m.id}` }, m.id)),
        el("td", {}, m.format), el("td", {}, e.dataset_id),
        el("td", { class: "n" }, fmt.pct(met.accuracy)), el("td", { class: "n" }, fmt.pct(met.macro_f1)),
        el("td", { class: "n" }, fmt.num(lat.p50)), el("td", { class: "n" }, fmt.num(lat.p99)),
        el("td", { class: "n" }, fmt.num(met.throughput_per_s)),
        el("td", { class: "n" }, fmt.mb(m.size_bytes))));
    }
  }
  return rows;
}

function lineageTree(models, current) {
  const byParent = new Map();
  const ids = new Set(models.map((m) => m.id));
  for (const m of models) {
    const key = ids.has(m.parent_id) ? m.parent_id : null;
    if (!byParent.has(key)) byParent.set(key, []);
    byParent.get(key).push(m);
  }
  const branch = (parent) => el("ul", {}, (byParent.get(parent) || []).map((m) => el("li", {},
    el("a", { href: `#/models/${m.id}`, class: m.id === current ? "current" : null },
      `${m.id} · ${m.name}`), el("span", { class: "chip" }, m.format),
    byParent.has(m.id) ? branch(m.id) : null)));
  return el("div", { class: "tree", id: "lineage-tree" }, branch(null));
}

async function modelsPage(view) {
  const models = await api("/models?limit=200");
  const rows = models.map((m) => {
    const best = Math.max(-1, ...(m.evaluations || []).map((e) => (e.metrics || {}).accuracy ?? -1));
    return el("tr", { "data-id": m.id }, el("td", {}, el("a", { href: `#/models/${m.id}` }, m.id)),
      el("td", {}, m.name), el("td", {}, m.format), el("td", {}, m.parent_id ?? "–"),
      el("td", {}, m.job_id ? el("a", { href: `#/jobs/${m.job_id}` }, m.job_id) : "–"),
      el("td", { class: "n" }, fmt.mb(m.size_bytes)), el("td", { class: "n" }, m.num_labels),
      el("td", { class: "n" }, best >= 0 ? fmt.pct(best) : "–"));
  });
  fill(view, el("h2", {}, "Models"), rows.length
    ? table(["id", "name", "format", "parent", "job", "size", "labels", "best acc %"], rows,
      { id: "models-table" })
    : el("p", { class: "muted" }, "No models yet: start a pipeline from the Jobs page."));
}

async function modelPage(view, seq, modelId) {
  const [model, lineage] = await Promise.all([api(`/models/${modelId}`),
    api(`/models/${modelId}/lineage`)]);
  const promote = el("button", { id: "promote-model", onclick: async () => {
    try {
      const d = await api(`/models/${modelId}/promote`, { method: "POST" });
      flash(`Model ${d.model_id} is now served.`);
    } catch (err) { flash(err.message, "error"); }
  } }, "Promote");
  const info = { format: model.format, labels: model.num_labels, size: fmt.mb(model.size_bytes),
    parent: model.parent_id ?? "–", job: model.job_id ?? "–", ...(model.info || {}) };
  fill(view,
    el("div", { class: "grid" },
      el("section", { class: "card" }, el("h1", {}, `Model ${model.id} · ${model.name}`), kv(info),
        el("div", { class: "actions" }, promote,
          el("a", { class: "button quiet", id: "download-model",
            href: `/models/${modelId}/download`, download: "" }, "Download"))),
      el("section", { class: "card" }, el("h2", {}, "Lineage"), lineageTree(lineage, model.id))),
    el("section", {}, el("h2", {}, "Evaluations, side by side"),
      table(["model", "format", "dataset", "acc %", "F1 %", "p50 ms", "p99 ms", "sent/s", "size"],
        evalRows(lineage), { id: "evaluations-table" })));
  // The model's pipeline (if it came from one): the accuracy/latency chart.
  if (model.job_id) {
    const job = await apiOrNull(`/jobs/${model.job_id}`);
    const pipelineId = job && job.kind === "pipeline" ? job.id : job && job.parent_id;
    if (pipelineId && seq === renderSeq) {
      const rep = await apiOrNull(`/jobs/${pipelineId}/report`);
      if (rep && seq === renderSeq) view.append(reportSection(rep, pipelineId));
    }
  }
}

async function deploymentsPage(view, seq) {
  const current = el("section", { class: "card", id: "current-deployment" });
  const history = el("section", { id: "deployment-history" });
  const text = el("input", { name: "text", id: "try-text", placeholder: "一句话, e.g. 质量很好" });
  const answer = el("div", { id: "try-answer", class: "answer" });
  const tryForm = el("form", { class: "card form", id: "try-form" },
    el("h2", {}, "Try the served model"), field("Sentence", text, "text"),
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Classify")), answer);
  tryForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showErrors(tryForm, null);
    fill(answer);
    try {
      const r = await api("/deployments/try", { method: "POST", json: { text: text.value } });
      fill(answer, el("p", {}, "category ", el("b", { id: "try-category" }, r.categories),
        ` · probability ${r.probabilities.toFixed(3)} · model ${r.model_id ?? "?"}`));
    } catch (err) {
      const slot = tryForm.querySelector('[data-error-for="text"]');
      slot.textContent = err.message;
    }
  });
  fill(view, el("div", { class: "grid" }, current, tryForm), history);
  async function refresh() {
    const [cur, deps] = await Promise.all([apiOrNull("/deployments/current"),
      api("/deployments")]);
    if (seq !== renderSeq) return;
    const rollback = el("button", { id: "rollback", class: "danger", onclick: async () => {
      try {
        const d = await api("/deployments/rollback", { method: "POST" });
        flash(`Rolled back: model ${d.model_id} is served again.`);
        await refresh();
      } catch (err) { flash(err.message, "error"); }
    } }, "Roll back");
    fill(current, el("h2", {}, "Served model"), cur
      ? el("p", { id: "current-model" }, el("a", { href: `#/models/${cur.model_id}` },
        `model ${cur.model_id}`), ` · ${cur.model_name} · ${cur.model_format} · since `
        + `${fmt.time(cur.created_at)}`)
      : el("p", { class: "muted", id: "current-model" }, "Nothing promoted yet."),
    el("div", { class: "actions" }, rollback));
    fill(history, el("h2", {}, "History"), deps.length
      ? table(["#", "model", "action", "format", "when", ""], deps.map((d) => el("tr",
        { class: d.current ? "chosen" : null }, el("td", {}, d.id),
        el("td", {}, el("a", { href: `#/models/${d.model_id}` }, d.model_id)),
        el("td", {}, d.action + (d.reverted ? " (reverted)" : "")), el("td", {}, d.model_format),
        el("td", {}, fmt.time(d.created_at)), el("td", {}, d.current ? "serving" : ""))),
      { id: "deployments-table" })
      : el("p", { class: "muted" }, "No promotions yet."));
  }
  await refresh();
}

// ------------------------------------------------------------------ router

function poll(fn, seq) {
  clearTimeout(pollTimer);
  const tick = async () => {
    if (seq !== renderSeq) return;
    let done = false;
    try { done = (await fn()) === true; } catch (err) { flash(err.message, "error"); }
    if (!done && seq === renderSeq) pollTimer = setTimeout(tick, POLL_MS);
  };
  pollTimer = setTimeout(tick, POLL_MS);
}

async function route() {
  clearTimeout(pollTimer);
  renderSeq += 1;
  const seq = renderSeq;
  const [path] = (location.hash.replace(/^#/, "") || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean);
  const page = parts[0] || "jobs";
  document.querySelectorAll("nav a").forEach((a) => {
    a.classList.toggle("active", a.dataset.page === page);
  });
  const view = document.getElementById("view");
  const id = parts[1] && /^\d+$/.test(parts[1]) ? Number(parts[1]) : null;
  document.title = `textcls · ${page}${id ? ` ${id}` : ""}`;
  try {
    if (page === "datasets") await datasetsPage(view, seq);
    else if (page === "jobs" && id) await jobPage(view, seq, id);
    else if (page === "jobs") await jobsPage(view, seq);
    else if (page === "models" && id) await modelPage(view, seq, id);
    else if (page === "models") await modelsPage(view, seq);
    else if (page === "deployments") await deploymentsPage(view, seq);
    else fill(view, el("p", {}, `No page ${path}.`));
  } catch (err) {
    if (seq === renderSeq) {
      fill(view, el("p", { class: "error" }, `Could not load: ${err.message}`));
    }
  }
  view.setAttribute("data-ready", String(seq));
}

document.getElementById("key-button").addEventListener("click", async () => {
  const typed = await askKey(apiKey() ? "A key is set; type a new one to replace it." : "");
  if (typed) flash("API key saved for this tab.");
});
window.addEventListener("hashchange", route);
updateKeyButton();
route();
