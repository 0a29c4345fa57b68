"""bench/knn_index.py on a small synthetic set: both searches measured side by side, the table rendered."""

from __future__ import annotations

import numpy as np

from bench import knn_index


def test_measure_compares_exact_and_inverted_file_on_the_same_items():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 6)) * 4
    train = centres[rng.integers(0, 10, 1500)] + rng.normal(size=(1500, 6))
    queries = centres[rng.integers(0, 10, 300)] + rng.normal(size=(300, 6))
    spec = {"train": train, "space": "standardised", "mean": train.mean(0), "scale": train.std(0)}
    result = knn_index.measure("synthetic", spec, queries)
    assert result["n"] == 1500 and result["dims"] == 6 and result["chosen"] == "exact"
    assert result["rows"]["ivf"]["index"].index_kind == "ivf" and result["rows"]["exact"]["index"].index_kind == "exact"
    assert 0.9 <= result["recall"] <= 1.0 and result["median_excess"] >= 0 and result["spearman"] > 0.99
    exact, ivf = result["rows"]["exact"]["distances"], result["rows"]["ivf"]["distances"]
    assert np.all(ivf >= exact - 1e-9)
    text = knn_index.render([result], {"date": "2026-12-06", "minutes": 0.1, "machine": "test", "load": ""})
    assert "| synthetic (300 queries) | 1,500 (of 1,500) x 6 | exact | exact |" in text
    assert f"| {result['recall']:.3f} |" in text
