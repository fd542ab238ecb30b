// The chat page: wires the DOM to the server (api.js), the conversation store (store.js), the Markdown
// renderer (markdown.js), the memory inspector (inspector.js) and the documents panel (documents.js). All model and user text reaches the
// DOM through textContent or the sanitizing renderer, never as raw HTML.

import { ApiError, countTokens, fetchStatus, streamChat } from "./api.js";
import { buildChatRequest, deriveTitle } from "./compose.js";
import { initDocuments, openDocuments } from "./documents.js";
import { hydrateIcons, icon } from "./icons.js";
import { formatScore, inspect, renderHighlighted } from "./inspector.js";
import { setMarkdown } from "./markdown.js";
import { ConversationStore, makeExport, newConversation, newId } from "./store.js";
import { $, confirmDialog, el, fmtInt, fmtWhen, iconButton, readTextFile, showToast } from "./ui.js";

// Poll /status every second while the model loads, slower once it is up (only to notice it going away).
const POLL_LOADING_MS = 1000;
const POLL_READY_MS = 15000;
const POLL_UNREACHABLE_MS = 2000;
// Pasted text longer than this becomes an attachment chip instead of filling the input box.
const LONG_PASTE_CHARS = 2000;
// Stick to the bottom while streaming if the user is within this many pixels of it.
const STICKY_SCROLL_PX = 120;
// A max_len this large means "no limit" (the served config uses 2**31 - 1): the memory holds any length.
const UNLIMITED_LEN = 2 ** 30;

const LS_SETTINGS = "inf_llm.settings";
const LS_API_KEY = "inf_llm.api_key";
const LS_CURRENT = "inf_llm.current";

const state = {
  store: null,
  convs: new Map(), // id -> conversation (the live objects; the store holds copies)
  currentId: null,
  status: null, // last /status body
  reachable: null, // null until the first answer
  everReady: false,
  generating: null, // {convId, msgId, controller}
  pending: [], // attachments for the next message: {id, name, text, tokens, counting, error}
  editingId: null,
  libraryIds: null, // ids of the server's documents at the last listing (null: not listed yet)
  settings: loadJson(LS_SETTINGS, {}),
  apiKey: localStorage.getItem(LS_API_KEY) || "",
};

const views = new Map(); // message id -> {root, md, prefill, note, stats, actions}
let pollTimer = null;
let renderQueued = false;

// ---------------------------------------------------------------------------------------------- utils

function loadJson(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key) || "null");
    return v && typeof v === "object" ? v : fallback;
  } catch {
    return fallback;
  }
}

function fmtK(n) {
  if (!Number.isFinite(n)) return "–";
  if (n >= 1024 * 1024 && n % (1024 * 1024) === 0) return `${n / (1024 * 1024)}M`;
  if (n >= 1024 && n % 1024 === 0) return `${n / 1024}K`;
  if (n >= 10000) return `${(n / 1000).toFixed(n >= 100000 ? 0 : 1)}K`;
  return fmtInt(n);
}
function fmtRate(n) {
  if (!Number.isFinite(n)) return "–";
  return n >= 100 ? fmtInt(n) : n.toFixed(1);
}
function fmtMs(ms) {
  if (!Number.isFinite(ms)) return "–";
  return ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}
function modelShortName(model) {
  if (!model) return "";
  const parts = String(model).split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : String(model);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // The clipboard API needs a secure context; a server on a LAN address over http is not one.
    const ta = el("textarea", { class: "offscreen", "aria-hidden": "true" });
    ta.value = text;
    document.body.append(ta);
    ta.select();
    document.execCommand("copy");
    ta.remove();
  }
}

function flashCopied(button) {
  if (!button) return;
  const before = button.innerHTML;
  button.classList.add("copied");
  if (button.classList.contains("code-copy")) button.textContent = "Copied";
  else button.innerHTML = icon("check");
  setTimeout(() => {
    button.classList.remove("copied");
    button.innerHTML = before;
  }, 1400);
}

