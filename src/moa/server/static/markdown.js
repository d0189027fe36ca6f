// Markdown to DOM for untrusted model output. Safe by construction: every piece of text becomes
// a text node (never HTML), so a model that writes <script> or <img onerror=...> shows those
// characters and nothing runs. Links keep only http(s), mailto and same-site addresses, open in
// a new tab and carry rel="noopener noreferrer"; images are shown as links, never loaded.
// Covers what models write: headings, paragraphs, lists, quotes, code, tables, emphasis, links.

const FENCE = /^ {0,3}(`{3,}|~{3,})(.*)$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function el(tag, children = [], className = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) node.append(child);
  return node;
}

/** The address if it is safe to follow, else null (javascript:, data:, vbscript:, ...). */
export function safeUrl(raw) {
  let url;
  try {
    url = new URL(raw.trim(), document.baseURI);
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

function link(content, href) {
  const url = safeUrl(href);
  if (url === null) return el("span", content, "unsafe-link");
  const a = el("a", content);
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: strong
    /(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])/.source, // 4: strong
    /\*(?=[^\s*])([^*]*?[^\s*]|[^\s*])\*/.source, // 5: emphasis
    /(?<![\w])_(?=[^\s_])([^_]*?[^\s_]|[^\s_])_(?![\w])/.source, // 6: emphasis
    /~~(?=\S)([\s\S]*?\S)~~/.source, // 7: strike-through
    /!?\[([^\]]*)\]\(\s*<?([^()\s<>]*(?:\([^()\s]*\))?[^()\s<>]*)>?(?:\s+"[^"]*")?\s*\)/.source, // 8, 9
    /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_~])/.source, // 10: a bare address
  ].join("|"),
  "g",
);

/** Inline Markdown as a list of nodes. */
export function inline(text) {
  const nodes = [];
  let last = 0;
  // matchAll works on a copy of the pattern: the recursive calls below do not move its place.
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[2] !== undefined) nodes.push(el("code", [m[2].replace(/^ (.*) $/s, "$1")]));
    else if (m[3] !== undefined) nodes.push(el("strong", inline(m[3])));
    else if (m[4] !== undefined) nodes.push(el("strong", inline(m[4])));
    else if (m[5] !== undefined) nodes.push(el("em", inline(m[5])));
    else if (m[6] !== undefined) nodes.push(el("em", inline(m[6])));
    else if (m[7] !== undefined) nodes.push(el("del", inline(m[7])));
    else if (m[8] !== undefined) nodes.push(link(m[8] ? inline(m[8]) : [m[9]], m[9]));
    else nodes.push(link([m[10]], m[10]));
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function startsBlock(line, next) {
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    ITEM.test(line) ||
    (line.includes("|") && next !== undefined && TABLE_RULE.test(next) && next.includes("-"))
  );
}

/** Block Markdown as a list of nodes. */
export function blocks(text) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === "") {
      i += 1;
    } else if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}\\s*$`);
      const body = [];
      i += 1;
      while (i < lines.length && !close.test(lines[i])) body.push(lines[i++]);
      i += 1; // the closing fence (or the end of a still-streaming block)
      const code = el("code", [body.join("\n")]);
      const language = m[2].trim().split(/\s/)[0];
      if (language) code.dataset.language = language;
      out.push(el("pre", [code]));
    } else if ((m = HEADING.exec(line))) {
      out.push(el(`h${m[1].length}`, inline(m[2])));
      i += 1;
    } else if (RULE.test(line)) {
      out.push(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        body.push(m[1]);
        i += 1;
      }
      out.push(el("blockquote", blocks(body.join("\n"))));
    } else if ((m = ITEM.exec(line))) {
      const ordered = /\d/.test(m[2]);
      const indent = m[1].length;
      const list = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
      while (i < lines.length) {
        const item = ITEM.exec(lines[i]);
        if (!item || item[1].length !== indent || /\d/.test(item[2]) !== ordered) break;
        const body = [item[3]];
        i += 1;
        // Continuation lines and nested lists: anything indented deeper than the marker.
        while (
          i < lines.length &&
          lines[i].trim() !== "" &&
          (/^\s/.test(lines[i]) || !startsBlock(lines[i], lines[i + 1])) &&
          !(ITEM.exec(lines[i]) && ITEM.exec(lines[i])[1].length <= indent)
        ) {
          body.push(lines[i].replace(/^\s{1,4}/, ""));
          i += 1;
        }
        const nested = blocks(body.join("\n"));
        const only = nested.length === 1 && nested[0].tagName === "P";
        list.append(el("li", only ? [...nested[0].childNodes] : nested));
        while (i < lines.length && lines[i].trim() === "" && ITEM.test(lines[i + 1] ?? "")) i += 1;
      }
      out.push(list);
    } else if (line.includes("|") && TABLE_RULE.test(lines[i + 1] ?? "") && lines[i + 1].includes("-")) {
      const head = el("tr", cells(line).map((c) => el("th", inline(c))));
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") {
        rows.push(el("tr", cells(lines[i]).map((c) => el("td", inline(c)))));
        i += 1;
      }
      const table = el("table", [el("thead", [head]), el("tbody", rows)]);
      out.push(el("div", [table], "table-wrap"));
    } else {
      const body = [line];
      i += 1;
      while (i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i], lines[i + 1])) {
        body.push(lines[i]);
        i += 1;
      }
      out.push(el("p", inline(body.join("\n"))));
    }
  }
  return out;
}

/** Replace what `container` shows with `text` rendered as Markdown. */
export function renderMarkdown(container, text) {
  container.replaceChildren(...blocks(text));
}
