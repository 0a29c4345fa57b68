// The Models page: every served model with its kind, version, density capability, input, metrics from its
// manifest, its anomaly calibration (with the held-out score distribution) and the artifact's pictures.

import { getBlobURL } from "./api.js";
import { el, fmt, table } from "./dom.js";
import { scoreHistogram } from "./draw.js";

const HEADLINE = /(^|_)(nll|bits_per_dim|bits_per_char|bits|perplexity|log_likelihood|elbo|loss)/;
const TRY = { text: "text", image: "images", records: "anomaly" };

function flatten(obj, prefix = "", out = []) {
  for (const [key, value] of Object.entries(obj || {})) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value && typeof value === "object" && !Array.isArray(value)) flatten(value, name, out);
    else out.push([name, Array.isArray(value) ? value.map((v) => fmt(v)).join(", ") : fmt(value)]);
  }
  return out;
}

function inputSummary(info) {
  const i = info.input;
  if (i.type === "text") {
    return `text, ${i.tokenizer} tokenizer, ${i.vocab_size} tokens` +
      (i.context_length ? `, context ${i.context_length}` : "");
  }
  if (i.type === "image") {
    const classes = i.n_classes ? `, ${i.n_classes} classes` : ", unconditional";
    return `images ${i.height}x${i.width}, ${i.levels} grey levels${classes}`;
  }
  return `records of ${i.n_features} features`;
}

function headline(info) {
  const rows = [];
  for (const [key, value] of Object.entries(info.metrics || {})) {
    if (typeof value === "number" && HEADLINE.test(key) && !key.startsWith("anomaly")) rows.push([key, fmt(value)]);
  }
  return rows.slice(0, 8);
}

function calibrationBlock(info) {
  const cal = info.calibration;
  if (!cal) {
    return el("p", { class: "muted" }, info.density === "none"
      ? "No density (sampling only), so no anomaly calibration."
      : "Not calibrated: anomaly scores are unavailable for this model.");
  }
  const rows = Object.entries(cal.thresholds).map(([k, t]) => [k, fmt(t)]);
  const canvas = el("canvas", { class: "chart" });
  const wrap = el("div", { class: "chart-wrap" }, canvas);
  const quantiles = (cal.quantiles || {})[cal.score];
  requestAnimationFrame(() => {
    if (quantiles) scoreHistogram(canvas, { scores: [], quantiles, threshold: cal.threshold, label: cal.score });
  });
  return el("div", { class: "calibration" },
    el("p", {}, `Default score `, el("strong", {}, cal.score), `, calibrated on ${cal.n_heldout} held-out items; `,
      `threshold ${fmt(cal.threshold)} at a false-positive rate of ${fmt(cal.false_positive_rate)}.`),
    quantiles ? wrap : null,
    el("details", {}, el("summary", {}, `Thresholds of all ${rows.length} score types`),
      table(["score type", "threshold"], rows)));
}

function pictures(info) {
  if (!info.pictures || !info.pictures.length) return null;
  const box = el("div", { class: "pictures" });
  for (const name of info.pictures) {
    const img = el("img", { alt: `${info.name}: ${name}`, class: "picture" });
    const fig = el("figure", {}, img, el("figcaption", {}, name));
    getBlobURL(`/v1/models/${encodeURIComponent(info.name)}/files/${encodeURIComponent(name)}`)
      .then((url) => { img.src = url; })
      .catch((e) => fig.replaceChildren(el("figcaption", { class: "muted" }, `${name}: ${e.message}`)));
    box.append(fig);
  }
  return box;
}

function card(info) {
  const density = el("span", { class: `badge density-${info.density}` }, `density: ${info.density}`);
  const versions = info.versions || [info.version];
  const tryPage = TRY[info.input.type];
  const training = info.training || {};
  return el("article", { class: "card model", id: `model-${info.name}` },
    el("header", { class: "model-head" },
      el("h2", {}, info.name),
      el("span", { class: "badge kind" }, info.kind),
      el("span", { class: "badge" }, `version ${versions.join(", ")}`),
      density,
      el("span", { class: "badge" }, info.runtime),
      tryPage
        ? el("a", { class: "try", href: `#${tryPage}/${encodeURIComponent(info.name)}` }, "Try it") : null),
    el("p", { class: "muted" }, inputSummary(info),
      training.dataset ? ` - trained on ${training.dataset}` : "",
      info.created ? ` - ${info.created.replace("T", " ").slice(0, 19)}` : ""),
    headline(info).length ? table(["metric", "value"], headline(info)) : null,
    el("details", {}, el("summary", {}, "All metrics"), table(["metric", "value"], flatten(info.metrics))),
    el("h3", {}, "Anomaly calibration"),
    calibrationBlock(info),
    pictures(info));
}

export function renderModels(node, { models, reload }) {
  node.append(
    el("div", { class: "page-head" },
      el("h1", {}, "Models"),
      el("button", { class: "secondary", onclick: reload }, "Reload")),
    models.length ? el("div", { class: "cards" }, models.map(card))
      : el("p", {}, "No models are served. Train one with genserve train."));
}
