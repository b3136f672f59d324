// A form generated from a JSON Schema (pydantic's output: $ref/$defs, anyOf-with-null for
// optional fields, oneOf + discriminator for variants, maps as additional/patternProperties).
// The value is edited in place; onChange(path) fires after every edit.
import { h, humanize } from "./ui.js";

/** ``["spec", "mcpServers", 0, "headers", "x-key"]`` -> ``spec.mcpServers[0].headers["x-key"]``
 *  (the control plane's format_path). */
export function formatPath(parts) {
  let out = "";
  for (const p of parts) {
    if (typeof p === "number") out += `[${p}]`;
    else if (/^[A-Za-z][A-Za-z0-9_-]*$/.test(p)) out += out ? `.${p}` : p;
    else out += `[${JSON.stringify(p)}]`;
  }
  return out;
}

export function getAt(obj, path) {
  let cur = obj;
  for (const p of path) { if (cur == null) return undefined; cur = cur[p]; }
  return cur;
}

export function setAt(obj, path, value) {
  let cur = obj;
  for (let i = 0; i < path.length - 1; i++) {
    const p = path[i];
    if (cur[p] == null || typeof cur[p] !== "object") cur[p] = typeof path[i + 1] === "number" ? [] : {};
    cur = cur[p];
  }
  const last = path[path.length - 1];
  if (value === undefined) { if (Array.isArray(cur)) cur.splice(last, 1); else delete cur[last]; }
  else cur[last] = value;
}

export class SchemaForm {
  constructor({ root, value, onChange, readOnly = false }) {
    this.root = root;
    this.value = value;
    this.onChange = onChange || (() => {});
    this.readOnly = readOnly;
  }

  resolve(node) {
    let n = node || {};
    const extra = {};
    for (let guard = 0; n.$ref && guard < 20; guard++) {
      for (const k of ["description", "default", "title"]) if (n[k] !== undefined && extra[k] === undefined) extra[k] = n[k];
      n = this.root.$defs[n.$ref.split("/").pop()];
    }
    return { ...n, ...extra };
  }

  /** The schema without its null alternative, and whether null is allowed. */
  unwrap(node) {
    const n = this.resolve(node);
    if (n.anyOf) {
      const members = n.anyOf.filter((m) => m.type !== "null");
      const nullable = members.length < n.anyOf.length;
      const inner = this.resolve(members[0]);
      return { schema: { ...inner, description: n.description ?? inner.description, default: n.default, title: n.title }, nullable };
    }
    return { schema: n, nullable: false };
  }

  kind(n) {
    if (n.oneOf && n.discriminator) return "union";
    if (n.const !== undefined) return "const";
    if (n.enum) return "enum";
    if (n.type === "object" || n.properties) return n.properties ? "object" : "map";
    return n.type || "string";
  }

  changed(path, structural = false) { this.onChange(path, structural); }

  set(path, v, structural = false) { setAt(this.value, path, v); this.changed(path, structural); }

  /** A fieldset for the object schema at ``path``. */
  renderObject(node, path) {
    const n = this.resolve(node);
    const required = new Set(n.required || []);
    return h("div", { class: "form-grid" },
      Object.entries(n.properties || {}).map(([key, sub]) => this.renderField(key, sub, [...path, key], required.has(key))));
  }

  renderField(key, node, path, required) {
    const { schema, nullable } = this.unwrap(node);
    const kind = this.kind(schema);
    const id = "f-" + formatPath(path).replace(/[^A-Za-z0-9]/g, "_");
    const label = h("label", { class: "field-label", for: id }, schema.title && !/^[A-Z][a-z]+$/.test(schema.title) ? schema.title : humanize(key),
      required ? h("span", { class: "req", title: "required" }, " *") : null,
      schema["x-specmesh-secret"] ? h("span", { class: "badge badge-secret" }, "secret") : null);
    const help = schema.description ? h("p", { class: "help" }, schema.description.replace(/``/g, "")) : null;
    const err = h("div", { class: "field-error", "data-error-for": formatPath(path) });
    let control;
    const wide = kind === "object" || kind === "array" || kind === "map" || kind === "union" || (kind === "string" && (schema.maxLength || 0) > 4096);
    if (kind === "object") control = this.renderNested(schema, path, nullable);
    else if (kind === "union") control = this.renderUnion(schema, path);
    else if (kind === "array") control = this.renderArray(schema, path, nullable);
    else if (kind === "map") control = this.renderMap(schema, path);
    else control = this.renderScalar(schema, kind, path, id, nullable);
    return h("div", { class: `field ${wide ? "field-wide" : ""} field-${kind}`, "data-path": formatPath(path) },
      label, help, control, err);
  }

