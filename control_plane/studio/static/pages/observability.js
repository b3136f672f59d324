// Observability: traces (list and waterfall across agents) and token / cost dashboards.
import { get, listAll, int, enc, q } from "../api.js";
import { h, clear, card, tabs, table, badge, agentChip, when, fmtInt, fmtMs, fmtUsd, empty, colorFor, codeBlock } from "../ui.js";
import { columnChart, barChart } from "../charts.js";
import { kpi } from "./agents.js";

export async function render(rest) {
  if (rest[0] === "trace" && rest[1]) return tracePage(rest[1]);
  const tab = rest[0] || "traces";
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Observability"),
      h("p", { class: "muted" }, "Conversations across agents, and what the models cost."))),
    tabs([{ id: "traces", label: "Traces" }, { id: "tokens", label: "Tokens & cost" }], { active: tab, onSelect: (t) => { location.hash = `#/observability/${t}`; } }),
    tab === "tokens" ? await tokensTab(rest[1] || "7d") : await tracesTab(rest[1] || ""));
}

const HOUSEKEEPING = (t) => t.spanCount <= 1 && /^(MCP send|GET \/\.well-known)/.test(t.rootName);

async function tracesTab(agent) {
  const [{ traces }, agents] = await Promise.all([get(`/api/v1/traces${q({ agentName: agent, pageSize: 300 })}`), listAll("/api/v1/agents", "agents")]);
  let showAll = false;
  const box = h("div", {});
  const draw = () => {
    const rows = showAll ? traces : traces.filter((t) => !HOUSEKEEPING(t));
    clear(box, table([
      { label: "Started", render: (t) => when(t.startTime) },
      { label: "Trace", render: (t) => h("a", { href: `#/observability/trace/${t.traceId}`, class: "strong", "data-trace": t.traceId, "data-agents": t.agents.join(",") }, t.rootName, h("div", { class: "muted small mono" }, t.traceId.slice(0, 16) + "…")) },
      { label: "Agents", render: (t) => h("span", { class: "chips" }, t.agents.map(agentChip)) },
      { label: "Spans", class: "num", key: "spanCount" },
      { label: "Duration", class: "num", render: (t) => fmtMs(t.durationMs) },
      { label: "Tokens", class: "num", render: (t) => fmtInt(int(t.totalTokens)) },
      { label: "Cost", class: "num", render: (t) => costCell(t.costUsd, (t.unpricedModels || []).length, `unpriced: ${(t.unpricedModels || []).join(", ")}`) },
      { label: "Status", render: (t) => (t.error ? badge("error", "bad") : badge("ok", "ok")) },
    ], rows, { empty: "No traces yet: invoke an agent." }));
  };
  draw();
  const filter = h("div", { class: "inline" },
    h("select", { class: "input input-sm", "aria-label": "agent", onChange: (e) => { location.hash = `#/observability/traces/${enc(e.target.value)}`; } },
      h("option", { value: "" }, "All agents"), agents.map((a) => h("option", { value: a.name, selected: a.name === agent }, a.name))),
    h("label", { class: "check" }, h("input", { type: "checkbox", onChange: (e) => { showAll = e.target.checked; draw(); } }), "show MCP housekeeping"));
  return card("Recent traces", box, { actions: filter, subtitle: "Newest first. A conversation that calls a partner agent is one trace across both agents." });
}

// A cost, with an "unpriced" badge when some calls are priced nowhere (never shown as $0 alone).
function costCell(usd, unpriced, title) {
  return h("span", { "data-cost": String(usd || 0) }, fmtUsd(usd || 0), unpriced ? [" ", h("span", { title }, badge("unpriced", "warn"))] : null);
}

