// Small DOM helpers shared by the page's modules: the element builder, number formats, the toast and the
// confirm dialog. Knows nothing of the server or of conversations.

import { icon } from "./icons.js";

const TOAST_MS = 2600;
// An error toast names what went wrong, often in a server's sentence: give it time to be read.
const ERROR_TOAST_MS = 6000;
// Files larger than this are refused: the browser would struggle long before the model does.
const MAX_FILE_BYTES = 64 * 1024 * 1024;

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "html") node.innerHTML = v; // Only ever our own static markup (icons).
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of [].concat(children)) if (c) node.append(c);
  return node;
}

export function iconButton(action, label, iconName, extra = {}) {
  return el("button", { type: "button", class: "icon-btn small", "aria-label": label, title: label, dataset: { action, ...extra }, html: icon(iconName) });
}

const nf = new Intl.NumberFormat();
export function fmtInt(n) {
  return Number.isFinite(n) ? nf.format(Math.round(n)) : "–";
}

const BYTE_UNITS = ["B", "KB", "MB", "GB", "TB"];
/** 1536 -> "1.5 KB" (powers of 1024, the way memory is counted). */
export function fmtBytes(n) {
  if (!Number.isFinite(n) || n < 0) return "–";
  let i = 0;
  while (n >= 1024 && i < BYTE_UNITS.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i === 0 || n >= 100 ? Math.round(n) : n.toFixed(1)} ${BYTE_UNITS[i]}`;
}

/** A time as this day's clock time, or as a date when it is not today; `t` in milliseconds. */
export function fmtWhen(t) {
  const d = new Date(t);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toLocaleDateString([], { month: "short", day: "numeric" });
}

/** The text of a file the user picked or dropped (line ends as \n); throws an Error naming what is wrong. */
export async function readTextFile(file) {
  if (file.size > MAX_FILE_BYTES) throw new Error(`${file.name} is too large (${fmtBytes(file.size)})`);
  let text;
  try {
    text = await file.text();
  } catch (e) {
    throw new Error(`Could not read ${file.name}: ${e.message}`);
  }
  // A NUL early on: a binary file, whose "text" would only be noise to the model.
  if (text.slice(0, 8192).includes("\u0000")) throw new Error(`${file.name} is not a text file`);
  return text.replace(/\r\n?/g, "\n");
}

let toastTimer = null;

export function showToast(text, kind = "info") {
  const t = $("toast");
  t.textContent = text;
  t.dataset.kind = kind;
  t.hidden = false;
  // A popover sits in the top layer: shown again, it is above an open modal dialog too.
  if (t.showPopover) {
    if (t.matches(":popover-open")) t.hidePopover();
    t.showPopover();
  }
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    t.hidden = true;
    if (t.hidePopover && t.matches(":popover-open")) t.hidePopover();
  }, kind === "error" ? ERROR_TOAST_MS : TOAST_MS);
}

export function confirmDialog(title, text, okLabel = "Delete") {
  const dlg = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  dlg.returnValue = "";
  dlg.showModal();
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
  });
}
