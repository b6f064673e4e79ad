// mmrag playground: a client of the server's public API (/v1/*), same origin, nothing else.
//
// Every string that comes from the model, a document or the server goes into the page as text
// (textContent, createTextNode), never as markup; the page's Content-Security-Policy allows no inline
// script either. The API key lives in the input field only: it is sent as a bearer header and never stored.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);

// ---------------------------------------------------------------------------------------------------
// DOM helpers: elements built from text, never from HTML strings.

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// ---------------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, error) {
    const param = error && error.param ? ` (${error.param})` : "";
    super(`${status}: ${(error && error.message) || "request failed"}${param}`);
    this.status = status;
  }
}

function authHeaders(extra = {}) {
  const key = $("#api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON: the status says enough
  }
  return new ApiError(response.status, error);
}

// Relative paths: the page is /playground, so "v1/..." is the server's /v1/... (also under a path prefix).
async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Server-sent events of a streamed chat completion: the `data:` payload of each event.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Model and vector stores

const state = {
  model: null,
  stores: [], // [{id, name}]
  filenames: new Map(), // file id -> name
  attachments: [], // [{name, url}] data URLs of the images to send with the next question
  history: { A: [], B: [] }, // each lane's conversation so far
  busy: false,
};

async function loadModel() {
  try {
    const models = await api("GET", "v1/models");
    state.model = models.data[0].id;
    $("#model").textContent = `model: ${state.model}`;
    setStatus("ready");
    await loadStores();
  } catch (error) {
    state.model = null;
    $("#model").textContent = "model: ?";
    setStatus(error.status === 401 ? "enter the server's API key" : String(error.message), true);
  }
}

async function loadStores(select) {
  let stores = [];
  try {
    stores = (await api("GET", "v1/vector_stores?limit=100")).data;
  } catch (error) {
    // Vector stores off, or no retriever: the page still chats over the server's collection.
    $("#documents").classList.add("unavailable");
    $("#store-files").replaceChildren(el("li", { className: "muted" }, `vector stores: ${error.message}`));
    return;
  }
  state.stores = stores.map((s) => ({ id: s.id, name: s.name || s.id }));
  const current = select || $("#store").value;
  const options = state.stores.map((s) => el("option", { value: s.id }, `${s.name} (${s.id})`));
  $("#store").replaceChildren(...(options.length ? options : [el("option", { value: "" }, "(none yet)")]));
  if (current && state.stores.some((s) => s.id === current)) $("#store").value = current;
  for (const lane of lanes()) {
    const picker = $("[name=store]", lane);
    const chosen = picker.value;
    picker.replaceChildren(
      el("option", { value: "" }, "collection"),
      ...state.stores.map((s) => el("option", { value: s.id }, `store ${s.name}`)),
    );
    if (state.stores.some((s) => s.id === chosen)) picker.value = chosen;
  }
  await loadStoreFiles();
}

async function fileName(fileId) {
  if (!state.filenames.has(fileId)) {
    try {
      state.filenames.set(fileId, (await api("GET", `v1/files/${encodeURIComponent(fileId)}`)).filename);
    } catch {
      return fileId;
    }
  }
  return state.filenames.get(fileId);
}

async function loadStoreFiles() {
  const storeId = $("#store").value;
  const list = $("#store-files");
  if (!storeId) {
    list.replaceChildren(el("li", { className: "muted" }, "no vector store: create one, then add files"));
    return;
  }
  const files = (await api("GET", `v1/vector_stores/${encodeURIComponent(storeId)}/files?limit=100`)).data;
  const rows = [];
  for (const file of files) {
    const name = await fileName(file.id);
    const error = file.last_error ? `: ${file.last_error.message}` : "";
    const body = el("div", { className: "file-body" });
    const details = el(
      "details",
      { "data-file": file.id },
      el("summary", {}, el("span", { className: `badge ${file.status}` }, file.status), ` ${name}${error}`),
      body,
    );
    details.addEventListener("toggle", () => details.open && showFileContent(storeId, file.id, name, body));
    rows.push(el("li", {}, details));
  }
  list.replaceChildren(...(rows.length ? rows : [el("li", { className: "muted" }, "this store has no files yet")]));
}

const IMAGE_NAME = /\.(png|jpe?g|webp)$/i;

async function showFileContent(storeId, fileId, name, body) {
  if (body.childElementCount) return;
  try {
    if (IMAGE_NAME.test(name)) {
      body.append(await thumbnail(fileId, name));
      return;
    }
    const path = `v1/vector_stores/${encodeURIComponent(storeId)}/files/${encodeURIComponent(fileId)}/content`;
    const page = await api("GET", path);
    const text = page.data.map((part) => part.text).join("\n\n");
    body.append(el("pre", { className: "chunk" }, text || "(no text)"));
  } catch (error) {
    body.append(el("span", { className: "error" }, error.message));
  }
}

