// An agent's workload as the controller observes it (phase, desired/ready per track, its
// instances), refreshed while the page is open, and the scale control.
import { api, get, int, session, enc } from "../api.js";
import { h, clear, card, table, badge, dot, when, toast, errorBox } from "../ui.js";

export const POLL_MS = 2000;
const TRACKS = ["stable", "canary"];
const MAX_REPLICAS = 100;
/** How long after a change a missing status reads as "not picked up yet" rather than "not run". */
const FRESH_MS = 30_000;

const AGENT_PHASE = {
  Running: "ok", Progressing: "info", CrashLoop: "bad", Failed: "bad", Stopped: "neutral", Unknown: "warn", NotRunning: "neutral", Pending: "info",
};
const INSTANCE_PHASE = { Running: "ok", Starting: "info", Unready: "warn", CrashLoop: "bad", Failed: "bad", Stopping: "neutral" };

/** The agent's phase as a badge (CrashLoop and Failed in red). */
export function phaseBadge(phase, props = {}) {
  const label = phase === "NotRunning" ? "Not running" : phase || "Unknown";
  return badge(label, AGENT_PHASE[phase] || "warn", { "data-phase": phase || "Unknown", ...props });
}

function instancePhase(phase) {
  return badge(phase, INSTANCE_PHASE[phase] || "warn", { "data-phase": phase });
}

/**
 * Calls ``refresh`` every POLL_MS while ``el`` is shown: stops for good once ``ctx.stale()``
 * (the user went to another page) or the user signed out; skips while ``el`` is not in the
 * document yet. ``refresh`` handles its own errors.
 */
export function pollWhileShown(el, ctx, refresh) {
  async function tick() {
    if (ctx.stale() || !session.token) return;
    if (el.isConnected) await refresh();
    setTimeout(tick, POLL_MS);
  }
  setTimeout(tick, POLL_MS);
}

// After a scale the page is drawn again (the revision changed): say what happened there.
let flash = null;

/**
 * The workload card of agent ``name``: drawn from ``initial`` (its status), then from
 * GET /agents/{name}/status every POLL_MS until ``ctx.stale()`` (the user left the page).
 */
export function workloadPanel(name, record, initial, ctx) {
  const summary = h("div", { class: "kpis workload-kpis" });
  const body = h("div", { class: "stack" });
  let status = initial;
  let pollError = null;

  function draw() {
    const tracks = status.tracks || {};
    const shown = TRACKS.filter((t) => tracks[t]);
    clear(summary,
      kpiBox("Phase", phaseBadge(status.phase, { "data-testid": "workload-phase" })),
      kpiBox("Ready", h("span", { "data-testid": "workload-ready" }, `${status.readyReplicas || 0}/${status.desiredReplicas || 0}`), "ready / desired, all tracks"),
      TRACKS.map((t) => kpiBox(`Track ${t}`,
        h("span", { "data-track-ready": t }, tracks[t] ? `${tracks[t].ready}/${tracks[t].desired}` : "–"),
        tracks[t] ? `desired ${tracks[t].desired} · ready ${tracks[t].ready}` : t === "canary" ? "not running" : "no instance desired")));
    const instances = status.instances || [];
    const notice = noticeFor();
    clear(body,
      notice,
      pollError ? errorBox(pollError) : null,
      table([
        { label: "Instance", render: (i) => h("code", {}, i.instanceId) },
        { label: "Track", render: (i) => badge(i.track, i.track === "stable" ? "info" : "canary") },
        { label: "Phase", render: (i) => instancePhase(i.phase) },
        { label: "Ready", render: (i) => h("span", { class: "health", "data-instance-ready": i.instanceId }, dot(i.ready ? "ok" : "warn", i.ready ? "ready" : "not ready"), i.ready ? "yes" : "no") },
        { label: "Serving revision", render: (i) => int(i.servingRevision) ? badge(`rev ${int(i.servingRevision)}`, int(i.servingRevision) === int(status.revision) ? "ok" : "warn") : h("span", { class: "muted" }, "none yet") },
        { label: "Restarts", class: "num", render: (i) => h("span", { class: i.restarts ? "bad" : "" }, String(i.restarts)) },
        { label: "Last error", render: (i) => i.lastError ? h("span", { class: "clip bad small", title: i.lastError }, i.lastError) : h("span", { class: "muted" }, "–") },
        { label: "Since", render: (i) => when(i.since) },
      ], instances, {
        empty: shown.length ? "No instance yet: the runtime is starting them." : "No instance runs.",
        rowProps: (i) => ({ "data-instance": i.instanceId }),
      }),
      h("p", { class: "muted small" }, status.observedAt
        ? h("span", {}, `Runtime ${status.runtime} · reconciled revision ${int(status.revision)} · observed `, when(status.observedAt), ` · refreshed every ${POLL_MS / 1000} s`)
        : `Refreshed every ${POLL_MS / 1000} s`));
  }

  function noticeFor() {
    if (status.phase === "NotRunning") {
      const fresh = Date.now() - new Date(record.revisionInfo.createdAt).getTime() < FRESH_MS;
      return h("div", { class: "alert alert-info", "data-testid": "workload-error" },
        fresh ? "Waiting for the controller to pick this revision up…" : status.lastError || "No runtime reports on this agent.");
    }
    if (!status.lastError) return null;
    const kind = status.phase === "CrashLoop" || status.phase === "Failed" ? "alert-error" : "alert-warn";
    return h("div", { class: `alert ${kind}`, "data-testid": "workload-error" }, h("strong", {}, "Last error: "), status.lastError);
  }

  async function refresh() {
    try {
      const { status: next } = await get(`/api/v1/agents/${enc(name)}/status`);
      if (ctx.stale()) return;
      status = next; pollError = null;
    } catch (e) {
      if (ctx.stale() || e.status === 401) return;
      pollError = e;
    }
    draw();
  }

  const panel = card("Workload", h("div", { class: "stack", "data-testid": "workload" }, summary, body), {
    subtitle: "What runs of this agent, as the controller observes it.",
    actions: scaleControl(name, record, initial),
  });
  const message = flash && flash.agent === name ? flash : null;
  flash = null;
  draw();
  pollWhileShown(panel, ctx, refresh);
  return message ? h("div", { class: "stack" }, h("div", { class: "alert alert-ok", "data-testid": "scale-result" }, message.text), panel) : panel;
}

