// Post-training dashboard: jobs, a job's curves / ranks / log, runs compared, nodes, pipelines, workflow tasks. Polls the JSON under
// ./api every 2 s; charts are uPlot (vendored), fed incrementally from metrics.jsonl offsets.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "trl-dashboard-token";
const COLORS = ["#2f6fde", "#d64545", "#1f9d55", "#c98a00", "#8a4fd6", "#0f8c96"];
const CHARTS = [
  { id: "loss", title: "Loss", keys: ["loss", "eval_loss"], labels: ["train", "validation"] },
  { id: "lr", title: "Learning rate", keys: ["learning_rate"], labels: ["lr"] },
  { id: "tokens", title: "Tokens / s", keys: ["tokens_per_s"], labels: ["tokens/s"] },
  { id: "rewards", title: "DPO rewards", keys: ["rewards/chosen", "rewards/rejected", "rewards/margins"],
    labels: ["chosen", "rejected", "margin"] },
  { id: "accuracy", title: "DPO reward accuracy", keys: ["rewards/accuracies"], labels: ["accuracy"] },
  { id: "distill", title: "Distillation loss", keys: ["hard_loss", "soft_loss"], labels: ["hard (CE)", "soft (T²·KL)"] },
  { id: "gradnorm", title: "Gradient norm", keys: ["grad_norm"], labels: ["grad norm"] },
  // GRPO: TRL logs one reward per reward function, named after the grader: those charts take their series from
  // the keys a job's records carry (`pattern`), not from a fixed list.
  { id: "grpo_reward", title: "GRPO reward (all graders)", keys: ["reward", "reward_std"], labels: ["mean", "std"] },
  { id: "grader_reward", title: "GRPO reward per grader (mean)", pattern: /^rewards\/(.+)\/mean$/ },
  { id: "grader_reward_std", title: "GRPO reward per grader (std)", pattern: /^rewards\/(.+)\/std$/ },
  { id: "grpo_kl", title: "GRPO KL to the reference", keys: ["kl"], labels: ["KL"] },
  { id: "grpo_length", title: "GRPO completion length", keys: ["completions/mean_length", "completions/clipped_ratio"],
    labels: ["mean tokens", "truncated share"] },
  { id: "grpo_clip", title: "GRPO clip ratio", keys: ["clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"],
    labels: ["region", "low", "high"] },
];
const ACTIVE = ["scheduled", "in_progress"];

const state = { info: null, timer: null, view: null, selected: new Set() };
const $ = (sel, root = document) => root.querySelector(sel);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function fmt(v, digits = 4) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v === "number") return Math.abs(v) >= 1000 || Number.isInteger(v) ? v.toLocaleString() : v.toPrecision(digits);
  return esc(v);
}
// A job's headline metrics (its method's, methods.py MethodInfo.headline) at its last logged step, as the jobs
// table, the job page and the compare table show them: "reward 0.6250 · exact 0.6250"; without them, the loss.
const METRIC_NAMES = { "rewards/margins": "margin", "rewards/accuracies": "accuracy" };
const metricName = (k) => METRIC_NAMES[k] || (k.startsWith("rewards/") ? k.split("/")[1] : k);
function headline(row) {
  const last = Object.entries((row && row.last) || {});
  return last.length ? last.map(([k, v]) => `${esc(metricName(k))} ${fmt(v)}`).join(" · ") : fmt(row && row.last_loss);
}
// The keys of a job's records that are its method's headline (/api/info's `headlines`, from methods.py), in the
// method's order; `*` in a pattern matches any grader's name. An unknown method's headline is the loss.
function headlineKeys(method, records) {
  const numeric = [...new Set(records.flatMap((r) => Object.keys(r).filter((k) => typeof r[k] === "number")))].sort();
  const patterns = (state.info.headlines || {})[method] || ["loss"];
  const literal = (text) => text.replace(/[.+?^${}()|[\]\\]/g, "\\$&");
  const globs = patterns.map((p) => new RegExp(`^${p.split("*").map(literal).join(".*")}$`));
  return [...new Set(globs.flatMap((g) => numeric.filter((k) => g.test(k))))];
}

// Curve smoothing as W&B's and TensorBoard's: an exponential moving average of weight w (0: the raw curve), debiased
// so that the first points are not pulled towards zero. One setting, kept in this browser, for every chart.
const SMOOTHING_KEY = "trl-dashboard-smoothing";
function smoothingWeight() {
  const w = Number(localStorage.getItem(SMOOTHING_KEY));
  return w > 0 && w < 1 ? w : 0;
}
function smooth(values, w) {
  if (!w) return values;
  let average = 0, n = 0;
  return values.map((v) => {
    if (v === null) return null;  // a step this series did not log: a gap, not a zero
    average = average * w + (1 - w) * v;
    n += 1;
    return average / (1 - w ** n);
  });
}
// A chart's raw columns ([steps, ...series]) drawn at the current smoothing.
function draw(chart) {
  const w = smoothingWeight();
  chart.plot.setData([chart.raw[0], ...chart.raw.slice(1).map((c) => smooth(c, w))]);
}
const SMOOTHING_CONTROL = `<label class="smoothing" title="exponential moving average of each curve; 0: raw">smoothing
  <input type="range" id="smoothing" min="0" max="0.99" step="0.01"> <output id="smoothing-value"></output></label>`;
// Wires a view's SMOOTHING_CONTROL: a change is stored and redraws every chart in `charts`.
function bindSmoothing(el, charts) {
  const input = $("#smoothing", el), shown = $("#smoothing-value", el);
  input.value = shown.textContent = String(smoothingWeight());
  input.addEventListener("input", () => {
    localStorage.setItem(SMOOTHING_KEY, input.value);
    shown.textContent = input.value;
    for (const chart of Object.values(charts)) draw(chart);
  });
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
}
function badge(status) { return `<span class="badge ${esc(status)}">${esc(status)}</span>`; }
function bar(fraction) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return `<span class="bar" title="${pct.toFixed(0)}%"><span style="width:${pct}%"></span></span>`;
}

