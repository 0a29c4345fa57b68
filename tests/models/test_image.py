"""The ImageModel base class (label marginalisation, pixel draws, label sampling, label checks), with
FVSBN as the concrete model; and the helpers the image models' own tests share."""

import itertools
import json
import math
from dataclasses import asdict

import pytest
import torch

from genserve.artifacts.artifact import load_module_weights, module_weights
from genserve.models.fvsbn import FVSBN, FVSBNConfig
from genserve.models.image import ImageModel, draw_pixel, marginalise_labels
from genserve.models.registry import build_image_model
from genserve.training.onnx_export import check_image_onnx, export_image_onnx

torch.set_num_threads(1)


# ---- shared helpers (no test_ prefix: imported by test_fvsbn, test_made, test_nade) ---------------------------


def randomise(model: ImageModel, scale: float = 0.7, seed: int = 0) -> ImageModel:
    """float64, every parameter (label embeddings included) drawn N(0, scale^2): no zero init hides a
    dependence, and the conditionals are far from uniform."""
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def all_images(height: int, width: int, levels: int) -> torch.Tensor:
    """Every image of the shape, (levels ** (H W), H, W), in lexicographic raster order."""
    return torch.tensor(list(itertools.product(range(levels), repeat=height * width))).view(-1, height, width)


def label_cases(model: ImageModel) -> list[torch.Tensor | None]:
    """The label settings to check a model under: None only (unconditional), else each class and None."""
    return [None] if not model.n_classes else [None, *(torch.tensor([y]) for y in range(model.n_classes))]


def labels_for(label: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if label is None else label.expand(n)


def check_autoregressive(logits_fn, order: torch.Tensor, n_pixels: int, batch: int = 4, seed: int = 0) -> None:
    """For every output pixel i, the gradient of the sum of its logits with respect to the float inputs
    is nonzero exactly for the pixels before i in `order` (raster indices, first generated first).

    `logits_fn(values)` maps (N, D) float64 values to (N, D, C) logits. A batch of random values, the
    gradient's magnitude summed over it: a path that is dead for one input is alive for another."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, n_pixels, generator=g, dtype=torch.float64, requires_grad=True)
    logits = logits_fn(values)
    assert logits.shape[:2] == (batch, n_pixels)
    rank = torch.empty(n_pixels, dtype=torch.long)
    rank[order] = torch.arange(n_pixels)
    for i in range(n_pixels):
        (grad,) = torch.autograd.grad(logits[:, i].sum(), values, retain_graph=True)
        depends = grad.abs().sum(0) > 0
        expected = rank < rank[i]
        assert torch.equal(depends, expected), f"pixel {i}: depends on {depends.nonzero().flatten().tolist()}, " \
                                               f"expected {expected.nonzero().flatten().tolist()}"


@torch.no_grad()
def check_normalised(model: ImageModel, score=None, marginal: bool = True) -> None:
    """Enumerating every image: exp(log p(x | y)) sums to 1 for each label, and the marginal too (unless
    not `marginal`). `score(x, labels) -> (log_prob, cond)` defaults to the model's `score`."""
    score = score or model.score
    images = all_images(model.height, model.width, model.levels)
    for label in label_cases(model)[0 if marginal or not model.n_classes else 1:]:
        log_prob = score(images, labels_for(label, len(images)))[0]
        total = float(log_prob.double().exp().sum())
        assert total == pytest.approx(1.0, abs=1e-9), f"label {label}: sums to {total}"


@torch.no_grad()
def check_chain_rule(model: ImageModel) -> None:
    """pixel_log_probs sums to log_prob, each label and the marginal."""
    images = all_images(model.height, model.width, model.levels)[::3]
    for label in label_cases(model):
        log_prob, cond = model.score(images, labels_for(label, len(images)))
        assert cond.shape == (len(images), model.height, model.width)
        torch.testing.assert_close(cond.flatten(1).sum(1), log_prob, atol=1e-9, rtol=0)


@torch.no_grad()
def check_incremental_sampler(model: ImageModel, n: int = 6, known: int = 0) -> None:
    """The model's own sample_pixels draws exactly what the base class's (one full pass per pixel) draws
    from the same seed, labels and prefix."""
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, model.levels, (n, model.height, model.width), generator=g)
    prefix.view(n, -1)[:, known:] = 0
    labels = torch.randint(0, model.n_classes, (n,), generator=g) if model.n_classes else None
    fast = model.sample_pixels(prefix.clone(), labels, known, torch.Generator().manual_seed(7))
    slow = ImageModel.sample_pixels(model, prefix.clone(), labels, known, torch.Generator().manual_seed(7))
    assert torch.equal(fast, slow)
    assert torch.equal(fast.view(n, -1)[:, :known], prefix.view(n, -1)[:, :known])


