// The Text page: streamed generation with every token shaded by its probability (hover or tap shows the
// most likely alternatives), beam search showing every returned beam, and scoring of a pasted text that
// shows how surprising each character was.

import { postJSON, postStream } from "./api.js";
import { busy, el, errorBox, field, fill, fmt, modelPage, numberInput, select } from "./dom.js";

const LN2 = Math.log(2);

/** Background for a token of probability p: transparent when likely, deep orange when surprising. */
function shade(p) {
  const s = Math.min(1, Math.max(0, -Math.log10(Math.max(p, 1e-12)) / 3)); // p=1 -> 0, p=0.001 -> 1
  return `rgba(234, 88, 12, ${(0.08 + 0.72 * s).toFixed(3)})`;
}

/** How a token's text is shown in lists: whitespace made visible. */
export function visible(text) {
  return JSON.stringify(text).slice(1, -1).replace(/ /g, "\u2423");
}

function tokenNode(tok, details) {
  const p = Math.exp(tok.logprob);
  const span = el("span", { class: "tok", tabindex: "0" });
  span.style.backgroundColor = shade(p);
  if (tok.text === "\n") span.append(el("span", { class: "nl" }, "\u21b5"), "\n");
  else span.textContent = tok.text;
  span.title = `${visible(tok.text)}  p=${fmt(p, 3)}  log p=${fmt(tok.logprob, 3)}` +
    (tok.top && tok.top.length ? `\n${tok.top.map((t) => `${visible(t.text)} ${fmt(Math.exp(t.logprob), 3)}`)
      .join("\n")}` : "");
  const showIt = () => details(tok);
  span.addEventListener("mouseenter", showIt);
  span.addEventListener("focus", showIt);
  span.addEventListener("click", showIt);
  return span;
}