function download(filename, data) {
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const a = el("a", { href: URL.createObjectURL(blob), download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function slug(text) {
  return (
    String(text)
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, "-")
      .replace(/^-|-$/g, "")
      .slice(0, 40) || "chat"
  );
}

// ------------------------------------------------------------------------------------------- settings

function defaults() {
  return (state.status && state.status.generation_defaults) || {};
}

/** The sampling fields the settings form shows: /status's generation_fields that have a `page` entry. */
function pageFields() {
  const fields = (state.status && state.status.generation_fields) || [];
  return fields.filter((f) => f.page).sort((a, b) => a.page.order - b.page.order);
}

function settingKeys() {
  return pageFields().map((f) => f.name);
}

let builtFields = null; // what the form's sampling inputs were built from

/** Builds the form's sampling inputs from /status: the server's bounds (narrowed where a slider needs a scale),
 * which the browser's constraint validation then checks. Returns whether the inputs changed. */
function buildSettingsFields() {
  const fields = pageFields();
  const built = JSON.stringify(fields.map((f) => [f.name, f.type, f.page, f.minimum, f.exclusive_minimum, f.maximum]));
  if (built === builtFields) return false;
  builtFields = built;
  $("sampling-fields").replaceChildren(...fields.map(settingField));
  return true;
}

function settingField(f) {
  const p = f.page;
  const range = p.widget === "range";
  const input = el("input", {
    type: range ? "range" : "number",
    id: `set-${f.name}`,
    min: p.min ?? f.minimum ?? f.exclusive_minimum,
    max: p.max ?? f.maximum,
    step: p.step,
    inputmode: range ? null : f.type === "integer" ? "numeric" : "decimal",
    placeholder: p.placeholder,
    "aria-label": p.label,
  });
  input.addEventListener("input", (e) => onSettingInput(f.name, e.target.value));
  const label = el("span", { class: "field-label" }, range ? [`${p.label} `, el("output", { id: `out-${f.name}` })] : [p.label]);
  return el("label", { class: "field" }, [label, input]);
}

function saveSettings() {
  localStorage.setItem(LS_SETTINGS, JSON.stringify(state.settings));
}

/** The overrides actually sent: `system` falls back to the server default on the server side. */
function requestSettings() {
  return { ...state.settings };
}

function effective(key) {
  if (key in state.settings) return state.settings[key];
  const d = defaults();
  return key === "system" ? d.system_prompt ?? "" : d[key];
}

function fillSettingsForm() {
  const d = defaults();
  $("set-api-key").value = state.apiKey;
  $("auth-notice").hidden = !(state.status && state.status.auth_required);
  $("set-system").value = effective("system") || "";
  $("set-system").placeholder = d.system_prompt ? "" : "None";
  fillSamplingFields();
  const stop = effective("stop");
  $("set-stop").value = Array.isArray(stop) ? stop.join("\n") : "";
}

function fillSamplingFields() {
  buildSettingsFields();
  const d = defaults();
  for (const key of settingKeys()) {
    const input = $(`set-${key}`);
    const v = effective(key);
    input.value = v === undefined || v === null ? "" : String(v);
    if (input.type === "number" && d[key] !== undefined && d[key] !== null) input.placeholder = String(d[key]);
    const out = $(`out-${key}`);
    if (out) out.textContent = input.value;
    showFieldError(input, "");
  }
}

/** The message under a settings field (empty: none), tied to it for screen readers. */
function showFieldError(input, message) {
  let box = input.parentElement.querySelector(".field-error");
  if (!box && message) {
    box = el("span", { class: "field-error", id: `${input.id}-error`, role: "alert" });
    input.after(box);
    input.setAttribute("aria-describedby", box.id);
  }
  if (box) {
    box.textContent = message;
    box.hidden = !message;
  }
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

function onSettingInput(key, raw) {
  const d = defaults();
  if (key === "system") {
    if (raw === (d.system_prompt ?? "")) delete state.settings.system;
    else state.settings.system = raw;
  } else if (key === "stop") {
    const list = raw.split("\n").filter((s) => s.length > 0);
    const def = Array.isArray(d.stop) ? d.stop : [];
    if (list.join("\n") === def.join("\n")) delete state.settings.stop;
    else state.settings.stop = list;
  } else {
    // The browser checks the field against its min/max/step (from /status, with the limits this server enforces):
    // an invalid value is shown as such and never stored, so the next message cannot carry it.
    const input = $(`set-${key}`);
    if (!input.checkValidity()) {
      showFieldError(input, input.validationMessage);
      return;
    }
    showFieldError(input, "");
    const v = raw.trim() === "" ? null : Number(raw);
    if (v === null || v === d[key]) delete state.settings[key];
    else state.settings[key] = v;
    const out = $(`out-${key}`);
    if (out) out.textContent = raw;
  }
  saveSettings();
}

/** Closing the dialog (Done, the close button, Esc) shows what is stored: an invalid entry is dropped, said. */
function onSettingsClosed() {
  const invalid = settingKeys().map((key) => $(`set-${key}`)).filter((input) => !input.checkValidity());
  fillSettingsForm();
  if (invalid.length) {
    const names = invalid.map((input) => input.getAttribute("aria-label")).join(", ");
    showToast(`Not saved (invalid): ${names}. The previous value is kept.`, "error");
  }
}

function bindSettings() {
  $("settings-btn").addEventListener("click", () => {
    fillSettingsForm();
    $("settings-dialog").showModal();
    if (state.status && state.status.auth_required && !state.apiKey) $("set-api-key").focus();
  });
  $("settings-dialog").addEventListener("close", onSettingsClosed);
  let keyTimer = null;
  $("set-api-key").addEventListener("input", (e) => {
    state.apiKey = e.target.value.trim();
    if (state.apiKey) localStorage.setItem(LS_API_KEY, state.apiKey);
    else localStorage.removeItem(LS_API_KEY);
    updateBanner();
    clearTimeout(keyTimer);
    keyTimer = setTimeout(pollStatus, 400); // with the key, /status tells the model, limits and defaults
  });
  $("toggle-key").addEventListener("click", (e) => {
    const input = $("set-api-key");
    const show = input.type === "password";
    input.type = show ? "text" : "password";
    e.currentTarget.textContent = show ? "Hide" : "Show";
    e.currentTarget.setAttribute("aria-label", show ? "Hide API key" : "Show API key");
  });
  $("set-system").addEventListener("input", (e) => onSettingInput("system", e.target.value));
  $("set-stop").addEventListener("input", (e) => onSettingInput("stop", e.target.value));
  $("reset-settings").addEventListener("click", () => {
    state.settings = {};
    saveSettings();
    fillSettingsForm();
    showToast("Settings reset to the server's defaults");
  });
}

// --------------------------------------------------------------------------------------------- status

function memorySummary(st) {
  const m = st && st.memory;
  if (!m) return st && st.type ? st.type : "";
  if (st.type === "inf-llm" || m.type === "inf-llm") {
    return `InfLLM · ${fmtK(m.n_local)} window · top-${m.topk} of ${m.block_size}-token blocks`;
  }
  return m.type || st.type || "";
}

function memoryChip(st) {
  const m = st && st.memory;
  if (!m) return st && st.type ? st.type : "";
  if (st.type === "inf-llm" || m.type === "inf-llm") return `InfLLM ${fmtK(m.n_local)} + ${m.topk}×${m.block_size}`;
  return m.type || st.type || "";
}

async function pollStatus() {
  clearTimeout(pollTimer);
  if (state.generating && isReady()) {
    // A live stream already proves the server is up, and a slow /status answer during a long CPU prefill
    // must not flash an "unreachable" banner.
    pollTimer = setTimeout(pollStatus, POLL_READY_MS);
    return;
  }
  const r = await fetchStatus({ apiKey: state.apiKey });
  applyStatus(r);
  let delay = POLL_READY_MS;
  if (!r.reachable) delay = POLL_UNREACHABLE_MS;
  else if (!r.body || r.body.state !== "ready") delay = r.body && r.body.state === "error" ? POLL_READY_MS : POLL_LOADING_MS;
  pollTimer = setTimeout(pollStatus, delay);
}

function applyStatus(r) {
  const wasReady = isReady();
  state.reachable = r.reachable;
  state.unreachableReason = r.reachable ? null : r.error;
  if (r.reachable) state.status = r.body;
  const st = state.status;
  const ready = isReady();
  if (ready) state.everReady = true;

  const dot = $("status-dot");
  dot.dataset.state = !r.reachable ? "offline" : st.state || "unknown";
  $("model-name").textContent = st && st.model ? modelShortName(st.model) : r.reachable ? "Model" : "Offline";
  $("model-memory").textContent = st ? memoryChip(st) : "";
  $("model-chip").title = st ? `${st.model || ""} — ${memorySummary(st)}` : "";

  // The loading screen covers the page only while a reachable server is loading (or before its
  // first answer); an unreachable or failed server gets a banner so old chats stay readable.
  const loading = r.reachable && st && st.state === "loading";
  const screen = $("loading-screen");
  if (loading) {
    screen.hidden = false;
    screen.dataset.state = "loading";
    $("loading-title").textContent = "Loading the model…";
    $("loading-model").textContent = [st.model, st.device].filter(Boolean).join(" · ");
    const p = st.progress || {};
    const f = typeof p.fraction === "number" && Number.isFinite(p.fraction) ? Math.min(1, Math.max(0, p.fraction)) : null;
    const fill = $("loading-fill");
    const bar = $("loading-progress");
    if (f === null) {
      bar.classList.add("indeterminate");
      bar.removeAttribute("aria-valuenow");
    } else {
      bar.classList.remove("indeterminate");
      fill.style.width = `${(f * 100).toFixed(1)}%`;
      bar.setAttribute("aria-valuenow", String(Math.round(f * 100)));
    }
    $("loading-phase").textContent = [p.phase, f === null ? null : `${Math.round(f * 100)}%`].filter(Boolean).join(" · ") || "\u00a0";
  } else if (r.reachable || state.reachable === false) {
    screen.hidden = true;
  }

  renderEmptyFacts();
  updateBanner();
  updateComposer();
  updateContextMeter();
  if (ready && !wasReady && $("settings-dialog").open === false) fillSettingsForm();
  else if (buildSettingsFields()) fillSamplingFields(); // e.g. the API key typed in the open dialog
}

function isReady() {
  return !!(state.reachable && state.status && state.status.state === "ready");
}

function updateBanner() {
  const banner = $("banner");
  const text = $("banner-text");
  const action = $("banner-retry");
  let msg = null;
  let act = null;
  banner.dataset.kind = "error";
  if (state.reachable === false) {
    msg = `Can't reach the server (${state.unreachableReason || "no answer"}). Retrying…`;
    act = ["Retry now", () => pollStatus()];
  } else if (state.status && state.status.state === "error") {
    msg = `The server could not load the model: ${state.status.error || "unknown error"}`;
    act = ["Retry now", () => pollStatus()];
  } else if (state.status && state.status.auth_required && !state.apiKey) {
    banner.dataset.kind = "warn";
    msg = "This server requires an API key.";
    act = ["Enter key", () => $("settings-btn").click()];
  }
  banner.hidden = !msg;
  if (!msg) return;
  text.textContent = msg;
  action.textContent = act[0];
  action.onclick = act[1];
}

function renderEmptyFacts() {
  const box = $("empty-facts");
  box.textContent = "";
  const st = state.status;
  if (!st || !st.model) return;
  const facts = [
    ["Model", modelShortName(st.model)],
    ["Context", st.max_len ? (st.max_len >= UNLIMITED_LEN ? "unlimited" : `${fmtK(st.max_len)} tokens`) : null],
    ["Memory", memorySummary(st)],
    ["Device", st.device],
  ];
  for (const [k, v] of facts) {
    if (!v) continue;
    box.append(el("div", { class: "fact" }, [el("span", { class: "fact-k", text: k }), el("span", { class: "fact-v", text: v })]));
  }
}

function onGpu(st) {
  return typeof st.device === "string" && st.device.startsWith("cuda");
}

function openModelDialog() {
  const st = state.status || {};
  const info = $("model-info");
  const mem = $("memory-info");
  info.textContent = "";
  mem.textContent = "";
  const add = (dl, k, v) => {
    if (v === undefined || v === null || v === "") return;
    dl.append(el("dt", { text: k }), el("dd", { text: String(v) }));
  };
  add(info, "Model", st.model);
  add(info, "State", state.reachable === false ? "unreachable" : st.state);
  add(info, "Attention", st.type);
  add(info, "Device", st.device);
  add(info, "Max context", st.max_len ? (st.max_len >= UNLIMITED_LEN ? "unlimited" : `${fmtInt(st.max_len)} tokens`) : null);
  add(info, "API key", st.auth_required ? "required" : st.auth_required === false ? "not required" : null);
  const m = st.memory || {};
  const labels = {
    type: "Type",
    n_init: "Initial (sink) tokens — n_init",
    n_local: "Local window — n_local",
    block_size: "Block size — block_size",
    topk: "Retrieved blocks per step — topk",
    max_cached_block: onGpu(st)
      ? "Blocks cached on the GPU — max_cached_block"
      : "Block cache, used only with offloading (on a CPU every block stays in RAM) — max_cached_block",
    exc_block_size: "Execution block — exc_block_size",
    repr_topk: "Representative tokens per block — repr_topk",
  };
  for (const [k, label] of Object.entries(labels)) add(mem, label, typeof m[k] === "number" ? fmtInt(m[k]) : m[k]);
  for (const [k, v] of Object.entries(m)) if (!(k in labels)) add(mem, k, typeof v === "object" ? JSON.stringify(v) : v);
  if (!mem.children.length) mem.append(el("dt", { text: "—" }), el("dd", { text: "Not reported" }));
  $("model-dialog").showModal();
}

// ------------------------------------------------------------------------------------- conversations

function current() {
  return state.currentId ? state.convs.get(state.currentId) || null : null;
}

async function persist(conv) {
  if (!state.convs.has(conv.id)) return; // Deleted meanwhile (e.g. while its reply was streaming).
  try {
    await state.store.save(stripTransient(conv));
  } catch (e) {
    showToast(`Could not save the conversation: ${e.message}`, "error");
  }
}

function stripTransient(conv) {
  return {
    ...conv,
    messages: conv.messages.map(({ streaming, progress, ...m }) => m),
  };
}

function selectConversation(id) {
  if (state.editingId) state.editingId = null;
  state.currentId = id && state.convs.has(id) ? id : null;
  if (state.currentId) localStorage.setItem(LS_CURRENT, state.currentId);
  else localStorage.removeItem(LS_CURRENT);
  renderSidebar();
  renderThread();
  updateContextMeter();
  closeSidebar();
}

function newChat() {
  selectConversation(null);
  $("input").focus();
}

function renderSidebar() {
  const list = $("conv-list");
  list.textContent = "";
  const convs = [...state.convs.values()].sort((a, b) => (b.updated || 0) - (a.updated || 0));
  $("conv-empty").hidden = convs.length > 0;
  for (const conv of convs) {
    const active = conv.id === state.currentId;
    const busy = state.generating && state.generating.convId === conv.id;
    const li = el("li", { class: `conv-item${active ? " active" : ""}`, dataset: { id: conv.id } });
    const open = el(
      "button",
      { type: "button", class: "conv-open", "aria-current": active ? "page" : null, dataset: { action: "open" }, title: conv.title },
      [
        el("span", { class: "conv-title-text", text: conv.title || "Untitled" }),
        el("span", { class: "conv-meta", text: busy ? "answering…" : `${fmtWhen(conv.updated)} · ${conv.messages.length} msg` }),
      ],
    );
    const actions = el("div", { class: "conv-actions" }, [
      iconButton("rename", `Rename "${conv.title}"`, "edit"),
      iconButton("export", `Export "${conv.title}"`, "download"),
      iconButton("delete", `Delete "${conv.title}"`, "trash"),
    ]);
    li.append(open, actions);
    list.append(li);
  }
  $("conv-title").textContent = current() ? current().title : "New chat";
  document.title = current() ? `${current().title} · InfLLM` : "InfLLM Chat";
  renderContextChip();
}

/** The header's chip naming the library document the open conversation is bound to. */
function renderContextChip() {
  const ctx = current() && current().context;
  const chip = $("context-chip");
  chip.hidden = !ctx;
  if (!ctx) return;
  const missing = !!state.libraryIds && !state.libraryIds.has(ctx.id);
  $("context-chip-name").textContent = ctx.name;
  chip.dataset.missing = missing ? "true" : "false";
  const tokens = Number.isFinite(ctx.tokens) ? ` (${fmtInt(ctx.tokens)} tokens)` : "";
  chip.title = missing
    ? `${ctx.name} is no longer on the server: this conversation cannot be continued`
    : `On the document ${ctx.name}${tokens}, read from the server's memory`;
  chip.setAttribute("aria-label", `Document: ${ctx.name}${missing ? " (no longer on the server)" : ""}`);
}

/** A new conversation bound to the library document `info`: every /chat of it carries its context_id. */
async function startDocumentChat(info) {
  const conv = newConversation(info);
  state.convs.set(conv.id, conv);
  await persist(conv);
  selectConversation(conv.id);
  $("input").focus();
}

function onLibraryListed(items) {
  state.libraryIds = new Set(items.map((c) => c.id));
  renderContextChip();
}

function openLibrary() {
  closeSidebar();
  openDocuments({ highlight: current()?.context?.id ?? null });
}

function startRename(li, conv) {
  const titleEl = li.querySelector(".conv-title-text");
  const input = el("input", { type: "text", class: "rename-input", "aria-label": "Conversation name", maxlength: "200" });
  input.value = conv.title;
  li.classList.add("renaming");
  li.querySelector(".conv-open").replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conv.title) {
      conv.title = title;
      await persist(conv);
    }
    renderSidebar();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      finish(true);
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  void titleEl;
}

async function deleteConversation(conv) {
  const ok = await confirmDialog("Delete conversation?", `"${conv.title}" will be removed from this browser.`);
  if (!ok) return;
  if (state.generating && state.generating.convId === conv.id) state.generating.controller.abort();
  state.convs.delete(conv.id);
  await state.store.delete(conv.id);
  if (state.currentId === conv.id) selectConversation(null);
  else renderSidebar();
  showToast("Conversation deleted");
}

function exportConversations(convs, name) {
  const date = new Date().toISOString().slice(0, 10);
  download(`inf_llm-${name}-${date}.json`, makeExport(convs.map(stripTransient)));
}

async function importFile(file) {
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch {
    showToast(`${file.name} is not valid JSON`, "error");
    return;
  }
  try {
    const { added, updated, kept } = await state.store.import(data);
    const changed = [...added, ...updated];
    for (const conv of changed) state.convs.set(conv.id, conv);
    const plural = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;
    const parts = [`Imported ${plural(added.length, "conversation")}`];
    if (updated.length) parts.push(`updated ${updated.length}`);
    if (kept.length) parts.push(`${kept.length} already here`);
    showToast(parts.join(", "));
    if (changed.length) selectConversation(changed[0].id);
    else renderSidebar();
  } catch (e) {
    showToast(`Import failed: ${e.message}`, "error");
  }
}

function bindSidebar() {
  $("new-chat").addEventListener("click", newChat);
  $("conv-list").addEventListener("click", (e) => {
    const btn = e.target.closest("[data-action]");
    const li = e.target.closest(".conv-item");
    if (!btn || !li) return;
    const conv = state.convs.get(li.dataset.id);
    if (!conv) return;
    const action = btn.dataset.action;
    if (action === "open") selectConversation(conv.id);
    else if (action === "rename") startRename(li, conv);
    else if (action === "delete") deleteConversation(conv);
    else if (action === "export") exportConversations([conv], slug(conv.title));
  });
  $("export-all-btn").addEventListener("click", () => {
    const convs = [...state.convs.values()];
    if (!convs.length) {
      showToast("Nothing to export yet");
      return;
    }
    exportConversations(convs, "conversations");
  });
  $("import-btn").addEventListener("click", () => $("import-input").click());
  $("import-input").addEventListener("change", async (e) => {
    for (const f of e.target.files) await importFile(f);
    e.target.value = "";
  });
  $("menu-btn").addEventListener("click", openSidebar);
  $("sidebar-close").addEventListener("click", closeSidebar);
  $("scrim").addEventListener("click", closeSidebar);
}

function openSidebar() {
  $("app").classList.add("sidebar-open");
  $("scrim").hidden = false;
  $("menu-btn").setAttribute("aria-expanded", "true");
}

function closeSidebar() {
  $("app").classList.remove("sidebar-open");
  $("scrim").hidden = true;
  $("menu-btn").setAttribute("aria-expanded", "false");
}

// --------------------------------------------------------------------------------------------- thread

function renderThread() {
  const thread = $("thread");
  thread.textContent = "";
  views.clear();
  const conv = current();
  const msgs = conv ? conv.messages : [];
  $("empty-state").hidden = msgs.length > 0;
  renderEmptyDocument(conv);
  msgs.forEach((m, i) => thread.append(messageView(conv, m, i)));
  scrollToBottom(true);
}

/** The empty state of a conversation bound to a document says what it is about instead of how to attach one. */
function renderEmptyDocument(conv) {
  const ctx = conv && conv.context;
  $("empty-text").hidden = !!ctx;
  $("empty-doc").hidden = !ctx;
  if (!ctx) return;
  const tokens = Number.isFinite(ctx.tokens) ? ` (${fmtInt(ctx.tokens)} tokens)` : "";
  $("empty-doc").textContent = `Ask anything about ${ctx.name}${tokens}. The server has read it already and keeps its memory: the answer starts at once.`;
}

function attachmentChip(a, { removable = false, msgId = null } = {}) {
  const size = a.error
    ? "token count unavailable"
    : a.counting
      ? "counting tokens…"
      : Number.isFinite(a.tokens)
        ? `${fmtInt(a.tokens)} tokens`
        : `${fmtInt(a.text.length)} chars`;
  const chip = el("div", { class: "chip", dataset: { attachment: a.id || "", msg: msgId || "" } }, [
    el("button", { type: "button", class: "chip-open", dataset: { action: "open-attachment" }, "aria-label": `Open ${a.name}`, title: `Open ${a.name}` }, [
      el("span", { class: "chip-icon", html: icon("file") }),
      el("span", { class: "chip-text" }, [el("span", { class: "chip-name", text: a.name }), el("span", { class: "chip-size", text: size })]),
    ]),
  ]);
  if (removable) chip.append(el("button", { type: "button", class: "chip-remove", dataset: { action: "remove-attachment" }, "aria-label": `Remove ${a.name}`, title: "Remove", html: icon("x") }));
  return chip;
}

function messageView(conv, msg, index) {
  return msg.role === "user" ? userView(conv, msg, index) : assistantView(conv, msg, index);
}

function userView(conv, msg) {
  const root = el("article", { class: "msg user", dataset: { id: msg.id }, "aria-label": "Your message" });
  if (state.editingId === msg.id) {
    const ta = el("textarea", { class: "edit-input", "aria-label": "Edit message", rows: "3" });
    ta.value = msg.content;
    const box = el("div", { class: "bubble editing" }, [
      ta,
      el("div", { class: "edit-actions" }, [
        el("button", { type: "button", class: "ghost-btn small", dataset: { action: "cancel-edit" }, text: "Cancel" }),
        el("button", { type: "button", class: "primary-btn small", dataset: { action: "save-edit" }, text: "Send" }),
      ]),
    ]);
    ta.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        saveEdit(msg.id, ta.value);
      } else if (e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();
        state.editingId = null;
        renderThread();
      }
    });
    root.append(box);
    requestAnimationFrame(() => {
      ta.focus();
      ta.setSelectionRange(ta.value.length, ta.value.length);
      ta.style.height = `${Math.min(ta.scrollHeight + 2, 400)}px`;
    });
    return root;
  }
  const bubble = el("div", { class: "bubble" });
  if (msg.attachments && msg.attachments.length) {
    bubble.append(el("div", { class: "msg-attachments" }, msg.attachments.map((a, i) => attachmentChip({ ...a, id: String(i) }, { msgId: msg.id }))));
  }
  if (msg.content) bubble.append(el("div", { class: "user-text", text: msg.content }));
  root.append(
    bubble,
    el("div", { class: "msg-actions" }, [iconButton("copy-msg", "Copy message", "copy"), iconButton("edit-msg", "Edit and resend", "edit")]),
  );
  return root;
}

