// What the page sends: the user message content (with attached documents) and the /chat body.
// Knows nothing of the DOM. The composition must be deterministic: the server reuses its memory state
// when a new prompt starts with the previous one, so earlier turns must be re-sent byte for byte.

export const DOC_OPEN = '"""';
export const DOC_CLOSE = '"""';

/** The text the model sees for a user message: its documents, then the question. */
export function composeUserContent(msg) {
  const docs = msg.attachments || [];
  if (!docs.length) return msg.content;
  const parts = docs.map((a) => `Document: ${a.name}\n${DOC_OPEN}\n${a.text}\n${DOC_CLOSE}`);
  const question = (msg.content || "").trim();
  if (question) parts.push(`Question: ${question}`);
  return parts.join("\n\n");
}

/**
 * Messages as the model sees them, `[{role, content}]`. A reply that produced no text is left out, and
 * so is the question of a reply that failed with nothing (e.g. a refused request): from the model's side
 * that exchange never happened.
 */
export function toWireMessages(messages) {
  const out = [];
  messages.forEach((m, i) => {
    if (m.role === "user") {
      const next = messages[i + 1];
      if (next && next.role === "assistant" && next.error && !next.content) return;
      out.push({ role: "user", content: composeUserContent(m) });
    } else if (m.content) {
      out.push({ role: "assistant", content: m.content });
    }
  });
  return out;
}

/**
 * The POST /chat body for the assistant message at `replyIndex` of `conv`: the last user message before it
 * is the prompt, everything earlier the history. `settings` holds only the user's overrides; the server
 * fills in its defaults for anything left out. `numericKeys`: the sampling fields the page sets (from /status).
 */
export function buildChatRequest(conv, replyIndex, settings, numericKeys) {
  const before = conv.messages.slice(0, replyIndex);
  let promptIndex = before.length - 1;
  while (promptIndex >= 0 && before[promptIndex].role !== "user") promptIndex -= 1;
  if (promptIndex < 0) throw new Error("there is no user message to answer");
  const body = {
    prompt: composeUserContent(before[promptIndex]),
    history: toWireMessages(before.slice(0, promptIndex)),
    session_id: conv.id,
  };
  // A conversation on a library document: the server puts the document (its kept memory) before the first
  // user message, so the page sends only the conversation itself, on every request (regenerate, edit too).
  // The system prompt is the one the document was read with: another one would make the server read it again.
  if (conv.context && conv.context.id) body.context_id = conv.context.id;
  else if (typeof settings.system === "string") body.system = settings.system;
  for (const key of numericKeys) {
    const v = settings[key];
    if (typeof v === "number" && Number.isFinite(v)) body[key] = v;
  }
  if (Array.isArray(settings.stop)) body.stop = settings.stop.filter((s) => s.length > 0);
  return body;
}

/** A short title for a conversation from its first user message. */
export function deriveTitle(msg) {
  const text = (msg.content || "").replace(/\s+/g, " ").trim();
  if (text) return text.length > 60 ? `${text.slice(0, 57)}…` : text;
  const doc = msg.attachments && msg.attachments[0];
  return doc ? doc.name : "New chat";
}
