// Markdown -> sanitized HTML for model replies.
//
// Two layers keep model (and document) text from injecting markup: marked's `html` renderer escapes
// every raw HTML block/inline so `<script>` or `<img onerror=...>` shows as text, and DOMPurify then
// sanitizes the whole result. Remote images are never loaded (a reply could otherwise leak the
// conversation through an image URL a prompt-injected document asked for); they become links.

import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/highlight.min.js";

// Highlighting a huge code block on every streamed token would stall the page; past this size a
// block is highlighted only in the final render.
const STREAMING_HIGHLIGHT_LIMIT = 20000;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function safeUrl(href) {
  try {
    const u = new URL(href, document.baseURI);
    return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
  } catch {
    return null;
  }
}

function highlight(code, lang, streaming) {
  const language = lang && hljs.getLanguage(lang) ? lang : null;
  if (!language || (streaming && code.length > STREAMING_HIGHLIGHT_LIMIT)) return escapeHtml(code);
  try {
    return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } catch {
    return escapeHtml(code);
  }
}

function makeParser(streaming) {
  return new Marked({
    gfm: true,
    breaks: false,
    renderer: {
      html(token) {
        return escapeHtml(token.text);
      },
      code(token) {
        const lang = (token.lang || "").trim().split(/\s+/)[0].toLowerCase();
        const label = lang ? escapeHtml(lang) : "text";
        const cls = lang && hljs.getLanguage(lang) ? ` language-${escapeHtml(lang)}` : "";
        return (
          `<div class="code-block"><div class="code-head"><span class="code-lang">${label}</span>` +
          `<button type="button" class="code-copy" data-action="copy-code" aria-label="Copy code">Copy</button></div>` +
          `<pre><code class="hljs${cls}">${highlight(token.text, lang, streaming)}</code></pre></div>`
        );
      },
      image(token) {
        const href = safeUrl(token.href);
        const label = escapeHtml(token.text || token.href || "image");
        return href ? `<a href="${escapeHtml(href)}" class="md-image-link">[image: ${label}]</a>` : `[image: ${label}]`;
      },
    },
  });
}

const parsers = { final: makeParser(false), streaming: makeParser(true) };

const PURIFY_CONFIG = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "input", "textarea", "select", "iframe", "object", "embed", "svg", "math"],
  FORBID_ATTR: ["style", "srcset"],
  ADD_ATTR: ["target"],
};

let hooksInstalled = false;
function installHooks() {
  if (hooksInstalled) return;
  hooksInstalled = true;
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      const href = node.getAttribute("href");
      if (href && !href.startsWith("#")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    }
  });
}

/** Markdown text -> sanitized HTML string. `streaming` renders cheaper (big code blocks not highlighted). */
export function renderMarkdown(text, { streaming = false } = {}) {
  installHooks();
  const raw = (streaming ? parsers.streaming : parsers.final).parse(String(text ?? ""));
  return DOMPurify.sanitize(raw, PURIFY_CONFIG);
}

/** Replaces `el`'s content with the rendered Markdown of `text`. */
export function setMarkdown(el, text, options) {
  el.innerHTML = renderMarkdown(text, options);
}