// Per agent: its own model calls' cost, and "including downstream" -- what its turns'
// invoke_agent spans recorded (specmesh.cost.total_usd: its calls and its partners' chains).
function agentCosts(spans) {
  const by = new Map();
  const of = (a) => by.get(a) || by.set(a, { agent: a, own: 0, withDownstream: 0, unpriced: new Set() }).get(a);
  for (const sp of spans) {
    const c = classify(sp).kind;
    if (c === "llm" && typeof sp.attributes["specmesh.cost.usd"] === "number") of(sp.agent).own += sp.attributes["specmesh.cost.usd"];
    if (c === "llm" && sp.attributes["specmesh.cost.unpriced"] === true) of(sp.agent).unpriced.add(sp.attributes["gen_ai.request.model"] || "unknown");
    if (c === "agent" && typeof sp.attributes["specmesh.cost.total_usd"] === "number") of(sp.agent).withDownstream += sp.attributes["specmesh.cost.total_usd"];
  }
  return [...by.values()];
}

function classify(span) {
  const op = span.attributes["gen_ai.operation.name"];
  if (op === "chat" || op === "text_completion" || op === "embeddings") return { label: "LLM", kind: "llm" };
  if (op === "execute_tool") {
    const partner = span.attributes["specmesh.tool.kind"] === "partner" || /^execute_tool ask_/.test(span.name);
    return partner ? { label: "A2A", kind: "a2a" } : { label: "tool", kind: "tool" };
  }
  if (op === "invoke_agent") return { label: "agent", kind: "agent" };
  if (/^MCP /.test(span.name)) return { label: "MCP", kind: "tool" };
  if (span.kind === "SERVER") return { label: "HTTP", kind: "http" };
  return { label: span.kind.toLowerCase(), kind: "other" };
}

const PAYLOAD_KEYS = /(^gen_ai\.(input|output)\.messages|^gen_ai\.system_instructions|^gen_ai\.tool\.call\.(arguments|result)|prompt|completion|payload)/;

