"""The knn score's index, exact against inverted file (IVF), on real data: recall, latency, memory, build time.

    .venv/bin/python -m bench.knn_index --out docs/knn-index.md

artifacts/neighbours.py chooses the search by size: exact brute force while stored items times dimensions stay
within EXACT_COST, an inverted-file index beyond. This measures both on the same stored items and queries:
- MNIST (`mnist5k`): the 4,000 training images as 784 pixel intensities (the image models' knn space), queried
  with the 500 test images;
- Shakespeare: every distinct non-blank line of the 33 training plays as a 256-dimensional vector (TF-IDF of
  character 1-3-grams reduced by TruncatedSVD, as bench/anomaly.py's baselines read lines, with more dimensions),
  standardised as records are, queried with 2,000 lines of the held-out plays. Past EXACT_COST, so genserve
  builds an IVF index for it.
Recall: the share of queries whose k-th distance (the knn score) equals the exact one; and how much farther the
k-th neighbour found is than the exact one, at the median and the worst query. Latency: one query at a time (the
median of 200) and a batch of 256 (the best of 3), one torch thread. Seeds are fixed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from bench.common import load_note, machine
from genserve.artifacts.neighbours import EXACT_COST, PROBE, NeighbourIndex, fit_neighbours, neighbour_files
from genserve.artifacts.scores import text_lines
from genserve.training.image_data import load_image_dataset
from genserve.training.text_data import load_shakespeare, split_by_play

COMMAND = ".venv/bin/python -m bench.knn_index --out docs/knn-index.md"
TEXT_DIMS = 256
TEXT_QUERIES = 2_000
SINGLE_QUERIES = 200
BATCH = 256
SEED = 0


def mnist() -> tuple[str, dict[str, Any], np.ndarray]:
    data = load_image_dataset("mnist5k")
    return "MNIST pixels", dict(train=data.train.images, space="pixels", levels=data.levels), data.test.images


def shakespeare_lines() -> tuple[str, dict[str, Any], np.ndarray]:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    plays = split_by_play(load_shakespeare())
    lines = list(dict.fromkeys(line.strip() for text in plays.train.values() for _, line in text_lines(text)))
    held_out = list(dict.fromkeys(line.strip() for text in plays.validation.values() for _, line in text_lines(text)))
    queries = [held_out[i] for i in np.random.default_rng(SEED).choice(len(held_out), TEXT_QUERIES, replace=False)]
    tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit(lines)
    svd = TruncatedSVD(TEXT_DIMS, random_state=SEED).fit(tfidf.transform(lines))
    train, test = svd.transform(tfidf.transform(lines)), svd.transform(tfidf.transform(queries))
    return ("Shakespeare lines", dict(train=train, space="standardised", mean=train.mean(0), scale=train.std(0)),
            test)


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def latency(index: NeighbourIndex, queries: np.ndarray) -> tuple[float, float]:
    """(ms for one query, median of SINGLE_QUERIES; ms for a batch of BATCH, best of 3)."""
    index.distance(queries[:BATCH])  # warm-up: the stored features are embedded on first use
    single = []
    for i in range(SINGLE_QUERIES):
        started = time.perf_counter()
        index.distance(queries[i % len(queries):i % len(queries) + 1])
        single.append(time.perf_counter() - started)
    batch = min(timed(lambda: index.distance(queries[:BATCH]))[1] for _ in range(3))
    return 1000 * statistics.median(single), 1000 * batch


def measure(name: str, spec: dict[str, Any], queries: np.ndarray) -> dict[str, Any]:
    spec = dict(spec)
    train = spec.pop("train")
    rows = {}
    for kind, exact_cost in (("exact", 10**15), ("ivf", 0)):
        index, build = timed(lambda exact_cost=exact_cost: fit_neighbours(train, exact_cost=exact_cost, **spec))
        distances = index.distance(queries)
        size = sum(len(b) for b in neighbour_files(index).values())
        rows[kind] = {"index": index, "build_s": build, "bytes": size, "distances": distances,
                      "latency": latency(index, queries)}
    exact, ivf = rows["exact"]["distances"], rows["ivf"]["distances"]
    excess = ivf / np.maximum(exact, 1e-300) - 1
    n, d = rows["exact"]["index"].features.shape
    return {"name": name, "n": n, "n_train": len(train), "dims": d, "queries": len(queries),
            "chosen": "exact" if n * d <= EXACT_COST else "ivf", "lists": len(rows["ivf"]["index"].centroids),
            "rows": rows,
            "recall": float(np.mean(np.isclose(ivf, exact, rtol=1e-9))), "median_excess": float(np.median(excess)),
            "p99_excess": float(np.quantile(excess, 0.99)), "worst_excess": float(np.max(excess)),
            "spearman": float(spearmanr(exact, ivf).statistic)}


def render(results: list[dict[str, Any]], run: dict[str, Any]) -> str:
    lines = ["# The knn index: exact search against an inverted file", "",
             f"Generated by `{COMMAND}` on {run['date']} in {run['minutes']:.1f} minutes; machine: {run['machine']}. "
             f"{run['load']}", "",
             "genserve's `knn` anomaly score is the distance to the 5th-nearest stored training item. "
             "artifacts/neighbours.py searches exactly while stored items times dimensions are at most "
             f"{EXACT_COST:,} (20,000 MNIST-size images), and builds an inverted-file index (IVF) beyond: k-means "
             f"lists (about 4 sqrt(N)), each query compared with every centroid and then with the items of its "
             f"{PROBE} nearest lists. Both searches here run on the same stored items and queries; recall is the "
             "share of queries whose knn score (the 5th distance) equals the exact one, excess how much farther "
             "the 5th neighbour found is than the exact one (never nearer), rank correlation the Spearman "
             "correlation of the two searches' scores over the queries (what AUROC and thresholds see). The "
             "score is calibrated with the search "
             "it is served with, so a missed neighbour shifts the held-out scores and the served ones alike.", "",
             "| data | stored items (of training items) x dims | genserve chooses | search | build | index files | "
             "one query | "
             f"batch of {BATCH} | recall | excess: median / 99th percentile / worst | rank correlation |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        for kind in ("exact", "ivf"):
            row = r["rows"][kind]
            single, batch = row["latency"]
            what = "exact" if kind == "exact" else f"IVF, {r['lists']:,} lists, {PROBE} probed"
            quality = ("1 (by definition)", "-", "1") if kind == "exact" else (
                f"{r['recall']:.3f}", f"{100 * r['median_excess']:.2f}% / {100 * r['p99_excess']:.1f}% / "
                f"{100 * r['worst_excess']:.1f}%", f"{r['spearman']:.4f}")
            lines.append(f"| {r['name']} ({r['queries']:,} queries) | {r['n']:,} (of {r['n_train']:,}) x {r['dims']} | "
                         f"{r['chosen']} | "
                         f"{what} | {row['build_s']:.2f} s | {row['bytes'] / 1e6:.1f} MB | {single:.2f} ms | "
                         f"{batch:.0f} ms | {quality[0]} | {quality[1]} | {quality[2]} |")
    lines += ["", "Stored features are capped at 64 MB (85,000 MNIST-size images; 500,000 items at most); a larger "
              "training split is sampled (seeded), as the exact index sampled 20,000 items before the IVF index "
              "existed. The IVF index adds its centroids (lists x dims float32) and list offsets to the features."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the Markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    before = os.getloadavg()[0]
    results = [measure(*dataset()) for dataset in (mnist, shakespeare_lines)]
    for r in results:
        print(f"{r['name']}: {r['n']} x {r['dims']}, chosen {r['chosen']}, recall {r['recall']:.3f}, "
              f"exact {r['rows']['exact']['latency']}, ivf {r['rows']['ivf']['latency']} ms", flush=True)
    run = {"date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "minutes": (time.perf_counter() - started) / 60,
           "machine": machine(), "load": load_note(before, os.getloadavg()[0])}
    if args.out:
        args.out.write_text(render(results, run))
    return results


if __name__ == "__main__":
    main()
