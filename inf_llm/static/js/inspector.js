// Memory inspector: maps the retrieval spans of a reply (token ranges of the prompt, with their decoded
// text and an aggregated score) back onto the conversation's documents and messages, and renders the
// highlighted document view. The server reports spans as text, not character offsets, so each span
// is located by searching its whitespace-normalized text; chat-template markers and the page's own
// document wrapper are not in the shown text, so spans are split around them and a fragment that
// still does not match is shortened from either edge until it does.

// Fragments shorter than this match too many places to mean anything.
const MIN_FRAGMENT = 6;
// How many passages the list shows.
const TOP_PASSAGES = 25;
// Weakest highlight that is still visible, as a fraction of the strongest.
const MIN_HEAT = 0.12;

// Template markers (`<|im_start|>`, `<s>`, `[INST]`, ...) and the wrapper compose.js adds around documents.
const SPLIT_RE = /<\|[^|]{0,40}\|>(?:system|user|assistant)?|<\/?s>|\[\/?INST\]|<<\/?SYS>>|"""|^Document: [^\n]*$|Question: /gm;

/**
 * The texts a reply's prompt was built from, in prompt order: the system prompt, then each earlier
 * message (a user message's documents first).
 */
export function buildSources(conv, replyIndex, systemPrompt) {
  const sources = [];
  if (systemPrompt) sources.push({ kind: "system", label: "System prompt", text: systemPrompt });
  conv.messages.slice(0, replyIndex).forEach((m, i) => {
    for (const a of m.attachments || []) {
      sources.push({ kind: "document", label: a.name, text: a.text, messageIndex: i });
    }
    if (m.content) {
      const who = m.role === "user" ? "You" : "Assistant";
      sources.push({ kind: "message", label: `${who} · message ${i + 1}`, text: m.content, messageIndex: i });
    }
  });
  return sources;
}

/** Whitespace-collapsed text with a map from each normalized index to its index in the original. */
function normalize(text) {
  let out = "";
  const map = [];
  let inSpace = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (/\s/.test(c)) {
      if (!inSpace && out.length) {
        out += " ";
        map.push(i);
      }
      inSpace = true;
    } else {
      out += c;
      map.push(i);
      inSpace = false;
    }
  }
  return { text: out, map };
}

function normalizeQuery(text) {
  return text.replace(/\uFFFD/g, "").replace(/\s+/g, " ").trim();
}

class Haystack {
  constructor(sources) {
    // One string over all sources, separated by a character no query contains, so no match spans two.
    this.parts = [];
    let text = "";
    sources.forEach((s, index) => {
      const n = normalize(s.text);
      this.parts.push({ index, offset: text.length, norm: n });
      text += n.text + "\u0000";
    });
    this.text = text;
  }

  find(query, from) {
    let at = this.text.indexOf(query, from);
    if (at === -1 && from > 0) at = this.text.indexOf(query);
    return at;
  }

  /** Global normalized [start, end) -> {source, start, end} in the source's original text. */
  resolve(start, end) {
    let part = this.parts[0];
    for (const p of this.parts) {
      if (p.offset <= start) part = p;
      else break;
    }
    const a = start - part.offset;
    const b = Math.min(end - part.offset, part.norm.map.length) - 1;
    if (a < 0 || b < a) return null;
    return { source: part.index, start: part.norm.map[a], end: part.norm.map[b] + 1 };
  }
}

/** Longest prefix (or suffix) of `q` of at least MIN_FRAGMENT chars found in the haystack. */
function longestEdgeMatch(hay, q, from, fromEnd) {
  let lo = MIN_FRAGMENT;
  let hi = q.length - 1;
  let best = null;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const piece = fromEnd ? q.slice(q.length - mid) : q.slice(0, mid);
    const at = hay.find(piece, from);
    if (at !== -1) {
      best = { at, length: mid };
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  return best;
}

/**
 * Locates each span in the sources. Returns `{ranges, located}`: `ranges[sourceIndex]` is a list of
 * `{start, end, score, span}` in that source's original text; `located[spanIndex]` is the first range
 * of that span or null when none of its text was found.
 */
export function locateSpans(sources, spans) {
  const hay = new Haystack(sources);
  const ranges = sources.map(() => []);
  const located = spans.map(() => null);
  const order = spans.map((s, i) => i).sort((a, b) => (spans[a].token_start ?? 0) - (spans[b].token_start ?? 0));
  let cursor = 0; // Spans come in prompt order, and so do the sources: search forward first.
  for (const si of order) {
    const span = spans[si];
    const fragments = String(span.text || "")
      .split(SPLIT_RE)
      .map(normalizeQuery)
      .filter((f) => f.length >= MIN_FRAGMENT);
    for (const frag of fragments) {
      let hit = null;
      const at = hay.find(frag, cursor);
      if (at !== -1) hit = { at, length: frag.length };
      else {
        const pre = longestEdgeMatch(hay, frag, cursor, false);
        const suf = longestEdgeMatch(hay, frag, cursor, true);
        hit = pre && suf ? (pre.length >= suf.length ? pre : suf) : pre || suf;
      }
      if (!hit) continue;
      const r = hay.resolve(hit.at, hit.at + hit.length);
      if (!r) continue;
      cursor = hit.at + hit.length;
      const range = { start: r.start, end: r.end, score: Number(span.score) || 0, span: si };
      ranges[r.source].push(range);
      if (!located[si]) located[si] = { source: r.source, start: r.start, end: r.end };
    }
  }
  return { ranges, located };
}

/**
 * Renders `source.text` into `container` with `<mark>`s whose heat (0..1) follows the strongest score
 * covering each character. `maxScore` normalizes heats across all sources of one reply.
 */
export function renderHighlighted(container, text, ranges, maxScore) {
  container.textContent = "";
  if (!ranges.length) {
    container.textContent = text;
    return;
  }
  // Cut points where coverage can change, then the max score over each piece.
  const cuts = new Set([0, text.length]);
  for (const r of ranges) {
    cuts.add(r.start);
    cuts.add(r.end);
  }
  const points = [...cuts].sort((a, b) => a - b);
  const frag = document.createDocumentFragment();
  let pendingText = "";
  for (let i = 0; i + 1 < points.length; i++) {
    const a = points[i];
    const b = points[i + 1];
    let best = null;
    for (const r of ranges) {
      if (r.start <= a && r.end >= b && (!best || r.score > best.score)) best = r;
    }
    const piece = text.slice(a, b);
    if (!best) {
      pendingText += piece;
      continue;
    }
    if (pendingText) {
      frag.append(document.createTextNode(pendingText));
      pendingText = "";
    }
    const mark = document.createElement("mark");
    mark.className = "heat";
    const heat = maxScore > 0 ? Math.max(MIN_HEAT, best.score / maxScore) : 1;
    mark.style.setProperty("--heat", heat.toFixed(3));
    mark.dataset.start = String(a);
    mark.dataset.end = String(b);
    mark.dataset.span = String(best.span);
    mark.title = `retrieved: ${formatScore(best.score, maxScore)}`;
    mark.textContent = piece;
    frag.append(mark);
  }
  if (pendingText) frag.append(document.createTextNode(pendingText));
  container.append(frag);
}

/**
 * A span's score for people. The server's score is the fraction of (layer, decode step) lookups that
 * selected the block, so it reads as a percentage; anything larger is shown as a plain number.
 */
export function formatScore(score, maxScore = score) {
  const s = Number(score) || 0;
  if (maxScore <= 1) return `${(s * 100).toFixed(s >= 0.1 || s === 0 ? 0 : 1)}% of lookups`;
  if (Math.abs(s) >= 100) return s.toFixed(0);
  if (Math.abs(s) >= 1) return s.toFixed(2);
  return s.toPrecision(2);
}

/** The spans to list, strongest first. */
export function topPassages(spans, limit = TOP_PASSAGES) {
  return spans
    .map((s, i) => ({ ...s, index: i }))
    .sort((a, b) => (Number(b.score) || 0) - (Number(a.score) || 0))
    .slice(0, limit);
}

/** Everything the inspector view needs for one reply. */
export function inspect(conv, replyIndex, retrieval, systemPrompt) {
  const spans = (retrieval && Array.isArray(retrieval.spans) ? retrieval.spans : []).filter((s) => s && s.text);
  const sources = buildSources(conv, replyIndex, systemPrompt);
  const { ranges, located } = locateSpans(sources, spans);
  const maxScore = spans.reduce((m, s) => Math.max(m, Number(s.score) || 0), 0);
  return { sources, ranges, located, spans, maxScore, top: topPassages(spans) };
}
