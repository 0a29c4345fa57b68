import numpy as np
import pytest

from genserve.training.image_data import (
    load_digits,
    load_image_dataset,
    load_mnist5k,
    stratified_split,
    without_classes,
)


def test_mnist5k_is_binarised_28x28_with_a_fixed_stratified_split():
    data = load_mnist5k()
    assert (data.height, data.width, data.levels, data.n_classes) == (28, 28, 2, 10)
    assert [len(s.images) for s in (data.train, data.validation, data.test)] == [4000, 500, 500]
    for split in (data.train, data.validation, data.test):
        assert split.images.dtype == np.int64 and set(np.unique(split.images)) == {0, 1}
        counts = np.bincount(split.labels, minlength=10)
        assert (counts == counts[0]).all()  # 500 per class, split the same way in every class
    again = load_mnist5k()
    assert np.array_equal(again.test.images, data.test.images)


def test_digits_keeps_its_17_levels():
    data = load_digits()
    assert (data.height, data.width, data.levels) == (8, 8, 17)
    assert sum(len(s.images) for s in (data.train, data.validation, data.test)) == 1797
    assert data.train.images.min() == 0 and data.train.images.max() == 16


def test_splits_are_disjoint_and_cover_everything():
    labels = np.repeat(np.arange(3), [10, 20, 31])
    train, val, test = stratified_split(labels)
    everything = np.concatenate([train, val, test])
    assert len(everything) == len(labels) and len(np.unique(everything)) == len(labels)
    assert np.bincount(labels[test], minlength=3).tolist() == [1, 2, 3]


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="mnist5k, digits"):
        load_image_dataset("cifar")


def test_excluded_classes_leave_every_split_and_the_rest_are_renumbered():
    data = load_digits()
    rest = without_classes(data, [3, 7])
    assert rest.class_names == ["0", "1", "2", "4", "5", "6", "8", "9"] and rest.n_classes == 8
    for full, kept in ((data.train, rest.train), (data.validation, rest.validation), (data.test, rest.test)):
        mask = ~np.isin(full.labels, [3, 7])
        assert np.array_equal(kept.images, full.images[mask])
        # label i is class_names[i]: the renumbering keeps each image's class
        assert [rest.class_names[y] for y in kept.labels] == [data.class_names[y] for y in full.labels[mask]]
    with pytest.raises(ValueError, match="has no class"):
        without_classes(data, [10])
