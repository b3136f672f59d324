// Small DOM helpers, shared widgets and text utilities (YAML dump, line diff).
const SVGNS = "http://www.w3.org/2000/svg";

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function setProps(el, props, svg) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (!svg && (k === "value" || k === "checked" || k === "disabled" || k === "selected" || k === "readOnly"))
      el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
}

/** An HTML element: h("div", {class: "x", onClick}, ...children). */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  setProps(el, props, false);
  append(el, children);
  return el;
}

/** An SVG element. */
export function s(tag, props, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  setProps(el, props, true);
  append(el, children);
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function icon(name) {
  const paths = {
    agents: "M12 2a4 4 0 110 8 4 4 0 010-8zm-7 18a7 7 0 0114 0v1H5v-1z",
    prompts: "M4 4h16v12H7l-3 3V4zm3 4h10M7 11h7",
    registries: "M4 6h16M4 12h16M4 18h16M7 4v4M12 10v4M17 16v4",
    releases: "M4 12h6l3-7 3 14 3-7h1",
    observability: "M3 20h18M6 16V9M11 16V5M16 16v-4M21 16V8",
    credentials: "M7 10V7a5 5 0 0110 0v3M5 10h14v10H5zM12 14v3",
    audit: "M6 3h9l4 4v14H6zM9 10h7M9 14h7M9 18h4",
  };
  return s("svg", { viewBox: "0 0 24 24", class: "icon", "aria-hidden": "true" },
    s("path", { d: paths[name] || "", fill: "none", stroke: "currentColor", "stroke-width": "1.8", "stroke-linecap": "round", "stroke-linejoin": "round" }));
}

// ------------------------------------------------------------ feedback

export function toast(message, kind = "ok") {
  let box = document.getElementById("toasts");
  if (!box) { box = h("div", { id: "toasts", role: "status", "aria-live": "polite" }); document.body.append(box); }
  const t = h("div", { class: `toast toast-${kind}` }, message);
  box.append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
}

export function confirmDialog({ title, body, confirm = "Confirm", danger = false }) {
  return new Promise((resolve) => {
    const close = (v) => { overlay.remove(); resolve(v); };
    const overlay = h("div", { class: "modal-overlay", onClick: (e) => e.target === overlay && close(false) },
      h("div", { class: "modal", role: "dialog", "aria-modal": "true", "aria-label": title },
        h("h3", {}, title),
        h("div", { class: "modal-body" }, body),
        h("div", { class: "modal-actions" },
          h("button", { class: "btn", onClick: () => close(false) }, "Cancel"),
          h("button", { class: `btn ${danger ? "btn-danger" : "btn-primary"}`, "data-testid": "confirm", onClick: () => close(true) }, confirm))));
    document.body.append(overlay);
    overlay.querySelector(".btn-primary, .btn-danger").focus();
  });
}

export function errorBox(e) {
  return h("div", { class: "alert alert-error", role: "alert" },
    h("strong", {}, e.code ? `${e.code}: ` : "Error: "), e.message,
    e.issues && e.issues.length ? h("ul", {}, e.issues.map((i) => h("li", {}, h("code", {}, i.path || "(document)"), " ", i.message))) : null);
}

export function empty(text) { return h("div", { class: "empty" }, text); }
export function spinner(text = "Loading…") { return h("div", { class: "loading" }, h("span", { class: "spin" }), text); }

// ------------------------------------------------------------ layout pieces

export function card(title, body, { actions, class: cls = "", subtitle } = {}) {
  return h("section", { class: `card ${cls}` },
    title ? h("header", { class: "card-head" },
      h("div", {}, h("h2", {}, title), subtitle ? h("p", { class: "muted" }, subtitle) : null),
      actions ? h("div", { class: "card-actions" }, actions) : null) : null,
    h("div", { class: "card-body" }, body));
}

export function tabs(items, { active, onSelect, testid } = {}) {
  // items: [{id, label, badge?}]
  return h("div", { class: "tabs", role: "tablist", "data-testid": testid },
    items.map((it) => h("button", {
      role: "tab", class: `tab ${it.id === active ? "active" : ""}`, "aria-selected": String(it.id === active),
      "data-tab": it.id, onClick: () => onSelect(it.id),
    }, it.label, it.badge ? h("span", { class: "tab-badge" }, it.badge) : null)));
}

export function table(columns, rows, { empty: emptyText = "Nothing here yet.", rowProps } = {}) {
  if (!rows.length) return empty(emptyText);
  return h("div", { class: "table-wrap" }, h("table", { class: "table" },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.class || "" }, c.label)))),
    h("tbody", {}, rows.map((r) => h("tr", rowProps ? rowProps(r) : {},
      columns.map((c) => h("td", { class: c.class || "" }, c.render ? c.render(r) : r[c.key])))))));
}