function assistantView(conv, msg) {
  const root = el("article", { class: "msg assistant", dataset: { id: msg.id }, "aria-label": "Assistant reply" });
  const avatar = el("div", { class: "avatar", html: icon("logo") });
  const prefill = el("div", { class: "prefill", hidden: true }, [
    el("div", { class: "prefill-label" }),
    el("div", { class: "progress small", role: "progressbar", "aria-label": "Prompt processing progress", "aria-valuemin": "0", "aria-valuemax": "100" }, [el("div", { class: "progress-fill" })]),
  ]);
  const typing = el("div", { class: "typing", hidden: true, "aria-label": "Waiting for the first token" }, [el("span"), el("span"), el("span")]);
  const md = el("div", { class: "md" });
  const note = el("div", { class: "msg-note", hidden: true });
  const stats = el("div", { class: "stats" });
  const actions = el("div", { class: "msg-actions" });
  const main = el("div", { class: "msg-main" }, [prefill, typing, md, note, el("div", { class: "msg-footer" }, [stats, actions])]);
  root.append(avatar, main);
  const view = { root, md, prefill, typing, note, stats, actions };
  views.set(msg.id, view);
  updateAssistant(msg, view, true);
  return root;
}

function updateAssistant(msg, view, final) {
  const streaming = !!msg.streaming;
  view.root.classList.toggle("streaming", streaming);
  view.root.setAttribute("aria-busy", streaming ? "true" : "false");

  // Prefill progress until the first token.
  const p = msg.progress;
  const showPrefill = streaming && !msg.content && p && p.total > 0;
  view.prefill.hidden = !showPrefill;
  if (showPrefill) {
    const f = Math.min(1, p.processed / p.total);
    view.prefill.querySelector(".prefill-label").textContent = `Reading the prompt · ${fmtInt(p.processed)} / ${fmtInt(p.total)} tokens (${Math.round(f * 100)}%)`;
    view.prefill.querySelector(".progress-fill").style.width = `${(f * 100).toFixed(1)}%`;
    view.prefill.querySelector(".progress").setAttribute("aria-valuenow", String(Math.round(f * 100)));
  }
  view.typing.hidden = !(streaming && !msg.content && !showPrefill);

  setMarkdown(view.md, msg.content, { streaming: streaming && !final });

  // Notes: cancelled, error, truncated prompt, length limit.
  const notes = [];
  const done = msg.done;
  if (msg.error) notes.push(["error", msg.error]);
  if (msg.cancelled || (done && done.finish_reason === "cancelled")) notes.push(["muted", "Stopped."]);
  if (done && done.finish_reason === "length") notes.push(["muted", "Reached the max new tokens limit."]);
  if (done && done.truncated) {
    notes.push(["warn", `The conversation was longer than the model's limit: ${fmtInt(done.truncated.kept_tokens)} of ${fmtInt(done.truncated.original_tokens)} tokens were kept.`]);
  }
  view.note.textContent = "";
  view.note.hidden = !notes.length;
  for (const [kind, text] of notes) view.note.append(el("p", { class: `note-${kind}`, text }));

  // Stats and actions only once the reply is over.
  view.stats.textContent = "";
  view.actions.textContent = "";
  if (streaming) return;
  if (done) {
    const u = done.usage || {};
    const t = done.timings || {};
    const chip = (label, value, title) => el("span", { class: "stat", title }, [el("span", { class: "stat-v", text: value }), el("span", { class: "stat-k", text: label })]);
    view.stats.append(
      chip("prompt", fmtInt(u.prompt_tokens), "Prompt tokens"),
      chip("cached", fmtInt(u.cached_tokens), "Prompt tokens reused from the previous turn's memory state"),
      chip("TTFT", fmtMs(t.ttft_ms), "Time to first token"),
      prefillChip(u, t, chip),
      chip("decode tok/s", fmtRate(t.decode_tokens_per_s), `Generated ${fmtInt(u.completion_tokens)} tokens in ${fmtMs(t.decode_ms)}`),
    );
  }
  view.actions.append(iconButton("copy-msg", "Copy reply", "copy"), iconButton("regen", "Regenerate reply", "refresh"));
  if (done && done.retrieval && Array.isArray(done.retrieval.spans)) {
    const b = el("button", { type: "button", class: "inspect-btn", dataset: { action: "inspect" }, "aria-label": "Open the memory inspector for this reply" }, [
      el("span", { html: icon("layers") }),
      el("span", { text: `Memory · ${done.retrieval.spans.length}` }),
    ]);
    view.actions.append(b);
  }
}

