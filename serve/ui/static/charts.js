// Small SVG line charts, and the traffic page that feeds them from the gateway's counters.

import { api, clear, h, s, versionHref } from "./dom.js";

const WIDTH = 320;
const HEIGHT = 150;
const M = { left: 46, right: 10, top: 24, bottom: 26 };
const SERIES = 6; // colours (.s0 ... .s5)

function tick(value) {
  if (!Number.isFinite(value)) return "";
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  if (abs >= 1000) return `${(value / 1000).toFixed(1)}k`;
  if (abs >= 10 || abs === 0) return value.toFixed(0);
  if (abs >= 1) return value.toFixed(1);
  return value.toPrecision(2);
}

// series: [{name, points: [[x, y], ...]}]; options: {title, xLabel, xTime}
export function lineChart(series, options = {}) {
  const W = options.width || WIDTH;
  const H = options.height || HEIGHT;
  const all = series.flatMap((one) => one.points);
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs);
  const y0 = Math.min(0, ...ys);
  const top = Math.max(...ys);
  const y1 = top > y0 ? top : y0 + 1; // all zero (no traffic): an axis from 0 to 1
  const px = (x) => M.left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - M.left - M.right);
  const py = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);
  const svg = s(
    "svg",
    { class: "chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": options.title || "chart", dataset: { title: options.title || "" } },
    s("text", { x: M.left, y: 15, class: "chart-title" }, options.title || ""),
    s("line", { x1: M.left, y1: H - M.bottom, x2: W - M.right, y2: H - M.bottom, class: "axis" }),
    s("line", { x1: M.left, y1: M.top, x2: M.left, y2: H - M.bottom, class: "axis" }),
    s("text", { x: M.left - 4, y: M.top + 4, class: "tick", "text-anchor": "end" }, tick(y1)),
    s("text", { x: M.left - 4, y: H - M.bottom, class: "tick", "text-anchor": "end" }, tick(y0)),
  );
  if (all.length && !options.xTime) {
    svg.append(
      s("text", { x: M.left, y: H - 8, class: "tick" }, tick(x0)),
      s("text", { x: W - M.right, y: H - 8, class: "tick", "text-anchor": "end" }, `${tick(x1)} ${options.xLabel || ""}`),
    );
  } else if (options.xTime) {
    svg.append(s("text", { x: W - M.right, y: H - 8, class: "tick", "text-anchor": "end" }, "now"));
  }
  if (!all.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, class: "tick", "text-anchor": "middle" }, "no data yet"));
  }
  series.forEach((one, i) => {
    if (!one.points.length) return;
    const cls = `series s${i % SERIES}`;
    if (one.points.length === 1) {
      const [x, y] = one.points[0];
      svg.append(s("circle", { cx: px(x), cy: py(y), r: 3, class: cls }));
    } else {
      svg.append(s("polyline", { points: one.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" "), class: cls }));
    }
  });
  const legend = series.length > 1 ? h("div", { class: "legend" }, series.map((one, i) => h("span", { class: `key s${i % SERIES}` }, one.name))) : null;
  return h("figure", { class: "chart-box" }, svg, legend);
}

// -- the traffic page ---------------------------------------------------------------

const EVERY_MS = 3000;
const KEEP = 100; // readings per adapter (5 minutes)

const CHARTS = [
  ["requests/s", (a, b, dt) => (b.requests - a.requests) / dt],
  ["tokens/s (generated)", (a, b, dt) => (b.generated_tokens - a.generated_tokens) / dt],
  ["errors/s", (a, b, dt) => (b.errors - a.errors) / dt],
  ["latency, mean s", (a, b) => mean(a, b, "latency")],
  ["time to first token, mean s", (a, b) => mean(a, b, "ttft")],
];

function mean(a, b, field) {
  const count = b[`${field}_count`] - a[`${field}_count`];
  return count > 0 ? (b[`${field}_sum`] - a[`${field}_sum`]) / count : null;
}

function seconds(sum, count) {
  return count ? `${(sum / count).toFixed(3)} s` : "-";
}

export function showTraffic(main, info) {
  const history = new Map(); // "adapter@version" -> [{t, ...counters}]
  const charts = h("div", { class: "charts", id: "traffic-charts" });
  const body = h("tbody");
  const note = h("p", { class: "muted" }, `Counters of this gateway since it started, for the adapters this key may use; refreshed every ${EVERY_MS / 1000} s.`);
  const status = h("p", { class: "muted", id: "traffic-status" });
  main.append(
    h("h1", {}, "Traffic"),
    note,
    status,
    charts,
    h(
      "table",
      { class: "rows", id: "traffic" },
      h("thead", {}, h("tr", {}, ["Adapter", "Version", "Requests", "Errors", "Prompt tokens", "Generated tokens", "Latency (mean)", "TTFT (mean)"].map((t) => h("th", {}, t)))),
      body,
    ),
  );

  function draw(rows) {
    clear(body);
    for (const row of rows) {
      const ref = row.version === "base" ? row.adapter : `${row.adapter}:${row.version}`;
      body.append(
        h(
          "tr",
          { dataset: { adapter: row.adapter, version: row.version } },
          h("td", {}, row.version === "base" ? row.adapter : h("a", { href: versionHref(ref) }, row.adapter)),
          h("td", {}, row.version),
          h("td", { class: "num" }, String(row.requests)),
          h("td", { class: "num" }, String(row.errors)),
          h("td", { class: "num" }, String(row.prompt_tokens)),
          h("td", { class: "num" }, String(row.generated_tokens)),
          h("td", { class: "num" }, seconds(row.latency_sum, row.latency_count)),
          h("td", { class: "num" }, seconds(row.ttft_sum, row.ttft_count)),
        ),
      );
    }
    const busiest = [...history.entries()].sort((a, b) => b[1].at(-1).requests - a[1].at(-1).requests).slice(0, SERIES);
    const now = Date.now() / 1000;
    clear(charts);
    for (const [title, value] of CHARTS) {
      const series = busiest.map(([key, readings]) => {
        const points = [];
        for (let i = 1; i < readings.length; i++) {
          const dt = readings[i].t - readings[i - 1].t;
          const y = dt > 0 ? value(readings[i - 1], readings[i], dt) : null;
          if (y !== null && Number.isFinite(y)) points.push([readings[i].t - now, y]);
        }
        return { name: key, points };
      });
      charts.append(lineChart(series, { title, xTime: true }));
    }
  }

  let stopped = false;
  async function poll() {
    try {
      const answer = await api("/ui/api/traffic");
      if (stopped) return;
      const t = Date.now() / 1000;
      for (const row of answer.adapters) {
        const key = row.version === "base" ? row.adapter : `${row.adapter}:${row.version}`;
        const readings = history.get(key) || [];
        readings.push({ t, ...row });
        history.set(key, readings.slice(-KEEP));
      }
      draw(answer.adapters);
      status.textContent = answer.adapters.length ? `updated ${new Date().toLocaleTimeString()}` : "No requests to this key's adapters yet.";
      main.dataset.loaded = "traffic";
    } catch (error) {
      if (!stopped) {
        status.textContent = error.message;
        status.className = "error";
      }
    }
  }
  poll();
  const timer = setInterval(poll, EVERY_MS);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}
