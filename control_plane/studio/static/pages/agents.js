// Agents: list with health and workload, the form editor (six parts + raw), the workload
// (refreshed while the page is open) and scale control, history with diff and rollback.
import { api, get, listAll, int, session, enc } from "../api.js";
import { SchemaForm, showIssues, formatPath } from "../form.js";
import { workloadPanel, phaseBadge, pollWhileShown } from "./workload.js";
import {
  h, clear, card, tabs, table, badge, dot, when, toast, confirmDialog, errorBox, empty, spinner,
  toYaml, sideBySide, debounce, codeBlock, humanize, jsonDiff,
} from "../ui.js";

let schemaCache = null;
export async function agentSchema() {
  if (!schemaCache) schemaCache = await (await fetch("/studio/schemas/agent.schema.json")).json();
  return schemaCache;
}

export const PARTS = [
  { id: "base", label: "Base" }, { id: "model", label: "Model" }, { id: "mcpServers", label: "MCP servers" },
  { id: "partnerAgents", label: "Partner agents" }, { id: "memory", label: "Memory" }, { id: "knowledge", label: "Knowledge" },
];

/** An instance's EngineState without its prefix: "serving", "degraded", ... */
export const engineState = (i) => (i.state || "ENGINE_STATE_UNSPECIFIED").replace(/^ENGINE_STATE_/, "").toLowerCase();

/** The live instances of ``agent`` in the Agent Registry. */
export const instancesOf = (agent) => listAll("/api/v1/instances", "instances", { agentName: agent });

/** An agent record's revision (RevisionInfo.revision, an int64) as a number. */
export const revisionOf = (agent) => int(agent.revisionInfo.revision);

export function health(instances) {
  if (!instances.length) return { kind: "bad", label: "No live instance" };
  const serving = instances.filter((i) => engineState(i) === "serving").length;
  if (serving === instances.length) return { kind: "ok", label: "Healthy" };
  return serving ? { kind: "warn", label: `${serving}/${instances.length} serving` } : { kind: "bad", label: "Not serving" };
}

export function trackBadges(instances) {
  const by = {};
  for (const i of instances) (by[i.track] ||= []).push(i);
  const tracks = Object.keys(by).sort((a, b) => (a === "stable" ? -1 : b === "stable" ? 1 : a.localeCompare(b)));
  if (!tracks.length) return h("span", { class: "muted" }, "none");
  return h("span", { class: "tracks" }, tracks.map((t) => badge(
    `${t} · ${by[t].length} · rev ${[...new Set(by[t].map((i) => int(i.servingRevision)))].join(",")}`,
    t === "stable" ? "info" : "canary", { "data-track": t })));
}

export async function render(rest, ctx = { stale: () => false }) {
  if (!rest.length) return listPage(ctx);
  if (rest[0] === "new") return newPage();
  return detailPage(rest[0], rest[1] || "spec", rest.slice(2), ctx);
}

async function listPage(ctx) {
  const [agents, instances] = await Promise.all([listAll("/api/v1/agents", "agents"), instancesOf()]);
  const byAgent = (name) => instances.filter((i) => i.agentName === name);
  const healthy = agents.filter((a) => health(byAgent(a.name)).kind === "ok").length;
  // READY and phase follow the controller while the list is shown
  const ready = (a) => a.status && a.status.phase !== "Pending"
    ? h("span", { class: "mono", "data-ready": a.name }, `${a.status.readyReplicas}/${a.status.desiredReplicas}`)
    : h("span", { class: "muted", "data-ready": a.name }, "–");
  const phase = (a) => phaseBadge(a.status ? a.status.phase : "NotRunning", { "data-agent-phase": a.name });
  const cells = new Map(agents.map((a) => [a.name, { ready: h("span", {}, ready(a)), phase: h("span", {}, phase(a)) }]));
  const page = h("div", { class: "page" },
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Agents"), h("p", { class: "muted" }, "Every agent in the spec store: what runs of it (ready / desired) and its live instances per track.")),
      session.can("agents.write") ? h("a", { class: "btn btn-primary", href: "#/agents/new", "data-testid": "new-agent" }, "+ New agent") : null),
    h("div", { class: "kpis" },
      kpi("Agents", agents.length), kpi("Healthy", `${healthy}/${agents.length}`),
      kpi("Live instances", instances.length), kpi("Canary instances", instances.filter((i) => i.track === "canary").length)),
    card(null, table([
      { label: "Agent", render: (a) => h("div", {}, h("a", { class: "strong", href: `#/agents/${enc(a.name)}`, "data-agent": a.name }, a.name), h("span", { class: "muted small clip sub" }, a.spec.base.description)) },
      { label: "Ready", class: "num", render: (a) => cells.get(a.name).ready },
      { label: "Phase", render: (a) => cells.get(a.name).phase },
      { label: "Health", render: (a) => { const x = health(byAgent(a.name)); return h("span", { class: "health" }, dot(x.kind, x.label), x.label); } },
      { label: "Instances", render: (a) => trackBadges(byAgent(a.name)) },
      { label: "Revision", class: "num", render: (a) => badge(`rev ${revisionOf(a)}`, "neutral", { "data-revision": a.name }) },
      { label: "Updated", class: "nowrap", render: (a) => h("span", {}, when(a.revisionInfo.createdAt), h("span", { class: "muted" }, ` by ${a.revisionInfo.author}`)) },
    ], agents, { empty: "No agents yet." }), { class: "agents-list" }));
  pollWhileShown(page, ctx, async () => {
    let now;
    try { now = await listAll("/api/v1/agents", "agents"); } catch { return; }  // keep what is shown
    if (ctx.stale()) return;
    for (const a of now) {
      const c = cells.get(a.name);
      if (c) { clear(c.ready, ready(a)); clear(c.phase, phase(a)); }
    }
  });
  return page;
}

