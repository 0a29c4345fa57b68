"""In-process anomaly scoring (service/local.py) on artifacts from the real training pipelines: calibration
holds on fresh in-distribution data, every score type is computed as defined, bad input is a ServiceError."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from genserve.artifacts.scores import CLASS_SCORES, SCORE_TYPES, class_evidence_scores, png_bits
from genserve.service.errors import ServiceError
from genserve.service.local import LocalScorer
from genserve.training.data import Tabular
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from genserve.training.image_data import load_digits
from genserve.training.image_pipeline import ImageTrainConfig, train_image
from genserve.training.text_pipeline import TextTrainConfig, train_text

MEANS = np.array([[0.0, 0.0, 0.0, 0.0], [4.0, -2.0, 1.0, 3.0]])
SCALES = np.array([[1.0, 0.5, 2.0, 1.0], [0.7, 1.5, 1.0, 0.3]])


def mixture(n: int, seed: int) -> np.ndarray:
    """Records from a known two-component Gaussian mixture in 4 dimensions."""
    rng = np.random.default_rng(seed)
    k = rng.random(n) < 0.3
    return np.where(k[:, None], MEANS[1], MEANS[0]) + rng.normal(size=(n, 4)) * np.where(k[:, None], SCALES[1],
                                                                                        SCALES[0])


@pytest.fixture(scope="module")
def gmm(tmp_path_factory) -> LocalScorer:
    torch.set_num_threads(1)
    store = tmp_path_factory.mktemp("store")
    data = Tabular(mixture(30_000, seed=0), ["a", "b", "c", "d"], "synthetic mixture")
    cfg = GMMTrainConfig(dataset="-", name="mix", components=2, n_init=1, validation_fraction=0.3,
                         export_onnx=False)
    train_gmm(cfg, store, progress=False, data=data)
    return LocalScorer.from_store(store, "mix")


def test_underflowing_records_score_finite_and_flagged(gmm):
    """As served (service.isolation.finite_log_probs): a record whose density underflows float64 gets log p =
    -1e300, not -inf (which JSON and the file scorer's CSV cannot hold), uniform responsibilities, and a flag."""
    res = gmm.anomaly(records=[[1e300, -1e300, 1e300, 1e300], [0.0, 0.0, 0.0, 0.0]], score="nll")
    far, near = res.results
    assert far.log_prob == -1e300 and far.is_anomaly and math.isfinite(far.score)
    assert far.responsibility == pytest.approx(0.5) and not near.is_anomaly
    assert all(np.isfinite(v).all() for v in gmm.scores(records=[[1e300] * 4]).values())


@pytest.mark.parametrize("score", SCORE_TYPES["records"])
def test_fresh_normal_records_are_flagged_at_the_requested_rate(gmm, score):
    # 9,000 held-out records calibrate each score; 50,000 fresh records from the same distribution are then
    # flagged at the requested rate within a few standard errors of the calibration and of the count.
    # One scoring pass (knn searches 20,000 stored records for each of the 50,000): flags at 0.2 from the call,
    # at 0.01 and 0.05 from the calibration's thresholds applied to the same scores.
    fresh = mixture(50_000, seed=1)
    res = gmm.anomaly(records=fresh, score=score, false_positive_rate=0.2)
    assert res.score_type == score and res.false_positive_rate == 0.2
    scores = np.array([r.score for r in res.results])
    assert [r.is_anomaly for r in res.results] == (scores > res.threshold).tolist()
    for fpr in (0.01, 0.05, 0.2):
        rate = np.mean(scores > gmm.calibrations.get(score).threshold_for(fpr))
        sd = math.sqrt(fpr * (1 - fpr) / 9_000) + math.sqrt(fpr * (1 - fpr) / 50_000)
        assert abs(rate - fpr) < 3.5 * sd, (score, fpr, rate)
    default = gmm.anomaly(records=fresh[:1000], score=score)
    assert default.false_positive_rate == 0.01
    # Far outside both components: flagged by every score.
    assert all(r.is_anomaly for r in gmm.anomaly(records=[[20.0, 20.0, -20.0, 20.0]], score=score).results)


def test_gmm_reports_component_and_responsibility(gmm):
    res = gmm.anomaly(records=[MEANS[0], MEANS[1]])
    comps = [r.component for r in res.results]
    assert sorted(comps) == [0, 1] and all(r.responsibility > 0.99 for r in res.results)
    raw = gmm.scores(records=[MEANS[0]])
    assert set(raw) == {"nll", "bits_per_dim", "likelihood_ratio", "knn", "typicality", "ensemble", "log_prob"}
    assert raw["bits_per_dim"][0] == pytest.approx(raw["nll"][0] / (4 * math.log(2)))
    with pytest.raises(ServiceError, match="score 'complexity' is not available for models of records"):
        gmm.anomaly(records=[MEANS[0]], score="complexity")
    with pytest.raises(ServiceError, match=r"records must be \(N, 4\)"):
        gmm.anomaly(records=[[1.0, 2.0]])
    with pytest.raises(ServiceError, match="takes records, not texts"):
        gmm.anomaly(texts=["hello"])


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> LocalScorer:
    store = tmp_path_factory.mktemp("images")
    cfg = ImageTrainConfig(model="fvsbn", dataset="digits", name="d", preset="tiny", epochs=3, export_onnx=False,
                           threads=1, sample_every=0, grid_size=2)
    train_image(cfg, store, progress=False)
    return LocalScorer.from_store(store, "d")


def test_image_scores_and_calibration(digits_model):
    data = load_digits()
    raw = digits_model.scores(images=data.test.images)
    assert set(raw) == {"nll", "bits_per_dim", "complexity", "likelihood_ratio", "knn", "mahalanobis", "typicality",
                        "ensemble", "log_prob"}
    np.testing.assert_allclose(raw["complexity"], raw["nll"] / math.log(2) - png_bits(data.test.images, 17))
    ref = digits_model.reference.log_prob(torch.from_numpy(data.test.images)).numpy()
    np.testing.assert_allclose(raw["likelihood_ratio"], ref + raw["nll"])
    cals = digits_model.calibrations
    np.testing.assert_allclose(raw["typicality"], np.abs(raw["nll"] - cals.typical_nll))
    primary = cals.primary()  # the distances, or the one the leave-a-class-out rehearsal chose
    assert primary and set(primary) <= {"knn", "mahalanobis"} and set(primary) <= set(cals.members)
    np.testing.assert_allclose(raw["ensemble"], np.mean([cals.get(m).tail(raw[m]) for m in primary], axis=0) + sum(
        np.maximum(cals.get(m).tail(raw[m]) - math.log(100), 0) for m in cals.members if m not in primary))
    assert cals.default == "ensemble" and digits_model.anomaly(images=data.test.images[:3]).score_type == "ensemble"
    for score in CLASS_SCORES:  # an unconditional model has no classes to compare
        with pytest.raises(ServiceError, match="needs a class-conditional image model"):
            digits_model.anomaly(images=data.test.images[:2], score=score)
    for score in set(SCORE_TYPES["image"]) - set(CLASS_SCORES):
        # 180 test digits against a calibration on 179 validation digits: about 20% flagged at fpr 0.2.
        rate = np.mean([r.is_anomaly for r in digits_model.anomaly(images=data.test.images, score=score,
                                                                     false_positive_rate=0.2).results])
        assert 0.08 < rate < 0.35, (score, rate)
    # The complexity trap: a blank image is likely under the model, yet complexity flags it.
    blank = np.zeros((1, 8, 8), dtype=np.int64)
    assert digits_model.anomaly(images=blank, score="complexity").results[0].is_anomaly
    with pytest.raises(ServiceError, match="per_line is for text models"):
        digits_model.anomaly(images=blank, per_line=True)


@pytest.fixture(scope="module")
def conditional_digits(tmp_path_factory) -> tuple[LocalScorer, LocalScorer]:
    """A class-conditional FVSBN of the digits without digit 3, in torch and in ONNX Runtime."""
    store = tmp_path_factory.mktemp("conditional")
    cfg = ImageTrainConfig(model="fvsbn", dataset="digits", name="c", conditional=True, exclude_classes=[3],
                           preset="tiny", epochs=6, threads=1, sample_every=0, grid_size=2)
    train_image(cfg, store, progress=False)
    return (LocalScorer.from_store(store, "c", runtime="torch", device="cpu"),
            LocalScorer.from_store(store, "c", runtime="onnx", device="cpu"))


def test_class_evidence_scores_of_a_conditional_model(conditional_digits):
    scorer, onnx = conditional_digits
    assert scorer.manifest.input.n_classes == 9 and "3" not in scorer.manifest.input.class_names
    data = load_digits()
    test = data.test
    raw = scorer.scores(images=test.images)
    module = scorer._model.module
    with torch.no_grad():  # the definition, from the model's own per-class log-likelihoods
        cond = module.class_log_probs(torch.from_numpy(test.images)).double().numpy()
    want = class_evidence_scores(cond, module.class_log_prior.double().numpy())
    for score in CLASS_SCORES:
        np.testing.assert_allclose(raw[score], want[score], rtol=1e-9)
        np.testing.assert_allclose(onnx.scores(images=test.images)[score], raw[score], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(raw["class_evidence"], -cond.max(1))
    # p(y*) p(x | y*) <= p(x) = sum_y p(y) p(x | y) <= p(x | y*), y* the best class
    lowest_prior = module.class_log_prior.double().numpy().min()
    assert (raw["class_evidence"] <= raw["nll"] + 1e-6).all()
    assert (raw["nll"] <= raw["class_evidence"] - lowest_prior + 1e-6).all()
    normal = test.labels != 3
    # Calibrated on the validation split of the nine seen classes: ~20% of their test digits flagged at 0.2.
    for score in CLASS_SCORES:
        rate = np.mean([r.is_anomaly for r in scorer.anomaly(images=test.images[normal], score=score,
                                                             false_positive_rate=0.2).results])
        assert 0.08 < rate < 0.35, (score, rate)
    # The unseen digit 3 is claimed by no class as firmly as a seen digit is by its own.
    assert np.median(raw["class_entropy"][~normal]) > np.median(raw["class_entropy"][normal])
    assert "class_entropy" in scorer.calibrations.names()


GRAMMAR = (["the cat", "a dog", "my lord", "the king"], ["sees", "loves", "finds"], ["the moon", "a rose", "the sea"])


def grammar_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for words in GRAMMAR) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> LocalScorer:
    corpus = tmp_path_factory.mktemp("corpus") / "grammar.txt"
    paragraphs = ["\n".join(grammar_lines(4, seed)) for seed in range(300)]
    corpus.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    store = tmp_path_factory.mktemp("text")
    train_text(TextTrainConfig(name="g", dataset=str(corpus), model="ngram", preset="tiny", order=4), store,
               progress=False)
    return LocalScorer.from_store(store, "g")


def test_text_scores_whole_and_per_line(text_model):
    normal = "\n".join(grammar_lines(4, seed=1000))
    odd = "the cat sees the moon.\nkkkk eeee nnnn ssss tttt."  # known characters in an unknown order
    whole = text_model.anomaly(texts=[normal, odd])
    assert whole.score_type == text_model.calibrations.default == "ensemble"
    assert [r.is_anomaly for r in whole.results] == [False, True]
    assert text_model.calibrations.primary() == ["bits_per_char"] and "knn" not in text_model.calibrations.members
    lines = text_model.anomaly(texts=[normal, odd], per_line=True)
    assert [(r.text_index, r.line) for r in lines.results] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert [r.is_anomaly for r in lines.results] == [False] * 5 + [True]
    raw = text_model.scores(texts=["the cat sees the moon."])
    assert raw["bits_per_char"][0] == pytest.approx(-raw["log_prob"][0] / (22 * math.log(2)))
    # typicality: per token, around the held-out mean of whole texts, or of lines
    cals = text_model.calibrations
    assert raw["typicality"][0] == pytest.approx(abs(raw["bits_per_char"][0] - cals.typical()))
    per_line = text_model.scores(texts=["the cat sees the moon."], per_line=True)
    assert per_line["typicality"][0] == pytest.approx(abs(per_line["bits_per_char"][0] - cals.typical(True)))
    assert cals.typical() != cals.typical(True)
    tokenizer = text_model.tokenizer
    ids = tokenizer.encode("the cat sees the moon.")
    ref = text_model.reference.logits(torch.tensor([[tokenizer.bos_token_id, *ids[:-1]]]))[0].double()
    ref = ref.gather(1, torch.tensor(ids)[:, None]).sum().item()
    assert raw["likelihood_ratio"][0] == pytest.approx((ref - raw["log_prob"][0]) / (22 * math.log(2)))
    # Fresh lines of the grammar: flagged at about the requested rate (scores are discrete, so loosely).
    fresh = text_model.anomaly(texts=["\n".join(grammar_lines(400, seed=7))], per_line=True,
                               false_positive_rate=0.2)
    assert np.mean([r.is_anomaly for r in fresh.results]) < 0.35
    with pytest.raises(ServiceError, match="texts\\[0\\] is empty"):
        text_model.anomaly(texts=["  \n"])
    with pytest.raises(ServiceError, match="texts\\[0\\] line 2: 1 unknown character"):
        text_model.anomaly(texts=["the cat.\nthe cat!"], per_line=True)
