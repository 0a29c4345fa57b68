// The Images page: sample grids (by class for class-conditional models, reproducible by seed), a drawing
// pad (mouse, touch or an uploaded picture) whose image can be completed, scored pixel by pixel as a
// log-likelihood heat map, reconstructed or interpolated (VAEs); GANs sample only.

import { postJSON } from "./api.js";
import { busy, el, errorBox, field, fill, fmt, modelPage, numberInput, select } from "./dom.js";
import { fileToLevels, heatMap, imageCanvas, paintImage } from "./draw.js";

const LATENT = new Set(["vae", "gan", "realnvp"]); // latent-variable image kinds: no completion, no per-pixel

function scaleFor(model, target = 84) {
  return Math.max(2, Math.round(target / Math.max(model.input.height, model.input.width)));
}

function blank(h, w) {
  return Array.from({ length: h }, () => new Array(w).fill(0));
}

function figure(image, model, caption, options = {}) {
  return el("figure", { class: "sample" }, imageCanvas(image, model.input.levels, options.scale || scaleFor(model),
    options), caption ? el("figcaption", {}, caption) : null);
}

function labelName(model, label) {
  if (label === null || label === undefined) return "";
  const names = model.input.class_names;
  return names && names[label] !== undefined && names[label] !== String(label) ? `${label} (${names[label]})`
    : String(label);
}

function caption(model, img) {
  const parts = [];
  if (img.label !== null && img.label !== undefined) parts.push(`label ${labelName(model, img.label)}`);
  if (img.log_prob !== null && img.log_prob !== undefined) parts.push(`log p ${fmt(img.log_prob, 4)}`);
  return parts.join(", ");
}

