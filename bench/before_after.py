"""Decoding and EM before and after the performance work, measured side by side in one run.

    .venv/bin/python -m bench.before_after [--base c8477f5]

Loads models/gpt.py and service/decoding.py as they were at a git revision (default: the commit
before issue 6's fixes) next to today's, gives both the same weights, checks they generate the same
tokens, and times them in turns through the decoding engine; and likewise training/em.py with the
models/gmm.py it calls, checking both fits reach the same likelihood. So the before/after record in
docs/benchmarks.md is regenerated, not remembered. Needs the repository's git history; without it
the section says so.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from bench import common
from bench.common import Report

BASE = "c8477f5"  # main before issue 6: the last commit without the decoding fixes
ROOT = Path(__file__).resolve().parents[1]
FILES = {"gpt": "models/gpt.py", "decoding": "service/decoding.py"}
EM_FILES = {"gmm": "models/gmm.py", "em": "training/em.py"}

# (label, layers, width, heads, vocab, batch, beams, max_len): the served shapes that changed most.
CASES = [
    ("char GPT 4x128 (0.8M), greedy", 4, 128, 4, 65, 1, 1, None),
    ("char GPT 4x128 (0.8M), greedy, 8 requests", 4, 128, 4, 65, 8, 1, None),
    ("GPT-2 vocab 4x256 (16M), greedy", 4, 256, 4, 50257, 1, 1, None),
    ("GPT-2 vocab 4x256 (16M), greedy, 8 requests", 4, 256, 4, 50257, 8, 1, None),
    ("char GPT 4x128, beam search 4, cache of 1024 positions (as served)", 4, 128, 4, 65, 1, 4, 1024),
    ("GPT-2 small 12x768 (124M), greedy", 12, 768, 12, 50257, 1, 1, None),
    ("GPT-2 small 12x768 (124M), greedy, 8 requests", 12, 768, 12, 50257, 8, 1, None),
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


# Where modules of the old top-level packages live now that they install under one `genserve` namespace.
MOVED = {"training.tokenizer": "artifacts.tokenizer", "training.artifact": "artifacts.artifact",
         "training.store": "artifacts.store", "training.calibration": "artifacts.calibration",
         "training.reference": "artifacts.reference", "training.anomaly": "artifacts.scores"}


def namespaced(source: str) -> str:
    """Old source with its imports of `models`, `training` and `service` modules pointed at genserve's."""
    for old, new in MOVED.items():
        source = re.sub(rf"^(\s*)from {re.escape(old)} import", rf"\1from genserve.{new} import", source, flags=re.M)
    return re.sub(r"^(\s*)(from|import) (models|training|service)\b", r"\1\2 genserve.\3", source, flags=re.M)


def load_revision(base: str, files: dict[str, str]) -> dict[str, ModuleType]:
    """The modules in `files` (key -> path) as of `base`, under private names. Their imports of one another
    resolve to the old versions (in the order given); their other imports of project modules resolve to today's,
    which the fixes did not change."""
    modules: dict[str, ModuleType] = {}
    swapped: dict[str, ModuleType | None] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for key, path in files.items():
                source = subprocess.run(["git", "-C", str(ROOT), "show", f"{base}:{path}"], check=True,
                                        capture_output=True, text=True).stdout
                file = Path(tmp) / f"{key}_{base}.py"
                file.write_text(namespaced(source))
                spec = importlib.util.spec_from_file_location(f"_before_{key}", file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
                modules[key] = module
                name = "genserve." + path.removesuffix(".py").replace("/", ".")
                swapped.setdefault(name, sys.modules.get(name))
                sys.modules[name] = module  # for the next old files' imports
    finally:
        for name, module in swapped.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
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


def decoding_section(before: dict[str, ModuleType], base: str, quick: bool) -> list[str]:
    from genserve.models import gpt as gpt_now
    from genserve.service import decoding as decoding_now

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
    return [
        "## Before and after: decoding", "",
        f"The decoding engine and model as of commit `{base}` (before) and now (after), same random weights, "
        f"{new_tokens} new tokens from a 16-token prompt, timed in turns; medians of {repeats}. Tokens/s counts "
        "every sequence's tokens (a beam-search request counts its returned beam's).",
        "",
        *common.table(["case", "before tokens/s", "after tokens/s", "speed-up", "same tokens"], rows), "",
    ]


def em_section(before: dict[str, ModuleType], base: str, quick: bool) -> list[str]:
    """EM as of `base` against today's, from the same k-means++ start (both sides' own initial_model, same seed),
    the same number of iterations; the final log-likelihoods must agree."""
    from sklearn.datasets import load_breast_cancer, load_digits

    from genserve.training import em as em_now

    iterations, repeats = (10, 2) if quick else (50, 5)
    datasets = [("breast_cancer", load_breast_cancer().data, 4, 0.0)]
    if not quick:
        datasets.append(("digits", load_digits().data, 10, 1e-2))
    rows = []
    for name, data, k, reg in datasets:
        z = torch.from_numpy((data - data.mean(0)) / np.where(data.std(0) > 0, data.std(0), 1.0))
        for cov in ("full", "diag"):
            fits = {}
            for side, em in (("before", before["em"]), ("after", em_now)):
                settings = em.EMSettings(covariance_type=cov, reg_covar=reg, max_iter=iterations, tol=0.0, n_init=1)
                fits[side] = functools.partial(_fit, em, z, k, settings)
            results = {side: fit() for side, fit in fits.items()}
            seconds = common.interleaved_seconds(fits, repeats=repeats)
            same = abs(results["before"] - results["after"]) <= 1e-9 * max(1.0, abs(results["after"]))
            rows.append((f"{name} ({z.shape[0]}x{z.shape[1]}), K={k} {cov}", f"{seconds['before'] * 1e3:,.1f}",
                         f"{seconds['after'] * 1e3:,.1f}", common.ratio(seconds["before"], seconds["after"]),
                         "yes" if same else f"**no** ({results['before']:.6f} vs {results['after']:.6f})"))
    return [
        "## Before and after: EM", "",
        f"`training.em.run_em` (and the `models.gmm` math it calls) as of commit `{base}` (before) and now (after): "
        f"milliseconds per fit of {iterations} iterations (tol=0) from the same k-means++ start, float64, timed in "
        f"turns; medians of {repeats}. 'same fit': the final mean log-likelihoods agree to 1e-9 relatively.",
        "",
        *common.table(["data", "before ms", "after ms", "speed-up", "same fit"], rows), "",
    ]


def _fit(em: ModuleType, z: torch.Tensor, k: int, settings) -> float:
    model = em.initial_model(z, k, settings, torch.Generator().manual_seed(0))
    return em.run_em(model, z, settings).log_likelihood


def run(quick: bool = False, base: str = BASE) -> Report:
    try:
        decoding_before, em_before = load_revision(base, FILES), load_revision(base, EM_FILES)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        return Report(["## Before and after", "",
                       f"Not measured: revision {base} is not available here ({type(e).__name__}); these tables need "
                       "the repository's git history."])
    return Report([*decoding_section(decoding_before, base, quick), *em_section(em_before, base, quick),
                   "Regenerate these two tables alone with `.venv/bin/python -m bench.before_after`.", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=BASE, help="git revision to compare against")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print("\n".join(run(args.quick, args.base).markdown))


if __name__ == "__main__":
    main()
