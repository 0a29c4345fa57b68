"""RealNVP for images: invertibility, exact log-determinants, masks, and what its bounds on log P(x) mean."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from genserve.models.image_flow import (
    ConvCoupling,
    ImageFlowConfig,
    ImageRealNVP,
    channel_mask,
    checkerboard_mask,
    squeeze,
    unsqueeze,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions: one thread is much faster than several contending ones (and deterministic)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomised(config: ImageFlowConfig, seed: int = 0, scale: float = 0.3) -> ImageRealNVP:
    """A float64 model whose every parameter (zero-initialised heads included) is random: not the identity."""
    torch.manual_seed(seed)
    model = ImageRealNVP(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def test_a_fresh_model_is_the_logit_transform_alone() -> None:
    model = ImageRealNVP(ImageFlowConfig(height=8, width=8, levels=17, n_scales=2)).double()
    y = torch.rand(3, 8, 8, dtype=torch.float64)
    z, log_det = model.to_latent(y)
    p = 0.05 + 0.9 * y
    assert torch.allclose(z.sum(-1), torch.logit(p).flatten(1).sum(-1))
    assert torch.allclose(log_det, (math.log(0.9) - torch.log(p * (1 - p))).flatten(1).sum(-1))


@pytest.mark.parametrize(("height", "width", "n_scales"), [(8, 8, 1), (8, 8, 2), (28, 28, 2)])
def test_inverse_reproduces_the_input(height: int, width: int, n_scales: int) -> None:
    model = randomised(ImageFlowConfig(height=height, width=width, levels=17, n_blocks=2, channels=8,
                                       n_scales=n_scales), scale=0.1)
    y = torch.rand(4, height, width, dtype=torch.float64)
    z, _ = model(y)
    assert z.shape == (4, height * width)
    assert torch.allclose(model.inverse(z), y, atol=1e-5)
    # float32 too, as it is trained and served.
    model32 = model.float()
    assert torch.allclose(model32.inverse(model32.to_latent(y.float())[0]), y.float(), atol=1e-4)


def test_squeeze_is_inverted_by_unsqueeze_and_groups_2x2_blocks() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).view(2, 3, 4, 6)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 3)
    assert torch.equal(unsqueeze(s), x)
    assert torch.equal(s[0, :4, 0, 0], torch.stack([x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]))


@pytest.mark.parametrize("n_scales", [1, 2])
def test_log_det_equals_the_brute_force_jacobian(n_scales: int) -> None:
    model = randomised(ImageFlowConfig(height=4, width=4, levels=5, n_blocks=3, channels=6, n_scales=n_scales))
    y = torch.rand(3, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    _, log_det = model.to_latent(y)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: model.to_latent(v.view(1, 4, 4))[0][0], y[i].flatten())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        assert logabs.item() == pytest.approx(log_det[i].item(), abs=1e-8)
    assert not torch.allclose(log_det, ImageRealNVP(model.config).double().to_latent(y)[1])  # not the identity


def test_masks_alternate_and_each_layer_keeps_its_conditioning_half() -> None:
    model = randomised(ImageFlowConfig(height=8, width=8, levels=17, n_blocks=3, channels=4, n_scales=2))
    board = model.stages[0]
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    for k, layer in enumerate(board):
        assert torch.equal(layer.keep[0].bool(), (i + j) % 2 == k % 2)
    assert torch.equal(checkerboard_mask(1, 8, 8, 0), ~checkerboard_mask(1, 8, 8, 1))
    for stage, c, hw in ((model.stages[1], 4, 4), (model.stages[2], 16, 2)):
        for k, layer in enumerate(stage):
            kept_channels = layer.keep[:, 0, 0].bool()
            assert torch.equal(kept_channels, (torch.arange(c) < c // 2) ^ bool(k % 2))
            assert torch.equal(layer.keep.bool(), channel_mask(c, hw, hw, k % 2))
    for stage in model.stages:
        for layer in stage:
            assert isinstance(layer, ConvCoupling)
            x = torch.randn(5, *layer.keep.shape, dtype=torch.float64)
            out, _ = layer(x)
            keep = layer.keep.bool()
            assert torch.equal(out[:, keep], x[:, keep])  # the conditioning half is untouched
            assert not torch.allclose(out[:, ~keep], x[:, ~keep])  # the other half moves
            assert torch.allclose(layer.inverse(out), x, atol=1e-10)


def test_the_bound_rises_with_k_and_k1_is_the_dequantised_log_likelihood() -> None:
    model = randomised(ImageFlowConfig(height=8, width=8, levels=17, n_blocks=2, channels=8), scale=0.2)
    x = torch.randint(0, 17, (40, 8, 8), generator=torch.Generator().manual_seed(1))
    one = model.importance_bound(x, 1, torch.Generator().manual_seed(7))
    with torch.no_grad():
        dequantised = model.dequantised_log_prob(x, torch.Generator().manual_seed(7))
    assert torch.allclose(one, dequantised)
    means = [model.importance_bound(x, k, torch.Generator().manual_seed(3)).mean().item() for k in (1, 10, 100)]
    assert means[0] < means[1] < means[2]
    # Chunking is a memory bound only.
    assert torch.allclose(model.importance_bound(x, 10, torch.Generator().manual_seed(3), chunk=7),
                          model.importance_bound(x, 10, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("random_weights", [False, True])
def test_the_bounds_of_all_discrete_images_sum_to_at_most_one(random_weights: bool) -> None:
    config = ImageFlowConfig(height=2, width=2, levels=2, n_blocks=2, channels=4)
    model = randomised(config, seed=2, scale=0.3) if random_weights else ImageRealNVP(config).double()
    images = torch.tensor(list(itertools.product((0, 1), repeat=4))).view(16, 2, 2)
    bound = model.importance_bound(images, 4096, torch.Generator().manual_seed(0))
    total = torch.exp(bound).sum().item()
    assert total <= 1.01
    # The identity flow's mass outside [0, 1)^D is only the logit's margin: the sum is near 1, not trivially small.
    assert total > 0.95


def test_samples_are_levels_reproducible_by_seed() -> None:
    model = randomised(ImageFlowConfig(height=8, width=8, levels=17, n_blocks=2, channels=4), scale=0.1).float()
    a = model.sample(6, torch.Generator().manual_seed(0))
    b = model.sample(6, torch.Generator().manual_seed(0))
    assert a.dtype == torch.long and a.shape == (6, 8, 8)
    assert int(a.min()) >= 0 and int(a.max()) < 17
    assert torch.equal(a, b)
    assert not torch.equal(a, model.sample(6, torch.Generator().manual_seed(1)))


def test_config_rejects_what_the_flow_cannot_do() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        ImageFlowConfig(height=8, width=8, levels=17, n_classes=10)
    with pytest.raises(ValueError, match="multiples of 4"):
        ImageFlowConfig(height=6, width=6, levels=17, n_scales=2)
    with pytest.raises(ValueError, match="k must be"):
        ImageRealNVP(ImageFlowConfig(height=2, width=2, levels=2)).importance_bound(torch.zeros(1, 2, 2).long(), 0)