  renderNested(schema, path, nullable) {
    const current = getAt(this.value, path);
    if (nullable && current == null) {
      return h("div", { class: "nested nested-off" },
        h("span", { class: "muted" }, "Not configured. "),
        this.readOnly ? null : h("button", { class: "btn btn-sm", type: "button", onClick: () => this.set(path, {}, true) }, "Configure"));
    }
    return h("div", { class: "nested" },
      nullable && !this.readOnly ? h("div", { class: "nested-tools" },
        h("button", { class: "btn btn-sm btn-ghost", type: "button", onClick: () => this.set(path, null, true) }, "Remove")) : null,
      this.renderObject(schema, path));
  }

  renderUnion(schema, path) {
    const tag = schema.discriminator.propertyName;
    const current = getAt(this.value, path) || schema.default || {};
    if (getAt(this.value, path) == null) setAt(this.value, path, structuredClone(current));
    const options = Object.keys(schema.discriminator.mapping);
    const chosen = current[tag] || options[0];
    const variant = this.resolve({ $ref: schema.discriminator.mapping[chosen] });
    const rest = { ...variant, properties: Object.fromEntries(Object.entries(variant.properties || {}).filter(([k]) => k !== tag)) };
    return h("div", { class: "nested" },
      h("div", { class: "field" }, h("label", { class: "field-label" }, humanize(tag)),
        variant.description ? h("p", { class: "help" }, variant.description) : null,
        h("select", {
          class: "input", disabled: this.readOnly, "data-control": formatPath([...path, tag]),
          onChange: (e) => this.set(path, { [tag]: e.target.value }, true),
        }, options.map((o) => h("option", { value: o, selected: o === chosen }, o)))),
      this.renderObject(rest, path));
  }

  renderArray(schema, path, nullable) {
    const items = this.resolve(schema.items || {});
    const current = getAt(this.value, path);
    if (nullable && current == null) {
      return h("div", { class: "nested nested-off" }, h("span", { class: "muted" }, "Unset (no restriction). "),
        this.readOnly ? null : h("button", { class: "btn btn-sm", type: "button", onClick: () => this.set(path, [], true) }, "Set a list"));
    }
    const list = Array.isArray(current) ? current : [];
    const isObj = this.kind(items) === "object";
    const rows = list.map((item, i) => {
      const remove = this.readOnly ? null : h("button", {
        class: "btn btn-sm btn-ghost", type: "button", title: "Remove", "aria-label": "Remove",
        onClick: () => { list.splice(i, 1); this.set(path, list, true); },
      }, "Remove");
      if (isObj) {
        const title = item && (item.mcpServerName || item.agentName || item.name || item.model || item.id);
        return h("div", { class: "array-item" },
          h("div", { class: "array-item-head" }, h("strong", {}, `#${i + 1}`), title ? h("span", { class: "muted" }, title) : null, remove),
          this.renderObject(items, [...path, i]));
      }
      return h("div", { class: "kv-row" }, this.renderScalar(items, this.kind(items), [...path, i], null, false), remove);
    });
    return h("div", { class: "array" }, rows.length ? rows : h("div", { class: "muted small" }, "None."),
      this.readOnly ? null : h("div", { class: "array-tools" },
        h("button", {
          class: "btn btn-sm", type: "button", "data-add": formatPath(path),
          onClick: () => { list.push(isObj ? {} : ""); this.set(path, list, true); },
        }, "+ Add"),
        nullable ? h("button", { class: "btn btn-sm btn-ghost", type: "button", onClick: () => this.set(path, null, true) }, "Unset") : null));
  }

  renderMap(schema, path) {
    const valueSchema = this.resolve(schema.additionalProperties && typeof schema.additionalProperties === "object"
      ? schema.additionalProperties : Object.values(schema.patternProperties || {})[0] || { type: "string" });
    const current = getAt(this.value, path);
    const obj = current && typeof current === "object" ? current : {};
    if (typeof current === "string") return this.renderScalar({ type: "string" }, "string", path, null, false);
    const entries = Object.entries(obj);
    const write = (pairs) => { this.set(path, Object.fromEntries(pairs.filter(([k]) => k !== ""))); };
    const rows = entries.map(([k, v], i) => h("div", { class: "kv-row" },
      h("input", {
        class: "input kv-key", value: k, placeholder: "key", readOnly: this.readOnly, "aria-label": "key",
        onChange: (e) => { const pairs = Object.entries(obj); pairs[i][0] = e.target.value; write(pairs); },
      }),
      this.secretOrText(valueSchema, v, (nv) => { obj[k] = nv; this.set(path, obj); }, `${formatPath(path)}.${k}`),
      this.readOnly ? null : h("button", {
        class: "btn btn-sm btn-ghost", type: "button", "aria-label": "Remove",
        onClick: () => { delete obj[k]; this.set(path, obj, true); },
      }, "Remove")));
    return h("div", { class: "map" }, rows.length ? rows : h("div", { class: "muted small" }, "No entries."),
      this.readOnly ? null : h("div", { class: "array-tools" }, h("button", {
        class: "btn btn-sm", type: "button", "data-add": formatPath(path),
        onClick: () => { let k = "key"; let n = 1; while (k in obj) k = `key${++n}`; obj[k] = ""; this.set(path, obj, true); },
      }, "+ Add entry")));
  }

