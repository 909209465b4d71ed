// The adapters list and a version's page.

import {
  api,
  baseLabel,
  clear,
  errorBox,
  h,
  humanSize,
  pairs,
  section,
  shortTime,
  versionHref,
} from "./dom.js";
import { drawCurve, drawLineage } from "./graph.js";

// -- the adapters list ------------------------------------------------------------

const FILTERS = [
  ["namespace", "Namespace", (row) => (row.name.includes("/") ? row.name.split("/")[0] : "(none)")],
  ["kind", "Kind", (row) => row.kind],
  ["base", "Base", (row) => baseLabel(row.base) || "(unknown)"],
  ["label", "Label", (row) => Object.entries(row.labels || {}).map(([k, v]) => `${k}=${v}`)],
];

function choices(rows, pick) {
  const seen = new Set();
  for (const row of rows) for (const value of [pick(row)].flat()) seen.add(value);
  return [...seen].sort();
}

export function showAdapters(main, info) {
  const state = { rows: [], all: false, chosen: {}, text: "" };
  const bar = h("div", { class: "filters", id: "filters" });
  const summary = h("p", { class: "muted", id: "summary" });
  const body = h("tbody");
  const table = h(
    "table",
    { class: "rows", id: "adapters" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Name", "Version", "Aliases", "Kind", "Base", "Labels", "Size", "Created", "Creator"].map((t) => h("th", {}, t)),
        info.base ? h("th", {}, `Fits ${info.base}`) : null,
        h("th", {}, "Description"),
      ),
    ),
    body,
  );
  main.append(h("h1", {}, "Adapters"), bar, summary, table);

  function render() {
    const shown = state.rows.filter(
      (row) =>
        FILTERS.every(([key, , pick]) => !state.chosen[key] || [pick(row)].flat().includes(state.chosen[key])) &&
        (!state.text || `${row.ref} ${row.description}`.toLowerCase().includes(state.text)),
    );
    clear(body);
    for (const row of shown) {
      body.append(
        h(
          "tr",
          { class: row.yanked ? "yanked" : null, dataset: { ref: row.ref } },
          h("td", {}, h("a", { href: versionHref(row.ref), class: "ref" }, row.name)),
          h("td", {}, String(row.version), row.yanked ? h("span", { class: "badge warn" }, "yanked") : null),
          h("td", {}, row.aliases.map((alias) => h("span", { class: "badge" }, alias))),
          h("td", {}, row.kind),
          h("td", { title: row.base || "" }, baseLabel(row.base)),
          h("td", {}, Object.entries(row.labels || {}).map(([k, v]) => h("span", { class: "badge label" }, `${k}=${v}`))),
          h("td", { class: "num" }, humanSize(row.size)),
          h("td", {}, shortTime(row.created_at)),
          h("td", {}, row.created_by),
          info.base ? h("td", { class: row.fits ? "ok" : "bad" }, row.fits ? "yes" : "no") : null,
          h("td", { class: "description" }, row.description),
        ),
      );
    }
    const names = new Set(shown.map((row) => row.name));
    summary.textContent = `${shown.length} versions of ${names.size} adapters` + (shown.length < state.rows.length ? ` (of ${state.rows.length})` : "");
  }

  function renderFilters() {
    clear(bar);
    for (const [key, title, pick] of FILTERS) {
      const select = h(
        "select",
        { id: `filter-${key}`, "aria-label": title },
        h("option", { value: "" }, `${title}: all`),
        choices(state.rows, pick).map((value) => h("option", { value, selected: state.chosen[key] === value }, value)),
      );
      select.addEventListener("change", () => {
        state.chosen[key] = select.value;
        render();
      });
      bar.append(select);
    }
    const search = h("input", { id: "filter-text", type: "search", placeholder: "search names and descriptions", value: state.text });
    search.addEventListener("input", () => {
      state.text = search.value.trim().toLowerCase();
      render();
    });
    const yanked = h("input", { id: "filter-yanked", type: "checkbox", checked: state.all });
    yanked.addEventListener("change", () => {
      state.all = yanked.checked;
      load();
    });
    bar.append(search, h("label", { class: "check" }, yanked, " show yanked"));
  }

  async function load() {
    main.dataset.loaded = "";
    try {
      const answer = await api(`/ui/api/adapters${state.all ? "?all=1" : ""}`);
      state.rows = answer.rows;
    } catch (error) {
      main.append(errorBox(error));
      return;
    }
    renderFilters();
    render();
    main.dataset.loaded = "adapters";
  }
  load();
}

// -- a version ----------------------------------------------------------------------

