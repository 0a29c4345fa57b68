import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from genserve.artifacts import artifact as art
from genserve.models.gan import Discriminator, GANConfig, build_generator
from genserve.training.gan_pipeline import DISCRIMINATOR_WEIGHTS, PRESETS, GANTrainConfig, sample_grid, train_gan
from genserve.training.image_data import DATASETS, load_digits
from genserve.training.reporting import LOSS_CURVE, TRAINING_LOG

torch.set_num_threads(1)


@pytest.mark.parametrize("conditional", [False, True])
def test_a_tiny_run_on_digits_writes_a_complete_artifact(tmp_path, conditional):
    cfg = GANTrainConfig(dataset="digits", name="g", conditional=conditional, preset="tiny", epochs=2, threads=1,
                         grid_size=2, sample_every=1, quality_samples=200)
    path = train_gan(cfg, tmp_path, progress=False)
    loaded = art.load_artifact(path)  # checks every file's sha256
    m = loaded.manifest
    assert m.kind == "gan" and m.density == "none" and m.input.type == "image"
    assert (m.input.height, m.input.width, m.input.levels) == (8, 8, 17)
    assert m.input.n_classes == (10 if conditional else 0)
    assert m.input.class_names == ([str(c) for c in range(10)] if conditional else None)
    assert set(m.files) == {art.WEIGHTS, DISCRIMINATOR_WEIGHTS, art.SAMPLES_PNG, LOSS_CURVE, TRAINING_LOG}
    assert m.config == GANConfig(8, 8, 17, 10 if conditional else 0, latent_dim=16, channels=8).to_dict()

    # The served weights are the generator's alone; rebuilt from the manifest, it draws the artifact's grid.
    generator = build_generator(m.config)
    art.load_module_weights(generator, loaded.contents[art.WEIGHTS])
    assert sample_grid(generator.eval(), cfg.resolved()) == loaded.contents[art.SAMPLES_PNG]
    assert (tmp_path / ".training" / "g" / art.SAMPLES_PNG).read_bytes() == loaded.contents[art.SAMPLES_PNG]
    grid = Image.open(io.BytesIO(loaded.contents[art.SAMPLES_PNG]))
    columns = 10 if conditional else 2
    assert grid.mode == "L" and grid.size == (columns * (8 * 10 + 2) + 2, 2 * (8 * 10 + 2) + 2)
    discriminator = Discriminator(m.config)
    art.load_module_weights(discriminator, loaded.contents[DISCRIMINATOR_WEIGHTS])
    if conditional:
        prior = generator.class_log_prior.exp()
        counts = np.bincount(load_digits().train.labels, minlength=10)
        assert prior.numpy() == pytest.approx(counts / counts.sum(), abs=1e-6)
    assert m.metrics["parameters_generator"] == sum(p.numel() for p in generator.parameters())
    assert m.metrics["parameters_discriminator"] == sum(p.numel() for p in discriminator.parameters())

    # The losses are recorded per step and per epoch.
    log = json.loads(loaded.contents[TRAINING_LOG])
    steps_per_epoch = len(load_digits().train.images) // 32
    steps = log["steps"]
    assert steps["step"] == list(range(1, 2 * steps_per_epoch + 1)) == list(range(1, m.metrics["steps"] + 1))
    for key in ("generator_loss", "discriminator_loss"):
        assert len(steps[key]) == 2 * steps_per_epoch and all(math.isfinite(v) and v > 0 for v in steps[key])
    for key in ("d_real", "d_fake"):
        assert all(0 <= v <= 1 for v in steps[key])
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    last = slice(steps_per_epoch, None)
    assert m.metrics["final_generator_loss"] == pytest.approx(np.mean(steps["generator_loss"][last]))
    assert m.metrics["final_discriminator_loss"] == pytest.approx(np.mean(steps["discriminator_loss"][last]))
    assert Image.open(io.BytesIO(loaded.contents[LOSS_CURVE])).format == "PNG"
    assert (tmp_path / ".training" / "g" / "samples-epoch-001.png").is_file()
    assert not (tmp_path / ".training" / "g" / "samples-epoch-002.png").exists()  # the last grid is samples.png

    metrics = m.metrics
    assert metrics["quality_samples"] == 200 and metrics["training_seconds"] > 0
    assert 0 <= metrics["sample_mean_image_l1"] <= 1 and 0 < metrics["train_mean_image_l1"] < 0.05
    assert metrics["classifier_test_accuracy"] > 0.9
    assert sum(metrics["sample_class_fractions"]) == pytest.approx(1, abs=1e-3)
    assert 0 <= metrics["sample_class_entropy_bits"] <= math.log2(10) + 1e-9
    assert 0 < metrics["sample_pixel_std"] <= 0.5 and 0.2 < metrics["test_pixel_std"] < 0.3
    assert ("label_agreement" in metrics) == ("sample_within_class_pixel_std" in metrics) == conditional
    if conditional:
        assert 0 <= metrics["label_agreement"] <= 1
        assert 0 < metrics["sample_within_class_pixel_std"] <= metrics["sample_pixel_std"]
        assert 0.1 < metrics["test_within_class_pixel_std"] < metrics["test_pixel_std"]
        # The trained generator's labels matter: with the same seed, each class draws other images.
        images = [generator.sample(4, torch.full((4,), y), torch.Generator().manual_seed(0)) for y in range(10)]
        assert all(not torch.equal(images[0], images[y]) for y in range(1, 10))

    # A changed file is caught by its hash.
    (path / DISCRIMINATOR_WEIGHTS).write_bytes(b"not the discriminator")
    with pytest.raises(art.ArtifactError, match="sha256"):
        art.load_artifact(path)


def test_a_run_is_reproducible_from_its_seed(tmp_path):
    settings = dict(dataset="digits", name="r", preset="tiny", max_train_images=320, threads=1, sample_every=0,
                    quality_samples=50)
    a, b = (train_gan(GANTrainConfig(**settings), tmp_path / d, progress=False) for d in "ab")
    c = train_gan(GANTrainConfig(**settings, seed=1), tmp_path / "c", progress=False)
    wa, wb, wc = (load_safetensors((p / art.WEIGHTS).read_bytes()) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_bad_settings_are_named(tmp_path):
    def run(**kw):
        train_gan(GANTrainConfig(**{"dataset": "digits", "name": "x", "preset": "tiny", **kw}), tmp_path,
                  progress=False)

    with pytest.raises(ValueError, match="unknown image dataset"):
        run(dataset="cifar")
    with pytest.raises(ValueError, match="unknown preset"):
        run(preset="huge")
    with pytest.raises(ValueError, match="no architecture fields"):
        run(architecture={"hidden": 3})
    with pytest.raises(ValueError, match="exclude_classes is for unconditional"):
        run(conditional=True, exclude_classes=[3])
    with pytest.raises(ValueError, match="dequantise"):
        run(dequantise=2.0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        run(max_train_images=10)
    with pytest.raises(ValueError, match="invalid model name"):
        run(name="Bad Name")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds(preset):
    for dataset in DATASETS:
        shape = {"mnist5k": (28, 28, 2), "digits": (8, 8, 17)}[dataset]
        cfg = GANTrainConfig(dataset=dataset, name="x", preset=preset).resolved()
        assert cfg.epochs == PRESETS[preset][dataset]["epochs"] and cfg.betas == (0.5, 0.999)
        assert cfg.d_learning_rate == cfg.learning_rate
        config = GANConfig(*shape, n_classes=10, **cfg.architecture)
        assert sum(p.numel() for p in build_generator(config).parameters()) > 0
