// Conversations kept in the browser. IndexedDB (a long document is megabytes, past localStorage's
// quota), with localStorage as the fallback where IndexedDB is unavailable. Also owns the JSON
// export/import format. Knows nothing of the DOM or the server.
//
// Conversation: {id, title, created, updated, messages: [Message], context?: ContextRef}
// ContextRef: {id, name, tokens, system} of the server's library document the conversation is bound to
// Message: {id, role: "user"|"assistant", content, attachments?: [{name, text, tokens}],
//           done?: <the server's done payload>, error?: string, cancelled?: bool, created}

const DB_NAME = "inf_llm";
const DB_VERSION = 1;
const STORE = "conversations";
const LS_KEY = "inf_llm.conversations";
export const EXPORT_FORMAT = "inf_llm.conversations";
const EXPORT_VERSION = 1;

export function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function openDb() {
  return new Promise((resolve, reject) => {
    if (!("indexedDB" in window)) {
      reject(new Error("IndexedDB unavailable"));
      return;
    }
    const req = indexedDB.open(DB_NAME, DB_VERSION);
    req.onupgradeneeded = () => {
      const db = req.result;
      if (!db.objectStoreNames.contains(STORE)) db.createObjectStore(STORE, { keyPath: "id" });
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
    req.onblocked = () => reject(new Error("IndexedDB blocked"));
  });
}

function promisify(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

class IdbBackend {
  constructor(db) {
    this.db = db;
  }
  tx(mode) {
    return this.db.transaction(STORE, mode).objectStore(STORE);
  }
  all() {
    return promisify(this.tx("readonly").getAll());
  }
  get(id) {
    return promisify(this.tx("readonly").get(id));
  }
  put(conv) {
    return promisify(this.tx("readwrite").put(conv));
  }
  delete(id) {
    return promisify(this.tx("readwrite").delete(id));
  }
}

class LocalStorageBackend {
  read() {
    try {
      return JSON.parse(localStorage.getItem(LS_KEY) || "{}");
    } catch {
      return {};
    }
  }
  write(map) {
    localStorage.setItem(LS_KEY, JSON.stringify(map));
  }
  async all() {
    return Object.values(this.read());
  }
  async get(id) {
    return this.read()[id];
  }
  async put(conv) {
    const map = this.read();
    map[conv.id] = conv;
    this.write(map);
  }
  async delete(id) {
    const map = this.read();
    delete map[id];
    this.write(map);
  }
}

export class ConversationStore {
  static async open() {
    try {
      return new ConversationStore(new IdbBackend(await openDb()));
    } catch {
      return new ConversationStore(new LocalStorageBackend());
    }
  }

  constructor(backend) {
    this.backend = backend;
  }

  /** All conversations, most recently updated first. */
  async list() {
    const all = await this.backend.all();
    return all.sort((a, b) => (b.updated || 0) - (a.updated || 0));
  }

  get(id) {
    return this.backend.get(id);
  }

  /** Saves a copy (structured clone strips anything that is not plain data). */
  async save(conv) {
    await this.backend.put(JSON.parse(JSON.stringify(conv)));
  }

  delete(id) {
    return this.backend.delete(id);
  }

  /**
   * Imports conversations from parsed export JSON, by conversation id: one not here is added, one here is
   * replaced only by a copy updated later (the same export imported twice changes nothing). Returns
   * `{added, updated, kept}` (lists of conversations; `kept`: the ones already here, left as they are).
   */
  async import(data) {
    const convs = parseExport(data);
    const existing = new Map((await this.backend.all()).map((c) => [c.id, c]));
    const result = { added: [], updated: [], kept: [] };
    for (const conv of convs) {
      const here = existing.get(conv.id);
      if (here && (here.updated || 0) >= conv.updated) {
        result.kept.push(here);
        continue;
      }
      (here ? result.updated : result.added).push(conv);
      existing.set(conv.id, conv);
      await this.save(conv);
    }
    return result;
  }
}

/** A new conversation; `context` (a server context's info) binds it to that library document. */
export function newConversation(context = null) {
  const now = Date.now();
  const conv = { id: newId(), title: "New chat", created: now, updated: now, messages: [] };
  if (context) {
    conv.context = contextRef(context);
    conv.title = conv.context.name;
  }
  return conv;
}

function contextRef(c) {
  return {
    id: c.id,
    name: str(c.name, c.id),
    tokens: Number.isFinite(c.tokens) ? c.tokens : null,
    system: typeof c.system === "string" ? c.system : null,
  };
}

/** The export file's content for `conversations`. */
export function makeExport(conversations) {
  return {
    format: EXPORT_FORMAT,
    version: EXPORT_VERSION,
    exported: new Date().toISOString(),
    conversations,
  };
}

function str(v, fallback = "") {
  return typeof v === "string" ? v : fallback;
}

function cleanMessage(m) {
  if (!m || typeof m !== "object") throw new Error("a message is not an object");
  const role = m.role === "bot" ? "assistant" : m.role;
  if (role !== "user" && role !== "assistant") throw new Error(`unknown message role "${m.role}"`);
  const out = { id: str(m.id) || newId(), role, content: str(m.content), created: Number(m.created) || Date.now() };
  if (Array.isArray(m.attachments)) {
    out.attachments = m.attachments
      .filter((a) => a && typeof a.text === "string")
      .map((a) => ({ name: str(a.name, "document.txt"), text: a.text, tokens: Number.isFinite(a.tokens) ? a.tokens : null }));
  }
  if (m.done && typeof m.done === "object") out.done = m.done;
  if (typeof m.error === "string") out.error = m.error;
  if (m.cancelled) out.cancelled = true;
  return out;
}

/**
 * Validates export JSON (our format, a bare list of conversations, or one conversation) and returns
 * clean conversation objects. Throws an Error with a readable message on anything else.
 */
export function parseExport(data) {
  let list;
  if (data && data.format === EXPORT_FORMAT && Array.isArray(data.conversations)) list = data.conversations;
  else if (Array.isArray(data)) list = data;
  else if (data && Array.isArray(data.messages)) list = [data];
  else throw new Error("not an inf_llm conversation export");
  return list.map((c, i) => {
    if (!c || !Array.isArray(c.messages)) throw new Error(`conversation ${i + 1} has no messages`);
    const now = Date.now();
    const conv = {
      id: str(c.id) || newId(),
      title: str(c.title, "Imported chat").slice(0, 200) || "Imported chat",
      created: Number(c.created) || now,
      updated: Number(c.updated) || now,
      messages: c.messages.map(cleanMessage),
    };
    if (c.context && typeof c.context.id === "string" && c.context.id) conv.context = contextRef(c.context);
    return conv;
  });
}
