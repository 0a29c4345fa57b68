"""A bad request fails alone, over real HTTP: poison requests mixed with innocent ones, for text, records and
images; the innocent ones succeed with the same results as alone.

This module starts a small server of its own: it serves a deliberately broken model (a character LSTM whose
embedding of one character is NaN, so every sequence holding it gets NaN scores) and tight image sampling
budgets, which would change the answers the session server's other tests expect (its model list, its
limits). Beside them: the session's tiny GPT, a GMM and a RealNVP on wine, and a binary FVSBN."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from sklearn.datasets import load_wine

from genserve.artifacts import artifact as art
from genserve.artifacts.tokenizer import train_char_tokenizer
from genserve.models.lstm import CharLSTM, LSTMConfig
from genserve.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from genserve.service.isolation import LOG_PROB_FLOOR
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from genserve.training.records_pipeline import RecordsTrainConfig, train_records
from tests.service.conftest import (
    CPU0,
    DIGITS_TRAIN,
    TEXT,
    TEXT_CORPUS,
    Server,
    digits,
    fit_fvsbn,
    free_port,
    start_server,
    stop,
    write_image_artifact,
    write_serve_config,
    write_text_models,
)

pytestmark = pytest.mark.integration

BROKEN = "broken-lstm"  # NaN embedding for POISON: any sequence holding it has NaN next-token scores
POISON = "q"  # in TEXT_CORPUS's alphabet; no innocent prompt holds it
GMM = "wine"
FLOW = "wine-flow"
IMAGES = "tiny-bin"  # 6x6 binary FVSBN
PIXELS = 36
MAX_PIXELS = 50 * PIXELS  # limits.max_image_pixels_per_request
QUEUED_PIXELS = 40 * PIXELS  # the FVSBN deployment's max_queued_pixels
SLOW = "slow-pixelcnn"  # an untrained, wide and deep 28x28 gated PixelCNN: two samples take many seconds
SLOW_JOB = 2  # images: exactly its replica's sampling budget, within limits.max_image_pixels_per_request


def write_slow_pixelcnn(store) -> None:
    torch.manual_seed(0)
    config = PixelCNNConfig(height=28, width=28, levels=2, channels=128, n_layers=12)
    spec = art.ImageInputSpec(height=28, width=28, levels=2, n_classes=0)
    art.write_artifact(store, kind="pixelcnn", name=SLOW, config=dataclasses.asdict(config), input_spec=spec,
                       files={art.WEIGHTS: art.module_weights(GatedPixelCNN(config).eval())},
                       training={"source": "test"}, metrics={})


def write_broken_lstm(store) -> None:
    tokenizer = train_char_tokenizer([TEXT_CORPUS])
    torch.manual_seed(0)
    config = LSTMConfig(vocab_size=tokenizer.vocab_size, n_embd=16, hidden_size=32, n_layer=1)
    model = CharLSTM(config).eval()
    with torch.no_grad():
        model.wte.weight[tokenizer.encode(POISON)[0]] = float("nan")
    spec = art.TextInputSpec(tokenizer="char", vocab_size=tokenizer.vocab_size, context_length=None,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    art.write_artifact(store, kind="lstm", name=BROKEN, config=config.to_dict(), input_spec=spec,
                       files={art.WEIGHTS: art.module_weights(model), art.TOKENIZER: tokenizer.to_json().encode()},
                       training={"source": "test"}, metrics={})


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("isolation")
    store = root / "store"
    torch.set_num_threads(1)
    train_gmm(GMMTrainConfig(dataset="sklearn:wine", name=GMM, components=2, covariance_type="diag", n_init=1,
                             export_onnx=False), store, progress=False)
    train_records(RecordsTrainConfig(model="realnvp", dataset="sklearn:wine", name=FLOW, epochs=5,
                                     architecture={"n_layers": 2, "hidden": 16}), store, progress=False)
    write_text_models(store)
    write_broken_lstm(store)
    write_slow_pixelcnn(store)
    binary, _ = digits(binary=True)
    write_image_artifact(store, IMAGES, fit_fvsbn(binary[:DIGITS_TRAIN], None, levels=2, steps=50),
                         binary[:DIGITS_TRAIN], binary[DIGITS_TRAIN:], onnx=False)
    port = free_port()
    config = root / "serve.yaml"
    write_serve_config(config, port, {
        "models": [TEXT, BROKEN, GMM, FLOW, IMAGES, SLOW],
        "limits": {"max_new_tokens": 40, "max_images_per_request": 64, "max_image_pixels_per_request": MAX_PIXELS},
        "deployments": {
            TEXT: {**CPU0, "user_config": {"runtime": "torch", "slots": 16}},
            BROKEN: {**CPU0, "user_config": {"slots": 16}},
            GMM: {**CPU0, "user_config": {"runtime": "torch", "max_batch_size": 16, "batch_wait_timeout_s": 0.02}},
            FLOW: {**CPU0, "user_config": {"runtime": "torch", "max_batch_size": 16, "batch_wait_timeout_s": 0.02}},
            IMAGES: {**CPU0, "user_config": {"runtime": "torch", "max_queued_pixels": QUEUED_PIXELS,
                                             "batch_wait_timeout_s": 0.02}},
            SLOW: {**CPU0, "user_config": {"runtime": "torch", "max_queued_pixels": SLOW_JOB * 28 * 28}},
        }})
    srv = start_server(config, store, port, root / "serve.log")
    yield srv
    stop(srv)


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, timeout=120)


def together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at the same time (so they share batches), results in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def strict_json(response: httpx.Response) -> Any:
    """The body as strict JSON: NaN and Infinity, which Python's parser would take, are refused."""
    def refuse(token: str) -> None:
        raise AssertionError(f"non-finite JSON number {token} in {response.text[:200]}")

    return json.loads(response.text, parse_constant=refuse)


