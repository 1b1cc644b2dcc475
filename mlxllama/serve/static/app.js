// The page: tabs, the API key dialog, the model's name; chat.js and docs.js do the rest.

import * as api from "./api.js";
import * as chat from "./chat.js";
import * as docs from "./docs.js";

const $ = (id) => document.getElementById(id);
let keyWaiters = null;

// Shows the key dialog; resolves once a key the server accepts is saved.
function askKey() {
  if (keyWaiters) return keyWaiters.promise;
  let resolve;
  const promise = new Promise((r) => { resolve = r; });
  keyWaiters = { promise, resolve };
  const dialog = $("key-dialog");
  $("key-error").textContent = "";
  $("api-key").value = "";
  if (!dialog.open) dialog.showModal();
  $("api-key").focus();
  return promise;
}

async function submitKey(e) {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  $("key-error").textContent = "Checking…";
  try {
    const models = await api.models(key);
    api.saveKey(key);
    $("key-dialog").close();
    showModel(models);
    const waiters = keyWaiters;
    keyWaiters = null;
    if (waiters) waiters.resolve(key);
  } catch (err) {
    $("key-error").textContent = err.status === 401 ? "The server refused this key." : `Error: ${err.message}`;
  }
}

function showModel(models) {
  const id = models[0] ? models[0].id : "";
  $("model-name").textContent = id;
  chat.setModel(id || null);
}

function showTab(name, focusTab = false) {
  for (const tab of ["chat", "docs"]) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`${tab}-view`).hidden = !selected;
  }
  if (focusTab) $(`tab-${name}`).focus();
  else (name === "chat" ? $("prompt") : $("question")).focus();
}

function initTabs() {
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  $("tab-docs").addEventListener("click", () => showTab("docs"));
  $("tabs").addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    showTab($("chat-view").hidden ? "chat" : "docs", true);
  });
  document.addEventListener("conversation-selected", () => {
    if ($("chat-view").hidden) showTab("chat");
  });
}

async function start() {
  api.onKeyNeeded(askKey);
  $("key-form").addEventListener("submit", submitKey);
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault()); // the page is of no use without it
  $("forget-key").addEventListener("click", () => {
    api.saveKey("");
    askKey();
  });
  initTabs();
  chat.init();
  docs.init();
  try {
    showModel(await api.models());
  } catch (err) {
    $("model-name").textContent = "server unreachable";
    $("status").textContent = `Could not reach the server: ${err.message}`;
  }
}

start();