/** The prefill rate is over the prompt tokens read this turn: with the rest reused from memory, say so (a
 * follow-up reads a few tokens, and its rate is no measure of a long prefill). */
function prefillChip(u, t, chip) {
  const fresh = (u.prompt_tokens || 0) - (u.cached_tokens || 0);
  if (!u.cached_tokens) return chip("prefill tok/s", fmtRate(t.prefill_tokens_per_s), `Prefill: ${fmtMs(t.prefill_ms)}`);
  return chip(`prefill tok/s · ${fmtInt(fresh)} new`, fmtRate(t.prefill_tokens_per_s),
    `${fmtInt(fresh)} new prompt tokens read in ${fmtMs(t.prefill_ms)}; the other ${fmtInt(u.cached_tokens)} came from the memory of the previous turn`);
}

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    const g = state.generating;
    if (!g || g.convId !== state.currentId) return;
    const conv = current();
    const msg = conv && conv.messages.find((m) => m.id === g.msgId);
    const view = msg && views.get(msg.id);
    if (!view) return;
    const stick = isNearBottom();
    updateAssistant(msg, view, false);
    if (stick) scrollToBottom(false);
  });
}

function isNearBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < STICKY_SCROLL_PX;
}

function scrollToBottom(instant) {
  const box = $("messages");
  box.scrollTo({ top: box.scrollHeight, behavior: instant ? "instant" : "auto" });
}

