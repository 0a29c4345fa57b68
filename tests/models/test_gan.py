import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from genserve.artifacts import artifact as art
from genserve.models.gan import GAN, Discriminator, GANConfig, Generator, build_generator, to_levels, unit_images

torch.set_num_threads(1)

SHAPES = [(8, 8, 17), (28, 28, 2)]


def make(height=8, width=8, levels=17, n_classes=0, **kw) -> GAN:
    torch.manual_seed(0)
    return GAN(GANConfig(height, width, levels, n_classes, **{"latent_dim": 8, "channels": 4, **kw}))


@pytest.mark.parametrize(("height", "width", "levels"), SHAPES)
@pytest.mark.parametrize("n_classes", [0, 10])
def test_shapes_and_ranges(height, width, levels, n_classes):
    gan = make(height, width, levels, n_classes)
    labels = torch.arange(6) % n_classes if n_classes else None
    x = gan.generator(torch.randn(6, 8), labels)
    assert x.shape == (6, 1, height, width) and x.min() >= 0 and x.max() <= 1
    assert gan.discriminator(x, labels).shape == (6,)
    assert gan.discriminator(x[:, 0], labels).shape == (6,)  # (N, H, W) too
    samples = gan.sample(6, labels, torch.Generator().manual_seed(0))
    assert samples.shape == (6, height, width) and samples.dtype == torch.long
    assert samples.min() >= 0 and samples.max() < levels


def test_odd_sizes_are_cropped_and_tiny_ones_refused():
    gan = make(5, 7, 3, 2)
    assert gan.sample(3, torch.tensor([0, 1, 1])).shape == (3, 5, 7)
    with pytest.raises(ValueError, match="at least 4x4"):
        GANConfig(3, 8, 2)