def completions(response: httpx.Response) -> list[list]:
    assert response.status_code == 200, response.text
    return [[c["token_ids"], c["text"], c["log_prob"]] for c in strict_json(response)["completions"]]


def same(got: Any, want: Any) -> bool:
    """Equal answers: the same structure, integers and strings, and numbers to float32 precision (a batch of
    another size may round the last bits of a matrix product differently)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    if isinstance(want, float):
        return isinstance(got, (int, float)) and got == pytest.approx(want, rel=1e-4, abs=1e-4)
    return got == want


# ---- text --------------------------------------------------------------------------------------------------

INNOCENT_TEXT = [
    {"prompt": "to be", "max_new_tokens": 20, "temperature": 0},
    {"prompt": "whether", "max_new_tokens": 20, "temperature": 0.9, "seed": 1},
    {"prompt": "the mind", "max_new_tokens": 20, "temperature": 1.2, "top_k": 5, "seed": 2},
    {"prompt": "not", "max_new_tokens": 20, "temperature": 0.7, "top_p": 0.8, "seed": 3, "n": 2},
    {"prompt": "to suffer", "max_new_tokens": 12, "num_beams": 3, "num_return_sequences": 2},
    {"prompt": "in the", "max_new_tokens": 20, "temperature": 1.0, "seed": 4, "logprobs": True, "top_logprobs": 2},
]
GREEDY_POISONS = [{"temperature": 1e-45}, {"temperature": 5e-324}, {"top_p": 1e-300, "seed": 5},
                  {"temperature": 1e-45, "top_p": 1e-300, "seed": 1}]
BEAM_POISONS = [{"num_beams": 2, "length_penalty": 1e300}, {"num_beams": 2, "length_penalty": -1e300}]


def test_extreme_sampling_parameters_leave_the_batch_alone(iso: Server) -> None:
    path = f"/v1/models/{TEXT}/generate"
    alone = [completions(post(iso, path, body)) for body in INNOCENT_TEXT]
    greedy = completions(post(iso, path, {"prompt": "that is", "max_new_tokens": 20, "temperature": 0}))
    poisons = [{"prompt": "that is", "max_new_tokens": 20, **p} for p in GREEDY_POISONS + BEAM_POISONS]
    openai_poison = {"model": TEXT, "prompt": "that is", "max_tokens": 20, "temperature": 1e-45}
    calls = [lambda b=b: post(iso, path, b) for b in INNOCENT_TEXT + poisons]
    answers = together([*calls, lambda: post(iso, "/v1/completions", openai_poison)])
    assert same([completions(r) for r in answers[:len(INNOCENT_TEXT)]], alone)
    poisoned = answers[len(INNOCENT_TEXT):]
    for response in poisoned[:len(GREEDY_POISONS)]:  # below the temperature floor / top-1: greedy, documented
        assert same(completions(response), greedy)
    for response in poisoned[len(GREEDY_POISONS):-1]:  # length penalty clamped: beams with finite scores
        assert response.status_code == 200 and all(math.isfinite(c["score"])
                                                   for c in strict_json(response)["completions"])
    assert strict_json(poisoned[-1])["choices"][0]["text"] == greedy[0][1]


INNOCENT_BROKEN = [
    {"prompt": "to be", "max_new_tokens": 15, "temperature": 0},
    {"prompt": "whether", "max_new_tokens": 15, "temperature": 0.9, "seed": 1},
    {"prompt": "the mind", "max_new_tokens": 15, "temperature": 1.2, "top_k": 5, "seed": 2, "n": 2},
    {"prompt": "not", "max_new_tokens": 15, "num_beams": 2},
    {"prompt": "to suffer", "max_new_tokens": 15, "temperature": 0.5, "seed": 3},
    {"prompt": "", "max_new_tokens": 15, "temperature": 1.0, "seed": 4},
]


def test_a_request_the_model_breaks_on_fails_alone_with_500(iso: Server) -> None:
    """The issue's case: six ordinary generations and one the model turns to NaN, in one running batch."""
    path = f"/v1/models/{BROKEN}/generate"
    alone = [completions(post(iso, path, body)) for body in INNOCENT_BROKEN]
    bad = {"prompt": f"the {POISON}uestion", "max_new_tokens": 15, "temperature": 0.8, "seed": 1}
    bad_openai = {"model": BROKEN, "prompt": f"{POISON}", "max_tokens": 10}
    calls = [lambda b=b: post(iso, path, b) for b in INNOCENT_BROKEN]
    calls += [lambda: post(iso, path, bad), lambda: post(iso, "/v1/completions", bad_openai),
              lambda: post(iso, path, {**bad, "num_beams": 2}), lambda: post(iso, path, {**bad, "stream": True})]
    answers = together(calls)
    assert same([completions(r) for r in answers[:len(INNOCENT_BROKEN)]], alone)
    plain, openai_style, beams, streamed = answers[len(INNOCENT_BROKEN):]
    for response in (plain, openai_style, beams):
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "model_error" and "not finite" in error["message"], error
    assert streamed.status_code == 200  # the stream had started: the error comes as an event, then [DONE]
    assert "event: error" in streamed.text and "model_error" in streamed.text and "not finite" in streamed.text
    assert streamed.text.rstrip().endswith("data: [DONE]")
    # The replica is still serving, with its slots free again.
    assert same(completions(post(iso, path, INNOCENT_BROKEN[0])), alone[0])