// An uploaded image file, fetched with the key and shown through a blob: URL.
async function thumbnail(fileId, name) {
  const response = await fetch(`v1/files/${encodeURIComponent(fileId)}/content`, { headers: authHeaders() });
  if (!response.ok) throw await failure(response);
  const url = URL.createObjectURL(await response.blob());
  return el("img", { className: "thumb", src: url, alt: name });
}

async function createStore() {
  const name = $("#store-name").value.trim();
  if (!name) return setStatus("give the new store a name", true);
  try {
    const store = await api("POST", "v1/vector_stores", { name });
    $("#store-name").value = "";
    await loadStores(store.id);
    setStatus(`created ${store.name}`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function uploadFiles() {
  const input = $("#upload");
  const storeId = $("#store").value;
  if (!storeId) return setStatus("create or pick a vector store first", true);
  const files = [...input.files];
  input.value = "";
  try {
    for (const file of files) {
      setStatus(`uploading ${file.name}`);
      const form = new FormData();
      form.append("purpose", "assistants");
      form.append("file", file, file.name);
      const uploaded = await api("POST", "v1/files", form);
      state.filenames.set(uploaded.id, uploaded.filename);
      const path = `v1/vector_stores/${encodeURIComponent(storeId)}/files`;
      let attached = await api("POST", path, { file_id: uploaded.id });
      await loadStoreFiles();
      setStatus(`indexing ${file.name}`);
      while (attached.status === "in_progress") {
        await new Promise((resolve) => setTimeout(resolve, 500));
        attached = await api("GET", `${path}/${encodeURIComponent(uploaded.id)}`);
      }
      setStatus(`${file.name}: ${attached.status}`, attached.status !== "completed");
    }
  } catch (error) {
    setStatus(error.message, true);
  }
  await loadStoreFiles();
}

// ---------------------------------------------------------------------------------------------------
// Settings: lane A, and lane B for side by side (a copy of A's fields)

function lanes() {
  return [...document.querySelectorAll(".lane")];
}

function makeLaneB() {
  const a = $(".lane[data-lane=A]");
  const b = a.cloneNode(true);
  b.dataset.lane = "B";
  $("legend", b).textContent = "B";
  $("[name=aim]", b).value = "0.25"; // the comparison people ask for first: full images vs AIM 1/4
  b.hidden = true;
  a.after(b);
}

function settingsOf(lane) {
  const field = (name) => $(`[name=${name}]`, lane);
  return {
    lane: lane.dataset.lane,
    mode: field("mode").value,
    store: field("store").value,
    topK: Number(field("top_k").value),
    hybrid: field("hybrid").checked,
    aim: Number(field("aim").value),
    lookm: field("lookm").checked,
    budget: Number(field("budget").value),
    maxTokens: Number(field("max_tokens").value),
    temperature: Number(field("temperature").value),
  };
}

function describe(settings) {
  const retrieval =
    settings.mode === "none"
      ? "no retrieval"
      : `${settings.mode} RAG, top ${settings.topK}${settings.hybrid ? ", hybrid" : ""}` +
        (settings.store ? `, ${storeName(settings.store)}` : ", collection");
  const lookm = settings.lookm ? `LOOK-M ${settings.budget}` : "LOOK-M off";
  return `${settings.lane}: ${retrieval} · AIM ${settings.aim} · ${lookm}`;
}

function storeName(id) {
  const store = state.stores.find((s) => s.id === id);
  return store ? store.name : id;
}

function requestBody(settings, messages) {
  const retrieval = { mode: settings.mode };
  if (settings.mode !== "none") {
    retrieval.top_k = settings.topK;
    retrieval.hybrid = settings.hybrid;
    if (settings.store) retrieval.vector_store_ids = [settings.store];
  }
  const compression = { aim_keep_ratio: settings.aim };
  if (settings.lookm) compression.kv = { method: "lookm", image_budget: settings.budget };
  else compression.lookm = false;
  return {
    model: state.model,
    messages,
    max_tokens: settings.maxTokens,
    temperature: settings.temperature,
    stream: true,
    stream_options: { include_usage: true },
    retrieval,
    compression,
  };
}

// ---------------------------------------------------------------------------------------------------
// Asking

function userMessage(text, images) {
  if (!images.length) return { role: "user", content: text };
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  return { role: "user", content: [...parts, { type: "text", text }] };
}

async function ask(event) {
  event.preventDefault();
  if (state.busy) return;
  const text = $("#question").value.trim();
  if (!text) return setStatus("type a question", true);
  if (!state.model) await loadModel();
  if (!state.model) return;
  const images = state.attachments;
  const chosen = lanes().filter((lane) => !lane.hidden);
  const answers = el("div", { className: `answers n${chosen.length}` });
  const turn = el(
    "article",
    { className: "turn" },
    el("div", { className: "question" }, images.map((i) => el("img", { className: "thumb", src: i.url, alt: i.name })), text),
    answers,
  );
  $("#turns").append(turn);
  $("#question").value = "";
  state.attachments = [];
  renderAttachments();
  state.busy = true;
  $("#send").disabled = true;
  try {
    const panels = chosen.map((lane) => {
      const panel = answerPanel(settingsOf(lane));
      answers.append(panel.root);
      return panel;
    });
    // One after the other: on a CPU server two at once would slow both and blur what each costs.
    for (const panel of panels) await run(panel, text, images);
  } finally {
    state.busy = false;
    $("#send").disabled = false;
  }
}

function answerPanel(settings) {
  const text = el("div", { className: "text" });
  const figures = el("dl", { className: "figures" });
  const sources = el("ol", { className: "sources" });
  const root = el(
    "section",
    { className: "answer", "data-lane": settings.lane, "data-state": "waiting" },
    el("h3", {}, describe(settings)),
    text,
    figures,
    el("h4", {}, "Sources"),
    sources,
  );
  return { root, text, figures, sources, settings };
}

async function run(panel, question, images) {
  const { settings } = panel;
  const history = state.history[settings.lane];
  const message = userMessage(question, images);
  const body = requestBody(settings, [...history, message]);
  panel.root.dataset.state = "streaming";
  const started = performance.now();
  let firstAt = null;
  let chunks = 0;
  let usage = null;
  let retrieval = null;
  let answer = "";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
    });
    if (!response.ok) throw await failure(response);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const payload = JSON.parse(data);
      if (payload.error) throw new ApiError("error in stream", payload.error);
      if (payload.retrieval) {
        retrieval = payload.retrieval;
        showSources(panel, retrieval, question);
      }
      if (payload.usage) usage = payload.usage;
      const delta = payload.choices && payload.choices[0] && payload.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        chunks += 1;
        answer += delta.content;
        panel.text.textContent = answer;
      }
    }
    const ended = performance.now();
    panel.root.dataset.chunks = String(chunks);
    if (!retrieval) panel.sources.replaceChildren(el("li", { className: "muted" }, "no retrieval for this answer"));
    showFigures(panel, { usage, retrieval, started, firstAt, ended });
    history.push(message, { role: "assistant", content: answer });
    panel.root.dataset.state = "done";
  } catch (error) {
    panel.root.dataset.state = "failed";
    panel.text.append(el("p", { className: "error" }, error.message));
  }
}

