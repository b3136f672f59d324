// Releases: canary weight, header match, promote and abort, with the Istio objects the change
// would publish shown before it is applied.
import { api, get, listAll, int, session, enc } from "../api.js";
import { h, clear, card, badge, table, toast, errorBox, confirmDialog, sideBySide, toYaml, debounce, empty, spinner } from "../ui.js";
import { splitBar } from "../charts.js";
import { trackBadges, instancesOf } from "./agents.js";

/** The agent's Release, or null when it has none (GetRelease answers ``{}``). */
async function releaseOf(agent) {
  return (await get(`/api/v1/agents/${enc(agent)}/release`)).release || null;
}

export async function render(rest) {
  const agents = await listAll("/api/v1/agents", "agents");
  const releases = Object.fromEntries(await Promise.all(agents.map(async (a) => [a.name, await releaseOf(a.name)])));
  const name = rest[0] || (agents.find((a) => releases[a.name]?.canaryRevision != null) || agents[0] || {}).name;
  const list = h("nav", { class: "list-nav", "aria-label": "Agents" }, agents.map((a) => {
    const r = releases[a.name];
    return h("a", { href: `#/releases/${enc(a.name)}`, class: a.name === name ? "active" : "", "data-release": a.name },
      h("span", {}, a.name),
      r && r.canaryRevision != null ? badge(`canary ${r.canaryWeight}%`, "canary") : h("span", { class: "muted small" }, "stable only"));
  }));
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Releases"),
      h("p", { class: "muted" }, "Split traffic between the stable and canary tracks; see the Istio objects before you apply."))),
    h("div", { class: "split-layout" }, card("Agents", list, { class: "list-card" }), name ? await releaseEditor(name, releases[name]) : empty("No agents.")));
}

const DECISION_BADGE = { pass: "ok", fail: "bad", hold: "info" };
const PHASE_BADGE = { running: "info", promoted: "ok", aborted: "bad", cancelled: "warn" };
const pct = (v) => (v == null ? "–" : `${(100 * Number(v)).toFixed(1)}%`);

function trackFigures(f) {
  if (!f) return h("span", { class: "muted" }, "–");
  return h("span", {}, `${f.requests} turns, ${f.errors} errors (${pct(f.errorRate)}), p95 ${f.p95Seconds == null ? "–" : `${Number(f.p95Seconds).toFixed(3)} s`}`,
    f.costPerTurn ? h("span", { class: "muted small" }, ` · $${Number(f.costPerTurn).toFixed(6)}/turn`) : null);
}

/** The release analysis (docs/analysis.md): its phase, then per step the weight, the
 *  decision, both tracks' figures and every gate's bound against its threshold. */
function analysisCard(analysis) {
  const gates = (g) => (g || []).map((x) => h("div", { "data-gate": x.gate },
    badge(x.failed ? "failed" : x.judged ? "ok" : "not judged", x.failed ? "bad" : x.judged ? "ok" : "neutral"), " ",
    h("span", {}, x.gate), x.judged ? h("span", { class: "muted small" }, ` bound ${Number(x.bound).toPrecision(3)} (max ${x.threshold})`) : h("span", { class: "muted small" }, ` ${x.reason}`)));
  return card("Analysis", h("div", { "data-testid": "release-analysis" },
    h("p", {}, badge(analysis.phase, PHASE_BADGE[analysis.phase] || "neutral"),
      ` canary revision ${int(analysis.canaryRevision)} against stable revision ${int(analysis.stableRevision)} · step ${Number(analysis.step) + 1} of ${analysis.steps}`),
    table([
      { label: "Step", render: (e) => `${Number(e.step) + 1}` },
      { label: "Weight", render: (e) => `${e.weight}%` },
      { label: "Decision", render: (e) => badge(e.decision, DECISION_BADGE[e.decision] || "neutral") },
      { label: "Stable", render: (e) => trackFigures(e.figures?.stable) },
      { label: "Canary", render: (e) => trackFigures(e.figures?.canary) },
      { label: "Gates", render: (e) => h("div", {}, gates(e.figures?.gates), h("div", { class: "muted small" }, e.reason || "")) },
    ], analysis.timeline || [], { rowProps: (e) => ({ "data-step": e.step }) })),
  { subtitle: "Steps walked by the control plane: a failed gate aborts the release, passing every step promotes it." });
}

/** ``current``: the agent's Release (its ``spec``, a ReleaseSpec, is what is edited and
 *  sent back), or null. */
