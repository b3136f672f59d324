// Registries: MCP servers with the tools they really offer; agents, instances, cards and the
// partner graph (SVG).
import { listAll, int, enc } from "../api.js";
import { h, s, clear, card, tabs, table, badge, dot, when, errorBox, spinner, colorFor, codeBlock } from "../ui.js";
import { health, trackBadges, engineState, instancesOf, revisionOf } from "./agents.js";

export async function render(rest) {
  const tab = rest[0] || "mcp";
  const body = tab === "agents" ? await agentsTab() : await mcpTab();
  return h("div", { class: "page" },
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Registries"),
      h("p", { class: "muted" }, "The MCP Registry (servers agents may use) and the Agent Registry (live instances and who calls whom)."))),
    tabs([{ id: "mcp", label: "MCP servers" }, { id: "agents", label: "Agents & partner graph" }],
      { active: tab, onSelect: (t) => { location.hash = `#/registries/${t}`; } }),
    body);
}

async function mcpTab() {
  const servers = (await listAll("/api/v1/mcp-servers", "mcpServers")).sort((a, b) => a.name.localeCompare(b.name));
  return h("div", { class: "grid-cards" }, servers.map(({ name, spec: srv }) => {
    const tools = h("div", { class: "tools", "data-tools": name }, spinner("Asking the server for its tools…"));
    listAll(`/api/v1/mcp-servers/${enc(name)}/tools`, "tools").then((offered) => {
      clear(tools, offered.length ? h("ul", { class: "tool-list" }, offered.map((t) => h("li", { "data-tool": t.name },
        h("code", {}, t.name), h("div", { class: "muted small" }, (t.description || "").split("\n")[0]),
        t.inputSchema && t.inputSchema.properties ? h("div", { class: "params" }, Object.keys(t.inputSchema.properties).map((p) =>
          badge(p + ((t.inputSchema.required || []).includes(p) ? "*" : ""), "neutral"))) : null)))
        : h("p", { class: "muted" }, "The server offers no tools."));
    }).catch((e) => clear(tools, h("div", { class: "alert alert-warn" }, h("strong", {}, "Unreachable: "), e.message.split("\n")[0])));
    const creds = srv.credentialTemplate || { headers: [], queryParams: [] };
    return card(name, h("div", {},
      h("p", {}, srv.description || h("span", { class: "muted" }, "No description")),
      h("dl", { class: "props" },
        h("dt", {}, "URL"), h("dd", {}, h("code", { class: "clip" }, srv.url)),
        h("dt", {}, "Transport"), h("dd", {}, srv.transport),
        h("dt", {}, "Credentials"), h("dd", {}, [...creds.headers.map((x) => badge(`header ${x}`, "secret")), ...creds.queryParams.map((x) => badge(`query ${x}`, "secret"))].length
          ? [...creds.headers.map((x) => badge(`header ${x}`, "secret")), ...creds.queryParams.map((x) => badge(`query ${x}`, "secret"))] : h("span", { class: "muted" }, "none"))),
      h("h4", {}, "Tools"), tools), { class: "mcp-card" });
  }));
}

async function agentsTab() {
  const [records, instances] = await Promise.all([listAll("/api/v1/agents", "agents"), instancesOf()]);
  const graph = partnerGraph(records);
  const cards = records.map((r) => {
    const inst = instances.filter((i) => i.agentName === r.name);
    const x = health(inst);
    const cardJson = { name: r.name, description: r.spec.base.description, version: String(revisionOf(r)), skills: r.spec.base.skills.map((sk) => sk.name || sk.id) };
    return card(r.name, h("div", {},
      h("p", { class: "muted" }, r.spec.base.description),
      h("div", { class: "inline" }, h("span", { class: "health" }, dot(x.kind, x.label), x.label), trackBadges(inst)),
      table([
        { label: "Instance", render: (i) => h("code", {}, i.instanceId) },
        { label: "Revision", render: (i) => `rev ${int(i.servingRevision)}` },
        { label: "State", render: engineState },
        { label: "Registered", render: (i) => when(i.registeredAt) },
      ], inst, { empty: "No live instance." }),
      h("details", {}, h("summary", {}, "Agent card"), codeBlock(JSON.stringify(cardJson, null, 2))),
      h("div", { class: "small" }, h("strong", {}, "Partners: "), r.spec.partnerAgents.length ? r.spec.partnerAgents.map((p) => badge(p.agentName, "neutral")) : h("span", { class: "muted" }, "none"),
        h("strong", {}, "  MCP: "), r.spec.mcpServers.length ? r.spec.mcpServers.map((m) => badge(m.mcpServerName, "neutral")) : h("span", { class: "muted" }, "none"))),
    { class: "agent-card", actions: h("a", { class: "btn btn-sm", href: `#/agents/${enc(r.name)}` }, "Open") });
  });
  return h("div", { class: "stack" },
    card("Partner graph", graph, { subtitle: "Arrows point from caller to callee: partner agents over A2A, and the MCP servers each agent uses." }),
    h("div", { class: "grid-cards" }, cards));
}