/** A drawing pad of the model's size: draw with the mouse or a finger, erase, clear, upload. */
function drawingPad(model, errors) {
  const { height: h, width: w, levels } = model.input;
  let image = blank(h, w);
  const scale = Math.max(6, Math.floor(252 / Math.max(h, w)));
  const canvas = el("canvas", { class: "pixels pad", width: w, height: h, id: "draw-pad" });
  canvas.style.width = `${w * scale}px`;
  canvas.style.height = `${h * scale}px`;
  const brush = select([["1", "thin"], ["2", "medium"], ["3", "thick"]], { name: "brush" });
  brush.value = h >= 16 ? "2" : "1";
  const tool = select([["pen", "pen"], ["eraser", "eraser"]], { name: "tool" });
  const invert = el("input", { type: "checkbox", name: "invert" });
  const upload = el("input", { type: "file", accept: "image/*", name: "upload" });
  const guide = { rows: null };
  const redraw = () => {
    paintImage(canvas, image, levels);
    if (guide.rows !== null && guide.rows < h) {
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "rgba(96, 165, 250, 0.45)";
      ctx.fillRect(0, guide.rows, w, h - guide.rows);
    }
  };
  const top = levels - 1;
  const dab = (r, c) => {
    // The pixel under the pointer at full strength; with a wider brush, the pixels around it too (softer at the
    // edge when there are grey levels).
    const radius = Number(brush.value) / 2;
    for (let y = Math.floor(r - radius - 1); y <= Math.ceil(r + radius); y++) {
      for (let x = Math.floor(c - radius - 1); x <= Math.ceil(c + radius); x++) {
        if (y < 0 || y >= h || x < 0 || x >= w) continue;
        const under = y === Math.floor(r) && x === Math.floor(c);
        const d = Math.hypot(y + 0.5 - r, x + 0.5 - c);
        const strength = under || d <= radius ? 1 : d <= radius + 0.75 && levels > 2 ? 0.5 : 0;
        if (!strength) continue;
        if (tool.value === "eraser") image[y][x] = 0;
        else image[y][x] = Math.max(image[y][x], Math.round(top * strength));
      }
    }
  };
  let last = null;
  const paint = (event) => {
    const rect = canvas.getBoundingClientRect();
    const point = [((event.clientY - rect.top) / rect.height) * h, ((event.clientX - rect.left) / rect.width) * w];
    const from = last || point;
    const steps = Math.max(1, Math.ceil(2 * Math.hypot(point[0] - from[0], point[1] - from[1])));
    for (let i = 1; i <= steps; i++) {  // along the segment from the last point: no gaps when the pointer is fast
      dab(from[0] + ((point[0] - from[0]) * i) / steps, from[1] + ((point[1] - from[1]) * i) / steps);
    }
    last = point;
    redraw();
  };
  let down = false;
  canvas.addEventListener("pointerdown", (e) => {
    down = true;
    last = null;
    canvas.setPointerCapture(e.pointerId);
    paint(e);
  });
  canvas.addEventListener("pointermove", (e) => down && paint(e));
  canvas.addEventListener("pointerup", () => { down = false; });
  canvas.addEventListener("pointercancel", () => { down = false; });
  upload.addEventListener("change", async () => {
    errors.clear();
    if (!upload.files.length) return;
    try {
      image = await fileToLevels(upload.files[0], model, invert.checked);
      redraw();
    } catch (e) {
      errors.show(e);
    }
  });
  const clear = el("button", { type: "button", class: "secondary", onclick: () => { image = blank(h, w); redraw(); } },
    "Clear");
  const fromSample = el("button", { type: "button", class: "secondary", name: "use-sample" }, "Use a sample");
  fromSample.addEventListener("click", () => busy(fromSample, errors, async () => {
    const out = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/sample`, { n: 1 });
    image = out.images[0].array;
    redraw();
  }));
  redraw();
  const node = el("div", { class: "pad-wrap" }, canvas,
    el("div", { class: "pad-tools" }, field("tool", tool), field("brush", brush), clear, fromSample,
      field("upload a picture", upload), el("label", { class: "check" }, invert, " invert (dark strokes on light)")));
  return {
    node,
    get: () => image.map((row) => row.slice()),
    set: (img) => { image = img.map((row) => row.slice()); redraw(); },
    showKnownRows: (rows) => { guide.rows = rows; redraw(); },
  };
}

function sampleSection(model) {
  const errors = errorBox();
  const conditional = model.input.n_classes > 0;
  const maxImages = model.limits.max_images_per_request;
  const byClass = el("input", { type: "checkbox", name: "by-class", checked: conditional });
  const perClass = numberInput({ name: "per-class", min: 1, value: Math.max(1, Math.min(3, Math.floor(maxImages /
    Math.max(1, model.input.n_classes)))) });
  const n = numberInput({ name: "n", min: 1, max: maxImages, value: Math.min(16, maxImages) });
  const labelOptions = [["", "drawn from the class prior"]];
  for (let k = 0; k < model.input.n_classes; k++) labelOptions.push([String(k), labelName(model, k)]);
  const label = select(labelOptions, { name: "label" });
  const seed = numberInput({ name: "seed", min: 0, step: 1, value: 0 });
  const run = el("button", { class: "primary", type: "button", name: "sample" }, "Sample");
  const grid = el("div", { class: "grid-out", id: "sample-output" });
  const stats = el("p", { class: "muted" });
  const sync = () => {
    const grouped = conditional && byClass.checked;
    perClass.parentElement.hidden = !grouped;
    n.parentElement.hidden = grouped;
    label.parentElement.hidden = grouped || !conditional;
  };
  byClass.addEventListener("change", sync);

  run.addEventListener("click", () => busy(run, errors, async () => {
    const body = { seed: seed.value === "" ? undefined : Number(seed.value) };
    const grouped = conditional && byClass.checked;
    if (grouped) {
      const k = Number(perClass.value) || 1;
      body.labels = [];
      for (let c = 0; c < model.input.n_classes; c++) for (let j = 0; j < k; j++) body.labels.push(c);
      body.n = body.labels.length;
    } else {
      body.n = Number(n.value) || 1;
      if (label.value !== "") body.label = Number(label.value);
    }
    const started = performance.now();
    fill(grid, el("p", { class: "muted" }, `sampling ${body.n} images...`));
    const out = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/sample`, body);
    if (grouped) {
      const rows = new Map();
      for (const img of out.images) {
        if (!rows.has(img.label)) rows.set(img.label, []);
        const text = img.log_prob === null ? "" : `log p ${fmt(img.log_prob, 4)}`;
        rows.get(img.label).push(figure(img.array, model, text));
      }
      fill(grid, el("div", { class: "class-grid" }, [...rows.entries()].map(([l, figs]) => el("div",
        { class: "class-col" }, el("span", { class: "class-label" }, labelName(model, l)), figs))));
    } else {
      fill(grid, el("div", { class: "tiles" }, out.images.map((img) => figure(img.array, model, caption(model, img)))));
    }
    stats.textContent = `${out.images.length} images in ${fmt((performance.now() - started) / 1000, 3)} s` +
      (body.seed !== undefined ? ` (seed ${body.seed}: the same seed gives the same images)` : "");
  }));
  const section = el("section", { class: "card" }, el("h2", {}, "Sample"),
    el("div", { class: "row" },
      conditional ? el("label", { class: "check" }, byClass, " a column per class") : null,
      field("per class", perClass), field("images", n), field("class", label), field("seed", seed, "empty: random")),
    el("div", { class: "actions" }, run), errors, grid, stats);
  sync();
  return section;
}

