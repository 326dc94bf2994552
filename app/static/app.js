// SpaSemSR Serve web page: upload, live job status, before/after comparison, download.
// Plain browser JavaScript: no build step, no dependencies, no request beyond this origin.
"use strict";

const POLL_MS = 400; // only for a service without the events route
const RECONNECT_MS = 1000; // after a broken event stream, before the next one
const MODEL_RETRY_MS = 3000;
const NAMES_KEY = "spasemsr-job-names"; // localStorage: job id -> the file's name
const ZOOMS = [0.25, 0.5, 1, 2, 4, 8, 16];
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

const $ = (id) => document.getElementById(id);

const state = {
  entries: new Map(), // job id -> { item, job, file, resultUrl } of every job listed
  viewing: null, // the job shown in the comparison viewer
  zoom: 1,
  models: new Map(), // name -> what GET /v1/models says of each served model
  defaultModel: null, // the service's default model (it may have no warm worker yet)
  restoring: Promise.resolve(), // the first listing of the caller's jobs (GET /v1/jobs)
};

// --- HTTP ---------------------------------------------------------------------------------

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

class ProblemError extends Error {
  constructor(problem) {
    super(problem.title || "Error");
    this.problem = problem;
  }
}

// An error answer as an RFC 9457 problem; a plain one when the body is something else.
async function problemOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (body && typeof body === "object" && body.title) {
    return body;
  }
  return { title: `HTTP ${response.status}`, status: response.status, detail: response.statusText };
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { Accept: "application/json", ...authHeaders(), ...(options.headers || {}) },
    });
  } catch (error) {
    throw new ProblemError({ title: "Service unreachable", detail: String(error.message || error) });
  }
  if (!response.ok) {
    throw new ProblemError(await problemOf(response));
  }
  return response;
}

// A text reduced to what it says: "Job canceled." and "canceled" say the same thing.
function gist(text) {
  return String(text || "").trim().toLowerCase().replace(/[.!]+$/, "").replace(/^job /, "");
}

// Title and detail of a problem, leaving out what an earlier part (e.g. the status shown
// beside it) already says, so that no message reads "canceled: Job canceled: Job canceled".
function problemParts(problem, alreadySaid = []) {
  const said = alreadySaid.map(gist);
  const parts = [];
  for (const text of [problem.title, problem.detail]) {
    if (text && !said.includes(gist(text))) {
      parts.push(text);
      said.push(gist(text));
    }
  }
  return parts;
}

function showProblem(element, problem, alreadySaid = []) {
  element.replaceChildren();
  const [title, detail] = problemParts(problem, alreadySaid);
  if (title === undefined) {
    element.hidden = true; // nothing beyond what is already on screen
    return;
  }
  const strong = document.createElement("strong");
  strong.className = "problem-title";
  strong.textContent = title;
  element.append(strong);
  if (detail !== undefined) {
    element.append(document.createTextNode(" " + detail));
  }
  element.hidden = false;
}

// --- the models -----------------------------------------------------------------------------

// What a model card says, without any server path: a worker describes its weights in words, and
// should a path ever slip into that text (a folder or file named in the settings), only its
// last part (the folder or file name) is shown. Visitors never learn the server's file layout.
const PATH_LIKE = /[^\s;,()]*[\\/][^\s;,()]*/g;

function withoutPaths(text) {
  return String(text || "").replace(PATH_LIKE, (path) => {
    const parts = path.split(/[\\/]/).filter((part) => part !== "");
    return parts.length ? parts[parts.length - 1] : "";
  });
}

function trainedLabel(trained) {
  if (trained === true) return "trained";
  if (trained === false) return "untrained";
  return "trained: unknown";
}

