// The dashboard: jobs (live list, detail with SSE log, charts, downloads, cancel, merge,
// predict), datasets (upload with progress, validation errors, delete) and the new-job form
// (model picker, method defaults, dry-run estimate). Plain ES modules, no build step.

import { api, auth, download, follow, onUnauthorized, streamSse, upload, ApiError } from "./api.js";
import { lineChart } from "./chart.js";

const $ = (sel, root = document) => root.querySelector(sel);

/** Builds an element; children are nodes or text (never parsed as HTML). */
function el(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else if (k === "class") n.className = v;
    else n.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    n.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return n;
}

function toast(msg) {
  const t = el("div", {}, msg);
  $("#toast").append(t);
  setTimeout(() => t.remove(), 5000);
}

const time = (s) => (s ? new Date(s * 1000).toLocaleString() : "—");
const ago = (s) => {
  if (!s) return "—";
  const d = Math.round(s - Date.now() / 1000);
  const a = Math.abs(d);
  const txt = a < 90 ? `${a}s` : a < 5400 ? `${Math.round(a / 60)}m` : `${(a / 3600).toFixed(1)}h`;
  return d >= 0 ? `in ${txt}` : `${txt} ago`;
};
const bytes = (n) =>
  n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const badge = (status) => el("span", { class: `badge s-${status}`, "data-status": status }, status);

function progressBar(job) {
  const p = job.progress;
  if (!p || !p.total_steps) return el("span", { class: "hint" }, job.status === "running" ? "starting…" : "");
  const pct = Math.min(100, (100 * p.step) / p.total_steps);
  return el(
    "div",
    {},
    el(
      "div",
      {
        class: "progress",
        role: "progressbar",
        "aria-valuemin": 0,
        "aria-valuemax": p.total_steps,
        "aria-valuenow": p.step,
        "aria-label": `step ${p.step} of ${p.total_steps}`,
      },
      el("span", { style: `width:${pct.toFixed(1)}%` })
    ),
    el("span", { class: "hint" }, `${p.step}/${p.total_steps} · ETA ${ago(job.estimated_finish)}`)
  );
}

// ---- routing ---------------------------------------------------------------------------

let viewGen = 0; // bumps on every navigation: timers and streams of an old view stop
const cleanups = [];

function leave() {
  viewGen++;
  while (cleanups.length) cleanups.pop()();
}

function alive(gen) {
  return gen === viewGen;
}

/** Calls `f` every `ms` while the view that started it is shown. */
function poll(f, ms) {
  const gen = viewGen;
  const tick = async () => {
    if (!alive(gen)) return;
    try {
      await f();
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) console.warn(e);
    }
    if (alive(gen)) setTimeout(tick, ms);
  };
  tick();
}

function route() {
  leave();
  const view = $("#view");
  view.replaceChildren();
  const signedIn = !!auth.get();
  $("#signin").hidden = signedIn;
  $("#signout").hidden = !signedIn;
  document.querySelectorAll("[data-nav]").forEach((a) => a.removeAttribute("aria-current"));
  if (!signedIn) {
    $("#apikey").focus();
    return;
  }
  const [, page, id] = (location.hash || "#/jobs").split("/");
  const nav = document.querySelector(`[data-nav="${page}"]`);
  if (nav) nav.setAttribute("aria-current", "page");
  if (page === "jobs" && id) jobView(view, id);
  else if (page === "new") newJobView(view);
  else if (page === "files") filesView(view);
  else if (page === "webhooks") webhooksView(view);
  else jobsView(view);
}

// ---- jobs list -------------------------------------------------------------------------