async function tracePage(traceId) {
  const { spans } = await get(`/api/v1/traces/${enc(traceId)}`);
  const ids = new Set(spans.map((sp) => sp.spanId));
  const children = new Map();
  for (const sp of spans) {
    const parent = sp.parentSpanId && ids.has(sp.parentSpanId) ? sp.parentSpanId : null;
    (children.get(parent) || children.set(parent, []).get(parent)).push(sp);
  }
  const ordered = [];
  const walk = (parent, depth) => (children.get(parent) || [])
    .sort((a, b) => (BigInt(a.startTimeUnixNano) < BigInt(b.startTimeUnixNano) ? -1 : 1))
    .forEach((sp) => { ordered.push({ sp, depth }); walk(sp.spanId, depth + 1); });
  walk(null, 0);
  const t0 = spans.reduce((m, sp) => (BigInt(sp.startTimeUnixNano) < m ? BigInt(sp.startTimeUnixNano) : m), BigInt(spans[0].startTimeUnixNano));
  const t1 = spans.reduce((m, sp) => (BigInt(sp.endTimeUnixNano) > m ? BigInt(sp.endTimeUnixNano) : m), 0n);
  const total = Number(t1 - t0) / 1e6 || 1;
  const agents = [...new Set(spans.map((sp) => sp.agent))];
  const tokens = spans.filter((sp) => classify(sp).kind === "llm").reduce((a, sp) => a + (sp.attributes["gen_ai.usage.input_tokens"] || 0) + (sp.attributes["gen_ai.usage.output_tokens"] || 0), 0);
  const costs = agentCosts(spans);
  const chainCost = costs.reduce((a, c) => a + c.own, 0);
  const unpriced = [...new Set(costs.flatMap((c) => [...c.unpriced]))];
  const detail = h("div", { class: "span-detail", "data-testid": "span-detail" }, empty("Select a span to see its attributes and payloads."));
  const showDetail = (sp, row) => {
    for (const r of row.parentElement.children) r.classList.remove("selected");
    row.classList.add("selected");
    const attrs = Object.entries(sp.attributes).sort(([a], [b]) => a.localeCompare(b));
    const payloads = attrs.filter(([k]) => PAYLOAD_KEYS.test(k));
    clear(detail,
      h("h3", {}, sp.name), h("div", { class: "inline" }, agentChip(sp.agent), badge(classify(sp).label, classify(sp).kind), badge(sp.status, sp.status === "ERROR" ? "bad" : "neutral"), h("span", { class: "muted" }, fmtMs(sp.durationMs))),
      sp.statusMessage ? h("div", { class: "alert alert-error" }, sp.statusMessage) : null,
      h("h4", {}, "Payloads"),
      payloads.length ? payloads.map(([k, v]) => h("div", {}, h("div", { class: "muted small mono" }, k), codeBlock(typeof v === "string" ? prettyMaybe(v) : JSON.stringify(v, null, 2))))
        : h("p", { class: "muted small" }, "Not recorded: engines record message content only when recording is enabled (off by default)."),
      h("h4", {}, "Attributes"),
      h("dl", { class: "attrs" }, attrs.filter(([k]) => !PAYLOAD_KEYS.test(k)).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))])),
      sp.events.length ? [h("h4", {}, "Events"), sp.events.map((ev) => h("div", { class: "event" }, h("strong", {}, ev.name), " ", h("span", { class: "muted small" }, ev.time), codeBlock(JSON.stringify(ev.attributes, null, 2))))] : null,
      h("h4", {}, "Resource"), h("dl", { class: "attrs" }, Object.entries(sp.resource).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])));
  };
  const ticks = [0, 0.5, 1];
  const rows = ordered.map(({ sp, depth }) => {
    const start = Number(BigInt(sp.startTimeUnixNano) - t0) / 1e6;
    const c = classify(sp);
    const row = h("div", { class: `wf-row ${sp.status === "ERROR" ? "wf-error" : ""}`, tabindex: 0, "data-span": sp.name, "data-kind": c.kind,
      onClick: () => showDetail(sp, row), onKeydown: (e) => { if (e.key === "Enter") showDetail(sp, row); } },
      h("div", { class: "wf-name", style: { paddingLeft: `${8 + depth * 16}px` } }, badge(c.label, c.kind), h("span", { class: "wf-title", title: sp.name }, sp.name)),
      h("div", { class: "wf-agent" }, agentChip(sp.agent)),
      h("div", { class: "wf-track" }, h("span", { class: "wf-bar", style: { left: `${(100 * start) / total}%`, width: `${Math.max(0.4, (100 * sp.durationMs) / total)}%`, background: colorFor(sp.agent) } })),
      h("div", { class: "wf-dur num" }, fmtMs(sp.durationMs)));
    return row;
  });
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {},
      h("div", { class: "crumbs" }, h("a", { href: "#/observability" }, "Observability"), " / trace"),
      h("h1", {}, "Trace ", h("span", { class: "mono small muted" }, traceId)),
      h("div", { class: "inline" }, agents.map(agentChip), h("span", { class: "muted" }, ` · ${spans.length} spans · ${fmtMs(total)} · ${fmtInt(tokens)} tokens · `),
        h("span", { "data-testid": "trace-cost" }, costCell(chainCost, unpriced.length, `unpriced: ${unpriced.join(", ")}`))),
      costs.length ? h("div", { class: "inline small", "data-testid": "agent-costs" }, costs.map((c) => h("span", { class: "muted", "data-agent": c.agent },
        agentChip(c.agent), ` ${fmtUsd(c.own)} own · ${fmtUsd(c.withDownstream)} including downstream `, c.unpriced.size ? badge("unpriced", "warn") : null))) : null)),
    h("div", { class: "trace-layout" },
      card("Waterfall", h("div", { class: "waterfall", "data-testid": "waterfall" },
        h("div", { class: "wf-row wf-head" }, h("div", { class: "wf-name" }, "Span"), h("div", { class: "wf-agent" }, "Agent"),
          h("div", { class: "wf-track wf-ticks" }, ticks.map((t) => h("span", { style: { left: `${t * 100}%` } }, fmtMs(total * t)))), h("div", { class: "wf-dur" }, "Duration")),
        h("div", { class: "wf-rows" }, rows))),
      card("Span", detail, { class: "span-card" })));
}

