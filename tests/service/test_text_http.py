"""Text endpoints over real HTTP: generate (JSON and SSE), score, the OpenAI-compatible completions
through the official `openai` client, limits, metrics, and requests sharing the decoding batch."""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import time

import httpx
import openai
import pytest
import torch

from genserve.models.lm import sequence_log_probs
from genserve.service.client import GenserveClient, GenserveError
from genserve.service.decoding import GenerationParams, generate
from genserve.service.text_runtime import load_text_model
from tests.service.conftest import TEXT, TEXT_CONTEXT, TEXT_NGRAM, TEXT_ONNX, Server, metric, wait_for_metric

pytestmark = pytest.mark.integration
H = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def local(server: Server):
    """The same artifact loaded in-process, to compare the server's answers with."""
    return load_text_model(server.store / TEXT / "1", "torch", device="cpu")


@pytest.fixture(scope="module")
def client(server: Server):
    with GenserveClient(server.url) as c:
        yield c


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_greedy_generation_equals_in_process_decoding(client, local):
    prompt = "to be or"
    out = client.generate(TEXT, prompt, max_new_tokens=30, temperature=0, logprobs=True)
    ids = local.tokenizer.encode(prompt)
    expected = generate(local.model, local.tokenizer, ids, GenerationParams(max_new_tokens=30, temperature=0))[0]
    c = out.completions[0]
    assert c.token_ids == expected.token_ids and c.text == expected.text
    assert c.text.startswith(" not to be")  # the model did learn its corpus
    assert [t.logprob for t in c.tokens] == pytest.approx(expected.logprobs, abs=1e-4)
    assert c.log_prob == pytest.approx(sum(expected.logprobs), abs=1e-3)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(c.token_ids)


def test_seeded_sampling_is_reproducible_over_http(client):
    opts = {"max_new_tokens": 25, "temperature": 1.3, "top_k": 10, "top_p": 0.95, "seed": 42, "n": 3}
    a = client.generate(TEXT, "whether", **opts)
    b = client.generate(TEXT, "whether", **opts)
    assert [c.text for c in a.completions] == [c.text for c in b.completions]
    assert len(a.completions) == 3 and len({c.text for c in a.completions}) > 1


def test_beam_search_returns_ranked_beams(client, local):
    out = client.generate(TEXT, "that is", max_new_tokens=12, num_beams=4, num_return_sequences=3,
                          length_penalty=1.0)
    scores = [c.score for c in out.completions]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    expected = generate(local.model, local.tokenizer, local.tokenizer.encode("that is"),
                        GenerationParams(max_new_tokens=12, num_beams=4, num_return_sequences=3))
    assert [c.token_ids for c in out.completions] == [e.token_ids for e in expected]
    for c in out.completions:
        assert c.score == pytest.approx(c.log_prob / len(c.token_ids), abs=1e-4)


def test_streaming_sends_the_same_text_as_events(server: Server, client):
    whole = client.generate(TEXT, "the", max_new_tokens=30, temperature=0).completions[0]
    chunks = list(client.stream(TEXT, "the", max_new_tokens=30, temperature=0))
    assert "".join(c.text for c in chunks) == whole.text
    assert len(chunks) > 5 and chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 30
    with httpx.stream("POST", f"{server.url}/v1/models/{TEXT}/generate", headers=H, timeout=60,
                      content=json.dumps({"prompt": "the", "max_new_tokens": 5, "stream": True})) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_end_generation_before_them(client):
    free = client.generate(TEXT, "to be", max_new_tokens=30, temperature=0).completions[0].text
    out = client.generate(TEXT, "to be", max_new_tokens=30, temperature=0, stop=["not", "zzz"]).completions[0]
    assert out.text == free[: free.index("not")] and out.finish_reason == "stop" and out.stop == "not"
    streamed = "".join(c.text for c in client.stream(TEXT, "to be", max_new_tokens=30, temperature=0, stop=["not"]))
    assert streamed == out.text