function completeSection(model, pad) {
  const errors = errorBox();
  const h = model.input.height;
  const rows = el("input", { type: "range", name: "known-rows", min: 0, max: h, value: Math.floor(h / 2) });
  const rowsShown = el("span", {}, rows.value);
  const n = numberInput({ name: "completions", min: 1, max: 16, value: 4 });
  const seed = numberInput({ name: "seed", min: 0, step: 1, value: 0 });
  const run = el("button", { class: "primary", type: "button", name: "complete" }, "Complete");
  const out = el("div", { class: "tiles", id: "complete-output" });
  const sync = () => {
    rowsShown.textContent = rows.value;
    pad.showKnownRows(Number(rows.value));
  };
  rows.addEventListener("input", sync);
  run.addEventListener("click", () => busy(run, errors, async () => {
    const known = Number(rows.value);
    const body = { images: [pad.get()], known_rows: known, n: Number(n.value) || 1 };
    if (seed.value !== "") body.seed = Number(seed.value);
    fill(out, el("p", { class: "muted" }, "completing..."));
    const res = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/complete`, body);
    fill(out, res.completions[0].map((img) => figure(img.array, model, caption(model, img),
      { known: res.known_pixels, scale: scaleFor(model, 112) })));
  }));
  sync();
  return el("div", { class: "tool" }, el("h3", {}, "Complete the drawing"),
    el("p", { class: "muted" }, "The top rows are kept (the shaded rows of the pad are ignored); the model samples ",
      "the rest, pixel by pixel. Generated pixels are tinted blue."),
    el("div", { class: "row" }, field("known rows", el("span", { class: "range" }, rows, rowsShown)),
      field("completions", n), field("seed", seed)),
    el("div", { class: "actions" }, run), errors, out);
}

function scoreSection(model, pad) {
  const errors = errorBox();
  const perPixel = !LATENT.has(model.kind);
  const labelOptions = [["", "marginal log p(x)"]];
  for (let k = 0; k < model.input.n_classes; k++) labelOptions.push([String(k), `log p(x | ${labelName(model, k)})`]);
  const label = select(labelOptions, { name: "score-label" });
  const run = el("button", { class: "primary", type: "button", name: "log-prob" }, "Score the drawing");
  const out = el("div", { class: "heat-out", id: "heat-output" });
  run.addEventListener("click", () => busy(run, errors, async () => {
    const image = pad.get();
    const body = { images: [image], per_pixel: perPixel };
    if (label.value !== "") body.labels = [Number(label.value)];
    const res = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/log_prob`, body);
    const bound = res.density === "bound" ? " (a lower bound)" : "";
    const summary = el("p", { class: "stats" }, `log p = ${fmt(res.log_prob[0])} nats${bound} - `,
      `${fmt(res.bits_per_dim[0])} bits per pixel`);
    if (!res.per_pixel) {
      fill(out, summary);
      return;
    }
    const nll = res.per_pixel[0].map((row) => row.map((v) => -v));
    const flat = nll.flat();
    const worst = flat.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0]).slice(0, 3)
      .map(([v, i]) => `row ${Math.floor(i / image[0].length)}, column ${i % image[0].length}: ${fmt(v, 3)} nats`);
    fill(out, summary, el("div", { class: "heat-pair" },
      figure(image, model, "the image", { scale: scaleFor(model, 168) }),
      heatMap(nll, scaleFor(model, 168), 0, Math.max(...flat, 1e-6), "-log p(pixel | pixels before it), nats")),
    el("p", { class: "muted" }, `Most surprising pixels: ${worst.join("; ")}`));
  }));
  return el("div", { class: "tool" }, el("h3", {}, perPixel ? "Log-likelihood heat map" : "Log-likelihood"),
    el("p", { class: "muted" }, perPixel
      ? "Each pixel's exact -log p(x_i | x_<i): bright pixels are the ones the model did not expect."
      : `A ${model.kind} gives log p(x) of the whole image${model.density === "bound" ? " (a lower bound)" : ""}, ` +
        "not per pixel."),
    model.input.n_classes ? el("div", { class: "row" }, field("score", label)) : null,
    el("div", { class: "actions" }, run), errors, out);
}

