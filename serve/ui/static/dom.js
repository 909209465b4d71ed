// Small helpers every page uses: building elements, calling the API with the key.
//
// Data is only ever written with textContent (h() turns strings into text nodes) and
// attributes with setAttribute: nothing a user wrote is parsed as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";
const KEY_SLOT = "lorabay.console.key";

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(node.dataset, value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// h("td", {class: "x"}, "text", otherNode): an HTML element.
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

// s("rect", {x: 1}): an SVG element.
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

export function getKey() {
  return sessionStorage.getItem(KEY_SLOT);
}

export function setKey(key) {
  if (key === null) sessionStorage.removeItem(KEY_SLOT);
  else sessionStorage.setItem(KEY_SLOT, key);
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The key, as the header every call sends (none for a server without keys).
export function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// GET a console endpoint; its JSON, or an ApiError with the server's message.
export async function api(path) {
  const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || {};
    const failure = new ApiError(response.status, error.message || response.statusText, error.code);
    if (response.status === 401) document.dispatchEvent(new CustomEvent("console:unauthorized", { detail: failure }));
    throw failure;
  }
  return body;
}

export function humanSize(bytes) {
  let value = Number(bytes);
  for (const unit of ["B", "KB", "MB", "GB"]) {
    if (value < 1024 || unit === "GB") return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return `${bytes} B`;
}

export function shortTime(iso) {
  return iso ? String(iso).slice(0, 19).replace("T", " ") : "";
}

export function shortDigest(digest) {
  return digest ? String(digest).slice(0, 19) : "";
}

// A base folder's last part (the id of a folder base is its path); other ids as they are.
export function baseLabel(id) {
  const text = String(id ?? "");
  return /^[/.~]/.test(text) ? text.split("/").filter(Boolean).pop() || text : text;
}

export function versionHref(ref) {
  return `#/version/${encodeURIComponent(ref)}`;
}

// A two-column table of a mapping (hyper-parameters, metrics, a PEFT config).
export function pairs(mapping, empty = "-") {
  const entries = Object.entries(mapping || {});
  if (!entries.length) return h("p", { class: "muted" }, empty);
  return h(
    "table",
    { class: "pairs" },
    h(
      "tbody",
      {},
      entries.map(([key, value]) =>
        h("tr", {}, h("th", {}, key), h("td", {}, typeof value === "object" && value !== null ? JSON.stringify(value) : String(value))),
      ),
    ),
  );
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error instanceof Error ? error.message : String(error));
}
