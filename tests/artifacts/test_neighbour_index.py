"""The knn index chosen by size: exact brute force for small sets, an inverted-file index (IVF) beyond."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genserve.artifacts import artifact as art
from genserve.artifacts import neighbours
from genserve.artifacts.neighbours import (
    EXACT_COST,
    MAX_BYTES,
    NEIGHBOURS_CONFIG,
    NEIGHBOURS_WEIGHTS,
    fit_neighbours,
    load_neighbours,
    neighbour_files,
)


def clustered(n: int, seed: int, dims: int = 8) -> np.ndarray:
    """n points around 20 fixed centres (the same centres for every seed)."""
    centres = np.random.default_rng(0).normal(size=(20, dims)) * 4
    rng = np.random.default_rng(seed)
    return centres[rng.integers(0, 20, n)] + rng.normal(size=(n, dims))


def write(tmp_path, name: str, files: dict[str, bytes]):
    return art.write_artifact(tmp_path, kind="gmm", name=name, config={}, training={}, metrics={},
                              input_spec=art.InputSpec(n_features=1, feature_names=["x"]),
                              files={art.WEIGHTS: b"", **files})


def test_small_sets_are_searched_exactly_and_large_ones_by_inverted_file():
    data = clustered(3000, 1)
    mean, scale = data.mean(0), data.std(0)
    assert fit_neighbours(data, "standardised", mean, scale).index_kind == "exact"  # 3,000 x 8 << EXACT_COST
    assert EXACT_COST >= 3000 * 8
    ivf = fit_neighbours(data, "standardised", mean, scale, exact_cost=1000)
    assert ivf.index_kind == "ivf" and len(ivf.centroids) == round(4 * np.sqrt(3000))
    assert ivf.offsets[0] == 0 and ivf.offsets[-1] == 3000 and np.all(np.diff(ivf.offsets) >= 0)
    # the same items, sorted by list
    exact = fit_neighbours(data, "standardised", mean, scale)
    assert sorted(map(tuple, ivf.features.tolist())) == sorted(map(tuple, exact.features.tolist()))


def test_inverted_file_finds_the_exact_neighbours_on_clustered_data_and_never_closer_ones():
    data, queries = clustered(5000, 2), clustered(400, 3)
    mean, scale = data.mean(0), data.std(0)
    exact = fit_neighbours(data, "standardised", mean, scale).distance(queries)
    approx = fit_neighbours(data, "standardised", mean, scale, exact_cost=0).distance(queries)
    assert np.all(approx >= exact - 1e-9)  # a missed neighbour can only make the k-th one farther
    assert np.mean(np.isclose(approx, exact, rtol=1e-9)) >= 0.99
    # probing every list is an exact search
    everything = fit_neighbours(data, "standardised", mean, scale, exact_cost=0, probe=10_000)
    np.testing.assert_allclose(everything.distance(queries), exact, rtol=1e-9)


def test_a_query_whose_probed_lists_hold_fewer_than_k_items_is_searched_exactly():
    data = clustered(600, 4)
    index = fit_neighbours(data, "standardised", data.mean(0), data.std(0), exact_cost=0, probe=1)
    queries = clustered(200, 5)
    exact = fit_neighbours(data, "standardised", data.mean(0), data.std(0)).distance(queries)
    approx = index.distance(queries)
    assert np.all(np.isfinite(approx)) and np.all(approx >= exact - 1e-9)


def test_stored_features_are_capped_in_bytes(monkeypatch):
    images = np.random.default_rng(6).integers(0, 2, (20, 40, 40))
    index = fit_neighbours(images, "pixels", levels=2)
    assert len(index.features) == 20 and index.features.dtype == np.uint8
    assert MAX_BYTES // (28 * 28) > 80_000  # 85,000 MNIST-size images at most
    monkeypatch.setattr(neighbours, "MAX_BYTES", 10 * 40 * 40)  # room for 10 of these images
    capped = fit_neighbours(images, "pixels", levels=2)
    assert len(capped.features) == 10 and capped.n_train == 20
    assert {tuple(f) for f in capped.features.tolist()} <= {tuple(f) for f in index.features.tolist()}


@pytest.mark.parametrize("space", ["standardised", "pixels"])
def test_an_inverted_file_index_round_trips_through_an_artifact(tmp_path, space):
    rng = np.random.default_rng(7)
    if space == "standardised":
        data, queries = clustered(2000, 8), clustered(50, 9)
        index = fit_neighbours(data, space, data.mean(0), data.std(0), exact_cost=0)
    else:
        data, queries = rng.integers(0, 4, (2000, 6, 6)), rng.integers(0, 4, (50, 6, 6))
        index = fit_neighbours(data, space, levels=4, exact_cost=0)
    path = write(tmp_path, "m", neighbour_files(index))
    loaded = load_neighbours(art.load_artifact(path))
    assert loaded.index_kind == "ivf" and loaded.probe == index.probe
    np.testing.assert_array_equal(loaded.distance(queries), index.distance(queries))
    spec = json.loads((path / NEIGHBOURS_CONFIG).read_text())
    assert spec["index"] == "ivf" and spec["lists"] == len(index.centroids) and spec["stored"] == 2000


def test_an_index_written_before_the_index_key_is_exact_and_a_broken_ivf_is_refused(tmp_path):
    data = clustered(300, 10)
    exact = fit_neighbours(data, "standardised", data.mean(0), data.std(0))
    files = neighbour_files(exact)
    spec = json.loads(files[NEIGHBOURS_CONFIG])
    del spec["index"]
    old = load_neighbours(art.load_artifact(write(tmp_path, "old", {**files, NEIGHBOURS_CONFIG:
                                                                     json.dumps(spec).encode()})))
    assert old.index_kind == "exact"
    ivf = fit_neighbours(data, "standardised", data.mean(0), data.std(0), exact_cost=0)
    broken = json.loads(neighbour_files(ivf)[NEIGHBOURS_CONFIG]) | {"probe": 0}
    bad = write(tmp_path, "bad", {NEIGHBOURS_WEIGHTS: neighbour_files(ivf)[NEIGHBOURS_WEIGHTS],
                                  NEIGHBOURS_CONFIG: json.dumps(broken).encode()})
    with pytest.raises(art.ArtifactError, match=r"not a valid neighbour index.*probe >= 1"):
        load_neighbours(art.load_artifact(bad))