// -- HTTP ------------------------------------------------------------------------------------------
class AuthError extends Error {}
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(`api${path}`, { ...options, headers });
  if (r.status === 401) throw new AuthError("token required");
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(typeof body === "object" ? JSON.stringify(body.detail ?? body) : body);
  return body;
}

function login(message) {
  const dialog = $("#login");
  $("#login-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
}
$("#login-form").addEventListener("submit", () => {
  localStorage.setItem(TOKEN_KEY, $("#token").value);
  route();
});

function setLive(ok) { $("#live").classList.toggle("stale", !ok); $("#live").textContent = ok ? "live" : "offline"; }

// -- views -----------------------------------------------------------------------------------------
async function jobsView(el) {
  el.innerHTML = `<h2>Jobs <button id="compare" disabled title="tick two or more runs">Compare selected</button></h2>
    <table id="jobs"><thead><tr><th></th><th>job</th><th class="owner" hidden>owner</th><th>status</th><th>method</th><th>model</th>
    <th>progress</th><th>step</th><th>ranks / nodes</th><th>duration</th><th>last</th><th>final loss</th><th>error</th></tr></thead>
    <tbody></tbody></table>`;
  const compare = $("#compare", el);
  const updateCompare = () => {
    compare.disabled = state.selected.size < 2;
    compare.textContent = `Compare selected (${state.selected.size})`;
  };
  compare.addEventListener("click", () => {
    location.hash = `#/compare/${[...state.selected].map(encodeURIComponent).join(",")}`;
  });
  $("#jobs tbody", el).addEventListener("change", (e) => {
    const box = e.target.closest("input.pick");
    if (!box) return;
    if (box.checked) state.selected.add(box.value); else state.selected.delete(box.value);
    updateCompare();
  });
  updateCompare();
  return async () => {
    const { data, viewer } = await api("/jobs");
    const admin = viewer && viewer.role === "admin";  // an admin sees every user's jobs: name each owner
    $("th.owner", el).hidden = !admin;
    $("#viewer").textContent = viewer ? `signed in as ${viewer.name} (${viewer.role})` : "";
    const known = new Set(data.map((j) => j.job_uuid));
    for (const id of state.selected) if (!known.has(id)) state.selected.delete(id);
    updateCompare();
    // The model column shows the last two path parts and never wraps inside a word (full path on hover);
    // an error is cut to one line here, whole on hover and on the job's page.
    $("#jobs tbody", el).innerHTML = data.length ? data.map((j) => `
      <tr class="clickable" data-job="${esc(j.job_uuid)}" data-href="#/job/${encodeURIComponent(j.job_uuid)}">
        <td><input type="checkbox" class="pick" value="${esc(j.job_uuid)}" aria-label="select ${esc(j.job_uuid)}"
          ${state.selected.has(j.job_uuid) ? "checked" : ""}></td>
        <td><a href="#/job/${encodeURIComponent(j.job_uuid)}">${esc(j.job_uuid)}</a>${j.name
          ? `<div class="muted job-name" title="${esc(j.name)}">${esc(j.name)}</div>` : ""}</td>
        ${admin ? `<td class="owner">${esc(j.owner || "–")}</td>` : ""}<td>${badge(j.status)}</td>
        <td>${esc(j.method)}</td><td class="model" title="${esc(j.model)}">${esc((j.model || "").split("/").slice(-2).join("/"))}</td>
        <td>${bar(j.progress)}</td><td>${fmt(j.step)} / ${fmt(j.total_steps)}</td>
        <td>${fmt(j.world_size)}${j.nodes.length ? " on " + j.nodes.map(esc).join(", ") : ""}</td>
        <td>${duration(j.duration_s)}</td><td>${headline(j)}</td><td>${fmt(j.final_loss)}</td>
        <td class="error clip" title="${esc(j.error || "")}">${esc(j.error || "")}</td></tr>`).join("")
      : `<tr><td colspan="13" class="muted">No jobs yet.</td></tr>`;
  };
}

function makeChart(def, container) {
  const box = document.createElement("div");
  box.className = "chart";
  box.id = `chart-${def.id}`;
  box.dataset.points = "0";
  box.innerHTML = `<h4>${esc(def.title)}</h4>`;
  container.appendChild(box);
  const opts = {
    width: Math.max(400, box.clientWidth - 16), height: 220,
    scales: { x: { time: false } },
    // learning rates are small numbers: exponent labels, or the ticks read 0.001 0.001 0.002
    axes: [{ label: "step" }, { size: 60, ...(def.id === "lr" ? { values: (u, ticks) => ticks.map((v) => v.toExponential(1)) } : {}) }],
    series: [{ label: "step" }, ...def.keys.map((k, i) => ({
      label: def.labels[i], stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
      points: { show: k.startsWith("eval") ? true : undefined },
    }))],
  };
  const plot = new uPlot(opts, [[], ...def.keys.map(() => [])], box);
  box.plot = plot;  // what is drawn, for the console and the browser tests
  return { def, box, plot };
}

async function jobView(el, jobUuid) {
  const byStep = new Map();
  let offset = 0;
  const charts = {};
  // this job's copy of the chart list: pattern charts gain a series per matching key the records carry
  const defs = CHARTS.map((d) => ({ ...d, keys: [...(d.keys || [])], labels: [...(d.labels || [])] }));
  let finalRefreshDone = false;
  el.innerHTML = `<h2>Job <code>${esc(jobUuid)}</code> <span id="job-status"></span></h2>
    <div class="actions" id="job-actions"></div><div class="facts" id="job-facts"></div>
    <p id="job-error" class="error"></p><div class="muted" id="job-marks"></div>
    <h3>Curves ${SMOOTHING_CONTROL}</h3><div class="charts" id="charts"><p class="muted" id="no-metrics">No metrics yet.</p></div>
    <div id="job-ranks"></div><div id="job-nodes"></div><div id="job-checkpoints"></div><div id="job-plots"></div>
    <h3>Log <select id="log-rank"><option value="">main</option></select></h3><pre class="log" id="job-log"></pre>`;
  const actions = $("#job-actions", el);
  if (state.info.actions) {
    actions.innerHTML = `<button class="danger" id="cancel-job">Cancel job</button><button id="resume-job">Resume</button>`;
    const cancel = $("#cancel-job", el);
    cancel.addEventListener("click", async () => {
      if (!cancel.dataset.armed) {  // two clicks: no modal confirm() to get in the way
        cancel.dataset.armed = "1"; cancel.textContent = "Click again to cancel";
        setTimeout(() => { delete cancel.dataset.armed; cancel.textContent = "Cancel job"; }, 5000);
        return;
      }
      cancel.disabled = true; cancel.textContent = "Cancelling…";
      try { await api(`/jobs/${encodeURIComponent(jobUuid)}/cancel`, { method: "POST" }); }
      catch (e) { $("#job-error", el).textContent = e.message; }
      finalRefreshDone = false; refresh();
    });
    $("#resume-job", el).addEventListener("click", async () => {
      try { await api(`/jobs/${encodeURIComponent(jobUuid)}/resume`, { method: "POST" }); finalRefreshDone = false; refresh(); }
      catch (e) { $("#job-error", el).textContent = e.message; }
    });
  } else {
    actions.innerHTML = `<span class="muted">Read-only (cancel and resume need an API token on the server).</span>`;
  }
  const rankSelect = $("#log-rank", el);
  rankSelect.addEventListener("change", () => refreshLog());
  bindSmoothing(el, charts);

  function addRecords(records) {
    for (const r of records) {
      if (r.step === undefined) continue;
      const row = byStep.get(r.step) || {};
      for (const def of defs) {
        if (!def.pattern) continue;
        for (const k of Object.keys(r)) {
          const m = def.pattern.exec(k);
          if (!m || def.keys.includes(k)) continue;
          def.keys.push(k);
          def.labels.push(m[1]);
          if (charts[def.id]) { charts[def.id].box.remove(); delete charts[def.id]; }  // rebuilt with the new series
        }
      }
      for (const def of defs) for (const k of def.keys) if (typeof r[k] === "number") row[k] = r[k];
      byStep.set(r.step, row);
    }
    const steps = [...byStep.keys()].sort((a, b) => a - b);
    for (const def of defs) {
      const cols = def.keys.map((k) => steps.map((s) => byStep.get(s)[k] ?? null));
      const n = cols.reduce((acc, c) => acc + c.filter((v) => v !== null).length, 0);
      if (!n) continue;
      $("#no-metrics", el)?.remove();
      charts[def.id] ||= makeChart(def, $("#charts", el));
      charts[def.id].raw = [steps, ...cols];
      draw(charts[def.id]);
      charts[def.id].box.dataset.points = String(n);
    }
  }

  async function refreshLog() {
    const rank = rankSelect.value;
    const logs = await api(`/jobs/${encodeURIComponent(jobUuid)}/logs?tail=200${rank ? "&rank=" + rank : ""}`);
    const pre = $("#job-log", el);
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
    pre.textContent = logs.log_lines.join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  async function refresh() {
    if (finalRefreshDone) return;
    const job = await api(`/jobs/${encodeURIComponent(jobUuid)}`);
    const s = job.summary, res = job.resources_allocated || {};
    $("#job-status", el).innerHTML = badge(job.status);
    el.dataset.status = job.status;
    if (state.info.actions) {
      $("#cancel-job", el).disabled = !ACTIVE.includes(job.status);
      $("#resume-job", el).disabled = !["failed", "cancelled"].includes(job.status);
      if (!ACTIVE.includes(job.status)) $("#cancel-job", el).textContent = "Cancel job";
    }
    const fsdp = res.fsdp ? `${res.fsdp.implementation || "FSDP"} ${res.fsdp.sharding_strategy || ""}` : "single process";
    // Every value is escaped here; only the progress bar is markup, built from numbers by bar().
    $("#job-facts", el).innerHTML = [
      ["method", esc(s.method)], ["model", esc(s.model)], ["progress", `${bar(s.progress)} ${fmt(s.step)} / ${fmt(s.total_steps)}`],
      ["world size", `${fmt(res.world_size)} (${esc(fsdp)})`], ["device", `${esc(res.device_type)} ${esc(res.backend || "")}`],
      ["started", esc(s.started_at ? new Date(s.started_at).toLocaleString() : "–")], ["duration", esc(duration(s.duration_s))],
      ["last", headline(s)], ["final loss", fmt(s.final_loss)], ["final validation loss", fmt(s.final_validation_loss)],
      // an ETA only once two logged steps give a rate
      ...(job.eta_s !== null && job.eta_s !== undefined
        ? [["ETA", `${esc(duration(job.eta_s))} <span class="muted">(${fmt(job.rates.steps_per_s, 3)} steps/s)</span>`]] : []),
    ].map(([k, html]) => `<div><span>${esc(k)}</span>${html}</div>`).join("");
    $("#job-error", el).textContent = res.error || "";
    // a paused and resumed job (OpenAI's pause) reads as cancelled, then running: its marks say what happened
    $("#job-marks", el).innerHTML = (job.marks || []).map((m) =>
      `<div>${esc(new Date(m.created_at * 1000).toLocaleString())} · ${esc(m.message)}</div>`).join("");
    const ranks = res.ranks || [];
    $("#job-ranks", el).innerHTML = ranks.length ? `<h3>Ranks</h3><table id="ranks"><thead><tr><th>rank</th><th>node</th>
      <th>parameter share</th><th>params held</th><th>peak host memory</th><th>peak device memory</th><th>error</th></tr></thead><tbody>${
      ranks.map((r) => { const share = r.total_params ? r.local_params / r.total_params : null; return `<tr><td>${fmt(r.rank)}</td>
        <td>${esc(r.node_id || r.hostname || "")}</td><td>${share === null ? "–" : bar(share) + " " + (share * 100).toFixed(1) + "%"}</td>
        <td>${fmt(r.local_params)} / ${fmt(r.total_params)}</td><td>${fmt(r.peak_host_memory_mb)} MB</td>
        <td>${r.peak_device_memory_mb ? fmt(r.peak_device_memory_mb) + " MB" : "–"}</td><td class="wrap error">${esc(r.error || "")}</td></tr>`; }).join("")
      }</tbody></table>` : "";
    const nodes = res.nodes || [];
    $("#job-nodes", el).innerHTML = nodes.length ? `<h3>Nodes</h3><table><thead><tr><th>node</th><th>node rank</th><th>status</th><th>url</th></tr></thead><tbody>${
      nodes.map((n) => `<tr><td>${esc(n.node_id)}</td><td>${fmt(n.node_rank)}</td><td>${badge(n.status || "")}</td><td>${esc(n.url || "")}</td></tr>`).join("")}</tbody></table>` : "";
    const cps = job.checkpoints || [];
    $("#job-checkpoints", el).innerHTML = cps.length ? `<h3>Checkpoints</h3><table><thead><tr><th>step</th><th>path</th><th>train loss</th><th>validation loss</th></tr></thead><tbody>${
      cps.map((c) => `<tr><td>${fmt(c.step)}</td><td class="wrap">${esc(c.path)}</td><td>${fmt(c.training_metrics?.train_loss)}</td>
        <td>${fmt(c.training_metrics?.validation_loss)}</td></tr>`).join("")}</tbody></table>` : "";
    $("#job-plots", el).innerHTML = job.plots.length ? `<h3>Plots (PNG)</h3>${job.plots.map((p) =>
      `<a href="api/jobs/${encodeURIComponent(jobUuid)}/plots/${encodeURIComponent(p)}" target="_blank">${esc(p)}</a>`).join(" · ")}` : "";
    for (const rank of job.log_ranks) {
      if (![...rankSelect.options].some((o) => o.value === String(rank))) rankSelect.add(new Option(`rank ${rank}`, String(rank)));
    }
    const m = await api(`/jobs/${encodeURIComponent(jobUuid)}/metrics?since=${offset}`);
    offset = m.next;
    addRecords(m.records);
    await refreshLog();
    if (!ACTIVE.includes(job.status)) finalRefreshDone = true;  // nothing changes any more
  }
  return refresh;
}

async function nodesView(el) {
  el.innerHTML = `<h2>Nodes</h2><table id="nodes"><thead><tr><th>node</th><th>state</th><th>url</th><th>heartbeat age</th>
    <th>load (jobs)</th><th>CPU cores</th><th>RAM</th><th>GPUs</th><th>models</th><th>jobs</th></tr></thead><tbody></tbody></table>`;
  return async () => {
    const [{ data }, jobs] = await Promise.all([api("/nodes"), api("/jobs")]);
    const now = Date.now() / 1000;
    $("#nodes tbody", el).innerHTML = data.length ? data.map((n) => {
      const c = n.capabilities || {};
      const gpus = (c.gpus || []).map((g) => `${esc(g.name)} (${fmt(g.memory_gb)} GB)`).join(", ") || "none";
      const running = jobs.data.filter((j) => ACTIVE.includes(j.status) && (j.nodes.includes(n.node_id) || (!j.nodes.length && n.local)));
      return `<tr><td>${esc(n.node_id)}${n.local ? " <span class=muted>(this)</span>" : ""}</td><td>${badge(n.state)}</td><td>${esc(n.url)}</td>
        <td>${fmt(Number(now - n.last_heartbeat).toFixed(1))} s</td><td>${fmt(n.load)}</td><td>${fmt(c.cpu_cores)}</td><td>${fmt(c.ram_gb)} GB</td>
        <td class="wrap">${gpus}</td><td class="wrap">${(c.models || []).map(esc).join("<br>")}</td>
        <td class="wrap">${running.map((j) => `<a href="#/job/${encodeURIComponent(j.job_uuid)}">${esc(j.job_uuid)}</a>`).join(", ") || "–"}</td></tr>`;
    }).join("") : `<tr><td colspan="10" class="muted">No node registry here (a data dir has no nodes).</td></tr>`;
  };
}

async function pipelinesView(el) {
  el.innerHTML = `<h2>Pipelines</h2><table id="pipelines"><thead><tr><th>pipeline</th><th>state</th><th>students</th><th>created</th><th>error</th></tr></thead><tbody></tbody></table>`;
  return async () => {
    const { data } = await api("/pipelines");
    $("#pipelines tbody", el).innerHTML = data.length ? data.map((p) => `<tr class="clickable" data-href="#/pipeline/${encodeURIComponent(p.pipeline_id)}">
      <td><a href="#/pipeline/${encodeURIComponent(p.pipeline_id)}">${esc(p.pipeline_id)}</a></td><td>${badge(p.state)}</td><td>${fmt(p.students)}</td>
      <td>${esc(p.created_at ? new Date(p.created_at).toLocaleString() : "–")}</td><td class="wrap error">${esc(p.error || "")}</td></tr>`).join("")
      : `<tr><td colspan="5" class="muted">No pipelines.</td></tr>`;
  };
}

function taskCard(title, t) {
  const progress = t.total_steps ? t.step / t.total_steps : (t.status === "completed" ? 1 : 0);
  return `<div class="task" data-task="${esc(t.job_uuid || title)}"><h4>${esc(title)}</h4>${badge(t.status || t.state || "scheduled")}
    ${t.job_uuid ? `<div><a href="#/job/${encodeURIComponent(t.job_uuid)}">${esc(t.job_uuid)}</a></div>` : ""}
    <div class="muted">${t.note ? esc(t.note) : "node " + esc(t.node_id || "–")}</div>
    ${t.note ? "" : `<div>${bar(progress)} ${fmt(t.step)} / ${fmt(t.total_steps)}</div>`}
    ${t.last_loss !== undefined && t.last_loss !== null ? `<div>loss ${fmt(t.last_loss)}</div>` : ""}
    ${t.error ? `<div class="error">${esc(t.error)}</div>` : ""}</div>`;
}

async function pipelineView(el, pipelineId) {
  el.innerHTML = `<h2>Pipeline <code>${esc(pipelineId)}</code> <span id="p-state"></span></h2><p id="p-error" class="error"></p>
    <div class="pipeline" id="p-graph"></div>`;
  return async () => {
    const p = await api(`/pipelines/${encodeURIComponent(pipelineId)}`);
    $("#p-state", el).innerHTML = badge(p.state);
    $("#p-error", el).textContent = p.error || "";
    const merge = p.merge || {};
    $("#p-graph", el).innerHTML = `${taskCard("teacher", p.teacher)}<span class="arrow">→</span>
      <div class="students">${p.students.map((s) => taskCard(`student ${s.name}`, s)).join("")}</div><span class="arrow">→</span>
      ${taskCard("merge", { status: merge.state, job_uuid: null,
        note: merge.state === "skipped" ? "no merge requested" : `method ${p.request?.merge?.method || "linear"}` })}`;
  };
}

// -- compare runs ----------------------------------------------------------------------------------
const COMPARE_CHARTS = [
  { id: "loss", title: "Training loss", key: "loss" },
  { id: "eval_loss", title: "Validation loss", key: "eval_loss" },
  { id: "learning_rate", title: "Learning rate", key: "learning_rate" },
  { id: "tokens_per_s", title: "Tokens / s", key: "tokens_per_s" },
];
// Spec keys that differ between any two runs and say nothing about how they trained.
const NOT_CONFIG = /(^|\.)(job_uuid|output_dir|run_dir|checkpoint_dir|log_file)$/;

function flatten(obj, prefix = "", out = {}) {
  if (obj !== null && typeof obj === "object" && !Array.isArray(obj)) {
    for (const [k, v] of Object.entries(obj)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else if (prefix) {
    out[prefix] = obj;
  }
  return out;
}
function lastOf(records, key) {
  for (let i = records.length - 1; i >= 0; i--) if (typeof records[i][key] === "number") return records[i][key];
  return null;
}

// One compare chart: `series` ({label, stroke, dash, key}) with one column per series, keyed by step; built again
// when its series change (a headline key that appears later), else only its data.
function plotCompare(el, charts, id, title, series, columns) {
  if (!columns.some((c) => c.size)) return;
  const steps = [...new Set(columns.flatMap((c) => [...c.keys()]))].sort((a, b) => a - b);
  const labels = series.map((s) => s.label).join("\n");
  if (charts[id]?.labels !== labels) {
    const box = document.createElement("div");
    box.className = "chart";
    box.id = `compare-${id}`;
    box.innerHTML = `<h4>${esc(title)}</h4>`;
    if (charts[id]) charts[id].box.replaceWith(box);  // in its place: the headline chart stays first
    else $("#compare-charts", el).appendChild(box);
    const opts = {
      width: Math.max(400, box.clientWidth - 16), height: 240, scales: { x: { time: false } },
      axes: [{ label: "step" }, { size: 60, ...(id === "learning_rate" ? { values: (u, t) => t.map((v) => v.toExponential(1)) } : {}) }],
      series: [{ label: "step" }, ...series.map((s) => ({ label: s.label, stroke: s.stroke, dash: s.dash, width: 1.5,
        spanGaps: true, points: { show: s.key === "eval_loss" ? true : undefined } }))],
    };
    box.plot = new uPlot(opts, [[]], box);  // what is drawn, for the console and the browser tests
    charts[id] = { box, plot: box.plot, labels };
  }
  charts[id].raw = [steps, ...columns.map((c) => steps.map((x) => c.get(x) ?? null))];
  draw(charts[id]);
  charts[id].box.dataset.series = String(columns.filter((c) => c.size).length);
  charts[id].box.dataset.points = String(columns.reduce((n, c) => n + c.size, 0));
}
const byStep = (records, key) => new Map(records.filter((r) => typeof r[key] === "number" && r.step !== undefined)
  .map((r) => [r.step, r[key]]));

async function compareView(el, ids) {
  const runs = (ids || "").split(",").filter(Boolean);
  el.innerHTML = `<h2>Compare ${runs.length} runs</h2><p class="muted">${runs.map((r, i) =>
    `<span class="swatch" style="background:${COLORS[i % COLORS.length]}"></span><a href="#/job/${encodeURIComponent(r)}">${esc(r)}</a>`).join(" ")}</p>
    <h3>Curves ${SMOOTHING_CONTROL}</h3><div class="charts" id="compare-charts"></div><h3>Final metrics</h3><div id="compare-metrics"></div>
    <h3>Config differences</h3><div id="compare-config"></div>`;
  const charts = {};
  bindSmoothing(el, charts);
  return async () => {
    const jobs = await Promise.all(runs.map((r) => api(`/jobs/${encodeURIComponent(r)}`)));
    const metrics = await Promise.all(runs.map((r) => api(`/jobs/${encodeURIComponent(r)}/metrics?since=0`)));
    // every run's headline curves on one chart: the run's colour, its method's first headline metric solid
    const headlines = runs.flatMap((r, i) => headlineKeys(jobs[i].summary.method, metrics[i].records).map((key, n) =>
      ({ label: `${r} ${metricName(key)}`, stroke: COLORS[i % COLORS.length], dash: n ? [6, 4] : undefined, key, run: i })));
    plotCompare(el, charts, "headline", "Headline metrics (by each run's method)",
      headlines, headlines.map((s) => byStep(metrics[s.run].records, s.key)));
    for (const def of COMPARE_CHARTS) {
      plotCompare(el, charts, def.id, def.title, runs.map((r, i) => ({ label: r, stroke: COLORS[i % COLORS.length], key: def.key })),
        metrics.map((m) => byStep(m.records, def.key)));
    }
    const rows = [
      ["status", (j) => badge(j.status)], ["method", (j) => esc(j.summary.method)], ["model", (j) => esc(j.summary.model)],
      ["steps", (j) => `${fmt(j.summary.step)} / ${fmt(j.summary.total_steps)}`], ["duration", (j) => esc(duration(j.summary.duration_s))],
      ["final train loss", (j) => fmt(j.summary.final_loss)], ["final validation loss", (j) => fmt(j.summary.final_validation_loss)],
      ["last (the method's headline metrics)", (j) => headline(j.summary)],
      ["last tokens/s", (j, m) => fmt(lastOf(m.records, "tokens_per_s"))],
    ];
    const head = `<thead><tr><th></th>${runs.map((r, i) => `<th><span class="swatch" style="background:${COLORS[i % COLORS.length]}"></span>${esc(r)}</th>`).join("")}</tr></thead>`;
    $("#compare-metrics", el).innerHTML = `<table id="compare-final">${head}<tbody>${rows.map(([name, cell]) =>
      `<tr><th>${esc(name)}</th>${jobs.map((j, i) => `<td>${cell(j, metrics[i])}</td>`).join("")}</tr>`).join("")}</tbody></table>`;
    const specs = jobs.map((j) => flatten(j.spec || {}));
    const keys = [...new Set(specs.flatMap((s) => Object.keys(s)))].filter((k) => !NOT_CONFIG.test(k)).sort();
    const show = (v) => (v === undefined ? "–" : esc(typeof v === "object" ? JSON.stringify(v) : String(v)));
    // A value that differs only by the run's own id (its run directory's files) is not a difference.
    const same = (k, i) => JSON.stringify(specs[i][k] ?? null).replaceAll(runs[i], "{job}");
    const differing = keys.filter((k) => new Set(specs.map((s, i) => same(k, i))).size > 1);
    $("#compare-config", el).innerHTML = differing.length ? `<table id="compare-diff">${head}<tbody>${differing.map((k) =>
      `<tr data-key="${esc(k)}"><th>${esc(k)}</th>${specs.map((s) => `<td class="wrap">${show(s[k])}</td>`).join("")}</tr>`).join("")}</tbody></table>`
      : `<p class="muted">The runs' configs are the same (${keys.length} keys compared).</p>`;
    if (jobs.every((j) => !ACTIVE.includes(j.status))) clearInterval(state.timer);  // nothing changes any more
  };
}

// -- workflow tasks: enhancement, validation, export, workflow -------------------------------------
const TASK_KINDS = [
  { kind: "enhancements", title: "Enhancements" }, { kind: "validations", title: "Validations" },
  { kind: "exports", title: "Exports" }, { kind: "workflows", title: "Workflows" },
];
function when(t) { return esc(t ? new Date(t).toLocaleString() : "–"); }
function pct(v) { return typeof v === "number" ? `${(v * 100).toFixed(1)}%` : "–"; }
function ci(c) { return Array.isArray(c) ? ` <span class="muted">(95% CI ${pct(c[0])}–${pct(c[1])})</span>` : ""; }
function kv(obj) {
  const flat = flatten(obj || {});
  const keys = Object.keys(flat);
  return keys.length ? `<table class="kv"><tbody>${keys.map((k) => `<tr><th>${esc(k)}</th><td class="wrap">${
    esc(typeof flat[k] === "object" && flat[k] !== null ? JSON.stringify(flat[k]) : flat[k])}</td></tr>`).join("")}</tbody></table>` : `<p class="muted">–</p>`;
}
function verdictBadge(passed) { return `<span class="badge ${passed ? "completed" : "failed"}">${passed ? "PASSED" : "FAILED"}</span>`; }

async function tasksView(el) {
  el.innerHTML = `<h2>Tasks</h2>${TASK_KINDS.map((k) => `<h3>${esc(k.title)}</h3><table id="tasks-${k.kind}"><thead><tr><th>id</th>
    <th>state</th><th>result</th><th>created</th><th>finished</th><th>error</th></tr></thead><tbody></tbody></table>`).join("")}`;
  return async () => {
    const lists = await Promise.all(TASK_KINDS.map((k) => api(`/tasks/${k.kind}`)));
    TASK_KINDS.forEach((k, i) => {
      const data = lists[i].data;
      $(`#tasks-${k.kind} tbody`, el).innerHTML = data.length ? data.map((t) => {
        const href = `#/task/${k.kind}/${encodeURIComponent(t.id)}`;
        return `<tr class="clickable" data-task="${esc(t.id)}" data-href="${href}"><td><a href="${href}">${esc(t.id)}</a></td>
          <td>${badge(t.state)}</td><td>${esc(t.headline)}</td><td>${when(t.created_at)}</td><td>${when(t.finished_at)}</td>
          <td class="error clip" title="${esc(t.error || "")}">${esc(t.error || "")}</td></tr>`;
      }).join("") : `<tr><td colspan="6" class="muted">None.</td></tr>`;
    });
  };
}

function validationHtml(r) {
  const v = r.verdict || {}, s = r.summary || {}, perf = r.performance || {};
  const gates = Object.entries(r.gates || {}).map(([k, ok]) => `<span class="badge ${ok ? "completed" : "failed"}">${esc(k)}</span>`).join(" ");
  const prompts = (r.prompts || []).slice(0, 200);
  const compared = prompts.some((p) => "base_passed" in p);
  const mark = (ok) => (ok === null || ok === undefined ? "–" : ok ? "✔" : "✘");
  const text = (m) => esc(Array.isArray(m) ? (m.filter((x) => x.role === "user").pop() || m[m.length - 1] || {}).content : m);
  return `<div class="verdict" id="validation-verdict">${verdictBadge(r.passed)} ${gates}<p>${esc(v.reason || "")}</p></div>
    <div class="facts">
      <div><span>model</span>${esc(r.model)}</div><div><span>base</span>${esc(r.base_model || "–")}</div>
      <div><span>prompts with an answer (n)</span>${fmt(v.n ?? s.checked)}</div>
      <div><span>pass rate</span>${pct(s.pass_rate)}${ci(v.pass_rate_ci95)}</div>
      <div><span>bar</span>${pct(v.min_pass_rate)}${v.min_pass_rate_is_default ? " (default)" : ""}</div>
      <div><span>base pass rate</span>${pct(s.base_pass_rate)}${ci(v.base_pass_rate_ci95)}</div>
      <div><span>p-value (McNemar)</span>${fmt(v.p_value)}</div>
      <div><span>perplexity / base</span>${fmt(s.perplexity)} / ${fmt(s.base_perplexity)}</div>
      <div><span>tokens/s</span>${fmt(perf.tokens_per_s)}</div><div><span>match</span>${esc(s.match)}</div>
    </div>
    <h3>Prompts${(r.prompts || []).length > prompts.length ? ` (first ${prompts.length} of ${r.prompts.length})` : ""}</h3>
    <table id="validation-prompts"><thead><tr><th>prompt</th><th>expected</th><th>response</th><th>ok</th>
      ${compared ? "<th>base response</th><th>base ok</th>" : ""}</tr></thead><tbody>${prompts.map((p) => `<tr>
      <td class="wrap">${text(p.prompt)}</td><td class="wrap">${esc(p.expected ?? (p.expected_substrings || []).join(" | "))}</td>
      <td class="wrap">${esc(p.response)}</td><td>${mark(p.passed)}</td>
      ${compared ? `<td class="wrap">${esc(p.base_response)}</td><td>${mark(p.base_passed)}</td>` : ""}</tr>`).join("")}</tbody></table>`;
}

function enhancementHtml(r) {
  const solved = r.solved || {};
  const total = Object.values(solved).reduce((a, b) => a + b, 0);
  const share = r.training_data_correct_share || {};
  return `<div class="facts" id="enhancement-solved">
      <div><span>student alone</span>${fmt(solved.student_alone)}</div><div><span>student after hints</span>${fmt(solved.student_after_hint)}</div>
      <div><span>teacher only</span>${fmt(solved.teacher_only)}</div><div><span>unsolved</span>${fmt(solved.unsolved)}</div>
      <div><span>rows kept / total</span>${fmt(r.rows_kept)} / ${fmt(r.rows_total)}</div>
      <div><span>correct in training data</span>${pct(share.before)} → ${pct(share.after)}</div>
      <div><span>hints / teacher answers used</span>${fmt(r.hints_used)} / ${fmt(r.teacher_answers_used)}</div>
      <div><span>preference pairs</span>${fmt(r.preference_pairs)}</div>
    </div>
    ${total ? `<div class="stack" title="who solved the ${total} judged rows">${[["student_alone", "ok"], ["student_after_hint", "accent"],
      ["teacher_only", "warn"], ["unsolved", "bad"]].map(([k, c]) => solved[k] ? `<span class="${c}" style="flex:${solved[k]}">${esc(k.replaceAll("_", " "))} ${fmt(solved[k])}</span>` : "").join("")}</div>` : ""}
    <h3>Student accuracy by attempt</h3><table id="enhancement-iterations"><thead><tr><th>attempt</th><th>rows solved by then</th><th>accuracy</th></tr></thead>
    <tbody>${(r.accuracy_by_iteration || []).map((b) => `<tr><td>${fmt(b.iteration)}</td><td>${fmt(b.correct)}</td><td>${bar(b.accuracy)} ${pct(b.accuracy)}</td></tr>`).join("")}</tbody></table>
    <h3>Dropped rows</h3>${kv(r.rows_dropped)}<h3>Requests per role</h3>${kv(r.requests)}
    ${(r.errors || []).length ? `<h3>Errors</h3><table><tbody>${r.errors.map((e) => `<tr><td>${fmt(e.index)}</td><td class="wrap error">${esc(e.error)}</td></tr>`).join("")}</tbody></table>` : ""}`;
}

function workflowHtml(r, steps) {
  const rows = Object.entries(r.steps || {});
  return `<table id="workflow-steps"><thead><tr><th>step</th><th>status</th><th>elapsed</th><th>error</th></tr></thead><tbody>${rows.map(([name, s]) =>
    `<tr><td>${esc(name)}</td><td>${badge(s.status)}</td><td>${s.elapsed_s !== undefined ? esc(duration(s.elapsed_s)) : "–"}</td>
     <td class="wrap error">${esc(s.error || "")}</td></tr>`).join("")}</tbody></table>
    ${r.steps?.train ? `<p>Training job: <a href="#/job/${encodeURIComponent(r.workflow_id + "-train")}">${esc(r.workflow_id + "-train")}</a></p>` : ""}
    ${steps.enhance ? `<h3>Enhancement</h3>${enhancementHtml(steps.enhance)}` : ""}
    ${steps.validate ? `<h3>Validation</h3>${validationHtml(steps.validate)}` : ""}
    ${steps.export ? `<h3>Export</h3>${kv(steps.export)}` : ""}`;
}

async function taskView(el, kind, taskId) {
  const title = (TASK_KINDS.find((k) => k.kind === kind) || { title: kind }).title.replace(/s$/, "");
  el.innerHTML = `<h2>${esc(title)} <code>${esc(taskId)}</code> <span id="task-state"></span></h2><p id="task-error" class="error"></p>
    <div class="facts" id="task-facts"></div><div id="task-report"></div>
    <details><summary>Raw report (JSON)</summary><pre class="log" id="task-raw"></pre></details>`;
  return async () => {
    const t = await api(`/tasks/${encodeURIComponent(kind)}/${encodeURIComponent(taskId)}`);
    $("#task-state", el).innerHTML = badge(t.state);
    el.dataset.state = t.state;
    $("#task-error", el).textContent = t.error || "";
    $("#task-facts", el).innerHTML = [["created", when(t.created_at)], ["started", when(t.started_at)], ["finished", when(t.finished_at)],
      ...Object.entries(t.progress?.enhance || {}).map(([k, v]) => [`rows ${k.replaceAll("_", " ")}`, fmt(v)])]
      .map(([k, html]) => `<div><span>${esc(k)}</span>${html}</div>`).join("");
    const r = t.report;
    const report = $("#task-report", el);
    if (!r) report.innerHTML = `<p class="muted">No report yet.</p>`;
    else if (kind === "validations") report.innerHTML = `<h3>Report</h3>${validationHtml(r)}`;
    else if (kind === "enhancements") report.innerHTML = `<h3>Report</h3>${enhancementHtml(r)}`;
    else if (kind === "workflows") report.innerHTML = `<h3>Steps</h3>${workflowHtml(r, t.step_reports || {})}`;
    else report.innerHTML = `<h3>Export</h3>${kv(r)}`;
    $("#task-raw", el).textContent = JSON.stringify(r, null, 2);
    if (!ACTIVE.includes(t.state)) clearInterval(state.timer);  // nothing changes any more
  };
}

// Tinker API sessions: the service's own overview (/api/v1/session_overview), one loss curve per model
async function sessionsView(el) {
  el.innerHTML = `<h2>Tinker sessions</h2><table id="sessions"><thead><tr><th>session</th><th>user</th><th>model</th>
    <th>base model</th><th>LoRA rank</th><th>steps</th><th>last loss</th><th>tokens</th><th>memory</th><th>idle</th></tr></thead>
    <tbody></tbody></table><div id="session-charts" class="charts"></div>`;
  const charts = new Map();
  return async () => {
    const headers = {};
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.authorization = `Bearer ${token}`;
    const r = await fetch("../api/v1/session_overview", { headers });
    if (r.status === 401) throw new AuthError("token required");
    if (r.status === 404) {
      $("#sessions tbody", el).innerHTML = `<tr><td colspan="10" class="muted">No Tinker API here (a data dir has no sessions).</td></tr>`;
      return;
    }
    const { sessions } = await r.json();
    const rows = sessions.flatMap((s) => (s.models.length ? s.models : [null]).map((m) => `<tr>
      <td>${esc(s.session_id.slice(0, 12))}</td><td>${esc(s.owner || "–")}</td><td>${m ? esc(m.model_id.split(":").slice(1).join(":")) : "–"}</td>
      <td class="wrap">${m ? esc(m.base_model) : "–"}</td><td>${m ? m.lora_rank : "–"}</td><td>${m ? m.steps : "–"}</td>
      <td>${m ? fmt(m.last_loss) : "–"}</td><td>${m ? m.tokens : "–"}</td><td>${m ? (m.resident ? "resident" : "saved to disk") : "–"}</td>
      <td>${Number(m ? m.idle_s : s.idle_s).toFixed(0)} s</td></tr>`));
    $("#sessions tbody", el).innerHTML = rows.join("") || `<tr><td colspan="10" class="muted">No sessions.</td></tr>`;
    for (const m of sessions.flatMap((s) => s.models)) {
      if (!charts.has(m.model_id)) {
        charts.set(m.model_id, makeChart({ id: `tinker-${charts.size}`, title: `loss of ${m.model_id.slice(0, 12)}…${m.model_id.split(":").slice(1).join(":")}`,
                                           keys: ["loss"], labels: ["loss"] }, $("#session-charts", el)));
      }
      charts.get(m.model_id).plot.setData([m.losses.map((_, i) => i + 1), m.losses]);
    }
  };
}

// -- routing ---------------------------------------------------------------------------------------
async function route() {
  clearInterval(state.timer);
  const el = $("#view");
  const [, page, id, sub] = (location.hash || "#/").slice(1).split("/").map(decodeURIComponent);
  const section = { job: "jobs", compare: "jobs", "": "jobs", pipeline: "pipelines", task: "tasks" }[page || ""] || page;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === section));
  try {
    state.info ||= await api("/info");
    if (state.info.auth_required && !localStorage.getItem(TOKEN_KEY)) { login(); return; }
    $("#source").textContent = state.info.source === "service" ? "FSDP service" : `data dir (${state.info.actions ? "actions on" : "read-only"})`;
    const views = { "": jobsView, job: jobView, nodes: nodesView, pipelines: pipelinesView, pipeline: pipelineView,
                    compare: compareView, tasks: tasksView, task: taskView, sessions: sessionsView };
    const refresh = await (views[page || ""] || jobsView)(el, id, sub);
    const tick = async () => {
      try { await refresh(); setLive(true); }
      catch (e) {
        if (e instanceof AuthError) { clearInterval(state.timer); login(localStorage.getItem(TOKEN_KEY) ? "That token was refused." : ""); }
        else { setLive(false); console.warn("refresh failed:", e.message); }
      }
    };
    await tick();
    state.timer = setInterval(tick, REFRESH_MS);
  } catch (e) {
    if (e instanceof AuthError) login();
    else el.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}
document.addEventListener("click", (e) => {  // whole table rows link to their page
  const row = e.target.closest("tr[data-href]");
  if (row && !e.target.closest("a, input")) location.hash = row.dataset.href;
});
window.addEventListener("hashchange", route);
route();
