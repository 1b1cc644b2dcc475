// The chat view: the conversation list, the messages, streaming answers, stop, regenerate,
// edit-and-resend, per-conversation settings.

import { streamChat } from "./api.js";
import { copyCode, renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const state = { conversations: [], current: null, controller: null, modelId: null, editing: false };
let pendingRender = null;
let lastSaved = 0;

function conv() {
  return state.conversations.find((c) => c.id === state.current);
}

function persist(force = false) {
  const now = Date.now();
  if (!force && now - lastSaved < 400) return; // while streaming: at most a few writes a second
  lastSaved = now;
  store.save(state.conversations);
}

function button(text, cls, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

// -- the conversation list -------------------------------------------------------------------

function renderList() {
  const list = $("conversations");
  const query = $("search").value;
  list.replaceChildren();
  const shown = state.conversations.filter((c) => store.matches(c, query)).sort((a, b) => b.updated - a.updated);
  for (const c of shown) {
    const li = document.createElement("li");
    li.className = "conversation";
    const name = store.title(c);
    const open = button(name, "conv-open", null, () => select(c.id));
    if (c.id === state.current) open.setAttribute("aria-current", "true");
    li.append(open,
      button("✎", "icon", `Rename ${name}`, () => rename(li, c)),
      button("✕", "icon", `Delete ${name}`, () => remove(c)));
    list.append(li);
  }
  if (!shown.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = query ? "No conversation matches." : "No conversations yet.";
    list.append(li);
  }
}

function rename(li, c) {
  const input = document.createElement("input");
  input.className = "rename";
  input.value = store.title(c);
  input.setAttribute("aria-label", "New name");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep) c.title = input.value.trim();
    persist(true);
    renderList();
    renderHead();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function remove(c) {
  if (!confirm(`Delete "${store.title(c)}"?`)) return;
  if (state.controller && c.id === state.current) state.controller.abort();
  state.conversations = state.conversations.filter((x) => x.id !== c.id);
  if (state.current === c.id) state.current = null;
  persist(true);
  if (!state.current) newConversation();
  else renderList();
}

export function newConversation() {
  const existing = state.conversations.find((c) => c.messages.length === 0);
  const c = existing || store.create();
  if (!existing) state.conversations.push(c);
  select(c.id);
  $("prompt").focus();
}

export function select(id) {
  if (state.controller && id !== state.current) state.controller.abort();
  state.current = id;
  store.setCurrentId(id);
  persist(true);
  renderList();
  renderConversation();
  document.dispatchEvent(new CustomEvent("conversation-selected"));
}

// -- the conversation ------------------------------------------------------------------------

function renderHead() {
  const c = conv();
  $("chat-title").textContent = c ? store.title(c) : "New chat";
  $("system-prompt").value = c.system || "";
  $("temperature").value = c.temperature ?? "";
  $("top-p").value = c.top_p ?? "";
  $("max-tokens").value = c.max_tokens ?? "";
}

function statsText(m) {
  const s = m.stats || {};
  const parts = [];
  if (s.prompt_tokens !== undefined) parts.push(`${s.prompt_tokens} prompt tokens`);
  if (s.completion_tokens !== undefined) parts.push(`${s.completion_tokens} generated`);
  if (s.tokens_per_second) parts.push(`${s.tokens_per_second.toFixed(1)} tokens/s`);
  if (s.seconds !== undefined) parts.push(`${s.seconds.toFixed(2)} s`);
  if (m.finish === "length") parts.push("cut at max tokens");
  if (m.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function messageNode(m, index, last) {
  const c = conv();
  const node = document.createElement("article");
  node.className = `msg ${m.role}`;
  node.dataset.index = index;
  node.setAttribute("aria-label", m.role === "user" ? "You" : "Assistant");
  const body = document.createElement("div");
  body.className = "content";
  if (m.role === "assistant") renderMarkdown(m.content, body);
  else body.textContent = m.content;
  node.append(body);
  if (m.error) {
    const err = document.createElement("p");
    err.className = "error";
    err.textContent = m.error;
    node.append(err);
  }
  const foot = document.createElement("div");
  foot.className = "msg-foot";
  const streaming = state.controller && last;
  if (m.role === "assistant") {
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = streaming ? "" : statsText(m);
    foot.append(stats);
    if (last && !state.controller) foot.append(button("Regenerate", "small", "Regenerate the answer", regenerate));
  }
  const lastUser = c.messages.map((x) => x.role).lastIndexOf("user");
  if (m.role === "user" && index === lastUser && !state.controller) {
    foot.append(button("Edit", "small", "Edit and resend this message", () => edit(node, m, index)));
  }
  if (foot.childNodes.length) node.append(foot);
  return node;
}

function renderConversation() {
  const c = conv();
  renderHead();
  const box = $("messages");
  box.replaceChildren();
  if (!c.messages.length) {
    const hello = document.createElement("p");
    hello.className = "hello";
    hello.textContent = state.modelId ? `Chat with ${state.modelId}.` : "Start a conversation.";
    box.append(hello);
  }
  c.messages.forEach((m, i) => box.append(messageNode(m, i, i === c.messages.length - 1)));
  box.scrollTop = box.scrollHeight;
  setBusy(!!state.controller);
}

function renderLast() {
  pendingRender = null;
  const c = conv();
  const box = $("messages");
  const node = box.lastElementChild;
  if (!c || !node || !node.classList.contains("assistant")) return;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  renderMarkdown(c.messages[c.messages.length - 1].content, node.querySelector(".content"));
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("messages").setAttribute("aria-busy", busy ? "true" : "false");
}

function edit(node, m, index) {
  const area = document.createElement("textarea");
  area.className = "edit";
  area.value = m.content;
  area.setAttribute("aria-label", "Edit message");
  const save = () => {
    const text = area.value.trim();
    if (!text) return;
    const c = conv();
    c.messages = c.messages.slice(0, index);
    c.messages.push({ role: "user", content: text });
    generate();
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      save();
    } else if (e.key === "Escape") renderConversation();
  });
  const actions = document.createElement("div");
  actions.className = "msg-foot";
  actions.append(button("Send", "small primary", "Send the edited message", save),
    button("Cancel", "small", "Cancel editing", renderConversation));
  node.replaceChildren(area, actions);
  area.focus();
}

function regenerate() {
  const c = conv();
  while (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
  if (c.messages.length) generate();
}

function number(value) {
  return value === "" || value === null || value === undefined || Number.isNaN(Number(value)) ? undefined : Number(value);
}

function requestBody(c) {
  const messages = [];
  if (c.system && c.system.trim()) messages.push({ role: "system", content: c.system });
  for (const m of c.messages) {
    if (m.role === "assistant" && !m.content) continue;
    messages.push({ role: m.role, content: m.content });
  }
  const body = { messages };
  if (state.modelId) body.model = state.modelId;
  const settings = { temperature: number(c.temperature), top_p: number(c.top_p), max_tokens: number(c.max_tokens) };
  for (const [k, v] of Object.entries(settings)) if (v !== undefined) body[k] = v;
  return body;
}

async function generate() {
  const c = conv();
  const body = requestBody(c);
  const m = { role: "assistant", content: "" };
  c.messages.push(m);
  c.updated = Date.now();
  const controller = new AbortController();
  state.controller = controller;
  persist(true);
  renderList();
  renderConversation();
  const t0 = performance.now();
  let first = null;
  try {
    const { usage, finishReason } = await streamChat(body, controller.signal, (text) => {
      if (first === null) first = performance.now();
      m.content += text;
      persist();
      if (!pendingRender) pendingRender = requestAnimationFrame(renderLast);
    });
    const end = performance.now();
    m.finish = finishReason;
    m.stats = { seconds: (end - t0) / 1000 };
    if (usage) {
      m.stats.prompt_tokens = usage.prompt_tokens;
      m.stats.completion_tokens = usage.completion_tokens;
      if (first !== null && usage.completion_tokens > 1 && end > first) {
        m.stats.tokens_per_second = (usage.completion_tokens - 1) / ((end - first) / 1000);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") m.stopped = true;
    else m.error = e.message || String(e);
  } finally {
    if (pendingRender) cancelAnimationFrame(pendingRender);
    pendingRender = null;
    if (state.controller === controller) state.controller = null;
    persist(true);
    if (state.current === c.id) renderConversation();
    $("status").textContent = m.error ? `Error: ${m.error}` : m.stopped ? "Stopped." : "Answer complete.";
  }
}

export function stop() {
  if (state.controller) state.controller.abort();
}

function submit() {
  const area = $("prompt");
  const text = area.value.trim();
  if (!text || state.controller) return;
  area.value = "";
  const c = conv();
  c.messages.push({ role: "user", content: text });
  generate();
}

function bindSetting(id, field) {
  $(id).addEventListener("input", (e) => {
    const c = conv();
    c[field] = e.target.value;
    persist(true);
  });
}

export function setModel(id) {
  state.modelId = id;
  if (conv() && !conv().messages.length) renderConversation();
}

export function init() {
  state.conversations = store.load();
  const saved = store.currentId();
  if (saved && state.conversations.some((c) => c.id === saved)) select(saved);
  else newConversation();
  $("new-chat").addEventListener("click", newConversation);
  $("search").addEventListener("input", renderList);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    } else if (e.key === "Escape" && state.controller) stop();
  });
  $("stop").addEventListener("click", stop);
  $("messages").addEventListener("click", (e) => {
    const copy = e.target.closest(".copy-code");
    if (copy) copyCode(copy);
  });
  bindSetting("system-prompt", "system");
  bindSetting("temperature", "temperature");
  bindSetting("top-p", "top_p");
  bindSetting("max-tokens", "max_tokens");
  window.addEventListener("storage", (e) => {
    if (e.key === "mlxllama.conversations" && !state.controller) {
      state.conversations = store.load();
      if (!conv()) newConversation();
      else {
        renderList();
        renderConversation();
      }
    }
  });
  window.addEventListener("beforeunload", () => persist(true));
}