@torch.no_grad()
def check_sampling(model: ImageModel, known: int = 3) -> None:
    """Completion keeps the prefix and yields valid levels; the same seed gives the same images and
    labels, another seed other images."""
    n = 8
    prefix = torch.randint(0, model.levels, (n, model.height, model.width), generator=torch.Generator().manual_seed(1))
    x, labels = model.sample(prefix=prefix, known=known, generator=torch.Generator().manual_seed(0))
    assert x.shape == prefix.shape and x.dtype == torch.long
    assert torch.equal(x.view(n, -1)[:, :known], prefix.view(n, -1)[:, :known])
    assert int(x.min()) >= 0 and int(x.max()) < model.levels
    assert (labels is None) == (not model.n_classes)
    a = model.sample(n, generator=torch.Generator().manual_seed(5))
    b = model.sample(n, generator=torch.Generator().manual_seed(5))
    c = model.sample(n, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    if model.n_classes:
        assert torch.equal(a[1], b[1])


@torch.no_grad()
def check_sample_frequencies(model: ImageModel, log_prob_fn=None, n: int = 4000, tol: float = 0.03) -> None:
    """A tiny model: the empirical frequency of every image among n samples is within tol of
    exp(log p(x)), labels drawn from the class prior and given. `log_prob_fn(x, labels)` defaults to
    the model's log_prob (pass the sampler's own distribution where it differs)."""
    log_prob_fn = log_prob_fn or model.log_prob
    images = all_images(model.height, model.width, model.levels)
    for label in label_cases(model)[:2]:
        x, _ = model.sample(n, labels=labels_for(label, n), generator=torch.Generator().manual_seed(11))
        index = (x.flatten(1) * model.levels ** torch.arange(model.n_pixels - 1, -1, -1)).sum(1)
        freq = torch.bincount(index, minlength=len(images)).double() / n
        want = log_prob_fn(images, labels_for(label, len(images))).double().exp()
        worst = float((freq - want).abs().max())
        assert worst < tol, f"label {label}: empirical frequencies off by {worst:.3f}"


def check_registry_round_trip(kind: str, model: ImageModel) -> ImageModel:
    """Config through JSON (tuples become lists) and weights through safetensors rebuild the same model."""
    config = json.loads(json.dumps(asdict(model.config)))
    rebuilt = build_image_model(kind, config).to(dtype=next(model.parameters()).dtype)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    load_module_weights(rebuilt, module_weights(model))
    images = all_images(model.height, model.width, model.levels)[:20]
    for label in label_cases(model)[:2]:
        torch.testing.assert_close(rebuilt.eval().score(images, labels_for(label, 20)),
                                   model.score(images, labels_for(label, 20)), atol=0, rtol=0)
    return rebuilt


def check_onnx(model: ImageModel) -> None:
    worst = check_image_onnx(model, export_image_onnx(model))
    assert worst <= 1e-4


# ---- the base class ---------------------------------------------------------------------------------------------


def small_fvsbn(n_classes: int = 3, levels: int = 2) -> FVSBN:
    return randomise(FVSBN(FVSBNConfig(height=2, width=2, levels=levels, n_classes=n_classes)), scale=1.0)


def test_marginalise_labels_matches_brute_force():
    """Random per-class conditionals: the marginal log p(x) and each marginal conditional
    log p(x_<=i) - log p(x_<i) with p(x_<=i) = sum_y p(y) prod_{j<=i} p(x_j | x_<j, y), loop by loop."""
    g = torch.Generator().manual_seed(0)
    n_classes, n, d = 3, 5, 6
    cond = -torch.rand(n_classes, n, d, generator=g, dtype=torch.float64) * 3
    prior = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    log_prob, marginal = marginalise_labels(cond.sum(-1), cond, prior)
    for row in range(n):
        prefixes = [math.log(sum(math.exp(float(prior[y]) + float(cond[y, row, : i + 1].sum()))
                                 for y in range(n_classes))) for i in range(d)]
        want = [prefixes[0]] + [prefixes[i] - prefixes[i - 1] for i in range(1, d)]
        assert marginal[row].tolist() == pytest.approx(want, abs=1e-12)
        assert float(log_prob[row]) == pytest.approx(prefixes[-1], abs=1e-12)


@torch.no_grad()
def test_marginal_conditionals_are_the_models_by_enumeration():
    """A conditional model given no label: exp of the cumulative marginal conditionals is p(x_<=i),
    the sum over every completion of p(x) = sum_y p(y) p(x | y)."""
    model = small_fvsbn(n_classes=3, levels=3)
    model.set_class_prior(torch.tensor([0, 1, 1, 2, 2, 2]))
    images = all_images(2, 2, 3)
    joint = model.log_prob(images).exp()
    by_hand = sum(model.class_log_prior[y].exp() * model.log_prob(images, torch.full((81,), y)).exp()
                  for y in range(3))
    torch.testing.assert_close(joint, by_hand, atol=1e-12, rtol=0)
    cond = model.pixel_log_probs(images[::7]).flatten(1)
    for x, c in zip(images[::7].flatten(1), cond, strict=True):
        for i in range(4):
            agrees = (images.flatten(1)[:, : i + 1] == x[: i + 1]).all(1)
            assert float(c[: i + 1].sum().exp()) == pytest.approx(float(joint[agrees].sum()), abs=1e-12)


@pytest.mark.parametrize("logits", [[[-1.5], [0.0], [2.0]], [[0.3, -1.0, 1.2, 0.0], [-2.0, 0.5, 0.5, 1.0]]])
def test_draw_pixel_frequencies(logits):
    logits = torch.tensor(logits, dtype=torch.float64)
    n = 20000
    draws = draw_pixel(logits.repeat_interleave(n, 0), torch.Generator().manual_seed(0)).view(len(logits), n)
    if logits.shape[1] == 1:
        want = torch.stack([1 - torch.sigmoid(logits[:, 0]), torch.sigmoid(logits[:, 0])], 1)
    else:
        want = torch.softmax(logits, -1)
    freq = torch.stack([torch.bincount(row, minlength=want.shape[1]) for row in draws]).double() / n
    assert float((freq - want).abs().max()) < 0.015


def test_draw_pixel_is_seeded():
    logits = torch.randn(50, 4)
    assert torch.equal(draw_pixel(logits, torch.Generator().manual_seed(1)),
                       draw_pixel(logits, torch.Generator().manual_seed(1)))


@torch.no_grad()
def test_sample_draws_labels_from_the_class_prior():
    model = small_fvsbn(n_classes=3)
    model.set_class_prior(torch.tensor([0, 2, 2, 2]))  # p(y) = (1/4, 0, 3/4)
    assert model.class_log_prior.exp().tolist() == pytest.approx([0.25, 0.0, 0.75])
    _, labels = model.sample(4000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=3).double() / 4000
    assert freq[1] == 0
    assert float(freq[0]) == pytest.approx(0.25, abs=0.03)
    given = torch.tensor([1, 1, 0])
    assert torch.equal(model.sample(labels=given, n=3, generator=torch.Generator().manual_seed(0))[1], given)


@torch.no_grad()
def test_sample_frequencies_and_completion_of_the_base_sampler():
    """The base class's one-pass-per-pixel sampler (FVSBN's own is checked against it in test_fvsbn)."""
    model = small_fvsbn(n_classes=2)
    model.sample_pixels = lambda x, labels, known, generator: ImageModel.sample_pixels(model, x, labels, known,
                                                                                        generator)
    check_sample_frequencies(model)
    check_sampling(model)


def test_label_errors():
    x = torch.zeros(3, 2, 2, dtype=torch.long)
    unconditional, conditional = small_fvsbn(n_classes=0), small_fvsbn(n_classes=3)
    with pytest.raises(ValueError, match="not class-conditional"):
        unconditional.score(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not class-conditional"):
        unconditional.sample(3, labels=torch.zeros(3, dtype=torch.long))
    for bad, match in [(torch.zeros(2, dtype=torch.long), r"shape \(3,\)"),
                       (torch.zeros(3, 1, dtype=torch.long), r"shape \(3,\)"),
                       (torch.tensor([0, 3, 1]), r"within \[0, 3\)"),
                       (torch.tensor([0, -1, 1]), r"within \[0, 3\)")]:
        with pytest.raises(ValueError, match=match):
            conditional.score(x, bad)
        with pytest.raises(ValueError, match=match):
            conditional.log_prob(x, bad)
        with pytest.raises(ValueError, match=match):
            conditional.sample(3, labels=bad)
    with pytest.raises(ValueError, match="give n or a prefix"):
        conditional.sample()
    with pytest.raises(ValueError, match="known must be within"):
        conditional.sample(prefix=x, known=5)
    conditional.score(x)  # no labels: the marginal
    conditional.score(x, torch.tensor([0, 2, 1]))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["fvsbn", "made"])
def test_completions_without_labels_come_from_the_marginal_given_the_prefix(kind):
    """A conditional model completing a prefix with no label: labels from p(y | prefix), and the completed
    images' frequencies those of the marginal p(rest | prefix) = sum_y p(y | prefix) p(rest | prefix, y),
    in the raster order completion uses (MADE: its raster ordering, mask 0)."""
    arch = {"hidden": (12, 12), "n_masks": 3} if kind == "made" else {}
    model = randomise(build_image_model(kind, {"height": 2, "width": 2, "levels": 2, "n_classes": 3, **arch}))
    model.set_class_prior(torch.tensor([0, 1, 1, 2, 2, 2]))
    prefix, known, n = torch.tensor([[1, 0], [0, 0]]), 2, 4000
    images = all_images(2, 2, 2)
    images = images[(images.flatten(1)[:, :known] == prefix.flatten()[:known]).all(1)]  # the 4 completions
    # Exact, in raster order: p(y, x) for each label, from the raster conditionals.
    joint = torch.stack([model.conditional_log_probs(images, torch.full((len(images),), y)).sum(1)
                         for y in range(3)]) + model.class_log_prior[:, None]  # (Y, 4)
    want_images = torch.softmax(torch.logsumexp(joint, 0), 0)
    want_labels = torch.softmax(torch.logsumexp(joint, 1), 0)
    out, labels = model.sample(prefix=prefix.expand(n, 2, 2), known=known, generator=torch.Generator().manual_seed(2))
    index = (out.flatten(1)[:, known:] * torch.tensor([2, 1])).sum(1)  # the completion's rank among the 4
    got_images = torch.bincount(index, minlength=4).double() / n
    got_labels = torch.bincount(labels, minlength=3).double() / n
    assert float((got_images - want_images).abs().max()) < 0.03
    assert float((got_labels - want_labels).abs().max()) < 0.03
