// Drawing on <canvas>: images of grey levels, heat maps, histograms and small line charts. No library.

import { el, fmt } from "./dom.js";

/** A canvas showing `image` (rows of integer levels 0..levels-1, white = levels-1) at `scale` pixels per
 * pixel. Pixels from index `known` on (raster order) can be tinted, to show what a completion added. */
export function imageCanvas(image, levels, scale = 4, options = {}) {
  const h = image.length;
  const w = image[0].length;
  const canvas = el("canvas", { class: "pixels", width: w, height: h });
  canvas.style.width = `${w * scale}px`;
  canvas.style.height = `${h * scale}px`;
  paintImage(canvas, image, levels, options);
  return canvas;
}

export function paintImage(canvas, image, levels, options = {}) {
  const h = image.length;
  const w = image[0].length;
  const ctx = canvas.getContext("2d");
  const data = ctx.createImageData(w, h);
  const top = Math.max(1, levels - 1);
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const v = Math.round((255 * Math.min(Math.max(image[r][c] ?? 0, 0), top)) / top);
      const i = 4 * (r * w + c);
      const generated = options.known !== undefined && r * w + c >= options.known;
      // Generated pixels in a faint blue so the given prefix stays recognisable.
      data.data[i] = generated ? Math.round(v * 0.85) : v;
      data.data[i + 1] = generated ? Math.round(v * 0.92) : v;
      data.data[i + 2] = generated ? Math.min(255, v + 40) : v;
      data.data[i + 3] = 255;
    }
  }
  ctx.putImageData(data, 0, 0);
}

/** Colour for t in [0, 1]: dark blue - teal - yellow (perceptually ordered, like viridis). */
export function viridis(t) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  return stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
}

/** A heat map of values (rows of numbers), low..high mapped through viridis, with a colour bar. */
export function heatMap(values, scale, low, high, label) {
  const h = values.length;
  const w = values[0].length;
  const canvas = el("canvas", { class: "pixels", width: w, height: h });
  canvas.style.width = `${w * scale}px`;
  canvas.style.height = `${h * scale}px`;
  const ctx = canvas.getContext("2d");
  const data = ctx.createImageData(w, h);
  const span = high - low || 1;
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const [R, G, B] = viridis((values[r][c] - low) / span);
      const i = 4 * (r * w + c);
      data.data.set([R, G, B, 255], i);
    }
  }
  ctx.putImageData(data, 0, 0);
  const bar = el("canvas", { class: "colorbar", width: 160, height: 10 });
  const bctx = bar.getContext("2d");
  for (let x = 0; x < 160; x++) {
    const [R, G, B] = viridis(x / 159);
    bctx.fillStyle = `rgb(${R},${G},${B})`;
    bctx.fillRect(x, 0, 1, 10);
  }
  return el("figure", { class: "heat" }, canvas,
    el("figcaption", {}, el("span", {}, fmt(low, 3)), bar, el("span", {}, fmt(high, 3)), el("div", {}, label)));
}

