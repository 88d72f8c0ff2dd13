// Markdown to DOM for untrusted text (model output). Every piece of text becomes a text node
// (innerHTML is never used), so "<img onerror=...>" is shown as written; links keep only
// http(s) and mailto targets, anything else ("javascript:...") stays plain text.
//
// The subset models write: fenced code (open fences render while they stream), headings,
// lists, block quotes, tables, rules, paragraphs; inline code, bold, italic, strikethrough,
// links and bare URLs.
//
// Nesting is capped (quotes in quotes, lists in lists, bold in italic...): deeper text is
// shown as written, so that hostile input (">" x 20000) cannot exhaust the call stack. And
// whatever goes wrong, a message is shown as plain text rather than breaking the page.

const FENCE_OPEN = /^( {0,3})(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$/;
const RULE = /^ {0,3}([-*_])([ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_DIVIDER = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;
const MAX_BLOCK_DEPTH = 12; // quotes and list items inside each other
const MAX_INLINE_DEPTH = 8; // emphasis and links inside each other

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// options.codeBlock(pre, language, code, closed) may decorate each code block (buttons).
export function renderMarkdown(text, options = {}) {
  const fragment = document.createDocumentFragment();
  try {
    renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment, options, 0);
  } catch (error) {
    console.warn("mistol: a message could not be rendered as Markdown; shown as text", error);
    const plain = el("div", "markdown-plain", String(text));
    plain.style.whiteSpace = "pre-wrap";
    fragment.replaceChildren(plain);
  }
  return fragment;
}

function renderBlocks(lines, parent, options, depth) {
  if (depth > MAX_BLOCK_DEPTH) {
    const text = lines.map((line) => line.trim()).filter(Boolean);
    if (text.length) parent.append(el("p", null, text.join("\n")));
    return;
  }
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) parent.append(renderParagraph(paragraph));
    paragraph = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE_OPEN.exec(line))) {
      flush();
      const [, indent, fence, language] = m;
      const close = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
      const code = [];
      i++;
      while (i < lines.length && !close.test(lines[i])) {
        code.push(lines[i].startsWith(indent) ? lines[i].slice(indent.length) : lines[i].trimStart());
        i++;
      }
      const closed = i < lines.length;
      i++;
      parent.append(renderCode(code.join("\n"), language.toLowerCase(), closed, options));
      continue;
    }
    if (!line.trim()) {
      flush();
      i++;
      continue;
    }
    if ((m = HEADING.exec(line))) {
      flush();
      parent.append(renderInline(m[2], el(`h${Math.min(m[1].length + 2, 6)}`)));
      i++;
      continue;
    }
    if (RULE.test(line) && !paragraph.length) {
      parent.append(el("hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
      const quote = el("blockquote");
      renderBlocks(quoted, quote, options, depth + 1);
      parent.append(quote);
      continue;
    }
    if ((m = LIST_ITEM.exec(line)) && (!paragraph.length || m[1].length === 0)) {
      flush();
      i = renderList(lines, i, parent, options, depth);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_DIVIDER.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      flush();
      i = renderTable(lines, i, parent);
      continue;
    }
    paragraph.push(line.trim());
    i++;
  }
  flush();
}

function renderParagraph(lines) {
  const p = el("p");
  lines.forEach((line, n) => {
    if (n) p.append(el("br"));
    renderInline(line, p);
  });
  return p;
}

function renderList(lines, start, parent, options, depth) {
  const first = LIST_ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const m = LIST_ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    const contentIndent = m[1].length + m[2].length + 1;
    i++;
    // The item's own lines: indented continuation lines (nested lists, code) and lazy ones.
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        const next = lines[i + 1];
        if (next !== undefined && next.trim() && leadingSpaces(next) > indent) {
          body.push("");
          i++;
          continue;
        }
        break;
      }
      const sub = LIST_ITEM.exec(line);
      if (sub && sub[1].length <= indent) break;
      if (!sub && leadingSpaces(line) <= indent && (FENCE_OPEN.test(line) || HEADING.test(line) || QUOTE.test(line))) break;
      body.push(line.slice(Math.min(leadingSpaces(line), contentIndent)));
      i++;
    }
    const item = el("li");
    const tight = !body.includes("");
    renderBlocks(body, item, options, depth + 1);
    if (tight && item.children.length && item.firstElementChild.tagName === "P") {
      item.firstElementChild.replaceWith(...item.firstElementChild.childNodes);
    }
    list.append(item);
  }
  parent.append(list);
  return i;
}

function leadingSpaces(line) {
  return line.length - line.trimStart().length;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function renderTable(lines, start, parent) {
  const table = el("table");
  const head = el("thead");
  const headRow = el("tr");
  for (const cell of splitRow(lines[start])) headRow.append(renderInline(cell, el("th")));
  head.append(headRow);
  table.append(head);
  const body = el("tbody");
  let i = start + 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = el("tr");
    for (const cell of splitRow(lines[i])) row.append(renderInline(cell, el("td")));
    body.append(row);
    i++;
  }
  table.append(body);
  const wrap = el("div", "table-wrap");
  wrap.append(table);
  parent.append(wrap);
  return i;
}