  secretOrText(schema, v, onInput, ctl) {
    const secret = !!schema["x-specmesh-secret"];
    const isRef = typeof v === "string" && v.startsWith("vault://");
    return h("input", {
      class: "input kv-value" + (secret ? " secret" : ""), value: v ?? "", readOnly: this.readOnly,
      type: secret && !isRef ? "password" : "text", autocomplete: "off", "data-control": ctl,
      placeholder: secret ? "vault://… reference, or a new value (moved into Vault on deploy)" : "value",
      onInput: (e) => onInput(e.target.value),
    });
  }

  renderScalar(schema, kind, path, id, nullable) {
    const v = getAt(this.value, path);
    const ctl = formatPath(path);
    const common = { id, "data-control": ctl, disabled: this.readOnly };
    const dflt = schema.default;
    if (kind === "const") return h("input", { class: "input", value: schema.const, readOnly: true, ...common });
    if (kind === "boolean") {
      const checked = v ?? dflt ?? false;
      return h("label", { class: "switch" },
        h("input", { type: "checkbox", checked, ...common, onChange: (e) => this.set(path, e.target.checked) }),
        h("span", { class: "switch-track" }), h("span", { class: "switch-label" }, checked ? "On" : "Off"));
    }
    if (kind === "enum") {
      const opts = [...(nullable ? [""] : []), ...schema.enum];
      return h("select", { class: "input", ...common, onChange: (e) => this.set(path, e.target.value === "" ? null : e.target.value) },
        opts.map((o) => h("option", { value: o, selected: (v ?? dflt ?? "") === o }, o === "" ? "(default)" : o)));
    }
    if (kind === "integer" || kind === "number") {
      const min = schema.minimum ?? schema.exclusiveMinimum, max = schema.maximum ?? schema.exclusiveMaximum;
      return h("input", {
        class: "input", type: "number", value: v ?? "", step: kind === "integer" ? "1" : "any",
        placeholder: dflt != null ? `default ${dflt}` : nullable ? "unset" : "", min, max, ...common,
        onInput: (e) => {
          const raw = e.target.value;
          // keep what was typed when it is not a number, so the API's message names it
          this.set(path, raw === "" ? (nullable ? null : undefined) : Number.isNaN(Number(raw)) ? raw : Number(raw));
        },
      });
    }
    if (schema["x-specmesh-secret"]) {
      return this.secretOrText(schema, v, (nv) => this.set(path, nv === "" && nullable ? null : nv), ctl);
    }
    const long = (schema.maxLength || 0) > 4096;
    const attrs = {
      class: "input", value: v ?? "", ...common, readOnly: this.readOnly, disabled: false,
      placeholder: dflt != null && dflt !== "" ? `default: ${dflt}` : nullable ? "unset" : "",
      onInput: (e) => this.set(path, e.target.value === "" && nullable ? null : e.target.value),
    };
    return long ? h("textarea", { ...attrs, rows: 4 }) : h("input", { ...attrs, type: "text" });
  }
}

/** Put each issue next to its field (or the closest ancestor shown); return those left over. */
export function showIssues(container, issues) {
  for (const el of container.querySelectorAll(".field-error")) { el.textContent = ""; el.parentElement.classList.remove("has-error"); }
  const unplaced = [];
  for (const issue of issues) {
    let path = issue.path || "";
    if (path && !/^(spec|metadata|apiVersion|kind)\b/.test(path)) path = "spec." + path;
    let target = null;
    let p = path;
    while (p) {
      target = container.querySelector(`.field-error[data-error-for="${CSS.escape(p)}"]`);
      if (target) break;
      const up = p.replace(/(\.[^.[\]]+|\[[^\]]*\])$/, "");
      if (up === p) break;
      p = up;
    }
    if (target) {
      target.append(h("div", {}, (p !== path ? `${issue.path}: ` : "") + issue.message));
      target.parentElement.classList.add("has-error");
    } else unplaced.push(issue);
  }
  return unplaced;
}