export function badge(text, kind = "neutral", props = {}) { return h("span", { class: `badge badge-${kind}`, ...props }, text); }
export function dot(kind, label) { return h("span", { class: `dot dot-${kind}`, title: label, "aria-label": label }); }

export const PALETTE = ["#4f46e5", "#0891b2", "#d97706", "#db2777", "#059669", "#7c3aed", "#dc2626", "#65a30d"];
const colorCache = new Map();
export function colorFor(name) {
  if (!colorCache.has(name)) {
    let x = 0;
    for (const ch of String(name)) x = (x * 31 + ch.charCodeAt(0)) >>> 0;
    colorCache.set(name, PALETTE[x % PALETTE.length]);
  }
  return colorCache.get(name);
}
export function agentChip(name) {
  return h("span", { class: "chip" }, h("span", { class: "chip-dot", style: { background: colorFor(name) } }), name);
}

// ------------------------------------------------------------ formatting

export function ago(iso) {
  if (!iso) return "";
  const t = new Date(iso).getTime();
  const d = (Date.now() - t) / 1000;
  if (d < 60) return "just now";
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return new Date(iso).toISOString().slice(0, 10);
}
export function when(iso) { return iso ? h("time", { datetime: iso, title: iso }, ago(iso)) : ""; }
export const fmtInt = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
export const fmtMs = (n) => (n == null ? "–" : n >= 1000 ? `${(n / 1000).toFixed(2)} s` : `${n.toFixed(n < 10 ? 1 : 0)} ms`);
export const fmtUsd = (n) => (n == null ? "–" : n === 0 ? "$0" : n < 0.01 ? `$${n.toFixed(5)}` : `$${n.toFixed(2)}`);
export const humanize = (key) => {
  const words = String(key).replace(/([a-z0-9])([A-Z])/g, "$1 $2").replace(/[_-]/g, " ").toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1).replace(/\b(url|mcp|api|ttl|id|a2a|llm|p50|p95)\b/g, (m) => m.toUpperCase());
};

// ------------------------------------------------------------ YAML (dump only)