def test_score_gives_exact_log_probabilities(client, local):
    texts = ["to be or not to be", "question the nobler"]
    out = client.score(TEXT, texts)
    for text, result in zip(texts, out.results, strict=True):
        ids = [local.tokenizer.bos_token_id, *local.tokenizer.encode(text)]
        with torch.no_grad():
            expected = sequence_log_probs(local.scorer, torch.tensor([ids]))[0]
        assert result.n_tokens == len(text) and result.n_chars == len(text)
        assert result.log_prob == pytest.approx(float(expected.sum()), abs=1e-3)
        assert [t.logprob for t in result.tokens] == pytest.approx(expected.tolist(), abs=1e-4)
        assert result.bits_per_char == pytest.approx(-result.log_prob / (len(text) * math.log(2)))
        assert result.perplexity == pytest.approx(math.exp(result.nats_per_token))
    # The corpus' own words are far more likely than a scramble of the same letters.
    scrambled = client.score(TEXT, ["ot eb ro ont ot eb"], per_token=False).results[0]
    assert scrambled.tokens is None and scrambled.bits_per_char > out.results[0].bits_per_char + 1


@pytest.mark.parametrize(
    ("path", "body", "status", "pattern"),
    [
        ("generate", {"prompt": "to", "max_new_tokens": 41}, 400, r"max_new_tokens=41 exceeds the limit of 40"),
        ("generate", {"prompt": "to", "max_new_tokens": 5, "num_beams": 5}, 400, r"num_beams=5 .*limit of 4"),
        ("generate", {"prompt": "to", "max_new_tokens": 5, "n": 5}, 400, r"n=5 .*limit of 4"),
        ("generate", {"prompt": "to be " * 10, "max_new_tokens": 10}, 400, r"context length of 64"),
        ("generate", {"prompt": "QX", "max_new_tokens": 5}, 400, r"unknown characters?: 'Q', 'X'"),
        ("generate", {"prompt": "to", "num_beams": 2, "num_return_sequences": 3}, 400, r"num_return_sequences=3"),
        ("generate", {"prompt": "to", "num_beams": 2, "n": 2}, 400, r"num_return_sequences, not n"),
        ("generate", {"prompt": "to", "max_new_tokens": 5, "n": 4, "num_beams": 1, "top_p": 0}, 422, r"top_p"),
        ("generate", {"prompt": "to", "temperature": -1}, 422, r"temperature"),
        ("generate", {"prompt": "to", "stop": [""]}, 422, r"stop"),
        ("generate", {"prompt": "to", "beams": 3}, 422, r"beams: Extra inputs"),
        ("score", {"texts": ["to"] * 9}, 400, r"texts=9 exceeds the limit of 8"),
        ("score", {"texts": ["to", ""]}, 400, r"texts\[1\] is empty"),
        ("score", {"texts": ["to be " * 11]}, 400, r"context length is 64"),
        ("score", {"texts": []}, 422, r"texts"),
    ],
)
def test_bad_text_requests_get_a_clear_4xx(server: Server, path, body, status, pattern):
    r = post(server, f"/v1/models/{TEXT}/{path}", body)
    assert r.status_code == status, r.text
    assert re.search(pattern, r.json()["error"]["message"]), r.json()


def test_text_and_record_endpoints_refuse_the_other_kind(server: Server):
    r = post(server, "/v1/models/wine/generate", {"prompt": "x"})
    assert r.status_code == 400 and "not a text model" in r.json()["error"]["message"]
    r = post(server, f"/v1/models/{TEXT}/log_prob", {"records": [[1.0]]})
    assert r.status_code == 400 and "is a text model" in r.json()["error"]["message"]
    r = post(server, "/v1/models/nope/score", {"texts": ["a"]})
    assert r.status_code == 404 and TEXT in r.json()["error"]["message"]