function bindThread() {
  $("thread").addEventListener("click", async (e) => {
    const btn = e.target.closest("[data-action]");
    if (!btn) return;
    const action = btn.dataset.action;
    if (action === "copy-code") {
      const code = btn.closest(".code-block")?.querySelector("code");
      if (code) {
        await copyText(code.textContent);
        flashCopied(btn);
      }
      return;
    }
    const conv = current();
    const article = btn.closest(".msg");
    const msg = conv && article && conv.messages.find((m) => m.id === article.dataset.id);
    if (!msg) return;
    if (action === "copy-msg") {
      await copyText(msg.content);
      flashCopied(btn);
    } else if (action === "edit-msg") {
      if (state.generating) return showToast("Wait for the reply to finish or stop it first");
      state.editingId = msg.id;
      renderThread();
    } else if (action === "cancel-edit") {
      state.editingId = null;
      renderThread();
    } else if (action === "save-edit") {
      saveEdit(msg.id, article.querySelector(".edit-input").value);
    } else if (action === "regen") {
      regenerate(conv, msg);
    } else if (action === "inspect") {
      openInspector(conv, msg);
    } else if (action === "open-attachment") {
      const chip = btn.closest(".chip");
      const a = msg.attachments && msg.attachments[Number(chip.dataset.attachment)];
      if (a) openDocument(a);
    }
  });
  const box = $("messages");
  box.addEventListener("scroll", () => {
    $("scroll-bottom").hidden = isNearBottom();
  });
  $("scroll-bottom").addEventListener("click", () => scrollToBottom(false));
}