function jobsView(view) {
  const tbody = el("tbody");
  view.append(
    el("h1", {}, "Fine-tuning jobs"),
    el("div", { class: "row" }, el("a", { href: "#/new" }, "New job")),
    el(
      "table",
      { id: "jobs-table", "aria-label": "Fine-tuning jobs" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", {}, "Job"),
          el("th", {}, "Status"),
          el("th", {}, "Progress"),
          el("th", { class: "hide-sm" }, "Method"),
          el("th", { class: "hide-sm" }, "Base model"),
          el("th", { class: "hide-sm" }, "Created"),
          el("th", { class: "hide-sm" }, "Started"),
          el("th", { class: "hide-sm" }, "Finished")
        )
      ),
      tbody
    )
  );
  poll(async () => {
    const list = await api("/v1/fine_tuning/jobs?limit=50");
    tbody.replaceChildren(
      ...list.data.map((j) =>
        el(
          "tr",
          { "data-job": j.id },
          el("td", {}, el("a", { href: `#/jobs/${j.id}`, class: "mono" }, j.id)),
          el("td", {}, badge(j.service_status || j.status)),
          el(
            "td",
            {},
            j.status === "queued"
              ? el("span", { class: "hint", "data-queue-position": j.queue_position }, `#${j.queue_position + 1} in queue · ETA ${ago(j.estimated_finish)}`)
              : j.status === "running"
                ? progressBar(j)
                : j.status === "succeeded" && j.result && j.result.eval && j.result.eval.accuracy !== undefined
                  ? el("span", { class: "hint" }, `accuracy ${(j.result.eval.accuracy * 100).toFixed(1)}%`)
                  : ""
          ),
          el("td", { class: "hide-sm" }, j.training_method.type),
          el("td", { class: "hide-sm" }, j.model),
          el("td", { class: "hide-sm" }, time(j.created_at)),
          el("td", { class: "hide-sm" }, time(j.started_at)),
          el("td", { class: "hide-sm" }, time(j.finished_at))
        )
      )
    );
    if (!list.data.length) tbody.append(el("tr", {}, el("td", { colspan: 8, class: "hint" }, "No jobs yet.")));
  }, 2000);
}

// ---- job detail ------------------------------------------------------------------------

