// The documents panel: the server's library of document memories ("contexts"). Lists them, adds one (a text
// file read here, or pasted text) while showing the server's reading progress, deletes one, and starts a chat
// on one. Knows nothing of conversations: starting a chat is the caller's `onStartChat(info)`.

import { ApiError, createContext, deleteContext, listContexts } from "./api.js";
import { icon } from "./icons.js";
import { $, confirmDialog, el, fmtBytes, fmtInt, fmtWhen, readTextFile, showToast } from "./ui.js";

// The server's bound on a document's name (POST /v1/contexts).
const MAX_NAME_CHARS = 200;
// How long a newly added entry stays highlighted in the list.
const FLASH_MS = 2400;

const WHERE_LABELS = { ram: "RAM", disk: "Disk" };
const NOT_SAVED = "not saved";

const panel = {
  items: [], // the server's context infos, newest first
  listed: false, // whether `items` came from the server at least once
  file: null, // the picked file: {name, text}
  autoName: "", // the name the last picked file filled in (replaced by the next pick, a typed one is kept)
  adding: null, // {controller, name, progress}
  highlight: null, // the id to mark in the list (the open conversation's document, or the new one)
  getApiKey: () => "",
  getSystem: () => null,
  onStartChat: () => {},
  onAuthError: () => {},
  onListed: () => {},
};

/**
 * Binds the panel. `getApiKey()`: the key to send; `getSystem()`: the system prompt a new document is read with
 * (null: the server's); `onStartChat(info)`: a chat on that context; `onAuthError()`: a 401 (the page asks for
 * the key); `onListed(items)`: every list the server answered.
 */
export function initDocuments({ getApiKey, getSystem, onStartChat, onAuthError, onListed }) {
  Object.assign(panel, { getApiKey, getSystem, onStartChat, onAuthError, onListed });
  $("lib-pick").addEventListener("click", () => $("lib-file").click());
  $("lib-file").addEventListener("change", async (e) => {
    const [file] = e.target.files;
    e.target.value = "";
    if (file) await pickFile(file);
  });
  $("lib-file-remove").addEventListener("click", () => {
    panel.file = null;
    if ($("lib-name").value === panel.autoName) $("lib-name").value = "";
    renderForm();
    $("lib-text").focus();
  });
  $("lib-text").addEventListener("input", renderForm);
  $("lib-name").addEventListener("input", renderForm);
  // The panel is a <form method="dialog">: Enter in the name field would close it instead of adding.
  $("lib-name").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.isComposing) {
      e.preventDefault();
      addDocument();
    }
  });
  $("lib-add").addEventListener("click", addDocument);
  $("lib-stop").addEventListener("click", () => panel.adding?.controller.abort());
  $("lib-refresh").addEventListener("click", refresh);
  $("lib-list").addEventListener("click", (e) => {
    const btn = e.target.closest("[data-action]");
    const li = e.target.closest(".lib-item");
    const info = li && panel.items.find((c) => c.id === li.dataset.id);
    if (!btn || !info) return;
    if (btn.dataset.action === "start-chat") startChat(info);
    else if (btn.dataset.action === "delete-context") removeDocument(info);
  });
  renderForm();
}

/** Opens the panel and lists the server's documents afresh; `highlight`: a context id to mark. */
export function openDocuments({ highlight = null } = {}) {
  panel.highlight = highlight;
  renderList();
  $("documents-dialog").showModal();
  refresh();
}

/** What went wrong, in words for a toast: the server's own message when it sent one. */
function describe(e) {
  if (e instanceof ApiError) return e.status === 401 ? `${e.message} (set the API key in Settings)` : e.message;
  return `the server could not be reached (${e.message})`;
}

function reportError(what, e) {
  showToast(`${what}: ${describe(e)}`, "error");
  if (e instanceof ApiError && e.status === 401) panel.onAuthError();
}