def test_model_info_describes_the_text_model(client):
    info = client.model(TEXT)
    assert info.kind == "gpt" and info.input.type == "text" and info.input.context_length == TEXT_CONTEXT
    assert info.input.tokenizer == "char" and info.runtime == "torch"
    # the default score: the ensemble ranked by bits per character, with the hidden-state knn among its members
    assert info.calibration.score == "ensemble" and info.calibration.ensemble_members[0] == "bits_per_char"
    assert "knn" in info.calibration.ensemble_members and "bits_per_char" in info.calibration.why
    assert info.limits.max_new_tokens == 40


def test_concurrent_requests_share_the_decoding_batch(server: Server, client, local):
    """More requests than decoding slots at once: each waits for a slot, then decodes alongside the
    others; every answer equals the same request decoded alone."""
    prompts = ["to", "be", "or not", "that is", "the", "whether", "nobler", "in the", "mind", "to suffer",
               "question", "is the"]
    expected = {p: generate(local.model, local.tokenizer, local.tokenizer.encode(p),
                            GenerationParams(max_new_tokens=20, temperature=0))[0].text for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: client.generate(TEXT, p, max_new_tokens=20, temperature=0), prompts))
    assert {p: r.completions[0].text for p, r in zip(prompts, results, strict=True)} == expected
    text = wait_for_metric(client, "genserve_time_to_first_token_seconds_count", {"model": TEXT}, len(prompts))
    assert metric(text, "genserve_time_to_first_token_seconds_count", model=TEXT) >= len(prompts)