function vaeSection(model, pad) {
  const errors = errorBox();
  const steps = numberInput({ name: "steps", min: 2, max: 64, value: 8 });
  let ends = null;
  const endsOut = el("div", { class: "tiles" });
  const out = el("div", { class: "tiles", id: "interpolate-output" });
  const pick = el("button", { class: "secondary", type: "button", name: "sample-ends" }, "Two samples as the ends");
  const useDrawing = el("button", { class: "secondary", type: "button" }, "Drawing to a sample");
  const run = el("button", { class: "primary", type: "button", name: "interpolate" }, "Interpolate");
  const recon = el("button", { class: "secondary", type: "button", name: "reconstruct" }, "Reconstruct the drawing");
  const showEnds = () => fill(endsOut, ends.map((img, i) => figure(img, model, i ? "end B" : "end A")));
  const sampleEnds = async (n) => (await postJSON(`/v1/models/${encodeURIComponent(model.name)}/sample`,
    { n, seed: Math.floor(Math.random() * 1e6) })).images.map((i) => i.array);
  pick.addEventListener("click", () => busy(pick, errors, async () => { ends = await sampleEnds(2); showEnds(); }));
  useDrawing.addEventListener("click", () => busy(useDrawing, errors, async () => {
    ends = [pad.get(), (await sampleEnds(1))[0]];
    showEnds();
  }));
  run.addEventListener("click", () => busy(run, errors, async () => {
    if (!ends) {
      ends = await sampleEnds(2);
      showEnds();
    }
    const res = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/interpolate`,
      { images: ends, steps: Number(steps.value) || 8 });
    fill(out, res.images.map((img, i) => figure(img.array, model, String(i))));
  }));
  recon.addEventListener("click", () => busy(recon, errors, async () => {
    const res = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/reconstruct`, { images: [pad.get()] });
    fill(out, figure(pad.get(), model, "drawing"), figure(res.images[0].array, model, "reconstruction"));
  }));
  return el("section", { class: "card" }, el("h2", {}, "Interpolate (VAE)"),
    el("p", { class: "muted" }, "Images decoded from evenly spaced points on the line between two images' ",
      "posterior means."),
    el("div", { class: "row" }, field("steps", steps)),
    el("div", { class: "actions" }, pick, useDrawing, run, recon), errors, endsOut, out);
}

function modelView(model) {
  const node = el("div", { class: "image-model" });
  const kinds = [];
  node.append(sampleSection(model));
  if (model.density !== "none" || model.kind === "vae") {
    const padErrors = errorBox();
    const pad = drawingPad(model, padErrors);
    const tools = [];
    if (!LATENT.has(model.kind)) tools.push(completeSection(model, pad));
    if (model.density !== "none") tools.push(scoreSection(model, pad));
    node.append(el("section", { class: "card" }, el("h2", {}, "Draw, upload, complete, score"),
      el("div", { class: "pad-layout" }, pad.node, el("div", { class: "tools" }, tools)), padErrors));
    if (model.kind === "vae") node.append(vaeSection(model, pad));
  } else {
    kinds.push(el("p", { class: "muted" }, `${model.name} is a ${model.kind}: it only samples (no density).`));
  }
  node.append(...kinds);
  return node;
}

export function renderImages(node, { models }) {
  modelPage(node, {
    title: "Images", models: models.filter((m) => m.input.type === "image"), empty: "No image models are served.",
    id: "image-model", label: (m) => `${m.name} (${m.kind}, ${m.input.height}x${m.input.width})`,
    describe: (m) => `${m.kind}, density ${m.density}: ${m.input.height}x${m.input.width} pixels, ` +
      `${m.input.levels} grey levels, ${m.input.n_classes ? `${m.input.n_classes} classes` : "unconditional"}`,
    view: modelView,
  });
}