function jobView(view, id) {
  const gen = viewGen;
  const head = el("div");
  const info = el("dl", { class: "kv", id: "job-info" });
  const hyper = el("dl", { class: "kv", id: "job-hyper" });
  const actions = el("div", { class: "row", id: "job-actions" });
  const log = el("ol", { id: "events", "aria-live": "polite", "aria-label": "Event log" });
  const charts = {
    loss: el("div", { class: "chart card", id: "chart-loss" }),
    lr: el("div", { class: "chart card", id: "chart-lr" }),
    eval: el("div", { class: "chart card", id: "chart-eval" }),
    energy: el("div", { class: "chart card", id: "chart-energy", hidden: true }),
  };
  const ckpts = el("ul", { id: "checkpoints" });
  const arts = el("ul", { id: "artifacts" });
  const predictOut = el("div", { id: "predict-out", "aria-live": "polite" });
  const predictIn = el("textarea", { id: "predict-input", rows: 2, placeholder: "a sentence, or a prompt" });
  view.append(
    head,
    el("div", { class: "grid2" }, el("section", { class: "card" }, el("h2", {}, "Job"), info, actions), el("section", { class: "card" }, el("h2", {}, "Hyperparameters"), hyper)),
    el("div", { class: "grid2" }, charts.loss, charts.lr, charts.eval, charts.energy),
    el("section", { class: "card" }, el("h2", {}, "Events"), log),
    el("div", { class: "grid2" },
      el("section", { class: "card" }, el("h2", {}, "Downloads"), arts),
      el("section", { class: "card" }, el("h2", {}, "Checkpoints"), ckpts)),
    el(
      "section",
      { class: "card" },
      el("h2", {}, "Try it"),
      el("label", { for: "predict-input", id: "predict-label" }, "Input (base model + this job's delta)"),
      predictIn,
      el("div", { class: "row" }, el("button", { id: "predict-btn", type: "button", onclick: predict }, "Predict")),
      predictOut
    )
  );

  const points = { train: new Map(), eval: new Map() };
  let job = null;
  let generative = null;

  function drawCharts() {
    const tr = [...points.train.values()].sort((a, b) => a.step - b.step);
    const ev = [...points.eval.values()].sort((a, b) => a.step - b.step);
    lineChart(charts.loss, "Loss", [
      { name: "train", points: tr.map((p) => [p.step, p.loss]) },
      { name: "eval", points: ev.map((p) => [p.step, p.loss]) },
    ]);
    lineChart(charts.lr, "Learning rate", [{ name: "lr", points: tr.map((p) => [p.step, p.lr]) }]);
    const metric = ["accuracy", "pearson", "perplexity"].find((m) => ev.some((p) => p[m] !== undefined)) || "accuracy";
    lineChart(charts.eval, `Eval ${metric}`, [{ name: metric, points: ev.map((p) => [p.step, p[metric]]) }]);
    // Sparse methods: the share of each step's gradient energy the update kept.
    const energy = tr.filter((p) => typeof p.grad_energy === "number");
    charts.energy.hidden = energy.length === 0;
    if (energy.length) lineChart(charts.energy, "Gradient energy kept", [{ name: "kept", points: energy.map((p) => [p.step, p.grad_energy]) }]);
  }

  function kv(dl, pairs) {
    dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  async function refresh() {
    job = await api(`/v1/fine_tuning/jobs/${id}`);
    if (!alive(gen)) return;
    head.replaceChildren(el("h1", {}, "Job ", el("span", { class: "mono" }, job.id), " ", badge(job.service_status || job.status)));
    kv(info, [
      ["Base model", job.model],
      ["Method", job.training_method.type],
      ["Status", badge(job.service_status || job.status)],
      ["Progress", job.status === "running" ? progressBar(job) : job.trained_steps != null ? `${job.trained_steps} steps` : "—"],
      ["Queue position", job.queue_position ?? "—"],
      ["Estimated finish", job.estimated_finish ? `${time(job.estimated_finish)} (${ago(job.estimated_finish)})` : "—"],
      ["Created", time(job.created_at)],
      ["Started", time(job.started_at)],
      ["Finished", time(job.finished_at)],
      ["Training file", job.training_file],
      ["Validation file", job.validation_file ?? "—"],
      ["Attempt", `${job.attempt} of ${job.max_attempts}`],
      ["Trained on", job.result && job.result.device ? job.result.device : "—"],
      ["Error", job.error ? `${job.error.code}: ${job.error.message}` : "—"],
      ["Merge", job.merge ? job.merge.status : "—"],
    ]);
    kv(hyper, Object.entries(job.training_method.hyperparameters).map(([k, v]) => [k, v === null ? "—" : String(v)]));
    actions.replaceChildren(
      ...[
        (job.service_status === "queued" || job.service_status === "running")
          ? el("button", { class: "secondary", type: "button", id: "pause-btn", onclick: () => pauseOrResume("pause") }, "Pause")
          : null,
        job.service_status === "paused"
          ? el("button", { class: "secondary", type: "button", id: "resume-btn", onclick: () => pauseOrResume("resume") }, "Resume")
          : null,
        !FINAL.has(job.status) && job.service_status !== "cancelling"
          ? el("button", { class: "danger", type: "button", id: "cancel-btn", onclick: cancel }, "Cancel job")
          : null,
        job.status === "succeeded" && !job.merge
          ? el("button", { class: "secondary", type: "button", id: "merge-btn", onclick: merge }, "Merge into base model")
          : null,
      ].filter(Boolean)
    );
    $("#predict-btn").disabled = job.status !== "succeeded";
    if (generative === null) {
      // A causal LM is tried through the chat completions route, streamed, by the name the
      // OpenAI SDKs use; an encoder through predict.
      generative = await api(`/v1/models/${encodeURIComponent(job.model)}`)
        .then((m) => m.architecture === "llama")
        .catch(() => false);
      if (!alive(gen)) return;
      $("#predict-btn").textContent = generative ? "Generate" : "Predict";
      $("#predict-label").textContent = generative
        ? "Message (served as this job's fine-tuned model: base + delta in the forward pass)"
        : "Input (base model + this job's delta)";
    }
    if (FINAL.has(job.status) || job.merge) await refreshFiles();
  }

  async function refreshFiles() {
    const [a, c] = await Promise.all([api(`/v1/fine_tuning/jobs/${id}/artifacts`), api(`/v1/fine_tuning/jobs/${id}/checkpoints`)]);
    if (!alive(gen)) return;
    arts.replaceChildren(
      ...a.data.map((x) =>
        el(
          "li",
          {},
          el(
            "button",
            {
              class: "secondary",
              type: "button",
              "data-artifact": x.name,
              "data-kind": x.kind,
              onclick: () => download(x.content_url, x.kind === "merged" ? `merged-${x.name}` : x.name).catch((e) => toast(e.message)),
            },
            `Download ${x.kind === "merged" ? "merged " : ""}${x.name}`
          ),
          el("span", { class: "hint" }, ` ${bytes(x.bytes)} · sha256 ${x.sha256.slice(0, 12)}…`)
        )
      )
    );
    if (!a.data.length) arts.append(el("li", { class: "hint" }, "Available when the job succeeds."));
    ckpts.replaceChildren(...c.data.map((x) => el("li", {}, `step ${x.step_number} · ${bytes(x.bytes)} · ${time(x.created_at)}`)));
    if (!c.data.length) ckpts.append(el("li", { class: "hint" }, "None stored."));
  }

  async function cancel() {
    try {
      await api(`/v1/fine_tuning/jobs/${id}/cancel`, { method: "POST" });
      toast("Cancellation requested");
      await refresh();
    } catch (e) {
      toast(e.message);
    }
  }

  async function pauseOrResume(what) {
    try {
      await api(`/v1/fine_tuning/jobs/${id}/${what}`, { method: "POST" });
      toast(what === "pause" ? "Pause requested: the job stops at its next step" : "Resumed: queued from its latest checkpoint");
      await refresh();
    } catch (e) {
      toast(e.message);
    }
  }

  async function merge() {
    try {
      await api(`/v1/fine_tuning/jobs/${id}/merge`, { method: "POST" });
      toast("Merge queued");
      await refresh();
    } catch (e) {
      toast(e.message);
    }
  }

  async function generate(text) {
    const model = job.fine_tuned_model;
    const reply = el("p", { id: "chat-reply" });
    predictOut.replaceChildren(el("p", { class: "hint", "data-model": model }, `model: ${model}`), reply);
    try {
      await streamSse(
        "/v1/chat/completions",
        { model, messages: [{ role: "user", content: text }], max_tokens: 64 },
        (c) => {
          const d = c.choices[0];
          if (d && d.delta && d.delta.content) reply.textContent += d.delta.content;
          if (d && d.finish_reason) reply.dataset.finish = d.finish_reason;
        }
      );
    } catch (e) {
      predictOut.append(el("p", { class: "error" }, e.message));
    }
  }

  async function predict() {
    const text = predictIn.value.trim();
    if (!text) return predictIn.focus();
    if (generative) return generate(text);
    const input = job.task === "causal-lm" || job.model.includes("llama") ? { prompt: text } : { text };
    predictOut.replaceChildren(el("span", { class: "hint" }, "…"));
    try {
      const r = await api(`/v1/fine_tuning/jobs/${id}/predict`, { method: "POST", body: { inputs: [input] } });
      const p = r.data[0];
      predictOut.replaceChildren(
        p.label !== undefined
          ? el("p", { "data-label": p.label }, `Label: ${p.label} (p = ${Math.max(...p.probabilities).toFixed(3)})`)
          : p.completion !== undefined
            ? el("p", {}, `Completion: ${p.completion}`)
            : el("p", {}, `Value: ${p.value}`)
      );
    } catch (e) {
      predictOut.replaceChildren(el("p", { class: "error" }, e.message));
    }
  }

  function addEvent(e) {
    const li = el("li", { class: e.level, "data-type": e.category || e.type }, `${new Date(e.created_at * 1000).toLocaleTimeString()}  ${e.message}`);
    log.append(li);
    log.scrollTop = log.scrollHeight;
    const d = e.data;
    if (e.type === "metrics" && d) {
      if (d.eval) points.eval.set(d.step, { step: d.step, ...d.eval });
      else if (d.step !== undefined && d.loss !== undefined) points.train.set(d.step, d);
      drawCharts();
    }
    if (e.category === "status") refresh().catch(() => {});
  }

  (async () => {
    try {
      await refresh();
      const m = await api(`/v1/fine_tuning/jobs/${id}/metrics`);
      for (const p of m.data) points[p.type].set(p.step, p);
      drawCharts();
    } catch (e) {
      view.replaceChildren(el("p", { class: "error", role: "alert" }, e.message));
      return;
    }
    if (!alive(gen)) return;
    const stream = follow(id, addEvent, () => refresh().catch(() => {}));
    cleanups.push(() => stream.close());
    // Progress and ETA between events, and the merge's state once requested.
    poll(() => (job && (!FINAL.has(job.status) || (job.merge && !FINAL.has(job.merge.status))) ? refresh() : null), 2000);
  })();
}

// ---- new job ---------------------------------------------------------------------------

// What the advanced section offers besides each method's own hyperparameters (names, types,
// defaults and bounds all come from GET /v1/methods, the engine's registry).
const LOOP_FIELDS = ["lr", "max_steps", "max_seq_len", "warmup_ratio", "warmup_steps", "weight_decay", "schedule", "train_dropout", "eval_every", "checkpoint_every"];

function hpField(h) {
  const id = `hp-${h.name}`;
  const common = { id, "data-hp": h.name, "data-type": h.type, title: h.description };
  let input;
  if (h.enum) {
    input = el("select", common, ...h.enum.map((c) => el("option", { value: c, selected: c === h.default }, c)));
  } else if (h.type === "boolean") {
    input = el("select", common, ...["false", "true"].map((c) => el("option", { value: c, selected: String(h.default) === c }, c)));
  } else {
    const bounds = [
      h.minimum !== undefined ? `≥ ${h.minimum}` : h.exclusive_minimum !== undefined ? `> ${h.exclusive_minimum}` : null,
      h.maximum !== undefined ? `≤ ${h.maximum}` : h.exclusive_maximum !== undefined ? `< ${h.exclusive_maximum}` : null,
    ].filter(Boolean).join(", ");
    input = el("input", { ...common, value: h.default ?? "", inputmode: "decimal", placeholder: h.nullable ? "none" : "default", "aria-describedby": `${id}-hint` });
    return el("div", {}, el("label", { for: id }, h.name), input, el("div", { class: "hint", id: `${id}-hint` }, bounds));
  }
  return el("div", {}, el("label", { for: id }, h.name), input);
}

async function newJobView(view) {
  const [models, files, methods] = await Promise.all([api("/v1/models"), api("/v1/files?limit=100"), api("/v1/methods")]);
  const byId = Object.fromEntries(methods.data.map((m) => [m.id, m]));
  const hyper = (m, name) => byId[m].hyperparameters.find((h) => h.name === name);
  const fileOpts = (none) => [
    none ? el("option", { value: "" }, "— none —") : null,
    ...files.data.map((f) => el("option", { value: f.id }, `${f.filename} · ${f.rows} rows · ${f.task} (${f.id})`)),
  ];
  const method = el(
    "select",
    { id: "method", name: "method" },
    ...methods.data.map((m) => el("option", { value: m.id, selected: m.default, title: m.description }, m.default ? `${m.id} (default)` : m.id))
  );
  const adv = el("div", { id: "advanced" });
  const estimate = el("div", { id: "estimate", "aria-live": "polite" });
  const err = el("p", { class: "error", role: "alert", id: "form-error", hidden: true });
  const form = el(
    "form",
    { id: "new-job", class: "card", novalidate: true },
    el("label", { for: "model" }, "Base model"),
    el("select", { id: "model", name: "model", required: true }, ...models.data.map((m) => el("option", { value: m.id }, `${m.id} (${m.architecture})`))),
    el("label", { for: "training_file" }, "Training file"),
    el("select", { id: "training_file", name: "training_file", required: true }, ...fileOpts(false)),
    el("label", { for: "validation_file" }, "Validation file"),
    el("select", { id: "validation_file", name: "validation_file" }, ...fileOpts(true)),
    el("label", { for: "method" }, "Method"),
    method,
    el("div", { class: "grid2" },
      el("div", {}, el("label", { for: "n_epochs" }, "Epochs"), el("input", { id: "n_epochs", name: "n_epochs", inputmode: "numeric", title: hyper(method.value, "epochs").description, value: hyper(method.value, "epochs").default })),
      el("div", {}, el("label", { for: "batch_size" }, "Batch size"), el("input", { id: "batch_size", name: "batch_size", type: "number", min: 1, value: hyper(method.value, "batch_size").default }))),
    el("details", {}, el("summary", {}, "Advanced hyperparameters"), adv),
    el("label", { for: "suffix" }, "Suffix (optional)"),
    el("input", { id: "suffix", name: "suffix", pattern: "[A-Za-z0-9_-]{1,64}" }),
    estimate,
    err,
    el("div", { class: "row" }, el("button", { type: "submit", id: "submit-job" }, "Create job"))
  );
  view.append(el("h1", {}, "New fine-tuning job"), files.data.length ? form : el("p", {}, "Upload a dataset first: ", el("a", { href: "#/files" }, "Datasets")));

  function fillAdvanced() {
    const m = byId[method.value];
    const own = m.hyperparameters.filter((h) => h.scope === "method");
    const loop = LOOP_FIELDS.map((n) => hyper(method.value, n)).filter(Boolean);
    adv.replaceChildren(
      el("p", { class: "hint" }, m.description),
      el("div", { class: "grid2" }, ...[...loop, ...own].map(hpField))
    );
  }

  function body(dry) {
    // "auto" (the default) or a number of passes.
    const ep = $("#n_epochs").value.trim();
    const hp = { n_epochs: ep === "" || ep === "auto" ? "auto" : Number(ep), batch_size: Number($("#batch_size").value) };
    for (const i of adv.querySelectorAll("[data-hp]")) {
      const v = i.value.trim();
      if (v === "") continue;
      const t = i.dataset.type;
      hp[i.dataset.hp] = t === "boolean" ? v === "true" : (t === "number" || t === "integer") && Number.isFinite(Number(v)) ? Number(v) : v;
    }
    const b = { model: $("#model").value, training_file: $("#training_file").value, method: { type: method.value, hyperparameters: hp } };
    const v = $("#validation_file").value;
    if (v) b.validation_file = v;
    const s = $("#suffix").value.trim();
    if (s) b.suffix = s;
    if (dry) b.dry_run = true;
    return b;
  }

  function showError(e) {
    err.hidden = false;
    err.textContent = e.param ? `${e.param}: ${e.message}` : e.message;
  }

  let seq = 0;
  async function dryRun() {
    const n = ++seq;
    err.hidden = true;
    try {
      const r = await api("/v1/fine_tuning/jobs", { method: "POST", body: body(true) });
      if (n !== seq) return;
      const e = r.estimate;
      estimate.replaceChildren(
        el("h2", {}, "Estimate"),
        el("dl", { class: "kv" },
          el("dt", {}, "Steps"), el("dd", { "data-estimate": "steps" }, e.steps),
          el("dt", {}, "Tokens"), el("dd", {}, `≈ ${e.tokens}`),
          el("dt", {}, "Duration"), el("dd", { "data-estimate": "duration" }, `≈ ${Math.round(e.duration_secs)} s (${e.duration_basis})`),
          el("dt", {}, "Memory"), el("dd", { "data-estimate": "memory" }, `≈ ${bytes(e.memory_bytes)}`),
          el("dt", {}, "of which"), el("dd", { class: "hint" }, e.memory
            ? `weights ${bytes(e.memory.weights)} · optimizer ${bytes(e.memory.optimizer + e.memory.gradients + e.memory.method_state)} · activations ${bytes(e.memory.activations + e.memory.loss)}`
            : ""),
          el("dt", {}, "Trained values"), el("dd", {}, e.trainable_params))
      );
    } catch (e) {
      if (n === seq) {
        estimate.replaceChildren();
        showError(e);
      }
    }
  }

  method.addEventListener("change", () => { fillAdvanced(); dryRun(); });
  form.addEventListener("change", (e) => { if (e.target !== method) dryRun(); });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.hidden = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body: body(false), headers: { "idempotency-key": crypto.randomUUID() } });
      location.hash = `#/jobs/${job.id}`;
    } catch (x) {
      showError(x);
    }
  });
  fillAdvanced();
  if (files.data.length) dryRun();
}