function fitBox(fit) {
  if (!fit) return h("p", { class: "muted" }, "No served base to check against (start `lorabay hub ui` with --base).");
  if (fit.fits) return h("p", { class: "ok", id: "fit" }, `Fits the served base ${fit.base}.`);
  return h(
    "div",
    { id: "fit" },
    h("p", { class: "bad" }, `Does not fit the served base ${fit.base}:`),
    h("ul", {}, fit.reasons.map((reason) => h("li", {}, reason))),
  );
}

function eventDetails(event) {
  return Object.entries(event)
    .filter(([key, value]) => !["event", "at", "by", "name"].includes(key) && value !== null && value !== "")
    .map(([key, value]) => `${key}=${value}`)
    .join(" ");
}

function historyTable(events, id) {
  if (!events.length) return h("p", { class: "muted" }, "No events.");
  return h(
    "table",
    { class: "rows", id },
    h("thead", {}, h("tr", {}, ["At", "Event", "Details", "By"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      [...events].reverse().map((event) =>
        h("tr", {}, h("td", {}, shortTime(event.at)), h("td", {}, event.event), h("td", {}, eventDetails(event)), h("td", {}, event.by || "")),
      ),
    ),
  );
}

export function showVersion(main, ref, info) {
  main.append(h("p", { class: "muted" }, `Loading ${ref}...`));
  api(`/ui/api/version?ref=${encodeURIComponent(ref)}`).then(
    (v) => {
      clear(main);
      const lineage = v.lineage || {};
      const provenance = lineage.dataset_provenance;
      const aliasEvents = v.events.filter((e) => e.event === "aliased" || e.event === "unaliased");
      const title = h(
        "h1",
        { id: "title" },
        v.ref,
        v.yanked ? h("span", { class: "badge warn" }, "yanked") : null,
        v.aliases.map((alias) => h("span", { class: "badge" }, alias)),
      );
      const versions = h(
        "p",
        { class: "versions" },
        "Versions: ",
        v.versions.map((other) =>
          h("a", { href: versionHref(`${v.name}:${other.version}`), class: other.version === v.version ? "current" : other.yanked ? "yanked" : null }, String(other.version)),
        ),
      );
      const summary = pairs({
        digest: v.digest,
        kind: v.kind,
        size: humanSize(v.size),
        created: `${shortTime(v.created_at)} by ${v.created_by}`,
        labels: Object.entries(v.labels || {}).map(([k, val]) => `${k}=${val}`).join(", ") || "-",
      });
      const curve = v.curve ? drawCurve(v.curve) : h("p", { class: "muted" }, "The run pushed no training curve (a trainer_state.json in the adapter).");
      main.append(
        h("p", {}, h("a", { href: "#/adapters" }, "< Adapters")),
        title,
        h("p", { class: "description", id: "description" }, v.description || ""),
        versions,
        section("Version", summary, fitBox(v.fit)),
        section(
          "Lineage",
          drawLineage(v.graph, v.digest),
          h(
            "div",
            { class: "columns" },
            h("div", {}, h("h3", {}, "Method"), h("p", { id: "method" }, lineage.method || "- (not trained by lorabay)"), h("h3", {}, "Dataset"), h("p", { class: "mono" }, lineage.dataset_digest || "-"), h("h3", {}, "Metrics"), pairs(lineage.metrics)),
            h("div", {}, h("h3", {}, "Hyper-parameters"), pairs(lineage.hyperparameters)),
            provenance ? h("div", { id: "provenance" }, h("h3", {}, "Label provenance"), pairs(provenance)) : null,
          ),
        ),
        section("Training curve", curve),
        section("Aliases", pairs(v.alias_table, "No aliases."), h("h3", {}, "Alias history"), historyTable(aliasEvents, "alias-history")),
        section(
          "Files",
          h(
            "table",
            { class: "rows", id: "files" },
            h("thead", {}, h("tr", {}, ["Path", "Size", "sha256"].map((t) => h("th", {}, t)))),
            h("tbody", {}, v.files.map((f) => h("tr", {}, h("td", {}, f.path), h("td", { class: "num" }, humanSize(f.size)), h("td", { class: "mono" }, f.sha256)))),
          ),
        ),
        h("div", { class: "columns" }, section("PEFT config", pairs(v.peft)), section("Base", pairs(v.base))),
        section("Event log", historyTable(v.events, "events")),
      );
      main.dataset.loaded = "version";
    },
    (error) => {
      clear(main).append(h("p", {}, h("a", { href: "#/adapters" }, "< Adapters")), errorBox(error));
      main.dataset.loaded = "error";
    },
  );
}
