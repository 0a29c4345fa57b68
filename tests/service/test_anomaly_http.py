"""POST /v1/models/{name}/anomaly over real HTTP for every kind of model and score type: the served results
equal in-process scoring (service/local.py) of the same artifacts, and every bad request is a clear 4xx."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from genserve.artifacts.scores import CLASS_SCORES, DEFAULT_SCORE, SCORE_TYPES
from genserve.service.client import GenserveClient
from genserve.service.local import LocalScorer
from tests.service.conftest import (
    DIGITS_TRAIN,
    IMAGE_BIN,
    IMAGE_COND,
    REPLICATED,
    SINGLE,
    TEXT,
    TEXT_CONTEXT,
    TEXT_CORPUS,
    TEXT_NGRAM,
    TEXT_ONNX,
    Server,
    digits,
)

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

TEXTS = ["to be or not to be, that is the question.", "whether tis nobler in the mind to suffer\nto be or not",
         "qqqq ffff oooo mmmm"]


@pytest.fixture(scope="module")
def client(server: Server) -> GenserveClient:
    with GenserveClient(server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local(server: Server) -> dict[str, LocalScorer]:
    return {name: LocalScorer.from_store(server.store, name, runtime="torch", device="cpu")
            for name in (REPLICATED, IMAGE_COND, IMAGE_BIN, TEXT, TEXT_NGRAM)}


def post(server: Server, name: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{name}/anomaly", json=body, timeout=60)


def inputs(name: str) -> dict:
    if name == REPLICATED:
        x = load_breast_cancer().data[:6].copy()
        x[5, 0] *= 8
        return {"records": x.tolist()}
    if name == IMAGE_COND:
        images = digits()[0][DIGITS_TRAIN:DIGITS_TRAIN + 5]
        return {"images": [*images.tolist(), np.zeros((8, 8), int).tolist()]}
    if name == IMAGE_BIN:
        return {"images": digits(binary=True)[0][DIGITS_TRAIN:DIGITS_TRAIN + 5].tolist()}
    return {"texts": TEXTS}


CASES = [(name, kind, score) for name, kind in ((REPLICATED, "records"), (IMAGE_COND, "image"), (IMAGE_BIN, "image"),
                                                (TEXT, "text"), (TEXT_NGRAM, "text"))
         for score in (None, *SCORE_TYPES[kind])
         # an unconditional model has no class scores, an n-gram no hidden states for knn
         if not (name == IMAGE_BIN and score in CLASS_SCORES) and not (name == TEXT_NGRAM and score == "knn")]


@pytest.mark.parametrize(("name", "kind", "score"), CASES)
def test_every_score_type_over_http_equals_in_process(server, local, name, kind, score):
    body = {**inputs(name), **({} if score is None else {"score": score})}
    r = post(server, name, body)
    assert r.status_code == 200, r.text
    got = r.json()
    default = local[name].calibrations.default or DEFAULT_SCORE[kind]  # the artifact's own, else its kind's
    assert got["score_type"] == (score or default) and got["false_positive_rate"] == 0.01
    want = local[name].anomaly(**inputs(name), score=score)
    assert got["threshold"] == pytest.approx(want.threshold, rel=1e-9)
    np.testing.assert_allclose([x["score"] for x in got["results"]], [x.score for x in want.results],
                               rtol=1e-5, atol=1e-4)
    assert [x["is_anomaly"] for x in got["results"]] == [x.is_anomaly for x in want.results]
    for x in got["results"]:
        assert 0.0 <= x["percentile"] <= 100.0 and x["is_anomaly"] == (x["score"] > got["threshold"])


@pytest.mark.parametrize(("name", "score", "per_line"), [(REPLICATED, "nll", False), (IMAGE_COND, "nll", False),
                                                         (TEXT, "bits_per_char", False), (TEXT, "bits_per_char", True)])
def test_batch_typicality_over_http_equals_in_process(server, local, name, score, per_line):
    body = {**inputs(name), "batch_test": True, "per_line": per_line}
    r = post(server, name, body)
    assert r.status_code == 200, r.text
    got = r.json()
    want = local[name].anomaly(**inputs(name), batch_test=True, per_line=per_line)
    assert got["batch"]["score_type"] == score and got["batch"]["n"] == len(want.results) == len(got["results"])
    for field in ("mean", "typical", "statistic", "p_value"):
        assert got["batch"][field] == pytest.approx(getattr(want.batch, field), rel=1e-5, abs=1e-4), field
    assert got["batch"]["is_anomaly"] == want.batch.is_anomaly == (want.batch.p_value < 0.01)
    assert post(server, name, inputs(name)).json()["batch"] is None  # only when asked


def test_gmm_results_name_the_component(client, local):
    res = client.anomaly(REPLICATED, inputs(REPLICATED)["records"], score="likelihood_ratio")
    want = local[REPLICATED].anomaly(records=inputs(REPLICATED)["records"], score="likelihood_ratio")
    assert [r.component for r in res.results] == [r.component for r in want.results]
    assert all(0.5 <= r.responsibility <= 1.0 for r in res.results)
    assert client.anomaly(REPLICATED, inputs(REPLICATED)["records"]).results[5].is_anomaly  # radius 8x any seen


def test_text_per_line(server, client, local):
    res = client.anomaly_texts(TEXT_NGRAM, TEXTS, per_line=True)
    assert [(r.text_index, r.line) for r in res.results] == [(0, 1), (1, 1), (1, 2), (2, 1)]
    assert not res.results[0].is_anomaly and res.results[3].is_anomaly
    want = local[TEXT_NGRAM].anomaly(texts=TEXTS, per_line=True)
    np.testing.assert_allclose([r.score for r in res.results], [r.score for r in want.results], rtol=1e-6)
    # A text longer than the context may still be scored line by line.
    long_text = TEXT_CORPUS.strip()
    assert post(server, TEXT, {"texts": [long_text]}).status_code == 400
    lines = client.anomaly_texts(TEXT, [long_text], per_line=True)
    assert len(lines.results) == long_text.count("\n") + 1


def test_thresholds_and_rates(client, local):
    images = inputs(IMAGE_COND)["images"]
    loose = client.anomaly_images(IMAGE_COND, images, false_positive_rate=0.5)
    cal = local[IMAGE_COND].calibrations.get("ensemble")  # the artifact's default
    assert loose.threshold == pytest.approx(cal.threshold_for(0.5)) and loose.false_positive_rate == 0.5
    fixed = client.anomaly_texts(TEXT, TEXTS, threshold=-100.0)
    assert fixed.threshold == -100.0 and fixed.false_positive_rate is None and all(r.is_anomaly for r in fixed.results)


def test_complexity_and_the_default_ensemble_flag_the_blank_image(client):
    images = inputs(IMAGE_COND)["images"]
    by_complexity = client.anomaly_images(IMAGE_COND, images, score="complexity")
    assert by_complexity.score_type == "complexity" and by_complexity.results[-1].is_anomaly
    by_default = client.anomaly_images(IMAGE_COND, images)
    assert by_default.score_type == "ensemble" and by_default.results[-1].is_anomaly


@pytest.mark.parametrize(("name", "body", "status", "type_", "message"), [
    (REPLICATED, {"records": [[1.0] * 30], "score": "complexity"}, 400, "unknown_score",
     "score 'complexity' is not available for models of records; available: nll, bits_per_dim, likelihood_ratio"),
    (REPLICATED, {"records": [[1.0] * 30], "score": "surprise"}, 422, "invalid_request", "score"),
    (IMAGE_COND, {"images": [[[0] * 8] * 8], "score": "bits_per_char"}, 400, "unknown_score", "image models"),
    (REPLICATED, {"texts": ["hello"]}, 400, "wrong_model_kind", "texts given; model 'bc' is a gmm model of records"),
    (TEXT, {"records": [[1.0]]}, 400, "wrong_model_kind", "records given; model 'bard' is a gpt text model"),
    (TEXT, {"texts": ["to be"], "labels": [1]}, 400, "wrong_model_kind", "labels are for image models"),
    (SINGLE, {"records": [[1.0] * 13], "per_line": True}, 400, "wrong_model_kind", "per_line is for text models"),
    (TEXT, {"texts": ["   "]}, 400, "invalid_request", "texts[0] is empty or blank"),
    (TEXT, {"texts": ["to be" * 40]}, 400, "context_length_exceeded", f"context length is {TEXT_CONTEXT} tokens"),
    (TEXT, {"texts": ["to be!"]}, 400, "unknown_characters", "texts[0]"),
    (TEXT, {"texts": ["to be"] * 1000}, 413, "limit_exceeded", "limits.max_texts_per_request"),
    (TEXT_ONNX, {"texts": ["to be"]}, 400, "not_calibrated", "no calibration.json"),
    (IMAGE_BIN, {"images": [[[0] * 6] * 6], "score": "class_entropy"}, 400, "not_calibrated",
     "needs a class-conditional image model"),
    (TEXT_NGRAM, {"texts": ["to be"], "score": "knn"}, 400, "not_calibrated", "an n-gram model has none"),
    (TEXT, {"images": [[[0]]]}, 400, "wrong_model_kind", "images given"),
    ("nope", {"texts": ["to be"]}, 404, "model_not_found", "no model named 'nope'"),
    (TEXT, {"texts": ["to be"], "records": [[1.0]]}, 422, "invalid_request", "exactly one of records"),
])
def test_bad_requests_are_clear_4xx(server, name, body, status, type_, message):
    r = post(server, name, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == type_ and message in error["message"], error