function renderCode(code, language, closed, options) {
  const figure = el("div", "code-block");
  const bar = el("div", "code-bar");
  bar.append(el("span", "code-language", language));
  const copy = el("button", "code-copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(() => {
      copy.textContent = "Copied";
      setTimeout(() => (copy.textContent = "Copy"), 1200);
    }, () => {});
  });
  bar.append(copy);
  const pre = el("pre");
  const codeNode = el("code");
  highlight(code, language, codeNode);
  pre.append(codeNode);
  figure.append(bar, pre);
  if (options.codeBlock) options.codeBlock(figure, language, code, closed);
  return figure;
}

// -- inline ----------------------------------------------------------------------------------
const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/, // 1, 2: code span
    /\*\*(?=\S)([\s\S]*?\S)\*\*/, // 3: bold
    /__(?=\S)([\s\S]*?\S)__(?!\w)/, // 4: bold
    /\*(?=[^\s*])([\s\S]*?[^\s*])\*/, // 5: italic
    /(?<![\w\\])_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/, // 6: italic
    /~~(?=\S)([\s\S]*?\S)~~/, // 7: strikethrough
    /\[([^\]\n]*)\]\(\s*<?([^\s)>]*)>?(?:\s+"[^"]*")?\s*\)/, // 8, 9: link
    /<((?:https?:\/\/|mailto:)[^\s<>]+)>/, // 10: autolink
    /(https?:\/\/[^\s<>()]*[^\s<>().,:;!?'"\]*_])/, // 11: bare URL
  ].map((r) => r.source).join("|"),
  "g",
);

export function safeUrl(href) {
  try {
    const url = new URL(href, window.location.href);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

function link(href, label, parent, depth) {
  const url = safeUrl(href);
  if (url === null) return false;
  const a = el("a");
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  if (label === undefined) a.textContent = href;
  else renderInline(label, a, depth + 1);
  parent.append(a);
  return true;
}

export function renderInline(text, parent, depth = 0) {
  if (depth > MAX_INLINE_DEPTH) {
    parent.append(text);
    return parent;
  }
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[2] !== undefined) parent.append(el("code", "inline", m[2].replace(/^ (.+) $/, "$1")));
    else if (m[3] !== undefined || m[4] !== undefined) {
      parent.append(renderInline(m[3] ?? m[4], el("strong"), depth + 1));
    } else if (m[5] !== undefined || m[6] !== undefined) parent.append(renderInline(m[5] ?? m[6], el("em"), depth + 1));
    else if (m[7] !== undefined) parent.append(renderInline(m[7], el("del"), depth + 1));
    else if (m[8] !== undefined) {
      if (!link(m[9], m[8], parent, depth)) parent.append(m[0]); // an unsafe target: shown, not linked
    } else if (m[10] !== undefined) {
      if (!link(m[10], undefined, parent, depth)) parent.append(m[0]);
    } else if (m[11] !== undefined) {
      if (!link(m[11], undefined, parent, depth)) parent.append(m[0]);
    }
  }
  if (last < text.length) parent.append(text.slice(last));
  return parent;
}

// -- code highlighting -----------------------------------------------------------------------
const KEYWORDS = {
  python: "False None True and as assert async await break class continue def del elif else except finally for " +
    "from global if import in is lambda nonlocal not or pass raise return try while with yield match case print",
  javascript: "await break case catch class const continue default delete do else export extends false finally " +
    "for function if import in instanceof let new null return super switch this throw true try typeof undefined " +
    "var void while yield async of",
  shell: "if then else elif fi for while do done case esac function in export local return echo cd",
  c: "auto break case char const continue default do double else enum extern float for goto if int long register " +
    "return short signed sizeof static struct switch typedef union unsigned void volatile while bool true false " +
    "class public private protected template typename namespace using new delete nullptr fn let mut impl pub use " +
    "match struct trait self Self",
};
const ALIASES = { py: "python", python3: "python", py3: "python", js: "javascript", ts: "javascript",
  typescript: "javascript", json: "javascript", sh: "shell", bash: "shell", zsh: "shell", console: "shell",
  cpp: "c", "c++": "c", h: "c", java: "c", rust: "c", rs: "c", go: "c", cs: "c" };

function tokenPattern(language) {
  const hashComments = language === "python" || language === "shell";
  const parts = [
    hashComments ? /#[^\n]*/.source : /\/\/[^\n]*|\/\*[\s\S]*?\*\//.source, // 1: comment
    /"""[\s\S]*?"""|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`/.source, // 2: string
    /\b(?:0[xob][\da-f_]+|\d[\d_]*\.?\d*(?:e[+-]?\d+)?j?)\b/.source, // 3: number
    /\b[A-Za-z_]\w*\b/.source, // 4: word
  ];
  return new RegExp(parts.map((p) => `(${p})`).join("|"), "gi");
}

export function highlight(code, language, parent) {
  const lang = ALIASES[language] || language;
  if (!KEYWORDS[lang]) {
    parent.textContent = code;
    return parent;
  }
  const keywords = new Set(KEYWORDS[lang].split(" "));
  let last = 0;
  for (const m of code.matchAll(tokenPattern(lang))) {
    let kind = null;
    if (m[1] !== undefined) kind = "comment";
    else if (m[2] !== undefined) kind = "string";
    else if (m[3] !== undefined) kind = "number";
    else if (keywords.has(m[4])) kind = "keyword";
    if (kind === null) continue;
    if (m.index > last) parent.append(code.slice(last, m.index));
    parent.append(el("span", `tok-${kind}`, m[0]));
    last = m.index + m[0].length;
  }
  if (last < code.length) parent.append(code.slice(last));
  return parent;
}
