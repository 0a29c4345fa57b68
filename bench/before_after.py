"""Decoding before and after the performance work, measured side by side in one run.

    .venv/bin/python -m bench.before_after [--base c8477f5]

Loads models/gpt.py and service/decoding.py as they were at a git revision (default: the commit
before issue 6's fixes) next to today's, gives both the same weights, checks they generate the same
tokens, and times them in turns through the decoding engine. So the before/after record in
docs/benchmarks.md is regenerated, not remembered. Needs the repository's git history; without it
the section says so.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from bench import common
from bench.common import Report

BASE = "c8477f5"  # main before issue 6: the last commit without the decoding fixes
ROOT = Path(__file__).resolve().parents[1]
FILES = {"gpt": "models/gpt.py", "decoding": "service/decoding.py"}

# (label, layers, width, heads, vocab, batch, beams, max_len): the served shapes that changed most.
CASES = [
    ("char GPT 4x128 (0.8M), greedy", 4, 128, 4, 65, 1, 1, None),
    ("char GPT 4x128 (0.8M), greedy, 8 requests", 4, 128, 4, 65, 8, 1, None),
    ("GPT-2 vocab 4x256 (16M), greedy", 4, 256, 4, 50257, 1, 1, None),
    ("GPT-2 vocab 4x256 (16M), greedy, 8 requests", 4, 256, 4, 50257, 8, 1, None),
    ("char GPT 4x128, beam search 4, cache of 1024 positions (as served)", 4, 128, 4, 65, 1, 4, 1024),
]


class _SilentTokenizer:
    """Random weights emit arbitrary ids; their text does not matter here, so none is made."""

    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def incremental_decoder(self):
        class Decoder:
            def push(self, token: int) -> str:
                return ""

            def flush(self) -> str:
                return ""

        return Decoder()

    def decode(self, tokens: list[int]) -> str:
        return ""


def load_revision(base: str) -> dict[str, ModuleType]:
    """The modules in FILES as of `base`, under private names (their imports of other project
    modules resolve to today's, which the fixes did not change)."""
    modules = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, path in FILES.items():
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{base}:{path}"], check=True,
                                    capture_output=True, text=True).stdout
            file = Path(tmp) / f"{key}_{base}.py"
            file.write_text(source)
            spec = importlib.util.spec_from_file_location(f"_before_{key}", file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            modules[key] = module
    return modules


def _run(decoding: ModuleType, model, vocab: int, batch: int, beams: int, new_tokens: int,
         max_len: int | None) -> list[list[int]]:
    prompt = list(range(1, 17))
    engine = decoding.Engine(model, _SilentTokenizer(vocab), slots=batch * beams, max_len=max_len or 16 + new_tokens)
    params = decoding.GenerationParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, num_beams=beams)
    requests = [engine.submit(prompt, params) for _ in range(batch)]
    while not all(r.finished for r in requests):
        engine.step()
    return [o.token_ids for r in requests for o in r.outputs]


def run(quick: bool = False, base: str = BASE) -> Report:
    title = ["## Before and after: decoding", ""]
    try:
        before = load_revision(base)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        return Report([*title, f"Not measured: revision {base} is not available here ({type(e).__name__})."])
    from models import gpt as gpt_now
    from service import decoding as decoding_now

    new_tokens, repeats = (16, 2) if quick else (64, 5)
    rows = []
    for label, layers, width, heads, vocab, batch, beams, max_len in CASES[:2] if quick else CASES:
        torch.manual_seed(0)
        config = dict(vocab_size=vocab, context_length=1024, n_layer=layers, n_head=heads, n_embd=width)
        now = gpt_now.GPT(gpt_now.GPTConfig(**config)).eval()
        old = before["gpt"].GPT(before["gpt"].GPTConfig(**config)).eval()
        old.load_state_dict(now.state_dict())
        sides = {"before": (before["decoding"], old), "after": (decoding_now, now)}
        runs = {k: functools.partial(_run, d, m, vocab, batch, beams, new_tokens, max_len)
                for k, (d, m) in sides.items()}
        outputs = {k: fn() for k, fn in runs.items()}
        seconds = common.interleaved_seconds(runs, repeats=repeats)
        tokens = batch * new_tokens
        rows.append((label, f"{tokens / seconds['before']:,.0f}", f"{tokens / seconds['after']:,.0f}",
                     common.ratio(seconds["before"], seconds["after"]),
                     "yes" if outputs["before"] == outputs["after"] else "**no**"))
    return Report([
        *title,
        f"The decoding engine and model as of commit `{base}` (before) and now (after), same random weights, "
        f"{new_tokens} new tokens from a 16-token prompt, timed in turns; medians of {repeats}. Tokens/s counts "
        "every sequence's tokens (a beam-search request counts its returned beam's). Regenerate alone with "
        "`.venv/bin/python -m bench.before_after`.",
        "",
        *common.table(["case", "before tokens/s", "after tokens/s", "speed-up", "same tokens"], rows),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=BASE, help="git revision to compare against")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print("\n".join(run(args.quick, args.base).markdown))


if __name__ == "__main__":
    main()
