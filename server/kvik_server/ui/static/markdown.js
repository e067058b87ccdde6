// A small Markdown renderer for model output, which is untrusted text.
//
// Safety by construction: nothing here parses HTML. Every character of the input reaches the
// page through createTextNode/textContent (the DOM's own escaping), elements are created only
// from a fixed list of tag names, and links keep only http(s)/mailto URLs. So "<img onerror=…>"
// in a reply shows up as those characters, never as an element. (The page's CSP forbids inline
// scripts as well.)
//
// Supported: fenced code blocks (``` with an optional language; an unclosed fence while
// streaming renders as code so far), inline `code`, **bold**, *italic* / _italic_, [links](url),
// #–###### headings, - / * / 1. lists, > quotes, --- rules, and paragraphs with line breaks.

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The URL if it is safe to link to, else null.
export function safeUrl(raw) {
  try {
    const url = new URL(raw, window.location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|\*(?=[^\s*])([^*]*?[^\s*])\*|(?<![\w])_(?=\S)([^_]*?\S)_(?![\w])|\[([^\]\n]+)\]\(([^()\s]+)\)/g;

// Append the inline Markdown of `text` to `parent`.
export function renderInline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1] !== undefined) {
      parent.append(el("code", null, m[2].trim() ? m[2].replace(/^ (.*) $/, "$1") : m[2]));
    } else if (m[3] !== undefined) {
      renderInline(m[3], parent.appendChild(el("strong")));
    } else if (m[4] !== undefined || m[5] !== undefined) {
      renderInline(m[4] ?? m[5], parent.appendChild(el("em")));
    } else {
      const href = safeUrl(m[7]);
      if (href === null) {
        parent.append(document.createTextNode(m[0])); // shown literally, never linked
        continue;
      }
      const a = el("a");
      a.href = href;
      a.target = "_blank";
      a.rel = "noopener noreferrer nofollow";
      renderInline(m[6], a);
      parent.append(a);
    }
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function codeBlock(lang, lines) {
  const pre = el("pre", "code");
  const code = el("code", null, lines.join("\n"));
  if (/^[\w+#.-]{1,32}$/.test(lang)) {
    code.className = "language-" + lang;
    pre.dataset.lang = lang;
  }
  pre.append(code);
  return pre;
}

// Render `text` as Markdown; returns a DocumentFragment.
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let para = null; // the open paragraph, if any
  let list = null; // the open <ul>/<ol>, if any
  let quote = null; // the open <blockquote>, if any
  const close = () => { para = list = quote = null; };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(`{3,}|~{3,})\s*([^`\s]*)\s*$/);
    if (fence) {
      const body = [];
      let j = i + 1;
      while (j < lines.length && !lines[j].trim().startsWith(fence[1])) body.push(lines[j++]);
      out.append(codeBlock(fence[2], body));
      i = j; // past the closing fence (or the end, while a reply is still streaming)
      close();
      continue;
    }
    if (!line.trim()) { close(); continue; }
    let m;
    if ((m = line.match(/^(#{1,6})\s+(.*?)\s*#*\s*$/))) {
      close();
      const h = el("h" + Math.min(6, m[1].length + 2)); // h3..h6: the page's own headings come first
      renderInline(m[2], h);
      out.append(h);
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      close();
      out.append(el("hr"));
    } else if ((m = line.match(/^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/))) {
      const tag = m[1] ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        close();
        list = el(tag);
        if (tag === "ol" && m[2] !== "1") list.start = Number(m[2]);
        out.append(list);
      }
      const li = el("li");
      renderInline(m[3], li);
      list.append(li);
    } else if ((m = line.match(/^\s*>\s?(.*)$/))) {
      if (!quote) { close(); quote = el("blockquote"); out.append(quote); }
      if (quote.childNodes.length) quote.append(el("br"));
      renderInline(m[1], quote);
    } else if (list && /^\s{2,}\S/.test(line)) {
      list.lastChild.append(document.createTextNode(" "));
      renderInline(line.trim(), list.lastChild); // a continuation of the last list item
    } else {
      if (!para) { close(); para = el("p"); out.append(para); } else { para.append(el("br")); }
      renderInline(line, para);
    }
  }
  return out;
}