// The picker: one option per served model, labelled trained/untrained, the default preselected.
// A default that no warm worker serves yet is still offered (its jobs wait for a worker).
function fillModelPicker(list) {
  const picker = $("model");
  const previous = picker.dataset.filled ? picker.value : null;
  const options = [];
  const served = new Set(list.models.map((m) => m.name));
  if (list.default && !served.has(list.default)) {
    const option = new Option(`${list.default} (default) — no warm worker yet`, list.default);
    option.dataset.trained = "unknown";
    options.push(option);
  }
  for (const model of list.models) {
    const isDefault = model.default || model.name === list.default;
    const option = new Option(
      `${model.name} — ${trainedLabel(model.trained)}${isDefault ? " (default)" : ""}`,
      model.name,
    );
    option.dataset.trained = String(model.trained);
    options.push(option);
  }
  picker.replaceChildren(...options);
  const names = options.map((o) => o.value);
  picker.value = previous !== null && names.includes(previous) ? previous : (list.default || "");
  picker.dataset.filled = "true";
}

function showSelectedModel() {
  const name = $("model").value || state.defaultModel;
  const model = state.models.get(name);
  const warning = $("model-warning");
  if (!model) {
    $("model-name").textContent = name || "unavailable";
    $("model-details").textContent = "(no warm worker serves it yet; its jobs wait for one)";
    warning.hidden = true;
    return;
  }
  $("model-name").textContent = `${model.name} ${model.version}`;
  const devices = (model.devices && model.devices.length) ? model.devices.join(", ") : model.device;
  const weights = withoutPaths(model.weights);
  const configuration = withoutPaths(model.configuration);
  // The weights' description already names their source and licence: say it once.
  const licence = model.licence && !weights.includes(model.licence) ? `; ${model.licence}` : "";
  const workers = `${model.workers} worker${model.workers === 1 ? "" : "s"}`;
  $("model-details").textContent =
    `(${trainedLabel(model.trained)}; ${configuration}; weights: ${weights}${licence}; ` +
    `${devices}, ${model.dtype}; ${workers})`;
  if (!model.trained) {
    const text = (model.warnings && model.warnings.length)
      ? model.warnings.join(" ")
      : `The ${model.name} weights are untrained: results show the pipeline working, not its quality.`;
    warning.replaceChildren();
    const title = document.createElement("strong");
    title.textContent = "Untrained weights. ";
    warning.append(title, document.createTextNode(text));
    warning.hidden = false;
  } else {
    warning.hidden = true;
  }
}

async function loadModels() {
  let list;
  try {
    list = await (await api("/v1/models")).json();
  } catch (error) {
    const problem = error.problem || { title: String(error) };
    $("model-name").textContent = "unavailable";
    $("model-details").textContent = `(${problemParts(problem).join(": ")})`;
    $("model-warning").hidden = true;
    setTimeout(loadModels, MODEL_RETRY_MS);
    return;
  }
  state.defaultModel = list.default;
  state.models = new Map(list.models.map((m) => [m.name, m]));
  fillModelPicker(list);
  if (!list.models.length) {
    $("model-name").textContent = "unavailable";
    $("model-details").textContent = "(No warm worker is serving a model yet.)";
    $("model-warning").hidden = true;
  } else {
    showSelectedModel();
  }
  if (!list.models.length || !state.models.has(list.default)) {
    setTimeout(loadModels, MODEL_RETRY_MS); // until the default model's worker is warm
  }
}

// --- files ----------------------------------------------------------------------------------

function describeFiles(files) {
  if (!files.length) {
    return "No file chosen.";
  }
  const names = Array.from(files, (f) => f.name);
  return `${files.length} file${files.length === 1 ? "" : "s"}: ${names.join(", ")}`;
}

function setupDropzone() {
  const zone = $("dropzone");
  const input = $("files");
  input.addEventListener("change", () => {
    $("file-list").textContent = describeFiles(input.files);
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      $("file-list").textContent = describeFiles(input.files);
      $("submit").focus(); // parameters can still be changed before uploading
    }
  });
}

function formParameters() {
  const data = {};
  for (const name of ["model", "scale", "steps", "guidance_scale", "seed", "color_fix",
                      "scheduler", "tile_size", "output_format", "priority", "tags", "caption"]) {
    const value = $(name).value.trim();
    if (value !== "") {
      data[name] = value;
    }
  }
  return data;
}

// --- jobs -----------------------------------------------------------------------------------

