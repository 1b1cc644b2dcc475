// The documents view: text files chosen or dropped, questions about them sent to /v1/qa, and
// each answer shown with its evidence highlighted in the document at the offsets the API gives
// (characters, i.e. code points, of the text as sent), with the ranked chunks it was read from.

import { askDocuments } from "./api.js";

const $ = (id) => document.getElementById(id);
const ITEM = "mlxllama.documents";
const SUFFIXES = [".txt", ".md", ".markdown"];
const state = { docs: [], results: [], busy: false, shown: null };

function save() {
  try {
    localStorage.setItem(ITEM, JSON.stringify({ docs: state.docs, results: state.results.slice(0, 20) }));
  } catch {
    // too large for the browser's storage: kept until the page is reloaded
  }
}

function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(ITEM) || "{}");
    state.docs = Array.isArray(saved.docs) ? saved.docs : [];
    state.results = Array.isArray(saved.results) ? saved.results : [];
  } catch {
    state.docs = [];
    state.results = [];
  }
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(text, cls, label, onClick) {
  const b = el("button", cls, text);
  b.type = "button";
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function note(text, isError = false) {
  const status = $("docs-status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// -- documents -------------------------------------------------------------------------------

async function addFiles(files) {
  const refused = [];
  for (const file of files) {
    if (!SUFFIXES.some((s) => file.name.toLowerCase().endsWith(s))) {
      refused.push(file.name);
      continue;
    }
    const text = (await file.text()).replace(/\r\n/g, "\n");
    state.docs = state.docs.filter((d) => d.name !== file.name);
    state.docs.push({ name: file.name, text });
    state.shown = { name: file.name };
  }
  save();
  renderDocs();
  showDocument();
  note(refused.length ? `Not read (only .txt and .md files): ${refused.join(", ")}` : "", refused.length > 0);
}

function renderDocs() {
  const list = $("doc-list");
  list.replaceChildren();
  for (const d of state.docs) {
    const li = el("li", "doc");
    li.append(button(d.name, "doc-open", `Show ${d.name}`, () => { state.shown = { name: d.name }; showDocument(); }),
      el("span", "doc-size", `${codePoints(d.text).toLocaleString()} characters`),
      button("✕", "icon", `Remove ${d.name}`, () => {
        state.docs = state.docs.filter((x) => x !== d);
        if (state.shown && state.shown.name === d.name) state.shown = null;
        save();
        renderDocs();
        showDocument();
      }));
    list.append(li);
  }
  $("ask").disabled = state.busy || !state.docs.length;
  $("docs-empty").hidden = state.docs.length > 0;
}

// -- the document view -----------------------------------------------------------------------

function codePoints(text) {
  let n = 0;
  for (const _ of text) n += 1; // eslint-disable-line no-unused-vars
  return n;
}

// UTF-16 index of each code-point offset in `offsets` (the API counts code points).
function utf16(text, offsets) {
  if (!/[\uD800-\uDFFF]/.test(text)) return offsets;
  const sorted = [...new Set(offsets)].sort((a, b) => a - b);
  const at = new Map();
  let cp = 0;
  let i = 0;
  let k = 0;
  while (k < sorted.length) {
    while (cp < sorted[k] && i < text.length) {
      i += text.codePointAt(i) > 0xffff ? 2 : 1;
      cp += 1;
    }
    at.set(sorted[k], i);
    k += 1;
  }
  return offsets.map((o) => at.get(o));
}

// Shows state.shown = {name, evidence?: {start, end}, chunk?: {start, end}}.
function showDocument() {
  const view = $("doc-view");
  const shown = state.shown || (state.docs[0] && { name: state.docs[0].name });
  const doc = shown && state.docs.find((d) => d.name === shown.name);
  $("doc-title").textContent = doc ? doc.name : shown ? `${shown.name} (removed)` : "No document";
  if (!doc) {
    view.replaceChildren();
    return;
  }
  const ranges = [];
  if (shown.chunk) ranges.push({ ...shown.chunk, cls: "chunk" });
  if (shown.evidence) ranges.push({ ...shown.evidence, cls: "evidence" });
  const cuts = [0, doc.text.length];
  const u16 = ranges.map((r) => {
    const [start, end] = utf16(doc.text, [r.start, r.end]);
    cuts.push(start, end);
    return { start, end, cls: r.cls, cp: r };
  });
  const points = [...new Set(cuts)].filter((x) => x >= 0 && x <= doc.text.length).sort((a, b) => a - b);
  const frag = document.createDocumentFragment();
  let focus = null;
  for (let k = 0; k + 1 < points.length; k += 1) {
    const [a, b] = [points[k], points[k + 1]];
    const text = doc.text.slice(a, b);
    const inside = u16.filter((r) => r.start <= a && b <= r.end);
    const evidence = inside.find((r) => r.cls === "evidence");
    const chunk = inside.find((r) => r.cls === "chunk");
    if (evidence) {
      const mark = el("mark", "evidence", text);
      mark.dataset.start = evidence.cp.start;
      mark.dataset.end = evidence.cp.end;
      frag.append(mark);
      focus = focus || mark;
    } else if (chunk) {
      const span = el("span", "chunk-range", text);
      frag.append(span);
      focus = focus || span;
    } else frag.append(document.createTextNode(text));
  }
  view.replaceChildren(frag);
  if (focus) focus.scrollIntoView({ block: "center", behavior: "smooth" });
  else view.scrollTop = 0;
}

// -- questions -------------------------------------------------------------------------------

function optionNumber(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function ask() {
  const question = $("question").value.trim();
  if (!question || !state.docs.length || state.busy) return;
  const body = { documents: state.docs.map((d) => ({ name: d.name, text: d.text })), question, extractive: $("extractive").checked };
  const threshold = $("threshold").value.trim();
  if (threshold) body.no_answer_threshold = ["auto", "off"].includes(threshold) ? threshold : Number(threshold);
  for (const [field, id] of [["max_tokens", "qa-max-tokens"], ["top_chunks", "top-chunks"]]) {
    const v = optionNumber(id);
    if (v !== undefined) body[field] = v;
  }
  state.busy = true;
  renderDocs();
  note("Answering…");
  try {
    const result = await askDocuments(body);
    state.results.unshift(result);
    save();
    note("");
    renderResults();
    focusResult(result);
  } catch (e) {
    note(`Error: ${e.message || e}`, true);
  } finally {
    state.busy = false;
    renderDocs();
  }
}

function focusResult(result) {
  if (result.evidence) state.shown = { name: result.evidence.source, evidence: result.evidence };
  else if (result.chunks && result.chunks[0]) state.shown = { name: result.chunks[0].source };
  showDocument();
}

function snippet(chunk) {
  const doc = state.docs.find((d) => d.name === chunk.source);
  if (!doc) return "";
  const chars = Array.from(doc.text).slice(chunk.start, Math.min(chunk.end, chunk.start + 160)).join("");
  return chars.replace(/\s+/g, " ").trim() + (chunk.end - chunk.start > 160 ? "…" : "");
}

function resultNode(r) {
  const card = el("article", "qa-result");
  card.append(el("h3", "qa-question", r.question));
  if (r.no_answer) {
    card.append(el("p", "no-answer", "Not in the documents"));
  } else {
    card.append(el("p", "qa-answer", r.answer));
  }
  const meta = el("p", "qa-meta");
  if (r.evidence) {
    meta.append(button(`Evidence: ${r.evidence.source}, characters ${r.evidence.start}–${r.evidence.end}`, "link evidence-link",
      "Show the evidence in the document", () => focusResult(r)), " · ");
  } else if (!r.no_answer) meta.append("No evidence passage found · ");
  const usage = r.usage || {};
  meta.append(`score ${Number(r.score || 0).toFixed(2)}${r.extractive ? " · extractive" : ""}` +
    ` · ${usage.prompt_tokens ?? 0} prompt tokens, ${usage.completion_tokens ?? 0} generated · ${Number(r.seconds || 0).toFixed(2)} s`);
  card.append(meta);
  if (r.chunks && r.chunks.length) {
    const details = el("details", "chunks");
    details.append(el("summary", "", `${r.chunks.length} passage${r.chunks.length > 1 ? "s" : ""} read, best first`));
    const ol = el("ol");
    for (const c of r.chunks) {
      const li = el("li");
      const label = `${c.source} · characters ${c.start}–${c.end}${c.score ? ` · BM25 ${Number(c.score).toFixed(2)}` : ""}`;
      li.append(button(label, "link chunk-link", `Show passage ${label}`, () => {
        const inChunk = r.evidence && r.evidence.source === c.source && c.start <= r.evidence.start && r.evidence.end <= c.end;
        state.shown = { name: c.source, chunk: c, evidence: inChunk ? r.evidence : undefined };
        showDocument();
      }), el("p", "chunk-text", snippet(c)));
      ol.append(li);
    }
    details.append(ol);
    card.append(details);
  }
  return card;
}

function renderResults() {
  $("qa-results").replaceChildren(...state.results.map(resultNode));
}

export function init() {
  restore();
  const input = $("file-input");
  input.addEventListener("change", () => {
    addFiles(Array.from(input.files));
    input.value = "";
  });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    addFiles(Array.from(e.dataTransfer.files));
  });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  $("qa-form").addEventListener("submit", (e) => {
    e.preventDefault();
    ask();
  });
  renderDocs();
  renderResults();
  showDocument();
}
