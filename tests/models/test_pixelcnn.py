import itertools
import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

from genserve.models.image import ImageModel
from genserve.models.pixelcnn import GatedPixelCNN, MaskedConv2d, PixelCNNConfig
from genserve.models.registry import build_image_model
from genserve.training.onnx_export import check_image_onnx, export_image_onnx

torch.set_num_threads(1)


def make(seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> GatedPixelCNN:
    config = dict(height=5, width=5, levels=2, channels=8, n_layers=4, kernel_size=5, head_channels=16)
    config.update(kw)
    torch.manual_seed(seed)
    return GatedPixelCNN(PixelCNNConfig(**config)).to(dtype).eval()


def all_images(model: ImageModel) -> torch.Tensor:
    grid = itertools.product(range(model.levels), repeat=model.n_pixels)
    return torch.tensor(list(grid)).view(-1, model.height, model.width)


def input_dependence(net, values: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """(D, D): entry (i, j) is the summed |d logits_i / d value_j| over a small batch of inputs."""
    values = values.clone().requires_grad_(True)
    out = net(values)  # (N, D, C)
    rows = []
    for i in range(n_pixels):
        (grad,) = torch.autograd.grad(out[:, i].sum(), values, retain_graph=True)
        rows.append(grad.abs().sum(0).flatten())
    return torch.stack(rows)


@pytest.mark.parametrize("levels,n_classes", [(2, 0), (3, 2)])
def test_each_pixel_depends_on_exactly_the_pixels_before_it(levels, n_classes):
    model = make(levels=levels, n_classes=n_classes)
    with torch.no_grad():  # larger weights than the default init, so no path is numerically negligible
        for p in model.parameters():
            p.normal_(0, 0.5)
    H, W, D = model.height, model.width, model.n_pixels
    g = torch.Generator().manual_seed(0)
    values = torch.rand(3, H, W, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1]) if n_classes else None
    dep = input_dependence(lambda v: model._logits_from_values(v, labels), values, D)

    before = torch.tril(torch.ones(D, D, dtype=torch.bool), diagonal=-1)
    assert torch.equal(dep != 0, before), (dep != 0).int()
    # The region a plain masked stack misses, above and to the right of (r, c), is covered explicitly.
    blind = [(i, j) for i in range(D) for j in range(i)
             if j // W < i // W and j % W - i % W > i // W - j // W]
    assert (1 * W + 0, 0 * W + 2) in blind  # e.g. (r - 1, c + 2) for (r, c) = (1, 0)
    assert all(dep[i, j] > 0 for i, j in blind)


def test_a_plain_masked_stack_has_a_blind_spot():
    torch.manual_seed(0)
    layers = [MaskedConv2d("A", 1, 8, 3)] + [MaskedConv2d("B", 8, 8, 3) for _ in range(5)]
    stack = nn.Sequential(*itertools.chain.from_iterable((conv, nn.Tanh()) for conv in layers)).double()
    H = W = 6
    net = lambda v: stack(v[:, None]).sum(1).flatten(1)[:, :, None]  # noqa: E731
    values = torch.rand(2, H, W, dtype=torch.float64)
    dep = input_dependence(net, values, H * W)
    r, c = 3, 1
    i = r * W + c
    assert dep[i, i:].eq(0).all()  # still causal
    assert dep[i, (r - 1) * W + c + 1] > 0 and dep[i, r * W + c - 1] > 0
    assert dep[i, (r - 1) * W + c + 2] == 0  # above-right of (r, c): the blind spot
    assert dep[i, (r - 2) * W + c + 3] == 0
    gated = make(height=H, width=W, n_layers=5)
    gated_dep = input_dependence(lambda v: gated._logits_from_values(v, None), values, H * W)
    assert gated_dep[i, (r - 1) * W + c + 2] > 0 and gated_dep[i, (r - 2) * W + c + 3] > 0


@pytest.mark.parametrize("levels,shape", [(2, (2, 3)), (3, (2, 2))])
def test_probabilities_sum_to_one(levels, shape):
    model = make(height=shape[0], width=shape[1], levels=levels, n_layers=2, kernel_size=3)
    x = all_images(model)
    with torch.no_grad():
        log_prob, pixel = model.score(x)
    assert torch.logsumexp(log_prob, 0).exp().item() == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(pixel.flatten(1).sum(1), log_prob)


def test_conditional_probabilities_sum_to_one_per_label_and_marginally():
    model = make(height=2, width=2, levels=3, n_classes=3, n_layers=2, kernel_size=3)
    model.set_class_prior(torch.tensor([0, 1, 1, 2, 2, 2]))
    x = all_images(model)
    with torch.no_grad():
        per_label = [model.log_prob(x, torch.full((len(x),), y)) for y in range(3)]
        log_prob, pixel = model.score(x)
    for lp in per_label:
        assert torch.logsumexp(lp, 0).exp().item() == pytest.approx(1.0, abs=1e-10)
    assert not torch.allclose(per_label[0], per_label[1])  # the label matters
    assert torch.logsumexp(log_prob, 0).exp().item() == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(pixel.flatten(1).sum(1), log_prob)


def test_sampling_is_seeded_and_matches_the_full_recompute_sampler():
    model = make(levels=3, n_classes=2)
    labels = torch.tensor([0, 1, 1, 0, 1])

    def draw(sampler=None, seed=7):
        g = torch.Generator().manual_seed(seed)
        if sampler is None:
            return model.sample(len(labels), labels=labels, generator=g)[0]
        x = torch.zeros(len(labels), model.height, model.width, dtype=torch.long)
        return sampler(x, labels, 0, g)

    fast = draw()
    assert torch.equal(fast, draw())
    assert not torch.equal(fast, draw(seed=8))
    assert torch.equal(fast, draw(lambda *a: ImageModel.sample_pixels(model, *a)))
    assert fast.min() >= 0 and fast.max() < 3


@pytest.mark.parametrize("known", [0, 13, 20])
def test_row_sampler_crops_to_the_vertical_reach_exactly(known):
    # 9 rows against a vertical reach of 2 layers x 1 row: the crop is taken, completions start mid-row.
    model = make(height=9, width=4, levels=3, n_classes=2, n_layers=2, kernel_size=3)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    labels = torch.tensor([0, 1, 1])
    prefix = torch.randint(0, 3, (3, 9, 4), generator=torch.Generator().manual_seed(1))
    prefix.view(3, -1)[:, known:] = 0

    def draw(sampler):
        return sampler(prefix.clone(), labels, known, torch.Generator().manual_seed(3))

    fast = draw(model.sample_pixels)
    assert torch.equal(fast, draw(lambda *a: ImageModel.sample_pixels(model, *a)))
    assert torch.equal(fast.flatten(1)[:, :known], prefix.flatten(1)[:, :known])


def test_completion_keeps_the_known_pixels():
    model = make(levels=2)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 2, (4, 5, 5), generator=g)
    known = 12
    out, labels = model.sample(prefix=prefix, known=known, generator=g)
    assert labels is None
    assert torch.equal(out.flatten(1)[:, :known], prefix.flatten(1)[:, :known])
    assert torch.equal(prefix, torch.randint(0, 2, (4, 5, 5), generator=torch.Generator().manual_seed(0)))


def test_conditional_sampling_with_fixed_labels():
    model = make(n_classes=3)
    labels = torch.tensor([2, 0, 1])
    out, got = model.sample(3, labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, labels) and out.shape == (3, 5, 5)
    out, got = model.sample(n=4, generator=torch.Generator().manual_seed(0))  # labels from the prior
    assert got.shape == (4,) and got.min() >= 0 and got.max() < 3
    with pytest.raises(ValueError, match="labels"):
        model.sample(1, labels=torch.tensor([3]))


def test_sample_frequencies_match_the_likelihood():
    model = make(height=2, width=2, n_layers=2, kernel_size=3)
    with torch.no_grad():  # a less uniform distribution than the random init gives
        model.head[-1].weight.mul_(20)
    x = all_images(model)
    with torch.no_grad():
        probs = model.log_prob(x).exp()
    samples, _ = model.sample(n=4000, generator=torch.Generator().manual_seed(0))
    index = (samples.flatten(1) * (2 ** torch.arange(3, -1, -1))).sum(1)  # all_images' order
    freq = torch.bincount(index, minlength=16).double() / 4000
    assert probs.max() - probs.min() > 0.05
    assert (freq - probs).abs().max() < 0.03


def test_rebuild_from_json_config_and_state_dict():
    model = make(n_classes=2, dtype=torch.float32)
    model.set_class_prior(torch.tensor([0, 1, 1]))
    config = json.loads(json.dumps(asdict(model.config)))
    rebuilt = build_image_model("pixelcnn", config)
    assert isinstance(rebuilt, GatedPixelCNN) and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    assert not any("mask" in key for key in model.state_dict())
    x = torch.randint(0, 2, (3, 5, 5))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().log_prob(x), model.log_prob(x))


@pytest.mark.parametrize("bad", [dict(kernel_size=4), dict(kernel_size=1), dict(channels=0), dict(n_layers=0),
                                 dict(head_channels=0)])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        make(**bad)


@pytest.mark.parametrize("levels,n_classes", [(2, 0), (4, 3)])
def test_onnx_export_matches_torch(levels, n_classes):
    model = make(height=4, width=5, levels=levels, n_classes=n_classes, n_layers=2, kernel_size=3,
                 dtype=torch.float32)
    assert check_image_onnx(model, export_image_onnx(model)) <= 1e-4