function describeJob(job) {
  if (job.status === "queued") {
    if (job.queue_position === null || job.queue_position === undefined) return "queued";
    return job.queue_position === 0 ? "queued (next)" : `queued (${job.queue_position} ahead)`;
  }
  if (job.status === "processing") {
    const p = job.progress || {};
    return p.total > 0 ? `processing: ${p.stage} ${p.step}/${p.total}` : `processing: ${p.stage}`;
  }
  return job.status;
}

function newJobItem(name, where = "append") {
  const item = $("job-template").content.firstElementChild.cloneNode(true);
  item.querySelector(".job-name").textContent = name;
  item.querySelector(".job-status").textContent = "uploading";
  item.querySelector(".job-progress").setAttribute("aria-label", `Progress of ${name}`);
  $("jobs")[where](item);
  $("no-jobs").hidden = true;
  return item;
}

// The file names of the jobs, kept in this browser: the service does not store them, and a
// job listed again after a reload should still say which file it was.
function storedNames() {
  try {
    const names = JSON.parse(localStorage.getItem(NAMES_KEY) || "{}");
    return names && typeof names === "object" ? names : {};
  } catch (_) {
    return {};
  }
}

function rememberName(jobId, name) {
  try {
    localStorage.setItem(NAMES_KEY, JSON.stringify({ ...storedNames(), [jobId]: name }));
  } catch (_) {
    // storage full or refused: the job is listed by its id after a reload
  }
}

function describeModel(job) {
  return job.model ? `Model: ${job.model} (${trainedLabel(job.model_trained)})` : "";
}

// Warnings as list items, rewritten only when they change.
function showWarnings(list, warnings) {
  const texts = warnings || [];
  const current = Array.from(list.children, (li) => li.textContent);
  if (current.length === texts.length && current.every((t, i) => t === texts[i])) return;
  list.replaceChildren(...texts.map((text) => {
    const li = document.createElement("li");
    li.textContent = text;
    return li;
  }));
  list.hidden = texts.length === 0;
}

function renderJob(entry) {
  const { item, job } = entry;
  item.dataset.status = job.status;
  item.dataset.jobId = job.id;
  item.dataset.model = job.model || "";
  item.dataset.trained = String(job.model_trained);
  item.querySelector(".job-status").textContent = describeJob(job);
  const model = item.querySelector(".job-model");
  const modelText = describeModel(job);
  if (model.textContent !== modelText) model.textContent = modelText;
  showWarnings(item.querySelector(".job-warnings"), job.warnings);
  const bar = item.querySelector(".job-progress");
  const p = job.progress || {};
  if (job.status === "succeeded") {
    bar.value = 1;
  } else if (job.status === "processing" && p.total > 0) {
    bar.value = p.step / p.total;
  } else if (job.status === "queued") {
    bar.removeAttribute("value"); // indeterminate while waiting
  }
  item.querySelector(".job-cancel").hidden = TERMINAL.has(job.status);
  if (job.error) {
    showProblem(item.querySelector(".job-error"), job.error, [job.status]);
  }
}

function rejectItem(item, problem) {
  item.dataset.status = "rejected";
  item.querySelector(".job-status").textContent = "rejected";
  item.querySelector(".job-progress").hidden = true;
  item.querySelector(".job-cancel").hidden = true;
  showProblem(item.querySelector(".job-error"), problem);
}

async function submitOne(file, parameters) {
  const item = newJobItem(file.name);
  const body = new FormData();
  body.append("image", file, file.name);
  for (const [name, value] of Object.entries(parameters)) {
    body.append(name, value);
  }
  let job;
  try {
    job = await (await api("/v1/jobs", { method: "POST", body })).json();
  } catch (error) {
    rejectItem(item, error.problem || { title: String(error) });
    return;
  }
  rememberName(job.id, file.name);
  const entry = track(item, job, file);
  item.querySelector(".job-view").addEventListener("click", () => showComparison(entry));
  follow(entry);
}

function track(item, job, file) {
  const entry = { item, job, file, resultUrl: null };
  state.entries.set(job.id, entry);
  item.querySelector(".job-cancel").addEventListener("click", () => cancelJob(entry));
  item.querySelector(".job-download").addEventListener("click", (e) => downloadResult(e, entry));
  renderJob(entry);
  return entry;
}