function detailsPanel() {
  const panel = el("aside", { class: "token-details" },
    el("p", { class: "muted" }, "Hover over or tap a token to see its probability and the alternatives."));
  panel.showToken = (tok) => {
    const p = Math.exp(tok.logprob);
    const rows = (tok.top || []).map((t) => {
      const q = Math.exp(t.logprob);
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.max(1, Math.round(q * 100))}%`;
      return el("li", { class: t.id === tok.id ? "chosen" : "" },
        el("code", {}, visible(t.text)), el("span", { class: "bar-wrap" }, bar), el("span", {}, fmt(q, 2)));
    });
    fill(panel,
      el("div", { class: "token-head" }, el("code", { class: "big" }, visible(tok.text)),
        el("span", {}, `p = ${fmt(p, 3)}`), el("span", { class: "muted" }, `log p = ${fmt(tok.logprob, 4)} nats`),
        el("span", { class: "muted" }, `${fmt(-tok.logprob / LN2, 3)} bits`)),
      rows.length ? el("div", {}, el("h4", {}, "Most likely here"), el("ol", { class: "alternatives" }, rows))
        : el("p", { class: "muted" }, "No alternatives for this token."));
  };
  return panel;
}

function legend() {
  const swatches = [1, 0.3, 0.1, 0.01, 0.001].map((p) => {
    const s = el("span", { class: "swatch" }, `p=${p}`);
    s.style.backgroundColor = shade(p);
    return s;
  });
  return el("div", { class: "legend" }, el("span", { class: "muted" }, "token probability: "), swatches);
}

function parseStops(text) {
  if (!text.trim()) return null;
  const stops = text.split(",").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t")).filter((s) => s.length);
  return stops.length ? stops : null;
}

function generateView(getModel) {
  const errors = errorBox();
  const prompt = el("textarea", { rows: 4, class: "prompt", spellcheck: "false", "aria-label": "prompt" });
  const mode = select([["sample", "sample"], ["greedy", "greedy"], ["beam", "beam search"]], { name: "mode" });
  const maxNew = numberInput({ name: "max_new_tokens", min: 1, value: 100 });
  const temperature = numberInput({ name: "temperature", min: 0, max: 100, step: 0.05, value: 0.8 });
  const topK = numberInput({ name: "top_k", min: 0, step: 1, value: 40 });
  const topP = numberInput({ name: "top_p", min: 0.01, max: 1, step: 0.01, placeholder: "off" });
  const seed = numberInput({ name: "seed", min: 0, step: 1, placeholder: "random" });
  const n = numberInput({ name: "n", min: 1, step: 1, value: 1 });
  const beams = numberInput({ name: "num_beams", min: 2, step: 1, value: 4 });
  const returned = numberInput({ name: "num_return_sequences", min: 1, step: 1, value: 2 });
  const stop = el("input", { name: "stop", type: "text", placeholder: "e.g. \\n\\n,THE END", spellcheck: "false" });
  const samplingFields = el("div", { class: "row" }, field("temperature", temperature), field("top-k", topK, "0: all"),
    field("top-p", topP), field("seed", seed), field("samples (n)", n));
  const beamFields = el("div", { class: "row", hidden: true }, field("beams", beams),
    field("returned", returned, "beams shown"));
  const run = el("button", { class: "primary", type: "button", name: "generate" }, "Generate");
  const stopButton = el("button", { class: "secondary", type: "button", disabled: true }, "Stop");
  const outputs = el("div", { class: "outputs", id: "text-output" });
  const stats = el("p", { class: "stats muted", id: "text-stats" });
  const details = detailsPanel();
  let controller = null;

  const syncMode = () => {
    samplingFields.hidden = mode.value !== "sample";
    beamFields.hidden = mode.value !== "beam";
  };
  mode.addEventListener("change", syncMode);
  stopButton.addEventListener("click", () => controller && controller.abort());

  const request = (model) => {
    const body = { prompt: prompt.value, max_new_tokens: Number(maxNew.value) || 1, logprobs: true, top_logprobs: 5 };
    const stops = parseStops(stop.value);
    if (stops) body.stop = stops;
    if (mode.value === "greedy") body.temperature = 0;
    if (mode.value === "sample") {
      body.temperature = Number(temperature.value);
      if (topK.value !== "") body.top_k = Number(topK.value);
      if (topP.value !== "") body.top_p = Number(topP.value);
      if (seed.value !== "") body.seed = Number(seed.value);
      body.n = Number(n.value) || 1;
    }
    if (mode.value === "beam") {
      body.num_beams = Number(beams.value);
      body.num_return_sequences = Number(returned.value);
    }
    return body;
  };

  const streamBox = (index, total) => {
    const text = el("div", { class: "stream", "data-index": index },
      el("span", { class: "prompt-echo" }, prompt.value));
    return el("div", { class: "completion" }, total > 1 ? el("h4", {}, `sample ${index + 1}`) : null, text);
  };

  async function generate() {
    const model = getModel();
    const body = request(model);
    fill(outputs);
    stats.textContent = "";
    if (mode.value === "beam") {
      const started = performance.now();
      const out = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/generate`, body);
      out.completions.forEach((c, rank) => {
        const text = el("div", { class: "stream" }, el("span", { class: "prompt-echo" }, prompt.value),
          (c.tokens || []).map((t) => tokenNode(t, details.showToken)));
        outputs.append(el("div", { class: "completion beam" },
          el("h4", {}, `beam ${rank + 1}`, el("span", { class: "muted" }, ` score ${fmt(c.score)} - log p `,
            `${fmt(c.log_prob)} nats - ${c.token_ids.length} tokens - ${c.finish_reason}`)),
          text));
      });
      stats.textContent = `${out.completions.length} beams in ${fmt((performance.now() - started) / 1000, 3)} s`;
      return;
    }
    body.stream = true;
    controller = new AbortController();
    stopButton.disabled = false;
    const boxes = new Map();
    const totals = new Map();
    const started = performance.now();
    let first = null;
    let tokens = 0;
    try {
      await postStream(`/v1/models/${encodeURIComponent(model.name)}/generate`, body, (chunk) => {
        if (first === null) first = performance.now();
        if (!boxes.has(chunk.index)) {
          const box = streamBox(chunk.index, body.n || 1);
          boxes.set(chunk.index, box.querySelector(".stream"));
          outputs.append(box);
        }
        const target = boxes.get(chunk.index);
        for (const tok of chunk.tokens || []) {
          target.append(tokenNode(tok, details.showToken));
          totals.set(chunk.index, (totals.get(chunk.index) || 0) + tok.logprob);
          tokens += 1;
        }
        if (!chunk.tokens && chunk.text) target.append(chunk.text);
        if (chunk.finish_reason) target.dataset.finish = chunk.finish_reason;
        const seconds = (performance.now() - started) / 1000;
        const logp = [...totals.values()].map((v) => fmt(v)).join(", ");
        stats.textContent = `${tokens} tokens in ${fmt(seconds, 3)} s - first after ` +
          `${fmt((first - started) / 1000, 3)} s - log p ${logp} nats` +
          (chunk.finish_reason ? ` - finished: ${chunk.finish_reason}` : "");
      }, controller.signal);
    } finally {
      stopButton.disabled = true;
      controller = null;
    }
  }

  run.addEventListener("click", () => busy(run, errors, generate));
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run.click();
  });
  const view = el("section", { class: "card" },
    el("h2", {}, "Generate"),
    field("Prompt", prompt),
    el("div", { class: "row" }, field("decoding", mode), field("max new tokens", maxNew), field("stop strings", stop,
      "comma-separated; \\n is a newline")),
    samplingFields, beamFields,
    el("div", { class: "actions" }, run, stopButton, el("span", { class: "hint" }, "Ctrl+Enter generates")),
    errors,
    el("div", { class: "with-details" }, el("div", {}, outputs, stats, legend()), details));
  view.setModel = (model) => {
    const i = model.input;
    const limit = model.limits.max_new_tokens;
    if (!prompt.value) prompt.value = model.name === "shakespeare" ? "ROMEO:\n" : "";
    const room = i.context_length ? i.context_length - Math.max(1, prompt.value.length) - 1 : limit;
    maxNew.max = limit;
    maxNew.value = Math.max(1, Math.min(100, limit, room));
    n.max = model.limits.max_n;
    beams.max = model.limits.max_num_beams;
  };
  return view;
}