const lc = (x) => x.toLowerCase();

/** Layered drawing: callers left of their partners; MCP servers in the last column. */
function partnerGraph(records) {
  const known = new Map(records.map((r) => [lc(r.name), r.name]));
  const edges = [];
  const mcp = new Set();
  for (const r of records) {
    for (const p of r.spec.partnerAgents) edges.push({ from: r.name, to: known.get(lc(p.agentName)) || p.agentName, kind: "a2a", missing: !known.has(lc(p.agentName)) });
    for (const m of r.spec.mcpServers) { edges.push({ from: r.name, to: "mcp:" + m.mcpServerName, kind: "mcp" }); mcp.add("mcp:" + m.mcpServerName); }
  }
  const agentNodes = [...new Set([...records.map((r) => r.name), ...edges.filter((e) => e.kind === "a2a").map((e) => e.to)])];
  const level = new Map(agentNodes.map((n) => [n, 0]));
  for (let pass = 0; pass < agentNodes.length; pass++)
    for (const e of edges) if (e.kind === "a2a" && level.get(e.to) < level.get(e.from) + 1) level.set(e.to, Math.min(agentNodes.length, level.get(e.from) + 1));
  const maxLevel = Math.max(0, ...level.values());
  for (const m of mcp) level.set(m, maxLevel + 1);
  const columns = [];
  for (const [n, l] of level) (columns[l] ||= []).push(n);
  columns.forEach((c) => c && c.sort());
  const W = 1000, colW = W / columns.length, nodeW = 210, nodeH = 44, gap = 22;
  const H = Math.max(...columns.map((c) => (c ? c.length : 0))) * (nodeH + gap) + 60;
  const pos = new Map();
  columns.forEach((col, ci) => (col || []).forEach((n, ri) => {
    const total = col.length * (nodeH + gap) - gap;
    pos.set(n, { x: colW * ci + (colW - nodeW) / 2, y: (H - total) / 2 + ri * (nodeH + gap) });
  }));
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "graph", role: "img", "aria-label": "partner graph", "data-testid": "partner-graph" },
    s("defs", {},
      s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, s("path", { d: "M0 0L10 5L0 10z", fill: "#64748b" })),
      s("marker", { id: "arrow-mcp", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, s("path", { d: "M0 0L10 5L0 10z", fill: "#0891b2" }))));
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + nodeW, y1 = a.y + nodeH / 2, x2 = b.x, y2 = b.y + nodeH / 2;
    const mx = (x1 + x2) / 2;
    svg.append(s("path", { d: `M${x1} ${y1} C${mx} ${y1} ${mx} ${y2} ${x2} ${y2}`, class: `edge edge-${e.kind}${e.missing ? " edge-missing" : ""}`, "marker-end": e.kind === "mcp" ? "url(#arrow-mcp)" : "url(#arrow)" },
      s("title", {}, `${e.from} → ${e.to.replace(/^mcp:/, "")} (${e.kind === "mcp" ? "MCP" : "A2A"})`)));
  }
  for (const [n, p] of pos) {
    const isMcp = n.startsWith("mcp:");
    const missing = !isMcp && !known.has(lc(n));
    svg.append(s("g", { class: `node ${isMcp ? "node-mcp" : "node-agent"}${missing ? " node-missing" : ""}`, "data-node": n },
      s("rect", { x: p.x, y: p.y, width: nodeW, height: nodeH, rx: isMcp ? 22 : 8 }),
      isMcp ? null : s("circle", { cx: p.x + 14, cy: p.y + nodeH / 2, r: 5, fill: colorFor(n) }),
      s("text", { x: p.x + nodeW / 2, y: p.y + 19, "text-anchor": "middle", class: "node-title" }, isMcp ? n.slice(4) : n),
      s("text", { x: p.x + nodeW / 2, y: p.y + 35, "text-anchor": "middle", class: "node-sub" }, isMcp ? "MCP server" : missing ? "not registered" : "agent")));
  }
  return h("div", { class: "graph-wrap" }, svg,
    h("div", { class: "legend" }, h("span", { class: "legend-item" }, h("span", { class: "legend-line a2a" }), "A2A partner call"),
      h("span", { class: "legend-item" }, h("span", { class: "legend-line mcp" }), "MCP tools")));
}

export { errorBox };