// The caller's jobs as the service lists them (GET /v1/jobs, its first page: the newest 50),
// so that the list survives a reload. Jobs already on the page are left as they are. A job
// listed again has no input file in this page: it can be downloaded, not compared.
async function restoreJobs() {
  let page;
  try {
    page = await (await api("/v1/jobs")).json();
  } catch (_) {
    return; // no list (e.g. a key is needed first): the page works without it
  }
  const names = storedNames();
  for (const job of page.jobs) { // newest first: each goes above the older ones
    if (state.entries.has(job.id)) continue;
    const item = newJobItem(names[job.id] || `job ${job.id.slice(0, 8)}`, "prepend");
    item.dataset.restored = "true";
    const entry = track(item, job, null);
    if (job.status === "succeeded") {
      showResultLinks(entry);
    } else {
      follow(entry);
    }
  }
  const listed = new Set(page.jobs.map((j) => j.id));
  const kept = Object.fromEntries(Object.entries(names).filter(([id]) => listed.has(id) ||
                                                                       state.entries.has(id)));
  try {
    localStorage.setItem(NAMES_KEY, JSON.stringify(kept)); // forget jobs the service forgot
  } catch (_) {
    // as in rememberName
  }
}

async function submitFiles() {
  const form = $("upload-form");
  const files = Array.from($("files").files);
  const formError = $("form-error");
  formError.hidden = true;
  if (!form.reportValidity()) {
    return;
  }
  if (!files.length) {
    showProblem(formError, { title: "No image", detail: "Choose or drop at least one image." });
    return;
  }
  const parameters = formParameters();
  await state.restoring; // the listed jobs first, so that none is listed twice
  // One after another, so that the queue keeps the order the files were chosen in.
  for (const file of files) {
    await submitOne(file, parameters);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const UNSUPPORTED = new Set([404, 405, 406]); // of the events route: poll instead

// Follows a job until it ends through GET /v1/jobs/{id}/events (Server-Sent Events), read
// with fetch() rather than EventSource, which cannot send the X-API-Key header. A stream that
// breaks (network) or ends before the job does is replaced after one GET of the job.
async function follow(entry) {
  while (!TERMINAL.has(entry.job.status)) {
    let outcome;
    try {
      outcome = await streamEvents(entry);
    } catch (error) {
      if (error.problem && error.problem.status >= 400 && error.problem.status < 500) {
        showProblem(entry.item.querySelector(".job-error"), error.problem);
        return; // refused (a key missing or wrong): retrying cannot help
      }
      outcome = "broken";
    }
    if (outcome === "unsupported") {
      await pollUntilEnd(entry);
      break;
    }
    if (TERMINAL.has(entry.job.status)) break;
    await sleep(RECONNECT_MS);
    if (!(await refresh(entry))) await sleep(RECONNECT_MS * 4);
  }
  if (entry.job.status === "succeeded") {
    await fetchResult(entry);
  }
}

// One event stream: each `job` event carries the job as GET /v1/jobs/{id} shows it.
async function streamEvents(entry) {
  let response;
  try {
    response = await fetch(`/v1/jobs/${entry.job.id}/events`, {
      headers: { Accept: "text/event-stream", ...authHeaders() },
      cache: "no-store",
    });
  } catch (_) {
    return "broken";
  }
  if (UNSUPPORTED.has(response.status)) return "unsupported";
  if (!response.ok) throw new ProblemError(await problemOf(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "";
  let data = [];
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (_) {
      return "broken";
    }
    if (chunk.done) return "ended";
    buffer += chunk.value;
    const lines = buffer.split("\n");
    buffer = lines.pop(); // an unfinished line waits for the next chunk
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "") { // the end of an event
        if (event === "job" && data.length) {
          entry.job = JSON.parse(data.join("\n"));
          renderJob(entry);
        }
        event = "";
        data = [];
      } else if (!line.startsWith(":")) { // ":" lines keep a quiet stream open
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
    }
    if (TERMINAL.has(entry.job.status)) {
      reader.cancel().catch(() => {});
      return "ended";
    }
  }
}

// The job as it stands now; false (and the problem shown) when the service did not answer.
async function refresh(entry) {
  try {
    entry.job = await (await api(`/v1/jobs/${entry.job.id}`)).json();
  } catch (error) {
    showProblem(entry.item.querySelector(".job-error"), error.problem || { title: String(error) });
    return false;
  }
  entry.item.querySelector(".job-error").hidden = !entry.job.error;
  renderJob(entry);
  return true;
}

// Only for a service that has no event stream for jobs.
async function pollUntilEnd(entry) {
  while (!TERMINAL.has(entry.job.status)) {
    const answered = await refresh(entry);
    if (!TERMINAL.has(entry.job.status)) await sleep(answered ? POLL_MS : POLL_MS * 5);
  }
}

async function cancelJob(entry) {
  try {
    entry.job = await (await api(`/v1/jobs/${entry.job.id}`, { method: "DELETE" })).json();
    renderJob(entry);
  } catch (error) {
    showProblem(entry.item.querySelector(".job-error"), error.problem || { title: String(error) });
  }
}

function resultName(entry) {
  const name = entry.file ? entry.file.name : entry.item.querySelector(".job-name").textContent;
  const stem = name.replace(/\.[^.]+$/, "").replace(/^job /, "");
  const format = entry.job.parameters.output_format;
  return `${stem}.x${entry.job.parameters.scale}.${format === "jpeg" ? "jpg" : format}`;
}

// The result as a blob URL (fetched with the page's API key); false when it could not be.
async function loadResult(entry) {
  if (entry.resultUrl) return true;
  try {
    const blob = await (await api(`/v1/jobs/${entry.job.id}/result`, {
      headers: { Accept: "image/*" },
    })).blob();
    entry.resultUrl = URL.createObjectURL(blob);
  } catch (error) {
    showProblem(entry.item.querySelector(".job-error"), error.problem || { title: String(error) });
    return false;
  }
  const link = entry.item.querySelector(".job-download");
  link.href = entry.resultUrl;
  return true;
}

function showResultLinks(entry) {
  const link = entry.item.querySelector(".job-download");
  link.href = entry.resultUrl || `/v1/jobs/${entry.job.id}/result`;
  link.download = resultName(entry);
  link.hidden = false;
  // Comparing needs the input file, which only the page that uploaded it has.
  entry.item.querySelector(".job-view").hidden = entry.file === null;
}

async function fetchResult(entry) {
  if (!(await loadResult(entry))) return;
  showResultLinks(entry);
  if (state.viewing === null && entry.file !== null) {
    showComparison(entry);
  }
}

// A job listed after a reload fetches its result only when it is asked for.
async function downloadResult(event, entry) {
  if (entry.resultUrl) return; // the link already points at the fetched image
  event.preventDefault();
  if (await loadResult(entry)) entry.item.querySelector(".job-download").click();
}

// --- the comparison viewer -------------------------------------------------------------------

// The "before" image: the input enlarged to the result's size by a bicubic resampling
// (canvas smoothing at "high" quality), so that the comparison is with a fair classical
// enlargement rather than with blocky nearest-neighbour pixels.
async function bicubicUrl(file, width, height) {
  const bitmap = await createImageBitmap(file);
  try {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    context.imageSmoothingEnabled = true;
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, 0, 0, width, height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    if (!blob) throw new Error("the canvas gave no image");
    return URL.createObjectURL(blob);
  } finally {
    bitmap.close();
  }
}

async function showComparison(entry) {
  state.viewing = entry;
  const before = $("before-image");
  const after = $("after-image");
  const input = entry.job.input;
  const output = entry.job.output;
  if (!entry.beforeUrl) {
    try {
      entry.beforeUrl = await bicubicUrl(entry.file, output.width, output.height);
      entry.beforeMethod = "bicubic";
    } catch (_) {
      // Fallback: the browser's own smooth scaling of the original (never pixelated).
      entry.beforeUrl = URL.createObjectURL(entry.file);
      entry.beforeMethod = "smooth";
    }
  }
  if (state.viewing !== entry) return; // another job was chosen meanwhile
  before.src = entry.beforeUrl;
  before.dataset.method = entry.beforeMethod;
  after.src = entry.resultUrl;
  $("viewer-name").textContent = entry.file.name;
  $("tag-after").textContent = entry.job.model ? `After (${entry.job.model})` : "After";
  $("viewer-caption").textContent =
    `${input.width}×${input.height} → ${output.width}×${output.height} ` +
    `(×${entry.job.parameters.scale}, ${output.format}; ` +
    `${describeModel(entry.job) || "model unknown"}; before: ` +
    `${entry.beforeMethod === "bicubic" ? "bicubic" : "smooth browser"} upscale of the input)`;
  showWarnings($("viewer-warnings"), entry.job.warnings);
  const download = $("viewer-download");
  download.href = entry.resultUrl;
  download.download = resultName(entry);
  $("viewer").hidden = false;
  setZoom(1);
  setDivider(Number($("compare-position").value));
}

function setDivider(percent) {
  const value = Math.max(0, Math.min(100, percent));
  $("compare-position").value = String(value);
  $("compare-position").setAttribute(
    "aria-valuetext", `${value}% before, ${100 - value}% after`);
  $("before-image").style.clipPath = `inset(0 ${100 - value}% 0 0)`;
  $("divider").style.left = `${value}%`;
}

function setZoom(zoom) {
  const entry = state.viewing;
  if (!entry) return;
  state.zoom = zoom;
  const { width, height } = entry.job.output;
  const compare = $("compare");
  compare.style.width = `${Math.round(width * zoom)}px`;
  compare.style.height = `${Math.round(height * zoom)}px`;
  // Past 100% show real pixels rather than a smoothed guess.
  compare.classList.toggle("pixelated", zoom > 1);
  compare.classList.toggle("compact", width * zoom < 160); // no room for the labels
  const label = `${Math.round(zoom * 100)}%`;
  $("zoom-value").textContent = label;
  const slider = $("zoom");
  const nearest = ZOOMS.reduce((best, z, i) =>
    Math.abs(Math.log(z / zoom)) < Math.abs(Math.log(ZOOMS[best] / zoom)) ? i : best, 0);
  slider.value = String(nearest);
  slider.setAttribute("aria-valuetext", label);
}

function fitZoom() {
  const entry = state.viewing;
  if (!entry) return;
  const viewport = $("viewport");
  const { width, height } = entry.job.output;
  const fit = Math.min(viewport.clientWidth / width, (viewport.clientHeight || height) / height);
  setZoom(Math.max(0.05, Math.min(16, fit)));
}

function setupViewer() {
  $("compare-position").addEventListener("input", (e) => setDivider(Number(e.target.value)));
  $("zoom").addEventListener("input", (e) => setZoom(ZOOMS[Number(e.target.value)]));
  $("zoom-fit").addEventListener("click", fitZoom);
  $("zoom-actual").addEventListener("click", () => setZoom(1));
  const compare = $("compare");
  const follow = (event) => {
    const box = compare.getBoundingClientRect();
    setDivider(Math.round(((event.clientX - box.left) / box.width) * 100));
  };
  compare.addEventListener("pointerdown", (event) => {
    compare.setPointerCapture(event.pointerId);
    follow(event);
  });
  compare.addEventListener("pointermove", (event) => {
    if (compare.hasPointerCapture(event.pointerId)) follow(event);
  });
  $("viewport").addEventListener("keydown", (event) => {
    const index = Number($("zoom").value);
    if (event.key === "+" || event.key === "=") {
      setZoom(ZOOMS[Math.min(ZOOMS.length - 1, index + 1)]);
    } else if (event.key === "-") {
      setZoom(ZOOMS[Math.max(0, index - 1)]);
    } else if (event.key === "ArrowLeft" && event.shiftKey) {
      setDivider(Number($("compare-position").value) - 5);
    } else if (event.key === "ArrowRight" && event.shiftKey) {
      setDivider(Number($("compare-position").value) + 5);
    } else {
      return;
    }
    event.preventDefault();
  });
}

// --- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setupDropzone();
  setupViewer();
  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitFiles();
  });
  $("model").addEventListener("change", showSelectedModel);
  $("api-key").addEventListener("change", restoreJobs); // another key: its jobs too
  loadModels();
  state.restoring = restoreJobs();
});
