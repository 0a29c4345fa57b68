// The Anomaly page: records (pasted or uploaded CSV), texts or images scored against the model's held-out
// calibration: a histogram of the scores over the held-out distribution with the threshold for the chosen
// false-positive rate, the flagged items, and the results as a CSV download.

import { postJSON } from "./api.js";
import { busy, download, el, errorBox, field, fill, fmt, modelPage, numberInput, select, table } from "./dom.js";
import { fileToLevels, imageCanvas, scoreHistogram } from "./draw.js";
import { recordsFromCSV, toCSV } from "./csv.js";

function chunks(list, size) {
  const out = [];
  for (let i = 0; i < list.length; i += size) out.push(list.slice(i, i + size));
  return out;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsText(file);
  });
}

/** What the user gives, per input type: returns {node, items(): Promise<{field, values, ids, previews}>, demo}. */
function recordsInput(model, errors) {
  const area = el("textarea", { rows: 6, name: "records-csv", spellcheck: "false", wrap: "off",
    placeholder: `CSV: ${model.input.n_features} numbers per row (${model.input.feature_names.slice(0, 3).join(", ")}` +
      ", ...); an optional header row and an optional id column first" });
  const file = el("input", { type: "file", accept: ".csv,text/csv,text/plain", name: "records-file" });
  file.addEventListener("change", async () => {
    if (file.files.length) area.value = await readFile(file.files[0]);
  });
  const demo = el("button", { type: "button", class: "secondary", name: "demo" }, "Example records");
  demo.addEventListener("click", () => busy(demo, errors, async () => {
    // Records the model itself draws (normal), and a few of them with every other feature scaled by 1.25 to 4
    // (from barely to plainly anomalous).
    const out = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/sample`, { n: 40, seed: 1 });
    const rows = out.samples.map((s, i) => [`sample-${i}`, ...s.map((v) => Number(v.toPrecision(5)))]);
    [1.25, 1.5, 2, 4].forEach((factor, i) => {
      const scaled = out.samples[i].map((v, j) => Number((j % 2 ? v * factor : v).toPrecision(5)));
      rows.push([`scaled-x${factor}`, ...scaled]);
    });
    area.value = toCSV(["id", ...out.feature_names], rows);
  }));
  return {
    node: el("div", {}, field("Records", area), el("div", { class: "actions" }, field("or a CSV file", file), demo)),
    items: async () => {
      const { records, ids } = recordsFromCSV(area.value, model.input.n_features);
      return { field: "records", values: records, ids, previews: ids };
    },
  };
}

function textsInput(model, errors) {
  const area = el("textarea", { rows: 6, name: "texts", spellcheck: "false", placeholder: "texts to score" });
  const unit = select([["lines", "each line"], ["paragraphs", "each paragraph (blank-line separated)"]],
    { name: "unit" });
  const file = el("input", { type: "file", accept: ".txt,text/plain", name: "texts-file" });
  file.addEventListener("change", async () => {
    if (file.files.length) area.value = await readFile(file.files[0]);
  });
  const demo = el("button", { type: "button", class: "secondary", name: "demo" }, "Example texts");
  demo.addEventListener("click", () => busy(demo, errors, async () => {
    const out = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/generate`,
      { prompt: "", max_new_tokens: Math.min(80, model.limits.max_new_tokens, (model.input.context_length || 81) - 1),
        n: Math.min(3, model.limits.max_n), temperature: 0.8, seed: 3 });
    // The model's own lines (normal), then odd ones made of the same characters: a line reversed, its
    // characters sorted, and one character repeated (a character model knows no others).
    const lines = out.completions.flatMap((c) => c.text.split("\n")).filter((l) => l.trim().length > 3).slice(0, 8);
    const source = lines.length ? lines[0] : "abc";
    lines.push([...source].reverse().join(""), [...source].sort().join("").trim(),
      (source.trim()[0] || "a").repeat(Math.max(8, source.length)));
    area.value = lines.join("\n");
  }));
  return {
    node: el("div", {}, field("Texts", area),
      el("div", { class: "actions" }, field("score", unit), field("or a text file", file), demo)),
    perLine: () => unit.value === "lines",
    items: async () => {
      const text = area.value;
      if (!text.trim()) throw new Error("no texts: paste some text first");
      if (unit.value === "lines") {
        const lines = text.split("\n").filter((l) => l.trim());
        return { field: "texts", values: [text], perLine: true, ids: lines, previews: lines };
      }
      const paragraphs = text.split(/\n\s*\n/).map((p) => p.replace(/^\n+|\n+$/g, "")).filter((p) => p.trim());
      return { field: "texts", values: paragraphs, ids: paragraphs, previews: paragraphs };
    },
  };
}