function scoreView(getModel) {
  const errors = errorBox();
  const text = el("textarea", { rows: 4, spellcheck: "false", "aria-label": "text to score", name: "score-text" });
  const run = el("button", { class: "primary", type: "button", name: "score" }, "Score");
  const out = el("div", { class: "score-out", id: "score-output" });
  const details = detailsPanel();

  async function score() {
    const model = getModel();
    const res = await postJSON(`/v1/models/${encodeURIComponent(model.name)}/score`,
      { texts: [text.value], per_token: true });
    const r = res.results[0];
    const tokens = r.tokens || [];
    const ranked = tokens.map((t, i) => ({ ...t, i })).sort((a, b) => a.logprob - b.logprob).slice(0, 8);
    fill(out,
      el("p", { class: "stats" }, `log p = ${fmt(r.log_prob)} nats - ${r.n_tokens} tokens - perplexity `,
        `${fmt(r.perplexity)} - ${fmt(r.bits_per_char)} bits per character`),
      el("div", { class: "with-details" },
        el("div", {}, el("div", { class: "stream" }, tokens.map((t) => tokenNode(t, details.showToken))), legend()),
        details),
      el("h4", {}, "Most surprising"),
      el("ol", { class: "surprises" }, ranked.map((t) => {
        const before = tokens.slice(Math.max(0, t.i - 12), t.i).map((x) => x.text).join("");
        return el("li", {}, el("code", { class: "surprise" }, visible(t.text)), ` ${fmt(-t.logprob / LN2, 3)} bits, `,
          before ? ["after ", el("code", {}, visible(before))] : "at the start");
      })));
  }

  run.addEventListener("click", () => busy(run, errors, score));
  const view = el("section", { class: "card" },
    el("h2", {}, "Score a text"),
    el("p", { class: "muted" }, "Paste a text: each character is shaded by how surprising the model finds it ",
      "(its exact log-probability given everything before it)."),
    field("Text", text), el("div", { class: "actions" }, run), errors, out);
  view.setModel = (model) => {
    if (!text.value && model.name === "shakespeare") {
      text.value = "Now is the winter of our discontent\nMade glorious summer by this sun of York;";
    }
  };
  return view;
}

export function renderText(node, { models }) {
  let chosen = null;
  const current = () => chosen;
  const gen = generateView(current);
  const sc = scoreView(current);
  modelPage(node, {
    title: "Text", models: models.filter((m) => m.input.type === "text"), empty: "No text models are served.",
    id: "text-model", label: (m) => `${m.name} (${m.kind})`,
    describe: (m) => `${m.kind}, ${m.input.tokenizer} tokenizer, context ${m.input.context_length || "unbounded"}` +
      ` tokens; at most ${m.limits.max_new_tokens} new tokens per request`,
    show: (m) => {
      chosen = m;
      gen.setModel(m);
      sc.setModel(m);
    },
    body: [gen, sc],
  });
}
