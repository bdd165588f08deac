// Browser tests of the dashboard: Debian's chromium driven by playwright-core against a real
// server + worker + Postgres (started by scripts/browser-test.sh). Exits non-zero on the
// first failed check. Screenshots go to $SCREENSHOTS.
import { createHash } from "node:crypto";
import { createServer } from "node:http";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const BASE = process.env.BASE_URL;
const ADMIN = process.env.ADMIN_KEY;
const TRAIN = process.env.TRAIN_FILE;
const SHOTS = process.env.SCREENSHOTS;
mkdirSync(SHOTS, { recursive: true });

const sha = (b) => createHash("sha256").update(b).digest("hex");
const step = (s) => console.log(`· ${s}`);

async function http(path, key, init = {}) {
  const r = await fetch(BASE + path, {
    ...init,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json", ...(init.headers || {}) },
  });
  const body = Buffer.from(await r.arrayBuffer());
  let json = null;
  try { json = JSON.parse(body.toString()); } catch { json = null; }
  return { status: r.status, json, body };
}

async function tenantKey(name) {
  const t = await http("/v1/admin/tenants", ADMIN, { method: "POST", body: JSON.stringify({ name }) });
  const k = await http("/v1/admin/api_keys", ADMIN, { method: "POST", body: JSON.stringify({ tenant_id: t.json.id }) });
  return k.json.key;
}

const keyA = await tenantKey("browser-a");
const keyB = await tenantKey("browser-b");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
const page = await context.newPage();
const consoleErrors = [];
const expectedHttpErrors = [];
page.on("console", (m) => {
  if (m.type() !== "error") return;
  // The browser logs every 4xx response it fetched; the ones this test provokes are listed.
  const http = /Failed to load resource: the server responded with a status of (\d+)/.exec(m.text());
  if (http) expectedHttpErrors.push(Number(http[1]));
  else consoleErrors.push(m.text());
});
page.on("pageerror", (e) => consoleErrors.push(String(e)));
// Nothing may leave the machine.
const foreign = [];
page.on("request", (r) => { if (!r.url().startsWith(BASE) && !r.url().startsWith("blob:") && !r.url().startsWith("data:")) foreign.push(r.url()); });

