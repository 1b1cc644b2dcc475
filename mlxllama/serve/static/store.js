// Conversations kept in the browser (localStorage): each has its messages, a system prompt and
// its sampling settings. Nothing is sent anywhere but to this server's API.

const ITEM = "mlxllama.conversations";
const CURRENT = "mlxllama.current";

function uid() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

export function load() {
  try {
    const list = JSON.parse(localStorage.getItem(ITEM) || "[]");
    return Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
  } catch {
    return [];
  }
}

export function save(conversations) {
  try {
    localStorage.setItem(ITEM, JSON.stringify(conversations));
    return true;
  } catch {
    return false; // storage full: the page keeps working, the conversation lives until reload
  }
}

export function currentId() {
  return localStorage.getItem(CURRENT);
}

export function setCurrentId(id) {
  localStorage.setItem(CURRENT, id);
}

export function create() {
  const now = Date.now();
  return { id: uid(), title: "", created: now, updated: now, system: "", temperature: "", top_p: "", max_tokens: "", messages: [] };
}

export function title(conversation) {
  if (conversation.title) return conversation.title;
  const first = conversation.messages.find((m) => m.role === "user");
  return first ? first.content.replace(/\s+/g, " ").trim().slice(0, 48) || "New chat" : "New chat";
}

export function matches(conversation, query) {
  const q = query.trim().toLowerCase();
  if (!q) return true;
  return title(conversation).toLowerCase().includes(q) || conversation.messages.some((m) => m.content.toLowerCase().includes(q));
}