function setupCanvas(canvas, cssWidth, cssHeight) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  canvas.style.width = `${cssWidth}px`;
  canvas.style.height = `${cssHeight}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return ctx;
}

function niceTicks(lo, hi, count = 5) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * span; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

/** Density of the held-out scores from their quantiles (levels 0, 0.01, ..., 1), on `edges`' bins. */
export function densityFromQuantiles(quantiles, edges) {
  const n = quantiles.length - 1;
  const mass = new Array(edges.length - 1).fill(0);
  for (let q = 0; q < n; q++) {
    const a = quantiles[q];
    const b = quantiles[q + 1];
    for (let k = 0; k < mass.length; k++) {
      const lo = edges[k];
      const hi = edges[k + 1];
      if (b <= a) {
        if (a >= lo && (a < hi || (k === mass.length - 1 && a <= hi))) mass[k] += 1 / n;
        continue;
      }
      const overlap = Math.min(b, hi) - Math.max(a, lo);
      if (overlap > 0) mass[k] += overlap / (b - a) / n;
    }
  }
  return mass;
}

/** A histogram of `scores` (bars, share of items per bin) over the held-out distribution (grey, from its
 * quantiles), with the threshold as a red line. Returns the canvas. */
export function scoreHistogram(canvas, { scores, quantiles, threshold, flagged, label }) {
  const width = Math.max(280, Math.min(760, canvas.parentElement ? canvas.parentElement.clientWidth - 4 : 640));
  const height = 240;
  const ctx = setupCanvas(canvas, width, height);
  const pad = { l: 44, r: 12, t: 14, b: 40 };
  const finite = scores.filter(Number.isFinite);
  const hasHeld = quantiles && quantiles.length > 2;
  // The axis covers the held-out distribution (its far tail clipped), the threshold and the items near them;
  // items far outside are counted in an overflow bin at either end, so one wild item does not squash the rest.
  let lo = hasHeld ? quantiles[0] : Math.min(...finite, threshold);
  let hi = hasHeld ? quantiles[Math.round(0.995 * (quantiles.length - 1))] : Math.max(...finite, threshold);
  lo = Math.min(lo, threshold);
  hi = Math.max(hi, threshold);
  const span = hi - lo || Math.abs(hi) || 1;
  const farLo = lo - 0.75 * span;
  const farHi = hi + 1.5 * span;
  for (const s of finite) {
    if (s >= farLo) lo = Math.min(lo, s);
    if (s <= farHi) hi = Math.max(hi, s);
  }
  if (hi === lo) {
    lo -= 1;
    hi += 1;
  }
  const margin = 0.04 * (hi - lo);
  lo -= margin;
  hi += margin;
  const bins = 40;
  const edges = Array.from({ length: bins + 1 }, (_, i) => lo + ((hi - lo) * i) / bins);
  const items = new Array(bins).fill(0);
  const flaggedCounts = new Array(bins).fill(0);
  const outside = { below: 0, above: 0, belowFrom: Infinity, aboveTo: -Infinity };
  finite.forEach((s, i) => {
    if (s < lo) {
      outside.below += 1;
      outside.belowFrom = Math.min(outside.belowFrom, s);
    } else if (s > hi) {
      outside.above += 1;
      outside.aboveTo = Math.max(outside.aboveTo, s);
    }
    const k = Math.min(bins - 1, Math.max(0, Math.floor(((s - lo) / (hi - lo)) * bins)));
    items[k] += 1 / finite.length;
    if (flagged && flagged[i]) flaggedCounts[k] += 1 / finite.length;
  });
  const held = quantiles && quantiles.length ? densityFromQuantiles(quantiles, edges) : null;
  const top = Math.max(...items, ...(held || [0])) || 1;
  const X = (v) => pad.l + ((v - lo) / (hi - lo)) * (width - pad.l - pad.r);
  const Y = (m) => height - pad.b - (m / top) * (height - pad.t - pad.b);
  const styles = getComputedStyle(document.documentElement);
  const ink = styles.getPropertyValue("--ink").trim() || "#222";
  const muted = styles.getPropertyValue("--muted").trim() || "#777";
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = muted;
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t);
  ctx.lineTo(pad.l, height - pad.b);
  ctx.lineTo(width - pad.r, height - pad.b);
  ctx.stroke();
  ctx.fillStyle = muted;
  ctx.textAlign = "center";
  for (const t of niceTicks(lo, hi, Math.max(3, Math.floor(width / 90)))) {
    ctx.fillText(fmt(t, 3), X(t), height - pad.b + 14);
  }
  ctx.fillText(label || "score", (pad.l + width - pad.r) / 2, height - 8);
  ctx.save();
  ctx.translate(12, (pad.t + height - pad.b) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText("share of items", 0, 0);
  ctx.restore();
  const bw = (width - pad.l - pad.r) / bins;
  if (held) {
    ctx.fillStyle = "rgba(140, 140, 140, 0.35)";
    held.forEach((m, k) => ctx.fillRect(pad.l + k * bw, Y(m), bw, height - pad.b - Y(m)));
  }
  items.forEach((m, k) => {
    if (!m) return;
    ctx.fillStyle = "rgba(37, 99, 235, 0.75)";
    ctx.fillRect(pad.l + k * bw + 1, Y(m), bw - 2, height - pad.b - Y(m));
    if (flaggedCounts[k]) {
      ctx.fillStyle = "rgba(220, 38, 38, 0.85)";
      ctx.fillRect(pad.l + k * bw + 1, Y(flaggedCounts[k]), bw - 2, height - pad.b - Y(flaggedCounts[k]));
    }
  });
  const tx = X(threshold);
  ctx.strokeStyle = "#dc2626";
  ctx.lineWidth = 2;
  ctx.setLineDash([5, 3]);
  ctx.beginPath();
  ctx.moveTo(tx, pad.t);
  ctx.lineTo(tx, height - pad.b);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#dc2626";
  ctx.textAlign = tx > width - 110 ? "right" : "left";
  ctx.fillText(`threshold ${fmt(threshold, 4)}`, tx + (tx > width - 110 ? -4 : 4), pad.t + 8);
  ctx.fillStyle = ink;
  ctx.textAlign = "right";
  if (outside.above) {
    ctx.fillText(`${outside.above} beyond, up to ${fmt(outside.aboveTo, 3)} \u2192`, width - pad.r, pad.t + 24);
  }
  ctx.textAlign = "left";
  if (outside.below) {
    ctx.fillText(`\u2190 ${outside.below} below, down to ${fmt(outside.belowFrom, 3)}`, pad.l + 4, pad.t + 24);
  }
  return canvas;
}

/** Decode an image file in the page into rows of the model's levels (grey = luminance, resized). */
export function fileToLevels(file, model, invert = false) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      const { height: h, width: w, levels } = model.input;
      const canvas = document.createElement("canvas");
      canvas.width = w;
      canvas.height = h;
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = invert ? "#fff" : "#000";
      ctx.fillRect(0, 0, w, h);
      ctx.drawImage(img, 0, 0, w, h);
      const data = ctx.getImageData(0, 0, w, h).data;
      const rows = Array.from({ length: h }, () => new Array(w).fill(0));
      for (let i = 0; i < w * h; i++) {
        let v = 0.299 * data[4 * i] + 0.587 * data[4 * i + 1] + 0.114 * data[4 * i + 2];
        if (invert) v = 255 - v;
        rows[Math.floor(i / w)][i % w] = Math.round((v * (levels - 1)) / 255);
      }
      URL.revokeObjectURL(url);
      resolve(rows);
    };
    img.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error(`${file.name} is not an image the browser can read`));
    };
    img.src = url;
  });
}
