// The lineage graph and the training curve, drawn as SVG (no library, no inline style).

import { baseLabel, h, s, shortDigest, versionHref } from "./dom.js";
import { lineChart } from "./charts.js";

const BOX_W = 190;
const BOX_H = 48;
const GAP_X = 70;
const GAP_Y = 30;
const PAD = 16;

function clip(text, length) {
  text = String(text ?? "");
  return text.length > length ? `${text.slice(0, length - 1)}\u2026` : text;
}

// Columns, left to right: the base, the parents (oldest first), this version, its
// children; the dataset sits under this version.
function layout(graph) {
  const place = new Map();
  const self = graph.nodes.find((n) => n.role === "self");
  const chain = graph.nodes.filter((n) => n.kind !== "dataset" && n.role !== "child");
  chain.forEach((node, i) => place.set(node.id, { col: i, row: 0 }));
  const selfCol = place.get(self.id).col;
  graph.nodes
    .filter((n) => n.role === "child")
    .forEach((node, i) => place.set(node.id, { col: selfCol + 1, row: i }));
  for (const node of graph.nodes.filter((n) => n.kind === "dataset")) {
    place.set(node.id, { col: selfCol, row: 1 });
  }
  return place;
}

function lines(node) {
  if (node.kind === "adapter") return [node.ref, node.method ? `method: ${node.method}` : "not trained here"];
  if (node.kind === "base") return [baseLabel(node.label), "base"];
  if (node.kind === "dataset") return [`dataset ${shortDigest(node.label)}`, node.made_by || "training data"];
  if (node.kind === "hidden") return [shortDigest(node.id), node.label];
  return [node.label, ""];
}

export function drawLineage(graph, selfDigest) {
  const place = layout(graph);
  const cols = Math.max(...[...place.values()].map((p) => p.col)) + 1;
  const rows = Math.max(...[...place.values()].map((p) => p.row)) + 1;
  const width = PAD * 2 + cols * BOX_W + (cols - 1) * GAP_X;
  const height = PAD * 2 + rows * BOX_H + (rows - 1) * GAP_Y;
  const at = (id) => {
    const p = place.get(id);
    return { x: PAD + p.col * (BOX_W + GAP_X), y: PAD + p.row * (BOX_H + GAP_Y) };
  };
  const svg = s(
    "svg",
    { id: "lineage", class: "graph", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": "lineage graph" },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, s("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))),
  );
  for (const edge of graph.edges) {
    if (!place.has(edge.from) || !place.has(edge.to)) continue;
    const a = at(edge.from);
    const b = at(edge.to);
    const below = place.get(edge.from).row > place.get(edge.to).row && place.get(edge.from).col === place.get(edge.to).col;
    const [x1, y1, x2, y2] = below
      ? [a.x + BOX_W / 2, a.y, b.x + BOX_W / 2, b.y + BOX_H]
      : [a.x + BOX_W, a.y + BOX_H / 2, b.x, b.y + BOX_H / 2];
    svg.append(
      s("line", { x1, y1, x2, y2, class: edge.dashed ? "edge dashed" : "edge", "marker-end": "url(#arrow)", dataset: { from: edge.from, to: edge.to } }),
    );
    if (edge.label) svg.append(s("text", { x: (x1 + x2) / 2 + (below ? 6 : 0), y: (y1 + y2) / 2 - 5, class: "edge-label", "text-anchor": below ? "start" : "middle" }, edge.label));
  }
  for (const node of graph.nodes) {
    const { x, y } = at(node.id);
    const [top, bottom] = lines(node);
    const kind = node.kind === "adapter" ? `adapter ${node.role}` : node.kind;
    const group = s(
      "g",
      { class: `node ${kind}`, dataset: { id: node.id, kind: node.kind, role: node.role || "", ref: node.ref || "" } },
      s("title", {}, [node.ref, node.label, node.id].filter(Boolean).join("\n")),
      s("rect", { x, y, width: BOX_W, height: BOX_H, rx: 6 }),
      s("text", { x: x + 10, y: y + 20, class: "node-title" }, clip(top, 26)),
      s("text", { x: x + 10, y: y + 38, class: "node-sub" }, clip(bottom, 30)),
    );
    if (node.kind === "adapter" && node.id !== selfDigest) {
      group.classList.add("link");
      group.addEventListener("click", () => {
        location.hash = versionHref(node.ref);
      });
    }
    svg.append(group);
  }
  return h("div", { class: "graph-box" }, svg);
}

// One chart per logged metric of the run (loss first), x = step.
export function drawCurve(points) {
  const keys = new Set();
  for (const point of points) for (const key of Object.keys(point)) keys.add(key);
  const skip = new Set(["step", "epoch", "time", "steps_per_second", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"]);
  const metrics = [...keys].filter((k) => !skip.has(k)).sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
  return h(
    "div",
    { class: "charts", id: "curve" },
    metrics.map((key) =>
      lineChart(
        [{ name: key, points: points.filter((p) => typeof p[key] === "number").map((p) => [p.step, p[key]]) }],
        { title: key, xLabel: "step", width: 520, height: 220 },
      ),
    ),
  );
}