// ---- datasets --------------------------------------------------------------------------

function filesView(view) {
  const input = el("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.csv,text/csv,application/json" });
  const bar = el("span", { style: "width:0%" });
  const progress = el("div", { class: "progress", role: "progressbar", "aria-label": "upload progress", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": 0, hidden: true }, bar);
  const msg = el("p", { id: "upload-msg", role: "alert" });
  const drop = el("div", { class: "drop", id: "drop" }, "Drop a JSONL or CSV file here, or ", el("label", { for: "file-input", style: "display:inline;font-weight:600;cursor:pointer;color:var(--accent)" }, "choose one"), input);
  const tbody = el("tbody");
  view.append(
    el("h1", {}, "Datasets"),
    el("section", { class: "card" }, drop, progress, msg,
      el("p", { class: "hint" }, 'Rows: {"text", "label"}, {"text_a", "text_b", "label"}, {"prompt", "completion"} or {"messages": [...]}. Every row is checked before anything is stored.')),
    el("table", { id: "files-table", "aria-label": "Datasets" },
      el("thead", {}, el("tr", {}, el("th", {}, "File"), el("th", {}, "Rows"), el("th", {}, "Size"), el("th", { class: "hide-sm" }, "Task"), el("th", { class: "hide-sm" }, "Uploaded"), el("th", {}, ""))),
      tbody)
  );
  input.style.display = "none";

  async function list() {
    const r = await api("/v1/files?limit=100");
    tbody.replaceChildren(
      ...r.data.map((f) =>
        el("tr", { "data-file": f.id },
          el("td", {}, f.filename, el("div", { class: "hint mono" }, f.id)),
          el("td", { class: "num" }, f.rows),
          el("td", { class: "num" }, bytes(f.bytes)),
          el("td", { class: "hide-sm" }, f.task),
          el("td", { class: "hide-sm" }, time(f.created_at)),
          el("td", {}, el("button", { class: "danger", type: "button", "aria-label": `Delete ${f.filename}`, onclick: () => del(f) }, "Delete")))
      )
    );
    if (!r.data.length) tbody.append(el("tr", {}, el("td", { colspan: 6, class: "hint" }, "No datasets yet.")));
  }

  async function del(f) {
    if (!confirm(`Delete ${f.filename}?`)) return;
    try {
      await api(`/v1/files/${f.id}`, { method: "DELETE" });
      await list();
    } catch (e) {
      toast(e.message);
    }
  }

  async function send(file) {
    progress.hidden = false;
    msg.className = "";
    msg.textContent = `Uploading ${file.name}…`;
    try {
      const f = await upload(file, (p) => {
        bar.style.width = `${(p * 100).toFixed(0)}%`;
        progress.setAttribute("aria-valuenow", Math.round(p * 100));
      });
      msg.textContent = `Stored ${f.filename}: ${f.rows} rows (${f.task}).`;
      await list();
    } catch (e) {
      msg.className = "error";
      msg.textContent = `Rejected: ${e.message}`;
    } finally {
      setTimeout(() => { progress.hidden = true; bar.style.width = "0%"; }, 800);
    }
  }

  input.addEventListener("change", () => input.files[0] && send(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) send(f);
  });
  list().catch((e) => toast(e.message));
}