function imagesInput(model, errors) {
  let images = [];
  let names = [];
  const file = el("input", { type: "file", accept: "image/*", multiple: true, name: "images-file" });
  const previews = el("div", { class: "tiles small" });
  const show = () => fill(previews, images.map((img, i) => el("figure", { class: "sample" },
    imageCanvas(img, model.input.levels, Math.max(1, Math.round(32 / Math.max(model.input.height, model.input.width)))),
    el("figcaption", {}, names[i]))));
  file.addEventListener("change", async () => {
    errors.clear();
    try {
      images = await Promise.all([...file.files].map((f) => fileToLevels(f, model)));
      names = [...file.files].map((f) => f.name);
      show();
    } catch (e) {
      errors.show(e);
    }
  });
  const demo = el("button", { type: "button", class: "secondary", name: "demo" }, "Example images");
  demo.addEventListener("click", () => busy(demo, errors, async () => {
    const out = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/sample`, { n: 12, seed: 2 });
    const { height: h, width: w, levels } = model.input;
    let state = 7;
    const random = () => {
      state = (state * 1103515245 + 12345) % 2147483648;
      return state / 2147483648;
    };
    images = out.images.map((i) => i.array);
    names = images.map((_, i) => `sample-${i}`);
    images.push(Array.from({ length: h }, () => new Array(w).fill(levels - 1)));
    names.push("all-white");
    for (let k = 0; k < 3; k++) {
      images.push(Array.from({ length: h }, () => Array.from({ length: w }, () => Math.floor(random() * levels))));
      names.push(`noise-${k}`);
    }
    show();
  }));
  return {
    node: el("div", {}, el("div", { class: "actions" }, field("Images (PNG, JPEG: resized to " +
      `${model.input.height}x${model.input.width}, grey)`, file), demo), previews),
    items: async () => {
      if (!images.length) throw new Error("no images: choose image files or load the example images");
      return { field: "images", values: images, ids: names, previews: images };
    },
  };
}

function resultsView(model, items, response) {
  const res = response.results;
  const quantiles = (model.calibration.quantiles || {})[items.perLine ? `line:${response.score_type}`
    : response.score_type];
  const flaggedIdx = res.map((r, i) => (r.is_anomaly ? i : -1)).filter((i) => i >= 0);
  const canvas = el("canvas", { class: "chart", id: "anomaly-histogram" });
  const wrap = el("div", { class: "chart-wrap" }, canvas);
  const isGmm = res.some((r) => r.component !== null && r.component !== undefined);
  const preview = (i) => {
    if (items.field === "images") {
      const scale = Math.max(1, Math.round(32 / Math.max(model.input.height, model.input.width)));
      return el("span", { class: "thumb" }, imageCanvas(items.previews[i], model.input.levels, scale), items.ids[i]);
    }
    return el("span", { class: items.field === "texts" ? "text-item" : "" }, String(items.ids[i] ?? i));
  };
  const row = (i) => {
    const r = res[i];
    const cells = [String(i), preview(i), fmt(r.score), `${fmt(r.percentile, 3)}%`, fmt(r.log_prob),
      r.is_anomaly ? el("span", { class: "flag" }, "anomaly") : "normal"];
    if (isGmm) cells.push(r.component === null ? "-" : `${r.component} (${fmt(r.responsibility, 3)})`);
    return cells;
  };
  const headers = ["#", items.field === "records" ? "id" : items.field.replace(/s$/, ""), "score", "percentile",
    "log p", "flag"];
  if (isGmm) headers.push("component");
  const csvHeader = ["index", "id", "score", "percentile", "is_anomaly", "log_prob", "component", "responsibility",
    "text_index", "line", "score_type", "threshold"];
  const csvRows = res.map((r, i) => [i, items.field === "images" ? items.ids[i] : items.ids[i], r.score,
    r.percentile, r.is_anomaly, r.log_prob, r.component ?? "", r.responsibility ?? "", r.text_index ?? "",
    r.line ?? "", response.score_type, response.threshold]);
  const save = el("button", { type: "button", class: "secondary", name: "download" }, "Download results (CSV)");
  save.addEventListener("click", () => download(`${model.name}-anomaly.csv`, toCSV(csvHeader, csvRows)));
  const node = el("div", { class: "anomaly-results", id: "anomaly-results" },
    el("p", { class: "stats" }, `${res.length} items scored by ${response.score_type}; `,
      el("strong", { class: flaggedIdx.length ? "flag-text" : "" }, `${flaggedIdx.length} flagged`),
      ` above the threshold ${fmt(response.threshold)}`,
      response.false_positive_rate !== null ? ` (held-out false-positive rate ${fmt(response.false_positive_rate)})`
        : " (set by hand)",
      response.density === "bound" ? "; log p is a lower bound" : ""),
    wrap,
    el("p", { class: "legend muted" }, el("span", { class: "lkey held" }), " held-out normal items ",
      el("span", { class: "lkey items" }), " these items ", el("span", { class: "lkey flagged" }), " flagged ",
      el("span", { class: "lkey threshold" }), " threshold"),
    el("h3", {}, `Flagged (${flaggedIdx.length})`),
    flaggedIdx.length ? table(headers, flaggedIdx.map(row), () => ({ class: "flagged" }))
      : el("p", { class: "muted" }, "Nothing flagged at this threshold."),
    el("div", { class: "actions" }, save),
    el("details", {}, el("summary", {}, `All ${res.length} items`),
      table(headers, res.map((_, i) => row(i)), (i) => (res[i].is_anomaly ? { class: "flagged" } : {}))));
  requestAnimationFrame(() => scoreHistogram(canvas, { scores: res.map((r) => r.score), quantiles,
    threshold: response.threshold, flagged: res.map((r) => r.is_anomaly), label: response.score_type }));
  return node;
}

function modelView(model) {
  const errors = errorBox();
  const cal = model.calibration;
  if (model.density === "none" || !cal) {
    return el("section", { class: "card" }, el("p", {}, model.density === "none"
      ? `${model.name} is a ${model.kind}: it only samples, so it gives no anomaly scores.`
      : `${model.name} is not calibrated, so it gives no anomaly scores.`));
  }
  const input = { records: recordsInput, text: textsInput, image: imagesInput }[model.input.type](model, errors);
  const scoreTypes = Object.keys(cal.thresholds).filter((k) => !k.startsWith("line:"));
  const score = select(scoreTypes, { name: "score-type" });
  score.value = cal.score;
  const fpr = numberInput({ name: "fpr", min: 0.0001, max: 0.5, step: 0.005, value: cal.false_positive_rate });
  const run = el("button", { type: "button", class: "primary", name: "detect" }, "Score");
  const out = el("div");
  let last = null;

  async function detect() {
    const items = await input.items();
    const limit = model.input.type === "records" ? model.limits.max_records_per_request
      : model.input.type === "image" ? model.limits.max_images_per_request : model.limits.max_texts_per_request;
    const results = [];
    let response = null;
    for (const part of chunks(items.values, limit)) {
      const body = { [items.field]: part, score: score.value, false_positive_rate: Number(fpr.value) };
      if (items.perLine) body.per_line = true;
      response = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/anomaly`, body);
      results.push(...response.results);
    }
    response.results = results;
    last = { items, response };
    fill(out, resultsView(model, items, response));
  }

  run.addEventListener("click", () => busy(run, errors, detect));
  const rerun = () => last && run.click();
  fpr.addEventListener("change", rerun);
  score.addEventListener("change", rerun);
  return el("section", { class: "card" },
    input.node,
    el("div", { class: "row" }, field("score type", score, `default ${cal.score}`),
      field("false-positive rate", fpr, "of the threshold, on held-out data")),
    el("div", { class: "actions" }, run), errors, out);
}

export function renderAnomaly(node, { models }) {
  modelPage(node, {
    title: "Anomaly", models: models.filter((m) => m.density !== "none" && m.calibration),
    empty: "No served model is calibrated for anomaly scores.", id: "anomaly-model",
    label: (m) => `${m.name} (${m.input.type}, ${m.kind})`,
    describe: ({ calibration: c }) => `Calibrated on ${c.n_heldout} held-out items; default score ${c.score}, ` +
      `threshold ${fmt(c.threshold)} at a false-positive rate of ${fmt(c.false_positive_rate)}.`,
    view: modelView,
  });
}