@pytest.mark.parametrize("n_classes", [0, 10])
def test_every_discriminator_layer_is_spectrally_normalised(n_classes):
    d = make(28, 28, 2, n_classes).discriminator
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) == 5 + (1 if n_classes else 0)
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight")
        assert [type(p).__name__ for p in layer.parametrizations.weight] == ["_SpectralNorm"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    # After some power iterations (one per forward in train mode) every effective weight has spectral norm ~1.
    d.train()
    x, y = torch.rand(4, 1, 28, 28), (torch.arange(4) % n_classes if n_classes else None)
    for _ in range(30):
        d(x, y)
    d.eval()
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("n_classes", [0, 3])
def test_sampling_is_reproducible_by_seed(n_classes):
    gan = make(n_classes=n_classes)
    labels = torch.tensor([0, 1, 2, 0, 1]) if n_classes else None
    a = gan.sample(5, labels, torch.Generator().manual_seed(7))
    b = gan.sample(5, labels, torch.Generator().manual_seed(7))
    c = gan.sample(5, labels, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_is_in_eval_mode_and_restores_the_mode():
    gan = make()
    gan.train()
    alone = gan.sample(1, generator=torch.Generator().manual_seed(0))
    assert gan.generator.training
    # BatchNorm's running statistics: an image does not depend on the batch it was drawn in.
    z = torch.cat([gan.generator.noise(1, torch.Generator().manual_seed(0)), torch.randn(3, 8)])
    gan.eval()
    with torch.no_grad():
        assert torch.equal(to_levels(gan.generator(z[:1]), 17), alone)
        assert torch.equal(to_levels(gan.generator(z), 17)[:1], alone)


def randomise_class_norms(gan: GAN) -> GAN:
    """Conditional BatchNorm starts with the same gain (1) and bias (0) for every class: move them, as training
    does, so that the labels matter; and widen the untrained output (all close to 1/2, one grey level) so that
    they show in the grey levels."""
    torch.manual_seed(1)
    with torch.no_grad():
        for norm in gan.generator.norms:
            norm.gain.weight.normal_(1, 0.3)
            norm.bias.weight.normal_(0, 0.3)
        gan.generator.out.weight.mul_(30)
    return gan


def test_different_labels_give_different_images():
    gan = randomise_class_norms(make(n_classes=10)).eval()
    z = torch.randn(4, 8)
    with torch.no_grad():
        outputs = [gan.generator(z, torch.full((4,), y)) for y in range(10)]
    assert all((outputs[0] - outputs[y]).abs().max() > 0.01 for y in range(1, 10))
    images = [gan.sample(4, torch.full((4,), y), torch.Generator().manual_seed(0)) for y in range(10)]
    for y in range(1, 10):
        assert not torch.equal(images[0], images[y])
    # The same label and seed give the same images, whatever the other rows' labels.
    mixed = gan.sample(4, torch.tensor([3, 3, 5, 5]), torch.Generator().manual_seed(0))
    assert torch.equal(mixed[:2], images[3][:2]) and torch.equal(mixed[2:], images[5][2:])


def test_labels_drawn_from_the_class_prior_when_none_given():
    gan = make(n_classes=4)
    gan.set_class_prior(torch.tensor([2, 2, 2, 3]))
    assert gan.generator.class_log_prior.exp().tolist() == pytest.approx([0, 0, 0.75, 0.25])
    drawn = gan.generator.draw_labels(2000, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {2, 3} and (drawn == 2).float().mean().item() == pytest.approx(0.75, abs=0.04)
    # sample(n, None, g) is sample(n, draw_labels(n, g), g) on one generator.
    a = gan.sample(6, None, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    b = gan.sample(6, gan.generator.draw_labels(6, g), g)
    assert torch.equal(a, b)


def test_labels_are_checked():
    with pytest.raises(ValueError, match="class-conditional: give labels"):
        make(n_classes=3).generator(torch.randn(2, 8))
    with pytest.raises(ValueError, match="not class-conditional"):
        make().sample(2, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"within \[0, 3\)"):
        make(n_classes=3).sample(2, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="not class-conditional"):
        make().generator.draw_labels(2)


def test_a_gan_has_no_density():
    gan = make(n_classes=3)
    for module in (gan, gan.generator, gan.discriminator):
        assert not hasattr(module, "log_prob")
        assert not hasattr(module, "score")


@pytest.mark.parametrize("levels", [2, 17])
@pytest.mark.parametrize("noise", [0.0, 0.5, 1.0])
def test_real_images_scaled_to_unit_and_rounded_back(levels, noise):
    x = torch.randint(levels, (50, 8, 8), generator=torch.Generator().manual_seed(0))
    v = unit_images(x, levels, noise, torch.Generator().manual_seed(1))
    assert v.shape == (50, 1, 8, 8) and v.min() >= 0 and v.max() <= 1
    assert torch.equal(to_levels(v, levels), x)
    if noise:
        assert not torch.equal(v, unit_images(x, levels))
        assert (v - unit_images(x, levels)).abs().max() <= noise / (2 * (levels - 1)) + 1e-6
    else:
        assert torch.equal(v[:, 0] * (levels - 1), x.float())
    with pytest.raises(ValueError, match="noise"):
        unit_images(x, levels, 1.5)


@pytest.mark.parametrize("n_classes", [0, 10])
def test_the_generator_rebuilt_from_config_and_weights_samples_the_same(n_classes):
    gan = make(28, 28, 2, n_classes)
    if n_classes:
        randomise_class_norms(gan)
        gan.set_class_prior(torch.arange(10).repeat_interleave(torch.arange(1, 11)))
    # Move BatchNorm's running statistics away from their initial values, as training does.
    gan.train()
    with torch.no_grad():
        gan.generator(torch.randn(16, 8), torch.arange(16) % 10 if n_classes else None)
    config = json.loads(json.dumps(gan.config.to_dict()))
    assert GANConfig.from_dict(config) == gan.config
    data = art.module_weights(gan.generator)
    rebuilt = build_generator(config)
    art.load_module_weights(rebuilt, data)
    assert isinstance(rebuilt, Generator)
    before = gan.sample(8, None, torch.Generator().manual_seed(3))
    after = rebuilt.sample(8, None, torch.Generator().manual_seed(3))
    assert torch.equal(before, after)
    assert torch.equal(gan.generator_state()["class_log_prior"], rebuilt.class_log_prior)
    # The discriminator's weights do not fit the generator.
    with pytest.raises(art.ArtifactError, match="does not fit"):
        art.load_module_weights(build_generator(config), art.module_weights(gan.discriminator))
    assert isinstance(gan.discriminator, Discriminator)


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="no fields"):
        GANConfig.from_dict({"height": 8, "width": 8, "levels": 2, "hidden": 3})
    with pytest.raises(ValueError, match="channels"):
        GANConfig(8, 8, 2, channels=0)
