// A small SVG line chart: a few series of (x, y) points on shared axes. Drawn by hand so the
// dashboard ships no third-party code.

const NS = "http://www.w3.org/2000/svg";

function node(tag, attrs, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000 || a < 0.01) return v.toExponential(1);
  return v.toPrecision(3).replace(/\.?0+$/, "");
}

/**
 * Renders into `el`: `series` = [{name, points: [[x, y], …]}]; returns the number of points.
 */
export function lineChart(el, title, series) {
  const W = 360, H = 180, L = 44, R = 8, T = 22, B = 24;
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  el.replaceChildren();
  const svg = node("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.append(node("text", { x: 4, y: 14, "font-weight": 600 }, title));
  el.append(svg);
  if (pts.length === 0) {
    svg.append(node("text", { x: W / 2 - 30, y: H / 2 }, "no points yet"));
    return 0;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(node("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.append(node("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  svg.append(node("text", { x: 2, y: T + 8 }, fmt(y1)));
  svg.append(node("text", { x: 2, y: H - B }, fmt(y0)));
  svg.append(node("text", { x: L, y: H - 8 }, `step ${fmt(x0)}`));
  svg.append(node("text", { x: W - R - 50, y: H - 8 }, `step ${fmt(x1)}`));
  series.forEach((s, i) => {
    const p = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!p.length) return;
    const d = p.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    const path = node("path", { d, class: `s${i % 3}`, "data-series": s.name, "data-points": p.length });
    svg.append(path);
    if (p.length === 1) svg.append(node("circle", { cx: sx(p[0][0]), cy: sy(p[0][1]), r: 2.5, class: `s${i % 3}` }));
  });
  if (series.length > 1) {
    const legend = document.createElement("div");
    legend.className = "legend";
    legend.textContent = series.map((s, i) => `${["—blue", "—green", "—amber"][i % 3]}: ${s.name}`).join("   ");
    el.append(legend);
  }
  return pts.length;
}