export function kpi(label, value, sub) {
  return h("div", { class: "kpi" }, h("div", { class: "kpi-label" }, label), h("div", { class: "kpi-value" }, value), sub ? h("div", { class: "kpi-sub muted" }, sub) : null);
}

async function newPage() {
  const manifest = {
    apiVersion: "specmesh.io/v1", kind: "Agent", metadata: { name: "" },
    spec: { base: { description: "", promptKey: "" }, model: { model: "" } },
  };
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {},
      h("div", { class: "crumbs" }, h("a", { href: "#/agents" }, "Agents"), " / new"),
      h("h1", {}, "New agent"), h("p", { class: "muted" }, "Fill in the six parts; the control plane checks every change as you type."))),
    await editor({ manifest, isNew: true }));
}

async function detailPage(name, tab, rest, ctx) {
  const [{ agent: record }, instances, { status }] = await Promise.all([
    get(`/api/v1/agents/${enc(name)}`), instancesOf(name), get(`/api/v1/agents/${enc(name)}/status`)]);
  // the registry's view of it, refreshed like the workload
  const liveLine = (list) => { const x = health(list); return [h("span", { class: "health", "data-testid": "registry-health" }, dot(x.kind, x.label), x.label), " · ", trackBadges(list)]; };
  const live = h("span", {}, liveLine(instances));
  pollWhileShown(live, ctx, async () => {
    try {
      const now = await instancesOf(name);
      if (!ctx.stale()) clear(live, liveLine(now));
    } catch { /* keep what is shown; the workload panel reports errors */ }
  });
  const tabItems = [{ id: "spec", label: "Spec" }, { id: "history", label: "History" }, { id: "instances", label: "Instances & card" }];
  let body;
  if (tab === "history") body = await historyTab(name, record, rest);
  else if (tab === "instances") body = instancesTab(record, instances);
  else {
    const manifest = { apiVersion: "specmesh.io/v1", kind: "Agent", metadata: { name }, spec: record.spec };
    body = await editor({ manifest, revision: revisionOf(record) });
  }
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {},
      h("div", { class: "crumbs" }, h("a", { href: "#/agents" }, "Agents"), ` / ${name}`),
      h("h1", {}, name, " ", badge(`rev ${revisionOf(record)}`, "neutral", { "data-testid": "current-revision" })),
      h("p", { class: "muted" }, record.spec.base.description, " · ", live))),
    workloadPanel(name, record, status, ctx),
    tabs(tabItems, { active: tab, onSelect: (t) => { location.hash = `#/agents/${enc(name)}/${t}`; }, testid: "agent-tabs" }),
    body);
}

// ------------------------------------------------------------ editor