// ---- webhooks --------------------------------------------------------------------------

const WEBHOOK_EVENTS = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"];

function webhooksView(view) {
  const url = el("input", { id: "webhook-url", type: "url", required: true, placeholder: "https://example.com/hooks/fine-tuning", style: "min-width:24rem" });
  const boxes = WEBHOOK_EVENTS.map((e) => el("label", { class: "check" }, el("input", { type: "checkbox", value: e, checked: true, "data-event": e }), ` ${e.replace("fine_tuning.job.", "")}`));
  const msg = el("p", { id: "webhook-msg", role: "alert" });
  const form = el("form", { id: "webhook-form", class: "card" },
    el("div", {}, el("label", { for: "webhook-url" }, "Endpoint URL"), url),
    el("fieldset", {}, el("legend", {}, "Events"), ...boxes),
    el("button", { type: "submit" }, "Add endpoint"), msg,
    el("p", { class: "hint" }, "Each job that succeeds, fails or is cancelled is POSTed there as OpenAI's event, signed (Standard Webhooks) with the endpoint's secret, and retried until it answers 2xx. https to a public address only."));
  const tbody = el("tbody");
  const detail = el("section", { id: "deliveries" });
  view.append(
    el("h1", {}, "Webhooks"), form,
    el("table", { id: "webhooks-table", "aria-label": "Webhook endpoints" },
      el("thead", {}, el("tr", {}, el("th", {}, "URL"), el("th", { class: "hide-sm" }, "Events"), el("th", { class: "hide-sm" }, "Added"), el("th", {}, ""))),
      tbody),
    detail);

  async function list() {
    const r = await api("/v1/webhooks?limit=100");
    tbody.replaceChildren(...r.data.map((w) =>
      el("tr", { "data-webhook": w.id },
        el("td", {}, el("button", { class: "link", type: "button", onclick: () => deliveries(w) }, w.url), el("div", { class: "hint mono" }, w.id)),
        el("td", { class: "hide-sm" }, w.events.map((e) => e.replace("fine_tuning.job.", "")).join(", ")),
        el("td", { class: "hide-sm" }, time(w.created_at)),
        el("td", {}, el("button", { class: "danger", type: "button", "aria-label": `Delete ${w.url}`, onclick: () => del(w) }, "Delete")))));
    if (!r.data.length) tbody.append(el("tr", {}, el("td", { colspan: 4, class: "hint" }, "No endpoints yet.")));
  }

  async function deliveries(w) {
    const r = await api(`/v1/webhooks/${w.id}/deliveries?limit=50`);
    detail.replaceChildren(el("h2", {}, "Deliveries to ", el("span", { class: "mono" }, w.url)),
      r.data.length
        ? el("ul", { class: "events" }, ...r.data.map((d) =>
            el("li", { "data-delivery": d.id, "data-status": d.status },
              `${time(d.created_at)}  ${d.type} · ${d.fine_tuning_job_id} · ${d.status} · `,
              d.attempts.map((a) => `#${a.attempt} ${a.status_code ?? a.error ?? "—"}`).join(", ") || "not attempted yet")))
        : el("p", { class: "hint" }, "Nothing delivered yet."));
  }

  async function del(w) {
    if (!confirm(`Delete the endpoint ${w.url}?`)) return;
    try {
      await api(`/v1/webhooks/${w.id}`, { method: "DELETE" });
      detail.replaceChildren();
      await list();
    } catch (e) {
      toast(e.message);
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    msg.className = "";
    const events = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    try {
      const w = await api("/v1/webhooks", { method: "POST", body: { url: url.value, events } });
      msg.replaceChildren("Added. Its signing secret, shown once: ", el("code", { id: "webhook-secret" }, w.secret));
      url.value = "";
      await list();
    } catch (x) {
      msg.className = "error";
      msg.textContent = x.message;
    }
  });
  list().catch((e) => toast(e.message));
}

// ---- start -----------------------------------------------------------------------------

onUnauthorized(() => {
  auth.clear();
  route();
});

$("#signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const key = $("#apikey").value.trim();
  auth.set(key);
  try {
    await api("/v1/fine_tuning/jobs?limit=1");
    $("#apikey").value = "";
    $("#signin-error").hidden = true;
    if (!location.hash) location.hash = "#/jobs";
    route();
  } catch (x) {
    auth.clear();
    $("#signin-error").hidden = false;
    $("#signin-error").textContent = x.status === 401 ? "That key was not accepted." : x.message;
  }
});
$("#signout").addEventListener("click", () => {
  auth.clear();
  route();
});
window.addEventListener("hashchange", route);
route();
