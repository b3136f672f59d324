// Charts as inline SVG (no library): stacked columns and horizontal bars.
import { h, s, colorFor } from "./ui.js";

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
const short = (n) => (n >= 1e6 ? `${+(n / 1e6).toFixed(1)}M` : n >= 1e3 ? `${+(n / 1e3).toFixed(1)}k` : `${+n.toFixed(2)}`);

function legend(series) {
  return h("div", { class: "legend" }, series.map((name) =>
    h("span", { class: "legend-item" }, h("span", { class: "chip-dot", style: { background: colorFor(name) } }), name)));
}

/** Stacked columns: data = [{label, values: {series: number}}]. */
export function columnChart(data, { series, height = 220, format = short, title } = {}) {
  const W = 640, H = height, left = 44, bottom = 26, top = 10, right = 8;
  const totals = data.map((d) => series.reduce((a, k) => a + (d.values[k] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  const plotW = W - left - right, plotH = H - top - bottom;
  const bw = Math.min(48, (plotW / Math.max(1, data.length)) * 0.6);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title || "chart" });
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    svg.append(s("line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }),
      s("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, format((max * i) / 4)));
  }
  data.forEach((d, i) => {
    const cx = left + (plotW * (i + 0.5)) / data.length;
    let y = top + plotH;
    for (const k of series) {
      const v = d.values[k] || 0;
      if (!v) continue;
      const hgt = (plotH * v) / max;
      y -= hgt;
      svg.append(s("rect", { x: cx - bw / 2, y, width: bw, height: Math.max(1, hgt), rx: 2, fill: colorFor(k) },
        s("title", {}, `${d.label} · ${k}: ${format(v)}`)));
    }
    svg.append(s("text", { x: cx, y: H - 8, class: "axis", "text-anchor": "middle" }, d.label));
  });
  if (!data.length) svg.append(s("text", { x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle" }, "No data yet"));
  return h("figure", { class: "chart-wrap" }, svg, series.length > 1 ? legend(series) : null);
}

/** Horizontal bars: data = [{label, value, color?}]. */
export function barChart(data, { format = short, title } = {}) {
  const max = niceMax(Math.max(0, ...data.map((d) => d.value)));
  if (!data.length) return h("div", { class: "empty" }, "No data yet");
  return h("div", { class: "hbars", role: "img", "aria-label": title || "bars" }, data.map((d) =>
    h("div", { class: "hbar" },
      h("span", { class: "hbar-label", title: d.label }, d.label),
      h("span", { class: "hbar-track" }, h("span", { class: "hbar-fill", style: { width: `${(100 * d.value) / max}%`, background: d.color || colorFor(d.label) } })),
      h("span", { class: "hbar-value" }, format(d.value)))));
}

/** A 100% bar of shares: parts = [{label, value, color}]. */
export function splitBar(parts) {
  const total = parts.reduce((a, p) => a + p.value, 0) || 1;
  return h("div", { class: "split" }, parts.filter((p) => p.value > 0).map((p) =>
    h("span", { class: "split-part", style: { width: `${(100 * p.value) / total}%`, background: p.color } }, `${p.label} ${p.value}%`)));
}