def test_a_client_leaving_mid_stream_frees_its_slots(server: Server, client):
    body = json.dumps({"prompt": "to", "max_new_tokens": 40, "stream": True, "n": 4, "temperature": 1.0, "seed": 1})
    with httpx.stream("POST", f"{server.url}/v1/models/{TEXT}/generate", headers=H, content=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pattern = r'genserve_requests_running\{model="bard",replica="[^"]+",version="\d+"\} (\S+)'
        running = re.findall(pattern, client.metrics())
        if running and all(float(v) == 0 for v in running):
            break
        time.sleep(0.3)
    assert running and all(float(v) == 0 for v in running)
    assert client.generate(TEXT, "to", max_new_tokens=5).completions  # still serving


def test_text_metrics_are_exported(client):
    before = metric(client.metrics(), "genserve_generated_tokens_total", model=TEXT)
    client.generate(TEXT, "to be", max_new_tokens=10, temperature=0)
    text = wait_for_metric(client, "genserve_generated_tokens_total", {"model": TEXT}, before + 10)
    for name in ("genserve_prompt_tokens_total", "genserve_generated_tokens_total",
                 "genserve_time_to_first_token_seconds_bucket", "genserve_time_per_output_token_seconds_bucket",
                 "genserve_requests_running", "genserve_requests_waiting"):
        assert re.search(rf'^{name}\{{.*model="bard"', text, re.M), name
    assert metric(text, "genserve_generated_tokens_total", model=TEXT) >= before + 10


def test_onnx_runtime_serves_the_same_greedy_tokens_as_torch(client):
    assert client.model(TEXT_ONNX).runtime == "onnx"
    for prompt in ("to be", "whether tis", "q"):
        torch_out = client.generate(TEXT, prompt, max_new_tokens=30, temperature=0).completions[0]
        onnx_out = client.generate(TEXT_ONNX, prompt, max_new_tokens=30, temperature=0).completions[0]
        assert onnx_out.token_ids == torch_out.token_ids
        assert onnx_out.log_prob == pytest.approx(torch_out.log_prob, abs=1e-3)
    beams = [client.generate(m, "that", max_new_tokens=10, num_beams=3, num_return_sequences=2)
             for m in (TEXT, TEXT_ONNX)]
    assert [c.token_ids for c in beams[0].completions] == [c.token_ids for c in beams[1].completions]


def test_the_ngram_baseline_is_served_through_the_same_endpoints(client):
    out = client.generate(TEXT_NGRAM, "to be or", max_new_tokens=12, temperature=0)
    assert out.completions[0].text.startswith(" not to be")  # a 4-gram of this corpus knows the line
    score = client.score(TEXT_NGRAM, ["to be or not to be"]).results[0]
    assert score.n_tokens == 18 and score.bits_per_char < 2.0
    assert client.model(TEXT_NGRAM).input.context_length is None
    streamed = "".join(c.text for c in client.stream(TEXT_NGRAM, "that", max_new_tokens=8, temperature=0))
    assert streamed == client.generate(TEXT_NGRAM, "that", max_new_tokens=8, temperature=0).completions[0].text


# ---- the official openai client against /v1/completions ------------------------------------------


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_completions(oai: openai.OpenAI, client):
    expected = client.generate(TEXT, "to be", max_new_tokens=12, temperature=0).completions[0].text
    r = oai.completions.create(model=TEXT, prompt="to be", max_tokens=12, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.model == TEXT and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == expected and len(lp.token_logprobs) == 12 and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    served = ["bc", "wine", TEXT, TEXT_ONNX, TEXT_NGRAM, "digits-cond", "tiny-bin", "wine-flow", "digits-vae",
              "digits-gan", "digits-flow"]
    assert [m.id for m in oai.models.list()] == sorted(served)


def test_openai_client_streaming_sampling_and_beams(oai: openai.OpenAI):
    pieces = [c.choices[0].text for c in oai.completions.create(
        model=TEXT, prompt="whether", max_tokens=15, temperature=0, stream=True) if c.choices]
    whole = oai.completions.create(model=TEXT, prompt="whether", max_tokens=15, temperature=0).choices[0].text
    assert "".join(pieces) == whole
    a = oai.completions.create(model=TEXT, prompt="to", max_tokens=15, n=2, seed=5, top_p=0.9, stop="\n")
    b = oai.completions.create(model=TEXT, prompt="to", max_tokens=15, n=2, seed=5, top_p=0.9, stop="\n")
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert all("\n" not in c.text for c in a.choices)
    beams = oai.completions.create(model=TEXT, prompt=["to be", "that"], max_tokens=10, n=2,
                                   extra_body={"use_beam_search": True, "length_penalty": 0.0})
    assert [c.index for c in beams.choices] == [0, 1, 2, 3]


def test_openai_streaming_sends_usage_only_when_asked(oai: openai.OpenAI):
    # The common client loop reads chunk.choices[0] of every chunk: without stream_options, every chunk has one.
    plain = list(oai.completions.create(model=TEXT, prompt="to be", max_tokens=6, temperature=0, stream=True))
    assert plain and all(len(c.choices) == 1 and c.usage is None for c in plain)
    asked = list(oai.completions.create(model=TEXT, prompt="to be", max_tokens=6, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    *chunks, last = asked
    assert "".join(c.choices[0].text for c in chunks) == "".join(c.choices[0].text for c in plain)
    assert all(c.usage is None for c in chunks)
    assert last.choices == [] and last.usage.completion_tokens == 6 and last.usage.total_tokens == 6 + 5
    with pytest.raises(openai.BadRequestError, match="stream_options is only allowed when stream is true"):
        oai.completions.create(model=TEXT, prompt="to", max_tokens=2, stream_options={"include_usage": True})


def test_openai_client_sees_clear_errors(oai: openai.OpenAI):
    with pytest.raises(openai.NotFoundError, match="no model named 'gpt-4'"):
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens=500 exceeds the limit of 40"):
        oai.completions.create(model=TEXT, prompt="to", max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        oai.completions.create(model=TEXT, prompt="to", max_tokens=2, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        oai.completions.create(model=TEXT, prompt="to", max_tokens=2, extra_body={"mirostat": 1})


def test_python_client_raises_server_errors(client):
    with pytest.raises(GenserveError) as err:
        client.generate(TEXT, "to", max_new_tokens=1000)
    assert err.value.status_code == 400 and err.value.error_type == "limit_exceeded"
    with pytest.raises(GenserveError):
        list(client.stream(TEXT, "QQ", max_new_tokens=3))