function openDocument(a) {
  $("doc-title").textContent = a.name;
  $("doc-sub").textContent = [Number.isFinite(a.tokens) ? `${fmtInt(a.tokens)} tokens` : null, `${fmtInt(a.text.length)} characters`].filter(Boolean).join(" · ");
  $("doc-text").textContent = a.text;
  $("doc-dialog").showModal();
  $("doc-text").scrollTop = 0;
}

// ----------------------------------------------------------------------------------------- generation

async function send() {
  if (state.generating) return;
  const input = $("input");
  const text = input.value.trim();
  const pending = state.pending.filter((a) => !a.error || a.text);
  if (!text && !pending.length) return;
  if (!isReady()) {
    showToast(state.reachable === false ? "The server is unreachable" : "The model is still loading", "error");
    return;
  }
  let conv = current();
  if (!conv) {
    conv = newConversation();
    state.convs.set(conv.id, conv);
    state.currentId = conv.id;
    localStorage.setItem(LS_CURRENT, conv.id);
  }
  const userMsg = { id: newId(), role: "user", content: text, created: Date.now() };
  if (pending.length) userMsg.attachments = pending.map((a) => ({ name: a.name, text: a.text, tokens: Number.isFinite(a.tokens) ? a.tokens : null }));
  conv.messages.push(userMsg);
  if (conv.messages.length === 1 || conv.title === "New chat") conv.title = deriveTitle(userMsg);
  input.value = "";
  autosize();
  state.pending = [];
  renderAttachments();
  const reply = addReply(conv);
  renderSidebar();
  renderThread();
  await generate(conv, reply);
}

function addReply(conv) {
  // Marked streaming from the start so the view never shows an idle empty reply.
  const reply = { id: newId(), role: "assistant", content: "", created: Date.now(), streaming: true };
  conv.messages.push(reply);
  conv.updated = Date.now();
  return reply;
}