function kpiBox(label, value, sub) {
  return h("div", { class: "kpi" }, h("div", { class: "kpi-label" }, label), h("div", { class: "kpi-value" }, value), sub ? h("div", { class: "kpi-sub muted" }, sub) : null);
}

/** A track's replicas: this revision's deployment part says, else what the controller
 *  last wanted (a release can run a canary the spec does not enable). */
function desiredOf(record, status, track) {
  const spec = record.spec.deployment?.tracks?.[track];
  if (track === "stable" && spec?.replicas != null) return spec.replicas;
  if (track === "canary" && spec?.enabled) return spec.replicas ?? 1;
  return status.tracks?.[track]?.desired ?? (track === "stable" ? 1 : 0);
}

/** Replicas per track, for those who may change agents (a scale is a new revision). */
function scaleControl(name, record, status) {
  if (!session.can("agents.write")) return h("span", { class: "muted small", "data-testid": "scale-read-only" }, "Read only: your role cannot scale agents.");
  const replicas = h("input", {
    class: "input input-sm input-num", type: "number", min: 0, max: MAX_REPLICAS, step: 1, required: true,
    value: desiredOf(record, status, "stable"), "aria-label": "replicas", "data-testid": "scale-replicas",
  });
  const track = h("select", {
    class: "input input-sm", "aria-label": "track", "data-testid": "scale-track",
    onChange: () => { replicas.value = desiredOf(record, status, track.value); },
  }, TRACKS.map((t) => h("option", { value: t }, t)));
  const button = h("button", { class: "btn btn-sm btn-primary", type: "submit", "data-testid": "scale-apply" }, "Scale");
  const error = h("div", { class: "scale-error" });
  return h("form", {
    class: "scale", "data-testid": "scale",
    onSubmit: async (e) => {
      e.preventDefault();
      const n = Number(replicas.value);
      button.disabled = true; clear(error);
      try {
        const r = await api("POST", `/api/v1/agents/${enc(name)}/scale`, { replicas: n, track: track.value, expectedRevision: int(record.revisionInfo.revision) });
        const text = r.createdRevision ? `Scaled ${track.value} to ${n} replica${n === 1 ? "" : "s"}: revision ${int(r.agent.revisionInfo.revision)}.` : `${track.value} already has ${n} replica${n === 1 ? "" : "s"}.`;
        toast(text);
        for (const w of r.warnings || []) toast(w, "error");
        flash = { agent: name, text };
        window.dispatchEvent(new HashChangeEvent("hashchange"));  // the revision changed: draw the page again
      } catch (err) {
        button.disabled = false;
        clear(error, errorBox(err));
        toast(err.message.split("\n")[0], "error");
      }
    },
  }, h("label", { class: "muted small" }, "Replicas"), track, replicas, button, error);
}
