// The playground's shell: the API key field, the model list, and one page per tab (#models, #text,
// #images, #anomaly), built once per model list and kept while switching tabs.

import { getJSON, getKey, setKey } from "./api.js";
import { el, errorBox, fill } from "./dom.js";
import { renderAnomaly } from "./anomaly.js";
import { renderImages } from "./images.js";
import { renderModels } from "./models.js";
import { renderText } from "./text.js";

const PAGES = { models: renderModels, text: renderText, images: renderImages, anomaly: renderAnomaly };
const main = document.getElementById("page");
const status = document.getElementById("server-status");
const keyInput = document.getElementById("api-key");
const built = new Map();
let models = null;
const loadErrors = errorBox();

async function loadModels() {
  built.clear();
  loadErrors.clear();
  try {
    const list = await getJSON("/v1/models");
    models = list.models;
    status.textContent = `${models.length} model${models.length === 1 ? "" : "s"} served`;
  } catch (e) {
    models = null;
    status.textContent = "could not list the models";
    loadErrors.show(e);
  }
  show();
}

function pageName() {
  const name = location.hash.replace(/^#/, "").split("/")[0];
  return name in PAGES ? name : "models";
}

function show() {
  const name = pageName();
  for (const a of document.querySelectorAll("#tabs a")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (models === null) {
    fill(main, el("section", { class: "card" }, el("h2", {}, "Models"), loadErrors,
      el("p", { class: "muted" }, "The model list could not be loaded. If the server needs an API key, enter it ",
        "above; otherwise check that genserve is running.")));
    return;
  }
  if (!built.has(name)) {
    const node = el("div", { class: `page page-${name}`, id: `page-${name}` });
    PAGES[name](node, { models, reload: loadModels });
    built.set(name, node);
  }
  const node = built.get(name);
  fill(main, node);
  const wanted = decodeURIComponent(location.hash.replace(/^#/, "").split("/")[1] || "");
  if (wanted && node.selectModel) node.selectModel(wanted);
  document.title = `${name[0].toUpperCase()}${name.slice(1)} - genserve playground`;
}

keyInput.value = getKey();
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  keyInput.value = keyInput.value.trim();
  setKey(keyInput.value);
  loadModels();
});
window.addEventListener("hashchange", show);
loadModels();
