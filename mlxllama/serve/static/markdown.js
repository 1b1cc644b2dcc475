// A small Markdown renderer that builds DOM nodes (never HTML strings), so a model's text can
// never become markup. Blocks: fenced code (with a copy button), headings, lists, block quotes,
// tables, rules, paragraphs (a newline is a line break). Inline: code, strong, emphasis,
// strike-through, links (http, https, mailto only), backslash escapes.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(\s+|$)/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function codeBlock(lang, code) {
  const box = el("div", "code-block");
  const head = el("div", "code-head");
  head.append(el("span", "code-lang", lang || "text"));
  const copy = el("button", "copy-code", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", "Copy code");
  head.append(copy);
  const pre = el("pre");
  const codeEl = el("code", lang ? `language-${lang}` : "", code);
  pre.append(codeEl);
  box.append(head, pre);
  return box;
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  const cells = [""];
  for (let i = 0; i < s.length; i += 1) {
    if (s[i] === "\\" && s[i + 1] === "|") {
      cells[cells.length - 1] += "|";
      i += 1;
    } else if (s[i] === "|") cells.push("");
    else cells[cells.length - 1] += s[i];
  }
  return cells.map((c) => c.trim());
}

function table(lines) {
  const t = el("table");
  const head = el("thead");
  const tr = el("tr");
  for (const cell of splitRow(lines[0])) {
    const th = el("th");
    inline(cell, th);
    tr.append(th);
  }
  head.append(tr);
  t.append(head);
  const body = el("tbody");
  for (const line of lines.slice(2)) {
    const row = el("tr");
    for (const cell of splitRow(line)) {
      const td = el("td");
      inline(cell, td);
      row.append(td);
    }
    body.append(row);
  }
  t.append(body);
  const wrap = el("div", "table-wrap");
  wrap.append(t);
  return wrap;
}

function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let item = null;
  let indent = 0;
  let loose = false;
  const items = [];
  while (i < lines.length) {
    const line = lines[i];
    const m = ITEM.exec(line);
    if (m && /\d/.test(m[2]) === ordered && m[1].length < (item ? indent : 4)) {
      item = [line.slice(m[0].length)];
      indent = m[0].length;
      items.push(item);
    } else if (line.trim() === "") {
      const next = lines[i + 1];
      if (next === undefined || (!/^\s/.test(next) && !ITEM.test(next))) break;
      if (ITEM.test(next) && !/^\s/.test(next)) loose = true;
      item.push("");
    } else if (/^\s/.test(line) || !startsBlock(line)) {
      item.push(line.replace(new RegExp(`^ {0,${indent}}`), ""));
    } else {
      break;
    }
    i += 1;
  }
  for (const lines_ of items) {
    const li = el("li");
    const text = lines_.join("\n").replace(/\n+$/, "");
    if (!loose && !text.includes("\n\n") && !text.split("\n").some(startsBlock)) inline(text, li);
    else blocks(text.split("\n"), li);
    node.append(li);
  }
  parent.append(node);
  return i;
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim() === "") {
      i += 1;
      continue;
    }
    let m = FENCE.exec(line);
    if (m) {
      const fence = m[1];
      const body = [];
      i += 1;
      while (i < lines.length && !(lines[i].trim().startsWith(fence) && lines[i].trim().replace(/[`~]/g, "") === "")) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (an unclosed one runs to the end, as while streaming)
      parent.append(codeBlock(m[2], body.join("\n")));
      continue;
    }
    if ((m = HEADING.exec(line))) {
      const h = el(`h${m[1].length}`);
      inline(m[2], h);
      parent.append(h);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && lines[i].trim() !== "" && (QUOTE.test(lines[i]) || !startsBlock(lines[i]))) {
        body.push(lines[i].replace(QUOTE, ""));
        i += 1;
      }
      const q = el("blockquote");
      blocks(body, q);
      parent.append(q);
      continue;
    }
    if (ITEM.test(line)) {
      i = list(lines, i, parent);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") rows.push(lines[i++]);
      parent.append(table(rows));
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() !== "" && (para.length === 0 || !startsBlock(lines[i]))) {
      para.push(lines[i]);
      i += 1;
    }
    const p = el("p");
    inline(para.join("\n"), p);
    parent.append(p);
  }
}

function safeUrl(url) {
  return /^(https?:\/\/|mailto:)/i.test(url) ? url : null;
}

function link(href, parent) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  parent.append(a);
  return a;
}

const INLINE = [
  // [pattern, handler(match, parent)] tried in order at a special character
  [/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/y, (m, p) => p.append(el("code", "", m[2].replace(/^ ([\s\S]*) $/, "$1")))],
  [/(\*\*|__)(?=\S)([\s\S]*?\S)\1/y, (m, p) => inline(m[2], p.appendChild(el("strong")))],
  [/~~(?=\S)([\s\S]*?\S)~~/y, (m, p) => inline(m[1], p.appendChild(el("del")))],
  [/\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/y, (m, p) => inline(m[1], p.appendChild(el("em")))],
  [/_(?=[^\s_])([\s\S]*?[^\s_])_(?![\p{L}\p{N}_])/uy, (m, p) => inline(m[1], p.appendChild(el("em")))],
  [/!?\[([^\]\n]*)\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)/y, (m, p) => {
    const href = safeUrl(m[2]);
    if (!href) return false;
    inline(m[1] || m[2], link(href, p));
  }],
  [/<((?:https?:\/\/|mailto:)[^\s<>]+)>/y, (m, p) => { link(m[1], p).textContent = m[1]; }],
  [/https?:\/\/[^\s<>"')\]]*[^\s<>"')\].,;:!?]/y, (m, p) => { link(m[0], p).textContent = m[0]; }],
];

export function inline(text, parent) {
  let buf = "";
  const flush = () => {
    if (buf) parent.append(document.createTextNode(buf));
    buf = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && /[\\`*_{}[\]()#+\-.!~|<>]/.test(text[i + 1] || "")) {
      buf += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      flush();
      parent.append(el("br"));
      i += 1;
      continue;
    }
    if ("`*_~![<h".includes(c)) {
      const prev = text[i - 1] || " ";
      let done = false;
      for (const [re, handle] of INLINE) {
        if ((c === "_" || c === "h") && /[\p{L}\p{N}]/u.test(prev)) continue; // intra-word
        re.lastIndex = i;
        const m = re.exec(text);
        if (!m) continue;
        flush();
        if (handle(m, parent) === false) continue;
        i += m[0].length;
        done = true;
        break;
      }
      if (done) continue;
    }
    buf += c;
    i += 1;
  }
  flush();
}

// Renders `text` as Markdown into `container`, replacing what it held.
export function renderMarkdown(text, container) {
  const frag = document.createDocumentFragment();
  blocks(text.replace(/\r\n?/g, "\n").split("\n"), frag);
  container.replaceChildren(frag);
}

// Copies the text of the code block whose copy button was clicked.
export async function copyCode(button) {
  const code = button.closest(".code-block").querySelector("code").textContent;
  let ok = false;
  try {
    await navigator.clipboard.writeText(code);
    ok = true;
  } catch {
    // no clipboard API (a page served over plain HTTP to another machine): select and copy
    const area = el("textarea");
    area.value = code;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}