async function releaseEditor(name, current) {
  const [infos, instances] = await Promise.all([listAll(`/api/v1/agents/${enc(name)}/revisions`, "revisions"), instancesOf(name)]);
  const revisions = infos.map((r) => ({ ...r, revision: int(r.revision) }));
  const latest = Math.max(...revisions.map((r) => r.revision));
  const canWrite = session.can("releases.write");
  const draft = structuredClone(current ? current.spec : {});
  // every write is guarded by the version shown: a change made meanwhile is a conflict
  const expectedVersion = current ? String(current.version || 0) : "0";
  draft.canaryWeight ??= 0;
  draft.headerMatch ??= [];
  const controls = h("div", {});
  const previewBox = h("div", {});
  const split = h("div", {});

  const revSelect = (value, onChange, { none, testid }) => h("select", { class: "input", disabled: !canWrite, "data-testid": testid, onChange: (e) => onChange(e.target.value === "" ? null : Number(e.target.value)) },
    h("option", { value: "", selected: value == null }, none),
    revisions.slice().sort((a, b) => b.revision - a.revision).map((r) => h("option", { value: r.revision, selected: r.revision === value }, `revision ${r.revision}${r.revision === latest ? " (latest)" : ""}`)));

  function drawSplit() {
    const w = draft.canaryWeight || 0;
    clear(split, splitBar([{ label: "stable", value: 100 - w, color: "#4f46e5" }, { label: "canary", value: w, color: "#d97706" }]),
      draft.headerMatch.length ? h("p", { class: "muted small" }, "Plus: calls matching the headers below always go to the canary.") : null);
  }

  function drawControls() {
    const weightNum = h("input", { class: "input input-num", type: "number", min: 0, max: 100, value: draft.canaryWeight, disabled: !canWrite, "data-testid": "canary-weight-number",
      onChange: (e) => setWeight(Number(e.target.value)) });
    const setWeight = (w) => {
      draft.canaryWeight = w;
      if (w > 0 && draft.canaryRevision == null) { draft.canaryRevision = latest; drawControls(); }
      weightNum.value = w; slider.value = w; drawSplit(); schedule();
    };
    const slider = h("input", { type: "range", min: 0, max: 100, step: 1, value: draft.canaryWeight, disabled: !canWrite, "data-testid": "canary-weight", "aria-label": "canary weight",
      onInput: (e) => setWeight(Number(e.target.value)) });
    clear(controls,
      h("div", { class: "form-grid" },
        h("div", { class: "field" }, h("label", { class: "field-label" }, "Stable revision"), h("p", { class: "help" }, "Served by track stable; the latest when unset."),
          revSelect(draft.stableRevision, (v) => { draft.stableRevision = v; schedule(); }, { none: "latest", testid: "stable-revision" })),
        h("div", { class: "field" }, h("label", { class: "field-label" }, "Canary revision"), h("p", { class: "help" }, "Served by track canary."),
          revSelect(draft.canaryRevision, (v) => { draft.canaryRevision = v; if (v == null) { draft.canaryWeight = 0; draft.headerMatch = []; drawControls(); } schedule(); }, { none: "no canary", testid: "canary-revision" })),
        h("div", { class: "field field-wide" }, h("label", { class: "field-label" }, "Canary weight"), h("p", { class: "help" }, "Share of calls sent to the canary, in percent."),
          h("div", { class: "slider-row" }, slider, weightNum, h("span", { class: "muted" }, "%"))),
        h("div", { class: "field field-wide" }, h("label", { class: "field-label" }, "Header match"),
          h("p", { class: "help" }, "Calls carrying all of these headers go to the canary, whatever the weight (e.g. x-canary: true for testers)."),
          draft.headerMatch.map((m, i) => {
            const type = m.exact != null ? "exact" : m.prefix != null ? "prefix" : m.regex != null ? "regex" : "exact";
            return h("div", { class: "kv-row header-row" },
              h("input", { class: "input", value: m.name || "", placeholder: "header name", disabled: !canWrite, "data-testid": `header-name-${i}`, onInput: (e) => { m.name = e.target.value; schedule(); } }),
              h("select", { class: "input input-sm", disabled: !canWrite, onChange: (e) => { const v = m[type] ?? ""; delete m.exact; delete m.prefix; delete m.regex; m[e.target.value] = v; schedule(); } },
                ["exact", "prefix", "regex"].map((t) => h("option", { value: t, selected: t === type }, t))),
              h("input", { class: "input", value: m[type] ?? "", placeholder: "value", disabled: !canWrite, "data-testid": `header-value-${i}`, onInput: (e) => { m[type] = e.target.value; schedule(); } }),
              canWrite ? h("button", { class: "btn btn-sm btn-ghost", type: "button", onClick: () => { draft.headerMatch.splice(i, 1); drawControls(); schedule(); } }, "Remove") : null);
          }),
          canWrite ? h("div", { class: "array-tools" }, h("button", { class: "btn btn-sm", type: "button", "data-testid": "add-header",
            onClick: () => { draft.headerMatch.push({ name: "x-canary", exact: "true" }); if (draft.canaryRevision == null) draft.canaryRevision = latest; drawControls(); schedule(); } }, "+ Add header match")) : null)));
    drawSplit();
  }

  let seq = 0;
  async function preview() {
    const mine = ++seq;
    clear(previewBox, spinner("Rendering the Istio objects…"));
    try {
      const r = await api("POST", `/api/v1/agents/${enc(name)}/release/preview`, draft);
      if (mine !== seq) return;
      const changed = toYaml(r.current) !== toYaml(r.proposed);
      clear(previewBox,
        h("p", { class: changed ? "status status-warn" : "status status-ok", "data-testid": "preview-status" },
          changed ? "This change publishes new Istio objects (validated against the Istio CRDs)." : "No change to the published objects."),
        r.proposed.map((obj, i) => h("div", { class: "obj", "data-kind": obj.kind },
          h("h4", {}, obj.kind, " ", h("span", { class: "muted small" }, `${obj.metadata.namespace}/${obj.metadata.name}`)),
          sideBySide(toYaml(r.current[i] || {}), toYaml(obj), { leftTitle: "published now", rightTitle: "after this change", testid: `preview-${obj.kind}` }))));
    } catch (e) { if (mine === seq) clear(previewBox, errorBox(e)); }
  }
  const schedule = debounce(preview, 250);

  async function applyRelease() {
    try {
      await api("PUT", `/api/v1/agents/${enc(name)}/release?expectedVersion=${expectedVersion}`, draft);
      toast(`Release of ${name} applied: canary ${draft.canaryWeight}%`);
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (e) { toast(e.message, "error"); clear(previewBox, errorBox(e)); }
  }
  async function action(kind) {
    const ok = await confirmDialog({
      title: kind === "promote" ? `Promote the canary of ${name}?` : `Abort the canary of ${name}?`, danger: kind === "abort",
      confirm: kind === "promote" ? "Promote" : "Abort canary",
      body: h("p", {}, kind === "promote" ? `Revision ${int(current.canaryRevision)} becomes stable and the split ends.` : "All traffic goes back to stable; the canary revision stays in history."),
    });
    if (!ok) return;
    try { await api("POST", `/api/v1/agents/${enc(name)}/release/${kind}`, { expectedVersion }); toast(kind === "promote" ? "Canary promoted" : "Canary aborted"); window.dispatchEvent(new HashChangeEvent("hashchange")); }
    catch (e) { toast(e.message, "error"); }
  }

  drawControls();
  preview();
  const hasCanary = current && current.canaryRevision != null;
  return h("div", { class: "stack" },
    card(name, h("div", {},
      h("div", { class: "inline" }, h("span", { class: "muted" }, "Live: "), trackBadges(instances),
        current ? h("span", { class: "muted small" }, ` · applied: stable ${current.stableRevision ?? "latest"}, canary ${current.canaryRevision ?? "none"} at ${current.canaryWeight || 0}%`) : h("span", { class: "muted small" }, " · no release policy yet (all traffic to stable)")),
      split, controls,
      canWrite ? h("div", { class: "form-actions" },
        h("button", { class: "btn btn-primary", "data-testid": "apply-release", onClick: applyRelease }, "Apply release"),
        hasCanary ? h("button", { class: "btn", "data-testid": "promote", onClick: () => action("promote") }, "Promote canary") : null,
        hasCanary ? h("button", { class: "btn btn-danger-ghost", "data-testid": "abort", onClick: () => action("abort") }, "Abort canary") : null)
        : h("p", { class: "muted small" }, "Read only: your role cannot change releases.")),
      { subtitle: "Release policy" }),
    current?.analysis ? analysisCard(current.analysis) : null,
    card("Istio objects this change publishes", previewBox, { subtitle: "Rendered by the control plane from the policy above; nothing is applied until you press Apply." }));
}
