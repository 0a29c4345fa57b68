import math

import pytest
import torch

from genserve.models.image import ImageModel
from genserve.models.made import MADE, MADEConfig, made_degrees
from genserve.models.registry import build_image_model
from tests.models.test_image import (
    all_images,
    check_autoregressive,
    check_incremental_sampler,
    check_normalised,
    check_onnx,
    check_registry_round_trip,
    check_sample_frequencies,
    check_sampling,
    label_cases,
    labels_for,
    randomise,
)

torch.set_num_threads(1)

CASES = [(2, 0), (3, 0), (2, 3), (3, 2)]  # (levels, n_classes)


def make(height=2, width=2, levels=2, n_classes=0, hidden=(12, 12), n_masks=3, mask_seed=0) -> MADE:
    config = MADEConfig(height=height, width=width, levels=levels, n_classes=n_classes, hidden=hidden,
                        n_masks=n_masks, mask_seed=mask_seed)
    return randomise(MADE(config))


def test_degrees():
    """Mask 0 is the raster order, the others permutations; a layer at least D - 1 wide holds every
    degree 1..D-1, a narrower one degrees within [min of the layer below, D - 1]; fixed by the seed."""
    d = 10
    inputs, layers = made_degrees(d, (9, 30, 4), n_masks=5, seed=3)
    assert inputs[0].tolist() == list(range(1, d + 1))
    assert all(sorted(row.tolist()) == list(range(1, d + 1)) for row in inputs)
    assert len({tuple(row.tolist()) for row in inputs}) == 5
    for m in range(5):
        assert set(layers[0][m].tolist()) == set(range(1, d)) == set(layers[1][m].tolist())
        assert int(layers[2][m].min()) >= 1 and int(layers[2][m].max()) <= d - 1
    again = made_degrees(d, (9, 30, 4), n_masks=5, seed=3)
    assert torch.equal(again[0], inputs) and all(torch.equal(a, b) for a, b in zip(again[1], layers, strict=True))
    assert not torch.equal(made_degrees(d, (9, 30, 4), n_masks=5, seed=4)[0], inputs)
    model = MADE(MADEConfig(2, 5, 2, hidden=(9, 30, 4), n_masks=5, mask_seed=3))
    assert torch.equal(model.input_degrees, inputs)
    assert torch.equal(model.ordering(0), torch.arange(d))
    assert {"input_degrees", "hidden_degrees_0", "hidden_degrees_2"} <= set(model.state_dict())


def test_one_pixel_image():
    model = make(1, 1, 3, hidden=(4,), n_masks=2)
    check_normalised(model)


@pytest.mark.parametrize(("levels", "n_classes"), CASES)
def test_autoregressive_in_every_masks_ordering(levels, n_classes):
    model = make(3, 4, levels, n_classes, hidden=(16, 11), n_masks=4)
    labels = torch.arange(4) % n_classes if n_classes else None
    x = torch.randint(0, levels, (4, 3, 4))
    torch.testing.assert_close(model.pixel_logits(x, labels), model._logits_from_values(model.scaled(x).flatten(1),
                                                                                         labels, 0))
    for m in range(model.n_masks):
        check_autoregressive(lambda values, m=m: model._logits_from_values(values, labels, m), model.ordering(m), 12)


def test_hidden_layers_alone_connect_every_earlier_pixel():
    """Through the hidden layers alone (each at least D - 1 wide) every earlier pixel reaches every later
    output, in every mask: the chain rule is exactly expressible. Paths counted by multiplying the masks."""
    model = MADE(MADEConfig(3, 4, 3, hidden=(16, 11, 30), n_masks=4))
    for m in range(model.n_masks):
        masks = model.masks(m)
        paths = masks[0]
        for mask in masks[1:-1]:
            paths = mask @ paths
        rank = model.input_degrees[m]
        earlier = rank[None, :] < rank[:, None]  # [i, j]: pixel j before pixel i
        assert torch.equal(paths > 0, earlier)
        assert torch.equal(masks[-1] > 0, earlier)


@torch.no_grad()
def test_masks_are_cached_until_the_degrees_change():
    model = make(2, 3, 3, hidden=(8,), n_masks=2)
    first = model.masks(1)
    assert model.masks(1) is first
    x = torch.randint(0, 3, (4, 2, 3))
    before = model.score_with_mask(x, None, 1)[0]
    other = make(2, 3, 3, hidden=(8,), n_masks=2, mask_seed=5)
    model.load_state_dict(other.state_dict())
    assert model.masks(1) is not first
    torch.testing.assert_close(model.score_with_mask(x, None, 1)[0], other.score_with_mask(x, None, 1)[0])
    assert not torch.allclose(model.score_with_mask(x, None, 1)[0], before)
    assert model.float().masks(1)[0].dtype == torch.float32