export async function editor({ manifest, revision = null, isNew = false }) {
  const root = await agentSchema();
  const readOnly = !session.can("agents.write");
  const state = { part: "base", issues: [], result: null, validating: false, raw: "json", rawError: null };
  let m = structuredClone(manifest);
  const formBox = h("div", { class: "editor-form" });
  const side = h("aside", { class: "editor-side" });
  const tabBox = h("div", {});

  const form = new SchemaForm({ root, value: m, readOnly, onChange: (path, structural) => { if (structural) drawForm(); schedule(); } });

  function partOf(path) {
    const p = path.startsWith("spec.") ? path.slice(5) : path;
    const head = p.split(/[.[]/)[0];
    return PARTS.some((x) => x.id === head) ? head : path.startsWith("metadata") ? "base" : "raw";
  }

  function drawTabs() {
    const counts = {};
    for (const i of state.issues) { const p = partOf(i.path); counts[p] = (counts[p] || 0) + 1; }
    clear(tabBox, tabs([...PARTS, { id: "raw", label: "Raw JSON / YAML" }].map((p) => ({ ...p, badge: counts[p.id] })),
      { active: state.part, onSelect: (id) => { state.part = id; drawTabs(); drawForm(); }, testid: "part-tabs" }));
  }

  function drawForm() {
    const specSchema = form.resolve(root.properties.spec);
    if (state.part === "raw") {
      const text = JSON.stringify(m, null, 2);
      const area = h("textarea", {
        class: "input code raw", rows: 28, spellcheck: "false", value: text, readOnly, "data-testid": "raw-json",
        onInput: (e) => {
          try { const parsed = JSON.parse(e.target.value); m = parsed; form.value = m; state.rawError = null; schedule(); }
          catch (err) { state.rawError = err.message; }
          rawErr.textContent = state.rawError || "";
        },
      });
      const rawErr = h("div", { class: "field-error" });
      const yaml = codeBlock(toYaml(m), { "data-testid": "raw-yaml" });
      clear(formBox, h("div", { class: "raw-grid" },
        h("div", {}, h("h3", {}, "JSON ", h("span", { class: "muted small" }, readOnly ? "(read only)" : "(editable: what you type is validated and deployed)")), area, rawErr),
        h("div", {}, h("h3", {}, "YAML ", h("span", { class: "muted small" }, "(for specmesh apply -f)")), yaml)));
      return;
    }
    const part = PARTS.find((p) => p.id === state.part);
    const sub = form.unwrap(specSchema.properties[part.id]).schema;
    const nameField = isNew && state.part === "base" ? h("div", { class: "form-grid" },
      h("div", { class: "field", "data-path": "metadata.name" },
        h("label", { class: "field-label", for: "f-name" }, "Agent name", h("span", { class: "req" }, " *")),
        h("p", { class: "help" }, "Logical name; the resource name (lower case) must be unique."),
        h("input", { class: "input", id: "f-name", "data-control": "metadata.name", value: m.metadata.name, onInput: (e) => { m.metadata.name = e.target.value; schedule(); } }),
        h("div", { class: "field-error", "data-error-for": "metadata.name" }))) : null;
    clear(formBox,
      h("div", { class: "part-head" }, h("h3", {}, part.label), sub.description ? h("p", { class: "muted" }, sub.description) : null),
      nameField,
      form.kind(sub) === "array" ? form.renderField(part.id, specSchema.properties[part.id], ["spec", part.id], false) : form.renderObject(sub, ["spec", part.id]));
    placeIssues();
  }

  function placeIssues() {
    const unplaced = showIssues(formBox, state.issues);
    drawSide(unplaced);
  }

  function drawSide() {
    const issues = state.issues;
    let status;
    if (state.validating) status = h("div", { class: "status status-pending", "data-testid": "validation" }, h("span", { class: "spin" }), "Checking with the control plane…");
    else if (state.error) status = h("div", { class: "status status-bad", "data-testid": "validation" }, state.error.message);
    else if (issues.length) status = h("div", { class: "status status-bad", "data-testid": "validation" }, `${issues.length} problem${issues.length > 1 ? "s" : ""}`);
    else if (state.result) status = h("div", { class: "status status-ok", "data-testid": "validation" }, "✓ Valid", state.result.changes ? ` · ${state.result.changes.length} change${state.result.changes.length === 1 ? "" : "s"}` : "");
    else if (readOnly) status = h("div", { class: "status", "data-testid": "validation" }, "Viewing revision ", String(revision ?? ""));
    else status = h("div", { class: "status", "data-testid": "validation" }, "Not checked yet");
    const changes = state.result && state.result.changes && state.result.changes.length
      ? h("div", { class: "changes" }, h("h4", {}, "Changes to deploy"), h("ul", { class: "change-list" }, state.result.changes.map(changeItem))) : null;
    clear(side,
      h("div", { class: "side-card" },
        h("h3", {}, "Validation"), status,
        issues.length ? h("ul", { class: "issue-list", "data-testid": "issues" }, issues.map((i) => h("li", {},
          h("button", { class: "link", type: "button", onClick: () => { const p = partOf(i.path); if (p !== state.part) { state.part = p; drawTabs(); drawForm(); } focusField(i.path); } },
            h("code", {}, i.path || "(document)")), h("div", {}, i.message)))) : null,
        changes,
        readOnly ? h("p", { class: "muted small", "data-testid": "read-only" }, "Read only: your role cannot deploy agents.")
          : h("button", { class: "btn btn-primary btn-block", "data-testid": "deploy", disabled: !!issues.length || state.validating, onClick: deploy },
            isNew ? "Create and deploy" : "Deploy"),
        !readOnly && revision ? h("p", { class: "muted small" }, `Deploys on top of revision ${revision}; a concurrent change is refused.`) : null));
  }

  function focusField(path) {
    let p = path.startsWith("spec.") || path.startsWith("metadata") ? path : "spec." + path;
    const el = formBox.querySelector(`[data-control="${CSS.escape(p)}"]`);
    if (el) { el.focus(); el.scrollIntoView({ block: "center" }); }
  }

  let seq = 0;
  async function validate() {
    const mine = ++seq;
    state.validating = true; drawSide();
    try {
      const r = await api("POST", "/api/v1/apply", { manifest: m, dryRun: true });
      if (mine !== seq) return;
      // a dry run does not report changes: compare with what was loaded
      state.result = { ...r, changes: isNew ? null : jsonDiff(manifest.spec, m.spec) };
      state.issues = []; state.error = null;
    } catch (e) {
      if (mine !== seq) return;
      state.result = null;
      state.issues = e.issues && e.issues.length ? e.issues : [];
      state.error = e.issues && e.issues.length ? null : e;
    }
    state.validating = false;
    drawTabs(); placeIssues();
  }
  const schedule = debounce(validate, 350);

  async function deploy() {
    try {
      const body = { manifest: m };
      if (revision) body.expectedRevision = revision;
      const r = await api("POST", "/api/v1/apply", body);
      toast(r.changed ? `Deployed ${r.name} as revision ${r.revision}` : `${r.name}: nothing changed`);
      const target = `#/agents/${enc(r.name)}`;
      if (location.hash === target) window.dispatchEvent(new HashChangeEvent("hashchange"));
      else location.hash = target;
    } catch (e) {
      state.issues = e.issues || []; state.error = e.issues && e.issues.length ? null : e;
      drawTabs(); placeIssues();
      toast(e.message.split("\n")[0], "error");
    }
  }

  drawTabs(); drawForm();
  if (!isNew && !readOnly) validate(); else drawSide();  // a dry run needs agents.write
  return h("div", { class: "editor", "data-testid": "editor" }, tabBox, h("div", { class: "editor-grid" }, h("div", { class: "card editor-main" }, formBox), side));
}

/** One Change (the proto's: path, op CHANGE_OP_*, oldValue, newValue) as a list item. */
export function changeItem(c) {
  const fmt = (v) => (v && typeof v === "object" ? JSON.stringify(v) : String(v));
  const op = c.op.replace(/^CHANGE_OP_/, "").toLowerCase();
  return h("li", { class: `change change-${op}` }, h("code", {}, c.path), " ",
    op === "add" ? h("span", { class: "new" }, fmt(c.newValue)) : op === "remove" ? h("span", { class: "old" }, fmt(c.oldValue))
      : h("span", {}, h("span", { class: "old" }, fmt(c.oldValue)), " → ", h("span", { class: "new" }, fmt(c.newValue))));
}

// ------------------------------------------------------------ history

async function historyTab(name, record, rest) {
  const revisions = (await listAll(`/api/v1/agents/${enc(name)}/revisions`, "revisions"))
    .map((r) => ({ ...r, revision: int(r.revision) }));
  revisions.sort((a, b) => b.revision - a.revision);
  const latest = revisionOf(record);
  let to = Number(rest[1]) || latest;
  let from = Number(rest[0]) || Math.max(1, to - 1);
  const canWrite = session.can("agents.write");
  const diffBox = h("div", { class: "diff-box" });
  const pick = (value, onChange, testid) => h("select", { class: "input input-sm", "data-testid": testid, onChange: (e) => onChange(Number(e.target.value)) },
    revisions.map((r) => h("option", { value: r.revision, selected: r.revision === value }, `revision ${r.revision}`)));

  async function drawDiff() {
    clear(diffBox, spinner());
    try {
      const [{ agent: a }, { agent: b }, { changes }] = await Promise.all([
        get(`/api/v1/agents/${enc(name)}?revision=${from}`), get(`/api/v1/agents/${enc(name)}?revision=${to}`),
        get(`/api/v1/agents/${enc(name)}/diff?fromRevision=${from}&toRevision=${to}`)]);
      clear(diffBox,
        changes.length ? h("ul", { class: "change-list", "data-testid": "diff-changes" }, changes.map(changeItem)) : h("p", { class: "muted" }, "The two revisions are equal."),
        sideBySide(toYaml(a.spec), toYaml(b.spec), { leftTitle: `revision ${from}`, rightTitle: `revision ${to}`, testid: "history-diff" }));
    } catch (e) { clear(diffBox, errorBox(e)); }
  }

  async function rollback(rev) {
    const ok = await confirmDialog({
      title: `Roll back ${name} to revision ${rev}?`, confirm: "Roll back",
      body: h("p", {}, `A new revision equal to revision ${rev} is deployed on top of revision ${latest}. Running instances pick it up without a restart.`),
    });
    if (!ok) return;
    try {
      const r = await api("POST", `/api/v1/agents/${enc(name)}/rollback`, { revision: rev, expectedRevision: latest });
      toast(`Rolled back: revision ${revisionOf(r.agent)} equals revision ${rev}`);
      location.hash = `#/agents/${enc(name)}/history`;
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (e) { toast(e.message, "error"); }
  }

  const rows = table([
    { label: "Revision", render: (r) => h("span", {}, badge(`rev ${r.revision}`, r.revision === latest ? "info" : "neutral"), r.revision === latest ? h("span", { class: "muted small" }, " current") : null) },
    { label: "Message", render: (r) => r.message ? h("span", { class: "clip", title: r.message }, r.message) : h("span", { class: "muted" }, "–") },
    { label: "Author", key: "author" },
    { label: "When", render: (r) => when(r.createdAt) },
    { label: "", class: "actions", render: (r) => h("span", { class: "row-actions" },
      h("button", { class: "btn btn-sm", onClick: () => { to = latest; from = r.revision; location.hash = `#/agents/${enc(name)}/history/${from}/${to}`; } }, "Compare with current"),
      canWrite && r.revision !== latest ? h("button", { class: "btn btn-sm", "data-rollback": r.revision, onClick: () => rollback(r.revision) }, "Roll back to this") : null) },
  ], revisions);
  drawDiff();
  return h("div", { class: "stack" },
    card("Revisions", rows, { subtitle: "Every apply and rollback is a revision; the audit log records who did it." }),
    card("Compare revisions", diffBox, {
      actions: h("div", { class: "inline" }, pick(from, (v) => { from = v; drawDiff(); }, "diff-from"), h("span", { class: "muted" }, "→"), pick(to, (v) => { to = v; drawDiff(); }, "diff-to")),
    }));
}

// ------------------------------------------------------------ instances & card

function instancesTab(record, instances) {
  const spec = record.spec;
  const cardJson = {
    name: record.name, description: spec.base.description, version: String(revisionOf(record)),
    skills: spec.base.skills.map((s) => ({ id: s.id, name: s.name, description: s.description, tags: s.tags })),
    capabilities: { streaming: true },
  };
  return h("div", { class: "grid-2" },
    card("Live instances", table([
      { label: "Instance", render: (i) => h("code", {}, i.instanceId) },
      { label: "Track", render: (i) => badge(i.track, i.track === "stable" ? "info" : "canary") },
      { label: "Serving revision", render: (i) => badge(`rev ${int(i.servingRevision)}`, int(i.servingRevision) === revisionOf(record) ? "ok" : "warn", { "data-instance-revision": i.instanceId }) },
      { label: "State", render: (i) => h("span", { class: "health" }, dot(engineState(i) === "serving" ? "ok" : "warn", engineState(i)), engineState(i)) },
      { label: "Registered", render: (i) => when(i.registeredAt) },
    ], instances, { empty: "No live instance is registered." }), { subtitle: "From the Agent Registry (each sidecar registers its instance with a lease)." }),
    card("Agent card", h("div", {},
      h("p", { class: "muted small" }, "What the engine publishes at /.well-known/agent-card.json for this revision (version = revision)."),
      codeBlock(JSON.stringify(cardJson, null, 2))), {}));
}

export { humanize, formatPath, empty };