async function generate(conv, reply) {
  const index = conv.messages.indexOf(reply);
  let body;
  try {
    body = buildChatRequest(conv, index, requestSettings(), settingKeys());
  } catch (e) {
    reply.error = e.message;
    delete reply.streaming;
    await persist(conv);
    renderThread();
    return;
  }
  const controller = new AbortController();
  state.generating = { convId: conv.id, msgId: reply.id, controller };
  reply.streaming = true;
  reply.model = state.status && state.status.model;
  reply.system = conv.context ? conv.context.system : typeof body.system === "string" ? body.system : defaults().system_prompt ?? null;
  delete reply.error;
  delete reply.cancelled;
  delete reply.done;
  updateComposer();
  renderSidebar();
  queueRender();
  await persist(conv);
  let networkFailed = false;
  try {
    await streamChat(body, {
      apiKey: state.apiKey,
      signal: controller.signal,
      handlers: {
        onToken(t) {
          reply.content += t;
          queueRender();
        },
        onProgress(p) {
          reply.progress = p;
          queueRender();
        },
        onDone(d) {
          reply.done = d;
        },
      },
    });
  } catch (e) {
    if (e.name === "AbortError") reply.cancelled = true;
    else {
      networkFailed = !(e instanceof ApiError);
      reply.error = networkFailed ? `Lost the connection to the server (${e.message}).` : e.message;
      if (e.status === 401) {
        reply.error = `${e.message} — set the API key in Settings.`;
        $("settings-btn").click();
      }
    }
  } finally {
    if (state.generating && state.generating.msgId === reply.id) state.generating = null;
    delete reply.streaming;
    delete reply.progress;
    conv.updated = Date.now();
    await persist(conv);
    const view = views.get(reply.id);
    if (view && state.currentId === conv.id) {
      const stick = isNearBottom();
      updateAssistant(reply, view, true);
      if (stick) scrollToBottom(false);
    }
    renderSidebar();
    updateComposer();
    updateContextMeter();
    if (networkFailed) pollStatus(); // Is the server still there?
  }
}

function stop() {
  if (state.generating) state.generating.controller.abort();
}

async function regenerate(conv, msg) {
  if (state.generating) return;
  const idx = conv.messages.indexOf(msg);
  if (idx < 0) return;
  conv.messages.splice(idx);
  const reply = addReply(conv);
  renderThread();
  await generate(conv, reply);
}

async function saveEdit(msgId, text) {
  const conv = current();
  if (!conv || state.generating) return;
  const idx = conv.messages.findIndex((m) => m.id === msgId);
  if (idx < 0) return;
  const msg = conv.messages[idx];
  const content = text.trim();
  if (!content && !(msg.attachments && msg.attachments.length)) return;
  msg.content = content;
  conv.messages.splice(idx + 1);
  state.editingId = null;
  if (idx === 0) conv.title = deriveTitle(msg);
  const reply = addReply(conv);
  renderSidebar();
  renderThread();
  await generate(conv, reply);
}

// ----------------------------------------------------------------------------------------- inspector

function openInspector(conv, msg) {
  const idx = conv.messages.indexOf(msg);
  const r = msg.done && msg.done.retrieval;
  if (!r) return;
  const data = inspect(conv, idx, r, msg.system);
  const locatedCount = data.located.filter(Boolean).length;
  $("inspector-sub").textContent = [
    Number.isFinite(r.layers) ? `${fmtInt(r.layers)} layers` : null,
    Number.isFinite(r.steps) ? `${fmtInt(r.steps)} decode steps` : null,
    `${fmtInt(data.spans.length)} retrieved passage${data.spans.length === 1 ? "" : "s"}`,
    data.spans.length ? `${fmtInt(locatedCount)} located in the text` : null,
  ]
    .filter(Boolean)
    .join(" · ");

  const list = $("passage-list");
  list.textContent = "";
  if (!data.spans.length) {
    list.append(el("li", { class: "passage-empty", text: "No blocks were retrieved for this reply: the whole prompt fit in the local window." }));
  }
  for (const s of data.top) {
    const loc = data.located[s.index];
    const heat = data.maxScore > 0 ? Math.max(0.04, (Number(s.score) || 0) / data.maxScore) : 1;
    const snippet = String(s.text).replace(/\s+/g, " ").trim();
    const meter = el("span", { class: "passage-meter", "aria-hidden": "true" }, [el("span", { class: "passage-meter-fill" })]);
    meter.firstChild.style.width = `${(heat * 100).toFixed(1)}%`;
    const item = el("li", {}, [
      el(
        "button",
        { type: "button", class: "passage", dataset: { span: String(s.index) }, disabled: !loc, "aria-label": `Passage retrieved ${formatScore(s.score, data.maxScore)}${loc ? "" : " (not found in the text)"}` },
        [
          el("span", { class: "passage-head" }, [
            el("span", { class: "passage-score", text: formatScore(s.score, data.maxScore) }),
            el("span", { class: "passage-where", text: loc ? data.sources[loc.source].label : "not in the shown text" }),
          ]),
          meter,
          el("span", { class: "passage-text", text: snippet.length > 220 ? `${snippet.slice(0, 217)}…` : snippet }),
          el("span", { class: "passage-tokens", text: `tokens ${fmtInt(s.token_start)}–${fmtInt(s.token_end)}` }),
        ],
      ),
    ]);
    list.append(item);
  }

  const view = $("doc-view");
  view.textContent = "";
  data.sources.forEach((src, i) => {
    const ranges = data.ranges[i];
    const body = el("div", { class: `doc-body doc-${src.kind}` });
    renderHighlighted(body, src.text, ranges, data.maxScore);
    const hits = ranges.length;
    const details = el("details", { class: "doc-source", open: hits > 0 || src.kind === "document", dataset: { source: String(i) } }, [
      el("summary", {}, [
        el("span", { class: "doc-kind", html: icon(src.kind === "document" ? "file" : "chat") }),
        el("span", { class: "doc-label", text: src.label }),
        el("span", { class: "doc-hits", text: hits ? `${hits} highlighted` : "no retrievals" }),
      ]),
      body,
    ]);
    view.append(details);
  });
  $("inspector-dialog").showModal();
  view.scrollTop = 0;
}

function bindInspector() {
  $("passage-list").addEventListener("click", (e) => {
    const btn = e.target.closest(".passage");
    if (!btn) return;
    const mark = $("doc-view").querySelector(`mark[data-span="${CSS.escape(btn.dataset.span)}"]`);
    if (!mark) return;
    const details = mark.closest("details");
    if (details) details.open = true;
    mark.scrollIntoView({ block: "center" });
    for (const m of $("doc-view").querySelectorAll("mark.flash")) m.classList.remove("flash");
    for (const m of $("doc-view").querySelectorAll(`mark[data-span="${CSS.escape(btn.dataset.span)}"]`)) m.classList.add("flash");
  });
}