# ---- records -----------------------------------------------------------------------------------------------


def wine_records(start: int, n: int) -> list[list[float]]:
    return load_wine().data[start:start + n].tolist()


EXTREME = [[1e300] * 13, [-1.7e308] * 13, [1e154] * 13]


@pytest.mark.parametrize("name", [GMM, FLOW])
def test_records_whose_density_underflows_get_the_floor_and_leave_the_batch_alone(iso: Server, name) -> None:
    path = f"/v1/models/{name}/log_prob"
    innocent = [{"records": wine_records(10 * i, 3 + i)} for i in range(6)]
    alone = [strict_json(post(iso, path, body)) for body in innocent]
    poison = {"records": [wine_records(0, 1)[0], *EXTREME]}
    calls = [lambda b=b: post(iso, path, b) for b in innocent] + [lambda: post(iso, path, poison)] * 2
    answers = together(calls)
    for got, want in zip(answers[:6], alone, strict=True):
        got = strict_json(got)
        assert got["log_prob"] == pytest.approx(want["log_prob"], rel=1e-12, abs=1e-12)
    for response in answers[6:]:
        body = strict_json(response)
        assert body["log_prob"][0] == pytest.approx(alone[0]["log_prob"][0], rel=1e-12)
        assert body["log_prob"][1:] == [LOG_PROB_FLOOR] * 3  # documented: -1e300, never -inf or NaN
        assert all(math.isfinite(b) and b > 0 for b in body["bits_per_dim"][1:])
    anomaly = post(iso, f"/v1/models/{name}/anomaly", poison)
    flags = [r["is_anomaly"] for r in strict_json(anomaly)["results"]]
    assert flags[1:] == [True] * 3
    v2 = post(iso, f"/v2/models/{name}/infer", {"inputs": [{"name": "records", "shape": [4, 13], "datatype": "FP64",
                                                            "data": poison["records"]}]})
    outputs = {o["name"]: o["data"] for o in strict_json(v2)["outputs"]}
    assert outputs["log_prob"][1:] == [LOG_PROB_FLOOR] * 3 and outputs["is_anomaly"][1:] == [True] * 3