async function refresh() {
  $("lib-refresh").disabled = true;
  try {
    panel.items = sortNewestFirst(await listContexts({ apiKey: panel.getApiKey() }));
    panel.listed = true;
    panel.onListed(panel.items);
  } catch (e) {
    reportError("Could not list the documents", e);
  } finally {
    $("lib-refresh").disabled = false;
    renderList();
  }
}

function sortNewestFirst(items) {
  return [...items].sort((a, b) => (b.created || 0) - (a.created || 0));
}

// -------------------------------------------------------------------------------------------- the list

function renderList() {
  const list = $("lib-list");
  list.textContent = "";
  for (const info of panel.items) list.append(itemView(info));
  const empty = $("lib-empty");
  empty.hidden = panel.items.length > 0;
  empty.textContent = panel.listed ? "No documents yet. Add one above: it is read once, then every chat on it starts at once." : "Loading…";
  $("lib-count").textContent = panel.items.length ? String(panel.items.length) : "";
}

function itemView(info) {
  const where = Array.isArray(info.where) ? info.where : [];
  const badges = where
    .filter((w) => w in WHERE_LABELS)
    .map((w) => el("span", { class: "badge", dataset: { where: w }, title: whereTitle(info, w), text: WHERE_LABELS[w] }));
  if (info.disk_error) badges.push(el("span", { class: "badge", dataset: { where: "error" }, title: `Kept in RAM only: ${info.disk_error}`, text: NOT_SAVED }));
  // Memory on disk only (not loaded since the server started): the saved file's size is what there is.
  const size = Number.isFinite(info.bytes) ? info.bytes : info.disk_bytes;
  const li = el("li", { class: `lib-item${info.id === panel.highlight ? " current" : ""}`, dataset: { id: info.id } }, [
    el("span", { class: "chip-icon", html: icon("file") }),
    el("div", { class: "lib-main" }, [
      el("span", { class: "lib-name", text: info.name, title: info.name }),
      el("span", { class: "lib-meta" }, [
        el("span", { class: "lib-tokens", text: `${fmtInt(info.tokens)} tokens` }),
        el("span", { class: "lib-bytes", title: "Size of the kept memory", text: fmtBytes(size) }),
        ...badges,
        Number.isFinite(info.created) ? el("span", { class: "lib-when", text: fmtWhen(info.created * 1000) }) : null,
      ]),
    ]),
    el("div", { class: "lib-actions" }, [
      el("button", { type: "button", class: "primary-btn small", dataset: { action: "start-chat" }, "aria-label": `Start a chat on ${info.name}` }, [
        el("span", { html: icon("chat") }),
        el("span", { class: "lib-chat-label", text: "Start a chat" }),
      ]),
      el("button", { type: "button", class: "icon-btn small", dataset: { action: "delete-context" }, "aria-label": `Delete ${info.name}`, title: "Delete", html: icon("trash") }),
    ]),
  ]);
  return li;
}

function whereTitle(info, where) {
  if (where === "ram") return `Memory held in RAM (${fmtBytes(info.bytes)}): a chat starts at once`;
  const size = Number.isFinite(info.disk_bytes) ? ` (${fmtBytes(info.disk_bytes)})` : "";
  return `Saved on disk${size}: kept across server restarts`;
}

function startChat(info) {
  $("documents-dialog").close();
  panel.onStartChat(info);
}

async function removeDocument(info) {
  const ok = await confirmDialog(
    "Delete document?",
    `"${info.name}" and its memory will be removed from the server. Conversations on it can no longer be continued.`,
  );
  if (!ok) return;
  try {
    await deleteContext(info.id, { apiKey: panel.getApiKey() });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) {
      reportError(`Could not delete "${info.name}"`, e);
      return;
    }
    // Already gone (another tab, a restart): the list drops it all the same.
  }
  panel.items = panel.items.filter((c) => c.id !== info.id);
  panel.onListed(panel.items);
  renderList();
  showToast(`Deleted "${info.name}"`);
}

