// The console's entry: the key, the router, the navigation.
//
// Pages live in the hash (#/adapters, #/version/REF, #/playground, #/traffic), so the
// server serves one static page and every piece of data comes from /ui/api with the key.

import { api, clear, errorBox, getKey, h, setKey } from "./dom.js";
import { showAdapters, showVersion } from "./pages.js";
import { showPlayground } from "./playground.js";
import { showTraffic } from "./charts.js";

const main = document.getElementById("main");
let info = null; // /ui/api/info for the current key
let leave = null; // what the current page does when another replaces it (timers, streams)

function askForKey(message) {
  info = null;
  if (leave) leave();
  leave = null;
  const input = h("input", {
    id: "key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "sk-...",
  });
  const form = h(
    "form",
    { id: "key-form", class: "card narrow" },
    h("h2", {}, "API key"),
    h("p", {}, "The key this server gave you (empty if it has none). The page keeps it in this tab only and sends it with every call."),
    message ? errorBox(message) : null,
    h("label", { for: "key" }, "Key"),
    input,
    h("button", { type: "submit", id: "use-key" }, "Open"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    start();
  });
  clear(main).append(form);
  document.body.dataset.state = "key";
  input.focus();
}

async function start() {
  try {
    info = await api("/ui/api/info");
  } catch (error) {
    if (error.status !== 401) clear(main).append(errorBox(error));
    return;
  }
  document.getElementById("base-name").textContent = info.base ? `base: ${info.base}` : "registry only";
  for (const link of document.querySelectorAll("nav a[data-needs]")) {
    link.hidden = !info[link.dataset.needs];
  }
  route();
}

function route() {
  if (info === null) return;
  if (leave) leave();
  leave = null;
  const [page, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", link.dataset.page === (page || "adapters"));
  }
  document.body.dataset.state = "page";
  main.dataset.loaded = "";
  clear(main);
  if (page === "version" && arg) leave = showVersion(main, arg, info);
  else if (page === "playground") leave = showPlayground(main, info);
  else if (page === "traffic") leave = showTraffic(main, info);
  else leave = showAdapters(main, info);
}

document.addEventListener("console:unauthorized", (event) => askForKey(event.detail.message));
document.getElementById("change-key").addEventListener("click", () => {
  setKey(null);
  askForKey(null);
});
window.addEventListener("hashchange", route);
if (getKey() === null) askForKey(null);
else start();
