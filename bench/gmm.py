"""GMM benchmarks, side by side in one run, as medians and ratios.

    .venv/bin/python -m bench.gmm [--out docs/benchmarks-gmm.md]

1. log p(x) throughput (records/s) of one fitted model in torch eager and in ONNX Runtime, at
   batch sizes 1, 32 and 1024 (CPU here; CUDA where torch/ORT see a GPU is not measured yet);
2. EM fitting time against scikit-learn's GaussianMixture on the same standardised data, with the
   same components, covariance type, initial parameters and a fixed number of iterations.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import sklearn
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from service.runtime import OnnxDensityRuntime, TorchDensityRuntime
from training.em import EMSettings, initial_model, run_em
from training.onnx_export import export_onnx

REPEATS = 7


def median_seconds(fn: Callable[[], object], repeats: int = REPEATS, min_time: float = 0.05) -> float:
    """Median over repeats of the time per call, each repeat looping until min_time has passed."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_time:
                break
        times.append(elapsed / calls)
    return statistics.median(times)


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)


def scoring_rows(k: int = 4) -> list[str]:
    x = standardised(load_breast_cancer().data)
    z = torch.from_numpy(x)
    settings = EMSettings(covariance_type="full", max_iter=50, n_init=1)
    model = run_em(initial_model(z, k, settings, torch.Generator().manual_seed(0)), z, settings).model
    runtimes = {"torch": TorchDensityRuntime(model, "cpu"),
                "onnx": OnnxDensityRuntime(export_onnx(model, z[:4], "records", ["log_prob", "resp"]), "cpu")}
    rows = []
    for batch in (1, 32, 1024):
        records = np.resize(x, (batch, x.shape[1]))
        rate = {name: batch / median_seconds(lambda rt=rt, r=records: rt.log_prob(r)) for name, rt in runtimes.items()}
        rows.append(f"| breast_cancer, K={k} full | {batch} | {rate['torch']:,.0f} | {rate['onnx']:,.0f} | "
                    f"{rate['onnx'] / rate['torch']:.2f} |")
    return rows


def em_rows(iterations: int = 50) -> list[str]:
    rows = []
    for name, data, k in (("breast_cancer", load_breast_cancer().data, 4), ("digits", load_digits().data, 10)):
        x = standardised(data)
        z = torch.from_numpy(x)
        for cov in ("full", "diag"):
            settings = EMSettings(covariance_type=cov, reg_covar=0.0, max_iter=iterations, tol=0.0, n_init=1)
            # digits has constant pixels, so both fitters need a covariance floor there. Ours adds
            # reg/N_k, scikit-learn's reg: the amounts differ a little, the work per iteration does not.
            if name == "digits":
                settings.reg_covar = 1e-2
            start = initial_model(z, k, settings, torch.Generator().manual_seed(0))
            weights, means, covs = start.log_weights.exp(), start.means, start.covariances()
            precisions = torch.linalg.inv(covs) if cov == "full" else 1.0 / covs

            def ours(start=start, z=z, settings=settings):
                model = type(start)(start.config)
                model.load_state_dict(start.state_dict())
                return run_em(model, z, settings)

            sk = SkGaussianMixture(
                k, covariance_type=cov, weights_init=weights.numpy(), means_init=means.numpy(),
                precisions_init=precisions.numpy(), max_iter=iterations, tol=0.0,
                reg_covar=settings.reg_covar, n_init=1,
            )

            def theirs(sk=sk, x=x):
                return sk.fit(x)

            t_ours = median_seconds(ours, repeats=3, min_time=0.0)
            t_theirs = median_seconds(theirs, repeats=3, min_time=0.0)
            rows.append(f"| {name} ({x.shape[0]}x{x.shape[1]}), K={k} {cov} | {iterations} | "
                        f"{t_ours * 1e3:,.1f} | {t_theirs * 1e3:,.1f} | {t_theirs / t_ours:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    lines = [
        "# GMM benchmarks",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, scikit-learn {sklearn.__version__}. "
        f"Medians of {REPEATS} repeats (3 for EM). Regenerate: `.venv/bin/python -m bench.gmm --out FILE`.",
        "",
        "## log p(x) throughput (records/s, CPU)",
        "",
        "| model | batch | torch eager | ONNX Runtime | ONNX / torch |",
        "|---|---|---|---|---|",
        *scoring_rows(),
        "",
        "## EM fitting time (ms, same data, initial parameters and iterations)",
        "",
        "| data | iterations | genserve | scikit-learn | speed-up (sklearn / genserve) |",
        "|---|---|---|---|---|",
        *em_rows(),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
