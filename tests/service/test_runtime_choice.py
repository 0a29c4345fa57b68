"""Choosing the scoring runtime: 'auto' times torch and ONNX Runtime at load and keeps the faster, the same
rule for density and image models; 'torch' and 'onnx' are obeyed as asked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import Calibration
from genserve.models.gmm import GaussianMixture, GMMConfig
from genserve.service.image_runtime import load_image_model
from genserve.service.records_runtime import load_model
from genserve.service.runtime_choice import PROBE_BATCHES, RuntimeChoice, choose_faster, needs_reload
from genserve.training.onnx_export import export_onnx
from tests.service.test_image_runtime import random_fvsbn
from tests.service.test_image_runtime import write as write_image

torch.set_num_threads(1)


def random_gmm(d: int = 3, k: int = 2, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    model = GaussianMixture(GMMConfig(d, k, "full"))
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    model.set_parameters(torch.full((k,), 1.0 / k, dtype=torch.float64), torch.randn(k, d, generator=g,
                         dtype=torch.float64), a @ a.transpose(-1, -2) + torch.eye(d, dtype=torch.float64))
    return model.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def gmm_path(store) -> str:
    model = random_gmm()
    files = {art.WEIGHTS: art.module_weights(model),
             art.CALIBRATION: json.dumps(Calibration.fit(np.arange(10.0)).to_dict()).encode(),
             art.ONNX: export_onnx(model, torch.zeros(4, 3, dtype=torch.float64), "records", ["log_prob", "resp"])}
    return str(art.write_artifact(store, kind="gmm", name="mix", config=model.config.to_dict(),
                                  input_spec=art.InputSpec(n_features=3, feature_names=["a", "b", "c"]),
                                  training={}, metrics={}, files=files))


@pytest.fixture(scope="module")
def image_path(store) -> str:
    return write_image(store, "img", random_fvsbn(4, 3, 5, 3), onnx=True)


def faster(choice: RuntimeChoice) -> str:
    return min(choice.seconds, key=lambda name: sum(choice.seconds[name].values()))


def test_auto_times_both_and_serves_the_faster(gmm_path, image_path) -> None:
    for loaded in (load_model(gmm_path, "auto", device="cpu"), load_image_model(image_path, "auto", device="cpu")):
        choice = loaded.choice
        assert choice.requested == "auto" and choice.runtime == loaded.runtime.name
        assert set(choice.seconds) == {"torch", "onnx"}
        for seconds in choice.seconds.values():
            assert set(seconds) == {str(b) for b in PROBE_BATCHES} and all(s > 0 for s in seconds.values())
        assert choice.runtime == faster(choice) and "lower total" in choice.rule
        assert json.loads(json.dumps(choice.as_dict())) == choice.as_dict()  # what info() sends


def test_explicit_runtimes_are_obeyed_without_timing(gmm_path, image_path) -> None:
    for name in ("torch", "onnx"):
        for loaded in (load_model(gmm_path, name, device="cpu"), load_image_model(image_path, name, device="cpu")):
            assert loaded.runtime.name == name
            assert loaded.choice.requested == name and loaded.choice.seconds == {}
    with pytest.raises(ValueError, match="unknown runtime"):
        load_image_model(image_path, "tensorrt", device="cpu")


class Fake:
    def __init__(self, seconds: float, offset: float = 0.0):
        self.seconds, self.offset = seconds, offset

    def score(self, batch: int) -> tuple[np.ndarray]:
        # a busy wait, not sleep: a loaded machine oversleeps, and the test would see the wrong order
        import time

        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return (np.arange(batch, dtype=np.float64) + self.offset,)


def test_choose_faster_picks_the_lower_total_and_checks_agreement() -> None:
    choice = choose_faster({"slow": Fake(0.004), "fast": Fake(0.0)}, lambda rt, b: rt.score(b), repeats=2)
    assert choice.runtime == "fast" == faster(choice)
    assert choice.seconds["slow"]["1"] >= 0.004 > choice.seconds["fast"]["1"]
    with pytest.raises(RuntimeError, match="disagree"):
        choose_faster({"a": Fake(0.0), "b": Fake(0.0, offset=1.0)}, lambda rt, b: rt.score(b))


def test_reconfiguring_reloads_only_when_the_runtime_changes() -> None:
    auto = RuntimeChoice(requested="auto", runtime="onnx", seconds={"torch": {"1": 2.0}, "onnx": {"1": 1.0}})
    asked = RuntimeChoice(requested="torch", runtime="torch")
    assert not needs_reload("auto", auto) and not needs_reload("onnx", auto) and needs_reload("torch", auto)
    assert needs_reload("auto", asked) and not needs_reload("torch", asked) and needs_reload("onnx", asked)
    assert needs_reload("auto", None)