def test_gmm_responsibilities_of_a_record_no_component_explains_are_uniform(iso: Server) -> None:
    body = strict_json(post(iso, f"/v1/models/{GMM}/log_prob", {"records": EXTREME[:1], "responsibilities": True}))
    assert body["responsibilities"] == [[0.5, 0.5]]


def test_nan_and_infinity_in_json_records_are_refused_naming_the_record(iso: Server) -> None:
    record = json.dumps(wine_records(0, 1)[0])
    for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
        bad = f"[{literal}{record[record.index(','):]}"  # the record with its first value replaced
        body = f'{{"records": [{record}, {bad}]}}'
        response = httpx.post(f"{iso.url}/v1/models/{GMM}/log_prob", content=body,
                              headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code in (400, 422), response.text
        assert "records[1][0]" in response.json()["error"]["message"], response.text
        v2 = f'{{"inputs": [{{"name": "records", "shape": [1, 13], "datatype": "FP64", "data": {bad}}}]}}'
        response = httpx.post(f"{iso.url}/v2/models/{GMM}/infer", content=v2,
                              headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 400 and "records[0][0]" in response.json()["error"], response.text


# ---- images ------------------------------------------------------------------------------------------------


def test_image_requests_over_the_sampling_budget_fail_alone_naming_the_limit(iso: Server) -> None:
    sample, complete = f"/v1/models/{IMAGES}/sample", f"/v1/models/{IMAGES}/complete"
    heldout = digits(binary=True)[0][DIGITS_TRAIN:DIGITS_TRAIN + 4].tolist()
    innocent = [(sample, {"n": 5, "seed": 1}), (sample, {"n": 3, "seed": 2, "format": "png"}),
                (f"/v1/models/{IMAGES}/log_prob", {"images": heldout, "per_pixel": True}),
                (f"/v1/models/{IMAGES}/anomaly", {"images": heldout}),
                (complete, {"images": heldout[:2], "known_rows": 3, "n": 2, "seed": 3})]
    alone = [strict_json(post(iso, path, body)) for path, body in innocent]
    poisons = [(sample, {"n": 51, "seed": 1}), (complete, {"images": heldout[:3], "known_rows": 1, "n": 17}),
               (sample, {"n": 45, "seed": 1})]
    answers = together([lambda p=p, b=b: post(iso, p, b) for p, b in innocent + poisons])
    for response, want in zip(answers[:len(innocent)], alone, strict=True):
        assert same(strict_json(response), want), (response.text[:300], want)
    per_request, completions_over, per_replica = answers[len(innocent):]
    for response, words in ((per_request, ["n=51 images x 6x6 pixels = 1836", "limits.max_image_pixels_per_request"]),
                            (completions_over, ["51 completions", "limits.max_image_pixels_per_request"]),
                            (per_replica, ["45 images x 36 pixels = 1620", f"{QUEUED_PIXELS} pixels",
                                           "max_queued_pixels"])):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "limit_exceeded" and all(w in error["message"] for w in words), error


def test_a_full_sampling_queue_answers_503_and_the_jobs_it_took_are_unchanged(iso: Server) -> None:
    path = f"/v1/models/{IMAGES}/sample"
    bodies = [{"n": 40, "seed": s} for s in range(6)]  # each holds the whole replica budget
    answers = together([lambda b=b: post(iso, path, b) for b in bodies])
    for body, response in zip(bodies, answers, strict=True):
        if response.status_code == 503:
            error = response.json()["error"]
            assert error["type"] == "overloaded" and "max_queued_pixels" in error["message"], error
        else:
            assert same(strict_json(response), strict_json(post(iso, path, body)))
    assert strict_json(post(iso, path, bodies[0]))["images"]  # the budget is free again


def test_a_client_that_disconnects_cancels_its_sampling_job(iso: Server) -> None:
    """A job that holds the slow model's whole sampling budget, whose client gives up: the replica stops it and
    frees the budget, so a one-image request gets in long before the job could have finished (had it run on,
    that request would get 503 overloaded: it does not fit beside the job)."""
    path = f"{iso.url}/v1/models/{SLOW}/sample"
    with pytest.raises(httpx.TimeoutException):
        httpx.post(path, json={"n": SLOW_JOB, "seed": 1}, timeout=2)
    deadline = time.monotonic() + 5  # two 28x28 images take several times this on this model
    while True:
        response = httpx.post(path, json={"n": 1, "seed": 2}, timeout=60)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        assert response.json()["error"]["type"] == "overloaded", response.text
        time.sleep(0.25)
    assert response.status_code == 200, response.text
