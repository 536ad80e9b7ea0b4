// Post-training dashboard: jobs, a job's curves / ranks / log, nodes, pipelines. Polls the JSON under
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
];
const ACTIVE = ["scheduled", "in_progress"];

const state = { info: null, timer: null, view: null };
const $ = (sel, root = document) => root.querySelector(sel);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function fmt(v, digits = 4) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v === "number") return Math.abs(v) >= 1000 || Number.isInteger(v) ? v.toLocaleString() : v.toPrecision(digits);
  return esc(v);
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
  el.innerHTML = `<h2>Jobs</h2><table id="jobs"><thead><tr><th>job</th><th>status</th><th>method</th><th>model</th>
    <th>progress</th><th>step</th><th>ranks / nodes</th><th>duration</th><th>last loss</th><th>final loss</th></tr></thead>
    <tbody></tbody></table>`;
  return async () => {
    const { data } = await api("/jobs");
    $("#jobs tbody", el).innerHTML = data.length ? data.map((j) => `
      <tr class="clickable" data-job="${esc(j.job_uuid)}" data-href="#/job/${encodeURIComponent(j.job_uuid)}">
        <td><a href="#/job/${encodeURIComponent(j.job_uuid)}">${esc(j.job_uuid)}</a></td><td>${badge(j.status)}</td>
        <td>${esc(j.method)}</td><td class="wrap" title="${esc(j.model)}">${esc((j.model || "").split("/").slice(-2).join("/"))}</td>
        <td>${bar(j.progress)}</td><td>${fmt(j.step)} / ${fmt(j.total_steps)}</td>
        <td>${fmt(j.world_size)}${j.nodes.length ? " on " + j.nodes.map(esc).join(", ") : ""}</td>
        <td>${duration(j.duration_s)}</td><td>${fmt(j.last_loss)}</td><td>${fmt(j.final_loss)}</td></tr>`).join("")
      : `<tr><td colspan="10" class="muted">No jobs yet.</td></tr>`;
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
  return { def, box, plot: new uPlot(opts, [[], ...def.keys.map(() => [])], box) };
}

async function jobView(el, jobUuid) {
  const byStep = new Map();
  let offset = 0;
  const charts = {};
  let finalRefreshDone = false;
  el.innerHTML = `<h2>Job <code>${esc(jobUuid)}</code> <span id="job-status"></span></h2>
    <div class="actions" id="job-actions"></div><div class="facts" id="job-facts"></div>
    <p id="job-error" class="error"></p>
    <h3>Curves</h3><div class="charts" id="charts"><p class="muted" id="no-metrics">No metrics yet.</p></div>
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

  function addRecords(records) {
    for (const r of records) {
      if (r.step === undefined) continue;
      const row = byStep.get(r.step) || {};
      for (const def of CHARTS) for (const k of def.keys) if (typeof r[k] === "number") row[k] = r[k];
      byStep.set(r.step, row);
    }
    const steps = [...byStep.keys()].sort((a, b) => a - b);
    for (const def of CHARTS) {
      const cols = def.keys.map((k) => steps.map((s) => byStep.get(s)[k] ?? null));
      const n = cols.reduce((acc, c) => acc + c.filter((v) => v !== null).length, 0);
      if (!n) continue;
      $("#no-metrics", el)?.remove();
      charts[def.id] ||= makeChart(def, $("#charts", el));
      charts[def.id].plot.setData([steps, ...cols]);
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
      ["last loss", fmt(s.last_loss)], ["final loss", fmt(s.final_loss)], ["final validation loss", fmt(s.final_validation_loss)],
    ].map(([k, html]) => `<div><span>${esc(k)}</span>${html}</div>`).join("");
    $("#job-error", el).textContent = res.error || "";
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

// -- routing ---------------------------------------------------------------------------------------
async function route() {
  clearInterval(state.timer);
  const el = $("#view");
  const [, page, id] = (location.hash || "#/").slice(1).split("/").map(decodeURIComponent);
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === (page === "job" || !page ? "jobs" : page === "pipeline" ? "pipelines" : page)));
  try {
    state.info ||= await api("/info");
    if (state.info.auth_required && !localStorage.getItem(TOKEN_KEY)) { login(); return; }
    $("#source").textContent = state.info.source === "service" ? "FSDP service" : `data dir (${state.info.actions ? "actions on" : "read-only"})`;
    const views = { "": jobsView, job: jobView, nodes: nodesView, pipelines: pipelinesView, pipeline: pipelineView };
    const refresh = await (views[page || ""] || jobsView)(el, id);
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
  if (row && !e.target.closest("a")) location.hash = row.dataset.href;
});
window.addEventListener("hashchange", route);
route();