try {
  step("sign in");
  await page.goto(BASE + "/");
  await page.getByLabel("API key").fill(keyA);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#jobs-table").waitFor();
  assert.equal(await page.evaluate(() => location.href.includes("sg-")), false, "the key is not in the URL");

  step("webhooks: register a local receiver (the server allows 127.0.0.1)");
  const hooks = [];
  const receiver = createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => { hooks.push({ headers: req.headers, body }); res.writeHead(204).end(); });
  });
  await new Promise((ok) => receiver.listen(0, "127.0.0.1", ok));
  await page.getByRole("link", { name: "Webhooks" }).click();
  await page.locator("#webhooks-table").waitFor();
  await page.fill("#webhook-url", `http://127.0.0.1:${receiver.address().port}/hook`);
  await page.getByRole("button", { name: "Add endpoint" }).click();
  await page.locator("#webhook-secret").waitFor();
  assert.match(await page.locator("#webhook-secret").textContent(), /^whsec_/);
  await page.locator("#webhooks-table tr[data-webhook]").waitFor();

  step("upload a bad dataset: rejected with its line");
  await page.getByRole("link", { name: "Datasets" }).click();
  await page.locator("#files-table").waitFor();
  await page.setInputFiles("#file-input", {
    name: "bad.jsonl", mimeType: "application/json",
    buffer: Buffer.from('{"text": "fine", "label": "pos"}\n{"text": "oops", "label": "neg"\n'),
  });
  await page.locator("#upload-msg.error").waitFor();
  const rejected = await page.locator("#upload-msg").textContent();
  assert.match(rejected, /line 2/, rejected);

  step("upload a good dataset by drag and drop");
  const rows = readFileSync(TRAIN, "utf8").split("\n").slice(0, 240).join("\n") + "\n";
  const dt = await page.evaluateHandle((text) => {
    const d = new DataTransfer();
    d.items.add(new File([text], "rt_polarity.jsonl", { type: "application/json" }));
    return d;
  }, rows);
  await page.dispatchEvent("#drop", "drop", { dataTransfer: dt });
  await page.locator("#upload-msg:not(.error)", { hasText: "Stored" }).waitFor();
  await page.locator("#files-table tr[data-file]").first().waitFor();
  assert.match(await page.locator("#files-table").textContent(), /240/);

  step("delete a dataset");
  await page.setInputFiles("#file-input", {
    name: "throwaway.jsonl", mimeType: "application/json",
    buffer: Buffer.from('{"text": "fine", "label": "pos"}\n{"text": "dull", "label": "neg"}\n'),
  });
  await page.locator("#files-table tr", { hasText: "throwaway.jsonl" }).waitFor();
  page.once("dialog", (d) => d.accept());
  await page.getByRole("button", { name: "Delete throwaway.jsonl" }).click();
  await page.locator("#files-table tr", { hasText: "throwaway.jsonl" }).waitFor({ state: "detached" });
  assert.equal((await http("/v1/files", keyA)).json.data.length, 1);

  step("new job: model picker, SparseGrad default, dry-run estimate");
  const devRows = readFileSync(process.env.DEV_FILE, "utf8").split("\n").slice(0, 64).join("\n") + "\n";
  const dev = await http("/v1/files?purpose=fine-tune&filename=dev.jsonl", keyA, { method: "POST", body: devRows, headers: { "content-type": "application/octet-stream" } });
  assert.equal(dev.status, 200);
  await page.getByRole("link", { name: "New job" }).click();
  await page.locator("#new-job").waitFor();
  await page.selectOption("#model", "all-minilm-l6-v2");
  const trainId = (await http("/v1/files", keyA)).json.data.find((f) => f.filename === "rt_polarity.jsonl").id;
  await page.selectOption("#training_file", trainId);
  await page.selectOption("#validation_file", dev.json.id);
  assert.equal(await page.locator("#method").inputValue(), "sparsegrad");
  await page.locator("details summary").click();
  // The form's defaults are the API's method listing (the engine's registry), per method.
  const listed = (await http("/v1/methods", keyA)).json.data;
  const dflt = (m, n) => listed.find((x) => x.id === m).hyperparameters.find((h) => h.name === n).default;
  assert.equal(await page.locator("#hp-density").inputValue(), String(dflt("sparsegrad", "density")));
  assert.equal(await page.locator("#hp-lr").inputValue(), String(dflt("sparsegrad", "lr")));
  assert.equal(await page.locator("#n_epochs").inputValue(), "auto");
  assert.equal(await page.locator("#hp-warmup_ratio").inputValue(), String(dflt("sparsegrad", "warmup_ratio")));
  assert.equal(await page.locator("#hp-train_dropout").inputValue(), "true");
  await page.selectOption("#method", "lora");
  assert.equal(await page.locator("#hp-r").inputValue(), String(dflt("lora", "r")));
  assert.equal(await page.locator("#hp-lr").inputValue(), String(dflt("lora", "lr")));
  await page.selectOption("#method", "sparsegrad");
  await page.locator("#hp-basis_steps").waitFor();
  await page.fill("#hp-max_steps", "30");
  await page.fill("#hp-max_seq_len", "48");
  await page.fill("#hp-eval_every", "10");
  await page.fill("#hp-basis_steps", "4");
  await page.fill("#batch_size", "8");
  await page.locator("#batch_size").dispatchEvent("change");
  await page.locator('[data-estimate="steps"]', { hasText: /^30$/ }).waitFor();
  await page.screenshot({ path: join(SHOTS, "new-job.png"), fullPage: true });
  await page.getByRole("button", { name: "Create job" }).click();
  await page.waitForURL(/#\/jobs\/ftjob_/);
  const jobId = page.url().split("/").pop();

  step("watch it run: queued/running → succeeded, progress and loss chart grow");
  const progress = new Set();
  const chartPoints = new Set();
  let runningShot = false;
  const deadline = Date.now() + 600_000;
  for (;;) {
    const status = await page.locator("h1 .badge").getAttribute("data-status").catch(() => null);
    const now = await page.locator("#job-info [role=progressbar]").getAttribute("aria-valuenow", { timeout: 200 }).catch(() => null);
    if (now) progress.add(Number(now));
    const pts = await page.locator('#chart-loss path[data-series="train"]').getAttribute("data-points", { timeout: 200 }).catch(() => null);
    if (pts) chartPoints.add(Number(pts));
    if (status === "running" && now && Number(now) > 2 && !runningShot) {
      await page.screenshot({ path: join(SHOTS, "job-running.png"), fullPage: true });
      runningShot = true;
    }
    if (status === "succeeded") break;
    assert.ok(!["failed", "cancelled"].includes(status), `job ended ${status}`);
    assert.ok(Date.now() < deadline, "the job did not finish in 10 minutes");
    await page.waitForTimeout(250);
  }
  assert.ok(progress.size >= 2, `the progress bar moved: ${[...progress]}`);
  assert.ok(chartPoints.size >= 2, `the loss chart gained points: ${[...chartPoints]}`);
  assert.ok(runningShot, "saw the running job");
  await page.locator('#artifacts [data-artifact="delta.safetensors"]').waitFor();
  const logText = await page.locator("#events").textContent();
  for (const s of ["queued", "running", "succeeded"]) assert.match(logText, new RegExp(s));
  assert.ok(Number(await page.locator('#chart-eval path').getAttribute("data-points")) >= 1, "eval points drawn");
  // SparseGrad measures the energy its fixed support keeps on steps 1, 11 and 21 of 30.
  assert.ok(Number(await page.locator('#chart-energy path').getAttribute("data-points")) >= 3, "gradient-energy points drawn");
  assert.doesNotMatch(await page.locator("main").textContent(), /\bundefined\b|\bnull\b|NaN/, "no raw null/undefined shown");
  await page.screenshot({ path: join(SHOTS, "job-finished.png"), fullPage: true });

  step("download the delta: the same bytes as the API's");
  const [dl] = await Promise.all([
    page.waitForEvent("download"),
    page.locator('#artifacts [data-artifact="delta.safetensors"]').click(),
  ]);
  const saved = join(SHOTS, "downloaded-delta.safetensors");
  await dl.saveAs(saved);
  const arts = await http(`/v1/fine_tuning/jobs/${jobId}/artifacts`, keyA);
  const delta = arts.json.data.find((a) => a.name === "delta.safetensors");
  const viaApi = await http(delta.content_url, keyA);
  assert.equal(sha(readFileSync(saved)), sha(viaApi.body));
  assert.equal(sha(viaApi.body), delta.sha256);

  step("predict box");
  await page.fill("#predict-input", "a warm, funny and moving film");
  await page.getByRole("button", { name: "Predict" }).click();
  await page.locator("#predict-out [data-label]").waitFor();

  step("merge: the merged model's files become downloadable");
  await page.locator("#merge-btn").click();
  await page.locator('#artifacts [data-kind="merged"][data-artifact="model.safetensors"]').waitFor({ timeout: 120_000 });

  step("pause, resume and cancel a second job");
  const second = await http("/v1/fine_tuning/jobs", keyA, {
    method: "POST",
    body: JSON.stringify({
      model: "all-minilm-l6-v2", training_file: trainId,
      method: { type: "sparsegrad", hyperparameters: { max_steps: 5000, batch_size: 8, max_seq_len: 48 } },
    }),
  });
  assert.equal(second.status, 200);
  await page.getByRole("link", { name: "Jobs" }).click();
  await page.locator(`tr[data-job="${second.json.id}"]`).waitFor();
  await page.locator(`tr[data-job="${jobId}"] .badge[data-status="succeeded"]`).waitFor();
  await page.screenshot({ path: join(SHOTS, "jobs-list.png"), fullPage: true });
  await page.locator(`tr[data-job="${second.json.id}"] a`).click();
  await page.locator("#pause-btn").click();
  await page.locator('h1 .badge[data-status="paused"]').waitFor({ timeout: 180_000 });
  await page.locator("#resume-btn").click();
  await page.locator('h1 .badge:not([data-status="paused"])').waitFor({ timeout: 30_000 });
  await page.locator("#cancel-btn").click();
  await page.locator('h1 .badge[data-status="cancelled"]').waitFor({ timeout: 180_000 });

  step("keyboard and labels");
  await page.reload();
  await page.locator("h1 .badge").waitFor();
  await page.keyboard.press("Tab");
  const focused = await page.evaluate(() => document.activeElement.tagName);
  assert.ok(["A", "BUTTON"].includes(focused), `Tab reaches a control first (${focused})`);
  const unlabelled = await page.evaluate(() =>
    [...document.querySelectorAll("input, select, textarea")].filter((e) => e.type !== "file" && e.offsetParent !== null && !(e.labels && e.labels.length) && !e.getAttribute("aria-label")).map((e) => e.id));
  assert.deepEqual(unlabelled, [], "every visible control has a label");

  step("phone width");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.getByRole("link", { name: "Jobs" }).click();
  await page.locator("#jobs-table tr[data-job]").first().waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `no horizontal scrolling at phone width (${overflow}px)`);
  await page.screenshot({ path: join(SHOTS, "jobs-list-phone.png"), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });

  step("webhooks: the finished and the cancelled job were delivered, signed");
  await page.getByRole("link", { name: "Webhooks" }).click();
  await page.locator("#webhooks-table tr[data-webhook] button.link").click();
  for (let i = 0; i < 60 && (await page.locator('[data-delivery][data-status="succeeded"]').count()) < 2; i++) {
    await page.waitForTimeout(500);
    await page.locator("#webhooks-table tr[data-webhook] button.link").click();
  }
  assert.equal(await page.locator('[data-delivery][data-status="succeeded"]').count(), 2);
  const types = hooks.map((h) => JSON.parse(h.body).type).sort();
  assert.deepEqual(types, ["fine_tuning.job.cancelled", "fine_tuning.job.succeeded"]);
  assert.ok(hooks.every((h) => h.headers["webhook-signature"].startsWith("v1,") && h.headers["webhook-id"]));
  await page.screenshot({ path: join(SHOTS, "webhooks.png"), fullPage: true });
  receiver.close();
  await page.getByRole("link", { name: "Jobs" }).click();

  step("a causal-LM fine-tune answers in the Try-it box, streamed from /v1/chat/completions");
  const lmRows = Array.from({ length: 16 }, (_, i) =>
    JSON.stringify({ prompt: `Say hello number ${i}.`, completion: `Hello ${i}!` })).join("\n") + "\n";
  const fd = new FormData();
  fd.append("purpose", "fine-tune");
  fd.append("file", new Blob([lmRows]), "hello.jsonl");
  const up = await fetch(BASE + "/v1/files", { method: "POST", headers: { authorization: `Bearer ${keyA}` }, body: fd });
  assert.equal(up.status, 200);
  const lm = await http("/v1/fine_tuning/jobs", keyA, {
    method: "POST",
    body: JSON.stringify({
      model: "smollm2-135m-instruct-4l", training_file: (await up.json()).id,
      method: { type: "sparsegrad", hyperparameters: { max_steps: 2, batch_size: 4, max_seq_len: 32, basis_steps: 2 } },
    }),
  });
  assert.equal(lm.status, 200, JSON.stringify(lm.json));
  await page.getByRole("link", { name: "Webhooks" }).click();
  await page.getByRole("link", { name: "Jobs" }).click();
  await page.locator(`tr[data-job="${lm.json.id}"] a`).click();
  await page.locator('h1 .badge[data-status="succeeded"]').waitFor({ timeout: 300_000 });
  await page.getByRole("button", { name: "Generate" }).waitFor();
  await page.fill("#predict-input", "Say hello number 3.");
  await page.getByRole("button", { name: "Generate" }).click();
  await page.locator("#chat-reply[data-finish]").waitFor({ timeout: 120_000 });
  const served = await page.locator("#predict-out [data-model]").getAttribute("data-model");
  const lmJob = await http(`/v1/fine_tuning/jobs/${lm.json.id}`, keyA);
  assert.equal(served, lmJob.json.fine_tuned_model);
  await page.screenshot({ path: join(SHOTS, "job-chat.png"), fullPage: true });
  await page.getByRole("link", { name: "Jobs" }).click();

  step("another tenant sees none of the first tenant's jobs");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByLabel("API key").fill(keyB);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#jobs-table").waitFor();
  await page.locator("#jobs-table", { hasText: "No jobs yet." }).waitFor();
  assert.equal(await page.locator("tr[data-job]").count(), 0);
  assert.equal((await http(`/v1/fine_tuning/jobs/${jobId}`, keyB)).status, 404);

  assert.deepEqual(consoleErrors, [], "no console errors");
  assert.deepEqual(expectedHttpErrors, [400], "the only failed request was the rejected upload");
  assert.deepEqual(foreign, [], "no request left the machine");
  console.log(`browser tests passed; screenshots in ${SHOTS}`);
} catch (e) {
  await page.screenshot({ path: join(SHOTS, "failure.png"), fullPage: true }).catch(() => {});
  console.error(e);
  console.error("console errors:", consoleErrors);
  process.exitCode = 1;
} finally {
  await browser.close();
}
