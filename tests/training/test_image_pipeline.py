import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import CalibrationSet
from genserve.models.registry import build_image_model
from genserve.training.image_data import load_digits
from genserve.training.image_pipeline import ImageTrainConfig, train_image

torch.set_num_threads(1)


@pytest.mark.parametrize("conditional", [False, True])
def test_train_fvsbn_on_digits_writes_a_complete_artifact(tmp_path, conditional):
    cfg = ImageTrainConfig(model="fvsbn", dataset="digits", name="d", conditional=conditional, preset="tiny",
                           epochs=2, threads=1, grid_size=2, sample_every=1)
    path = train_image(cfg, tmp_path, progress=False)
    loaded = art.load_artifact(path)
    m = loaded.manifest
    assert m.kind == "fvsbn" and m.input.type == "image"
    assert (m.input.height, m.input.width, m.input.levels) == (8, 8, 17)
    assert m.input.n_classes == (10 if conditional else 0)
    assert {art.WEIGHTS, art.ONNX, art.CALIBRATION, art.SAMPLES_PNG, "loss_curve.png"} <= set(m.files)
    assert m.metrics["onnx_max_abs_error"] <= 1e-4
    assert m.metrics["test_bits_per_dim"] == pytest.approx(m.metrics["test_nll_nats"] / (64 * np.log(2)))

    # The reported test NLL is the rebuilt model's, on the documented split.
    model = build_image_model(m.kind, m.config)
    art.load_module_weights(model, loaded.contents[art.WEIGHTS])
    test = load_digits().test
    with torch.no_grad():
        lp = model.eval().log_prob(torch.from_numpy(test.images))
    assert -lp.double().mean().item() == pytest.approx(m.metrics["test_nll_nats"], rel=1e-5)
    if conditional:
        assert m.metrics["test_given_label_nll_nats"] < m.metrics["test_nll_nats"]
        prior = model.class_log_prior.exp()
        assert prior.sum().item() == pytest.approx(1.0, abs=1e-5) and (prior > 0.05).all()

    # An untrained model does worse than the trained one: training happened.
    fresh = build_image_model(m.kind, m.config)
    with torch.no_grad():
        assert -fresh.log_prob(torch.from_numpy(test.images)).mean().item() > m.metrics["test_nll_nats"]

    cals = CalibrationSet.from_dict(loaded.json(art.CALIBRATION))
    assert sorted(cals.names()) == sorted(["bits_per_dim", "complexity", "ensemble", "knn", "likelihood_ratio",
                                           "mahalanobis", "nll", "typicality",
                                           *(["class_entropy", "class_evidence"] if conditional else [])])
    cal = cals.get("nll")
    assert cal.score == "nll" and cal.n == len(load_digits().validation.images)
    grid = Image.open(io.BytesIO(loaded.contents[art.SAMPLES_PNG]))
    assert grid.mode == "L" and grid.size[0] > 16
    assert (tmp_path / ".training" / "d" / "samples-epoch-001.png").is_file()
    log = json.loads(loaded.contents["training_log.json"])
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and 1 <= m.metrics["best_epoch"] <= 2


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown image model"):
        train_image(ImageTrainConfig(model="gan", dataset="digits", name="x"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown image dataset"):
        train_image(ImageTrainConfig(model="fvsbn", dataset="cifar", name="x"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no architecture fields"):
        train_image(ImageTrainConfig(model="fvsbn", dataset="digits", name="x", architecture={"width": 3}),
                    tmp_path, progress=False)


@pytest.mark.parametrize("preset", ["tiny", "default", "gpu"])
def test_every_preset_builds_every_model(preset):
    from genserve.training.image_data import DATASETS
    from genserve.training.image_pipeline import PRESETS

    for dataset in DATASETS:
        shape = {"mnist5k": (28, 28, 2), "digits": (8, 8, 17)}[dataset]
        for kind in ("pixelcnn", "made", "nade", "fvsbn"):
            cfg = ImageTrainConfig(model=kind, dataset=dataset, name="x", preset=preset).resolved()
            assert cfg.epochs == PRESETS[preset][dataset][kind]["epochs"]
            config = {"height": shape[0], "width": shape[1], "levels": shape[2], "n_classes": 10, **cfg.architecture}
            assert sum(p.numel() for p in build_image_model(kind, config).parameters()) > 0


def test_an_image_run_stopped_and_resumed_ends_with_the_weights_of_one_straight_run(tmp_path):
    from safetensors.torch import load as load_safetensors

    settings = dict(model="made", dataset="digits", name="m", preset="tiny", max_train_images=320, threads=1,
                    export_onnx=False, sample_every=0)
    straight = train_image(ImageTrainConfig(**settings, epochs=2), tmp_path / "a", progress=False)
    # Stopped after the first of two epochs (the schedule says two), then resumed from the epoch's checkpoint.
    train_image(ImageTrainConfig(**settings, epochs=1, schedule_epochs=2), tmp_path / "b", progress=False)
    checkpoint = tmp_path / "b" / ".checkpoints" / "m"
    assert json.loads((checkpoint / "state.json").read_text())["epoch"] == 1
    resumed = train_image(ImageTrainConfig(**settings, epochs=2, resume=True), tmp_path / "b", progress=False)
    a, b = (load_safetensors((p / "weights.safetensors").read_bytes()) for p in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = json.loads((resumed / "training_log.json").read_text())
    assert log["resumed_at"] == [1] and [e["epoch"] for e in log["epochs"]] == [1, 2]
    with pytest.raises(ValueError, match=r"learning_rate \(checkpoint 0.003, now 0.01\)"):
        train_image(ImageTrainConfig(**settings, epochs=2, learning_rate=1e-2, resume=True), tmp_path / "b",
                    progress=False)