// ---------------------------------------------------------------------------------------- adding one

async function pickFile(file) {
  try {
    panel.file = { name: file.name, text: await readTextFile(file) };
  } catch (e) {
    showToast(e.message, "error");
    return;
  }
  const name = $("lib-name");
  if (!name.value.trim() || name.value === panel.autoName) {
    name.value = file.name.slice(0, MAX_NAME_CHARS);
    panel.autoName = name.value;
  }
  renderForm();
}

/** The text to add: the picked file's, else what was pasted. */
function sourceText() {
  return panel.file ? panel.file.text : $("lib-text").value;
}

function renderForm() {
  const f = panel.file;
  $("lib-file-chip").hidden = !f;
  $("lib-text-field").hidden = !!f;
  if (f) {
    $("lib-file-name").textContent = f.name;
    $("lib-file-size").textContent = `${fmtInt(f.text.length)} characters`;
  }
  const adding = !!panel.adding;
  $("lib-add").hidden = adding;
  $("lib-stop").hidden = !adding;
  $("lib-add").disabled = !sourceText() || !$("lib-name").value.trim();
  for (const id of ["lib-pick", "lib-name", "lib-text", "lib-file-remove"]) $(id).disabled = adding;
  renderProgress();
}

function renderProgress() {
  const a = panel.adding;
  $("lib-progress").hidden = !a;
  if (!a) return;
  const bar = $("lib-progress-bar");
  const p = a.progress;
  const f = p && p.total > 0 ? Math.min(1, p.processed / p.total) : null;
  bar.classList.toggle("indeterminate", f === null);
  if (f === null) {
    bar.removeAttribute("aria-valuenow");
    // Until the first progress event: still on its way, tokenized, or too short for the server to report.
    $("lib-progress-text").textContent = `Reading "${a.name}"…`;
    return;
  }
  $("lib-progress-fill").style.width = `${(f * 100).toFixed(1)}%`;
  bar.setAttribute("aria-valuenow", String(Math.round(f * 100)));
  $("lib-progress-text").textContent = `Reading "${a.name}" · ${fmtInt(p.processed)} / ${fmtInt(p.total)} tokens (${Math.round(f * 100)}%)`;
}

async function addDocument() {
  const name = $("lib-name").value.trim();
  const text = sourceText();
  if (panel.adding || !name || !text) return;
  const controller = new AbortController();
  panel.adding = { controller, name, progress: null };
  $("lib-progress-fill").style.width = "0";
  renderForm();
  try {
    const info = await createContext(
      { name, text, system: panel.getSystem() },
      {
        apiKey: panel.getApiKey(),
        signal: controller.signal,
        onProgress(p) {
          panel.adding.progress = p;
          renderProgress();
        },
      },
    );
    panel.items = sortNewestFirst([info, ...panel.items.filter((c) => c.id !== info.id)]);
    panel.listed = true;
    panel.onListed(panel.items);
    clearForm();
    if (info.disk_error) showToast(`Added "${info.name}" · ${fmtInt(info.tokens)} tokens, in RAM only: ${info.disk_error}`, "error");
    else showToast(`Added "${info.name}" · ${fmtInt(info.tokens)} tokens`);
    flash(info.id);
  } catch (e) {
    if (e.name === "AbortError") showToast(`Stopped reading "${name}"`);
    else reportError(`Could not add "${name}"`, e);
  } finally {
    panel.adding = null;
    renderForm();
  }
}

function clearForm() {
  panel.file = null;
  panel.autoName = "";
  $("lib-name").value = "";
  $("lib-text").value = "";
}

function flash(id) {
  renderList();
  const li = $("lib-list").querySelector(`.lib-item[data-id="${CSS.escape(id)}"]`);
  if (!li) return;
  li.classList.add("flash");
  li.scrollIntoView({ block: "nearest" });
  setTimeout(() => li.classList.remove("flash"), FLASH_MS);
}
