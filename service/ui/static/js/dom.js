// Building the page from data: elements are created and text is set with textContent, never parsed as
// HTML, so nothing a model or a user writes can become markup.

/** el("div", {class: "x", onclick: f}, "text", child, ...): an element; strings become text nodes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A number for people: 4 significant digits, integers as they are. */
export function fmt(x, digits = 4) {
  if (x === null || x === undefined) return "-";
  if (typeof x !== "number") return String(x);
  if (!Number.isFinite(x)) return String(x);
  if (Number.isInteger(x) && Math.abs(x) < 1e9) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(digits - 1);
  return String(Number(x.toPrecision(digits)));
}

/** A labelled form control. */
export function field(label, control, hint) {
  const wide = control instanceof HTMLTextAreaElement;
  return el("label", { class: wide ? "field wide" : "field" }, el("span", { class: "field-label" }, label), control,
    hint ? el("span", { class: "hint" }, hint) : null);
}

export function numberInput(attrs) {
  return el("input", { type: "number", inputmode: "decimal", ...attrs });
}

export function select(options, attrs = {}) {
  const s = el("select", attrs);
  for (const o of options) {
    const [value, label] = Array.isArray(o) ? o : [o, o];
    s.append(el("option", { value }, label));
  }
  return s;
}

/** A page of one kind of model with a picker at its head: `models` (those of the kind; `empty` says so when there
 * are none), each labelled `label(m)`. Choosing one writes `describe(m)` under the head and shows `view(m)` (built
 * once per model and kept) or calls `show(m)`; `body` follows the line. `node.selectModel(name)` chooses one. */
export function modelPage(node, { title, models, empty, id, label, describe, view, show, body = [] }) {
  if (!models.length) {
    node.append(el("h1", {}, title), el("p", {}, empty));
    return;
  }
  const picker = select(models.map((m) => [m.name, label(m)]), { name: "model", id });
  const info = el("p", { class: "muted" });
  const holder = el("div");
  const views = new Map();
  const sync = () => {
    const m = models.find((x) => x.name === picker.value);
    info.textContent = describe(m);
    if (view) {
      if (!views.has(m.name)) views.set(m.name, view(m));
      fill(holder, views.get(m.name));
    }
    if (show) show(m);
  };
  picker.addEventListener("change", sync);
  node.selectModel = (name) => {
    if (models.some((m) => m.name === name)) {
      picker.value = name;
      sync();
    }
  };
  sync();
  node.append(el("div", { class: "page-head" }, el("h1", {}, title), field("model", picker)), info,
    ...(view ? [holder] : []), ...body);
}

/** An error box: shows an ApiError's description (or any Error's message), as text. */
export function errorBox() {
  const box = el("div", { class: "error", role: "alert", hidden: true });
  box.show = (e) => {
    const message = e && typeof e.describe === "function" ? e.describe() : String(e && e.message ? e.message : e);
    fill(box, el("strong", {}, "Error "), message);
    box.hidden = false;
  };
  box.clear = () => {
    box.hidden = true;
    box.replaceChildren();
  };
  return box;
}

/** Run an async action from a button: disables it, shows a busy state and any error in `errors`. */
export async function busy(button, errors, action) {
  errors.clear();
  button.disabled = true;
  button.classList.add("busy");
  try {
    return await action();
  } catch (e) {
    console.error(e);
    errors.show(e);
    return undefined;
  } finally {
    button.disabled = false;
    button.classList.remove("busy");
  }
}

export function table(headers, rows, rowAttrs) {
  return el("table", { class: "data" },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r, i) => el("tr", rowAttrs ? rowAttrs(i) : {}, r.map((c) => el("td", {}, c))))));
}

/** Offer `text` as a file download (made in the page; nothing is fetched). */
export function download(filename, text, type = "text/csv") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