function figure(name, label, value) {
  return el("div", { "data-figure": name }, el("dt", {}, label), el("dd", {}, value));
}

function showFigures(panel, { usage, retrieval, started, firstAt, ended }) {
  const rows = [];
  const ttft = firstAt === null ? null : firstAt - started;
  if (usage) {
    rows.push(figure("prompt_tokens", "prompt tokens", usage.prompt_tokens));
    rows.push(figure("completion_tokens", "completion tokens", usage.completion_tokens));
    const counts = usage.mmrag;
    if (counts) {
      const kept = counts.kv_tokens_prompt ? Math.round((100 * counts.kv_tokens_kept) / counts.kv_tokens_prompt) : 100;
      rows.push(
        figure("visual_tokens", "visual tokens (AIM)", `${counts.visual_tokens_before} → ${counts.visual_tokens_after}`),
      );
      rows.push(figure("kv_kept", "KV entries kept", `${counts.kv_tokens_kept} of ${counts.kv_tokens_prompt} (${kept}%)`));
    } else {
      rows.push(figure("visual_tokens", "visual tokens (AIM)", "no image"));
    }
  }
  rows.push(figure("ttft", "time to first token", ttft === null ? "–" : `${Math.round(ttft)} ms`));
  const decodeSeconds = firstAt === null ? 0 : (ended - firstAt) / 1000;
  const generated = usage ? usage.completion_tokens : 0;
  // Tokens after the first over the time they took: the decode rate, not counting the prefill. Under four
  // tokens the last ones arrive together (the end of the stream), too few to say anything.
  const rate = generated >= 4 && decodeSeconds > 0 ? ((generated - 1) / decodeSeconds).toFixed(1) : "–";
  rows.push(figure("tokens_per_s", "tokens/s", rate));
  if (retrieval) {
    const used = `${retrieval.context_documents} of ${retrieval.documents.length} in the prompt`;
    const notes = [retrieval.mode_fallback, retrieval.degraded ? `degraded: ${retrieval.degraded_reason}` : null];
    rows.push(figure("retrieval", `retrieval (${retrieval.mode})`, [used, ...notes.filter(Boolean)].join("; ")));
  }
  panel.figures.replaceChildren(...rows);
}