// --------------------------------------------------------------------------------------- attachments

function renderAttachments() {
  const box = $("attachments");
  box.textContent = "";
  box.hidden = !state.pending.length;
  for (const a of state.pending) box.append(attachmentChip(a, { removable: true }));
  updateComposer();
  updateContextMeter();
}

async function addAttachment(name, text) {
  const a = { id: newId(), name, text, tokens: null, counting: true, error: null };
  state.pending.push(a);
  renderAttachments();
  try {
    a.tokens = await countTokens(text, { apiKey: state.apiKey });
  } catch (e) {
    a.error = e.message;
  } finally {
    a.counting = false;
    renderAttachments();
  }
}

async function addFiles(files) {
  for (const file of files) {
    try {
      addAttachment(file.name, await readTextFile(file));
    } catch (e) {
      showToast(e.message, "error");
    }
  }
}

function bindAttachments() {
  $("attach-btn").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", async (e) => {
    await addFiles([...e.target.files]);
    e.target.value = "";
  });
  $("attachments").addEventListener("click", (e) => {
    const btn = e.target.closest("[data-action]");
    const chip = e.target.closest(".chip");
    if (!btn || !chip) return;
    const a = state.pending.find((x) => x.id === chip.dataset.attachment);
    if (!a) return;
    if (btn.dataset.action === "remove-attachment") {
      state.pending = state.pending.filter((x) => x !== a);
      renderAttachments();
      $("input").focus();
    } else if (btn.dataset.action === "open-attachment") openDocument(a);
  });
  $("input").addEventListener("paste", (e) => {
    const text = e.clipboardData && e.clipboardData.getData("text/plain");
    if (text && text.length > LONG_PASTE_CHARS) {
      e.preventDefault();
      const n = state.pending.filter((a) => a.name.startsWith("Pasted text")).length + 1;
      addAttachment(n > 1 ? `Pasted text ${n}` : "Pasted text", text.replace(/\r\n?/g, "\n"));
    }
  });

  // Drag and drop anywhere on the page.
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    $("drop-overlay").hidden = false;
  });
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    depth = Math.max(0, depth - 1);
    if (depth === 0) $("drop-overlay").hidden = true;
  });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    $("drop-overlay").hidden = true;
    addFiles([...e.dataTransfer.files]);
  });
}

// ------------------------------------------------------------------------------------------ composer

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, Math.round(window.innerHeight * 0.4))}px`;
}

function updateComposer() {
  const generating = !!state.generating;
  const hasInput = $("input").value.trim().length > 0 || state.pending.length > 0;
  $("send-btn").hidden = generating;
  $("stop-btn").hidden = !generating;
  $("send-btn").disabled = !hasInput || !isReady();
  $("send-btn").title = !isReady() ? (state.reachable === false ? "The server is unreachable" : "The model is still loading") : "Send (Enter)";
}

function updateContextMeter() {
  const max = state.status && state.status.max_len;
  const unlimited = !max || max >= UNLIMITED_LEN;
  const conv = current();
  let used = 0;
  if (conv) {
    for (let i = conv.messages.length - 1; i >= 0; i--) {
      const u = conv.messages[i].done && conv.messages[i].done.usage;
      if (u && Number.isFinite(u.total_tokens)) {
        used = u.total_tokens;
        break;
      }
    }
    // Before the first answer of a chat on a library document, the document is what the context holds.
    if (!used && conv.context && Number.isFinite(conv.context.tokens)) used = conv.context.tokens;
  }
  const pendingTokens = state.pending.reduce((s, a) => s + (Number.isFinite(a.tokens) ? a.tokens : 0), 0);
  const total = used + pendingTokens;
  const meter = $("context-meter");
  meter.hidden = total === 0;
  if (meter.hidden) return;
  const f = unlimited ? 0 : total / max;
  $("context-fill").parentElement.hidden = unlimited;
  $("context-fill").style.width = `${Math.min(100, f * 100).toFixed(1)}%`;
  meter.dataset.level = f > 1 ? "over" : f > 0.8 ? "high" : "ok";
  $("context-text").textContent = unlimited ? `${fmtK(total)} tokens in context` : `${fmtK(total)} / ${fmtK(max)} tokens`;
  meter.title = unlimited
    ? `Context: ${fmtInt(total)} tokens (no limit: distant context lives in the memory)`
    : f > 1
      ? "Longer than the model's context limit: the middle will be dropped"
      : `Context used: ${fmtInt(total)} of ${fmtInt(max)} tokens`;
}

function bindComposer() {
  const input = $("input");
  input.addEventListener("input", () => {
    autosize();
    updateComposer();
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("stop-btn").addEventListener("click", stop);
  window.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.generating && !document.querySelector("dialog[open]")) {
      e.preventDefault();
      stop();
    }
  });
  window.addEventListener("resize", autosize);
}

// ------------------------------------------------------------------------------------------------ boot

async function boot() {
  hydrateIcons();
  bindSettings();
  bindSidebar();
  bindThread();
  bindInspector();
  bindAttachments();
  bindComposer();
  $("model-chip").addEventListener("click", openModelDialog);
  initDocuments({
    getApiKey: () => state.apiKey,
    // Read with the system prompt the user's chats have, so that a chat on it begins with the same tokens.
    getSystem: () => (typeof state.settings.system === "string" ? state.settings.system : null),
    onStartChat: startDocumentChat,
    onAuthError: () => $("settings-btn").click(),
    onListed: onLibraryListed,
  });
  $("documents-btn").addEventListener("click", openLibrary);
  $("context-chip").addEventListener("click", openLibrary);
  // Re-check at once when the user comes back or the network returns, not at the next slow poll.
  window.addEventListener("focus", pollStatus);
  window.addEventListener("online", pollStatus);
  renderAttachments();
  pollStatus();
  state.store = await ConversationStore.open();
  for (const conv of await state.store.list()) {
    // A reply that was streaming when the page closed is over now.
    for (const m of conv.messages) {
      if (m.role === "assistant" && !m.done && !m.error && !m.cancelled) m.cancelled = true;
    }
    state.convs.set(conv.id, conv);
  }
  selectConversation(localStorage.getItem(LS_CURRENT));
  $("input").focus();
}

boot();