const PLAIN = /^[A-Za-z_./:@][A-Za-z0-9_ ./:@#+-]*$/;
function scalar(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  const sv = String(v);
  if (sv === "" || !PLAIN.test(sv) || /^(true|false|null|yes|no|on|off|~)$/i.test(sv) || / $|: | #/.test(sv)) return JSON.stringify(sv);
  return sv;
}
export function toYaml(value, indent = 0) {
  const pad = " ".repeat(indent);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return value.map((item) => {
      if (item && typeof item === "object" && !Array.isArray(item) && Object.keys(item).length) {
        const inner = toYaml(item, indent + 2).replace(/^\s+/, "");
        return `${pad}- ${inner}`;
      }
      return `${pad}- ${toYaml(item, indent + 2).trimStart()}`;
    }).join("\n");
  }
  if (value && typeof value === "object") {
    const keys = Object.keys(value);
    if (!keys.length) return "{}";
    return keys.map((k) => {
      const v = value[k];
      const key = PLAIN.test(k) ? k : JSON.stringify(k);
      if (v && typeof v === "object" && (Array.isArray(v) ? v.length : Object.keys(v).length)) {
        return `${pad}${key}:\n${toYaml(v, Array.isArray(v) ? indent : indent + 2)}`;
      }
      if (typeof v === "string" && v.includes("\n")) {
        return `${pad}${key}: |\n${v.replace(/\n$/, "").split("\n").map((l) => " ".repeat(indent + 2) + l).join("\n")}`;
      }
      return `${pad}${key}: ${toYaml(v, indent + 2).trimStart()}`;
    }).join("\n");
  }
  return pad + scalar(value);
}

// ------------------------------------------------------------ line diff (LCS)

/** Rows for a side-by-side view: {type: same|mod|del|add, left, right, ln, rn}. */
export function lineDiff(a, b) {
  const A = a.split("\n"), B = b.split("\n");
  const n = A.length, m = B.length;
  const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    L[i][j] = A[i] === B[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const ops = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && A[i] === B[j]) { ops.push({ type: "same", left: A[i], right: B[j], ln: ++i, rn: ++j }); }
    else if (j < m && (i >= n || L[i][j + 1] >= L[i + 1][j])) { ops.push({ type: "add", right: B[j], rn: ++j }); }
    else { ops.push({ type: "del", left: A[i], ln: ++i }); }
  }
  // pair runs of deletions and additions into modified rows
  const rows = [];
  for (let k = 0; k < ops.length;) {
    if (ops[k].type === "same") { rows.push(ops[k++]); continue; }
    const dels = [], adds = [];
    while (k < ops.length && ops[k].type !== "same") (ops[k].type === "del" ? dels : adds).push(ops[k++]);
    for (let x = 0; x < Math.max(dels.length, adds.length); x++) {
      const d = dels[x], a2 = adds[x];
      rows.push({ type: d && a2 ? "mod" : d ? "del" : "add", left: d?.left, ln: d?.ln, right: a2?.right, rn: a2?.rn });
    }
  }
  return rows;
}

export function sideBySide(leftText, rightText, { leftTitle, rightTitle, testid } = {}) {
  const rows = lineDiff(leftText, rightText);
  const changed = rows.filter((r) => r.type !== "same").length;
  return h("div", { class: "diff", "data-testid": testid },
    h("div", { class: "diff-head" }, h("div", {}, leftTitle), h("div", {}, rightTitle)),
    h("div", { class: "diff-body" }, rows.map((r) => h("div", { class: `diff-row diff-${r.type}` },
      h("span", { class: "ln" }, r.ln ?? ""), h("pre", { class: "code l" }, r.left ?? ""),
      h("span", { class: "ln" }, r.rn ?? ""), h("pre", { class: "code r" }, r.right ?? "")))),
    h("div", { class: "diff-foot muted" }, changed ? `${changed} line${changed > 1 ? "s" : ""} differ` : "No differences"));
}

export function codeBlock(text, props = {}) { return h("pre", { class: "codeblock", ...props }, text); }

export function debounce(fn, ms) {
  let t;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

/** Changes turning ``a`` into ``b`` (objects by key, lists by index), in the shape of the
 *  control plane's diff (the proto's Change: path, op CHANGE_OP_ADD/REMOVE/REPLACE,
 *  oldValue?, newValue?). */
export function jsonDiff(a, b, path = "", out = []) {
  const isObj = (x) => x && typeof x === "object" && !Array.isArray(x);
  const join = (k) => (typeof k === "number" ? `${path}[${k}]` : path ? `${path}.${k}` : k);
  if (isObj(a) && isObj(b)) {
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
      if (!(k in b)) out.push({ path: join(k), op: "CHANGE_OP_REMOVE", oldValue: a[k] });
      else if (!(k in a)) out.push({ path: join(k), op: "CHANGE_OP_ADD", newValue: b[k] });
      else jsonDiff(a[k], b[k], join(k), out);
    }
  } else if (Array.isArray(a) && Array.isArray(b)) {
    for (let i = 0; i < Math.max(a.length, b.length); i++) {
      if (i >= b.length) out.push({ path: join(i), op: "CHANGE_OP_REMOVE", oldValue: a[i] });
      else if (i >= a.length) out.push({ path: join(i), op: "CHANGE_OP_ADD", newValue: b[i] });
      else jsonDiff(a[i], b[i], join(i), out);
    }
  } else if (JSON.stringify(a) !== JSON.stringify(b)) out.push({ path, op: "CHANGE_OP_REPLACE", oldValue: a, newValue: b });
  return out;
}
