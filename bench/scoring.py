"""Scoring, fitting and sampling speed of the density and image models, side by side in one run.

    .venv/bin/python -m bench.scoring [--quick]

1. Exact log-likelihood throughput of the service's own runtimes (service.records_runtime, service.image_runtime):
   torch eager against ONNX Runtime on the CPU, at batch sizes 1, 32 and 1024, for a GMM and the default
   `digits` (MADE) and `mnist` (class-conditional gated PixelCNN) image models; and what runtime 'auto'
   chooses for each, with the timings it chose by.
2. EM fitting time against scikit-learn's GaussianMixture: same data, components, covariance type,
   initial parameters and number of iterations.
3. Image sampling throughput (torch; sampling is torch-only) of every image model kind.

Quick mode (the smoke test) uses the tiny architectures, fewer batch sizes, iterations and repeats.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime
import sklearn
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from bench.common import Goal, Report, interleaved_seconds, load_average, load_note, ratio, table
from genserve.artifacts.families import IMAGE_KINDS
from genserve.models.image import ImageModel
from genserve.models.registry import build_image_model
from genserve.service.image_runtime import OnnxImageRuntime, TorchImageRuntime, image_probe
from genserve.service.records_runtime import OnnxRecordsRuntime, TorchRecordsRuntime, records_probe
from genserve.service.runtime_choice import choose_faster
from genserve.training.em import EMSettings, initial_model, run_em
from genserve.training.image_data import load_image_dataset
from genserve.training.image_pipeline import PRESETS
from genserve.training.onnx_export import export_image_onnx, export_onnx

SETTLE_S = 0.3  # pause between EM turns: numpy's OpenBLAS threads spin ~0.1 s after a call (common.interleaved_seconds)


@dataclass
class Scorer:
    """One model in both runtimes, and real inputs to score."""

    label: str
    unit: str  # records | images
    runtimes: dict[str, Any]  # torch, onnx: the service's runtime objects
    score: Callable[[Any, int], object]  # (runtime, batch) -> scores of `batch` real inputs
    probe: Callable[[Any, int], Any]  # what 'auto' times at load (service.runtime_choice.load_runtime)
    note: str


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)


def rows_of(data: np.ndarray, n: int) -> np.ndarray:
    """n items of `data`, cycling through it (batch 1024 from 500 test images)."""
    return np.ascontiguousarray(data[np.arange(n) % len(data)])


# ---- 1. scoring ----------------------------------------------------------------------------------------------


def gmm_scorer(name: str, data: np.ndarray, k: int) -> Scorer:
    x = standardised(data)
    z = torch.from_numpy(x)
    settings = EMSettings(covariance_type="full", max_iter=50, n_init=1)
    model = run_em(initial_model(z, k, settings, torch.Generator().manual_seed(0)), z, settings).model
    graph = export_onnx(model, z[:4], "records", ["log_prob", "resp"])
    runtimes = {"torch": TorchRecordsRuntime(model, "cpu"), "onnx": OnnxRecordsRuntime(graph, "cpu")}
    return Scorer(f"GMM {name} ({x.shape[1]} features), K={k} full, float64", "records", runtimes,
                  lambda rt, b: rt.log_prob(rows_of(x, b)), records_probe(model),
                  "fitted by 50 EM iterations on the standardised data")


def image_config(dataset: str, kind: str, preset: str, conditional: bool) -> dict[str, Any]:
    data_shape = {"mnist5k": dict(height=28, width=28, levels=2), "digits": dict(height=8, width=8, levels=17)}
    return {**data_shape[dataset], "n_classes": 10 if conditional else 0, **PRESETS[preset][dataset][kind]["arch"]}


def image_module(dataset: str, kind: str, preset: str, conditional: bool) -> ImageModel:
    torch.manual_seed(0)  # PyTorch's default initialisation: the speed does not depend on the weights
    return build_image_model(kind, image_config(dataset, kind, preset, conditional)).eval()


def image_scorer(label: str, dataset: str, kind: str, preset: str, conditional: bool, with_labels: bool,
                 module: ImageModel | None = None, graph: bytes | None = None) -> Scorer:
    module = module or image_module(dataset, kind, preset, conditional)
    graph = graph or export_image_onnx(module)
    runtimes = {"torch": TorchImageRuntime(module),
                "onnx": OnnxImageRuntime(graph, "cpu", module.height, module.width, module.n_classes,
                                         module.class_log_prior)}
    test = load_image_dataset(dataset).test

    def score(rt: Any, b: int) -> object:
        return rt.score(rows_of(test.images, b), rows_of(test.labels, b) if with_labels else None)

    arch = ", ".join(f"{k}={v}" for k, v in PRESETS[preset][dataset][kind]["arch"].items())
    note = (f"{preset} preset ({arch}), random weights; {len(test.images)} test images"
            + (", labels given" if with_labels else ", no labels: the exact marginal over 10 classes"
               if conditional else ""))
    return Scorer(label, "images", runtimes, score, image_probe(module), note)


def scorers(quick: bool) -> list[tuple[Scorer, tuple[int, ...]]]:
    """Each model with the batch sizes measured; the marginal (10 graph runs a call) stops at 32."""
    preset = "tiny" if quick else "default"
    batches = (1, 32) if quick else (1, 32, 1024)
    out = [(gmm_scorer("breast_cancer", load_breast_cancer().data, 4), batches)]
    if not quick:
        out.append((gmm_scorer("digits", load_digits().data, 10), batches))
    name = {"default": "the default", "tiny": "the tiny preset's"}[preset]
    out.append((image_scorer(f"MADE, digits 8x8 ({name} `digits` model)", "digits", "made", preset, False,
                             False), batches))
    pixelcnn = image_module("mnist5k", "pixelcnn", preset, True)
    graph = export_image_onnx(pixelcnn)
    out.append((image_scorer(f"gated PixelCNN, MNIST 28x28, labels ({name} `mnist` model)", "mnist5k", "pixelcnn",
                             preset, True, True, pixelcnn, graph), batches))
    if not quick:
        out.append((image_scorer("gated PixelCNN, MNIST 28x28, marginal", "mnist5k", "pixelcnn", preset, True,
                                 False, pixelcnn, graph), (1, 32)))
    return out


def repeats_for(seconds_per_call: float, quick: bool) -> int:
    """Fewer repeats for slow calls: the PixelCNN at batch 1024 takes 10-30 s a call in torch on 2 cores, so it
    is timed once after its warm-up; others at least twice."""
    budget = 2.0 if quick else 20.0
    floor = 1 if seconds_per_call > 5.0 else 2
    return max(floor, min(3 if quick else 5, int(budget / max(seconds_per_call, 1e-9))))


def scoring_section(quick: bool) -> tuple[list[str], list[Goal]]:
    rows, auto_rows, notes, worst = [], [], [], (float("inf"), "")
    for scorer, batches in scorers(quick):
        notes.append(f"- {scorer.label}: {scorer.note}.")
        for b in batches:
            started = time.perf_counter()
            scorer.score(scorer.runtimes["torch"], b)
            once = time.perf_counter() - started
            fns = {name: (lambda rt=rt, b=b, s=scorer.score: s(rt, b)) for name, rt in scorer.runtimes.items()}
            t = interleaved_seconds(fns, repeats=repeats_for(once, quick), min_time=0.0 if once > 0.05 else 0.05)
            r = t["torch"] / t["onnx"]
            worst = min(worst, (r, f"{scorer.label}, batch {b}"))
            rows.append([scorer.label, b, f"{b / t['torch']:,.0f}", f"{b / t['onnx']:,.0f}", f"{r:.2f}x"])
        choice = choose_faster(scorer.runtimes, scorer.probe)
        ms = {name: " / ".join(f"{s * 1e3:.2f}" for s in choice.seconds[name].values()) for name in choice.seconds}
        auto_rows.append([scorer.label, ms["torch"], ms["onnx"], choice.runtime])
    header = ["model", "batch", "torch eager (items/s)", "ONNX Runtime (items/s)", "ONNX / torch"]
    lines = [
        "## Density scoring: torch eager vs ONNX Runtime (CPU)",
        "",
        "Exact log p(x) throughput (records or images per second) of the service's own runtimes "
        "(`TorchRecordsRuntime` / `OnnxRecordsRuntime`, `TorchImageRuntime` / `OnnxImageRuntime`), numpy in and "
        "out, both with as many threads as torch has; median seconds per call, the two timed in turns. "
        "ONNX / torch above 1 means ONNX Runtime is faster.",
        "",
        *table(header, rows),
        "",
        *notes,
        "",
        "What `runtime: auto` (the default) chooses at load, by the service's own rule (the lower total of the "
        "median milliseconds per call at batch 1 / 32 of dummy inputs, after checking that the two agree):",
        "",
        *table(["model", "torch ms (1 / 32)", "ONNX Runtime ms (1 / 32)", "auto serves"], auto_rows),
        "",
    ]
    goal = Goal("density scoring, ONNX Runtime vs torch", ">= 1.00x torch, every model and batch size",
                f"{worst[0]:.2f}x at worst ({worst[1]})", worst[0] >= 1.0,
                "" if worst[0] >= 1.0 else "'auto' serves torch where it is faster (see the auto table)")
    return lines, [goal]


# ---- 2. EM against scikit-learn ---------------------------------------------------------------------------------


def em_section(quick: bool) -> tuple[list[str], list[Goal]]:
    iterations = 10 if quick else 50
    # digits has constant pixels: both fitters need a covariance floor there.
    datasets = [("breast_cancer", load_breast_cancer().data, 4, 0.0)]
    if not quick:
        datasets.append(("digits", load_digits().data, 10, 1e-2))
    rows, ratios = [], []
    for name, data, k, reg in datasets:
        x = standardised(data)
        for cov in ("full", "diag"):
            ours, theirs = em_pair(x, k, cov, iterations, reg)
            t = interleaved_seconds({"ours": ours, "theirs": theirs}, repeats=3 if quick else 5, settle_s=SETTLE_S)
            ratios.append((t["theirs"] / t["ours"], f"{name} {cov}"))
            rows.append([f"{name} ({x.shape[0]}x{x.shape[1]}), K={k} {cov}", iterations, f"{t['ours'] * 1e3:,.1f}",
                         f"{t['theirs'] * 1e3:,.1f}", ratio(t["theirs"], t["ours"])])
    worst = min(ratios)
    lines = [
        "## EM fitting time against scikit-learn",
        "",
        f"Milliseconds to fit (median, the two timed in turns): genserve's `training.em.run_em` and scikit-learn "
        f"{sklearn.__version__}'s `GaussianMixture.fit`, on the same standardised data, from the same initial "
        "weights, means and covariances, for a fixed number of iterations (tol=0), float64. digits has constant "
        "pixels, so both use a covariance floor of 1e-2 there (ours adds reg/N_k, scikit-learn's reg: the amounts "
        "differ a little, the work per iteration does not). Speed-up above 1: genserve is faster.",
        "",
        *table(["data", "iterations", "genserve (ms)", "scikit-learn (ms)", "speed-up (sklearn / genserve)"], rows),
        "",
    ]
    goal = Goal("EM fitting vs scikit-learn", ">= 1.00x (no slower)", f"{worst[0]:.2f}x at worst ({worst[1]})",
                worst[0] >= 1.0, "" if worst[0] >= 1.0 else "see the EM table: per-component BLAS calls in numpy "
                "against torch's batched ones")
    return lines, [goal]


def em_pair(x: np.ndarray, k: int, cov: str, iterations: int,
            reg: float) -> tuple[Callable[[], object], Callable[[], object]]:
    z = torch.from_numpy(x)
    settings = EMSettings(covariance_type=cov, reg_covar=reg, max_iter=iterations, tol=0.0, n_init=1)
    start = initial_model(z, k, settings, torch.Generator().manual_seed(0))
    weights, means, covs = start.log_weights.exp(), start.means, start.covariances()
    precisions = torch.linalg.inv(covs) if cov == "full" else 1.0 / covs

    def ours() -> object:
        model = type(start)(start.config)
        model.load_state_dict(start.state_dict())
        return run_em(model, z, settings)

    sk = SkGaussianMixture(k, covariance_type=cov, weights_init=weights.numpy(), means_init=means.numpy(),
                           precisions_init=precisions.numpy(), max_iter=iterations, tol=0.0,
                           reg_covar=settings.reg_covar, n_init=1)

    def theirs() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge": tol=0 runs every iteration, as asked
            return sk.fit(x)

    return ours, theirs


# ---- 3. sampling ------------------------------------------------------------------------------------------------


def sampling_section(quick: bool) -> tuple[list[str], list[Goal]]:
    preset = "tiny" if quick else "default"
    n = 16 if quick else 64
    models = [(f"{kind}, digits 8x8", "digits", kind, False) for kind in sorted(IMAGE_KINDS)]
    models.append(("pixelcnn, MNIST 28x28, class-conditional (`mnist`)", "mnist5k", "pixelcnn", True))
    rows = []
    for label, dataset, kind, conditional in models:
        module = image_module(dataset, kind, preset, conditional)
        generator = torch.Generator().manual_seed(0)

        def draw(module: ImageModel = module, generator: torch.Generator = generator) -> object:
            return module.sample(n, generator=generator)

        started = time.perf_counter()
        draw()
        once = time.perf_counter() - started
        # A draw of seconds (the 28x28 PixelCNN: 784 steps) is timed once; the faster ones 3 times after it.
        seconds = once if once > (1.0 if quick else 10.0) else interleaved_seconds({"draw": draw}, repeats=3)["draw"]
        rows.append([label, module.n_pixels, n, f"{n / seconds:,.1f}", f"{seconds / module.n_pixels * 1e3:.2f}"])
    lines = [
        "## Image sampling (torch)",
        "",
        f"Images per second drawing {n} images in one batch with `ImageModel.sample` (sampling runs in torch only: "
        f"one step per pixel in raster order), {preset} preset architectures, random weights; median of up to 3 "
        "runs (one for draws over 10 s, 1 s in quick mode). The last column is the time per sequential step "
        "for the whole batch.",
        "",
        *table(["model", "pixels", "batch", "images/s", "ms per pixel step"], rows),
        "",
    ]
    return lines, []


def run(quick: bool = False) -> Report:
    before = load_average()
    markdown, goals = [], []
    for section in (scoring_section, em_section, sampling_section):
        lines, section_goals = section(quick)
        markdown += lines
        goals += section_goals
    markdown += [f"torch {torch.__version__}, ONNX Runtime {onnxruntime.__version__}, "
                 f"scikit-learn {sklearn.__version__}, {torch.get_num_threads()} torch threads. "
                 f"{load_note(before, load_average())}", ""]
    return Report(markdown=markdown, goals=goals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny architectures and fewer sizes (< 60 s)")
    args = parser.parse_args(argv)
    report = run(quick=args.quick)
    print("\n".join(report.markdown))
    for goal in report.goals:
        print(f"goal: {goal.name}: {goal.target}; measured {goal.measured}; {'met' if goal.met else 'missed'}")


if __name__ == "__main__":
    main()