@pytest.mark.parametrize(("levels", "n_classes"), CASES)
def test_every_mask_and_the_ensemble_are_normalised(levels, n_classes):
    model = make(levels=levels, n_classes=n_classes)
    if n_classes:
        model.set_class_prior(torch.arange(n_classes).repeat_interleave(torch.arange(1, n_classes + 1)))
    for m in range(model.n_masks):
        check_normalised(model, score=lambda x, labels, m=m: model.score_with_mask(x, labels, m), marginal=False)
    check_normalised(model)


@torch.no_grad()
@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (3, 2)])
def test_ensemble_is_what_its_docstring_says(levels, n_classes):
    """log p(x | y) = log mean_m p_m(x | y); the conditionals are the masks' mean, summing to the mean of
    log p_m(x | y), a lower bound on log p(x | y). Given no label, the conditionals sum to the marginal of
    that mean (models.image.marginalise_labels); each mask's own conditionals sum to its log p_m."""
    model = make(levels=levels, n_classes=n_classes, n_masks=4)
    if n_classes:
        model.set_class_prior(torch.tensor([0, 1, 1]))
    images = all_images(2, 2, levels)
    for label in label_cases(model):
        labels = labels_for(label, len(images))
        given = [labels] if labels is not None else [torch.full((len(images),), y) for y in range(n_classes)] or [None]
        per_mask = [[model.score_with_mask(images, y, m) for m in range(4)] for y in given]
        for scores in per_mask:
            for lp, cond in scores:
                torch.testing.assert_close(cond.sum(1), lp, atol=1e-12, rtol=0)
        log_prob, cond = model.score(images, labels)
        mean_lp = torch.stack([torch.stack([lp for lp, _ in scores]).mean(0) for scores in per_mask])
        ensemble = torch.stack([torch.logsumexp(torch.stack([lp for lp, _ in scores]), 0) - math.log(4)
                                for scores in per_mask])
        if labels is None and n_classes:
            prior = model.class_log_prior[:, None]
            torch.testing.assert_close(log_prob, torch.logsumexp(ensemble + prior, 0), atol=1e-12, rtol=0)
            torch.testing.assert_close(cond.flatten(1).sum(1), torch.logsumexp(mean_lp + prior, 0), atol=1e-12, rtol=0)
        else:
            torch.testing.assert_close(log_prob, ensemble[0], atol=1e-12, rtol=0)
            torch.testing.assert_close(cond.flatten(1), torch.stack([c for _, c in per_mask[0]]).mean(0), atol=1e-12,
                                       rtol=0)
            torch.testing.assert_close(cond.flatten(1).sum(1), mean_lp[0], atol=1e-12, rtol=0)
        assert bool((cond.flatten(1).sum(1) <= log_prob + 1e-12).all())
        assert bool((cond.flatten(1).sum(1) < log_prob - 1e-6).any())  # the masks disagree: a strict bound


@pytest.mark.parametrize(("levels", "n_classes"), CASES)
@pytest.mark.parametrize(("known", "n_masks"), [(0, 1), (5, 4)])
def test_sampler_matches_the_base_class(levels, n_classes, known, n_masks):
    # Completions (and a single-mask model) run in raster order on mask 0, as the base class's sampler.
    check_incremental_sampler(make(3, 3, levels, n_classes, hidden=(10, 9), n_masks=n_masks), known=known)


@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (3, 2)])
def test_sampling(levels, n_classes):
    check_sampling(make(3, 3, levels, n_classes, hidden=(10, 9)))


@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (2, 2)])
def test_new_samples_come_from_the_ensemble_that_is_scored(levels, n_classes):
    check_sample_frequencies(make(levels=levels, n_classes=n_classes))


@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (3, 2)])
def test_registry_round_trip(levels, n_classes):
    model = make(levels=levels, n_classes=n_classes)
    check_registry_round_trip("made", model)
    # The stored orderings and degrees, not the seed, fix the connectivity.
    other = build_image_model("made", {**vars(model.config), "mask_seed": 99, "hidden": [12, 12]}).double()
    assert not torch.equal(other.input_degrees, model.input_degrees)
    other.load_state_dict(model.state_dict())
    x = all_images(2, 2, levels)
    labels = torch.zeros(len(x), dtype=torch.long) if n_classes else None
    torch.testing.assert_close(other.score(x, labels), model.score(x, labels), atol=0, rtol=0)


def test_pixel_logits_defaults_to_the_raster_mask():
    model = make(2, 3, hidden=(8,), n_masks=2)
    x = torch.randint(0, 2, (3, 2, 3))
    assert torch.equal(model.pixel_logits(x, None), model.pixel_logits(x, None, mask=0))
    assert not torch.equal(model.pixel_logits(x, None), model.pixel_logits(x, None, mask=1))
    torch.testing.assert_close(ImageModel.score_given(model, x, None)[0], model.score_with_mask(x, None, 0)[0])


@pytest.mark.parametrize("n_classes", [0, 3])
def test_onnx(n_classes):
    check_onnx(make(3, 2, 3, n_classes, hidden=(8, 7), n_masks=3).float())