// The response names each retrieved document (id, score, source, file); the chunk's text is not in it.
// For vector-store hits the page finds it with the store's own search (same query, same encoder: the same
// chunks and scores); image files are fetched and shown; a collection's chunks have no API to read them.
function showSources(panel, retrieval, question) {
  let textRank = 0; // text documents enter the prompt by rank: the first context_documents of them
  const items = retrieval.documents.map((doc) => {
    const body = el("div", { className: "source-body" });
    const name = doc.filename || doc.source;
    const used = doc.kind === "image" ? !doc.image_dropped : textRank++ < (retrieval.context_documents || 0);
    const item = el(
      "li",
      { "data-kind": doc.kind || "text", className: used ? null : "unused", title: used ? null : "not in the prompt" },
      el("span", { className: "score" }, doc.score.toFixed(3)),
      " ",
      el("span", { className: "source" }, name),
      doc.kind === "image" ? el("span", { className: "badge" }, "image") : null,
      doc.image_dropped ? el("span", { className: "muted" }, ` (not shown: ${doc.image_dropped})`) : null,
      body,
    );
    return { doc, item, body, used };
  });
  panel.sources.replaceChildren(...items.map((i) => i.item));
  if (!items.length) panel.sources.append(el("li", { className: "muted" }, "nothing retrieved"));
  fillSourceTexts(panel, items, question).catch((error) =>
    panel.sources.append(el("li", { className: "error" }, error.message)),
  );
}

async function fillSourceTexts(panel, items, question) {
  const images = items.filter((i) => i.doc.kind === "image" && i.doc.file_id);
  for (const image of images) image.body.append(await thumbnail(image.doc.file_id, image.doc.filename || ""));
  const texts = items.filter((i) => i.doc.kind !== "image");
  const store = panel.settings.store;
  if (!texts.length) return;
  if (!store || !texts.some((i) => i.doc.file_id)) {
    for (const i of texts) i.body.append(el("span", { className: "muted" }, "text: not readable through the API"));
    return;
  }
  const path = `v1/vector_stores/${encodeURIComponent(store)}/search`;
  const hits = (await api("POST", path, { query: question, max_num_results: Math.min(50, texts.length + 4) })).data;
  for (const i of texts) {
    // The same file's hit with the closest score (hybrid ranks by RRF, so scores differ there).
    let best = null;
    for (const hit of hits) {
      if (hit.file_id !== i.doc.file_id) continue;
      if (best === null || Math.abs(hit.score - i.doc.score) < Math.abs(best.score - i.doc.score)) best = hit;
    }
    if (best === null) continue;
    hits.splice(hits.indexOf(best), 1);
    const text = best.content.map((part) => part.text).join("\n");
    i.body.append(el("pre", { className: "chunk" }, text));
  }
}

// ---------------------------------------------------------------------------------------------------
// Attachments: images read as data: URLs, sent in the request itself

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attachImages() {
  const input = $("#images");
  for (const file of input.files) state.attachments.push({ name: file.name, url: await readAsDataURL(file) });
  input.value = "";
  renderAttachments();
}

function renderAttachments() {
  const chips = state.attachments.map((image, index) => {
    const remove = el("button", { type: "button", title: `remove ${image.name}` }, "×");
    remove.addEventListener("click", () => {
      state.attachments.splice(index, 1);
      renderAttachments();
    });
    return el("span", { className: "chip" }, el("img", { className: "thumb", src: image.url, alt: image.name }), remove);
  });
  $("#attachments").replaceChildren(...chips);
}

// ---------------------------------------------------------------------------------------------------

function start() {
  makeLaneB();
  $("#compare").addEventListener("change", (event) => {
    $(".lane[data-lane=B]").hidden = !event.target.checked;
    document.body.classList.toggle("comparing", event.target.checked);
  });
  $("#api-key").addEventListener("change", loadModel);
  $("#store").addEventListener("change", () => loadStoreFiles().catch((e) => setStatus(e.message, true)));
  $("#create-store").addEventListener("click", createStore);
  $("#upload").addEventListener("change", uploadFiles);
  $("#images").addEventListener("change", attachImages);
  $("#ask").addEventListener("submit", ask);
  $("#question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#ask").requestSubmit();
  });
  $("#new-chat").addEventListener("click", () => {
    state.history = { A: [], B: [] };
    $("#turns").replaceChildren();
  });
  loadModel();
}

start();
