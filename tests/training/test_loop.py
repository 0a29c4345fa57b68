"""training/loop.py: the run every family shares and the fitting pieces the families have in common."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from genserve.artifacts.families import GMM_KIND, LATENT_KINDS, RECORDS_KINDS, family_of
from genserve.training.gan_pipeline import GANRun
from genserve.training.image_flow_pipeline import ImageFlowRun
from genserve.training.loop import (
    BestEpoch,
    Fitted,
    comparable_settings,
    cosine_decay,
    refuse_other_settings,
    run_family,
)
from genserve.training.records_pipeline import KINDS as GRADIENT_RECORDS_KINDS
from genserve.training.text_pipeline import TextTrainConfig
from genserve.training.vae_pipeline import VAERun


class Recording:
    """A family whose pieces record the order they are called in."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.module = nn.Linear(2, 2)

    def prepare(self) -> None:
        self.calls.append("prepare")

    def fit(self) -> Fitted:
        self.calls.append("fit")
        self.module.train()
        return Fitted(self.module, {"train": []}, 1.5)

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        self.calls.append(f"evaluate (training={fitted.module.training})")
        return {"nll": 1.0}

    def calibrate(self, fitted: Fitted, metrics: dict[str, Any]) -> dict[str, bytes]:
        self.calls.append("calibrate")
        metrics["anomaly_thresholds"] = {}
        return {"calibration.json": b"{}"}

    def export(self, fitted: Fitted, metrics: dict[str, Any], files: dict[str, bytes]) -> Path:
        self.calls.append(f"export {sorted(metrics)} {sorted(files)}")
        return Path("artifact")


def test_run_calls_the_pieces_in_order_and_evaluates_in_eval_mode():
    family = Recording()
    assert run_family(family) == Path("artifact")
    assert family.calls == ["prepare", "fit", "evaluate (training=False)", "calibrate",
                            "export ['anomaly_thresholds', 'nll'] ['calibration.json']"]


def test_best_epoch_keeps_the_lowest_value_and_its_weights():
    model, history = nn.Linear(1, 1), {"best_epoch": 0}
    best = BestEpoch(history)
    for epoch, value in enumerate([3.0, 2.0, math.nan, 2.5], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        best.offer(model, epoch, value)
    assert history["best_epoch"] == 2 and best.value == 2.0  # NaN never beats anything
    assert best.stale(4, patience=2) and not best.stale(3, patience=2) and not best.stale(4, patience=0)
    best.restore(model)
    assert model.weight.item() == 2.0


def test_best_epoch_maximising_and_keeping_the_first():
    model, history = nn.Linear(1, 1), {"best_epoch": 0}
    best = BestEpoch(history, maximise=True, keep_first=True)
    best.offer(model, 1, -math.inf)  # no better than the start, but kept: the run ends with weights
    assert history["best_epoch"] == 1 and best.state is not None
    best.offer(model, 2, -5.0)
    best.offer(model, 3, -7.0)
    assert history["best_epoch"] == 2
    assert BestEpoch({"best_epoch": 0}).state is None  # without keep_first, nothing until a value beats infinity


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine_decay_reaches_its_floor_and_stays(floor):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = cosine_decay(optimizer, total_steps=4, floor=floor)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(2.0)
    assert rates[2] == pytest.approx(2.0 * (floor + (1 - floor) / 2))
    assert rates[4] == rates[5] == pytest.approx(2.0 * floor)


def test_a_resume_with_other_settings_is_refused_naming_them():
    cfg = TextTrainConfig(name="x", learning_rate=1e-3, max_iters=5)
    saved = comparable_settings(cfg, frozenset({"max_iters"}))
    assert "max_iters" not in saved and saved["learning_rate"] == 1e-3
    refuse_other_settings("x", saved, comparable_settings(TextTrainConfig(name="x", learning_rate=1e-3, max_iters=9),
                                                          frozenset({"max_iters"})))
    now = comparable_settings(TextTrainConfig(name="x", learning_rate=3e-3), frozenset({"max_iters"}))
    with pytest.raises(ValueError, match=r"in learning_rate \(checkpoint 0.001, now 0.003\)\. Run with"):
        refuse_other_settings("x", saved, now)


def test_every_run_writes_a_kind_of_the_families_table():
    for run_class in (VAERun, ImageFlowRun, GANRun):
        assert run_class.kind in LATENT_KINDS and family_of(run_class.kind, "image").name == "latent"
    assert {*GRADIENT_RECORDS_KINDS, GMM_KIND} == set(RECORDS_KINDS)