function prettyMaybe(v) { try { return JSON.stringify(JSON.parse(v), null, 2); } catch { return v; } }

async function tokensTab(range) {
  const days = { "1d": 1, "7d": 7, "30d": 30 }[range];
  const since = days ? new Date(Date.now() - days * 86400e3).toISOString() : null;
  // int64 counts arrive as strings (the proto's JSON): numbers from here on
  const rows = (await get(`/api/v1/token-usage${q({ groupBy: ["agent", "model", "day"], since })}`)).rows.map((r) => ({
    ...r, calls: int(r.calls), inputTokens: int(r.inputTokens), outputTokens: int(r.outputTokens), totalTokens: int(r.totalTokens), unpricedCalls: int(r.unpricedCalls || 0),
  }));
  const sum = (f, list = rows) => list.reduce((a, r) => a + (r[f] || 0), 0);
  const by = (key, f) => {
    const m = new Map();
    for (const r of rows) m.set(r[key], (m.get(r[key]) || 0) + r[f]);
    return [...m].map(([label, value]) => ({ label, value })).sort((a, b) => b.value - a.value);
  };
  const agents = [...new Set(rows.map((r) => r.agent))].sort();
  const dayList = [];
  const first = days ? new Date(Date.now() - (days - 1) * 86400e3) : rows.length ? new Date(rows.map((r) => r.day).sort()[0]) : new Date();
  for (let d = new Date(first.toISOString().slice(0, 10)); d <= new Date(); d = new Date(d.getTime() + 86400e3)) dayList.push(d.toISOString().slice(0, 10));
  const perDay = dayList.map((day) => ({
    label: day.slice(5),
    values: Object.fromEntries(agents.map((a) => [a, sum("totalTokens", rows.filter((r) => r.day === day && r.agent === a))])),
  }));
  const rangePick = h("div", { class: "seg" }, ["1d", "7d", "30d", "all"].map((r) =>
    h("a", { href: `#/observability/tokens/${r}`, class: r === range ? "active" : "" }, r === "all" ? "All time" : `Last ${r}`)));
  return h("div", { class: "stack" },
    h("div", { class: "inline between" }, h("div", { class: "kpis" },
      kpi("Model calls", fmtInt(sum("calls"))), kpi("Tokens", fmtInt(sum("totalTokens")), `${fmtInt(sum("inputTokens"))} in · ${fmtInt(sum("outputTokens"))} out`),
      kpi("Cost", fmtUsd(sum("costUsd")), sum("unpricedCalls") ? `${fmtInt(sum("unpricedCalls"))} calls unpriced (not counted)` : "the model part's price, else litellm's map"), kpi("Agents", agents.length)), rangePick),
    card("Tokens per day, by agent", columnChart(perDay, { series: agents, title: "tokens per day" }), { class: "chart-card" }),
    h("div", { class: "grid-3" },
      card("Tokens by agent", barChart(by("agent", "totalTokens"))),
      card("Tokens by model", barChart(by("model", "totalTokens"), { format: (n) => fmtInt(n) })),
      card("Cost by agent", barChart(by("agent", "costUsd"), { format: fmtUsd }))),
    card("Usage rows", table([
      { label: "Day", key: "day" }, { label: "Agent", render: (r) => agentChip(r.agent) }, { label: "Model", key: "model" },
      { label: "Calls", class: "num", render: (r) => fmtInt(r.calls) }, { label: "Input", class: "num", render: (r) => fmtInt(r.inputTokens) },
      { label: "Output", class: "num", render: (r) => fmtInt(r.outputTokens) }, { label: "Cost", class: "num", render: (r) => costCell(r.costUsd, r.unpricedCalls, `${r.unpricedCalls} calls of a model priced nowhere`) },
    ], rows.slice().sort((a, b) => (a.day < b.day ? 1 : -1)), { empty: "No model calls in this period." })));
}
