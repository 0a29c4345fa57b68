"""A bad request fails alone, in process: sampling parameters the API accepts never make NaN or inf, a model
that breaks on one request's input fails that request only (the others of its batch continue and produce
exactly what they would have alone), batched scoring reruns a failing batch request by request, and image
sampling is budgeted and cancellable. The same over real HTTP: tests/service/test_isolation_http.py."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from genserve.artifacts.tokenizer import train_char_tokenizer
from genserve.models.fvsbn import FVSBN, FVSBNConfig
from genserve.models.gpt import GPT, GPTConfig
from genserve.models.image import SamplingCancelled, cancellable, draw_pixel
from genserve.service.api.errors import status_of
from genserve.service.decoding import Engine, GenerationParams, filter_logits, generate
from genserve.service.errors import LimitExceeded
from genserve.service.image import SamplingBudget, run_sampling_job, score_requests
from genserve.service.image_runtime import TorchImageRuntime
from genserve.service.isolation import (
    LOG_PROB_FLOOR,
    OutOfResources,
    OverLimit,
    ReplicaBusy,
    RequestFailed,
    finite_log_probs,
    finite_responsibilities,
    is_replica_busy,
    is_request_failure,
    run_isolated,
)
from genserve.service.services.images import ImageService

TEXT = "abcdefgh ijk\nlmnop"
POISON_CHAR = "z"  # in the tokenizer's alphabet, never in an innocent prompt


@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer([TEXT + POISON_CHAR])


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2, n_embd=32)).eval()


INNOCENT = [
    GenerationParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
    GenerationParams(max_new_tokens=12, temperature=1.0, seed=1, ignore_eos=True),
    GenerationParams(max_new_tokens=9, temperature=0.8, top_k=5, seed=2, ignore_eos=True),
    GenerationParams(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=3, n=2, ignore_eos=True),
    GenerationParams(max_new_tokens=8, num_beams=3, num_return_sequences=2, ignore_eos=True),
    GenerationParams(max_new_tokens=12, temperature=0.5, seed=5, top_logprobs=3, ignore_eos=True),
]
PROMPTS = ["abc", "hij", "a", "lmno", "fed", "k\nl"]


def run_all(engine: Engine, requests) -> None:
    while any(not r.finished for r in requests):
        engine.step()


def alone(model, tokenizer) -> list[list]:
    return [[(o.token_ids, o.logprobs) for o in generate(model, tokenizer, tokenizer.encode(p), q)]
            for p, q in zip(PROMPTS, INNOCENT, strict=True)]


def outputs(request) -> list:
    return [(o.token_ids, o.logprobs) for o in request.outputs]


def assert_same(got: list, want: list) -> None:
    """Token for token, and log-probabilities to float32 precision (batch shapes may change the last bits)."""
    assert [[ids for ids, _ in o] for o in got] == [[ids for ids, _ in o] for o in want]
    for g, w in zip(got, want, strict=True):
        for (_, g_lp), (_, w_lp) in zip(g, w, strict=True):
            assert g_lp == pytest.approx(w_lp, abs=1e-4)


# ---- sampling parameters: no accepted value makes NaN ------------------------------------------------------


POISON_PARAMS = [
    {"temperature": 1e-45}, {"temperature": 5e-324}, {"temperature": 9.9e-6}, {"top_p": 1e-300},
    {"temperature": 1e-45, "top_p": 1e-300}, {"temperature": 100.0, "top_p": 1e-300},
]


@pytest.mark.parametrize("poison", POISON_PARAMS, ids=str)
def test_extreme_sampling_parameters_decode_greedily_beside_innocent_requests(model, tokenizer, poison) -> None:
    engine = Engine(model, tokenizer, slots=16)
    innocent = [engine.submit(tokenizer.encode(p), q) for p, q in zip(PROMPTS, INNOCENT, strict=True)]
    params = GenerationParams(max_new_tokens=12, seed=4, ignore_eos=True, **poison)
    bad = engine.submit(tokenizer.encode("abc"), params)
    run_all(engine, [*innocent, bad])
    assert_same([outputs(r) for r in innocent], alone(model, tokenizer))
    # Below the temperature floor, or keeping only the most likely token: the greedy continuation.
    greedy = generate(model, tokenizer, tokenizer.encode("abc"), GenerationParams(max_new_tokens=12, temperature=0,
                                                                                 ignore_eos=True))
    assert bad.error is None and outputs(bad)[0][0] == greedy[0].token_ids
    assert all(math.isfinite(lp) for lp in bad.outputs[0].logprobs)


@pytest.mark.parametrize("penalty", [1e300, -1e300, 1e4, -1e4, 0.0])
def test_extreme_length_penalties_rank_beams_with_finite_scores(model, tokenizer, penalty) -> None:
    params = GenerationParams(max_new_tokens=10, num_beams=3, num_return_sequences=3, length_penalty=penalty,
                              ignore_eos=True)
    out = generate(model, tokenizer, tokenizer.encode("abc"), params)
    assert len(out) == 3
    assert all(math.isfinite(o.score) and all(map(math.isfinite, o.logprobs)) for o in out)
    assert [o.score for o in out] == sorted((o.score for o in out), reverse=True)


def test_top_p_always_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    for top_p in (1e-300, 5e-324, 1e-8):
        kept = torch.isfinite(filter_logits(logits, 1.0, None, top_p))
        assert kept.sum(-1).tolist() == [1, 1] and bool(kept[0, 1])


# ---- a model that breaks on one request's input ----------------------------------------------------------


class Poisoned:
    """Wraps a LanguageModel that breaks for every sequence whose prompt holds `token`: its next-token scores
    become NaN (`mode` "nan"), or the whole batched step raises while such a sequence is in it ("raise")."""

    def __init__(self, model, token: int, mode: str):
        self.model, self.token, self.mode = model, token, mode
        self.vocab_size, self.context_length = model.vocab_size, model.context_length
        self.bad: set[int] = set()  # slots holding a poisoned sequence

    def parameters(self):
        return self.model.parameters()

    def allocate(self, slots, max_len):
        return self.model.allocate(slots, max_len)

    def prefill(self, state, slots, tokens, lengths):
        hit = [self.token in tokens[i, : int(lengths[i])].tolist() for i in range(len(slots))]
        if self.mode == "raise" and any(hit):
            raise ValueError("poisoned prompt")
        logits = self.model.prefill(state, slots, tokens, lengths)
        for s, h in zip(slots.tolist(), hit, strict=True):
            (self.bad.add if h else self.bad.discard)(s)
        return self._poison(logits, slots)

    def decode(self, state, slots, tokens):
        if self.mode == "raise" and self.bad & set(slots.tolist()):
            raise ValueError("poisoned sequence")
        return self._poison(self.model.decode(state, slots, tokens), slots)

    def copy_slots(self, state, src, dst):
        self.model.copy_slots(state, src, dst)
        marks = [s in self.bad for s in src.tolist()]
        for d, bad in zip(dst.tolist(), marks, strict=True):
            (self.bad.add if bad else self.bad.discard)(d)

    def _poison(self, logits, slots):
        rows = [i for i, s in enumerate(slots.tolist()) if s in self.bad]
        if rows:
            logits = logits.clone()
            logits[rows] = float("nan")
        return logits


@pytest.mark.parametrize("mode", ["nan", "raise"])
@pytest.mark.parametrize("poison", [GenerationParams(max_new_tokens=12, temperature=1.0, seed=9, ignore_eos=True),
                                    GenerationParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
                                    GenerationParams(max_new_tokens=12, num_beams=2, ignore_eos=True)],
                         ids=["sampling", "greedy", "beams"])
def test_a_request_the_model_breaks_on_fails_alone(model, tokenizer, mode, poison) -> None:
    broken = Poisoned(model, tokenizer.encode(POISON_CHAR)[0], mode)
    engine = Engine(broken, tokenizer, slots=16)
    innocent = [engine.submit(tokenizer.encode(p), q) for p, q in zip(PROMPTS, INNOCENT, strict=True)]
    for _ in range(3):  # the innocent requests are running when the poisoned one joins
        engine.step()
    bad = engine.submit(tokenizer.encode("ab" + POISON_CHAR), poison)
    late = engine.submit(tokenizer.encode("abc"), INNOCENT[1])  # joins with it, in the same prefill
    run_all(engine, [*innocent, bad, late])
    assert bad.error is not None and bad.outputs == []
    assert ("not finite" in bad.error) if mode == "nan" else ("poisoned" in bad.error)
    assert_same([outputs(r) for r in innocent], alone(model, tokenizer))
    assert_same([outputs(late)], [[(o.token_ids, o.logprobs)
                                   for o in generate(model, tokenizer, tokenizer.encode("abc"), INNOCENT[1])]])
    assert sorted(engine.free) == list(range(16))  # the failed request's slots are free again
    with pytest.raises(RequestFailed, match=r"failed|finite"):
        generate(Poisoned(model, broken.token, mode), tokenizer, tokenizer.encode(POISON_CHAR), poison)


# ---- batched scoring: rerun one by one when a batch fails ---------------------------------------------------


def test_run_isolated_gives_the_guilty_request_the_error_and_the_others_their_results() -> None:
    def double(batch):
        if any(x < 0 for x in batch):
            raise ValueError("negative input")
        return [2 * x for x in batch]

    got = run_isolated(double, [1, 2, -3, 4])
    assert got[:2] == [2, 4] and got[3] == 8
    assert isinstance(got[2], RequestFailed) and "ValueError: negative input" in str(got[2])
    assert is_request_failure(got[2]) and run_isolated(double, [5]) == [10]


def test_running_out_of_memory_on_one_request_is_busy_not_its_fault() -> None:
    """A request the replica runs out of memory on alone gets OutOfResources (503 overloaded at the Gateway,
    which checks busy first), not a 500 model_error; its batch-mates still get their results."""

    def hungry(batch):
        if sum(batch) > 100:
            raise MemoryError()
        return [x + 1 for x in batch]

    got = run_isolated(hungry, [1, 200, 3])
    assert got[0] == 2 and got[2] == 4
    assert isinstance(got[1], OutOfResources) and is_replica_busy(got[1]) and is_request_failure(got[1])


def test_image_scoring_batches_isolate_a_failing_request() -> None:
    torch.manual_seed(0)
    module = FVSBN(FVSBNConfig(height=4, width=4, levels=3)).eval()
    real = TorchImageRuntime(module)

    class Fragile:  # breaks on any image that is all 2s
        name, device = "torch", "cpu"

        def score(self, images, labels):
            if (images == 2).all(axis=(1, 2)).any():
                raise RuntimeError("the model cannot score this image")
            return real.score(images, labels)

    loaded = SimpleNamespace(runtime=Fragile())
    rng = np.random.default_rng(0)
    good = [(rng.integers(0, 2, (n, 4, 4)), None) for n in (1, 3, 2)]
    poison = (np.full((2, 4, 4), 2), None)
    got = run_isolated(lambda batch: score_requests(loaded, batch), [good[0], poison, good[1], good[2]])
    assert isinstance(got[1], RequestFailed) and "cannot score this image" in str(got[1])
    for (lp, px), request in zip([got[0], got[2], got[3]], good, strict=True):
        want_lp, want_px = real.score(*request)
        np.testing.assert_array_equal(lp, want_lp)
        np.testing.assert_array_equal(px, want_px)


def test_non_finite_log_probabilities_are_reported_at_the_floor() -> None:
    got = finite_log_probs(np.array([-1.0, -np.inf, np.nan, np.inf, -1e308]))
    assert got.tolist() == [-1.0, LOG_PROB_FLOOR, LOG_PROB_FLOOR, -LOG_PROB_FLOOR, LOG_PROB_FLOOR]
    assert math.isfinite(-got[1] / math.log(2) * 2)  # bits, and their sums, stay finite too
    resp = finite_responsibilities(np.array([[0.25, 0.75], [np.nan, np.nan]]))
    assert resp.tolist() == [[0.25, 0.75], [0.5, 0.5]]


# ---- image sampling: a budget in pixels, and cancellation ------------------------------------------------


def test_the_sampling_budget_refuses_what_never_fits_and_what_does_not_fit_now() -> None:
    budget = SamplingBudget("m", limit=100)
    with pytest.raises(OverLimit, match=r"11 images x 10 pixels = 110 pixels .* 100 pixels .*max_queued_pixels"), \
            budget.hold(11, 10):
        pass
    with budget.hold(6, 10):
        with pytest.raises(ReplicaBusy, match=r"sampling 60 pixels; 50 more .*max_queued_pixels"), budget.hold(5, 10):
            pass
        with budget.hold(4, 10):
            assert budget.held == 100
    assert budget.held == 0


def test_the_image_service_refuses_a_sample_over_the_pixel_limit() -> None:
    manifest = SimpleNamespace(input=SimpleNamespace(height=28, width=28))
    catalog = SimpleNamespace(manifest=lambda name: manifest,
                              limits=SimpleNamespace(max_image_pixels_per_request=784 * 10))
    images = ImageService(catalog)
    images.check_sampling_cost("m", 10, "n=10 images")
    with pytest.raises(LimitExceeded) as err:
        images.check_sampling_cost("m", 11, "n=11 images")
    assert status_of(err.value) == 400 and err.value.type == "limit_exceeded"
    assert "n=11 images x 28x28 pixels = 8624" in err.value.message
    assert "limits.max_image_pixels_per_request" in err.value.message


def test_a_cancelled_sampling_job_stops_at_its_next_pixel_and_frees_the_replica() -> None:
    drawn = []
    logits = torch.zeros(2, 3)

    def slow_sampler() -> None:
        while True:  # a sampler that would never end on its own
            drawn.append(draw_pixel(logits, None))
            time.sleep(0.005)

    async def scenario() -> None:
        lock = asyncio.Lock()
        job = asyncio.ensure_future(run_sampling_job(lock, slow_sampler))
        while len(drawn) < 3:
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        stopped_at = len(drawn)
        await asyncio.sleep(0.05)
        assert len(drawn) == stopped_at  # the worker thread stopped: it was not left running
        assert not lock.locked()

    asyncio.run(scenario())


def test_a_failing_sampling_job_fails_alone_and_draw_pixel_checks_only_its_own_thread() -> None:
    def broken() -> None:
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    with pytest.raises(RequestFailed, match="sampling failed: RuntimeError: probability tensor"):
        asyncio.run(run_sampling_job(asyncio.Lock(), broken))
    cancel = threading.Event()
    cancel.set()
    with cancellable(cancel), pytest.raises(SamplingCancelled):
        draw_pixel(torch.zeros(1, 2), None)
    draw_pixel(torch.zeros(1, 2), None)  # outside the job: no cancel event
