// Prompt Center: versions, diff between versions, labels, A/B weights and the figures per version.
import { api, get, listAll, int, session, enc } from "../api.js";
import { h, clear, card, table, badge, toast, errorBox, sideBySide, fmtInt, fmtMs, colorFor, empty } from "../ui.js";
import { splitBar } from "../charts.js";

export async function render(rest) {
  const prompts = (await listAll("/api/v1/prompts", "prompts")).sort((a, b) => a.promptKey.localeCompare(b.promptKey));
  const key = rest[0] || (prompts[0] || {}).promptKey;
  const nav = h("nav", { class: "list-nav", "aria-label": "Prompts" }, prompts.map(({ promptKey: k, versions }) =>
    h("a", { href: `#/prompts/${enc(k)}`, class: k === key ? "active" : "", "data-prompt": k },
      h("span", {}, k), h("span", { class: "muted small" }, `${versions.length} version${versions.length > 1 ? "s" : ""}`))));
  const detail = key ? await promptDetail(key) : empty("No prompts yet.");
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Prompt Center"),
      h("p", { class: "muted" }, "Versions are immutable; labels and A/B weights decide which one each conversation gets."))),
    h("div", { class: "split-layout" }, card("Prompts", nav, { class: "list-card" }), detail));
}

async function promptDetail(key) {
  const [p, stats] = await Promise.all([get(`/api/v1/prompts/${enc(key)}`),
    get(`/api/v1/prompts/${enc(key)}/stats`).then((r) => r.versions).catch(() => [])]);
  // each version's entry (template, description, variables) beside its name
  const versions = p.versions.map((v) => ({ ...v.entry, version: v.version }));
  const release = p.prompt.release || { labels: {}, weights: {} };
  const statOf = (v) => stats.find((x) => x.version === v);
  const labelsOf = (v) => Object.entries(release.labels || {}).filter(([, ver]) => ver === v).map(([l]) => l);
  const canWrite = session.can("prompts.write");

  const versionsTable = table([
    { label: "Version", render: (v) => h("span", {}, h("strong", {}, v.version), " ", labelsOf(v.version).map((l) => badge(l, "info"))) },
    { label: "Weight", class: "num", render: (v) => release.weights && release.weights[v.version] != null ? `${release.weights[v.version]}%` : h("span", { class: "muted" }, "–") },
    { label: "Requests", class: "num", render: (v) => fmtInt(statOf(v.version)?.requests ?? 0) },
    { label: "Errors", class: "num", render: (v) => { const s = statOf(v.version); if (!s) return "0"; const rate = s.requests ? (100 * s.errors) / s.requests : 0; return h("span", { class: s.errors ? "bad" : "" }, `${s.errors} (${rate.toFixed(1)}%)`); } },
    { label: "Tokens in / out", class: "num", render: (v) => { const s = statOf(v.version); return s ? `${fmtInt(int(s.inputTokens))} / ${fmtInt(int(s.outputTokens))}` : "–"; } },
    { label: "Latency p50 / p95", class: "num", render: (v) => { const s = statOf(v.version); return s ? `${fmtMs(s.latencyP50Ms)} / ${fmtMs(s.latencyP95Ms)}` : "–"; } },
    { label: "Description", render: (v) => h("span", { class: "muted" }, v.description) },
  ], versions, { rowProps: (v) => ({ "data-version": v.version }) });

  // ---- diff between versions
  let a = versions.length > 1 ? versions[versions.length - 2].version : versions[0].version;
  let b = versions[versions.length - 1].version;
  const diffBox = h("div", {});
  const drawDiff = () => {
    const va = versions.find((v) => v.version === a), vb = versions.find((v) => v.version === b);
    clear(diffBox, sideBySide(va.template, vb.template, { leftTitle: `version ${a}`, rightTitle: `version ${b}`, testid: "prompt-diff" }));
  };
  const pick = (value, set) => h("select", { class: "input input-sm", onChange: (e) => { set(e.target.value); drawDiff(); } },
    versions.map((v) => h("option", { value: v.version, selected: v.version === value }, v.version)));
  drawDiff();

  // ---- release editor: labels and weights
  const draft = { labels: { ...(release.labels || {}) }, weights: { ...(release.weights || {}) } };
  const relBox = h("div", {});
  const drawRelease = () => {
    const total = Object.values(draft.weights).reduce((x, y) => x + Number(y || 0), 0);
    const useWeights = Object.keys(draft.weights).length > 0;
    clear(relBox,
      h("h4", {}, "A/B weights"),
      h("p", { class: "help" }, "Share of conversations per version; they must sum to 100. With no weights, labels or the newest version decide."),
      useWeights ? splitBar(Object.entries(draft.weights).map(([v, w]) => ({ label: v, value: Number(w), color: colorFor("v" + v) }))) : null,
      h("div", { class: "weights" }, versions.map((v) => h("div", { class: "weight-row" },
        h("span", { class: "weight-name" }, v.version),
        h("input", { type: "range", min: 0, max: 100, value: draft.weights[v.version] ?? 0, disabled: !canWrite, "aria-label": `weight of ${v.version}`,
          onInput: (e) => { draft.weights[v.version] = Number(e.target.value); drawRelease(); } }),
        h("input", { class: "input input-num", type: "number", min: 0, max: 100, value: draft.weights[v.version] ?? 0, disabled: !canWrite, "data-weight": v.version,
          onChange: (e) => { draft.weights[v.version] = Number(e.target.value); drawRelease(); } }),
        h("span", { class: "muted" }, "%")))),
      h("div", { class: `sum ${useWeights && total !== 100 ? "bad" : ""}` }, useWeights ? `Total ${total}%` : "No split set",
        canWrite && useWeights ? h("button", { class: "btn btn-sm btn-ghost", type: "button", onClick: () => { draft.weights = {}; drawRelease(); } }, "Clear split") : null),
      h("h4", {}, "Labels"),
      h("p", { class: "help" }, "An agent can follow a label (promptLabel) instead of pinning a version."),
      h("div", {}, Object.entries(draft.labels).map(([l, v]) => h("div", { class: "kv-row" },
        h("input", { class: "input", value: l, disabled: !canWrite, "aria-label": "label", onChange: (e) => { delete draft.labels[l]; draft.labels[e.target.value] = v; drawRelease(); } }),
        h("select", { class: "input", disabled: !canWrite, onChange: (e) => { draft.labels[l] = e.target.value; } }, versions.map((x) => h("option", { value: x.version, selected: x.version === v }, x.version))),
        canWrite ? h("button", { class: "btn btn-sm btn-ghost", type: "button", onClick: () => { delete draft.labels[l]; drawRelease(); } }, "Remove") : null))),
      canWrite ? h("div", { class: "array-tools" },
        h("button", { class: "btn btn-sm", type: "button", onClick: () => { draft.labels[Object.keys(draft.labels).length ? `label${Object.keys(draft.labels).length + 1}` : "prod"] = versions[versions.length - 1].version; drawRelease(); } }, "+ Add label")) : null,
      canWrite ? h("div", { class: "form-actions" }, h("button", { class: "btn btn-primary", "data-testid": "save-prompt-release", onClick: save }, "Save release")) : null,
      h("div", { class: "release-status" }));
  };
  async function save() {
    const weights = Object.fromEntries(Object.entries(draft.weights).filter(([, w]) => Number(w) > 0));
    try {
      // the current version (set by a prompt rollback) stays what it is
      await api("PUT", `/api/v1/prompts/${enc(key)}/release`, { labels: draft.labels, weights, ...(release.current ? { current: release.current } : {}) });
      toast(`Saved the release of ${key}`);
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (e) { clear(relBox.querySelector(".release-status"), errorBox(e)); }
  }
  drawRelease();

  // ---- new version
  const latest = versions[versions.length - 1];
  const nv = { version: "", description: latest.description, template: latest.template };
  const nvStatus = h("div", {});
  const newVersion = canWrite ? card("Publish a new version", h("div", { class: "form-grid" },
    h("div", { class: "field" }, h("label", { class: "field-label", for: "nv-version" }, "Version"),
      h("input", { class: "input", id: "nv-version", placeholder: "e.g. 3.0.12", onInput: (e) => { nv.version = e.target.value; } })),
    h("div", { class: "field" }, h("label", { class: "field-label", for: "nv-desc" }, "Description"),
      h("input", { class: "input", id: "nv-desc", value: nv.description, onInput: (e) => { nv.description = e.target.value; } })),
    h("div", { class: "field field-wide" }, h("label", { class: "field-label", for: "nv-template" }, "Template"),
      h("p", { class: "help" }, "{{name}} placeholders are filled from the variables."),
      h("textarea", { class: "input code", id: "nv-template", rows: 8, value: nv.template, onInput: (e) => { nv.template = e.target.value; } })),
    h("div", { class: "field-wide form-actions" }, h("button", { class: "btn btn-primary", onClick: async () => {
      try {
        await api("POST", "/api/v1/apply", { manifest: { apiVersion: "specmesh.io/v1", kind: "Prompt", metadata: { name: key }, spec: nv } });
        toast(`Published ${key} ${nv.version}`);
        window.dispatchEvent(new HashChangeEvent("hashchange"));
      } catch (e) { clear(nvStatus, errorBox(e)); }
    } }, "Publish version")), nvStatus), { subtitle: "Starts from the newest version's template." }) : null;

  return h("div", { class: "stack" },
    card(key, versionsTable, { subtitle: "Figures come from the traces of the turns each version served (invoke_agent spans).", actions: badge(`${versions.length} versions`) }),
    card("Release: labels and A/B weights", relBox, {}),
    card("Compare versions", diffBox, { actions: h("div", { class: "inline" }, pick(a, (v) => { a = v; }), h("span", { class: "muted" }, "→"), pick(b, (v) => { b = v; })) }),
    newVersion);
}
